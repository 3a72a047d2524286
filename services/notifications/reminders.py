"""The reminder scheduler: fires due timers kept in PostgreSQL.

Any number of schedulers can run: each claims due timers with ``FOR UPDATE SKIP LOCKED``
and, in the same transaction, stores the notifications they cause and deletes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from services.notifications.domain import on_timer
from services.notifications.runtime import Clock, Tuning, run_loop
from services.notifications.store import Channel, NotificationStore

log = logging.getLogger(__name__)


class ReminderScheduler:
    """Turns due reminder timers into notifications."""

    def __init__(
        self,
        store: NotificationStore,
        clock: Clock,
        channels: Sequence[Channel],
        tuning: Tuning,
        on_new_work: Callable[[], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._channels = tuple(channels)
        self._tuning = tuning
        self._on_new_work = on_new_work

    async def fire_due(self) -> int:
        """Fire the timers due now (up to a batch); return how many were handled."""
        now = self._clock()
        added = 0
        async with self._store.transaction() as tx:
            due = await tx.claim_due_timers(now, self._tuning.timer_batch)
            for appointment, timer in due:
                planned = on_timer(appointment, timer, now)
                if not planned:
                    log.info(
                        "reminder dropped",
                        extra={"appointment_id": str(timer.appointment_id), "kind": timer.kind},
                    )
                added += await tx.add_notifications(planned, self._channels, now)
                await tx.delete_timer(timer)
        if added:
            self._on_new_work()
        return len(due)

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Fire timers until ``stop`` is set."""
        await run_loop("reminders", self.fire_due, stop, wake, self._tuning.poll_interval)
