"""``NatsClient.flush``: once it returns, the server has everything sent before it.

nats-py's own flush writes its PING ahead of what still waits in the client's buffer, so
with a backlog it returns before the server has read the publishes (and a subscription's
drain stops reading before the server has taken its UNSUB).
"""

from __future__ import annotations

import asyncio
import contextlib

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from services.embedded import EmbeddedNats
from services.nats_client import NatsClient, server_answers

MESSAGES = 400
PAYLOAD = b"x" * 50_000  # 20 MB in all: a backlog the socket takes a while to pass on


async def _delivered_after_flush(publisher: NATS, url: str) -> int:
    """Publish a backlog (without yielding, so it all waits in the client's buffer), flush,
    then count what the server had routed to a subscriber by then."""
    subscriber = await nats.connect(url)
    try:
        sub = await subscriber.subscribe("flush.order")
        await subscriber.flush()
        for _ in range(MESSAGES):
            await publisher.publish("flush.order", PAYLOAD)
        await publisher.flush(timeout=10)
        # What the server routed before the publisher's PONG reaches the subscriber before
        # the subscriber's own PONG.
        await subscriber.flush(timeout=10)
        await asyncio.sleep(0)
        return sub.pending_msgs
    finally:
        await subscriber.close()


async def test_flush_returns_once_the_server_has_what_was_published_before(
    nats_url: str,
) -> None:
    publisher = NatsClient()
    # Room for the whole backlog in the client's buffer (nats-py hands it to the socket
    # early past ``pending_size``, which would hide the problem).
    await publisher.connect(nats_url, pending_size=64 * 1024 * 1024)
    try:
        assert await _delivered_after_flush(publisher, nats_url) == MESSAGES
    finally:
        await publisher.close()


async def test_a_flush_that_timed_out_on_a_hung_server_leaves_the_connection_reading(
    nats_server: EmbeddedNats,
) -> None:
    """nats-py's flush cancels its PONG's future when it gives up; the PONG the server sends
    once it is back then raises out of the read loop, which stops for good while the
    connection still looks up: deaf until its pings go unanswered. Not this flush."""
    client = NatsClient()
    await client.connect(nats_server.url, ping_interval=60)  # no ping notices the hang
    other = await nats.connect(nats_server.url)
    try:
        sub = await client.subscribe("flush.after-hang")
        await client.flush()
        nats_server.pause()
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await client.flush(timeout=1)
            assert not await server_answers(client, 0.5)
        finally:
            nats_server.resume()
        await other.publish("flush.after-hang", b"still heard")
        await other.flush()
        message = await sub.next_msg(timeout=5)
        assert message.data == b"still heard"
        assert await server_answers(client, 5)
        await client.flush(timeout=5)
    finally:
        await other.close()
        await client.close()


async def test_a_flush_or_ping_on_a_hung_server_with_a_full_flush_queue_keeps_its_timeout(
    nats_server: EmbeddedNats,
) -> None:
    """A hung server stops reading: the socket fills, nats-py's flusher waits in
    ``drain()``, and every publish after that waits for room in its flush queue (1,024).
    The PING waits there too, and nats-py swallows the cancellation of that wait: the
    flush (a stopping process's, 2 s) or the directory's ping must still give up in time."""
    client = NatsClient()

    async def quiet(_: Exception) -> None:
        pass

    await client.connect(nats_server.url, ping_interval=60, error_cb=quiet)
    await client.flush()
    nats_server.pause()
    publishing: list[asyncio.Task[None]] = []
    try:

        async def publish() -> None:
            with contextlib.suppress(Exception):
                await client.publish("full.queue", b"x" * 20_000)

        publishing = [asyncio.create_task(publish()) for _ in range(1_200)]
        for _ in range(100):
            if client._flush_queue is not None and client._flush_queue.full():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.skip("the flush queue never filled")
        began = asyncio.get_running_loop().time()
        assert not await asyncio.wait_for(server_answers(client, 0.5), 10)
        assert asyncio.get_running_loop().time() - began < 3
        began = asyncio.get_running_loop().time()
        with pytest.raises(nats.errors.TimeoutError):
            await asyncio.wait_for(client.flush(timeout=1), 10)
        assert asyncio.get_running_loop().time() - began < 3
    finally:
        nats_server.resume()
        for task in publishing:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5)
