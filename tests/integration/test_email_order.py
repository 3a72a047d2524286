"""A visit's notifications reach each recipient in the order of its story, on real
PostgreSQL (and SMTP): a cancellation is not claimed, let alone handed to the server, while
the confirmation (or a reminder) of the same visit to the same recipient is pending,
claimed or being handed over, whichever worker holds it; settled in any way (sent, failed,
skipped) it lets the cancellation go; and a visit waiting for its order holds up no other
visit. Push keeps the same order, apart from email."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg

from contracts.common import Actor
from contracts.events import EventEnvelope, decode_event
from services.appointments.domain.rules import Rules
from services.notifications.delivery_store import (
    ABANDONED_IN_DOUBT,
    ClaimedDelivery,
    DeliveryStore,
)
from services.notifications.domain import on_timer
from services.notifications.handlers import EventHandler, Outcome
from services.notifications.store import Channel, NotificationStore
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    GatedDirectory,
    SmtpSink,
    email_worker,
    smtp,
)

__all__ = ["smtp"]  # fixtures

T0 = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)
LEASE = TEST_TUNING.lease
_sequences = itertools.count(1)


async def _apply(pool: asyncpg.Pool, envelope: EventEnvelope, at: datetime) -> None:
    """What the consumer does with the event at ``at``: email and push for everyone."""
    handler = EventHandler(
        NotificationStore(pool), lambda: at, Rules(), ["email", "push"], TEST_TUNING
    )
    event = decode_event(envelope.type, envelope.schema_version, envelope.data)
    assert await handler.apply(envelope, event, next(_sequences)) is Outcome.APPLIED


async def _book(pool: asyncpg.Pool, visit: Booking, at: datetime = T0) -> None:
    await _apply(pool, visit.scheduled(at), at)


async def _cancel(
    pool: asyncpg.Pool, visit: Booking, at: datetime, by: Actor | None = None
) -> None:
    await _apply(pool, visit.cancelled(at, by or visit.patient), at)


async def _fire_timers(pool: asyncpg.Pool, visit: Booking, at: datetime) -> None:
    """What the reminder scheduler does with the visit's timers due at ``at``."""
    async with NotificationStore(pool).transaction() as tx:
        due = await tx.claim_due_timers(at, 10, [visit.appointment_id])
        assert due, "no timer due"
        for appointment, timer in due:
            await tx.add_notifications(on_timer(appointment, timer, at), ["email", "push"], at)
            await tx.delete_timer(timer)


async def _claim(
    pool: asyncpg.Pool, at: datetime, channel: Channel = "email", limit: int = 20
) -> list[ClaimedDelivery]:
    return await DeliveryStore(pool).claim(channel, at, at + LEASE, limit)


def _what(claims: list[ClaimedDelivery]) -> set[tuple[str, str]]:
    """(kind, recipient role) of each claimed delivery."""
    return {(c.notification.kind, c.notification.recipient_role) for c in claims}


def _of(claims: list[ClaimedDelivery], role: str) -> ClaimedDelivery:
    (claimed,) = [c for c in claims if c.notification.recipient_role == role]
    return claimed


async def _sent(pool: asyncpg.Pool, claimed: ClaimedDelivery, at: datetime) -> None:
    n = claimed.notification
    assert await DeliveryStore(pool).sent(n.notification_id, claimed.channel, claimed.attempts, at)


CONFIRMED = {("appointment-confirmed", "patient"), ("appointment-confirmed", "provider")}
CANCELLED = {("appointment-cancelled", "patient"), ("appointment-cancelled", "provider")}


# ------------------------------------------------------------------------ the claim


async def test_a_cancellation_is_not_claimed_while_its_confirmation_is_unsettled(
    pool: asyncpg.Pool,
) -> None:
    visit = Booking()
    await _book(pool, visit)
    await _cancel(pool, visit, T0)  # booked and cancelled at once: all four due
    first = await _claim(pool, T0)
    assert _what(first) == CONFIRMED
    # Another worker meanwhile: the confirmations are held, the cancellations wait.
    assert await _claim(pool, T0 + timedelta(seconds=1)) == []

    await _sent(pool, _of(first, "patient"), T0)
    # The patient's cancellation goes; the provider's waits for the provider's confirmation.
    then = await _claim(pool, T0 + timedelta(seconds=2))
    assert _what(then) == {("appointment-cancelled", "patient")}
    await _sent(pool, _of(first, "provider"), T0)
    last = await _claim(pool, T0 + timedelta(seconds=3))
    assert _what(last) == {("appointment-cancelled", "provider")}


async def test_a_confirmation_that_failed_or_was_skipped_for_good_holds_nothing_back(
    pool: asyncpg.Pool,
) -> None:
    visit = Booking()
    await _book(pool, visit)
    await _cancel(pool, visit, T0)
    store = DeliveryStore(pool)
    first = await _claim(pool, T0)
    patient, provider = _of(first, "patient"), _of(first, "provider")
    n = patient.notification.notification_id
    assert await store.finish(n, "email", patient.attempts, "failed", "550 no such user")
    n = provider.notification.notification_id
    assert await store.finish(n, "email", provider.attempts, "skipped", "no email address known")
    assert _what(await _claim(pool, T0)) == CANCELLED


