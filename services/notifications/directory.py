"""The clinic directory, asked over NATS for a recipient's contact details.

No answer within a second (or no directory subscribed at all) means no address, as
interfaces.md says. A question that could not be asked at all, because this process's own
connection to NATS is down (reconnecting, draining, closed) or dropped while it waited, is
:class:`DirectoryUnavailable` instead: nats-py would only buffer it and time out, which says
nothing of the directory, so the caller tries again later. So is one unanswered while the
server itself does not answer a ping either (it hangs, and the connection only looks up),
and "no directory listens" within :data:`REJOIN_SECONDS` of our connection coming back
(the directory's own connection may not be back yet), and one whose timeout fired
:data:`STALL_SECONDS` late (this process stood still: the answer may be unread). And on a
cluster the directory's connection may be on another node than ours: that node lost (it
hangs: the cluster still routes the questions to it; it died: no directory listens until
its client is on another node), ours and our server are well and the directory is silent
for the ~20 s its client takes to move. So a silence means no address only once it has
lasted :data:`SILENCE_SECONDS`; until then its questions are asked again later.
"""

from __future__ import annotations

import logging
import time
from typing import Final
from uuid import UUID

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from contracts.common import UNREADABLE_JSON
from contracts.notifications import CLINIC_ID_HEADER, DirectoryContactReply
from contracts.subjects import directory_contact_subject
from services.nats_client import server_answers

log = logging.getLogger(__name__)

#: The directory answers within this or not at all (interfaces.md).
DIRECTORY_TIMEOUT_SECONDS: Final = 1.0
#: How long after our connection came back (a NATS server restarted, a node lost) "no
#: directory listens" is taken for a directory whose own connection has not come back yet
#: (NATS clients wait ~2 s between reconnect attempts), not for one that is not deployed.
REJOIN_SECONDS: Final = 10.0
#: A question whose timeout fired this much later than due was not left unanswered by the
#: directory: this process stood still meanwhile (its answer may be unread in the socket).
STALL_SECONDS: Final = 0.5
#: How long the directory must have been silent (every question since unanswered) before
#: its silence means no address: longer than its client takes to leave a NATS node that
#: hangs (pings every 5 s, 3 unanswered) and reconnect to another.
SILENCE_SECONDS: Final = 30.0

_decoder: Final = msgspec.json.Decoder(DirectoryContactReply)

#: nats-py's refusals of a request on a connection that is not up.
_NOT_CONNECTED: Final = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


class DirectoryUnavailable(Exception):
    """The directory could not be asked: this process's NATS connection is not up."""


def _down(nc: NATS) -> str | None:
    """Why ``nc`` cannot carry a request now, or None when it is connected."""
    if nc.is_closed:
        return "closed"
    if nc.is_draining:
        return "draining"
    if nc.is_reconnecting or not nc.is_connected:
        return "reconnecting"
    return None


def _reconnects(nc: NATS) -> int:
    return int(nc.stats.get("reconnects", 0))


