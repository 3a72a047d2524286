"""Run every benchmark and write bench/RESULTS.md (machine, date, command, figures, JSON).

Each script runs in a process of its own, one after the other, on the servers of
``CLINIC_DATABASE_URL`` / ``CLINIC_NATS_URL`` (or embedded ones, per script).

    python -m bench.run_all [--only append,relay] [--tiny] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._common import machine

SCRIPTS = ("append", "peer", "relay", "http", "e2e_lag", "growth")
#: Flags that make each script finish in seconds (the smoke test's sizes).
TINY: dict[str, list[str]] = {
    "append": ["--writers", "1,2", "--seconds", "0.2", "--runs", "1"],
    "peer": ["--writers", "1,2", "--seconds", "0.2", "--runs", "1"],
    "relay": ["--events", "200", "--runs", "1"],
    "http": ["--connections", "2", "--rates", "50", "--seconds", "0.5", "--runs", "1"],
    "e2e_lag": ["--background", "20", "--seconds", "1", "--runs", "1"],
    "growth": ["--sizes", "100,300", "--seconds", "0.2", "--runs", "1"],
}
ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, flags: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.<name> <flags>``; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *flags],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _lat(figure: dict[str, Any]) -> str:
    return f"{figure['p50_ms']:.1f} / {figure['p99_ms']:.1f}"


def _rate(figure: dict[str, Any]) -> str:
    return f"{figure['per_s']:,.0f}/s ({_lat(figure)} ms)"


def rows(name: str, r: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows (benchmark, figure, ours, baseline, ratio, target) of one result."""
    f = r["figures"]
    out: list[tuple[str, ...]] = []
    if name == "append":
        for w in map(str, r["writers"]):
            for mode in ("store_doorbell", "store", "raw_insert_pool"):
                out.append(
                    (
                        "append",
                        f"{mode}, {w} writers",
                        _rate(f[mode][w]),
                        f"raw INSERT {_rate(f['raw_insert'][w])}",
                        f"{r['ratios'][f'{mode}/raw_insert'][w]:.2f}x",
                        "≥ 0.8" if w in ("8", "32") and mode == "store_doorbell" else "",
                    )
                )
    elif name == "peer":
        for w in map(str, r["writers"]):
            for theirs, target in (
                ("eventsourcing_db_functions", "≥ 2"),
                ("eventsourcing_default", ""),
            ):
                out.append(
                    (
                        "peer",
                        f"store_doorbell, {w} writers",
                        _rate(f["store_doorbell"][w]),
                        f"{theirs} {_rate(f[theirs][w])}",
                        f"{r['ratios'][f'store_doorbell/{theirs}'][w]:.2f}x",
                        target,
                    )
                )
    elif name == "relay":
        relay, raw = f["relay"], f["raw_publish_async"]
        out.append(
            (
                "relay",
                f"drain {r['events']:,} events",
                f"{relay['per_s']:,.0f}/s ({relay['drain_s']:.2f} s)",
                f"publish_async {raw['per_s']:,.0f}/s ({raw['drain_s']:.2f} s)",
                f"{r['ratios']['relay/raw_publish_async']:.2f}x",
                "≥ 0.7",
            )
        )
    elif name == "http":
        for connections, commands in f["commands"].items():
            out.append(
                (
                    "http",
                    f"schedule+cancel, {connections} connections",
                    _rate(commands),
                    f"no-work POST {_rate(f['noop'][connections])}",
                    f"{r['ratios']['commands/noop'][connections]:.2f}x",
                    "",
                )
            )
        out.append(
            (
                "http",
                "best commands rate / best no-work rate",
                "",
                "",
                f"{r['ratios']['best_commands/best_noop']:.2f}x",
                "≥ 0.35",
            )
        )
        for rate, fig in f["offered"].items():
            out.append(("http", f"offered {rate}/s", _rate(fig), "", "", ""))
    elif name == "e2e_lag":
        bg = f["background"]
        load = f"with {bg['per_s']:,.0f} commands/s ({_lat(bg)} ms)"
        for key, target in (
            ("cancelled_gone", "p99 ≤ 20 ms"),
            ("scheduled_visible", ""),
            ("view_lag", ""),
        ):
            out.append(("e2e_lag", key, f"{_lat(f[key])} ms", load, "", target))
    elif name == "growth":
        small, large = (str(s) for s in (r["sizes"][0], r["sizes"][-1]))
        for key in ("append", "upcoming"):
            out.append(
                (
                    "growth",
                    f"{key} at {int(large):,} visits",
                    _rate(f[large][key]),
                    f"at {int(small):,}: {_rate(f[small][key])}",
                    f"p99 {r['ratios'][f'{key}_p99_largest/smallest']:.2f}x",
                    "flat",
                )
            )
    return out


def code_version() -> str:
    """The commit measured, and whether the product's files differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "services", "contracts")
    return f"{commit}{' with uncommitted changes in services/ or contracts/' if dirty else ''}"


def render(results: dict[str, dict[str, Any]], command: str, code: str = "") -> str:
    """The Markdown of RESULTS.md."""
    first = next(iter(results.values()))
    nats = next((r["nats"] for r in results.values() if "nats" in r), "-")
    origins = sorted({part for r in results.values() for part in r["servers"].split(", ")})
    info = machine()
    loads = ", ".join(f"{name} {r['machine']['load_average'][0]}" for name, r in results.items())
    lines = [
        "# Benchmark results",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`" + (f" at commit {code}" if code else ""),
        f"- machine: {info['nproc']} cores, {info['memory_gib']} GiB, Python {info['python']}",
        f"- PostgreSQL {first['postgresql']}; NATS {nats}; servers: {', '.join(origins)}",
        f"- 1-minute load average as each script ended: {loads} (other work shares the machine)",
        "- p50 / p99 in ms; a ratio is ours / the baseline, the median over runs of each"
        " run's back-to-back pair",
        "",
        "| bench | figure | ours (p50 / p99) | baseline (p50 / p99) | ratio | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        lines += ["| " + " | ".join(row) + " |" for row in rows(name, result)]
    lines += ["", "See bench/PROFILE.md for where the time goes. The JSON of each script:", ""]
    for name, result in results.items():
        lines += [f"<details><summary>{name}</summary>", "", "```json"]
        lines += [json.dumps(result, indent=2), "```", "", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help="scripts to run")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()
    code = code_version()
    results = {}
    for name in args.only.split(","):
        print(f"running bench.{name}", file=sys.stderr, flush=True)
        results[name] = run_script(name, TINY[name] if args.tiny else [])
    env = " ".join(
        f"{var}={os.environ[var]}"
        for var in ("CLINIC_DATABASE_URL", "CLINIC_NATS_URL", "CLINIC_NATS_SERVER_BIN")
        if os.environ.get(var)
    )
    command = " ".join(
        filter(None, [env, "python -m bench.run_all", *map(shlex.quote, sys.argv[1:])])
    )
    args.out.write_text(render(results, command, code))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
