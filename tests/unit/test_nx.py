"""NX huge pages (KVM_TDP_MMU.md §7.2, §10): exec faults map 4 KiB and account their tables on the NX list;
recovery zaps a share of the list so that later non-exec faults map huge pages again.
"""
from __future__ import annotations

import dataclasses

import json
import subprocess
import sys

import pytest

from shmmmu import checks
from shmmmu import spte as S
from shmmmu.guest import Vcpu
from shmmmu.layout import STAT, Ctl, MemslotSpec, TMeta, VMConfig, Workload
from shmmmu.tdp_iter import for_each_leaf
from shmmmu.mmu import Mmu
from shmmmu.vm import create_vm
from shmmmu.trace.formats import TraceError
from shmmmu.trace.store import convert_stream
from shmmmu.workloads import EXEC, READ, WRITE, accesses, trace_chunk


def _leaf(mmu: Mmu, gfn: int) -> tuple[int, int]:
    """(level, spte) of the leaf mapping gfn, or (0, 0)."""
    for it in for_each_leaf(mmu.new_iter(mmu.valid_root(), 1, gfn), gfn + 1):
        return it.level, it.old_spte
    return 0, 0


def _clean(vm, *mmus: Mmu) -> None:
    for m in mmus:
        m.publish_stats()
    assert checks.check_all(vm) == []


