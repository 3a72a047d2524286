"""Forgetting stored answers of idempotent requests once their keys are old enough.

A retry that presents an ``Idempotency-Key`` gets the first answer for as long as the key is
kept (``CLINIC_IDEMPOTENCY_KEY_TTL_HOURS``, 24 by default, as payment APIs do); after that
the same key is a new request. Keys go in batches of :data:`BATCH`, oldest first, with
``SKIP LOCKED`` so that several relays pruning at once neither wait for nor repeat each
other's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import asyncpg

from services.appointments.adapters.postgres.errors import database_errors
from services.errors import Unavailable
from services.pg_errors import schema_behind

log = logging.getLogger(__name__)

#: Keys deleted per statement at most (each statement is its own short transaction).
BATCH = 5000
#: How often the relay role prunes.
EVERY = timedelta(minutes=10)

_PRUNE = """
WITH doomed AS (
    SELECT principal_id, key FROM idempotency_keys
    WHERE created_at < now() - $1::interval
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM idempotency_keys k USING doomed d
WHERE k.principal_id = d.principal_id AND k.key = d.key
"""


async def prune_idempotency_keys(
    pool: asyncpg.Pool, older_than: timedelta, batch: int = BATCH
) -> int:
    """Delete the stored answers of keys older than ``older_than``; how many went."""
    pruned = 0
    while True:
        with database_errors():
            status = await pool.execute(_PRUNE, older_than, batch)
        deleted = int(status.rsplit(" ", 1)[-1])
        pruned += deleted
        if deleted < batch:
            return pruned


async def run_pruner(
    pool: asyncpg.Pool, stop: asyncio.Event, older_than: timedelta, every: timedelta = EVERY
) -> None:
    """Prune every ``every`` until ``stop`` is set; an unreachable database is retried later."""
    while not stop.is_set():
        try:
            pruned = await prune_idempotency_keys(pool, older_than)
        except (Unavailable, asyncpg.PostgresError) as exc:  # down, or not migrated yet
            hint = " (the database is not migrated yet: run clinic migrate)"
            log.warning(
                "pruning idempotency keys failed; retrying later: %s%s",
                exc,
                hint if schema_behind(exc) else "",
            )
        except Exception:  # housekeeping must never take the relay role down
            log.exception("pruning idempotency keys failed; retrying later")
        else:
            if pruned:
                log.info("pruned idempotency keys", extra={"count": pruned})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every.total_seconds())
