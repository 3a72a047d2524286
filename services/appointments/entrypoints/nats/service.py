"""``serve_nats``: the ``appointments`` NATS micro service, for the other clinic services.

A service-API micro service (``$SRV.PING|INFO|STATS`` discovery) whose endpoints listen
as one queue group, so every instance of the ``api`` role shares the load. nats-py runs a
subscription's callback one message at a time, so each request runs in a task of its own,
bounded per endpoint: visits queries waiting for their consistency tokens (as long as the
configured wait, for a token nobody will reach) never hold up a cancel, nor take the
place of other visits queries (they wait outside the endpoint's in-flight bound; the
pool bounds their reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import Handler, Request
from nats.micro.service import EndpointConfig, EndpointStats, Service, ServiceConfig
from prometheus_client import Histogram

from contracts.errors import ErrorCode, problem
from contracts.json_schema import SCHEMA_ID_BASE
from contracts.service_api import ENDPOINTS, Endpoint
from contracts.subjects import SERVICE_NAME
from services.appointments.bootstrap import Container
from services.appointments.entrypoints.nats.handlers import ServiceApi
from services.appointments.entrypoints.nats.replies import Reply, failure
from services.logs import dropped_message
from services.ops import SHUTDOWN_GRACE_SECONDS

log = logging.getLogger(__name__)

QUEUE_GROUP: Final = SERVICE_NAME
#: Requests of one endpoint handed to the application layer at once (the pool bounds
#: them further).
MAX_IN_FLIGHT: Final = 64
#: Requests of one endpoint accepted (running or waiting); beyond, ``unavailable`` at once.
MAX_ACCEPTED: Final = 1024
#: Endpoints whose requests mostly wait (a visits query for its consistency token, up to
#: the configured wait): not held to :data:`MAX_IN_FLIGHT`, which they would fill with
#: waits while other requests of the endpoint queue; only to :data:`MAX_ACCEPTED`.
WAITING_ENDPOINTS: Final = frozenset({"visits"})
#: How long a request cancelled at the end of the drain may take to send its 503.
_LAST_REPLY_SECONDS: Final = 0.5
#: On stop, how long the requests already sent to this instance may take to be received,
#: finished and answered (within the process's shutdown grace, leaving room to flush).
DRAIN_SECONDS: Final = SHUTDOWN_GRACE_SECONDS - 1.0
DESCRIPTION: Final = (
    "Appointments of the telehealth clinic: schedule, cancel, start, read them, and list "
    "visits. Requests and replies: contracts/schemas (AsyncAPI: asyncapi.json)."
)

REQUEST_SECONDS = Histogram(
    "clinic_nats_request_duration_seconds",
    "NATS service-API requests by endpoint and status (the HTTP status of the reply).",
    ["endpoint", "status"],
)


def service_version() -> str:
    """The installed distribution's version (a semantic version, as micro requires)."""
    try:
        return metadata.version("clinic-appointments")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def endpoint_metadata(endpoint: Endpoint) -> dict[str, str]:
    """What ``$SRV.INFO`` tells about an endpoint: its schemas, by name."""
    return {
        "kind": "command" if endpoint.command else "query",
        "request_schema": endpoint.request.__name__,
        "reply_schema": endpoint.reply.__name__,
        "error_schema": "Problem",
        "summary": endpoint.summary,
    }


#: Replies go to inboxes only: subjects whose first token begins ``_INBOX`` (the clients'
#: default ``_INBOX.``, and custom prefixes such as ``_INBOX.<user>.`` or ``_INBOX_<name>.``).
#: A caller picks a request's reply subject freely, and NATS checks it against nobody's
#: permissions, while this process may publish on any reply subject (``allow_responses``),
#: on JetStream's API and on the event subjects: an answer sent to
#: ``$JS.API.STREAM.PURGE.APPOINTMENTS`` would purge the stream, one sent to an event
#: subject would be stored as an event.
INBOX_PREFIX: Final = "_INBOX"
#: The reply subjects nats-server itself makes for a request that crosses accounts (a
#: service exported by one account, imported by another): ``_R_.<id>.<id>``.
IMPORT_REPLY_PREFIX: Final = "_R_."


