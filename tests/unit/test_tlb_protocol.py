"""The processor as hardware is: paging-structure caches, A/D re-walks without an exit, flushes heard of by a kick.

kvm_flush_remote_tlbs sets KVM_REQ_TLB_FLUSH for every vCPU, kicks those in
guest mode and waits until each has taken its IPI (a VM exit at an access
boundary); the vCPU flushes its TLB and paging-structure caches as it enters
again.  Here the flusher is replaced, in the test only, by one that requests
and kicks but does not wait.  The explorer (which runs the Python processor,
every shared-word access a scheduling point) then finds, in one preemption, a
vCPU that keeps translating through what the flush should have removed until
its kick arrives: a write through the stale translation into the page the host
migrated away, and a walk that starts from a paging-structure-cache entry into
a table the reclaimer freed after the flush returned.  With the real flusher
the same searches are exhaustive at their bound and clean.

The paging-structure caches make a later walk, not only one in flight, reach
a table freed before the flush that covers it: a teardown that leaves its
flush to its caller, after the RCU read-side section (the shape of the
bug 5.18's "Do remote TLB flush before dropping RCU in TDP MMU resched" fixed), is found through them under the write
lock (`psc-unmap`), and is harmless under the read lock (`psc-free`), where
5.13's tdp_mmu_zap_spte_atomic flushes inside the section.  A lost A/D
compare-exchange walks again inside the processor: the kernel sees no fault.
"""
from __future__ import annotations

import numpy as np
import pytest

from shmmmu.explore.explorer import Explorer
from shmmmu.explore.report import ExploreOptions, run_explore, run_replay
from shmmmu.explore.scenarios import SCENARIOS
from shmmmu.explore.split import split_search
from shmmmu.guest import Vcpu
from shmmmu import spte as S
from shmmmu import violations
from shmmmu.layout import STAT, MemslotSpec, Request, TableState, TlbMode, TMeta, VMConfig
from shmmmu.mmu import Mmu
from shmmmu.mmu.tdp_mmu import TdpMmu
from shmmmu.pool import POISON
from shmmmu.tlb import TlbControl
from shmmmu.vm import create_vm
from shmmmu.workloads import make_value


def flush_without_waiting(self: TlbControl, timeout: float = 30.0) -> None:
    """kvm_flush_remote_tlbs with its wait left out: every vCPU's request set and the ones in guest mode kicked,
    then back at once (the flusher's own caches flushed, as the real one does)."""
    if self.tlb is not None:
        self.tlb.flush_local()
    self.make_all_cpus_request()
    self.flushes += 1


