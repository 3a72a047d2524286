"""Correlation ids, W3C traceparent, and JSON logs that carry them.

These run the OpenTelemetry API as an unconfigured process does (no SDK recording).
"""

from __future__ import annotations

import json
import logging
import uuid

from opentelemetry import trace

from services.logs import JsonFormatter
from services.tracing import (
    consuming,
    correlated,
    correlation_id_of,
    current_correlation,
    current_trace_id,
    current_traceparent,
    parent_context,
    publish_headers,
    serving,
    trace_id_of,
    traceparent,
)


def test_traceparent_round_trips_the_correlation_id_as_trace_id() -> None:
    correlation, event = uuid.uuid4(), uuid.uuid4()
    header = traceparent(correlation, event)
    assert header.startswith("00-") and header.endswith("-01")
    assert trace_id_of(header) == correlation
    assert header.split("-")[2] == event.hex[:16]


def test_invalid_traceparents_are_ignored() -> None:
    for header in (
        None,
        "",
        "garbage",
        "01-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "00-" + "0" * 32 + "-" + "b" * 16 + "-01",
        "00-" + "a" * 32 + "-" + "0" * 16 + "-01",
        "00-" + "g" * 32 + "-" + "b" * 16 + "-01",
    ):
        assert trace_id_of(header) is None, header


def test_log_lines_inside_a_correlated_block_carry_the_id() -> None:
    formatter = JsonFormatter()
    record = logging.makeLogRecord({"msg": "applied", "levelname": "INFO", "name": "t"})
    correlation = uuid.uuid4()
    with correlated(correlation):
        inside = json.loads(formatter.format(record))
    outside = json.loads(formatter.format(record))
    assert inside["correlation_id"] == str(correlation)
    assert "correlation_id" not in outside


def test_a_traceparent_header_is_the_parent_whatever_its_case() -> None:
    trace_id, span_id = uuid.uuid4(), uuid.uuid4()
    header = traceparent(trace_id, span_id)
    for headers in ({"traceparent": header}, {"Traceparent": header}):
        parent = trace.get_current_span(parent_context(headers)).get_span_context()
        assert parent.is_remote and parent.trace_id == trace_id.int
        assert parent.span_id == int(span_id.hex[:16], 16)


def test_without_a_valid_traceparent_the_correlation_id_is_the_trace() -> None:
    correlation = uuid.uuid4()
    for headers in (None, {}, {"traceparent": "garbage"}):
        parent = trace.get_current_span(parent_context(headers, correlation)).get_span_context()
        assert parent.is_valid and parent.trace_id == correlation.int
    assert not trace.get_current_span(parent_context(None)).get_span_context().is_valid


def test_a_request_span_gives_the_correlation_and_the_stored_traceparent() -> None:
    correlation = uuid.uuid4()
    assert current_trace_id() is None and current_traceparent() is None
    with serving("test", None, correlation):
        assert current_trace_id() == correlation
        stored = current_traceparent()
    assert trace_id_of(stored) == correlation


def test_an_event_is_published_with_its_stored_context_or_one_from_its_ids() -> None:
    # With the no-op provider (no SDK set up), the message carries the parent's context.
    correlation, event_id = uuid.uuid4(), uuid.uuid4()
    stored = traceparent(uuid.uuid4(), uuid.uuid4())
    headers = publish_headers("appointments.x", event_id, stored, correlation)
    assert headers == {"Nats-Msg-Id": str(event_id), "traceparent": stored}
    legacy = publish_headers("appointments.x", event_id, None, correlation)
    assert legacy["traceparent"] == traceparent(correlation, event_id)
    assert publish_headers("appointments.x", event_id, None, None) == {"Nats-Msg-Id": str(event_id)}


def test_a_consumed_message_logs_under_its_correlation_id() -> None:
    correlation = uuid.uuid4()
    with consuming("test", {"traceparent": traceparent(correlation, uuid.uuid4())}, correlation):
        assert current_correlation.get() == correlation
    assert current_correlation.get() is None


def test_a_correlation_header_gives_a_uuid_but_never_the_nil_one() -> None:
    correlation = uuid.uuid4()
    assert correlation_id_of(str(correlation)) == correlation
    assert correlation_id_of(correlation.hex.upper()) == correlation
    for refused in (None, "", "not-a-uuid", str(uuid.UUID(int=0)), "0" * 32):
        assert correlation_id_of(refused) is None, refused
