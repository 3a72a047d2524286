"""The seed flow of the patient's app, over HTTP, with every role of the service running.

Sign in → Upcoming lists the visit → details → cancel → Upcoming no longer lists it (with
the consistency token) → Past lists it as cancelled; and the empty state.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from tests.e2e.conftest import Api


async def visits(api: Api, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = await api.client.get("/v1/visits", params=params, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_cancelled_visit_leaves_upcoming_and_shows_in_past(api: Api) -> None:
    counted = await path_counts(api)
    patient = api.principal("patient")
    headers = api.auth(patient)
    starts_at = api.clock.now + timedelta(hours=26)
    created = await api.client.post(
        "/v1/appointments",
        json={
            "patient_id": str(patient.id),
            "provider_id": str(uuid.uuid4()),
            "starts_at": starts_at.isoformat(),
            "duration_minutes": 30,
            "timezone": "Europe/Paris",
            "visit_reason": "Annual check-up",
        },
        headers=headers,
    )
    assert created.status_code == 201
    appointment_id = created.json()["appointment_id"]
    token = created.headers["x-consistency-token"]

    # Sign in: the Visits page, read with the write's token, lists the visit under Upcoming.
    waited = await api.client.get("/v1/visits", headers={**headers, "X-Consistency-Token": token})
    assert waited.headers["x-consistency"] == "fresh"
    [visit] = waited.json()["items"]
    assert visit["appointment_id"] == appointment_id
    assert visit["status"] == "scheduled" and visit["can_cancel"] is True
    assert visit["can_start"] is False and visit["timezone"] == "Europe/Paris"
    assert visit["visit_reason"] == "Annual check-up"

    # Details, then "Cancel appointment" → "YES".
    details = await api.client.get(f"/v1/appointments/{appointment_id}", headers=headers)
    assert details.json()["can_cancel"] is True
    cancelled = await api.client.post(f"/v1/appointments/{appointment_id}/cancel", headers=headers)
    assert cancelled.status_code == 200
    token = cancelled.headers["x-consistency-token"]

    # Back on the Visits page: nothing upcoming any more ("You don't have any upcoming visits yet.")
    after = await api.client.get("/v1/visits", headers={**headers, "X-Consistency-Token": token})
    assert after.status_code == 200 and after.headers["x-consistency"] == "fresh"
    assert after.json() == {"items": [], "next_cursor": None}

    past = await visits(api, headers, tab="past")
    [gone] = past["items"]
    assert gone["appointment_id"] == appointment_id and gone["status"] == "cancelled"
    assert gone["can_cancel"] is False and gone["can_start"] is False

    # The path the two events took shows in the metrics: published by the relay, then
    # handled by the projector (found already written by a read, or applied). The reads
    # above did not wait for either, so wait here (bounded).
    async with asyncio.timeout(10):
        while True:
            counts = await path_counts(api)
            if all(now >= before + 2 for now, before in zip(counts, counted, strict=True)):
                break
            await asyncio.sleep(0.05)
    text = (await api.client.get("/metrics")).text
    assert 'clinic_commands_total{command="cancel",outcome="ok"}' in text


_HANDLED = tuple(
    f'clinic_projector_events_total{{outcome="{o}"}}' for o in ("applied", "duplicate")
)


async def path_counts(api: Api) -> tuple[float, float]:
    """(events the relay published, events the projector handled) so far, in this process."""
    text = (await api.client.get("/metrics")).text
    published = sample(text, "clinic_relay_published_total")
    return published, sum(sample(text, name) for name in _HANDLED)


def sample(metrics: str, name: str) -> float:
    """The value of one sample line of the Prometheus text format (0 before the first)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_new_patient_has_no_upcoming_visits(api: Api) -> None:
    headers = api.auth(api.principal("patient"))
    assert await visits(api, headers) == {"items": [], "next_cursor": None}
    assert await visits(api, headers, tab="past") == {"items": [], "next_cursor": None}


async def test_visit_can_be_started_in_its_window_and_stays_upcoming_until_it_ends(
    api: Api,
) -> None:
    patient = api.principal("patient")
    headers = api.auth(patient)
    created = await api.client.post(
        "/v1/appointments",
        json={
            "patient_id": str(patient.id),
            "provider_id": str(uuid.uuid4()),
            "starts_at": (api.clock.now + timedelta(minutes=20)).isoformat(),
            "duration_minutes": 30,
            "timezone": "UTC",
        },
        headers=headers,
    )
    location = created.headers["location"]
    token = created.headers["x-consistency-token"]
    page = await api.client.get("/v1/visits", headers={**headers, "X-Consistency-Token": token})
    [visit] = page.json()["items"]
    assert visit["can_start"] is False  # 20 minutes ahead: the window opens in 5

    api.clock.advance(minutes=5)
    [visit] = (await visits(api, headers))["items"]
    assert (
        visit["can_start"] is True
        and visit["start_window_opens_at"] == created.json()["start_window_opens_at"]
    )
    started = await api.client.post(f"{location}/start", headers=headers)
    assert started.status_code == 200
    token = started.headers["x-consistency-token"]
    page = await api.client.get("/v1/visits", headers={**headers, "X-Consistency-Token": token})
    [visit] = page.json()["items"]
    assert visit["status"] == "started"  # the patient can rejoin until the end

    api.clock.advance(minutes=46)
    assert (await visits(api, headers))["items"] == []
    [done] = (await visits(api, headers, tab="past"))["items"]
    assert done["status"] == "completed"


async def test_a_visit_that_ended_without_start_is_missed(api: Api) -> None:
    patient = api.principal("patient")
    headers = api.auth(patient)
    created = await api.client.post(
        "/v1/appointments",
        json={
            "patient_id": str(patient.id),
            "provider_id": str(uuid.uuid4()),
            "starts_at": (api.clock.now + timedelta(hours=1)).isoformat(),
            "duration_minutes": 15,
            "timezone": "UTC",
        },
        headers=headers,
    )
    token = created.headers["x-consistency-token"]
    await api.client.get("/v1/visits", headers={**headers, "X-Consistency-Token": token})
    api.clock.advance(hours=2)
    [missed] = (await visits(api, headers, tab="past"))["items"]
    assert missed["status"] == "missed"


async def test_bad_visits_queries_are_400(api: Api) -> None:
    headers = api.auth(api.principal("patient"))
    for params, extra in (
        ({"tab": "future"}, {}),
        ({"limit": "0"}, {}),
        ({"limit": "101"}, {}),
        # Not whole numbers as written (a number in JSON over NATS is refused so too).
        ({"limit": "1.0"}, {}),
        ({"limit": "2e0"}, {}),
        ({"limit": "+5"}, {}),
        ({"limit": ["5", "1e0"]}, {}),  # the last one given is the one used
        ({"cursor": "garbage"}, {}),
        ({}, {"X-Consistency-Token": "nope"}),
    ):
        response = await api.client.get("/v1/visits", params=params, headers={**headers, **extra})
        assert response.status_code == 400, (params, response.text)
        assert response.json()["code"] == "invalid-request"
    assert (await api.client.get("/v1/visits")).status_code == 401
    for whole in ("5", "100"):
        answer = await api.client.get("/v1/visits", params={"limit": whole}, headers=headers)
        assert answer.status_code == 200, (whole, answer.text)
