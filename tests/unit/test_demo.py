"""The demo ``clinic dev --demo`` seeds: kept across runs, renewed only when used up (in
memory: the service over the fake event store, with a manual clock)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from contracts.common import Principal
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.handlers import Appointments
from services.demo import DEMO_CLINIC_ID, demo_appointment_id, seed_demo
from tests.support.clock import ManualClock
from tests.support.fakes import FakeEventStore


async def test_the_demo_is_kept_across_runs_and_renewed_only_when_used_up() -> None:
    store, clock = FakeEventStore(), ManualClock(datetime(2026, 3, 2, 8, 7, tzinfo=UTC))
    service = Appointments(store, store, clock, uuid.uuid4, Rules())

    async def seed() -> list[tuple[uuid.UUID, str, str]]:
        items = await seed_demo(service, clock(), Rules())
        assert all(item.view is not None for item in items)
        return [(i.view.appointment_id, i.view.status, i.outcome) for i in items if i.view]

    first = await seed()
    assert first == [
        (demo_appointment_id(1), "scheduled", "created"),
        (demo_appointment_id(2), "scheduled", "created"),
        (demo_appointment_id(3), "cancelled", "created"),
    ]
    soon = await service.get(_staff(), demo_appointment_id(1))
    assert soon.can_start
    appends = store.appends
    assert [outcome for *_, outcome in await seed()] == ["kept"] * 3
    assert store.appends == appends  # nothing written

    clock.advance(hours=2)  # the first one has ended: a new one to start right away
    later = await seed()
    assert [(i, o) for i, _, o in later] == [
        (demo_appointment_id(1, 1), "created"),
        (demo_appointment_id(2), "kept"),
        (demo_appointment_id(3), "kept"),
    ]
    assert (await service.get(_staff(), demo_appointment_id(1, 1))).can_start

    clock.advance(hours=12)  # "tomorrow" is now less than 12 hours away
    assert [(i, o) for i, _, o in await seed()] == [
        (demo_appointment_id(1, 2), "created"),
        (demo_appointment_id(2, 1), "created"),
        (demo_appointment_id(3), "kept"),
    ]


def _staff() -> Principal:
    return Principal(id=uuid.uuid4(), role="staff", clinic_id=DEMO_CLINIC_ID)
