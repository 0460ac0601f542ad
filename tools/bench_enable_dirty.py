#!/usr/bin/env python3
"""Cost of enabling dirty logging on a slot fully mapped with 4 KiB pages, against one Python call per entry.

One process, one VM per lock mode: a memslot of --gib GiB (4 KiB backing,
512-entry tables) is mapped completely by `Mmu.page_fault(gfn, write=True)`
over every GFN (1,048,576 faults for 4 GiB, 2,048 leaf tables), so every leaf
is present and writable.  Then, --repeat times:

  enable   `Mmu.enable_dirty_logging(0)`: the flag under the write lock, then
           `wrprot_gfn_range` under the read lock (shared mode; the write lock
           in exclusive mode): the iterator walks to level 2 and every leaf
           table is write-protected by one `Words.clear_where` call (a
           compare-exchange loop in C), then one TLB flush.

and, for comparison, the same write protection done with one Python call per
entry:

  per-entry CAS       per leaf table one `load_range` snapshot, then one
                      `Words.cas(i, old, old & ~W)` per writable leaf;
  per-entry iterator  the kernel's shape written in Python: the TDP iterator
                      visits every leaf (`for_each_leaf`) and
                      `Mmu.set_spte_atomic` clears W on each.

Between measurements logging is disabled (4 KiB backing: nothing is
collapsible) and W is set again on every leaf with one numpy OR over the leaf
tables (what a million write faults would do, without spending a million
faults on it).  Each figure is wall time (`time.perf_counter`) and CPU time of
this process (`time.process_time`, which leaves out the time other processes
held the CPU on a shared machine); the median and the best run are printed.

    .venv/bin/python tools/bench_enable_dirty.py [--gib 4] [--repeat 5] [--mode shared|exclusive|both]
        [--per-entry-repeat 1] [--max-s 0.2]

With --max-s the script exits 1 when a shared-mode enable (median wall time)
costs more than that.
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np

import shmmmu
from shmmmu import spte as S
from shmmmu.layout import MemslotFlags, MemslotSpec, TMeta, TableState, VMConfig
from shmmmu.tdp_iter import for_each_leaf
from shmmmu.mmu import Mmu
from shmmmu.vm import create_vm

_P, _W = S.MMU_PRESENT, S.WRITABLE


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, fn's result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return time.perf_counter() - w0, time.process_time() - c0, r


def leaf_tables(mmu: Mmu) -> np.ndarray:
    tm = mmu.region.array("tmeta")
    return np.flatnonzero((tm[:, TMeta.STATE] == TableState.LIVE) & (tm[:, TMeta.LEVEL] == 1))


def writable_leaves(mmu: Mmu, leaves: np.ndarray) -> int:
    rows = mmu.tables_np[leaves]
    return int(((rows & np.uint64(_P | _W)) == np.uint64(_P | _W)).sum())


def restore_writable(mmu: Mmu, leaves: np.ndarray) -> None:
    """Logging off, and W back on every present leaf (the state a write fault on every page leaves)."""
    mmu.disable_dirty_logging(0)
    rows = mmu.tables_np[leaves]
    rows[(rows & np.uint64(_P)) != 0] |= np.uint64(_W)
    mmu.tables_np[leaves] = rows


def under_mmu_lock(mmu: Mmu, body) -> int:
    """Run body as enable does: the read lock in shared mode (the write lock in the baseline), then the flush."""
    shared = mmu.parallel
    mmu.lock.read_lock() if shared else mmu.lock.write_lock()
    try:
        r = body(shared)
        if mmu.holds_unflushed:
            mmu.kvm_flush_remote_tlbs()
        return r
    finally:
        mmu.lock.read_unlock() if shared else mmu.lock.write_unlock()


def wrprot_per_entry_cas(mmu: Mmu, leaves: np.ndarray) -> int:
    """Write-protect every leaf with one Words.cas call per writable entry (same lock, same flush)."""
    E = mmu.E
    cas, load_range = mmu.tables.cas, mmu.tables.load_range
    snap = np.empty(E, dtype=np.uint64)
    changed = 0
    W, notW = _W, ~_W & ((1 << 64) - 1)

    def body(shared: bool) -> int:
        nonlocal changed
        mmu.rcu.read_lock()
        try:
            for t in leaves.tolist():
                base = t * E
                load_range(base, E, snap)
                for i, old in enumerate(snap.tolist()):
                    if old & W and cas(base + i, old, old & notW) == old:
                        changed += 1
        finally:
            mmu.rcu.read_unlock()
        mmu.mark_unflushed()
        return changed
    mmu.slots.set_flags(0, set_mask=MemslotFlags.LOG_DIRTY)     # as enable does (no lock needed alone)
    return under_mmu_lock(mmu, body)


def wrprot_per_entry_iter(mmu: Mmu, start: int, end: int) -> int:
    """Write-protect with the TDP iterator over every leaf and tdp_mmu_set_spte_atomic / tdp_mmu_set_spte per entry."""
    changed = 0

    def body(shared: bool) -> int:
        nonlocal changed
        mmu.rcu.read_lock()
        try:
            for it in for_each_leaf(mmu.new_iter(mmu.valid_root(), 1, start), end):
                spte = it.old_spte
                if spte & _W:
                    mmu.mark_unflushed()
                    if shared:
                        if mmu.tdp.tdp_mmu_set_spte_atomic(it, spte & ~_W):
                            changed += 1
                    else:
                        mmu.tdp.tdp_mmu_set_spte(it, spte & ~_W, record_dirty_log=False)
                        changed += 1
        finally:
            mmu.rcu.read_unlock()
        return changed
    mmu.slots.set_flags(0, set_mask=MemslotFlags.LOG_DIRTY)
    return under_mmu_lock(mmu, body)


def fmt(runs: list[tuple[float, float]]) -> str:
    wall = [r[0] for r in runs]
    cpu = [r[1] for r in runs]
    return (f"wall median {statistics.median(wall):7.3f} s  best {min(wall):7.3f} s   "
            f"CPU median {statistics.median(cpu):7.3f} s  best {min(cpu):7.3f} s   ({len(runs)} runs)")


def bench_mode(mode: str, gib: float, repeat: int, per_entry_repeat: int) -> dict[str, list[tuple[float, float]]]:
    npages = int(gib * (1 << 18))
    cfg = VMConfig(name=f"bench-enable-{os.getpid()}-{mode}", n_vcpus=1, bits=9, lock_mode=mode,
                   memslots=[MemslotSpec(0, npages, 1)])
    out: dict[str, list[tuple[float, float]]] = {"enable": [], "per-entry CAS": [], "per-entry iterator": []}
    with create_vm(cfg) as vm:
        mmu = Mmu(vm, cfg.host_worker)
        pf = mmu.page_fault

        def populate() -> None:
            for g in range(npages):
                pf(g, True)
        w, c, _ = timed(populate)
        leaves = leaf_tables(mmu)
        mapped = writable_leaves(mmu, leaves)
        print(f"[{mode}] populated {npages} pages ({gib:g} GiB) with {npages} write faults in {w:.1f} s wall "
              f"({c:.1f} s CPU): {leaves.size} leaf tables, {mapped} writable 4K leaves", flush=True)
        if mapped != npages:
            raise RuntimeError(f"expected {npages} writable leaves, found {mapped}")
        variants = [("enable", "enable dirty logging (batch per table): ", repeat,
                     lambda: mmu.enable_dirty_logging(0)),
                    ("per-entry CAS", "per-entry Words.cas:                    ", per_entry_repeat,
                     lambda: wrprot_per_entry_cas(mmu, leaves)),
                    ("per-entry iterator", "per-entry iterator + set_spte_atomic:   ", per_entry_repeat,
                     lambda: wrprot_per_entry_iter(mmu, 0, npages))]
        for key, label, runs, protect in variants:
            for _ in range(runs):
                w, c, n = timed(protect)
                still = writable_leaves(mmu, leaves)
                if n != npages or still != 0:
                    raise RuntimeError(f"{key} protected {n} leaves; {still} still writable")
                out[key].append((w, c))
                restore_writable(mmu, leaves)
            print(f"[{mode}] {label} {fmt(out[key])}", flush=True)
        del pf, mmu
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="slot size in GiB, mapped with 4 KiB pages")
    ap.add_argument("--repeat", type=int, default=5, help="timed enables per mode")
    ap.add_argument("--per-entry-repeat", type=int, default=1, help="timed runs of each per-entry variant")
    ap.add_argument("--mode", choices=["shared", "exclusive", "both"], default="both")
    ap.add_argument("--max-s", type=float, default=None, help="exit 1 if a shared-mode enable takes longer")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.per_entry_repeat < 0 or args.gib <= 0:
        ap.error("--repeat must be at least 1, --per-entry-repeat at least 0, --gib positive")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"shmmmu {shmmmu.__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    modes = ["shared", "exclusive"] if args.mode == "both" else [args.mode]
    results = {m: bench_mode(m, args.gib, args.repeat, args.per_entry_repeat) for m in modes}
    if "shared" in results:
        en = statistics.median(r[0] for r in results["shared"]["enable"])
        for k in ("per-entry CAS", "per-entry iterator"):
            if results["shared"][k]:
                pe = statistics.median(r[0] for r in results["shared"][k])
                print(f"shared mode: {k} / batch enable = {pe / en:.1f}x")
        if args.max_s is not None and en > args.max_s:
            print(f"enabling dirty logging took {en:.3f} s (median), over the limit of {args.max_s} s",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
