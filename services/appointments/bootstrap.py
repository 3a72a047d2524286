"""The composition root of the appointments service: the only place adapters are chosen."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import asyncpg
from nats.aio.client import Client as NATS

from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.pools import BoundedPool
from services.appointments.adapters.postgres.visits import PostgresVisits, ViewUpdates
from services.appointments.adapters.system import new_uuid, utc_now
from services.appointments.relay import OutboxDoorbell, RingingEventStore
from services.appointments.service_layer.handlers import Appointments
from services.appointments.service_layer.ports import Clock
from services.appointments.service_layer.visits import VisitsQuery
from services.auth import TokenVerifier
from services.config import ConfigError, Settings, mask_password
from services.metrics import watch_pool
from services.nats_client import NatsClient, NatsClosed
from services.pg_errors import REFUSED_SETTING_STATES, connect_or_refused

log = logging.getLogger(__name__)


@dataclass
class Container:
    """Everything a process of the appointments service runs on."""

    settings: Settings
    pool: asyncpg.Pool
    probe_pool: asyncpg.Pool
    """Readiness's own connection (see :func:`pool_and_nats`)."""
    nats_link: NatsLink | None
    """The NATS connection (None: a process that runs without NATS)."""
    appointments: Appointments
    visits: VisitsQuery
    verifier: TokenVerifier
    doorbell: OutboxDoorbell | None = None
    """Appends ring it; a relay of this process attaches to it (else it sends NOTIFY)."""
    view_updates: ViewUpdates | None = None
    """Rows written in this process (by its projector or a read's repair) are announced
    there; reads wait on it."""

    @property
    def nats(self) -> NATS | None:
        """The NATS connection once made (None before, or without NATS)."""
        return self.nats_link.client if self.nats_link is not None else None

    async def connected_nats(self, stop: asyncio.Event) -> NATS | None:
        """The NATS connection, once NATS answers; None if ``stop`` is set first."""
        if self.nats_link is None:
            raise RuntimeError("This process runs without NATS.")
        return await self.nats_link.connected(stop)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset that skips asyncpg's reset query (an extra round trip per checkout).

    asyncpg still rolls back an open transaction on release. Nothing on these pools holds
    session state: the relay's advisory lock and LISTEN live on a pool of its own
    (:func:`create_session_pool`)."""


#: A database that does not exist, a login refused: most likely the DSN too, but they can
#: pass (the database or role made after the server, a password rotated, an LDAP or IAM
#: authority away), so they are said loudly and waited out, not fatal.
_REFUSED_LOGIN_STATES: Final = frozenset({"3D000", "28000", "28P01"})
#: The whole start-up check at most: a server that takes the login and then hangs must
#: not hold the process before it serves its probes.
DSN_CHECK_SECONDS: Final = 3.0


async def check_dsn_settings(dsn: str) -> None:
    """Raise :class:`ConfigError` when the DSN cannot work as written: a parameter asyncpg
    rejects (``sslmode=bogus``) or a session setting PostgreSQL refuses. A database that
    does not exist or a refused login is logged as an error (readiness then says
    ``postgresql unreachable`` and its log line why); PostgreSQL down, hanging or still
    starting is left to the retries and the readiness check, as an outage."""
    shown = mask_password(dsn)
    unusable = f"CLINIC_DATABASE_URL={shown} is not usable"
    conn: asyncpg.Connection | None = None
    try:
        async with asyncio.timeout(DSN_CHECK_SECONDS):
            conn = await asyncpg.connect(dsn, timeout=DSN_CHECK_SECONDS)
            # Which database a DSN without one means (libpq: the user's) is worth a line.
            database = await conn.fetchval("SELECT current_database()")
            log.info(
                "postgresql: database %s, server %s",
                database,
                conn.get_server_version().major,
                extra={"database": database},
            )
            await conn.close()
    except asyncpg.ClientConfigurationError as exc:
        raise ConfigError(f"{unusable}: {exc}") from None
    except asyncpg.PostgresError as exc:
        if exc.sqlstate in REFUSED_SETTING_STATES:
            raise ConfigError(f"{unusable}: {exc}") from None
        if exc.sqlstate in _REFUSED_LOGIN_STATES:
            log.error(
                "PostgreSQL refuses CLINIC_DATABASE_URL=%s: %s (retrying; not ready until then)",
                shown,
                exc,
            )
    except Exception:  # down, hanging, starting: an outage, the pool starts anyway
        pass
    finally:
        if conn is not None and not conn.is_closed():
            conn.terminate()  # no round trip to a server that may not answer


#: How long a statement waits for a lock another session holds (an operator's ``ALTER`` or
#: ``VACUUM FULL``, a long transaction) before it gives up (``503``, retry): one locked table
#: must not hold the pool's connections, and with them every endpoint, while the lock lasts.
#: The DSN may set another (``?lock_timeout=5s``).
LOCK_TIMEOUT: Final = "2s"


def _sets_lock_timeout(dsn: str) -> bool:
    return "lock_timeout" in parse_qs(urlsplit(dsn).query)


async def _limit_lock_waits(conn: asyncpg.Connection) -> None:
    await conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")


async def _bounded_pool(
    dsn: str, max_size: int, server_settings: dict[str, str] | None = None, **options: Any
) -> asyncpg.Pool:
    pool = BoundedPool(
        dsn,
        min_size=0,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        connect=connect_or_refused,
        setup=None,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        command_timeout=10,
        timeout=2,
        server_settings=server_settings,
        **options,
    )
    await pool  # opens it (asyncpg.create_pool, which makes only its own class, does so)
    return pool


async def _statement_pool(dsn: str, max_size: int) -> asyncpg.Pool:
    """A pool of connections that hold no session state: :data:`LOCK_TIMEOUT` is set on
    each new one (by ``SET``, not a startup parameter: PgBouncer refuses those it does not
    know), and their release skips the reset."""
    init = None if _sets_lock_timeout(dsn) else _limit_lock_waits
    return await _bounded_pool(dsn, max_size, init=init, reset=_keep_session)


async def create_pool(dsn: str, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool that starts even while PostgreSQL is down (readiness says so),
    but not with a DSN that can never connect (:func:`check_dsn_settings`)."""
    await check_dsn_settings(dsn)
    return await _statement_pool(dsn, max_size)


