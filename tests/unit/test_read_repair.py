"""Read-your-writes ahead of the projector: a read that presents a command's consistency
token writes the appointment's row itself, the row the projector folds from its events."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from datetime import timedelta, timezone

import msgspec
import pytest
from prometheus_client import REGISTRY

from contracts.common import Principal
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.handlers import (
    Appointments,
    CommandOutcome,
    RequestContext,
)
from services.appointments.service_layer.ports import RecordedEvent
from services.appointments.service_layer.visits import (
    MAX_WAITING_READS_PER_USER,
    REPAIR_FAILED,
    STOP_REPAIR_SECONDS,
    Scope,
    VisitRow,
    VisitsQuery,
    project,
)
from services.errors import Unavailable
from tests.support.builders import principal, schedule_body
from tests.support.clock import ManualClock
from tests.support.fakes import FakeEventStore, FakeVisits

FAILURES = "clinic_visits_repair_failures_total"


def _setup(
    wait: timedelta = timedelta(seconds=5),
) -> tuple[ManualClock, FakeEventStore, FakeVisits, Appointments, VisitsQuery]:
    clock, store, visits = ManualClock(), FakeEventStore(), FakeVisits()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    query = VisitsQuery(visits, clock, Rules(), wait, repair=(store, visits))
    return clock, store, visits, app, query


def _folded(store: FakeEventStore, appointment_id: uuid.UUID) -> VisitRow | None:
    """The row the projector makes of the stored events."""
    row = None
    for recorded in store.streams[appointment_id]:
        _, row = project(row, recorded.envelope)
    return row


def _listed(page: object) -> list[uuid.UUID]:
    return [item.appointment_id for item in page.items]  # type: ignore[attr-defined]


@pytest.mark.parametrize("visit_reason", [None, "Rash — follow-up"])
@pytest.mark.parametrize("offset_hours", [0, 5.5, -7])
async def test_a_read_ahead_of_the_view_writes_the_row_the_projector_folds(
    visit_reason: str | None, offset_hours: float
) -> None:
    clock, store, visits, app, query = _setup()
    patient = principal("patient")
    ctx = RequestContext(principal=patient)
    local = timezone(timedelta(hours=offset_hours))
    body = schedule_body(
        clock.now.astimezone(local),
        patient_id=patient.id,
        visit_reason=visit_reason,
        starts_in=timedelta(minutes=10),
    )
    booked = await app.schedule(ctx, body)
    appointment_id = booked.view.appointment_id
    assert visits.writes == 0  # commands write events only

    page, stale = await query.list_visits(patient, consistency_token=booked.consistency_token)
    assert not stale and _listed(page) == [appointment_id]
    assert visits.rows[appointment_id] == _folded(store, appointment_id)

    cancelled = await app.cancel(ctx, appointment_id, reason="ill")
    page, stale = await query.list_visits(patient, consistency_token=cancelled.consistency_token)
    assert not stale and _listed(page) == []
    assert visits.rows[appointment_id] == _folded(store, appointment_id)
    assert (visits.rows[appointment_id].status, visits.rows[appointment_id].version) == (
        "cancelled",
        2,
    )
    past, _ = await query.list_visits(patient, tab="past")
    assert _listed(past) == [appointment_id]

    staff = RequestContext(principal=principal("staff", clinic_id=patient.clinic_id))
    started = await app.schedule(
        staff, schedule_body(clock.now, patient_id=patient.id, starts_in=timedelta(minutes=5))
    )
    begun = await app.start(staff, started.view.appointment_id)
    page, stale = await query.list_visits(patient, consistency_token=begun.consistency_token)
    assert not stale and _listed(page) == [started.view.appointment_id]
    row = visits.rows[started.view.appointment_id]
    assert row == _folded(store, started.view.appointment_id)
    assert (row.status, row.version) == ("started", 2)


async def test_a_read_with_several_tokens_reflects_each_of_their_writes() -> None:
    # The patient cancels X, then Y, and comes back to Visits: Y's token alone would leave
    # X's cancel to the projector (behind, or NATS away), the page saying "fresh".
    clock, store, visits, app, query = _setup(wait=timedelta(milliseconds=50))
    patient = principal("patient")
    ctx = RequestContext(principal=patient)
    x, y, z = [
        await app.schedule(ctx, schedule_body(clock.now, patient_id=patient.id, starts_in=later))
        for later in (timedelta(hours=1), timedelta(hours=2), timedelta(hours=3))
    ]
    for booked in (x, y, z):  # the projector saw the bookings, then fell behind
        row = _folded(store, booked.view.appointment_id)
        assert row is not None
        visits.rows[booked.view.appointment_id] = row
    cancel_x = await app.cancel(ctx, x.view.appointment_id)
    cancel_y = await app.cancel(ctx, y.view.appointment_id)
    page, stale = await query.list_visits(patient, consistency_token=cancel_y.consistency_token)
    assert not stale and _listed(page) == [x.view.appointment_id, z.view.appointment_id]
    tokens = f"{cancel_x.consistency_token}, {cancel_y.consistency_token},{x.consistency_token}"
    page, stale = await query.list_visits(patient, consistency_token=tokens)
    assert not stale and _listed(page) == [z.view.appointment_id]
    assert visits.rows[x.view.appointment_id].status == "cancelled"
    # One of them another patient's (or forged): stale, after the wait, as for one token.
    other = f"{cancel_x.consistency_token},{uuid.uuid4()}.1"
    _, stale = await query.list_visits(patient, consistency_token=other)
    assert stale


async def test_a_read_the_view_already_reflects_writes_nothing() -> None:
    clock, store, visits, app, query = _setup()
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    appointment_id = booked.view.appointment_id
    row = _folded(store, appointment_id)
    assert row is not None
    visits.rows[appointment_id] = row  # the projector was first
    page, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
    assert not stale and _listed(page) == [appointment_id]
    assert visits.writes == 0


async def test_a_read_without_a_token_or_without_repair_writes_nothing() -> None:
    clock, _store, visits, app, query = _setup(wait=timedelta(milliseconds=20))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    page, stale = await query.list_visits(staff)
    assert not stale and _listed(page) == [] and visits.writes == 0
    waiting_only = VisitsQuery(visits, clock, Rules(), timedelta(milliseconds=20))
    page, stale = await waiting_only.list_visits(staff, consistency_token=booked.consistency_token)
    assert stale and _listed(page) == [] and visits.writes == 0


async def test_a_failed_repair_leaves_the_read_waiting_and_is_counted() -> None:
    clock, _store, visits, app, query = _setup(wait=timedelta(milliseconds=50))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    visits.down = True
    before = REGISTRY.get_sample_value(FAILURES) or 0.0
    page, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
    assert stale and _listed(page) == []
    assert visits.writes == 1
    assert REGISTRY.get_sample_value(FAILURES) == before + 1


async def test_failed_repairs_are_said_once_a_minute_and_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hundreds of reads with tokens in a stall: one WARNING line, not one each."""
    clock, _store, visits, app, query = _setup(wait=timedelta(milliseconds=20))
    staff = principal("staff")
    visits.down = True
    before = REGISTRY.get_sample_value(FAILURES) or 0.0
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
            await query.list_visits(staff, consistency_token=booked.consistency_token)
    said = [r for r in caplog.records if r.msg == REPAIR_FAILED]
    assert len(said) <= 1, [r.getMessage() for r in said]  # one per minute, this one or earlier
    assert REGISTRY.get_sample_value(FAILURES) == before + 5


