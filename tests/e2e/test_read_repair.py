"""Read-your-writes without the projector: a read with a command's token repairs its row.

Only the api role runs (no relay, no projector: as during a NATS outage, or with the
projector far behind), and the consistency wait is short. The patient still sees a new
visit under Upcoming, and after cancelling it, no longer sees it there but under Past;
a read without the token sees the view as the projector left it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.auth import mint_token
from tests.support.builders import schedule_json
from tests.support.service import JWT_SECRET, running_service, service_env

pytestmark = pytest.mark.fault  # a NATS outage's read side: reliability.md


async def test_upcoming_and_past_reflect_each_command_with_only_the_api_running(
    database_url: str, nats_url: str
) -> None:
    # Time enough for the read repair on a loaded machine: fresh answers take milliseconds.
    env = service_env(database_url, [nats_url], CLINIC_CONSISTENCY_WAIT_MS="2000")
    patient, clinic = uuid.uuid4(), uuid.uuid4()
    headers = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'patient', patient, clinic)}"}
    starts_at = datetime.now(UTC) + timedelta(days=2)
    async with running_service(env, roles=["api"]) as client:
        created = await client.post(
            "/v1/appointments",
            json=schedule_json(patient, starts_at),
            headers=headers,
        )
        assert created.status_code == 201, created.text
        appointment_id = created.json()["appointment_id"]
        token = {"X-Consistency-Token": created.headers["x-consistency-token"]}
        upcoming = await client.get("/v1/visits", headers={**headers, **token})
        assert upcoming.headers["x-consistency"] == "fresh"
        assert [v["appointment_id"] for v in upcoming.json()["items"]] == [appointment_id]

        cancelled = await client.post(f"/v1/appointments/{appointment_id}/cancel", headers=headers)
        assert cancelled.status_code == 200, cancelled.text
        token = {"X-Consistency-Token": cancelled.headers["x-consistency-token"]}
        upcoming = await client.get("/v1/visits", headers={**headers, **token})
        assert upcoming.headers["x-consistency"] == "fresh"
        assert upcoming.json()["items"] == []
        past = await client.get("/v1/visits", params={"tab": "past"}, headers={**headers, **token})
        [visit] = past.json()["items"]
        assert (visit["appointment_id"], visit["status"]) == (appointment_id, "cancelled")

        # Commands write no row: one booked without a read stays out of the view.
        unread = await client.post(
            "/v1/appointments",
            json=schedule_json(patient, starts_at + timedelta(hours=3)),
            headers=headers,
        )
        assert unread.status_code == 201, unread.text
        upcoming = await client.get("/v1/visits", headers=headers)
        assert upcoming.status_code == 200 and upcoming.json()["items"] == []
