"""Correlation ids and OpenTelemetry spans: one id follows a request through the services.

The correlation id is the request's W3C trace id (a UUID is 128 bits, exactly a trace id).
Spans use the OpenTelemetry API; unless the process set up an SDK (``services.telemetry``,
driven by the ``OTEL_*`` variables) the API's no-op provider makes them cost next to
nothing, and the trace context still propagates with the standard W3C TraceContext
propagator:

* a request (HTTP, or the NATS service API) continues an incoming ``traceparent`` (a
  server span); without one, an ``X-Correlation-Id`` becomes its trace id; without
  either, a new trace starts (its trace id is the correlation id when a span records,
  else the correlation id is a random UUID);
* the append stores the command's span context with its events (``events.traceparent``);
* the relay publishes each event in a producer span, child of that context, injected as
  the message's ``traceparent`` (an event stored without one, from before traces were
  stored, gets a ``traceparent`` built from its correlation id and event id);
* the projector and the notification consumer handle each message in a consumer span
  whose parent is the message's ``traceparent``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: The correlation id of the work this task is doing (read by the JSON log formatter).
current_correlation: ContextVar[UUID | None] = ContextVar("correlation_id", default=None)

#: The tracer of every span of the services (the global provider's, once one is set).
TRACER: Final = trace.get_tracer("clinic")
PROPAGATOR: Final = TraceContextTextMapPropagator()
#: The stream every event is published to (the producer spans' destination).
_EVENTS_STREAM: Final = "APPOINTMENTS"


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Header lookup for the propagator, whatever case the sender used."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            for name, candidate in carrier.items():
                if name.lower() == key:
                    value = candidate
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER: Final = _HeaderGetter()


def correlation_id_of(value: str | None) -> UUID | None:
    """The correlation id an ``X-Correlation-Id`` header gives: a UUID, not the nil one
    (no valid trace id, so it would be no correlation: every such caller would share it)."""
    if not value:
        return None
    try:
        correlation = UUID(value)
    except ValueError:
        return None
    return correlation if correlation.int else None


def trace_id_of(traceparent: str | None) -> UUID | None:
    """The trace id of a valid version-00 ``traceparent`` header, as a UUID."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return UUID(hex=match.group(1))


def traceparent(correlation_id: UUID, span_source: UUID) -> str:
    """A ``traceparent`` for work of ``correlation_id``; the span id comes from
    ``span_source`` (e.g. the event id), so it is stable across re-publishes."""
    span = span_source.hex[:16]
    if span == "0" * 16:
        span = "0" * 15 + "1"
    return f"00-{correlation_id.hex}-{span}-01"


@contextmanager
def correlated(correlation_id: UUID | None) -> Iterator[None]:
    """Log records emitted inside carry ``correlation_id``."""
    token = current_correlation.set(correlation_id)
    try:
        yield
    finally:
        current_correlation.reset(token)


_recording = False


def recording() -> bool:
    """Whether a real tracer provider is installed (else spans are the API's no-ops).

    Asked for every request and event, so kept cheap: until a provider is installed the
    API answers with its proxy at once, and a yes is remembered (a provider is set once
    per process).
    """
    global _recording
    if not _recording:
        provider = trace.get_tracer_provider()
        _recording = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _recording


def parent_context(headers: Mapping[str, str] | None, correlation: UUID | None = None) -> Context:
    """The parent of work asked for with ``headers``: their ``traceparent``; else, with a
    ``correlation`` id, a remote parent in the trace of that id (so that the trace id is
    the correlation id); else none (a new trace)."""
    if headers:
        simple = _simple_parent(headers)
        if simple is not None:
            return trace.set_span_in_context(NonRecordingSpan(simple), Context())
        context = PROPAGATOR.extract(headers, Context(), _GETTER)
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
    if correlation is None or not correlation.int:
        return Context()
    parent = SpanContext(
        trace_id=correlation.int,
        span_id=random.getrandbits(64) or 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def _simple_parent(headers: Mapping[str, str]) -> SpanContext | None:
    """The common case without the propagator's cost: a lower-case version-00
    ``traceparent`` and no ``tracestate`` (anything else goes through the propagator)."""
    value = headers.get("traceparent")
    if value is None or "tracestate" in headers:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match.group(3), 16))
    )


def current_trace_id() -> UUID | None:
    """The trace id of the current span as a UUID (``None`` outside any valid span)."""
    context = trace.get_current_span().get_span_context()
    return UUID(int=context.trace_id) if context.is_valid else None


def current_traceparent() -> str | None:
    """The current span context as a ``traceparent`` (stored with appended events)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


@contextmanager
def serving(
    name: str,
    headers: Mapping[str, str] | None,
    correlation: UUID | None = None,
    attributes: Mapping[str, str] | None = None,
) -> Iterator[Span]:
    """A server span for one request, continuing the caller's trace (see
    :func:`parent_context`); the request's correlation id is then
    :func:`current_trace_id`."""
    if not recording():
        # What the no-op tracer does (the parent, if any, becomes the current span),
        # at a fraction of its cost.
        token = otel_context.attach(parent_context(headers, correlation))
        try:
            yield trace.get_current_span()
        finally:
            otel_context.detach(token)
        return
    with TRACER.start_as_current_span(
        name,
        context=parent_context(headers, correlation),
        kind=SpanKind.SERVER,
        attributes=attributes,
    ) as span:
        yield span


def publish_headers(
    subject: str, event_id: UUID, stored: str | None, correlation: UUID | None
) -> dict[str, str]:
    """The headers of an event's message: ``Nats-Msg-Id`` and the ``traceparent`` of its
    producer span, a child of the ``stored`` context of the command that recorded it."""
    headers = {"Nats-Msg-Id": str(event_id)}
    parent = stored or (traceparent(correlation, event_id) if correlation else None)
    if not recording():
        # What the no-op span would inject: the parent's own context.
        if parent is not None:
            headers["traceparent"] = parent
        return headers
    context = parent_context({"traceparent": parent} if parent else None, correlation)
    span = TRACER.start_span(
        f"publish {_EVENTS_STREAM}",
        context=context,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": str(event_id),
        },
    )
    span.end()  # the publish is pipelined; its ack is awaited per batch
    PROPAGATOR.inject(headers, trace.set_span_in_context(span, Context()))
    return headers


@contextmanager
def consuming(
    name: str,
    headers: Mapping[str, str] | None,
    correlation: UUID | None,
    start_time: int | None = None,
) -> Iterator[None]:
    """Handle one message: logs carry ``correlation``, and a consumer span (when spans
    record) is a child of the message's ``traceparent``; ``start_time`` (ns since the
    epoch) when the handling began before this block."""
    with correlated(correlation):
        if not recording():
            yield
            return
        with TRACER.start_as_current_span(
            name,
            context=parent_context(headers, correlation),
            kind=SpanKind.CONSUMER,
            start_time=start_time,
            attributes={"messaging.system": "nats", "messaging.operation.type": "process"},
        ):
            yield
