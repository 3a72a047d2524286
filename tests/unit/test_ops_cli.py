"""The command line's answers to operator mistakes, and shutting down whatever state NATS
is in: one line, a meaningful exit status, never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import APIError, ServiceUnavailableError

from services import cli
from services.appointments.adapters.nats.streams import describe, stream_refused
from services.appointments.bootstrap import close_nats
from services.auth import TokenVerifier
from services.cli import build_parser, database_failure, main, run_until_signalled
from services.config import ConfigError, Settings, config_error_in, load_settings, parse_roles
from services.embedded import EmbeddedNats, ServerStartError, free_port
from services.logs import configure_logging


def test_repeated_roles_run_once() -> None:
    assert parse_roles("api,api, relay,api") == ["api", "relay"]


@pytest.mark.parametrize("value", [",", " ", ", ,"])
def test_roles_naming_no_role_say_so(value: str) -> None:
    with pytest.raises(ConfigError, match="no role given"):
        parse_roles(value)


def _token_args(*extra: str) -> list[str]:
    ids = ["--sub", str(uuid.uuid4()), "--clinic", str(uuid.uuid4())]
    return ["token", "--role", "staff", *ids, *extra]


@pytest.mark.parametrize("ttl", ["-100", "0", "soon"])
def test_token_ttl_must_be_a_positive_integer(ttl: str) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(_token_args("--ttl", ttl))
    assert exited.value.code == 2


def test_token_ttl_accepts_a_positive_integer() -> None:
    assert build_parser().parse_args(_token_args("--ttl", "60")).ttl == 60


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_each_command_s_help_lists_the_variables_it_reads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dev = _help("dev", capsys)
    assert "CLINIC_NATS_SERVER_BIN" in dev and "CLINIC_PG_INSTALL_DIR" in dev
    assert "CLINIC_SMTP_URL" in dev and "CLINIC_JWT_SECRET" in dev
    assert "CLINIC_DATABASE_URL" not in dev and "CLINIC_NATS_URL" not in dev  # its own servers
    migrate = _help("migrate", capsys)
    assert "CLINIC_DATABASE_URL" in migrate and "CLINIC_LOG_LEVEL" in migrate
    for other in ("CLINIC_PG_INSTALL_DIR", "CLINIC_NATS_URL", "CLINIC_JWT_SECRET", "CLINIC_SMTP"):
        assert other not in migrate, other
    notifications = _help("notifications", capsys)
    assert "CLINIC_SMTP_URL" in notifications and "CLINIC_NOTIFICATION_RETENTION" in notifications
    assert "CLINIC_JWT" not in notifications and "CLINIC_IDEMPOTENCY" not in notifications
    appointments = _help("appointments", capsys)
    assert "CLINIC_JWT_PUBLIC_KEY_FILE" in appointments and "CLINIC_SMTP_URL" not in appointments
    assert "CLINIC_DATABASE_URL" not in _help("token", capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["notifications"],
        ["appointments", "--roles", "relay,projector"],
        ["migrate"],
    ],
)
def test_a_command_does_not_check_a_variable_it_does_not_read(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file mounted in the api pods only, named in the ConfigMap every pod shares,
    must not stop the relay's or the notification service's pods (a restart loop)."""
    read: list[Settings] = []
    monkeypatch.setenv("CLINIC_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/x")
    monkeypatch.setenv("CLINIC_JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")
    monkeypatch.setenv("CLINIC_JWT_SECRET", "short")
    if argv[0] != "notifications":
        monkeypatch.setenv("CLINIC_NOTIFICATION_RETENTION_DAYS", "0")
        monkeypatch.setenv("CLINIC_SMTP_URL", "ftp://nowhere")
    args = cli.build_parser().parse_args(argv)
    monkeypatch.setattr(args, "handler", lambda settings, _: read.append(settings))
    cli._run(args)
    (settings,) = read
    assert settings.jwt_public_key_file is None and settings.jwt_secret is None


