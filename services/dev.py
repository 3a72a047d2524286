"""``clinic dev``: the whole system on one machine, with embedded PostgreSQL and NATS.

One process tree: this process runs every role of both services; PostgreSQL and
``nats-server`` are its children, started from the pip-installed binaries with
``die_with_parent`` (Linux ends them if this process dies without stopping them) and
stopped by their process ids in a ``finally``. A server that exits by itself stops
everything with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from services.config import ROLES, ConfigError, Settings
from services.embedded import EmbeddedNats, EmbeddedPostgres

log = logging.getLogger(__name__)

DEV_DATABASE = "clinic"
#: The embedded server speaks no TLS: say so in its DSNs, or a ``PGSSLMODE=require`` in the
#: developer's shell (which libpq-style clients such as asyncpg read) refuses to connect.
NO_SSL = "?sslmode=disable"
SECRET_FILE = "jwt-secret"
LOCK_FILE = "dev.lock"
SERVER_STOP_SECONDS = 5.0
SERVICES_STOP_SECONDS = 9.0


class DevError(Exception):
    """``clinic dev`` cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DevOptions:
    """The command line of ``clinic dev``."""

    data_dir: Path
    demo: bool = False


def say(text: str) -> None:
    """A line for the person at the terminal (stdout; logs go to stderr)."""
    print(text, flush=True)


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``data_dir``: one ``clinic dev`` per data folder."""
    with open(data_dir / LOCK_FILE, "a+", encoding="ascii") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            raise DevError(
                f"another `clinic dev` (pid {owner}) is using {data_dir}; stop it first"
                " or pass another --data-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


def dev_secret(settings: Settings, data_dir: Path) -> str:
    """``CLINIC_JWT_SECRET`` if set, else the one kept in ``data_dir`` (made on first use)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = data_dir / SECRET_FILE
    if path.is_file() and (kept := path.read_text(encoding="ascii").strip()):
        say(f"JWT secret: kept in {path} (set CLINIC_JWT_SECRET to use another)")
        return kept
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret + "\n")
    say(f"JWT secret: generated one and keep it in {path}, so tokens stay valid across runs")
    return secret


def url_host(host: str) -> str:
    """``host`` as a URL names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def check_port_free(host: str, port: int) -> None:
    """Fail early, before starting any server, when the HTTP port is taken (or 0: the
    URL it prints, and its own readiness check, need the port it listens on)."""
    if port == 0:
        raise ConfigError(
            "clinic dev needs a fixed CLINIC_HTTP_PORT (not 0): it prints the API's URL"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::1", "::"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as uvicorn binds "::": IPv6 only
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:  # a setting to change, like any process's taken port
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}): stop what uses it or set"
                " CLINIC_HTTP_PORT"
            ) from None


async def ensure_database(server_dsn: str, name: str) -> None:
    """Create database ``name`` on the server unless it exists."""
    conn = await asyncpg.connect(server_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


Servers = dict[str, EmbeddedPostgres | EmbeddedNats]


def stop_servers(servers: Servers) -> None:
    """Stop every server at once, each by its own process id; returns when all are gone.

    Blocking on purpose: it runs last, and must finish even if the caller is cancelled.
    """
    threads = [
        threading.Thread(target=server.stop, args=(SERVER_STOP_SECONDS,), name=f"stop {name}")
        for name, server in servers.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def dead_server(servers: Servers) -> DevError | None:
    """The error to report when a server is no longer running, else ``None``."""
    for name, server in servers.items():
        if not server.is_running:
            return DevError(f"{name} exited unexpectedly; its log: {server.log_file}")
    return None


async def watch_servers(servers: Servers, stop: asyncio.Event) -> None:
    """Raise :class:`DevError` as soon as a server exits while it should be running."""
    while not stop.is_set():
        if (error := dead_server(servers)) is not None:
            raise error
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def http_ready(host: str, port: int) -> bool:
    """Whether ``GET /health/ready`` answers 200."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(
            f"GET /health/ready HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        status = await asyncio.wait_for(reader.readline(), 2.0)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return status.split(b" ")[1:2] == [b"200"]


async def announce_when_ready(
    settings: Settings, stop: asyncio.Event, text: str, started: float
) -> None:
    """Print ``text`` once the API answers ready, with the time since ``started``."""
    probe_host = settings.http_host
    if probe_host in ("0.0.0.0", ""):  # every address: ask on the loopback
        probe_host = "127.0.0.1"
    elif probe_host == "::":
        probe_host = "::1"
    while not stop.is_set():
        if await http_ready(probe_host, settings.http_port):
            say(f"{text}\n(ready in {time.monotonic() - started:.1f}s)")
            return
        await asyncio.sleep(0.1)


