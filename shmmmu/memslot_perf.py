"""Memslot perf: memslot_perf_test as `shmmmu bench memslot-perf`, memslots mapped, unmapped and moved under a running vCPU.

tools/testing/selftests/kvm/memslot_perf_test.c as in Linux 5.13: six tests
(map, unmap, unmap chunked, move active area, move inactive area, RW), each a
VM of its own whose test area is spread over the memslots, one vCPU running the
guest's part between host syncs (shmmmu.workloads, kind memslot-perf) while the
host unmaps (MADV_DONTNEED: the MMU notifier's unmap, then zero pages), moves
the last memslot away and back (KVM_MR_MOVE) or reads the values back.  The
selftest's checks are made as it makes them, with the run's own checks on top
(shmmmu.selftests.SelftestResult).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu.bench import fmt_ts, new_bench_name
from shmmmu.launch import Launcher, LauncherFactory
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.run import PhaseLog, RunOptions, UsageError, run_vm
from shmmmu.selftests import HANG_S, SelftestResult
from shmmmu.validate import count

# the selftest's areas in pages (MEM_TEST_MAP_SIZE, MEM_TEST_UNMAP_SIZE, MEM_TEST_SIZE; the sync page left
# out), divided by --scale; MEM_TEST_UNMAP_CHUNK_PAGES stays 2 MiB
PERF_PAGES = {"map": 8192, "unmap": 32768, "unmap chunked": 32768, "move active area": 131072,
              "move inactive area": 131072, "RW": 131072}
UNMAP_CHUNK = 512


@dataclass
class MemslotPerfOptions:
    slots: int = 9                   # -s: the memslot count cap (slot 0, the guest code's, counts: 8 test slots)
    first: int = 0                   # -f
    last: int = 5                    # -e
    seconds: int = 5                 # -l
    iterations: int = 0              # -i: a count of iterations instead of -l's seconds (0: -l decides)
    runs: int = 1                    # -r
    verify: bool = False             # -d: map_unmap_verify
    scale: int = 16                  # the areas divided by this (the selftest's 512 MiB is slow here)
    lock_mode: str = "shared"
    bugs: list[str] = field(default_factory=list)
    gup_delay_us: int = 0            # shmmmu's own: pauses in the fault's prologue (VMConfig.gup_delay_us)

    def validate(self) -> None:
        from shmmmu.layout import MAX_MEMSLOTS
        from shmmmu.workloads import MEMSLOT_PERF_TESTS
        if not 2 <= self.slots <= MAX_MEMSLOTS + 1:
            raise UsageError(f"-s must be 2 to {MAX_MEMSLOTS + 1}: slot 0 and at most {MAX_MEMSLOTS} test "
                             "memslots (the emulator's memslot table)")
        if not 0 <= self.first <= self.last < len(MEMSLOT_PERF_TESTS):
            raise UsageError(f"-f and -e must name tests 0 to {len(MEMSLOT_PERF_TESTS) - 1}, -f not after -e")
        if self.seconds < 0 or self.iterations < 0 or self.runs < 1:
            raise UsageError("-l and -i must not be negative, -r must be positive")
        if self.scale not in (1, 2, 4, 8, 16, 32, 64):
            raise UsageError("--scale must be a power of two from 1 to 64")
        if self.lock_mode not in ("shared", "exclusive"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared or exclusive")
        count(self.gup_delay_us, "--gup-delay-us", 0, 1_000_000)
        from shmmmu.variants import check_names
        check_names(self.bugs)


@dataclass
class _PerfRun(RunOptions):
    test: int = 0
    nslots: int = 8
    pages: int = 0
    move_area: int = 0

    def config(self) -> VMConfig:
        c = super().config()
        base = c.memslots[0].base_gfn
        per = self.pages // self.nslots
        c.memslots = [MemslotSpec(base + k * per, per + (self.pages % self.nslots if k == self.nslots - 1 else 0), 1)
                      for k in range(self.nslots)]
        c.workload.kind, c.workload.pages, c.workload.accesses = "memslot-perf", self.pages, self.pages
        c.workload.memslot_test, c.workload.move_area = self.test, self.move_area
        return c


def _host_value(vm, slots, gfn: int) -> int:
    s = slots.lookup(gfn)
    return int(vm.region.array("data")[int(vm.region.array("host_map")[s.host_off + gfn - s.base_gfn])])


def _dontneed(vm, sup: Launcher, slots, start: int, end: int) -> None:
    """madvise(MADV_DONTNEED) on the pages of [start, end): the MMU notifier's unmap, then the host pages
    dropped (the next touch finds a zero page)."""
    sup.mmu.host_unmap(start, end, migrate=False, may_block=True)
    _host_zero(vm, slots, start, end)


def _host_zero(vm, slots, start: int, end: int) -> None:
    """The host's stores of 0 into the pages of [start, end), through the host map."""
    data, hm = vm.region.array("data"), vm.region.array("host_map")
    g = start
    while g < end:
        s = slots.lookup(g)
        hi = min(end, s.end_gfn)
        data[hm[s.host_off + g - s.base_gfn: s.host_off + hi - s.base_gfn].astype(np.int64)] = 0
        g = hi


