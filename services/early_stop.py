"""A stop signal that comes while a ``clinic`` process is still starting.

Light on purpose (``signal`` only): the console script installs it on its first line, before
the quarter of a second it takes to import the rest, so that SIGTERM or Ctrl-C then is
remembered instead of killing the process (or printing a ``KeyboardInterrupt`` traceback).
"""

from __future__ import annotations

import signal
from typing import Any, Final

#: The signals a service stops on.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class EarlyStop:
    """SIGINT or SIGTERM while the process is still starting (importing, reading its
    settings), before the event loop's handler takes over: remembered, so that a service
    told to stop then exits 0 without starting rather than being killed (status 143)."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._before: dict[int, Any] = {}

    def install(self) -> None:
        """Note the stop signals from now on (once: a second call keeps what was noted)."""
        if self._installed():
            return
        self.requested = None
        self._before = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}

    def _installed(self) -> bool:
        return any(signal.getsignal(sig) == self._note for sig in STOP_SIGNALS)

    def _note(self, signum: int, _frame: object) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)

    def uninstall(self, *, deliver: bool = False) -> None:
        """The handlers from before again (unless the event loop's took over) and, if
        ``deliver``, a signal that came meanwhile handed to them: a command that runs no
        service (``migrate``) is stopped by SIGTERM or Ctrl-C as ever."""
        for sig, before in self._before.items():
            if signal.getsignal(sig) == self._note:
                signal.signal(sig, before)
        self._before = {}
        requested, self.requested = self.requested, None  # no later run of this process sees it
        if deliver and requested is not None:
            signal.raise_signal(requested)


#: The process's one.
EARLY_STOP: Final = EarlyStop()


def main() -> None:
    """Entry point of the ``clinic`` console script."""
    EARLY_STOP.install()
    from services.cli import main as cli_main

    cli_main()
