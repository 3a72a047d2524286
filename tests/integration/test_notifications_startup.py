"""The notification service starting while JetStream cannot make its streams yet: a
clustered JetStream whose other nodes are still starting (no quorum, no leader)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import asyncpg
import nats
import pytest

from contracts.subjects import EVENTS_STREAM, NOTIFICATIONS_STREAM
from services.appointments.adapters.system import utc_now
from services.appointments.bootstrap import StoppedWhileConnecting
from services.config import ConfigError, load_settings
from services.embedded import EmbeddedNats
from services.notifications.bootstrap import NotificationService, notification_service
from services.notifications.runtime import Hooks, Tuning
from tests.support.cluster import nats_cluster


@pytest.fixture
def cluster() -> Iterator[list[EmbeddedNats]]:
    """Three clustered ``nats-server``s with JetStream, not started."""
    with nats_cluster("clinic-start") as nodes:
        yield nodes


@contextlib.asynccontextmanager
async def _client(node: EmbeddedNats) -> AsyncIterator[nats.NATS]:
    """A client of ``node`` that keeps reconnecting while the cluster changes under it."""
    nc = await nats.connect(node.url, max_reconnect_attempts=-1)
    try:
        yield nc
    finally:
        await nc.close()


def _service(
    database_url: str,
    nats_url: str,
    pool: asyncpg.Pool,
    nc: nats.NATS,
    tuning: Tuning | None = None,
    stop: asyncio.Event | None = None,
) -> Coroutine[Any, Any, NotificationService]:
    """The service's start against R3 streams, push only."""
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_NATS_STREAM_REPLICAS": "3",
        }
    )
    return notification_service(
        settings, utc_now, tuning or Tuning(), Hooks(), pool, nc, None, stop=stop
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
    async with _client(first) as nc:
        with caplog.at_level(logging.WARNING, logger="services.notifications.bootstrap"):
            starting = asyncio.create_task(_service(database_url, first.url, pool, nc))
            deadline = asyncio.get_running_loop().time() + 30
            # Two of three answer "no suitable peers for placement" once they have a leader.
            refusal = "no suitable peers" if up_first == 2 else "cannot make the streams yet"
            while refusal not in caplog.text:
                assert not starting.done(), starting.exception()
                assert asyncio.get_running_loop().time() < deadline, "never refused"
                await asyncio.sleep(0.05)
            for node in others:  # the rest of the cluster comes up: a leader is elected
                await node.astart()
            try:
                service = await asyncio.wait_for(starting, 60)
            except (TimeoutError, ConfigError) as exc:  # say what the cluster was doing
                logs = "\n".join(f"--- {n.server_name}:\n{n.log_tail(60)}" for n in cluster)
                raise AssertionError(f"no streams: {exc}\n{logs}") from exc
        js = nc.jetstream()
        for stream in (EVENTS_STREAM, NOTIFICATIONS_STREAM):
            assert (await js.stream_info(stream)).config.num_replicas == 3
        assert service.workers


async def test_a_stop_while_waiting_for_jetstream_ends_the_start_quietly(
    cluster: list[EmbeddedNats],
    database_url: str,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = cluster[0]
    first.start()
    stop = asyncio.Event()
    async with _client(first) as nc:
        with caplog.at_level(logging.WARNING, logger="services.notifications.bootstrap"):
            starting = asyncio.create_task(_service(database_url, first.url, pool, nc, stop=stop))
            deadline = asyncio.get_running_loop().time() + 30
            while "cannot make the streams yet" not in caplog.text:  # waiting to retry
                assert not starting.done(), starting.exception()
                assert asyncio.get_running_loop().time() < deadline, "never refused"
                await asyncio.sleep(0.05)
        stop.set()
        with pytest.raises(StoppedWhileConnecting):
            await asyncio.wait_for(starting, 15)


async def test_jetstream_refusing_for_good_is_a_config_error_after_its_patience(
    cluster: list[EmbeddedNats], database_url: str, pool: asyncpg.Pool
) -> None:
    first = cluster[0]
    first.start()  # the others never come
    async with _client(first) as nc:
        with pytest.raises(ConfigError, match="CLINIC_NATS_STREAM_REPLICAS=3"):
            patience = Tuning(stream_setup_patience=3.0)
            await asyncio.wait_for(_service(database_url, first.url, pool, nc, patience), 30)
