#!/usr/bin/env python3
"""Count instructions: the machine-independent cost of the fault path (callgrind), per fault.

A figure in seconds moves with the CPU, its frequency and whoever else runs;
the number of instructions a piece of code executes does not.  This runs a
driver under `valgrind --tool=callgrind` twice, with N1 and N2 operations,
and prints (I(N2) - I(N1)) / (N2 - N1): the cost of one operation with the
start-up (interpreter, imports, VM creation) taken off.

    python tools/count_instructions.py [--what fault|fault-exclusive|explore:SCENARIO] [--n1 8192] [--n2 24576]

`fault`: Mmu.page_fault(gfn, write=True) over consecutive GFNs of a fresh VM
with 512-entry tables and 4 KiB backing (cold tables: every fault maps a new
page, one new leaf table per 512 faults), shared mode; `fault-exclusive` the
same under the write lock; `explore:SCENARIO` one execution of the scenario's DFS at 2 preemptions (the
first n executions of the search, after the 16 that seed its points).  OPENBLAS_NUM_THREADS=1, as the
workers run.
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import os
import re
import subprocess
import sys
import tempfile

DRIVER = r"""
import os, sys
if sys.argv[1].startswith("explore:"):         # one scenario's DFS at bound 2: n executions
    from shmmmu.explore.explorer import Explorer, make_strategy, search, seed_points
    from shmmmu.explore.scenarios import SCENARIOS
    with Explorer(SCENARIOS[sys.argv[1].split(":", 1)[1]], []) as ex:
        seed_points(ex)
        r = search(ex, make_strategy("dfs", 1, preemptions=2, points=ex.points), max_executions=int(sys.argv[2]))
        assert r.executions == int(sys.argv[2]), ("the search ended early", r.executions)
    sys.exit(0)
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.mmu import Mmu
from shmmmu.vm import create_vm
what, n = sys.argv[1], int(sys.argv[2])
mode = "exclusive" if what == "fault-exclusive" else "shared"
cfg = VMConfig(name=f"countins-{os.getpid()}", n_vcpus=1, bits=9, memslots=[MemslotSpec(0, n, 1)], lock_mode=mode)
with create_vm(cfg, worker=0) as vm:
    mmu = Mmu(vm, 0)
    pf = mmu.page_fault
    for gfn in range(n):
        pf(gfn, True)
"""


def instructions(what: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                            sys.executable, "-P", "-c", DRIVER, what, str(n)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(f"count_instructions: the driver failed under valgrind: {p.stderr.strip().splitlines()[-1:]}")
        with open(out) as f:
            m = re.search(r"^summary:\s+(\d+)", f.read(), re.M)
        if m is None:
            sys.exit("count_instructions: no summary line in callgrind's output")
        return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="fault", help="fault, fault-exclusive or explore:SCENARIO")
    ap.add_argument("--n1", type=int, default=8192)
    ap.add_argument("--n2", type=int, default=24576)
    a = ap.parse_args()
    if not 0 < a.n1 < a.n2:
        ap.error("need 0 < --n1 < --n2")
    if a.what not in ("fault", "fault-exclusive") and not a.what.startswith("explore:"):
        ap.error(f"--what: unknown {a.what!r}")
    i1, i2 = instructions(a.what, a.n1), instructions(a.what, a.n2)
    print(f"{a.what}: {(i2 - i1) / (a.n2 - a.n1):,.0f} instructions per operation "
          f"(callgrind: {i1:,} at {a.n1}, {i2:,} at {a.n2})")


if __name__ == "__main__":
    main()
