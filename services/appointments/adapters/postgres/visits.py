"""The visits view on PostgreSQL: applying events, paging Upcoming/Past, read-your-writes.

Applying is idempotent and ordered per appointment: a batch reads its rows (no lock),
folds its events with :func:`~services.appointments.service_layer.visits.project`, then
upserts the rows and moves the projection's checkpoint in one statement. The upsert
only replaces a row whose version grows, and the row of a version is the same whoever
folds it (events never change), so a concurrent or replayed apply is harmless.

Repair: a read whose consistency token is ahead of the view writes the appointment's row
from its stored events (:meth:`PostgresVisits.write_row`, concurrent ones coalesced into
one statement). It is the row the projector folds from the same events, under the same
version guard; the projector stays the one writer that is never skipped.

Read-your-writes: a reader waits for its version by polling the row; when the row is
written in this process (by a repair or the projector), :class:`ViewUpdates` wakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import asyncpg
import msgspec

from contracts.commands import VisitsTab
from contracts.events import EventEnvelope
from services.appointments.adapters.postgres.errors import database_errors, refused_by_content
from services.appointments.adapters.postgres.group_commit import DecideEach, GroupCommit
from services.appointments.adapters.postgres.pools import share_of
from services.appointments.service_layer.visits import (
    LONGEST_VISIT,
    Outcome,
    PageKey,
    Scope,
    VisitRow,
    project,
)

#: Columns of a :class:`VisitRow`, in its field order.
COLUMNS: Final = VisitRow.__struct_fields__
_SELECT = ", ".join(COLUMNS)
_TYPES: Final = (
    "uuid[], uuid[], uuid[], uuid[], timestamptz[], timestamptz[], int[], text[], text[], "
    "text[], int[]"
)
#: The rows of :func:`upsert_args`, as a FROM item.
_ROWS = f"unnest({', '.join(f'${i}::{t}' for i, t in enumerate(_TYPES.split(', '), 1))})"
_UPSERT = f"""
INSERT INTO {{table}} ({_SELECT})
SELECT {{rows}}
ON CONFLICT (appointment_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:])}
WHERE {{table}}.version < EXCLUDED.version
"""


def upsert_statement(table: str) -> str:
    """The version-guarded upsert of rows into ``table`` (``visits`` or its rebuild)."""
    return _UPSERT.format(table=table, rows=f"* FROM {_ROWS}")


_MIN_UUID: Final = UUID(int=0)
_MAX_UUID: Final = UUID(int=(1 << 128) - 1)
_END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)

_CHECKPOINT = """INSERT INTO projection_checkpoints (projection, stream_sequence)
VALUES ($12, $13) ON CONFLICT (projection) DO UPDATE
SET stream_sequence = GREATEST(projection_checkpoints.stream_sequence, EXCLUDED.stream_sequence),
    updated_at = now()"""
#: The rows and the checkpoint in one statement (one implicit transaction).
_APPLY = f"WITH upserted AS ({upsert_statement('visits')})\n{_CHECKPOINT}"
#: Repaired rows, committed without waiting for the WAL flush: a row lost in a crash is
#: written again by the projector, whose own (durable) commit after reading the row
#: flushes the WAL up to it anyway. Visibility is immediate either way.
_WRITE_ROW = (
    "WITH relaxed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))\n"
    + _UPSERT.format(table="visits", rows=f"rows.* FROM relaxed, {_ROWS} AS rows")
)

#: A read-your-writes wait polls the view every ``_WAIT_POLL_FIRST`` seconds for
#: ``_WAIT_POLL_FAST`` seconds, then backs off to at most ``_WAIT_POLL_MAX``; a write of
#: its row in this process (the projector's, or another read's repair) wakes it at once.
_WAIT_POLL_FIRST = 0.001
_WAIT_POLL_FAST = 0.02
_WAIT_POLL_MAX = 0.05


class ViewUpdates:
    """Wakes the read-your-writes waits of this process after a write of this process (the
    projector's, or a read's repair) committed their appointments' rows (in-process only;
    waits keep polling too)."""

    def __init__(self) -> None:
        self._waiting: dict[UUID, list[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, appointment_id: UUID) -> Iterator[asyncio.Event]:
        """An event set whenever the appointment's row is written, while the block runs."""
        event = asyncio.Event()
        waiting = self._waiting.setdefault(appointment_id, [])
        waiting.append(event)
        try:
            yield event
        finally:
            waiting.remove(event)
            if not waiting:
                del self._waiting[appointment_id]

    def written(self, appointment_ids: Iterable[UUID]) -> None:
        """The rows of ``appointment_ids`` were just committed."""
        if self._waiting:
            for appointment_id in appointment_ids:
                for event in self._waiting.get(appointment_id, ()):
                    event.set()


