"""Crash safety: ``kill -9`` of the relays, the projector and the notification service at
random moments under a steady command load, each started again at once.

The workers are real processes (``clinic appointments --roles relay`` twice, as deployed:
one active, one standby; ``--roles projector``; the notification service), the api runs
in the test. At the end, after a bounded wait for the backlog to drain, the counts prove:
every committed event is on ``APPOINTMENTS`` exactly once per ``event_id``, the visits view
equals a rebuild from the event store, every acknowledged command is there, every
notification exists once and was pushed once, nothing was parked, and every worker still
stops cleanly (exit 0 on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import asyncpg
import nats
import pytest

from services.embedded import EmbeddedNats, free_port
from tests.support.checks import drained_and_whole
from tests.support.load import CommandLoad
from tests.support.processes import Worker, clinic_command
from tests.support.service import JWT_SECRET, running_service, service_env

pytestmark = pytest.mark.fault

LOAD_SECONDS = 30.0
RATE = 40.0  # commands per second, offered
#: A worker is killed this long (seconds, uniformly random) after it was started.
LIFETIME = (1.0, 4.0)
#: Past the longest wait the notification service's test tuning can leave an event in after
#: the load: each kill of it spends a delivery of the events it held, and the 4th step of
#: its redelivery backoff is 90 s (``tests/support/notifications_process.FAST_TUNING``), a
#: delivery retried that often waits 90 s too. One run in eight on a busy machine overran
#: 90 s this way. A passing run waits only as long as its drain takes (~5-10 s).
DRAIN_SECONDS = 200.0


def _workers(env: dict[str, str], log_dir: Path) -> list[Worker]:
    commands = {
        "relay-1": clinic_command("appointments", "--roles", "relay"),
        "relay-2": clinic_command("appointments", "--roles", "relay"),
        "projector": clinic_command("appointments", "--roles", "projector"),
        "notifications": [sys.executable, "-m", "tests.support.notifications_process"],
    }
    return [
        Worker(name, argv, {**env, "CLINIC_HTTP_PORT": str(free_port())}, log_dir)
        for name, argv in commands.items()
    ]


async def _kill_and_restart(worker: Worker, rng: random.Random, stop: asyncio.Event) -> None:
    """Until ``stop``: let the worker run a random while, ``kill -9`` it, start it again."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*LIFETIME))
            return
        except TimeoutError:
            pass
        assert worker.running, f"{worker.name} exited by itself\n{worker.log_tail()}"
        await worker.kill()
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        await worker.start()


async def test_workers_killed_at_random_moments_lose_and_duplicate_nothing(
    database_url: str,
    nats_server: EmbeddedNats,
    tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    env = service_env(database_url, [nats_server.url])
    workers = _workers(env, tmp_path)
    seed = random.randrange(2**32)  # printed with the figures and on failure
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        async with running_service(env, roles=["api"]) as client:
            for worker in workers:
                await worker.start()
            load = CommandLoad(client, JWT_SECRET, rate=RATE)
            stop_killing = asyncio.Event()
            killers = [
                asyncio.create_task(
                    _kill_and_restart(worker, random.Random(seed + i), stop_killing)
                )
                for i, worker in enumerate(workers)
            ]
            await load.run(LOAD_SECONDS)
            stop_killing.set()
            await asyncio.gather(*killers)
            outcome = await drained_and_whole(pool, js, load.acknowledged, DRAIN_SECONDS)
            assert not load.failures and load.count(ok=False) == 0, load.summary()
        exits = {worker.name: await worker.stop() for worker in workers}
        assert all(code == 0 for code in exits.values()), exits
    except BaseException:
        print(
            f"seed {seed}", *(worker.log_tail() for worker in workers), sep="\n\n", file=sys.stderr
        )
        raise
    finally:
        for worker in workers:
            await worker.stop(grace=5)
        await nc.close()
        await pool.close()

    figures = {
        "seed": seed,
        "load_seconds": LOAD_SECONDS,
        "commands": load.commands,
        "answers": load.summary(),
        "kills": {worker.name: worker.kills for worker in workers},
        "events": outcome["events"],
        "visits": len(load.acknowledged),
        "notifications": outcome["notifications"],
        "drain_seconds": outcome["drain_seconds"],
    }
    record_property("figures", json.dumps(figures))
    print("crash safety:", json.dumps(figures))
