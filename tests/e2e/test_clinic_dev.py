"""``clinic dev`` as a newcomer runs it: one command, the whole system, nothing left behind.

Each test runs ``clinic dev`` as a subprocess on a free HTTP port with its own data
folder, drives it over HTTP, and checks by process id (and by scanning ``/proc`` for the
data folder) that no PostgreSQL or NATS process outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.auth import mint_token
from services.demo import (
    DEMO_CLINIC_ID,
    DEMO_PATIENT_ID,
    DEMO_PROVIDER_ID,
    demo_appointment_id,
)
from services.embedded import free_port, pid_alive

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    table = _proc_table()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier}
        found |= frontier
    return found


def processes_using(folder: Path) -> set[int]:
    """Live processes whose command line names ``folder`` (the postmaster, nats-server)."""
    return {pid for pid, (_, cmdline) in _proc_table().items() if str(folder) in cmdline}


class Dev:
    """One ``clinic dev`` subprocess; its output goes to files next to the data folder."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *args: str,
        clinic: list[str] | None = None,
        own_group: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.base_url = f"http://127.0.0.1:{port}"
        runs = len(list(data_dir.parent.glob("stdout-*")))
        self.stdout_path = data_dir.parent / f"stdout-{runs}.txt"
        self.stderr_path = data_dir.parent / f"stderr-{runs}.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
        env.update({"CLINIC_HTTP_PORT": str(port), "CLINIC_LOG_LEVEL": "WARNING"})
        # Ignored by `clinic dev` (it runs its own servers), so not even checked.
        env.update({"CLINIC_DATABASE_URL": "mysql://ignored", "CLINIC_NATS_URL": "bogus://x"})
        # A shell set up for a TLS-only PostgreSQL elsewhere: not for the embedded one.
        env["PGSSLMODE"] = "require"
        if clinic is not None:  # an installed `clinic` (argv), run from the data's parent
            env = {"PATH": "/usr/bin:/bin", "HOME": str(data_dir.parent)}
            env.update({"CLINIC_HTTP_PORT": str(port), "CLINIC_LOG_LEVEL": "WARNING"})
        argv = [
            *(clinic or [sys.executable, "-c", "from services.early_stop import main; main()"]),
            "dev",
        ]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*argv, "--data-dir", str(data_dir), *args],
                cwd=ROOT if clinic is None else data_dir.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # As a shell starts it: a process group of its own, which Ctrl-C signals.
                process_group=0 if own_group else None,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def output(self) -> str:
        return f"stdout:\n{self.stdout}\nstderr (tail):\n{self.stderr_path.read_text()[-3000:]}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"clinic dev exited early:\n{self.output()}"
            if "(ready in" in self.stdout:
                answer = httpx.get(f"{self.base_url}/health/ready", timeout=5)
                assert answer.status_code == 200, answer.text
                return
            time.sleep(0.1)
        pytest.fail(f"clinic dev not ready in {READY_TIMEOUT}s:\n{self.output()}")

    def exported(self, name: str) -> str:
        match = re.search(rf"^\s*export {name}=(\S+)$", self.stdout, re.M)
        assert match, f"no {name} in:\n{self.stdout}"
        return match.group(1)

    def printed_booking(self) -> dict[str, Any]:
        """The body of the printed ``curl … POST …/v1/appointments`` command."""
        match = re.search(r"^\s*curl .*/v1/appointments\" .* -d '(\{.*\})'$", self.stdout, re.M)
        assert match, f"no booking command in:\n{self.stdout}"
        body: dict[str, Any] = json.loads(match.group(1))
        return body

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"clinic dev still running {timeout}s later:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.wait_exit()

    def kill_leftovers(self) -> None:
        """Cleanup after a failed test: never leave processes behind."""
        for pid in descendants(self.proc.pid) | processes_using(self.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def assert_all_gone(pids: set[int], data_dir: Path, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        left = {pid for pid in pids if pid_alive(pid)} | processes_using(data_dir)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, {pid: _proc_table().get(pid) for pid in left}


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: as root, PostgreSQL runs as `nobody`, which must reach its folder,
    # and pytest's root-owned base folder is 0700.
    base = Path(tempfile.mkdtemp(prefix="clinic-dev-test-"))
    base.chmod(0o711)
    yield base / ".clinic"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def start_dev(data_dir: Path) -> Iterator[Any]:
    started: list[Dev] = []

    def start(*args: str) -> Dev:
        dev = Dev(data_dir, free_port(), *args)
        started.append(dev)
        return dev

    yield start
    for dev in started:
        dev.kill_leftovers()


def _bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def test_clinic_dev_runs_everything_stops_cleanly_and_keeps_its_data(
    start_dev: Any, data_dir: Path
) -> None:
    dev: Dev = start_dev("--demo")
    dev.wait_ready()
    assert "JWT secret: generated" in dev.stdout
    secret = (data_dir / "jwt-secret").read_text().strip()
    patient = dev.exported("PATIENT_TOKEN")
    client = httpx.Client(base_url=dev.base_url, timeout=10)

    # The demo: one appointment can be started right away.
    soon = client.get(f"/v1/appointments/{demo_appointment_id(1)}", headers=_bearer(patient))
    assert soon.status_code == 200, soon.text
    assert soon.json()["can_start"] is True

    # Schedule, see it in Upcoming, cancel, see it leave Upcoming (read-your-writes).
    appointment_id = str(uuid.uuid4())
    starts_at = datetime.now(UTC) + timedelta(days=5)
    created = client.post(
        "/v1/appointments",
        headers=_bearer(patient),
        json={
            "appointment_id": appointment_id,
            "patient_id": str(DEMO_PATIENT_ID),
            "provider_id": str(DEMO_PROVIDER_ID),
            "starts_at": starts_at.isoformat(),
            "duration_minutes": 30,
            "timezone": "Europe/Berlin",
        },
    )
    assert created.status_code == 201, created.text
    token = created.headers["x-consistency-token"]
    upcoming = client.get("/v1/visits", headers=_bearer(patient, **{"X-Consistency-Token": token}))
    assert upcoming.headers["x-consistency"] == "fresh"
    assert appointment_id in {v["appointment_id"] for v in upcoming.json()["items"]}

    # A token minted with the kept secret works like the printed one.
    minted = mint_token(secret, "patient", DEMO_PATIENT_ID, DEMO_CLINIC_ID)
    cancelled = client.post(f"/v1/appointments/{appointment_id}/cancel", headers=_bearer(minted))
    assert cancelled.status_code == 200, cancelled.text
    token = cancelled.headers["x-consistency-token"]
    upcoming = client.get("/v1/visits", headers=_bearer(patient, **{"X-Consistency-Token": token}))
    assert upcoming.headers["x-consistency"] == "fresh"
    assert appointment_id not in {v["appointment_id"] for v in upcoming.json()["items"]}
    # The printed booking command, pasted twice: booked, then answered again as a retry.
    booking = dev.printed_booking()
    for _ in range(2):
        pasted = client.post("/v1/appointments", headers=_bearer(patient), json=booking)
        assert pasted.status_code == 201, pasted.text
    client.close()

    servers = processes_using(data_dir)
    assert len(servers) >= 2  # the postmaster and nats-server
    children = descendants(dev.proc.pid)
    assert dev.stop(signal.SIGTERM) == 0, dev.output()
    assert_all_gone(children | servers, data_dir, within=3.0)

    # Again on the same folder: same secret, the appointment is still there, demo kept.
    again: Dev = start_dev("--demo")
    again.wait_ready()
    assert "JWT secret: kept" in again.stdout
    assert again.stdout.count("(kept)") == 3
    with httpx.Client(base_url=again.base_url, timeout=10) as client:
        answer = client.get(f"/v1/appointments/{appointment_id}", headers=_bearer(patient))
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelled"
        # This run's booking command: not the slot the last run's took.
        pasted = client.post(
            "/v1/appointments", headers=_bearer(patient), json=again.printed_booking()
        )
        assert pasted.status_code == 201, pasted.text
    children = descendants(again.proc.pid)
    assert again.stop(signal.SIGINT) == 0, again.output()
    assert_all_gone(children, data_dir, within=3.0)


def test_a_crashed_server_stops_clinic_dev_with_an_error_and_nothing_left(
    start_dev: Any, data_dir: Path
) -> None:
    dev: Dev = start_dev()
    dev.wait_ready()
    children = descendants(dev.proc.pid)
    [nats] = [pid for pid in processes_using(data_dir) if "nats-server" in _proc_table()[pid][1]]
    os.kill(nats, signal.SIGKILL)
    assert dev.wait_exit() != 0
    assert "NATS exited unexpectedly" in dev.stderr_path.read_text(), dev.output()
    assert_all_gone(children, data_dir)


def test_servers_die_with_a_killed_clinic_dev(start_dev: Any, data_dir: Path) -> None:
    dev: Dev = start_dev()
    dev.wait_ready()
    children = descendants(dev.proc.pid)
    assert dev.stop(signal.SIGKILL) == -signal.SIGKILL
    assert_all_gone(children, data_dir)


def test_a_second_clinic_dev_on_the_same_folder_is_refused(start_dev: Any) -> None:
    first: Dev = start_dev()
    first.wait_ready()
    second: Dev = start_dev()
    assert second.wait_exit() == 1
    assert "another `clinic dev`" in second.stderr_path.read_text()
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_a_taken_http_port_stops_clinic_dev_before_any_server_with_exit_2(
    data_dir: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dev = Dev(data_dir, taken.getsockname()[1])
        assert dev.wait_exit() == 2, dev.output()
    assert dev.stderr_path.read_text().startswith("clinic: cannot listen on 127.0.0.1:")
    assert not (data_dir / "postgres").exists()  # refused before starting anything


UNPRIVILEGED = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _runs_as_nobody(python: str) -> bool:
    probe = subprocess.run([*UNPRIVILEGED, python, "-c", "pass"], capture_output=True)
    return probe.returncode == 0


def test_clinic_dev_runs_as_an_unprivileged_user_installed_with_pip() -> None:
    """As a newcomer without root: ``pip install .`` into a venv, then ``clinic dev``.

    Run as root (as CI is), the test installs this checkout into a venv of a Python that
    ``nobody`` can run and runs ``clinic dev`` as ``nobody``; run as a normal user, the other
    tests of this file already are that case, and this one runs the same way.
    """
    base = Path(tempfile.mkdtemp(prefix="clinic-dev-user-"))
    base.chmod(0o755)
    try:
        home = base / "home"
        home.mkdir()
        clinic: list[str] | None = None
        if os.geteuid() == 0:
            candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]
            python = next((c for c in candidates if c and _runs_as_nobody(c)), None)
            assert python, f"no Python that user nobody can run among {candidates}"
            source = base / "src"
            shutil.copytree(
                ROOT,
                source,
                ignore=shutil.ignore_patterns(
                    ".git", ".clinic", "*_cache", "__pycache__", "*.egg-info", "build"
                ),
            )
            venv = base / "venv"
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            installed = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", str(source)],
                capture_output=True,
                text=True,
            )
            assert installed.returncode == 0, installed.stderr[-3000:]
            os.chown(home, *_nobody())
            clinic = [*UNPRIVILEGED, str(venv / "bin" / "clinic")]
        dev = Dev(home / ".clinic", free_port(), "--demo", clinic=clinic)
        try:
            dev.wait_ready()
            patient = dev.exported("PATIENT_TOKEN")
            with httpx.Client(base_url=dev.base_url, timeout=10) as client:
                target = demo_appointment_id(2)
                cancelled = client.post(
                    f"/v1/appointments/{target}/cancel", headers=_bearer(patient)
                )
                assert cancelled.status_code == 200, cancelled.text
                token = cancelled.headers["x-consistency-token"]
                upcoming = client.get(
                    "/v1/visits", headers=_bearer(patient, **{"X-Consistency-Token": token})
                )
                assert upcoming.headers["x-consistency"] == "fresh"
                assert str(target) not in {v["appointment_id"] for v in upcoming.json()["items"]}
            servers = processes_using(dev.data_dir)
            assert len(servers) >= 2
            if clinic is not None:  # the servers run as nobody, not root
                assert all(os.stat(f"/proc/{pid}").st_uid == _nobody()[0] for pid in servers)
            children = descendants(dev.proc.pid)
            assert dev.stop(signal.SIGTERM) == 0, dev.output()
            assert_all_gone(children | servers, dev.data_dir, within=3.0)
        finally:
            dev.kill_leftovers()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def test_ctrl_c_while_the_first_run_makes_its_database_stops_cleanly(data_dir: Path) -> None:
    dev = Dev(data_dir, free_port(), own_group=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(
            "initdb" in _proc_table().get(pid, (0, ""))[1] for pid in descendants(dev.proc.pid)
        ):
            assert dev.proc.poll() is None, f"clinic dev exited early:\n{dev.output()}"
            assert time.monotonic() < deadline, f"initdb never ran:\n{dev.output()}"
            time.sleep(0.01)
        os.killpg(dev.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        status = dev.wait_exit(READY_TIMEOUT)
        assert status == 0, dev.output()
        assert "initdb failed" not in dev.output()
        assert_all_gone(descendants(dev.proc.pid), data_dir)
    finally:
        dev.kill_leftovers()
