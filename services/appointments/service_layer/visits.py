"""The visits read model: how an event changes a visit row, and the Upcoming/Past query.

A row stores only facts (times, appointment status, the stream version it reflects);
everything that depends on the clock — the tab, the visit status, ``can_cancel``,
``can_start`` — is computed at read time by :mod:`services.appointments.domain.rules`, the
same functions the commands use.

Read-your-writes: a read that presents a command's consistency token gets that write in
its answer. When the view has not reached it yet (the projector is behind, or NATS is
down), the read repairs the appointment's row itself: it folds the appointment's events
from the event store into the row the projector would write, and upserts it under the
same version guard (:class:`VisitsQuery`). Commands never write the view.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final, Protocol
from uuid import UUID

import msgspec

from contracts.commands import MAX_DURATION_MINUTES, VisitsTab
from contracts.common import Principal
from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    EventEnvelope,
    UnknownEventType,
    decode_event,
)
from contracts.views import AppointmentStatus, VisitsPage, VisitView
from services.appointments.domain.rules import (
    Rules,
    can_cancel,
    can_start,
    ends_at,
    is_upcoming,
    start_window_opens_at,
    visit_status,
)
from services.appointments.service_layer.consistency import parse_tokens
from services.appointments.service_layer.ports import Clock, StoredStreams
from services.errors import InvalidRequest
from services.logs import Throttle
from services.metrics import VIEW_REPAIR_FAILURES, exported

log = logging.getLogger(__name__)
#: Said once a minute at most (with the count held back): reads with tokens of writes the
#: view lacks, by the hundred in a stall, would each say it.
REPAIR_FAILED: Final = "visits row repair failed (waiting for the projector): %r"
#: How long a read with a consistency token may still take once the process stops (to
#: repair its row: one load, one write), within the configured wait.
STOP_REPAIR_SECONDS: Final = 1.0
#: Reads of one user that wait for their consistency tokens at once; beyond, a read only
#: looks (one look, no wait, no repair: stale unless the view has it). A read with a token
#: the view will never hold for its reader (another's appointment, a forged write) waits
#: out the whole wait, so that it tells nothing: without this bound, one user's flood of
#: them held every in-flight slot of the process for that long.
MAX_WAITING_READS_PER_USER: Final = 8
log.addFilter(Throttle([REPAIR_FAILED]))

#: No visit lasts longer: a visit not yet ended started after ``now - LONGEST_VISIT``,
#: which bounds the Upcoming index range from below.
LONGEST_VISIT = timedelta(minutes=MAX_DURATION_MINUTES)


class VisitRow(msgspec.Struct, frozen=True, kw_only=True):
    """One appointment as the visits table stores it."""

    appointment_id: UUID
    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    starts_at: datetime
    ends_at: datetime
    duration_minutes: int
    timezone: str
    visit_reason: str | None
    status: AppointmentStatus
    version: int


class Outcome(Enum):
    """What projecting one event did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    """Already reflected (version <= the row's): a redelivery or a replay."""
    GAP = "gap"
    """An earlier event of the appointment is missing: retry later."""
    SKIPPED = "skipped"
    """An event type this release does not know: the version moves, nothing else."""
    POISON = "poison"
    """A known type whose data cannot be read: park it."""


def project(row: VisitRow | None, envelope: EventEnvelope) -> tuple[Outcome, VisitRow | None]:
    """The row after ``envelope``, and what happened; pure, so replays agree with rebuilds."""
    version = envelope.stream_version
    stored = row.version if row is not None else 0
    if version <= stored:
        return Outcome.DUPLICATE, row
    if version > stored + 1:
        return Outcome.GAP, row
    try:
        event = decode_event(envelope.type, envelope.schema_version, envelope.data)
    except UnknownEventType:
        moved = None if row is None else msgspec.structs.replace(row, version=version)
        return Outcome.SKIPPED, moved
    except (msgspec.ValidationError, KeyError, ValueError, TypeError, OverflowError):
        return Outcome.POISON, row
    try:
        return _fold_one(row, event, envelope.stream_id, version)
    except (OverflowError, ValueError):  # times past year 9999 (the write side never stores them)
        return Outcome.POISON, row


