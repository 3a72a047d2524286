"""Turning driver failures into the errors the application understands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from services.appointments.adapters.postgres.pools import NoConnectionInTime
from services.appointments.service_layer.ports import NotSent, StatementGaveUp
from services.errors import Unavailable
from services.pg_errors import CONNECTION_ERRORS, passing_refusal, unreachable

__all__ = [
    "CONNECTION_ERRORS",
    "database_errors",
    "passing_refusal",
    "refused_by_content",
    "statement_gave_up",
]

#: What :func:`~services.pg_errors.unreachable` tells apart.
_MAYBE_UNREACHABLE: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.InternalClientError,
)


@contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise connection-level failures, and refusals that pass with time (a read-only
    server after a failover, a full disk, a statement timeout), as :class:`Unavailable`
    (HTTP 503); :class:`StatementGaveUp` where only that statement failed, :class:`NotSent`
    where it was not sent. Deadlocks and
    serialization failures stay as they are: the append decides again after those."""
    try:
        yield
    except NoConnectionInTime as exc:
        raise NotSent(
            "The database is busy: no connection came free in time, nothing was changed;"
            " retry shortly."
        ) from exc
    except TimeoutError as exc:  # no answer in time: the statement's outcome is unknown
        raise Unavailable("The database is busy or does not answer; retry shortly.") from exc
    except _MAYBE_UNREACHABLE as exc:
        if not unreachable(exc):  # asyncpg's other internal errors are mistakes
            raise
        raise Unavailable("The database is unreachable; retry shortly.") from exc
    except asyncpg.PostgresError as exc:
        if statement_gave_up(exc):
            raise StatementGaveUp("The database gave up on this request; retry shortly.") from exc
        if not _server_refuses_all(exc):
            raise
        raise Unavailable("The database cannot take this right now; retry shortly.") from exc


def refused_by_content(exc: BaseException) -> bool:
    """Whether a batch statement failed because of what (some of) its rows hold or what
    they wait for, not because PostgreSQL is unreachable or refuses anything for now: a
    constraint, a deadlock, a lock or statement timeout, a value asyncpg cannot encode."""
    if isinstance(exc, asyncpg.InterfaceError):
        return isinstance(exc, ValueError)  # asyncpg's client-side DataError
    return (
        isinstance(exc, asyncpg.PostgresError)
        and not isinstance(exc, CONNECTION_ERRORS)
        and not _server_refuses_all(exc)
    )


#: Refusals of one statement for what it waited on (``statement_timeout``, a cancelled
#: query, ``lock_timeout``): other statements may pass.
_GAVE_UP_STATES = ("57014", "55P03")


def statement_gave_up(exc: BaseException) -> bool:
    """Whether PostgreSQL gave up on the statement (a statement or lock timeout, a cancel):
    rolled back, and other statements may pass."""
    return getattr(exc, "sqlstate", None) in _GAVE_UP_STATES


def _server_refuses_all(exc: BaseException) -> bool:
    """A refusal that passes and that no other statement would avoid now (read-only, a
    full disk, a shutdown): not a deadlock or serialization failure (class 40), which
    another order of the writes may not meet, nor one statement given up on."""
    state = str(getattr(exc, "sqlstate", ""))
    return passing_refusal(exc) and not state.startswith("40") and state not in _GAVE_UP_STATES
