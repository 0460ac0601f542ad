"""Roots (KVM_TDP_MMU.md C5, C6): reference counts, roles, fast invalidation of memslot deletion, the notifier's range.

The memslot tests delete the hot-plug slot while 2, 4 and 8 vCPU processes
fault into both slots, through the supervisor that `shmmmu run` and `stress`
use, and then look at the region: no root maps the deleted slot, the roots
that were invalidated are freed once their vCPUs reloaded and a grace period
passed, and faults were fixed into the new roots while a zap of the old ones
was running.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import wait_until

from shmmmu import checks
from shmmmu import spte as S
from shmmmu.guest import Vcpu
from shmmmu.layout import STAT, Ctl, MemslotSpec, RootRow, TableState, TMeta, VMConfig, Workload, WState
from shmmmu.mmu import RET_PF_FIXED, RET_PF_RETRY, Mmu
from shmmmu.snapshot import snapshot, walk_tables
from shmmmu.vm import create_vm
from shmmmu.workloads import WRITE, make_value
from shmmmu.workers.supervisor import Supervisor


def _two_slots(name: str, vcpus: int, **kw) -> VMConfig:
    wl = Workload(kind="stress", pages=320, overlap=True, n_vcpus=1, accesses=512, write_fraction=0.5)
    return VMConfig(name=name, n_vcpus=vcpus, bits=3, memslots=[MemslotSpec(0, 256, 1), MemslotSpec(256, 64, 1)],
                    debug=True, workload=wl, tlb_entries=64, **kw)


def _mapped_in(snap, start: int, end: int) -> list[tuple[int, int]]:
    """(root row, gfn) of every leaf of any root that maps a GFN of [start, end)."""
    w = walk_tables(snap)
    g = snap.geometry
    span = np.array([g.pages(int(lv)) for lv in w.leaf_level], dtype=np.int64)
    hit = (w.leaf_gfn < end) & (w.leaf_gfn + span > start)
    return list(zip(w.leaf_root[hit].tolist(), w.leaf_gfn[hit].tolist()))


@pytest.mark.parametrize("vcpus", [2, 4, 8])
def test_memslot_deletion_by_fast_invalidation_while_vcpus_fault(vm_name: str, vcpus: int) -> None:
    cfg = _two_slots(vm_name, vcpus, root_roles=2)
    with create_vm(cfg) as vm:
        sup = Supervisor(vm)
        try:
            sup.start()
            ctl = vm.region.words("ctl")
            ctl.store(Ctl.ITERATION, 1)              # a stress iteration runs until Ctl.STOP
            host = sup.mmu
            deletions = 0
            during = 0
            tm = vm.region.words("tmeta")

            def gen(t: int) -> int:
                return tm.load(t * TMeta.WORDS + TMeta.GEN)
            ws = vm.region.words("wstate")
            # every vCPU runs and holds its root
            wait_until(lambda: sup.check() or all(ws.load(i * WState.WORDS + WState.ROOT) for i in range(vcpus)),
                       "the vCPUs loading their roots")
            # deletions go on until a fault was fixed during one of them (an amount of work, not of time)
            while deletions < 10 or during == 0:
                assert deletions < 100_000, "no fault was fixed during 100,000 fast zaps"
                sup.check()
                time.sleep(0.01)                     # the vCPUs map both slots meanwhile
                old = {(r["table"], gen(r["table"])) for r in snapshot(vm).root_rows()}
                assert old
                host.delete_memslot(1)
                deletions += 1
                snap = snapshot(vm)
                # no root, valid or not, maps the deleted slot once the deletion returned
                assert _mapped_in(snap, 256, 320) == []
                # the old roots are invalid now (a table freed and reused since has a new generation) ...
                assert all(r["invalid"] for r in snap.root_rows()
                           if (r["table"], int(snap.tmeta[r["table"], TMeta.GEN])) in old)
                # ... and freed once their vCPUs reloaded and a grace period passed
                wait_until(lambda: sup.check() or not any(gen(t) == g for t, g in old),
                           "the invalidated roots being freed", poll_s=0.002)
                host.add_memslot(1)
                during = sup.stats()["faults_during_fast_zap"]
            sup.stop()
            sup.drain()
            st = sup.stats()
            assert st["fast_zaps"] == deletions
            # faults were fixed into the new roots while the old ones were being zapped
            assert st["faults_during_fast_zap"] > 0, f"no fault was fixed during {deletions} fast zaps"
            # every root allocated is freed but the ones the vCPUs still hold, and each vCPU reloaded
            alive = snapshot(vm).root_rows()
            assert st["roots_freed"] == st["roots_allocated"] - len(alive) and 1 <= len(alive) <= 2
            assert st["root_reloads"] >= deletions
            problems = [str(p) for p in checks.check_all(vm)]
            assert problems == [], problems
            assert host.destroy() == 0
            assert snapshot(vm).root_rows() == []
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()


def test_a_vcpu_reuses_a_valid_root_of_its_role_and_the_last_put_frees_it(vm_name: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=3, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True, root_roles=2)
    with create_vm(cfg) as vm:
        v = [Vcpu(vm, i) for i in range(3)]
        for x in v:
            x.enter()
            x.write(1, make_value(1, x.index, 1))
            x.exit()
        rows = snapshot(vm).root_rows()
        # vCPUs 0 and 2 share the role-0 root, vCPU 1 has its own
        assert sorted((r["role"], r["count"], tuple(r["holders"])) for r in rows) == [(0, 2, (0, 2)), (1, 1, (1,))]
        assert v[0].mmu.root == v[2].mmu.root != v[1].mmu.root
        # the same GFN is mapped in both roots, each table reachable from exactly one
        w = walk_tables(snapshot(vm))
        assert sorted(set(w.leaf_root.tolist())) == sorted(r["row"] for r in rows)
        assert checks.check_all(vm, stats=False) == []
        # a subtree hung under both roots is reached twice: every live table hangs from exactly one root
        tables = vm.region.array("tables")
        a, b = v[0].mmu.root, v[1].mmu.root
        saved = int(tables[b, 0])
        tables[b, 0] = tables[a, 0]
        assert any("reached twice" in str(p) for p in checks.check_table_structure(vm))
        tables[b, 0] = saved
        host = Mmu(vm, cfg.host_worker)
        host.zap_gfn_range_locked(0, 64)                 # both roots are walked
        assert checks.count_leaves(vm) == {1: 0, 2: 0, 3: 0}
        # unload vCPU 1: its root's last reference goes, the root is unlisted, zapped and retired
        t1 = v[1].mmu.root
        v[1].mmu.kvm_mmu_unload()
        assert [r["role"] for r in snapshot(vm).root_rows()] == [0]
        assert vm.region.words("tmeta").load(t1 * TMeta.WORDS + TMeta.STATE) == TableState.RETIRED
        assert checks.check_all(vm, stats=False) == []
        assert host.destroy() == 0


def test_a_fault_on_an_invalidated_root_retries_and_the_vcpu_reloads(vm_name: str) -> None:
    """a955cad84cda: the fault took its root before the invalidation; under the lock it sees the root invalid
    and retries; the guest entry then takes the reload request and the access completes in a new root."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 32, 1), MemslotSpec(32, 32, 1)],
                   debug=True)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        v.enter()
        v.write(1, make_value(1, 0, 1))
        v.exit()
        old = v.mmu.root
        host = Mmu(vm, cfg.host_worker)
        host.delete_memslot(1)
        assert v.mmu.page_fault(2, True) == RET_PF_RETRY          # still on the invalid root
        assert v.mmu.st[STAT["stale_root_retries"]] == 1
        v.enter()                                                 # KVM_REQ_MMU_RELOAD: unload, load
        v.write(2, make_value(2, 0, 1))
        v.exit()
        assert v.mmu.root != old
        assert [r["invalid"] for r in snapshot(vm).root_rows()] == [False]
        assert checks.check_all(vm, stats=False) == []


