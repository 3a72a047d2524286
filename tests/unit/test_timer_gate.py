"""Reminder timers never fire for an appointment whose cancel or start is on the
APPOINTMENTS stream, applied by the consumer or not (asked per appointment, so one event
handed back holds no other appointment's reminders); and a late 24 h reminder is worded
for the day it goes out.

The scheduler runs on hand-written fakes of its ports: a timers table and the stream's
endings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from contracts.subjects import EVENTS_STREAM, event_subject
from services.notifications import messages
from services.notifications.consumer import JetStreamEndings
from services.notifications.domain import Appointment, PlannedNotification, Timer, on_timer
from services.notifications.reminders import ReminderScheduler
from services.notifications.runtime import Tuning

#: Tue 15 Jan 2030, 14:00 UTC: 15:00 in Berlin.
STARTS_AT = datetime(2030, 1, 15, 14, 0, tzinfo=UTC)
WINDOW_OPENS = STARTS_AT - timedelta(minutes=15)
TUNING = Tuning()


def appointment(starts_at: datetime = STARTS_AT, timezone: str = "Europe/Berlin") -> Appointment:
    return Appointment(
        appointment_id=uuid.uuid4(),
        clinic_id=uuid.uuid4(),
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        starts_at=starts_at,
        duration_minutes=30,
        timezone=timezone,
        status="scheduled",
        scheduled_event_id=uuid.uuid4(),
    )


def ready_timer(a: Appointment) -> Timer:
    return Timer(
        appointment_id=a.appointment_id,
        kind="visit-ready",
        cause_event_id=a.scheduled_event_id,
        due_at=WINDOW_OPENS,
        expires_at=a.ends_at,
    )


class FakeTimers:
    """The timers table: claims what is due, deletes what fired; counts its transactions
    and what each wrote."""

    def __init__(self, *timers: tuple[Appointment, Timer]) -> None:
        self.timers = list(timers)
        self.notifications: list[PlannedNotification] = []
        self.writes = 0
        self.transactions = 0
        self.claims = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTimers]:
        self.transactions += 1
        yield self

    async def due_appointments(self, now: datetime, limit: int) -> set[tuple[uuid.UUID, uuid.UUID]]:
        due = [(a.clinic_id, a.appointment_id) for a, t in self.timers if t.due_at <= now]
        return set(due[:limit])

    async def claim_due_timers(
        self, now: datetime, limit: int, appointment_ids: Collection[uuid.UUID]
    ) -> list[tuple[Appointment, Timer]]:
        self.claims += 1
        due = [(a, t) for a, t in self.timers if t.due_at <= now]
        return [(a, t) for a, t in due if a.appointment_id in appointment_ids][:limit]

    async def add_notifications(
        self, planned: Sequence[PlannedNotification], channels: Any, now: datetime
    ) -> int:
        self.writes += 1
        self.notifications.extend(planned)
        return len(planned)

    async def delete_timer(self, timer: Timer) -> None:
        self.writes += 1
        self.timers = [(a, t) for a, t in self.timers if t != timer]


class FakeEndings:
    """The stream's cancels and starts, by appointment; ``down`` makes every question fail
    as an unreachable NATS would, ``failing`` only those about some appointments."""

    def __init__(self, *ended: Appointment) -> None:
        self.ended_ids = {a.appointment_id for a in ended}
        self.down = False
        self.failing: set[uuid.UUID] = set()
        self.asked: list[tuple[uuid.UUID, uuid.UUID]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def ended(self, clinic_id: uuid.UUID, appointment_id: uuid.UUID) -> bool:
        self.asked.append((clinic_id, appointment_id))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # a round trip: concurrent questions overlap
            if self.down or appointment_id in self.failing:
                raise nats.errors.ConnectionReconnectingError
            return appointment_id in self.ended_ids
        finally:
            self.in_flight -= 1


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def scheduler(
    timers: FakeTimers, endings: FakeEndings, clock: Clock, tuning: Tuning = TUNING
) -> ReminderScheduler:
    return ReminderScheduler(timers, endings, clock, ["push"], tuning, lambda: None)  # type: ignore[arg-type]


async def test_the_timer_of_an_appointment_ended_on_the_stream_is_dropped_not_sent() -> None:
    """Its cancel (or start) is on the stream, the consumer has not applied it yet (a
    backlog, a restart, a cancel ahead of its booking): the timer goes, nothing is sent."""
    ended, live = appointment(), appointment()
    timers = FakeTimers((ended, ready_timer(ended)), (live, ready_timer(live)))
    endings = FakeEndings(ended)
    s = scheduler(timers, endings, Clock(WINDOW_OPENS + timedelta(minutes=2)))
    assert await s.fire_due() == 2
    assert [(n.appointment_id, n.kind) for n in timers.notifications] == [
        (live.appointment_id, "visit-ready")
    ]
    assert timers.timers == []
    assert await s.fire_due() == 0
    assert timers.notifications[1:] == []


async def test_a_live_appointments_timer_fires_at_once() -> None:
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    endings = FakeEndings()
    s = scheduler(timers, endings, Clock(WINDOW_OPENS))
    assert await s.fire_due() == 1
    assert [n.kind for n in timers.notifications] == ["visit-ready"]
    assert endings.asked == [(a.clinic_id, a.appointment_id)]


async def test_nats_is_asked_before_any_timer_is_locked() -> None:
    """A slow NATS must not hold the consumer's transactions on the claimed rows."""
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    claims_when_asked: list[int] = []

    class Watching(FakeEndings):
        async def ended(self, clinic_id: uuid.UUID, appointment_id: uuid.UUID) -> bool:
            claims_when_asked.append(timers.claims)
            return await super().ended(clinic_id, appointment_id)

    s = scheduler(timers, Watching(), Clock(WINDOW_OPENS))
    assert await s.fire_due() == 1
    assert claims_when_asked == [0] and timers.claims == 1


