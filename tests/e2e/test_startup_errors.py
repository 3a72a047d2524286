"""What an operator sees when a ``clinic`` process cannot start or stops in a bad moment:
one line and an exit status, never a traceback, and SIGTERM always obeyed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import nats
import nats.js.errors
import pytest

from contracts.subjects import EVENTS_STREAM, NOTIFICATIONS_STREAM
from services.auth import mint_token
from services.config import config_error_in, load_settings
from services.embedded import EmbeddedNats
from services.notifications.main import run_notifications
from tests.e2e.conftest import free_port, wait_until_live, wait_until_ready
from tests.support.builders import schedule_json
from tests.support.processes import REPO, clinic_command

SECRET = "startup-errors-test-secret-long-enough-for-hs256"
SERVICES = [("appointments",), ("notifications",)]


def clinic_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env.update({"CLINIC_JWT_SECRET": SECRET, "PYTHONPATH": str(REPO), **variables})
    return env


def served_env(database_url: str, nats_url: str) -> tuple[int, dict[str, str]]:
    """A free HTTP port, and the environment of a service on it with these servers."""
    port = free_port()
    return port, clinic_env(
        CLINIC_DATABASE_URL=database_url, CLINIC_NATS_URL=nats_url, CLINIC_HTTP_PORT=str(port)
    )


def client_of(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5)


def assert_only_log_lines(stderr: str) -> None:
    """Every line is a JSON log record or one ``clinic: …`` message: no raw traceback."""
    for line in stderr.splitlines():
        assert line.startswith(("{", "clinic: ")), stderr


@contextlib.asynccontextmanager
async def started(
    args: tuple[str, ...], env: Mapping[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *clinic_command(*args),
        env=dict(env),
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_for_line(process: asyncio.subprocess.Process, *texts: str) -> list[str]:
    """The stderr lines up to and including the first one containing one of ``texts``."""
    assert process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while True:
            raw = await process.stderr.readline()
            assert raw, f"exited ({await process.wait()}) before {texts!r}: {lines}"
            lines.append(raw.decode(errors="replace"))
            if any(text in lines[-1] for text in texts):
                return lines


async def stop_and_wait(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """SIGTERM, then the exit status and the rest of stderr (a hung process fails)."""
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            rest = await process.stderr.read()
            return await process.wait(), rest.decode(errors="replace")
    except TimeoutError:
        raise AssertionError("did not exit after SIGTERM") from None


@pytest.mark.parametrize("command", SERVICES)
async def test_sigterm_while_nats_is_unreachable_at_start_exits_0(
    database_url: str, command: tuple[str, ...]
) -> None:
    nowhere = free_port()  # nothing listens there
    env = clinic_env(
        CLINIC_DATABASE_URL=database_url,
        CLINIC_NATS_URL=f"nats://127.0.0.1:{nowhere}",
        CLINIC_HTTP_PORT=str(free_port()),
    )
    async with started(command, env) as process:
        await wait_for_line(process, "nats unreachable")
        # nats-py tries again every second; the log says so once, not every time.
        await asyncio.sleep(2.5)
        status, rest = await stop_and_wait(process)
    assert status == 0, rest
    assert_only_log_lines(rest)
    warnings = [msgspec.json.decode(line) for line in rest.splitlines() if line.startswith("{")]
    assert not [w for w in warnings if w["level"] == "WARNING" and "nats" in w["message"]], rest


@pytest.mark.parametrize("command", SERVICES)
async def test_sigterm_after_nats_went_away_exits_0_quietly(
    database_url: str, nats_server: EmbeddedNats, command: tuple[str, ...]
) -> None:
    port, env = served_env(database_url, nats_server.url)
    async with started(command, env) as process:
        async with client_of(port) as client:
            await wait_until_live(client, 30)
            await wait_until_ready(client)  # NATS answered
            nats_server.stop()
            await wait_for_line(process, "nats disconnected")
        status, rest = await stop_and_wait(process)
    assert status == 0, rest
    assert_only_log_lines(rest)


@pytest.mark.parametrize("command", [("appointments",), ("appointments", "--roles", "relay")])
async def test_http_port_in_use_is_one_line_naming_the_variable(
    database_url: str, nats_url: str, command: tuple[str, ...]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clinic_env(
            CLINIC_DATABASE_URL=database_url, CLINIC_NATS_URL=nats_url, CLINIC_HTTP_PORT=str(port)
        )
        async with started(command, env) as process:
            assert process.stderr is not None
            async with asyncio.timeout(60):
                stderr = (await process.stderr.read()).decode(errors="replace")
                status = await process.wait()
    assert status != 0
    assert_only_log_lines(stderr)
    clinic_lines = [line for line in stderr.splitlines() if line.startswith("clinic:")]
    assert len(clinic_lines) == 1 and "CLINIC_HTTP_PORT" in clinic_lines[0], stderr


@pytest.mark.parametrize("service", ["notifications", "appointments"])
async def test_jetstream_refusing_the_stream_replicas_is_exit_2_in_one_line(
    database_url: str, nats_url: str, service: str
) -> None:
    """More replicas than one NATS server holds: the process exits (2) in one line. The
    appointments service (its relay and projector) stayed ready and published nothing."""
    env = clinic_env(
        CLINIC_DATABASE_URL=database_url,
        CLINIC_NATS_URL=nats_url,
        CLINIC_HTTP_PORT=str(free_port()),
        CLINIC_NATS_STREAM_REPLICAS="3",
    )
    result = await asyncio.to_thread(
        subprocess.run,
        clinic_command(service),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert_only_log_lines(result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("clinic:") and "CLINIC_NATS_STREAM_REPLICAS=3" in last, result.stderr


def database_dsn(server_url: str, name: str) -> str:
    """``server_url`` (a DSN) with another database name."""
    base, mark, query = server_url.partition("?")
    return base.rpartition("/")[0] + f"/{name}" + mark + query


def run_clinic(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        clinic_command(*args),
        env=clinic_env(**variables),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrate_against_a_refused_port_is_one_line_and_exit_1() -> None:
    dsn = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/clinic"
    result = run_clinic("migrate", CLINIC_DATABASE_URL=dsn)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("clinic: cannot reach PostgreSQL")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "CLINIC_DATABASE_URL" in result.stderr and "hunter2" not in result.stderr


def test_migrate_of_a_missing_database_is_one_line_and_exit_2(pg_server_url: str) -> None:
    dsn = database_dsn(pg_server_url, f"no_such_db_{uuid.uuid4().hex}")
    result = run_clinic("migrate", CLINIC_DATABASE_URL=dsn)
    assert result.returncode == 2, result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["migrate", "rebuild-visits"])
@pytest.mark.parametrize("query", ["foo=1", "statement_timeout=abc"])
def test_migrate_with_a_setting_postgresql_refuses_is_one_line_and_exit_2(
    database_url: str, command: str, query: str
) -> None:
    result = run_clinic(command, CLINIC_DATABASE_URL=_with_query(query)(database_url))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("clinic: invalid PostgreSQL DSN"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("dsn", ["mysql://db/clinic", "postgresql://db:port/clinic"])
def test_malformed_database_url_is_refused_before_connecting(dsn: str) -> None:
    result = run_clinic("migrate", CLINIC_DATABASE_URL=dsn)
    assert result.returncode == 2
    assert result.stderr.startswith("clinic: CLINIC_DATABASE_URL")


def _with_query(query: str) -> Callable[[str], str]:
    return lambda dsn: f"{dsn}{'&' if '?' in dsn else '?'}{query}"


def _with_user(user: str) -> Callable[[str], str]:
    def change(dsn: str) -> str:
        parts = urlsplit(dsn)
        netloc = f"{user}@{parts.netloc.rpartition('@')[2]}"
        return urlunsplit(parts._replace(netloc=netloc))

    return change


@pytest.mark.parametrize("command", SERVICES, ids=lambda command: command[0])
@pytest.mark.parametrize(
    ("change", "said"),
    [
        (_with_query("sslmode=bogus"), "sslmode"),  # asyncpg refuses it before connecting
        (_with_query("foo=1"), 'unrecognized configuration parameter "foo"'),
        (_with_query("statement_timeout=soon"), 'invalid value for parameter "statement_timeout"'),
    ],
    ids=["sslmode", "unknown-setting", "bad-setting"],
)
def test_a_database_url_that_cannot_work_as_written_stops_the_service_at_start(
    database_url: str, command: tuple[str, ...], change: Callable[[str], str], said: str
) -> None:
    # It would otherwise run on, never ready, retrying what cannot work.
    dsn = change(database_url)
    result = run_clinic(*command, CLINIC_DATABASE_URL=dsn, CLINIC_HTTP_PORT=str(free_port()))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("clinic: CLINIC_DATABASE_URL="), result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_an_api_without_a_token_key_says_so_at_start(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    _, env = served_env(database_url, nats_server.url)
    del env["CLINIC_JWT_SECRET"]
    async with started(("appointments", "--roles", "api"), env) as process:
        lines = await wait_for_line(process, "no token key is configured", "Uvicorn running")
        assert "no token key is configured" in lines[-1], lines
        status, rest = await stop_and_wait(process)
    assert status == 0, rest


async def test_the_database_a_service_uses_is_named_at_start(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    # A DSN without a database name means the user's database: the log says which.
    _, env = served_env(database_url, nats_server.url)
    async with started(("appointments", "--roles", "api"), env) as process:
        lines = await wait_for_line(process, "postgresql: database", "Uvicorn running")
        status, _ = await stop_and_wait(process)
    name = database_url.partition("?")[0].rpartition("/")[2]
    assert f"postgresql: database {name}," in lines[-1], lines
    assert status == 0


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda dsn: database_dsn(dsn, "no_such_db_here"), '"no_such_db_here" does not exist'),
        (_with_user("nobody_here"), '"nobody_here"'),  # refused, whatever the auth method
    ],
    ids=["no-database", "no-role"],
)
async def test_a_refused_login_at_start_is_said_loudly_and_waited_out(
    database_url: str, nats_server: EmbeddedNats, change: Callable[[str], str], said: str
) -> None:
    # Likely the DSN, but it can pass (the role or database made later, a password
    # rotated): the process runs, not ready, and says why at once.
    port, env = served_env(change(database_url), nats_server.url)
    async with started(("appointments", "--roles", "api"), env) as process:
        record = json.loads((await wait_for_line(process, "PostgreSQL refuses"))[-1])
        assert record["level"] == "ERROR" and said in record["message"], record
        async with client_of(port) as client:
            await wait_until_live(client, 30)
            ready = await client.get("/health/ready")
            assert ready.status_code == 503 and "postgresql unreachable" in ready.text
        status, rest = await stop_and_wait(process)
    assert status == 0, rest
    assert_only_log_lines(rest)


def _fake_postgresql(
    answer: str,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server speaking just enough of PostgreSQL's protocol: ``starting`` refuses every
    login with 57P03 (the database system is starting up); ``hanging`` takes the login
    and then never answers a query."""

    def message(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("!i", len(body) + 4) + body

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # an SSLRequest (answered "no") comes before the startup message
                length, code = struct.unpack("!ii", await reader.readexactly(8))
                await reader.readexactly(length - 8)
                if code == 80877102:  # a CancelRequest: PostgreSQL just hangs up
                    return
                if code != 80877103:
                    break
                writer.write(b"N")
            if answer == "starting":
                fields = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0"
                writer.write(message(b"E", fields))
                await writer.drain()
                writer.close()
                return
            writer.write(
                message(b"R", struct.pack("!i", 0))
                + message(b"S", b"server_version\x0015.0\x00")
                + message(b"S", b"client_encoding\x00UTF8\x00")
                + message(b"K", struct.pack("!ii", 4242, 4242))
                + message(b"Z", b"I")
            )
            await writer.drain()
            await reader.read()  # queries go unanswered until the client leaves
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return serve


@pytest.mark.parametrize("answer", ["starting", "hanging"])
async def test_a_postgresql_starting_up_or_hanging_at_start_is_an_outage(
    nats_server: EmbeddedNats, answer: str
) -> None:
    fake = await asyncio.start_server(_fake_postgresql(answer), "127.0.0.1", 0)
    dsn = f"postgresql://clinic@127.0.0.1:{fake.sockets[0].getsockname()[1]}/clinic"
    port, env = served_env(dsn, nats_server.url)
    try:
        async with started(("appointments", "--roles", "api"), env) as process:
            async with client_of(port) as client:
                await wait_until_live(client, 30)  # within the check's 3 s, and serving
                ready = await client.get("/health/ready")
                assert ready.status_code == 503 and "postgresql unreachable" in ready.text
            stopping = time.monotonic()
            status, rest = await stop_and_wait(process)
            took = time.monotonic() - stopping
    finally:
        fake.close()
    assert status == 0, rest
    assert_only_log_lines(rest)
    # The probe's connection is still out on the silent server: dropped after 3 s (it
    # held the stop ~10 s more), within the ~10 s a stop takes at most.
    assert took < 10, f"the stop took {took:.1f} s"


async def test_rebuild_of_an_unmigrated_database_says_to_migrate(pg_server_url: str) -> None:
    name = f"clinic_unmigrated_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        dsn = database_dsn(pg_server_url, name)
        result = await asyncio.to_thread(run_clinic, "rebuild-visits", CLINIC_DATABASE_URL=dsn)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.close()
    assert result.returncode == 2, result.stderr
    assert "clinic migrate" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", SERVICES)
async def test_live_and_not_ready_while_nats_is_unreachable_at_start_then_ready(
    database_url: str, nats_server: EmbeddedNats, command: tuple[str, ...]
) -> None:
    # A liveness probe must not restart a process that only waits for NATS.
    nats_server.stop()  # its port stays the one CLINIC_NATS_URL names
    port, env = served_env(database_url, nats_server.url)
    async with started(command, env) as process:
        async with client_of(port) as client:
            await wait_until_live(client, 30)
            not_ready = await client.get("/health/ready")
            assert not_ready.status_code == 503 and "nats unreachable" in not_ready.text
            nats_server.start()
            await wait_until_ready(client)
        status, rest = await stop_and_wait(process)
    assert status == 0, rest
    assert_only_log_lines(rest)


@pytest.mark.fault
async def test_commands_taken_before_nats_answers_are_published_once_it_does(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    nats_server.stop()
    port, env = served_env(database_url, nats_server.url)
    patient, clinic_id = uuid.uuid4(), uuid.uuid4()
    token = mint_token(SECRET, "patient", patient, clinic_id)
    starts_at = datetime.now(UTC) + timedelta(hours=2)
    async with started(("appointments",), env) as process:
        async with client_of(port) as client:
            await wait_until_live(client, 30)
            created = await client.post(
                "/v1/appointments",
                json=schedule_json(patient, starts_at),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert created.status_code == 201, created.text
            assert (await client.get("/health/ready")).status_code == 503  # NATS still away
            nats_server.start()
            await wait_until_ready(client)
        appointment_id = created.json()["appointment_id"]
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            async with asyncio.timeout(30):
                while True:  # the relay publishes what waited in the outbox
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        if (await js.stream_info(EVENTS_STREAM)).state.messages:
                            break
                    await asyncio.sleep(0.05)
            message = await js.get_msg(EVENTS_STREAM, 1)
        finally:
            await nc.close()
        assert msgspec.json.decode(message.data or b"")["stream_id"] == appointment_id
        status, rest = await stop_and_wait(process)
    assert status == 0, rest
    assert_only_log_lines(rest)


async def test_a_notification_service_failing_at_start_stops_serving_its_probes(
    database_url: str, nats_url: str
) -> None:
    port = free_port()
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_NATS_STREAM_REPLICAS": "3",  # more than this one NATS server can hold
            "CLINIC_HTTP_PORT": str(port),
        }
    )
    with pytest.raises(BaseException) as failure:
        await run_notifications(settings, asyncio.Event(), serve_ops_http=True)
    assert config_error_in(failure.value) is not None, failure.value
    # Its probes' HTTP server went with it: nothing listens, nothing of it still runs.
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_the_notification_service_is_ready_only_once_its_streams_exist(
    database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS answers, the streams are still being made (held here): live, not ready."""
    import services.notifications.main as notifications_main

    hold = asyncio.Event()
    make_service = notifications_main.notification_service

    async def held(*args: Any, **kwargs: Any) -> Any:
        await hold.wait()
        return await make_service(*args, **kwargs)

    monkeypatch.setattr(notifications_main, "notification_service", held)
    port, env = served_env(database_url, nats_url)
    stop = asyncio.Event()
    running = asyncio.create_task(run_notifications(load_settings(env), stop, serve_ops_http=True))
    try:
        async with client_of(port) as client:
            await wait_until_live(client)
            nc = await nats.connect(nats_url)
            try:
                for _ in range(100):  # until the service's connection is made
                    ready = await client.get("/health/ready")
                    if "nats unreachable" not in ready.text:
                        break
                    await asyncio.sleep(0.05)
                assert ready.status_code == 503 and "starting" in ready.json()["detail"]
                with pytest.raises(nats.js.errors.NotFoundError):
                    await nc.jetstream().stream_info(NOTIFICATIONS_STREAM)
                hold.set()
                await wait_until_ready(client)
                await nc.jetstream().stream_info(NOTIFICATIONS_STREAM)  # made by then
            finally:
                await nc.close()
    finally:
        stop.set()
        hold.set()
        await asyncio.wait_for(running, 20)


async def test_a_stop_answers_waiting_reads_and_a_second_sigterm_exits_130_at_once(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    port, env = served_env(database_url, nats_server.url)
    env["CLINIC_CONSISTENCY_WAIT_MS"] = "60000"
    token = mint_token(SECRET, "patient", uuid.uuid4(), uuid.uuid4())
    async with (
        started(("appointments",), env) as process,
        client_of(port) as client,
        _resumed_after(nats_server),
    ):
        await wait_until_live(client, 30)
        await wait_until_ready(client)
        # A read waiting for a write nobody made: the stop answers it at once (stale).
        waiting = asyncio.create_task(
            client.get(
                "/v1/visits",
                headers={
                    "Authorization": f"Bearer {token}",
                    "X-Consistency-Token": f"{uuid.uuid4()}.3",
                },
                timeout=60,
            )
        )
        await _read_waits_on_the_view(database_url)
        # NATS hangs: the graceful stop's drain of the NATS service API waits long.
        nats_server.pause()
        process.send_signal(signal.SIGTERM)
        # At once: its wait is 60 s, and the graceful stop itself takes ~10 s.
        answered = await asyncio.wait_for(waiting, 8)
        assert answered.status_code == 200 and answered.headers["X-Consistency"] == "stale"
        await wait_for_line(process, "Finished server process")
        assert process.returncode is None  # still draining the NATS service API
        process.send_signal(signal.SIGTERM)
        # At once, not after the drain's ~10 s.
        status = await asyncio.wait_for(process.wait(), 6)
    assert status == 130


@contextlib.asynccontextmanager
async def _resumed_after(server: EmbeddedNats) -> AsyncIterator[None]:
    try:
        yield
    finally:
        server.resume()  # if the test paused it


async def _read_waits_on_the_view(database_url: str) -> None:
    """Until the service has read the stream of a consistency token's appointment (its
    read repair, after which a token nobody can reach waits out its time): the request is
    in flight, waiting."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(1500):  # 30 s
            if await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()"
                " AND query LIKE '%FROM events WHERE stream_id = $1%')"
            ):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the read never waited for its token")
    finally:
        await conn.close()
