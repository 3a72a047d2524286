"""The NATS service API of ``appointments``: its endpoints, their shapes, and the headers.

One table serves the service (which decodes and answers by it) and the AsyncAPI document
(which describes it), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from contracts.commands import (
    CancelRequest,
    GetRequest,
    ScheduleRequest,
    StartRequest,
    VisitsRequest,
)
from contracts.subjects import CMD_CANCEL, CMD_SCHEDULE, CMD_START, QUERY_GET, QUERY_VISITS
from contracts.views import AppointmentView, VisitsPage

#: Requests larger than this are refused with ``payload-too-large`` (as over HTTP).
MAX_REQUEST_BYTES: Final = 64 * 1024

#: Service-API error headers: a short description, and the HTTP status as a string.
ERROR_HEADER: Final = "Nats-Service-Error"
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
#: Optional on requests (echoed on replies): the trace a request belongs to.
CORRELATION_HEADER: Final = "X-Correlation-Id"
#: On command replies: hand it to ``appointments.v1.query.visits`` to read your write.
CONSISTENCY_TOKEN_HEADER: Final = "X-Consistency-Token"
#: On visits replies that waited for a consistency token in vain: ``stale``.
CONSISTENCY_HEADER: Final = "X-Consistency"
#: On appointment replies: ``"<version>"``, what ``expected_version`` compares with.
ETAG_HEADER: Final = "ETag"
#: On ``unavailable`` error replies: seconds to wait before retrying.
RETRY_AFTER_HEADER: Final = "Retry-After"
CONTENT_TYPE_HEADER: Final = "Content-Type"


@dataclass(frozen=True)
class Endpoint:
    """One request/reply endpoint of the service."""

    name: str
    subject: str
    request: type[msgspec.Struct]
    reply: type[msgspec.Struct]
    summary: str
    command: bool
    """Commands change the appointment (and answer with a consistency token)."""


ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    Endpoint(
        "schedule",
        CMD_SCHEDULE,
        ScheduleRequest,
        AppointmentView,
        "Schedule an appointment (an exact retry, or one with the same idempotency_key, "
        "answers as the first request did).",
        command=True,
    ),
    Endpoint(
        "cancel",
        CMD_CANCEL,
        CancelRequest,
        AppointmentView,
        "Cancel an appointment; cancelling a cancelled one succeeds again.",
        command=True,
    ),
    Endpoint(
        "start",
        CMD_START,
        StartRequest,
        AppointmentView,
        "Start a visit inside its start window; starting a started one succeeds again.",
        command=True,
    ),
    Endpoint(
        "get",
        QUERY_GET,
        GetRequest,
        AppointmentView,
        "Read an appointment, strongly consistent (from the event store).",
        command=False,
    ),
    Endpoint(
        "visits",
        QUERY_VISITS,
        VisitsRequest,
        VisitsPage,
        "One page of the actor's Upcoming or Past visits (eventually consistent; a "
        "consistency_token waits, bounded, for that write; several tokens, comma-separated, "
        "for each of their writes).",
        command=False,
    ),
)
