"""The test fixtures and the embedded servers they fall back to do what they promise."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import nats
import pytest

from services.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    ServerStartError,
    free_port,
    pid_alive,
    port_answers,
)

ROOT = Path(__file__).resolve().parents[2]


def process_tree(pid: int) -> set[int]:
    """Ids of ``pid`` and its live descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(fields[1])
    tree = {pid} if pid in parents else set()
    grew = True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder under the system temp dir (as root, the PostgreSQL user must reach it)."""
    path = Path(tempfile.mkdtemp(prefix="clinic-fixture-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- databases

_seen_databases: set[str] = set()


@pytest.mark.parametrize("run", range(3))
async def test_each_test_gets_its_own_migrated_empty_database(database_url: str, run: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        assert name not in _seen_databases
        _seen_databases.add(name)
        assert await conn.fetchval("SELECT to_regclass('events') IS NOT NULL")
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 1
        # Leave something behind: the next test must not see it.
        await conn.execute(
            """INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type,
                                   schema_version, data, occurred_at)
               VALUES ($1, $2, 1, $3, 'AppointmentScheduled', 1, '{}', $4)""",
            uuid.uuid4(),
            uuid.uuid4(),
            uuid.uuid4(),
            datetime.now(UTC),
        )
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await conn.close()


async def test_the_test_database_lives_on_the_server_beside_its_template(
    pg_server_url: str, database_url: str
) -> None:
    conn = await asyncpg.connect(pg_server_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "postgres"
        ours = database_url.rsplit("/", 1)[1]
        names = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        assert ours in names
        assert any(n.startswith(f"clinic_tpl_{os.getpid()}_") for n in names)
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'btree_gist'"
        )
    finally:
        await conn.close()


def test_sync_tests_get_the_fixtures_too(database_url: str, nats_url: str) -> None:
    assert database_url.startswith("postgresql://")
    assert nats_url.startswith("nats://")


# --------------------------------------------------------------------------- NATS


@pytest.mark.parametrize("run", range(2))
async def test_nats_url_has_jetstream_and_no_other_tests_state(nats_url: str, run: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        jsm = nc.jsm()
        assert await jsm.streams_info() == []
        await js.add_stream(name="FIXTURE", subjects=["fixture.>"])
        kv = await js.create_key_value(bucket=f"fixture_{run}")
        await kv.put("k", b"v")
        ack = await js.publish("fixture.one", b"hello", headers={"Nats-Msg-Id": "m-1"})
        assert ack.stream == "FIXTURE" and ack.seq == 1
        dup = await js.publish("fixture.one", b"hello", headers={"Nats-Msg-Id": "m-1"})
        assert dup.duplicate
        sub = await js.pull_subscribe("fixture.>", durable="reader")
        [msg] = await sub.fetch(1, timeout=5)
        assert msg.data == b"hello" and msg.subject == "fixture.one"
        await msg.ack()
    finally:
        await nc.close()


async def test_nats_server_fixture_can_be_stopped_and_restarted(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="KEEP", subjects=["keep.>"])
    await js.publish("keep.it", b"1")
    await nc.close()

    pid = nats_server.pid
    assert pid is not None
    nats_server.kill()
    assert wait_gone(pid)
    assert not port_answers(nats_server.host, nats_server.port or 0)

    nats_server.start()  # same port, same JetStream store
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jsm().stream_info("KEEP")
        assert info.state.messages == 1
    finally:
        await nc.close()

    nats_server.pause()  # a hung server still stops promptly
    started = time.monotonic()
    nats_server.stop()
    assert time.monotonic() - started < 5
    assert not nats_server.is_running


# ------------------------------------------------------------- embedded servers


def test_embedded_postgres_runs_on_a_free_port_with_btree_gist_and_leaves_nothing(
    scratch: Path,
) -> None:
    port = free_port()
    server = EmbeddedPostgres(scratch / "pg", port=port, fast=True)
    assert server.install.has_extension("btree_gist")
    with server:
        assert server.dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        pid = server.pid
        assert pid is not None
        sql = """
            CREATE EXTENSION IF NOT EXISTS btree_gist;
            CREATE TABLE b (p uuid, during tstzrange,
                            EXCLUDE USING gist (p WITH =, during WITH &&));
        """
        subprocess.run(
            [str(server.install.binary("psql")), server.dsn, "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True,
            capture_output=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        )
        group = process_tree(pid)
        assert pid in group and len(group) > 1  # the postmaster and its helpers

        server.restart()  # the data survives a restart, on the same port
        assert server.port == port and server.pid != pid
        out = subprocess.run(
            [str(server.install.binary("psql")), server.dsn, "-Atc", "SELECT count(*) FROM b"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert out.strip() == "0"
        pid = server.pid
        assert pid is not None
        group = process_tree(pid)
    assert server.pid is None
    assert not any(pid_alive(p) for p in group)
    assert not port_answers("127.0.0.1", port)


def test_embedded_postgres_that_cannot_start_leaves_no_process(scratch: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedPostgres(scratch / "pg", port=port, fast=True, startup_timeout=20)
        with pytest.raises(ServerStartError, match="could not"):
            server.start()
        assert server.pid is None
    assert not [p for p in _processes_mentioning(str(scratch))]


def test_embedded_nats_starts_fast_and_stops_by_its_pid(scratch: Path) -> None:
    server = EmbeddedNats(scratch / "nats")
    started = time.monotonic()
    server.start()
    elapsed = time.monotonic() - started
    try:
        assert elapsed < 5
        pid = server.pid
        assert pid is not None and pid_alive(pid)
        assert server.url == f"nats://127.0.0.1:{server.port}"
    finally:
        server.stop()
    assert server.pid is None
    assert not pid_alive(pid)
    assert not port_answers("127.0.0.1", server.port or 0)


def test_embedded_nats_that_cannot_start_leaves_no_process(scratch: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedNats(scratch / "nats", port=taken.getsockname()[1])
        with pytest.raises(ServerStartError):
            server.start()
    assert server.pid is None
    assert not _processes_mentioning(str(scratch))


def test_servers_die_with_the_process_that_started_them(scratch: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from services.embedded import EmbeddedNats
        server = EmbeddedNats({str(scratch / "nats")!r}, die_with_parent=True).start()
        print(server.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert pid_alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert wait_gone(pid)


def test_an_initdb_whose_process_died_leaves_no_cluster_half_made(scratch: Path) -> None:
    folder = scratch / "pg"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from services.embedded import EmbeddedPostgres
        EmbeddedPostgres({str(folder)!r}, die_with_parent=True).start()
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not [p for p in _processes_mentioning(str(folder)) if p != parent.pid]:
            assert parent.poll() is None, "the server started without an initdb to cut off"
            assert time.monotonic() < deadline, "initdb never ran"
            time.sleep(0.005)
    finally:
        parent.send_signal(signal.SIGKILL)  # as a second Ctrl-C's os._exit: no cleanup
        parent.wait()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(folder)):  # initdb dies with it, not running on
        assert time.monotonic() < deadline, _processes_mentioning(str(folder))
        time.sleep(0.05)
    assert not (folder / "data").exists()  # made aside, renamed only when whole
    with EmbeddedPostgres(folder, fast=True) as server:  # the next start makes it anew
        assert server.pid is not None
    assert (folder / "data" / "PG_VERSION").is_file()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_a_chosen_port_taken_before_the_server_binds_it_is_left_for_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.embedded as embedded

    with socket.create_server(("127.0.0.1", 0)) as squatter:  # takes the first choice
        taken = squatter.getsockname()[1]
        choices: list[int] = []

        def racing(host: str = embedded.LOOPBACK) -> int:
            choices.append(taken if not choices else free_port(host))
            return choices[-1]

        monkeypatch.setattr(embedded, "free_port", racing)
        server = EmbeddedNats(tmp_path / "nats", startup_timeout=10)
        server.start()
        try:
            assert server.port != taken and len(choices) == 2
        finally:
            server.stop()
