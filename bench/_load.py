"""A small HTTP/1.1 load generator, run in a process of its own.

Keep-alive connections on asyncio streams with requests prebuilt as bytes: a few
microseconds of client work per request, so the generator takes little of the CPU the
server under test needs. Two shapes:

* closed loop: ``concurrency`` connections, each sending its next request when the
  previous answer arrived (the throughput ceiling);
* open loop: requests sent at a fixed offered rate whatever the answers do, each latency
  counted from the request's *intended* send time (no coordinated omission).

Workloads: ``noop`` (``POST /bench/noop`` with a schedule-sized JSON body) and
``commands`` (schedule an appointment, later cancel it; both count as commands).
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from bench._common import CLINIC
from services.auth import mint_token

STAFF = uuid.UUID("00000000-0000-4000-8000-00000000057a")


class Connection:
    """One keep-alive HTTP/1.1 connection (opened again if the server closed it idle)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, port: int) -> Connection:
        conn = cls(port)
        conn.reader, conn.writer = await asyncio.open_connection("127.0.0.1", port)
        return conn

    async def send(self, raw: bytes) -> tuple[int, bytes, bytes]:
        """Send a prebuilt request; (status, head, body) of the answer."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise
            # uvicorn closes keep-alive connections idle for 5 s; nothing was answered.
            self.writer.close()
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
        start = head.lower().find(b"content-length:") + 15
        length = int(head[start : head.index(b"\r\n", start)])
        body = await self.reader.readexactly(length)
        return int(head[9:12]), head, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def request(method: str, path: str, token: str, body: bytes = b"", **headers: str) -> bytes:
    """The bytes of one request."""
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def schedule_body(appointment_id: uuid.UUID, patient_id: uuid.UUID | None = None) -> bytes:
    """A valid schedule request of a new appointment with its own provider."""
    starts_at = datetime.now(UTC) + timedelta(days=1)
    return msgspec.json.encode(
        {
            "appointment_id": appointment_id,
            "patient_id": patient_id or uuid.uuid4(),
            "provider_id": uuid.uuid4(),
            "starts_at": starts_at,
            "duration_minutes": 30,
            "timezone": "Europe/Berlin",
            "visit_reason": "Follow-up on blood pressure",
        }
    )


@dataclass
class Workload:
    """Makes the next request; learns which appointments exist from the answers."""

    kind: str
    token: str = field(default_factory=lambda: mint_token_for(STAFF, "staff"))
    booked: collections.deque[uuid.UUID] = field(default_factory=collections.deque)
    turn: int = 0

    def next(self) -> tuple[bytes, Callable[[int], None]]:
        """The next request and what to do with its status."""
        self.turn += 1
        if self.kind == "noop":
            body = schedule_body(uuid.uuid4())
            return request("POST", "/bench/noop", self.token, body), _ignore
        if self.turn % 2 == 0 and self.booked:
            appointment_id = self.booked.popleft()
            path = f"/v1/appointments/{appointment_id}/cancel"
            return request("POST", path, self.token, b'{"reason":"bench"}'), _ignore
        appointment_id = uuid.uuid4()

        def booked(status: int) -> None:
            if status == 201:
                self.booked.append(appointment_id)

        body = schedule_body(appointment_id)
        return request("POST", "/v1/appointments", self.token, body), booked


def _ignore(_: int) -> None:
    pass


def mint_token_for(who: uuid.UUID, role: str) -> str:
    from bench._service import JWT_SECRET

    return mint_token(JWT_SECRET, role, who, CLINIC)  # type: ignore[arg-type]


async def closed_loop(port: int, workload: Workload, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    deadline = time.perf_counter() + seconds

    async def user() -> None:
        conn = await Connection.open(port)
        try:
            while time.perf_counter() < deadline:
                raw, then = workload.next()
                started = time.perf_counter()
                status, _, _ = await conn.send(raw)
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
                then(status)
        finally:
            conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return _result(latencies, statuses, time.perf_counter() - began)


async def open_loop(port: int, workload: Workload, rate: float, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    idle: list[Connection] = []

    async def one(intended: float) -> None:
        conn = idle.pop() if idle else await Connection.open(port)
        raw, then = workload.next()
        status, _, _ = await conn.send(raw)
        latencies.append(time.perf_counter() - intended)
        statuses[status] += 1
        then(status)
        idle.append(conn)

    began = time.perf_counter()
    tasks = []
    for i in range(int(rate * seconds)):
        intended = began + i / rate
        pause = intended - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        tasks.append(asyncio.create_task(one(intended)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    for conn in idle:
        conn.close()
    return _result(latencies, statuses, elapsed)


def _result(latencies: list[float], statuses: collections.Counter[int], elapsed: float) -> dict:
    ok = sum(n for status, n in statuses.items() if status < 300)
    return {
        "latencies": latencies,
        "per_s": ok / elapsed,
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def _generate(port: int, kind: str, shape: str, level: float, seconds: float, out: Any) -> None:
    async def main() -> dict:
        workload = Workload(kind)
        if shape == "closed":
            return await closed_loop(port, workload, int(level), seconds)
        return await open_loop(port, workload, level, seconds)

    try:
        import uvloop

        out.send(uvloop.run(main()))
    except ImportError:
        out.send(asyncio.run(main()))


def generate(port: int, kind: str, shape: str, level: float, seconds: float) -> dict:
    """Run one load in a child process: ``shape`` closed (level = connections) or open
    (level = requests/s); its latencies (s), achieved rate of 2xx answers and statuses."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_generate, args=(port, kind, shape, level, seconds, send), daemon=True
    )
    process.start()
    try:
        result: dict = receive.recv()
    finally:
        process.join(30)
    return result


class Background:
    """A load running in a child process while the caller measures something else."""

    def __init__(self, port: int, kind: str, rate: float, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_generate, args=(port, kind, "open", rate, seconds, send), daemon=True
        )
        self._process.start()

    def result(self) -> dict:
        """Wait for the load to end; its result."""
        result: dict = self._receive.recv()
        self._process.join(30)
        return result
