"""Operations endpoints every process serves: liveness, readiness and Prometheus metrics.

The api role serves them inside the API; a process without it (a relay, a projector, the
notification service) serves them alone on ``CLINIC_HTTP_PORT`` with :func:`serve_ops`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import msgspec
import uvicorn
from litestar import Controller, Litestar, Response, get, head
from litestar.datastructures import State
from litestar.openapi import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from contracts.errors import PROBLEM_CONTENT_TYPE, ErrorCode, Problem, problem
from services import metrics
from services.appointments.adapters.postgres.migrate import migration_files
from services.appointments.entrypoints.http.problems import EXCEPTION_HANDLERS
from services.config import HTTP_KEEP_ALIVE_SECONDS, ConfigError

READY_TIMEOUT_SECONDS = 1.0
#: Connections lost or refused, however they are told (one kind to the readiness log); not
#: a certificate refused or a name not found, which say something else.
_NO_CONNECTION = (ConnectionError, asyncpg.ConnectionDoesNotExistError)
#: Litestar appends "; charset=utf-8" to every text/* type: without it here, or twice.
METRICS_MEDIA_TYPE = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")
SHUTDOWN_GRACE_SECONDS = 8.0

log = logging.getLogger(__name__)


@functools.cache
def newest_migration() -> str:
    """The name of the last migration this code ships."""
    return migration_files()[-1][0]


class NatsConnection(Protocol):
    """A NATS connection as readiness sees it (a client, or one still being made)."""

    @property
    def is_connected(self) -> bool: ...


@dataclass
class Probes:
    """What readiness checks: PostgreSQL through ``pool`` (readiness's own, see
    :func:`~services.appointments.bootstrap.pool_and_nats`), that its database has this
    code's schema, and the NATS connection."""

    pool: asyncpg.Pool
    nats: NatsConnection | None
    started: asyncio.Event | None = None
    """Set once the process has done what it does before serving (its streams exist)."""
    _schema_current: bool = field(default=False, init=False)
    """Once the newest migration is seen, it stays applied: not checked again."""
    _probe: asyncio.Future[Any] | None = field(default=None, init=False)
    """The last question readiness asked PostgreSQL (it may outlive its probe)."""
    _database_failure: str | None = field(default=None, init=False)
    """Why PostgreSQL failed the last check (logged when it changes, not on every probe)."""

    async def failing(self) -> list[str]:
        """What is not ready right now, e.g. ``nats unreachable`` (empty: ready)."""
        failing = []
        try:
            migrated = await self._database_answers()
        except Exception as exc:  # any failure means "not ready", whatever its kind
            failing.append("postgresql unreachable")
            self._database_failed(exc)
        else:
            if self._database_failure is not None:
                self._database_failure = None
                log.info("readiness: postgresql reachable again")
            if not migrated:
                failing.append(
                    f"postgresql schema not migrated to {newest_migration()} (run clinic migrate)"
                )
        if self.nats is not None and not self.nats.is_connected:
            failing.append("nats unreachable")
        elif self.started is not None and not self.started.is_set():
            failing.append("starting")
        return failing

    async def _database_answers(self) -> bool:
        """Whether the database has this code's schema, asked within
        :data:`READY_TIMEOUT_SECONDS` (raises when PostgreSQL does not answer in time).

        A server that takes a query and never answers holds the pool's connection for ~10 s
        more (asyncpg waits for its cancellation before the connection goes back): the probe
        answers in time anyway, and no new query starts while that one is still out."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._ask_database())
            self._probe.add_done_callback(_retrieved)  # a late failure is no news
        probe = self._probe
        done, _ = await asyncio.wait([probe], timeout=READY_TIMEOUT_SECONDS)
        if not done:
            raise TimeoutError
        migrated: bool = probe.result()
        return migrated

    async def _ask_database(self) -> bool:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            if not self._schema_current:
                try:
                    self._schema_current = bool(
                        await conn.fetchval(
                            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE name = $1)",
                            newest_migration(),
                        )
                    )
                except asyncpg.UndefinedTableError:  # no schema_migrations table at all
                    return False
        return self._schema_current

    def _database_failed(self, exc: BaseException) -> None:
        # The answer says only "unreachable" (it is public); the reason goes to the log,
        # once per kind of failure: a hang (this probe's wait, or the pool's wait for a
        # connection that an earlier probe saw end) and connections lost or refused (reset
        # at once by a balancer without a backend, say) each read in more than one way.
        if isinstance(exc, TimeoutError):
            kind = reason = f"no answer within {READY_TIMEOUT_SECONDS} s"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            kind = "no connection" if isinstance(exc, _NO_CONNECTION) else reason
        if kind != self._database_failure:
            self._database_failure = kind
            log.warning("readiness: postgresql unreachable: %s", reason)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class HealthController(Controller):
    """``/health/live``, ``/health/ready`` and ``/metrics``; needs ``state.probes``."""

    tags = ["operations"]

    @get("/health/live", summary="The process is up")
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    # HEAD as well (RFC 9110 9.1; load balancers probe with it): the GET's status, no body.
    @head("/health/live", include_in_schema=False)
    async def live_head(self) -> None:
        return None

    @head("/health/ready", include_in_schema=False)
    async def ready_head(self, state: State) -> Response[None]:
        probes: Probes = state.probes
        if await probes.failing():
            return Response(None, status_code=503, headers={"Retry-After": "1"})
        return Response(None)

    @get(
        "/health/ready",
        summary="PostgreSQL (migrated) and NATS are reachable (else 503)",
        responses={
            503: ResponseSpec(
                data_container=Problem,
                media_type=PROBLEM_CONTENT_TYPE,
                generate_examples=False,
                description=(
                    "unavailable: PostgreSQL or NATS is unreachable, or the database is not"
                    " migrated (with Retry-After)"
                ),
            )
        },
    )
    async def ready(self, state: State) -> Response[Any]:
        probes: Probes = state.probes
        failing = await probes.failing()
        if failing:
            doc = problem(ErrorCode.UNAVAILABLE, "Not ready: " + "; ".join(failing) + ".")
            return Response(
                msgspec.json.encode(doc),
                status_code=503,
                media_type=PROBLEM_CONTENT_TYPE,
                headers={"Retry-After": "1"},
            )
        return Response({"status": "ready"})

    @get("/metrics", summary="Prometheus metrics", media_type=METRICS_MEDIA_TYPE)
    async def metrics(self) -> bytes:
        return generate_latest(REGISTRY)


def create_ops_app(probes: Probes) -> Litestar:
    """An app with only the operations endpoints (errors as the API's: problem+json)."""
    return Litestar(
        route_handlers=[HealthController],
        state=State({"probes": probes}),
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=None,
        logging_config=None,
    )


class ListenError(ConfigError):
    """The HTTP server could not listen on CLINIC_HTTP_HOST:CLINIC_HTTP_PORT."""


#: The longest request head (request line and headers) read before the server answers 431
#: and closes: httptools, uvicorn's fast parser, buffers a head of any size (h11, its other
#: one, stops at 16 KiB), so a 100 MB header took ~700 MB and held the event loop for
#: seconds, before any token was looked at. Tokens and proxies' headers need a few KiB.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
#: The longest request body the API reads (413 past it): a command's body is under 1 KiB.
MAX_REQUEST_BODY_BYTES = 64 * 1024
#: How long a refused request's connection is read (and dropped) before it is closed.
LINGER_SECONDS = 2.0
#: How long a request's head may take to arrive, from its first byte (nginx's
#: client_header_timeout is 60 s; a client on a slow mobile link sends a head in one go).
HEAD_TIMEOUT_SECONDS = 30.0
#: How long a request's body may take to arrive, from the end of its head (nginx's
#: client_body_timeout is 60 s between two reads; a body here is 64 KiB at most).
BODY_TIMEOUT_SECONDS = 30.0
#: The key of an ASGI scope whose answer the server gave itself (the status), the app's
#: being dropped: :class:`Measured` counts that one.
ANSWERED_BY_SERVER = "clinic.answered_by_server"
#: The status :class:`Measured` counts for a request whose client went away before its
#: answer (nginx's "client closed request"): not a 5xx of the service's.
CLIENT_CLOSED_REQUEST = 499


def _problem_answer(status_line: bytes, detail: str) -> bytes:
    """A whole ``connection: close`` HTTP answer of a problem document (code
    ``invalid-request``), for the answers the server gives without the app."""
    status, _, title = status_line.decode().partition(" ")
    body = msgspec.json.encode(
        {
            "type": "about:blank",
            "title": title,
            "status": int(status),
            "detail": detail,
            "code": ErrorCode.INVALID_REQUEST.value,
        }
    )
    return (
        b"HTTP/1.1 "
        + status_line
        + b"\r\n"
        + f"content-type: {PROBLEM_CONTENT_TYPE}\r\n".encode()
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )


class _BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request whose head grows past
    :data:`MAX_REQUEST_HEAD_BYTES` (431) or takes longer than :data:`HEAD_TIMEOUT_SECONDS`
    to arrive from its first byte (408; a client dripping a head holds a connection for as
    long as it likes otherwise), then closing the connection. Every byte of a request but
    its body counts: the head, and a chunked body's framing and trailers (fields after the
    body, which httptools buffers as it does headers; 413 there). What arrived before the
    read being parsed is what is checked: a head and its body in one read are never
    refused, and what is buffered stays under the limit plus one read. A body that takes
    longer than :data:`BODY_TIMEOUT_SECONDS` to arrive is refused too (408): its request
    held one of the requests in progress (:class:`InFlightLimit`) for as long as the client
    liked. Malformed requests get uvicorn's 400 as a problem document. After a refusal what
    the client still sends is read and dropped for a moment before the close (a close with
    unread data resets the connection, and the client may never see the answer)."""

    _head_bytes = 0
    _in_head = False  # a request's first bytes came, its headers are not complete
    _in_body = False
    _refused = False
    _timer: asyncio.TimerHandle | None = None  # of the head or of the body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that has sent nothing yet is idle like one between requests: uvicorn
        # starts its keep-alive timer only after an answer, and kept such connections (a
        # file descriptor each) for ever. The first byte stops it (``data_received``).
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
            if self._in_body:
                detail = (
                    f"The body's chunk framing and trailers pass {MAX_REQUEST_HEAD_BYTES} bytes."
                )
                self._refuse(b"413 Content Too Large", detail)
            else:
                detail = f"The request's head is longer than {MAX_REQUEST_HEAD_BYTES} bytes."
                self._refuse(b"431 Request Header Fields Too Large", detail)
            return
        self._head_bytes += len(data)  # what of it is body, on_body takes back
        super().data_received(data)
        if self._timer is None and not self._refused and (self._in_head or self._in_body):
            # A head or a body that did not come whole in one read (most do: no timer).
            seconds = HEAD_TIMEOUT_SECONDS if self._in_head else BODY_TIMEOUT_SECONDS
            self._timer = self.loop.call_later(seconds, self._too_slow)

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_body(self, body: bytes) -> None:
        self._head_bytes -= len(body)
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_timer()
        # uvicorn parses the URL here and refuses one it cannot (a port past 65535, a path
        # past 64 KiB) through send_400_response: not yet in a body, so the 400 is written.
        super().on_headers_complete()
        self._in_body = True

    def on_message_complete(self) -> None:
        self._in_body = False
        self._head_bytes = 0
        self._stop_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes httptools cannot parse, as a problem document."""
        self._refuse(b"400 Bad Request", f"{msg} The request is not well-formed HTTP/1.1.")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self._refused:
            return
        if self._in_head:
            detail = f"The request's head took longer than {HEAD_TIMEOUT_SECONDS:g} s to arrive."
            self._refuse(b"408 Request Timeout", detail)
        elif self._in_body:
            cycle = self.cycle
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                # The app has not taken the body so far (nor asked for it: ``Expect:
                # 100-continue``), or the previous request's answer is not written yet: no
                # slowness of the client's.
                self._timer = self.loop.call_later(BODY_TIMEOUT_SECONDS, self._too_slow)
                return
            detail = f"The request's body took longer than {BODY_TIMEOUT_SECONDS:g} s to arrive."
            self._refuse(b"408 Request Timeout", detail)

    def _refuse(self, status_line: bytes, detail: str) -> None:
        self._refused = True
        self._stop_timer()
        cycle = self.cycle
        if self._in_body and cycle is not None and not cycle.response_started and not self.pipeline:
            # The app waits for the body: it reads the end of the request instead, and its
            # answer is dropped, ours given (and counted, :class:`Measured`).
            cycle.scope[ANSWERED_BY_SERVER] = int(status_line[:3])  # type: ignore[literal-required]
            cycle.waiting_for_100_continue = False  # no "100 Continue" after our answer
            cycle.disconnected = True
            cycle.message_event.set()
        elif self._in_body or (cycle is not None and not cycle.response_complete):
            # A request whose answer is under way, or the previous request's answer is
            # still being written: no second one amid it.
            self.transport.close()
            return
        self.transport.write(_problem_answer(status_line, detail))
        self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process's stop event rules."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AnswerWhenCut:
    """ASGI middleware: a request that uvicorn cancels when its graceful shutdown runs out
    (a dependency that hangs) is answered ``503 unavailable`` (problem+json, retry in 1 s),
    not uvicorn's 500 with an ERROR traceback. A command cut short this way may have been
    applied or not; its retry (same appointment id or ``Idempotency-Key``) is safe."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, sending)
        except asyncio.CancelledError:
            if started:
                raise  # uvicorn closes the connection: the answer cannot change now
            await _unavailable(send, "The service is stopping; retry shortly.")
            log.warning("request cut short by the shutdown: answered 503", extra=_where(scope))


#: HTTP requests a process works on at once at most; the next are answered ``503`` at once.
#: Each waiting request holds its body (up to :data:`MAX_REQUEST_BODY_BYTES`) and some 25 KiB
#: more: a stall (a locked table, a gateway retrying) must not grow the process until it is
#: killed.
MAX_REQUESTS_IN_FLIGHT = 1024


#: Paths never refused for the requests in progress: the probes and the scrape, which must
#: answer most when the process is busiest (a failed liveness would restart it mid-stall).
_ALWAYS_SERVED = ("/health/", "/metrics")
#: What of a refused request's body is read (and dropped) before the answer, at most: a
#: connection closed with unread data is reset, and the client may never see the 503.
_DRAINED_BYTES = MAX_REQUEST_BODY_BYTES
_DRAIN_SECONDS = 1.0


class InFlightLimit:
    """ASGI middleware: past :data:`MAX_REQUESTS_IN_FLIGHT` requests in progress, the next
    is answered ``503 unavailable`` (problem+json, retry in 1 s) after its body is read and
    dropped (64 KiB and 1 s at most). Health probes and metrics are always served."""

    def __init__(self, app: Any, limit: int | None = None) -> None:
        self._app = app
        self._limit = MAX_REQUESTS_IN_FLIGHT if limit is None else limit
        self._in_flight = 0
        self._refused = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if self._in_flight >= self._limit and not scope["path"].startswith(_ALWAYS_SERVED):
            self._refused += 1
            if self._refused == 1 or self._refused % 1000 == 0:
                log.warning(
                    "%d requests in progress: answering 503 to the next (%d so far)",
                    self._in_flight,
                    self._refused,
                )
            await _drain(receive)
            await _unavailable(
                send, "The service has too many requests in progress; retry shortly."
            )
            return
        self._in_flight += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._in_flight -= 1


async def _drain(receive: Any) -> None:
    """Read a request's body and drop it, up to :data:`_DRAINED_BYTES` or
    :data:`_DRAIN_SECONDS`."""
    read = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            while read <= _DRAINED_BYTES:
                message = await receive()
                read += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    return


async def _unavailable(send: Any, detail: str) -> None:
    """Answer ``503 unavailable`` below the application (problem+json, retry in 1 s), and
    close the connection: the request's body may be unread."""
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    body = msgspec.json.encode(problem(ErrorCode.UNAVAILABLE, detail))
    await send({"type": "http.response.body", "body": body})


