"""The one answer to "is this PostgreSQL failure transient?": unreachable, or refused for a
reason of its own state that passes; never a refusal of what the statement holds."""

from __future__ import annotations

import asyncpg
import pytest

from services.appointments.adapters.postgres import errors
from services.errors import Unavailable
from services.pg_errors import CONNECTION_ERRORS, is_transient, passing_refusal


@pytest.mark.parametrize(
    "error",
    [
        OSError("connection refused"),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CrashShutdownError("terminating connection because of crash of another"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction"),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        asyncpg.OutOfMemoryError("out of memory"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.LockNotAvailableError("could not obtain lock on row"),
        asyncpg.InvalidCatalogNameError('database "clinic" does not exist'),
        asyncpg.InvalidPasswordError('password authentication failed for user "clinic"'),
        asyncpg.InvalidAuthorizationSpecificationError('role "clinic" does not exist'),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_unreachable_or_passing_database_is_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key value"),
        asyncpg.CheckViolationError("violates check constraint"),
        asyncpg.ForeignKeyViolationError("violates foreign key constraint"),
        asyncpg.NumericValueOutOfRangeError("integer out of range"),
        asyncpg.DataError("invalid input for query argument $1"),
        asyncpg.UndefinedTableError('relation "nope" does not exist'),
        asyncpg.UndefinedFileError("a missing file stays missing"),
        ValueError("not PostgreSQL's"),
        RuntimeError("a bug of ours"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_refusal_of_what_the_statement_holds_is_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_everything_the_notifications_retried_before_is_still_transient() -> None:
    """The types the notification service listed as transient before there was one answer."""
    former = [
        OSError(),
        TimeoutError(),
        asyncpg.InterfaceError("closed"),
        asyncpg.PostgresConnectionError("lost"),
        asyncpg.CannotConnectNowError("starting up"),
        asyncpg.TooManyConnectionsError("too many"),
        asyncpg.DeadlockDetectedError("deadlock"),
        asyncpg.SerializationError("serialization"),
        asyncpg.AdminShutdownError("admin shutdown"),
        asyncpg.CrashShutdownError("crash shutdown"),
    ]
    assert all(is_transient(error) for error in former)


def test_the_appointments_adapter_uses_the_same_definitions() -> None:
    assert errors.CONNECTION_ERRORS is CONNECTION_ERRORS
    assert errors.passing_refusal is passing_refusal


def test_only_asyncpgs_protocol_state_error_is_an_unreachable_database() -> None:
    lost = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in")
    assert is_transient(lost)
    with pytest.raises(Unavailable), errors.database_errors():
        raise lost
    # asyncpg's other internal errors are mistakes of the code's, not a database away.
    for mistake in (
        asyncpg.InternalClientError("no decoder for OID 1234"),
        asyncpg.OutdatedSchemaCacheError("cache lookup failed for type 1234"),
    ):
        assert not is_transient(mistake)
        with pytest.raises(type(mistake)), errors.database_errors():
            raise mistake
