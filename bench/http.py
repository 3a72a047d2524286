"""Schedule+cancel commands/s over HTTP, and latency at fixed offered loads.

The service runs in a process of its own (``bench/_service.py``: the product's app with
its ``api`` role, by default without relay and projector), the load generator in another
(``bench/_load.py``). Commands: ``POST /v1/appointments`` of a new appointment, then
``POST /v1/appointments/{id}/cancel`` of one booked earlier, as a staff member.

Baseline, in the same run on the same server: the same kind of JSON POST (a schedule-sized
body, the same headers) to ``POST /bench/noop``, a route that does no work (the
framework's ceiling).

    python -m bench.http [--connections 32] [--rates 250,500,1000] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

from typing import Any

from bench._common import (
    Sample,
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
    parser.add_argument("--connections", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--rates", type=int_list, default=[250, 500, 1000], help="offered/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--roles", default="api", help="api, or e.g. api,relay,projector")
    args = parser.parse_args()
    roles = args.roles.split(",")
    closed: dict[str, list[Sample]] = {"noop": [], "commands": []}
    offered: dict[int, list[Sample]] = {}
    failed = 0
    async with servers(nats=roles != ["api"]) as env, fresh_database(env.admin_dsn) as dsn:
        port = free_port()
        with service_process(dsn, env.nats_url, port, roles):
            generate(port, "commands", "closed", args.connections, min(1.0, args.seconds))
            for _ in range(args.runs):
                for kind in ("noop", "commands"):
                    result = generate(port, kind, "closed", args.connections, args.seconds)
                    closed[kind].append(sample(result))
                    failed += failures(result)
                for rate in args.rates:
                    result = generate(port, "commands", "open", rate, args.seconds)
                    offered.setdefault(rate, []).append(sample(result))
                    failed += failures(result)
        postgresql = await pg_version(env.admin_dsn)
    noop = median_summary(closed["noop"])
    commands = median_summary(closed["commands"])
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
        "figures": {
            "noop": noop,
            "commands": commands,
            "offered": {str(rate): median_summary(runs) for rate, runs in offered.items()},
        },
        "ratios": {"commands/noop": paired_ratio(closed["commands"], closed["noop"])},
    }


if __name__ == "__main__":
    run(main)
