"""Malformed ``CLINIC_*`` variables are refused at load, in one line naming the variable."""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from services import config
from services.config import ConfigError, load_settings, mask_password
from services.notifications.email import SmtpConfig


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "value",
    [
        ",",
        " ",
        " , ",
        "nats://127.0.0.1:abc",
        "nats://127.0.0.1:99999",
        "nats://127.0.0.1:0",
        "http://host:4222",
        "nats://:4222",
        "nats://a:4222,host:x",
        "ws://a:80,nats://b:4222",
    ],
)
def test_a_nats_url_without_a_usable_server_is_refused(value: str) -> None:
    assert "CLINIC_NATS_URL" in refusal({"CLINIC_NATS_URL": value})


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        ("", ["nats://127.0.0.1:4222"]),
        ("nats://a:4222, tls://b:4223", ["nats://a:4222", "tls://b:4223"]),
        ("127.0.0.1:4222", ["127.0.0.1:4222"]),  # nats-py takes a bare host:port
        ("nats://user:pw@[::1]:4222", ["nats://user:pw@[::1]:4222"]),
        ("nats://a", ["nats://a"]),
    ],
)
def test_usable_nats_urls_are_kept(value: str, urls: list[str]) -> None:
    assert load_settings({"CLINIC_NATS_URL": value}).nats_urls == urls


@pytest.mark.parametrize(
    "dsn",
    [
        "x",
        "mysql://db/clinic",
        "postgresql://db:port/clinic",
        "postgresql://db:70000/clinic",
        "postgresql://[::1/clinic",
        "postgresql://127.0.0.1:5432,/clinic",
        "postgresql://h1,,h2/clinic",
    ],
)
def test_a_malformed_database_url_is_refused_before_connecting(dsn: str) -> None:
    settings = load_settings({"CLINIC_DATABASE_URL": dsn})
    with pytest.raises(ConfigError, match="CLINIC_DATABASE_URL"):
        settings.require_database_url()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@127.0.0.1:5432/clinic",
        "postgres://u:p@db/clinic?sslmode=require",
        "postgresql://h1:5432,h2:5433/clinic",
        "postgresql:///clinic?host=/var/run/postgresql",
    ],
)
def test_wellformed_database_urls_are_accepted(dsn: str) -> None:
    assert load_settings({"CLINIC_DATABASE_URL": dsn}).require_database_url() == dsn


def test_a_database_url_refusal_hides_the_password() -> None:
    settings = load_settings({"CLINIC_DATABASE_URL": "mysql://u:hunter2@db/clinic"})
    with pytest.raises(ConfigError) as caught:
        settings.require_database_url()
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("value", ["verbose", "10", "TRACE", "notset"])
def test_an_unknown_log_level_is_refused(value: str) -> None:
    assert "CLINIC_LOG_LEVEL" in refusal({"CLINIC_LOG_LEVEL": value})


@pytest.mark.parametrize(("value", "level"), [("debug", "DEBUG"), ("Warning", "WARNING")])
def test_log_levels_are_case_insensitive(value: str, level: str) -> None:
    assert load_settings({"CLINIC_LOG_LEVEL": value}).log_level == level


def test_a_missing_public_key_file_is_refused(tmp_path: Path) -> None:
    message = refusal({"CLINIC_JWT_PUBLIC_KEY_FILE": str(tmp_path / "absent.pem")})
    assert "CLINIC_JWT_PUBLIC_KEY_FILE" in message


@pytest.mark.parametrize(
    "content",
    [b"not a key", b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", b""],
)
def test_a_public_key_file_without_a_pem_public_key_is_refused(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    assert "not a PEM public key" in refusal({"CLINIC_JWT_PUBLIC_KEY_FILE": str(path)})


def test_a_pem_public_key_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = load_settings({"CLINIC_JWT_PUBLIC_KEY_FILE": str(path)})
    assert settings.jwt_public_key_file == str(path)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("smtp://user:s3cret@mail:25", "smtp://user:***@mail:25"),
        ("postgresql://u:p%40ss@h/db?x=1", "postgresql://u:***@h/db?x=1"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("smtp://user@mail", "smtp://user@mail"),
        ("nats://u:p#w@h:4222", "nats://u:***@h:4222"),
        ("postgresql://u:a/b?c@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an @ in the password
        (
            "postgresql://h/db?user=u&password=s3cret&x=1",
            "postgresql://h/db?user=u&password=***&x=1",
        ),
        ("nats://a:1@h1:4222,nats://b:2@h2:4222", "nats://a:***@h1:4222,nats://b:***@h2:4222"),
        # A NATS user without a password is a token.
        ("nats://s3cr3tTOKEN@h:4222", "nats://***@h:4222"),
        ("TLS://tok@h1,nats://h2", "TLS://***@h1,nats://h2"),
        ("s3cr3t@h:4222", "***@h:4222"),
        ("postgresql://user@h/db", "postgresql://user@h/db"),
        # A comma in a password (asyncpg takes it), or between a DSN's hosts.
        ("postgresql://u:Sup3r,Tail@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@h1:5432,h2:5432/db", "postgresql://u:***@h1:5432,h2:5432/db"),
        ("nats://u:a,b@h1,nats://v:c,d@h2", "nats://u:***@h1,nats://v:***@h2"),
        ("tok,en@h:4222", "***@h:4222"),
    ],
)
def test_mask_password_hides_only_the_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


@pytest.mark.parametrize(
    "url", ["http://user:s3cret@mail:25", "smtp://user:s3cret@mail:port", "smtp://user:s3cret@"]
)
def test_smtp_url_refusal_does_not_reveal_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SmtpConfig.from_url(url)
    assert "CLINIC_SMTP_URL" in str(caught.value) and "s3cret" not in str(caught.value)


def test_http_keep_alive_defaults_above_common_proxy_idle_timeouts() -> None:
    assert load_settings({}).http_keep_alive_seconds == 75
    assert load_settings({"CLINIC_HTTP_KEEP_ALIVE_SECONDS": "620"}).http_keep_alive_seconds == 620


@pytest.mark.parametrize("value", ["0", "-5", "3601", "1.5", "long"])
def test_an_unusable_http_keep_alive_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="CLINIC_HTTP_KEEP_ALIVE_SECONDS"):
        load_settings({"CLINIC_HTTP_KEEP_ALIVE_SECONDS": value})


def test_websocket_nats_urls_are_kept_where_nats_py_can_use_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "websocket_support", lambda: True)
    urls = ["wss://nats.example:443", "ws://b:80"]
    assert load_settings({"CLINIC_NATS_URL": ",".join(urls)}).nats_urls == urls