async def test_a_hanging_repair_is_bounded_by_the_consistency_wait() -> None:
    wait = timedelta(milliseconds=50)
    clock, _store, visits, app, query = _setup(wait=wait)
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    visits.hang = True  # the row's write waits (a lock held by a slow writer, say)
    loop = asyncio.get_running_loop()
    started = loop.time()
    page, stale = await asyncio.wait_for(
        query.list_visits(staff, consistency_token=booked.consistency_token), 5
    )
    # Stale on time: the repair counts against the wait (CLINIC_CONSISTENCY_WAIT_MS), not
    # the second a repair once had of its own.
    assert loop.time() - started < wait.total_seconds() + 0.6
    assert stale and _listed(page) == [] and visits.writes == 1


async def _told_only_to(
    holder: Principal,
    outsider: Principal,
    booked: CommandOutcome,
    store: FakeEventStore,
    visits: FakeVisits,
    query: VisitsQuery,
) -> None:
    """``booked``'s token: ``outsider``'s read is stale, lists nothing and writes nothing;
    ``holder``'s is fresh, lists it and repairs its row."""
    page, stale = await query.list_visits(outsider, consistency_token=booked.consistency_token)
    assert stale and _listed(page) == []
    assert visits.writes == 0  # an outsider's read writes nothing
    page, stale = await query.list_visits(holder, consistency_token=booked.consistency_token)
    assert not stale and _listed(page) == [booked.view.appointment_id]
    assert visits.rows[booked.view.appointment_id] == _folded(store, booked.view.appointment_id)


