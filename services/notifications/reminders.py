"""The reminder scheduler: fires due timers kept in PostgreSQL.

Any number of schedulers can run: each claims due timers with ``FOR UPDATE SKIP LOCKED``
and, in the same transaction, stores the notifications they cause and deletes them.

A timer fires only once the consumer has caught up with the ``APPOINTMENTS`` stream: the
timers table alone cannot tell whether a cancel or start of the appointment is still
waiting on the stream (after a restart, an outage, a backlog). So before firing the
timers due at ``T`` a scheduler notes the stream's last sequence ``S`` (the *mark*), and
claims them only once the durable consumer has acknowledged every message up to ``S``:
every event published before the scheduler decided has then been applied, and a cancel
or start among them has deleted its timers. The mark is fixed, so a busy consumer passes
it within its lag and timers never starve under load. While NATS cannot say where the
stream or the consumer is, nothing fires (it waits). A message the consumer hands back
(an event ahead of its booking) holds the consumer's ack floor, and so the timers, until
it applies or is parked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol, TypeVar

from services.notifications.domain import on_timer
from services.notifications.runtime import Clock, Tuning, run_loop
from services.notifications.store import Channel, StoreTransaction

log = logging.getLogger(__name__)

T = TypeVar("T")


class StreamPosition(Protocol):
    """Where the ``APPOINTMENTS`` stream and the service's durable consumer of it are."""

    async def published(self) -> int:
        """The sequence of the last message on the stream (0 when it has none)."""
        ...

    async def processed(self, sequence: int) -> bool:
        """Whether the consumer has handled (acknowledged, or parked) every message up to
        ``sequence``."""
        ...


class TimerStore(Protocol):
    """What the scheduler needs of :class:`~services.notifications.store.NotificationStore`."""

    def transaction(self) -> AbstractAsyncContextManager[StoreTransaction]: ...

    async def any_timer_due(self, now: datetime) -> bool: ...


@dataclass(frozen=True)
class _Mark:
    """Timers due by ``due_by`` fire once the consumer has processed up to ``sequence``."""

    sequence: int
    due_by: datetime
    since: float
    """When it was set (``time.monotonic()``)."""
    reached: bool = False
    """The consumer has processed up to ``sequence``: no need to ask again."""


class ReminderScheduler:
    """Turns due reminder timers into notifications."""

    def __init__(
        self,
        store: TimerStore,
        position: StreamPosition,
        clock: Clock,
        channels: Sequence[Channel],
        tuning: Tuning,
        on_new_work: Callable[[], None],
    ) -> None:
        self._store = store
        self._position = position
        self._clock = clock
        self._channels = tuple(channels)
        self._tuning = tuning
        self._on_new_work = on_new_work
        self._mark: _Mark | None = None
        self._checked = float("-inf")
        self._warned = False

    async def fire_due(self) -> int:
        """Fire the timers due now (up to a batch) once the consumer has caught up with the
        stream; return how many were handled (0 while waiting for the consumer)."""
        now = self._clock()
        if self._mark is None:
            if not await self._store.any_timer_due(now):
                return 0
            published = await self._ask("the stream's last sequence", self._position.published)
            if published is None:
                return 0
            self._mark = _Mark(published, now, time.monotonic())
            self._warned = False
        elif (
            not self._mark.reached
            and time.monotonic() - self._checked < self._tuning.gate_check_interval
        ):
            return 0  # woken again at once (a busy consumer): do not ask NATS every time
        mark = self._mark
        if not mark.reached:
            self._checked = time.monotonic()
            caught_up = await self._ask(
                "the consumer's position", lambda: self._position.processed(mark.sequence)
            )
            if not caught_up:
                self._warn_if_stuck(mark)
                return 0
        added = 0
        async with self._store.transaction() as tx:
            due = await tx.claim_due_timers(mark.due_by, self._tuning.timer_batch)
            for appointment, timer in due:
                planned = on_timer(appointment, timer, now)
                if not planned:
                    log.info(
                        "reminder dropped",
                        extra={"appointment_id": str(timer.appointment_id), "kind": timer.kind},
                    )
                added += await tx.add_notifications(planned, self._channels, now)
                await tx.delete_timer(timer)
        # After a full batch more may be due by the mark, which still holds.
        full = len(due) >= self._tuning.timer_batch
        self._mark = replace(mark, reached=True) if full else None
        if added:
            self._on_new_work()
        return len(due)

    async def _ask(self, what: str, question: Callable[[], Awaitable[T]]) -> T | None:
        """NATS's answer, or None (and so nothing fires) when it cannot be asked."""
        try:
            return await question()
        except Exception as exc:  # NATS down or reconnecting, stream or consumer missing…
            log.warning("reminders wait: cannot ask NATS for %s: %r", what, exc)
            return None

    def _warn_if_stuck(self, mark: _Mark) -> None:
        waited = time.monotonic() - mark.since
        if waited > self._tuning.gate_warn_after and not self._warned:
            self._warned = True
            log.warning(
                "reminders held back: the consumer has not processed the stream up to %d"
                " for %.0fs (a message handed back or parked soon, or a backlog)",
                mark.sequence,
                waited,
            )

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Fire timers until ``stop`` is set."""
        await run_loop("reminders", self.fire_due, stop, wake, self._tuning.poll_interval)
