"""Read-your-writes over HTTP: from a command's answer to the visits view showing it.

The service runs every role (api, relay, projector) in a process of its own; a load
generator in another process keeps ``--background`` schedule+cancel commands/s going.
Meanwhile a patient, again and again:

* schedules a visit, then reads ``GET /v1/visits?tab=upcoming`` with the answer's
  ``X-Consistency-Token``: the time from the command's answer to the read's answer, which
  lists the visit (``scheduled_visible``);
* cancels it, then reads Upcoming with the cancel's token: the time until the read
  answers without it (``cancelled_gone``);
* for ``view_lag`` (one probe in four), reads Upcoming *without* a token every
  millisecond until the visit shows: how far the view trails the write.

No baseline: the target is absolute (p99 <= 20 ms at 500 commands/s in the background).
Before the runs, 2 s of the background load, then ``ANALYZE`` (``bench._common.analyze``:
what autovacuum does in a new database's first minute, which the runs would otherwise
measure instead of the steady state).

    python -m bench.e2e_lag [--background 500] [--seconds 20] [--runs 3]
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from bench._common import (
    Sample,
    analyze,
    base_parser,
    fresh_database,
    machine,
    median_summary,
    pg_version,
    run,
    servers,
)
from bench._load import (
    Background,
    Connection,
    generate,
    mint_token_for,
    request,
    schedule_body,
)
from bench._service import service_process
from services.embedded import free_port

UPCOMING = "/v1/visits?tab=upcoming&limit=100"


class Probe:
    """A patient booking and cancelling, reading Upcoming after each command."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.patient = uuid.uuid4()
        self.token = mint_token_for(self.patient, "patient")
        self.stale = 0
        self.wrong = 0

    async def command(self, raw: bytes, ok: int) -> tuple[float, str]:
        status, head, _ = await self.conn.send(raw)
        assert status == ok, (status, head)
        answered = time.perf_counter()
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"x-consistency-token:"):
                return answered, line.split(b":", 1)[1].strip().decode()
        raise AssertionError("no X-Consistency-Token")

    async def lists(self, appointment_id: uuid.UUID, token: str | None) -> bool:
        headers = {"X_Consistency_Token": token} if token else {}
        status, head, body = await self.conn.send(request("GET", UPCOMING, self.token, **headers))
        assert status == 200, (status, head)
        if b"x-consistency: stale" in head.lower():
            self.stale += 1
        return str(appointment_id).encode() in body

    async def read_your_writes(self) -> tuple[float, float]:
        appointment_id = uuid.uuid4()
        body = schedule_body(appointment_id, self.patient)
        answered, token = await self.command(
            request("POST", "/v1/appointments", self.token, body), 201
        )
        self.wrong += not await self.lists(appointment_id, token)
        visible = time.perf_counter() - answered
        cancel = request("POST", f"/v1/appointments/{appointment_id}/cancel", self.token, b"{}")
        answered, token = await self.command(cancel, 200)
        self.wrong += await self.lists(appointment_id, token)
        return visible, time.perf_counter() - answered

    async def view_lag(self) -> float:
        appointment_id = uuid.uuid4()
        body = schedule_body(appointment_id, self.patient)
        answered, _ = await self.command(request("POST", "/v1/appointments", self.token, body), 201)
        # Polling over HTTP is what is measured here.
        while not await self.lists(appointment_id, None):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        lag = time.perf_counter() - answered
        cancel = request("POST", f"/v1/appointments/{appointment_id}/cancel", self.token, b"{}")
        await self.command(cancel, 200)
        return lag


async def measure(port: int, background: float, seconds: float) -> dict[str, Any]:
    """One run: probes for ``seconds`` while the background load runs."""
    load = Background(port, "commands", background, seconds + 1.0) if background else None
    conn = await Connection.open(port)
    probe = Probe(conn)
    visible: list[float] = []
    gone: list[float] = []
    lag: list[float] = []
    await asyncio.sleep(0.5)  # let the background load settle
    deadline = time.perf_counter() + seconds
    turn = 0
    while time.perf_counter() < deadline:
        turn += 1
        if turn % 4 == 0:
            lag.append(await probe.view_lag())
        else:
            shown, hidden = await probe.read_your_writes()
            visible.append(shown)
            gone.append(hidden)
        await asyncio.sleep(0.01)
    conn.close()
    result = load.result() if load else {"per_s": 0.0, "latencies": [], "statuses": {}}
    return {
        "scheduled_visible": Sample(len(visible) / seconds, visible),
        "cancelled_gone": Sample(len(gone) / seconds, gone),
        "view_lag": Sample(len(lag) / seconds, lag),
        "background": Sample(result["per_s"], result["latencies"]),
        "statuses": result["statuses"],
        "stale": probe.stale,
        "wrong": probe.wrong,
    }


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--background", type=float, default=500.0, help="commands/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="per run")
    parser.add_argument(
        "--split", action="store_true", help="api in one process, relay+projector in another"
    )
    args = parser.parse_args()
    runs = []
    async with servers() as env, fresh_database(env.admin_dsn) as dsn:
        port = free_port()
        roles = ["api"] if args.split else ["api", "relay", "projector"]
        workers = ["relay", "projector"] if args.split else []
        with (
            service_process(dsn, env.nats_url, port, roles),
            service_process(dsn, env.nats_url, free_port(), workers, name="clinic-workers")
            if workers
            else contextlib.nullcontext(),
        ):
            if args.background:  # a warm-up, then the statistics autovacuum would take
                generate(port, "commands", "open", args.background, 2.0)
            await analyze(dsn)
            for _ in range(args.runs):
                runs.append(await measure(port, args.background, args.seconds))
        postgresql = await pg_version(env.admin_dsn)
    figures = {
        key: median_summary([r[key] for r in runs])
        for key in ("scheduled_visible", "cancelled_gone", "view_lag", "background")
    }
    for key in ("scheduled_visible", "cancelled_gone", "view_lag"):
        figures[key]["samples"] = sum(len(r[key].latencies) for r in runs)
        del figures[key]["per_s"], figures[key]["per_s_runs"]
    return {
        "benchmark": "e2e_lag",
        "unit": "ms from a command's answer to a read that reflects it",
        "servers": env.origin,
        "postgresql": postgresql,
        "machine": machine(),
        "runs": args.runs,
        "seconds": args.seconds,
        "processes": "api | relay+projector" if args.split else "api+relay+projector",
        "background_offered_per_s": args.background,
        "baseline": None,
        "figures": figures,
        "background_statuses": [r["statuses"] for r in runs],
        "stale_reads": sum(r["stale"] for r in runs),
        "wrong_reads": sum(r["wrong"] for r in runs),
    }


if __name__ == "__main__":
    run(main)
