"""Page splitting: the kernel's dirty_log_page_splitting_test on the emulator, its page counts and its assertions.

The selftest (tools/testing/selftests/kvm/x86_64/dirty_log_page_splitting_test.c,
read for ../shared/KERNEL_612.md §3) populates a VM's memory, enables dirty
logging, runs the vCPUs through a logging pass with a GET (and, with manual
protect, a CLEAR), disables logging, touches memory again, and reads the VM's
4K/2M/1G page counts after each step.  It runs once without and once with
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET and asserts:

- without manual protect: at enable no huge page is left, and every page is 4K;
- with it: at enable the huge pages are as populated, and after the first CLEAR
  pass none is left and every page is 4K;
- after logging is disabled and memory touched again, the 4K, 2M and 1G counts
  equal those right after population.

Eager splitting is 6.12's (a3fe5dbda0a4, cb00a70bd4b7); the 5.13 profile has
none, and the bench says so.  The vCPUs here are `guest.Vcpu`s of this process
(their accesses through the C loop), one after another: the counts, not the
timing, are the test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.validate import UsageError
from shmmmu.variants import PROFILE_NAMES, traits

BACKINGS = {"4k": 1, "2m": 2, "1g": 3}


@dataclass
class PageStats:
    """The VM's page counts (kvm stats pages_4k, pages_2m, pages_1g), from the tables themselves."""
    pages_4k: int
    pages_2m: int
    pages_1g: int

    @property
    def hugepages(self) -> int:
        return self.pages_2m + self.pages_1g

    def line(self, step: str) -> str:
        # the selftest's get_page_stats() line
        return (f"Page stats after {step}: 4K: {self.pages_4k} 2M: {self.pages_2m} 1G: {self.pages_1g} "
                f"huge: {self.hugepages}")


@dataclass
class SplitRun:
    manual: bool
    stats: dict[str, PageStats] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def page_stats(vm: Any) -> PageStats:
    from shmmmu.snapshot import walk_tables
    w = walk_tables(vm)
    levels = w.leaf_level
    return PageStats(int((levels == 1).sum()), int((levels == 2).sum()), int((levels == 3).sum()))


def _check(run: SplitRun, total_4k: int) -> None:
    s, f = run.stats, run.failures

    def want(ok: bool, what: str) -> None:
        if not ok:
            f.append(what)
    if run.manual:
        want(s["clearing dirty log pass"].hugepages == 0, "huge pages left after the first CLEAR pass")
        want(s["clearing dirty log pass"].pages_4k >= total_4k, "fewer 4K pages than guest pages after CLEAR")
        want(s["enabling dirty logging"].hugepages == s["populating memory"].hugepages,
             "huge pages changed at enable with INITIALLY_SET")
    else:
        want(s["enabling dirty logging"].hugepages == 0, "huge pages left after enabling dirty logging")
        want(s["enabling dirty logging"].pages_4k >= total_4k, "fewer 4K pages than guest pages at enable")
    pop, rep = s["populating memory"], s["repopulating memory"]
    for lv in ("pages_4k", "pages_2m", "pages_1g"):
        want(getattr(pop, lv) == getattr(rep, lv),
             f"{lv} after repopulating ({getattr(rep, lv)}) differs from after populating ({getattr(pop, lv)})")


def run_once(name: str, kernel: str, backing: str, pages_per_vcpu: int, vcpus: int, manual: bool,
             log: Callable[[str], None]) -> SplitRun:
    """One run of the selftest's run_test(): populate, enable, one logging pass, disable, repopulate."""
    from shmmmu.guest import Vcpu
    from shmmmu.mmu import Mmu
    from shmmmu.vm import create_vm
    from shmmmu.workloads import WRITE, make_value
    level = BACKINGS[backing]
    unit = 1 << (9 * (level - 1))
    total = -(-pages_per_vcpu * vcpus // unit) * unit
    cfg = VMConfig(name=name, n_vcpus=vcpus, bits=9, memslots=[MemslotSpec(0, total, level)], kernel=kernel,
                   tlb_entries=256)
    run = SplitRun(manual)
    with create_vm(cfg) as vm:
        cpus = [Vcpu(vm, i) for i in range(vcpus)]
        host = Mmu(vm, cfg.host_worker)
        per = total // vcpus

        def touch(iteration: int) -> None:                        # run_vcpu_iteration(): every page written
            for i, v in enumerate(cpus):
                gfns = np.arange(i * per, (i + 1) * per, dtype=np.int64)
                v.load_batch(gfns, np.full(gfns.size, WRITE, dtype=np.int8))
                v.enter()
                v.run_batch(0, gfns.size, make_value(0, i, iteration))
                v.exit()

        def stats(step: str) -> None:
            run.stats[step] = page_stats(vm)
            log(run.stats[step].line(step))
        touch(1)
        stats("populating memory")
        host.enable_dirty_logging(0, initially_set=manual)
        stats("enabling dirty logging")
        touch(2)
        bitmap = host.get_dirty_log(0, clear=not manual)
        if manual:
            host.clear_dirty_log(0, 0, bitmap)
            stats("clearing dirty log pass")
        host.disable_dirty_logging(0)
        stats("disabling dirty logging")
        touch(3)
        stats("repopulating memory")
        for v in cpus:
            v.release()
    _check(run, total)
    return run


def run_page_splitting(kernel: str, backing: str, vcpu_bytes: int, vcpus: int, name: str,
                       log: Callable[[str], None] = print) -> list[SplitRun]:
    """The selftest: a run without manual protect, then one with it; UsageError for what it cannot run."""
    if kernel not in PROFILE_NAMES:
        raise UsageError(f"unknown kernel {kernel!r}; known: {', '.join(PROFILE_NAMES)}")
    if "eager-split" not in traits(kernel, []):
        raise UsageError(f"kernel {kernel} has no eager page splitting (6.12's a3fe5dbda0a4): use --kernel 6.12")
    if backing not in BACKINGS:
        raise UsageError(f"unknown backing {backing!r}: use 4k, 2m or 1g")
    if not 1 <= vcpus <= 16:
        raise UsageError("-v must be between 1 and 16")
    pages = vcpu_bytes // 4096
    if not 512 <= pages <= 1 << 20:
        raise UsageError("-b must be between 2M and 4G")
    runs = []
    for manual in (False, True):
        log(f"Testing with{'' if manual else 'out'} manual protect (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | "
            f"KVM_DIRTY_LOG_INITIALLY_SET)")
        runs.append(run_once(f"{name}-{'m' if manual else 'a'}", kernel, backing, pages, vcpus, manual, log))
    return runs
