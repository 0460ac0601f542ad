#!/usr/bin/env python3
"""Time to detect every bug switch: `shmmmu stress` (median over seeds) next to `shmmmu explore` (default seed).

For each switch, stress runs as the test matrix runs it (3 vCPUs, --duration D,
the switch's stress_args) once per seed, and its time to detect is when a
checker first fired (the violation's timestamp), or the end of the run for a
problem only the end checks see; "> D" where a seed did not detect it.
explore runs `--bug NAME` alone from the default seed, and its time is the
search's (shrinking and the traced replay are reported apart).  Prints a
markdown table and, with --json, the raw figures.

    .venv/bin/python tools/detect_times.py [--seeds 5] [--duration 6] [--bug NAME ...] [--json FILE]
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import json
import statistics
import subprocess
import sys
import time

from shmmmu.variants import BUGS
from shmmmu.spawn import python_module_command, worker_env
from shmmmu.explore.report import ExploreOptions, run_explore


def stress_time(bug: str, seed: int, duration: float) -> float | None:
    cmd = [*python_module_command("shmmmu.workers.cli"), "stress", "--json", "--duration", str(duration),
           "--vcpus", "3", "--seed", str(seed), "--bug", bug, "--kernel", BUGS[bug].profiles[0],
           *BUGS[bug].stress_args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 10 + 120, env=worker_env())
    if p.returncode not in (0, 1):
        raise RuntimeError(f"stress failed to run: {p.stderr[-500:]}")
    try:
        r = json.loads(p.stdout)
    except ValueError:
        # exit 1 with one line and no report: the run could not finish (a worker died, a flush never
        # completed): detected, at the end of the run at the latest
        print(f"  {bug} seed {seed}: {p.stderr.strip()[-200:]}", file=sys.stderr)
        return duration
    return r["first_violation_s"] if r["result"] == "FAILURE" else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--bug", action="append", default=[])
    ap.add_argument("--json", default=None, help="write the raw figures here")
    args = ap.parse_args(argv)
    bugs = args.bug or list(BUGS)
    rows = []
    print("| switch | stress: seconds to detect (median of seeds) | stress: detected | explore: seconds | "
          "executions | preemptions | steps | shrink executions |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for bug in bugs:
        times = [stress_time(bug, s, args.duration) for s in range(1, args.seeds + 1)]
        found = [t for t in times if t is not None]
        med = statistics.median([t if t is not None else float("inf") for t in times])
        t0 = time.monotonic()
        rep = run_explore(ExploreOptions(bugs=[bug], time_limit=60))
        total = time.monotonic() - t0
        f = rep.found
        row = {"bug": bug, "ref": BUGS[bug].ref, "stress_times": times, "stress_median": med,
               "explore_seconds": rep.search.seconds if f else None, "explore_total_seconds": total,
               "executions": rep.search.first_index + 1 if f else rep.search.executions,
               "preemptions": f.preemptions if f else None, "steps": f.steps if f else None,
               "shrink_runs": rep.shrink_runs, "finding": str(f.finding) if f else None}
        rows.append(row)
        name = f"{bug} ({BUGS[bug].ref})" if BUGS[bug].ref else bug
        smed = f"{med:.2f}" if med != float("inf") else f"> {args.duration:g}"
        print(f"| {name} | {smed} | {len(found)}/{len(times)} | "
              + (f"{rep.search.seconds:.2f} | {row['executions']} | {f.preemptions} | {f.steps} | {rep.shrink_runs} |"
                 if f else f"not found in {rep.search.executions} | | | | |"), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
