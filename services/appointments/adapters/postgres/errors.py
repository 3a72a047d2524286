"""Turning driver failures into the errors the application understands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import asyncpg

from services.errors import Unavailable

#: Failures that mean "PostgreSQL is not reachable right now", not "the request is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


@contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise connection-level failures as :class:`Unavailable` (HTTP 503)."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise Unavailable("The database is unreachable; retry shortly.") from exc


#: SQLSTATEs of refusals that pass with time, whatever the statement holds: serialization
#: failures and deadlocks (class 40), exhausted resources such as a full disk (53),
#: cancelled statements and shutdowns (57), system and I/O errors, a read-only server (after
#: a failover), a lock not available.
_PASSING_CLASSES: Final = ("40", "53", "57")
_PASSING_STATES: Final = ("25006", "55P03", "58000", "58030")


def passing_refusal(exc: BaseException) -> bool:
    """Whether PostgreSQL refused for a reason of its own state that passes (the same
    statement can succeed later), not because of what the statement holds."""
    state = getattr(exc, "sqlstate", None)
    if not isinstance(exc, asyncpg.PostgresError) or not isinstance(state, str):
        return False
    return state[:2] in _PASSING_CLASSES or state in _PASSING_STATES


def refused_by_content(exc: BaseException) -> bool:
    """Whether a statement failed because of what (some of) its rows hold, not because
    PostgreSQL is unreachable: a constraint, a deadlock, a value asyncpg cannot encode."""
    if isinstance(exc, asyncpg.InterfaceError):
        return isinstance(exc, ValueError)  # asyncpg's client-side DataError
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, CONNECTION_ERRORS)
