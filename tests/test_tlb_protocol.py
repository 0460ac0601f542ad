"""The TLB protocol as hardware has it: a vCPU hears of a flush only from its kick, so a flush that does not wait shows.

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
"""
from __future__ import annotations

import pytest

from shmmmu.explore.explorer import Explorer
from shmmmu.explore.report import ExploreOptions, run_explore, run_replay
from shmmmu.explore.scenarios import SCENARIOS
from shmmmu.explore.split import split_search
from shmmmu.guest import Vcpu
from shmmmu.layout import STAT, MemslotSpec, Request, TlbMode, VMConfig
from shmmmu.mmu import Mmu
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
