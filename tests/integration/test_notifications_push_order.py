"""Push order when a worker stalls past its lease (a collector pause, SIGSTOP, a frozen
VM) while it holds a visit's confirmation: the cancel is applied meanwhile and another
worker claims the confirmation again, in doubt and outdated. Skipping it would settle it
and let the cancellation go at once, ahead of the stalled worker's late publish; it is sent
again instead (JetStream keeps one copy), so the patient reads the confirmation first."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import msgspec
import nats
import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from contracts.events import EventEnvelope, decode_event
from contracts.notifications import Notification
from contracts.subjects import NOTIFICATIONS_STREAM
from services.appointments.adapters.nats.streams import ensure_stream
from services.appointments.domain.rules import Rules
from services.notifications.bootstrap import PUSH_RESEND_WINDOW
from services.notifications.channels import PushChannel, notifications_stream_config
from services.notifications.delivery import DeliveryWorker
from services.notifications.delivery_store import ABANDONED_IN_DOUBT, DeliveryStore
from services.notifications.handlers import EventHandler, Outcome
from services.notifications.reminders import ReminderScheduler
from services.notifications.runtime import Hooks
from services.notifications.store import NotificationStore
from tests.integration.test_notifications_harness import TEST_TUNING, Booking

T0 = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)
_seq = itertools.count(1)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    """JetStream of a connection of the test's own, with ``NOTIFICATIONS``."""
    nc = await nats.connect(nats_url)
    try:
        context = nc.jetstream()
        await ensure_stream(context, notifications_stream_config())
        yield context
    finally:
        await nc.close()


async def _apply(pool: asyncpg.Pool, envelope: EventEnvelope, at: datetime) -> None:
    handler = EventHandler(NotificationStore(pool), lambda: at, Rules(), ["push"], TEST_TUNING)
    event = decode_event(envelope.type, envelope.schema_version, envelope.data)
    assert await handler.apply(envelope, event, next(_seq)) is Outcome.APPLIED


def _push_worker(
    pool: asyncpg.Pool, stream: object, clock: Callable[[], datetime]
) -> DeliveryWorker:
    """A push worker publishing on ``stream`` (JetStream, or a stand-in for it), with the
    tests' tuning and the service's resend window."""
    return DeliveryWorker(
        DeliveryStore(pool),
        PushChannel(cast(JetStreamContext, stream)),
        clock,
        TEST_TUNING,
        Hooks(),
        PUSH_RESEND_WINDOW,
    )


class StalledPush:
    """The real push channel, in a worker that stalls before publishing."""

    name = "push"

    def __init__(self, real: PushChannel) -> None:
        self.real = real
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def send(self, notification: Notification) -> str | None:
        self.waiting.set()
        await self.gate.wait()
        return await self.real.send(notification)


class RefusedOnce:
    """JetStream refusing each confirmation's first publish (no leader yet): a refusal,
    not a doubt, of the resend."""

    def __init__(self, real: JetStreamContext) -> None:
        self.real = real
        self.refused: set[str] = set()

    async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> Any:
        msg_id = kwargs["headers"]["Nats-Msg-Id"]
        if msg_id not in self.refused and subject.endswith("appointment-confirmed"):
            self.refused.add(msg_id)
            raise ServiceUnavailableError(code=503, description="JetStream has no leader")
        return await self.real.publish(subject, payload, **kwargs)


