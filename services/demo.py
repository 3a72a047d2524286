"""The demo clinic of ``clinic dev --demo``: fixed people, a few appointments, tokens.

Everything is booked through the application service, as a client would. The ids are
fixed so the demo is reproducible: the clinic, its people and the first appointments
always have the ids below. A later run keeps what is still useful and books a new
*generation* of an appointment only when the last one no longer serves its purpose
(the one to start right away has ended, "tomorrow" is less than 12 hours away);
generation ``g`` of appointment ``i`` has the id ``de300000-0000-4000-8000-{g:010x}a{i}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from contracts.commands import ScheduleBody
from contracts.common import Principal, Role
from contracts.views import AppointmentView
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.handlers import Appointments, RequestContext
from services.auth import mint_token
from services.config import Settings
from services.errors import NotFound, SlotTaken

_PREFIX = "de300000-0000-4000-8000-"
DEMO_CLINIC_ID = UUID(_PREFIX + "000000000001")
DEMO_PATIENT_ID = UUID(_PREFIX + "000000000002")
DEMO_PROVIDER_ID = UUID(_PREFIX + "000000000003")
DEMO_STAFF_ID = UUID(_PREFIX + "000000000004")
DEMO_TIMEZONE = "Europe/Berlin"
DEMO_TOKEN_TTL_SECONDS = 24 * 3600

PATIENT = Principal(id=DEMO_PATIENT_ID, role="patient", clinic_id=DEMO_CLINIC_ID)
PROVIDER = Principal(id=DEMO_PROVIDER_ID, role="provider", clinic_id=DEMO_CLINIC_ID)
STAFF = Principal(id=DEMO_STAFF_ID, role="staff", clinic_id=DEMO_CLINIC_ID)
_ONE_MINUTE = timedelta(minutes=1)


def demo_appointment_id(index: int, generation: int = 0) -> UUID:
    """Id of generation ``generation`` of demo appointment ``index`` (1, 2 or 3)."""
    return UUID(f"{_PREFIX}{generation:010x}a{index}")


def _soon(now: datetime, rules: Rules) -> datetime:
    # Inside the start window (15 minutes by default), on a whole minute.
    lead = max(min(timedelta(minutes=10), rules.start_window - _ONE_MINUTE), _ONE_MINUTE)
    return (now + lead).replace(second=0, microsecond=0)


def _days_ahead(days: int) -> Callable[[datetime, Rules], datetime]:
    def starts_at(now: datetime, _: Rules) -> datetime:
        return (now + timedelta(days=days, hours=1)).replace(minute=0, second=0, microsecond=0)

    return starts_at


@dataclass(frozen=True)
class _Spec:
    index: int
    label: str
    reason: str
    starts_at: Callable[[datetime, Rules], datetime]
    keep: Callable[[AppointmentView, datetime], bool]
    cancel: bool = False


SPECS = (
    _Spec(
        1,
        "can be started now",
        "Demo: follow-up call",
        _soon,
        lambda view, now: view.status != "cancelled" and now < view.ends_at,
    ),
    _Spec(
        2,
        "tomorrow",
        "Demo: annual check-up",
        _days_ahead(1),
        lambda view, now: view.status == "scheduled" and view.starts_at - now > timedelta(hours=12),
    ),
    _Spec(
        3,
        "cancelled by the patient",
        "Demo: skin consultation",
        _days_ahead(2),
        lambda view, now: view.status == "cancelled" or now < view.ends_at,
        cancel=True,
    ),
)


@dataclass(frozen=True)
class DemoAppointment:
    """What seeding did with one demo appointment."""

    label: str
    view: AppointmentView | None
    outcome: str
    """``created``, ``kept``, or why it was skipped."""


async def _find(appointments: Appointments, index: int, generation: int) -> AppointmentView | None:
    try:
        return await appointments.get(STAFF, demo_appointment_id(index, generation))
    except NotFound:
        return None


async def _latest(appointments: Appointments, index: int) -> tuple[int, AppointmentView] | None:
    """The newest generation of appointment ``index`` (generations are contiguous)."""
    first = await _find(appointments, index, 0)
    if first is None:
        return None
    low, low_view, high = 0, first, 1
    while (view := await _find(appointments, index, high)) is not None:
        low, low_view, high = high, view, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if (view := await _find(appointments, index, middle)) is not None:
            low, low_view = middle, view
        else:
            high = middle
    return low, low_view


async def _cancel(appointments: Appointments, appointment_id: UUID) -> AppointmentView:
    ctx = RequestContext(principal=PATIENT)
    outcome = await appointments.cancel(ctx, appointment_id, reason="Feeling better")
    return outcome.view


async def seed_demo(
    appointments: Appointments, now: datetime, rules: Rules
) -> list[DemoAppointment]:
    """Book the demo appointments that are missing or used up; safe to run on every start."""
    results: list[DemoAppointment] = []
    for spec in SPECS:
        latest = await _latest(appointments, spec.index)
        if latest is not None and spec.keep(latest[1], now):
            view = latest[1]
            if spec.cancel and view.status == "scheduled":
                view = await _cancel(appointments, view.appointment_id)
            results.append(DemoAppointment(spec.label, view, "kept"))
            continue
        appointment_id = demo_appointment_id(spec.index, 0 if latest is None else latest[0] + 1)
        body = ScheduleBody(
            appointment_id=appointment_id,
            patient_id=DEMO_PATIENT_ID,
            provider_id=DEMO_PROVIDER_ID,
            starts_at=spec.starts_at(now, rules),
            duration_minutes=30,
            timezone=DEMO_TIMEZONE,
            visit_reason=spec.reason,
        )
        try:
            view = (await appointments.schedule(RequestContext(principal=STAFF), body)).view
        except SlotTaken:
            results.append(DemoAppointment(spec.label, None, "skipped: the provider is busy then"))
            continue
        if spec.cancel:
            view = await _cancel(appointments, appointment_id)
        results.append(DemoAppointment(spec.label, view, "created"))
    return results


def demo_tokens(settings: Settings) -> dict[Role, str]:
    """A token for the demo patient, provider and staff member (valid for 24 hours)."""
    assert settings.jwt_secret, "clinic dev always has a JWT secret"
    return {
        who.role: mint_token(
            settings.jwt_secret,
            who.role,
            who.id,
            who.clinic_id,
            DEMO_TOKEN_TTL_SECONDS,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        for who in (PATIENT, PROVIDER, STAFF)
    }


def _line(item: DemoAppointment) -> str:
    if item.view is None:
        return f"    {item.label}: {item.outcome}"
    local = item.view.starts_at.astimezone(ZoneInfo(item.view.timezone))
    when = local.strftime("%Y-%m-%d %H:%M %Z")
    return f"    {item.view.appointment_id}  {when}  {item.label} ({item.outcome})"


def demo_report(
    items: list[DemoAppointment], tokens: dict[Role, str], api: str, now: datetime
) -> str:
    """The demo's people, appointments, tokens and curl commands to paste into a shell."""
    ids = {item.label: item.view.appointment_id for item in items if item.view is not None}
    soon = ids.get(SPECS[0].label, demo_appointment_id(1))
    tomorrow = ids.get(SPECS[1].label, demo_appointment_id(2))
    new_start = (now + timedelta(days=3)).replace(hour=9, minute=0, second=0, microsecond=0)
    # An id of its own, so that pasting the command again is a retry (201 again), and a
    # provider of its own, whose 09:00 no earlier run's command has taken (409 slot-taken).
    body = (
        f'{{"appointment_id":"{uuid4()}","patient_id":"{DEMO_PATIENT_ID}",'
        f'"provider_id":"{uuid4()}","starts_at":"{new_start.isoformat()}",'
        f'"duration_minutes":30,"timezone":"{DEMO_TIMEZONE}"}}'
    )
    auth = '-H "Authorization: Bearer $PATIENT_TOKEN"'
    lines = [
        f"Demo clinic {DEMO_CLINIC_ID}",
        f"  patient  {DEMO_PATIENT_ID}",
        f"  provider {DEMO_PROVIDER_ID}",
        f"  staff    {DEMO_STAFF_ID}",
        "  appointments:",
        *(_line(item) for item in items),
        "",
        "Tokens (valid 24 h) and commands to paste into a shell:",
        f"  export CLINIC_API={api}",
        f"  export PATIENT_TOKEN={tokens['patient']}",
        f"  export PROVIDER_TOKEN={tokens['provider']}",
        f"  export STAFF_TOKEN={tokens['staff']}",
        f'  curl -s "$CLINIC_API/v1/visits" {auth}',
        f'  curl -s -X POST "$CLINIC_API/v1/appointments/{soon}/start" {auth}',
        f'  curl -si -X POST "$CLINIC_API/v1/appointments/{tomorrow}/cancel" {auth} '
        "-H 'Content-Type: application/json' -d '{\"reason\":\"cannot make it\"}'",
        f'  curl -s "$CLINIC_API/v1/visits?tab=past" {auth}',
        f'  curl -s -X POST "$CLINIC_API/v1/appointments" {auth} '
        f"-H 'Content-Type: application/json' -d '{body}'",
        f'  curl -s "$CLINIC_API/v1/appointments/{soon}/history" '
        '-H "Authorization: Bearer $STAFF_TOKEN"',
    ]
    return "\n".join(lines)
