"""Run: one VM from creation to teardown: workers started, a workload driven in phases, results and checks.

`run_vm(RunOptions)` is what `shmmmu run` calls; the benchmark reuses its
phases.  It always unlinks the region and semaphores it created, also when a
worker dies or the user presses Ctrl-C.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu import violations
from shmmmu.integrity import check_guest_memory, dirty_log_missed, guest_values
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.vm import create_vm

BACKINGS = {"4k": 1, "2m": 2, "1g": 3, "anonymous": 1, "anonymous_thp": 2, "anonymous_hugetlb": 3}
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UsageError(ValueError):
    """A user mistake in the options: one line, exit status 2."""


def parse_size(text: str) -> int:
    """'1G', '256M', '4096' -> bytes (the selftests' -b suffixes)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text else ""
    num, unit = t, ""
    if t and t[-1] in "KMGT":
        num, unit = t[:-1], t[-1]
    try:
        value = float(num) * UNITS[unit]
    except (ValueError, KeyError):
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix") from None
    if value < 4096:
        raise UsageError(f"size {text!r} is less than one 4 KiB page")
    return int(value)


@dataclass
class RunOptions:
    name: str = "demo"
    vcpus: int = 2
    memory: int = 128 << 20                 # bytes per vCPU
    backing: str = "4k"
    lock_mode: str = "shared"
    overlap: bool = False
    workload: str = "populate"
    trace: list[tuple[int, int]] | None = None
    iterations: int = 2
    seed: int = 1
    write_every: int = 1
    bits: int = 9
    debug: bool = False
    bugs: list[str] = field(default_factory=list)
    accesses: int = 0

    def config(self) -> VMConfig:
        if self.vcpus < 1:
            raise UsageError("--vcpus must be at least 1")
        if self.vcpus > 250:
            raise UsageError("--vcpus must be at most 250")
        if self.iterations < 1:
            raise UsageError("--iterations must be at least 1")
        if self.backing not in BACKINGS:
            raise UsageError(f"unknown backing {self.backing!r}: use 4k, 2m or 1g")
        if self.lock_mode not in ("shared", "exclusive"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared or exclusive")
        level = BACKINGS[self.backing]
        pages = self.memory // 4096
        total = pages * self.vcpus
        limit = 1 << (self.bits * 4)
        unit = 1 << (self.bits * (level - 1))
        slot_pages = -(-total // unit) * unit
        if slot_pages > limit // 2 or total > (64 << 30) // 4096:
            raise UsageError(f"{self.vcpus} x {self.memory >> 20} MiB is more guest memory than this emulator maps "
                             f"(at most {min(limit // 2, (64 << 30) // 4096) * 4096 >> 30} GiB)")
        base = limit // 2                    # the selftest puts its slot high in guest-physical space
        base -= base % unit
        wl: dict[str, Any] = {"kind": "stress" if self.workload == "stress" else self.workload,
                              "pages": pages, "overlap": self.overlap, "n_vcpus": self.vcpus,
                              "write_every": self.write_every, "accesses": self.accesses or pages}
        if self.workload == "trace":
            if not self.trace:
                raise UsageError("--workload trace needs --trace FILE")
            wl["trace"] = self.trace
        elif self.workload not in ("populate", "random", "dirty-log", "stress"):
            raise UsageError(f"unknown workload {self.workload!r}: use populate, random, dirty-log or trace")
        return VMConfig(name=self.name, n_vcpus=self.vcpus, bits=self.bits, lock_mode=self.lock_mode,
                        memslots=[MemslotSpec(base, slot_pages, level)], debug=self.debug, bugs=list(self.bugs),
                        seed=self.seed, workload=wl)


@dataclass
class RunResult:
    options: dict[str, Any]
    phases: list[tuple[str, float]]
    stats: dict[str, int]
    rcu: dict[str, int]
    tables: dict[str, int]
    problems: list[str]
    violations: list[str]
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.problems and not self.violations

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        populate = next((t for n, t in self.phases if n.startswith("populate")), self.wall_s)
        return {"options": self.options, "phases": [{"name": n, "seconds": t} for n, t in self.phases],
                "faults": s["faults"],
                "faults_per_s": s.get("populate_faults", s["faults"]) / populate if populate else 0.0,
                "stats": s, "rcu": self.rcu, "tables": self.tables, "problems": self.problems,
                "violations": self.violations, "wall_s": self.wall_s,
                "result": "SUCCESS" if self.ok else "FAILURE"}


def table_counts(vm) -> dict[str, int]:
    from shmmmu.layout import T_STATE, TS_CACHED, TS_FREE, TS_LIVE, TS_RETIRED
    st = vm.region.array("tmeta")[:, T_STATE]
    return {"total": int(st.size), "live": int((st == TS_LIVE).sum()), "free": int((st == TS_FREE).sum()),
            "cached": int((st == TS_CACHED).sum()), "retired": int((st == TS_RETIRED).sum())}


def run_vm(opts: RunOptions, progress: Callable[[str, int, int], None] | None = None,
           keep: Callable[[Any], None] | None = None) -> RunResult:
    """Create the VM, run the workload, check, tear down.  `keep(supervisor)` is called before stopping."""
    from workers.supervisor import Supervisor
    config = opts.config()
    t_start = time.monotonic()
    phases: list[tuple[str, float]] = []
    problems: list[str] = []
    populate_faults = 0
    with create_vm(config) as vm:
        sup = Supervisor(vm)
        try:
            sup.start()
            mmu = sup.mmu
            tick = (lambda: progress("faults", sup.stats()["faults"], 0)) if progress else None
            n_iter = opts.iterations
            for k in range(1, n_iter + 1):
                if opts.workload == "dirty-log" and k == 2:
                    t0 = time.monotonic()
                    mmu.enable_dirty_logging(0)
                    phases.append(("enable dirty logging", time.monotonic() - t0))
                    before = guest_values(vm)
                t0 = time.monotonic()
                sup.run_iteration(k, on_wait=tick)
                name = "populate" if k == 1 else f"iteration {k}"
                phases.append((name, time.monotonic() - t0))
                if k == 1:
                    populate_faults = sup.stats()["faults"]
                if progress:
                    progress("iteration", k, n_iter)
                if opts.workload == "dirty-log" and k >= 2:
                    t0 = time.monotonic()
                    bitmap = mmu.get_dirty_log(0)
                    phases.append((f"get dirty log {k}", time.monotonic() - t0))
                    after = guest_values(vm)
                    slot = mmu.slots.read(0)
                    missed = dirty_log_missed(before, after, bitmap, slot.base_gfn)
                    for g in missed[:10]:
                        problems.append(f"dirty-log-missed: gfn {g:#x} changed in iteration {k} but was not reported")
                    before = after
            if opts.workload == "dirty-log" and n_iter >= 2:
                t0 = time.monotonic()
                mmu.disable_dirty_logging(0)
                phases.append(("disable dirty logging", time.monotonic() - t0))
            if keep is not None:
                sup.stats()          # publish the supervisor's own counters first, for `shmmmu inspect`
                keep(sup)
            stats = sup.stats()
            sup.stop()
            sup.drain()
            stats = sup.stats()
            rcu = vm.rcu.stats()
            problems += check_guest_memory(vm)
            tables = table_counts(vm)
            found = [str(v) for v in violations.read_all(vm.region)]
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()
    stats["populate_faults"] = populate_faults
    return RunResult(options={k: v for k, v in vars(opts).items() if k != "trace"}, phases=phases, stats=stats,
                     rcu=rcu, tables=tables, problems=problems, violations=found,
                     wall_s=time.monotonic() - t_start)
