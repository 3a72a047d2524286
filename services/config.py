"""Configuration from ``CLINIC_*`` environment variables (see interfaces.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

import msgspec

from services.appointments.domain.rules import Rules

#: name -> (default, meaning); the ``--help`` of every command prints this table.
VARIABLES: dict[str, tuple[str | None, str]] = {
    "CLINIC_DATABASE_URL": (None, "PostgreSQL DSN (required outside `clinic dev`)"),
    "CLINIC_NATS_URL": ("nats://127.0.0.1:4222", "NATS server(s), comma-separated"),
    "CLINIC_NATS_STREAM_REPLICAS": (
        "1",
        "replicas of the JetStream streams (3 on a 3-node cluster); an existing stream is"
        " grown to it, never shrunk",
    ),
    "CLINIC_HTTP_HOST": ("127.0.0.1", "HTTP listen host"),
    "CLINIC_HTTP_PORT": ("8000", "HTTP listen port"),
    "CLINIC_JWT_SECRET": (None, "HS256 secret; tokens are refused when no key is configured"),
    "CLINIC_JWT_PUBLIC_KEY_FILE": (None, "PEM public key for RS256/ES256/EdDSA tokens"),
    "CLINIC_JWT_ISSUER": (None, "expected `iss` claim, checked when set"),
    "CLINIC_JWT_AUDIENCE": (None, "expected `aud` claim, checked when set"),
    "CLINIC_START_WINDOW_MINUTES": ("15", "how early a visit can be started"),
    "CLINIC_CONSISTENCY_WAIT_MS": ("2000", "longest a read waits for a consistency token"),
    "CLINIC_IDEMPOTENCY_KEY_TTL_HOURS": (
        "24",
        "how long a retry with the same Idempotency-Key gets the first answer",
    ),
    "CLINIC_SMTP_URL": (None, "e.g. smtp://127.0.0.1:1025; email is off when unset"),
    "CLINIC_LOG_LEVEL": ("INFO", "log level"),
}


class ConfigError(Exception):
    """A variable is missing or malformed."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None
    nats_urls: list[str]
    nats_stream_replicas: int = 1
    http_host: str
    http_port: int
    jwt_secret: str | None
    jwt_public_key_file: str | None
    jwt_issuer: str | None
    jwt_audience: str | None
    start_window_minutes: int
    consistency_wait_ms: int
    idempotency_key_ttl_hours: int = 24
    smtp_url: str | None
    log_level: str

    @property
    def rules(self) -> Rules:
        return Rules(start_window=timedelta(minutes=self.start_window_minutes))

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("CLINIC_DATABASE_URL is required (a PostgreSQL DSN).")
        return self.database_url


def _int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = _get(env, name) or ""
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}.") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}.")
    return value


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value == "":
        return VARIABLES[name][0]
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    nats = _get(env, "CLINIC_NATS_URL") or ""
    return Settings(
        database_url=_get(env, "CLINIC_DATABASE_URL"),
        nats_urls=[url.strip() for url in nats.split(",") if url.strip()],
        nats_stream_replicas=_int(env, "CLINIC_NATS_STREAM_REPLICAS", 1, 5),
        http_host=_get(env, "CLINIC_HTTP_HOST") or "127.0.0.1",
        http_port=_int(env, "CLINIC_HTTP_PORT", 0, 65535),
        jwt_secret=_get(env, "CLINIC_JWT_SECRET"),
        jwt_public_key_file=_get(env, "CLINIC_JWT_PUBLIC_KEY_FILE"),
        jwt_issuer=_get(env, "CLINIC_JWT_ISSUER"),
        jwt_audience=_get(env, "CLINIC_JWT_AUDIENCE"),
        start_window_minutes=_int(env, "CLINIC_START_WINDOW_MINUTES", 0, 24 * 60),
        consistency_wait_ms=_int(env, "CLINIC_CONSISTENCY_WAIT_MS", 0, 60_000),
        idempotency_key_ttl_hours=_int(env, "CLINIC_IDEMPOTENCY_KEY_TTL_HOURS", 1, 24 * 366),
        smtp_url=_get(env, "CLINIC_SMTP_URL"),
        log_level=(_get(env, "CLINIC_LOG_LEVEL") or "INFO").upper(),
    )


def variables_help() -> str:
    """The table of variables, for ``--help``."""
    lines = ["environment variables:"]
    width = max(map(len, VARIABLES))
    for name, (default, meaning) in VARIABLES.items():
        shown = f" (default {default})" if default is not None else ""
        lines.append(f"  {name:<{width}}  {meaning}{shown}")
    return "\n".join(lines)
