"""Applying an appointment event: one transaction that records what the event changes and
the notifications it causes, and marks the event processed."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    EventEnvelope,
)
from services.appointments.domain.rules import Rules
from services.notifications.domain import (
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

    async def apply(self, envelope: EventEnvelope, event: Event, stream_sequence: int) -> Outcome:
        """Apply ``event`` once: a second call with the same event changes nothing."""
        appointment_id = envelope.stream_id
        async with self._store.transaction() as tx:
            if isinstance(event, AppointmentScheduled):
                if not await tx.mark_processed(envelope.event_id, appointment_id, stream_sequence):
                    return Outcome.DUPLICATE
                appointment = appointment_of(appointment_id, envelope.event_id, event)
                await tx.add_appointment(appointment)
                await tx.set_timers(timers_of(appointment, envelope.occurred_at, self._rules))
                await self._notify(tx, envelope, on_scheduled(appointment))
                return Outcome.APPLIED
            # Locked first, so the appointment's events apply one at a time.
            known = await tx.locked_appointment(appointment_id)
            if known is None:
                return Outcome.NOT_READY
            if not await tx.mark_processed(envelope.event_id, appointment_id, stream_sequence):
                return Outcome.DUPLICATE
            await tx.drop_timers(appointment_id)
            # Reminders not sent yet (a retry waiting, say) are never sent now.
            await tx.skip_outdated(appointment_id, f"after {envelope.type}")
            match event:
                case AppointmentCancelled():
                    await tx.set_status(appointment_id, "cancelled")
                    # Once the visit's time is over, the news is no use, however it came
                    # late. Before that, whoever was told of the booking is told of its
                    # end, however late this event comes (an outage of a day or more).
                    if self._clock() < known.ends_at:
                        told = await tx.was_confirmed(appointment_id)
                        planned = on_cancelled(known, envelope.event_id, event)
                        await self._notify(tx, envelope, planned, late_ok=told)
                case AppointmentStarted():
                    await tx.set_status(appointment_id, "started")
        return Outcome.APPLIED

    async def _notify(
        self,
        tx: StoreTransaction,
        envelope: EventEnvelope,
        planned: list[PlannedNotification],
        *,
        late_ok: bool = False,
    ) -> None:
        """Store ``planned``, unless the event is older than ``stale_after`` (and not
        ``late_ok``): a first start on a long history must not confirm every booking ever
        made, nor announce the cancellations of bookings it never confirmed."""
        now = self._clock()
        if not late_ok and now - envelope.occurred_at > self._tuning.stale_after:
            log.info(
                "event too old to notify of",
                extra={
                    "event_id": str(envelope.event_id),
                    "occurred_at": str(envelope.occurred_at),
                },
            )
            return
        await tx.add_notifications(planned, self._channels, now)