#: The server ends a session whose client stopped answering (its node lost power, a
#: partition) within ~11 s idle (keepalives) or 10 s of unacknowledged data, instead of
#: ~2 h or ~15 min: the relay's leadership lock lives as long as its session.
SESSION_KEEPALIVES: Final = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


async def create_session_pool(dsn: str, max_size: int = 2) -> asyncpg.Pool:
    """A pool whose connections are fully reset on release (locks, LISTEN, settings), for
    work that holds session state: the relay's leadership lock (see
    :data:`SESSION_KEEPALIVES`; the reset keeps them, they are the session's own)."""
    # Startup parameters, which the reset of a release (RESET ALL) keeps: this pool is
    # never behind a pooler (its session is the relay's lead).
    lock_timeout = {} if _sets_lock_timeout(dsn) else {"lock_timeout": LOCK_TIMEOUT}
    return await _bounded_pool(dsn, max_size, {**lock_timeout, **SESSION_KEEPALIVES}, init=None)


class StoppedWhileConnecting(Exception):
    """The stop signal came before NATS answered: the process ends without having run."""


class NatsLink:
    """A process's NATS connection, made in the background from the start.

    The process serves its health endpoints (and the HTTP API, which needs only
    PostgreSQL) while NATS is still unreachable; readiness says ``nats unreachable`` until
    it answers, and the roles that need NATS wait for it with :meth:`wait`. nats-py keeps
    trying (the first connect as every reconnect) once a second per server and reports
    each failure; they are logged at most every :attr:`QUIET_SECONDS`, with a count.

    A server that hangs without closing the connection (a frozen process, a network path
    that drops packets) is left for another one of the list once :attr:`MAX_OUTSTANDING_PINGS`
    pings in a row, one every :attr:`PING_INTERVAL_SECONDS`, went unanswered: within ~20 s
    instead of nats-py's default 4-6 minutes, during which nothing would be published.

    A connection nats-py closes for good (a server's ``-ERR`` other than a stale
    connection or a permissions error) is not made again: :meth:`watch` sets the stop
    signal, and the process ends with :class:`NatsClosed` (see :meth:`raise_if_closed`)
    instead of staying live and never ready.
    """

    QUIET_SECONDS = 30.0
    PING_INTERVAL_SECONDS = 5
    MAX_OUTSTANDING_PINGS = 3

    def __init__(self, settings: Settings, name: str) -> None:
        self.last_error: str | None = None
        self._failures = 0  # since the last log line
        self._logged_at: float | None = None
        self._closing = False  # close() was called: the connection's end is ours
        self._closed_reason: str | None = None
        self._closed_by_server = asyncio.Event()
        self._connecting = asyncio.create_task(
            self._connect(settings, name), name=f"nats connect ({name})"
        )

    @property
    def client(self) -> NATS | None:
        """The connection, once NATS has answered (it then reconnects by itself)."""
        task = self._connecting
        if not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    @property
    def is_connected(self) -> bool:
        """Whether NATS answered and the connection is up right now."""
        client = self.client
        return client is not None and client.is_connected

    async def wait(self, stop: asyncio.Event | None = None) -> NATS:
        """The connection, once made; :class:`StoppedWhileConnecting` if ``stop`` is set
        first."""
        if stop is None:
            return await asyncio.shield(self._connecting)
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([self._connecting, stopping], return_when="FIRST_COMPLETED")
        finally:
            stopping.cancel()
        if not self._connecting.done():
            raise StoppedWhileConnecting("stopped while waiting for NATS")
        return self._connecting.result()

    async def connected(self, stop: asyncio.Event) -> NATS | None:
        """The connection, once made; None if ``stop`` is set first."""
        try:
            return await self.wait(stop)
        except StoppedWhileConnecting:
            return None

    async def watch(self, stop: asyncio.Event) -> None:
        """Wait until ``stop`` is set, or until NATS closed the connection for good: then
        set ``stop`` (the process stops as on SIGTERM) and return."""
        stopping = asyncio.ensure_future(stop.wait())
        closed = asyncio.ensure_future(self._closed_by_server.wait())
        try:
            await asyncio.wait([stopping, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            closed.cancel()
        if self.closed_by_server is not None:
            stop.set()

    @property
    def closed_by_server(self) -> str | None:
        """Why NATS closed the connection for good, once it did (see :meth:`watch`).

        Also before nats-py calls back (it marks the client closed first, then the
        callback runs a few turns of the loop later, while roles may already fail on it)."""
        if self._closed_reason is not None:
            return self._closed_reason
        client = self.client
        if client is None or not client.is_closed or self._closing:
            return None
        return _closed_reason(client)

    def raise_if_closed(self) -> None:
        """:class:`NatsClosed` if NATS closed the connection for good."""
        if self.closed_by_server is not None:
            raise NatsClosed(
                f"NATS closed the connection for good ({self.closed_by_server}); "
                "start the process again"
            )

    @contextlib.contextmanager
    def closed_wins(self) -> Iterator[None]:
        """The block ends in :class:`NatsClosed` if NATS closed the connection for good
        meanwhile, whatever else it raised: roles fail in their own ways once their
        connection is gone, and the cause is what the process should exit with."""
        try:
            yield
        except Exception:
            self.raise_if_closed()
            raise
        self.raise_if_closed()

    async def close(self) -> None:
        """Stop connecting, or drain the connection made. Never raises."""
        self._closing = True
        if not self._connecting.done():
            self._connecting.cancel()
            # The task closes its half-built client itself on the way out (not suppressing
            # CancelledError here: a cancellation of the caller must go through).
            await asyncio.wait([self._connecting])
            return
        client = self.client
        if client is not None:
            await close_nats(client)

    def _failed(self, exc: BaseException) -> None:
        """A connection attempt (or a running connection) failed; log it, quietly."""
        self.last_error = str(exc) or type(exc).__name__
        self._failures += 1
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self.QUIET_SECONDS:
            return
        log.warning(
            "nats unreachable, still trying (%d failure(s) since the last report): %s",
            self._failures,
            self.last_error,
        )
        self._failures, self._logged_at = 0, now

    def _answered(self, what: str, client: NATS) -> None:
        self.last_error, self._failures, self._logged_at = None, 0, None
        url = client.connected_url  # host and port only: its userinfo may hold a password
        server = f"{url.hostname}:{url.port}" if url is not None else None
        log.info("nats %s", what, extra={"server": server})

    async def _connect(self, settings: Settings, name: str) -> NATS:
        async def on_error(exc: Exception) -> None:
            self._failed(exc)

        async def on_disconnected() -> None:
            if not (client.is_closed or client.is_draining):
                log.warning("nats disconnected")

        async def on_reconnected() -> None:
            refusal = _plaintext_refusal(client)
            if refusal is not None:  # another server of the list, offering no TLS
                self._closed_reason = refusal
                log.error("nats: %s; the process stops", refusal)
                self._closed_by_server.set()
                await client.close()
                return
            self._answered("reconnected", client)

        async def on_closed() -> None:
            if self._closing or self.client is not client:  # ours, or a failed attempt
                return
            if self._closed_reason is None:  # not already given (a server without TLS)
                self._closed_reason = _closed_reason(client)
            log.error(
                "nats closed the connection for good (%s); the process stops",
                self._closed_reason,
            )
            self._closed_by_server.set()

        delay = 0.2
        while True:
            client = NatsClient()
            try:
                # With unlimited reconnects, nats-py's connect() itself retries until a
                # server answers (reporting each failure through error_cb).
                await client.connect(
                    servers=settings.nats_urls,
                    name=name,
                    inbox_prefix=settings.nats_inbox_prefix,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    ping_interval=self.PING_INTERVAL_SECONDS,
                    max_outstanding_pings=self.MAX_OUTSTANDING_PINGS,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    closed_cb=on_closed,
                )
                refusal = _plaintext_refusal(client)
                if refusal is not None:  # as if it had not answered: never in the clear
                    raise ConnectionError(refusal)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 2)
                raise
            except Exception as exc:  # anything connect() gives up on: try again later
                self._failed(exc)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 2)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                self._answered("connected", client)
                return client


