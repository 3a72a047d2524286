"""The clinic directory, asked over NATS for a recipient's contact details."""

from __future__ import annotations

import logging
from typing import Final
from uuid import UUID

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from contracts.notifications import DirectoryContactReply
from contracts.subjects import directory_contact_subject

log = logging.getLogger(__name__)

#: The directory answers within this or not at all (interfaces.md).
DIRECTORY_TIMEOUT_SECONDS: Final = 1.0

_decoder: Final = msgspec.json.Decoder(DirectoryContactReply)


class Directory:
    """Request/reply on ``directory.v1.contact.<user_id>``."""

    def __init__(self, nc: NATS, timeout: float = DIRECTORY_TIMEOUT_SECONDS) -> None:
        self._nc = nc
        self._timeout = timeout

    async def contact(self, user_id: UUID) -> DirectoryContactReply | None:
        """The user's contact details; None when the directory does not answer in time,
        is not running, or answers something unreadable."""
        subject = directory_contact_subject(user_id)
        try:
            reply = await self._nc.request(subject, b"", timeout=self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            log.info("directory did not answer", extra={"user_id": str(user_id)})
            return None
        try:
            return _decoder.decode(reply.data)
        except msgspec.DecodeError as exc:
            log.warning(
                "unreadable directory reply", extra={"user_id": str(user_id), "error": str(exc)}
            )
            return None
