"""dirty_log_test (KVM_TDP_MMU.md §11.2) with vCPU processes, while dirty logging is enabled and disabled under them.

The vCPUs are the real worker processes (workers/vcpu.py under the
Supervisor).  Iteration 1 writes every page once (the selftest's first pass);
each later iteration k, every vCPU writes `make_value(gfn, vcpu, k)` into its
seeded random pages of one range that all vCPUs share.  The host, meanwhile
and without waiting for the vCPUs, collects the dirty log every few
milliseconds (KVM_GET_DIRTY_LOG, or with manual protect GET + CLEAR after an
INITIALLY_SET enable), and now and then disables logging (collapsible zaps
under the read lock) and enables it again (write protection under the read
lock) while the writers run.

After each collection (`DirtyLogOracle.collect`):
  - no false negative: a page whose contents changed between the previous
    collection and this one is reported by this one or the next (a write that
    lands after its bit was harvested faults again and is reported next time);
  - a page that changed holds a value of the iteration running now, naming
    itself; every page's value names itself and no later iteration;
  - false positives (reported, unchanged, and not owed from before) are counted.
At the end every page holds the value of the last iteration that wrote it,
from one of the vCPUs that wrote it in that iteration (replayed from the
seed), and every checker of shmmmu.checks and every in-flight violation check
passes.  With the write protection at enable switched off
(`no-wrprot-on-enable`) or the mask bit cleared late (`dirty-mask-late-clear`,
which makes the masked re-protection walk past the mask: the work invariant),
the same test fails.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from shmmmu import violations
from shmmmu.checks import check_all
from shmmmu.integrity import check_guest_memory, guest_values
from shmmmu.layout import Ctl, MemslotSpec, VMConfig, Workload, WState
from shmmmu.memslots import Memslots
from shmmmu.stress import harvest
from shmmmu.vm import create_vm
from shmmmu.workloads import (GFN_MASK, ITER_MASK, ITER_SHIFT, WRITE, accesses, make_value, value_gfn,
                              value_iteration, value_vcpu)
from shmmmu.workers.supervisor import Supervisor

# backing -> (memslot backing level, index bits, guest pages): 1 GiB pages need the 8-entry test tables
BACKINGS = {"4k": (1, 9, 2048), "2m": (2, 9, 4096), "1g": (3, 3, 1024)}


@dataclass
class DirtyLogReport:
    iterations: int = 0
    collections: int = 0
    toggles: int = 0
    manual_periods: int = 0
    false_negatives: list[str] = field(default_factory=list)
    false_positives: int = 0
    reported: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.false_negatives + self.problems


class DirtyLogOracle:
    """dirty_log_test's verification, with content snapshots instead of one known writer."""

    def __init__(self, vm):
        self.vm = vm
        self.values = guest_values(vm)            # the baseline: taken after enable returned
        self.gfns = np.arange(self.values.size, dtype=np.uint64) + np.uint64(Memslots(vm).read(0).base_gfn)
        self.owed = np.zeros(self.values.size, dtype=bool)

    def collect(self, bitmap: np.ndarray, iteration: int, report: DirtyLogReport) -> None:
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: self.values.size].astype(bool)
        now = guest_values(self.vm)
        changed = now != self.values
        report.collections += 1
        report.reported += int(bits.sum())
        # (a) what changed before the last collection and was not reported then must be reported now
        for i in np.flatnonzero(self.owed & ~bits)[:5]:
            report.false_negatives.append(f"dirty-log-missed: gfn {int(self.gfns[i]):#x} changed before "
                                          f"collection {report.collections - 1} and was never reported")
        report.false_positives += int((bits & ~changed & ~self.owed).sum())
        # (b) values: each names its page and no later iteration; a page that changed was written now
        written = now != 0
        bad_gfn = written & ((now & np.uint64(GFN_MASK)) != (self.gfns & np.uint64(GFN_MASK)))
        it = (now >> np.uint64(ITER_SHIFT)) & np.uint64(ITER_MASK)
        bad_iter = written & (it > np.uint64(iteration))
        bad_iter |= changed & (it != np.uint64(iteration))
        for i in np.flatnonzero(bad_gfn | bad_iter)[:5]:
            report.problems.append(f"dirty-log-value: gfn {int(self.gfns[i]):#x} holds {int(now[i]):#x} in "
                                   f"iteration {iteration}")
        self.owed = changed & ~bits
        self.values = now


def expected_last_values(wl: dict, base_gfn: int, n_vcpus: int, iterations: int, seed: int,
                         npages: int) -> tuple[np.ndarray, np.ndarray]:
    """(last iteration that wrote each page or 0, bitmask of the vCPUs that wrote it then), replayed."""
    last = np.zeros(npages, dtype=np.int64)
    writers = np.zeros(npages, dtype=np.int64)
    for k in range(1, iterations + 1):
        wk = np.zeros(npages, dtype=np.int64)
        for v in range(n_vcpus):
            gfns, kinds = accesses(wl, base_gfn, v, k, seed)
            idx = gfns[kinds == WRITE] - base_gfn
            wk[idx] |= 1 << v
        sel = wk != 0
        last[sel] = k
        writers[sel] = wk[sel]
    return last, writers


