"""A clock the test moves by hand."""

from __future__ import annotations

import sys
from collections import Counter
from datetime import UTC, datetime, timedelta


class ManualClock:
    """Starts at ``start`` (default: the real now) and moves only when told.

    ``reads`` counts the readings by the function that read it (its qualified name), so a
    test can wait until a loop has run again after the clock moved."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)
        self.reads: Counter[str] = Counter()

    def __call__(self) -> datetime:
        self.reads[sys._getframe(1).f_code.co_qualname] += 1
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now
