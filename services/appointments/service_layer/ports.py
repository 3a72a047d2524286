"""The ports the application layer needs; adapters implement them, tests fake them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol
from uuid import UUID

import msgspec

from contracts.events import Event, EventEnvelope
from services.errors import Unavailable


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event decided but not yet stored."""

    event_id: UUID
    event: Event
    occurred_at: datetime
    correlation_id: UUID | None = None
    causation_id: UUID | None = None


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A stored event: its envelope and its decoded (upcast) payload."""

    envelope: EventEnvelope
    event: Event


class StoredAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The first answer to an idempotent request, kept to answer its retries: a success
    (``body``: the appointment) or a refusal decided on the appointment's state (``status``
    409 or 412, ``body``: its problem document, no ``consistency_token``)."""

    fingerprint: str
    status: int
    body: bytes
    consistency_token: str

    @property
    def refused(self) -> bool:
        """Whether the answer is a refusal (``body`` a problem document)."""
        return self.status >= 400


class IdempotencyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An answer to store under (principal, key): written with the events it answers, or
    on its own when it appends none (a no-op success, a refusal)."""

    principal_id: UUID
    key: str
    answer: StoredAnswer


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    stream_version: int
    global_position: int


class StreamVersionConflict(Exception):
    """The stream is no longer at the expected version: re-decide on fresh state."""


class IdempotencyKeyTaken(Exception):
    """Another request stored an answer under the same key first."""


class StatementGaveUp(Unavailable):
    """The database gave up on one statement (a statement or lock timeout, a cancelled
    query): a ``503`` like an outage, but the database is there and other statements may
    well pass meanwhile."""


class NotSent(StatementGaveUp):
    """Nothing reached the database (no connection came free in time, a write's turn did
    not come): a ``503`` whose request certainly changed nothing."""


class EventStore(Protocol):
    """Append-only streams of appointment events, with the outbox written alongside."""

    async def load(self, stream_id: UUID) -> list[RecordedEvent]:
        """All events of the stream in ``stream_version`` order (empty if none)."""
        ...

    async def append(
        self,
        stream_id: UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        """Append ``events`` (at least one) if the stream is at ``expected_version``,
        atomically with the outbox rows, the provider-booking guard and ``idempotency``.

        Raises :class:`StreamVersionConflict`, :class:`services.errors.SlotTaken`,
        :class:`IdempotencyKeyTaken`, or :class:`services.errors.Unavailable`.
        """
        ...


class StoredStreams(Protocol):
    """The event store, as the read side folds an appointment's row from it."""

    async def load_envelopes(self, stream_id: UUID) -> list[EventEnvelope]:
        """The stream's events as stored (``data`` not decoded, so that types of a newer
        release pass), in version order (empty if none)."""
        ...


class ReadableEventStore(EventStore, StoredStreams, Protocol):
    """An event store the read side folds rows from, too."""


class IdempotencyStore(Protocol):
    """Answers of idempotent requests, keyed by (principal, key)."""

    async def find_answer(self, principal_id: UUID, key: str) -> StoredAnswer | None:
        """The stored answer for this key, if any."""
        ...

    async def save_answer(self, record: IdempotencyRecord) -> StoredAnswer:
        """Store ``record`` unless one exists; return whichever is stored (a concurrent
        twin's, committed meanwhile, included)."""
        ...


class Clock(Protocol):
    def __call__(self) -> datetime: ...


class IdFactory(Protocol):
    def __call__(self) -> UUID: ...