# scenario, the DFS bound that is exhaustive for it in a few thousand executions, what the stale use shows as
CASES = {
    "kick-unmap": (2, {"stale-translation", "write-to-unmapped-host-page"}),
    "psc-free": (1, {"poison-read", "use-after-free"}),
    "psc-unmap": (1, {"poison-read", "use-after-free", "write-to-unmapped-host-page"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_real_flush_is_clean_and_exhaustive(name: str) -> None:
    bound, _ = CASES[name]
    with Explorer(SCENARIOS[name], []) as ex:
        sr = split_search(ex, bound, 20000)
    assert sr.first is None, sr.first.finding
    assert sr.exhausted and sr.bound_done == bound, (sr.executions, sr.bound_done)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_flush_that_does_not_wait_is_caught(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vCPU is preempted between its kick check and its use of the cached translation or paging-structure
    entry; the flusher returns without waiting, the host goes on (migrates the page; the reclaimer frees the
    table), and the vCPU's access reaches what was freed: one preemption, the same execution on replay."""
    _, kinds = CASES[name]
    monkeypatch.setattr(TlbControl, "flush_remote_tlbs", flush_without_waiting)
    rep = run_explore(ExploreOptions(scenario=name, strategy="dfs", preemptions=1))
    assert rep.found is not None, f"{name}: no finding in {rep.search.executions} executions"
    assert rep.found.preemptions == 1
    kind = rep.found.finding.message.split(":")[0]
    assert kind in kinds, rep.found.finding.message
    again = run_replay(rep.token)
    assert again.same, again.differences
    assert str(again.result.finding) == str(rep.found.finding)


def test_a_kick_is_taken_at_an_access_boundary_and_its_requests_at_entry(vm_name: str) -> None:
    """The request and kick, step by step in one process: a vCPU in guest mode kicked by a flusher that does not
    wait still translates through its TLB (the flusher could not have returned yet) until its next access, which
    takes the VM exit, flushes at entry and walks again; a vCPU outside guest mode is not kicked, only asked."""
    cfg = VMConfig(name=vm_name, n_vcpus=2, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True)
    with create_vm(cfg) as vm:
        for processor in ("c", "python"):
            v = Vcpu(vm, 0, processor=processor)
            other = Vcpu(vm, 1, processor=processor)
            host = Mmu(vm, cfg.host_worker)
            ws = vm.region.words("wstate")
            try:
                v.enter()
                v.write(5, make_value(5, 0, 1))
                v.read(6)                                        # the same 4K table: a paging-structure hit
                v.sync_counters()
                walks, hits = v.st[STAT["hw_walks"]], v.st[STAT["psc_hits"]]
                assert hits >= 1
                assert host.tlbctl.make_all_cpus_request() == [0]      # vCPU 1 is outside guest mode
                assert ws.load(v.tlbctl.mode_word) == TlbMode.EXITING
                assert ws.load(other.tlbctl.req_word) == Request.TLB_FLUSH
                assert v.tlb.lookup(5) is not None and v.tlb.psc_snapshot()     # nothing flushed yet
                v.read(5)                                        # the kick: exit, flush at entry, walk again
                v.sync_counters()
                assert v.st[STAT["kicks"]] == 1 and v.st[STAT["hw_walks"]] == walks + 1
                assert ws.load(v.tlbctl.mode_word) == TlbMode.IN_GUEST and ws.load(v.tlbctl.req_word) == 0
                other.enter()                                    # the request taken on entry, no kick
                assert ws.load(other.tlbctl.req_word) == 0
                other.exit()
                v.exit()
            finally:
                v.release()
                other.release()


_HANDLE_REMOVED = TdpMmu.handle_removed_pt


def handle_removed_flush_left_to_caller(self: TdpMmu, table: int, shared: bool) -> None:
    """handle_removed_tdp_mmu_page with its flush left to the caller (as 5.18's "Defer TLB flush to caller when
    freeing TDP MMU shadow pages" did), on 5.13's callers: the tables go to call_rcu owing a flush, and under the write lock the walk's RCU read-side section
    ends before the caller flushes, so a grace period may free them first."""
    kvm = self.kvm
    had = kvm.__dict__.get("kvm_flush_remote_tlbs")
    kvm.kvm_flush_remote_tlbs = lambda: None
    try:
        _HANDLE_REMOVED(self, table, shared)
    finally:
        if had is None:
            del kvm.kvm_flush_remote_tlbs
        else:
            kvm.kvm_flush_remote_tlbs = had


def test_a_teardown_that_frees_before_its_flush_is_caught_by_a_hardware_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the teardown's flush left to its caller, the MMU notifier's unmap (write lock) retires the table, ends
    its RCU section, the reclaimer frees the table, and the vCPU's walk reaches it (from its paging-structure cache
    or in flight) before the flush: one preemption.  Under the read lock (psc-free) the same change is harmless:
    tdp_mmu_zap_spte_atomic flushes before the section ends, and the search is exhaustive and clean."""
    monkeypatch.setattr(TdpMmu, "handle_removed_pt", handle_removed_flush_left_to_caller)
    rep = run_explore(ExploreOptions(scenario="psc-unmap", strategy="dfs", preemptions=1))
    assert rep.found is not None, f"no finding in {rep.search.executions} executions"
    assert rep.found.preemptions == 1
    kind = rep.found.finding.message.split(":")[0]
    assert kind in {"poison-read", "use-after-free"}, rep.found.finding.message
    again = run_replay(rep.token)
    assert again.same, again.differences
    with Explorer(SCENARIOS["psc-free"], []) as ex:
        sr = split_search(ex, 1, 20000)
    assert sr.first is None, sr.first.finding
    assert sr.exhausted and sr.bound_done == 1


def _path(vm, v: Vcpu, gfn: int) -> list[int]:
    """The entries (words of the tables array) on gfn's 4K path from the vCPU's root, root level first."""
    tables = vm.region.array("tables")
    E, bits, table, path = tables.shape[1], vm.config.bits, v.mmu.root, []
    for level in range(v.root_level, 0, -1):
        path.append(table * E + ((gfn >> (bits * (level - 1))) & (E - 1)))
        e = int(tables.reshape(-1)[path[-1]])
        assert e & S.MMU_PRESENT and not e & S.LARGE
        table = S.pfn(e)
    return path


def _free_unflushed(vm, v: Vcpu, gfn: int) -> int:
    """The 4K table on gfn's path cut from its parent and freed (poisoned, its generation moved, as Pool.free
    leaves it in debug mode) with no flush at all; the table."""
    tables, tmeta = vm.region.array("tables"), vm.region.array("tmeta")
    parent = _path(vm, v, gfn)[-2]
    table = S.pfn(int(tables.reshape(-1)[parent]))
    assert tmeta[table, TMeta.STATE] == TableState.LIVE
    tables.reshape(-1)[parent] = 0
    tables[table] = POISON
    tmeta[table, TMeta.GEN] += 1
    return table


@pytest.mark.parametrize("processor", ["c", "python"])
def test_a_later_walk_reaches_a_freed_table_through_the_paging_structure_cache(vm_name: str, processor: str) -> None:
    """Not a walk in flight: the vCPU finished its access, the table is cut and freed with no flush, and the next
    TLB miss in the same table starts from the cached entry and reads the freed table (use-after-free: the
    generation moved since it was cached).  Once the vCPU has taken a flush request, the same miss walks from
    the root, finds the cut entry and faults: nothing freed is read."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0, processor=processor)
        host = Mmu(vm, cfg.host_worker)
        try:
            v.enter()
            v.write(5, make_value(5, 0, 1))
            v.read(6)                                      # caches the entries on the path of 5 and 6
            table = _free_unflushed(vm, v, 5)
            v.read(7)                                      # a TLB miss in the same table: from the cached entry
            got = [(x.kind, x.where, x.a) for x in violations.read_all(vm.region)]
            assert got[0] == ("use-after-free", "guest.py:Vcpu.walk_report", table), got
            n = violations.count(vm.region)
            assert host.tlbctl.make_all_cpus_request() == [0]
            v.sync_counters()
            faults = v.st[STAT["faults"]]
            v.read(4)                                      # the kick, the flush at entry, a walk from the root
            v.sync_counters()
            assert v.st[STAT["faults"]] == faults + 1
            assert violations.count(vm.region) == n
            v.exit()
        finally:
            v.release()


@pytest.mark.parametrize("processor", ["c", "python"])
def test_a_lost_ad_update_walks_again_inside_the_processor(vm_name: str, processor: str) -> None:
    """Another processor's A/D update lands between the walk's read of the leaf and its compare-exchange (the
    seam ad_race_every=1): the compare-exchange fails and the processor walks again, in guest mode, with no exit
    and no fault the kernel sees; the access completes through the leaf the other update left."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0, processor=processor)
        ws, tables = vm.region.words("wstate"), vm.region.array("tables").reshape(-1)
        try:
            v.enter()
            v.write(5, make_value(5, 0, 1))
            leaf = _path(vm, v, 5)[-1]
            tables[leaf] &= ~np.uint64(S.ACCESSED | S.DIRTY)    # aged behind the TLB's back
            v.tlb.flush_local()
            if processor == "c":
                v.proc.ad_race_every = 1
            else:
                v.ad_race_every = 1
            v.sync_counters()
            before = {k: v.st[STAT[k]] for k in ("faults", "ad_rewalks", "hw_walks", "kicks")}
            assert v.read(5) == make_value(5, 0, 1)
            v.sync_counters()
            after = {k: v.st[STAT[k]] for k in before}
            assert after == {**before, "ad_rewalks": before["ad_rewalks"] + 1, "hw_walks": before["hw_walks"] + 1}
            assert ws.load(v.tlbctl.mode_word) == TlbMode.IN_GUEST
            assert tables[leaf] & S.ACCESSED
            assert violations.count(vm.region) == 0
            v.exit()
        finally:
            v.release()
