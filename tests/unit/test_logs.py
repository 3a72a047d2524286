"""Log lines a client can cause are throttled, with a count of what was held back."""

from __future__ import annotations

import logging

import pytest

from services.logs import CLIENT_CAUSED, Throttle, throttle_trace_state_noise


def _record(message: str) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": message, "levelno": logging.WARNING})


def test_one_record_of_a_message_per_interval_then_the_count_held_back() -> None:
    now = [100.0]
    throttle = Throttle(CLIENT_CAUSED, interval=60.0, clock=lambda: now[0])
    invalid = CLIENT_CAUSED[0]
    first = _record(invalid)
    assert throttle.filter(first) and not hasattr(first, "suppressed")
    passed = []
    for _ in range(99):
        now[0] += 0.5
        passed.append(throttle.filter(_record(invalid)))
    assert not any(passed)
    assert throttle.filter(_record(CLIENT_CAUSED[1]))  # each message has its own interval
    assert throttle.filter(_record("something else"))  # not a throttled one
    now[0] = 160.0  # a minute after the first let through
    after = _record(invalid)
    assert throttle.filter(after) and after.suppressed == 99
    now[0] = 161.0
    assert not throttle.filter(_record(invalid))
    now[0] = 300.0
    quiet = _record(invalid)
    assert throttle.filter(quiet) and quiet.suppressed == 1


def test_without_messages_every_message_of_its_logger_is_throttled_apart() -> None:
    now = [0.0]
    throttle = Throttle(None, clock=lambda: now[0])
    assert throttle.filter(_record("Duplicate key: %s found."))
    assert throttle.filter(_record("Invalid key/value pair (%s, %s) found."))
    assert not throttle.filter(_record("Duplicate key: %s found."))


def test_a_clients_malformed_tracestate_is_said_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    throttle_trace_state_noise()  # as configure_logging does
    propagator = TraceContextTextMapPropagator()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with caplog.at_level(logging.WARNING):
        for n in range(50):
            propagator.extract({"traceparent": parent, "tracestate": f"a=b=c{n}"})
            propagator.extract({"traceparent": parent, "tracestate": "a=b," * 3000})  # > 8 KiB
            propagator.extract({"traceparent": parent + "0" * 600})
    said = [(r.name, r.msg) for r in caplog.records if r.name.startswith("opentelemetry")]
    assert len(said) == len(set(said)) == 3, said  # the bad member, each length exceeded
