"""The state cache gives back what was put, and keeps nothing for the collector to walk."""

from __future__ import annotations

import gc
import uuid
from datetime import UTC, datetime, timedelta, timezone

from contracts.common import Actor
from services.appointments.domain.state import (
    INITIAL,
    Booking,
    Cancelled,
    Scheduled,
    Started,
    State,
)
from services.appointments.service_layer.state_cache import StateCache


def _booking(visit_reason: str | None) -> Booking:
    return Booking(
        clinic_id=uuid.uuid4(),
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        # An offset other than UTC: it must come back as the same instant.
        starts_at=datetime(2026, 12, 1, 9, 30, tzinfo=timezone(timedelta(hours=2))),
        duration_minutes=45,
        timezone="Europe/Berlin",
        visit_reason=visit_reason,
        scheduled_by=Actor(id=uuid.uuid4(), role="patient"),
    )


def _states() -> list[State]:
    staff = Actor(id=uuid.uuid4(), role="staff")
    at = datetime(2026, 11, 30, 8, 0, 0, 123456, tzinfo=UTC)
    return [
        INITIAL,
        Scheduled(_booking("Follow-up — ünïcode")),
        Cancelled(_booking(None), cancelled_by=staff, reason=None, cancelled_at=at),
        Cancelled(_booking("x"), cancelled_by=staff, reason="ill", cancelled_at=at),
        Started(_booking(None), started_by=staff, started_at=at),
    ]


def test_a_state_comes_back_exactly() -> None:
    cache = StateCache()
    stream_id = uuid.uuid4()
    for state in _states():
        cache.put(stream_id, state, 7)
        assert cache.get(stream_id) == (state, 7)
        cache.forget(stream_id)
        assert cache.get(stream_id) is None


def test_a_full_cache_adds_almost_nothing_for_the_garbage_collector() -> None:
    cache = StateCache(size=5_000)
    states = _states()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(5_000):
        cache.put(uuid.uuid4(), states[i % len(states)], 1)
    gc.collect()
    # As structs, 5,000 states were ~35,000 tracked objects (UUIDs, Actors, Bookings...).
    assert len(gc.get_objects()) - before < 500
