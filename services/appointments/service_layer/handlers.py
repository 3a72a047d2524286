"""The application service: the one place HTTP and NATS hand commands and queries to.

Each command is handled the same way (Emmett's ``handle``): load the stream, fold it,
``decide``, append with optimistic concurrency; on a version conflict decide again on fresh
state, a bounded number of times. The first attempt may decide on a state this process
wrote or read recently (:class:`StateCache`) instead of loading: the append's version check
catches a stale guess, and answers that write nothing are decided on fresh state only.

Commands write events only: a read that presents the answer's consistency token before
the projector got there writes the visits row itself (:mod:`.visits`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from uuid import UUID, uuid5

import msgspec

from contracts.commands import ScheduleBody
from contracts.common import Principal
from contracts.errors import Problem
from contracts.events import EventEnvelope
from contracts.views import AppointmentView, History
from services.appointments.domain.commands import (
    CancelAppointment,
    Command,
    ScheduleAppointment,
    StartAppointment,
)
from services.appointments.domain.decider import decide, visible_booking
from services.appointments.domain.rules import Rules
from services.appointments.domain.state import INITIAL, NotScheduled, State, fold
from services.appointments.domain.view import appointment_view
from services.appointments.service_layer.consistency import make_token
from services.appointments.service_layer.ports import (
    Clock,
    EventStore,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    IdempotencyStore,
    IdFactory,
    NewEvent,
    StatementGaveUp,
    StoredAnswer,
    StreamVersionConflict,
)
from services.appointments.service_layer.state_cache import StateCache
from services.errors import (
    ClinicError,
    Forbidden,
    IdempotencyKeyReused,
    InvalidRequest,
    SlotTaken,
    Unavailable,
    VersionConflict,
    error_of,
)
from services.metrics import COMMAND_RETRIES, COMMANDS, exported, observe_command, zeroed

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LENGTH = 255


class RequestContext(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks, and how to trace and de-duplicate the request."""

    principal: Principal
    correlation_id: UUID | None = None
    request_id: UUID | None = None
    idempotency_key: str | None = None


class CommandOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """A command's answer: the appointment after it, and the write's consistency token."""

    view: AppointmentView
    consistency_token: str
    created: bool = False
    appended: bool = False
    """Whether this request wrote events (a no-op retry or double tap writes none)."""
    replayed: bool = False


