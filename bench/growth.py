"""Does cost stay flat as the store grows? Append and Upcoming p99 at each store size.

The store is bulk-loaded (``generate_series``, in chunks) to each ``--sizes`` number of
appointments: one ``AppointmentScheduled`` in ``events``, one ``visits`` row and one
``provider_bookings`` range each (5,000 providers in 100 clinics, 100,000 patients, visits
spread over a year), then ``VACUUM ANALYZE``. At each size:

* ``append``: ``PostgresEventStore.append`` of new appointments (8 writers), which probes
  the events' unique indexes and the bookings' exclusion index, and the WAL it writes;
* ``upcoming``: ``PostgresVisits.page`` of a patient's Upcoming tab (21 rows asked, one
  reader), the query ``GET /v1/visits`` runs, for a patient with 10 visits.

Each size is a database of its own, loaded first; then every run measures each size in
turn (interleaved, so a machine busy with other work in one run skews all sizes of that
run alike). The baseline is the smallest size: ``ratios`` are the median over runs of p99
at the largest size over p99 at the smallest in the same run.

    python -m bench.growth [--sizes 10000,1000000] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench._common import (
    CLINIC,
    Sample,
    base_parser,
    closed_loop,
    create_pool,
    event_json,
    fresh_database,
    int_list,
    machine,
    median_summary,
    pg_version,
    ratio,
    run,
    scheduled,
    servers,
)
from bench.append import measure as measure_append
from services.appointments.adapters.postgres.visits import PostgresVisits
from services.appointments.service_layer.visits import Scope

CHUNK = 100_000
PROVIDERS = 5_000
PATIENTS = 100_000
PATIENT = uuid.UUID("00000000-0000-4000-8000-0000000000aa")

# Appointment i: provider k = i % PROVIDERS (in clinic k % 100) on day i / PROVIDERS, so a
# provider's bookings never overlap; patient i % PATIENTS.
_LOAD = """
WITH src AS (
    SELECT gen_random_uuid() AS id,
           ('00000000-0000-4000-8000-' || lpad(to_hex(i % 5000 % 100), 12, '0'))::uuid AS clinic,
           md5('patient' || (i % 100000))::uuid AS patient,
           md5('provider' || (i % 5000))::uuid AS provider,
           date_trunc('day', now()) - interval '180 days'
               + (i / 5000) * interval '1 day' + (i % 48) * interval '30 minutes' AS starts_at
    FROM generate_series($1::bigint, $2::bigint) AS i
), e AS (
    INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type, schema_version,
                        data, occurred_at)
    SELECT gen_random_uuid(), id, 1, clinic, 'AppointmentScheduled', 2, $3::jsonb, now()
    FROM src
), b AS (
    INSERT INTO provider_bookings (appointment_id, clinic_id, provider_id, during)
    SELECT id, clinic, provider, tstzrange(starts_at, starts_at + interval '30 minutes', '[)')
    FROM src
)
INSERT INTO visits (appointment_id, clinic_id, patient_id, provider_id, starts_at, ends_at,
                    duration_minutes, timezone, visit_reason, status, version)
SELECT id, clinic, patient, provider, starts_at, starts_at + interval '30 minutes', 30,
       'Europe/Berlin', 'Check-up', 'scheduled', 1
FROM src
"""


async def grow(conn: asyncpg.Connection, start: int, end: int) -> None:
    """Add appointments ``start`` .. ``end - 1``."""
    data = event_json(scheduled()).decode()
    for low in range(start, end, CHUNK):
        await conn.execute(_LOAD, low, min(low + CHUNK, end) - 1, data)
    await conn.execute("VACUUM ANALYZE events, visits, provider_bookings, outbox")
    # Flush the load's dirty pages now rather than during the measurement.
    await conn.execute("CHECKPOINT")


async def add_patient(conn: asyncpg.Connection) -> None:
    """The measured patient: 10 visits in the bench clinic, half of them upcoming."""
    now = datetime.now(UTC)
    for n in range(-5, 5):
        starts_at = now + timedelta(days=n, hours=1)
        await conn.execute(
            "INSERT INTO visits (appointment_id, clinic_id, patient_id, provider_id, starts_at,"
            " ends_at, duration_minutes, timezone, status, version)"
            " VALUES ($1, $2, $3, $4, $5, $6, 30, 'Europe/Berlin', 'scheduled', 1)",
            uuid.uuid4(),
            CLINIC,
            PATIENT,
            uuid.uuid4(),
            starts_at,
            starts_at + timedelta(minutes=30),
        )


async def measure_upcoming(dsn: str, seconds: float) -> Sample:
    """One reader paging the patient's Upcoming tab back to back."""
    pool = await create_pool(dsn, 1)
    visits = PostgresVisits(pool)
    scope = Scope(clinic_id=CLINIC, patient_id=PATIENT)

    async def op() -> None:
        rows = await visits.page(scope, "upcoming", datetime.now(UTC), None, 21)
        assert len(rows) == 5, len(rows)

    try:
        await closed_loop(op, 1, min(0.5, seconds / 5))
        return await closed_loop(op, 1, seconds)
    finally:
        await pool.close()


