"""The SMTP URL, the mail of a notification, which SMTP failures are worth a retry, and
the retry backoff."""

from __future__ import annotations

import smtplib
from datetime import timedelta

import pytest

from services.config import ConfigError
from services.notifications.email import (
    DEFAULT_SENDER,
    SmtpConfig,
    _failure,
    email_message,
    plain_address,
)
from services.notifications.runtime import Tuning
from tests.support import builders


def test_a_plain_smtp_url_names_host_and_port() -> None:
    assert SmtpConfig.from_url("smtp://127.0.0.1:1025") == SmtpConfig(host="127.0.0.1", port=1025)


def test_an_smtps_url_with_credentials_sender_and_default_port() -> None:
    config = SmtpConfig.from_url("smtps://us%40er:p%3Ass@mail.example:?from=clinic@example.test")
    assert config == SmtpConfig(
        host="mail.example",
        port=465,
        tls=True,
        username="us@er",
        password="p:ss",
        sender="clinic@example.test",
    )


def test_starttls_is_asked_for_in_the_query() -> None:
    config = SmtpConfig.from_url("smtp://mail.example?starttls=true")
    assert (config.port, config.starttls, config.sender) == (25, True, DEFAULT_SENDER)


@pytest.mark.parametrize("url", ["http://mail.example", "smtp://", "smtp://host:notaport"])
def test_a_malformed_smtp_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError):
        SmtpConfig.from_url(url)


def test_the_mail_carries_the_notification_and_its_id() -> None:
    notification = builders.notification()
    mail = email_message(notification, "pat@example.test", "clinic@example.test")
    assert (mail["To"], mail["From"], mail["Subject"]) == (
        "pat@example.test",
        "clinic@example.test",
        "Visit confirmed",
    )
    # Every attempt's mail has the same id, so a receiving system can tell a copy.
    assert mail["Message-ID"] == f"<{notification.notification_id}@example.test>"
    again = email_message(notification, "pat@example.test", "Clinic <clinic@example.test>")
    assert again["Message-ID"] == mail["Message-ID"]
    assert mail.get_content().strip() == "Your video visit is booked."


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (smtplib.SMTPRecipientsRefused({"a@b": (550, b"no such user")}), True),
        (smtplib.SMTPRecipientsRefused({"a@b": (451, b"try later")}), False),
        # One recipient may still take it later: worth a retry.
        (smtplib.SMTPRecipientsRefused({"a@b": (450, b"busy"), "c@d": (550, b"no")}), False),
        (smtplib.SMTPResponseException(500, b"syntax error"), True),
        (smtplib.SMTPResponseException(499, b"odd"), False),
        (smtplib.SMTPSenderRefused(553, b"sender refused", "x@y"), True),
        (smtplib.SMTPDataError(452, b"insufficient storage"), False),
        (smtplib.SMTPServerDisconnected("gone"), False),
        (ConnectionRefusedError(111, "refused"), False),
    ],
)
def test_5xx_replies_are_final_and_the_rest_is_retried(exc: Exception, permanent: bool) -> None:
    assert _failure(exc).permanent is permanent


def test_retries_back_off_exponentially_up_to_a_cap() -> None:
    tuning = Tuning(retry_base=timedelta(seconds=5), retry_cap=timedelta(minutes=1))
    delays = [tuning.retry_delay(n).total_seconds() for n in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]
    assert tuning.retry_delay(10_000) == timedelta(minutes=1)


def test_the_service_waits_one_second_for_the_directory_as_interfaces_md_says() -> None:
    # "no answer within 1 s means no email": the default the service runs with.
    assert Tuning().directory_timeout == 1.0


@pytest.mark.parametrize(
    ("reply", "address"),
    [
        ("p1@example.com", "p1@example.com"),
        ("  p1@example.com ", "p1@example.com"),
        ("jürgen@bücher.example", "jürgen@bücher.example"),
        ("p1@example.com, spy@evil.example", None),  # a list: each would be mailed
        ("p1@example.com\r\nBcc: spy@evil.example", None),
        ("Patient One <p1@example.com>", None),
        ("p1@example.com;spy@evil.example", None),
        ("p1 @example.com", None),
        ("p1", None),
        ("@example.com", None),
        ("p1@", None),
        ("p1@a@b", None),
        ("p1@example.com\x00", None),
    ],
)
def test_only_one_plain_address_from_the_directory_is_mailed(
    reply: str, address: str | None
) -> None:
    assert plain_address(reply) == address
