"""OpenAPI details: the documented problem answers of each route."""

from __future__ import annotations

from litestar.openapi import ResponseSpec

from contracts.errors import ERRORS, PROBLEM_CONTENT_TYPE, Problem


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` for a route that can answer these error statuses."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_CONTENT_TYPE,
            description=", ".join(
                code.value for code, (code_status, _) in ERRORS.items() if code_status == status
            ),
        )
        for status in statuses
    }