@pytest.mark.parametrize("outsider_role", ["patient", "staff"])
async def test_another_principals_token_reveals_nothing(outsider_role: str) -> None:
    clock, store, visits, app, query = _setup(wait=timedelta(milliseconds=30))
    owner = principal("patient")
    booked = await app.schedule(
        RequestContext(principal=owner), schedule_body(clock.now, patient_id=owner.id)
    )
    # Another patient of the same clinic, or staff of another clinic.
    clinic = owner.clinic_id if outsider_role == "patient" else uuid.uuid4()
    outsider = Principal(id=uuid.uuid4(), role=outsider_role, clinic_id=clinic)  # type: ignore[arg-type]
    await _told_only_to(owner, outsider, booked, store, visits, query)


async def test_another_providers_token_reveals_nothing() -> None:
    """Kills ``Scope.holds`` without its provider clause: a provider of the same clinic
    reading with the token of a visit another provider holds must not repair its row (nor
    be told it is fresh), as for another patient."""
    clock, store, visits, app, query = _setup(wait=timedelta(milliseconds=30))
    holder = principal("provider")
    outsider = principal("provider", clinic_id=holder.clinic_id)
    staff = principal("staff", clinic_id=holder.clinic_id)
    booked = await app.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, provider_id=holder.id)
    )
    await _told_only_to(holder, outsider, booked, store, visits, query)


async def test_a_read_with_no_wait_at_all_answers_at_once_without_repairing() -> None:
    clock, store, visits, app, query = _setup(wait=timedelta(0))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    loads = store.loads
    page, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
    assert stale and _listed(page) == [] and visits.writes == 0 and store.loads == loads


async def test_a_token_beyond_what_is_stored_writes_nothing() -> None:
    clock, _store, visits, app, query = _setup(wait=timedelta(milliseconds=20))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    forged = f"{booked.view.appointment_id}.99"
    for _ in range(3):
        _, stale = await query.list_visits(staff, consistency_token=forged)
        assert stale
    assert visits.writes == 0


@pytest.mark.parametrize("whose", ["forged", "not the reader's"])
async def test_a_read_that_can_never_be_fresh_waits_out_its_time_without_polling(
    whose: str,
) -> None:
    wait = timedelta(milliseconds=60)
    clock, _store, visits, app, query = _setup(wait=wait)
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    token, reader = booked.consistency_token, staff
    if whose == "forged":
        token = f"{booked.view.appointment_id}.99"
    else:
        reader = principal("patient")  # not the booking's patient
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, stale = await query.list_visits(reader, consistency_token=token)
    # As long as any wait that runs out (so it tells nobody what exists), but one check of
    # the view only: a flood of such tokens must not poll the database.
    assert stale and loop.time() - started >= wait.total_seconds() * 0.9
    assert visits.version_checks == 1 and visits.writes == 0