def test_websocket_nats_urls_without_aiohttp_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "websocket_support", lambda: False)
    message = refusal({"CLINIC_NATS_URL": "wss://nats.example:443"})
    assert "CLINIC_NATS_URL" in message and "aiohttp" in message


def test_websocket_support_follows_whether_aiohttp_is_importable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = importlib.util.find_spec("aiohttp") is not None
    assert config.websocket_support() is found
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *_: None)
    assert config.websocket_support() is False


def test_settings_carry_what_the_variables_say() -> None:
    settings = load_settings(
        {
            "CLINIC_START_WINDOW_MINUTES": "30",
            "CLINIC_HTTP_HOST": "0.0.0.0",
            "CLINIC_CONSISTENCY_WAIT_MS": "750",
            "CLINIC_IDEMPOTENCY_KEY_TTL_HOURS": "48",
            "CLINIC_NATS_STREAM_REPLICAS": "3",
            "CLINIC_NOTIFICATION_RETENTION_DAYS": "90",
        }
    )
    assert settings.rules.start_window == timedelta(minutes=30)
    assert settings.http_host == "0.0.0.0"
    assert settings.consistency_wait_ms == 750
    assert settings.idempotency_key_ttl_hours == 48
    assert settings.nats_stream_replicas == 3
    assert settings.notification_retention_days == 90
    assert load_settings({}).notification_retention_days == 30


BOUNDS = [
    ("CLINIC_HTTP_PORT", "0", "65535", "-1", "65536"),
    ("CLINIC_START_WINDOW_MINUTES", "0", "1440", "-1", "1441"),
    ("CLINIC_IDEMPOTENCY_KEY_TTL_HOURS", "1", "8784", "0", "8785"),
    ("CLINIC_NATS_STREAM_REPLICAS", "1", "5", "0", "6"),
    ("CLINIC_CONSISTENCY_WAIT_MS", "0", "60000", "-1", "60001"),
    ("CLINIC_HTTP_KEEP_ALIVE_SECONDS", "1", "3600", "0", "3601"),
    ("CLINIC_NOTIFICATION_RETENTION_DAYS", "1", "3660", "0", "3661"),
]


@pytest.mark.parametrize(("name", "lowest", "highest", "below", "above"), BOUNDS)
def test_numbers_are_accepted_up_to_their_bounds_and_refused_past_them(
    name: str, lowest: str, highest: str, below: str, above: str
) -> None:
    for accepted in (lowest, highest):
        load_settings({name: accepted})
    for refused in (below, above):
        assert name in refusal({name: refused})


@pytest.mark.parametrize(
    ("value", "prefix"),
    [
        ("nats://appointments:secret@nats:4222", "_INBOX.appointments"),
        ("nats://a:1@n1:4222,nats://b:2@n2:4222", "_INBOX.a"),  # the first that names one
        ("nats://n1:4222,tls://notifications:s%2Cx@n2:4222", "_INBOX.notifications"),
        ("nats://appointments:@nats:4222", "_INBOX.appointments"),  # nats-py: still a user
        ("nats://127.0.0.1:4222", "_INBOX"),
        ("nats://s3cr3t-token@nats:4222", "_INBOX"),  # a token, not a user
        ("nats://clinic.api:secret@nats:4222", "_INBOX"),  # a dot would be a subject token
        ("nats://%3E:secret@nats:4222", "_INBOX"),
    ],
)
def test_the_reply_inbox_is_the_nats_users_own(value: str, prefix: str) -> None:
    assert load_settings({"CLINIC_NATS_URL": value}).nats_inbox_prefix == prefix
