"""The NATS endpoints: decode the request, build the context, call the application service.

The same :class:`~services.appointments.service_layer.handlers.Appointments` (and visits
query) that HTTP calls decides everything; this module only translates. A request is the
HTTP body plus ``appointment_id`` and ``actor`` (callers are trusted through their NATS
credentials); an answer is the HTTP answer's JSON, or its problem document.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import msgspec
from opentelemetry.trace import Status, StatusCode

from contracts.commands import (
    CancelRequest,
    GetRequest,
    ScheduleBody,
    ScheduleRequest,
    StartRequest,
    VisitsRequest,
    VisitsTab,
)
from contracts.common import Principal
from contracts.errors import ErrorCode, problem
from contracts.service_api import (
    CONSISTENCY_HEADER,
    CONSISTENCY_TOKEN_HEADER,
    CORRELATION_HEADER,
    ENDPOINTS,
    ETAG_HEADER,
    MAX_REQUEST_BYTES,
)
from contracts.views import VisitsPage
from services.appointments.entrypoints.nats.replies import Reply, failure, success
from services.appointments.service_layer.handlers import (
    Appointments,
    CommandOutcome,
    RequestContext,
)
from services.errors import ClinicError, InvalidRequest, PayloadTooLarge, Unavailable
from services.logs import answered_unavailable
from services.nats_client import UNREADABLE_HEADERS
from services.tracing import correlated, correlation_id_of, current_trace_id, serving

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)
EndpointCall = Callable[[bytes, uuid.UUID], Awaitable[Reply]]
_SUBJECTS = {endpoint.name: endpoint.subject for endpoint in ENDPOINTS}


class VisitsQueries(Protocol):
    """The read side's visits query (``VisitsQuery`` in the service layer)."""

    async def list_visits(
        self,
        principal: Principal,
        tab: VisitsTab = "upcoming",
        limit: int = 20,
        cursor: str | None = None,
        consistency_token: str | None = None,
    ) -> tuple[VisitsPage, bool]:
        """A page of the principal's visits, and whether it is stale."""
        ...


def decode(data: bytes, type_: type[T]) -> T:
    """The request decoded strictly (unknown fields, wrong types: ``invalid-request``)."""
    if not data.strip():
        raise InvalidRequest("The request is empty; a JSON object is expected.")
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"The request is not valid: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("The request is not valid JSON: it nests too deeply.") from None


def correlation_header(headers: Mapping[str, str] | None) -> uuid.UUID | None:
    """The caller's correlation id (header ``X-Correlation-Id``), if it is a UUID."""
    for name, value in (headers or {}).items():
        if name.lower() == CORRELATION_HEADER.lower():
            return correlation_id_of(value)
    return None


def correlation_of(headers: Mapping[str, str] | None) -> uuid.UUID:
    """The caller's correlation id (header ``X-Correlation-Id``), or a new one."""
    return correlation_header(headers) or uuid.uuid4()


#: HTTP's request headers whose meaning a NATS request carries in its body instead. Sent
#: as headers they would be ignored, silently dropping a condition (a stale If-Match would
#: cancel anyway), so a request carrying one is refused, naming the field to use.
_BODY_FIELD_OF_HEADER = {
    "if-match": "expected_version",
    "idempotency-key": "idempotency_key",
    CONSISTENCY_TOKEN_HEADER.lower(): "consistency_token",
}


def _refuse_unusable_headers(headers: Mapping[str, str] | None) -> None:
    if headers and UNREADABLE_HEADERS in headers:
        raise InvalidRequest("The request's headers are malformed (NATS/1.0 header block).")
    for name in headers or {}:
        field = _BODY_FIELD_OF_HEADER.get(name.lower())
        if field is not None:
            raise InvalidRequest(
                f"Over NATS, {name} is not a header: send it as the request's {field!r} field."
            )


def _command_reply(outcome: CommandOutcome) -> Reply:
    return success(
        outcome.view,
        {
            ETAG_HEADER: f'"{outcome.view.version}"',
            CONSISTENCY_TOKEN_HEADER: outcome.consistency_token,
        },
    )


