"""The ``clinic`` processes as an operator runs them: start, serve, stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from services.embedded import EmbeddedNats
from tests.e2e.conftest import free_port, wait_until_live, wait_until_ready
from tests.support.proxy import FreezingProxy

SECRET = "cli-test-secret-that-is-long-enough-for-hs256"


def clinic(*args: str) -> list[str]:
    return [sys.executable, "-c", "from services.early_stop import main; main()", *args]


def env_for(database_url: str, nats_url: str, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "CLINIC_DATABASE_URL": database_url,
        "CLINIC_NATS_URL": nats_url,
        "CLINIC_HTTP_PORT": str(port),
        "CLINIC_JWT_SECRET": SECRET,
    }


async def stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        process.kill()
        raise AssertionError("did not exit within 10 s of SIGTERM") from None


def test_migrate_is_repeatable_and_token_mints(database_url: str) -> None:
    env = {**os.environ, "CLINIC_DATABASE_URL": database_url, "CLINIC_JWT_SECRET": SECRET}
    again = subprocess.run(clinic("migrate"), env=env, capture_output=True, text=True, check=True)
    assert "applied 0 migration(s)" in again.stdout
    token = subprocess.run(
        clinic(
            "token", "--role", "staff", "--sub", str(uuid.uuid4()), "--clinic", str(uuid.uuid4())
        ),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert token.count(".") == 2


def test_commands_refuse_missing_configuration_clearly() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    result = subprocess.run(clinic("migrate"), env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "CLINIC_DATABASE_URL" in result.stderr
    bad = subprocess.run(
        clinic("appointments", "--roles", "api,nope"),
        env={**env, "CLINIC_DATABASE_URL": "x"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr


#: ``clinic`` with a SIGTERM of its own while it starts (as it reads its settings), before
#: the event loop's signal handler is installed.
SIGTERM_WHILE_STARTING = """
import os, signal, sys
import services.cli as cli

reading = cli.load_settings

def load_settings(env):
    os.kill(os.getpid(), signal.SIGTERM)
    return reading(env)