def _drive_perf(o: MemslotPerfOptions, name: str, failed: list[str], out: dict[str, Any]) -> Callable:
    def drive(vm, sup: Launcher, opts: RunOptions, progress: Any = None) -> PhaseLog:
        from shmmmu.memslots import Memslots
        from shmmmu.workloads import make_value
        log = PhaseLog()
        slots = Memslots(vm)
        c = vm.config
        base, n = c.memslots[0].base_gfn, c.workload.pages
        last = c.memslots[-1]
        log.base = sup.stats()
        k = 0

        def run(wait_first: bool = True) -> None:      # host_perform_sync: the guest's part k is done
            nonlocal k
            if wait_first:
                sup.wait_iteration(k, timeout=HANG_S)
            k += 1
            sup.start_iteration(k)

        def check(gfn: int, it: int) -> None:
            got, want = _host_value(vm, slots, gfn), make_value(gfn, 0, it)
            if got != want:
                failed.append(f"Guest written values should read back correctly before unmap ({got:#x} vs "
                              f"{want:#x} @ gfn {gfn:#x})")

        def loop() -> None:
            half = n // 2
            if name == "map":
                _dontneed(vm, sup, slots, base + half, base + n)
                run()
                if o.verify:
                    check(base, k - 1), check(base + half - 1, k - 1)
                _dontneed(vm, sup, slots, base, base + half)
                run()
                if o.verify:
                    check(base + half, k - 1), check(base + n - 1, k - 1)
            elif name.startswith("unmap"):
                chunk = UNMAP_CHUNK if name == "unmap chunked" else 1
                for lo in (0, half):
                    run()
                    if o.verify:
                        check(base + lo, k - 1)
                    for g in range(base + lo, base + lo + half, chunk):
                        _dontneed(vm, sup, slots, g, g + chunk)
            elif name.startswith("move"):
                run()                                 # the guest writes its area while the slot moves
                sup.mmu.move_memslot(len(c.memslots) - 1, base + n)       # MEM_TEST_MOVE_GPA_DEST
                sup.mmu.move_memslot(len(c.memslots) - 1, last.base_gfn)
            else:                                                         # RW
                run()
                for g in range(base, base + n):
                    got, want = _host_value(vm, slots, g), make_value(g, 0, k - 1)
                    if got != want:
                        failed.append(f"Guest written values should read back correctly (is {got:#x} @ gfn "
                                      f"{g:#x})")
                        break
                _host_zero(vm, slots, base, base + n)
                run()

        t0 = time.perf_counter_ns()
        run(wait_first=False)                         # let_guest_run
        loops = 0
        while not failed:
            ns = time.perf_counter_ns() - t0
            if (o.iterations and loops >= o.iterations) or (not o.iterations and ns >= o.seconds * 1e9):
                break
            loop()
            loops += 1
        ns = time.perf_counter_ns() - t0
        sup.wait_iteration(k, timeout=HANG_S)         # make_guest_exit, wait_guest_exit
        log.add("loops", loops, ns, sup.stats())
        out["loops"], out["ns"] = loops, ns
        s = log.phases[-1].delta
        out["emulated"] = s.get("emulated", 0)
        if name == "move inactive area" and s.get("emulated", 0):
            failed.append(f"Unexpected mmio exit: {s['emulated']} accesses outside every memslot, though the "
                          "moved memslot is not in the guest's area")
        return log
    return drive


def run_memslot_perf(o: MemslotPerfOptions, launcher: LauncherFactory,
                     on_test: Callable[[SelftestResult], None] | None = None) -> list[SelftestResult]:
    """memslot_perf_test's main (Linux 5.13): each test from -f to -e, -r runs of a VM each, the best kept."""
    from shmmmu.workloads import MEMSLOT_PERF_TESTS, MOVE_PAGES
    o.validate()
    results = []
    for t in range(o.first, o.last + 1):
        name = MEMSLOT_PERF_TESTS[t]
        each = f"{o.iterations} iterations" if o.iterations else f"{o.seconds} seconds"
        lines = [f"Testing {name} performance with {o.runs} runs, {each} each"]
        failed: list[str] = []
        best: tuple[int, int] | None = None
        pages = PERF_PAGES[name] // o.scale
        nslots = o.slots - 1
        last_start = (pages // nslots) * (nslots - 1)
        move_area = last_start - (MOVE_PAGES // 2 if name == "move active area" else MOVE_PAGES)
        run = None
        for _ in range(o.runs):
            out: dict[str, Any] = {}
            ro = _PerfRun(name=new_bench_name(), vcpus=1, memory=pages * 4096, backing="4k", lock_mode=o.lock_mode,
                          workload="populate", iterations=1, debug=True, bugs=list(o.bugs), test=t, nslots=nslots,
                          pages=pages, move_area=max(0, move_area), gup_delay_us=o.gup_delay_us)
            run = run_vm(ro, launcher, drive=_drive_perf(o, name, failed, out))
            lines.append(f"Test took {fmt_ts(out.get('ns', 0))} all iterations ({nslots} memslots of "
                         f"{pages // nslots} pages; their setup is the VM's creation here, not timed)")
            if not out.get("loops"):
                lines.append("No full loops done - too short test time or system too loaded?")
                continue
            per = out["ns"] // out["loops"]
            lines.append(f"Done {out['loops']} iterations, avg {fmt_ts(per)} each"
                         + (f"; mmio exits {out['emulated']}" if name.startswith("move") else ""))
            if best is None or per < best[0]:
                best = (per, out["loops"])
            if failed or not run.ok:
                break
        if best is not None:
            lines.append(f"Best runtime result was {fmt_ts(best[0])} per iteration (with {best[1]} iterations)")
        r = SelftestResult("memslot_perf_test", lines, failed, run)
        results.append(r)
        if on_test is not None:
            on_test(r)
    return results
