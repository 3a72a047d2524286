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
    """Re-raise connection-level failures as :class:`Unavailable` (HTTP 503)."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise Unavailable("The database is unreachable; retry shortly.") from exc


def refused_by_content(exc: BaseException) -> bool:
    """Whether a statement failed because of what (some of) its rows hold, not because
    PostgreSQL is unreachable: a constraint, a deadlock, a value asyncpg cannot encode."""
    if isinstance(exc, asyncpg.InterfaceError):
        return isinstance(exc, ValueError)  # asyncpg's client-side DataError
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, CONNECTION_ERRORS)