async def test_a_users_reads_past_its_waiting_bound_look_once_and_answer_at_once() -> None:
    wait = timedelta(seconds=30)  # a test that waits it out fails its own timeout
    clock, _store, visits, app, query = _setup(wait=wait)
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    flooder = principal("patient")  # tokens of an appointment not theirs: never fresh
    token = booked.consistency_token
    waiting = [
        asyncio.ensure_future(query.list_visits(flooder, consistency_token=token))
        for _ in range(MAX_WAITING_READS_PER_USER)
    ]
    await asyncio.sleep(0.01)
    assert not any(read.done() for read in waiting)
    checks = visits.version_checks
    for _ in range(20):  # past the bound: one look each, stale at once
        _, stale = await asyncio.wait_for(query.list_visits(flooder, consistency_token=token), 1)
        assert stale
    assert visits.version_checks == checks + 20 and visits.writes == 0
    # Another user's read still waits for (and repairs) its own write.
    patient = principal("patient")
    own = await app.schedule(
        RequestContext(principal=patient), schedule_body(clock.now, patient_id=patient.id)
    )
    page, stale = await asyncio.wait_for(
        query.list_visits(patient, consistency_token=own.consistency_token), 1
    )
    assert not stale and _listed(page) == [own.view.appointment_id]
    # A waiting read that leaves (its client gone) frees its place: the next one waits.
    waiting[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    waiting[0] = asyncio.ensure_future(query.list_visits(flooder, consistency_token=token))
    await asyncio.sleep(0.01)
    assert not waiting[0].done()
    query.stop_waiting()
    assert all(stale for _, stale in await asyncio.wait_for(asyncio.gather(*waiting), 5))
    assert query._waiting == {}  # no place kept by a read that is over


async def test_a_users_read_past_its_waiting_bound_starts_no_repair() -> None:
    """Kills dropping ``if join_only: return _Repaired.FAILED`` in ``_repair_row``: a read
    past the user's bound only looks (or joins a repair under way); it never loads the
    stream and writes the row itself, even for a write of its own."""
    clock, store, visits, app, query = _setup(wait=timedelta(seconds=30))
    staff = principal("staff")
    others = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    patient = principal("patient", clinic_id=staff.clinic_id)
    own = await app.schedule(
        RequestContext(principal=patient), schedule_body(clock.now, patient_id=patient.id)
    )
    waiting = [  # tokens of an appointment not the patient's: they wait out the 30 s
        asyncio.ensure_future(
            query.list_visits(patient, consistency_token=others.consistency_token)
        )
        for _ in range(MAX_WAITING_READS_PER_USER)
    ]
    await asyncio.sleep(0.01)
    assert not any(read.done() for read in waiting)
    loads = store.loads
    page, stale = await asyncio.wait_for(
        query.list_visits(patient, consistency_token=own.consistency_token), 1
    )
    assert stale and _listed(page) == []  # one look: the view lacks the booking
    assert store.loads == loads and visits.writes == 0
    query.stop_waiting()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)


async def test_concurrent_reads_of_one_write_share_one_load_and_one_write() -> None:
    clock, store, visits, app, query = _setup()
    patient = principal("patient")
    booked = await app.schedule(
        RequestContext(principal=patient), schedule_body(clock.now, patient_id=patient.id)
    )
    loads = store.loads
    answers = await asyncio.gather(
        *(query.list_visits(patient, consistency_token=booked.consistency_token) for _ in range(20))
    )
    assert all(
        not stale and _listed(page) == [booked.view.appointment_id] for page, stale in answers
    )
    assert store.loads == loads + 1 and visits.writes == 1


async def test_a_repaired_read_does_not_check_the_view_again() -> None:
    clock, _, visits, app, query = _setup()
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))

    page, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)

    assert not stale and _listed(page) == [booked.view.appointment_id]
    assert visits.writes == 1
    # Once before the repair; the repaired row is known to hold the version: no second query.
    assert visits.version_checks == 1


class _HeldLoad(FakeEventStore):
    """Its next load reads the stream, then waits for ``release`` before answering."""

    def __init__(self) -> None:
        super().__init__()
        self.release: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def load(self, stream_id: uuid.UUID) -> list[RecordedEvent]:
        release, self.release = self.release, None
        recorded = await super().load(stream_id)
        if release is not None:
            self.holding.set()
            await release.wait()
        return recorded


