"""The C processor (shmmmu._walker.Processor and Tlb) does what the Python reference does, step for step.

Two VMs built alike run the same random access streams, one through the C loop
(Vcpu(processor="c")) and one through Vcpu.run_batch_reference.  Between chunks
of a batch, while the vCPUs are in guest mode, the same things happen to both
behind their backs: a flush or a root reload is requested and the vCPU kicked
(kvm_make_all_cpus_request, its wait left out), a bare kick, leaves lose A/D
or W or vanish without a flush (debug then sees stale translations), a table
is freed before any flush (cut from its parent, poisoned, its generation
moved: a walk that reaches it through a paging-structure-cache entry reads a
freed table), a host page is poisoned or holds another page's value.  Every
third A/D update loses its compare-exchange to another processor's update
(the test seam ad_race_every), so the walks redo themselves inside the
processor.  Between batches the host runs its real operations: zaps, dirty
logging on and off with GET/CLEAR, aging, notifier unmaps with migration.
Each fault may also request a flush or a root reload while the vCPU is
outside guest mode.  After every batch the two VMs must agree word for word
(tables, guest memory, the host's and the guest's page state, dirty bitmaps,
violations), and so must the vCPUs' counters, TLB and paging-structure-cache
contents, mode and request words, and root.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from shmmmu import spte as S
from shmmmu import violations
from shmmmu.guest import Vcpu
from shmmmu.layout import STAT, Ctl, MemslotSpec, TableState, TlbMode, TMeta, VMConfig
from shmmmu.memslots import DATA_POISON
from shmmmu.mmu import Mmu
from shmmmu.pool import POISON
from shmmmu.vm import create_vm
from shmmmu.workloads import EXEC, READ, WRITE, make_value

_U = np.uint64


class Twin:
    """One of the two VMs: its vCPU (C or reference), a host Mmu, and an RNG of its own for fault-time events."""

    def __init__(self, vm, processor: str, seed: int):
        self.vm = vm
        self.v = Vcpu(vm, 0, processor=processor)
        if processor == "c":
            self.v.proc.ad_race_every = 3
        else:
            self.v.ad_race_every = 3
        self.host = Mmu(vm, vm.config.host_worker)
        self.ctl = vm.region.words("ctl")
        self.faults = 0
        rng = random.Random(seed)
        page_fault = self.v.mmu.page_fault

        def page_fault_then_maybe_flush(gfn: int, write: bool, exec_: bool = False) -> int:
            # the fault is taken outside guest mode (a flusher does not wait for this vCPU meanwhile)
            assert self.mode() == TlbMode.OUTSIDE
            # a remote flush issued while this vCPU is outside guest mode: a request, no kick, seen on entry
            self.faults += 1
            r = page_fault(gfn, write, exec_)
            x = rng.random()
            if x < 0.05:
                assert self.host.tlbctl.make_all_cpus_request() == []
            elif x < 0.06:
                self.ctl.fetch_add(Ctl.ROOTS_GEN, 1)       # kvm_reload_remote_mmus: the request follows
                self.host.tlbctl.make_all_cpus_request()
            elif x < 0.07:
                self.ctl.fetch_add(Ctl.ROOTS_GEN, 1)       # a reload seen on entry alone
            return r
        self.v.mmu.page_fault = page_fault_then_maybe_flush

    def mode(self) -> int:
        """This vCPU's published vcpu->mode."""
        return self.vm.region.words("wstate").load(self.v.tlbctl.mode_word)

    def state(self) -> dict[str, object]:
        r = self.vm.region
        v = self.v
        v.sync_counters()
        return {
            "tables": r.array("tables").copy(), "data": r.array("data").copy(), "touched": r.array("touched").copy(),
            "host_ad": r.array("host_ad").copy(), "dirty": r.array("dirty").copy(),
            "vcpu_row": r.array("wstate")[0].copy(),           # mode, acknowledged flush, root, RCU, cache
            "violations": [(x.kind, x.gfn, x.a, x.b) for x in violations.read_all(r)],
            "st": list(v.st), "tlb": v.tlb.snapshot(), "tlb_size": v.tlb.size, "tlb_flushes": v.tlb.flushes,
            "psc": v.tlb.psc_snapshot(), "root": v.mmu.root, "faults": self.faults,
        }

    def close(self) -> None:
        self.v.release()
        self.v = self.host = None


