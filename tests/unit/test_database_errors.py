"""What the service says when it answers 503: once a minute, with a count."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from services import logs
from services.logs import ANSWERED_UNAVAILABLE, Throttle, answered_unavailable


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The answers' throttle, afresh, on a clock the test moves."""
    now = [0.0]
    monkeypatch.setattr(
        logs._answers,
        "filters",
        [Throttle([ANSWERED_UNAVAILABLE], clock=lambda: now[0], per_first_argument=True)],
    )
    return now


def said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "services.unavailable"]


def test_answers_unavailable_are_logged_once_a_minute_with_what_was_held_back(
    caplog: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    caplog.set_level(logging.WARNING, logger="services.unavailable")
    for _ in range(5):  # an outage: every request is answered alike
        answered_unavailable("The database is unreachable", ConnectionRefusedError(111, "refused"))
    answered_unavailable("The database is busy or does not answer", TimeoutError())  # another
    clock[0] = 61.0
    answered_unavailable("The database is unreachable", ConnectionRefusedError(111, "refused"))
    records = said(caplog)
    assert [r.levelno for r in records] == [logging.WARNING] * 3
    assert "unreachable" in records[0].getMessage() and "refused" in records[0].getMessage()
    assert "busy" in records[1].getMessage()  # a new reason within the minute is said too
    assert "unreachable" in records[2].getMessage()
    assert getattr(records[2], "suppressed", None) == 4


async def test_a_nats_answer_of_503_is_said(
    caplog: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    from tests.unit.test_nats_handlers import DownStore, actor, api_on

    caplog.set_level(logging.WARNING, logger="services.unavailable")
    request = json.dumps({"appointment_id": str(uuid.uuid4()), "actor": actor()}).encode()
    reply = await api_on(DownStore()).answer("cancel", request, None)
    assert reply.error_code == "503"
    (record,) = said(caplog)
    assert "PostgreSQL is unreachable" in record.getMessage()
