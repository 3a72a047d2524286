"""The AsyncAPI 3.0 document of every NATS subject of the clinic appointments system.

Seen from the system: it *sends* the appointment events and the sent notifications, it
*receives* the commands and queries of the ``appointments`` service (and replies), and it
*sends* requests to the clinic directory (which replies). Payload schemas are the same
:mod:`contracts.json_schema` components the JSON Schema files hold.
"""

from __future__ import annotations

from typing import Any, Final

from contracts.events import EVENT_KINDS, EVENT_TYPES
from contracts.json_schema import Schema, components, event_schema_name
from contracts.notifications import CLINIC_ID_HEADER, NOTIFICATION_KINDS
from contracts.service_api import (
    CONSISTENCY_HEADER,
    CONSISTENCY_TOKEN_HEADER,
    CORRELATION_HEADER,
    ENDPOINTS,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ETAG_HEADER,
    RETRY_AFTER_HEADER,
)
from contracts.subjects import (
    DIRECTORY_CONTACT_PREFIX,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    NOTIFICATIONS_PREFIX,
    NOTIFICATIONS_STREAM,
    SERVICE_NAME,
)

ASYNCAPI_VERSION: Final = "3.0.0"
#: Version of the documented API (the ``v1`` of the subjects).
API_VERSION: Final = "1.0.0"
SCHEMAS_REF: Final = "#/components/schemas/{name}"

_UUID: Final[Schema] = {"type": "string", "format": "uuid"}
_REQUEST_HEADERS: Final[Schema] = {
    "type": "object",
    "properties": {CORRELATION_HEADER: {**_UUID, "description": "Trace id, echoed back."}},
}


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _headers(required: dict[str, Schema], optional: dict[str, Schema]) -> Schema:
    schema: Schema = {"type": "object", "properties": {**required, **optional}}
    if required:
        schema["required"] = list(required)
    return schema


def _message(name: str, summary: str, headers: Schema | None = None) -> Schema:
    message: Schema = {
        "name": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": _ref(SCHEMAS_REF.format(name=name)),
    }
    if headers is not None:
        message["headers"] = headers
    return message


def _messages() -> dict[str, Schema]:
    trace = {CORRELATION_HEADER: {**_UUID, "description": "The request's trace id."}}
    messages = {
        event_schema_name(type_): _message(
            event_schema_name(type_),
            f"{type_}, in its envelope.",
            _headers({"Nats-Msg-Id": {**_UUID, "description": "= event_id (de-duplication)"}}, {}),
        )
        for type_ in EVENT_TYPES
    }
    for endpoint in ENDPOINTS:
        messages[endpoint.request.__name__] = _message(
            endpoint.request.__name__, endpoint.summary, _REQUEST_HEADERS
        )
    token = {CONSISTENCY_TOKEN_HEADER: {"type": "string", "description": "Read-your-writes."}}
    etag = {ETAG_HEADER: {"type": "string", "description": 'The version, as "<n>".'}}
    messages["AppointmentView"] = _message(
        "AppointmentView",
        "The appointment (command replies also carry a consistency token).",
        _headers(etag, {**token, **trace}),
    )
    stale = {
        CONSISTENCY_HEADER: {"const": "stale", "description": "The token's write is not in yet."}
    }
    messages["VisitsPage"] = _message(
        "VisitsPage", "One page of visits.", _headers({}, {**stale, **trace})
    )
    error = {
        ERROR_HEADER: {"type": "string", "description": "What went wrong, for people."},
        ERROR_CODE_HEADER: {
            "type": "string",
            "pattern": "^[1-5][0-9]{2}$",
            "description": "The HTTP status of the same error.",
        },
    }
    retry = {RETRY_AFTER_HEADER: {"type": "string", "description": "Seconds (with 503)."}}
    messages["Problem"] = _message(
        "Problem",
        "An error reply: service-API error headers and the problem document (RFC 9457).",
        _headers(error, {**retry, **trace}),
    )
    messages["Notification"] = _message("Notification", "A notification that was sent.")
    messages["DirectoryContactRequest"] = {
        "name": "DirectoryContactRequest",
        "summary": "An empty request: the user is named by the subject.",
        "headers": _headers(
            {
                CLINIC_ID_HEADER: {
                    **_UUID,
                    "description": "The clinic the notification is of: answer no address"
                    " for a user not of it.",
                }
            },
            {},
        ),
    }
    messages["DirectoryContactReply"] = _message(
        "DirectoryContactReply", "The user's contact (no reply within 1 s: no e-mail)."
    )
    return messages