async def load(admin_dsn: str, size: int, stack: contextlib.AsyncExitStack) -> tuple[str, float]:
    """A database of ``size`` appointments (and the measured patient); its DSN, load time."""
    dsn = await stack.enter_async_context(fresh_database(admin_dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await add_patient(conn)
        started = time.perf_counter()
        await grow(conn, 0, size)
        return dsn, time.perf_counter() - started
    finally:
        await conn.close()


async def measure(dsn: str, writers: int, seconds: float) -> tuple[Sample, float, Sample]:
    """Appends (and their WAL bytes each), then Upcoming queries, on one database."""
    conn = await asyncpg.connect(dsn)
    try:
        before = await conn.fetchval("SELECT pg_current_wal_lsn()")
        appends = await measure_append(dsn, "store", writers, seconds)
        written = await conn.fetchval("SELECT pg_current_wal_lsn() - $1", before)
    finally:
        await conn.close()
    wal = int(written) / max(1, len(appends.latencies))
    return appends, wal, await measure_upcoming(dsn, seconds)


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--sizes", type=int_list, default=[10_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--writers", type=int, default=8, help="appending writers")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    figures: dict[str, Any] = {}
    p99: dict[str, dict[int, list[float]]] = {"append": {}, "upcoming": {}}
    async with servers(nats=False) as env, contextlib.AsyncExitStack() as stack:
        loaded = {size: await load(env.admin_dsn, size, stack) for size in sizes}
        samples: dict[int, tuple[list[Sample], list[float], list[Sample]]] = {
            size: ([], [], []) for size in sizes
        }
        for _ in range(args.runs):
            for size in sizes:
                appends, wal, reads = await measure(loaded[size][0], args.writers, args.seconds)
                samples[size][0].append(appends)
                samples[size][1].append(wal)
                samples[size][2].append(reads)
                p99["append"].setdefault(size, []).append(appends.summary()["p99_ms"])
                p99["upcoming"].setdefault(size, []).append(reads.summary()["p99_ms"])
        for size in sizes:
            dsn, load_s = loaded[size]
            conn = await asyncpg.connect(dsn)
            try:
                figures[str(size)] = {
                    "events": await conn.fetchval("SELECT count(*) FROM events"),
                    "visits": await conn.fetchval("SELECT count(*) FROM visits"),
                    "database_mb": round(
                        await conn.fetchval("SELECT pg_database_size(current_database())") / 2**20
                    ),
                    "load_s": round(load_s, 1),
                    "append": median_summary(samples[size][0]),
                    # Random (v4) UUID keys touch index pages all over: after a checkpoint,
                    # each first touch writes a full page image to the WAL.
                    "wal_bytes_per_append": round(statistics.median(samples[size][1])),
                    "upcoming": median_summary(samples[size][2]),
                }
            finally:
                await conn.close()
        postgresql = await pg_version(env.admin_dsn)
    return {
        "benchmark": "growth",
        "unit": "appends/s and Upcoming queries/s; latencies in ms",
        "servers": env.origin,
        "postgresql": postgresql,
        "machine": machine(),
        "runs": args.runs,
        "seconds": args.seconds,
        "writers": args.writers,
        "sizes": sizes,
        "baseline": f"size {sizes[0]}",
        "figures": figures,
        "ratios": {
            f"{key}_p99_largest/smallest": round(
                statistics.median(
                    ratio(big, little)
                    for big, little in zip(p99[key][sizes[-1]], p99[key][sizes[0]], strict=True)
                ),
                3,
            )
            for key in ("append", "upcoming")
        },
    }


if __name__ == "__main__":
    run(main)
