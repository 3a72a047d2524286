"""``NatsClient.flush``: once it returns, the server has everything sent before it.

nats-py's own flush writes its PING ahead of what still waits in the client's buffer, so
with a backlog it returns before the server has read the publishes (and a subscription's
drain stops reading before the server has taken its UNSUB).
"""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client as NATS

from services.nats_client import NatsClient

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
