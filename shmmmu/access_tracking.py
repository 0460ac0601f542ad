"""Bench: the kernel's access_tracking_perf_test on the emulator (aging: clear_young, young pages), both lock modes side by side.

The selftest's phases, each timed and printed on its own line as the selftest
prints them (`%-30s: %ld.%09lds`): every vCPU populates its memory (writes),
writes it again, reads it; the host marks it idle; the vCPUs write it; the host
marks it idle again; the vCPUs read it.  Marking idle is what
/sys/kernel/mm/page_idle/bitmap does for each page: an MMU-notifier clear_young
of that page (5.13: kvm_tdp_mmu_age_gfn_range under the write lock, A cleared,
no flush), one call per 4 KiB page, each vCPU's pages in turn.

Unlike the selftest, which says a deterministic check is not possible (the
kernel's page_idle may miss pages on no LRU list, and clear_young does not flush,
so a translation still cached in a TLB sets no A bit), the emulator checks
exactly: right after each marking no page of the slot reads young, and after the
vCPUs' next pass exactly the pages whose translations the processor had to walk
again read young.  Which those are follows from the TLB model (a vCPU's TLB holds
`tlb_entries` translations and is emptied when full): a vCPU whose pass touches
more leaves than its TLB holds walks every one of them again, in a sequential
pass; one whose leaves all fit (little memory, or huge pages) walks none, and its
pages stay idle, as on real hardware.  A page read young that should not be, or
idle that should not be, is a FAILURE.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu.bench import MODES, fmt_ts, new_bench_name
from shmmmu.launch import LauncherFactory
from shmmmu.integrity import check_guest_memory
from shmmmu.run import BACKINGS, RunOptions, UsageError, vcpu_schedstat
from shmmmu.vm import create_vm
from shmmmu.workloads import vcpu_range
from shmmmu import violations

# (key, the selftest's description, the iteration the vCPUs run; 0: the host marks memory idle)
PHASES = [
    ("populate", "Populating memory", 1),
    ("write-populated", "Writing to populated memory", 2),
    ("read-populated", "Reading from populated memory", 3),
    ("mark-idle-1", "Mark memory idle", 0),
    ("write-idle", "Writing to idle memory", 4),
    ("mark-idle-2", "Mark memory idle", 0),
    ("read-idle", "Reading from idle memory", 5),
]
DEFAULT_BYTES = 128 << 20


def phase_line(description: str, ns: int) -> str:
    """One of the selftest's lines: pr_info("%-30s: %ld.%09lds\\n", description, ...)."""
    return f"{description:<30}: {fmt_ts(ns)}"


