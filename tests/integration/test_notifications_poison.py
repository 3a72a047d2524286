"""Messages the consumer cannot use never block it: poison is parked and terminated,
unknown event types are skipped, and an event that arrives before its appointment's
scheduling waits for it (or is parked if it never comes)."""

from __future__ import annotations

import uuid

import msgspec
from prometheus_client import REGISTRY

from contracts.subjects import EVENTS_STREAM
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)

__all__ = ["clinic", "smtp"]  # fixtures


async def _parked(clinic: Clinic) -> list[str]:
    rows = await clinic.db.fetch(
        "SELECT reason FROM notification_parked_messages ORDER BY stream_sequence"
    )
    return [row["reason"] for row in rows]


async def test_undecodable_messages_are_parked_and_never_block_the_stream(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    scheduled = booking.scheduled(clinic.clock())
    broken = msgspec.structs.replace(scheduled, event_id=uuid.uuid4(), data={"clinic_id": 1})
    # None in a process that ran no notification consumer yet (exported from its start).
    counted = REGISTRY.get_sample_value("clinic_notification_parked_messages_total") or 0.0
    async with clinic.running():
        await clinic.publish_raw(b"\x00 not json", booking.clinic_id)
        await clinic.publish(broken, booking.clinic_id)
        await clinic.publish(scheduled, booking.clinic_id)
        await clinic.wait_settled()

    reasons = await _parked(clinic)
    assert len(reasons) == 2
    assert all(reason.startswith("undecodable") for reason in reasons)
    assert REGISTRY.get_sample_value("clinic_notification_parked_messages_total") == counted + 2
    assert len(await clinic.pushes()) == 2
    info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    assert info.delivered.consumer_seq == 3  # each delivered once: terminated, not retried
    assert info.num_ack_pending == 0


async def test_unknown_event_types_are_acknowledged_and_skipped(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    scheduled = booking.scheduled(clinic.clock())
    future = msgspec.structs.replace(
        scheduled,
        event_id=uuid.uuid4(),
        type="AppointmentRescheduled",
        stream_version=2,
        data={"clinic_id": str(booking.clinic_id), "starts_at": "2030-02-01T10:00:00Z"},
    )
    async with clinic.running():
        await clinic.publish(scheduled, booking.clinic_id)
        await clinic.publish(future, booking.clinic_id, kind="rescheduled")
        await clinic.wait_settled()

    assert await _parked(clinic) == []
    assert sorted(p.kind for p in await clinic.pushes()) == ["appointment-confirmed"] * 2
    info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    assert info.delivered.consumer_seq == 2 and info.num_ack_pending == 0


async def test_a_cancellation_arriving_before_its_scheduling_waits_for_it(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    scheduled = booking.scheduled(clinic.clock())
    cancelled = booking.cancelled(clinic.clock(), booking.provider)
    async with clinic.running():
        await clinic.publish(cancelled, booking.clinic_id)
        await eventually(lambda: _delivered_at_least(clinic, 2), what="a retried cancellation")
        await clinic.publish(scheduled, booking.clinic_id)
        await clinic.wait_settled()

    assert await _parked(clinic) == []
    assert sorted((p.kind, p.recipient_role) for p in await clinic.pushes()) == [
        ("appointment-cancelled", "patient"),
        ("appointment-confirmed", "patient"),
        ("appointment-confirmed", "provider"),
    ]


async def test_an_event_whose_appointment_never_arrives_is_parked_after_bounded_deliveries(
    clinic: Clinic,
) -> None:
    booking = Booking()
    booking.scheduled(clinic.clock())  # lost: never published
    orphan = booking.cancelled(clinic.clock(), booking.patient)
    async with clinic.running():
        await clinic.publish(orphan, booking.clinic_id)
        await eventually(lambda: _parked_count(clinic, 1), what="the orphan to be parked")
        await clinic.wait_settled()

    (reason,) = await _parked(clinic)
    assert reason.startswith("appointment unknown")
    row = await clinic.db.fetchrow("SELECT deliveries FROM notification_parked_messages")
    assert row is not None and row["deliveries"] == TEST_TUNING.max_deliver
    assert await clinic.pushes() == []


async def _delivered_at_least(clinic: Clinic, count: int) -> bool:
    info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    delivered: int = info.delivered.consumer_seq
    return delivered >= count


async def _parked_count(clinic: Clinic, count: int) -> bool:
    return len(await _parked(clinic)) == count