@dataclass(frozen=True)
class Replies:
    """The reply subjects the service answers on: inboxes (:data:`INBOX_PREFIX`), but not
    this process's own (``own``: its inbox prefix, dot included), where an answer would
    land in a fetch of its own consumers or among its own requests' answers; and the
    server's own for a caller in another account (:data:`IMPORT_REPLY_PREFIX`)."""

    own: str = ""

    @classmethod
    def of(cls, nc: NATS) -> Replies:
        """For the process whose connection is ``nc``: its inboxes are ``_INBOX.<user>.``
        when its NATS URL names a user, else ``_INBOX.``, everyone's (none told apart)."""
        prefix = nc.new_inbox().rsplit(".", 1)[0] + "."
        return cls(own="" if prefix == INBOX_PREFIX + "." else prefix)

    def answerable(self, reply: str, subject: str) -> bool:
        """Whether a request on ``subject`` may be handled: without a ``reply`` subject
        (nobody is answered) or with one to answer on; else it is dropped, said in a
        throttled warning."""
        if not reply or reply.startswith(IMPORT_REPLY_PREFIX):
            return True
        if reply.startswith(INBOX_PREFIX) and not (self.own and reply.startswith(self.own)):
            return True
        dropped_message(
            "whose reply subject is no inbox of a caller's",
            f"a request on {subject} to be answered on {reply[:200]!r} (answers go only to"
            f" subjects beginning {INBOX_PREFIX}, none of this process's own)",
        )
        return False


class InboxOnlyService(Service):
    """nats-py's micro service, answering ``$SRV.PING|INFO|STATS`` only on ``replies``."""

    def __init__(self, nc: NATS, config: ServiceConfig, replies: Replies) -> None:
        super().__init__(nc, config)
        self._replies = replies

    async def _handle_ping_request(self, msg: Msg) -> None:
        if self._replies.answerable(msg.reply, msg.subject):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        if self._replies.answerable(msg.reply, msg.subject):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        if self._replies.answerable(msg.reply, msg.subject):
            await super()._handle_stats_request(msg)


@dataclass
class _Counters:
    error_replies: int = 0
    last_error: str = ""
    answered: int = 0
    processing_ns: int = 0


