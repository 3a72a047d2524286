"""PostgreSQL: the consumer's and the reminder scheduler's transactions, and parked messages.

A consumer transaction writes the notifications an event causes, their deliveries, the
reminder timers and the event's processed mark together, so an event is either wholly
applied or not at all, and a redelivered one finds its mark.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg

from contracts.views import AppointmentStatus
from services.notifications.domain import (
    REMINDER_KINDS,
    Appointment,
    PlannedNotification,
    Timer,
)

Channel = str
"""``push`` or ``email``."""

_APPOINTMENT_COLUMNS: Final = (
    "a.appointment_id, a.clinic_id, a.patient_id, a.provider_id, a.starts_at,"
    " a.duration_minutes, a.timezone, a.status, a.scheduled_event_id"
)


def _appointment(row: asyncpg.Record) -> Appointment:
    return Appointment(
        appointment_id=row["appointment_id"],
        clinic_id=row["clinic_id"],
        patient_id=row["patient_id"],
        provider_id=row["provider_id"],
        starts_at=row["starts_at"],
        duration_minutes=row["duration_minutes"],
        timezone=row["timezone"],
        status=row["status"],
        scheduled_event_id=row["scheduled_event_id"],
    )


class StoreTransaction:
    """The statements of one consumer or scheduler transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def mark_processed(
        self, event_id: UUID, appointment_id: UUID, stream_sequence: int, at: datetime
    ) -> bool:
        """Record ``event_id`` as processed ``at`` (the service's clock, which retention
        compares it with); False when it already was (a redelivery)."""
        inserted = await self._conn.fetchval(
            """INSERT INTO notification_processed_events
                   (event_id, appointment_id, stream_sequence, processed_at)
               VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING RETURNING true""",
            event_id,
            appointment_id,
            stream_sequence,
            at,
        )
        return bool(inserted)

    async def locked_appointment(self, appointment_id: UUID) -> Appointment | None:
        """The appointment, locked until commit (its events apply one at a time)."""
        row = await self._conn.fetchrow(
            f"""SELECT {_APPOINTMENT_COLUMNS} FROM notification_appointments a
                WHERE a.appointment_id = $1 FOR UPDATE""",
            appointment_id,
        )
        return None if row is None else _appointment(row)

    async def add_appointment(self, a: Appointment) -> None:
        """Remember a newly scheduled appointment."""
        await self._conn.execute(
            """INSERT INTO notification_appointments (appointment_id, clinic_id, patient_id,
                   provider_id, starts_at, duration_minutes, timezone, status,
                   scheduled_event_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (appointment_id) DO NOTHING""",
            a.appointment_id,
            a.clinic_id,
            a.patient_id,
            a.provider_id,
            a.starts_at,
            a.duration_minutes,
            a.timezone,
            a.status,
            a.scheduled_event_id,
        )

    async def set_status(self, appointment_id: UUID, status: AppointmentStatus) -> None:
        """Record that the appointment was cancelled or started."""
        await self._conn.execute(
            "UPDATE notification_appointments SET status = $2 WHERE appointment_id = $1",
            appointment_id,
            status,
        )

    async def add_notifications(
        self,
        notifications: Sequence[PlannedNotification],
        channels: Sequence[Channel],
        now: datetime,
    ) -> int:
        """Store notifications not stored before, each with a pending delivery per channel;
        return how many were new."""
        added = 0
        for n in notifications:
            new = await self._conn.fetchval(
                """INSERT INTO notifications (notification_id, kind, recipient_id,
                       recipient_role, appointment_id, clinic_id, cause_event_id, title, body,
                       created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                   ON CONFLICT DO NOTHING RETURNING true""",
                n.notification_id,
                n.kind,
                n.recipient_id,
                n.recipient_role,
                n.appointment_id,
                n.clinic_id,
                n.cause_event_id,
                n.title,
                n.body,
                now,
            )
            if not new:
                continue
            added += 1
            await self._conn.executemany(
                """INSERT INTO notification_deliveries (notification_id, channel, next_attempt_at)
                   VALUES ($1, $2, $3) ON CONFLICT DO NOTHING""",
                [(n.notification_id, channel, now) for channel in channels],
            )
        return added

    async def first_start(self) -> datetime | None:
        """When the service first started consuming with this database (see
        :meth:`NotificationStore.record_first_start`); None if it never did (the database
        is new, or was rebuilt under a running service)."""
        started: datetime | None = await self._conn.fetchval(
            "SELECT started_at FROM notification_first_start"
        )
        return started

    async def was_confirmed(self, appointment_id: UUID) -> bool:
        """Whether the appointment's booking was confirmed to anyone (its confirmations
        stored; a stale booking's were not)."""
        confirmed: bool = await self._conn.fetchval(
            """SELECT EXISTS (SELECT FROM notifications
                              WHERE appointment_id = $1 AND kind = 'appointment-confirmed')""",
            appointment_id,
        )
        return confirmed

    async def set_timers(self, timers: Sequence[Timer]) -> None:
        """Set (or move) the appointment's reminders."""
        await self._conn.executemany(
            """INSERT INTO notification_timers
                   (appointment_id, kind, cause_event_id, due_at, expires_at)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (appointment_id, kind) DO UPDATE SET
                   cause_event_id = EXCLUDED.cause_event_id, due_at = EXCLUDED.due_at,
                   expires_at = EXCLUDED.expires_at""",
            [(t.appointment_id, t.kind, t.cause_event_id, t.due_at, t.expires_at) for t in timers],
        )

    async def drop_timers(self, appointment_id: UUID) -> None:
        """Forget the appointment's pending reminders."""
        await self._conn.execute(
            "DELETE FROM notification_timers WHERE appointment_id = $1", appointment_id
        )

    async def skip_outdated(self, appointment_id: UUID, why: str, now: datetime) -> None:
        """Give up what would now tell of a visit still to come (it was cancelled or
        started): its reminders not sent yet, and a confirmation waiting for a retry, which
        would arrive after the news. (A confirmation not tried yet goes out first, in
        order; one a worker holds right now may still go out, and if it is claimed again, a
        retry or after its worker died, the worker gives it up: ``outdated_by``.)

        Not one whose publish got no answer (``handing-over``, see
        :meth:`DeliveryStore.retry`): that message may still arrive, after the news if
        skipped. It is made due ``now`` instead, for a worker to send it again first (a
        duplicate JetStream drops), ahead of the cancellation it holds back."""
        await self._conn.execute(
            """UPDATE notification_deliveries d
               SET status = CASE WHEN d.sending_phase = 'handing-over' THEN d.status
                                 ELSE 'skipped' END,
                   last_error = CASE WHEN d.sending_phase = 'handing-over' THEN d.last_error
                                     ELSE $2 END,
                   next_attempt_at = CASE WHEN d.sending_phase = 'handing-over'
                                          THEN LEAST(d.next_attempt_at, $4)
                                          ELSE d.next_attempt_at END
               FROM notifications n
               WHERE n.notification_id = d.notification_id AND n.appointment_id = $1
                 AND d.status = 'pending'
                 AND (n.kind = ANY($3::text[])
                      OR (n.kind = 'appointment-confirmed' AND d.attempts > 0))""",
            appointment_id,
            why,
            sorted(REMINDER_KINDS),
            now,
        )

    async def claim_due_timers(
        self, now: datetime, limit: int, appointment_ids: Collection[UUID]
    ) -> list[tuple[Appointment, Timer]]:
        """Lock up to ``limit`` timers due at ``now`` of ``appointment_ids`` (those the
        scheduler asked the stream about) with their appointments.

        Skips what another transaction holds: a timer another scheduler is firing, and an
        appointment the consumer is changing right now (its cancel wins; the timer is
        deleted with it or fires on the next round).
        """
        rows = await self._conn.fetch(
            f"""SELECT {_APPOINTMENT_COLUMNS}, t.kind, t.cause_event_id, t.due_at, t.expires_at
                FROM notification_timers t
                JOIN notification_appointments a ON a.appointment_id = t.appointment_id
                WHERE t.due_at <= $1 AND t.appointment_id = ANY($3::uuid[])
                ORDER BY t.due_at, t.appointment_id, t.kind
                LIMIT $2
                FOR UPDATE OF t SKIP LOCKED
                FOR SHARE OF a SKIP LOCKED""",
            now,
            limit,
            list(appointment_ids),
        )
        return [(_appointment(row), _timer(row)) for row in rows]

    async def delete_timer(self, timer: Timer) -> None:
        """The timer fired (or expired): forget it."""
        await self._conn.execute(
            "DELETE FROM notification_timers WHERE appointment_id = $1 AND kind = $2",
            timer.appointment_id,
            timer.kind,
        )


