"""Each notification goes out once per recipient, channel and cause: through redeliveries,
replays, a service killed at the worst moments, and two instances side by side."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter

from prometheus_client import REGISTRY

from contracts.events import EventEnvelope
from contracts.subjects import EVENTS_STREAM
from services.notifications.runtime import Hooks
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)

__all__ = ["clinic", "smtp"]  # fixtures


async def _book_and_cancel_some(
    clinic: Clinic, count: int
) -> list[tuple[EventEnvelope, uuid.UUID]]:
    """``count`` bookings, every other one cancelled by its patient: 2 confirmations each,
    2 notices per cancellation."""
    published: list[tuple[EventEnvelope, uuid.UUID]] = []
    for index in range(count):
        booking = Booking()
        clinic.know(booking)
        events = [booking.scheduled(clinic.clock())]
        if index % 2:
            events.append(booking.cancelled(clinic.clock(), booking.patient))
        for envelope in events:
            await clinic.publish(envelope, booking.clinic_id)
        published += [(e, booking.clinic_id) for e in events]
    return published


def _expected(count: int) -> int:
    return 2 * count + 2 * (count // 2)


async def _assert_each_sent_once(clinic: Clinic, expected: int) -> None:
    pushes = await clinic.pushes()
    assert len(pushes) == expected
    assert len({p.notification_id for p in pushes}) == expected
    per_address = Counter((m["To"], m["Subject"]) for m in clinic.sink.messages)
    assert len(clinic.sink.messages) == expected
    assert set(per_address.values()) == {1}
    assert {r["status"] for r in await clinic.deliveries()} == {"sent"}


async def test_redelivering_every_event_twice_sends_nothing_twice(clinic: Clinic) -> None:
    published = await _book_and_cancel_some(clinic, 6)
    async with clinic.running():
        await clinic.wait_settled()
        for _ in range(2):  # as a relay that lost its outbox marks would, without dedupe
            for envelope, clinic_id in published:
                await clinic.publish(envelope, clinic_id, dedupe=False)
        await clinic.wait_settled()
    await _assert_each_sent_once(clinic, _expected(6))
    processed = await clinic.db.fetchval("SELECT count(*) FROM notification_processed_events")
    assert processed == len(published)


async def test_a_replay_of_the_whole_stream_sends_nothing_again(clinic: Clinic) -> None:
    await _book_and_cancel_some(clinic, 4)
    async with clinic.running():
        await clinic.wait_settled()
    await clinic.js.delete_consumer(EVENTS_STREAM, TEST_TUNING.consumer_name)
    async with clinic.running():  # a new durable consumer starts from the first event
        await clinic.wait_settled()
        info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
        assert info.delivered.stream_seq == 6
    await _assert_each_sent_once(clinic, _expected(4))


async def test_a_service_killed_after_sending_but_before_the_ack_does_not_resend(
    clinic: Clinic,
) -> None:
    booking = Booking()
    clinic.know(booking)
    committed = asyncio.Event()
    sent_both = asyncio.Event()

    async def hang_before_ack(event_id: uuid.UUID) -> None:
        committed.set()
        await sent_both.wait()
        await asyncio.Event().wait()  # until killed

    async with clinic.running(Hooks(after_commit=hang_before_ack)) as service:
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await asyncio.wait_for(committed.wait(), 10)
        await eventually(lambda: _sent(clinic, 2, 2), what="the first sends")
        # Recorded too: a delivery killed between its send and its record is another case
        # (its claim waits out the 30 s lease), and the race made this test flaky.
        await eventually(lambda: _recorded(clinic, 4), what="the sends recorded")
        sent_both.set()
        service.cancel()  # the kill: no ack, no clean stop
        with contextlib.suppress(asyncio.CancelledError):
            await service
    unacked = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    assert unacked.num_ack_pending == 1

    async with clinic.running():  # the event comes again after the ack wait (1 s here)
        await clinic.wait_settled()
        info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
        assert info.num_redelivered == 0 and info.num_ack_pending == 0
        assert info.delivered.consumer_seq == 2  # delivered twice, acknowledged once
    await _assert_each_sent_once(clinic, 2)


async def test_a_worker_killed_between_sending_and_recording_never_sends_twice(
    clinic: Clinic,
) -> None:
    booking = Booking()
    clinic.know(booking)
    sent: list[str] = []

    async def hang_after_send(channel: str, notification_id: uuid.UUID) -> None:
        sent.append(channel)
        await asyncio.Event().wait()  # until killed

    async with clinic.running(Hooks(after_send=hang_after_send)) as service:
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await eventually(lambda: _true(len(sent) == 4), what="four sends")
        service.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await service
    assert {r["status"] for r in await clinic.deliveries()} == {"sending"}

    failed_before = _failed_emails()
    async with clinic.running():
        clinic.clock.advance(seconds=31)  # the dead worker's leases run out
        await clinic.wait_settled()
    assert _failed_emails() - failed_before == 2  # counted, for the alert
    pushes = await clinic.pushes()
    assert len(pushes) == 2  # resent, and dropped by JetStream as duplicates
    assert len(clinic.sink.messages) == 2  # not resent: the mail may have gone out
    statuses = sorted((r["channel"], r["status"]) for r in await clinic.deliveries())
    assert statuses == [("email", "failed")] * 2 + [("push", "sent")] * 2
    assert all(r["last_error"].startswith("in doubt") for r in await clinic.deliveries("failed"))


async def test_two_instances_side_by_side_send_each_notification_once(clinic: Clinic) -> None:
    async with clinic.running(), clinic.running():
        await _book_and_cancel_some(clinic, 10)
        await clinic.wait_settled()
    await _assert_each_sent_once(clinic, _expected(10))


async def _sent(clinic: Clinic, pushes: int, mails: int) -> bool:
    return len(await clinic.pushes()) == pushes and len(clinic.sink.messages) == mails


async def _recorded(clinic: Clinic, sent: int) -> bool:
    return len(await clinic.deliveries("sent")) == sent


async def _true(value: bool) -> bool:
    return value


async def test_a_consumer_deleted_under_a_running_service_is_recreated(clinic: Clinic) -> None:
    first = Booking()
    clinic.know(first)
    async with clinic.running():
        await clinic.publish(first.scheduled(clinic.clock()), first.clinic_id)
        await clinic.wait_settled()
        await clinic.js.delete_consumer(EVENTS_STREAM, TEST_TUNING.consumer_name)
        second = Booking()
        clinic.know(second)
        await clinic.publish(second.scheduled(clinic.clock()), second.clinic_id)
        await eventually(lambda: _sent(clinic, 4, 4), what="the second booking's confirmations")
        await clinic.wait_settled()
    await _assert_each_sent_once(clinic, 4)


def _failed_emails() -> float:
    labels = {"kind": "appointment-confirmed", "channel": "email", "result": "failed"}
    return REGISTRY.get_sample_value("clinic_notifications_total", labels) or 0.0
