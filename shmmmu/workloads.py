"""Workloads: what each vCPU accesses in each iteration, derived from the seed so a run can be replayed.

A workload is a `layout.Workload` in the VM configuration (its fields say
what each means).  Every written value names the GFN, the vCPU and the
iteration, as the kernel's dirty_log_test does, so a write that lands
elsewhere is caught.
"""
from __future__ import annotations

import numpy as np

from shmmmu.layout import EXEC, READ, WRITE, Workload  # noqa: F401  (the access kinds: importers take them here)

ITER_SHIFT = 40
VCPU_SHIFT = 32
GFN_MASK = (1 << 32) - 1
ITER_MASK = (1 << 23) - 1        # bits 40-62: bit 63 marks a written value
# access_tracking_perf_test's iterations: populate, write, read, (mark idle), write, (mark idle), read
ACCESS_TRACKING_WRITES = (1, 2, 4)
# nx_huge_pages_test's guest_code (tools/testing/selftests/kvm/x86_64/nx_huge_pages_test.c): one access per
# vcpu_run, (huge page, kind): read hpage_1, read hpage_2, call hpage_1, call hpage_3, read hpage_1, read hpage_3
NX_HUGE_PAGES_STEPS = ((0, READ), (1, READ), (0, EXEC), (2, EXEC), (0, READ), (2, READ))
# memslot_perf_test's tests (tools/testing/selftests/kvm/memslot_perf_test.c, 5.13), in its order (-f/-e number
# them); the guest's part of each between two host syncs is `accesses` of kind memslot-perf
MEMSLOT_PERF_TESTS = ("map", "unmap", "unmap chunked", "move active area", "move inactive area", "RW")
MOVE_PAGES = 50                  # MEM_TEST_MOVE_SIZE_PAGES


def make_value(gfn: int, vcpu: int, iteration: int) -> int:
    """The value a vCPU writes: iteration, vCPU and GFN in one word (never 0, never poison)."""
    return ((iteration & ITER_MASK) << ITER_SHIFT) | ((vcpu & 0xFF) << VCPU_SHIFT) | (gfn & GFN_MASK) | (1 << 63)


def value_gfn(value: int) -> int:
    return value & GFN_MASK


def value_iteration(value: int) -> int:
    return (value >> ITER_SHIFT) & ITER_MASK


def value_vcpu(value: int) -> int:
    return (value >> VCPU_SHIFT) & 0xFF


def vcpu_range(workload: Workload, base_gfn: int, vcpu: int) -> tuple[int, int]:
    """(first gfn, pages) a vCPU works on: its own slice, or the whole shared range with overlap."""
    pages = workload.pages
    if workload.overlap:
        return base_gfn, pages * workload.n_vcpus
    return base_gfn + vcpu * pages, pages


