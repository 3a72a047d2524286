"""The event store on PostgreSQL: streams, outbox, booking guard and idempotent answers.

An append is one SQL statement (one round trip, one implicit transaction): the events,
their outbox rows, the provider's booked range (or its release on cancel) and the stored
answer of an idempotent request commit together or not at all.

Concurrent appends share that statement (group commit, see ``group_commit``): the ones
that queue while a statement is in flight go together in the next, over arrays, so a
batch costs one round trip and one commit. A batch PostgreSQL refuses (a stale version,
a taken slot or key, a deadlock) is sent again apart: the appends its refusal does not name
together again (one by one if refused again), then those it names (by stream, provider or
idempotency key) one by one, so each append still gets exactly the answer it would get
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg
import msgspec

from contracts.events import (
    SCHEMA_VERSIONS,
    AppointmentCancelled,
    AppointmentScheduled,
    EventEnvelope,
    decode_event,
    event_type,
)
from services.appointments.adapters.postgres.errors import (
    database_errors,
    refused_by_content,
    statement_gave_up,
)
from services.appointments.adapters.postgres.group_commit import DecideEach, GroupCommit
from services.appointments.adapters.postgres.pools import share_of
from services.appointments.service_layer.ports import (
    AppendResult,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    NewEvent,
    RecordedEvent,
    StatementGaveUp,
    StoredAnswer,
    StreamVersionConflict,
)
from services.errors import SlotTaken
from services.tracing import current_traceparent

# The events of one or many appends (parameters $1-$10, $23, $24 as in _APPEND), each
# stored only right after its stream's last stored version: NULL (refused as a conflict,
# naming that stream) where a state ahead of the store would leave a gap. The streams at
# fault are found once for the statement (not per row), so that it keeps its generic plan,
# and only if an append follows stored events ($24: not for new streams alone).
_INSERT_EVENTS = """WITH new_events AS (
    INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type, schema_version,
                        data, occurred_at, correlation_id, causation_id, traceparent)
    SELECT n.event_id, n.stream_id,
           CASE WHEN NOT $24::bool OR n.stream_id <> ALL (coalesce((
                        SELECT array_agg(f.s)
                        FROM (SELECT s, min(v) AS first
                              FROM unnest($2::uuid[], $3::int[]) AS b(s, v)
                              GROUP BY s) f
                        WHERE f.first > 1
                          AND NOT EXISTS (SELECT FROM events e
                                          WHERE e.stream_id = f.s
                                            AND e.stream_version = f.first - 1)),
                        '{}'))
                THEN n.stream_version END,
           n.clinic_id, n.type, n.schema_version, n.data, n.occurred_at, n.correlation_id,
           n.causation_id, n.traceparent
    FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::uuid[], $5::text[], $6::int[],
                $7::jsonb[], $8::timestamptz[], $9::uuid[], $10::uuid[], $23::text[])
         AS n(event_id, stream_id, stream_version, clinic_id, type, schema_version, data,
              occurred_at, correlation_id, causation_id, traceparent)
