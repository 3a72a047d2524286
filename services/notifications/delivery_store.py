"""PostgreSQL: the deliveries outbox the delivery workers drain, one channel each.

A worker claims due rows with ``FOR UPDATE SKIP LOCKED`` (so any number of workers can
run) and marks them ``sending`` (phase ``claimed``) until a lease runs out, commits, sends,
then records the outcome. A row still ``sending`` after its lease is one whose worker died
on the way; it is claimed again. The worker marks the hand-over (phase ``handing-over``,
written durably just before the message goes to the server or the stream), so only a row
so marked may have been sent: it comes back ``in_doubt``, for the worker to decide whether
resending is safe; one still ``claimed`` never left and is simply sent (on push, once no
release that did not mark it may run: :data:`HAND_OVER_TRUSTED`).

Each claim counts an attempt, so ``attempts`` names the claim: the hand-over mark and every
outcome (sent, retry, failed, skipped) are written only while the row is still ``sending``
under the claim they belong to, never over a later worker's claim or its record.

A visit's notifications reach each recipient in the order of the visit's story
(``VISIT_ORDER``: the confirmation, the reminders, the cancellation), on every channel: a
delivery is claimed only once every earlier one of the same visit, recipient and channel
is settled (``sent``, ``failed`` or ``skipped``), so a cancellation never goes to the SMTP
server (or the push stream) while its confirmation is pending, claimed or being handed
over. The rule lives in the claim itself, so it holds across any number of workers: a
settled delivery is never unsettled again, so what one claim's snapshot saw settled is
settled for good; one it saw unsettled holds the later one back until a later claim. A
held-back delivery takes no place in the batch: other visits' deliveries are claimed
instead. One settled delivery still holds the later ones back for a while: one recorded
``failed`` in doubt (:data:`ABANDONED_IN_DOUBT`) by the claim that found it abandoned (an
email marked as being handed over; a push past its resend window). The worker whose lease
ran out may not be dead but slow, still handing it over; so the later ones wait until the
lease of that claim is over too (as long again as the first worker had), unless it is
recorded ``sent`` meanwhile. So does a push whose attempts ran out on a publish without an
answer, until the lease of its last claim is over, and one found abandoned and outdated
(too late: its worker may still publish it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final
from uuid import UUID

import asyncpg
import msgspec

from services.appointments.domain.rules import Rules, ends_at, start_window_opens_at
from services.notifications import messages
from services.notifications.domain import REMINDER_KINDS, VISIT_ORDER, PlannedNotification
from services.notifications.store import Channel

_CLAIM: Final = """
WITH due AS (
    SELECT d.notification_id, d.channel, d.next_attempt_at AS due_at,
           d.status AS previous_status, d.claimed_at AS previous_claimed_at,
           d.sending_phase AS previous_phase
    FROM notification_deliveries d
    JOIN notifications n ON n.notification_id = d.notification_id
    WHERE d.channel = $1 AND d.status IN ('pending', 'sending') AND d.next_attempt_at <= $2
      -- Not while an earlier notification of the visit to the same recipient ($5: the
      -- kinds in the visit's order) is unsettled on this channel: pending, claimed, or
      -- being handed over; nor while one found abandoned in doubt ($6) may still be
      -- handed over by the worker that abandoned it (until the finding claim's lease ends).
      AND NOT EXISTS (
          SELECT FROM notifications earlier
          JOIN notification_deliveries e
              ON e.notification_id = earlier.notification_id AND e.channel = d.channel
          WHERE earlier.appointment_id = n.appointment_id
            AND earlier.recipient_id = n.recipient_id
            AND array_position($5::text[], earlier.kind) < array_position($5::text[], n.kind)
            AND (e.status IN ('pending', 'sending')
                 OR (e.status = 'failed' AND e.last_error = $6 AND e.next_attempt_at > $2))
      )
    ORDER BY d.next_attempt_at, d.notification_id
    LIMIT $4
    FOR UPDATE OF d SKIP LOCKED
), claimed AS (
    UPDATE notification_deliveries d
    SET status = 'sending', attempts = d.attempts + 1, next_attempt_at = $3,
        -- Kept while the delivery may have gone out (its hand-over marked, a publish
        -- without an answer, a claim abandoned on a channel whose mark is not trusted
        -- yet, $7): the time of the first claim whose message may be stored, from which
        -- a resend's de-duplication window runs.
        claimed_at = CASE WHEN due.previous_phase = 'handing-over'
                               OR (due.previous_status = 'sending'
                                   AND (d.channel <> ALL($7::text[])
                                        OR due.previous_phase IS DISTINCT FROM 'claimed'))
                          THEN d.claimed_at ELSE $2 END,
        -- A row that may have been handed over keeps saying so (abandoned, or a retry of
        -- a publish without an answer; NULL: claimed by a release that did not mark it),
        -- until its worker records it: a crash before that must not turn it into one
        -- safe to send again.
        sending_phase = CASE
            WHEN due.previous_phase = 'handing-over'
              OR (due.previous_status = 'sending' AND due.previous_phase IS DISTINCT FROM 'claimed')
            THEN due.previous_phase
            ELSE 'claimed'
        END
    FROM due JOIN notifications n ON n.notification_id = due.notification_id
         LEFT JOIN notification_appointments a ON a.appointment_id = n.appointment_id
    WHERE d.notification_id = due.notification_id AND d.channel = due.channel
    RETURNING due.due_at, d.attempts, due.previous_status, due.previous_claimed_at,
              due.previous_phase, n.notification_id, n.kind, n.recipient_id,
              n.recipient_role, n.appointment_id, n.clinic_id, n.cause_event_id, n.title,
              n.body, a.status AS appointment_status, a.starts_at AS visit_starts_at,
              a.duration_minutes AS visit_minutes, a.timezone AS visit_timezone
)
SELECT * FROM claimed ORDER BY due_at, notification_id
"""

#: Why a delivery that may have been sent, or may be yet, is recorded ``failed`` (never
#: resent): found abandoned, or outdated while found abandoned, or its attempts used up on
#: a publish without an answer. Such a record holds the visit's later deliveries back
#: until its claim's lease is over (the releases before this one know this text: keep it).
ABANDONED_IN_DOUBT: Final = (
    "in doubt: a worker stopped while sending it; not resent, to send at most once"
)

#: Channels whose worker marks the hand-over of each message (``handing_over``).
HAND_OVER_MARKED: Final = frozenset({"email", "push"})
#: Channels whose workers in every release that may still run mark the hand-over: for
#: them a delivery abandoned before that mark never left and is sent again (or, outdated
#: meanwhile, skipped). Push is marked since this release; the release before it did not
#: mark push, and its claims look the same, so an abandoned push stays in doubt (sent
#: again ahead of a cancellation, de-duplicated) until the next release trusts the mark
#: (then a reminder its worker died holding is skipped once its visit is cancelled).
HAND_OVER_TRUSTED: Final = frozenset({"email"})


def abandoned_in_doubt(channel: str, previous_status: str, previous_phase: str | None) -> bool:
    """Whether a delivery claimed again may have been sent by the worker that held it: it
    was still ``sending`` (that worker vanished) and, on a channel whose mark is trusted,
    it was not known to be short of it (``handing-over``, or claimed without the mark)."""
    if previous_status != "sending":
        return False
    return channel not in HAND_OVER_TRUSTED or previous_phase != "claimed"


#: What a cancel or a start makes outdated: a reminder whenever it would go out, and a
#: confirmation once it is tried again (its first attempt went out before the news did).
_NEWS: Final = {"cancelled": "AppointmentCancelled", "started": "AppointmentStarted"}
#: Why a delivery is outdated once its visit was cancelled: its cancellation follows it.
AFTER_THE_CANCELLATION: Final = f"after {_NEWS['cancelled']}"


#: Why a reminder claimed once its visit is over is skipped (held by retries, or by an
#: outage of NATS, until then).
AFTER_THE_VISIT: Final = "after the visit's end"
#: Why a 24 h reminder claimed once its visit's start window is open is skipped: its timer
#: would no longer fire then ("your visit can start now" says more, and comes next).
AFTER_THE_WINDOW_OPENED: Final = "after the visit's start window opened"
#: Why a confirmation claimed once its visit has begun is skipped (the consumer does not
#: confirm a booking it applies that late either).
AFTER_THE_VISIT_BEGAN: Final = "after the visit began"


def outdated_by(
    kind: str,
    attempts: int,
    appointment_status: str | None,
    visit_ends_at: datetime | None,
    now: datetime,
    *,
    window_opens_at: datetime | None = None,
    visit_starts_at: datetime | None = None,
) -> str | None:
    """Why a claimed delivery would now arrive after the news (None: it would not): the
    skip the consumer makes of pending ones (``skip_outdated``), for those a worker held
    when the news came (sent and failed, or the worker died) and claims again. And a
    reminder claimed at ``now`` too late to mean anything, as its timer would no longer
    fire (``on_timer``): once its visit is over (``visit_ends_at``; no news came, a
    no-show, but "your visit can start now" after its end says nothing true), and a 24 h
    one once the start window is open (``window_opens_at``). And, by the rules the
    consumer applies to late events (``handlers``), a confirmation claimed once its visit
    has begun (``visit_starts_at``) and a cancellation once its visit is over: held since
    (retries, a NATS outage), they no longer tell anything of use."""
    # Too late first: such a delivery is given up whatever came since (even one that would
    # be sent again ahead of a cancellation, see ``delivery``: none follows it then).
    if kind == "appointment-confirmed":
        if visit_starts_at is not None and now >= visit_starts_at:
            return AFTER_THE_VISIT_BEGAN
    elif visit_ends_at is not None and now >= visit_ends_at:
        return AFTER_THE_VISIT
    elif kind == "reminder-24h" and window_opens_at is not None and now >= window_opens_at:
        return AFTER_THE_WINDOW_OPENED
    news = _NEWS.get(appointment_status or "")
    if news is not None and (
        kind in REMINDER_KINDS or (kind == "appointment-confirmed" and attempts > 1)
    ):
        return f"after {news}"
    return None


class ClaimedDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery this worker holds until ``lease_until``."""

    notification: PlannedNotification
    channel: Channel
    attempts: int
    """Including this one."""
    in_doubt: bool
    """A previous worker claimed it and vanished, and it may have been sent (on a channel
    that marks the hand-over: that worker marked it, see :func:`abandoned_in_doubt`)."""
    previous_claimed_at: datetime | None
    """When the previous claim was made; while the delivery may have gone out, the first
    claim whose message may be stored (a resend is de-duplicated within a window of it)."""
    unanswered: bool = False
    """An earlier attempt's publish got no answer (a retry marked ``handing-over``): that
    message may have arrived, or may arrive yet (see :meth:`DeliveryStore.retry`)."""
    outdated: str | None = None
    """Why sending it now would tell of the visit after its cancel or start, or remind of
    it too late (after its end; a 24 h one once the start window is open), then it is
    skipped; or None."""


class DeliveryStore:
    """The ``notification_deliveries`` outbox."""

    def __init__(self, pool: asyncpg.Pool, rules: Rules | None = None) -> None:
        """``rules``: the deployment's (its start window), as the timers were set with."""
        self._pool = pool
        self._rules = rules or Rules()

    async def claim(
        self, channel: Channel, now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedDelivery]:
        """Claim up to ``limit`` deliveries of ``channel`` due at ``now``, the longest due
        first: of each visit and recipient only those with no earlier one (in
        ``VISIT_ORDER``) still unsettled on ``channel`` (or maybe still being handed over:
        :data:`ABANDONED_IN_DOUBT`). A 24 h reminder comes titled for ``now``."""
        rows = await self._pool.fetch(
            _CLAIM,
            channel,
            now,
            lease_until,
            limit,
            list(VISIT_ORDER),
            ABANDONED_IN_DOUBT,
            sorted(HAND_OVER_TRUSTED),
        )
        return [self._claimed(row, channel, now) for row in rows]

    def _claimed(self, row: asyncpg.Record, channel: Channel, now: datetime) -> ClaimedDelivery:
        starts_at: datetime | None = row["visit_starts_at"]  # None: appointment not known
        title = row["title"]
        visit_ends_at = window_opens_at = None
        if starts_at is not None:
            visit_ends_at = ends_at(starts_at, row["visit_minutes"])
            window_opens_at = start_window_opens_at(starts_at, self._rules)
            if row["kind"] == "reminder-24h":
                # Titled from the recipient's date now, not when its timer fired: held
                # since (retries, a NATS outage) across midnight, "tomorrow" is "today".
                title, _ = messages.reminder_24h(starts_at, row["visit_timezone"], now)
        return ClaimedDelivery(
            notification=PlannedNotification(
                notification_id=row["notification_id"],
                kind=row["kind"],
                recipient_id=row["recipient_id"],
                recipient_role=row["recipient_role"],
                appointment_id=row["appointment_id"],
                clinic_id=row["clinic_id"],
                cause_event_id=row["cause_event_id"],
                title=title,
                body=row["body"],
            ),
            channel=channel,
            attempts=row["attempts"],
            in_doubt=abandoned_in_doubt(channel, row["previous_status"], row["previous_phase"]),
            previous_claimed_at=row["previous_claimed_at"],
            unanswered=row["previous_status"] == "pending"
            and row["previous_phase"] == "handing-over",
            outdated=outdated_by(
                row["kind"],
                row["attempts"],
                row["appointment_status"],
                visit_ends_at,
                now,
                window_opens_at=window_opens_at,
                visit_starts_at=starts_at,
            ),
        )

    async def handing_over(self, notification_id: UUID, channel: Channel, attempts: int) -> bool:
        """Mark, durably, that the message of this claim (the ``attempts``-th) is about to
        be handed over: from now on it may arrive, so a crash leaves it in doubt. False if
        the claim is no longer this worker's (its lease ran out and another worker claimed
        it, or it was recorded meanwhile): then it must not be sent. Each claim counts an
        attempt, so ``attempts`` names the claim; marking it twice is harmless."""
        return await self._settle(
            "UPDATE notification_deliveries SET sending_phase = 'handing-over'",
            notification_id,
            channel,
            attempts,
        )

    async def sent(
        self, notification_id: UUID, channel: Channel, attempts: int, at: datetime
    ) -> bool:
        """The notification of a claim went out on ``channel``: recorded whatever became of
        the claim (``attempts``, which names it as for the other outcomes, is not checked),
        since it is a fact (a worker whose lease ran
        out while its email was with the server, recorded ``failed`` in doubt by another
        meanwhile; a push another worker sent again, de-duplicated). It keeps the next
        claim from sending it once more. False if it was recorded ``sent`` already."""
        status = await self._pool.execute(
            """UPDATE notification_deliveries
               SET status = 'sent', sent_at = $3, last_error = NULL
               WHERE notification_id = $1 AND channel = $2 AND status <> 'sent'""",
            notification_id,
            channel,
            at,
        )
        return bool(status == "UPDATE 1")

    async def retry(
        self,
        notification_id: UUID,
        channel: Channel,
        attempts: int,
        at: datetime,
        error: str,
        unanswered: bool = False,
    ) -> bool:
        """A transient failure of this claim: try again at ``at``. ``unanswered``: the
        message may have been taken all the same (on a channel that de-duplicates a resend,
        push: a publish that got no answer, now or at an earlier attempt); the pending row
        says so (phase ``handing-over``) so that its visit's cancellation does not skip it
        but sends it again first (:attr:`ClaimedDelivery.unanswered`). False, and nothing
        written, if the claim is no longer this worker's: a worker whose lease ran out must
        not put back, as never handed over, a delivery another worker holds (and may have
        marked as being handed over) or recorded."""
        return await self._settle(
            """UPDATE notification_deliveries
               SET status = 'pending', next_attempt_at = $4, last_error = $5,
                   sending_phase = CASE WHEN $6 THEN 'handing-over' END""",
            notification_id,
            channel,
            attempts,
            at,
            error,
            unanswered,
        )

    async def finish(
        self, notification_id: UUID, channel: Channel, attempts: int, status: str, reason: str
    ) -> bool:
        """Give up on the delivery of this claim for good: ``failed`` or ``skipped``, saying
        why. False, and nothing written, if the claim is no longer this worker's."""
        return await self._settle(
            "UPDATE notification_deliveries SET status = $4, last_error = $5",
            notification_id,
            channel,
            attempts,
            status,
            reason,
        )

    async def _settle(
        self,
        update: str,
        notification_id: UUID,
        channel: Channel,
        attempts: int,
        *values: object,
    ) -> bool:
        """Run ``update`` (its values from ``$4``) on the delivery only while it is still
        ``sending`` under the claim that counted ``attempts``: every claim counts one, so a
        worker whose lease ran out and whose delivery another worker claimed again (or
        recorded) writes nothing over that worker's claim. True if it was written."""
        status = await self._pool.execute(
            f"""{update}
               WHERE notification_id = $1 AND channel = $2 AND status = 'sending'
                 AND attempts = $3""",
            notification_id,
            channel,
            attempts,
            *values,
        )
        return bool(status == "UPDATE 1")