def accesses(workload: Workload, base_gfn: int, vcpu: int, iteration: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gfns, kinds) for one vCPU's iteration; kinds are READ, WRITE or EXEC (int8).

    `kinds != READ` is not "is write": test `kinds == WRITE`.
    """
    kind = workload.kind
    start, n = vcpu_range(workload, base_gfn, vcpu)
    every = max(1, workload.write_every)
    if kind in ("populate", "dirty-log"):
        # with overlap every vCPU walks the whole range from its first page, as perf_test_util sets it up
        # for -o (each vCPU's gva is the region's start): they fault the same pages at the same time
        if workload.random_access or workload.write_percent >= 0:
            # memstress (6.2 on): per access, the page drawn at random with -a, and a write with -w's chance
            rng = np.random.default_rng([seed, vcpu, iteration])
            idx = rng.integers(0, n, size=n, dtype=np.int64) if workload.random_access else np.arange(n)
            writes = (rng.random(n) * 100 < workload.write_percent if workload.write_percent >= 0
                      else idx % every == 0)
            return start + idx, writes.astype(np.int8)
        gfns = np.arange(start, start + n, dtype=np.int64)
        writes = (np.arange(n) % every) == 0
        return gfns, writes.astype(np.int8)
    if kind == "nx-huge-pages":
        page, what = NX_HUGE_PAGES_STEPS[(iteration - 1) % len(NX_HUGE_PAGES_STEPS)]
        return np.array([base_gfn + page * 512], dtype=np.int64), np.array([what], dtype=np.int8)
    if kind == "memslot-perf":
        return memslot_perf_accesses(workload, base_gfn, iteration)
    if kind == "access-tracking":
        # every page once per iteration, all written or all read (memstress with write percent 100 or 0)
        gfns = np.arange(start, start + n, dtype=np.int64)
        return gfns, np.full(n, WRITE if iteration in ACCESS_TRACKING_WRITES else READ, dtype=np.int8)
    if kind == "random" and iteration == 1 and workload.populate_first:
        # dirty_log_test's guest writes every page first: each vCPU its share of the range
        share = -(-n // max(1, workload.n_vcpus)) if workload.overlap else n
        lo = min(n, vcpu * share) if workload.overlap else 0
        gfns = np.arange(start + lo, start + min(n, lo + share), dtype=np.int64)
        return gfns, np.full(gfns.size, WRITE, dtype=np.int8)
    rng = np.random.default_rng([seed, vcpu, iteration])
    if kind in ("random", "stress"):
        k = workload.accesses or n
        gfns = start + rng.integers(0, n, size=k, dtype=np.int64)
        kinds = (rng.random(k) < workload.write_fraction).astype(np.int8)
        xf = workload.exec_fraction
        if xf > 0:                   # drawn only when asked for: other workloads replay the same stream
            kinds[rng.random(k) < xf] = EXEC
        if workload.hot_fraction > 0 and workload.hot_pages:
            hot = rng.random(k) < workload.hot_fraction
            gfns[hot] = start + n - workload.hot_pages + rng.integers(0, workload.hot_pages, size=int(hot.sum()))
        return gfns, kinds
    if kind == "trace":
        raise ValueError("a trace is streamed in chunks: trace_chunk(), not accesses()")
    raise ValueError(f"unknown workload kind {kind!r}")


def trace_chunk(workload: Workload, base_gfn: int, vcpu: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(gfns, kinds) of chunk `index` of a vCPU's part of a converted trace (shmmmu.trace.store); empty past its end.

    A threaded trace gives each vCPU its thread's part, all in one shared range
    (the threads shared one address space); otherwise every vCPU replays the one
    part, in its own range or, with overlap, in the shared one.  The file is read
    a chunk at a time: a vCPU's memory does not grow with the trace.
    """
    from shmmmu.trace.store import KIND_BITS, read_chunk
    words = read_chunk(workload.trace_file, vcpu if workload.trace_threads else 0, index)
    start, _ = vcpu_range(workload, base_gfn, vcpu)
    gfns = (words >> np.uint64(KIND_BITS)).astype(np.int64) + start
    return gfns, (words & np.uint64((1 << KIND_BITS) - 1)).astype(np.int8)


def memslot_perf_accesses(workload: Workload, base_gfn: int, iteration: int) -> tuple[np.ndarray, np.ndarray]:
    """memslot_perf_test's guest code between two syncs: map writes one half of the area in turn, unmap one
    page of a half, move writes the 50-page move area (half in the last slot, or all just below it: the
    driver, shmmmu.selftests, sets move_area), RW writes every page, then reads every page."""
    test, n = MEMSLOT_PERF_TESTS[workload.memslot_test], workload.pages
    odd = iteration % 2 == 1
    if test == "map":
        half = n // 2
        gfns = np.arange(base_gfn, base_gfn + half) if odd else np.arange(base_gfn + half, base_gfn + n)
        return gfns.astype(np.int64), np.full(gfns.size, WRITE, dtype=np.int8)
    if test.startswith("unmap"):
        return np.array([base_gfn if odd else base_gfn + n // 2], dtype=np.int64), np.array([WRITE], dtype=np.int8)
    if test.startswith("move"):
        start = base_gfn + workload.move_area
        return np.arange(start, start + MOVE_PAGES, dtype=np.int64), np.full(MOVE_PAGES, WRITE, dtype=np.int8)
    gfns = np.arange(base_gfn, base_gfn + n, dtype=np.int64)                  # RW
    return gfns, np.full(n, WRITE if odd else READ, dtype=np.int8)
