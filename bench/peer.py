"""Ours vs the ``eventsourcing`` library's PostgreSQL recorder, same workload and server.

The workload of ``bench/append.py``: one event per command (the first event of a new
stream, the same JSON document) at 1, 8 and 32 concurrent writers.

* ours: ``PostgresEventStore.append`` (group commit: concurrent appends share one
  statement) rung through the relay's ``OutboxDoorbell``, as the service runs it
  (``store_doorbell``), and without the doorbell (``store``);
* theirs: ``PostgresApplicationRecorder.insert_events`` (psycopg 3, one thread per writer,
  a pool of one connection per writer) in its fastest configuration,
  ``POSTGRES_ENABLE_DB_FUNCTIONS=y`` (one call of its insert function, which notifies
  inside the transaction), and in its default one (``LOCK TABLE ... IN EXCLUSIVE MODE``
  then the insert, then ``NOTIFY``, per transaction). Each in a database of its own.

Needs ``pip install 'eventsourcing[postgres]'`` (the ``bench`` extra), never the service.

    python -m bench.peer [--writers 1,8,32] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from bench._common import (
    Sample,
    base_parser,
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
from bench.append import measure as measure_ours

THEIRS = {"eventsourcing_db_functions": "y", "eventsourcing_default": "n"}
TOPIC = "clinic.events:AppointmentScheduled"


def recorder(dsn: str, writers: int, db_functions: str) -> Any:
    """Their application recorder on the database of ``dsn`` (tables created)."""
    from eventsourcing.postgres import PostgresFactory

    url = urlsplit(dsn)
    factory = PostgresFactory(
        {
            "POSTGRES_DBNAME": url.path.lstrip("/"),
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_PASSWORD": url.password or "",
            "POSTGRES_POOL_SIZE": str(writers),
            "POSTGRES_MAX_OVERFLOW": "0",
            "POSTGRES_ENABLE_DB_FUNCTIONS": db_functions,
        }
    )
    return factory, factory.application_recorder()


def measure_theirs(dsn: str, db_functions: str, writers: int, seconds: float) -> Sample:
    """One closed-loop run of their recorder with ``writers`` threads."""
    from eventsourcing.persistence import StoredEvent

    factory, store = recorder(dsn, writers, db_functions)
    state = event_json(scheduled())
    latencies: list[float] = []

    def writer(until: float, keep: bool) -> None:
        while time.perf_counter() < until:
            event = StoredEvent(
                originator_id=uuid.uuid4(), originator_version=1, topic=TOPIC, state=state
            )
            started = time.perf_counter()
            store.insert_events([event])
            if keep:
                latencies.append(time.perf_counter() - started)  # list.append is atomic

    try:
        for keep, span in ((False, min(0.5, seconds / 5)), (True, seconds)):
            until = time.perf_counter() + span
            threads = [threading.Thread(target=writer, args=(until, keep)) for _ in range(writers)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return Sample(rate=len(latencies) / (time.perf_counter() - began), latencies=latencies)
    finally:
        factory.close()


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--writers", type=int_list, default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    modes = ("store_doorbell", "store", *THEIRS)
    samples: dict[tuple[str, int], list[Sample]] = {}
    async with servers(nats=False) as env, fresh_database(env.admin_dsn) as ours:
        async with (
            fresh_database(env.admin_dsn, migrated=False) as fast,
            fresh_database(env.admin_dsn, migrated=False) as default,
        ):
            dsns = {"eventsourcing_db_functions": fast, "eventsourcing_default": default}
            for _ in range(args.runs):
                for writers in args.writers:
                    for mode in modes:
                        if mode in THEIRS:
                            sample = await asyncio.to_thread(
                                measure_theirs, dsns[mode], THEIRS[mode], writers, args.seconds
                            )
                        else:
                            sample = await measure_ours(ours, mode, writers, args.seconds)
                        samples.setdefault((mode, writers), []).append(sample)
        postgresql = await pg_version(env.admin_dsn)
    figures: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
    for (mode, writers), runs in samples.items():
        figures[mode][str(writers)] = median_summary(runs)

    def ratios(ours: str, theirs: str) -> dict[str, float]:
        return {str(w): paired_ratio(samples[ours, w], samples[theirs, w]) for w in args.writers}

    return {
        "benchmark": "peer",
        "unit": "appends/s, one event per command; latencies in ms",
        "servers": env.origin,
        "postgresql": postgresql,
        "machine": machine(),
        "eventsourcing": importlib.metadata.version("eventsourcing"),
        "runs": args.runs,
        "seconds": args.seconds,
        "writers": args.writers,
        "baseline": "eventsourcing_db_functions",
        "figures": figures,
        "ratios": {
            "store_doorbell/eventsourcing_db_functions": ratios(
                "store_doorbell", "eventsourcing_db_functions"
            ),
            "store_doorbell/eventsourcing_default": ratios(
                "store_doorbell", "eventsourcing_default"
            ),
        },
    }


if __name__ == "__main__":
    run(main)