@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
def test_exec_fault_maps_4k_and_accounts_the_table(vm_name: str, lock_mode: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=9, lock_mode=lock_mode, nx_huge_pages=True,
                   memslots=[MemslotSpec(0, 2048, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        v.fetch(5)                                   # could be 2M: mapped 4K, executable
        level, spte = _leaf(host, 5)
        assert level == 1 and spte & S.EXECUTABLE
        assert len(host.nx_list()) == 1
        assert vm.region.words("ctl").load(Ctl.NX_COUNT) == 1
        nx_table = host.nx_list()[0]
        assert host.tm.load(nx_table * TMeta.WORDS + TMeta.NX) == 1
        v.read(7)                                    # disallowed_hugepage_adjust: 4K beside it, no new NX table
        assert _leaf(host, 7)[0] == 1 and host.nx_list() == [nx_table]
        v.read(600)                                  # elsewhere: 2M, not executable (the mitigation)
        level, spte = _leaf(host, 600)
        assert level == 2 and not spte & S.EXECUTABLE
        assert v.fetch(600) == 0                     # the TLB entry from the read does not allow the fetch
        assert _leaf(host, 600)[0] == 1              # split: a 4K executable leaf
        assert v.mmu.st[STAT["huge_splits"]] == 1 and v.mmu.st[STAT["fetches"]] == 2
        assert len(host.nx_list()) == 2
        v.exit()
        _clean(vm, v.mmu, host)


def test_exec_fault_on_4k_backing_is_not_accounted(vm_name: str) -> None:
    """req_level 4K: nothing was kept from being huge, so the table is not on the NX list."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=9, nx_huge_pages=True, memslots=[MemslotSpec(0, 1024, 1)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        v.enter()
        v.fetch(3)
        v.exit()
        assert v.mmu.nx_list() == [] and vm.region.words("ctl").load(Ctl.NX_COUNT) == 0
        _clean(vm, v.mmu)


def test_without_nx_exec_faults_map_huge(vm_name: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=9, memslots=[MemslotSpec(0, 1024, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        v.enter()
        v.fetch(3)
        v.exit()
        level, spte = _leaf(v.mmu, 3)
        assert level == 2 and spte & S.EXECUTABLE and v.mmu.nx_list() == []


@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
def test_recovery_zaps_a_share_oldest_first_then_reads_map_huge(vm_name: str, lock_mode: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, lock_mode=lock_mode, nx_huge_pages=True,
                   memslots=[MemslotSpec(0, 1024, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        for region in range(128):                    # 128 2M regions (8 pages each with bits=3)
            v.fetch(region * 8 + 1)
        v.exit()
        order = host.nx_list()
        assert len(order) == 128 and vm.region.words("ctl").load(Ctl.NX_COUNT) == 128
        gfn_of = {t: host.tm.load(t * TMeta.WORDS + TMeta.GFN) for t in order}
        assert [gfn_of[t] for t in order] == [r * 8 for r in range(128)]       # list_add_tail: oldest first
        assert host.recover_nx_lpages() == 3                                   # ceil(128 / 60)
        assert host.nx_list() == order[3:]
        assert host.st[STAT["nx_recovered"]] == 3
        for r in range(3):
            assert _leaf(host, r * 8 + 1) == (0, 0)                            # zapped
        v.enter()
        v.read(0 * 8 + 5)                             # a later non-exec fault maps a 2M page again
        v.write(1 * 8 + 2, 7)
        v.read(3 * 8 + 4)                             # not recovered yet: stays 4K
        v.exit()
        assert _leaf(host, 5)[0] == 2 and _leaf(host, 10)[0] == 2
        assert _leaf(host, 28)[0] == 1
        assert host.recover_nx_lpages(ratio=1) == 125 and host.nx_list() == []
        assert host.recover_nx_lpages() == 0
        _clean(vm, v.mmu, host)


def test_1g_exec_fault_accounts_both_tables_and_recovery_takes_both(vm_name: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, nx_huge_pages=True, memslots=[MemslotSpec(0, 256, 3)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        v.read(70)
        assert _leaf(host, 70)[0] == 3
        v.fetch(70)                                  # split the 1G leaf: a 2M-level and a 4K-level table
        v.exit()
        assert _leaf(host, 70)[0] == 1
        assert len(host.nx_list()) == 2
        _clean(vm, v.mmu, host)
        assert host.recover_nx_lpages(ratio=2) == 1   # the level-2 table, and with it its child
        assert host.nx_list() == []
        v.enter()
        v.read(70)
        v.exit()
        assert _leaf(host, 70)[0] == 3
        _clean(vm, v.mmu, host)


@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
def test_teardown_takes_tables_off_the_nx_list(vm_name: str, lock_mode: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, lock_mode=lock_mode, nx_huge_pages=True,
                   memslots=[MemslotSpec(0, 512, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        for region in range(20):
            v.fetch(region * 8)
        v.exit()
        host.zap_gfn_range_locked(16, 40)             # regions 2..4: middle of the list
        assert len(host.nx_list()) == 17
        _clean(vm, v.mmu, host)
        host.host_unmap(0, 8)                         # the head
        host.enable_dirty_logging(0)
        left = len(host.nx_list())
        assert host.disable_dirty_logging(0) > 0      # 5.13's collapsible zap: the 4K leaves go ...
        assert len(host.nx_list()) == left            # ... their (now empty) tables stay (a fault over a
        # present table stays small while the workaround is on: disallowed_hugepage_adjust), until recovery
        assert host.recover_nx_lpages(ratio=1) == left
        assert host.nx_list() == [] and vm.region.words("ctl").load(Ctl.NX_COUNT) == 0
        _clean(vm, v.mmu, host)


def test_check_nx_list_catches_a_stray_mark(vm_name: str) -> None:
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, nx_huge_pages=True, memslots=[MemslotSpec(0, 64, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        v.enter()
        v.fetch(1)
        v.fetch(9)
        v.exit()
        assert checks.check_nx_list(vm) == []
        t = v.mmu.nx_list()[1]
        v.mmu.tm.store(t * TMeta.WORDS + TMeta.NX_LISTED, 0)    # marked off the list but still linked
        problems = checks.check_nx_list(vm)
        assert problems and "NX list and tables marked listed differ" in str(problems[0])
        v.mmu.tm.store(t * TMeta.WORDS + TMeta.NX_LISTED, 1)
        v.mmu.tm.store(t * TMeta.WORDS + TMeta.NX, 0)           # listed, but nx_huge_page_disallowed cleared
        problems = checks.check_nx_list(vm)
        assert problems and "not marked nx_huge_page_disallowed" in str(problems[0])
        v.mmu.tm.store(t * TMeta.WORDS + TMeta.NX, 1)
        vm.region.words("ctl").store(Ctl.NX_COUNT, 5)
        assert any("nx_lpage_splits" in str(p) for p in checks.check_nx_list(vm))


def test_trace_exec_lines_and_access_kinds(tmp_path) -> None:
    import io
    out = str(tmp_path / "t.bin")
    info = convert_stream(io.BytesIO(b"R 0x1000\nW 0x2000\nX 0x3000\nx 16384\n"), "t", out)
    wl = Workload(kind="trace", pages=8, trace_file=out, trace_pages=info.pages)
    gfns, kinds = trace_chunk(wl, 100, 0, 0)
    # first-touch mapping: the pages in the order the trace touches them
    assert gfns.tolist() == [100, 101, 102, 103] and kinds.tolist() == [READ, WRITE, EXEC, EXEC]
    assert trace_chunk(wl, 100, 0, 1)[0].size == 0
    with pytest.raises(TraceError, match="line 1: unknown access kind 'Q'"):
        convert_stream(io.BytesIO(b"Q 0x1000"), "t", out)
    wl = Workload(kind="random", pages=256, accesses=4000, write_fraction=0.5)
    g0, k0 = accesses(wl, 0, 0, 1, 7)
    g1, k1 = accesses(dataclasses.replace(wl, exec_fraction=0.1), 0, 0, 1, 7)
    assert (g0 == g1).all() and set(k0.tolist()) == {READ, WRITE}
    assert 200 < int((k1 == EXEC).sum()) < 600
    assert ((k1 == k0) | (k1 == EXEC)).all()


def test_stress_with_nx_recovery_in_the_reclaimer() -> None:
    """vCPU processes fetch, read and write; the reclaimer runs recovery passes; every checker passes."""
    p = subprocess.run([sys.executable, "-m", "shmmmu.workers.cli", "stress", "--json", "--duration", "3",
                        "--vcpus", "2", "--seed", "11", "--nx-huge-pages"], capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["result"] == "SUCCESS", r["problems"][:10]
    s = r["stats"]
    assert s["fetches"] > 0 and s["nx_recovery_passes"] >= 3
    assert s["nx_recovered"] > 0, s
    assert "--nx-huge-pages" in r["replay"]