async def test_a_read_after_a_write_does_not_settle_for_a_fold_made_before_it() -> None:
    clock, store, visits = ManualClock(), _HeldLoad(), FakeVisits()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    query = VisitsQuery(visits, clock, Rules(), timedelta(milliseconds=50), repair=(store, visits))
    patient = principal("patient")
    ctx = RequestContext(principal=patient)
    booked = await app.schedule(ctx, schedule_body(clock.now, patient_id=patient.id))
    # A read with the booking's token folds the stream while it holds only the booking...
    release = store.release = asyncio.Event()
    older = asyncio.create_task(
        query.list_visits(patient, consistency_token=booked.consistency_token)
    )
    await store.holding.wait()
    # ...when the cancel commits and its reader comes, with the cancel's token.
    cancelled = await app.cancel(ctx, booked.view.appointment_id)
    loads = store.loads
    newer = [
        asyncio.create_task(
            query.list_visits(patient, consistency_token=cancelled.consistency_token)
        )
        for _ in range(5)
    ]
    for _ in range(20):  # they find the fold in flight and wait for it
        await asyncio.sleep(0)
    release.set()
    _, older_stale = await older
    assert not older_stale
    for page, stale in await asyncio.gather(*newer):
        assert not stale, "answered from the fold made before the cancel"
        assert _listed(page) == []  # cancelled: no longer Upcoming
    assert visits.rows[booked.view.appointment_id].version == 2
    assert store.loads == loads + 1, "the newer reads share one fold again"


async def test_a_stop_answers_waiting_reads_at_once_and_later_reads_do_not_wait() -> None:
    # Without repair, so that the read can only wait (its write is not in the view).
    clock, store, visits, app, _ = _setup()
    query = VisitsQuery(visits, clock, Rules(), timedelta(seconds=60))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    token = booked.consistency_token
    waiting = [asyncio.create_task(query.list_visits(staff, consistency_token=token))]
    waiting.append(asyncio.create_task(query.list_visits(staff, consistency_token=token)))
    await asyncio.sleep(0.05)
    assert not any(read.done() for read in waiting)  # they wait for the view
    loop = asyncio.get_running_loop()
    stopped = loop.time()
    query.stop_waiting()
    query.stop_waiting()  # once is enough; again changes nothing
    for read in waiting:
        page, stale = await asyncio.wait_for(read, 5)
        assert stale and _listed(page) == []
    page, stale = await asyncio.wait_for(query.list_visits(staff, consistency_token=token), 5)
    assert stale and _listed(page) == []
    assert loop.time() - stopped < 1.0
    # A read the view has caught up with is fresh, stopping or not.
    row = _folded(store, booked.view.appointment_id)
    assert row is not None
    visits.rows[row.appointment_id] = row
    page, stale = await query.list_visits(staff, consistency_token=token)
    assert not stale and _listed(page) == [row.appointment_id]


async def test_a_stop_cuts_a_hanging_repair_short() -> None:
    clock, _store, visits, app, query = _setup(wait=timedelta(seconds=60))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    visits.hang = True
    read = asyncio.create_task(query.list_visits(staff, consistency_token=booked.consistency_token))
    await asyncio.sleep(0.05)
    assert not read.done()
    query.stop_waiting()
    page, stale = await asyncio.wait_for(read, 5)
    assert stale and _listed(page) == []


async def test_a_read_does_not_settle_for_a_fold_made_before_its_appointment_existed() -> None:
    clock, store, visits = ManualClock(), _HeldLoad(), FakeVisits()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    query = VisitsQuery(visits, clock, Rules(), timedelta(seconds=1), repair=(store, visits))
    patient, stranger = principal("patient"), principal("staff")
    appointment_id = uuid.uuid4()
    release = store.release = asyncio.Event()
    # A token for an id nobody booked yet (forged): its read's fold finds nothing...
    early = asyncio.create_task(
        query.list_visits(stranger, consistency_token=f"{appointment_id}.1")
    )
    await store.holding.wait()
    # ...then the patient books that id (chosen by the client) and reads with its token,
    # while that fold is still out: joining it would answer stale after the whole wait.
    body = msgspec.structs.replace(
        schedule_body(clock.now, patient_id=patient.id), appointment_id=appointment_id
    )
    booked = await app.schedule(RequestContext(principal=patient), body)
    mine = asyncio.create_task(
        query.list_visits(patient, consistency_token=booked.consistency_token)
    )
    await asyncio.sleep(0.01)  # it finds that fold in flight and waits for it
    release.set()
    page, stale = await mine
    await early
    assert not stale and _listed(page) == [appointment_id]