def run_dirty_log_test(name: str, vcpus: int, backing: str, lock_mode: str, bugs: tuple[str, ...] = (),
                       iterations: int = 9, seed: int = 1, toggle_every: int = 3,
                       kernel: str = "5.13") -> DirtyLogReport:
    """One case: populate, then `iterations` iterations with concurrent collections; logging is turned off and
    on again at the start of every `toggle_every`-th one (the writers running).  An amount of work, not of
    time: the same on a loaded machine."""
    level, bits, pages = BACKINGS[backing]
    wl = Workload(kind="random", pages=pages // vcpus, overlap=True, n_vcpus=vcpus, accesses=192,
                  write_fraction=1.0, populate_first=True)
    cfg = VMConfig(name=name, n_vcpus=vcpus, bits=bits, lock_mode=lock_mode, memslots=[MemslotSpec(0, pages, level)],
                   debug=True, bugs=list(bugs), seed=seed, workload=wl, tlb_entries=256, kernel=kernel)
    rep = DirtyLogReport()
    rng = random.Random(seed)
    with create_vm(cfg) as vm:
        sup = Supervisor(vm)
        try:
            sup.start()
            sup.lock_bound = 30.0
            mmu = sup.mmu
            ctl, ws = vm.region.words("ctl"), vm.region.words("wstate")

            def publish(k: int) -> None:
                ctl.store(Ctl.ITERATION, k)

            def done(k: int) -> bool:
                sup.check()
                return all(ws.load(i * WState.WORDS + WState.ITERATION) == k for i in range(vcpus))

            sup.run_iteration(1, timeout=60)                  # the first pass: every page written, no logging
            rep.iterations = 1
            logging, manual, oracle = False, False, None
            periods = 0
            k = 1
            for k in range(2, iterations + 2):
                publish(k)
                first = True
                while True:
                    finished = done(k)
                    if not logging:
                        # enable while the writers run: write protection under the read lock races their faults
                        manual = periods % 2 == 1                 # INITIALLY_SET + GET/CLEAR every other period
                        mmu.enable_dirty_logging(0, initially_set=manual)
                        oracle = DirtyLogOracle(vm)
                        logging, periods = True, periods + 1
                        rep.manual_periods += manual
                    else:
                        oracle.collect(harvest(mmu, manual), k, rep)
                        if first and k % toggle_every == 0:
                            oracle.collect(harvest(mmu, manual), k, rep)      # settles what the last one owed
                            mmu.disable_dirty_logging(0)                      # collapsible zaps, writers running
                            logging, oracle = False, None
                            rep.toggles += 1
                    first = False
                    if finished and logging:
                        break
                    time.sleep(rng.uniform(0.001, 0.008))
                rep.iterations = k - 1
            # writers idle: two collections settle everything, then logging goes off
            if not logging:
                mmu.enable_dirty_logging(0, initially_set=False)
                oracle = DirtyLogOracle(vm)
                manual = False
            oracle.collect(harvest(mmu, manual), k, rep)
            oracle.collect(harvest(mmu, manual), k, rep)
            rep.problems += [str(p) for p in check_all(vm, stats=False)]      # includes: no writable huge leaf
            mmu.disable_dirty_logging(0)
            sup.stop()
            sup.drain()
            sup.stats()
            rep.problems += [f"{v.kind}: worker {v.worker} gfn {v.gfn:#x} ({v.a:#x}, {v.b:#x})"
                             for v in violations.read_all(vm.region)]
            rep.problems += check_guest_memory(vm)
            rep.problems += [str(p) for p in check_all(vm)]
            # every page holds its last written value
            slot = Memslots(vm).read(0)
            last, writers = expected_last_values(wl, slot.base_gfn, vcpus, k, seed, pages)
            vals = guest_values(vm)
            for i in range(pages):
                v = int(vals[i])
                ok = (v == 0 and last[i] == 0) or (
                    v != 0 and value_iteration(v) == last[i] and (writers[i] >> value_vcpu(v)) & 1
                    and value_gfn(v) == (slot.base_gfn + i) & GFN_MASK)
                if not ok:
                    rep.problems.append(f"final-value: gfn {slot.base_gfn + i:#x} holds {v:#x}, last written in "
                                        f"iteration {int(last[i])} by vCPUs {int(writers[i]):#b}")
                    if len(rep.problems) > 40:
                        break
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()
    return rep


def test_values_name_gfn_vcpu_and_iteration() -> None:
    """The iteration field is bits 40-62 (bit 63 marks a written value; it used to be read back as part of it)."""
    for gfn, vcpu, it in [(0, 0, 1), (0x12345, 3, 2), (GFN_MASK, 255, ITER_MASK)]:
        v = make_value(gfn, vcpu, it)
        assert v >> 63 == 1 and v < 1 << 64
        assert (value_gfn(v), value_vcpu(v), value_iteration(v)) == (gfn, vcpu, it)


