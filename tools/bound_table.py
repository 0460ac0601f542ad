#!/usr/bin/env python3
"""Bounded DFS per scenario: the preemption bound each scenario's fixed code is exhausted at, with executions and time.

For every scenario (under 5.13, and under 6.12 where that profile runs other
code), `--strategy dfs` with iterative bounding runs in this one process (one
core) up to --bound (default 2), capped at --executions and at --minutes per
scenario.  A row says the last bound explored exhaustively (`bound_done`),
the executions it took, the time, executions/s, and whether a finding turned
up (the fixed code must have none).  With --then 3, a scenario exhausted at
bound 2 within --quick minutes is run again at bound 3 under the same caps.

Results are appended one JSON line per run to --out as they finish (a long
run can be stopped and resumed: rows already in the file are skipped), and
the markdown table of the whole file is printed at the end (--table alone
prints it without running anything).

    .venv/bin/python tools/bound_table.py --out bounds.jsonl [--scenario NAME ...] [--bound 2] [--then 3]
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import json
import os
import signal
import sys
from pathlib import Path

from shmmmu.explore import PATHS_612
from shmmmu.explore.report import ExploreOptions, run_explore
from shmmmu.explore.scenarios import SCENARIOS

def plan(names: list[str], kernels: list[str]) -> list[tuple[str, str]]:
    every = [(n, "5.13") for n in sorted(SCENARIOS)] + [(n, "6.12") for n in sorted(PATHS_612)]
    return [p for p in every if (not names or p[0] in names) and (not kernels or p[1] in kernels)]


def run_one(name: str, kernel: str, bound: int, executions: int, minutes: float) -> dict:
    rep = run_explore(ExploreOptions(scenario=name, strategy="dfs", preemptions=bound, executions=executions,
                                     time_limit=minutes * 60, kernel=kernel, shrink=False))
    s = rep.search
    return {"scenario": name, "kernel": kernel, "bound": bound, "bound_done": s.bound_done,
            "exhausted": s.exhausted, "executions": s.executions, "seconds": round(s.seconds, 1),
            "executions_per_s": round(s.per_second, 1), "finding": None if rep.found is None else
            f"{rep.found.finding.kind}: {rep.found.finding.message[:80]}", "capped": s.capped, "loadavg": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    out = ["| scenario | kernel | bound asked | exhausted at bound | executions | time (s) | executions/s | finding |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["scenario"], r["bound"])):
        done = r["bound_done"] if r["bound_done"] >= 0 else "-"
        if r["bound_done"] < r["bound"]:
            done = f"{done} (bound {r['bound']} cut at {r['executions']:,})"
        out.append(f"| {r['scenario']} | {r['kernel']} | {r['bound']} | {done} | {r['executions']:,} | "
                   f"{r['seconds']:.0f} | {r['executions_per_s']:.0f} | {r['finding'] or 'none'} |")
    return "\n".join(out)


def main() -> int:
    # a TERM (timeout, kill) unwinds like Ctrl-C: the explorer's region and semaphores are removed on the way out
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines: read (to resume) and appended to")
    ap.add_argument("--scenario", action="append", default=[])
    ap.add_argument("--kernel", action="append", default=[], choices=["5.13", "6.12"], help="only this profile's rows")
    ap.add_argument("--bound", type=int, default=2)
    ap.add_argument("--then", type=int, default=0, help="a further bound for scenarios exhausted quickly")
    ap.add_argument("--quick", type=float, default=2.0, help="minutes: bound --then only below this")
    ap.add_argument("--executions", type=int, default=1_000_000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    a = ap.parse_args()
    for n in a.scenario:
        if n not in SCENARIOS:
            print(f"bound_table: unknown scenario {n!r}", file=sys.stderr)
            return 2
    out = Path(a.out)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    if not a.table:
        done = {(r["scenario"], r["kernel"], r["bound"]) for r in rows}
        for name, kernel in plan(a.scenario, a.kernel):
            bounds = [a.bound] + ([a.then] if a.then else [])
            for b in bounds:
                if b != a.bound:
                    prev = next(r for r in rows if (r["scenario"], r["kernel"], r["bound"]) == (name, kernel, a.bound))
                    if prev["bound_done"] < a.bound or prev["seconds"] > a.quick * 60:
                        continue
                if (name, kernel, b) in done:
                    continue
                r = run_one(name, kernel, b, a.executions, a.minutes)
                rows.append(r)
                with out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(json.dumps(r), file=sys.stderr, flush=True)
    print(table(rows))
    return 1 if any(r["finding"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