"""

_APPEND = f"""
{_INSERT_EVENTS}    RETURNING global_position, stream_version
), queued AS (
    INSERT INTO outbox (global_position) SELECT global_position FROM new_events
), booked AS (
    INSERT INTO provider_bookings (appointment_id, clinic_id, provider_id, during)
    SELECT $11::uuid, $12::uuid, $13::uuid, tstzrange($14::timestamptz, $15::timestamptz, '[)')
    WHERE $14::timestamptz IS NOT NULL
), freed AS (
    DELETE FROM provider_bookings WHERE $16::bool AND appointment_id = $11::uuid
), remembered AS (
    INSERT INTO idempotency_keys (principal_id, key, fingerprint, status, body, consistency_token)
    SELECT $17::uuid, $18::text, $19::text, $20::smallint, $21::bytea, $22::text
    WHERE $17::uuid IS NOT NULL
)
SELECT max(stream_version) AS stream_version, max(global_position) AS global_position
FROM new_events
"""

# The same statement for many appends (of different streams): events, outbox rows,
# booked ranges and stored answers over arrays, freed bookings by ``= ANY``. Parameters
# are numbered as in _APPEND. Global positions follow array order (the batch's order,
# appends that free a booking first: see ``_append_batch``).
_APPEND_BATCH = f"""
{_INSERT_EVENTS}    RETURNING global_position, stream_id
), queued AS (
    INSERT INTO outbox (global_position) SELECT global_position FROM new_events
), booked AS (
    INSERT INTO provider_bookings (appointment_id, clinic_id, provider_id, during)
    SELECT appointment_id, clinic_id, provider_id, tstzrange(starts_at, ends_at, '[)')
    FROM unnest($11::uuid[], $12::uuid[], $13::uuid[], $14::timestamptz[], $15::timestamptz[])
         AS b(appointment_id, clinic_id, provider_id, starts_at, ends_at)
), freed AS (
    DELETE FROM provider_bookings WHERE appointment_id = ANY($16::uuid[])
), remembered AS (
    INSERT INTO idempotency_keys (principal_id, key, fingerprint, status, body, consistency_token)
    SELECT * FROM unnest($17::uuid[], $18::text[], $19::text[], $20::smallint[], $21::bytea[],
                         $22::text[])
)
SELECT stream_id, max(global_position) AS global_position FROM new_events GROUP BY stream_id
"""

#: Appends per batch statement at most, and batch statements in flight at most.
MAX_BATCH = 128
IN_FLIGHT = 2
#: How long an append may wait for its turn before it is answered ``503`` unsent (a
#: database that stopped answering holds the statements in flight for their whole
#: timeout): longer than a statement in flight waits for a lock (``lock_timeout``, 2 s)
#: and then runs, so that only a hang, not a lock held for a while, turns it away.
APPEND_QUEUE_SECONDS = 5.0

_LOAD = """
SELECT global_position, event_id, stream_id, stream_version, type, schema_version, data,
       occurred_at, correlation_id, causation_id
