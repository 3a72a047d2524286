"""Settings that change what the HTTP API answers reach it: the start window's length, the
default page size of the visits list, and how long an idle connection stays open."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from services.auth import mint_token
from tests.support.builders import schedule_json
from tests.support.service import JWT_SECRET, running_service, service_env


async def _book_and_start(window: str | None, database_url: str, nats_url: str) -> dict[str, Any]:
    extra = {"CLINIC_START_WINDOW_MINUTES": window} if window else {}
    env = service_env(database_url, [nats_url], **extra)
    patient, clinic = uuid.uuid4(), uuid.uuid4()
    headers = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'patient', patient, clinic)}"}
    starts_at = (datetime.now(UTC) + timedelta(minutes=25)).replace(microsecond=0)
    async with running_service(env, roles=["api"]) as client:
        booked = await client.post(
            "/v1/appointments", json=schedule_json(patient, starts_at), headers=headers
        )
        assert booked.status_code == 201, booked.text
        started = await client.post(
            f"/v1/appointments/{booked.json()['appointment_id']}/start", headers=headers
        )
    return {"booked": booked.json(), "started": started, "starts_at": starts_at}


async def test_the_start_window_setting_reaches_the_api(database_url: str, nats_url: str) -> None:
    wide = await _book_and_start("30", database_url, nats_url)
    assert wide["booked"]["can_start"] is True
    opens = datetime.fromisoformat(wide["booked"]["start_window_opens_at"])
    assert opens == wide["starts_at"] - timedelta(minutes=30)
    assert wide["started"].status_code == 200, wide["started"].text
    assert wide["started"].json()["status"] == "started"


async def test_without_the_setting_the_window_is_15_minutes(
    database_url: str, nats_url: str
) -> None:
    default = await _book_and_start(None, database_url, nats_url)
    assert default["booked"]["can_start"] is False
    opens = datetime.fromisoformat(default["booked"]["start_window_opens_at"])
    assert opens == default["starts_at"] - timedelta(minutes=15)
    assert default["started"].status_code == 409
    assert default["started"].json()["code"] == "too-early"


async def test_the_visits_list_pages_by_20_by_default(database_url: str, nats_url: str) -> None:
    env = service_env(database_url, [nats_url])
    patient, clinic = uuid.uuid4(), uuid.uuid4()
    headers = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'patient', patient, clinic)}"}
    first = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    async with running_service(env) as client:
        for i in range(21):
            answer = await client.post(
                "/v1/appointments",
                json=schedule_json(patient, first + timedelta(hours=i)),
                headers=headers,
            )
            assert answer.status_code == 201, answer.text
        page = await _when_all_listed(client, headers, 21)
        assert len(page["items"]) == 20 and page["next_cursor"]
        rest = await client.get(
            "/v1/visits", params={"cursor": page["next_cursor"]}, headers=headers
        )
        assert rest.status_code == 200, rest.text
        assert len(rest.json()["items"]) == 1 and rest.json()["next_cursor"] is None


async def _when_all_listed(
    client: httpx.AsyncClient, headers: dict[str, str], count: int
) -> dict[str, Any]:
    """The first page (default size) once the projector has listed ``count`` visits."""
    async with asyncio.timeout(30):
        while True:
            everything = await client.get("/v1/visits", params={"limit": 100}, headers=headers)
            if len(everything.json()["items"]) == count:
                return dict((await client.get("/v1/visits", headers=headers)).json())
            await asyncio.sleep(0.05)


async def _idle_close_after(client: httpx.AsyncClient, wait: float) -> bool:
    """Whether the service closes a keep-alive connection left idle (within ``wait`` s)."""
    port = client.base_url.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: clinic\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        try:
            return await asyncio.wait_for(reader.read(1), wait) == b""
        except TimeoutError:
            return False
    finally:
        writer.close()


async def test_the_keep_alive_setting_reaches_the_http_server(
    database_url: str, nats_url: str
) -> None:
    env = service_env(database_url, [nats_url], CLINIC_HTTP_KEEP_ALIVE_SECONDS="1")
    async with running_service(env, roles=["api"]) as client:
        assert await _idle_close_after(client, 4.0)


async def test_idle_connections_outlive_uvicorns_5_seconds_by_default(
    database_url: str, nats_url: str
) -> None:
    # A gateway keeping connections idle for up to 60 s must find them open.
    async with running_service(service_env(database_url, [nats_url]), roles=["api"]) as client:
        assert not await _idle_close_after(client, 6.0)