def _appointment_id(row: VisitRow) -> UUID:
    return row.appointment_id


def row_of(record: asyncpg.Record) -> VisitRow:
    """A :class:`VisitRow` from a selected row."""
    return VisitRow(**{column: record[column] for column in COLUMNS})


def upsert_args(rows: Iterable[VisitRow]) -> list[list[Any]]:
    """The column arrays :func:`upsert_statement` takes, ordered by appointment: every
    writer locks rows in one order, so concurrent upserts cannot deadlock."""
    columns: list[list[Any]] = [[] for _ in COLUMNS]
    for row in sorted(rows, key=_appointment_id):
        for column, value in zip(columns, msgspec.structs.astuple(row), strict=True):
            column.append(value)
    return columns


class PostgresVisits:
    """The visits view: written by the projector, read by :class:`VisitsQuery`."""

    def __init__(
        self, pool: asyncpg.Pool, projection: str = "visits", updates: ViewUpdates | None = None
    ) -> None:
        self._pool = share_of(pool, "visits")  # see PostgresEventStore
        self._projection = projection
        self._updates = updates
        """Written rows are announced there (the projector's and repairs') and waited on
        (by reads)."""
        self._writes: GroupCommit[VisitRow, None] = GroupCommit(
            self._write_rows, self._write_row, _appointment_id
        )

    async def write_row(self, row: VisitRow) -> None:
        """Upsert a row folded from the appointment's stored events (version-guarded)."""
        await self._writes.submit(row)

    async def write_row_durably(self, row: VisitRow) -> None:
        """:meth:`write_row`, committed only once flushed: for the projector, which acks
        the event it stands for right after (nothing would write it again)."""
        await self._upsert(upsert_statement("visits"), [row])

    async def _write_row(self, row: VisitRow) -> None:
        await self._write_rows([row])

    async def _write_rows(self, rows: Sequence[VisitRow]) -> list[None]:
        await self._upsert(_WRITE_ROW, rows)
        return [None] * len(rows)

    async def _upsert(self, statement: str, rows: Sequence[VisitRow]) -> None:
        """``statement`` (an upsert) over ``rows``, then announced to the waiting reads."""
        with database_errors():
            try:
                await self._pool.execute(statement, *upsert_args(rows))
            except Exception as exc:
                if len(rows) > 1 and refused_by_content(exc):
                    raise DecideEach() from exc  # one bad row must not fail the others
                raise
        if self._updates is not None:
            self._updates.written(row.appointment_id for row in rows)

    async def apply(
        self, envelopes: Sequence[EventEnvelope], stream_sequence: int | None = None
    ) -> list[Outcome]:
        """Fold ``envelopes`` (in stream order) into the view and move the checkpoint to
        ``stream_sequence``, in one statement; the outcome of each envelope.

        The rows are read and written in one transaction: its read holds ``visits``, so a
        rebuild's swap waits for the write. (Read apart, a write blocked by the swap would
        land on the new table, built from a row of the old one.)"""
        ids = list({envelope.stream_id for envelope in envelopes})
        with database_errors():
            async with self._pool.acquire() as conn, conn.transaction():
                records = await conn.fetch(
                    f"SELECT {_SELECT} FROM visits WHERE appointment_id = ANY($1::uuid[])", ids
                )
                current: dict[UUID, VisitRow | None] = {
                    r["appointment_id"]: row_of(r) for r in records
                }
                changed: dict[UUID, VisitRow] = {}
                outcomes = []
                for envelope in envelopes:
                    outcome, row = project(current.get(envelope.stream_id), envelope)
                    outcomes.append(outcome)
                    if row is not None and outcome in (Outcome.APPLIED, Outcome.SKIPPED):
                        current[envelope.stream_id] = changed[envelope.stream_id] = row
                columns = upsert_args(changed.values())
                if stream_sequence is not None:
                    await conn.execute(_APPLY, *columns, self._projection, stream_sequence)
                elif changed:
                    await conn.execute(upsert_statement("visits"), *columns)
        if changed and self._updates is not None:
            self._updates.written(changed)
        return outcomes

    async def park(
        self, stream_sequence: int, subject: str, data: bytes, reason: str, deliveries: int
    ) -> None:
        """Keep a message the projection cannot apply, for an operator (idempotent)."""
        with database_errors():
            await self._pool.execute(
                """INSERT INTO parked_messages
                       (projection, stream_sequence, subject, data, reason, deliveries)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (projection, stream_sequence) DO NOTHING""",
                self._projection,
                stream_sequence,
                subject,
                data,
                reason,
                deliveries,
            )

    async def checkpoint(self) -> int:
        """The last stream sequence the projection applied (0 before the first)."""
        with database_errors():
            value = await self._pool.fetchval(
                "SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1",
                self._projection,
            )
        return int(value or 0)

    async def get(self, appointment_id: UUID) -> VisitRow | None:
        """The stored row of one appointment."""
        with database_errors():
            record = await self._pool.fetchrow(
                f"SELECT {_SELECT} FROM visits WHERE appointment_id = $1", appointment_id
            )
        return None if record is None else row_of(record)

    async def page(
        self, scope: Scope, tab: VisitsTab, now: datetime, after: PageKey | None, limit: int
    ) -> list[VisitRow]:
        """Up to ``limit`` rows of ``tab`` at ``now``, after ``after``, in the tab's order."""
        sql, args = page_query(scope, tab, now, after, limit)
        with database_errors():
            records = await self._pool.fetch(sql, *args)
        return [row_of(record) for record in records]

    async def wait_for_version(
        self, scope: Scope, appointment_id: UUID, version: int, wait_seconds: float
    ) -> bool:
        """Wait until the row (if in ``scope``) reflects ``version`` or ``wait_seconds`` pass.

        The row is polled (a primary-key read, a fraction of a millisecond), in short steps
        at first; the projector of this process, if any, ends a step as soon as it wrote
        the row. Polling stays the fallback for a projector in another process.
        """
        started = time.monotonic()
        deadline = started + wait_seconds
        where, args = _scope_filter(scope)
        sql = f"SELECT version FROM visits WHERE appointment_id = ${len(args) + 1} AND {where}"
        pause = _WAIT_POLL_FIRST
        watching = (
            self._updates.watch(appointment_id)
            if self._updates is not None
            else contextlib.nullcontext(None)
        )
        with watching as written:
            while True:
                if written is not None:
                    written.clear()  # before reading: a write after the read sets it again
                with database_errors():
                    stored = await self._pool.fetchval(sql, *args, appointment_id)
                if version <= 0 or (stored is not None and stored >= version):
                    return True
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now - started >= _WAIT_POLL_FAST:
                    pause = min(pause * 2, _WAIT_POLL_MAX)
                step = min(pause, deadline - now)
                if written is None:
                    await asyncio.sleep(step)
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step):
                            await written.wait()


