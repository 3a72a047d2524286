"""``clinic rebuild-visits``: rebuild the visits view from the event store, live.

1. Build aside: every event of one snapshot is folded per appointment with the
   projector's own :func:`~services.appointments.service_layer.visits.project` and copied
   into ``visits_rebuild``, which then gets the live table's indexes (read from the
   catalog, so the migrations stay their only definition).
2. Catch up: appointments whose live row was written after the snapshot (by the running
   projector or a read's repair) are folded again from their streams — without a lock
   until few are left, then the last of them while ``visits`` is locked for the swap. A
   trigger on ``visits``, created before the snapshot is taken, notes each one in
   ``visits_rebuild_changed``, so the locked part costs what changed since the last pass,
   not a comparison of the two tables (which grows with the view).
3. Swap: the old table (and the trigger with it) is dropped and the new one takes its
   name and index names, in one short transaction. Events the projector has not applied
   yet it applies to the new table as usual (its version check makes that exact).

A rebuild that stops midway drops its trigger on the way out; if it cannot (PostgreSQL
went away), the next rebuild does, and until then the projector notes every appointment
it writes once in ``visits_rebuild_changed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final
from uuid import UUID

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from services.appointments.adapters.postgres.event_store import envelope_from_row
from services.appointments.adapters.postgres.migrate import MIGRATION_LOCK_ID
from services.appointments.adapters.postgres.visits import (
    COLUMNS,
    upsert_args,
    upsert_statement,
)
from services.appointments.service_layer.visits import VisitRow, fold_envelope

Connection = asyncpg.Connection | PoolConnectionProxy
#: (events folded, events in the snapshot)
Progress = Callable[[int, int], None]

REBUILD_LOCK_ID: Final = 0x72656275696C64  # "rebuild"
ASIDE: Final = "visits_rebuild"
#: Appointments whose live row was written since the rebuild began, noted by ``_WATCH``.
CHANGED: Final = "visits_rebuild_changed"
_WATCH: Final = "visits_rebuild_watch"
_NOTE: Final = "visits_rebuild_note"
#: An unlocked catch-up pass follows another while it found more than this many.
_CATCH_UP_FEW: Final = 100
_CATCH_UP_PASSES: Final = 5
_SUFFIX: Final = "__rebuild"
_EVENTS = """SELECT global_position, event_id, stream_id, stream_version, type, schema_version,
       data, occurred_at, correlation_id, causation_id FROM events"""
_INDEXDEF = re.compile(
    r"^(CREATE (?:UNIQUE )?INDEX )(\S+)( ON (?:ONLY )?)(\S+?)(visits)( USING .*)$"
)
_LOCK_TIMEOUT = "1s"
#: How long a change of ``visits`` may hold its lock idle (its client stalled) or in one
#: statement (the swap's last catch-up: a few visits) before the server ends it.
_LOCKED_IDLE_TIMEOUT = "2s"
_LOCKED_STATEMENT_TIMEOUT = "10s"
_LOCK_ATTEMPTS = 20
#: Tries of the clean-up after a failed rebuild (the next rebuild cleans up otherwise).
_CLEAN_UP_ATTEMPTS = 3


class RebuildAlreadyRunning(Exception):
    """Another ``rebuild-visits`` holds the rebuild lock, or ``clinic migrate`` its own
    (a migration of ``visits`` would be undone by the swap)."""


class StderrProgress:
    """A one-line progress bar on stderr: ``[#####-----]  50% 5,000/10,000 events``."""

    def __init__(self, width: int = 30) -> None:
        self._width = width
        self._shown = -1.0

    def __call__(self, done: int, total: int) -> None:
        """Redraw the bar (at most every 0.1 s, and always at the end)."""
        now = time.monotonic()
        if done < total and now - self._shown < 0.1:
            return
        self._shown = now
        ratio = done / total if total else 1.0
        filled = int(ratio * self._width)
        bar = "#" * filled + "-" * (self._width - filled)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r[{bar}] {ratio:4.0%} {done:,}/{total:,} events{end}")
        sys.stderr.flush()


@asynccontextmanager
async def _connection(target: str | asyncpg.Pool) -> AsyncIterator[Connection]:
    if isinstance(target, str):
        conn = await asyncpg.connect(target)
        try:
            yield conn
        finally:
            await conn.close()
    else:
        async with target.acquire() as pooled:
            yield pooled


async def rebuild_visits(
    target: str | asyncpg.Pool, *, progress: Progress | None = None, batch_size: int = 5000
) -> int:
    """Rebuild the visits view from the event store while the service runs; the number
    of visits in the new view. ``target`` is a DSN or a pool."""
    async with _connection(target) as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_ID):
            raise RebuildAlreadyRunning("another rebuild-visits is running")
        # Held to the end: the swap puts in place a copy of the table as it was at the
        # start, which would drop what a migration meanwhile added to it (a migration
        # waits instead).
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID):
            await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_ID)
            raise RebuildAlreadyRunning("clinic migrate is running; rebuild once it is done")
        try:
            await _unwatch(conn)  # a stopped rebuild's, if it could not
            await _watch(conn)  # before the snapshot: every later write is noted
            await conn.execute(
                f"CREATE TABLE {ASIDE} (LIKE visits"
                " INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS)"
            )
            await _build(conn, progress, batch_size)
            indexes = await _copy_indexes(conn)
            await _copy_privileges(conn)
            await conn.execute(f"ANALYZE {ASIDE}")
            for _ in range(_CATCH_UP_PASSES):
                if await _catch_up(conn) <= _CATCH_UP_FEW:
                    break
            await _swap(conn, indexes)
            return int(await conn.fetchval("SELECT count(*) FROM visits"))
        finally:
            # (A connection the server closed, the swap stalled: its locks went with it.)
            # A trigger still locked out stays until the next rebuild removes it; the
            # advisory locks go in any case (a pool's connection would keep them).
            with contextlib.suppress(
                asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError
            ):
                await _unwatch(conn, attempts=_CLEAN_UP_ATTEMPTS)
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute(
                    "SELECT pg_advisory_unlock($1), pg_advisory_unlock($2)",
                    MIGRATION_LOCK_ID,
                    REBUILD_LOCK_ID,
                )