def in_guest_event(twins: list[Twin], rng: random.Random, hot: list[int]) -> None:
    """Something another CPU does while the vCPUs are in guest mode, alike in both VMs."""
    what = rng.choice(["flush", "reload", "kick", "age", "wrprot", "zap", "free-table", "poison", "foreign", "none"])
    pick = rng.random()
    gfn = rng.choice(hot)
    for t in twins:
        assert t.mode() == TlbMode.IN_GUEST                       # between chunks the vCPU is in guest mode
        r = t.vm.region
        flat = r.array("tables").reshape(-1)
        leaves = np.flatnonzero(((flat & _U(S.MMU_PRESENT)) != 0) & ((flat & _U(S.RWX)) != 0))
        data = r.array("data")
        page = int(r.array("host_map")[gfn])                      # the host page backing gfn now (slot 0)
        if what == "flush":
            assert t.host.tlbctl.make_all_cpus_request() == [0]   # kvm_flush_remote_tlbs, its wait left out
        elif what == "reload":
            t.ctl.fetch_add(Ctl.ROOTS_GEN, 1)                     # kvm_reload_remote_mmus, its wait left out
            t.host.tlbctl.make_all_cpus_request()
        elif what == "kick":
            t.host.tlbctl.wstate.tlb_mode.cas(0, TlbMode.IN_GUEST, TlbMode.EXITING)     # a kick, no request
        elif what == "age" and leaves.size:
            flat[leaves[::3]] &= ~_U(S.ACCESSED | S.DIRTY)        # hardware sets them again on the next walk
        elif what == "wrprot" and leaves.size:
            flat[leaves[::4]] &= ~_U(S.WRITABLE)                  # no flush: TLB writes go stale
        elif what == "zap" and leaves.size:
            k = leaves[int(pick * leaves.size)]
            flat[k] = 0                                           # no flush: TLB hits go stale
        elif what == "free-table":
            free_table_unflushed(t, gfn)
        elif what == "poison":
            data[page] = _U(DATA_POISON)
        elif what == "foreign":
            data[page] = _U(make_value(gfn + 1, 3, 1))              # a value naming another page


def free_table_unflushed(t: Twin, gfn: int) -> None:
    """The lowest table on gfn's path is cut from its parent and freed (poisoned, its generation moved, as
    Pool.free leaves it in debug mode), with no flush: a paging-structure-cache entry still leads there."""
    r = t.vm.region
    tables, tmeta = r.array("tables"), r.array("tmeta")
    E, bits, level, table = tables.shape[1], t.vm.config.bits, t.v.root_level, t.v.mmu.root
    parent = -1
    while level > 1:
        e = int(tables[table, (gfn >> (bits * (level - 1))) & (E - 1)])
        if not e & S.MMU_PRESENT or e & S.LARGE:
            break
        parent, table, level = table * E + ((gfn >> (bits * (level - 1))) & (E - 1)), S.pfn(e), level - 1
    if parent < 0 or tmeta[table, TMeta.STATE] != TableState.LIVE:
        return
    tables.reshape(-1)[parent] = 0
    tables[table] = _U(POISON)
    tmeta[table, TMeta.GEN] += 1


def host_event(twins: list[Twin], rng: random.Random, npages: int) -> None:
    """A host operation through the real MMU while the vCPUs are outside guest mode, alike in both VMs."""
    what = rng.choice(["zap", "log-on", "log-get", "log-off", "age", "unmap", "none"])
    lo = rng.randrange(npages)
    hi = min(npages, lo + rng.randrange(1, 300))
    initially_set = rng.random() < 0.5
    for t in twins:
        h = t.host
        logging = bool(h.slots.slots()[0].flags & 2)
        if what == "zap":
            h.zap_gfn_range_locked(lo, hi)
        elif what == "log-on" and not logging:
            h.enable_dirty_logging(0, initially_set=initially_set)
        elif what == "log-get" and logging:
            h.get_dirty_log(0, clear=True)
        elif what == "log-off" and logging:
            h.disable_dirty_logging(0)
        elif what == "age":
            h.clear_young(lo, hi)
        elif what == "unmap":
            h.host_unmap(lo, hi, migrate=True)


