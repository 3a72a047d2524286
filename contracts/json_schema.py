"""JSON Schema (draft 2020-12) of every wire shape, derived from the msgspec Structs.

Every event as published (``<Type>Event``: the envelope with its typed ``data``), the
generic envelope, every NATS request and reply, the problem document, the notification
and the directory's reply.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, Final

import msgspec

from contracts.errors import Problem
from contracts.events import EVENT_KINDS, EVENT_TYPES, SCHEMA_VERSIONS, EventEnvelope
from contracts.notifications import DirectoryContactReply, Notification
from contracts.service_api import ENDPOINTS

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID_BASE: Final = "https://clinic.example/schemas/"
#: The ref template of standalone schema files.
DEFS_REF: Final = "#/$defs/{name}"

Schema = dict[str, Any]


def event_schema_name(type_: str) -> str:
    """The schema (and file) name of the envelope of one event type: ``…Event``."""
    return f"{type_}Event"


def _message_types() -> list[type[msgspec.Struct]]:
    """The Structs sent as whole messages (each gets a schema file of its own)."""
    requests = [endpoint.request for endpoint in ENDPOINTS]
    replies = list(dict.fromkeys(endpoint.reply for endpoint in ENDPOINTS))
    return [*requests, *replies, Problem, Notification, DirectoryContactReply]


def components(ref_template: str) -> dict[str, Schema]:
    """Every wire shape's schema by name, with ``$ref`` spelled by ``ref_template``.

    Besides the Structs' own schemas, each event type gets ``<Type>Event``: the generic
    envelope with ``type`` fixed and ``data`` being that event's Struct.
    """
    types = [EventEnvelope, *EVENT_TYPES.values(), *_message_types()]
    _, schemas = msgspec.json.schema_components(types, ref_template=ref_template)
    envelope = schemas["EventEnvelope"]
    for type_, struct in EVENT_TYPES.items():
        typed = copy.deepcopy(envelope)
        typed["title"] = event_schema_name(type_)
        typed["description"] = (
            f"{(struct.__doc__ or type_).strip()} Published on "
            f"``appointments.v1.events.<clinic_id>.<appointment_id>.{EVENT_KINDS[type_]}``."
        )
        properties = typed["properties"]
        properties["type"] = {"const": type_}
        properties["schema_version"] = {
            "type": "integer",
            "minimum": 1,
            "maximum": SCHEMA_VERSIONS[type_],
            "description": (
                f"Version of the shape of ``data``; {SCHEMA_VERSIONS[type_]} today. "
                "Older versions are upcast by readers (contracts.events.decode_event)."
            ),
        }
        properties["data"] = {"$ref": ref_template.format(name=type_)}
        schemas[event_schema_name(type_)] = typed
    return schemas


def schema_names() -> list[str]:
    """The names of the shapes that get a schema file of their own, in a stable order."""
    return [
        "EventEnvelope",
        *(event_schema_name(type_) for type_ in EVENT_TYPES),
        *(struct.__name__ for struct in _message_types()),
    ]


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _closure(root: str, schemas: Mapping[str, Schema], prefix: str) -> list[str]:
    """The names ``root`` refers to, directly or not (``root`` excluded), sorted."""
    seen: set[str] = set()
    pending = [root]
    while pending:
        for ref in _refs(schemas[pending.pop()]):
            name = ref.removeprefix(prefix)
            if name not in seen:
                seen.add(name)
                pending.append(name)
    if root in seen:
        raise ValueError(f"{root} refers to itself; emit it as a $ref instead")
    return sorted(seen)


def json_schemas() -> dict[str, Schema]:
    """One standalone JSON Schema document per wire shape, by name."""
    schemas = components(DEFS_REF)
    prefix = DEFS_REF.removesuffix("{name}")
    documents: dict[str, Schema] = {}
    for name in schema_names():
        doc: Schema = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$id": f"{SCHEMA_ID_BASE}{name}.json",
            **schemas[name],
        }
        defs = _closure(name, schemas, prefix)
        if defs:
            doc["$defs"] = {dep: schemas[dep] for dep in defs}
        documents[name] = doc
    return documents