@dataclass
class AccessTrackingOptions:
    vcpus: int = 1                       # -v
    bytes_per_vcpu: int = DEFAULT_BYTES  # -b
    backing: str = "anonymous"           # -s
    overlap: bool = False                # -o
    lock_mode: str = "both"              # shared | exclusive | both
    repeat: int = 1
    seed: int = 1

    def modes(self) -> list[str]:
        return list(MODES) if self.lock_mode == "both" else [self.lock_mode]

    def validate(self) -> None:
        if self.lock_mode not in (*MODES, "both"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared, exclusive or both")
        if self.backing not in BACKINGS:
            raise UsageError(f"unknown backing source {self.backing!r}: use anonymous, anonymous_thp, "
                             f"anonymous_hugetlb (or 4k, 2m, 1g)")
        if not 1 <= self.repeat <= 100:
            raise UsageError("--repeat must be between 1 and 100")
        self.run_options("shared", "check").config()

    def run_options(self, mode: str, name: str) -> RunOptions:
        return RunOptions(name=name, vcpus=self.vcpus, memory=self.bytes_per_vcpu, backing=self.backing,
                          lock_mode=mode, overlap=self.overlap, workload="access-tracking",
                          iterations=5, seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class AccessTrackingRun:
    """One VM's run in one lock mode: each phase's time, the vCPUs' CPU time over the access phases, the checks."""
    mode: str
    index: int
    times_ns: dict[str, int]
    young_after: dict[str, int]          # pages that read young after each phase (checked ones)
    faults: int
    vcpu_cpu_ns: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, runs_per_mode: int = 1) -> list[str]:
        out = [f"Lock mode: {self.mode}" + (f" (run {self.index} of {runs_per_mode})" if runs_per_mode > 1 else "")]
        out += [phase_line(desc, self.times_ns[key]) for key, desc, _ in PHASES]
        out.append(f"Young pages after marking idle / after the next pass: {self.young_after['mark-idle-1']} / "
                   f"{self.young_after['write-idle']}, {self.young_after['mark-idle-2']} / "
                   f"{self.young_after['read-idle']} (of {self.young_after['touched']} touched, "
                   f"{self.young_after['walked']} of them walked again: the rest stay cached in TLBs)")
        out.append(f"Faults: {self.faults}; vCPU CPU time: {self.vcpu_cpu_ns / 1e9:.3f}s")
        out += [f"!!! {p}" for p in self.problems]
        out.append(f"Result: {'SUCCESS' if self.ok else 'FAILURE'}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"lock_mode": self.mode, "run": self.index,
                "phases": [{"phase": key, "description": desc, "seconds": self.times_ns[key] / 1e9}
                           for key, desc, _ in PHASES],
                "young": self.young_after, "faults": self.faults, "vcpu_cpu_s": self.vcpu_cpu_ns / 1e9,
                "problems": self.problems, "result": "SUCCESS" if self.ok else "FAILURE"}


def _run_one(opts: AccessTrackingOptions, mode: str, index: int, launcher: LauncherFactory) -> AccessTrackingRun:
    config = opts.run_options(mode, new_bench_name()).config()
    wl = config.workload
    slot = config.memslots[0]
    base = slot.base_gfn
    ranges = [vcpu_range(wl, base, v) for v in range(config.n_vcpus)]
    touched = np.zeros(slot.npages, dtype=bool)
    for start, n in ranges:
        touched[start - base: start - base + n] = True
    times: dict[str, int] = {}
    young_after: dict[str, int] = {"touched": int(touched.sum())}
    problems: list[str] = []
    clock = time.perf_counter_ns
    with create_vm(config) as vm:
        sup = launcher(vm)
        try:
            sup.start()
            mmu = sup.mmu
            pids = [sup.procs[i].pid for i in range(config.n_vcpus) if i in sup.procs]
            cpu0 = vcpu_schedstat(pids)[0]
            expect_young = np.zeros(slot.npages, dtype=bool)

            def check(after: str, want: np.ndarray) -> None:
                young = mmu.young_pages(base, base + slot.npages)
                young_after[after] = int(young.sum())
                wrong = np.flatnonzero(young != want)
                if wrong.size:
                    g = base + int(wrong[0])
                    problems.append(f"young-pages: after {after}, {wrong.size} pages read "
                                    f"{'young' if young[wrong[0]] else 'idle'} wrongly (first gfn {g:#x})")

            for key, _, iteration in PHASES:
                t0 = clock()
                if iteration:
                    sup.run_iteration(iteration)
                else:
                    # page_idle: one clear_young per page, each vCPU's memory in turn
                    for start, n in ranges:
                        for g in range(start, start + n):
                            mmu.clear_young(g, g + 1, flush=False)
                times[key] = clock() - t0
                if key == "populate":
                    # the pages each vCPU walks again in a later pass: all of its range if its leaves
                    # overflow its TLB (see the module's docstring), none if they fit
                    for start, n in ranges:
                        if len(mmu.present_leaves(start, start + n)) > config.tlb_entries:
                            expect_young[start - base: start - base + n] = True
                    young_after["walked"] = int(expect_young.sum())
                elif key.startswith("mark-idle"):
                    check(key, np.zeros(slot.npages, dtype=bool))
                elif key in ("write-idle", "read-idle"):
                    check(key, expect_young)
            cpu = vcpu_schedstat(pids)[0] - cpu0
            sup.stop()
            sup.drain()
            faults = sup.stats()["faults"]
            problems += check_guest_memory(vm)
            left = mmu.destroy()
            if left:
                problems.append(f"table-leak: {left} tables still on the page list after the VM was destroyed")
            who = violations.worker_names(vm.config)
            problems += [v.explained(who, vm.config.geometry.entries) for v in violations.read_all(vm.region)]
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()
    return AccessTrackingRun(mode, index, times, young_after, faults, cpu, problems)


@dataclass
class AccessTrackingResult:
    options: AccessTrackingOptions
    runs: list[AccessTrackingRun]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def medians(self) -> dict[str, dict[str, float]]:
        out = {}
        for mode in self.options.modes():
            rs = [r for r in self.runs if r.mode == mode]
            if rs:
                out[mode] = {key: statistics.median(r.times_ns[key] for r in rs) / 1e9 for key, _, _ in PHASES}
        return out

    def ratios(self) -> dict[str, float]:
        """exclusive / shared of each phase's median time (> 1: shared mode is faster)."""
        med = self.medians()
        if set(med) != set(MODES):
            return {}
        return {key: med["exclusive"][key] / med["shared"][key] if med["shared"][key] > 0 else float("nan")
                for key, _, _ in PHASES}

    def summary_lines(self) -> list[str]:
        med, ratios = self.medians(), self.ratios()
        modes = list(med)
        n = self.options.repeat
        head = f"Summary: median of {n} runs per mode" if n > 1 else "Summary"
        if len(modes) > 1:
            head += f" (alternated: {', '.join(modes)}, ... in one invocation)"
        out = [head + ":", f"{'':<30}" + "".join(f"{m:>16}" for m in modes) + ("  exclusive/shared" if ratios else "")]
        for key, desc, _ in PHASES:
            row = f"{desc:<30}" + "".join(f"{fmt_ts(round(med[m][key] * 1e9)):>16}" for m in modes)
            if ratios:
                row += f"  {ratios[key]:>15.2f}x"
            out.append(row)
        out.append(f"Result: {'SUCCESS' if self.ok else 'FAILURE'}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"options": self.options.to_json(), "runs": [r.to_json() for r in self.runs],
                "median": self.medians(), "ratios": self.ratios(),
                "result": "SUCCESS" if self.ok else "FAILURE"}


def run_access_tracking(opts: AccessTrackingOptions, launcher: LauncherFactory,
                        on_run: Callable[[AccessTrackingRun], None] | None = None) -> AccessTrackingResult:
    """Every mode `repeat` times, the modes alternating; `on_run` sees each run as it ends."""
    opts.validate()
    runs = []
    for i in range(1, opts.repeat + 1):
        for mode in opts.modes():
            run = _run_one(opts, mode, i, launcher)
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return AccessTrackingResult(opts, runs)
