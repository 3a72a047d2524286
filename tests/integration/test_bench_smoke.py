"""The benchmarks still run: each script at tiny sizes prints its JSON (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.run_all import TINY, render

ROOT = Path(__file__).resolve().parents[2]

#: The figures each script must report (a key path under "figures").
EXPECTED: dict[str, list[tuple[str, ...]]] = {
    "append": [
        (mode, w)
        for mode in ("raw_insert", "raw_insert_pool", "store", "store_doorbell")
        for w in "12"
    ],
    "peer": [
        (mode, w)
        for mode in ("store_doorbell", "eventsourcing_db_functions", "eventsourcing_default")
        for w in "12"
    ],
    "relay": [("relay",), ("raw_publish_async",)],
    "http": [("noop", "2"), ("commands", "2"), ("offered", "50")],
    "e2e_lag": [("scheduled_visible",), ("cancelled_gone",), ("view_lag",), ("background",)],
    "growth": [("100", "append"), ("300", "upcoming")],
}


def run_bench(name: str, database_url: str, nats_url: str) -> dict[str, Any]:
    env = {**os.environ, "CLINIC_DATABASE_URL": database_url, "CLINIC_NATS_URL": nats_url}
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *TINY[name]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=240,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_benchmark_prints_its_figures_and_baseline(
    name: str, pg_server_url: str, nats_url: str
) -> None:
    result = run_bench(name, pg_server_url, nats_url)

    assert result["benchmark"] == name
    assert "baseline" in result and "machine" in result and "postgresql" in result
    for path in EXPECTED[name]:
        figure = result["figures"]
        for key in path:
            figure = figure[key]
        wanted = {"per_s", "drain_s"} if name == "relay" else {"p50_ms", "p99_ms"}
        assert wanted <= set(figure), (path, figure)
    if name != "e2e_lag":
        assert result["ratios"] and all(
            isinstance(v, float | dict) for v in result["ratios"].values()
        )
    if name == "e2e_lag":
        assert result["wrong_reads"] == 0
    if name in ("http", "e2e_lag"):
        assert result.get("failed_requests", 0) == 0
    # RESULTS.md renders every script's answer.
    assert f"| {name} |" in render({name: result}, "python -m bench.run_all")