@pytest.mark.parametrize("resend", ["taken", "refused once"])
async def test_a_stalled_workers_confirmation_never_follows_the_cancellation(
    pool: asyncpg.Pool, js: JetStreamContext, resend: str
) -> None:
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)

    stalled = StalledPush(PushChannel(js))
    worker_a = DeliveryWorker(
        DeliveryStore(pool), stalled, lambda: T0, TEST_TUNING, Hooks(), PUSH_RESEND_WINDOW
    )
    a = asyncio.create_task(worker_a.deliver_due())  # claims both confirmations
    await asyncio.wait_for(stalled.waiting.wait(), 10)

    # The provider cancels (the patient is told); worker A still holds the confirmations.
    await _apply(pool, visit.cancelled(T0 + timedelta(seconds=5), visit.provider), T0)

    now = [T0 + TEST_TUNING.lease + timedelta(seconds=1)]  # A's lease ran out
    b_js = js if resend == "taken" else cast(JetStreamContext, RefusedOnce(js))
    worker_b = _push_worker(pool, b_js, lambda: now[0])
    assert await worker_b.deliver_due() == 2  # the confirmations: in doubt, sent again
    if resend == "refused once":  # still in doubt: A may yet publish; tried again
        now[0] += TEST_TUNING.retry_delay(2)
        assert await worker_b.deliver_due() == 2
    assert await worker_b.deliver_due() == 1  # then the cancellation

    stalled.gate.set()  # A wakes up and publishes what it claimed
    await asyncio.wait_for(a, 10)

    info = await js.stream_info(NOTIFICATIONS_STREAM)
    pushed = [
        msgspec.json.decode(
            (await js.get_msg(NOTIFICATIONS_STREAM, s)).data or b"", type=Notification
        )
        for s in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    to_patient = [p.kind for p in pushed if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed", "appointment-cancelled"], to_patient


class UnansweredPublish:
    """A JetStream context whose publishes get no answer in time (a link dripping, a
    partition): each one is held, to arrive later (``arrive``), and the publisher is told
    what nats-py tells it, a timeout. ``gate``: publishes wait for it first."""

    def __init__(self, real: JetStreamContext) -> None:
        self.real = real
        self.held: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        self.waiting.set()
        await self.gate.wait()
        self.held.append((args, kwargs))
        raise nats.errors.TimeoutError

    async def arrive(self) -> None:
        for args, kwargs in self.held:
            await self.real.publish(*args, **kwargs)


async def _pushed(js: JetStreamContext) -> list[Notification]:
    info = await js.stream_info(NOTIFICATIONS_STREAM)
    if not info.state.messages:
        return []
    return [
        msgspec.json.decode(
            (await js.get_msg(NOTIFICATIONS_STREAM, s)).data or b"", type=Notification
        )
        for s in range(info.state.first_seq, info.state.last_seq + 1)
    ]


@pytest.mark.parametrize("cancelled", ["after the timeout", "during the publish"])
async def test_a_confirmation_whose_publish_got_no_answer_never_follows_the_cancellation(
    pool: asyncpg.Pool, js: JetStreamContext, cancelled: str
) -> None:
    """Its message may still arrive (held in a connection being given up): skipping it
    would let the cancellation go first; it is sent again instead, and the late copy is
    dropped as a duplicate. Whether the cancel comes while the confirmation waits for its
    retry (the consumer's skip) or while its publish is out (the next claim's skip)."""
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)

    unanswered = UnansweredPublish(js)
    worker_a = _push_worker(pool, unanswered, lambda: T0)
    cancel_at = T0 + timedelta(seconds=5)
    if cancelled == "after the timeout":
        assert await worker_a.deliver_due() == 2  # both confirmations: retries now
        await _apply(pool, visit.cancelled(cancel_at, visit.provider), cancel_at)
        later = cancel_at + timedelta(seconds=1)
    else:
        unanswered.gate.clear()
        a = asyncio.create_task(worker_a.deliver_due())
        await asyncio.wait_for(unanswered.waiting.wait(), 10)
        await _apply(pool, visit.cancelled(cancel_at, visit.provider), cancel_at)
        unanswered.gate.set()
        assert await asyncio.wait_for(a, 10) == 2
        later = T0 + TEST_TUNING.retry_delay(1)  # the retries are due
    assert len(unanswered.held) == 2

    worker_b = _push_worker(pool, js, lambda: later)
    while await worker_b.deliver_due():
        pass
    await unanswered.arrive()  # the first copies land at last

    to_patient = [p.kind for p in await _pushed(js) if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed", "appointment-cancelled"], to_patient
    statuses = await pool.fetch(
        """SELECT n.kind, d.status FROM notification_deliveries d
           JOIN notifications n USING (notification_id) ORDER BY n.kind, n.recipient_id"""
    )
    assert {(r["kind"], r["status"]) for r in statuses} == {
        ("appointment-confirmed", "sent"),  # it did go out: recorded so, not skipped
        ("appointment-cancelled", "sent"),
    }, statuses


async def test_a_confirmation_without_an_answer_is_not_sent_again_once_too_late(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    """Its publish got no answer, then the service's NATS was down; the cancel, made during
    the visit, is applied once the visit has begun: no cancellation follows then, so
    nothing is sent ahead of one. The confirmation is skipped, as it would be uncancelled."""
    visit = Booking(starts_at=T0 + timedelta(minutes=10))
    await _apply(pool, visit.scheduled(T0), T0)
    worker_a = _push_worker(pool, UnansweredPublish(js), lambda: T0)
    assert await worker_a.deliver_due() == 2
    applied = visit.starts_at + timedelta(minutes=35)  # after the visit's end
    await _apply(
        pool, visit.cancelled(visit.starts_at + timedelta(minutes=25), visit.provider), applied
    )
    worker_b = _push_worker(pool, js, lambda: applied + timedelta(seconds=1))
    while await worker_b.deliver_due():
        pass
    assert await _pushed(js) == []
    statuses = await pool.fetch(
        "SELECT status, last_error FROM notification_deliveries ORDER BY notification_id"
    )
    assert [(r["status"], r["last_error"]) for r in statuses] == [
        ("skipped", "after the visit began")
    ] * 2, statuses


async def test_a_push_given_up_without_an_answer_still_comes_before_the_cancellation(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    """Every attempt at the confirmation gets no answer, the last one too: it is recorded
    ``failed``, but in doubt, so its visit's cancellation waits out that claim's lease, and
    the last copy (still in a connection being given up) cannot land after it."""
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)
    unanswered = UnansweredPublish(js)
    now = [T0]
    giving_up = _push_worker(pool, unanswered, lambda: now[0])
    for attempt in range(1, TEST_TUNING.max_attempts + 1):
        assert await giving_up.deliver_due() == 2, attempt
        last_claim = now[0]
        now[0] += TEST_TUNING.retry_delay(attempt) + timedelta(seconds=1)
    statuses = await pool.fetch("SELECT DISTINCT status FROM notification_deliveries")
    assert [row["status"] for row in statuses] == ["failed"]
    cancel_at = last_claim + timedelta(seconds=5)
    await _apply(pool, visit.cancelled(cancel_at, visit.provider), cancel_at)
    at = [cancel_at]
    worker = _push_worker(pool, js, lambda: at[0])
    assert await worker.deliver_due() == 0  # held back: the confirmation may still arrive
    unanswered.held = unanswered.held[-2:]  # the last attempt's copies land now
    await unanswered.arrive()
    at[0] = last_claim + TEST_TUNING.lease + timedelta(seconds=1)
    assert await worker.deliver_due() == 1  # the patient's cancellation (the provider's own)
    to_patient = [p.kind for p in await _pushed(js) if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed", "appointment-cancelled"], to_patient


class _VisitNotOver:
    async def ended(self, clinic_id: object, appointment_id: object) -> bool:
        return False


def _reminders(pool: asyncpg.Pool, at: datetime) -> ReminderScheduler:
    """The push reminders' timers, as fired at ``at``."""
    return ReminderScheduler(
        NotificationStore(pool), _VisitNotOver(), lambda: at, ["push"], TEST_TUNING, lambda: None
    )


async def test_a_reminder_its_worker_died_holding_still_comes_before_the_cancellation(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    """A worker claims the 24 h reminder and is killed, or stalls (a worker of the release
    before this one, which marked no push, may still publish it late). The visit is
    cancelled meanwhile: the next worker sends the reminder again ahead of the
    cancellation, so the cancellation is the last word whatever the first worker does."""
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)
    first = _push_worker(pool, js, lambda: T0)
    while await first.deliver_due():
        pass  # the confirmations
    due = visit.starts_at - timedelta(hours=24) + timedelta(seconds=1)
    assert await _reminders(pool, due).fire_due() == 1
    (claimed,) = await DeliveryStore(pool).claim("push", due, due + TEST_TUNING.lease, 20)
    assert claimed.notification.kind == "reminder-24h"  # then the worker stalls, unmarked
    cancel_at = due + timedelta(seconds=10)
    await _apply(pool, visit.cancelled(cancel_at, visit.provider), cancel_at)
    after = due + TEST_TUNING.lease + timedelta(seconds=1)
    worker = _push_worker(pool, js, lambda: after)
    while await worker.deliver_due():
        pass
    await PushChannel(js).send(claimed.notification.sent(due))  # the stalled worker's copy
    to_patient = [p.kind for p in await _pushed(js) if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed", "reminder-24h", "appointment-cancelled"]


class StoredNoAnswer:
    """Publishes for real; the answer is lost (nats-py says: a timeout)."""

    def __init__(self, real: JetStreamContext) -> None:
        self.real = real

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        await self.real.publish(*args, **kwargs)
        raise nats.errors.TimeoutError


async def test_an_unanswered_push_is_not_sent_again_past_the_duplicate_window(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    """Its publish was stored, the answer lost; NATS then stays away for longer than
    JetStream remembers message ids (the workers claim nothing meanwhile). A resend would
    be stored twice: it is recorded ``failed`` in doubt instead, as one found abandoned."""
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)
    lost_answer = _push_worker(pool, StoredNoAnswer(js), lambda: T0)
    assert await lost_answer.deliver_due() == 2
    back = T0 + PUSH_RESEND_WINDOW + timedelta(minutes=10)
    worker = _push_worker(pool, js, lambda: back)
    assert await worker.deliver_due() == 2
    rows = await pool.fetch("SELECT status, last_error FROM notification_deliveries")
    assert {(row["status"], row["last_error"]) for row in rows} == {("failed", ABANDONED_IN_DOUBT)}
    to_patient = [p.kind for p in await _pushed(js) if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed"]


class NoResponders:
    """No stream answers the subject: nothing was sent (nats-py says so at once)."""

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        raise nats.errors.NoRespondersError


async def test_the_duplicate_window_runs_from_the_first_publish_without_an_answer(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    """Attempt 1's publish is stored, its answer lost; attempt 2, 50 min later, is refused
    unsent; attempt 3, 75 min after the first, would be stored twice (JetStream forgot the
    first after its hour): it is recorded failed in doubt, as the window runs from the
    first publish that may be stored, not from the last claim."""
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)
    now = [T0]

    def worker(channel: Any) -> DeliveryWorker:
        return _push_worker(pool, channel, lambda: now[0])

    assert await worker(StoredNoAnswer(js)).deliver_due() == 2
    now[0] = T0 + timedelta(minutes=50)
    assert await worker(NoResponders()).deliver_due() == 2
    now[0] = T0 + timedelta(minutes=75)
    assert await worker(js).deliver_due() == 2
    rows = await pool.fetch("SELECT status, last_error FROM notification_deliveries")
    assert {(row["status"], row["last_error"]) for row in rows} == {("failed", ABANDONED_IN_DOUBT)}
    to_patient = [p.kind for p in await _pushed(js) if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed"]


async def test_a_reminder_found_abandoned_too_late_still_comes_before_visit_ready(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    """The 24 h reminder, held (an outage) until just before the start window opens, is
    claimed; its worker marks the hand-over and stalls past its lease. The next worker
    finds it in doubt and too late: recorded in doubt rather than skipped, it holds
    "your visit can start now" back for the lease, so the stalled copy cannot follow it."""
    visit = Booking()
    await _apply(pool, visit.scheduled(T0), T0)
    store = DeliveryStore(pool)
    first = _push_worker(pool, js, lambda: T0)
    while await first.deliver_due():
        pass  # the confirmations
    opens = visit.starts_at - timedelta(minutes=15)

    assert await _reminders(pool, visit.starts_at - timedelta(hours=24)).fire_due() == 1
    held_until = opens - timedelta(seconds=10)
    (stalled,) = await store.claim("push", held_until, held_until + TEST_TUNING.lease, 20)
    assert stalled.notification.kind == "reminder-24h"
    n = stalled.notification.notification_id
    assert await store.handing_over(n, "push", stalled.attempts)  # then it stalls
    assert await _reminders(pool, opens).fire_due() == 1  # visit-ready
    now = [held_until + TEST_TUNING.lease + timedelta(seconds=1)]
    worker = _push_worker(pool, js, lambda: now[0])
    while await worker.deliver_due():
        pass
    await PushChannel(js).send(stalled.notification.sent(held_until))  # the stalled copy
    now[0] += TEST_TUNING.lease + timedelta(seconds=1)
    while await worker.deliver_due():
        pass
    to_patient = [p.kind for p in await _pushed(js) if p.recipient_id == visit.patient_id]
    assert to_patient == ["appointment-confirmed", "reminder-24h", "visit-ready"], to_patient
