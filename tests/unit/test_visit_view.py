"""What a listed visit shows, and how the visits are paged: the query service's own rules
on top of whatever rows the reader hands it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from contracts.commands import VisitsTab
from contracts.common import Principal
from contracts.views import AppointmentStatus
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.visits import (
    PageKey,
    Scope,
    VisitRow,
    VisitsQuery,
    visit_view,
)
from services.errors import InvalidRequest
from tests.support.clock import ManualClock

STARTS_AT = datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
WIDE = Rules(start_window=timedelta(minutes=45))


def _row(
    status: AppointmentStatus = "scheduled",
    starts_at: datetime = STARTS_AT,
    clinic_id: uuid.UUID | None = None,
) -> VisitRow:
    return VisitRow(
        appointment_id=uuid.uuid4(),
        clinic_id=clinic_id or uuid.uuid4(),
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        starts_at=starts_at,
        ends_at=starts_at + timedelta(minutes=30),
        duration_minutes=30,
        timezone="Europe/Paris",
        visit_reason="Rash",
        status=status,
        version=1,
    )


@pytest.mark.parametrize(
    ("status", "at", "shown"),
    [
        ("started", timedelta(minutes=30), "completed"),
        ("started", timedelta(minutes=29), "started"),
        ("scheduled", timedelta(minutes=30), "missed"),
        ("scheduled", timedelta(minutes=29), "scheduled"),
        ("cancelled", timedelta(minutes=-60), "cancelled"),
    ],
)
def test_the_status_shown_follows_the_clock(status: str, at: timedelta, shown: str) -> None:
    row = _row(status)  # type: ignore[arg-type]
    assert visit_view(row, STARTS_AT + at, WIDE).status == shown


def test_a_visit_shows_its_row_and_the_flags_of_the_configured_rules() -> None:
    row = _row()
    early = visit_view(row, STARTS_AT - timedelta(minutes=30), WIDE)
    assert early.can_start and early.can_cancel  # inside 45 min, not the default 15
    assert early.start_window_opens_at == STARTS_AT - timedelta(minutes=45)
    assert not visit_view(row, STARTS_AT - timedelta(minutes=46), WIDE).can_start
    under_way = visit_view(row, STARTS_AT + timedelta(minutes=1), WIDE)
    assert under_way.can_cancel and under_way.can_start  # not ended yet
    assert (under_way.ends_at, under_way.visit_reason, under_way.timezone) == (
        row.ends_at,
        "Rash",
        "Europe/Paris",
    )
    assert (under_way.clinic_id, under_way.patient_id, under_way.provider_id) == (
        row.clinic_id,
        row.patient_id,
        row.provider_id,
    )
    assert not visit_view(row, row.ends_at, WIDE).can_cancel


class PagingReader:
    """Rows in keyset order, strictly after a page's last key (what the SQL does)."""

    def __init__(self, rows: list[VisitRow]) -> None:
        self.rows = rows

    async def page(
        self, scope: Scope, tab: VisitsTab, now: datetime, after: PageKey | None, limit: int
    ) -> list[VisitRow]:
        rows = sorted(self.rows, key=lambda r: (r.starts_at, r.appointment_id))
        if after is not None:
            rows = [
                r
                for r in rows
                if (r.starts_at, r.appointment_id) > (after.starts_at, after.appointment_id)
            ]
        return rows[:limit]

    async def wait_for_version(
        self, scope: Scope, appointment_id: uuid.UUID, version: int, wait_seconds: float
    ) -> bool:
        return True


def _query(rows: list[VisitRow], now: datetime) -> tuple[VisitsQuery, Principal]:
    clinic = rows[0].clinic_id if rows else uuid.uuid4()
    staff = Principal(id=uuid.uuid4(), role="staff", clinic_id=clinic)
    clock = ManualClock(now)
    return VisitsQuery(PagingReader(rows), clock, Rules(), timedelta(0)), staff


async def test_pages_follow_each_other_without_losing_or_repeating_a_visit() -> None:
    clinic = uuid.uuid4()
    rows = [_row(starts_at=STARTS_AT + timedelta(hours=i), clinic_id=clinic) for i in range(3)]
    query, staff = _query(rows, STARTS_AT - timedelta(days=1))
    first, _ = await query.list_visits(staff, limit=2)
    assert [v.appointment_id for v in first.items] == [r.appointment_id for r in rows[:2]]
    assert first.next_cursor is not None
    second, _ = await query.list_visits(staff, limit=2, cursor=first.next_cursor)
    assert [v.appointment_id for v in second.items] == [rows[2].appointment_id]
    assert second.next_cursor is None


async def test_a_full_last_page_has_no_cursor() -> None:
    clinic = uuid.uuid4()
    rows = [_row(starts_at=STARTS_AT + timedelta(hours=i), clinic_id=clinic) for i in range(2)]
    query, staff = _query(rows, STARTS_AT - timedelta(days=1))
    page, _ = await query.list_visits(staff, limit=2)
    assert len(page.items) == 2 and page.next_cursor is None


@pytest.mark.parametrize("limit", [0, 101, -1])
async def test_a_limit_outside_1_to_100_is_invalid(limit: int) -> None:
    query, staff = _query([], STARTS_AT)
    with pytest.raises(InvalidRequest):
        await query.list_visits(staff, limit=limit)


async def test_a_row_the_rules_put_in_the_other_tab_is_not_listed() -> None:
    # The reader's SQL and the rules disagree (a row ended meanwhile): the rules win.
    clinic = uuid.uuid4()
    ended, upcoming = (
        _row(clinic_id=clinic),
        _row(starts_at=STARTS_AT + timedelta(days=1), clinic_id=clinic),
    )
    query, staff = _query([ended, upcoming], ended.ends_at)
    page, _ = await query.list_visits(staff, tab="upcoming")
    assert [v.appointment_id for v in page.items] == [upcoming.appointment_id]