def _plaintext_refusal(client: NATS) -> str | None:
    """Why ``client``'s connection must not be used: a ``tls://`` server that offered no
    TLS (nats-py upgrades only when the server requires it, and talks in the clear
    otherwise); None when it may."""
    url = client.connected_url
    if url is None or url.scheme != "tls" or client._server_info.get("tls_required"):
        return None
    return (
        f"the NATS server at {url.hostname}:{url.port} offers no TLS, and CLINIC_NATS_URL"
        " asks for tls://"
    )


def _closed_reason(client: NATS) -> str:
    error = client.last_error
    return str(error) if error is not None else "closed"


@asynccontextmanager
async def pool_and_nats(
    settings: Settings, name: str, pool_size: int = 10, with_nats: bool = True
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool, NatsLink | None]]:
    """The process's pool (which starts even while PostgreSQL is down), the one connection
    readiness asks PostgreSQL through, and its NATS link (connecting in the background, see
    :class:`NatsLink`); all closed on exit.

    Readiness has a connection of its own: through the busy pool of a loaded process, or of
    one whose queries wait for a locked table, it would fail, and every instance with it (the
    load balancer then has none left) while PostgreSQL answers."""
    dsn = settings.require_database_url()
    pool = await create_pool(dsn, pool_size)
    probe_pool = await _statement_pool(dsn, 1)  # the DSN checked once, above
    watch_pool(name, pool)  # one process may run both services (clinic dev)
    watch_pool(f"{name}-readiness", probe_pool)
    link = NatsLink(settings, name) if with_nats else None
    try:
        yield pool, probe_pool, link
    finally:
        try:
            if link is not None:
                await link.close()
        finally:
            try:
                await close_pool(pool)
            finally:
                await close_pool(probe_pool)


