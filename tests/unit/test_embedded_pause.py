"""A paused test server is hung on return from ``pause()``: every thread of the server and
of its children (PostgreSQL's backends, each in a process group of its own) stopped, not
merely sent SIGSTOP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from services.embedded import _children, _Server

_SPIN = "import threading\nthreading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n"
#: A thread and the main thread busy, in the child as in the parent: running when signalled.
_CHILD = _SPIN + "while True: pass\n"
_PARENT = (
    "import subprocess, sys\n"
    f"subprocess.Popen([sys.executable, '-c', {_CHILD!r}], start_new_session=True)\n"
    + _SPIN
    + "while True: pass\n"
)


def _states(pid: int) -> list[str]:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as fh:
            states.append(fh.read().rsplit(")", 1)[1].split()[0])
    return states


def test_pause_returns_once_the_server_and_its_children_are_stopped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _PARENT], start_new_session=True)
    pids = [proc.pid]
    try:
        deadline = time.monotonic() + 10
        while not (children := _children(proc.pid)) or len(_states(children[0])) < 2:
            assert time.monotonic() < deadline, "the child never started its thread"
            time.sleep(0.01)
        pids += children
        server = _Server()
        server._proc = proc
        server.pause()
        assert {pid: set(_states(pid)) for pid in pids} == {pid: {"T"} for pid in pids}
    finally:
        for pid in {*pids, *_children(proc.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