async def test_a_cancellation_waits_for_a_confirmation_whose_worker_died_handing_it_over(
    pool: asyncpg.Pool,
) -> None:
    """The confirmation may be at the server: the cancellation waits until the next claim,
    after the lease, decides what became of it (failed, in doubt: never sent twice), and
    then for that claim's lease too: its worker may only be slow, still handing it over."""
    visit = Booking()
    await _book(pool, visit)
    await _cancel(pool, visit, T0)
    store = DeliveryStore(pool)
    first = await _claim(pool, T0)
    held = _of(first, "patient")
    n = held.notification.notification_id
    assert await store.handing_over(n, "email", held.attempts)
    # The worker dies; its leases run out. The confirmations come back, not the rest.
    later = T0 + LEASE + timedelta(seconds=1)
    again = await _claim(pool, later)
    assert _what(again) == CONFIRMED
    assert _of(again, "patient").in_doubt and not _of(again, "provider").in_doubt
    doubt = _of(again, "patient")
    assert await store.finish(n, "email", doubt.attempts, "failed", ABANDONED_IN_DOUBT)
    await _sent(pool, _of(again, "provider"), later)
    (provider,) = await _claim(pool, later)
    assert provider.notification.kind == "appointment-cancelled"
    await _sent(pool, provider, later)
    assert await _claim(pool, later + LEASE - timedelta(seconds=1)) == []
    assert _what(await _claim(pool, later + LEASE)) == {("appointment-cancelled", "patient")}


async def test_a_confirmation_retried_after_the_cancel_is_given_up_then_the_cancellation_goes(
    pool: asyncpg.Pool,
) -> None:
    """Held by a worker when the cancel came, then retried: the cancellation waits for
    that retry's claim, which skips the confirmation (it would now come after the news)."""
    visit = Booking()
    await _book(pool, visit)
    store = DeliveryStore(pool)
    first = await _claim(pool, T0)
    await _cancel(pool, visit, T0 + timedelta(seconds=1))
    retry_at = T0 + timedelta(seconds=30)
    for claimed in first:
        n = claimed.notification.notification_id
        assert await store.retry(n, "email", claimed.attempts, retry_at, "451 try later")
    assert await _claim(pool, T0 + timedelta(seconds=2)) == []
    again = await _claim(pool, retry_at)
    assert _what(again) == CONFIRMED
    for claimed in again:
        assert claimed.outdated == "after AppointmentCancelled"
        n = claimed.notification.notification_id
        assert await store.finish(n, "email", claimed.attempts, "skipped", claimed.outdated)
    assert _what(await _claim(pool, retry_at)) == CANCELLED


async def test_a_cancellation_waits_for_a_reminder_being_sent(pool: asyncpg.Pool) -> None:
    """Booked inside its start window: confirmed, then "your visit can start now", then
    cancelled while a worker holds that reminder."""
    visit = Booking(starts_at=T0 + timedelta(minutes=10))
    await _book(pool, visit)
    await _fire_timers(pool, visit, T0)  # the visit-ready reminder, to the patient
    confirmations = await _claim(pool, T0)
    assert _what(confirmations) == CONFIRMED  # the reminder waits for the confirmation
    for claimed in confirmations:
        await _sent(pool, claimed, T0)
    (reminder,) = await _claim(pool, T0)
    assert reminder.notification.kind == "visit-ready"
    await _cancel(pool, visit, T0 + timedelta(seconds=1), by=visit.provider)
    # The patient's notice waits for the reminder the worker holds.
    assert await _claim(pool, T0 + timedelta(seconds=1)) == []
    await _sent(pool, reminder, T0 + timedelta(seconds=1))
    assert _what(await _claim(pool, T0 + timedelta(seconds=1))) == {
        ("appointment-cancelled", "patient")
    }


async def test_a_visit_waiting_for_its_order_holds_up_no_other_visit(pool: asyncpg.Pool) -> None:
    """Not even the same patient's other visit, and not from the head of the queue: the
    held-back cancellations, due first, take no place in a batch of one."""
    visit = Booking()
    other = Booking(patient_id=visit.patient_id)
    await _book(pool, visit)
    await _cancel(pool, visit, T0 + timedelta(seconds=1))
    await _book(pool, other, T0 + timedelta(seconds=2))
    at = T0 + timedelta(seconds=3)
    held = await _claim(pool, at, limit=2)  # the visit's confirmations, due first
    assert _what(held) == CONFIRMED
    assert {c.notification.appointment_id for c in held} == {visit.appointment_id}
    for _ in range(2):
        (claimed,) = await _claim(pool, at, limit=1)
        assert claimed.notification.appointment_id == other.appointment_id
        assert claimed.notification.kind == "appointment-confirmed"
    assert await _claim(pool, at) == []