async def run_until_first_exit(
    services: dict[str, Coroutine[Any, Any, None]], stop: asyncio.Event
) -> None:
    """Run ``services`` until ``stop`` is set or one of them ends; then stop them all.

    Raises the first failure; a service that ends by itself before ``stop`` is one.
    """
    tasks = [asyncio.create_task(coro, name=name) for name, coro in services.items()]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        early = [task.get_name() for task in done if not stop.is_set()]
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=SERVICES_STOP_SECONDS)
        for task in tasks:
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
    if early:
        raise DevError(f"{', '.join(early)} stopped by itself")


def dev_database_url(pg: EmbeddedPostgres) -> str:
    """The DSN of the development database on the embedded server."""
    return pg.url(DEV_DATABASE) + NO_SSL


def _urls(pg: EmbeddedPostgres, nats: EmbeddedNats, api: str) -> str:
    return "\n".join(
        [
            "",
            "clinic dev is ready: every role of appointments (api, relay, projector)"
            " and notifications runs.",
            f"  API         {api}",
            f"  OpenAPI UI  {api}/schema/swagger",
            f"  health      {api}/health/ready",
            f"  metrics     {api}/metrics",
            f"  PostgreSQL  {dev_database_url(pg)}",
            f"  NATS        {nats.url}",
            "Press Ctrl-C to stop.",
        ]
    )


async def _demo_text(settings: Settings, api: str) -> str:
    from services.appointments.adapters.system import utc_now
    from services.appointments.bootstrap import appointments_container
    from services.demo import demo_report, demo_tokens, seed_demo

    async with appointments_container(settings, with_nats=False, pool_size=2) as container:
        items = await seed_demo(container.appointments, utc_now(), settings.rules)
    return demo_report(items, demo_tokens(settings), api, utc_now())


async def run_dev(settings: Settings, options: DevOptions, stop: asyncio.Event) -> None:
    """Start the servers, migrate, optionally seed the demo, run every service until ``stop``."""
    from services.appointments.adapters.postgres.migrate import migrate
    from services.appointments.main import run_appointments
    from services.notifications.main import run_notifications

    started = time.monotonic()
    data_dir = options.data_dir.absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DevError(f"cannot use --data-dir {data_dir}: {exc.strerror or exc}") from None
    with data_dir_lock(data_dir):
        check_port_free(settings.http_host, settings.http_port)
        secret = dev_secret(settings, data_dir)
        pg = EmbeddedPostgres(data_dir / "postgres", die_with_parent=True)
        nats = EmbeddedNats(data_dir / "nats", die_with_parent=True)
        servers: Servers = {"PostgreSQL": pg, "NATS": nats}
        try:
            say(f"starting PostgreSQL and NATS (data in {data_dir}) ...")
            # Both attempts finish before the `finally` stops the servers, failed or not.
            for outcome in await asyncio.gather(pg.astart(), nats.astart(), return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
            await ensure_database(pg.dsn + NO_SSL, DEV_DATABASE)
            applied = await migrate(dev_database_url(pg))
            say(f"database ready ({len(applied)} migration(s) applied)")
            settings = msgspec.structs.replace(
                settings, database_url=dev_database_url(pg), nats_urls=[nats.url], jwt_secret=secret
            )
            api = f"http://{url_host(settings.http_host)}:{settings.http_port}"
            banner = _urls(pg, nats, api)
            if options.demo:
                banner += "\n\n" + await _demo_text(settings, api)
            if stop.is_set():
                return
            services = {
                "appointments": run_appointments(settings, ROLES, stop),
                "notifications": run_notifications(settings, stop),
                "servers": watch_servers(servers, stop),
                "banner": _forever_after(
                    announce_when_ready(settings, stop, banner, started), stop
                ),
            }
            try:
                await run_until_first_exit(services, stop)
            except Exception as exc:
                # A server that died is the cause of whatever the services ran into.
                if (error := dead_server(servers)) is not None:
                    raise error from exc
                raise
        finally:
            stop_servers(servers)
            say("clinic dev stopped")
    sys.stdout.flush()


async def _forever_after(coro: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``coro``, then wait for ``stop``: a helper that finishing early is no failure."""
    await coro
    await stop.wait()
