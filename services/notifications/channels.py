"""Delivery channels: push (a message on the NOTIFICATIONS stream) and what they share.

A channel's ``send`` returns None once the notification is out, a reason when it is not
to be sent on this channel (e.g. no email address), and raises :class:`DeliveryFailed`
otherwise, saying whether trying again can help.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError

from contracts.notifications import Notification
from contracts.subjects import NOTIFICATIONS_STREAM, NOTIFICATIONS_SUBJECTS, notification_subject
from services.appointments.adapters.nats.streams import ensure_stream

log = logging.getLogger(__name__)

#: How long JetStream remembers a ``Nats-Msg-Id``: a push resent after a crash within it
#: is dropped as a duplicate. Workers resend an in-doubt push only inside this window.
PUSH_DUPLICATE_WINDOW_SECONDS: Final = 3600.0
#: What the mobile gateway can still catch up on after an outage of its own.
PUSH_RETENTION_SECONDS: Final = 14 * 24 * 3600.0
PUBLISH_TIMEOUT_SECONDS: Final = 5.0


#: Publish failures that say the message was not stored: nobody took it (no stream), or
#: it never left the client (its buffer full while reconnecting).
_NOT_SENT: Final = (
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
)


class DeliveryFailed(Exception):
    """A send failed; ``permanent`` when trying again cannot help; ``in_doubt`` when the
    message may have arrived all the same (handed over, and no answer came)."""

    def __init__(self, reason: str, *, permanent: bool, in_doubt: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.in_doubt = in_doubt


class DeliveryChannel(Protocol):
    """Sends notifications one way (push, email…)."""

    name: str

    async def send(self, notification: Notification) -> str | None:
        """Send; None when sent, else why it is not sent on this channel (for good)."""
        ...


def notifications_stream_config(replicas: int | None = None) -> StreamConfig:
    """``NOTIFICATIONS``: every notification sent, de-duplicated by ``notification_id``,
    on ``replicas`` servers (None: the server's default)."""
    return StreamConfig(
        name=NOTIFICATIONS_STREAM,
        description="Notifications sent, the mobile gateway's push source.",
        subjects=[NOTIFICATIONS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        max_age=PUSH_RETENTION_SECONDS,
        num_replicas=replicas,
        duplicate_window=PUSH_DUPLICATE_WINDOW_SECONDS,
    )


class PushChannel:
    """Publishes each notification on ``notifications.v1.sent.<kind>``, with
    ``Nats-Msg-Id`` = ``notification_id`` so a resend is de-duplicated by JetStream."""

    name = "push"

    def __init__(
        self,
        js: JetStreamContext,
        timeout: float = PUBLISH_TIMEOUT_SECONDS,
        stream: StreamConfig | None = None,
    ) -> None:
        """``stream``: ``NOTIFICATIONS`` as the service makes it at start (made again if
        it goes away meanwhile)."""
        self._js = js
        self._timeout = timeout
        self._stream = stream or notifications_stream_config()

    async def send(self, notification: Notification) -> str | None:
        """Publish and wait for the stream's acknowledgement. No stream taking the subject
        (``NOTIFICATIONS`` deleted, or lost by a server restarted without its storage) is
        not the notification's fault: the stream is made again, as at start, and the
        publish tried once more, instead of failing every push until the next restart."""
        try:
            try:
                ack = await self._publish(notification)
            except nats.js.errors.NoStreamResponseError:  # no stream takes the subject
                await self._make_stream_again()
                ack = await self._publish(notification)
        except APIError as exc:
            # A request error (400: the message too large) will not change; JetStream's
            # own trouble passes (503 no leader yet, 500 a stream offline in a cluster, 429
            # too many requests).
            permanent = (
                exc.code is not None and 400 <= exc.code < 500 and exc.code not in (408, 429)
            )
            raise DeliveryFailed(f"publish refused: {exc}", permanent=permanent) from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            # No answer (a timeout, a connection lost meanwhile): the message may be stored
            # all the same, or still on its way in a connection being given up.
            raise DeliveryFailed(
                f"publish failed: {exc!r}", permanent=False, in_doubt=not isinstance(exc, _NOT_SENT)
            ) from exc
        if ack.duplicate:
            log.info(
                "push was already sent",
                extra={"notification_id": str(notification.notification_id)},
            )
        return None

    async def _make_stream_again(self) -> None:
        log.warning("stream %s is gone: making it again", NOTIFICATIONS_STREAM)
        try:
            await ensure_stream(self._js, self._stream)
        except Exception as exc:  # JetStream's state, not the notification's: try later
            raise DeliveryFailed(
                f"stream {NOTIFICATIONS_STREAM} is gone: {exc!r}", permanent=False
            ) from exc

    async def _publish(self, notification: Notification) -> PubAck:
        return await self._js.publish(
            notification_subject(notification.kind),
            msgspec.json.encode(notification),
            timeout=self._timeout,
            stream=NOTIFICATIONS_STREAM,
            headers={"Nats-Msg-Id": str(notification.notification_id)},
        )
