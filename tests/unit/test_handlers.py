"""The application service on fakes: retries, If-Match, idempotency keys, tracing ids."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import pytest

from contracts.common import Principal
from contracts.errors import ErrorCode, problem
from services.appointments.domain.rules import Rules
from services.appointments.domain.state import INITIAL
from services.appointments.service_layer.consistency import make_token, parse_token, parse_tokens
from services.appointments.service_layer.handlers import Appointments, RequestContext, key_owner
from services.appointments.service_layer.ports import (
    AppendResult,
    IdempotencyRecord,
    NewEvent,
    RecordedEvent,
    StoredAnswer,
    StreamVersionConflict,
)
from services.appointments.service_layer.state_cache import StateCache
from services.errors import (
    AlreadyExists,
    AppointmentIsCancelled,
    Forbidden,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    SlotTaken,
    TooEarly,
    Unavailable,
    VersionConflict,
    error_of,
)
from tests.support.builders import principal, schedule_body
from tests.support.clock import ManualClock
from tests.support.fakes import FakeEventStore


class RacingStore(FakeEventStore):
    """Lets another writer cancel the appointment just before our next append."""

    def __init__(self) -> None:
        super().__init__()
        self.interfere: list[Appointments] = []
        self.races = 0

    async def append(
        self,
        stream_id: uuid.UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        if self.races:
            self.races -= 1
            await super().append(stream_id, expected_version, events)  # someone else won
        return await super().append(stream_id, expected_version, events, idempotency)


class AlwaysConflicting(FakeEventStore):
    async def append(self, *args: object, **kwargs: object) -> AppendResult:
        self.appends += 1
        raise StreamVersionConflict()


class BlindOnce(FakeEventStore):
    """Its next ``blind`` key lookups miss: each reads just before a concurrent twin of the
    request, under the same key, committed."""

    blind = 0

    async def find_answer(self, principal_id: uuid.UUID, key: str) -> StoredAnswer | None:
        if self.blind:
            self.blind -= 1
            return None
        return await super().find_answer(principal_id, key)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def service(store: FakeEventStore, clock: ManualClock) -> Appointments:
    return Appointments(store, store, clock, uuid.uuid4, Rules(), max_attempts=4)


async def test_a_lost_race_is_decided_again_on_fresh_state(clock: ManualClock) -> None:
    store = RacingStore()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await app.schedule(ctx, schedule_body(clock.now))
    store.races = 1
    outcome = await app.cancel(ctx, created.view.appointment_id)
    # The racing writer's cancel landed first; ours re-decided to a no-op success.
    assert outcome.view.status == "cancelled" and not outcome.appended
    assert len(store.streams[created.view.appointment_id]) == 2


async def test_a_lost_race_with_if_match_is_a_version_conflict(clock: ManualClock) -> None:
    store = RacingStore()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await app.schedule(ctx, schedule_body(clock.now))
    store.races = 1
    with pytest.raises(VersionConflict):
        await app.cancel(ctx, created.view.appointment_id, expected_version=1)


class RefusingNext(FakeEventStore):
    """Its next appends raise ``refusals``, one each, writing nothing: a deadlock victim
    (``StreamVersionConflict``, as the event store reports it: the version unchanged), the
    database gone away (a failover)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[Exception] = []

    async def append(
        self,
        stream_id: uuid.UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        if self.refusals:
            raise self.refusals.pop(0)
        return await super().append(stream_id, expected_version, events, idempotency)


async def test_a_deadlock_victim_with_a_current_if_match_is_appended_again(
    clock: ManualClock,
) -> None:
    store = RefusingNext()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await app.schedule(ctx, schedule_body(clock.now))
    store.refusals = [StreamVersionConflict()]
    outcome = await app.cancel(ctx, created.view.appointment_id, expected_version=1)
    assert outcome.appended and outcome.view.status == "cancelled"


async def test_endless_conflicts_give_up_with_unavailable(clock: ManualClock) -> None:
    store = AlwaysConflicting()
    app = service(store, clock)
    with pytest.raises(Unavailable):
        await app.schedule(RequestContext(principal=principal("staff")), schedule_body(clock.now))
    assert store.appends == 4


async def test_if_match_on_someone_elses_appointment_is_not_found(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    created = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    stranger = RequestContext(principal=principal("patient", staff.clinic_id))
    with pytest.raises(NotFound):
        await app.cancel(stranger, created.view.appointment_id, expected_version=99)


async def test_idempotency_key_replays_first_answer_even_after_state_changed(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    body = schedule_body(clock.now)
    keyed = RequestContext(principal=staff, idempotency_key="k-1")
    first = await app.schedule(keyed, body)
    await app.cancel(RequestContext(principal=staff), first.view.appointment_id)
    again = await app.schedule(keyed, body)
    assert again.replayed and again.view == first.view and again.created
    with pytest.raises(IdempotencyKeyReused):
        await app.schedule(keyed, schedule_body(clock.now))


async def test_idempotency_keys_are_per_principal(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    body = schedule_body(clock.now, starts_in=timedelta(hours=5))
    a = await app.schedule(RequestContext(principal=principal(), idempotency_key="same"), body)
    other_body = schedule_body(clock.now, starts_in=timedelta(hours=7))
    b = await app.schedule(
        RequestContext(principal=principal(), idempotency_key="same"), other_body
    )
    assert a.view.appointment_id != b.view.appointment_id


async def test_a_no_op_answer_is_remembered_under_its_key(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    created = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    appointment = created.view.appointment_id
    await app.cancel(RequestContext(principal=staff), appointment)
    keyed = RequestContext(principal=staff, idempotency_key="tap-2")
    quiet = await app.cancel(keyed, appointment)
    assert not quiet.appended and (key_owner(staff), "tap-2") in store.answers
    with pytest.raises(IdempotencyKeyReused):
        await app.cancel(keyed, appointment, reason="different")


async def test_a_twin_refused_by_the_race_its_key_won_gets_the_first_answer(
    clock: ManualClock,
) -> None:
    # Two instances (two state caches), one store: a gateway's retry of a cancel with
    # If-Match reaches the second while the first is committing.
    store = BlindOnce()
    first_instance, second_instance = service(store, clock), service(store, clock)
    staff = principal("staff")
    created = await first_instance.schedule(
        RequestContext(principal=staff), schedule_body(clock.now)
    )
    keyed = RequestContext(principal=staff, idempotency_key="tap")
    appointment = created.view.appointment_id
    first = await first_instance.cancel(keyed, appointment, expected_version=1)
    store.blind = 1
    second = await second_instance.cancel(keyed, appointment, expected_version=1)
    assert second.replayed and second.view == first.view
    assert second.consistency_token == first.consistency_token


async def test_a_twin_that_wrote_nothing_answers_as_the_first_did(clock: ManualClock) -> None:
    # A booking retried with its own id and key while the first attempt commits: the
    # retry is decided as an exact repeat (no events), and answered as the first was: 201.
    store = BlindOnce()
    first_instance, second_instance = service(store, clock), service(store, clock)
    keyed = RequestContext(principal=principal("staff"), idempotency_key="book")
    body = schedule_body(clock.now, appointment_id=uuid.uuid4())
    first = await first_instance.schedule(keyed, body)
    store.blind = 1
    second = await second_instance.schedule(keyed, body)
    assert first.created and second.created and not second.appended
    assert second.view == first.view


async def test_a_refusal_is_answered_again_under_its_key_after_the_state_changed(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    provider = uuid.uuid4()
    other = await app.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, provider_id=provider)
    )
    keyed = RequestContext(principal=staff, idempotency_key="book-2")
    body = schedule_body(clock.now, provider_id=provider)
    with pytest.raises(SlotTaken) as first:
        await app.schedule(keyed, body)
    await app.cancel(RequestContext(principal=staff), other.view.appointment_id)
    with pytest.raises(SlotTaken) as again:  # the slot is free now: a new request would pass
        await app.schedule(keyed, body)
    assert again.value.to_problem() == first.value.to_problem()
    assert len([stream for stream in store.streams.values() if stream]) == 1
    assert store.answers[(key_owner(staff), "book-2")].status == 409
    with pytest.raises(IdempotencyKeyReused):
        await app.schedule(keyed, schedule_body(clock.now, provider_id=provider))


async def test_a_too_early_start_is_answered_again_with_the_same_opening_time(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    booked = await app.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, starts_in=timedelta(hours=3))
    )
    appointment = booked.view.appointment_id
    keyed = RequestContext(principal=staff, idempotency_key="start-1")
    with pytest.raises(TooEarly) as first:
        await app.start(keyed, appointment)
    clock.advance(hours=2, minutes=50)  # inside the start window now
    with pytest.raises(TooEarly) as again:
        await app.start(keyed, appointment)
    assert again.value.to_problem() == first.value.to_problem()
    assert again.value.opens_at == first.value.opens_at
    assert len(store.streams[appointment]) == 1
    assert (await app.start(RequestContext(principal=staff), appointment)).appended


async def test_a_version_conflict_is_answered_again_without_deciding_anew(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    keyed = RequestContext(principal=staff, idempotency_key="cancel-7")
    with pytest.raises(VersionConflict):
        await app.cancel(keyed, booked.view.appointment_id, expected_version=7)
    loads = store.loads
    with pytest.raises(VersionConflict):
        await app.cancel(keyed, booked.view.appointment_id, expected_version=7)
    assert store.loads == loads
    assert store.answers[(key_owner(staff), "cancel-7")].status == 412
    with pytest.raises(IdempotencyKeyReused):
        await app.cancel(keyed, booked.view.appointment_id, expected_version=1)


async def test_errors_that_decide_nothing_are_not_kept_under_the_key(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    keyed = RequestContext(principal=staff, idempotency_key="k")
    unknown = uuid.uuid4()
    with pytest.raises(NotFound):
        await app.cancel(keyed, unknown)
    with pytest.raises(InvalidRequest):
        await app.schedule(keyed, schedule_body(clock.now, starts_in=timedelta(hours=-1)))
    patient = RequestContext(principal=principal("patient", staff.clinic_id), idempotency_key="k")
    with pytest.raises(Forbidden):
        await app.schedule(patient, schedule_body(clock.now))
    unreadable = Unreadable()
    with pytest.raises(Unavailable):
        await service(unreadable, clock).cancel(keyed, unknown)
    assert store.answers == {} and unreadable.answers == {}
    # The key still names whatever request comes first with it and is decided.
    booked = await app.schedule(keyed, schedule_body(clock.now, appointment_id=unknown))
    assert booked.created and (key_owner(staff), "k") in store.answers


async def test_a_twin_under_a_key_that_holds_a_refusal_is_refused_the_same(
    clock: ManualClock,
) -> None:
    # Two instances: the retry's lookup ran just before the first attempt stored its
    # refusal; the retry's own decision (now inside the window) would start the visit.
    store = BlindOnce()
    first_instance, second_instance = service(store, clock), service(store, clock)
    staff = principal("staff")
    booked = await first_instance.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, starts_in=timedelta(hours=3))
    )
    appointment = booked.view.appointment_id
    keyed = RequestContext(principal=staff, idempotency_key="start")
    with pytest.raises(TooEarly):
        await first_instance.start(keyed, appointment)
    clock.advance(hours=2, minutes=50)
    store.blind = 1
    with pytest.raises(TooEarly):
        await second_instance.start(keyed, appointment)
    assert len(store.streams[appointment]) == 1  # its append went with the key: not at all


async def test_a_twin_refused_for_what_it_asks_gets_the_answer_its_key_holds(
    clock: ManualClock,
) -> None:
    # A booking without an id, retried while the first attempt commits: by the time the
    # retry is decided its start has passed (400, kept nowhere), but the key holds the
    # first attempt's answer, the booking: that is the retry's answer too.
    store = BlindOnce()
    first_instance, second_instance = service(store, clock), service(store, clock)
    keyed = RequestContext(principal=principal("staff"), idempotency_key="book-now")
    body = schedule_body(clock.now, starts_in=timedelta(seconds=1))
    first = await first_instance.schedule(keyed, body)
    clock.advance(seconds=2)
    store.blind = 1
    second = await second_instance.schedule(keyed, body)
    assert second.replayed and second.view == first.view and second.created
    assert len([stream for stream in store.streams.values() if stream]) == 1


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_raised_again_from_its_problem_document(
    code: ErrorCode, clock: ManualClock
) -> None:
    # A refusal kept under a key is raised again from its problem document: every code
    # must name its error (``error_of`` looks among the direct subclasses of ClinicError).
    doc = problem(code, "why", opens_at=clock.now if code is ErrorCode.TOO_EARLY else None)
    again = error_of(doc)
    assert again.code is code and again.to_problem() == doc


async def test_overlong_idempotency_key_is_invalid(clock: ManualClock) -> None:
    app = service(FakeEventStore(), clock)
    ctx = RequestContext(principal=principal("staff"), idempotency_key="k" * 256)
    with pytest.raises(InvalidRequest):
        await app.schedule(ctx, schedule_body(clock.now))


async def test_events_carry_correlation_and_causation_ids(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    correlation, request = uuid.uuid4(), uuid.uuid4()
    ctx = RequestContext(
        principal=principal("staff"), correlation_id=correlation, request_id=request
    )
    created = await app.schedule(ctx, schedule_body(clock.now))
    [recorded] = store.streams[created.view.appointment_id]
    assert recorded.envelope.correlation_id == correlation
    assert recorded.envelope.causation_id == request
    assert created.consistency_token == f"{created.view.appointment_id}.1"


async def test_schedule_without_an_id_gets_a_fresh_one_and_a_token(clock: ManualClock) -> None:
    app = service(FakeEventStore(), clock)
    ctx = RequestContext(principal=principal("staff"))
    a = await app.schedule(ctx, schedule_body(clock.now))
    b = await app.schedule(ctx, schedule_body(clock.now))
    assert a.view.appointment_id != b.view.appointment_id and a.created and b.created


async def test_a_follow_up_command_decides_on_the_state_it_wrote_without_reading(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await app.schedule(ctx, schedule_body(clock.now))
    loads = store.loads
    cancelled = await app.cancel(ctx, created.view.appointment_id)
    assert cancelled.appended and cancelled.view.version == 2
    assert store.loads == loads


async def test_a_stale_guess_loses_its_append_and_is_decided_on_what_is_stored(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    ours, theirs = service(store, clock), service(store, clock)  # two instances
    ctx = RequestContext(principal=principal("staff"))
    created = await ours.schedule(ctx, schedule_body(clock.now))
    await theirs.cancel(ctx, created.view.appointment_id)
    again = await ours.cancel(ctx, created.view.appointment_id)
    assert not again.appended and again.view.version == 2
    assert len(store.streams[created.view.appointment_id]) == 2


async def test_a_refusal_is_never_answered_from_a_stale_guess(clock: ManualClock) -> None:
    store = FakeEventStore()
    ours, theirs = service(store, clock), service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await ours.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(hours=3)))
    await theirs.cancel(ctx, created.view.appointment_id)
    # On the guess (scheduled) a start now is too early; on what is stored it is cancelled.
    with pytest.raises(AppointmentIsCancelled):
        await ours.start(ctx, created.view.appointment_id)


async def test_a_no_op_answer_is_decided_on_what_is_stored(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await app.schedule(ctx, schedule_body(clock.now))
    await app.cancel(ctx, created.view.appointment_id)
    loads = store.loads
    quiet = await app.cancel(ctx, created.view.appointment_id)
    assert not quiet.appended and store.loads == loads + 1


async def test_if_match_is_checked_against_what_is_stored_not_a_stale_guess(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    ours, theirs = service(store, clock), service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    created = await ours.schedule(ctx, schedule_body(clock.now))
    await theirs.cancel(ctx, created.view.appointment_id)
    # Our cache says version 1; the client knows version 2, which is what is stored.
    quiet = await ours.cancel(ctx, created.view.appointment_id, expected_version=2)
    assert not quiet.appended and quiet.view.status == "cancelled"


async def test_a_late_exact_retry_of_a_booking_is_answered_by_the_stored_booking(
    clock: ManualClock,
) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    body = schedule_body(clock.now, appointment_id=uuid.uuid4())
    created = await app.schedule(ctx, body)
    clock.advance(hours=3)  # the visit has started and ended: the same body is now "past"
    retried = await app.schedule(ctx, body)
    assert retried.created and not retried.appended  # answered as the booking was: 201
    assert retried.view.appointment_id == created.view.appointment_id
    assert len(store.streams[created.view.appointment_id]) == 1


async def test_an_id_taken_with_another_invalid_body_is_already_exists(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    taken = uuid.uuid4()
    await app.schedule(ctx, schedule_body(clock.now, appointment_id=taken))
    past = schedule_body(clock.now, appointment_id=taken, starts_in=timedelta(hours=-1))
    with pytest.raises(AlreadyExists):
        await app.schedule(ctx, past)
    # A new id with that body is refused for what it holds.
    with pytest.raises(InvalidRequest):
        await app.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(hours=-1)))


class Unreadable(FakeEventStore):
    """PostgreSQL is down: every load fails."""

    async def load(self, stream_id: uuid.UUID) -> list[RecordedEvent]:
        raise Unavailable("the database is unreachable")


async def test_a_booking_refused_for_what_it_holds_is_400_even_with_the_store_down(
    clock: ManualClock,
) -> None:
    app = service(Unreadable(), clock)
    ctx = RequestContext(principal=principal("staff"))
    with pytest.raises(InvalidRequest):
        await app.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(hours=-1)))


def test_the_state_cache_is_bounded_and_never_goes_back_in_time() -> None:
    cache = StateCache(size=2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    cache.put(a, INITIAL, 1)
    cache.put(b, INITIAL, 1)
    cache.put(a, INITIAL, 3)
    cache.put(a, INITIAL, 2)  # an older read arriving late
    cache.put(c, INITIAL, 1)  # evicts b, the least recently written
    assert cache.get(a) == (INITIAL, 3)
    assert cache.get(b) is None and len(cache) == 2
    assert StateCache(size=0).get(a) is None


async def test_a_store_outage_drops_the_cached_states(clock: ManualClock) -> None:
    store = RefusingNext()
    app = service(store, clock)
    ctx = RequestContext(principal=principal("staff"))
    first = await app.schedule(ctx, schedule_body(clock.now))
    second = await app.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(hours=5)))
    store.refusals = [Unavailable("The database is unreachable; retry shortly.")]
    with pytest.raises(Unavailable):
        await app.cancel(ctx, first.view.appointment_id)
    # A failover may have lost commits the cache remembers: the next command reads the store.
    loads = store.loads
    await app.cancel(ctx, second.view.appointment_id)
    assert store.loads == loads + 1


# --- Gaps found by mutation testing ------------------------------------------------------


async def test_reading_an_appointment_is_for_those_who_may_see_it(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    patient = principal("patient", staff.clinic_id)
    booked = await app.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, patient_id=patient.id)
    )
    appointment_id = booked.view.appointment_id
    for allowed in (staff, patient, principal("staff", staff.clinic_id)):
        assert (await app.get(allowed, appointment_id)).appointment_id == appointment_id
    for outsider in (
        principal("staff"),  # another clinic
        principal("patient", staff.clinic_id),  # another patient
        principal("provider", staff.clinic_id),  # not the provider who holds it
    ):
        with pytest.raises(NotFound):
            await app.get(outsider, appointment_id)
    with pytest.raises(NotFound):
        await app.get(staff, uuid.uuid4())


async def test_history_is_for_staff_and_the_provider_who_holds_it(clock: ManualClock) -> None:
    store = FakeEventStore()
    app = service(store, clock)
    staff = principal("staff")
    patient = principal("patient", staff.clinic_id)
    provider = principal("provider", staff.clinic_id)
    booked = await app.schedule(
        RequestContext(principal=staff),
        schedule_body(clock.now, patient_id=patient.id, provider_id=provider.id),
    )
    appointment_id = booked.view.appointment_id
    for reader in (staff, provider):
        assert len((await app.history(reader, appointment_id)).events) == 1
    with pytest.raises(Forbidden):
        await app.history(patient, appointment_id)
    for outsider in (principal("provider", staff.clinic_id), principal("staff")):
        with pytest.raises(NotFound):
            await app.history(outsider, appointment_id)


def test_an_idempotency_key_belongs_to_one_person_in_one_clinic_and_role() -> None:
    person, clinic, other_clinic = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    owners = {
        key_owner(Principal(id=person, role=role, clinic_id=c))
        for role in ("patient", "provider", "staff")
        for c in (clinic, other_clinic)
    }
    assert len(owners) == 6
    assert key_owner(Principal(id=person, role="staff", clinic_id=clinic)) == key_owner(
        Principal(id=person, role="staff", clinic_id=clinic)
    )


@pytest.mark.parametrize(("key", "valid"), [("", False), ("a\x00b", False), ("k" * 255, True)])
async def test_idempotency_keys_are_1_to_255_characters_without_nul(
    clock: ManualClock, key: str, valid: bool
) -> None:
    app = service(FakeEventStore(), clock)
    ctx = RequestContext(principal=principal("staff"), idempotency_key=key)
    if valid:
        assert (await app.schedule(ctx, schedule_body(clock.now))).created
    else:
        with pytest.raises(InvalidRequest):
            await app.schedule(ctx, schedule_body(clock.now))


async def test_only_a_booking_is_answered_as_created(clock: ManualClock) -> None:
    app = service(FakeEventStore(), clock)
    ctx = RequestContext(principal=principal("staff"))
    booked = await app.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(minutes=5)))
    assert booked.created
    appointment_id = booked.view.appointment_id
    started = await app.start(ctx, appointment_id)
    assert started.appended and not started.created
    again = await app.start(ctx, appointment_id)  # a no-op success
    assert not again.appended and not again.created
    other = await app.schedule(ctx, schedule_body(clock.now))
    cancelled = await app.cancel(ctx, other.view.appointment_id)
    assert cancelled.appended and not cancelled.created