async def test_a_timer_due_since_the_question_waits_for_the_next_round() -> None:
    asked, late = appointment(), appointment()
    timers = FakeTimers((asked, ready_timer(asked)), (late, ready_timer(late)))
    unseen = {late.appointment_id}

    class Racing(FakeTimers):
        async def due_appointments(
            self, now: datetime, limit: int
        ) -> set[tuple[uuid.UUID, uuid.UUID]]:
            due = await super().due_appointments(now, limit)
            return {(c, a) for c, a in due if a not in unseen}

    racing = Racing(*timers.timers)
    endings = FakeEndings(late)  # cancelled: it must not fire unasked
    s = scheduler(racing, endings, Clock(WINDOW_OPENS))
    assert await s.fire_due() == 1
    assert [n.appointment_id for n in racing.notifications] == [asked.appointment_id]
    assert [a.appointment_id for a, _ in racing.timers] == [late.appointment_id]
    unseen.clear()
    assert await s.fire_due() == 1
    assert racing.timers == [] and len(racing.notifications) == 1  # dropped, not sent


async def test_no_question_to_nats_while_no_timer_is_due() -> None:
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    endings = FakeEndings()
    endings.down = True  # would be logged if asked
    s = scheduler(timers, endings, Clock(WINDOW_OPENS - timedelta(seconds=1)))
    assert await s.fire_due() == 0
    assert endings.asked == []


async def test_each_appointment_is_asked_once_and_all_at_once() -> None:
    """Its 24 h reminder and its visit-ready both due (after an outage): one question for
    the appointment; the questions about different appointments overlap."""
    a, b, c = appointment(), appointment(), appointment()
    late = Timer(
        appointment_id=a.appointment_id,
        kind="reminder-24h",
        cause_event_id=a.scheduled_event_id,
        due_at=a.starts_at - timedelta(hours=24),
        expires_at=WINDOW_OPENS,
    )
    timers = FakeTimers((a, late), (a, ready_timer(a)), (b, ready_timer(b)), (c, ready_timer(c)))
    endings = FakeEndings(b)
    s = scheduler(timers, endings, Clock(WINDOW_OPENS + timedelta(minutes=1)))
    assert await s.fire_due() == 4
    assert sorted(endings.asked) == sorted((x.clinic_id, x.appointment_id) for x in (a, b, c))
    assert endings.most_in_flight == 3
    sent = {(n.appointment_id, n.kind) for n in timers.notifications}
    assert sent == {(a.appointment_id, "visit-ready"), (c.appointment_id, "visit-ready")}
    assert timers.timers == []


