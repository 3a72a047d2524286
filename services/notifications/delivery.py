"""Delivery workers: one per channel, draining the deliveries outbox.

Transient failures are retried with exponential backoff up to a limit; a permanent one is
recorded as ``failed`` and never holds up the others. A delivery whose worker vanished
mid-send is resent only where the channel de-duplicates (push, within JetStream's window);
otherwise it is recorded as failed: sent at most once beats sent twice.

A visit's notification to a recipient is not claimed while an earlier one of the visit to
that recipient on the channel is unsettled (``delivery_store``): a batch never holds two of
them, so it is sent concurrently and each recipient still hears of the visit in order (a
cancellation after its confirmation). The later one waits out the earlier one's retries,
and goes once that one is sent, failed or skipped (found abandoned in doubt and recorded
failed: once the lease of the claim that found it is over too, as its worker may only be
slow).

A worker whose channel sends through NATS (push publishes on JetStream; email asks the
directory over NATS request/reply) claims nothing while the process's NATS connection is
not connected: claimed, each delivery would only fail and spend one of its attempts, so an
outage of a few minutes would record them ``failed`` for good. They wait, due, and are
claimed once the connection is back (at the next poll). A send in flight when the
connection drops still fails and counts: once per disconnect, not once per retry.

The worker marks the hand-over: just before a message goes to the SMTP server (after the
directory lookup and the connection) or is published on the stream, it records, durably and
only if the claim is still its own, that the message is leaving. A worker that vanished
before that mark sent nothing, so its deliveries are simply sent again (or skipped, if
outdated meanwhile: a reminder of a visit cancelled since); only those it marked are in
doubt (on push, every abandoned one for one more release: ``HAND_OVER_TRUSTED``).

Every outcome (sent, retry, failed, skipped) is written only under the claim it belongs to
(the row still ``sending`` with that claim's ``attempts``): a worker whose lease ran out
while another worker claimed the delivery again writes nothing over that one's claim (it
would erase its hand-over mark, or undo what it recorded); it logs the lost claim and moves
on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Protocol, TypeVar, runtime_checkable

from contracts.notifications import NOTIFICATION_KINDS, Notification
from services.metrics import NOTIFICATIONS, zeroed
from services.notifications.channels import DeliveryChannel, DeliveryFailed
from services.notifications.delivery_store import (
    ABANDONED_IN_DOUBT,
    AFTER_THE_CANCELLATION,
    HAND_OVER_MARKED,
    ClaimedDelivery,
    DeliveryStore,
)
from services.notifications.domain import PlannedNotification
from services.notifications.runtime import Clock, Hooks, Tuning, run_loop
from services.pg_errors import is_transient
from services.waiting import idle

log = logging.getLogger(__name__)

_RECORD_ATTEMPTS = 4

_T = TypeVar("_T")

HandOver = Callable[[], Awaitable[None]]
"""Marks the hand-over of the message being sent; raises if it must not be sent."""


@runtime_checkable
class MarksHandOver(Protocol):
    """A channel that says when the message is about to leave (email): what happens before
    (a directory lookup, a connection) is safe to do again after a crash."""

    name: str

    async def send_marked(self, notification: Notification, hand_over: HandOver) -> str | None:
        """Like ``send``, awaiting ``hand_over()`` just before handing the message over
        (and not handing it over if that raises)."""
        ...


class ClaimLost(Exception):
    """The claim is no longer this worker's: its lease ran out and another worker claimed
    the delivery, or it was recorded meanwhile. Not sent, not recorded."""


class DeliveryWorker:
    """Sends the pending deliveries of one channel."""

    def __init__(
        self,
        store: DeliveryStore,
        channel: DeliveryChannel,
        clock: Clock,
        tuning: Tuning,
        hooks: Hooks,
        resend_window: timedelta | None,
        connected: Callable[[], bool] | None = None,
    ) -> None:
        """``resend_window``: how long after a send that may have happened a resend is
        de-duplicated by the channel (None: never). ``connected``: whether the connection
        the channel sends through (NATS) is up now; while it is not, nothing is claimed
        (None: the channel needs none)."""
        self._store = store
        self._channel = channel
        self._clock = clock
        self._tuning = tuning
        self._hooks = hooks
        self._resend_window = resend_window
        self._marks_hand_over = channel.name in HAND_OVER_MARKED
        self._connected = connected
        self._held = False
        """Deliveries were held back in this outage of the connection (logged once)."""
        self._stop = asyncio.Event()
        results = ("sent", "skipped", "retried", "failed")
        zeroed(NOTIFICATIONS, *((k, channel.name, r) for k in NOTIFICATION_KINDS for r in results))

    @property
    def channel(self) -> str:
        """The name of the channel this worker sends on."""
        return self._channel.name

    async def deliver_due(self) -> int:
        """Send the deliveries due now (up to a batch, concurrently); return how many
        (none, and none claimed, while the channel's connection is down)."""
        now = self._clock()
        if not self._link_up():
            return 0
        batch = await self._store.claim(
            self.channel, now, now + self._tuning.lease, self._tuning.delivery_batch
        )
        results = await asyncio.gather(
            *(self._deliver(claimed) for claimed in batch), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                # Not recorded: the lease runs out and the delivery comes back (in doubt
                # if it may have been handed over).
                log.warning("%s: could not record a delivery: %r", self.channel, result)
        return len(batch)

    def _link_up(self) -> bool:
        """Whether the channel's connection is up; logs when an outage holds deliveries
        back, and when they resume."""
        up = self._connected is None or self._connected()
        if not up and not self._held:
            self._held = True
            log.warning(
                "%s delivery waits: the NATS connection is down; nothing is claimed until "
                "it is back",
                self.channel,
            )
        elif up and self._held:
            self._held = False
            log.info("%s delivery resumes: NATS is connected again", self.channel)
        return up

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Deliver until ``stop`` is set."""
        self._stop = stop
        await run_loop(
            f"{self.channel} delivery", self.deliver_due, stop, wake, self._tuning.poll_interval
        )

    def _may_resend(self, claimed: ClaimedDelivery, now: datetime) -> bool:
        if self._resend_window is None or claimed.previous_claimed_at is None:
            return False
        return now - claimed.previous_claimed_at < self._resend_window

    async def _deliver(self, claimed: ClaimedDelivery) -> None:
        n = claimed.notification
        now = self._clock()
        # Past the window in which JetStream drops a resend as a duplicate (an outage of
        # NATS longer than it held the claims back), a message that may have gone out is
        # not sent again: at most once, as email.
        if (claimed.in_doubt or claimed.unanswered) and not self._may_resend(claimed, now):
            await self._fail_in_doubt(claimed)
            return
        resend = claimed.outdated == AFTER_THE_CANCELLATION and (
            claimed.in_doubt or (claimed.unanswered and self._may_resend(claimed, now))
        )
        if claimed.outdated is not None and not resend:
            # Held by a worker when the news came (a retry now, or its worker died): the
            # consumer's skip passed it by; it is given up here instead. Or a reminder
            # held (retries, a NATS outage) until its visit was over, or a 24 h one until
            # the start window opened.
            if claimed.in_doubt:
                # Its worker may be stalled, not dead, and publish it yet: recorded as found
                # abandoned, it holds the visit's later deliveries ("your visit can start
                # now") back until this claim's lease is over, so that copy cannot follow.
                await self._fail_in_doubt(claimed)
                return
            await self._skip(claimed, claimed.outdated)
            return
        # In doubt (here: a push within its resend window) and followed by its visit's
        # cancellation, it is sent again though outdated: its worker may have sent it, or
        # may yet (stalled past its lease, not dead), and skipping it would let the
        # cancellation go first. So is one whose earlier publish got no answer (its message
        # may still be on its way in a connection given up). Sent again as the same
        # message, which JetStream drops as a duplicate if the first one went out.
        try:
            skipped = await self._send(claimed, n.sent(now))
        except ClaimLost:
            log.warning(
                "%s: a delivery's lease ran out before it was handed over; not sent here",
                self.channel,
                extra={"notification_id": str(n.notification_id), "attempts": claimed.attempts},
            )
            return
        except DeliveryFailed as exc:
            await self._failed(claimed, exc.reason, permanent=exc.permanent, in_doubt=exc.in_doubt)
            return
        except Exception as exc:
            log.exception("%s delivery crashed", self.channel)
            await self._failed(claimed, repr(exc), permanent=False, in_doubt=True)
            return
        await self._hooks.after_send(self.channel, n.notification_id)
        if skipped is not None:
            await self._skip(claimed, skipped)
        elif await self._record(
            self._store.sent, n.notification_id, self.channel, claimed.attempts, now
        ):
            self._settled(n, "sent")
        else:  # another worker sent it again (push) and recorded it first
            log.info("%s: a delivery was recorded sent already", self.channel)

    async def _send(self, claimed: ClaimedDelivery, notification: Notification) -> str | None:
        if not self._marks_hand_over:
            return await self._channel.send(notification)

        async def hand_over() -> None:
            if not await self._record(
                self._store.handing_over,
                notification.notification_id,
                self.channel,
                claimed.attempts,
            ):
                raise ClaimLost(str(notification.notification_id))

        if isinstance(self._channel, MarksHandOver):
            return await self._channel.send_marked(notification, hand_over)
        # A channel that cannot say when: the whole send is the hand-over.
        await hand_over()
        return await self._channel.send(notification)

    async def _fail_in_doubt(self, claimed: ClaimedDelivery) -> None:
        """Record ``failed`` for good (never resent) what may have been sent, or may be yet:
        :data:`ABANDONED_IN_DOUBT` holds the visit's later deliveries back for the lease."""
        if await self._settle(claimed, self._store.finish, "failed", ABANDONED_IN_DOUBT):
            NOTIFICATIONS.labels(claimed.notification.kind, self.channel, "failed").inc()

    async def _skip(self, claimed: ClaimedDelivery, reason: str) -> None:
        if await self._settle(claimed, self._store.finish, "skipped", reason):
            self._settled(claimed.notification, "skipped", reason=reason)

    async def _settle(
        self, claimed: ClaimedDelivery, write: Callable[..., Awaitable[bool]], *args: object
    ) -> bool:
        """Write an outcome of ``claimed`` (``write(notification_id, channel, attempts,
        *args)``), only if the claim is still this worker's. If it is not (its lease ran
        out and another worker claimed the delivery, or recorded it), nothing is written:
        that is no error to retry, the delivery is the other worker's; False."""
        n = claimed.notification
        if await self._record(write, n.notification_id, self.channel, claimed.attempts, *args):
            return True
        log.warning(
            "%s: claim lost: lease ran out, another worker holds the delivery; "
            "outcome not recorded here",
            self.channel,
            extra={"notification_id": str(n.notification_id), "attempts": claimed.attempts},
        )
        return False

    def _settled(self, n: PlannedNotification, outcome: str, **extra: str) -> None:
        """Count and log a delivery recorded ``sent`` or ``skipped``."""
        NOTIFICATIONS.labels(n.kind, self.channel, outcome).inc()
        log.info(
            "notification %s",
            outcome,
            extra={
                "notification_id": str(n.notification_id),
                "channel": self.channel,
                "kind": n.kind,
                **extra,
            },
        )

    async def _failed(
        self, claimed: ClaimedDelivery, reason: str, *, permanent: bool, in_doubt: bool
    ) -> None:
        n = claimed.notification
        extra = {
            "notification_id": str(n.notification_id),
            "channel": self.channel,
            "attempts": claimed.attempts,
            "reason": reason,
        }
        # Once in doubt, in doubt until sent: that message may still arrive. Only where a
        # resend is de-duplicated (push) does it matter (it is then sent again, not skipped).
        unanswered = self._resend_window is not None and (
            in_doubt or claimed.unanswered or claimed.in_doubt
        )
        if permanent or claimed.attempts >= self._tuning.max_attempts:
            log.warning("delivery failed for good", extra=extra)
            # Given up in doubt, it holds the visit's later deliveries back a while: its
            # message may still arrive, and a cancellation must not overtake it.
            why = ABANDONED_IN_DOUBT if unanswered and not permanent else reason
            if await self._settle(claimed, self._store.finish, "failed", why):
                NOTIFICATIONS.labels(n.kind, self.channel, "failed").inc()
            return
        log.info("delivery failed, will retry", extra=extra)
        retry_at = self._clock() + self._tuning.retry_delay(claimed.attempts)
        if await self._settle(claimed, self._store.retry, retry_at, reason, unanswered):
            NOTIFICATIONS.labels(n.kind, self.channel, "retried").inc()

    async def _record(self, write: Callable[..., Awaitable[_T]], *args: object) -> _T:
        """Write an outcome (or the hand-over mark), riding out a short database outage;
        if it stays down, the lease runs out and the delivery comes back (in doubt if it
        may have been sent)."""
        delay = 0.5
        for attempt in range(_RECORD_ATTEMPTS):
            try:
                return await write(*args)
            except Exception as exc:
                if not is_transient(exc) or attempt == _RECORD_ATTEMPTS - 1:
                    raise
                log.warning("could not record a delivery outcome, retrying: %r", exc)
                if await idle(self._stop, delay):
                    raise
                delay *= 2
        raise AssertionError("unreachable")