def page_query(
    scope: Scope, tab: VisitsTab, now: datetime, after: PageKey | None, limit: int
) -> tuple[str, list[Any]]:
    """The statement (and its arguments) of one page: each branch is one index range."""
    where, args = _scope_filter(scope)
    n = len(args)
    if tab == "upcoming":
        # Ended rows are excluded by ends_at; the lower bound on starts_at (implied by it)
        # is what lets the index range start at the first candidate.
        low = (now - LONGEST_VISIT, _MIN_UUID)
        if after is not None and (after.starts_at, after.appointment_id) > low:
            low = (after.starts_at, after.appointment_id)
        sql = (
            f"SELECT {_SELECT} FROM visits WHERE {where} AND active AND ends_at > ${n + 1}"
            f" AND (starts_at, appointment_id) > (${n + 2}, ${n + 3})"
            f" ORDER BY starts_at, appointment_id LIMIT ${n + 4}"
        )
        return sql, [*args, now, *low, limit]
    # Past = cancelled rows, merged with active rows that ended (so started before now).
    high = (_END_OF_TIME, _MAX_UUID) if after is None else (after.starts_at, after.appointment_id)
    ended_high = min(high, (now, _MIN_UUID))
    order = "ORDER BY starts_at DESC, appointment_id DESC"
    sql = (
        f"SELECT * FROM ((SELECT {_SELECT} FROM visits WHERE {where} AND NOT active"
        f" AND (starts_at, appointment_id) < (${n + 1}, ${n + 2}) {order} LIMIT ${n + 6})"
        f" UNION ALL (SELECT {_SELECT} FROM visits WHERE {where} AND active"
        f" AND ends_at <= ${n + 3} AND (starts_at, appointment_id) < (${n + 4}, ${n + 5})"
        f" {order} LIMIT ${n + 6})) AS past {order} LIMIT ${n + 6}"
    )
    return sql, [*args, *high, now, *ended_high, limit]


def _scope_filter(scope: Scope) -> tuple[str, list[Any]]:
    # One statement per scope column (never "$2 IS NULL OR ..."), so each plan uses its index.
    if scope.patient_id is not None:
        return "clinic_id = $1 AND patient_id = $2", [scope.clinic_id, scope.patient_id]
    if scope.provider_id is not None:
        return "clinic_id = $1 AND provider_id = $2", [scope.clinic_id, scope.provider_id]
    return "clinic_id = $1", [scope.clinic_id]