class Dispatcher:
    """Runs each request of the micro service's endpoints in a bounded task of its own."""

    def __init__(
        self,
        api: ServiceApi,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_accepted: int = MAX_ACCEPTED,
        replies: Replies = Replies(),
    ) -> None:
        missing = {endpoint.name for endpoint in ENDPOINTS} - set(api.calls)
        if missing:
            raise ValueError(f"no handler for the endpoints {sorted(missing)}")
        self._api = api
        self.replies = replies
        self._slots = {
            endpoint.name: asyncio.Semaphore(
                max_accepted if endpoint.name in WAITING_ENDPOINTS else max_in_flight
            )
            for endpoint in ENDPOINTS
        }
        self._max_accepted = max_accepted
        self._tasks: dict[str, set[asyncio.Task[None]]] = {e.name: set() for e in ENDPOINTS}
        self._counters = {endpoint.name: _Counters() for endpoint in ENDPOINTS}

    def handler(self, endpoint: str) -> Handler:
        """The micro handler of ``endpoint``: accept the request, answer it in a task."""

        tasks = self._tasks[endpoint]  # a flood of one endpoint never refuses another's

        async def accept(request: Request) -> None:
            # (micro's Request keeps the reply subject to itself: its message has it)
            if not self.replies.answerable(request._msg.reply, request.subject):
                return
            if len(tasks) >= self._max_accepted:
                doc = problem(ErrorCode.UNAVAILABLE, "The service is overloaded; retry shortly.")
                now = time.perf_counter_ns()
                await self._respond(endpoint, request, failure(doc, retry_after=1), now, now)
                return
            task = asyncio.create_task(self._run(endpoint, request), name=f"nats-{endpoint}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return accept

    async def _run(self, endpoint: str, request: Request) -> None:
        received = started = time.perf_counter_ns()
        try:
            async with self._slots[endpoint]:
                started = time.perf_counter_ns()  # processing: after waiting for a slot
                reply = await self._api.answer(endpoint, request.data, request.headers)
        except asyncio.CancelledError:
            # The drain's grace ran out (a database too slow to answer in time): the caller
            # gets an answer it can act on, not silence until its own timeout. A command
            # may have been applied or not; its retry (same appointment id or
            # Idempotency-Key) is safe.
            doc = problem(ErrorCode.UNAVAILABLE, "The service stopped; retry shortly.")
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(_LAST_REPLY_SECONDS):
                    stopped = failure(doc, retry_after=1)
                    await self._respond(endpoint, request, stopped, received, started)
            raise
        await self._respond(endpoint, request, reply, received, started)

    async def _respond(
        self, endpoint: str, request: Request, reply: Reply, received: int, started: int
    ) -> None:
        """Send ``reply``; ``received``/``started``: when the request was taken and when its
        processing began (``perf_counter_ns``): the histogram has the caller's wait, slot
        included, ``$SRV.STATS`` the processing time as the service API defines it."""
        now = time.perf_counter_ns()
        counters = self._counters[endpoint]
        counters.answered += 1
        counters.processing_ns += now - started
        status = reply.error_code or "200"
        if reply.error_code is not None:
            counters.error_replies += 1
            counters.last_error = status
        REQUEST_SECONDS.labels(endpoint, status).observe((now - received) / 1e9)
        try:
            await request.respond(reply.data, headers=reply.headers)
        except ValueError:
            log.warning("a %s request without a reply subject was handled unanswered", endpoint)
        except Exception as exc:  # the connection closed or broke meanwhile
            log.warning("could not reply to a %s request: %s", endpoint, exc)

    def stats(self, endpoint: EndpointStats) -> dict[str, Any]:
        """The ``data`` of an endpoint in ``$SRV.STATS`` (error replies are not exceptions,
        so micro's own ``num_errors`` stays 0)."""
        counters = self._counters.get(endpoint.name, _Counters())
        average = counters.processing_ns // counters.answered if counters.answered else 0
        return {
            "error_replies": counters.error_replies,
            "last_error_status": counters.last_error,
            "average_processing_time": average,
            "in_flight": len(self._tasks.get(endpoint.name, ())),
        }

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` s for accepted requests to be answered; how many were not
        (those are cancelled, each answering ``unavailable``)."""
        pending: set[asyncio.Task[None]] = set().union(*self._tasks.values())
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:  # their 503s
                await asyncio.wait(pending, timeout=_LAST_REPLY_SECONDS)
        return len(pending)


def service_config(dispatcher: Dispatcher) -> ServiceConfig:
    """The micro service's identity, as ``$SRV.PING|INFO`` report it."""
    return ServiceConfig(
        name=SERVICE_NAME,
        version=service_version(),
        description=DESCRIPTION,
        metadata={"api": "v1", "schema_id_base": SCHEMA_ID_BASE},
        queue_group=QUEUE_GROUP,
        stats_handler=dispatcher.stats,
    )


async def _drain_endpoints(service: Service) -> None:
    """Stop taking requests without dropping any already sent to this instance.

    micro's ``stop()`` unsubscribes the endpoints, discarding the requests received but
    not yet handed to their handler (and any still on the wire). Draining instead tells
    the server to route no more here, waits a round trip so that all it routed here has
    arrived, and hands every such request to the dispatcher, which answers it.
    """
    endpoints, service._endpoints = list(service._endpoints), []  # stop() skips them then
    subscriptions = [e._subscription for e in endpoints if e._subscription is not None]
    results = await asyncio.gather(
        *(subscription.drain() for subscription in subscriptions), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            log.warning("a NATS service endpoint did not drain: %r", result)


async def _stop_service(service: Service) -> None:
    try:
        await service.stop()
    except Exception as exc:  # the connection is closed: nothing left to unsubscribe
        log.warning("NATS service API did not stop cleanly: %s", exc)


async def start_service(nc: NATS, dispatcher: Dispatcher, stop: asyncio.Event) -> Service | None:
    """Start the micro service with every endpoint; retried while NATS is unreachable.

    ``None`` when ``stop`` was set first.
    """
    delay = 0.2
    while not stop.is_set():
        service = InboxOnlyService(nc, service_config(dispatcher), dispatcher.replies)
        try:
            await service.start()
            for endpoint in ENDPOINTS:
                await service.add_endpoint(
                    EndpointConfig(
                        name=endpoint.name,
                        subject=endpoint.subject,
                        handler=dispatcher.handler(endpoint.name),
                        metadata=endpoint_metadata(endpoint),
                    )
                )
            await nc.flush()
        except Exception as exc:  # nats-py raises several unrelated types here
            log.warning("NATS service API not started, retrying in %.1fs: %s", delay, exc)
            await _stop_service(service)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            delay = min(delay * 2, 5.0)
            continue
        log.info("NATS service API started", extra={"service_id": service.id})
        return service
    return None


async def serve(nc: NATS, api: ServiceApi, stop: asyncio.Event) -> None:
    """Serve ``api`` on ``nc`` until ``stop`` is set, then stop taking requests and answer
    every one already sent to this instance (for at most :data:`DRAIN_SECONDS`)."""
    dispatcher = Dispatcher(api, replies=Replies.of(nc))
    service = await start_service(nc, dispatcher, stop)
    if service is None:
        return
    try:
        await stop.wait()
    finally:
        deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
        try:
            async with asyncio.timeout(DRAIN_SECONDS / 2):
                await _drain_endpoints(service)
        except TimeoutError:
            log.warning("NATS service endpoints not drained in time")
        await _stop_service(service)
        # What is left of the drain, less the time the unanswered take to send their 503s.
        left = deadline - asyncio.get_running_loop().time() - _LAST_REPLY_SECONDS
        unanswered = await dispatcher.drain(max(left, 0.0))
        if unanswered:
            log.warning(
                "stopped with %d NATS requests unfinished (answered unavailable)", unanswered
            )
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        log.info("NATS service API stopped")


async def serve_nats(container: Container, stop: asyncio.Event) -> None:
    """The ``api`` role's NATS service API, from when NATS first answers until ``stop`` is
    set (then drained)."""
    nats = await container.connected_nats(stop)
    if nats is None:  # stopped before NATS ever answered
        return
    await serve(nats, ServiceApi(container.appointments, container.visits), stop)
