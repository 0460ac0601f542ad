"""Selftests: more of the kernel's KVM selftests as bench commands, each a VM of real worker processes driven
as the selftest drives KVM, printing the selftest's lines and asserting what it asserts.

  nx_huge_pages_test                 tools/testing/selftests/kvm/x86_64/nx_huge_pages_test.c (+ its .sh: NX
                                     huge pages on, recovery ratio 1, period 100 ms), as in 6.1
  memslot_modification_stress_test   tools/testing/selftests/kvm/memslot_modification_stress_test.c, as in 6.1
  demand_paging_test                 tools/testing/selftests/kvm/demand_paging_test.c, as in 6.5 (the
                                     handlers: shmmmu.userfault, workers/uffd.py)

memslot_perf_test is shmmmu.memslot_perf.

Each runs through shmmmu.run.run_vm with a driver of its own (the VM made, its vCPU processes and reclaimer
started, the checks and teardown of every run), so the guest memory check, the debug checkers (on here, as in
stress) and the violation log judge the run as well as the selftest's own assertions.  A failed assertion is
a line in the selftest's words and Result: FAILURE (exit 1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu.bench import fmt_ts, new_bench_name
from shmmmu.launch import Launcher, LauncherFactory
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.run import PhaseLog, RunOptions, RunResult, UsageError, run_vm
from shmmmu.validate import count

HANG_S = 120.0                   # a guard against a run that stopped moving, never a verdict


@dataclass
class SelftestResult:
    """One selftest run: its lines (the selftest's, then the emulator's), the failed assertions, the run."""

    test: str
    lines: list[str]
    failed: list[str]
    run: RunResult

    @property
    def ok(self) -> bool:
        return not self.failed and self.run.ok

    def report(self) -> list[str]:
        out = list(self.lines) + [p if p.startswith("!!!") else f"!!! {p}"
                                  for p in self.failed + self.run.problems + self.run.violations]
        return out + [f"Result: {'SUCCESS' if self.ok else 'FAILURE'}"]

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, "lines": self.lines, "failed": self.failed, "problems": self.run.problems,
                "violations": self.run.violations, "stats": self.run.stats, "options": self.run.options,
                "result": "SUCCESS" if self.ok else "FAILURE"}


def _stats(sup: Launcher) -> dict[str, int]:
    return sup.stats()


# ---------------------------------------------------------------- nx_huge_pages_test

HPAGE_GFN = (4 << 30) >> 12      # HPAGE_GPA: 4G, clear of slot 0
HPAGE_SLOT_NPAGES = 3 * 512
# (pages_2m, nx_lpage_splits) the selftest expects after each vcpu_run, with NX huge pages on / disabled;
# the sixth pair is after the recovery, the seventh after the read that follows it
NX_EXPECT = {True: [(1, 0), (2, 0), (1, 1), (1, 2), (1, 2), (1, 0), (2, 0)],
             False: [(1, 0), (2, 0), (2, 0), (3, 0), (3, 0), (3, 0), (3, 0)]}


@dataclass
class NxOptions:
    period_ms: int = 100             # -p: nx_huge_pages_recovery_period_ms (the .sh: 100)
    reboot: bool = False             # -r: also run with NX huge pages disabled (KVM_CAP_VM_DISABLE_NX_HUGE_PAGES)
    recovery_ratio: int = 1          # nx_huge_pages_recovery_ratio (the .sh: 1; 0 turns recovery off)
    lock_mode: str = "shared"
    bugs: list[str] = field(default_factory=list)
    timeline: str = ""

    def validate(self) -> None:
        if self.period_ms <= 0:
            raise UsageError("-p must be a reclaim period in milliseconds, above 0 (the selftest requires it)")
        if self.recovery_ratio < 0:
            raise UsageError("--recovery-ratio must be 0 (no recovery) or more")
        if self.lock_mode not in ("shared", "exclusive"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared or exclusive")
        from shmmmu.variants import check_names
        check_names(self.bugs)


@dataclass
class _NxRun(RunOptions):
    """The selftest's VM: one vCPU, a 3-huge-page hugetlb slot at 4G, NX huge pages as asked."""

    nx: bool = True
    ratio: int = 1

    def config(self) -> VMConfig:
        c = super().config()
        c.memslots = [MemslotSpec(HPAGE_GFN, HPAGE_SLOT_NPAGES, 2)]
        c.workload.kind, c.workload.pages = "nx-huge-pages", HPAGE_SLOT_NPAGES
        c.nx_huge_pages, c.nx_recovery_ratio = self.nx, self.ratio
        c.nx_recovery_period_s = 0.0         # the pass is run at the selftest's wait (below), not on a timer
        return c


