"""``/v1/appointments``: schedule, read, cancel, start, history."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, HeaderParameter, JSONBody

from contracts.commands import CancelBody, ScheduleBody
from contracts.views import AppointmentView, History
from services.appointments.entrypoints.http.dependencies import (
    authenticated,
    container_of,
    parse_if_match,
    request_context,
    strict_body,
)
from services.appointments.entrypoints.http.openapi import (
    BEARER,
    COMMAND_HEADERS,
    ETAG,
    documented,
    problem_responses,
)
from services.appointments.service_layer.handlers import MAX_IDEMPOTENCY_KEY_LENGTH, CommandOutcome

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match", description='Refuse with 412 unless at this version: "3" (`*`: any)'
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="Retries with the same key and body get the first answer",
        # Documented only: the service layer checks it, answering a problem (400).
        schema_extra={"minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
    ),
]


class _NoBody(msgspec.Struct, forbid_unknown_fields=True):
    """The body of a start: none (``{}`` at most)."""


def _answer(outcome: CommandOutcome, status: int) -> Response[AppointmentView]:
    headers = {
        "ETag": f'"{outcome.view.version}"',
        "X-Consistency-Token": outcome.consistency_token,
    }
    if outcome.created:
        headers["Location"] = f"/v1/appointments/{outcome.view.appointment_id}"
    return Response(outcome.view, status_code=status, headers=headers)


class AppointmentsController(Controller):
    """The commands and the read of one appointment. ``data`` and ``idempotency_key`` are
    declared for the OpenAPI document only: the body is decoded again, strictly, by
    :func:`strict_body`, and the key is read by :func:`request_context`."""

    path = "/v1/appointments"
    security = BEARER
    tags = ["appointments"]
    before_request = staticmethod(authenticated)

    @post(
        "/",
        status_code=201,
        summary="Schedule an appointment",
        response_description="The appointment booked. An exact retry (the same appointment_id"
        " and body) is answered so too, with the appointment as it is now; a repeat of an"
        " Idempotency-Key gets the first answer again.",
        responses=problem_responses(400, 401, 403, 409, 413, 422, 503),
        operation_class=documented(COMMAND_HEADERS),
    )
    async def schedule(
        self,
        request: Request[Any, Any, Any],
        state: State,
        data: JSONBody[ScheduleBody],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[AppointmentView]:
        ctx = request_context(request, state)
        body = await strict_body(request, ScheduleBody)
        outcome = await container_of(state).appointments.schedule(ctx, body)
        return _answer(outcome, 201 if outcome.created else 200)

    @get(
        "/{appointment_id:str}",
        summary="Read an appointment (strongly consistent)",
        responses=problem_responses(400, 401, 404, 503),
        operation_class=documented({"200": {"ETag": ETAG}}),
    )
    async def read(
        self, request: Request[Any, Any, Any], state: State, appointment_id: FromPath[UUID]
    ) -> Response[AppointmentView]:
        ctx = request_context(request, state)
        view = await container_of(state).appointments.get(ctx.principal, appointment_id)
        return Response(view, headers={"ETag": f'"{view.version}"'})

    @post(
        "/{appointment_id:str}/cancel",
        status_code=200,
        summary="Cancel an appointment",
        responses=problem_responses(400, 401, 404, 409, 412, 413, 422, 503),
        operation_class=documented(COMMAND_HEADERS, optional_body=True),
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        state: State,
        appointment_id: FromPath[UUID],
        data: JSONBody[CancelBody | None] = None,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[AppointmentView]:
        ctx = request_context(request, state)
        body = await strict_body(request, CancelBody, optional=True)
        outcome = await container_of(state).appointments.cancel(
            ctx, appointment_id, body.reason, parse_if_match(if_match)
        )
        return _answer(outcome, 200)

    @post(
        "/{appointment_id:str}/start",
        status_code=200,
        summary="Start a visit (inside its start window), or rejoin a started one",
        responses=problem_responses(400, 401, 404, 409, 412, 413, 422, 503),
        operation_class=documented(COMMAND_HEADERS),
    )
    async def start(
        self,
        request: Request[Any, Any, Any],
        state: State,
        appointment_id: FromPath[UUID],
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[AppointmentView]:
        ctx = request_context(request, state)
        # None is expected: empty, ``null`` or ``{}`` (one over 64 KiB is still a 413, and
        # anything else a 400, as over NATS, where a start request has no other fields).
        await strict_body(request, _NoBody, optional=True)
        outcome = await container_of(state).appointments.start(
            ctx, appointment_id, parse_if_match(if_match)
        )
        return _answer(outcome, 200)

    @get(
        "/{appointment_id:str}/history",
        summary="The appointment's events in order (staff and its provider)",
        responses=problem_responses(400, 401, 403, 404, 503),
        operation_class=documented({}),
    )
    async def history(
        self, request: Request[Any, Any, Any], state: State, appointment_id: FromPath[UUID]
    ) -> History:
        ctx = request_context(request, state)
        return await container_of(state).appointments.history(ctx.principal, appointment_id)