class _SlowVisits(FakeVisits):
    """A database slow to answer (or its pool's connections all taken): every check of the
    view takes ``seconds`` before it is even asked."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def wait_for_version(
        self, scope: Scope, appointment_id: uuid.UUID, version: int, wait_seconds: float
    ) -> bool:
        await asyncio.sleep(self.seconds)
        return await super().wait_for_version(scope, appointment_id, version, wait_seconds)


@pytest.mark.parametrize("repair", [True, False])
async def test_a_slow_view_keeps_a_read_within_its_wait_in_all(repair: bool) -> None:
    clock, store, visits = ManualClock(), FakeEventStore(), _SlowVisits(seconds=1.0)
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    wait = timedelta(milliseconds=300)
    query = VisitsQuery(visits, clock, Rules(), wait, repair=(store, visits) if repair else None)
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
    assert stale  # its first check of the view alone took longer than the wait
    assert loop.time() - started < 0.9, "the wait was stretched by the view's slow answers"


class _SlowToGiveBack(FakeVisits):
    """A check of the view that, once cut short, takes a while to unwind (asyncpg cancelling
    the statement, the pool resetting the connection)."""

    async def wait_for_version(
        self, scope: Scope, appointment_id: uuid.UUID, version: int, wait_seconds: float
    ) -> bool:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.sleep(0.2))
            raise
        return False


async def test_a_stop_while_a_reads_wait_is_running_out_cuts_the_others_short() -> None:
    clock, store, visits = ManualClock(), FakeEventStore(), _SlowToGiveBack()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    query = VisitsQuery(visits, clock, Rules(), timedelta(milliseconds=100))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    token = booked.consistency_token
    expiring = asyncio.ensure_future(query.list_visits(staff, consistency_token=token))
    await asyncio.sleep(0.15)  # its wait ran out; its check of the view is unwinding
    query._wait = timedelta(seconds=60)  # a later read waits long
    waiting = asyncio.ensure_future(query.list_visits(staff, consistency_token=token))
    await asyncio.sleep(0.01)
    query.stop_waiting()  # the process is told to stop
    _, stale = await asyncio.wait_for(expiring, 5)
    assert stale
    _, stale = await asyncio.wait_for(waiting, 1)  # cut short, not left to its 60 s
    assert stale


async def test_a_read_repairing_its_row_when_the_process_stops_still_answers_fresh() -> None:
    """A graceful stop cuts the waits for the projector short, not a repair (one load, one
    write): the visit the patient just cancelled is not shown for want of milliseconds."""
    clock, store, visits = ManualClock(), _HeldLoad(), FakeVisits()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    query = VisitsQuery(visits, clock, Rules(), timedelta(seconds=60), repair=(store, visits))
    patient = principal("patient")
    ctx = RequestContext(principal=patient)
    booked = await app.schedule(ctx, schedule_body(clock.now, patient_id=patient.id))
    cancelled = await app.cancel(ctx, booked.view.appointment_id)
    release = store.release = asyncio.Event()
    read = asyncio.create_task(
        query.list_visits(patient, consistency_token=cancelled.consistency_token)
    )
    await store.holding.wait()  # its load is out
    query.stop_waiting()
    release.set()
    page, stale = await asyncio.wait_for(read, 5)
    assert not stale and _listed(page) == []
    # One that comes after the stop repairs its row too.
    again = await app.schedule(ctx, schedule_body(clock.now, patient_id=patient.id))
    page, stale = await asyncio.wait_for(
        query.list_visits(patient, consistency_token=again.consistency_token), 5
    )
    assert not stale and _listed(page) == [again.view.appointment_id]
    # One whose token can never be fresh for it (another's) does not sit out the wait.
    loop = asyncio.get_running_loop()
    began = loop.time()
    _, stale = await query.list_visits(
        principal("patient"), consistency_token=again.consistency_token
    )
    assert stale and loop.time() - began < 0.5


class _LateFailingLoad(FakeEventStore):
    """Loads that fail, but only after the reads that wanted them have left."""

    async def load(self, stream_id: uuid.UUID) -> list[RecordedEvent]:
        await asyncio.sleep(0.2)
        raise Unavailable("The database is unreachable.")


async def test_a_repair_that_fails_after_its_reads_left_is_no_unretrieved_error() -> None:
    clock, store, visits = ManualClock(), _LateFailingLoad(), FakeVisits()
    booked_in = FakeEventStore()
    app = Appointments(booked_in, booked_in, clock, uuid.uuid4, Rules())
    query = VisitsQuery(visits, clock, Rules(), timedelta(milliseconds=50), repair=(store, visits))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        for _ in range(3):
            _, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
            assert stale
        await asyncio.sleep(0.3)  # the load fails now, its reads long gone
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_a_read_that_comes_after_the_stop_answers_within_a_second_of_it() -> None:
    clock, _store, visits, app, query = _setup(wait=timedelta(seconds=60))
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    visits.hang = True  # its repair's write never comes back
    loop = asyncio.get_running_loop()
    query.stop_waiting()
    stopped = loop.time()
    await asyncio.sleep(0.6)  # a request read meanwhile (the drain of the NATS endpoints)
    _, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
    assert stale
    assert loop.time() - stopped < STOP_REPAIR_SECONDS + 0.3


class _TimingOut(FakeVisits):
    """A view whose checks fail with a ``TimeoutError`` of their own (a query timeout, a
    pool with no connection free in time), long before the read's wait runs out."""

    async def wait_for_version(
        self, scope: Scope, appointment_id: uuid.UUID, version: int, wait_seconds: float
    ) -> bool:
        raise TimeoutError("no connection free in time")


