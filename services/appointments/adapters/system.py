"""The real clock and id source (the domain gets both injected)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


def new_uuid() -> uuid.UUID:
    """A random UUID (v4)."""
    return uuid.uuid4()
