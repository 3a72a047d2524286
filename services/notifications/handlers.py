"""Applying an appointment event: one transaction that records what the event changes and
the notifications it causes, and marks the event processed.

News applied late (older than ``stale_after``) is told only if still owed. The service owes
whatever happened since it first started consuming with its database (recorded once, at
that start): a booking made while it was down is confirmed however late it is applied, as
long as the visit has not begun. A booking made before that first start is the history it
inherits: confirmed only while fresh, so a first start on a long history does not confirm
every booking ever made. A cancellation is announced late only to those told of the
booking, and never once the visit is over.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from datetime import datetime

from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    EventEnvelope,
)
from services.appointments.domain.rules import Rules
from services.notifications.domain import (
    Appointment,
    PlannedNotification,
    appointment_of,
    on_cancelled,
    on_scheduled,
    timers_of,
)
from services.notifications.runtime import Clock, Tuning
from services.notifications.store import Channel, NotificationStore, StoreTransaction

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What applying an event did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    """Processed before: a redelivery or a replay; nothing changed."""
    NOT_READY = "not-ready"
    """The appointment's earlier events have not arrived yet: try again later."""


class EventHandler:
    """Applies events to the notification store."""

    def __init__(
        self,
        store: NotificationStore,
        clock: Clock,
        rules: Rules,
        channels: Sequence[Channel],
        tuning: Tuning,
    ) -> None:
        self._store = store
        self._clock = clock
        self._rules = rules
        self._channels = tuple(channels)
        self._tuning = tuning

    async def begin(self) -> datetime:
        """Record, once for this database, that the service starts consuming now (before
        it applies anything); return when it first did, by this process or an earlier one."""
        return await self._store.record_first_start(self._clock())

    async def apply(self, envelope: EventEnvelope, event: Event, stream_sequence: int) -> Outcome:
        """Apply ``event`` once: a second call with the same event changes nothing."""
        appointment_id = envelope.stream_id
        mark = (envelope.event_id, appointment_id, stream_sequence, self._clock())
        async with self._store.transaction() as tx:
            if isinstance(event, AppointmentScheduled):
                if not await tx.mark_processed(*mark):
                    return Outcome.DUPLICATE
                appointment = appointment_of(appointment_id, envelope.event_id, event)
                await tx.add_appointment(appointment)
                await tx.set_timers(timers_of(appointment, envelope.occurred_at, self._rules))
                await self._confirm(tx, envelope, appointment)
                return Outcome.APPLIED
            # Locked first, so the appointment's events apply one at a time.
            known = await tx.locked_appointment(appointment_id)
            if known is None:
                return Outcome.NOT_READY
            if not await tx.mark_processed(*mark):
                return Outcome.DUPLICATE
            await tx.drop_timers(appointment_id)
            # Reminders not sent yet (a retry waiting, say) are never sent now.
            await tx.skip_outdated(appointment_id, f"after {envelope.type}", self._clock())
            match event:
                case AppointmentCancelled():
                    await tx.set_status(appointment_id, "cancelled")
                    # Once the visit's time is over, the news is no use, however it came
                    # late. Before that, whoever was told of the booking is told of its
                    # end, however late this event comes (an outage of a day or more).
                    now = self._clock()
                    if now < known.ends_at:
                        told = await tx.was_confirmed(appointment_id)
                        planned = on_cancelled(known, envelope.event_id, event)
                        await self._notify(tx, envelope, planned, now, late_ok=told)
                case AppointmentStarted():
                    await tx.set_status(appointment_id, "started")
        return Outcome.APPLIED

    async def _confirm(
        self, tx: StoreTransaction, envelope: EventEnvelope, appointment: Appointment
    ) -> None:
        """Store the booking's confirmations. Applied late, they are still owed for a
        booking made since the service first started consuming with this database (it was
        down meanwhile), unless the visit has begun by now: then they are no use."""
        now = self._clock()
        owed = False
        if self._late(envelope, now):
            first_start = await tx.first_start()
            owed = first_start is not None and envelope.occurred_at >= first_start
            if owed and now >= appointment.starts_at:
                log.info(
                    "booking applied after its visit began: not confirmed",
                    extra={
                        "event_id": str(envelope.event_id),
                        "occurred_at": str(envelope.occurred_at),
                        "starts_at": str(appointment.starts_at),
                    },
                )
                return
        await self._notify(tx, envelope, on_scheduled(appointment), now, late_ok=owed)

    async def _notify(
        self,
        tx: StoreTransaction,
        envelope: EventEnvelope,
        planned: list[PlannedNotification],
        now: datetime,
        *,
        late_ok: bool,
    ) -> None:
        """Store ``planned``, unless the event is older than ``stale_after`` and not
        ``late_ok``: a first start on a long history must not confirm every booking ever
        made, nor announce the cancellations of bookings it never confirmed."""
        if not late_ok and self._late(envelope, now):
            log.info(
                "event too old to notify of",
                extra={
                    "event_id": str(envelope.event_id),
                    "occurred_at": str(envelope.occurred_at),
                },
            )
            return
        await tx.add_notifications(planned, self._channels, now)

    def _late(self, envelope: EventEnvelope, now: datetime) -> bool:
        return now - envelope.occurred_at > self._tuning.stale_after