@pytest.mark.parametrize("repair", [True, False])
async def test_a_timeout_of_the_view_itself_is_an_error_not_a_stale_answer(repair: bool) -> None:
    """Kills dropping ``if not limit.expired(): raise`` in ``_within``: only the read's own
    deadline makes an answer stale; a ``TimeoutError`` the view raises is a failure (the
    read is answered as such), not a page presented as merely behind."""
    clock, store, visits = ManualClock(), FakeEventStore(), _TimingOut()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    query = VisitsQuery(
        visits, clock, Rules(), timedelta(seconds=5), repair=(store, visits) if repair else None
    )
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    with pytest.raises(TimeoutError, match="no connection free in time"):
        await asyncio.wait_for(
            query.list_visits(staff, consistency_token=booked.consistency_token), 5
        )


class _CountedPolls(FakeVisits):
    """Counts the waits for the projector that were cut mid-way rather than ended."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = 0

    async def wait_for_version(
        self, scope: Scope, appointment_id: uuid.UUID, version: int, wait_seconds: float
    ) -> bool:
        try:
            return await super().wait_for_version(scope, appointment_id, version, wait_seconds)
        except asyncio.CancelledError:
            self.cut += 1
            raise


@pytest.mark.parametrize("repair", [True, False])
async def test_a_wait_for_the_projector_ends_by_itself_before_the_reads_deadline(
    repair: bool,
) -> None:
    """Not cut mid-query by the deadline (with asyncpg: a cancel request and a reset)."""
    clock, store, visits = ManualClock(), FakeEventStore(), _CountedPolls()
    app = Appointments(store, store, clock, uuid.uuid4, Rules())
    visits.down = True  # a repair fails: the read waits for the projector, which never comes
    query = VisitsQuery(
        visits,
        clock,
        Rules(),
        timedelta(milliseconds=200),
        repair=(store, visits) if repair else None,
    )
    staff = principal("staff")
    booked = await app.schedule(RequestContext(principal=staff), schedule_body(clock.now))
    for _ in range(5):
        _, stale = await query.list_visits(staff, consistency_token=booked.consistency_token)
        assert stale
    assert visits.cut == 0
