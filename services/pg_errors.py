"""Which PostgreSQL failures pass with time: one answer for every service that waits them out."""

from __future__ import annotations

from typing import Any, Final

import asyncpg


class RefusedConnection(ConnectionError):
    """PostgreSQL refused a new connection for a state of its own that no statement is at
    fault for and that passes (a database closed to connections, ``ALLOW_CONNECTIONS
    false``: SQLSTATE 55000; ``CONNECT`` revoked: 42501): an outage like any other. The
    refusal is its ``__cause__``."""


async def connect_or_refused(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect`` for the pools: a refusal of the new connection itself that is
    not already a connection error raises :class:`RefusedConnection` (a DSN that cannot
    work as written is found at start, by ``check_dsn_settings``)."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, CONNECTION_ERRORS):
            raise
        raise RefusedConnection(f"PostgreSQL refused the connection: {exc}") from exc


#: Failures that mean "PostgreSQL is not reachable right now", not "the request is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    # Refused logins: a database dropped or renamed, a password or grant changed while the
    # service ran. No statement is at fault (at start, they stop the process instead).
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)

#: What PostgreSQL answers to a DSN that cannot work as written: a session setting it does
#: not know (``?foo=1``: undefined_object) or a value it refuses (``?statement_timeout=abc``:
#: invalid_parameter_value).
REFUSED_SETTING_STATES: Final = frozenset({"42704", "22023"})

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


def protocol_out_of_step(exc: BaseException) -> bool:
    """asyncpg's protocol out of step with a connection PostgreSQL terminated under an
    operation ("cannot switch to state 12; another operation (2) is in progress"): the
    connection is lost like any other, the next try gets another. Only that one of asyncpg's
    internal errors: the others (no codec for a type, a malformed argument) are mistakes."""
    return type(exc) is asyncpg.InternalClientError and str(exc).startswith(
        "cannot switch to state"
    )


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means "PostgreSQL is not reachable right now": one of
    :data:`CONNECTION_ERRORS`, or asyncpg's protocol out of step with a lost connection."""
    return isinstance(exc, CONNECTION_ERRORS) or protocol_out_of_step(exc)


def is_transient(exc: BaseException) -> bool:
    """Whether the same work, tried again later, can succeed: PostgreSQL is unreachable or
    refused for a reason that passes (a crash shutdown, 57P02, is one of those)."""
    return unreachable(exc) or passing_refusal(exc)


#: A table or column the statement names does not exist: the schema is older than the code
#: (``clinic migrate`` has not run yet, as in a rolling upgrade). (No migration adds a
#: function: an undefined function or operator is the code's own mistake.)
_SCHEMA_BEHIND_STATES: Final = frozenset({"42P01", "42703"})


def schema_behind(exc: BaseException) -> bool:
    """Whether PostgreSQL refused because the schema lacks what the statement names."""
    return (
        isinstance(exc, asyncpg.PostgresError)
        and getattr(exc, "sqlstate", None) in _SCHEMA_BEHIND_STATES
    )