def _fold_one(
    row: VisitRow | None, event: object, stream_id: UUID, version: int
) -> tuple[Outcome, VisitRow | None]:
    match event:
        case AppointmentScheduled() if row is None:
            if not 0 < event.duration_minutes <= MAX_DURATION_MINUTES:
                return Outcome.POISON, row  # the Upcoming range (LONGEST_VISIT) relies on it
            return Outcome.APPLIED, _row(stream_id, event, "scheduled", version)
        case AppointmentCancelled() if row is not None:
            return Outcome.APPLIED, msgspec.structs.replace(
                row, status="cancelled", version=version
            )
        case AppointmentStarted() if row is not None:
            return Outcome.APPLIED, msgspec.structs.replace(row, status="started", version=version)
        case _:
            # The write side never stores this (e.g. a second "scheduled").
            return Outcome.POISON, row


def _row(
    appointment_id: UUID,
    booked: AppointmentScheduled,
    status: AppointmentStatus,
    version: int,
) -> VisitRow:
    starts_at = booked.starts_at.astimezone(UTC)
    return VisitRow(
        appointment_id=appointment_id,
        clinic_id=booked.clinic_id,
        patient_id=booked.patient_id,
        provider_id=booked.provider_id,
        starts_at=starts_at,
        ends_at=ends_at(starts_at, booked.duration_minutes),
        duration_minutes=booked.duration_minutes,
        timezone=booked.timezone,
        visit_reason=booked.visit_reason,
        status=status,
        version=version,
    )


def fold_envelope(row: VisitRow | None, envelope: EventEnvelope) -> VisitRow | None:
    """``row`` after the stored ``envelope``, as :func:`project` folds it (an event of a
    type this release does not know moves the version past it, an unreadable one leaves
    the row as it was)."""
    outcome, folded = project(row, envelope)
    return folded if outcome in (Outcome.APPLIED, Outcome.SKIPPED) else row


def stored_row(envelopes: Sequence[EventEnvelope]) -> VisitRow | None:
    """The row of an appointment folded from all of its stored events (``envelopes``, in
    version order): the row the projector writes once it has applied them all, types of
    a newer release included."""
    row = None
    for envelope in envelopes:
        row = fold_envelope(row, envelope)
    return row


class VisitWrites(Protocol):
    """The visits table, as a read repairs it."""

    async def write_row(self, row: VisitRow) -> None:
        """Upsert ``row`` unless the stored row is at its version or later (so it never
        goes back, whoever writes first: the projector folds the same row)."""
        ...


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """The visits a principal may list: a clinic's, narrowed to a patient or a provider."""

    clinic_id: UUID
    patient_id: UUID | None = None
    provider_id: UUID | None = None

    def holds(self, row: VisitRow) -> bool:
        """Whether ``row`` is one of the visits of this scope."""
        return (
            row.clinic_id == self.clinic_id
            and self.patient_id in (None, row.patient_id)
            and self.provider_id in (None, row.provider_id)
        )

    @classmethod
    def of(cls, principal: Principal) -> Scope:
        """Patients see their own visits, providers those they hold, staff the clinic's."""
        if principal.role == "patient":
            return cls(clinic_id=principal.clinic_id, patient_id=principal.id)
        if principal.role == "provider":
            return cls(clinic_id=principal.clinic_id, provider_id=principal.id)
        return cls(clinic_id=principal.clinic_id)


class PageKey(msgspec.Struct, frozen=True, array_like=True):
    """Where a page ends: the sort key of its last visit (keyset pagination)."""

    tab: VisitsTab
    starts_at: datetime
    appointment_id: UUID


def encode_cursor(key: PageKey) -> str:
    """An opaque cursor for ``key``."""
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def decode_cursor(cursor: str, tab: VisitsTab) -> PageKey:
    """The key of a cursor of ``tab``; ``invalid-request`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = msgspec.json.decode(raw, type=PageKey)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidRequest("cursor is not a cursor this service issued.") from None
    if key.tab != tab or key.starts_at.tzinfo is None:
        raise InvalidRequest(f"cursor does not belong to the {tab} tab.")
    try:  # an issued cursor holds a UTC time; a forged one may have none
        starts_at = key.starts_at.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest("cursor is not a cursor this service issued.") from None
    return PageKey(key.tab, starts_at, key.appointment_id)


class VisitsReader(Protocol):
    """The visits table, as the query service reads it."""

    async def page(
        self, scope: Scope, tab: VisitsTab, now: datetime, after: PageKey | None, limit: int
    ) -> list[VisitRow]:
        """Up to ``limit`` rows of ``tab`` at ``now`` in ``scope``, in the tab's order,
        strictly after ``after``. Upcoming: soonest first; Past: most recent first."""
        ...

    async def wait_for_version(
        self, scope: Scope, appointment_id: UUID, version: int, wait_seconds: float
    ) -> bool:
        """Wait up to ``wait_seconds`` until the view reflects ``version`` of the
        appointment in ``scope``; whether it does. An appointment outside the scope never
        does, so the wait tells nobody whether another's appointment exists."""
        ...