def test_the_api_role_still_checks_the_token_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINIC_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/x")
    monkeypatch.setenv("CLINIC_JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")
    args = cli.build_parser().parse_args(["appointments", "--roles", "relay,api"])
    monkeypatch.setattr(args, "handler", lambda *_: None)
    with pytest.raises(SystemExit) as exited:
        cli._run(args)
    assert exited.value.code == 2


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), 1, "cannot reach"),
        (TimeoutError(), 1, "cannot reach"),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), 2, "does not exist"),
        (asyncpg.InvalidPasswordError("password authentication failed"), 2, "login"),
        (asyncpg.UndefinedTableError('relation "visits" does not exist'), 2, "clinic migrate"),
        (asyncpg.ClientConfigurationError("invalid DSN"), 2, "DSN"),
        (asyncpg.UndefinedObjectError('unrecognized configuration parameter "foo"'), 2, "DSN"),
        (asyncpg.InvalidParameterValueError('invalid value for parameter "x": "y"'), 2, "DSN"),
        (asyncpg.UndefinedObjectError('type "missing" does not exist'), 1, "failed"),
        (TimeoutError("could not lock the visits table"), 1, "could not lock the visits"),
    ],
)
def test_database_failures_become_one_line_and_a_status(
    error: BaseException, status: int, words: str
) -> None:
    failure = database_failure(error)
    assert failure is not None
    message, code = failure
    assert code == status and words in message and "\n" not in message


def test_other_errors_are_not_taken_for_database_failures() -> None:
    assert database_failure(RuntimeError("bug")) is None
    # A stored event that does not decode is no DSN problem.
    assert database_failure(msgspec.ValidationError("Expected `int`")) is None


def test_a_configuration_error_inside_a_task_group_is_found() -> None:
    inner = ConfigError("port taken")
    group = ExceptionGroup("roles", [ExceptionGroup("api", [inner])])
    assert config_error_in(group) is inner
    assert config_error_in(ExceptionGroup("x", [RuntimeError("bug")])) is None


