"""Consistency tokens: "this write", as a client can hand it back to a read.

A token names one appointment's stream at one version; a read that presents it waits
until the view has applied that version (read-your-writes).
"""

from __future__ import annotations

from uuid import UUID

from services.errors import InvalidRequest


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