#: Methods counted by name; any other token a client sends is counted as ``other``, as a path
#: no route serves is ``unmatched``: a client cannot add series at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Measured:
    """ASGI middleware: every HTTP request counted (``clinic_http_requests_total``) and
    timed (``clinic_http_request_duration_seconds``) by method and route, the path template
    Litestar routed it by (``/v1/appointments/{appointment_id}/cancel``)."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # what uvicorn answers for an app that fails before its answer
        answered = False

        async def receiving() -> Any:
            nonlocal status
            message = await receive()
            if message["type"] == "http.disconnect" and not answered:
                status = CLIENT_CLOSED_REQUEST  # whatever the app answers now, nobody reads it
            return message

        async def sending(message: Any) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start" and status != CLIENT_CLOSED_REQUEST:
                status = message["status"]
                answered = True
            await send(message)

        try:
            await self._app(scope, receiving, sending)
        finally:
            status = scope.get(ANSWERED_BY_SERVER, status)
            method = scope.get("method", "")
            key = (
                method if method in _METHODS else "other",
                scope.get("path_template") or "unmatched",  # set by Litestar's router
                status,
            )
            series = self._series.get(key)
            if series is None:
                method, route, _ = key
                series = self._series[key] = (
                    metrics.HTTP_REQUESTS.labels(method, route, str(status)),
                    metrics.HTTP_SECONDS.labels(method, route),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - began)


def _where(scope: Any) -> dict[str, str]:
    return {"method": str(scope.get("method")), "path": str(scope.get("path"))}


async def serve_asgi(
    app: Litestar,
    host: str,
    port: int,
    stop: asyncio.Event,
    keep_alive: int = HTTP_KEEP_ALIVE_SECONDS,
) -> None:
    """Serve ``app`` until ``stop`` is set, then finish in-flight requests. ``keep_alive``:
    seconds an idle connection stays open (uvicorn's default, 5, is shorter than the idle
    timeout of most proxies, which then reuse a connection as it closes: a 502)."""
    config = uvicorn.Config(
        Measured(InFlightLimit(AnswerWhenCut(app))),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS),
        timeout_keep_alive=keep_alive,
        http=_BoundedHead,
    )
    server = _Server(config)
    serving = asyncio.create_task(_serve(server, host, port))
    waiting = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, waiting], return_when="FIRST_COMPLETED")
    finally:
        # Also when cancelled: the server stops listening and drains before this returns.
        waiting.cancel()
        server.should_exit = True
        if not serving.done():
            await asyncio.wait([serving])
    serving.result()  # a failed bind's ListenError


async def _serve(server: uvicorn.Server, host: str, port: int) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn's answer to a failed bind, after logging the OSError
        raise ListenError(
            f"cannot listen on {host}:{port} (CLINIC_HTTP_HOST / CLINIC_HTTP_PORT):"
            " the address is in use or not available here"
        ) from None


async def serve_ops(
    probes: Probes,
    host: str,
    port: int,
    stop: asyncio.Event,
    keep_alive: int = HTTP_KEEP_ALIVE_SECONDS,
) -> None:
    """Serve only the operations endpoints until ``stop`` is set."""
    await serve_asgi(create_ops_app(probes), host, port, stop, keep_alive)
