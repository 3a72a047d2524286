"""The outbox as the relay sees it: leadership, batches, deletion and the wake-up channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: The advisory lock the active relay holds ("relay").
RELAY_LOCK_ID: Final = 0x72656C6179
#: The channel the outbox doorbell notifies and the relay listens on.
CHANNEL: Final = "clinic_outbox"

_COLUMNS = """
e.global_position, e.event_id, e.stream_id, e.stream_version, e.clinic_id, e.type,
e.schema_version, e.data, e.occurred_at, e.correlation_id, e.causation_id, e.traceparent
"""
# The outbox's positions are taken first, then their events by the primary key: never a
# join the planner may turn into a walk of ``events`` from its first row. (Between
# autovacuum runs the outbox's dead rows make it look thousands of rows big; joined, the
# plan became a merge join reading every event before the first unpublished one, ~5 ms
# per fetch at 12,000 events and growing with the store.) Every outbox row has its event:
# both are inserted by one statement, and events are never deleted.
_BATCH = f"""
SELECT {_COLUMNS}
FROM events e
WHERE e.global_position = ANY (ARRAY(
    SELECT global_position FROM outbox ORDER BY global_position LIMIT $1
))
ORDER BY e.global_position
"""
# The next batch while earlier ones are in flight: rows after the last one fetched, but
# only if the outbox holds nothing at or below it except the rows in flight. A row that
# committed late below the cursor makes it return nothing, so the relay settles what it
# has in flight and starts again from the oldest row: it never publishes an event ahead of
# an older one it could already see.
_NEXT_BATCH = f"""
SELECT {_COLUMNS}
FROM events e
WHERE e.global_position = ANY (ARRAY(
    SELECT global_position FROM outbox WHERE global_position > $1
    ORDER BY global_position LIMIT $3
))
  AND (SELECT count(*) FROM outbox WHERE global_position <= $1) = $2
ORDER BY e.global_position
"""
_OLDEST_AGE = """
SELECT extract(epoch FROM now() - e.occurred_at)::float8
FROM events e
WHERE e.global_position = (SELECT min(global_position) FROM outbox)
"""

_BACKLOG = f"""
SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) AS waiting)::int, ({_OLDEST_AGE})
"""

_DELETE = "DELETE FROM outbox WHERE global_position = ANY($1::bigint[])"

Connection = asyncpg.Connection | PoolConnectionProxy


async def try_lead(conn: Connection) -> bool:
    """Take the relay lock on this session if no other relay holds it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_ID))


async def step_down(conn: Connection) -> None:
    """Release the relay lock held by this session."""
    await conn.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_ID)


async def oldest_unpublished(conn: Connection, limit: int) -> list[asyncpg.Record]:
    """Up to ``limit`` committed, unpublished events (``events`` rows), oldest first."""
    return list(await conn.fetch(_BATCH, limit))


async def unpublished_after(
    conn: Connection, after: int, in_flight: int, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` unpublished events after position ``after``, oldest first, provided
    the outbox holds exactly ``in_flight`` rows at or below it (those being published);
    otherwise none, and the caller starts again with :func:`oldest_unpublished`."""
    return list(await conn.fetch(_NEXT_BATCH, after, in_flight, limit))


async def oldest_age(conn: asyncpg.Pool | Connection) -> float:
    """Seconds since the oldest unpublished event occurred (0 with none waiting)."""
    age: float | None = await conn.fetchval(_OLDEST_AGE)
    return max(age or 0.0, 0.0)


async def backlog(conn: asyncpg.Pool | Connection, limit: int) -> tuple[int, float]:
    """How many events wait (counted up to ``limit``) and :func:`oldest_age`."""
    row = await conn.fetchrow(_BACKLOG, limit)
    assert row is not None
    return row[0], max(row[1] or 0.0, 0.0)


async def mark_published(conn: Connection, positions: Sequence[int]) -> None:
    """Remove the outbox rows of events JetStream acknowledged."""
    await conn.execute(_DELETE, list(positions))


async def ring(conn: asyncpg.Pool | Connection) -> None:
    """Wake a listening relay (outside any append transaction).

    A ``NOTIFY`` makes its transaction write a commit record; committed without waiting
    for the WAL flush, it costs the appends' commits no flush of its own (a ring lost in a
    crash only leaves the relay to its poll). The setting is the transaction's alone."""
    await conn.execute(
        "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')", CHANNEL
    )
