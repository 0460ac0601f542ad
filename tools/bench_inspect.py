"""Time `shmmmu inspect` on a VM with 4 GiB mapped in 4 KiB pages (docs/performance.md, docs/perf/history.md).

Starts `shmmmu run --keep -v 2 -b 2G -s 4k -w populate -i 1` (1M faults), waits
until it is kept alive, then times each inspector command N times as a user
runs it (a new process each time, output to /dev/null) and prints min, median
and max wall seconds; `shmmmu --version` gives the start-up floor.  With
--worst it then write-protects every other 4K leaf, so that no two leaves
coalesce and `--tree` prints 1M ranges, and times the tree again.  The VM is
stopped and unlinked at the end, also on Ctrl-C.

    .venv/bin/python tools/bench_inspect.py [--runs 10] [--memory 2G] [--worst]
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shmmmu.spawn import python_module_command, worker_env

ROOT = Path(__file__).resolve().parent.parent
SHMMMU = python_module_command("shmmmu.workers.cli")   # the installed CLI, not the checkout's (cwd=ROOT)


def timed(args: list[str], runs: int) -> tuple[float, float, float]:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(SHMMMU + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=worker_env())
        ts.append(time.perf_counter() - t0)
        if r.returncode not in (0, 1):
            raise SystemExit(f"shmmmu {' '.join(args)} failed: {r.stderr.strip()}")
    return min(ts), statistics.median(ts), max(ts)


def write_protect_every_other_leaf(name: str) -> int:
    import numpy as np
    from shmmmu import inspect as insp
    from shmmmu import spte as S
    from shmmmu.region import Region
    walk = insp.walk_tables(insp.take_snapshot(name))
    l1 = walk.tables[walk.t_level == 1]
    r = Region.attach(name)
    try:
        t = r.array("tables")
        t[l1, ::2] &= ~np.uint64(S.WRITABLE)
        del t
    finally:
        r.close()
    return int(l1.size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--memory", default="2G", help="per vCPU (2 vCPUs)")
    p.add_argument("--worst", action="store_true", help="also time --tree with 1M one-leaf ranges")
    a = p.parse_args()
    name = f"bench-inspect-{os.getpid()}"
    err = tempfile.NamedTemporaryFile(prefix="bench-inspect-", suffix=".err", delete=False)
    t0 = time.monotonic()
    run = subprocess.Popen(SHMMMU + ["run", "--keep", "--name", name, "-v", "2", "-b", a.memory, "-s", "4k",
                                     "-w", "populate", "-i", "1"],
                           stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=worker_env())
    try:
        while "kept alive" not in Path(err.name).read_text():
            if run.poll() is not None:
                raise SystemExit(f"the run ended: {Path(err.name).read_text()}")
            time.sleep(0.1)
        print(f"VM {name}: 2 vCPUs x {a.memory} on 4K pages populated and kept in {time.monotonic() - t0:.1f} s")
        print(f"{'command':<40s} {'min':>6s} {'median':>7s} {'max':>6s}  (s, {a.runs} runs)")
        cases = [("shmmmu --version", ["--version"]),
                 ("shmmmu inspect NAME", ["inspect", name]),
                 ("shmmmu inspect NAME --json", ["inspect", name, "--json"]),
                 ("shmmmu inspect NAME --tree", ["inspect", name, "--tree"]),
                 ("shmmmu inspect NAME --gfn G", ["inspect", name, "--gfn", "0x800012345"]),
                 ("shmmmu inspect NAME --check", ["inspect", name, "--check"])]
        for label, args in cases:
            lo, med, hi = timed(args, a.runs)
            print(f"{label:<40s} {lo:6.2f} {med:7.2f} {hi:6.2f}")
        if a.worst:
            n = write_protect_every_other_leaf(name)
            print(f"(write-protected every other leaf of {n} leaf tables: no two leaves coalesce)")
            for label, args in [("shmmmu inspect NAME --tree (1M ranges)", ["inspect", name, "--tree"]),
                                ("shmmmu inspect NAME (1M ranges)", ["inspect", name])]:
                lo, med, hi = timed(args, a.runs)
                print(f"{label:<40s} {lo:6.2f} {med:7.2f} {hi:6.2f}")
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(30)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        from shmmmu.region import unlink_all
        unlink_all(name)
        os.unlink(err.name)


if __name__ == "__main__":
    main()
