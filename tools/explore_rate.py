#!/usr/bin/env python3
"""Explorer executions per CPU second per scenario: PCT from seed 1, the same executions on any machine.

Each scenario's search runs N executions (after the points' seeding) in this
process, and the rate is N over the process's CPU time (time.process_time), a
figure that moves much less with the machine's other load than wall time
does.  Run it with two checkouts' Pythons (each its own venv) to compare
them side by side; --json appends one line per scenario to a file, and
--compare A B prints the table of two such files with their ratio.

    .venv/bin/python tools/explore_rate.py [-n 1000] [--scenario NAME ...] [--json FILE]
    .venv/bin/python tools/explore_rate.py --compare before.jsonl after.jsonl
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import json
import os
import subprocess
import sys
import time


def measure(names: list[str], n: int, out: str) -> int:
    from shmmmu.explore.explorer import Explorer, make_strategy, search, seed_points
    from shmmmu.explore.scenarios import SCENARIOS
    for name in names or sorted(SCENARIOS):
        if name not in SCENARIOS:
            print(f"explore_rate: unknown scenario {name!r}", file=sys.stderr)
            return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    for name in names or sorted(SCENARIOS):
        sc = SCENARIOS[name]
        with Explorer(sc, []) as ex:
            seed_points(ex)
            t0 = time.process_time()
            r = search(ex, make_strategy("pct", 1, depth=sc.depth, points=ex.points), max_executions=n)
            cpu = time.process_time() - t0
        row = {"scenario": name, "executions": r.executions, "steps": r.steps, "cpu_s": round(cpu, 2),
               "per_cpu_s": round(r.executions / cpu, 1) if cpu else 0.0, "commit": commit,
               "loadavg": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def compare(a: str, b: str) -> int:
    rows = [{r["scenario"]: r for r in map(json.loads, open(p).read().split("\n")[:-1])} for p in (a, b)]
    ca = next(iter(rows[0].values()))["commit"]
    cb = next(iter(rows[1].values()))["commit"]
    print(f"| scenario | executions | {ca}: executions/CPU s | {cb}: executions/CPU s | ratio |")
    print("|---|---|---|---|---|")
    ratios = []
    for name in sorted(set(rows[0]) & set(rows[1])):
        x, y = rows[0][name], rows[1][name]
        ratio = y["per_cpu_s"] / x["per_cpu_s"] if x["per_cpu_s"] else 0.0
        ratios.append(ratio)
        print(f"| {name} | {y['executions']:,} | {x['per_cpu_s']:.0f} | {y['per_cpu_s']:.0f} | {ratio:.2f}x |")
    if ratios:
        ratios.sort()
        print(f"\nmedian ratio {ratios[len(ratios) // 2]:.2f}x over {len(ratios)} scenarios "
              f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="executions per scenario")
    ap.add_argument("--scenario", action="append", default=[])
    ap.add_argument("--json", default="", help="append one JSON line per scenario here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    return measure(a.scenario, a.n, a.json)


if __name__ == "__main__":
    sys.exit(main())
