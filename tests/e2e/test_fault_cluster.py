"""A 3-node NATS cluster on loopback with R3 streams: one node killed or hung mid-load loses
nothing.

The service (api, relay, projector) and the notification service connect with all three
URLs and ``CLINIC_NATS_STREAM_REPLICAS=3``. Under a steady command load the node leading
the ``APPOINTMENTS`` stream is killed (``kill -9``), or the node the service is connected
to hangs (``SIGSTOP``: its connections stay open and nothing answers); the others elect a
new leader, the service moves to a live node, and the relay and the consumers carry on. At
the end every committed event is on the stream exactly once, the view equals a rebuild,
and every notification was pushed once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import asyncpg
import httpx
import nats
import pytest
from nats.js.errors import Error as JetStreamError

from contracts.subjects import EVENTS_STREAM, NOTIFICATIONS_STREAM
from services.appointments.adapters.nats.streams import ensure_events_stream
from services.embedded import EmbeddedNats
from tests.support.checks import drained_and_whole, wait_for
from tests.support.cluster import nats_cluster as cluster_of_nats
from tests.support.load import CommandLoad
from tests.support.service import JWT_SECRET, running_notifications, running_service, service_env

pytestmark = pytest.mark.fault

RATE = 30.0
BEFORE, AFTER = 4.0, 8.0
DRAIN_SECONDS = 60.0


@pytest.fixture
def nats_cluster() -> Iterator[list[EmbeddedNats]]:
    """Three clustered ``nats-server``s with JetStream, started."""
    with cluster_of_nats("clinic-fault", monitored=True) as nodes:
        for node in nodes:
            node.start()
        yield nodes


async def _clients_of(node: EmbeddedNats) -> set[str]:
    """The names of the clients connected to ``node`` (its monitoring endpoint)."""
    port = node.extra_args[node.extra_args.index("-m") + 1]
    async with httpx.AsyncClient() as http:
        connz = (await http.get(f"http://127.0.0.1:{port}/connz")).json()
    return {c.get("name", "") for c in connz.get("connections") or []}


async def _node_serving(nodes: list[EmbeddedNats], client: str) -> EmbeddedNats:
    """The node the client named ``client`` is connected to."""
    for node in nodes:
        if client in await _clients_of(node):
            return node
    raise AssertionError(f"no node serves {client!r}")


async def _jetstream_ready(nc: nats.NATS) -> bool:
    try:
        await nc.jetstream().account_info()
    except (JetStreamError, TimeoutError, nats.errors.Error):
        return False
    return True


async def _connect(urls: list[str]) -> nats.NATS:
    """The test's own connection to these nodes (reconnecting as the services do)."""
    return await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


async def _cluster_ready(nc: nats.NATS) -> None:
    await wait_for(lambda: _jetstream_ready(nc), 30, "the JetStream cluster to form", 0.2)


async def test_a_node_killed_mid_load_loses_no_event(
    database_url: str,
    nats_cluster: list[EmbeddedNats],
    record_property: pytest.RecordProperty,
) -> None:
    urls = [node.url for node in nats_cluster]
    env = service_env(database_url, urls, CLINIC_NATS_STREAM_REPLICAS="3")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    nc = await _connect(urls)
    js = nc.jetstream()
    try:
        await _cluster_ready(nc)
        async with running_service(env) as client, running_notifications(env):
            load = CommandLoad(client, JWT_SECRET, rate=RATE)
            loading = asyncio.create_task(load.run(BEFORE + AFTER))
            await asyncio.sleep(BEFORE)
            info = await js.stream_info(EVENTS_STREAM)
            assert info.config.num_replicas == 3 and info.cluster is not None
            leader = next(node for node in nats_cluster if node.server_name == info.cluster.leader)
            published_before = info.state.messages
            leader.kill()
            await loading
            outcome = await drained_and_whole(pool, js, load.acknowledged, DRAIN_SECONDS)
            assert not load.failures and load.count(ok=False) == 0, load.summary()
            after = await js.stream_info(EVENTS_STREAM)
            assert after.cluster is not None and after.cluster.leader != leader.server_name
            pushes = await js.stream_info(NOTIFICATIONS_STREAM)
            assert pushes.config.num_replicas == 3
            # A process started with the default (1) never shrinks the R3 stream.
            assert (await ensure_events_stream(js, 1)).config.num_replicas == 3
    finally:
        await nc.close()
        await pool.close()

    figures = {
        "commands": load.commands,
        "events": outcome["events"],
        "events_before_the_kill": published_before,
        "notifications": outcome["notifications"],
        "killed": f"{leader.server_name} (stream leader)",
        "new_leader": after.cluster.leader,
    }
    record_property("figures", json.dumps(figures))
    print("nats cluster:", json.dumps(figures))


async def test_a_node_that_hangs_mid_load_is_left_and_loses_no_event(
    database_url: str,
    nats_cluster: list[EmbeddedNats],
    record_property: pytest.RecordProperty,
) -> None:
    urls = [node.url for node in nats_cluster]
    env = service_env(database_url, urls, CLINIC_NATS_STREAM_REPLICAS="3")
    setup = await _connect(urls)
    try:
        await _cluster_ready(setup)
    finally:
        await setup.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    try:
        async with running_service(env) as client, running_notifications(env):
            load = CommandLoad(client, JWT_SECRET, rate=RATE)
            loading = asyncio.create_task(load.run(BEFORE + AFTER))
            await asyncio.sleep(BEFORE)
            hung = await _node_serving(nats_cluster, "appointments")
            hung.pause()
            live = [node.url for node in nats_cluster if node is not hung]
            nc = await _connect(live)  # not the hung node: the checks must not hang
            try:
                js = nc.jetstream()
                await loading
                outcome = await drained_and_whole(pool, js, load.acknowledged, DRAIN_SECONDS)
                assert not load.failures and load.count(ok=False) == 0, load.summary()
            finally:
                await nc.close()
    finally:
        await pool.close()

    figures = {"commands": load.commands, **outcome, "hung": hung.server_name}
    record_property("figures", json.dumps(figures))
    print("nats cluster, a node hung:", json.dumps(figures))
