"""In-memory fakes of our own ports, for unit tests of the application layer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from uuid import UUID

from contracts.commands import VisitsTab
from contracts.events import (
    SCHEMA_VERSIONS,
    AppointmentCancelled,
    AppointmentScheduled,
    EventEnvelope,
    event_data,
    event_type,
)
from services.appointments.domain.rules import is_upcoming
from services.appointments.service_layer.ports import (
    AppendResult,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    NewEvent,
    RecordedEvent,
    StoredAnswer,
    StreamVersionConflict,
)
from services.appointments.service_layer.visits import PageKey, Scope, VisitRow
from services.errors import SlotTaken, Unavailable


class FakeEventStore:
    """EventStore and IdempotencyStore in memory, with the same guarantees as PostgreSQL."""

    def __init__(self) -> None:
        self.streams: dict[UUID, list[RecordedEvent]] = {}
        self.bookings: dict[UUID, tuple[UUID, UUID, object, object]] = {}
        self.answers: dict[tuple[UUID, str], StoredAnswer] = {}
        self.outbox: list[int] = []
        self.position = 0
        self.appends = 0
        self.loads = 0

    async def load(self, stream_id: UUID) -> list[RecordedEvent]:
        self.loads += 1
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        return list(self.streams.get(stream_id, []))

    async def load_envelopes(self, stream_id: UUID) -> list[EventEnvelope]:
        return [recorded.envelope for recorded in await self.load(stream_id)]

    async def append(
        self,
        stream_id: UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        self.appends += 1
        stream = self.streams.setdefault(stream_id, [])
        if len(stream) != expected_version:
            raise StreamVersionConflict()
        if idempotency and (idempotency.principal_id, idempotency.key) in self.answers:
            raise IdempotencyKeyTaken()
        for new in events:
            self._guard_booking(stream_id, new)
        for new in events:
            self.position += 1
            type_ = event_type(new.event)
            envelope = EventEnvelope(
                event_id=new.event_id,
                type=type_,
                schema_version=SCHEMA_VERSIONS[type_],
                stream_id=stream_id,
                stream_version=len(stream) + 1,
                global_position=self.position,
                occurred_at=new.occurred_at,
                correlation_id=new.correlation_id,
                causation_id=new.causation_id,
                data=event_data(new.event),
            )
            stream.append(RecordedEvent(envelope=envelope, event=new.event))
            self.outbox.append(self.position)
        if idempotency:
            self.answers[(idempotency.principal_id, idempotency.key)] = idempotency.answer
        return AppendResult(stream_version=len(stream), global_position=self.position)

    def _guard_booking(self, stream_id: UUID, new: NewEvent) -> None:
        event = new.event
        if isinstance(event, AppointmentCancelled):
            self.bookings.pop(stream_id, None)
        elif isinstance(event, AppointmentScheduled):
            ends = event.starts_at + timedelta(minutes=event.duration_minutes)
            for clinic, provider, starts, other_ends in self.bookings.values():
                if (clinic, provider) == (event.clinic_id, event.provider_id) and (
                    starts < ends and event.starts_at < other_ends  # type: ignore[operator]
                ):
                    raise SlotTaken("The provider already has an appointment at that time.")
            self.bookings[stream_id] = (event.clinic_id, event.provider_id, event.starts_at, ends)

    async def find_answer(self, principal_id: UUID, key: str) -> StoredAnswer | None:
        return self.answers.get((principal_id, key))

    async def save_answer(self, record: IdempotencyRecord) -> StoredAnswer:
        return self.answers.setdefault((record.principal_id, record.key), record.answer)


class FakeVisits:
    """The visits table as reads see and repair it: rows by appointment, with the same
    version guard and scopes as PostgreSQL; ``down`` makes every write fail, ``hang``
    every write wait forever."""

    def __init__(self) -> None:
        self.rows: dict[UUID, VisitRow] = {}
        self.writes = 0
        self.version_checks = 0  # calls of wait_for_version (each a query in PostgreSQL)
        self.down = False
        self.hang = False

    async def write_row(self, row: VisitRow) -> None:
        self.writes += 1
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        if self.down:
            raise Unavailable("The database is unreachable.")
        if self.hang:
            await asyncio.Event().wait()
        stored = self.rows.get(row.appointment_id)
        if stored is None or stored.version < row.version:
            self.rows[row.appointment_id] = row

    async def page(
        self, scope: Scope, tab: VisitsTab, now: datetime, after: PageKey | None, limit: int
    ) -> list[VisitRow]:
        assert after is None, "the fake pages once"
        rows = [r for r in self.rows.values() if scope.holds(r)]
        rows = [r for r in rows if is_upcoming(r.status, r.ends_at, now) == (tab == "upcoming")]
        rows.sort(key=lambda r: (r.starts_at, r.appointment_id), reverse=tab == "past")
        return rows[:limit]

    async def wait_for_version(
        self, scope: Scope, appointment_id: UUID, version: int, wait_seconds: float
    ) -> bool:
        self.version_checks += 1
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            row = self.rows.get(appointment_id)
            if version <= 0 or (row is not None and scope.holds(row) and row.version >= version):
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.001)
