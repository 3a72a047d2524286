"""Fixtures every test tier uses: where PostgreSQL and NATS come from, and test isolation.

Servers, first match wins:

1. ``CLINIC_TEST_DATABASE_URL`` / ``CLINIC_TEST_NATS_URL`` (each on its own);
2. PostgreSQL: testcontainers (``postgres:16``) when a Docker engine answers
   (``CLINIC_TEST_DOCKER=0`` skips the probe), else the embedded server of ``clinic dev``
   (:mod:`services.embedded`), one per pytest(-xdist worker) session;
3. NATS: the embedded ``nats-server``, one per test, else (no usable binary)
   testcontainers (``nats:2.10 -js``) when a Docker engine answers.

Fixtures (their names are a contract for every test tier):

``pg_server_url`` (session)
    DSN of the server's ``postgres`` maintenance database.
``database_url`` (function)
    DSN of a database of this test alone, copied from a template database migrated once
    per session (one template per worker process), dropped afterwards.
``nats_url`` (function)
    A NATS server whose JetStream state no other test sees: a dedicated embedded
    ``nats-server``; or, with ``CLINIC_TEST_NATS_URL``, the shared server, emptied of
    every stream (KV and object buckets included) before the test, with the tests
    using it serialised across processes by a file lock held for the test's duration.
``nats_server`` (function)
    A dedicated, started :class:`~services.embedded.EmbeddedNats` the test may stop,
    kill, pause or restart (fault tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest

from services.appointments.adapters.postgres.migrate import migrate, migration_files
from services.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    ServerStartError,
    nats_server_binary,
    pid_alive,
)
from services.logs import Throttle

log = logging.getLogger(__name__)

ENV_DATABASE_URL = "CLINIC_TEST_DATABASE_URL"
ENV_NATS_URL = "CLINIC_TEST_NATS_URL"
ENV_DOCKER = "CLINIC_TEST_DOCKER"

POSTGRES_IMAGE = "postgres:16"
NATS_IMAGE = "nats:2.10"

#: Settings of the embedded and containerised PostgreSQL: room for the concurrency
#: tests' pools, and a bounded WAL (the data may live in memory). Both also trade
#: durability against an OS crash for speed.
TEST_PG_SETTINGS = {"max_connections": "300", "max_wal_size": "256MB", "min_wal_size": "32MB"}

T = TypeVar("T")


# ------------------------------------------------------------------------- helpers


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a private thread.

    Keeps the fixtures synchronous, so they work for sync tests and for async tests
    whatever loop scope those use, without touching the test's event loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    async def main() -> None:
        result.append(await factory())

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="fixture-loop")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _is_loopback(dsn: str) -> bool:
    host = urlsplit(dsn).hostname or "localhost"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _schema_digest() -> str:
    digest = hashlib.sha256()
    for name, sql in migration_files():
        digest.update(name.encode() + b"\0" + sql.encode() + b"\0")
    return digest.hexdigest()[:8]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@functools.cache
def _docker_answers() -> bool:
    """Whether a Docker engine answers, decided cheaply: no socket, no probe."""
    if os.environ.get(ENV_DOCKER, "").lower() in ("0", "false", "no", "off"):
        return False
    if not os.environ.get("DOCKER_HOST"):
        sockets = [
            Path("/var/run/docker.sock"),
            Path.home() / ".docker" / "run" / "docker.sock",
            Path(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent")) / "docker.sock",
        ]
        if not any(sock.exists() for sock in sockets):
            return False
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        log.info("no Docker engine answers (%s): using embedded servers", exc)
        return False
    return True


def _scratch_base() -> str | None:
    """``/dev/shm`` when it is a roomy writable tmpfs, else the system temp dir.

    On a disk file system each ``CREATE DATABASE`` creates and later unlinks ~1,400
    files: 250-300 ms a test here (ext4 mounted with ``discard``), 10 ms in memory.
    """
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    roomy = st.f_bavail * st.f_frsize >= 2 * 1024**3
    return shm if roomy and os.access(shm, os.W_OK | os.X_OK) else None


@pytest.fixture(autouse=True)
def _fresh_log_throttles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the first of each throttled warning: a throttle remembers for its
    process, and a worker runs many tests, so a warning a test looks for could be held
    back by one an earlier test caused (``services.logs.Throttle``)."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for log_filter in getattr(logger, "filters", ()):
            if isinstance(log_filter, Throttle):
                monkeypatch.setattr(log_filter, "_seen", {})


@pytest.fixture(scope="session")
def _session_dir() -> Iterator[Path]:
    """A private folder for this session's servers (in memory when possible).

    Not pytest's ``tmp_path_factory``: as root, the embedded PostgreSQL runs as an
    unprivileged user who must be able to reach its data, and ``pytest-of-root`` is 0700.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = Path(tempfile.mkdtemp(prefix=f"clinic-test-{worker}-", dir=_scratch_base()))
    path.chmod(0o711)  # enterable, not listable
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_server_url(_session_dir: Path) -> Iterator[str]:
    """DSN of the PostgreSQL server's ``postgres`` database (session)."""
    from_env = os.environ.get(ENV_DATABASE_URL)
    if from_env:
        yield from_env
        return
    if _docker_answers():
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers < 4.14
            from testcontainers.postgres import PostgresContainer

        settings = " ".join(f"-c {k}={v}" for k, v in TEST_PG_SETTINGS.items())
        container = PostgresContainer(
            POSTGRES_IMAGE,
            username="postgres",
            password="postgres",
            dbname="postgres",
            driver=None,
        )
        container.with_command(f"{settings} -c fsync=off -c synchronous_commit=off")
        if hasattr(container, "with_tmpfs_mount"):  # testcontainers >= 4.13
            container.with_tmpfs_mount("/var/lib/postgresql/data")
        with container:
            yield container.get_connection_url()
        return
    server = EmbeddedPostgres(
        _session_dir / "postgres",
        fast=True,
        settings=TEST_PG_SETTINGS,
        die_with_parent=True,
    )
    server.start()
    try:
        yield server.dsn
    finally:
        server.stop()


