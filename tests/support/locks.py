"""What PostgreSQL's lock table says of the test's own database."""

from __future__ import annotations

import asyncpg


async def lock_waited_for(pool: asyncpg.Pool, table: str) -> bool:
    """Some session of this database waits for a lock on ``table`` (``pg_locks`` shows
    every database's: tests running beside this one on other databases wait for theirs)."""
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE NOT l.granted AND c.relname = $1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            table,
        )
    )
