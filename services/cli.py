"""The ``clinic`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg

from contracts.generate import SCHEMAS_DIR
from services.config import (
    COMMAND_VARIABLES,
    DEV_VARIABLES,
    ConfigError,
    Settings,
    command_variables,
    config_error_in,
    load_settings,
    mask_password,
    parse_roles,
    variables_help,
)
from services.early_stop import EARLY_STOP
from services.logs import configure_logging
from services.nats_client import NatsClosed
from services.pg_errors import REFUSED_SETTING_STATES
from services.telemetry import process_tracing


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UUID") from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def database_failure(exc: BaseException) -> tuple[str, int] | None:
    """What went wrong talking to PostgreSQL, and the exit status: 2 for what the
    configuration or the operator must fix, 1 for a server that does not answer. None
    for an error that is not about reaching the database."""
    first_line = (str(exc) or type(exc).__name__).splitlines()[0]
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"the database does not exist: {first_line}", 2
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"PostgreSQL refused the login: {first_line}", 2
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"the database is not migrated ({first_line}): run `clinic migrate` first", 2
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return f"invalid PostgreSQL DSN: {first_line}", 2
    if (
        isinstance(exc, asyncpg.PostgresError)
        and exc.sqlstate in REFUSED_SETTING_STATES
        and "parameter" in first_line
    ):  # ``?foo=1``: the login's session settings, refused at connect
        return f"invalid PostgreSQL DSN, a setting PostgreSQL refuses: {first_line}", 2
    if isinstance(exc, TimeoutError) and str(exc):  # ours, e.g. the rebuild's table lock
        return first_line, 1
    if isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        return f"cannot reach PostgreSQL: {first_line}", 1
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return f"PostgreSQL failed: {first_line}", 1
    return None


@contextlib.contextmanager
def _database_errors(settings: Settings) -> Iterator[None]:
    """One line and an exit status instead of a traceback when PostgreSQL fails."""
    try:
        yield
    except Exception as exc:
        failure = database_failure(exc)
        if failure is None:
            raise
        what, status = failure
        dsn = mask_password(settings.database_url or "")
        print(f"clinic: {what} (CLINIC_DATABASE_URL={dsn})", file=sys.stderr)
        sys.exit(status)


#: However its cleanup fares, a process that was told to stop exits within this many
#: seconds of it (docs/operations.md; under Compose's 25 s and Kubernetes' 30 s grace).
STOP_DEADLINE_SECONDS = 22.0
#: ``clinic dev`` also stops (or is still starting) its PostgreSQL and NATS.
DEV_STOP_DEADLINE_SECONDS = 90.0

log = logging.getLogger(__name__)


def _exit_at_the_deadline(seconds: float) -> threading.Timer:
    """Start the stop's deadline: past it the process exits with status 1 from a thread of
    its own, even if the event loop waits for ever on a task that cannot be cancelled
    (asyncpg shields a connection's release while a database that hangs never answers)."""

    def overran() -> None:
        log.error("stop did not finish within %.0fs (a dependency that hangs?): exiting", seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, overran)
    timer.daemon = True
    timer.start()
    return timer


_early_stop = EARLY_STOP


def run_until_signalled(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    deadline_seconds: float | None = None,
) -> None:
    """Run ``main(stop)`` and set ``stop`` on SIGINT or SIGTERM (a second signal kills).
    From the first signal the process has ``deadline_seconds`` (default
    :data:`STOP_DEADLINE_SECONDS`) to exit, what follows this call (flushing the spans)
    included; from ``main``'s own return, the loop's teardown has as long. Told to stop
    while starting (:class:`~services.early_stop.EarlyStop`), ``main`` is not run."""
    seconds = STOP_DEADLINE_SECONDS if deadline_seconds is None else deadline_seconds
    deadline: threading.Timer | None = None
    signalled = False

    async def runner() -> None:
        nonlocal deadline
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            nonlocal deadline, signalled
            if signalled:
                # The second: out now. SystemExit would cancel the tasks and then await
                # every cleanup they run (a NATS drain, a pool closing) before exiting.
                sys.stderr.flush()
                os._exit(130)
            signalled = True  # a first signal, even if the service is stopping already
            if deadline is None:
                deadline = _exit_at_the_deadline(seconds)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        if _early_stop.requested is not None:  # told to stop while starting: nothing to run
            noted, _early_stop.requested = _early_stop.requested, None
            on_signal()
            log.info("stopped before it started (%s while starting)", noted.name)
            return
        try:
            await main(stop)
        finally:  # what the loop still runs (tasks it cancels) is bounded too
            if deadline is None:
                deadline = _exit_at_the_deadline(seconds)

    try:
        run_loop(runner())
    finally:
        # Signalled, the process is to end: the deadline bounds what follows too (flushing
        # the spans). Ended by itself (a failure; ``main()`` called in a test), the loop's
        # teardown is over and the caller goes on: no deadline outlives the call.
        if deadline is not None and not signalled:
            deadline.cancel()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (asyncpg and uvicorn are faster on it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_migrate(settings: Settings, _: argparse.Namespace) -> None:
    from services.appointments.adapters.postgres.migrate import migrate

    dsn = settings.require_database_url()
    with _database_errors(settings):
        applied = asyncio.run(migrate(dsn))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))


def cmd_appointments(settings: Settings, args: argparse.Namespace) -> None:
    from services.appointments.main import run_appointments

    settings.require_database_url()
    with process_tracing("clinic-appointments"):
        run_until_signalled(lambda stop: run_appointments(settings, args.roles, stop))


#: The commands that run until told to stop (SIGTERM stops them cleanly, even while starting).
SERVICES: Final = ("appointments", "notifications", "dev")