_STALE_NAME = re.compile(r"^clinic_(?:tpl|test)_(\d+)_[0-9a-f]+$")


async def _drop_database(conn: asyncpg.Connection, name: str) -> None:
    if conn.get_server_version().major >= 13:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
    else:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote(name)}")


async def _drop_stale_databases(conn: asyncpg.Connection, server_dsn: str) -> None:
    """Drop test databases left by test processes of this machine that died."""
    if not _is_loopback(server_dsn):
        return
    names = await conn.fetch(
        "SELECT datname FROM pg_database WHERE datname LIKE 'clinic\\_t%' ORDER BY datname"
    )
    for row in names:
        match = _STALE_NAME.match(row["datname"])
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(asyncpg.PostgresError):
                await _drop_database(conn, row["datname"])


@pytest.fixture(scope="session")
def _template_database(pg_server_url: str) -> Iterator[str]:
    """Name of a database migrated once for this session, the template of every test's.

    Named after this process, so xdist workers (and other test runs on a shared
    server) never share one: a template being copied must have no other session.
    """
    name = f"clinic_tpl_{os.getpid()}_{_schema_digest()}{uuid.uuid4().hex[:6]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await _drop_stale_databases(conn, pg_server_url)
            await conn.execute(f"CREATE DATABASE {_quote(name)}")
        finally:
            await conn.close()
        await migrate(_with_database(pg_server_url, name))

    async def drop() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await _drop_database(conn, name)
        finally:
            await conn.close()

    _run(create)
    try:
        yield name
    finally:
        _run(drop)


@pytest.fixture
def database_url(pg_server_url: str, _template_database: str) -> Iterator[str]:
    """DSN of a fresh, migrated database of this test alone (dropped afterwards)."""
    name = f"clinic_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(
                f"CREATE DATABASE {_quote(name)} TEMPLATE {_quote(_template_database)}"
            )
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await _drop_database(conn, name)
        finally:
            await conn.close()

    _run(create)
    try:
        yield _with_database(pg_server_url, name)
    finally:
        _run(drop)


# ---------------------------------------------------------------------------- NATS


@contextlib.contextmanager
def _exclusive(url: str) -> Iterator[None]:
    """Hold a machine-wide lock named after ``url`` (every xdist worker, every run)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"clinic-test-nats-{digest}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def _empty_jetstream(url: str) -> None:
    """Delete every stream (KV and object-store buckets are streams too) on ``url``."""
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        jsm = nc.jsm()
        while True:
            streams = await jsm.streams_info()
            if not streams:
                return
            for info in streams:
                if info.config.name:
                    await jsm.delete_stream(info.config.name)
    finally:
        await nc.close()


@contextlib.contextmanager
def _dedicated_nats(root: Path) -> Iterator[EmbeddedNats]:
    store = Path(tempfile.mkdtemp(prefix="nats-", dir=root))
    server = EmbeddedNats(store, die_with_parent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def _docker_nats_url() -> Iterator[str]:
    """A NATS container shared by the session (only when no nats-server binary exists)."""
    try:
        from testcontainers.community.nats import NatsContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.nats import NatsContainer

    with NatsContainer(NATS_IMAGE, jetstream=True) as container:
        url: str = container.nats_uri()
        yield url


@contextlib.contextmanager
def _shared_nats(url: str) -> Iterator[str]:
    with _exclusive(url):
        _run(lambda: _empty_jetstream(url))
        yield url


def _embedded_nats_usable() -> bool:
    try:
        nats_server_binary()
    except ServerStartError:
        return False
    return True


@pytest.fixture
def nats_url(request: pytest.FixtureRequest, _session_dir: Path) -> Iterator[str]:
    """URL of a NATS server (JetStream on) whose state no other test sees."""
    from_env = os.environ.get(ENV_NATS_URL)
    if from_env:
        with _shared_nats(from_env) as url:
            yield url
        return
    if not _embedded_nats_usable() and _docker_answers():
        shared: Any = request.getfixturevalue("_docker_nats_url")
        with _shared_nats(str(shared)) as url:
            yield url
        return
    with _dedicated_nats(_session_dir) as server:
        yield server.url


@pytest.fixture
def nats_server(_session_dir: Path) -> Iterator[EmbeddedNats]:
    """A dedicated, started embedded NATS server the test may stop, kill or restart."""
    with _dedicated_nats(_session_dir) as server:
        yield server
