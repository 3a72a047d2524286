"""What the service says when it answers 503 for PostgreSQL: once a minute, with a count."""

from __future__ import annotations

import logging

import pytest

from services.appointments.adapters.postgres import errors
from services.appointments.adapters.postgres.errors import database_errors
from services.errors import Unavailable
from services.logs import Throttle


def test_answers_unavailable_are_logged_once_a_minute_with_what_was_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    throttle = Throttle([errors._ANSWERING_UNAVAILABLE], clock=lambda: now[0])
    monkeypatch.setattr(errors.log, "filters", [throttle])
    caplog.set_level(logging.WARNING, logger=errors.__name__)
    for _ in range(5):  # an outage: every request fails alike
        with pytest.raises(Unavailable), database_errors():
            raise ConnectionRefusedError(111, "Connect call failed")
    now[0] = 61.0
    with pytest.raises(Unavailable), database_errors():
        raise TimeoutError()
    said = [r for r in caplog.records if r.name == errors.__name__]
    assert [r.levelno for r in said] == [logging.WARNING, logging.WARNING]
    assert "unreachable" in said[0].getMessage() and "Connect call failed" in said[0].getMessage()
    assert "no free connection or no answer in time" in said[1].getMessage()
    assert getattr(said[1], "suppressed", None) == 4
