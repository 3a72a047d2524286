"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from litestar import Controller, Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from contracts.errors import ErrorCode, problem
from services.appointments.entrypoints.http.dependencies import container_of
from services.appointments.entrypoints.http.problems import problem_response

READY_TIMEOUT_SECONDS = 1.0


class HealthController(Controller):
    tags = ["operations"]

    @get("/health/live", summary="The process is up")
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/health/ready", summary="PostgreSQL and NATS are reachable", responses=None)
    async def ready(self, state: State) -> Response[bytes] | dict[str, str]:
        container = container_of(state)
        failing = []
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                await container.pool.fetchval("SELECT 1")
        except Exception:  # any failure means "not ready", whatever its kind
            failing.append("postgresql")
        if container.nats is not None and not container.nats.is_connected:
            failing.append("nats")
        if failing:
            doc = problem(ErrorCode.UNAVAILABLE, "Unreachable: " + ", ".join(failing) + ".")
            return problem_response(doc, {"Retry-After": "1"})
        return {"status": "ready"}

    @get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
    async def metrics(self) -> bytes:
        return generate_latest(REGISTRY)
