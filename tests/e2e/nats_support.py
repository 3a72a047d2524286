"""The appointments NATS service API running in-process, driven by a nats-py client.

Until the ``api`` role serves NATS (and the relay and projector roles run in the e2e
``api`` fixture), this runs the pieces itself on the same composition root: the service
API (``serve``), the outbox relay and the visits projector, optionally the HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from contracts.common import Role
from contracts.service_api import ENDPOINTS
from services.appointments.adapters.postgres.visits import PostgresVisits
from services.appointments.bootstrap import appointments_container
from services.appointments.entrypoints.nats.handlers import ServiceApi
from services.appointments.entrypoints.nats.service import serve
from services.appointments.main import serve_http
from services.appointments.projector import run_projector
from services.appointments.relay import run_relay
from services.appointments.service_layer.visits import VisitsQuery
from services.config import load_settings
from services.nats_client import NatsClient
from tests.e2e.conftest import JWT_SECRET, free_port
from tests.support.clock import ManualClock

CONSISTENCY_WAIT_MS = 5000


@dataclass
class NatsService:
    """A running service and a client connection, as another clinic service has."""

    nc: NATS
    clock: ManualClock
    http_url: str | None
    stop: asyncio.Event
    """Set it to stop the service (as SIGTERM does)."""
    clinic_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def actor(
        self, role: Role, clinic_id: uuid.UUID | None = None, id: uuid.UUID | None = None
    ) -> dict[str, str]:
        """An ``actor`` of the requests (a new user unless ``id`` is given)."""
        return {
            "id": str(id or uuid.uuid4()),
            "role": role,
            "clinic_id": str(clinic_id or self.clinic_id),
        }

    async def request(
        self, subject: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> Msg:
        """One request/reply; ``body`` is sent as JSON unless already bytes."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.nc.request(subject, data, timeout=10, headers=headers)

    def schedule_body(self, actor: dict[str, str], **changes: Any) -> dict[str, Any]:
        """A valid schedule request of ``actor`` starting in two hours."""
        body: dict[str, Any] = {
            "patient_id": actor["id"] if actor["role"] == "patient" else str(uuid.uuid4()),
            "provider_id": actor["id"] if actor["role"] == "provider" else str(uuid.uuid4()),
            "starts_at": (self.clock.now + timedelta(hours=2)).isoformat(),
            "duration_minutes": 30,
            "timezone": "America/New_York",
            "visit_reason": "Follow-up on blood pressure",
            "actor": actor,
        }
        body.update(changes)
        return body


def body_of(msg: Msg) -> Any:
    """The reply's JSON."""
    return json.loads(msg.data)


def is_error(msg: Msg) -> bool:
    return "Nats-Service-Error-Code" in (msg.headers or {})


def assert_ok(msg: Msg) -> dict[str, Any]:
    """The success reply's JSON (fails with the problem otherwise)."""
    assert not is_error(msg), (msg.headers, msg.data)
    body: dict[str, Any] = json.loads(msg.data)
    return body


def assert_problem(msg: Msg, status: int, code: str) -> dict[str, Any]:
    """The problem document of an error reply with these service-API error headers."""
    headers = msg.headers or {}
    assert headers.get("Nats-Service-Error-Code") == str(status), (headers, msg.data)
    assert headers.get("Nats-Service-Error")
    assert headers.get("Content-Type") == "application/problem+json"
    doc: dict[str, Any] = json.loads(msg.data)
    assert doc["status"] == status and doc["code"] == code, doc
    assert doc["type"].endswith(code) and doc["title"] and doc["detail"]
    return doc


async def wait_for_service(nc: NATS, instances: int = 1, seconds: float = 10.0) -> None:
    """Until ``instances`` of the ``appointments`` service list every endpoint in
    ``$SRV.INFO`` (an endpoint is listed once subscribed; the service answers ``$SRV.PING``
    before its endpoints subscribe, one after the other)."""
    names = {endpoint.name for endpoint in ENDPOINTS}
    inbox = nc.new_inbox()
    ready: set[str] = set()

    async def on_info(msg: Msg) -> None:
        info = json.loads(msg.data)
        if names <= {endpoint["name"] for endpoint in info.get("endpoints") or []}:
            ready.add(info["id"])

    sub = await nc.subscribe(inbox, cb=on_info)
    try:
        async with asyncio.timeout(seconds):
            while len(ready) < instances:
                await nc.publish("$SRV.INFO.appointments", b"", reply=inbox)
                await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()


async def _connect(url: str, name: str) -> NATS:
    """A connection whose flush follows what was published before it (the drain test
    relies on that; see :mod:`services.nats_client`)."""
    nc = NatsClient()
    await nc.connect(url, name=name)
    return nc


@contextlib.asynccontextmanager
async def running_service(
    database_url: str,
    nats_url: str,
    *,
    instances: int = 1,
    http: bool = False,
    consistency_wait_ms: int = CONSISTENCY_WAIT_MS,
) -> AsyncIterator[NatsService]:
    """The NATS service API (``instances`` of it, each on a connection of its own), the
    relay and the projector on one database and NATS server, and a client."""
    port = free_port()
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_JWT_SECRET": JWT_SECRET,
            "CLINIC_HTTP_PORT": str(port),
            "CLINIC_CONSISTENCY_WAIT_MS": str(consistency_wait_ms),
        }
    )
    clock = ManualClock()
    stop = asyncio.Event()
    async with appointments_container(settings, clock=clock, pool_size=8) as container:
        assert container.nats is not None
        visits = getattr(container, "visits", None) or VisitsQuery(
            PostgresVisits(container.pool),
            clock,
            settings.rules,
            timedelta(milliseconds=consistency_wait_ms),
        )
        api = ServiceApi(container.appointments, visits)
        extra = [await _connect(nats_url, "appointments") for _ in range(instances - 1)]
        runners = [
            serve(container.nats, api, stop),
            *(serve(nc, api, stop) for nc in extra),
            run_relay(container.pool, container.nats, stop),
            run_projector(container.pool, container.nats, stop),
        ]
        if http:
            runners.append(serve_http(container, stop))
        tasks = [asyncio.create_task(runner) for runner in runners]
        client = await _connect(nats_url, "another-clinic-service")
        try:
            await wait_for_service(client, instances)
            http_url = f"http://127.0.0.1:{port}" if http else None
            yield NatsService(nc=client, clock=clock, http_url=http_url, stop=stop)
        finally:
            stop.set()
            await client.drain()
            await asyncio.gather(*tasks)
            for nc in extra:
                await nc.drain()
