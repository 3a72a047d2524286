"""``GET /v1/visits``: the patient's Upcoming and Past visits, read-your-writes on request."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from litestar.params import HeaderParameter, QueryParameter

from contracts.commands import VisitsTab
from contracts.views import VisitsPage
from services.appointments.entrypoints.http.dependencies import (
    authenticated,
    container_of,
    request_context,
)
from services.appointments.entrypoints.http.openapi import (
    BEARER,
    CONSISTENCY,
    documented,
    problem_responses,
)
from services.errors import InvalidRequest

ConsistencyToken = Annotated[
    str | None,
    HeaderParameter(
        name="X-Consistency-Token",
        description="From a command answer: wait until the view includes that write "
        "(several, up to 16 separated by commas: each of their writes)",
        max_length=1000,
    ),
]


class VisitsController(Controller):
    path = "/v1/visits"
    security = BEARER
    tags = ["visits"]
    before_request = staticmethod(authenticated)

    @get(
        "/",
        summary="Upcoming or Past visits of the caller",
        responses=problem_responses(400, 401, 503),
        operation_class=documented({"200": {"X-Consistency": CONSISTENCY}}),
    )
    async def list_visits(
        self,
        request: Request[Any, Any, Any],
        state: State,
        tab: Annotated[VisitsTab, QueryParameter(description="upcoming or past")] = "upcoming",
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, QueryParameter(max_length=200)] = None,
        consistency_token: ConsistencyToken = None,
    ) -> Response[VisitsPage]:
        ctx = request_context(request, state)
        if not all(n.isascii() and n.isdigit() for n in request.query_params.getall("limit", [])):
            # Litestar takes "1.0", "2e0" or "+5" for the number they make (of the last
            # limit given); NATS, whose requests are JSON, refuses a limit not an integer.
            raise InvalidRequest("limit must be a whole number between 1 and 100.")
        page, stale = await container_of(state).visits.list_visits(
            ctx.principal, tab, limit, cursor, consistency_token
        )
        headers = {"X-Consistency": "stale"} if stale else {"X-Consistency": "fresh"}
        return Response(page, headers=headers)
