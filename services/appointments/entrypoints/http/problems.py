"""Every error answered over HTTP as ``application/problem+json``, mapped in one place.

No request, however malformed, gets a 500: anything unexpected is logged with its stack
and answered ``503 unavailable``.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.types import ExceptionHandlersMap

from contracts.errors import PROBLEM_CONTENT_TYPE, ErrorCode, Problem, problem
from services.errors import ClinicError, Unauthenticated, Unavailable
from services.logs import answered_unavailable

log = logging.getLogger(__name__)

_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
}


def problem_response(doc: Problem, headers: dict[str, str] | None = None) -> Response[bytes]:
    """The HTTP response carrying ``doc``."""
    return Response(
        content=msgspec.json.encode(doc),
        status_code=doc.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


#: The challenge of a 401 (RFC 9110 section 11.6.1, RFC 6750 section 3).
BEARER_CHALLENGE = 'Bearer realm="clinic"'


def _clinic_error(_: Request[Any, Any, Any], exc: ClinicError) -> Response[bytes]:
    headers = None
    if isinstance(exc, Unavailable):
        headers = {"Retry-After": str(exc.retry_after)}
        answered_unavailable(str(exc), exc.__cause__)
    elif isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": BEARER_CHALLENGE}
    return problem_response(exc.to_problem(), headers)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    reasons = [_reason(item) for item in (exc.extra if isinstance(exc.extra, list) else [])]
    detail = "; ".join(reasons) or exc.detail or "The request is malformed."
    return problem_response(problem(ErrorCode.INVALID_REQUEST, detail))


def _reason(item: object) -> str:
    """One of Litestar's validation failures, naming the field it is about."""
    if not isinstance(item, dict):
        return str(item)
    message = str(item.get("message", "")).strip()
    key = item.get("key")
    if key == "data" and item.get("source") == "body":
        if message in ("", "'data'"):  # no body at all
            return "The request body is missing; a JSON object is expected."
        return f"The body is not valid: {message}"
    if key and str(key) not in message:
        return f"{key}: {message}" if message else f"{key} is not valid."
    return message or "The request is malformed."


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    code = _STATUS_CODES.get(exc.status_code)
    if code is not None:
        detail = exc.detail or "The request was refused."
        if isinstance(exc.__cause__, SerializationException):  # Litestar decoding a body
            detail = f"The body is not valid JSON: {detail}"
        return problem_response(problem(code, detail))
    # Statuses without a domain code (405, 406, 415…) keep their status, in problem form.
    body = {
        "type": "about:blank",
        "title": exc.detail or "Request refused",
        "status": exc.status_code,
        "detail": exc.detail or "The request was refused.",
        "code": "invalid-request",
    }
    return Response(
        content=msgspec.json.encode(body),
        status_code=exc.status_code,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=exc.headers,
    )


def _undecodable(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # The JSON decoder (Litestar's, before our handlers run, or ours) gives up on invalid
    # UTF-8 in a string and on deep nesting with these, not with a DecodeError.
    detail = "The body nests too deeply." if isinstance(exc, RecursionError) else str(exc)
    return problem_response(problem(ErrorCode.INVALID_REQUEST, f"The body is not valid: {detail}"))


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem_response(
        problem(ErrorCode.UNAVAILABLE, "The request could not be completed; retry shortly."),
        {"Retry-After": "1"},
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ClinicError: _clinic_error,
    ValidationException: _validation_error,
    NotFoundException: _http_error,
    NotAuthorizedException: _http_error,
    HTTPException: _http_error,
    RecursionError: _undecodable,
    UnicodeDecodeError: _undecodable,
    Exception: _unexpected,
}
