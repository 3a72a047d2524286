"""A steady command load over HTTP: patients booking, cancelling and starting visits.

Each simulated patient books a visit (half of them inside their start window, so that they
can be started), then cancels it, starts it, or leaves it, sometimes tapping "cancel"
twice. The offered rate is fixed (not "as fast as possible"), so a slow answer shows as
latency, not as less load. Every answer is counted by command and status, and the state
each acknowledged command left an appointment in is kept, to check later that nothing
acknowledged was lost.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import httpx

from services.auth import mint_token

#: Statuses a command answers when it worked.
OK = frozenset({200, 201})


class CommandLoad:
    """Drive schedule/cancel/start commands at ``rate`` per second over ``workers`` patients."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        jwt_secret: str,
        *,
        rate: float = 50.0,
        workers: int = 6,
        clinic_id: uuid.UUID | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._client = client
        self._secret = jwt_secret
        self._rate = rate
        self._workers = workers
        self._timeout = timeout
        self.clinic_id = clinic_id or uuid.uuid4()
        self.answers: Counter[tuple[str, int]] = Counter()
        """(command, HTTP status) -> count; status 0 is a transport failure."""
        self.seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
        """(command, HTTP status) -> answer times."""
        self.acknowledged: dict[uuid.UUID, str] = {}
        """Appointment -> the status its last acknowledged command left it in."""
        self.failures: list[str] = []
        """Answers that were neither a success nor a 503 (never expected)."""

    @property
    def commands(self) -> int:
        """Commands sent so far."""
        return sum(self.answers.values())

    def count(self, *, ok: bool | None = None, status: int | None = None) -> int:
        """Commands answered with a success (``ok=True``), a failure, or ``status``."""
        return sum(
            n
            for (_, code), n in self.answers.items()
            if (status is None or code == status) and (ok is None or (code in OK) == ok)
        )

    async def run(self, seconds: float, stop: asyncio.Event | None = None) -> None:
        """Offer the load for ``seconds`` (or until ``stop`` is set)."""
        deadline = time.monotonic() + seconds
        stop = stop or asyncio.Event()
        await asyncio.gather(*(self._patient(i, deadline, stop) for i in range(self._workers)))

    async def _patient(self, index: int, deadline: float, stop: asyncio.Event) -> None:
        rng = random.Random(index)
        me = uuid.uuid4()
        token = mint_token(self._secret, "patient", me, self.clinic_id, 3600)
        headers = {"Authorization": f"Bearer {token}"}
        interval = self._workers / self._rate
        next_at = time.monotonic() + rng.uniform(0, interval)

        async def paced(command: str, path: str, body: object | None = None) -> int:
            nonlocal next_at
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic() - interval)
            return await self._send(command, path, body, headers)

        while time.monotonic() < deadline and not stop.is_set():
            appointment = uuid.uuid4()
            startable = rng.random() < 0.5
            starts_at = datetime.now(UTC) + (
                timedelta(minutes=5) if startable else timedelta(days=2)
            )
            body = {
                "appointment_id": str(appointment),
                "patient_id": str(me),
                "provider_id": str(uuid.uuid4()),
                "starts_at": starts_at.isoformat(),
                "duration_minutes": 30,
                "timezone": "Europe/Berlin",
            }
            if await paced("schedule", "/v1/appointments", body) not in OK:
                continue
            self.acknowledged[appointment] = "scheduled"
            roll = rng.random()
            if startable and roll < 0.4:
                if await paced("start", f"/v1/appointments/{appointment}/start") in OK:
                    self.acknowledged[appointment] = "started"
            elif roll < 0.85:
                taps = 2 if rng.random() < 0.15 else 1  # a double tap on "YES"
                for _ in range(taps):
                    path = f"/v1/appointments/{appointment}/cancel"
                    if await paced("cancel", path, {"reason": "fault test"}) in OK:
                        self.acknowledged[appointment] = "cancelled"

    async def _send(
        self, command: str, path: str, body: object | None, headers: dict[str, str]
    ) -> int:
        started = time.monotonic()
        try:
            answer = await self._client.post(
                path, json=body, headers=headers, timeout=self._timeout
            )
            status = answer.status_code
        except httpx.TransportError:
            status = 0
        self.answers[command, status] += 1
        self.seconds[command, status].append(time.monotonic() - started)
        if status not in OK and status != 503:
            self.failures.append(f"{command} {path}: {status}")
        elif status == 503 and answer.headers.get("retry-after") is None:
            self.failures.append(f"{command} {path}: 503 without Retry-After")
        return status

    def summary(self) -> str:
        """One line: the commands by outcome."""
        parts = [f"{cmd} {code}: {n}" for (cmd, code), n in sorted(self.answers.items())]
        return f"{self.commands} commands (" + ", ".join(parts) + ")"