async def _watch(conn: Connection) -> None:
    """Note in :data:`CHANGED` every appointment whose live row is written from now on."""

    async def create(conn: Connection) -> None:
        await conn.execute(
            f"""CREATE TABLE {CHANGED} (appointment_id uuid PRIMARY KEY);
                CREATE FUNCTION {_NOTE}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO {CHANGED} VALUES (NEW.appointment_id) ON CONFLICT DO NOTHING;
                    RETURN NULL;
                END $$;
                CREATE TRIGGER {_WATCH} AFTER INSERT OR UPDATE ON visits
                    FOR EACH ROW EXECUTE FUNCTION {_NOTE}();"""
        )

    await _locking_briefly(conn, create, "watch it")


async def _unwatch(conn: Connection, attempts: int | None = None) -> None:
    """Drop the trigger (if still on the live table), its notes and the aside table."""

    async def drop(conn: Connection) -> None:
        await conn.execute(
            f"""DROP TRIGGER IF EXISTS {_WATCH} ON visits;
                DROP FUNCTION IF EXISTS {_NOTE}() CASCADE;
                DROP TABLE IF EXISTS {CHANGED}, {ASIDE}"""
        )

    await _locking_briefly(conn, drop, "remove the rebuild's trigger from it", attempts)


async def _locking_briefly(
    conn: Connection,
    change: Callable[[Connection], Awaitable[None]],
    what: str,
    attempts: int | None = None,
) -> None:
    """Run ``change``, which locks ``visits``, in a transaction that waits for that lock
    :data:`_LOCK_TIMEOUT` at most, again after a pause until it gets it (``attempts``
    tries, :data:`_LOCK_ATTEMPTS` by default; then :class:`TimeoutError`, nothing changed).

    The projector's writes (and, for the stronger locks, the view's reads) queue behind a
    lock waited for: behind a long transaction on ``visits`` (a report, a dump) a change
    that waited without a bound would stop them for as long. It also holds the lock idle
    (its client stalled) or in one statement only so long before the server ends it."""
    for attempt in range(_LOCK_ATTEMPTS if attempts is None else attempts):
        try:
            async with conn.transaction():
                await conn.execute(
                    f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}';"
                    f" SET LOCAL idle_in_transaction_session_timeout = '{_LOCKED_IDLE_TIMEOUT}';"
                    f" SET LOCAL statement_timeout = '{_LOCKED_STATEMENT_TIMEOUT}'"
                )
                await change(conn)
                return
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(0.1 * (attempt + 1))
    raise TimeoutError(f"could not lock the visits table to {what}; nothing was changed")


