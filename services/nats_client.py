"""The NATS client every process uses: nats-py's, with a ``flush`` that keeps its promise.

nats-py (2.16) writes a flush's ``PING`` straight to the socket, while the commands sent
before it may still wait in its buffer for the flusher task. The server then answers the
``PONG`` before it has read them, and ``flush()`` returns early. That broke two things
here: a caller that publishes and flushes could not count on the server having the
messages, and draining a subscription (``UNSUB``, flush, then stop reading) could stop
reading before the server had taken the ``UNSUB``, dropping the requests it routed in
between, at every graceful stop of the NATS service API.

And a message nats-py cannot read (a reply subject or a subject that is not UTF-8, a header
block shorter than ``NATS/1.0``) raised out of its read loop, which then stopped reading for
good while the connection looked up: one ``PUB`` from any client allowed to send a request
left the process deaf until its pings went unanswered (~15 s), and one on the events stream
did so again at every redelivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

import nats.errors
from nats.aio.client import DEFAULT_FLUSH_TIMEOUT
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.logs import dropped_message

#: The headers of a message whose header block nats-py cannot read, instead of an error out
#: of its read loop: the NATS service API refuses such a request (``invalid-request``).
UNREADABLE_HEADERS: Final = "Clinic-Unreadable-Headers"


async def server_answers(nc: NATS, within: float) -> bool:
    """Whether the server answers a ``PING`` on ``nc`` within ``within`` seconds: whether
    it is up and reading, which a connection that looks up does not say (a server that
    hangs leaves it connected until ~3 pings go unanswered, ~15 s).

    Not nats-py's ``flush(timeout)``: when that gives up it cancels its future, and the
    ``PONG`` that comes later (the server back from its hang) fails to resolve it, which
    raises out of nats-py's read loop and stops it reading for good. Here the wait gives up
    without cancelling: a late ``PONG`` resolves a future no one waits for any more."""
    if nc.is_closed or not nc.is_connected:
        return False  # nothing to ask, or a PING that would sit in the pending buffer
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pong: asyncio.Future[bool] = loop.create_future()
    try:
        # Bounded too: sending waits for room in nats-py's flush queue, which a flusher
        # stuck writing to a hung server's full socket never makes (and nats-py's
        # _flush_pending swallows the cancellation: the deadline is checked after).
        async with asyncio.timeout_at(deadline):
            await nc._send_ping(pong)
    except (OSError, AssertionError, RuntimeError, TimeoutError):
        return False  # the transport went away meanwhile, or no room in time
    if loop.time() >= deadline:
        return False
    try:
        await asyncio.wait_for(asyncio.shield(pong), deadline - loop.time())
    except TimeoutError:
        return False
    return True


class NatsClosed(Exception):
    """NATS closed the connection for good (nats-py does not reconnect after a protocol
    error such as ``-ERR 'Maximum Subscriptions Exceeded'``): the process stops, and exits
    non-zero so that its supervisor starts it again with a connection of its own."""


class NatsClient(NATS):
    """:class:`nats.aio.client.Client` whose :meth:`flush` round trip follows everything
    sent before it (``Subscription.drain`` uses it too)."""

    async def flush(self, timeout: int = DEFAULT_FLUSH_TIMEOUT) -> None:  # noqa: ASYNC109 (its signature)
        if timeout <= 0 or self.is_closed:  # nats-py's own errors for these
            return await super().flush(timeout)
        # Hand the buffer to the socket first (the flusher does it; bounded, as the
        # flusher stops while the connection is down), then the PING goes after it.
        # (nats-py's _flush_pending swallows wait_for's cancellation: no TimeoutError
        # here, so the PING below gets what is left of ``timeout``, not all of it again.)
        deadline = asyncio.get_running_loop().time() + timeout
        await asyncio.wait_for(self._flush_pending(force_flush=True), timeout)
        reading = self._reading_task is not None and not self._reading_task.done()
        flushing = self._flusher_task is not None and not self._flusher_task.done()
        if not (reading and flushing and self.is_connected):
            # nats-py's own: a direct flush (no PONG awaited), or a PING left to wait in
            # the buffer for the reconnect (its futures are dropped with the old socket).
            return await super().flush(timeout)
        # Not nats-py's PING wait: on a timeout it cancels its future, and the late PONG
        # (a server back from a hang) then stops the read loop for good (server_answers).
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0 or not await server_answers(self, left):
            raise nats.errors.FlushTimeoutError
        return None

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        try:
            parsed: dict[str, str] | None = await super()._process_headers(headers)
        except Exception as exc:
            return {UNREADABLE_HEADERS: repr(exc)}
        return parsed

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Any:
        # A subject that is not UTF-8 (a message JetStream stored so) still reaches its
        # consumer, which parks what it cannot read; a reply subject that is not cannot be
        # answered (the message is dropped: ``_process_msg``).
        if not subject.isascii():  # most are: no decoding twice on the hot path
            subject = subject.decode("utf-8", "replace").encode()
        return super()._build_message(sid, subject, reply, data, headers)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        try:
            await super()._process_msg(sid, subject, reply, data, headers)
        except Exception as exc:  # anyone allowed to publish could send many: throttled
            dropped_message(
                "nats-py cannot read",
                f"{exc!r} (subject {bytes(subject[:200])!r}, reply {bytes(reply[:200])!r})",
            )


def delivered_for(msgs: Iterable[Msg], stream: str, consumer: str) -> list[Msg]:
    """The messages of a fetch that JetStream delivered for ``consumer`` of ``stream``.

    A pull consumer's fetch takes whatever reaches its inbox, and anyone may aim a message
    there: a client's request whose reply subject names it makes a service that may answer
    on any reply subject (``allow_responses``) publish there, and a client's push consumer
    may deliver there. Such a message is dropped (a throttled warning), never handled as an
    event, acked or parked (its ``metadata`` is not even readable).
    """
    kept: list[Msg] = []
    for msg in msgs:
        try:
            meta = msg.metadata
            ours = meta.stream == stream and meta.consumer == consumer
        except Exception:  # nats-py's NotJSMessageError, or a reply it cannot split
            ours = False
        if ours:
            kept.append(msg)
        else:
            dropped_message(
                f"on the inbox of consumer {consumer}",
                f"not delivered for it by JetStream (subject {msg.subject[:200]!r}, reply"
                f" {msg.reply[:200]!r})",
            )
    return kept
