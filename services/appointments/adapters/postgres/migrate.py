"""Plain-SQL migrations, applied in order under an advisory lock (safe to run concurrently)."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

#: Any constant shared by every migrator; serialises concurrent ``clinic migrate`` runs,
#: and keeps them from a ``rebuild-visits`` (which holds it too).
MIGRATION_LOCK_ID = 0x636C696E6963  # "clinic"
#: How long a migration waits for a lock on a table before it steps back and tries again
#: (:data:`LOCK_ATTEMPTS` tries, ~1.5 min): the service's queries of that table would queue
#: behind a lock waited for, as long as the transaction holding the table (a report, a
#: dump) lasts. Migrations run while the previous release serves. Under the service's own
#: ``lock_timeout`` (2 s, bootstrap.LOCK_TIMEOUT): a query queued behind this wait gets
#: its lock before it gives up itself.
LOCK_TIMEOUT = "1s"
LOCK_ATTEMPTS = 45


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in the order they apply."""
    folder = resources.files("services.appointments.adapters.postgres.migrations")
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return files


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet applied to the database at ``dsn``; return their names."""
    conn = await asyncpg.connect(dsn)
    try:
        # A DSN without a database name means the user's (libpq): say which one it is.
        database = await conn.fetchval("SELECT current_database()")
        log.info("migrating database %s", database, extra={"database": database})
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID):
            log.info("waiting for another clinic migrate, or a rebuild-visits, to finish")
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            return await _apply_pending(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               name text PRIMARY KEY,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    done = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
    applied: list[str] = []
    for name, sql in migration_files():
        if name in done:
            continue
        await _apply(conn, name, sql)
        log.info("migration applied", extra={"migration": name})
        applied.append(name)
    return applied


async def _apply(conn: asyncpg.Connection, name: str, sql: str) -> None:
    """Apply one migration in a transaction that waits :data:`LOCK_TIMEOUT` at most for each
    lock, again (after a pause) while another transaction holds one, or raise
    :class:`TimeoutError` with nothing of it applied."""
    for attempt in range(LOCK_ATTEMPTS):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            return
        except asyncpg.LockNotAvailableError:
            log.warning(
                "migration %s waits for a table another transaction holds; trying again",
                name,
                extra={"migration": name, "attempt": attempt + 1},
            )
            if attempt + 1 < LOCK_ATTEMPTS:
                await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))
    raise TimeoutError(
        f"migration {name} could not lock its tables in {LOCK_ATTEMPTS} tries of"
        f" {LOCK_TIMEOUT} (a long transaction holds one); nothing of it was applied:"
        " run clinic migrate again"
    )
