"""The application service on fakes: retries, If-Match, idempotency keys, tracing ids."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import pytest

from services.appointments.domain.rules import Rules
from services.appointments.service_layer.handlers import Appointments, RequestContext, key_owner
from services.appointments.service_layer.ports import (
    AppendResult,
    IdempotencyRecord,
    NewEvent,
    StreamVersionConflict,
)
from services.errors import (
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    Unavailable,
    VersionConflict,
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