async def test_the_same_key_with_another_if_match_is_another_request(clock: ManualClock) -> None:
    app = service(FakeEventStore(), clock)
    staff = principal("staff")
    booked = await app.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, starts_in=timedelta(minutes=5))
    )
    keyed = RequestContext(principal=staff, idempotency_key="start-1")
    await app.start(keyed, booked.view.appointment_id, 1)
    with pytest.raises(IdempotencyKeyReused):
        await app.start(keyed, booked.view.appointment_id, 2)


class TwinFirst(FakeEventStore):
    """A twin of the first booking (same id and body, another instance) commits just
    before it: the booking then collides with its own slot."""

    raced = False

    async def append(
        self,
        stream_id: uuid.UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        if not self.raced and expected_version == 0:
            self.raced = True
            await super().append(stream_id, 0, events)
            raise SlotTaken("The provider already has an appointment at that time.")
        return await super().append(stream_id, expected_version, events, idempotency)


async def test_a_booking_whose_twin_took_its_slot_answers_as_a_retry(clock: ManualClock) -> None:
    store = TwinFirst()
    app = service(store, clock)
    body = schedule_body(clock.now, appointment_id=uuid.uuid4())
    outcome = await app.schedule(RequestContext(principal=principal("staff")), body)
    assert outcome.created and not outcome.appended
    assert outcome.view.appointment_id == body.appointment_id
    assert len(store.streams[outcome.view.appointment_id]) == 1


@pytest.mark.parametrize("token", ["{u}.-1", "{u}", "{u}.x", "nope.1", "{u}.1.2", ""])
def test_a_token_not_issued_here_is_an_invalid_request(token: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_token(token.format(u=uuid.uuid4()))


def test_a_token_round_trips_from_version_0() -> None:
    stream = uuid.uuid4()
    assert parse_token(make_token(stream, 0)) == (stream, 0)
    assert parse_token(f" {make_token(stream, 12)} ") == (stream, 12)


def test_several_tokens_are_each_parsed_the_latest_version_of_one_appointment_kept() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    tokens = f"{make_token(a, 1)}, {make_token(b, 1)},{make_token(a, 2)}"
    assert parse_tokens(tokens) == [(a, 2), (b, 1)]
    assert parse_tokens(make_token(a, 3)) == [(a, 3)]
    # Empty elements of the list are no tokens (RFC 9110 5.6.1).
    assert parse_tokens(f", {make_token(a, 1)},,{make_token(b, 2)} ,") == [(a, 1), (b, 2)]
    assert parse_tokens(" , ,") == []  # no token
    for bad in (f"{make_token(a, 1)},x", f"{make_token(a, 1)},{b}"):
        with pytest.raises(InvalidRequest):
            parse_tokens(bad)
    with pytest.raises(InvalidRequest, match="at most 16"):
        parse_tokens(",".join(make_token(uuid.uuid4(), 1) for _ in range(17)))
    assert len(parse_tokens(",".join(make_token(uuid.uuid4(), 1) for _ in range(16)))) == 16
