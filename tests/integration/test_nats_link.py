"""A process's NATS link leaves a server that hangs for another one of its list.

A frozen server (SIGSTOP: the TCP connection stays open, nothing answers) is the hard
case: no error ever arrives, so only unanswered pings tell. Two plain servers stand in for
two cluster nodes; the link must be talking to the live one well within nats-py's default
of 4-6 minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg

from services.appointments.bootstrap import NATS_CLOSE_SECONDS, NATS_DRAIN_SECONDS, NatsLink
from services.config import load_settings
from services.embedded import EmbeddedNats
from services.nats_client import NatsClosed
from tests.support.cluster import nats_servers

pytestmark = pytest.mark.fault

#: Ping interval times (max outstanding + 1), plus a reconnect and slack for a busy machine.
PROMISED_SECONDS = NatsLink.PING_INTERVAL_SECONDS * (NatsLink.MAX_OUTSTANDING_PINGS + 1) + 10


@pytest.fixture
def two_servers() -> Iterator[list[EmbeddedNats]]:
    with nats_servers("clinic-nats-link", size=2) as servers:
        for server in servers:
            server.start()
        yield servers


async def test_a_hung_server_is_left_for_a_live_one(two_servers: list[EmbeddedNats]) -> None:
    urls = ",".join(server.url for server in two_servers)
    link = NatsLink(load_settings({"CLINIC_NATS_URL": urls}), "link-test")
    try:
        nc = await asyncio.wait_for(link.wait(), 10)
        assert nc.connected_url is not None
        hung = next(s for s in two_servers if s.port == nc.connected_url.port)
        live = next(s for s in two_servers if s is not hung)
        await nc.flush(timeout=2)

        hung.pause()
        frozen_at = time.monotonic()
        # Nothing answers on the hung server: a flush times out, no error is reported.
        with pytest.raises(TimeoutError):
            await nc.flush(timeout=1)
        while time.monotonic() - frozen_at < PROMISED_SECONDS:
            url = nc.connected_url
            if nc.is_connected and url is not None and url.port == live.port:
                break
            await asyncio.sleep(0.2)
        left_after = time.monotonic() - frozen_at
        assert nc.connected_url is not None and nc.connected_url.port == live.port, (
            f"still on the hung server after {left_after:.0f} s"
        )

        # And the connection works there: a round trip through the live server.
        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        sub = await nc.subscribe("link.echo", cb=echo)
        reply = await nc.request("link.echo", b"ping", timeout=2)
        assert reply.data == b"ping"
        await sub.unsubscribe()
        assert link.is_connected
    finally:
        await link.close()


async def _close_while_hung(link: NatsLink, server: EmbeddedNats) -> float:
    """Seconds ``link.close()`` takes while ``server`` hangs (resumed afterwards)."""
    server.pause()
    try:
        started = time.monotonic()
        await link.close()
        return time.monotonic() - started
    finally:
        server.resume()


async def test_closing_the_link_to_a_hung_server_is_bounded(nats_server: EmbeddedNats) -> None:
    """A stopping process whose NATS server hangs (SIGSTOP: still "connected" until pings
    fail) closes its link in seconds: draining it flushed each subscription with a 10 s
    timeout, then the connection with another, and held SIGTERM's stop for 20 s or more."""
    link = NatsLink(load_settings({"CLINIC_NATS_URL": nats_server.url}), "link-test")
    nc = await asyncio.wait_for(link.wait(), 10)
    js = nc.jetstream()
    await js.add_stream(name="HUNG", subjects=["hung.>"])
    await (await js.publish_async("hung.1", b"x"))  # the relay's reply inbox subscription
    await nc.subscribe("hung-endpoint")  # the service API's endpoints
    took = await _close_while_hung(link, nats_server)
    assert nc.is_closed
    # A ping, a drain (if the ping got through before the pause), a close: each bounded.
    assert took < 2 * NATS_DRAIN_SECONDS + NATS_CLOSE_SECONDS + 1, took


async def test_a_drain_that_hangs_after_the_ping_is_left_behind(nats_server: EmbeddedNats) -> None:
    """The server answered the ping, then hung: the drain (which ignores cancellation and
    flushes each subscription with a 10 s timeout) is given up on after its bound."""
    link = NatsLink(load_settings({"CLINIC_NATS_URL": nats_server.url}), "link-test")
    nc = await asyncio.wait_for(link.wait(), 10)
    await nc.subscribe("hung-endpoint")
    ping = nc.flush

    async def answered_once(*_: object) -> None:
        nc.flush = ping  # type: ignore[method-assign]  # later flushes go to the server

    nc.flush = answered_once  # type: ignore[method-assign]
    took = await _close_while_hung(link, nats_server)
    assert nc.is_closed
    assert took < NATS_DRAIN_SECONDS + NATS_CLOSE_SECONDS + 1, took


async def test_a_connection_nats_closes_for_good_stops_the_process(
    nats_server: EmbeddedNats,
) -> None:
    """nats-py does not reconnect after a server's protocol ``-ERR`` (here: a control line
    over the server's limit): the link sets the stop signal and the process ends with
    :class:`NatsClosed`, where it stayed live and never ready before."""
    link = NatsLink(load_settings({"CLINIC_NATS_URL": nats_server.url}), "link-test")
    nc = await asyncio.wait_for(link.wait(), 10)
    stop = asyncio.Event()
    watching = asyncio.create_task(link.watch(stop))
    await nc.subscribe("x" * 5000)  # a SUB line longer than max_control_line (4 KiB)
    await asyncio.wait_for(watching, 10)
    assert stop.is_set() and nc.is_closed
    assert link.closed_by_server is not None and "control line" in link.closed_by_server.lower()
    with pytest.raises(NatsClosed, match="closed the connection for good"):
        link.raise_if_closed()
    await link.close()  # still fine to call on the way out


async def test_closing_the_link_is_not_nats_closing_it(nats_server: EmbeddedNats) -> None:
    link = NatsLink(load_settings({"CLINIC_NATS_URL": nats_server.url}), "link-test")
    nc = await asyncio.wait_for(link.wait(), 10)
    stop = asyncio.Event()
    watching = asyncio.create_task(link.watch(stop))
    await link.close()
    assert nc.is_closed
    await asyncio.sleep(0.2)  # the closed callback has run
    assert not watching.done() and not stop.is_set()
    link.raise_if_closed()  # nothing to raise
    stop.set()
    await asyncio.wait_for(watching, 10)


async def test_a_tls_url_is_never_served_in_plaintext(nats_server: EmbeddedNats) -> None:
    """nats-py upgrades to TLS only when the server requires it: a ``tls://`` URL naming a
    server without TLS would be talked to in the clear. The link treats it as a server
    that does not answer (the process stays not ready, saying why)."""
    url = nats_server.url.replace("nats://", "tls://")
    link = NatsLink(load_settings({"CLINIC_NATS_URL": url}), "link-test")
    try:
        for _ in range(100):
            if link.last_error is not None:
                break
            await asyncio.sleep(0.05)
        assert link.last_error is not None and "offers no TLS" in link.last_error
        await asyncio.sleep(0.5)
        assert link.client is None and not link.is_connected
    finally:
        await link.close()
