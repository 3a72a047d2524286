"""Turning driver failures into the errors the application understands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from services.errors import Unavailable
from services.pg_errors import CONNECTION_ERRORS, passing_refusal

__all__ = ["CONNECTION_ERRORS", "database_errors", "passing_refusal", "refused_by_content"]


@contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise connection-level failures, and refusals that pass with time (a read-only
    server after a failover, a full disk, a cancelled statement), as :class:`Unavailable`
    (HTTP 503). Deadlocks and serialization failures stay as they are: the append decides
    again on fresh state after those."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise Unavailable("The database is unreachable; retry shortly.") from exc
    except asyncpg.PostgresError as exc:
        if not _passing_whatever_is_sent(exc):
            raise
        raise Unavailable("The database cannot take this right now; retry shortly.") from exc


def refused_by_content(exc: BaseException) -> bool:
    """Whether a statement failed because of what (some of) its rows hold, not because
    PostgreSQL is unreachable or refuses anything for now: a constraint, a deadlock, a
    value asyncpg cannot encode."""
    if isinstance(exc, asyncpg.InterfaceError):
        return isinstance(exc, ValueError)  # asyncpg's client-side DataError
    return (
        isinstance(exc, asyncpg.PostgresError)
        and not isinstance(exc, CONNECTION_ERRORS)
        and not _passing_whatever_is_sent(exc)
    )


def _passing_whatever_is_sent(exc: BaseException) -> bool:
    """A refusal that passes and that no other statement would avoid (unlike a deadlock or
    a serialization failure, class 40, which another order of the writes may not meet)."""
    return passing_refusal(exc) and not str(getattr(exc, "sqlstate", "")).startswith("40")