async def test_nothing_fires_nor_is_dropped_while_nats_cannot_be_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended, live = appointment(), appointment()
    pairs = [(ended, ready_timer(ended)), (live, ready_timer(live))]
    timers = FakeTimers(*pairs)
    endings = FakeEndings(ended)
    endings.down = True
    s = scheduler(timers, endings, Clock(WINDOW_OPENS))
    with caplog.at_level(logging.WARNING, logger="services.notifications.reminders"):
        for _ in range(5):  # the loop polls again and again during the outage
            assert await s.fire_due() == 0
    assert timers.notifications == [] and timers.writes == 0
    assert timers.timers == pairs
    assert len(_warnings(caplog)) == 1  # once per outage, not per poll
    endings.down = False
    assert await s.fire_due() == 2
    assert [n.appointment_id for n in timers.notifications] == [live.appointment_id]


async def test_one_unanswered_question_holds_the_whole_round() -> None:
    """The stream said one appointment ended but could not say about the other: nothing
    is half done (the ended one's timer is not dropped, the other not sent)."""
    ended, unknown = appointment(), appointment()
    pairs = [(ended, ready_timer(ended)), (unknown, ready_timer(unknown))]
    timers = FakeTimers(*pairs)
    endings = FakeEndings(ended)
    endings.failing = {unknown.appointment_id}
    s = scheduler(timers, endings, Clock(WINDOW_OPENS))
    assert await s.fire_due() == 0
    assert timers.writes == 0 and timers.timers == pairs


async def test_a_new_outage_is_warned_about_again(caplog: pytest.LogCaptureFixture) -> None:
    a, b = appointment(), appointment(STARTS_AT + timedelta(hours=1))
    b_ready = Timer(
        appointment_id=b.appointment_id,
        kind="visit-ready",
        cause_event_id=b.scheduled_event_id,
        due_at=WINDOW_OPENS + timedelta(hours=1),
        expires_at=b.ends_at,
    )
    timers = FakeTimers((a, ready_timer(a)), (b, b_ready))
    endings = FakeEndings()
    clock = Clock(WINDOW_OPENS)
    s = scheduler(timers, endings, clock)
    with caplog.at_level(logging.WARNING, logger="services.notifications.reminders"):
        endings.down = True
        assert await s.fire_due() == 0
        assert await s.fire_due() == 0
        endings.down = False
        assert await s.fire_due() == 1
        assert await s.fire_due() == 0  # nothing due: nothing asked
        clock.now = b_ready.due_at
        endings.down = True
        assert await s.fire_due() == 0
        assert await s.fire_due() == 0
    assert len(_warnings(caplog)) == 2


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "services.notifications.reminders"
    ]


# ------------------------------------------- the stream's answer, as JetStream gives it


class FakeJetStream:
    """``get_last_msg`` of nats-py: NotFoundError (err_code 10037) when no message has the
    subject, as NATS 2.9 and 2.15 both answer; 10059 when the stream is missing."""

    def __init__(self, subjects: set[str], stream: bool = True) -> None:
        self.subjects = subjects
        self.stream = stream
        self.asked: list[tuple[str, str]] = []

    async def get_last_msg(self, stream_name: str, subject: str) -> object:
        self.asked.append((stream_name, subject))
        if not self.stream:
            raise nats.js.errors.NotFoundError(
                code=404, err_code=10059, description="stream not found"
            )
        if subject not in self.subjects:
            raise nats.js.errors.NotFoundError(
                code=404, err_code=10037, description="no message found"
            )
        return object()