class _DeadNats:
    """A client whose server went away after the flush: draining fails, and then closing
    fails too."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closed = False

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (nats-py)
        self.calls.append("flush")

    async def drain(self) -> None:
        self.calls.append("drain")
        raise ConnectionResetError("nats: connection lost")

    async def close(self) -> None:
        self.closed = True
        raise ConnectionResetError("nats: connection lost")


async def test_closing_nats_after_a_failed_drain_never_raises() -> None:
    nc = _DeadNats()
    await close_nats(cast(NATS, nc))
    assert nc.calls == ["flush", "drain"] and nc.closed


def test_a_nats_api_error_is_described_by_its_description() -> None:
    error = APIError(code=500, description="insufficient resources", err_code=10023)
    assert repr(error) in ("ServerError()", "APIError()")  # why repr will not do
    assert "insufficient resources" in describe(error)
    assert describe(ConnectionRefusedError()) == "ConnectionRefusedError()"
    missing = asyncpg.UndefinedTableError('relation "events" does not exist')
    assert "not migrated yet: run clinic migrate" in describe(missing)
    # The notification service's last word after a minute of it, as the retries' warnings.
    refused = str(stream_refused(1, ServiceUnavailableError()))
    assert "JetStream does not answer" in refused and "`-js`" in refused


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """Every test here leaves the root logger as it found it (``main`` configures it: INFO
    at the root would let later tests of this worker capture other libraries' lines)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.captureWarnings(False)  # a test before may have left it half on
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_library_warnings_are_logged_as_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("the key is short", UserWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["logger"] == "py.warnings" and "the key is short" in record["message"]


def test_a_short_jwt_secret_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.auth"):
        TokenVerifier.from_settings(load_settings({"CLINIC_JWT_SECRET": "short"}))
        TokenVerifier.from_settings(load_settings({"CLINIC_JWT_SECRET": "x" * 32}))
    warned = [r for r in caplog.records if "CLINIC_JWT_SECRET" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("CLINIC_NATS_SERVER_BIN", "/nonexistent/nats-server", "not an executable file"),
        ("CLINIC_PG_INSTALL_DIR", "/nonexistent/pg", "holds no PostgreSQL"),
    ],
)
def test_clinic_dev_refuses_a_server_variable_naming_nothing_usable(
    variable: str,
    value: str,
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # Not quietly replaced by the wheels' servers: the user named another one.
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        main(["dev", "--data-dir", str(tmp_path / "dev")])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("clinic:") and f"{variable}={value}" in message and words in message
    assert not (tmp_path / "dev").exists()  # refused before anything started


def test_a_server_program_this_machine_cannot_run_is_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    program = tmp_path / "nats-server"
    program.write_bytes(b"\x7fELF not for this machine")  # no shebang: exec format error
    program.chmod(0o755)
    server = EmbeddedNats(tmp_path / "nats", binary=program)
    with pytest.raises(ServerStartError, match=r"cannot run .*nats-server: Exec format error"):
        server.start()
    assert not server.is_running


def test_clinic_dev_refuses_a_data_dir_it_cannot_make_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["dev", "--data-dir", str(taken / "dev")])
    assert exited.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("clinic dev: cannot use --data-dir") and "\n" not in message


def test_clinic_token_checks_only_the_variables_it_reads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_JWT_SECRET", "token-test-secret-long-enough-for-hs256-x")
    monkeypatch.setenv("CLINIC_NATS_URL", "bogus://not-a-nats-url")  # not its concern
    monkeypatch.setenv("CLINIC_HTTP_PORT", "not-a-port")
    main(["token", "--role", "staff", "--sub", str(uuid.uuid4()), "--clinic", str(uuid.uuid4())])
    token = capsys.readouterr().out.strip()
    assert token.count(".") == 2  # a JWT


@pytest.mark.parametrize("command", ["migrate", "rebuild-visits"])
def test_database_commands_check_only_the_variables_they_read(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A job given the service's whole environment: a malformed variable of the service
    # is not its concern; it gets as far as the database (nothing listens there).
    monkeypatch.setenv("CLINIC_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("CLINIC_NATS_URL", "bogus://not-a-nats-url")
    monkeypatch.setenv("CLINIC_HTTP_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exited:
        main([command])
    message = capsys.readouterr().err
    assert exited.value.code != 0
    assert "CLINIC_DATABASE_URL" in message
    assert "CLINIC_NATS_URL" not in message and "CLINIC_HTTP_PORT" not in message


def test_clinic_token_mints_what_the_configured_verifier_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "CLINIC_JWT_SECRET": "token-test-secret-long-enough-for-hs256-x",
        "CLINIC_JWT_ISSUER": "https://auth.clinic.example",
        "CLINIC_JWT_AUDIENCE": "clinic-appointments",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sub, clinic = uuid.uuid4(), uuid.uuid4()
    main(["token", "--role", "patient", "--sub", str(sub), "--clinic", str(clinic)])
    token = capsys.readouterr().out.strip()
    verified = TokenVerifier.from_settings(load_settings(env)).verify(token)
    assert (verified.id, verified.clinic_id, verified.role) == (sub, clinic, "patient")


def test_a_run_that_ends_by_itself_leaves_no_stop_deadline_behind() -> None:
    """The deadline bounds the loop's teardown, then goes: a process (a test, say) that
    carries on after ``main`` failed is not ended by it later."""

    async def failing(_: asyncio.Event) -> None:
        raise RuntimeError("failed at start")

    with pytest.raises(RuntimeError, match="failed at start"):
        run_until_signalled(failing)
    pending = [
        t
        for t in threading.enumerate()
        if isinstance(t, threading.Timer) and not t.finished.is_set()
    ]
    assert pending == []


@pytest.mark.parametrize(
    ("value", "words"), [("api,foo", "unknown roles ['foo']"), (",", "no role")]
)
def test_a_wrong_role_is_refused_before_any_variable_is_read(
    value: str, words: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CLINIC_DATABASE_URL", raising=False)  # would be the error otherwise
    with pytest.raises(SystemExit) as exited:
        main(["appointments", "--roles", value])
    assert exited.value.code == 2
    assert words in capsys.readouterr().err
