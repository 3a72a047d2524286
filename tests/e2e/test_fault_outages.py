"""Dependency outages under a steady command load, against the running service (api, relay
and projector in one process, the notification service beside it).

* NATS stopped for a while: every command still succeeds (the outbox buffers the events),
  and once NATS is back every event arrives exactly once, the view equals a rebuild, and
  every notification is sent once.
* PostgreSQL stopped (or killed) for a while: commands answer ``503 unavailable`` with
  ``Retry-After`` at once, nothing is half-written, and the same processes recover by
  themselves when it is back: commands succeed again and the backlog drains.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest

from services.appointments.adapters.postgres.migrate import migrate
from services.auth import mint_token
from services.embedded import EmbeddedNats, EmbeddedPostgres
from tests.support.checks import drained_and_whole, wait_for
from tests.support.load import CommandLoad
from tests.support.service import JWT_SECRET, running_notifications, running_service, service_env

pytestmark = pytest.mark.fault

RATE = 30.0
BEFORE, OUTAGE, AFTER = 3.0, 6.0, 5.0
DRAIN_SECONDS = 60.0


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test alone, which it may stop and start."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="clinic-fault-pg-", dir=shm))
    folder.chmod(0o711)  # as root, the server runs as nobody, who must reach its data
    # Fast, but every commit durable against a kill -9 of the server, as in production:
    # with synchronous_commit off, commits still in the WAL buffers die with the server.
    server = EmbeddedPostgres(
        folder, fast=True, settings={"synchronous_commit": "on"}, die_with_parent=True
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _verify(database_url: str, nats_url: str, load: CommandLoad) -> dict[str, int]:
    """Drain (bounded), then prove nothing was lost, duplicated or half-written."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        outcome = await drained_and_whole(pool, js, load.acknowledged, DRAIN_SECONDS)
        return {"events": int(outcome["events"]), "notifications": int(outcome["notifications"])}
    finally:
        await nc.close()
        await pool.close()


async def test_commands_succeed_while_nats_is_down_and_every_event_arrives_after(
    database_url: str, nats_server: EmbeddedNats, record_property: pytest.RecordProperty
) -> None:
    env = service_env(database_url, [nats_server.url])
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with running_service(env) as client, running_notifications(env):
            load = CommandLoad(client, JWT_SECRET, rate=RATE)
            loading = asyncio.create_task(load.run(BEFORE + OUTAGE + AFTER))
            await asyncio.sleep(BEFORE)
            await nats_server.astop()
            before = load.count(ok=True)
            await asyncio.sleep(OUTAGE)
            during = load.count(ok=True) - before
            buffered = await pool.fetchval("SELECT count(*) FROM outbox")
            await asyncio.to_thread(nats_server.start)
            await loading
            figures = await _verify(database_url, nats_server.url, load)
    finally:
        await pool.close()

    assert not load.failures and load.count(ok=False) == 0, load.summary()
    assert during > 0 and buffered > 0, "the outage saw no command"
    figures |= {"commands": load.commands, "during_outage": during, "buffered": buffered}
    record_property("figures", json.dumps(figures))
    print("nats outage:", json.dumps(figures))


async def _schedule_once(client: httpx.AsyncClient) -> httpx.Response:
    me = uuid.uuid4()
    token = mint_token(JWT_SECRET, "patient", me, uuid.uuid4(), 600)
    body = {
        "patient_id": str(me),
        "provider_id": str(uuid.uuid4()),
        "starts_at": (datetime.now(UTC) + timedelta(days=3)).isoformat(),
        "duration_minutes": 30,
        "timezone": "Europe/Berlin",
    }
    return await client.post(
        "/v1/appointments", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


async def _succeeds(client: httpx.AsyncClient) -> bool:
    return (await _schedule_once(client)).status_code == 201


@pytest.mark.parametrize("outage", ["stopped", "killed"])
async def test_commands_answer_503_while_postgresql_is_down_and_the_service_recovers(
    outage: str,
    own_postgres: EmbeddedPostgres,
    nats_server: EmbeddedNats,
    record_property: pytest.RecordProperty,
) -> None:
    await migrate(own_postgres.dsn)
    env = service_env(own_postgres.dsn, [nats_server.url])
    async with running_service(env) as client, running_notifications(env):
        load = CommandLoad(client, JWT_SECRET, rate=RATE)
        loading = asyncio.create_task(load.run(BEFORE + OUTAGE + AFTER))
        await asyncio.sleep(BEFORE)
        if outage == "stopped":
            await own_postgres.astop()  # a fast shutdown: sessions are ended
        else:
            own_postgres.kill()  # a crash: kill -9, crash recovery at the next start
        answers: list[float] = []
        outage_ends = time.monotonic() + OUTAGE
        while time.monotonic() < outage_ends:
            started = time.monotonic()
            answer = await _schedule_once(client)
            answers.append(time.monotonic() - started)
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == "unavailable" and answer.headers["retry-after"]
            await asyncio.sleep(0.2)
        await asyncio.to_thread(own_postgres.start)
        recovery = await wait_for(lambda: _succeeds(client), 30, "a command succeeds again")
        failed_at_recovery = load.count(ok=False)
        await loading
        failed_after = load.count(ok=False) - failed_at_recovery
        figures = await _verify(own_postgres.dsn, nats_server.url, load)

    assert not load.failures, load.failures[:5]  # every failure is a 503 with Retry-After
    unavailable = answers + [
        s for (_, code), times in load.seconds.items() if code == 503 for s in times
    ]
    # Fast, not after the 10 s a statement may take: the connection attempt gives up in 2 s.
    assert max(unavailable) < 8.0, f"a 503 took {max(unavailable):.2f}s"
    assert failed_after == 0, f"{failed_after} commands failed after the service recovered"
    figures |= {
        "commands": load.commands,
        "answered_503": load.count(status=503),
        "503_seconds_median": round(statistics.median(unavailable), 3),
        "503_seconds_max": round(max(unavailable), 3),
        "recovered_seconds_after_return": round(recovery, 2),
    }
    record_property("figures", json.dumps(figures))
    print(f"postgresql {outage}:", json.dumps(figures))