@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
def test_clear_dirty_log_over_a_2m_leaf_that_starts_below_the_word(vm_name: str, lock_mode: str) -> None:
    """CLEAR_DIRTY_LOG after an INITIALLY_SET enable, with 2 MiB leaves of 512-entry tables still mapped: the
    walk of a bitmap word meets the huge leaf covering it, which starts 64..448 pages below the word.

    clear_dirty_pt_masked computed the word's bit for that leaf before skipping huge leaves: a negative
    shift (ValueError) for every word but the first of each 2 MiB page.  The kernel tests the level first.
    """
    from shmmmu.guest import Vcpu
    from shmmmu.mmu import Mmu
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=9, lock_mode=lock_mode, memslots=[MemslotSpec(0, 1024, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        for g in range(0, 1024, 64):
            v.write(g, make_value(g, 0, 1))
        v.exit()
        assert host.enable_dirty_logging(0, initially_set=True) == 2         # two 2M leaves protected
        bitmap = host.get_dirty_log(0, clear=False)
        assert host.clear_dirty_log(0, 0, bitmap) == 1024
        v.enter()
        v.write(700, make_value(700, 0, 2))                                   # splits, maps 4K, logs
        v.exit()
        got = host.get_dirty_log(0, clear=False)
        assert int(got[700 // 64]) == 1 << (700 % 64) and int(got.sum()) == 1 << (700 % 64)
        host.disable_dirty_logging(0)
        v.mmu.publish_stats()
        host.publish_stats()
        assert check_all(vm) == []


def _assert_clean(rep: DirtyLogReport, iterations: int = 9, toggle_every: int = 3) -> None:
    assert rep.failures == [], rep.failures[:10]
    # the work asked for was done (counted, not timed)
    assert rep.iterations == iterations and rep.collections >= iterations, rep
    assert rep.toggles == (iterations + 1) // toggle_every and rep.manual_periods >= 1, rep
    assert rep.reported > 0


QUICK = [(1, "4k", "shared"), (2, "2m", "shared"), (4, "1g", "shared"), (2, "2m", "exclusive")]
MATRIX = [(v, b, m) for v in (1, 2, 4) for b in ("4k", "2m", "1g") for m in ("shared", "exclusive")]


@pytest.mark.parametrize("vcpus,backing,lock_mode", QUICK)
def test_dirty_log_quick(vm_name: str, vcpus: int, backing: str, lock_mode: str) -> None:
    _assert_clean(run_dirty_log_test(vm_name, vcpus, backing, lock_mode))


@pytest.mark.slow
@pytest.mark.parametrize("vcpus,backing,lock_mode", [c for c in MATRIX if c not in QUICK])
def test_dirty_log_matrix(vm_name: str, vcpus: int, backing: str, lock_mode: str) -> None:
    _assert_clean(run_dirty_log_test(vm_name, vcpus, backing, lock_mode, iterations=12), iterations=12)


@pytest.mark.parametrize("vcpus,backing", [(2, "2m"), (4, "1g")])
def test_dirty_log_612(vm_name: str, vcpus: int, backing: str) -> None:
    """The 6.12 profile: enabling splits the huge pages eagerly, and write faults on the protected leaves are fixed
    by the lockless fast page fault, while the host collects and toggles logging under the writers."""
    _assert_clean(run_dirty_log_test(vm_name, vcpus, backing, "shared", kernel="6.12"))


def test_no_wrprot_on_enable_fails(vm_name: str) -> None:
    """Writable mappings left at enable take writes that are never logged: false negatives."""
    rep = run_dirty_log_test(vm_name, 2, "2m", "shared", bugs=("no-wrprot-on-enable",))
    assert any(f.startswith("dirty-log-missed") for f in rep.failures), rep.failures[:5]


def test_dirty_mask_late_clear_fails(vm_name: str) -> None:
    """The mask bit cleared after the skip of an already protected page: the masked re-protection walks on past
    the pages it was asked for (the f1b3b06a058b work invariant, KVM_TDP_MMU.md §12 K3)."""
    rep = run_dirty_log_test(vm_name, 1, "4k", "shared", bugs=("dirty-mask-late-clear",))
    assert any(f.startswith("mask-walk-overrun") for f in rep.failures), rep.failures[:5]


def test_bench_enable_dirty_tool_runs() -> None:
    """tools/bench_enable_dirty.py end to end on a small slot (docs/perf/history.md has the 4 GiB figures)."""
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_enable_dirty.py"
    p = subprocess.run([sys.executable, str(tool), "--gib", "0.015625", "--repeat", "2", "--max-s", "5"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4096 writable 4K leaves" in p.stdout and "[exclusive] enable dirty logging" in p.stdout
    assert "per-entry iterator / batch enable" in p.stdout
