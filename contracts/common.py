"""Shapes shared by events, commands and views."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec

Role = Literal["patient", "provider", "staff"]
ROLES: tuple[Role, ...] = ("patient", "provider", "staff")

#: A timestamp that must carry an offset (RFC 3339); naive times are refused on decode.
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

#: What msgspec's JSON decoders raise for bytes that are not readable JSON of the type asked
#: for: a DecodeError (ValidationError is one), a UnicodeDecodeError for invalid UTF-8 inside
#: a string, a RecursionError for nesting deeper than the decoder goes.
UNREADABLE_JSON: tuple[type[Exception], ...] = (
    msgspec.DecodeError,
    UnicodeDecodeError,
    RecursionError,
)

MAX_TEXT_LENGTH = 500
#: Optional free text (visit reason, cancellation reason).
FreeText = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]


class Actor(msgspec.Struct, frozen=True):
    """Who did something, as recorded in events."""

    id: UUID
    role: Role


class Principal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An authenticated caller: a user acting in one clinic with one role."""

    id: UUID
    role: Role
    clinic_id: UUID

    @property
    def actor(self) -> Actor:
        return Actor(id=self.id, role=self.role)
