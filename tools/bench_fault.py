#!/usr/bin/env python3
"""Per-fault cost of the TDP MMU fault path (one vCPU, 4 KiB backing, cold tables), and what it is made of.

The total is N calls of `Mmu.page_fault(gfn, write=True)` over N consecutive
GFNs of a fresh VM (every fault maps a new page; one new leaf table per 512
faults), divided by N.  The breakdown times each piece of the path on its own,
in a loop of the same shape (`for gfn in range(N): <piece>`, the pieces bound
to locals as the fault path binds them), with the cost of the empty loop taken
off.  It is measured piece by piece, not by a profiler, so the pieces carry
no tracing overhead; what the pieces do not explain (the fault path's own
calls, arguments, branches and counters) is reported as "the rest".  Every
figure is the best of --repeat runs, each on a fresh VM, in CPU time of
this process (time.process_time), so that on a shared machine the time other
processes hold the CPU is not counted; the least disturbed run (caches,
frequency) is the one closest to the path's own cost.

    .venv/bin/python tools/bench_fault.py [--faults 65536] [--repeat 5] [--mode shared|exclusive|both]
        [--max-us 3.0]

Then, in shared mode, the same first-touch writes through a vCPU (Vcpu.run_batch: the C
processor, and its Python reference): what they cost beyond the fault is the
processor's side (the walk that finds nothing, leaving and re-entering guest
mode, the walk again, the TLB fill, the data write, the counters).

With --max-us the script exits 1 when a shared-mode fault costs more than that.
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import os
import platform
import sys
import time
from typing import Callable

import numpy as np

import shmmmu
from shmmmu import spte as S
from shmmmu.layout import STAT, Ctl, MemslotSpec, VMConfig
from shmmmu.mmu import Fault, Mmu
from shmmmu.vm import VM, create_vm

ROWS = [
    ("walk", "iterator: start at the root, 3 step-downs, 4 entry reads, the map loop's tests"),
    ("CAS", "compare-exchange of the leaf (exclusive: plain store)"),
    ("entry change", "make_spte (the leaf's bits OR its page) + handle_changed_spte (accounting, dirty-log test)"),
    ("allocation", "pool topup per fault + one table alloc and its accounting per 512 faults"),
    ("lock", "mmu_lock read_lock + read_unlock (exclusive: write lock + lockdep check)"),
    ("RCU", "rcu_read_lock + rcu_read_unlock"),
    ("memslot + notifier", "the Fault record, cache top-up test, notifier seq, slot lookup, gfn->pfn, levels, "
                           "recheck"),
]


def new_vm(n: int, mode: str) -> VM:
    cfg = VMConfig(name=f"benchpf-{os.getpid()}-{mode}", n_vcpus=1, bits=9,
                   memslots=[MemslotSpec(0, n, 1)], lock_mode=mode)
    return create_vm(cfg, worker=0)


def timed(fn: Callable[[], None]) -> float:
    """CPU seconds this process spent in fn (time it was preempted by other processes does not count)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure_once(n: int, mode: str) -> dict[str, float]:
    """One run on fresh VMs: seconds for the total and for each piece, over n faults."""
    out: dict[str, float] = {}
    gfns = range(n)

    def empty() -> None:
        for g in gfns:
            pass
    out["empty"] = timed(empty)

    # ---- the whole fault on cold tables
    with new_vm(n, mode) as vm:
        mmu = Mmu(vm, 0)
        pf = mmu.page_fault

        def total() -> None:
            for g in gfns:
                pf(g, True)
        out["total"] = timed(total)
        if mmu.st[STAT["fixed"]] != n:
            raise RuntimeError(f"expected {n} fixed faults, got {mmu.st[STAT['fixed']]}")

        # ---- walk: the tree now exists, so the map loop only walks down to the leaf entry
        it = mmu.fault.fault_walk
        start, root = it.start, mmu.root
        P, L = S.MMU_PRESENT, S.LARGE

        def walk() -> None:
            for g in gfns:
                it = start(root, 1, g)
                while it.valid and it.gfn <= g:        # the shape of kvm_tdp_mmu_map's loop
                    if it.level == 1:
                        break
                    spte = it.old_spte
                    if spte & P and not spte & L:
                        it.next()
                        continue
                    raise AssertionError("the tree was built: every entry above the leaf is a table")
        out["walk"] = timed(walk)

        # ---- entry change: make_spte + handle_changed_spte, over entries that really change
        handle = mmu.tdp.handle_changed_spte
        template, shift = mmu.map.leaf_template[1], S.PFN_SHIFT
        shared = mode == "shared"

        def change() -> None:
            for g in gfns:
                new = template | (g << shift)           # make_spte, as tdp_mmu_map_handle_target_level does
                handle(g, 0, new, 1, shared)
        out["entry change"] = timed(change)

        # ---- memslot + notifier
        faultin, recheck = mmu.fault.kvm_faultin_pfn, mmu.fault.mmu_notifier_retry_hva

        def memslot() -> None:
            for g in gfns:
                f = Fault(g, True, False)
                faultin(f)                              # caches topped up, mmu_seq, slot, pfn, levels
                recheck(f)
        out["memslot + notifier"] = timed(memslot)

        # ---- lock and RCU
        lock, rcu = mmu.lock, mmu.rcu
        if shared:
            lk, ulk = lock.read_lock, lock.read_unlock

            def locking() -> None:
                for g in gfns:
                    lk()
                    ulk()
        else:
            lk, ulk, avail = lock.write_lock, lock.write_unlock, mmu.fault.make_mmu_pages_available

            def locking() -> None:
                for g in gfns:
                    lk()
                    avail()
                    ulk()
        out["lock"] = timed(locking)
        rl, rul = rcu.read_lock, rcu.read_unlock

        def rcu_section() -> None:
            for g in gfns:
                rl()
                rul()
        out["RCU"] = timed(rcu_section)
        del it, start, pf, handle, template, faultin, recheck, lk, ulk, rl, rul
        del mmu, lock, rcu

    # ---- CAS and allocation on a fresh VM (zeroed tables, a full pool)
    with new_vm(n, mode) as vm:
        mmu = Mmu(vm, 0)
        tables = mmu.tables
        E = mmu.E
        base = E                                   # table 1 onwards: zeroed, unused
        if shared:
            cas = tables.cas

            def cas_loop() -> None:
                for g in gfns:
                    cas(base + g, 0, 0)
        else:
            store = tables.store

            def cas_loop() -> None:
                for g in gfns:
                    store(base + g, 0)
        out["CAS"] = timed(cas_loop)
        pool = mmu.pool
        topup, alloc, account = pool.topup, pool.alloc, mmu.ctl.fetch_add
        lk = mmu.lock.read_lock if shared else mmu.lock.write_lock
        ulk = mmu.lock.read_unlock if shared else mmu.lock.write_unlock

        def allocation() -> None:
            for g in gfns:
                topup()
                if not g & 511:
                    alloc(1, g)
                    account(Ctl.PAGE_COUNT, 1)      # tdp_account_mmu_page (the link's CAS is the CAS row)
        lk()
        try:
            out["allocation"] = timed(allocation)
        finally:
            ulk()
        del cas_loop, topup, alloc, account, lk, ulk, pool, tables, mmu
    return out


