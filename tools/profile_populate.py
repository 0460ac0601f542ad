#!/usr/bin/env python3
"""Profile populate: where one vCPU's time per page goes, in-process, with the vCPU worker's own loop.

Runs `shmmmu.workers.vcpu.run_iteration` (what a vCPU process runs) in this process
on a fresh VM, for one vCPU:

  populate   iteration 1: every page faults (TLB miss, failed hardware walk,
             exit, Mmu.page_fault, enter, hardware walk, TLB insert, write)
  re-walk    iteration 2 over the same pages: no fault (TLB miss, hardware walk,
             A/D already set, write): the guest side alone
  faults     Mmu.page_fault alone on a second VM, one per page (bench_fault's
             measure, without the breakdown)
  walk       Vcpu._hw_walk alone over the populated pages (the emulated hardware
             walk: 4 entry loads, the TLB insert)

as CPU time per page (time.process_time, best of --repeat), then the same
populate pass under cProfile, top functions by own time.  cProfile's overhead
inflates every call (~3x), so read its table for shares, not for times.

    .venv/bin/python tools/profile_populate.py                 # shared mode, 32768 pages
    .venv/bin/python tools/profile_populate.py --mode exclusive --pages 65536 --top 30
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import uuid

from shmmmu.guest import Vcpu  # noqa: E402
from shmmmu.layout import Role  # noqa: E402
from shmmmu.memslots import Memslots  # noqa: E402
from shmmmu.run import RunOptions  # noqa: E402
from shmmmu.mmu import Mmu  # noqa: E402
from shmmmu.vm import create_vm  # noqa: E402
from shmmmu.workers.vcpu import run_iteration  # noqa: E402


def _vm(mode: str, pages: int):
    opts = RunOptions(name=f"prof-{os.getpid()}-{uuid.uuid4().hex[:10]}", vcpus=1, memory=pages * 4096,
                      backing="4k", lock_mode=mode, workload="populate", iterations=2)
    return create_vm(opts.config())


def passes(mode: str, pages: int) -> tuple[float, float, float, float]:
    """CPU seconds of (populate pass, re-walk pass, page_fault alone, hardware walk alone) over `pages` pages."""
    with _vm(mode, pages) as vm:
        vm.register(0, Role.VCPU)
        v = Vcpu(vm, 0)
        base = Memslots(vm).slots()[0].base_gfn
        t0 = time.process_time()
        run_iteration(vm, v, 0, 1, base)
        t1 = time.process_time()
        run_iteration(vm, v, 0, 2, base)
        t2 = time.process_time()
        walk = v._hw_walk
        v.enter()
        t5 = time.process_time()
        for g in range(base, base + pages):
            walk(g, True)
        t6 = time.process_time()
        v.exit()
    with _vm(mode, pages) as vm:
        mmu = Mmu(vm, vm.config.host_worker)
        base = Memslots(vm).slots()[0].base_gfn
        fault = mmu.page_fault
        t3 = time.process_time()
        for g in range(base, base + pages):
            fault(g, True)
        t4 = time.process_time()
    return t1 - t0, t2 - t1, t4 - t3, t6 - t5


def profile(mode: str, pages: int, top: int) -> str:
    with _vm(mode, pages) as vm:
        vm.register(0, Role.VCPU)
        v = Vcpu(vm, 0)
        base = Memslots(vm).slots()[0].base_gfn
        prof = cProfile.Profile()
        prof.runcall(run_iteration, vm, v, 0, 1, base)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["shared", "exclusive"], default="shared")
    p.add_argument("--pages", type=int, default=32768, help="guest pages (default 32768: 128 MiB)")
    p.add_argument("--repeat", type=int, default=5, help="best of N (default 5)")
    p.add_argument("--top", type=int, default=20, help="cProfile rows (0: no profile)")
    a = p.parse_args(argv)
    best = [min(x) for x in zip(*(passes(a.mode, a.pages) for _ in range(a.repeat)))]
    us = [t / a.pages * 1e6 for t in best]
    print(f"{a.mode} mode, one vCPU, {a.pages} pages of 4 KiB, CPU time per page, best of {a.repeat}:")
    print(f"  populate pass (fault + access)        {us[0]:6.2f} us")
    print(f"  re-walk pass (access, no fault)       {us[1]:6.2f} us")
    print(f"  Mmu.page_fault alone                  {us[2]:6.2f} us")
    print(f"  guest side of a faulting access       {us[0] - us[2]:6.2f} us  (populate - page_fault)")
    print(f"  of which beyond a non-faulting one    {us[0] - us[2] - us[1]:6.2f} us  "
          f"(failed walk, exit/enter, second walk)")
    print(f"  one hardware walk (present, A/D set)  {us[3]:6.2f} us  (a faulting page walks twice)")
    if a.top:
        print()
        print(profile(a.mode, a.pages, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
