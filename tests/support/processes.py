"""Service processes the fault tests start, ``kill -9`` and start again.

Each :class:`Worker` is one real process (``clinic appointments --roles relay``…), run by
the test's own interpreter from the repository, its output kept in a log file for the
failure message. Linux kills it if the test process dies (a parent-death signal), and it
is always stopped by its own process id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


def clinic_command(*args: str) -> list[str]:
    """``clinic ARGS…`` run by this interpreter (the console script's own entry point)."""
    return [sys.executable, "-c", "from services.early_stop import main; main()", *args]


def _die_with_parent() -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


class Worker:
    """One service process: start it, ``kill -9`` it, start it again, stop it."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.log_path = log_dir / f"{name}.log"
        self.starts = 0
        self.kills = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the process (its output appended to :attr:`log_path`)."""
        assert not self.running, f"{self.name} already runs"
        with self._open_log() as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
                preexec_fn=_die_with_parent(),
            )
        self.starts += 1

    def _open_log(self) -> BinaryIO:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the caller closes it
        log.write(f"--- start {self.starts + 1}\n".encode())
        log.flush()
        return log

    async def kill(self) -> None:
        """``kill -9``: no clean-up of any kind, like a crash or a lost node."""
        proc = self._proc
        assert proc is not None and proc.returncode is None, f"{self.name} is not running"
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        self.kills += 1

    async def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code (None: killed)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return None

    def exited_by_itself(self) -> int | None:
        """The exit code if the process ended without being killed or stopped."""
        return None if self._proc is None else self._proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's output, for a failure message."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return f"== {self.name} ==\n" + "\n".join(text.splitlines()[-lines:])
