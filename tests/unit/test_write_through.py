"""Commands write their visits row through: the row the projector folds from their events."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta, timezone

import pytest
from prometheus_client import REGISTRY

from services.appointments.domain.rules import Rules
from services.appointments.service_layer import handlers
from services.appointments.service_layer.handlers import Appointments, RequestContext
from services.appointments.service_layer.visits import VisitRow, project
from services.errors import AppointmentIsCancelled
from tests.support.builders import principal, schedule_body
from tests.support.clock import ManualClock
from tests.support.fakes import FakeEventStore, FakeVisitWrites


def _service(store: FakeEventStore, view: FakeVisitWrites, clock: ManualClock) -> Appointments:
    return Appointments(store, store, clock, uuid.uuid4, Rules(), view=view)


def _folded(store: FakeEventStore, appointment_id: uuid.UUID) -> VisitRow | None:
    """The row the projector makes of the stored events."""
    row = None
    for recorded in store.streams[appointment_id]:
        _, row = project(row, recorded.envelope)
    return row


@pytest.mark.parametrize("visit_reason", [None, "Rash — follow-up"])
@pytest.mark.parametrize("offset_hours", [0, 5.5, -7])
async def test_each_write_is_the_row_the_projector_folds(
    visit_reason: str | None, offset_hours: float
) -> None:
    clock, store, view = ManualClock(), FakeEventStore(), FakeVisitWrites()
    app = _service(store, view, clock)
    ctx = RequestContext(principal=principal("staff"))
    local = timezone(timedelta(hours=offset_hours))
    body = schedule_body(
        clock.now.astimezone(local), visit_reason=visit_reason, starts_in=timedelta(minutes=10)
    )
    cancelled = (await app.schedule(ctx, body)).view.appointment_id
    assert view.rows[cancelled] == _folded(store, cancelled)
    await app.cancel(ctx, cancelled, reason="ill")
    assert view.rows[cancelled] == _folded(store, cancelled)
    assert view.rows[cancelled].status == "cancelled" and view.rows[cancelled].version == 2

    started = (
        await app.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(minutes=5)))
    ).view.appointment_id
    await app.start(ctx, started)
    assert view.rows[started] == _folded(store, started)
    assert (view.rows[started].status, view.rows[started].version) == ("started", 2)


async def test_answers_that_write_no_event_write_no_row() -> None:
    clock, store, view = ManualClock(), FakeEventStore(), FakeVisitWrites()
    app = _service(store, view, clock)
    ctx = RequestContext(principal=principal("staff"))
    appointment_id = (await app.schedule(ctx, schedule_body(clock.now))).view.appointment_id
    await app.cancel(ctx, appointment_id)
    assert view.writes == 2
    again = await app.cancel(ctx, appointment_id)  # a double tap: no event
    assert not again.appended and view.writes == 2
    with pytest.raises(AppointmentIsCancelled):
        await app.start(ctx, appointment_id)
    assert view.writes == 2


async def test_a_failed_write_through_leaves_the_committed_command_answered() -> None:
    clock, store, view = ManualClock(), FakeEventStore(), FakeVisitWrites()
    app = _service(store, view, clock)
    view.down = True
    failures = REGISTRY.get_sample_value("clinic_visits_write_through_failures_total") or 0.0
    outcome = await app.schedule(
        RequestContext(principal=principal("staff")), schedule_body(clock.now)
    )
    assert outcome.appended and outcome.view.status == "scheduled"
    assert view.writes == 1 and not view.rows
    assert len(store.streams[outcome.view.appointment_id]) == 1  # the events stand
    assert REGISTRY.get_sample_value("clinic_visits_write_through_failures_total") == failures + 1


async def test_a_hanging_write_through_holds_the_answer_back_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handlers, "WRITE_THROUGH_SECONDS", 0.05)
    clock, store, view = ManualClock(), FakeEventStore(), FakeVisitWrites()
    app = _service(store, view, clock)
    view.hang = True
    ctx = RequestContext(principal=principal("staff"))
    outcome = await asyncio.wait_for(app.schedule(ctx, schedule_body(clock.now)), 5)
    assert outcome.appended and view.writes == 1 and not view.rows
