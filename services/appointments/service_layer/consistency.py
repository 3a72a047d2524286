"""Consistency tokens: "this write", as a client can hand it back to a read.

A token names one appointment's stream at one version; a read that presents it waits
until the view has applied that version (read-your-writes). A read may present several,
separated by commas (a client's commands on several appointments since its last read).
"""

from __future__ import annotations

from typing import Final
from uuid import UUID

from services.errors import InvalidRequest

#: Tokens one read may present.
MAX_TOKENS: Final = 16


def make_token(stream_id: UUID, version: int) -> str:
    """The token of ``stream_id`` at ``version``."""
    return f"{stream_id}.{version}"


def parse_token(token: str) -> tuple[UUID, int]:
    """(stream_id, version) of a token; ``invalid-request`` if it is not one."""
    stream, _, version = token.strip().partition(".")
    try:
        parsed = UUID(stream), int(version)
    except ValueError:
        raise InvalidRequest("X-Consistency-Token is not a token this service issued.") from None
    if parsed[1] < 0:
        raise InvalidRequest("X-Consistency-Token is not a token this service issued.")
    return parsed


def parse_tokens(tokens: str) -> list[tuple[UUID, int]]:
    """(stream_id, version) of each token of ``tokens`` (one, or several separated by
    commas; empty elements of the list are skipped, RFC 9110 5.6.1: none, no token), the
    latest version of an appointment named twice; ``invalid-request`` if one is not a token
    or they are more than :data:`MAX_TOKENS`."""
    parts = [part for part in tokens.split(",") if part.strip()]
    if len(parts) > MAX_TOKENS:
        raise InvalidRequest(f"X-Consistency-Token holds at most {MAX_TOKENS} tokens.")
    latest: dict[UUID, int] = {}
    for part in parts:
        stream_id, version = parse_token(part)
        latest[stream_id] = max(version, latest.get(stream_id, version))
    return list(latest.items())
