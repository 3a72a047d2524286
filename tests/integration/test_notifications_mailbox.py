"""A real SMTP server (aiosmtpd) for the notification tests (no tests here)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SmtpSink:
    """An aiosmtpd handler keeping every message; it can refuse chosen recipients."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        #: address -> SMTP replies to give, one per attempt, before accepting it.
        self.refusals: dict[str, list[str]] = {}
        #: Seconds to wait, having kept a message, before saying so.
        self.reply_delay = 0.0
        #: Replies to give a message's content instead of keeping it, one per message.
        self.data_refusals: list[str] = []
        #: address -> (release, reply): the next message to it waits at its recipient until
        #: ``release`` is set, then gets ``reply`` (once; a 250 takes the recipient).
        self.holds: dict[str, tuple[threading.Event, str]] = {}
        #: Addresses whose message is being held right now.
        self.holding: set[str] = set()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        hold = self.holds.pop(address, None)
        if hold is not None:
            release, reply = hold
            self.holding.add(address)
            await asyncio.to_thread(release.wait, 30)  # bounded: a test that fails lets go
            self.holding.discard(address)
            if reply.startswith("250"):
                envelope.rcpt_tos.append(address)
            return reply
        replies = self.refusals.get(address)
        if replies:
            return replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_refusals:
            return self.data_refusals.pop(0)
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


@pytest.fixture
def smtp() -> Iterator[tuple[SmtpSink, str]]:
    """A real SMTP server on a free port: (its sink, its ``smtp://`` URL)."""
    sink = SmtpSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, f"smtp://127.0.0.1:{port}?from=clinic%40example.test"
    finally:
        controller.stop()
