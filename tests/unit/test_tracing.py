"""Correlation ids, W3C traceparent, and JSON logs that carry them."""

from __future__ import annotations

import json
import logging
import uuid

from services.logs import JsonFormatter
from services.tracing import correlated, trace_id_of, traceparent


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