def test_check_roots_catches_counts_holders_and_entries_behind_the_zap(vm_name: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=2, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True)
    with create_vm(cfg) as vm:
        v = [Vcpu(vm, i) for i in range(2)]
        for x in v:
            x.enter()
            x.read(3)
            x.exit()
        assert checks.check_roots(vm) == []
        rw = vm.region.words("roots")
        row = v[0].mmu.root_row
        rw.store(row * RootRow.WORDS + RootRow.COUNT, 3)                 # one reference nobody holds
        assert any("count 3, held by 2" in str(p) for p in checks.check_roots(vm))
        rw.store(row * RootRow.WORDS + RootRow.COUNT, 2)
        ws = vm.region.words("wstate")
        ws.store(2 * WState.WORDS + WState.ROOT, 9)                       # a holder of an unlisted row
        assert any("not listed" in str(p) for p in checks.check_roots(vm))
        ws.store(2 * WState.WORDS + WState.ROOT, 0)
        rw.store(row * RootRow.WORDS + RootRow.INVALID, 1)                # invalid, zapped, yet mapped
        rw.store(row * RootRow.WORDS + RootRow.ZAPPED, 1)
        kinds = {p.kind for p in checks.check_roots(vm)}
        assert "install-into-invalid-root" in kinds
        rw.store(row * RootRow.WORDS + RootRow.INVALID, 0)
        rw.store(row * RootRow.WORDS + RootRow.ZAPPED, 0)
        assert checks.check_roots(vm) == []


