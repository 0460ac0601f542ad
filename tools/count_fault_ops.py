#!/usr/bin/env python3
"""Python bytecodes executed per page fault, by function: a cost measure that does not move with the machine's load.

On a shared machine a timing moves by 10-30% from one run to the next; the
number of bytecodes the interpreter executes for the same faults does not
move at all.  This counts them with sys.settrace's opcode events over N cold
faults (one vCPU, 4 KiB backing, 512-entry tables, as tools/bench_fault.py),
after N warm-up faults elsewhere in the slot, and prints the total per fault
and the functions it is spent in.  C calls (the atomics, numpy) count as the
one bytecode that calls them.

    .venv/bin/python tools/count_fault_ops.py [--faults 2048] [--mode shared|exclusive] [--root CHECKOUT]

--root runs another checkout's shmmmu (built in place), so an old commit and
the new one can be counted side by side; both the package layout before the
MMU was split (shmmmu.tdp_mmu) and after it (shmmmu.mmu) are understood.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys


def count(n: int, mode: str) -> tuple[float, list[tuple[str, float]]]:
    from shmmmu.layout import MemslotSpec, VMConfig
    from shmmmu.vm import create_vm
    try:
        from shmmmu.mmu import Mmu
    except ImportError:                       # a checkout from before the split
        from shmmmu.tdp_mmu import Mmu        # type: ignore[no-redef]
    counts: collections.Counter = collections.Counter()

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
        return tracer

    cfg = VMConfig(name=f"countops-{os.getpid()}", n_vcpus=1, bits=9, memslots=[MemslotSpec(0, 4 * n, 1)],
                   lock_mode=mode)
    with create_vm(cfg, worker=0) as vm:
        mmu = Mmu(vm, 0)
        pf = mmu.page_fault
        for g in range(2 * n, 3 * n):          # warm-up: the same code, other tables
            pf(g, True)
        sys.settrace(tracer)
        try:
            for g in range(n):
                pf(g, True)
        finally:
            sys.settrace(None)
        del pf, mmu
    total = sum(counts.values()) / n
    return total, [(k, v / n) for k, v in counts.most_common()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=2048)
    ap.add_argument("--mode", choices=["shared", "exclusive"], default="shared")
    ap.add_argument("--root", default=None, help="a checkout whose shmmmu to count (default: this one)")
    ap.add_argument("--top", type=int, default=15, help="functions listed")
    args = ap.parse_args(argv)
    if args.faults < 512:
        ap.error("--faults must be at least 512")
    if args.root:
        sys.path.insert(0, os.path.abspath(args.root))      # that checkout's shmmmu, built in place
    else:
        import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
    total, per = count(args.faults, args.mode)
    print(f"{args.mode}: {total:.1f} bytecodes per fault ({args.faults} cold faults)")
    for name, v in per[:args.top]:
        print(f"  {v:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