async def test_a_claim_comes_in_due_order(pool: asyncpg.Pool) -> None:
    visits = [Booking() for _ in range(3)]
    for step, visit in enumerate(visits):
        await _book(pool, visit, T0 + timedelta(seconds=step))
    claims = await _claim(pool, T0 + timedelta(seconds=5))
    due = [
        await pool.fetchval(
            "SELECT created_at FROM notifications WHERE notification_id = $1",
            c.notification.notification_id,
        )
        for c in claims
    ]
    ids = [c.notification.notification_id for c in claims]
    assert list(zip(due, ids, strict=True)) == sorted(zip(due, ids, strict=True))
    assert [c.notification.appointment_id for c in claims[::2]] == [
        v.appointment_id for v in visits
    ]


async def test_push_keeps_a_visits_order_too_apart_from_email(pool: asyncpg.Pool) -> None:
    visit = Booking()
    await _book(pool, visit)
    await _cancel(pool, visit, T0)
    pushes = await _claim(pool, T0, "push")
    assert _what(pushes) == CONFIRMED
    assert await _claim(pool, T0, "push") == []
    # Pushes in hand hold back no email: each channel keeps its own order.
    assert _what(await _claim(pool, T0, "email")) == CONFIRMED
    for claimed in pushes:
        await _sent(pool, claimed, T0)
    assert _what(await _claim(pool, T0, "push")) == CANCELLED


# ---------------------------------------------------------- two workers, a real server


@contextlib.asynccontextmanager
async def _process(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The connections of one notification process."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


async def test_a_visit_booked_and_cancelled_at_once_is_confirmed_before_it_is_cancelled(
    database_url: str, smtp: tuple[SmtpSink, str]
) -> None:
    """One process holds the confirmations (its directory is slow); another, a second
    later, finds the cancellations due: it must not mail them first."""
    sink, smtp_url = smtp
    visit = Booking()
    cancelled_at = T0 + timedelta(seconds=1)
    async with _process(database_url) as first, _process(database_url) as second:
        await _book(first, visit)
        slow = GatedDirectory(asyncio.Event())
        confirming = asyncio.create_task(email_worker(first, slow, smtp_url, T0).deliver_due())
        await asyncio.wait_for(slow.waiting.wait(), 10)
        await _cancel(first, visit, cancelled_at)

        other = email_worker(second, GatedDirectory(), smtp_url, cancelled_at)
        assert await other.deliver_due() == 0
        assert sink.messages == []
        assert slow.gate is not None
        slow.gate.set()
        assert await asyncio.wait_for(confirming, 10) == 2
        assert await other.deliver_due() == 2

    received = {
        user: [m["Subject"] for m in sink.to(f"{user}@example.test")]
        for user in (visit.patient_id, visit.provider_id)
    }
    assert received == {
        visit.patient_id: ["Visit confirmed", "Visit cancelled"],
        visit.provider_id: ["New visit booked", "Visit cancelled"],
    }


async def test_a_confirmation_its_worker_still_hands_over_after_its_lease_comes_first(
    database_url: str, smtp: tuple[SmtpSink, str]
) -> None:
    """One process marks the patient's confirmation as being handed over, then its
    message waits at the server past the lease. Another process finds it in doubt and
    records it failed (never sent twice), but the first may still be handing it over: the
    cancellation waits as long again as a lease, not just for that record."""
    sink, smtp_url = smtp
    visit = Booking()
    patient = f"{visit.patient_id}@example.test"
    release = threading.Event()
    sink.holds[patient] = (release, "250 OK")
    async with _process(database_url) as first, _process(database_url) as second:
        await _book(first, visit)
        await _cancel(first, visit, T0, by=visit.provider)  # to the patient only
        confirming = asyncio.create_task(
            email_worker(first, GatedDirectory(), smtp_url, T0).deliver_due()
        )

        async def confirmation(recipient: uuid.UUID) -> asyncpg.Record:
            row = await second.fetchrow(
                """SELECT d.status, d.last_error FROM notification_deliveries d
                   JOIN notifications n USING (notification_id)
                   WHERE n.recipient_id = $1 AND n.kind = 'appointment-confirmed'
                     AND d.channel = 'email'""",
                recipient,
            )
            assert row is not None
            return row

        try:
            deadline = asyncio.get_running_loop().time() + 10
            while patient not in sink.holding or (
                (await confirmation(visit.provider_id))["status"] != "sent"
            ):
                assert asyncio.get_running_loop().time() < deadline, "the sends never came"
                await asyncio.sleep(0.01)
            found = T0 + LEASE + timedelta(seconds=1)  # the first one's lease ran out
            other = email_worker(second, GatedDirectory(), smtp_url, found)
            assert await other.deliver_due() == 1  # the confirmation: in doubt, failed
            row = await confirmation(visit.patient_id)
            assert row["status"] == "failed" and row["last_error"] == ABANDONED_IN_DOUBT
            assert await other.deliver_due() == 0  # the cancellation still waits
            assert sink.to(patient) == []
        finally:
            release.set()
        assert await asyncio.wait_for(confirming, 10) == 2
        # Sent after all, and recorded so: the cancellation goes at once.
        assert await other.deliver_due() == 1
    assert [m["Subject"] for m in sink.to(patient)] == ["Visit confirmed", "Visit cancelled"]