@pytest.mark.parametrize("kind", ["cancelled", "started"])
async def test_a_cancel_or_start_on_the_stream_ends_the_appointment(kind: str) -> None:
    clinic, appt = uuid.uuid4(), uuid.uuid4()
    js = FakeJetStream({event_subject(clinic, appt, kind)})
    endings = JetStreamEndings(js)  # type: ignore[arg-type]
    assert await endings.ended(clinic, appt)
    assert not await endings.ended(clinic, uuid.uuid4())
    assert sorted(js.asked[:2]) == [
        (EVENTS_STREAM, event_subject(clinic, appt, "cancelled")),
        (EVENTS_STREAM, event_subject(clinic, appt, "started")),
    ]


async def test_only_the_booking_on_the_stream_is_no_ending() -> None:
    clinic, appt = uuid.uuid4(), uuid.uuid4()
    js = FakeJetStream({event_subject(clinic, appt, "scheduled")})
    assert not await JetStreamEndings(js).ended(clinic, appt)  # type: ignore[arg-type]


async def test_a_missing_stream_is_no_answer() -> None:
    """ "Stream not found" is a 404 too; it must not read as "no cancel"."""
    js = FakeJetStream(set(), stream=False)
    with pytest.raises(nats.js.errors.NotFoundError):
        await JetStreamEndings(js).ended(uuid.uuid4(), uuid.uuid4())  # type: ignore[arg-type]


# ------------------------------------------------- a late reminder says the right day


def reminder(a: Appointment) -> Timer:
    return Timer(
        appointment_id=a.appointment_id,
        kind="reminder-24h",
        cause_event_id=a.scheduled_event_id,
        due_at=a.starts_at - timedelta(hours=24),
        expires_at=a.starts_at - timedelta(minutes=15),
    )


@pytest.mark.parametrize(
    ("sent_at", "title"),
    [
        (STARTS_AT - timedelta(hours=24), "Visit tomorrow"),  # on time
        (datetime(2030, 1, 14, 22, 59, tzinfo=UTC), "Visit tomorrow"),  # 23:59 in Berlin
        (datetime(2030, 1, 14, 23, 0, tzinfo=UTC), "Visit today"),  # midnight in Berlin
        (STARTS_AT - timedelta(hours=1), "Visit today"),  # after an outage
    ],
)
def test_a_24h_reminder_names_the_day_from_the_date_it_is_sent_on(
    sent_at: datetime, title: str
) -> None:
    a = appointment()
    (planned,) = on_timer(a, reminder(a), sent_at)
    assert planned.title == title
    assert planned.body == "Reminder: your video visit is on Tue 15 Jan 2030 at 15:00 CET."


def test_the_day_is_the_recipients_local_date_not_utcs() -> None:
    """09:00 in New York on the 15th is 14:00 UTC; at 01:00 UTC on the 15th it is still
    the 14th in New York."""
    sent_at = datetime(2030, 1, 15, 1, 0, tzinfo=UTC)
    assert messages.reminder_24h(STARTS_AT, "America/New_York", sent_at)[0] == "Visit tomorrow"
    assert messages.reminder_24h(STARTS_AT, "Europe/Berlin", sent_at)[0] == "Visit today"


def test_across_a_dst_change_24_hours_before_is_not_called_tomorrow() -> None:
    """Berlin springs forward on Sun 31 Mar 2030: 24 h before Mon 00:30 CEST is Sat
    23:30 CET, two dates away."""
    starts_at = datetime(2030, 3, 31, 22, 30, tzinfo=UTC)  # Mon 1 Apr 00:30 CEST
    title, body = messages.reminder_24h(starts_at, "Europe/Berlin", starts_at - timedelta(hours=24))
    assert title == "Upcoming visit"
    assert "Mon 1 Apr 2030 at 00:30 CEST" in body