def _roles(value: str) -> list[str]:
    """``--roles``, checked as argparse checks an argument (its usage line and exit 2)."""
    try:
        return parse_roles(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_dev(settings: Settings, args: argparse.Namespace) -> None:
    from pathlib import Path

    from services.dev import DevError, DevOptions, run_dev
    from services.embedded import ServerStartError, find_postgres_install, nats_server_binary

    try:  # the servers' programs, CLINIC_NATS_SERVER_BIN and CLINIC_PG_INSTALL_DIR's first
        nats_server_binary()
        find_postgres_install()
    except ServerStartError as exc:
        raise ConfigError(str(exc)) from None
    options = DevOptions(data_dir=Path(args.data_dir), demo=args.demo)
    try:
        with process_tracing("clinic-dev"):
            run_until_signalled(
                lambda stop: run_dev(settings, options, stop), DEV_STOP_DEADLINE_SECONDS
            )
    except (DevError, ServerStartError) as exc:
        print(f"clinic dev: {exc}", file=sys.stderr)
        sys.exit(1)


def cmd_notifications(settings: Settings, _: argparse.Namespace) -> None:
    from services.notifications.main import run_notifications

    settings.require_database_url()
    with process_tracing("clinic-notifications"):
        run_until_signalled(lambda stop: run_notifications(settings, stop, serve_ops_http=True))


def cmd_rebuild_visits(settings: Settings, _: argparse.Namespace) -> None:
    from services.appointments.rebuild import RebuildAlreadyRunning, StderrProgress, rebuild_visits

    dsn = settings.require_database_url()
    try:
        with _database_errors(settings):
            count = asyncio.run(rebuild_visits(dsn, progress=StderrProgress()))
    except RebuildAlreadyRunning as exc:
        raise ConfigError(str(exc)) from None
    print(f"rebuilt the visits view: {count} visit(s)")


def cmd_contracts(_: Settings, args: argparse.Namespace) -> None:
    from contracts.generate import write_all

    for path in write_all(Path(args.out)):
        print(path)


def cmd_token(settings: Settings, args: argparse.Namespace) -> None:
    from services.auth import mint_token

    if not settings.jwt_secret:
        raise ConfigError("CLINIC_JWT_SECRET must be set to mint tokens.")
    print(
        mint_token(
            settings.jwt_secret,
            args.role,
            args.sub,
            args.clinic,
            args.ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``clinic`` subcommand."""
    epilog = variables_help()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="clinic",
        description="Clinic appointments backend.",
        epilog=epilog,
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        help_: str,
        handler: Callable[[Settings, argparse.Namespace], None],
        extra_variables: Mapping[str, tuple[str | None, str]] | None = None,
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=variables_help(COMMAND_VARIABLES[name], extra_variables),
            formatter_class=formatter,
        )
        command.set_defaults(handler=handler)
        return command

    add(
        "migrate",
        "apply database migrations (safe to run concurrently and repeatedly)",
        cmd_migrate,
    )
    appointments = add("appointments", "run the appointments service", cmd_appointments)
    appointments.add_argument(
        "--roles",
        type=_roles,
        default="api,relay,projector",
        help="comma-separated subset of api,relay,projector (default: all)",
    )
    dev = add(
        "dev",
        "run the whole system on this machine: embedded PostgreSQL and NATS, every service",
        cmd_dev,
        DEV_VARIABLES,
    )
    dev.add_argument(
        "--demo", action="store_true", help="add a demo clinic and print tokens and curl commands"
    )
    dev.add_argument(
        "--data-dir",
        default=".clinic",
        help="where the servers keep their data (default ./.clinic)",
    )
    add("notifications", "run the notification service", cmd_notifications)
    add(
        "rebuild-visits",
        "rebuild the visits read model from the event store, while the service keeps running",
        cmd_rebuild_visits,
    )
    contracts = add(
        "contracts", "write the JSON Schemas and the AsyncAPI document of contracts/", cmd_contracts
    )
    contracts.add_argument(
        "--out", default=str(SCHEMAS_DIR), help="folder (default: contracts/schemas)"
    )
    token = add(
        "token", "mint an HS256 token with CLINIC_JWT_SECRET (development and tests)", cmd_token
    )
    token.add_argument("--role", required=True, choices=["patient", "provider", "staff"])
    token.add_argument("--sub", required=True, type=_uuid, help="user id")
    token.add_argument("--clinic", required=True, type=_uuid, help="clinic id")
    token.add_argument(
        "--ttl",
        type=_positive_int,
        default=3600,
        help="seconds until it expires (> 0; default 3600)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The ``clinic`` command (the console script enters at :func:`services.early_stop.main`)."""
    _early_stop.install()
    try:
        args = build_parser().parse_args(argv)
        if args.command not in SERVICES:
            try:
                _early_stop.uninstall(deliver=True)
            except KeyboardInterrupt:  # Ctrl-C while starting: as one later (130)
                sys.exit(130)
        _run(args)
    finally:
        _early_stop.uninstall()


def _run(args: argparse.Namespace) -> None:
    # a malformed variable it never reads is no concern
    reads = command_variables(args.command, getattr(args, "roles", ()))
    env = {name: value for name, value in os.environ.items() if name in reads}
    try:
        settings = load_settings(env)
        configure_logging(settings.log_level)
        args.handler(settings, args)
    except ConfigError as exc:
        print(f"clinic: {exc}", file=sys.stderr)
        sys.exit(2)
    except BaseExceptionGroup as group:  # a role's TaskGroup wraps the error
        error = config_error_in(group)
        if error is None:
            raise
        print(f"clinic: {error}", file=sys.stderr)
        sys.exit(2)
    except NatsClosed as exc:
        print(f"clinic: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
