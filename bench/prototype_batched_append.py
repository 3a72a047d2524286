"""Prototype, not product code: concurrent appends coalesced into one statement.

What bench/PROFILE.md §2 suggests for ``PostgresEventStore.append``: appends that arrive
while a statement is in flight wait and go together in the next one (one round trip and
one commit for the batch); a batch that fails on a unique or exclusion violation is
retried append by append, so each gets its own answer. Schedules only (what the
benchmarks append). Measured against the same baselines as bench/append.py and
bench/peer.py, in one run:

    python -m bench.prototype_batched_append [--writers 8,32] [--seconds 5] [--runs 2]
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from bench._common import (
    Sample,
    base_parser,
    closed_loop,
    fresh_database,
    int_list,
    median_summary,
    paired_ratio,
    run,
    scheduled,
    servers,
)
from bench.append import measure
from services.appointments.adapters.postgres.event_store import PostgresEventStore, _append_args
from services.appointments.bootstrap import create_pool as service_pool

_BATCH = """
WITH new_events AS (
    INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type, schema_version,
                        data, occurred_at, correlation_id, causation_id)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::uuid[], $5::text[], $6::int[],
                         $7::jsonb[], $8::timestamptz[], $9::uuid[], $10::uuid[])
    RETURNING global_position, stream_id, stream_version
), queued AS (
    INSERT INTO outbox (global_position) SELECT global_position FROM new_events
), booked AS (
    INSERT INTO provider_bookings (appointment_id, clinic_id, provider_id, during)
    SELECT a, c, p, tstzrange(s, e, '[)')
    FROM unnest($11::uuid[], $12::uuid[], $13::uuid[], $14::timestamptz[], $15::timestamptz[])
         AS b(a, c, p, s, e)
)
SELECT stream_id, max(stream_version) AS stream_version, max(global_position) AS global_position
FROM new_events GROUP BY stream_id
"""


class BatchingStore:
    """Appends wait for the statement in flight, then go together in the next one."""

    def __init__(self, pool: asyncpg.Pool, in_flight: int = 2, max_batch: int = 256) -> None:
        self._pool = pool
        self._single = PostgresEventStore(pool)
        self._pending: list[tuple[Any, int, list[Any], asyncio.Future[Any]]] = []
        self._flushing = 0
        self._in_flight = in_flight
        self._max_batch = max_batch

    async def append(self, stream_id: Any, expected_version: int, events: list[Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((stream_id, expected_version, events, future))
        if self._flushing < self._in_flight:
            self._flushing += 1
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                columns: list[list[Any]] = [[] for _ in range(15)]
                for stream_id, version, events, _ in batch:
                    args = _append_args(stream_id, version, events, None)
                    for i in range(10):
                        columns[i].extend(args[i])
                    if args[13] is not None:  # a booking
                        for i in range(10, 15):
                            columns[i].append(args[i])
                try:
                    rows = await self._pool.fetch(_BATCH, *columns)
                except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
                    for stream_id, version, events, future in batch:
                        try:
                            future.set_result(await self._single.append(stream_id, version, events))
                        except Exception as exc:  # each append's own error
                            future.set_exception(exc)
                    continue
                by_stream = {row["stream_id"]: row for row in rows}
                for stream_id, _, _, future in batch:
                    future.set_result(by_stream[stream_id])
        finally:
            self._flushing -= 1


async def measure_batched(dsn: str, writers: int, seconds: float) -> Sample:
    pool = await service_pool(dsn, 4)
    store = BatchingStore(pool)

    async def op() -> None:
        new = scheduled()
        await store.append(new.event_id, 0, [new])

    try:
        await closed_loop(op, writers, min(0.5, seconds / 5))
        return await closed_loop(op, writers, seconds)
    finally:
        await pool.close()


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__, runs=2)
    parser.add_argument("--writers", type=int_list, default=[8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    samples: dict[tuple[str, int], list[Sample]] = {}
    async with servers(nats=False) as env, fresh_database(env.admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE raw_events (LIKE events INCLUDING ALL)")
        await conn.close()
        for _ in range(args.runs):
            for writers in args.writers:
                for mode in ("raw_insert", "store", "batched"):
                    if mode == "batched":
                        sample = await measure_batched(dsn, writers, args.seconds)
                    else:
                        sample = await measure(dsn, mode, writers, args.seconds)
                    samples.setdefault((mode, writers), []).append(sample)
    return {
        "benchmark": "prototype_batched_append",
        "baseline": "raw_insert",
        "figures": {f"{m} {w}": median_summary(runs) for (m, w), runs in samples.items()},
        "ratios": {
            f"{mode}/raw_insert {w}": paired_ratio(samples[mode, w], samples["raw_insert", w])
            for mode in ("store", "batched")
            for w in args.writers
        },
    }


if __name__ == "__main__":
    run(main)
