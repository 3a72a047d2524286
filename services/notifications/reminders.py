"""The reminder scheduler: fires due timers kept in PostgreSQL.

Any number of schedulers can run: each claims due timers with ``FOR UPDATE SKIP LOCKED``
and, in the same transaction, stores the notifications they cause and deletes them.

A timer never fires for an appointment whose cancel or start is on the ``APPOINTMENTS``
stream, whether or not the consumer has applied it yet: the timers table alone cannot
tell (after a restart, an outage, a backlog, or a cancel that arrived ahead of its booking
and was handed back). So the scheduler first asks the stream (:class:`Endings`) about the
appointments of the timers due, all at once and before it locks anything (a slow NATS must
not hold the consumer's transactions on those rows), then claims the timers and drops
those of an appointment that ended there: the consumer announces the cancel when it
applies it. Only the timers asked about are claimed: one due since waits for the next
round. The question is per appointment, so an event that the consumer keeps handing
back holds no other appointment's reminders. While the stream cannot be asked, nothing
fires and nothing is dropped: the round changes nothing and is tried again at the next
poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol
from uuid import UUID

from services.notifications.domain import on_timer
from services.notifications.runtime import Clock, Tuning, run_loop
from services.notifications.store import Channel, StoreTransaction

log = logging.getLogger(__name__)


class Endings(Protocol):
    """Whether an appointment has ended on the ``APPOINTMENTS`` stream."""

    async def ended(self, clinic_id: UUID, appointment_id: UUID) -> bool:
        """Whether the stream holds a cancel or a start of the appointment (applied by the
        consumer or not). Raises when the stream cannot be asked."""
        ...


class TimerStore(Protocol):
    """What the scheduler needs of :class:`~services.notifications.store.NotificationStore`."""

    def transaction(self) -> AbstractAsyncContextManager[StoreTransaction]: ...

    async def due_appointments(self, now: datetime, limit: int) -> set[tuple[UUID, UUID]]:
        """(clinic, appointment) of the first ``limit`` timers due at ``now``, unlocked."""
        ...


class ReminderScheduler:
    """Turns due reminder timers into notifications."""

    def __init__(
        self,
        store: TimerStore,
        endings: Endings,
        clock: Clock,
        channels: Sequence[Channel],
        tuning: Tuning,
        on_new_work: Callable[[], None],
    ) -> None:
        self._store = store
        self._endings = endings
        self._clock = clock
        self._channels = tuple(channels)
        self._tuning = tuning
        self._on_new_work = on_new_work
        self._warned = False
        """A warning that the stream cannot be asked was logged in this outage."""

    async def fire_due(self) -> int:
        """Fire the timers due now (up to a batch), dropping those of an appointment that
        ended on the stream; return how many were handled (0 while the stream cannot be
        asked: nothing changes then)."""
        now = self._clock()
        asked = await self._store.due_appointments(now, self._tuning.timer_batch)
        if not asked:
            return 0
        ended = await self._ended(asked)
        if ended is None:
            return 0  # nothing claimed, nothing written
        known = {appointment for _, appointment in asked}
        added = handled = 0
        async with self._store.transaction() as tx:
            due = await tx.claim_due_timers(now, self._tuning.timer_batch, known)
            for appointment, timer in due:
                handled += 1
                extra = {"appointment_id": str(timer.appointment_id), "kind": timer.kind}
                if appointment.appointment_id in ended:
                    log.info("reminder dropped: the appointment ended on the stream", extra=extra)
                    await tx.delete_timer(timer)
                    continue
                try:
                    planned = on_timer(appointment, timer, now)
                except Exception:  # its message cannot be written (a time zone unknown here)
                    # The same every round: dropped, or it would hold back every later one.
                    log.exception("reminder dropped: its message cannot be written", extra=extra)
                    await tx.delete_timer(timer)
                    continue
                if not planned:
                    log.info("reminder dropped", extra=extra)
                added += await tx.add_notifications(planned, self._channels, now)
                await tx.delete_timer(timer)
        if added:
            self._on_new_work()
        return handled

    async def _ended(self, appointments: set[tuple[UUID, UUID]]) -> set[UUID] | None:
        """Which of ``appointments`` (clinic, appointment) ended on the stream, asked
        concurrently; None when the stream could not say for one of them."""
        asked = sorted(appointments)
        answers = await asyncio.gather(
            *(self._endings.ended(clinic, appointment) for clinic, appointment in asked),
            return_exceptions=True,
        )
        failure = next((a for a in answers if isinstance(a, BaseException)), None)
        if failure is not None:
            if not isinstance(failure, Exception):
                raise failure  # cancelled: not an outage
            if not self._warned:
                self._warned = True
                log.warning(
                    "reminders wait: cannot ask NATS whether their appointments ended: %r",
                    failure,
                )
            return None
        if self._warned:
            self._warned = False
            log.info("reminders resume: NATS answers again")
        return {appointment for (_, appointment), end in zip(asked, answers, strict=True) if end}

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Fire timers until ``stop`` is set."""
        await run_loop("reminders", self.fire_due, stop, wake, self._tuning.poll_interval)