class Directory:
    """Request/reply on ``directory.v1.contact.<user_id>``."""

    def __init__(
        self,
        nc: NATS,
        timeout: float = DIRECTORY_TIMEOUT_SECONDS,
        rejoin: float = REJOIN_SECONDS,
        silence: float = SILENCE_SECONDS,
    ) -> None:
        self._nc = nc
        self._timeout = timeout
        self._rejoin = rejoin
        self._silence = silence
        self._silent_since: float | None = None
        """When the directory's current silence began (monotonic seconds), None while it
        answers."""
        self._reconnects = _reconnects(nc)
        """The connection's reconnects when last looked at."""
        self._reconnected_at: float | None = None
        """When a reconnect was first seen (monotonic seconds), None before any."""
        self._silent = False
        """The directory did not answer the last question (warned once per silence)."""

    def _unanswered(self, why: str, user_id: UUID) -> None:
        """No address for ``user_id``, as no directory answered for :data:`SILENCE_SECONDS`:
        a WARNING for the first of a silence (every email is skipped while it lasts), INFO
        for the others. :class:`DirectoryUnavailable` while the silence is shorter (the
        directory's NATS node lost, its client moving to another)."""
        now = time.monotonic()
        if self._silent_since is None:
            self._silent_since = now
        if now - self._silent_since < self._silence:
            raise DirectoryUnavailable(
                f"{why}, silent for {now - self._silent_since:.1f}s only"
                " (its NATS node may be lost): asked again later"
            )
        level = logging.INFO if self._silent else logging.WARNING
        self._silent = True
        log.log(level, "%s: email skipped", why, extra={"user_id": str(user_id)})

    def _seen_reconnects(self) -> int:
        """The connection's reconnects, noting when a new one is first seen."""
        reconnects = _reconnects(self._nc)
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self._reconnected_at = time.monotonic()
        return reconnects

    def _rejoining(self) -> bool:
        """Whether our connection came back so lately that the directory's may not have."""
        self._seen_reconnects()
        at = self._reconnected_at
        return at is not None and time.monotonic() - at < self._rejoin

    def _answered(self) -> None:
        self._silent_since = None
        if self._silent:
            log.info("the directory answers again")
        self._silent = False

    async def contact(
        self, user_id: UUID, clinic_id: UUID | None = None
    ) -> DirectoryContactReply | None:
        """The user's contact details; None when the directory does not answer in time,
        is not running, or answers something unreadable. :class:`DirectoryUnavailable`
        when our own connection is down, before or during the request.

        ``clinic_id``, the clinic the notification is of, goes in the request's
        ``Clinic-Id`` header: a booking names its provider (and staff its patient) by id
        alone, so a directory that knows who belongs to which clinic should answer no
        address for a user not of that clinic (else anyone who books could have a
        "New visit booked" mailed to any user)."""
        subject = directory_contact_subject(user_id)
        down = _down(self._nc)
        if down is not None:
            raise DirectoryUnavailable(f"NATS connection {down}")
        reconnects = self._seen_reconnects()
        asked = time.monotonic()
        try:
            headers = None if clinic_id is None else {CLINIC_ID_HEADER: str(clinic_id)}
            reply = await self._nc.request(subject, b"", timeout=self._timeout, headers=headers)
        except _NOT_CONNECTED as exc:
            raise DirectoryUnavailable(f"NATS connection down: {exc!r}") from exc
        except nats.errors.NoRespondersError as exc:
            if self._rejoining():
                # Right after a NATS restart the directory's subscription may not be back
                # yet (its client reconnects on its own schedule): asked again later.
                raise DirectoryUnavailable(
                    "no directory listens yet: NATS reconnected moments ago"
                ) from exc
            self._unanswered("no directory listens on directory.v1.contact.*", user_id)
            return None
        except nats.errors.TimeoutError as exc:
            # Unanswered: a silent directory, unless the question never got out (the
            # connection dropped meanwhile: buffered, or lost with the old socket).
            down = _down(self._nc)
            if down is None and _reconnects(self._nc) != reconnects:
                down = "reconnected meanwhile"
            if down is None and time.monotonic() - asked > self._timeout + STALL_SECONDS:
                # This process stood still (CPU throttled, paused) past the timeout: the
                # answer may be in the socket, unread, as the timer fired.
                raise DirectoryUnavailable(
                    "the directory's answer could not be read in time: this process stalled"
                ) from exc
            if down is None and not await server_answers(self._nc, self._timeout):
                # The server hangs (frozen, or a partition dropping packets) while the
                # connection still looks up: the question may never have reached it.
                down = "up, but its server does not answer a ping"
            if down is not None:
                raise DirectoryUnavailable(f"NATS connection {down}") from exc
            self._unanswered(f"the directory did not answer within {self._timeout}s", user_id)
            return None
        self._answered()
        try:
            return _decoder.decode(reply.data)
        except UNREADABLE_JSON as exc:
            log.warning(
                "unreadable directory reply", extra={"user_id": str(user_id), "error": str(exc)}
            )
            return None