def _channel(address: str | None, messages: list[str], description: str, **extra: Any) -> Schema:
    channel: Schema = {
        "address": address,
        "description": description,
        "messages": {name: _ref(f"#/components/messages/{name}") for name in messages},
    }
    channel.update(extra)
    return channel


def _operation(
    action: str, channel: str, messages: list[str], summary: str, reply: Schema | None = None
) -> Schema:
    operation: Schema = {
        "action": action,
        "channel": _ref(f"#/channels/{channel}"),
        "summary": summary,
        "messages": [_ref(f"#/channels/{channel}/messages/{name}") for name in messages],
    }
    if reply is not None:
        operation["reply"] = reply
    return operation


def _reply(channel: str, messages: list[str]) -> Schema:
    return {
        "channel": _ref(f"#/channels/{channel}"),
        "messages": [_ref(f"#/channels/{channel}/messages/{name}") for name in messages],
    }


def _parameters(*names: str) -> dict[str, Schema]:
    return {name: {"description": f"The {name.replace('_', ' ')} (a UUID)."} for name in names}


def asyncapi_document() -> Schema:
    """The AsyncAPI 3.0 document, as a JSON-ready dict."""
    channels: dict[str, Schema] = {}
    operations: dict[str, Schema] = {}
    for type_, kind in EVENT_KINDS.items():
        name = event_schema_name(type_)
        channels[f"{kind}Events"] = _channel(
            f"{EVENTS_PREFIX}.{{clinic_id}}.{{appointment_id}}.{kind}",
            [name],
            f"{type_} events (JetStream stream {EVENTS_STREAM}), in stream_version order "
            "per appointment. Consumers ack and skip event types they do not know.",
            parameters=_parameters("clinic_id", "appointment_id"),
        )
        operations[f"publish{type_}"] = _operation(
            "send", f"{kind}Events", [name], f"Publish {type_} from the outbox."
        )
    replies = ["AppointmentView", "VisitsPage", "Problem"]
    channels["appointmentsReply"] = _channel(
        None, replies, "The reply subject (inbox) each request names."
    )
    for endpoint in ENDPOINTS:
        channels[endpoint.name] = _channel(
            endpoint.subject, [endpoint.request.__name__], endpoint.summary
        )
        operations[endpoint.name] = _operation(
            "receive",
            endpoint.name,
            [endpoint.request.__name__],
            f"{endpoint.summary} Served by the {SERVICE_NAME!r} NATS micro service "
            "(a queue group: instances share the load).",
            _reply("appointmentsReply", [endpoint.reply.__name__, "Problem"]),
        )
    channels["notificationsSent"] = _channel(
        f"{NOTIFICATIONS_PREFIX}.{{kind}}",
        ["Notification"],
        f"Every notification sent (JetStream stream {NOTIFICATIONS_STREAM}).",
        parameters={"kind": {"enum": list(NOTIFICATION_KINDS), "description": "Its kind."}},
    )
    operations["publishNotification"] = _operation(
        "send", "notificationsSent", ["Notification"], "Publish a sent notification."
    )
    channels["directoryContact"] = _channel(
        f"{DIRECTORY_CONTACT_PREFIX}.{{user_id}}",
        ["DirectoryContactRequest"],
        "The clinic directory's contact lookup.",
        parameters=_parameters("user_id"),
    )
    channels["directoryReply"] = _channel(
        None, ["DirectoryContactReply"], "The reply subject (inbox) of a contact lookup."
    )
    operations["askContact"] = _operation(
        "send",
        "directoryContact",
        ["DirectoryContactRequest"],
        "Ask the clinic directory for a user's e-mail address and locale.",
        _reply("directoryReply", ["DirectoryContactReply"]),
    )
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Clinic appointments",
            "version": API_VERSION,
            "description": "Appointment events, the appointments service API (commands and "
            "queries), sent notifications and the clinic directory lookup, over NATS.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": components(SCHEMAS_REF), "messages": _messages()},
    }