def guest_populate(n: int, mode: str, processor: str) -> float:
    """CPU seconds for n first-touch guest writes through a Vcpu (each one an EPT violation, the fault, the
    walk again, the TLB fill and the data write), as workers/vcpu.py runs them: chunks of 256 through
    Vcpu.run_batch with the C processor or its Python reference (per-access Vcpu.write where the tree has
    no run_batch, as its vcpu.py did)."""
    from shmmmu.guest import Vcpu
    from shmmmu.workloads import make_value
    cfg = VMConfig(name=f"benchpv-{os.getpid()}-{mode}", n_vcpus=1, bits=9, memslots=[MemslotSpec(0, n, 1)],
                   lock_mode=mode)
    with create_vm(cfg) as vm:
        vm.register(0, 1)
        batched = hasattr(Vcpu, "run_batch_reference")
        v = Vcpu(vm, 0, processor=processor) if batched else Vcpu(vm, 0)
        try:
            gfns = np.arange(n, dtype=np.int64)
            v.enter()
            if batched:
                v.load_batch(gfns, np.ones(n, dtype=np.int8))
                vbase, run_batch = make_value(0, 0, 1), v.run_batch

                def accesses() -> None:
                    for k in range(0, n, 256):
                        run_batch(k, min(n, k + 256), vbase)
            else:
                write = v.write

                def accesses() -> None:
                    for g in range(n):
                        write(g, make_value(g, 0, 1))
            dt = timed(accesses)
            v.exit()
            if v.mmu.st[STAT["fixed"]] != n:
                raise RuntimeError(f"expected {n} fixed faults, got {v.mmu.st[STAT['fixed']]}")
            return dt
        finally:
            v.release() if hasattr(v, "release") else v.tables_mv.release()
            del v


