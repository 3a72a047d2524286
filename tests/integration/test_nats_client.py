"""``NatsClient.flush``: once it returns, the server has everything sent before it.

nats-py's own flush writes its PING ahead of what still waits in the client's buffer, so
with a backlog it returns before the server has read the publishes (and a subscription's
drain stops reading before the server has taken its UNSUB).
"""

from __future__ import annotations

import asyncio

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