#: How long closing a pool waits for its connections to come back (a query to a server
#: that hangs holds one for ~10 s) before it drops them.
POOL_CLOSE_SECONDS: Final = 3.0


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close ``pool``, dropping the connections that are not back in time."""
    try:
        await asyncio.wait_for(pool.close(), POOL_CLOSE_SECONDS)
    except TimeoutError:
        log.warning("closing the database pool: connections still busy, dropped")
        pool.terminate()


@asynccontextmanager
async def appointments_container(
    settings: Settings,
    clock: Clock = utc_now,
    with_nats: bool = True,
    pool_size: int = 10,
    wait_for_nats: bool = True,
) -> AsyncIterator[Container]:
    """Build the container, and close its pool and NATS connection on exit.

    ``wait_for_nats``: enter only once NATS has answered (the tools and tests that build
    one); else at once, with NATS still connecting (the service: the roles that need it
    wait on :attr:`Container.nats_link`)."""
    async with pool_and_nats(settings, "appointments", pool_size, with_nats) as connections:
        pool, probe_pool, link = connections
        if link is not None and wait_for_nats:
            await link.wait()
        store = PostgresEventStore(pool)
        # Appends ring the relay awake right after they commit (never inside the
        # transaction): in-process while a relay of this process leads, by NOTIFY otherwise.
        doorbell = OutboxDoorbell(pool)
        ringing = RingingEventStore(store, doorbell)
        updates = ViewUpdates()
        view = PostgresVisits(pool, updates=updates)
        wait = timedelta(milliseconds=settings.consistency_wait_ms)
        yield Container(
            settings=settings,
            pool=pool,
            probe_pool=probe_pool,
            nats_link=link,
            appointments=Appointments(ringing, store, clock, new_uuid, settings.rules),
            visits=VisitsQuery(view, clock, settings.rules, wait, repair=(store, view)),
            verifier=TokenVerifier.from_settings(settings),
            doorbell=doorbell,
            view_updates=updates,
        )


#: Seconds a stopping process gives its NATS connection: to answer a ping, then to drain,
#: then to close. A server that hangs (still "connected" until pings fail) must not hold the
#: stop, and nats-py's drain and close cannot be cut short (they swallow the cancellation,
#: then flush with a 10 s timeout): they are left to finish in the background instead.
NATS_DRAIN_SECONDS: Final = 2
NATS_CLOSE_SECONDS: Final = 1.0


async def close_nats(nc: NATS) -> None:
    """Drain the connection (finishing in-flight work), or just close it if NATS is gone
    or does not answer. Never raises, and returns within a few seconds: a process stopping
    while NATS is away or hanging still stops cleanly, and soon."""
    try:
        await nc.flush(timeout=NATS_DRAIN_SECONDS)  # it answers: draining should not hang
        await _within(nc.drain(), NATS_DRAIN_SECONDS)
    except Exception as exc:  # draining needs a live server
        log.info("nats drain failed (%s); closing", exc or type(exc).__name__)
        # After a failed drain, close may raise too (the client is half torn down).
        with contextlib.suppress(Exception):
            await _within(nc.close(), NATS_CLOSE_SECONDS)


async def _within(work: Coroutine[Any, Any, None], seconds: float) -> None:
    """Await ``work`` for ``seconds`` at most (``TimeoutError``), then leave it running: it
    ignores cancellation, and its outcome is of no interest once the process stops."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        task.result()
        return
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, unlogged
    raise TimeoutError(f"not done within {seconds:g}s")