def bare_walk_floor(n: int) -> float:
    """The floor: a straight-line 4-level walk (4 loads, index arithmetic) and one CAS per fault, no calls."""
    with new_vm(n, "shared") as vm:
        mmu = Mmu(vm, 0)
        for g in range(n):
            mmu.page_fault(g, True)
        tables = mmu.tables
        load, cas = tables.load, tables.cas
        P, PFN, SH = S.MMU_PRESENT, S.PFN_MASK, S.PFN_SHIFT

        def floor() -> None:
            for g in range(n):
                t = 0
                e = load((g >> 27) & 511)
                t = (e & PFN) >> SH
                e = load(t * 512 + ((g >> 18) & 511))
                t = (e & PFN) >> SH
                e = load(t * 512 + ((g >> 9) & 511))
                t = (e & PFN) >> SH
                p = t * 512 + (g & 511)
                e = load(p)
                if e & P:
                    cas(p, e, e)

        def empty() -> None:
            for g in range(n):
                pass
        r = timed(floor) - timed(empty)
        del load, cas, tables, mmu
    return r


def run(n: int, repeat: int, mode: str) -> dict[str, float]:
    """Seconds per fault of the total and of each piece: the best of `repeat` runs (the least disturbed)."""
    runs = [measure_once(n, mode) for _ in range(repeat)]
    empty = min(r["empty"] for r in runs)
    return {k: (min(r[k] for r in runs) - empty) / n for k in runs[0] if k != "empty"}


def table(mode: str, res: dict[str, float]) -> str:
    total = res["total"]
    lines = [f"| {mode} mode | µs per fault | share | what |", "|---|---:|---:|---|"]
    parts = 0.0
    for name, what in ROWS:
        v = res[name]
        parts += v
        lines.append(f"| {name} | {v * 1e6:.2f} | {v / total:.0%} | {what} |")
    rest = total - parts
    lines.append(f"| the rest | {rest * 1e6:.2f} | {rest / total:.0%} | the fault path's own calls, arguments, "
                 f"branches, counters and timestamps |")
    lines.append(f"| **total** | **{total * 1e6:.2f}** | 100% | `Mmu.page_fault(gfn, write=True)`, cold tables |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=1 << 16, help="faults per timed run (GFNs of the VM)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs, each on a fresh VM; the best is reported")
    ap.add_argument("--mode", choices=["shared", "exclusive", "both"], default="both")
    ap.add_argument("--max-us", type=float, default=None, help="exit 1 if a shared-mode fault costs more")
    args = ap.parse_args(argv)
    if args.faults < 512 or args.repeat < 1:
        ap.error("--faults must be at least 512 and --repeat at least 1")
    modes = ["shared", "exclusive"] if args.mode == "both" else [args.mode]
    print(f"shmmmu {shmmmu.__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"{args.faults} faults per run (one vCPU, 4 KiB backing, 512-entry tables, cold tables), "
          f"best of {args.repeat} runs, empty-loop cost subtracted\n")
    results = {}
    for mode in modes:
        results[mode] = run(args.faults, args.repeat, mode)
        print(table(mode, results[mode]))
        print()
    if "shared" in results:
        # the processor's side of a fault: a populate access through the vCPU less the fault itself
        fault = results["shared"]["total"]
        print("| shared mode, populate access through the vCPU | µs per access | the processor's side |")
        print("|---|---:|---:|")
        for proc in ("c", "python"):
            a = min(guest_populate(args.faults, "shared", proc) for _ in range(args.repeat)) / args.faults
            print(f"| {'C loop' if proc == 'c' else 'Python reference'} (fault included) | {a * 1e6:.2f} | "
                  f"{(a - fault) * 1e6:.2f} |")
        print()
    floor = min(bare_walk_floor(args.faults) for _ in range(args.repeat)) / args.faults
    print(f"floor: a straight-line 4-level walk with one CAS, no calls: {floor * 1e6:.2f} µs per fault")
    if len(results) == 2:
        print(f"exclusive / shared: {results['exclusive']['total'] / results['shared']['total']:.2f}")
    if args.max_us is not None and "shared" in results and results["shared"]["total"] * 1e6 > args.max_us:
        print(f"\na shared-mode fault costs {results['shared']['total'] * 1e6:.2f} µs, over the limit of "
              f"{args.max_us:.2f} µs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
