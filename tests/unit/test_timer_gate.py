"""Reminder timers fire only once the consumer has caught up with the stream (a cancel or
start still on it wins), and a late 24 h reminder is worded for the day it goes out.

The scheduler runs on hand-written fakes of its ports: a timers table and a stream
position."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.notifications import messages
from services.notifications.domain import Appointment, PlannedNotification, Timer, on_timer
from services.notifications.reminders import ReminderScheduler
from services.notifications.runtime import Tuning

#: Tue 15 Jan 2030, 14:00 UTC: 15:00 in Berlin.
STARTS_AT = datetime(2030, 1, 15, 14, 0, tzinfo=UTC)
WINDOW_OPENS = STARTS_AT - timedelta(minutes=15)
TUNING = Tuning(gate_check_interval=0.0)


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
    """The timers table: claims what is due, deletes what fired."""

    def __init__(self, *timers: tuple[Appointment, Timer]) -> None:
        self.timers = list(timers)
        self.notifications: list[PlannedNotification] = []
        self.claimed_by: list[datetime] = []

    async def any_timer_due(self, now: datetime) -> bool:
        return any(t.due_at <= now for _, t in self.timers)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTimers]:
        yield self

    async def claim_due_timers(self, now: datetime, limit: int) -> list[tuple[Appointment, Timer]]:
        self.claimed_by.append(now)
        return [(a, t) for a, t in self.timers if t.due_at <= now][:limit]

    async def add_notifications(
        self, planned: Sequence[PlannedNotification], channels: Any, now: datetime
    ) -> int:
        self.notifications.extend(planned)
        return len(planned)

    async def delete_timer(self, timer: Timer) -> None:
        self.timers = [(a, t) for a, t in self.timers if t != timer]


class FakePosition:
    """The stream's last sequence and the consumer's ack floor, moved by the test; ``down``
    makes every question fail as NATS unreachable would."""

    def __init__(self, last: int = 0, floor: int = 0) -> None:
        self.last = last
        self.floor = floor
        self.down = False
        self.asked: list[int] = []

    async def published(self) -> int:
        if self.down:
            raise ConnectionRefusedError("nats down")
        return self.last

    async def processed(self, sequence: int) -> bool:
        if self.down:
            raise ConnectionRefusedError("nats down")
        self.asked.append(sequence)
        return self.floor >= sequence


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def scheduler(
    timers: FakeTimers, position: FakePosition, clock: Clock, tuning: Tuning = TUNING
) -> ReminderScheduler:
    return ReminderScheduler(timers, position, clock, ["push"], tuning, lambda: None)  # type: ignore[arg-type]


async def test_a_due_timer_waits_until_the_consumer_has_processed_the_stream_up_to_now() -> None:
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    position = FakePosition(last=40, floor=12)  # restarted: a backlog of 28 events
    s = scheduler(timers, position, Clock(WINDOW_OPENS + timedelta(minutes=2)))
    assert await s.fire_due() == 0
    position.floor = 39
    assert await s.fire_due() == 0
    assert timers.notifications == [] and timers.claimed_by == []
    position.floor = 40
    assert await s.fire_due() == 1
    assert [n.kind for n in timers.notifications] == ["visit-ready"]
    assert set(position.asked) == {40}


async def test_the_mark_is_fixed_so_a_busy_consumer_never_starves_the_timers() -> None:
    """Events keep coming faster than ever letting the consumer be idle; the floor still
    passes the sequence noted when the timer was due."""
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    position = FakePosition(last=100, floor=90)
    s = scheduler(timers, position, Clock(WINDOW_OPENS))
    for _ in range(4):
        assert await s.fire_due() == 0
        position.last += 10  # published meanwhile
        position.floor += 3  # always behind the stream's end
    assert position.floor > 100 and position.floor < position.last
    assert await s.fire_due() == 1


async def test_nothing_fires_while_nats_cannot_be_asked() -> None:
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    position = FakePosition(last=5, floor=5)
    position.down = True
    s = scheduler(timers, position, Clock(WINDOW_OPENS))
    assert await s.fire_due() == 0
    assert timers.notifications == []
    position.down = False
    assert await s.fire_due() == 1


async def test_nats_going_down_after_the_mark_holds_the_timers_too() -> None:
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    position = FakePosition(last=5, floor=4)
    s = scheduler(timers, position, Clock(WINDOW_OPENS))
    assert await s.fire_due() == 0
    position.down, position.floor = True, 5
    assert await s.fire_due() == 0
    position.down = False
    assert await s.fire_due() == 1


async def test_no_question_to_nats_while_no_timer_is_due() -> None:
    a = appointment()
    timers = FakeTimers((a, ready_timer(a)))
    position = FakePosition()
    position.down = True  # would be logged if asked
    s = scheduler(timers, position, Clock(WINDOW_OPENS - timedelta(seconds=1)))
    assert await s.fire_due() == 0
    assert position.asked == []


async def test_only_timers_due_when_the_mark_was_set_fire_on_it() -> None:
    """A timer that became due after the scheduler noted the stream's end waits for a
    mark of its own: a cancel published in between must be applied first."""
    early, late = appointment(), appointment(STARTS_AT + timedelta(minutes=5))
    late_timer = Timer(
        appointment_id=late.appointment_id,
        kind="visit-ready",
        cause_event_id=late.scheduled_event_id,
        due_at=WINDOW_OPENS + timedelta(minutes=5),
        expires_at=late.ends_at,
    )
    timers = FakeTimers((early, ready_timer(early)), (late, late_timer))
    position = FakePosition(last=10, floor=9)
    clock = Clock(WINDOW_OPENS)
    s = scheduler(timers, position, clock)
    assert await s.fire_due() == 0  # mark: sequence 10, timers due by WINDOW_OPENS
    clock.now = late_timer.due_at
    position.last, position.floor = 11, 10
    assert await s.fire_due() == 1
    assert timers.claimed_by == [WINDOW_OPENS]
    assert [n.appointment_id for n in timers.notifications] == [early.appointment_id]
    assert await s.fire_due() == 0  # new mark at sequence 11
    position.floor = 11
    assert await s.fire_due() == 1
    assert timers.claimed_by[-1] == late_timer.due_at


async def test_a_full_batch_keeps_the_mark_for_the_rest() -> None:
    pairs = [(a, ready_timer(a)) for a in (appointment() for _ in range(3))]
    timers = FakeTimers(*pairs)
    position = FakePosition(last=7, floor=7)
    s = scheduler(
        timers, position, Clock(WINDOW_OPENS), Tuning(timer_batch=2, gate_check_interval=0.0)
    )
    assert await s.fire_due() == 2
    position.last = 8  # published meanwhile; the mark of the first pass still holds
    assert await s.fire_due() == 1
    assert position.asked == [7]
    assert len(timers.notifications) == 3


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