async def _build(conn: Connection, progress: Progress | None, batch_size: int) -> None:
    """Fold one snapshot of every stream into the aside table."""
    async with conn.transaction(isolation="repeatable_read"):
        total = int(await conn.fetchval("SELECT count(*) FROM events"))
        done = 0
        pending: list[VisitRow] = []
        row: VisitRow | None = None
        cursor = conn.cursor(f"{_EVENTS} ORDER BY stream_id, stream_version", prefetch=batch_size)
        async for record in cursor:
            envelope = envelope_from_row(record)
            if row is not None and row.appointment_id != envelope.stream_id:
                pending.append(row)
                row = None
            row = fold_envelope(row, envelope)
            done += 1
            if len(pending) >= batch_size:
                await _copy(conn, pending)
                pending.clear()
            if progress is not None and done % batch_size == 0 and done < total:
                progress(done, total)
        if row is not None:
            pending.append(row)
        await _copy(conn, pending)
        if progress is not None:
            progress(done, max(total, done))


async def _copy(conn: Connection, rows: list[VisitRow]) -> None:
    if rows:
        records = [msgspec.structs.astuple(row) for row in rows]
        await conn.copy_records_to_table(ASIDE, records=records, columns=list(COLUMNS))


async def _copy_indexes(conn: Connection) -> list[str]:
    """Give the aside table the live table's indexes; their names."""
    records = await conn.fetch(
        """SELECT i.relname AS name, pg_get_indexdef(i.oid) AS definition, x.indisprimary
           FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
           WHERE x.indrelid = 'visits'::regclass ORDER BY x.indisprimary DESC, i.relname"""
    )
    for record in records:
        name, match = record["name"], _INDEXDEF.match(record["definition"])
        if match is None:
            raise RuntimeError(f"unexpected index definition: {record['definition']}")
        start, _, on, schema, _, rest = match.groups()
        await conn.execute(f"{start}{name}{_SUFFIX}{on}{schema}{ASIDE}{rest}")
        if record["indisprimary"]:
            await conn.execute(
                f"ALTER TABLE {ASIDE} ADD CONSTRAINT {name}{_SUFFIX}"
                f" PRIMARY KEY USING INDEX {name}{_SUFFIX}"
            )
    return [record["name"] for record in records]


async def _copy_privileges(conn: Connection) -> None:
    """Give the aside table the live table's owner and grants (``LIKE`` copies neither),
    so that roles granted access to ``visits`` (a service role apart from the owner that
    migrates) keep it after the swap."""
    owner = await conn.fetchval(
        "SELECT quote_ident(pg_get_userbyid(relowner)) FROM pg_class WHERE oid = 'visits'::regclass"
    )
    if owner != await conn.fetchval("SELECT quote_ident(current_user)"):
        await conn.execute(f"ALTER TABLE {ASIDE} OWNER TO {owner}")
    grants = await conn.fetch(
        """SELECT a.privilege_type, a.is_grantable,
                  CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee))
                  END AS grantee
           FROM pg_class c, aclexplode(c.relacl) a
           WHERE c.oid = 'visits'::regclass AND a.grantee <> c.relowner"""
    )
    for grant in grants:
        option = " WITH GRANT OPTION" if grant["is_grantable"] else ""
        await conn.execute(
            f"GRANT {grant['privilege_type']} ON {ASIDE} TO {grant['grantee']}{option}"
        )


async def _catch_up(conn: Connection) -> int:
    """Fold again every appointment whose live row was written since the last pass (the
    notes taken, so a write after this pass is noted for the next); how many."""
    ids: list[UUID] = [
        record["appointment_id"]
        for record in await conn.fetch(f"DELETE FROM {CHANGED} RETURNING appointment_id")
    ]
    if not ids:
        return 0
    rows: dict[UUID, VisitRow | None] = {}
    for record in await conn.fetch(
        f"{_EVENTS} WHERE stream_id = ANY($1::uuid[]) ORDER BY stream_id, stream_version", ids
    ):
        envelope = envelope_from_row(record)
        rows[envelope.stream_id] = fold_envelope(rows.get(envelope.stream_id), envelope)
    folded = [row for row in rows.values() if row is not None]
    await conn.execute(upsert_statement(ASIDE), *upsert_args(folded))
    return len(ids)


async def _swap(conn: Connection, indexes: list[str]) -> None:
    """Replace ``visits`` by the aside table, after a last catch-up under the lock."""

    async def swap(conn: Connection) -> None:
        # Held, the lock stops every read of the view: if this process stalls (a paused
        # pod, Ctrl-Z, a partition), the server ends the session, and the swap.
        await conn.execute("LOCK TABLE visits IN ACCESS EXCLUSIVE MODE")
        await _catch_up(conn)  # what was written since the last pass, no more
        await conn.execute(
            f"DROP TABLE visits, {CHANGED}; DROP FUNCTION {_NOTE}();"
            f" ALTER TABLE {ASIDE} RENAME TO visits"
        )
        for name in indexes:
            await conn.execute(f"ALTER INDEX {name}{_SUFFIX} RENAME TO {name}")

    await _locking_briefly(conn, swap, "swap it in")
