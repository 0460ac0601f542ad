#!/usr/bin/env python3
"""Sweep: `shmmmu bench dirty-log` over vCPU counts, lock modes, partitioned vs overlapping memory, and memory sizes, as CSV.

Two sweeps, each row one run (one VM) of the bench's phases:

  vcpus   for each vCPU count (default 1, 2, 4, 8), partitioned and overlapping
          (-o), both lock modes alternating (shared, exclusive, shared, ...),
          --repeat runs each, -b bytes per vCPU (default 64M);
  memory  one vCPU, guest memory 1, 2, 4, 8 GiB (times --scale for a quick run),
          --memory-modes (default shared), --repeat runs each: populate time
          should double with the memory.

    .venv/bin/python tools/sweep.py -o sweep.csv                 # both sweeps (~30 min on 2 cores)
    .venv/bin/python tools/sweep.py --only vcpus --vcpus 1,2 --repeat 1 -b 16M -o quick.csv
    .venv/bin/python tools/sweep.py --only memory --scale 0.125 -o mem.csv
    .venv/bin/python tools/plot.py sweep.csv -o docs/perf        # the PNGs

Progress goes to stderr; the CSV is written row by row (a stopped sweep keeps
what it measured).  Every VM is removed, also on Ctrl-C.
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import csv
import os
import sys
import time
from pathlib import Path

from shmmmu.bench import SUMMARY_PHASES, BenchOptions, BenchRun, run_bench  # noqa: E402
from shmmmu.workers.supervisor import Supervisor  # noqa: E402
from shmmmu.run import UsageError, parse_size  # noqa: E402

RATES = ["faults", "faults_per_s", "retries_per_fault", "lock_wait_share", "cpus_used", "cpu_us_per_fault",
         "runq_share", "tlb_flushes"]
FIELDS = ["sweep", "lock_mode", "vcpus", "overlap", "backing", "bytes_per_vcpu", "total_bytes", "run",
          *(f"{k}_s" for k in SUMMARY_PHASES), *RATES, "result", "load_avg"]


def row(sweep: str, opts: BenchOptions, run: BenchRun) -> dict[str, object]:
    r = {"sweep": sweep, "lock_mode": run.mode, "vcpus": opts.vcpus, "overlap": int(opts.overlap),
         "backing": opts.backing, "bytes_per_vcpu": opts.bytes_per_vcpu,
         "total_bytes": opts.bytes_per_vcpu * opts.vcpus, "run": run.index}
    for k in SUMMARY_PHASES:
        r[f"{k}_s"] = f"{run.ns(k) / 1e9:.9f}"
    for k in RATES:
        r[k] = f"{run.rates[k]:.6g}"
    r["result"] = "SUCCESS" if run.ok else "FAILURE"
    r["load_avg"] = f"{os.getloadavg()[0]:.2f}"
    return r


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="sweep.csv", help="CSV file (default sweep.csv)")
    p.add_argument("--append", action="store_true", help="add rows to an existing CSV")
    p.add_argument("--only", choices=["vcpus", "memory"], help="run one sweep only")
    p.add_argument("--vcpus", type=ints, default=[1, 2, 4, 8], help="vCPU counts (default 1,2,4,8; 16 optional)")
    p.add_argument("-b", "--bytes", default="64M", help="bytes per vCPU in the vCPU sweep (default 64M)")
    p.add_argument("--overlap", choices=["both", "no", "yes"], default="both",
                   help="vCPU sweep: partitioned (no), overlapping (yes) or both (default)")
    p.add_argument("--memory", default="1G,2G,4G,8G", help="memory sizes of the one-vCPU sweep")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the memory sizes (e.g. 0.125 for a quick run)")
    p.add_argument("--memory-modes", default="shared", choices=["shared", "exclusive", "both"],
                   help="lock modes of the memory sweep (default shared: one vCPU never contends)")
    p.add_argument("-s", "--backing", default="anonymous", help="backing source (default anonymous: 4K)")
    p.add_argument("-i", "--iterations", type=int, default=2, help="dirty-memory iterations (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per point and mode (default 3)")
    a = p.parse_args(argv)

    plans: list[tuple[str, BenchOptions]] = []
    try:
        if a.only in (None, "vcpus"):
            for overlap in {"both": [False, True], "no": [False], "yes": [True]}[a.overlap]:
                for v in a.vcpus:
                    plans.append(("vcpus", BenchOptions(vcpus=v, bytes_per_vcpu=parse_size(a.bytes),
                                                        iterations=a.iterations, backing=a.backing, overlap=overlap,
                                                        lock_mode="both", repeat=a.repeat)))
        if a.only in (None, "memory"):
            for size in a.memory.split(","):
                b = int(parse_size(size) * a.scale) // 4096 * 4096
                plans.append(("memory", BenchOptions(vcpus=1, bytes_per_vcpu=b, iterations=a.iterations,
                                                     backing=a.backing, lock_mode=a.memory_modes,
                                                     repeat=a.repeat)))
        for _, o in plans:
            o.validate()
    except UsageError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2

    out = Path(a.output)
    new = not (a.append and out.exists())
    t_all = time.monotonic()
    with open(out, "a" if not new else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for n, (sweep, o) in enumerate(plans, 1):
            what = (f"{sweep}: {o.vcpus} vCPUs x {o.bytes_per_vcpu >> 20} MiB"
                    f"{' overlapping' if o.overlap else ''}, {o.lock_mode}, {o.repeat} runs")
            print(f"[{n}/{len(plans)}] {what}", file=sys.stderr, flush=True)

            def on_run(run: BenchRun, sweep: str = sweep, o: BenchOptions = o) -> None:
                w.writerow(row(sweep, o, run))
                f.flush()
                print(f"    {run.mode:<9} run {run.index}: populate {run.ns('populate') / 1e9:7.3f}s  "
                      f"{run.rates['faults_per_s']:9.0f} faults/s  lock wait {run.rates['lock_wait_share']:6.1%}"
                      f"  {'ok' if run.ok else 'FAILURE'}", file=sys.stderr, flush=True)

            try:
                run_bench(o, Supervisor, on_run=on_run)
            except KeyboardInterrupt:
                print("sweep: interrupted; the rows so far are in " + str(out), file=sys.stderr)
                return 130
    print(f"sweep: {len(plans)} points in {time.monotonic() - t_all:.0f}s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
