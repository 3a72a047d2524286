"""Email over SMTP, to the address the clinic directory knows for the recipient.

``CLINIC_SMTP_URL``: ``smtp://[user:password@]host[:port][?from=addr&starttls=true]``, or
``smtps://…`` for TLS from the first byte. smtplib runs in a worker thread.

The lookup and the connection come first; the worker's hand-over mark (see
``delivery.py``) is awaited between them and the message itself, so a crash before the
mark leaves nothing sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from contracts.notifications import Notification
from services.config import ConfigError, mask_password
from services.notifications.channels import DeliveryFailed
from services.notifications.directory import Directory, DirectoryUnavailable

log = logging.getLogger(__name__)

DEFAULT_SENDER: Final = "Clinic <no-reply@localhost>"
SMTP_TIMEOUT_SECONDS: Final = 10.0


class SmtpConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to hand mail over."""

    host: str
    port: int
    tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    sender: str = DEFAULT_SENDER

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        """Read ``smtp://…`` or ``smtps://…``; a malformed URL is a configuration error."""
        shown = mask_password(url)  # never the password in a message
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ConfigError(f"CLINIC_SMTP_URL is not a URL: {shown!r}.") from None
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(
                f"CLINIC_SMTP_URL must be smtp://host[:port] or smtps://…, not {shown!r}."
            )
        query = parse_qs(parts.query)
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"CLINIC_SMTP_URL has an invalid port: {shown!r}.") from None
        tls = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=port or (465 if tls else 25),
            tls=tls,
            starttls=query.get("starttls", ["false"])[0].lower() in ("1", "true", "yes"),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            sender=query.get("from", [DEFAULT_SENDER])[0],
        )


#: One plain address (``user@host``): no display name, no list, no spaces, no line break.
#: The directory's answer becomes the ``To`` header and the envelope's recipient, so a
#: reply of several addresses would mail each, and one with a line break would fail the
#: mail's making at every attempt.
_PLAIN_ADDRESS: Final = re.compile(r"[^@\s<>(),;:\"\[\]\\]+@[^@\s<>(),;:\"\[\]\\]+")


def plain_address(value: str) -> str | None:
    """``value`` (surrounding spaces removed) when it is one plain email address."""
    address = value.strip()
    if _PLAIN_ADDRESS.fullmatch(address) and address.isprintable():
        return address
    return None