def test_notifier_ranges_merge_and_faults_in_the_union_retry(vm_name: str) -> None:
    """5.13's kvm_inc_notifier_count: a second invalidation while one is in progress widens the range."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        v.enter()
        v.exit()
        host = Mmu(vm, cfg.host_worker)
        host.lock.write_lock()
        host.kvm_inc_notifier_count(8, 16)
        host.kvm_inc_notifier_count(40, 48)
        host.lock.write_unlock()
        ctl = vm.region.words("ctl")
        assert (ctl.load(Ctl.NOTIFIER_COUNT), ctl.load(Ctl.NOTIFIER_START), ctl.load(Ctl.NOTIFIER_END)) == (2, 8, 48)
        assert v.mmu.page_fault(20, True) == RET_PF_RETRY            # inside the merged range, outside both
        assert v.mmu.page_fault(50, True) == RET_PF_FIXED
        host.lock.write_lock()
        host.kvm_dec_notifier_count()
        host.kvm_dec_notifier_count()
        host.lock.write_unlock()
        assert v.mmu.page_fault(20, True) == RET_PF_FIXED


def test_host_unmap_leaves_no_root_mapping_the_range(vm_name: str) -> None:
    """The notifier zaps every root, the invalid ones included (d62007edf01f)."""
    cfg = VMConfig(name=vm_name, n_vcpus=2, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True, root_roles=2)
    with create_vm(cfg) as vm:
        v = [Vcpu(vm, i) for i in range(2)]
        for x in v:
            x.enter()
            for g in range(0, 16):
                x.write(g, make_value(g, x.index, 1)) if g % 2 else x.read(g)
            x.exit()
        host = Mmu(vm, cfg.host_worker)
        host.zap_all_fast_invalidate()                   # invalid roots, not yet zapped
        host.host_unmap(4, 12)
        assert _mapped_in(snapshot(vm), 4, 12) == []
        assert vm.region.words("ctl").load(Ctl.VIOLATIONS) == 0
        host.zap_all_fast_zap()
        for x in v:
            x.enter()
            x.read(1)
            x.exit()
        assert checks.check_all(vm, stats=False) == []


@pytest.mark.parametrize("bug, kind", [("unmap-skips-invalid-roots", "mapping-after-unmap")])
def test_the_unmap_checker_catches_a_skipped_invalid_root(vm_name: str, bug: str, kind: str) -> None:
    """The same sequence with 5.16-5.17's notifier root walk (7533377215b6 without d62007edf01f): the notifier
    returns while the invalid roots map it."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True, bugs=[bug])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        v.enter()
        v.write(5, make_value(5, 0, 1))
        v.exit()
        host = Mmu(vm, cfg.host_worker)
        host.zap_all_fast_invalidate()
        host.host_unmap(4, 8)
        from shmmmu import violations
        assert {x.kind for x in violations.read_all(vm.region)} == {kind}
        assert _mapped_in(snapshot(vm), 4, 8) != []
