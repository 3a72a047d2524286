"""Event-store appends/s and latency at 1, 8 and 32 concurrent writers.

One event per command (an ``AppointmentScheduled`` of a new stream: the events row, its
outbox row and the provider's booked range), through ``PostgresEventStore.append`` as
the service runs it: concurrent appends go together, one statement per batch (group
commit, at most two batches in flight):

* ``store``: the append alone;
* ``store_doorbell``: what the service runs, the append then the relay's
  ``OutboxDoorbell`` ring (a coalesced ``NOTIFY`` after the commit), with a connection
  ``LISTEN``-ing as the relay does.

Baseline, in the same run on the same server: ``raw_insert``, single-row INSERT
transactions through asyncpg into a table of the same shape as ``events``, each writer on
a connection of its own (the floor). ``raw_insert_pool`` is the same INSERT through a
pool as the service builds it (``bootstrap.create_pool``, which the store modes use too),
to show what the pool costs.

    python -m bench.append [--writers 1,8,32] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from bench._common import (
    Sample,
    base_parser,
    closed_loop,
    event_json,
    fresh_database,
    int_list,
    machine,
    median_summary,
    paired_ratio,
    pg_version,
    run,
    scheduled,
    servers,
)
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.bootstrap import create_pool as service_pool
from services.appointments.relay import CHANNEL, OutboxDoorbell, RingingEventStore

Operation = Callable[[], Awaitable[Any]]

MODES = ("raw_insert", "raw_insert_pool", "store", "store_doorbell")

_RAW = """
INSERT INTO raw_events (event_id, stream_id, stream_version, clinic_id, type, schema_version,
                        data, occurred_at, correlation_id, causation_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""


def raw_insert(pool: asyncpg.Pool, connections: list[asyncpg.Connection] | None) -> Operation:
    """One single-row INSERT transaction of the same event the store appends, on a
    connection of the writer's own (``connections``) or through ``pool``."""
    idle = list(connections or [])

    async def op() -> None:
        new = scheduled()
        conn: Any = idle.pop() if connections else pool
        await conn.execute(
            _RAW,
            new.event_id,
            new.event_id,
            1,
            new.event.clinic_id,
            "AppointmentScheduled",
            2,
            event_json(new).decode(),
            new.occurred_at,
            None,
            None,
        )
        if connections:
            idle.append(conn)

    return op


def store_append(pool: asyncpg.Pool, doorbell: bool) -> Operation:
    """One ``append`` of a new stream's first event (ringing the relay if ``doorbell``)."""
    store: Any = PostgresEventStore(pool)
    if doorbell:
        store = RingingEventStore(store, OutboxDoorbell(pool))

    async def op() -> None:
        new = scheduled()
        await store.append(new.event_id, 0, [new])

    return op


async def measure(dsn: str, mode: str, writers: int, seconds: float) -> Sample:
    """One closed-loop run of ``mode`` with ``writers`` concurrent writers."""
    # The doorbell sends on the pool too: one connection more, as in the service.
    pool = await service_pool(dsn, writers + (1 if mode == "store_doorbell" else 0))
    listener = await asyncpg.connect(dsn)
    own = [await asyncpg.connect(dsn) for _ in range(writers)] if mode == "raw_insert" else []
    rings = 0

    def on_notify(*_: Any) -> None:
        nonlocal rings
        rings += 1

    await listener.add_listener(CHANNEL, on_notify)
    try:
        if mode.startswith("raw_insert"):
            op = raw_insert(pool, own if mode == "raw_insert" else None)
        else:
            op = store_append(pool, mode == "store_doorbell")
        await closed_loop(op, writers, min(0.5, seconds / 5))  # warm up
        sample = await closed_loop(op, writers, seconds)
        await asyncio.sleep(0.05)  # the last ring
        if mode == "store_doorbell":
            assert rings > 0, "the doorbell never rang"
        return sample
    finally:
        for conn in [listener, *own]:
            await conn.close()
        await pool.close()


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--writers", type=int_list, default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    async with servers(nats=False) as env, fresh_database(env.admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE raw_events (LIKE events INCLUDING ALL)")
        await conn.close()
        samples: dict[tuple[str, int], list[Sample]] = {}
        for _ in range(args.runs):
            for writers in args.writers:
                for mode in MODES:  # interleaved, so drift hits every mode alike
                    sample = await measure(dsn, mode, writers, args.seconds)
                    samples.setdefault((mode, writers), []).append(sample)
        figures: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}
        for (mode, writers), runs in samples.items():
            figures[mode][str(writers)] = median_summary(runs)
        ratios = {
            f"{mode}/raw_insert": {
                str(w): paired_ratio(samples[mode, w], samples["raw_insert", w])
                for w in args.writers
            }
            for mode in MODES[1:]
        }
        return {
            "benchmark": "append",
            "unit": "appends/s, one event per command; latencies in ms",
            "servers": env.origin,
            "postgresql": await pg_version(env.admin_dsn),
            "machine": machine(),
            "runs": args.runs,
            "seconds": args.seconds,
            "writers": args.writers,
            "baseline": "raw_insert",
            "figures": figures,
            "ratios": ratios,
        }


if __name__ == "__main__":
    run(main)