def email_message(notification: Notification, to: str, sender: str) -> EmailMessage:
    """The mail of a notification. Its Message-ID derives from the notification id, so a
    receiving system can tell a copy."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = notification.title
    message["Date"] = format_datetime(notification.sent_at)
    # The same for every attempt (make_msgid would add a time and a random number).
    domain = parseaddr(sender)[1].rpartition("@")[2] or "clinic"
    message["Message-ID"] = f"<{notification.notification_id}@{domain}>"
    message["X-Clinic-Notification-Id"] = str(notification.notification_id)
    message.set_content(notification.body)
    return message


class _HandOver:
    """Notes when the message itself went out (the bytes after ``DATA``'s 354): from then
    on the server may have taken it, so a reply that never comes leaves it in doubt."""

    handed_over = False
    _data_next = False

    def putcmd(self, cmd: str, args: str = "") -> None:
        self._data_next = False  # the command itself is not the message
        super().putcmd(cmd, args)  # type: ignore[misc]
        self._data_next = cmd.lower() == "data"

    def send(self, s: Any) -> None:
        super().send(s)  # type: ignore[misc]
        if self._data_next:  # the whole message and its final "."
            self.handed_over = True
            self._data_next = False


class _Smtp(_HandOver, smtplib.SMTP):
    pass


class _SmtpSsl(_HandOver, smtplib.SMTP_SSL):
    pass


class InDoubt(Exception):
    """The message was handed over, then the connection failed before the server's reply:
    it may have been delivered."""


_Connection = _Smtp | _SmtpSsl


def _connect(config: SmtpConfig) -> _Connection:
    """Connect, and STARTTLS and log in as configured: nothing of the message yet."""
    smtp: _Connection
    if config.tls:
        smtp = _SmtpSsl(
            config.host,
            config.port,
            timeout=SMTP_TIMEOUT_SECONDS,
            context=ssl.create_default_context(),
        )
    else:
        smtp = _Smtp(config.host, config.port, timeout=SMTP_TIMEOUT_SECONDS)
    try:
        if config.starttls:
            smtp.starttls(context=ssl.create_default_context())
        if config.username:
            smtp.login(config.username, config.password or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


def _hand_over(smtp: _Connection, message: EmailMessage) -> None:
    """Send the message on a connection made by :func:`_connect`, then say goodbye."""
    try:
        try:
            smtp.send_message(message)
        except smtplib.SMTPResponseException:
            raise  # the server answered: its code says what became of the message
        except OSError as exc:  # a timeout, a dropped connection (SMTPServerDisconnected)
            if smtp.handed_over:
                raise InDoubt(repr(exc)) from exc
            raise
    finally:
        try:  # the message is through (or not) whatever QUIT answers
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


def _failure(exc: Exception) -> DeliveryFailed:
    """SMTP 5xx replies are final; 4xx replies and broken connections are worth a retry.
    The reason (logged, and kept in ``last_error``) never holds the recipient's address:
    servers repeat it in their refusals."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = sorted({code for code, _ in exc.recipients.values()})
        return DeliveryFailed(f"recipient refused: smtp {codes}", permanent=min(codes) >= 500)
    if isinstance(exc, smtplib.SMTPResponseException):
        text = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        return DeliveryFailed(
            f"smtp {exc.smtp_code}: {_without_addresses(text)}", permanent=exc.smtp_code >= 500
        )
    return DeliveryFailed(_without_addresses(f"smtp: {exc!r}"), permanent=False)


_ADDRESS = re.compile(r"[^\s<>()\[\]:;,'\"]+@[^\s<>()\[\]:;,'\"]+")


def _without_addresses(text: str) -> str:
    return _ADDRESS.sub("<address>", text)


async def _no_mark() -> None:
    return None


class EmailChannel:
    """Asks the directory for the recipient's address and mails the notification there."""

    name = "email"

    def __init__(self, directory: Directory, config: SmtpConfig) -> None:
        self._directory = directory
        self._config = config

    async def send(self, notification: Notification) -> str | None:
        """Mail the notification; a recipient the directory has no address for gets none."""
        return await self.send_marked(notification, _no_mark)

    async def send_marked(
        self, notification: Notification, hand_over: Callable[[], Awaitable[None]]
    ) -> str | None:
        """Like :meth:`send`, awaiting ``hand_over()`` once the address is known and the
        server connected, just before the message goes to the server: everything before
        is safe to do again (nothing left), the message from then on may arrive. If
        ``hand_over()`` raises, the connection is dropped and nothing is sent."""
        try:
            contact = await self._directory.contact(
                notification.recipient_id, notification.clinic_id
            )
        except DirectoryUnavailable as exc:
            # Not a "no": the question never reached the directory. Asked again later.
            raise DeliveryFailed(f"directory not asked: {exc}", permanent=False) from exc
        if contact is None or not contact.email:
            return "no email address known"
        address = plain_address(contact.email)
        if address is None:
            log.warning(
                "the directory's address is not one plain address: email skipped",
                extra={"user_id": str(notification.recipient_id)},
            )
            return "the directory's address is not one plain address"
        message = email_message(notification, address, self._config.sender)
        try:
            smtp = await asyncio.to_thread(_connect, self._config)
        except (smtplib.SMTPException, OSError) as exc:
            raise _failure(exc) from exc
        try:
            await hand_over()
        except BaseException:
            smtp.close()  # nothing of the message was sent
            raise
        try:
            await asyncio.to_thread(_hand_over, smtp, message)
        except InDoubt as exc:
            # Sent at most once: a retry could be a second copy.
            raise DeliveryFailed(
                f"in doubt: the server's answer to the message never came ({exc}); not resent",
                permanent=True,
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise _failure(exc) from exc
        return None
