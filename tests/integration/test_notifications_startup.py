"""The notification service starting while JetStream cannot make its streams yet: a
clustered JetStream whose other nodes are still starting (no quorum, no leader)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import nats
import pytest

from contracts.subjects import EVENTS_STREAM, NOTIFICATIONS_STREAM
from services.appointments.bootstrap import StoppedWhileConnecting
from services.config import ConfigError, Settings, load_settings
from services.embedded import EmbeddedNats, free_port
from services.notifications.bootstrap import notification_service
from services.notifications.runtime import Hooks, Tuning


@pytest.fixture
def cluster() -> Iterator[list[EmbeddedNats]]:
    """Three clustered ``nats-server``s with JetStream, not started."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="clinic-notifications-start-", dir=shm))
    routes = [f"nats://127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [
        EmbeddedNats(
            root / f"n{i}",
            server_name=f"n{i}",
            cluster_name="clinic-start",
            cluster_port=int(route.rsplit(":", 1)[1]),
            routes=[other for other in routes if other != route],
            die_with_parent=True,
        )
        for i, route in enumerate(routes)
    ]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def _settings(database_url: str, nats_url: str) -> Settings:
    return load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_NATS_STREAM_REPLICAS": "3",
        }
    )


@pytest.mark.parametrize("up_first", [1, 2])
async def test_streams_refused_while_the_cluster_starts_are_made_once_it_has(
    cluster: list[EmbeddedNats],
    database_url: str,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
    up_first: int,
) -> None:
    # One node alone has no quorum (no leader); two have one but no third peer to place
    # an R3 stream on: JetStream cannot make the streams yet either way.
    started, others = cluster[:up_first], cluster[up_first:]
    for node in started:
        await node.astart()
    first = started[0]
    nc = await nats.connect(first.url, max_reconnect_attempts=-1)
    try:
        settings = _settings(database_url, first.url)
        with caplog.at_level(logging.WARNING, logger="services.notifications.bootstrap"):
            starting = asyncio.create_task(
                notification_service(
                    settings,
                    lambda: datetime.now(UTC),
                    Tuning(),
                    Hooks(),
                    pool,
                    nc,
                    None,
                )
            )
            deadline = asyncio.get_running_loop().time() + 30
            # Two of three answer "no suitable peers for placement" once they have a leader.
            refusal = "no suitable peers" if up_first == 2 else "cannot make the streams yet"
            while refusal not in caplog.text:
                assert not starting.done(), starting.exception()
                assert asyncio.get_running_loop().time() < deadline, "never refused"
                await asyncio.sleep(0.05)
            for node in others:  # the rest of the cluster comes up: a leader is elected
                await node.astart()
            service = await asyncio.wait_for(starting, 60)
        js = nc.jetstream()
        for stream in (EVENTS_STREAM, NOTIFICATIONS_STREAM):
            assert (await js.stream_info(stream)).config.num_replicas == 3
        assert service.workers
    finally:
        await nc.close()


async def test_a_stop_while_waiting_for_jetstream_ends_the_start_quietly(
    cluster: list[EmbeddedNats], database_url: str, pool: asyncpg.Pool
) -> None:
    first = cluster[0]
    first.start()
    nc = await nats.connect(first.url, max_reconnect_attempts=-1)
    stop = asyncio.Event()
    try:
        starting = asyncio.create_task(
            notification_service(
                _settings(database_url, first.url),
                lambda: datetime.now(UTC),
                Tuning(),
                Hooks(),
                pool,
                nc,
                None,
                stop=stop,
            )
        )
        await asyncio.sleep(1.0)  # refused at least once by then (a 5 s request at most)
        stop.set()
        with pytest.raises(StoppedWhileConnecting):
            await asyncio.wait_for(starting, 15)
    finally:
        await nc.close()


async def test_jetstream_refusing_for_good_is_a_config_error_after_its_patience(
    cluster: list[EmbeddedNats], database_url: str, pool: asyncpg.Pool
) -> None:
    first = cluster[0]
    first.start()  # the others never come
    nc = await nats.connect(first.url, max_reconnect_attempts=-1)
    try:
        with pytest.raises(ConfigError, match="CLINIC_NATS_STREAM_REPLICAS=3"):
            await asyncio.wait_for(
                notification_service(
                    _settings(database_url, first.url),
                    lambda: datetime.now(UTC),
                    Tuning(stream_setup_patience=3.0),
                    Hooks(),
                    pool,
                    nc,
                    None,
                ),
                30,
            )
    finally:
        await nc.close()
