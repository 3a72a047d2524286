"""What the consumer and the workers share: the clock, their tuning, test hooks, the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from services.notifications.directory import DIRECTORY_TIMEOUT_SECONDS, SILENCE_SECONDS
from services.pg_errors import is_transient, schema_behind
from services.waiting import idle

log = logging.getLogger(__name__)

#: Longest pause of a worker whose every step fails (database down), in seconds.
MAX_FAILURE_BACKOFF = 5.0

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware (UTC)."""


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """Timings and sizes; the defaults are for production, tests shorten them."""

    consumer_name: str = "notifications"
    #: Redelivery delays of an unacknowledged event, in seconds; the first is the ack wait.
    redelivery_backoff: tuple[float, ...] = (30.0, 60.0, 300.0, 900.0)
    #: Deliveries of one event before it is parked (must exceed len(redelivery_backoff)).
    max_deliver: int = 10
    max_ack_pending: int = 1000
    fetch_batch: int = 32
    #: Appointments whose fetched events are applied at once (each one's in order): one
    #: transaction after another, a round trip each, caught up at ~440 events/s here; 4 at
    #: once at ~800/s (more gained nothing on 2 cores).
    handle_concurrency: int = 4
    fetch_timeout: float = 2.0
    #: While idle, how often the consumer makes sure its durable still exists (seconds).
    consumer_check_interval: float = 30.0
    #: How long JetStream may refuse the streams at start for a reason that passes
    #: (electing its leaders) before the service gives up (seconds).
    stream_setup_patience: float = 60.0
    #: An event for an appointment not seen yet (or whose handling failed) is handed back
    #: with this delay (seconds). JetStream dates a delayed nak from the ack wait and
    #: measures it against the backoff step of the delivery, so the waits are really
    #: 2 s, then delay + backoff[n] - backoff[0]: ~32 s, ~4.5 min, then ~14.5 min each,
    #: longer than a crashed instance holds the booking (the ack wait); with the defaults
    #: such an event is parked after its 10th delivery, ~1.5 h after the first.
    not_ready_delay: float = 2.0
    #: Confirmations of older bookings are not sent if made before the service first
    #: started with its database (a first start on a long history must not confirm every
    #: booking ever made; one made since, during an outage, is confirmed until its visit
    #: begins), nor cancellation notices of older events unless the booking was confirmed
    #: (then they go out however late, before the visit's end).
    stale_after: timedelta = timedelta(hours=24)
    #: How often idle workers look for due timers and deliveries (seconds).
    poll_interval: float = 1.0
    timer_batch: int = 100
    delivery_batch: int = 20
    #: How long a claimed delivery stays with its worker before it counts as abandoned.
    lease: timedelta = timedelta(seconds=60)
    retry_base: timedelta = timedelta(seconds=5)
    retry_cap: timedelta = timedelta(minutes=15)
    max_attempts: int = 8
    directory_timeout: float = DIRECTORY_TIMEOUT_SECONDS
    #: How long the directory must have been silent before its silence means no address
    #: (seconds; shorter, its questions are asked again later: its NATS node may be lost).
    directory_silence: float = SILENCE_SECONDS
    #: How often the service looks for visits past their retention (seconds), and how
    #: many it forgets per statement.
    retention_interval: float = 600.0
    retention_batch: int = 1000

    def retry_delay(self, attempts: int) -> timedelta:
        """Exponential backoff after the ``attempts``-th failed attempt."""
        return min(self.retry_cap, self.retry_base * (1 << min(max(attempts - 1, 0), 30)))


async def _nothing(*_: object) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """Exact moments a test can stop the service at (crash tests); no-ops by default."""

    #: An event's transaction committed, it is not acknowledged yet.
    after_commit: Callable[[UUID], Awaitable[None]] = field(default=_nothing)
    #: A channel sent a notification, the outbox does not record it yet.
    after_send: Callable[[str, UUID], Awaitable[None]] = field(default=_nothing)


async def run_loop(
    name: str,
    step: Callable[[], Awaitable[int]],
    stop: asyncio.Event,
    wake: asyncio.Event,
    interval: float,
) -> None:
    """Run ``step`` until ``stop``: again at once while it finds work, else after a wakeup or
    ``interval``. A failing step is logged and retried, less often the longer it keeps
    failing; it never ends the loop."""
    backoff = 0.0
    while not stop.is_set():
        try:
            worked = await step()
            backoff = 0.0
        except Exception as exc:
            backoff = min(max(backoff * 2, interval, 0.2), MAX_FAILURE_BACKOFF)
            if is_transient(exc):
                log.warning("%s: database unavailable, retrying in %.1fs: %r", name, backoff, exc)
            elif schema_behind(exc):  # the migrate Job may run alongside a new pod
                log.warning(
                    "%s: database not migrated yet (run clinic migrate), retrying in %.1fs: %s",
                    name,
                    backoff,
                    exc,
                )
            else:
                log.exception("%s failed, retrying in %.1fs", name, backoff)
            await idle(stop, backoff)
            continue
        if not worked:
            await idle(stop, interval, wake)
            wake.clear()
