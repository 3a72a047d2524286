"""What every benchmark shares: servers, a fresh database, workloads, statistics, output.

Servers: ``CLINIC_DATABASE_URL`` (a maintenance DSN: each script creates its own database
there and drops it) and ``CLINIC_NATS_URL`` when set; otherwise embedded PostgreSQL and
``nats-server`` on free ports (``CLINIC_NATS_SERVER_BIN`` picks the NATS binary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec

from contracts.common import Actor
from contracts.events import AppointmentScheduled
from services.appointments.adapters.postgres.migrate import migrate
from services.appointments.service_layer.ports import NewEvent
from services.embedded import EmbeddedNats, EmbeddedPostgres


@dataclass(frozen=True)
class Servers:
    """Where the benchmark's PostgreSQL (maintenance database) and NATS are."""

    admin_dsn: str
    nats_url: str | None
    origin: str


@contextlib.asynccontextmanager
async def servers(nats: bool = True) -> AsyncIterator[Servers]:
    """The configured servers, or embedded ones started (and stopped) here."""
    dsn = os.environ.get("CLINIC_DATABASE_URL")
    nats_url = os.environ.get("CLINIC_NATS_URL") if nats else None
    with tempfile.TemporaryDirectory(prefix="clinic-bench-") as tmp:
        started: list[EmbeddedPostgres | EmbeddedNats] = []
        try:
            if not dsn:
                pg = await EmbeddedPostgres(f"{tmp}/pg", die_with_parent=True).astart()
                started.append(pg)
                dsn = pg.dsn
            if nats and not nats_url:
                server = await EmbeddedNats(f"{tmp}/nats", die_with_parent=True).astart()
                started.append(server)
                nats_url = server.url
            origin = ", ".join(
                f"{name} {'configured' if os.environ.get(var) else 'embedded'}"
                for name, var, used in (
                    ("postgresql", "CLINIC_DATABASE_URL", True),
                    ("nats", "CLINIC_NATS_URL", nats),
                )
                if used
            )
            yield Servers(admin_dsn=dsn, nats_url=nats_url, origin=origin)
        finally:
            for server in reversed(started):
                await server.astop()


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database of the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str, migrated: bool = True) -> AsyncIterator[str]:
    """A database of this run alone (migrated), dropped afterwards; yields its DSN."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(admin_dsn, name)
        if migrated:
            await migrate(dsn)
        yield dsn
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    """A pool of exactly ``size`` connections, all opened before measuring."""
    pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
    assert pool is not None
    return pool


# ----------------------------------------------------------------------------- workload

CLINIC = uuid.UUID("00000000-0000-4000-8000-00000000c11c")
ACTOR = Actor(id=uuid.UUID("00000000-0000-4000-8000-0000000057af"), role="staff")


def scheduled(now: datetime | None = None) -> NewEvent:
    """One new ``AppointmentScheduled`` (a fresh stream, provider and slot each time)."""
    now = now or datetime.now(UTC)
    event = AppointmentScheduled(
        clinic_id=CLINIC,
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        starts_at=now + timedelta(days=1),
        duration_minutes=30,
        timezone="Europe/Berlin",
        visit_reason="Follow-up on blood pressure",
        scheduled_by=ACTOR,
    )
    return NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=now)


def event_json(event: NewEvent) -> bytes:
    """The stored ``data`` of an event, as the event store writes it."""
    return msgspec.json.encode(event.event)


# --------------------------------------------------------------------------- statistics


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded for the JSON answer."""
    return round(seconds * 1000, 3)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Sample:
    """One measured run: operations per second and latencies (seconds)."""

    rate: float
    latencies: list[float]

    def summary(self) -> dict[str, float]:
        """Rate and p50/p99 in milliseconds."""
        return {
            "per_s": round(self.rate, 1),
            "p50_ms": ms(percentile(self.latencies, 50)),
            "p99_ms": ms(percentile(self.latencies, 99)),
        }


def median_summary(samples: Sequence[Sample]) -> dict[str, Any]:
    """The median of each figure over repeated runs (and the spread of the rate)."""
    runs = [s.summary() for s in samples]
    merged: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]
    }
    merged["per_s_runs"] = [r["per_s"] for r in runs]
    return merged


def ratio(ours: float, baseline: float) -> float:
    """``ours / baseline``, rounded; 0 when the baseline is 0."""
    return round(ours / baseline, 3) if baseline else 0.0


def paired_ratio(ours: Sequence[Sample], baseline: Sequence[Sample]) -> float:
    """The median over runs of each run's ``ours / baseline`` rate: each pair was measured
    back to back, so a machine busy with other work in one run skews that run only."""
    pairs = zip(ours, baseline, strict=True)
    return round(statistics.median(ratio(o.rate, b.rate) for o, b in pairs), 3)


async def closed_loop(
    op: Callable[[], Awaitable[Any]], concurrency: int, seconds: float, max_ops: int = 0
) -> Sample:
    """Run ``op`` back to back in ``concurrency`` tasks for ``seconds`` (or ``max_ops``)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline and not (max_ops and len(latencies) >= max_ops):
            started = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Sample(rate=len(latencies) / (time.perf_counter() - began), latencies=latencies)


# ------------------------------------------------------------------------------ running


def base_parser(doc: str | None, runs: int = 3) -> argparse.ArgumentParser:
    """The flags every script takes."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=runs, help="repetitions (medians)")
    return parser


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``."""
    return [int(part) for part in text.split(",") if part]


def run(main: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Run ``main`` on uvloop when installed (uvicorn's default loop too); print its JSON."""
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main())
    else:
        result = uvloop.run(main())
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


async def analyze(dsn: str) -> None:
    """``ANALYZE`` the service's database after a warm-up, as autovacuum does within about a
    minute of a new database's first writes (and again at every 10 % of growth).

    A script measures a database minutes old at most. Without this, the statements the
    service prepared in its first seconds keep the generic plans made while ``events`` was
    empty and never analyzed (the append's gap check then scans every stored event, once
    per batch holding a cancel) until autovacuum's first pass replans them: the start of a
    new deployment, not the steady state the scripts measure (bench/PROFILE.md §14)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def pg_version(dsn: str) -> str:
    """``SHOW server_version`` plus the commit settings that decide append rates."""
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()
    return f"{version} (synchronous_commit={sync}, fsync={fsync})"


def machine() -> dict[str, Any]:
    """This machine: processors, memory, Python."""
    memory_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as fh:
        memory_kb = int(fh.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