def nx_counts(sup: Launcher) -> tuple[int, int]:
    """(pages_2m, nx_lpage_splits): the 2M leaves mapped now, and the tables on the NX list."""
    mmu = sup.mmu
    mmu.kvm.lock.read_lock()
    try:
        leaves = mmu.present_leaves(HPAGE_GFN, HPAGE_GFN + HPAGE_SLOT_NPAGES)
    finally:
        mmu.kvm.lock.read_unlock()
    return sum(1 for _, level, _ in leaves if level == 2), len(mmu.nx_list())


def _drive_nx(nx: bool, period_ms: int, ratio: int, lines: list[str], failed: list[str]) -> Callable:
    def drive(vm, sup: Launcher, opts: RunOptions, progress: Any = None) -> PhaseLog:
        log = PhaseLog()
        log.base = _stats(sup)
        expect = NX_EXPECT[nx]

        def check(step: int, what: str) -> None:
            got = nx_counts(sup)
            want = expect[step]
            lines.append(f"{what}: pages_2m {got[0]}, nx_lpage_splits {got[1]}")
            if got[0] != want[0]:
                failed.append(f"Unexpected 2m page count. Expected {want[0]}, got {got[0]}")
            if got[1] != want[1]:
                failed.append(f"Unexpected NX huge page split count. Expected {want[1]}, got {got[1]}")

        got = nx_counts(sup)
        if got != (0, 0):
            failed.append(f"Unexpected 2m page count / split count before the guest ran: {got}")
        what = ["read hpage_1", "read hpage_2", "call hpage_1", "call hpage_3", "read hpage_1"]
        for k in range(1, 6):
            t0 = time.perf_counter_ns()
            sup.run_iteration(k, timeout=HANG_S)
            log.add("step", k, time.perf_counter_ns() - t0, _stats(sup))
            check(k - 1, f"vcpu_run {k} ({what[k - 1]})")
        t0 = time.perf_counter_ns()
        zapped = sup.mmu.recover_nx_lpages(ratio) if nx else 0
        log.add("recovery", 0, time.perf_counter_ns() - t0, _stats(sup))
        lines.append(f"NX recovery pass (ratio {ratio}, as the recovery thread runs one every {period_ms} ms): "
                     f"{zapped} tables zapped")
        check(5, "after the recovery")
        t0 = time.perf_counter_ns()
        sup.run_iteration(6, timeout=HANG_S)
        log.add("step", 6, time.perf_counter_ns() - t0, _stats(sup))
        check(6, "vcpu_run 6 (read hpage_3)")
        return log
    return drive


def run_nx_huge_pages(opts: NxOptions, launcher: LauncherFactory,
                      on_run: Callable[[SelftestResult], None] | None = None) -> list[SelftestResult]:
    """nx_huge_pages_test's run_test with NX huge pages on, then (-r) disabled."""
    from contextlib import ExitStack

    from shmmmu.mmu.tracepoints import tracepoint_parts
    opts.validate()
    results = []
    with ExitStack() as stack:
        parts = stack.enter_context(tracepoint_parts(None, opts.timeline)) if opts.timeline else ""
        for nx in ([True, False] if opts.reboot else [True]):
            lines = [f"NX huge pages {'on' if nx else 'disabled (KVM_CAP_VM_DISABLE_NX_HUGE_PAGES)'}, "
                     f"lock mode {opts.lock_mode}"]
            failed: list[str] = []
            ro = _NxRun(name=new_bench_name(), vcpus=1, memory=HPAGE_SLOT_NPAGES * 4096, backing="2m",
                        lock_mode=opts.lock_mode, workload="populate", iterations=6, debug=True,
                        bugs=list(opts.bugs), tracepoints=parts, nx=nx, ratio=opts.recovery_ratio)
            run = run_vm(ro, launcher, drive=_drive_nx(nx, opts.period_ms, opts.recovery_ratio, lines, failed))
            r = SelftestResult("nx_huge_pages_test", lines, failed, run)
            results.append(r)
            if on_run is not None:
                on_run(r)
    return results