cli.load_settings = load_settings
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("command", ["appointments", "notifications", "dev"])
def test_a_service_told_to_stop_while_starting_exits_0_without_starting(
    tmp_path: Path, command: str
) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    args = ["--data-dir", str(tmp_path / "dev")] if command == "dev" else []
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_STARTING, command, *args],
        env={**env_for(unreachable, f"nats://127.0.0.1:{free_port()}", free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr  # killed by the signal: -15 (shell: 143)
    assert "stopped before it started" in result.stderr
    assert "running" not in result.stderr and "PostgreSQL" not in result.stderr
    assert not (tmp_path / "dev").exists()  # clinic dev made no data directory


#: ``clinic ARGS…`` with a signal of its own (the first argument) amid its imports: as the
#: program's module is about to be imported, a quarter of a second before its own code runs.
SIGNAL_AMID_THE_IMPORTS = """
import importlib.abc, os, sys

class Signal(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "services.cli":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), int(sys.argv.pop(1)))
        return None

sys.meta_path.insert(0, Signal())
from services.early_stop import main
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_the_program_still_imports_stops_it_without_a_traceback(
    sig: signal.Signals,
) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AMID_THE_IMPORTS, str(int(sig)), "appointments"],
        env=env_for(unreachable, f"nats://127.0.0.1:{free_port()}", free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr  # not killed (-15), no KeyboardInterrupt
    assert f"stopped before it started ({sig.name} while starting)" in result.stderr
    assert "Traceback" not in result.stderr and "running" not in result.stderr


def _sigint_as_in_a_terminal() -> None:
    """``preexec_fn``: SIGINT at its default disposition, as a shell in a terminal starts a
    command. The tests may run with SIGINT ignored (a non-interactive shell's ``pytest &``
    leaves it so, and every child inherits that), and a program started with SIGINT
    ignored rightly goes on ignoring it: Ctrl-C would stop no ``migrate`` then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_a_one_shot_command_still_imports_exits_130_without_a_traceback(
    database_url: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AMID_THE_IMPORTS, str(int(signal.SIGINT)), "migrate"],
        env={**os.environ, "CLINIC_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "applied" not in result.stdout


#: A start that notes a SIGTERM and then fails in another way (a malformed variable); then
#: another run in the same interpreter (``main()`` called again, as by a test).
NOTED_THEN_FAILED = """
import os, signal
import services.cli as cli
from services.config import ConfigError

def load_settings(env):
    os.kill(os.getpid(), signal.SIGTERM)
    raise ConfigError("a malformed variable")

cli.load_settings = load_settings
try:
    cli.main(["notifications"])
except SystemExit as exc:
    assert exc.code == 2, exc.code
ran = []

async def work(stop):
    ran.append(True)

cli.run_until_signalled(work)
print("ran" if ran else "skipped")
"""


def test_a_sigterm_noted_by_a_start_that_failed_is_not_left_for_the_next_run() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NOTED_THEN_FAILED],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr


def test_a_command_that_runs_no_service_is_still_killed_by_sigterm() -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_STARTING, "migrate"],
        env={**os.environ, "CLINIC_DATABASE_URL": unreachable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGTERM, result.stderr


@contextlib.asynccontextmanager
async def ready_process(
    database_url: str, nats_url: str, *command: str
) -> AsyncIterator[httpx.AsyncClient]:
    """``clinic COMMAND`` as a process, ready (NATS answers too); a client of its port.
    Stopped by SIGTERM when the block ends, which it must exit 0 on."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *clinic(*command),
        env=env_for(database_url, nats_url, port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_until_live(client, 20)
            await wait_until_ready(client)
            yield client
        assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("command", [("appointments",), ("notifications",)])
async def test_service_serves_then_exits_0_on_sigterm(
    database_url: str, nats_url: str, command: tuple[str, ...]
) -> None:
    async with ready_process(database_url, nats_url, *command) as client:
        if command == ("appointments",):
            from services.auth import mint_token

            me, clinic_id = uuid.uuid4(), uuid.uuid4()
            token = mint_token(SECRET, "patient", me, clinic_id)
            starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            created = await client.post(
                "/v1/appointments",
                headers={"Authorization": f"Bearer {token}"},
                json={
                    "patient_id": str(me),
                    "provider_id": str(uuid.uuid4()),
                    "starts_at": starts,
                    "duration_minutes": 30,
                    "timezone": "UTC",
                },
            )
            assert created.status_code == 201


@pytest.mark.parametrize(
    ("command", "exports", "never"),
    [
        (
            ("appointments", "--roles", "api"),
            ["clinic_commands_total", "clinic_command_conflict_retries_total"],
            ["clinic_relay_lag_seconds", "clinic_relay_backlog_events", "clinic_projector_lag"],
        ),
        (
            ("appointments", "--roles", "relay,projector"),
            ["clinic_relay_lag_seconds", "clinic_relay_published_total", "clinic_projector_lag"],
            ["clinic_notification_parked"],
        ),
        (
            ("notifications",),
            ["clinic_notification_parked_messages_total", "clinic_notifications_total"],
            ["clinic_relay_lag_seconds", "clinic_projector_lag", "clinic_visits_repair"],
        ),
    ],
)
async def test_a_process_exports_the_gauges_of_the_roles_it_runs_only(
    database_url: str, nats_url: str, command: tuple[str, ...], exports: list[str], never: list[str]
) -> None:
    """A relay lag of 0 from every api and notification process would hide a relay that
    runs nowhere behind a healthy graph."""
    async with ready_process(database_url, nats_url, *command) as client:  # every role started
        text = (await client.get("/metrics")).text
    for name in exports:
        assert name in text, name
    for name in never:
        assert name not in text, name


@pytest.mark.parametrize("command", ["appointments", "notifications"])
async def test_nats_closing_the_connection_for_good_ends_the_service_with_exit_1(
    database_url: str, tmp_path: Path, command: str
) -> None:
    """A server that refuses the process's second subscription (``max_subscriptions: 1``)
    sends ``-ERR``, after which nats-py closes the connection for good: the service stops
    and exits 1 in one line, for its supervisor to start it again, instead of staying live
    and never ready."""
    (tmp_path / "nats.conf").write_text("max_subscriptions: 1\n")
    server = EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(tmp_path / "nats.conf")])
    server.start()
    try:
        process = await asyncio.create_subprocess_exec(
            *clinic(command),
            env=env_for(database_url, server.url, free_port()),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            status = await asyncio.wait_for(process.wait(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        server.stop()
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    assert status == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("clinic: NATS closed the connection for good"), stderr
    assert "maximum subscriptions exceeded" in last.lower(), stderr
    assert "Traceback" not in stderr, stderr


async def test_a_stop_that_a_hung_database_holds_up_ends_at_the_deadline(
    database_url: str, nats_url: str
) -> None:
    """The relay idles on its session connection; PostgreSQL then hangs (accepts, never
    answers) and SIGTERM comes: asyncpg shields a connection's release from cancellation,
    so the stop would wait for ever. The deadline ends the process (status 1, one line)."""
    deadline = 3.0
    async with FreezingProxy(database_url) as proxy:
        proxied = proxy.url
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import services.cli as c; c.STOP_DEADLINE_SECONDS = {deadline}; c.main()",
            "appointments",
            "--roles",
            "relay",
            env=env_for(proxied, nats_url, port),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                await wait_until_live(client, 20)
                await wait_until_ready(client)
            await asyncio.sleep(0.5)  # the relay idles, LISTENing on its session
            proxy.freeze()
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            status = await asyncio.wait_for(process.wait(), deadline + 10)
            took = time.monotonic() - started
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.stderr is not None
    log = (await process.stderr.read()).decode(errors="replace")
    assert status == 1, log[-3000:]
    assert took < deadline + 5, took
    assert f"stop did not finish within {deadline:.0f}s" in log
