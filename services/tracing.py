"""Correlation ids and W3C ``traceparent``: one id follows a request through the services.

The correlation id is a UUID, i.e. 128 bits — exactly a W3C trace id. An incoming
``traceparent`` gives the request its correlation id; the relay publishes each event with
a ``traceparent`` built from the event's correlation id (trace) and event id (span), so a
tracing system — or a grep of the JSON logs — joins HTTP request, event and consumers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from uuid import UUID

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: The correlation id of the work this task is doing (read by the JSON log formatter).
current_correlation: ContextVar[UUID | None] = ContextVar("correlation_id", default=None)


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