class ServiceApi:
    """The five endpoints, by name, over the application layer."""

    def __init__(self, appointments: Appointments, visits: VisitsQueries | None) -> None:
        self._appointments = appointments
        self._visits = visits
        self.calls: dict[str, EndpointCall] = {
            "schedule": self.schedule,
            "cancel": self.cancel,
            "start": self.start,
            "get": self.get,
            "visits": self.visits,
        }

    async def answer(self, endpoint: str, data: bytes, headers: Mapping[str, str] | None) -> Reply:
        """The reply to one request of ``endpoint``; never raises (but cancellation).

        It is handled in a server span continuing the request's ``traceparent`` header
        (or in the trace of its ``X-Correlation-Id``); the correlation id is the span's
        trace id when it has a valid one."""
        subject = _SUBJECTS.get(endpoint, endpoint)
        with serving(
            subject,
            headers,
            correlation_header(headers),
            {"messaging.system": "nats", "messaging.destination.name": subject},
        ) as span:
            correlation = current_trace_id() or correlation_of(headers)
            with correlated(correlation):
                reply = await self._answer(endpoint, data, correlation, headers)
            if reply.error_code is not None:
                span.set_attribute("clinic.error_status", reply.error_code)
                if int(reply.error_code) >= 500:
                    span.set_status(Status(StatusCode.ERROR))
        return Reply(reply.data, {**reply.headers, CORRELATION_HEADER: str(correlation)})

    async def _answer(
        self,
        endpoint: str,
        data: bytes,
        correlation: uuid.UUID,
        headers: Mapping[str, str] | None,
    ) -> Reply:
        try:
            if len(data) > MAX_REQUEST_BYTES:
                raise PayloadTooLarge(f"Requests are limited to {MAX_REQUEST_BYTES} bytes.")
            _refuse_unusable_headers(headers)
            return await self.calls[endpoint](data, correlation)
        except ClinicError as exc:
            retry_after = None
            if isinstance(exc, Unavailable):
                retry_after = exc.retry_after
                answered_unavailable(str(exc), exc.__cause__)
            return failure(exc.to_problem(), retry_after)
        except Exception:
            # A bug or a dependency failing in an unforeseen way: the caller learns to
            # retry, the logs get the stack; details never leave the process.
            log.exception("unexpected error on NATS endpoint %s", endpoint)
            doc = problem(
                ErrorCode.UNAVAILABLE, "The request could not be completed; retry shortly."
            )
            return failure(doc, retry_after=1)

    def _context(
        self, actor: Principal, correlation: uuid.UUID, idempotency_key: str | None = None
    ) -> RequestContext:
        return RequestContext(
            principal=actor,
            correlation_id=correlation,
            request_id=uuid.uuid4(),
            idempotency_key=idempotency_key,
        )

    async def schedule(self, data: bytes, correlation: uuid.UUID) -> Reply:
        """``appointments.v1.cmd.schedule``."""
        request = decode(data, ScheduleRequest)
        # The HTTP body's fields only, so that a key's fingerprint is the same over HTTP.
        body = ScheduleBody(
            **{name: getattr(request, name) for name in ScheduleBody.__struct_fields__}
        )
        ctx = self._context(request.actor, correlation, request.idempotency_key)
        return _command_reply(await self._appointments.schedule(ctx, body))

    async def cancel(self, data: bytes, correlation: uuid.UUID) -> Reply:
        """``appointments.v1.cmd.cancel``."""
        request = decode(data, CancelRequest)
        ctx = self._context(request.actor, correlation, request.idempotency_key)
        outcome = await self._appointments.cancel(
            ctx, request.appointment_id, request.reason, request.expected_version
        )
        return _command_reply(outcome)

    async def start(self, data: bytes, correlation: uuid.UUID) -> Reply:
        """``appointments.v1.cmd.start``."""
        request = decode(data, StartRequest)
        ctx = self._context(request.actor, correlation, request.idempotency_key)
        outcome = await self._appointments.start(
            ctx, request.appointment_id, request.expected_version
        )
        return _command_reply(outcome)

    async def get(self, data: bytes, correlation: uuid.UUID) -> Reply:
        """``appointments.v1.query.get``: strongly consistent, from the event store."""
        request = decode(data, GetRequest)
        view = await self._appointments.get(request.actor, request.appointment_id)
        return success(view, {ETAG_HEADER: f'"{view.version}"'})

    async def visits(self, data: bytes, correlation: uuid.UUID) -> Reply:
        """``appointments.v1.query.visits``: a page of Upcoming or Past visits."""
        request = decode(data, VisitsRequest)
        if self._visits is None:
            raise Unavailable("Visits are not served by this instance.", retry_after=5)
        page, stale = await self._visits.list_visits(
            request.actor, request.tab, request.limit, request.cursor, request.consistency_token
        )
        return success(page, {CONSISTENCY_HEADER: "stale"} if stale else None)