def visit_view(row: VisitRow, now: datetime, rules: Rules) -> VisitView:
    """The visit as listed at ``now``: status and flags from the commands' own rules."""
    return VisitView(
        appointment_id=row.appointment_id,
        clinic_id=row.clinic_id,
        patient_id=row.patient_id,
        provider_id=row.provider_id,
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        timezone=row.timezone,
        visit_reason=row.visit_reason,
        status=visit_status(row.status, row.ends_at, now),
        can_cancel=can_cancel(row.status, row.ends_at, now),
        can_start=can_start(row.status, row.starts_at, row.ends_at, now, rules),
        start_window_opens_at=start_window_opens_at(row.starts_at, rules),
    )


class VisitsQuery:
    """``GET /v1/visits`` and ``appointments.v1.query.visits``."""

    def __init__(
        self,
        reader: VisitsReader,
        clock: Clock,
        rules: Rules,
        consistency_wait: timedelta,
        repair: tuple[StoredStreams, VisitWrites] | None = None,
    ) -> None:
        """``repair``: the event store and the view's writer, for a read whose consistency
        token is ahead of the view to write its row itself (without: it only waits)."""
        self._reader = reader
        self._clock = clock
        self._rules = rules
        self._wait = consistency_wait
        self._repair = repair
        exported(VIEW_REPAIR_FAILURES)
        self._repairs: dict[UUID, _Repair] = {}
        self._waits: set[asyncio.Timeout] = set()  # reads waiting for the projector
        self._deadlines: set[asyncio.Timeout] = set()  # reads with a token, in all
        self._stopping = False
        self._stop_by = 0.0  # the event loop's time by which reads answer, once stopping
        self._waiting: dict[Principal, int] = {}  # reads waiting for their tokens, by user

    def stop_waiting(self) -> None:
        """The process is stopping: reads waiting for the projector to reach their
        consistency token answer now (stale unless the view has caught up), and later
        ones do not wait for it. A read repairing its row (one load, one write) still
        does, within :data:`STOP_REPAIR_SECONDS`: a visit just cancelled is not shown
        for want of a wait of milliseconds. A graceful stop then drains them on time
        instead of cancelling them when its grace runs out."""
        if self._stopping:
            return
        self._stopping = True
        now = asyncio.get_running_loop().time()
        self._stop_by = now + STOP_REPAIR_SECONDS
        for wait in self._waits:
            if not wait.expired():  # one past its deadline is still unwinding: it ends anyway
                wait.reschedule(now)
        for deadline in self._deadlines:
            when = deadline.when()
            if not deadline.expired() and (when is None or when > self._stop_by):
                deadline.reschedule(self._stop_by)

    async def list_visits(
        self,
        principal: Principal,
        tab: VisitsTab = "upcoming",
        limit: int = 20,
        cursor: str | None = None,
        consistency_token: str | None = None,
    ) -> tuple[VisitsPage, bool]:
        """One page of the principal's visits, and whether it is stale: the view had not
        caught up with ``consistency_token`` (one token, or several separated by commas)
        within the configured wait."""
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100.")
        after = decode_cursor(cursor, tab) if cursor else None
        stale = False
        writes = parse_tokens(consistency_token) if consistency_token else []
        if writes:
            stale = not await self._read_your_writes_of(principal, writes)
        now = self._clock()
        rows = await self._reader.page(Scope.of(principal), tab, now, after, limit + 1)
        # The SQL already filters by tab; the rules stay the authority.
        upcoming = tab == "upcoming"
        rows = [r for r in rows if is_upcoming(r.status, r.ends_at, now) == upcoming]
        items = [visit_view(row, now, self._rules) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(PageKey(tab, last.starts_at, last.appointment_id))
        return VisitsPage(items=items, next_cursor=next_cursor), stale

    async def _read_your_writes_of(
        self, principal: Principal, writes: list[tuple[UUID, int]]
    ) -> bool:
        """:meth:`_read_your_writes_in_time`, or one look at the view for a user with
        :data:`MAX_WAITING_READS_PER_USER` reads waiting already."""
        scope = Scope.of(principal)
        waiting = self._waiting.get(principal, 0)
        if waiting >= MAX_WAITING_READS_PER_USER:
            return await self._read_your_writes_in_time(scope, writes, wait=False)
        self._waiting[principal] = waiting + 1
        try:
            return await self._read_your_writes_in_time(scope, writes)
        finally:
            left = self._waiting.pop(principal) - 1
            if left:
                self._waiting[principal] = left

    async def _read_your_writes_in_time(
        self, scope: Scope, writes: list[tuple[UUID, int]], *, wait: bool = True
    ) -> bool:
        """:meth:`_read_your_write` of each write within the configured wait in all (one
        after the other: the first not fresh in time ends it), every query of it
        counted (a database slow to answer, or its pool's connections all taken, would
        otherwise stretch a wait of 2 s to several times that, a query at a time); within
        :data:`STOP_REPAIR_SECONDS` of the stop once the process stops. Not fresh when it
        runs out; a wait of 0 is one look. Without ``wait``, :meth:`_in_view_or_repaired`
        within the same bound instead: a look, or a repair under way joined."""
        seconds = self._wait.total_seconds()
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self._stopping:
            until = min(until, self._stop_by)
        if until <= loop.time():
            return await self._in_view(scope, writes)
        if not wait:
            return await _within(
                asyncio.timeout_at(until), self._deadlines, self._in_view_or_repaired(scope, writes)
            )
        # The last look for the projector starts by ``until`` (as a read that can never be
        # fresh ends its wait: the two take as long); the deadline leaves it its answer.
        return await _within(
            asyncio.timeout_at(until + _LAST_LOOK_SECONDS),
            self._deadlines,
            self._read_your_writes(scope, writes, until),
        )

    async def _in_view_or_repaired(self, scope: Scope, writes: list[tuple[UUID, int]]) -> bool:
        """Whether the view holds every one of ``writes`` now (one look each), or a repair
        of its row already under way (another read's) writes it: joined, none started."""
        for stream_id, version in writes:
            if await self._reader.wait_for_version(scope, stream_id, version, 0):
                continue
            if self._repair is None:
                return False
            repaired = await self._repair_row(scope, stream_id, version, join_only=True)
            if repaired is not _Repaired.WRITTEN:
                return False
        return True

    async def _in_view(self, scope: Scope, writes: list[tuple[UUID, int]]) -> bool:
        """Whether the view holds every one of ``writes`` now (one look each, no wait)."""
        for stream_id, version in writes:
            if not await self._reader.wait_for_version(scope, stream_id, version, 0):
                return False
        return True

    async def _read_your_writes(
        self, scope: Scope, writes: list[tuple[UUID, int]], until: float
    ) -> bool:
        for stream_id, version in writes:
            if not await self._read_your_write(scope, stream_id, version, until):
                return False
        return True

    async def _read_your_write(
        self, scope: Scope, stream_id: UUID, version: int, until: float
    ) -> bool:
        """Whether the view reflects ``version`` of the appointment in ``scope``: at once,
        after repairing its row, or by ``until`` (the event loop's time; waiting for the
        projector: not once the process stops)."""
        if self._repair is None:
            return await self._wait_for_view(scope, stream_id, version, until)
        if await self._reader.wait_for_version(scope, stream_id, version, 0):
            return True
        # Within the wait, as any read with a token (a row locked by a slow writer, a store
        # slow to load: the read answers stale on time rather than late).
        repaired = await self._repair_row(scope, stream_id, version)
        if repaired is _Repaired.WRITTEN:
            return True  # the row now holds the token's version or a later one
        if repaired is _Repaired.NEVER:
            # Outside the scope, or a write the store does not hold (a forged token), the
            # row never qualifies (and is not written): the wait runs out as it always
            # did, so the answer tells nobody whether the appointment exists, without
            # polling the view meanwhile (a flood of such reads costs one load each).
            await self._until_stop(_idle(_left(until)))
            return False
        return await self._wait_for_view(scope, stream_id, version, until)

    async def _wait_for_view(
        self, scope: Scope, stream_id: UUID, version: int, until: float
    ) -> bool:
        """Wait until ``until`` for the projector to bring the view to ``version``; once
        the process stops, only look (the wait of a read already waiting ends then)."""
        if self._stopping:
            return await self._reader.wait_for_version(scope, stream_id, version, 0)
        return await self._until_stop(
            self._reader.wait_for_version(scope, stream_id, version, _left(until))
        )

    async def _until_stop(self, waiting: Coroutine[Any, Any, bool]) -> bool:
        """``waiting``, cut short (False) by :meth:`stop_waiting`; not at all once the
        process stops."""
        if self._stopping:
            waiting.close()
            return False
        return await _within(asyncio.timeout(None), self._waits, waiting)

    async def _repair_row(
        self, scope: Scope, stream_id: UUID, version: int, *, join_only: bool = False
    ) -> _Repaired:
        """Write the appointment's row from its stored events if the reader may see it and
        the store holds the token's write (best effort, within the read's deadline: a
        failure leaves the read to wait for the projector); whether it was written (the
        view then holds ``version`` or, the version guard says, a later one), or never will
        be for this reader. Reads of one appointment that come while its events are loaded
        share that load and its write (which run on if those reads leave). ``join_only``:
        only a repair under way is joined (none there: FAILED, nothing done)."""
        assert self._repair is not None
        try:
            repair, mine = self._repairs.get(stream_id), False
            while True:
                if repair is None:
                    if join_only:
                        return _Repaired.FAILED
                    repair, mine = self._start_repair(stream_id), True
                row = await asyncio.shield(repair.row)
                if mine or (row is not None and row.version >= version):
                    break
                # Folded for an older read, before this write (or before the booking:
                # nothing then): join a fold started since (by another read like this
                # one), or fold again.
                newer = self._repairs.get(stream_id)
                repair = newer if newer is not repair else None
            if row is None or row.version < version or not scope.holds(row):
                return _Repaired.NEVER  # nothing stored, a forged token, or not visible
            if repair.write is None:
                repair.write = asyncio.ensure_future(self._repair[1].write_row(row))
                repair.write.add_done_callback(_retrieved)
            await asyncio.shield(repair.write)
            return _Repaired.WRITTEN
        except Exception as exc:  # the read still answers: fresh if the projector catches up
            VIEW_REPAIR_FAILURES.inc()
            log.warning(REPAIR_FAILED, exc)
            return _Repaired.FAILED

    def _start_repair(self, stream_id: UUID) -> _Repair:
        """A fold of the appointment's stored events, shared with the reads that come
        while it runs (it takes the place of an earlier one)."""
        repair = _Repair(asyncio.ensure_future(self._fold(stream_id)))
        self._repairs[stream_id] = repair

        def done(fold: asyncio.Future[VisitRow | None]) -> None:
            _retrieved(fold)
            if self._repairs.get(stream_id) is repair:
                del self._repairs[stream_id]

        repair.row.add_done_callback(done)
        return repair

    async def _fold(self, stream_id: UUID) -> VisitRow | None:
        assert self._repair is not None
        return stored_row(await self._repair[0].load_envelopes(stream_id))


async def _within(
    limit: asyncio.Timeout, held: set[asyncio.Timeout], work: Awaitable[bool]
) -> bool:
    """``work``, False if ``limit`` (kept in ``held`` meanwhile, for :meth:`VisitsQuery.
    stop_waiting` to move) runs out first. A ``TimeoutError`` of the work's own is raised."""
    try:
        async with limit:
            held.add(limit)
            try:
                return await work
            finally:
                held.discard(limit)
    except TimeoutError:
        if not limit.expired():
            raise
        return False


async def _idle(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return False


#: How long a read's deadline leaves the last look of its wait for the projector (made at
#: the end of the wait) to come back: a cancelled query costs asyncpg a cancel request and
#: a reset of the connection; a look slower than that is cut all the same.
_LAST_LOOK_SECONDS: Final = 0.05


def _left(until: float) -> float:
    """How long a wait may last that must be over by ``until`` (the event loop's time)."""
    return max(0.0, until - asyncio.get_running_loop().time())


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A shared repair's failure is its reads' to report: one that all its reads left
    (their deadline, the stop, a client gone) is not an unretrieved task's ERROR."""
    if not future.cancelled():
        future.exception()


class _Repaired(Enum):
    """What a read's repair of its appointment's row came to."""

    WRITTEN = "written"  # the view holds the token's version (or a later one)
    FAILED = "failed"  # not now (store or view unreachable): the projector may catch up
    NEVER = "never"  # not for this reader: outside its scope, or not a stored write


class _Repair:
    """One appointment's row being repaired: its fold from the store, then its write."""

    __slots__ = ("row", "write")

    def __init__(self, row: asyncio.Future[VisitRow | None]) -> None:
        self.row = row
        self.write: asyncio.Future[None] | None = None