CASES = {
    # name: (bits, memslot backing level, pages, nx_huge_pages, debug, lock mode)
    "4k-debug": (9, 1, 2048, False, True, "shared"),
    "2m-nx-debug": (9, 2, 4096, True, True, "shared"),
    "2m-nodebug": (9, 2, 4096, False, False, "shared"),
    "1g-bits3-nx-debug": (3, 3, 1024, True, True, "shared"),
    "2m-exclusive-debug": (9, 2, 4096, False, True, "exclusive"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_c_processor_matches_the_reference(vm_name: str, case: str) -> None:
    bits, backing, npages, nx, debug, mode = CASES[case]
    seed = sum(map(ord, case))
    cfgs = [VMConfig(name=f"{vm_name}{tag}", n_vcpus=1, bits=bits, memslots=[MemslotSpec(0, npages, backing)],
                     nx_huge_pages=nx, debug=debug, lock_mode=mode, tlb_entries=64, seed=seed, n_tables=4096)
            for tag in ("c", "p")]
    with create_vm(cfgs[0]) as vm_c, create_vm(cfgs[1]) as vm_p:
        twins = [Twin(vm_c, "c", seed), Twin(vm_p, "python", seed)]
        try:
            rng = random.Random(seed)
            hot = rng.sample(range(npages), 64)
            saw = set()
            for step in range(24):
                n = rng.randrange(50, 400)
                # half the accesses on a few hot pages (TLB hits, stale hits), the rest anywhere
                gfns = np.array([rng.choice(hot) if rng.random() < 0.5 else rng.randrange(npages)
                                 for _ in range(n)], dtype=np.int64)
                kinds = np.array([rng.choice((READ, READ, WRITE, WRITE, EXEC)) for _ in range(n)], dtype=np.int8)
                vbase = make_value(0, 0, step + 1)
                for t in twins:
                    t.v.load_batch(gfns, kinds)
                    t.v.enter()
                k = 0
                while k < n:
                    end = min(n, k + rng.randrange(1, 80))
                    for t in twins:
                        t.v.run_batch(k, end, vbase)
                    in_guest_event(twins, rng, hot)
                    k = end
                for t in twins:
                    t.v.exit()
                host_event(twins, rng, npages)
                sc, sp = (t.state() for t in twins)
                for key in sc:
                    if isinstance(sc[key], np.ndarray):
                        assert np.array_equal(sc[key], sp[key]), (case, step, key)
                    else:
                        assert sc[key] == sp[key], (case, step, key)
                saw.update(x[0] for x in sc["violations"])
            # the stream reached the paths it is meant to compare
            st = sc["st"]
            assert sc["faults"] > 100 and sc["tlb_flushes"] > 5
            assert min(st[STAT[k]] for k in ("tlb_hits", "tlb_misses", "hw_walks", "reads", "writes", "fetches",
                                             "psc_hits", "ad_rewalks", "kicks")) > 0
            assert "guest-memory-corrupt" in saw
            if debug:
                assert {"stale-translation", "write-to-unmapped-host-page", "poison-read", "use-after-free"} <= saw
        finally:
            for t in twins:
                t.close()


def test_the_c_loop_and_tlb_refuse_bad_input(vm_name: str) -> None:
    from shmmmu import _walker
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 512, 1)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0, processor="c")
        try:
            with pytest.raises(RuntimeError):
                v.run_batch(0, 1, 0)                      # no batch loaded
            with pytest.raises(ValueError):
                v.proc.batch(np.zeros(3, np.int64), np.zeros(2, np.int8))
            v.load_batch(np.arange(4, dtype=np.int64), np.zeros(4, np.int8))
            with pytest.raises(IndexError):
                v.run_batch(0, 5, 0)                      # past the batch
            with pytest.raises(ValueError):
                _walker.Tlb(0, 4)
            with pytest.raises(ValueError):
                _walker.Tlb(3, 4).insert(0, 5, 0, True)   # no level 5
            with pytest.raises(ValueError):
                Vcpu(vm, 0, processor="rust")
        finally:
            v.release()
