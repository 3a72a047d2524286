"""Forgetting what the notification service kept of visits long over.

Once a visit has ended, no event can change it (it can be neither cancelled nor started
any more), so what the service stored of it is history: the appointment as it knew it,
its notifications with their deliveries, its reminders, the marks of its processed events.
That history says who saw which provider when, so it is not kept for ever: it goes
``CLINIC_NOTIFICATION_RETENTION_DAYS`` after the visit's end, unless a delivery of it is
still pending or being sent (one that has waited a whole retention, on a channel no
longer served, does not count), or one of its events was applied within that time. A replay
of the APPOINTMENTS stream after that (a consumer created anew) sends nothing again, as the
marks' absence would allow: a booking applied after its visit began is not confirmed, a
cancellation applied after its visit's end not announced, and a reminder past its expiry
is dropped (see ``handlers`` and ``domain``). What the replay writes again is kept while
the replay runs (its later events find their appointment) and forgotten a retention later.

Visits go in batches of ``Tuning.retention_batch``, each its own short transaction,
oldest first; ``SKIP LOCKED`` leaves alone an appointment the consumer is applying an
event to, and lets several instances prune at once without waiting for each other.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from services.notifications.runtime import Clock, Tuning, run_loop

log = logging.getLogger(__name__)

_FORGET = """
WITH ended AS (
    SELECT a.appointment_id FROM notification_appointments a
    WHERE a.starts_at < $1
      AND a.starts_at + make_interval(mins => a.duration_minutes) < $1
      AND NOT EXISTS (SELECT FROM notifications n
                      JOIN notification_deliveries d USING (notification_id)
                      WHERE n.appointment_id = a.appointment_id
                        AND d.status IN ('pending', 'sending')
                        -- (not one due since before the cutoff: its channel is no longer
                        -- served, email after CLINIC_SMTP_URL was unset, say)
                        AND d.next_attempt_at >= $1)
      -- An event of it applied within the retention: a replay wrote its rows again, and
      -- its later events (a cancel, a start) must find them.
      AND NOT EXISTS (SELECT FROM notification_processed_events p
                      WHERE p.appointment_id = a.appointment_id AND p.processed_at >= $1)
    ORDER BY a.starts_at
    LIMIT $2
    FOR UPDATE OF a SKIP LOCKED
), notifications_gone AS (
    DELETE FROM notifications n USING ended e WHERE n.appointment_id = e.appointment_id
), marks_gone AS (
    DELETE FROM notification_processed_events p USING ended e
    WHERE p.appointment_id = e.appointment_id
)
DELETE FROM notification_appointments a USING ended e WHERE a.appointment_id = e.appointment_id
"""


async def forget_ended_visits(pool: asyncpg.Pool, ended_before: datetime, batch: int) -> int:
    """Delete what is kept of up to ``batch`` visits that ended before ``ended_before``
    (deliveries and reminders go with their notifications and appointments); how many."""
    status = await pool.execute(_FORGET, ended_before, batch)
    return int(status.rsplit(" ", 1)[-1])


@dataclass
class Retention:
    """Forgets visits ended more than ``keep`` ago, for as long as the service runs."""

    pool: asyncpg.Pool
    clock: Clock
    keep: timedelta
    tuning: Tuning

    async def step(self) -> int:
        """Forget one batch; how many visits it held."""
        forgotten = await forget_ended_visits(
            self.pool, self.clock() - self.keep, self.tuning.retention_batch
        )
        if forgotten:
            log.info("forgot ended visits past their retention", extra={"count": forgotten})
        return forgotten

    async def run(self, stop: asyncio.Event) -> None:
        """Batch after batch while there are any, then every ``tuning.retention_interval``
        seconds, until ``stop`` is set. A failing round (the database down) is logged and
        tried again later."""
        never = asyncio.Event()  # nothing wakes it early: new work only comes with time
        await run_loop("retention", self.step, stop, never, self.tuning.retention_interval)
