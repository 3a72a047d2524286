"""Request-scoped values the controllers receive: the principal, the request context."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.datastructures import State

from services.appointments.bootstrap import Container
from services.appointments.service_layer.handlers import RequestContext
from services.errors import InvalidRequest
from services.tracing import (
    correlation_id_of,
    current_correlation,
    current_trace_id,
    trace_id_of,
)

T = TypeVar("T", bound=msgspec.Struct)


def container_of(state: State) -> Container:
    """The process's composition root, put on the app state by ``create_app``."""
    container: Container = state.container
    return container


async def authenticated(request: Request[Any, Any, Any]) -> None:
    """``before_request`` of the protected controllers: the bearer token is checked before
    the body and the parameters are parsed, so a caller without a valid token gets 401,
    never an answer about what it sent. (The handler's :func:`request_context` verifies it
    again, from the verifier's cache of tokens.)

    Not a Litestar guard: a guard is called with a copy of its route handler on every
    request, and a plain-function guard in a worker thread, costs a command pays for
    nothing. A coroutine, so that Litestar awaits it on the event loop. Litestar keeps only
    the innermost layer's ``before_request``: a route given its own would skip this check
    (a unit test walks every API route)."""
    container_of(request.app.state).verifier.principal_from_header(
        request.headers.get("authorization")
    )


def request_context(request: Request[Any, Any, Any], state: State) -> RequestContext:
    """The verified principal, correlation id and idempotency key of this request."""
    container = container_of(state)
    principal = container.verifier.principal_from_header(request.headers.get("authorization"))
    # The trace id of the request's span (RequestTracing) when it is valid: that of its
    # traceparent, or its X-Correlation-Id; without either, of a new recording span.
    correlation = (
        current_trace_id()
        or correlation_id_of(request.headers.get("x-correlation-id"))
        or trace_id_of(request.headers.get("traceparent"))
        or uuid.uuid4()
    )
    # The request's task logs with its correlation id from here on.
    current_correlation.set(correlation)
    return RequestContext(
        principal=principal,
        correlation_id=correlation,
        request_id=uuid.uuid4(),
        idempotency_key=request.headers.get("idempotency-key"),
    )


async def strict_body(request: Request[Any, Any, Any], type_: type[T], optional: bool = False) -> T:
    """The JSON body decoded strictly (no "30" for 30); ``optional``: empty or ``null``
    (as the OpenAPI document allows) means defaults.

    Litestar converts bodies leniently, so the raw body is decoded once more here.
    """
    raw = await request.body()
    # No body, or null; whitespace alone is no JSON text (refused, as Litestar refuses it
    # where it parses the body first: cancel).
    if optional and (raw == b"" or raw.strip() == b"null"):
        return type_()
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"The body is not valid: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}") from None


def parse_if_match(value: str | None) -> int | None:
    """The version of an ``If-Match: "<version>"`` header (weak tags accepted); ``*``
    (any version, RFC 9110) is no condition: the appointment only has to exist."""
    if value is None or value.strip() == "*":
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not (tag.isascii() and tag.isdigit()) or len(tag) > 9:
        raise InvalidRequest('If-Match must be an ETag of this API, e.g. "3".')
    return int(tag)
