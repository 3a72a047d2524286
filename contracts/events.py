"""The appointment events (the only source of truth) and their wire envelope.

Event payloads are untagged Structs: the envelope's ``type`` and ``schema_version`` say how
to read ``data``. Old schema versions are upcast on read by :func:`decode_event`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Literal
from uuid import UUID

import msgspec

from contracts.common import Actor, AwareDatetime


class AppointmentScheduled(msgspec.Struct, frozen=True, kw_only=True):
    """A video visit was booked between a patient and a provider."""

    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    starts_at: AwareDatetime
    duration_minutes: int
    timezone: str
    visit_reason: str | None = None
    scheduled_by: Actor


class AppointmentCancelled(msgspec.Struct, frozen=True, kw_only=True):
    """The appointment was cancelled before it took place."""

    clinic_id: UUID
    cancelled_by: Actor
    reason: str | None = None
    cancelled_at: AwareDatetime


class AppointmentStarted(msgspec.Struct, frozen=True, kw_only=True):
    """The visit was started inside its start window."""

    clinic_id: UUID
    started_by: Actor
    started_at: AwareDatetime


Event = AppointmentScheduled | AppointmentCancelled | AppointmentStarted
EventType = Literal["AppointmentScheduled", "AppointmentCancelled", "AppointmentStarted"]
EventKind = Literal["scheduled", "cancelled", "started"]

EVENT_TYPES: Final[dict[str, type[Event]]] = {
    "AppointmentScheduled": AppointmentScheduled,
    "AppointmentCancelled": AppointmentCancelled,
    "AppointmentStarted": AppointmentStarted,
}
EVENT_KINDS: Final[dict[str, EventKind]] = {
    "AppointmentScheduled": "scheduled",
    "AppointmentCancelled": "cancelled",
    "AppointmentStarted": "started",
}
#: The schema version written today, per event type.
SCHEMA_VERSIONS: Final[dict[str, int]] = {
    "AppointmentScheduled": 2,
    "AppointmentCancelled": 1,
    "AppointmentStarted": 1,
}


class EventEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """An event as stored and as published on ``appointments.v1.events.…``."""

    event_id: UUID
    type: str
    schema_version: int
    stream_id: UUID
    stream_version: int
    global_position: int
    occurred_at: AwareDatetime
    correlation_id: UUID | None = None
    causation_id: UUID | None = None
    data: dict[str, Any]


class UnknownEventType(Exception):
    """An event type this release does not know (consumers ack and skip it)."""


def event_type(event: Event) -> EventType:
    """The envelope ``type`` of an event."""
    match event:
        case AppointmentScheduled():
            return "AppointmentScheduled"
        case AppointmentCancelled():
            return "AppointmentCancelled"
        case AppointmentStarted():
            return "AppointmentStarted"


def event_kind(type_: str) -> EventKind:
    """The subject token (``scheduled``…) of an event type."""
    try:
        return EVENT_KINDS[type_]
    except KeyError:
        raise UnknownEventType(type_) from None


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _scheduled_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 (before visit reasons existed) had no visit_reason.
    return {**data, "visit_reason": data.get("visit_reason")}


#: (type, from_version) -> function producing the data of from_version + 1.
UPCASTERS: Final[dict[tuple[str, int], Upcaster]] = {
    ("AppointmentScheduled", 1): _scheduled_v1_to_v2,
}


def upcast(type_: str, schema_version: int, data: dict[str, Any]) -> dict[str, Any]:
    """Bring ``data`` written at ``schema_version`` up to the current version."""
    current = SCHEMA_VERSIONS.get(type_)
    if current is None:
        raise UnknownEventType(type_)
    version = schema_version
    while version < current:
        data = UPCASTERS[(type_, version)](data)
        version += 1
    return data


def decode_event(type_: str, schema_version: int, data: dict[str, Any] | bytes) -> Event:
    """Read an event's data of any known schema version as the current Struct."""
    cls = EVENT_TYPES.get(type_)
    if cls is None:
        raise UnknownEventType(type_)
    raw = msgspec.json.decode(data) if isinstance(data, bytes) else data
    return msgspec.convert(upcast(type_, schema_version, raw), cls)


def event_data(event: Event) -> dict[str, Any]:
    """The JSON-ready ``data`` of an event (datetimes and UUIDs as strings)."""
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result
