"""The committed JSON Schemas and AsyncAPI document are exactly what the code generates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from contracts.asyncapi import asyncapi_document
from contracts.events import EVENT_TYPES
from contracts.generate import SCHEMAS_DIR, differences, generate, write_all
from contracts.json_schema import json_schemas
from contracts.service_api import ENDPOINTS
from contracts.subjects import (
    CMD_CANCEL,
    CMD_SCHEDULE,
    CMD_START,
    DIRECTORY_CONTACT_PREFIX,
    NOTIFICATIONS_PREFIX,
    QUERY_GET,
    QUERY_VISITS,
)


def test_committed_contract_documents_match_the_code() -> None:
    found = differences(SCHEMAS_DIR)
    assert not found, (
        "contracts/schemas/ is out of date; run `clinic contracts` (or "
        f"`python -m contracts.generate`) and commit the result: {found}"
    )


def test_generation_is_deterministic() -> None:
    assert generate() == generate()


def test_write_all_writes_every_document_and_reports_no_difference(tmp_path: Path) -> None:
    paths = write_all(tmp_path)
    assert {p.name for p in paths} == set(generate())
    assert differences(tmp_path) == []


def test_a_changed_or_leftover_file_is_reported(tmp_path: Path) -> None:
    write_all(tmp_path)
    (tmp_path / "Problem.json").write_text("{}")
    (tmp_path / "Old.json").write_text("{}")
    assert differences(tmp_path) == ["Problem.json: differs", "Old.json: not generated any more"]


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_each_json_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(json_schemas()[name])


def test_every_event_request_reply_and_the_problem_has_a_schema() -> None:
    names = set(json_schemas())
    assert {f"{type_}Event" for type_ in EVENT_TYPES} <= names
    assert {e.request.__name__ for e in ENDPOINTS} | {e.reply.__name__ for e in ENDPOINTS} <= names
    assert {"EventEnvelope", "Problem", "Notification", "DirectoryContactReply"} <= names


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_every_reference_of_the_asyncapi_document_resolves() -> None:
    document = asyncapi_document()
    for ref in _refs(document):
        _resolve(document, ref)


def test_operations_use_only_messages_of_their_channels() -> None:
    document = asyncapi_document()
    for name, operation in document["operations"].items():
        parts = [(operation["channel"], operation["messages"])]
        if "reply" in operation:
            parts.append((operation["reply"]["channel"], operation["reply"]["messages"]))
        for channel_ref, messages in parts:
            channel = _resolve(document, channel_ref["$ref"])
            for message in messages:
                assert _resolve(document, message["$ref"]) in channel["messages"].values(), name


def test_asyncapi_document_names_every_subject() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {CMD_SCHEDULE, CMD_CANCEL, CMD_START, QUERY_GET, QUERY_VISITS} <= addresses
    for kind in ("scheduled", "cancelled", "started"):
        assert f"appointments.v1.events.{{clinic_id}}.{{appointment_id}}.{kind}" in addresses
    assert f"{NOTIFICATIONS_PREFIX}.{{kind}}" in addresses
    assert f"{DIRECTORY_CONTACT_PREFIX}.{{user_id}}" in addresses
    for channel in document["channels"].values():
        address = channel["address"] or ""
        for parameter in channel.get("parameters", {}):
            assert f"{{{parameter}}}" in address


def test_the_committed_asyncapi_file_is_the_generated_document() -> None:
    committed = json.loads((SCHEMAS_DIR / "asyncapi.json").read_text())
    assert committed == asyncapi_document()


def _timestamp_properties(node: object, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``*_at`` property of a JSON schema, with where it is."""
    if isinstance(node, dict):
        for name, value in (node.get("properties") or {}).items():
            if name.endswith("_at") and isinstance(value, dict):
                yield f"{path}.{name}", value
        for key, value in node.items():
            yield from _timestamp_properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _timestamp_properties(value, f"{path}[{index}]")


def test_every_timestamp_in_the_published_schemas_is_a_date_time() -> None:
    # What code generated from the schemas (the mobile gateway's) parses as a time.
    seen = 0
    for path in sorted(SCHEMAS_DIR.glob("*.json")):
        for where, prop in _timestamp_properties(json.loads(path.read_text())):
            variants = prop.get("anyOf", [prop])
            formats = {v.get("format") for v in variants if v.get("type") != "null"}
            assert formats == {"date-time"}, f"{path.name}{where}: {prop}"
            seen += 1
    assert seen > 10
