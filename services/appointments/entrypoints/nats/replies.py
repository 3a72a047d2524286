"""Replies of the NATS service API: a JSON body and headers, success or problem.

A success reply carries the same JSON as the HTTP answer; an error reply carries the
service-API error headers (``Nats-Service-Error``, ``Nats-Service-Error-Code`` = the HTTP
status) and the same problem document as HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import msgspec

from contracts.errors import PROBLEM_CONTENT_TYPE, Problem
from contracts.service_api import (
    CONTENT_TYPE_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    RETRY_AFTER_HEADER,
)

JSON_CONTENT_TYPE = "application/json"
#: Header values are one line of printable ASCII; longer descriptions are cut.
MAX_ERROR_HEADER_LENGTH = 256
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


@dataclass(frozen=True)
class Reply:
    """What to send back: the body and its headers (error headers included)."""

    data: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def error_code(self) -> str | None:
        """The HTTP status of an error reply, ``None`` for a success."""
        return self.headers.get(ERROR_CODE_HEADER)


def success(body: msgspec.Struct, headers: dict[str, str] | None = None) -> Reply:
    """A success reply with ``body`` encoded as the HTTP answer encodes it."""
    return Reply(
        msgspec.json.encode(body), {CONTENT_TYPE_HEADER: JSON_CONTENT_TYPE, **(headers or {})}
    )


def failure(doc: Problem, retry_after: int | None = None) -> Reply:
    """An error reply carrying ``doc`` and the service-API error headers."""
    headers = {
        CONTENT_TYPE_HEADER: PROBLEM_CONTENT_TYPE,
        ERROR_HEADER: header_text(doc.detail or doc.title),
        ERROR_CODE_HEADER: str(doc.status),
    }
    if retry_after is not None:
        headers[RETRY_AFTER_HEADER] = str(retry_after)
    return Reply(msgspec.json.encode(doc), headers)


def header_text(text: str) -> str:
    """``text`` as a safe header value: one line of printable ASCII, bounded."""
    line = _UNPRINTABLE.sub(" ", text).strip()
    if len(line) > MAX_ERROR_HEADER_LENGTH:
        line = line[: MAX_ERROR_HEADER_LENGTH - 3] + "..."
    return line or "error"
