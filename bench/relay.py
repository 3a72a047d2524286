"""Outbox -> JetStream: events/s and the time to drain a backlog.

A backlog of ``--events`` committed events (``AppointmentScheduled``, in ``events`` and
``outbox``) is drained by the service's ``OutboxRelay`` into the ``APPOINTMENTS`` stream,
timed from the relay's start until it has published and deleted every row.

``--variants`` also drains the backlog with other batch sizes and numbers of batches in
flight (``500x1``: batches of 500, one at a time, as the relay did before), each timed in
the same run: ``relay`` is the service's default configuration.

Baseline, in the same run on the same servers: ``raw_publish_async``, the same envelopes
(same subjects, sizes and ``Nats-Msg-Id`` headers) published pipelined to the same stream
with ``JetStreamContext.publish_async`` and every ack awaited; no database.

    python -m bench.relay [--events 20000] [--runs 3] [--variants 500x1,2000x1,4000x1]
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from typing import Any

import asyncpg
import msgspec
import nats
from nats.js.errors import NotFoundError

from bench._common import (
    CLINIC,
    base_parser,
    create_pool,
    event_json,
    fresh_database,
    machine,
    pg_version,
    run,
    scheduled,
    servers,
)
from contracts.subjects import EVENTS_STREAM
from services.appointments.adapters.nats.streams import ensure_events_stream
from services.appointments.adapters.postgres.event_store import envelope_from_row
from services.appointments.relay import OutboxRelay, subject_of

# The backlog, written the way appends write it (one events row and one outbox row each).
_LOAD = """
WITH new_events AS (
    INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type, schema_version,
                        data, occurred_at)
    SELECT gen_random_uuid(), gen_random_uuid(), 1, $1, 'AppointmentScheduled', 2, $2::jsonb,
           now()
    FROM generate_series(1, $3)
    RETURNING global_position
)
INSERT INTO outbox (global_position) SELECT global_position FROM new_events
"""


async def load_backlog(conn: asyncpg.Connection, events: int) -> None:
    """Empty the store, then commit ``events`` events waiting in the outbox."""
    await conn.execute("TRUNCATE events, outbox")
    await conn.execute(_LOAD, CLINIC, event_json(scheduled()).decode(), events)
    await conn.execute("VACUUM ANALYZE events, outbox")


async def fresh_stream(js: Any) -> None:
    """The ``APPOINTMENTS`` stream, created empty."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(EVENTS_STREAM)
    await ensure_events_stream(js)


async def drain_with_relay(
    pool: asyncpg.Pool, nc: Any, events: int, variant: tuple[int, int] | None = None
) -> float:
    """Seconds the service's relay takes to publish and delete ``events`` outbox rows
    (``variant``: another batch size and number of batches in flight)."""
    if variant is None:
        relay = OutboxRelay(pool, nc)
    else:
        relay = OutboxRelay(pool, nc, batch_size=variant[0], in_flight=variant[1])
    stop = asyncio.Event()
    started = time.perf_counter()
    running = asyncio.create_task(relay.run(stop))
    while relay.published < events:
        if running.done():
            running.result()
            raise RuntimeError("relay stopped early")
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    stop.set()
    await running
    return elapsed


async def raw_publish(conn: asyncpg.Connection, js: Any, events: int) -> float:
    """Seconds to publish the same envelopes pipelined and get every ack."""
    rows = await conn.fetch(
        "SELECT global_position, event_id, stream_id, stream_version, clinic_id, type,"
        " schema_version, data, occurred_at, correlation_id, causation_id FROM events"
        " ORDER BY global_position LIMIT $1",
        events,
    )
    messages = [(subject_of(r), msgspec.json.encode(envelope_from_row(r))) for r in rows]
    started = time.perf_counter()
    futures = [
        await js.publish_async(
            subject, payload, headers={"Nats-Msg-Id": str(uuid.uuid4())}, stream=EVENTS_STREAM
        )
        for subject, payload in messages
    ]
    acks = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    assert len(acks) == events
    return elapsed


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--events", type=int, default=20000, help="backlog size")
    parser.add_argument(
        "--variants", default="", help="also BATCHxIN_FLIGHT,... (e.g. 500x1,4000x1)"
    )
    args = parser.parse_args()
    variants = {
        f"relay_{v}": (int(v.split("x")[0]), int(v.split("x")[1]))
        for v in args.variants.split(",")
        if v
    }
    async with servers() as env, fresh_database(env.admin_dsn) as dsn:
        assert env.nats_url is not None
        nc = await nats.connect(env.nats_url)
        js = nc.jetstream()
        pool = await create_pool(dsn, 2)
        conn = await asyncpg.connect(dsn)
        seconds: dict[str, list[float]] = {"relay": [], **{name: [] for name in variants}}
        raw_s: list[float] = []
        try:
            for _ in range(args.runs):
                await load_backlog(conn, args.events)
                await fresh_stream(js)
                raw_s.append(await raw_publish(conn, js, args.events))
                for name in seconds:
                    await load_backlog(conn, args.events)
                    await fresh_stream(js)
                    drained = await drain_with_relay(pool, nc, args.events, variants.get(name))
                    seconds[name].append(drained)
                    left = await conn.fetchval("SELECT count(*) FROM outbox")
                    stored = (await js.stream_info(EVENTS_STREAM)).state.messages
                    assert left == 0 and stored == args.events, (left, stored)
            version = nc.connected_server_version
            nats_version = f"{version.major}.{version.minor}.{version.patch}"
        finally:
            await conn.close()
            await pool.close()
            await nc.close()
    raw_rate = [args.events / s for s in raw_s]
    raw_median = sorted(raw_rate)[len(raw_rate) // 2]
    rates = {name: [args.events / s for s in runs] for name, runs in seconds.items()}
    figures: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for name, rate in rates.items():
        median = sorted(rate)[len(rate) // 2]
        figures[name] = {
            "per_s": round(median, 1),
            "drain_s": round(args.events / median, 3),
            "per_s_runs": [round(r, 1) for r in rate],
        }
        # Each run's pair was measured back to back: the median of the pairs' ratios.
        ratios[f"{name}/raw_publish_async"] = round(
            statistics.median(r / b for r, b in zip(rate, raw_rate, strict=True)), 3
        )
    return {
        "benchmark": "relay",
        "unit": "events/s from a backlog; drain time in s",
        "servers": env.origin,
        "postgresql": await pg_version(env.admin_dsn),
        "nats": nats_version,
        "machine": machine(),
        "runs": args.runs,
        "events": args.events,
        "baseline": "raw_publish_async",
        "figures": {
            **figures,
            "raw_publish_async": {
                "per_s": round(raw_median, 1),
                "drain_s": round(args.events / raw_median, 3),
                "per_s_runs": [round(r, 1) for r in raw_rate],
            },
        },
        "ratios": ratios,
    }


if __name__ == "__main__":
    run(main)
