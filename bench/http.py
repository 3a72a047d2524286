"""Schedule+cancel commands/s over HTTP, and latency at fixed offered loads.

The service runs in a process of its own (``bench/_service.py``: the product's app with
its ``api`` role, by default without relay and projector), the load generator in another
(``bench/_load.py``). Commands: ``POST /v1/appointments`` of a new appointment, then
``POST /v1/appointments/{id}/cancel`` of one booked earlier, as a staff member.

Baseline, in the same run on the same server: the same kind of JSON POST (a schedule-sized
body, the same headers) to ``POST /bench/noop``, a route that does no work (the
framework's ceiling).

Both closed loops run at each ``--connections`` count: at 32 connections the commands
leave the service's event loop idle part of the time (every request waiting on
PostgreSQL), at 128 they keep it busy, while the no-work POST is fastest at the lower
count. A warm-up of commands, then ``ANALYZE`` (``bench._common.analyze``), comes first. The
headline ratio (``best_commands/best_noop``) divides the best commands rate by
the best no-work rate, whatever their counts; the per-count ratios pair runs as usual.

    python -m bench.http [--connections 32,128] [--rates 250,500,1000] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

from typing import Any

from bench._common import (
    Sample,
    analyze,
    base_parser,
    fresh_database,
    int_list,
    machine,
    median_summary,
    paired_ratio,
    pg_version,
    run,
    servers,
)
from bench._load import generate
from bench._service import service_process
from services.embedded import free_port


def sample(result: dict[str, Any]) -> Sample:
    return Sample(rate=result["per_s"], latencies=result["latencies"])


def failures(result: dict[str, Any]) -> int:
    return sum(n for status, n in result["statuses"].items() if int(status) >= 300)


async def main() -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--connections", type=int_list, default=[32, 128], help="closed-loop clients, each count"
    )
    parser.add_argument("--rates", type=int_list, default=[250, 500, 1000], help="offered/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--roles", default="api", help="api, or e.g. api,relay,projector")
    args = parser.parse_args()
    roles = args.roles.split(",")
    closed: dict[tuple[str, int], list[Sample]] = {}
    offered: dict[int, list[Sample]] = {}
    failed = 0
    async with servers(nats=roles != ["api"]) as env, fresh_database(env.admin_dsn) as dsn:
        port = free_port()
        with service_process(dsn, env.nats_url, port, roles):
            warm_up = min(1.0, args.seconds)
            generate(port, "commands", "closed", max(args.connections), warm_up)
            await analyze(dsn)
            for _ in range(args.runs):
                for connections in args.connections:
                    for kind in ("noop", "commands"):
                        result = generate(port, kind, "closed", connections, args.seconds)
                        closed.setdefault((kind, connections), []).append(sample(result))
                        failed += failures(result)
                for rate in args.rates:
                    result = generate(port, "commands", "open", rate, args.seconds)
                    offered.setdefault(rate, []).append(sample(result))
                    failed += failures(result)
        postgresql = await pg_version(env.admin_dsn)
    counts = [str(c) for c in args.connections]
    figures = {
        kind: {c: median_summary(closed[kind, int(c)]) for c in counts}
        for kind in ("noop", "commands")
    }
    best = {kind: max(f["per_s"] for f in figures[kind].values()) for kind in figures}
    return {
        "benchmark": "http",
        "unit": "requests/s answered 2xx; latencies in ms",
        "servers": env.origin,
        "postgresql": postgresql,
        "machine": machine(),
        "roles": roles,
        "runs": args.runs,
        "seconds": args.seconds,
        "connections": args.connections,
        "baseline": "noop",
        "failed_requests": failed,
        "figures": figures
        | {"offered": {str(rate): median_summary(runs) for rate, runs in offered.items()}},
        "ratios": {
            "best_commands/best_noop": round(best["commands"] / best["noop"], 3),
            "commands/noop": {
                c: paired_ratio(closed["commands", int(c)], closed["noop", int(c)]) for c in counts
            },
        },
    }


if __name__ == "__main__":
    run(main)
