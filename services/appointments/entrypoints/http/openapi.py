"""OpenAPI details: the documented problem answers and answer headers of each route.

Litestar documents headers only on a route's main success answer, and without a schema;
:func:`documented` adds them, with their schema, to every answer that carries them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIResponse,
    Operation,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec.enums import OpenAPIType

from contracts.errors import ERRORS, PROBLEM_CONTENT_TYPE, Problem


def _header(description: str, schema: Schema) -> OpenAPIHeader:
    return OpenAPIHeader(description=description, schema=schema, required=True)


_UUID = "[0-9a-fA-F-]{36}"
ETAG = _header(
    'The appointment\'s version, "<version>": send it back in If-Match.',
    Schema(type=OpenAPIType.STRING, pattern='^"[0-9]+"$'),
)
CONSISTENCY_TOKEN = _header(
    "<id>.<version> of this write: send it to GET /v1/visits to read your write.",
    Schema(type=OpenAPIType.STRING, pattern=rf"^{_UUID}\.[0-9]+$"),
)
LOCATION = _header(
    "Where the new appointment is.",
    Schema(type=OpenAPIType.STRING, pattern=rf"^/v1/appointments/{_UUID}$"),
)
CONSISTENCY = _header(
    "fresh: the view holds the write of each X-Consistency-Token (no token: the view as it "
    "is); stale: it had not reached one of them in the allowed wait.",
    Schema(type=OpenAPIType.STRING, enum=["fresh", "stale"]),
)
RETRY_AFTER = _header(
    "Seconds to wait before retrying.", Schema(type=OpenAPIType.INTEGER, minimum=0)
)

#: The bearer token every ``/v1`` route requires (``securitySchemes``, and each route's
#: ``security``).
BEARER_SCHEME = "BearerToken"
SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    BEARER_SCHEME: SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="JWT",
        description="A JWT naming the caller: sub, role (patient, provider, staff), clinic_id.",
    )
}
BEARER: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}]

#: Headers of a command's answer (status -> headers).
COMMAND_HEADERS = {
    "200": {"ETag": ETAG, "X-Consistency-Token": CONSISTENCY_TOKEN},
    "201": {"ETag": ETAG, "X-Consistency-Token": CONSISTENCY_TOKEN, "Location": LOCATION},
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` for a route that can answer these error statuses."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_CONTENT_TYPE,
            generate_examples=False,
            description=", ".join(
                code.value for code, (code_status, _) in ERRORS.items() if code_status == status
            ),
        )
        for status in statuses
    }


def documented(
    headers: Mapping[str, Mapping[str, OpenAPIHeader]], *, optional_body: bool = False
) -> type[Operation]:
    """An ``operation_class`` documenting ``headers`` (by status) of its answers, and
    ``Retry-After`` on 503; with ``optional_body``, a request body that may be left out."""
    by_status = {**headers, "503": {"Retry-After": RETRY_AFTER}}

    @dataclass
    class DocumentedOperation(Operation):
        def __post_init__(self) -> None:
            for status, answer in (self.responses or {}).items():
                if isinstance(answer, OpenAPIResponse) and status in by_status:
                    answer.headers = {**(answer.headers or {}), **by_status[status]}
            if optional_body and isinstance(self.request_body, RequestBody):
                self.request_body.required = False

    return DocumentedOperation