def _timer(row: asyncpg.Record) -> Timer:
    return Timer(
        appointment_id=row["appointment_id"],
        kind=row["kind"],
        cause_event_id=row["cause_event_id"],
        due_at=row["due_at"],
        expires_at=row["expires_at"],
    )


class NotificationStore:
    """The notification service's tables in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        conn: Any
        async with self._pool.acquire() as conn, conn.transaction():
            yield StoreTransaction(conn)

    async def record_first_start(self, now: datetime) -> datetime:
        """Record ``now`` as when the service first started consuming with this database,
        unless a start is recorded already (it never moves); return the one recorded. Any
        number of processes may start at once: one insert wins, and each of them gets it."""
        # DO UPDATE to the same value, not DO NOTHING: the statement then returns the row
        # another process committed first, which a DO NOTHING's snapshot may not see.
        started: datetime = await self._pool.fetchval(
            """INSERT INTO notification_first_start (started_at) VALUES ($1)
               ON CONFLICT (singleton) DO UPDATE
                   SET started_at = notification_first_start.started_at
               RETURNING started_at""",
            now,
        )
        return started

    async def due_appointments(self, now: datetime, limit: int) -> set[tuple[UUID, UUID]]:
        """(clinic, appointment) of the first ``limit`` timers due at ``now``, read without
        locks: what the scheduler asks the stream about before it claims them."""
        rows = await self._pool.fetch(
            """SELECT a.clinic_id, a.appointment_id
               FROM notification_timers t
               JOIN notification_appointments a ON a.appointment_id = t.appointment_id
               WHERE t.due_at <= $1
               ORDER BY t.due_at, t.appointment_id, t.kind
               LIMIT $2""",
            now,
            limit,
        )
        return {(row["clinic_id"], row["appointment_id"]) for row in rows}

    async def park(
        self, stream_sequence: int, subject: str, data: bytes, reason: str, deliveries: int
    ) -> None:
        """Keep a message the consumer gives up on, for an operator."""
        await self._pool.execute(
            """INSERT INTO notification_parked_messages
                   (stream_sequence, subject, data, reason, deliveries)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (stream_sequence) DO UPDATE SET
                   reason = EXCLUDED.reason, deliveries = EXCLUDED.deliveries""",
            stream_sequence,
            subject,
            data,
            reason,
            deliveries,
        )