FROM events WHERE stream_id = $1 ORDER BY stream_version
"""


#: The columns of ``events`` that are fields of :class:`EventEnvelope` as they are (all but
#: ``data``, which is stored as ``jsonb`` text).
ENVELOPE_COLUMNS = tuple(f.name for f in msgspec.structs.fields(EventEnvelope) if f.name != "data")


def envelope_fields(row: asyncpg.Record) -> dict[str, Any]:
    """The envelope fields of an ``events`` row, ``data`` left out."""
    return {name: row[name] for name in ENVELOPE_COLUMNS}


def envelope_from_row(row: asyncpg.Record) -> EventEnvelope:
    """The wire envelope of an ``events`` row (``data`` as stored, not upcast)."""
    return EventEnvelope(**envelope_fields(row), data=msgspec.json.decode(row["data"]))


class PostgresEventStore:
    """:class:`~services.appointments.service_layer.ports.EventStore` and
    :class:`~services.appointments.service_layer.ports.IdempotencyStore` on PostgreSQL."""

    def __init__(
        self, pool: asyncpg.Pool, *, max_batch: int = MAX_BATCH, in_flight: int | None = None
    ) -> None:
        # A share of the pool: with the event store's tables locked, the reads of the visits
        # view still find connections (and the other way round).
        self._pool = share_of(pool, "events")
        if in_flight is None:  # a single connection (tests) runs one statement at a time
            in_flight = IN_FLIGHT if isinstance(pool, asyncpg.Pool) else 1
        self._appends: GroupCommit[_Append, AppendResult] = GroupCommit(
            self._append_batch,
            self._append_one,
            key=lambda append: append.stream_id,
            implicated=_implicated,
            in_flight=in_flight,
            max_batch=max_batch,
            queue_timeout=APPEND_QUEUE_SECONDS,
        )

    async def load(self, stream_id: UUID) -> list[RecordedEvent]:
        """All events of the stream, upcast to the current schema, in version order."""
        recorded = []
        for envelope in await self.load_envelopes(stream_id):
            event = decode_event(envelope.type, envelope.schema_version, envelope.data)
            recorded.append(RecordedEvent(envelope=envelope, event=event))
        return recorded

    async def load_envelopes(self, stream_id: UUID) -> list[EventEnvelope]:
        """All events of the stream as stored (``data`` not decoded), in version order."""
        with database_errors():
            rows = await self._pool.fetch(_LOAD, stream_id)
        return [envelope_from_row(row) for row in rows]

    async def append(
        self,
        stream_id: UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        """Append atomically; see the port for the errors raised.

        Waits for the batch statement in flight, if any, then goes with the appends queued
        meanwhile (never with another append of the same stream)."""
        if not events:  # a decision to do nothing is not appended (the handlers' no-op)
            raise ValueError("an append needs at least one event")
        args = _append_args(stream_id, expected_version, events, idempotency, current_traceparent())
        return await self._appends.submit(_Append(stream_id, expected_version + len(events), args))

    async def _append_one(self, append: _Append) -> AppendResult:
        """One append in a statement of its own, with its own errors."""
        try:
            with database_errors():
                row = await self._pool.fetchrow(_APPEND, *append.args)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "idempotency_keys_pkey":
                raise IdempotencyKeyTaken() from exc
            if exc.constraint_name in ("events_stream_version_key", "provider_bookings_pkey"):
                raise StreamVersionConflict() from exc
            raise
        except asyncpg.ExclusionViolationError as exc:
            raise SlotTaken("The provider already has an appointment at that time.") from exc
        except asyncpg.NotNullViolationError as exc:
            if exc.column_name == "stream_version":  # not right after the stored version
                raise StreamVersionConflict() from exc
            raise
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            # Racing inserts into the booking guard can deadlock each other; PostgreSQL
            # aborts one, which is then decided again on fresh state like any lost race.
            raise StreamVersionConflict() from exc
        assert row is not None
        return AppendResult(
            stream_version=row["stream_version"], global_position=row["global_position"]
        )

    async def _append_batch(self, appends: Sequence[_Append]) -> list[AppendResult]:
        """Appends of different streams in one statement; :class:`DecideEach` if refused."""
        events: list[list[Any]] = [[] for _ in range(10)]
        bookings: list[list[Any]] = [[] for _ in range(5)]
        freed: list[UUID] = []
        answers: list[list[Any]] = [[] for _ in range(6)]
        traceparents: list[str | None] = []
        follows_stored = False
        # Appends that free a booking first: their positions come before those of bookings
        # the freed range let in (the statement deletes before it inserts, whatever the
        # order), so the log never shows two bookings of one slot at once.
        for append in sorted(appends, key=lambda append: not append.args[15]):
            args = append.args
            for column, values in zip(events, args[:10], strict=True):
                column.extend(values)
            traceparents.extend(args[22])
            if args[13] is not None:  # a booked range
                for column, value in zip(bookings, args[10:15], strict=True):
                    column.append(value)
            if args[15]:
                freed.append(append.stream_id)
            if args[16] is not None:  # an idempotent request's answer
                for column, value in zip(answers, args[16:22], strict=True):
                    column.append(value)
            follows_stored = follows_stored or args[23]
        with database_errors():
            try:
                rows = await self._pool.fetch(
                    _APPEND_BATCH, *events, *bookings, freed, *answers, traceparents, follows_stored
                )
            except Exception as exc:
                if statement_gave_up(exc):  # a lock waited for: it names no write
                    gave_up = StatementGaveUp("The database gave up on this request.")
                    gave_up.__cause__ = exc
                    raise DecideEach() from gave_up
                if refused_by_content(exc):
                    raise DecideEach() from exc
                raise
        positions = {row["stream_id"]: row["global_position"] for row in rows}
        return [
            AppendResult(
                stream_version=append.stream_version,
                global_position=positions[append.stream_id],
            )
            for append in appends
        ]

    async def find_answer(self, principal_id: UUID, key: str) -> StoredAnswer | None:
        """The answer stored under (principal, key), if any."""
        with database_errors():
            row = await self._pool.fetchrow(
                "SELECT fingerprint, status, body, consistency_token FROM idempotency_keys"
                " WHERE principal_id = $1 AND key = $2",
                principal_id,
                key,
            )
        return None if row is None else _answer_from_row(row)

    async def save_answer(self, record: IdempotencyRecord) -> StoredAnswer:
        """Store the answer unless the key is taken; return whichever answer is stored."""
        answer = record.answer
        with database_errors():
            row = await self._pool.fetchrow(
                """WITH inserted AS (
                       INSERT INTO idempotency_keys
                           (principal_id, key, fingerprint, status, body, consistency_token)
                       VALUES ($1, $2, $3, $4, $5, $6)
                       ON CONFLICT (principal_id, key) DO NOTHING
                       RETURNING fingerprint, status, body, consistency_token)
                   SELECT * FROM inserted
                   UNION ALL
                   SELECT fingerprint, status, body, consistency_token FROM idempotency_keys
                   WHERE principal_id = $1 AND key = $2 AND NOT EXISTS (SELECT FROM inserted)""",
                record.principal_id,
                record.key,
                answer.fingerprint,
                answer.status,
                answer.body,
                answer.consistency_token,
            )
            if row is not None:
                return _answer_from_row(row)
            # The insert waited for a twin's uncommitted key and found it taken once the
            # twin committed, but this statement's snapshot predates that row: read anew.
            stored = await self.find_answer(record.principal_id, record.key)
        return answer if stored is None else stored


def _implicated(append: _Append, refusal: BaseException) -> bool:
    """Whether PostgreSQL's refusal of a batch names ``append``: its stream, the provider
    it books or the principal of its idempotency key in the refusal's detail (``Key
    (stream_id, stream_version)=(…) already exists``, ``… conflicts with existing key``)."""
    detail = getattr(refusal, "detail", None)
    if not isinstance(detail, str):
        return False
    names = (append.stream_id, append.args[12], append.args[16])  # provider, principal
    return any(name is not None and str(name) in detail for name in names)


class _Append(NamedTuple):
    stream_id: UUID
    stream_version: int  # after the append
    args: list[Any]  # of _APPEND


def _answer_from_row(row: asyncpg.Record) -> StoredAnswer:
    return StoredAnswer(
        fingerprint=row["fingerprint"],
        status=row["status"],
        body=bytes(row["body"]),
        consistency_token=row["consistency_token"],
    )


def _append_args(
    stream_id: UUID,
    expected_version: int,
    events: Sequence[NewEvent],
    idempotency: IdempotencyRecord | None,
    traceparent: str | None = None,
) -> list[Any]:
    """The parameters of :data:`_APPEND`; ``traceparent``: the span context of the command
    (taken in the caller's task), stored with each event."""
    columns: list[list[Any]] = [[] for _ in range(10)]
    booking: AppointmentScheduled | None = None
    frees = False
    for offset, new in enumerate(events, start=1):
        type_ = event_type(new.event)
        row = (
            new.event_id,
            stream_id,
            expected_version + offset,
            new.event.clinic_id,
            type_,
            SCHEMA_VERSIONS[type_],
            msgspec.json.encode(new.event).decode(),
            new.occurred_at,
            new.correlation_id,
            new.causation_id,
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        if isinstance(new.event, AppointmentScheduled):
            booking = new.event
        elif isinstance(new.event, AppointmentCancelled):
            frees = True
    answer = idempotency.answer if idempotency else None
    return [
        *columns,
        stream_id,
        booking.clinic_id if booking else None,
        booking.provider_id if booking else None,
        booking.starts_at if booking else None,
        booking.starts_at + timedelta(minutes=booking.duration_minutes) if booking else None,
        frees,
        idempotency.principal_id if idempotency else None,
        idempotency.key if idempotency else None,
        answer.fingerprint if answer else None,
        answer.status if answer else None,
        answer.body if answer else None,
        answer.consistency_token if answer else None,
        [traceparent] * len(events),
        expected_version > 0,  # follows stored events: the guard against gaps applies
    ]