class Appointments:
    """Schedule, cancel, start, and read appointments on behalf of a principal."""

    def __init__(
        self,
        store: EventStore,
        idempotency: IdempotencyStore,
        clock: Clock,
        new_id: IdFactory,
        rules: Rules,
        max_attempts: int = 8,
        cache: StateCache | None = None,
    ) -> None:
        self._store = store
        self._idempotency = idempotency
        self._clock = clock
        self._new_id = new_id
        self._rules = rules
        self._max_attempts = max_attempts
        self._cache = cache if cache is not None else StateCache()
        exported(COMMAND_RETRIES)
        # The alert on `unavailable` sees a process's first one (see metrics.zeroed).
        zeroed(
            COMMANDS, *((name, "unavailable") for name in ("schedule", "cancel", "start", "get"))
        )

    async def schedule(self, ctx: RequestContext, body: ScheduleBody) -> CommandOutcome:
        """Book an appointment (``appointment_id`` chosen by the client makes retries safe)."""
        appointment_id = body.appointment_id or self._new_id()
        command = ScheduleAppointment(
            appointment_id=appointment_id,
            actor=ctx.principal,
            patient_id=body.patient_id,
            provider_id=body.provider_id,
            starts_at=body.starts_at,
            duration_minutes=body.duration_minutes,
            timezone=body.timezone,
            visit_reason=body.visit_reason,
        )
        with observe_command("schedule"):
            return await self._idempotent(ctx, ("schedule", body), command, None)

    async def cancel(
        self,
        ctx: RequestContext,
        appointment_id: UUID,
        reason: str | None = None,
        expected_version: int | None = None,
    ) -> CommandOutcome:
        """Cancel; cancelling a cancelled appointment succeeds without a new event."""
        command = CancelAppointment(
            appointment_id=appointment_id, actor=ctx.principal, reason=reason
        )
        request = ("cancel", [appointment_id, reason, expected_version])
        with observe_command("cancel"):
            return await self._idempotent(ctx, request, command, expected_version)

    async def start(
        self, ctx: RequestContext, appointment_id: UUID, expected_version: int | None = None
    ) -> CommandOutcome:
        """Start inside the start window; starting a started visit succeeds again."""
        command = StartAppointment(appointment_id=appointment_id, actor=ctx.principal)
        request = ("start", [appointment_id, expected_version])
        with observe_command("start"):
            return await self._idempotent(ctx, request, command, expected_version)

    async def get(self, principal: Principal, appointment_id: UUID) -> AppointmentView:
        """The appointment, read from the event store (strongly consistent)."""
        with observe_command("get"):
            state, version, _ = await self._load(appointment_id)
            visible_booking(state, principal)
            return appointment_view(appointment_id, state, version, self._clock(), self._rules)

    async def history(self, principal: Principal, appointment_id: UUID) -> History:
        """The appointment's events in order: for staff and the provider who holds it."""
        state, _, envelopes = await self._load(appointment_id)
        booking = visible_booking(state, principal)
        if principal.role == "patient":
            raise Forbidden("Only staff and the appointment's provider can read its history.")
        assert principal.role == "staff" or booking.provider_id == principal.id
        return History(events=envelopes)

    async def _load(self, stream_id: UUID) -> tuple[State, int, list[EventEnvelope]]:
        recorded = await self._store.load(stream_id)
        state = fold(r.event for r in recorded)
        if recorded:
            self._cache.put(stream_id, state, len(recorded))
        return state, len(recorded), [r.envelope for r in recorded]

    async def _idempotent(
        self,
        ctx: RequestContext,
        request: tuple[str, object],
        command: Command,
        expected_version: int | None,
    ) -> CommandOutcome:
        key = ctx.idempotency_key
        if key is None:
            return await self._execute(ctx, command, expected_version, None)
        if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or "\x00" in key:
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters,"
                " none of them U+0000."
            )
        fingerprint = _fingerprint(*request)  # what a retry under this key must repeat
        owner = key_owner(ctx.principal)
        stored = await self._idempotency.find_answer(owner, key)
        if stored is not None:
            return _replay(stored, fingerprint)

        def record(status: int, body: bytes, consistency_token: str = "") -> IdempotencyRecord:
            answer = StoredAnswer(
                fingerprint=fingerprint,
                status=status,
                body=body,
                consistency_token=consistency_token,
            )
            return IdempotencyRecord(principal_id=owner, key=key, answer=answer)

        def remember(outcome: CommandOutcome) -> IdempotencyRecord:
            status = 201 if outcome.created else 200
            return record(status, msgspec.json.encode(outcome.view), outcome.consistency_token)

        try:
            outcome = await self._execute(ctx, command, expected_version, remember)
        except IdempotencyKeyTaken:
            # A concurrent request with the same key committed first: answer as it did.
            stored = await self._idempotency.find_answer(owner, key)
            assert stored is not None
            return _replay(stored, fingerprint)
        except ClinicError as exc:
            if not exc.decided:
                # Not an answer (a 400, 404, 503...): the key waits for one. But a twin
                # with this key may have stored its answer meanwhile (a booking's start
                # passed between the two decisions): then that is this request's answer.
                if isinstance(exc, Unavailable):
                    raise
                stored = await self._idempotency.find_answer(owner, key)
                if stored is None:
                    raise
                return _replay(stored, fingerprint)
            # A refusal for what the appointment is, answered again to retries like any
            # answer, unless a concurrent twin with this key stored its answer first (its
            # cancel may be what made our If-Match stale): then the twin's answer holds.
            problem = exc.to_problem()
            refusal = record(problem.status, msgspec.json.encode(problem))
            stored = await self._idempotency.save_answer(refusal)
            if stored != refusal.answer:
                return _replay(stored, fingerprint)
            raise
        if not outcome.appended:
            # A no-op answer wrote nothing with the events: remember it on its own, unless a
            # concurrent twin with this key stored its answer first (then that one holds).
            mine = remember(outcome)
            stored = await self._idempotency.save_answer(mine)
            if stored != mine.answer:
                return _replay(stored, fingerprint)
        return outcome

    async def _execute(
        self,
        ctx: RequestContext,
        command: Command,
        expected_version: int | None,
        remember: Callable[[CommandOutcome], IdempotencyRecord] | None,
    ) -> CommandOutcome:
        stream_id = command.appointment_id
        loaded: tuple[State, int] | None = None
        for attempt in range(self._max_attempts):
            guessed = False
            cached = self._cache.get(stream_id) if attempt == 0 else None
            if loaded is not None:
                (state, version), loaded = loaded, None
            elif attempt == 0 and isinstance(command, ScheduleAppointment):
                # A new id is the normal case: decide without reading. An id that exists
                # fails the append on its version and is decided again on what is stored;
                # so is a refusal (a late exact retry, with its start now past, is answered
                # by the stored booking, an id taken with a bad body is already-exists).
                (state, version), guessed = (INITIAL, 0), True
            elif cached is not None and expected_version in (None, cached[1]):
                (state, version), guessed = cached, True
            else:
                state, version, _ = await self._load(stream_id)
            now = self._clock()
            try:
                if expected_version is not None:
                    visible_booking(state, ctx.principal)  # never reveal a version to outsiders
                    if expected_version != version:
                        raise VersionConflict(
                            f"The appointment is at version {version}, not {expected_version}."
                        )
                events = decide(state, command, now, self._rules)
            except ClinicError as refusal:
                if not guessed:
                    raise
                # Refusals are decided on what is stored, not on a guess; when the store
                # cannot be read, a booking refused for what it holds is still refused.
                try:
                    loaded_state, loaded_version, _ = await self._load(stream_id)
                except Unavailable:
                    if isinstance(command, ScheduleAppointment):
                        raise refusal from None
                    raise
                loaded = (loaded_state, loaded_version)
                continue
            if not events and guessed:
                continue  # so are answers that write nothing
            if not events:
                view = appointment_view(stream_id, state, version, now, self._rules)
                return CommandOutcome(
                    view=view,
                    consistency_token=make_token(stream_id, version),
                    # A booking's exact retry: answered as the booking was (201, Location).
                    created=isinstance(command, ScheduleAppointment),
                )
            new_version = version + len(events)
            new_state = fold(events, state)
            view = appointment_view(stream_id, new_state, new_version, now, self._rules)
            outcome = CommandOutcome(
                view=view,
                consistency_token=make_token(stream_id, new_version),
                created=isinstance(state, NotScheduled),
                appended=True,
            )
            new_events = [
                NewEvent(
                    event_id=self._new_id(),
                    event=event,
                    occurred_at=now,
                    correlation_id=ctx.correlation_id,
                    causation_id=ctx.request_id,
                )
                for event in events
            ]
            record = remember(outcome) if remember else None
            try:
                await self._store.append(stream_id, version, new_events, record)
            except Unavailable as exc:
                if not isinstance(exc, StatementGaveUp):
                    # A failover that lost commits would leave cached states ahead of the
                    # store (the store refuses appends that would leave a gap).
                    self._cache.clear()
                raise
            except StreamVersionConflict:
                # Decided again on what is stored. With an If-Match, a version that moved
                # is then refused (412); one that did not (a deadlock victim, nothing
                # written) is appended again.
                self._cache.forget(stream_id)
                COMMAND_RETRIES.inc()
                continue
            except SlotTaken:
                # The same id may have been booked concurrently (it collides with itself):
                # decide again, which answers "retry" or "already-exists" if so.
                if version == 0 and (await self._store.load(stream_id)):
                    continue
                raise
            self._cache.put(stream_id, new_state, new_version)
            return outcome
        log.warning("command gave up after %d attempts", self._max_attempts)
        raise Unavailable("The appointment is too busy right now; retry shortly.")


def key_owner(principal: Principal) -> UUID:
    """Whose answers an idempotency key names: the user in one clinic and role. The same
    user id in another clinic is another person, who must never be answered with these."""
    return uuid5(principal.clinic_id, f"{principal.role}/{principal.id}")


def _fingerprint(operation: str, payload: object) -> str:
    encoded = msgspec.json.encode([operation, payload])
    return hashlib.sha256(encoded).hexdigest()


def _replay(stored: StoredAnswer, fingerprint: str) -> CommandOutcome:
    """The stored answer again: the outcome, or the refusal raised."""
    if stored.fingerprint != fingerprint:
        raise IdempotencyKeyReused("This Idempotency-Key was used for another request.")
    if stored.refused:
        raise error_of(msgspec.json.decode(stored.body, type=Problem))
    return CommandOutcome(
        view=msgspec.json.decode(stored.body, type=AppointmentView),
        consistency_token=stored.consistency_token,
        created=stored.status == 201,
        replayed=True,
    )