# ---------------------------------------------------------------- memslot_modification_stress_test

DUMMY_MEMSLOT = 1                # the selftest's DUMMY_MEMSLOT_INDEX 7; the emulator's slot 1, one page below


@dataclass
class MemslotModOptions:
    vcpus: int = 1                   # -v
    bytes_per_vcpu: int = 64 << 20   # -b (the selftest's default 1G: too much here)
    delay_us: int = 0                # -d: between add/delete iterations
    iterations: int = 10             # -i: add+delete pairs (DEFAULT_MEMSLOT_MODIFICATION_ITERATIONS)
    overlap: bool = False            # -o
    lock_mode: str = "shared"
    bugs: list[str] = field(default_factory=list)
    seed: int = 1
    timeline: str = ""
    gup_delay_us: int = 0            # shmmmu's own: pauses in the fault's prologue (VMConfig.gup_delay_us)

    def validate(self) -> None:
        if self.iterations < 1:
            raise UsageError("-i must be at least 1 (add/remove iterations)")
        count(self.gup_delay_us, "--gup-delay-us", 0, 1_000_000)
        if self.delay_us < 0:
            raise UsageError("-d must not be negative")
        if self.lock_mode not in ("shared", "exclusive"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared or exclusive")
        from shmmmu.variants import check_names
        check_names(self.bugs)
        self.run_options("check").config()

    def run_options(self, name: str, parts: str = "") -> _ModRun:
        return _ModRun(name=name, vcpus=self.vcpus, memory=self.bytes_per_vcpu, backing="4k",
                       lock_mode=self.lock_mode, overlap=self.overlap, workload="populate", iterations=1,
                       seed=self.seed, debug=True, bugs=list(self.bugs), tracepoints=parts,
                       gup_delay_us=self.gup_delay_us)


@dataclass
class _ModRun(RunOptions):
    def config(self) -> VMConfig:
        c = super().config()
        main = c.memslots[0]
        c.memslots.append(MemslotSpec(main.base_gfn - 1, 1, 1))      # the dummy slot: one page just below
        return c


def _drive_memslot_mod(o: MemslotModOptions, lines: list[str], failed: list[str]) -> Callable:
    def drive(vm, sup: Launcher, opts: RunOptions, progress: Any = None) -> PhaseLog:
        log = PhaseLog()
        mmu = sup.mmu
        mmu.delete_memslot(DUMMY_MEMSLOT)            # the dummy slot starts absent; each iteration adds it
        log.base = _stats(sup)
        lines.append("Finished creating vCPUs")
        passes = 1
        sup.start_iteration(passes)                  # the vCPUs access their memory until told to stop
        lines.append("Started all vCPUs")
        t0 = time.perf_counter_ns()
        for _ in range(o.iterations):
            passes = _until_vcpus_moved(sup, passes)  # each change lands while the vCPUs are faulting
            if o.delay_us:
                time.sleep(o.delay_us / 1e6)
            mmu.add_memslot(DUMMY_MEMSLOT)
            mmu.delete_memslot(DUMMY_MEMSLOT)        # kvm_mmu_zap_all_fast: every root invalidated, zapped
        ns = time.perf_counter_ns() - t0
        sup.wait_iteration(passes, timeout=HANG_S)
        log.add("modify", 0, ns, _stats(sup))
        lines.append("All vCPU threads joined")
        s = log.phases[-1].delta
        lines.append(f"Memslot add/delete iterations: {o.iterations} in {fmt_ts(ns)}; fast zaps "
                     f"{s.get('fast_zaps', 0)}; vCPU passes {passes}; faults {s.get('faults', 0)} "
                     f"(retries {s.get('retries', 0)}, stale-root retries {s.get('stale_root_retries', 0)})")
        if s.get("fast_zaps", 0) != o.iterations:
            failed.append(f"expected one fast zap per deleted memslot: {o.iterations}, counted "
                          f"{s.get('fast_zaps', 0)}")
        return log
    return drive


def _until_vcpus_moved(sup: Launcher, k: int) -> int:
    """Wait until every vCPU has made progress (its heartbeat moved: a chunk of accesses) since the call, starting
    the next pass over their memory whenever all have finished the current one; returns the pass now running.
    A count, never a time, decides (HANG_S only guards against a run that stopped)."""
    from shmmmu.layout import WState
    ws, n = sup.vm.region.columns("wstate", WState), sup.vm.config.n_vcpus
    beat = [ws.heartbeat.load(i) for i in range(n)]
    moved = [False] * n
    deadline = time.monotonic() + HANG_S
    while not all(moved):
        for i in range(n):
            moved[i] = moved[i] or ws.heartbeat.load(i) != beat[i]
        if all(ws.iteration.load(i) == k for i in range(n)):
            k += 1
            sup.start_iteration(k)
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the vCPUs made no progress in {HANG_S:.0f}s")
        time.sleep(0.0002)
    return k


def _run_memstress_test(name: str, pa_bits: str, o: Any, launcher: LauncherFactory,
                        drive: Callable[[Any, list[str], list[str]], Any]) -> SelftestResult:
    """A memstress-based selftest's run_test: its guest-mode lines, one VM run driven by `drive(o, lines,
    failed)`, the run's timeline if asked."""
    from contextlib import ExitStack

    from shmmmu.mmu.tracepoints import tracepoint_parts
    o.validate()
    lines: list[str] = []
    failed: list[str] = []
    with ExitStack() as stack:
        parts = stack.enter_context(tracepoint_parts(None, o.timeline)) if o.timeline else ""
        ro = o.run_options(new_bench_name(), parts)
        gpa = ro.config().memslots[0].base_gfn * 4096
        lines += [f"Testing guest mode: PA-bits:{pa_bits}, VA-bits:48,  4K pages",
                  f"guest physical test memory: [{gpa:#x}, {gpa + o.vcpus * o.bytes_per_vcpu:#x})"]
        run = run_vm(ro, launcher, drive=drive(o, lines, failed))
    return SelftestResult(name, lines, failed, run)


def run_memslot_modification(o: MemslotModOptions, launcher: LauncherFactory) -> SelftestResult:
    """memslot_modification_stress_test's run_test."""
    return _run_memstress_test("memslot_modification_stress_test", "48", o, launcher, _drive_memslot_mod)


# ---------------------------------------------------------------- demand_paging_test

@dataclass
class DemandOptions:
    vcpus: int = 1                   # -v
    bytes_per_vcpu: int = 64 << 20   # -b (the selftest's default 1G: too much here)
    uffd_mode: str = ""              # -u MISSING (MINOR needs a shared-memory alias, not modelled); "": no uffd
    single_uffd: bool = False        # -a: one uffd for all of guest memory (implied by -o)
    delay_us: int = 0                # -d: the handler's delay before each UFFDIO_COPY
    readers: int = 1                 # -r: reader processes per uffd
    overlap: bool = False            # -o
    lock_mode: str = "shared"
    bugs: list[str] = field(default_factory=list)
    seed: int = 1
    timeline: str = ""

    @property
    def uffds(self) -> int:
        if not self.uffd_mode:
            return 0
        return 1 if self.single_uffd or self.overlap else self.vcpus

    def validate(self) -> None:
        if self.uffd_mode not in ("", "MISSING"):
            raise UsageError(f"-u {self.uffd_mode}: only MISSING (MINOR faults need a shared-memory alias of "
                             "guest memory, which the emulator does not model)")
        if self.delay_us < 0:
            raise UsageError("-d must not be negative")
        if self.readers < 1:
            raise UsageError("-r must be at least 1 (readers per uffd)")
        if self.uffds * self.readers > 14:
            raise UsageError(f"{self.uffds} uffds x {self.readers} readers: at most 14 handler processes "
                             "(the VM's host slots); use -a or fewer vCPUs or readers")
        if self.lock_mode not in ("shared", "exclusive"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared or exclusive")
        from shmmmu.variants import check_names
        check_names(self.bugs)
        self.run_options("check").config()

    def run_options(self, name: str, parts: str = "") -> "_DemandRun":
        return _DemandRun(name=name, vcpus=self.vcpus, memory=self.bytes_per_vcpu, backing="4k",
                          lock_mode=self.lock_mode, overlap=self.overlap, workload="populate", iterations=1,
                          seed=self.seed, debug=True, bugs=list(self.bugs), tracepoints=parts,
                          uffds=self.uffds, readers=self.readers, delay_us=self.delay_us)


@dataclass
class _DemandRun(RunOptions):
    uffds: int = 0
    readers: int = 1
    delay_us: int = 0

    def config(self) -> VMConfig:
        c = super().config()
        c.uffds, c.uffd_readers, c.uffd_delay_us = self.uffds, self.readers, self.delay_us
        c.n_host = 2 + self.uffds * self.readers
        return c


def _drive_demand(o: DemandOptions, lines: list[str], failed: list[str]) -> Callable:
    def drive(vm, sup: Launcher, opts: RunOptions, progress: Any = None) -> PhaseLog:
        from shmmmu.userfault import register_missing
        log = PhaseLog()
        # registered before the vCPUs run (the handlers are already polling; nothing faults yet)
        registered = register_missing(vm, 0) if o.uffd_mode else 0
        log.base = _stats(sup)
        lines.append("Finished creating vCPUs and starting uffd threads")
        t0 = time.perf_counter_ns()
        sup.start_iteration(1)
        lines.append("Started all vCPUs")
        sup.wait_iteration(1, timeout=HANG_S)
        ns = time.perf_counter_ns() - t0
        lines.append("All vCPU threads joined")
        log.add("demand", 1, ns, _stats(sup))
        s = log.phases[-1].delta
        pages = opts.config().workload.pages
        rate = pages / (ns / 1e9) if ns else 0.0
        lines.extend([f"Total guest execution time:\t{fmt_ts(ns)}",
                      f"Per-vcpu demand paging rate:\t{rate:f} pgs/sec/vcpu",
                      f"Overall demand paging rate:\t{rate * o.vcpus:f} pgs/sec"])
        if o.uffd_mode:
            lines.append(f"uffds {o.uffds} x readers {o.readers}, delay {o.delay_us} us: userfaults "
                         f"{s.get('userfaults', 0)}, UFFDIO_COPY {s.get('uffd_copies', 0)}, EEXIST "
                         f"{s.get('uffd_eexist', 0)} of {registered} pages registered; faults {s.get('faults', 0)}")
            # every page was touched, so every page was copied in exactly once (a second copy is EEXIST),
            # and no vCPU fault went unserved (vcpu_run returned with UCALL_SYNC)
            if s.get("uffd_copies", 0) != registered:
                failed.append(f"UFFDIO_COPY filled {s.get('uffd_copies', 0)} pages, not the {registered} "
                              "registered pages the guest touched")
            if s.get("userfaults", 0) < registered:
                failed.append(f"only {s.get('userfaults', 0)} faults waited on the handlers for {registered} "
                              "missing pages")
        _check_prototype(vm, failed)
        return log
    return drive


def _check_prototype(vm, failed: list[str]) -> None:
    """No page of guest memory is still out or still holds the poison (every page touched was copied in)."""
    from shmmmu.memslots import DATA_POISON, Memslots
    from shmmmu.userfault import MISSING
    slot = Memslots(vm).read(0)
    hm = vm.region.array("host_map")[slot.host_off: slot.host_off + slot.npages]
    out = int(np.count_nonzero(hm & np.uint64(MISSING)))
    if out:
        failed.append(f"{out} pages of guest memory were never copied in")
    poisoned = int(np.count_nonzero(vm.region.array("data")[(hm & ~np.uint64(MISSING)).astype(np.int64)]
                                    == np.uint64(DATA_POISON)))
    if poisoned:
        failed.append(f"{poisoned} pages hold no data: mapped before any copy reached them")


def run_demand_paging(o: DemandOptions, launcher: LauncherFactory) -> SelftestResult:
    """demand_paging_test's run_test (Linux 6.5)."""
    return _run_memstress_test("demand_paging_test", "ANY", o, launcher, _drive_demand)

