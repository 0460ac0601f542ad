"""The inspector in one process: read-only snapshots, the walk, the dump, one GFN's walk, and damaged or moving tables."""
from __future__ import annotations

import numpy as np
import pytest

from shmmmu import inspect as insp
from shmmmu import snapshot as snapshot_module
from shmmmu import spte as S
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.region import Region
from shmmmu.mmu import Mmu
from shmmmu.vm import create_vm

BASE = 0x200                       # 4K slot at GFN 0x200, 1024 pages


def _vm(name: str, faults=range(BASE, BASE + 10)):
    cfg = VMConfig(name=name, n_vcpus=1, memslots=[MemslotSpec(BASE, 1024, 1)])
    vm = create_vm(cfg)
    host = Mmu(vm, vm.config.host_worker)
    for g in faults:
        host.page_fault(g, True)
    host.publish_stats()
    return vm, host


def test_snapshot_is_read_only_and_takes_no_lock(vm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    vm, host = _vm(vm_name)
    with vm:
        r = Region.attach(vm_name, readonly=True)
        try:
            t = r.array("tables")
            assert not t.flags.writeable
            with pytest.raises(ValueError):
                t[0, 0] = 1
            del t
        finally:
            r.close()

        def forbidden(*a, **k):
            raise AssertionError("the inspector must not touch semaphores or atomics")
        monkeypatch.setattr(Region, "semaphore", forbidden)
        monkeypatch.setattr(Region, "words", forbidden)
        snap = insp.take_snapshot(vm_name)
        s = insp.summary(snap)
        assert s["mappings"]["4K"] == 10 and s["tables"]["reachable_per_level"] == {"4": 1, "3": 1, "2": 1, "1": 1}
        assert s["snapshot"]["changed_while_reading"] == 0
        assert insp.run_checks(snap) == []
        t = insp.tree(snap).to_json()
        assert len(t["ranges"]) == 1
        r0 = t["ranges"][0]
        assert (r0["start"], r0["end"], r0["size"], r0["count"]) == (BASE, BASE + 10, "4K", 10)
        assert "R W X" in r0["flags"] and " D " in r0["flags"] + " "
        w = insp.gfn_walk(snap, BASE + 3)
        assert [st["level"] for st in w["steps"]] == [4, 3, 2, 1]
        assert w["host_page"] == w["memslot_host_page"] and w["result"].startswith("mapped: 4K")
        assert insp.gfn_walk(snap, BASE + 11)["result"] == "not mapped (empty entry at level 1)"
        del host


def test_coalescing_breaks_on_flags_pfn_and_size(vm_name: str) -> None:
    vm, host = _vm(vm_name, faults=[*range(BASE, BASE + 4), *range(BASE + 5, BASE + 8)])
    with vm:
        tables = vm.region.array("tables")
        snap = insp.take_snapshot(vm_name)
        leaf_table = int(insp.walk_tables(snap).tables[-1])
        # write-protect GFN BASE+1 (flags differ), and point BASE+3 at another host page (PFN discontinuity)
        tables[leaf_table, 1] = S.write_protect(int(tables[leaf_table, 1]))
        v = int(tables[leaf_table, 3])
        tables[leaf_table, 3] = (v & ~S.PFN_MASK) | (0x777 << S.PFN_SHIFT)
        t = insp.tree(insp.take_snapshot(vm_name)).to_json()
        got = [(r["start"] - BASE, r["end"] - BASE, r["count"], r["pfn"]) for r in t["ranges"]]
        p0 = t["ranges"][0]["pfn"]
        assert got == [(0, 1, 1, p0), (1, 2, 1, p0 + 1), (2, 3, 1, p0 + 2), (3, 4, 1, 0x777), (5, 8, 3, p0 + 5)]
        assert "W" not in t["ranges"][1]["flags"].split()
        snap = insp.take_snapshot(vm_name)
        assert any("maps host page 0x777" in p or "0x777" in p for p in insp.run_checks(snap))
        del tables, host


def test_damaged_tables_are_reported_not_fatal(vm_name: str) -> None:
    vm, host = _vm(vm_name)
    with vm:
        tables = vm.region.array("tables")
        snap = insp.take_snapshot(vm_name)
        w = insp.walk_tables(snap)
        root, l3, l2, l1 = (int(x) for x in w.tables)
        n = snap.n_tables
        tables[l1, 20] = S.REMOVED                                   # a frozen entry left behind
        tables[l1, 21] = 0xDEADBEEFDEADB000                          # poison
        tables[root, 5] = S.make_nonleaf(n + 5)                      # a child outside the pool
        tables[l3, 7] = S.make_nonleaf(l2)                           # a shared subtree (two parents)
        tables[l2, 9] = S.make_nonleaf(root)                         # a cycle back to the root
        tables[root, 6] = S.make_leaf(0, 4, writable=True)           # a "leaf" at the root level
        snap = insp.take_snapshot(vm_name)
        w = insp.walk_tables(snap)
        whats = " | ".join(o.what for o in w.odd)
        assert "outside the pool" in whats and "reached twice" in whats and "REMOVED" in whats
        assert "garbage" in whats and "huge bit" in whats
        assert w.removed_count == 1
        s = insp.summary(snap, w)
        assert s["mappings"]["removed_entries"] == 1 and s["mappings"]["odd_entries"] == w.odd_count
        lines = insp.tree_lines(insp.tree(snap, w))
        assert any("outside the pool" in ln for ln in lines)
        found = insp.run_checks(snap)                               # the same walk: every table followed once
        assert any("outside the pool" in f for f in found) and any("reached twice" in f for f in found)
        # one GFN's walk through the bad pointer stops there
        g = snap.geometry
        bad = insp.gfn_walk(snap, 5 << g.shift(4))
        assert bad["result"].startswith("broken: child pointer outside the pool")
        loop = insp.gfn_walk(snap, 9 << g.shift(2))
        assert loop["result"] == "broken: the walk loops"
        assert insp.gfn_walk(snap, BASE + 20)["result"].startswith("frozen")
        assert insp.gfn_walk(snap, BASE + 21)["result"] == "broken: garbage entry"
        assert insp.gfn_lines(bad)[-1].startswith("  no memslot")
        del tables, host


def test_a_table_changing_while_copied_is_counted(vm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    vm, host = _vm(vm_name)
    with vm:
        tables = vm.region.array("tables")
        real = snapshot_module._copy
        calls = []

        def racing_copy(region, section):
            out = real(region, section)
            if section == "tables" and not calls:
                calls.append(1)
                tables[3, :7] = np.uint64(S.REMOVED)               # a writer between the two copies
            return out
        monkeypatch.setattr(snapshot_module, "_copy", racing_copy)
        snap = insp.take_snapshot(vm_name)
        assert snap.changed == 7
        lines = insp.summary_lines(insp.summary(snap))
        assert lines[-1].endswith("7 entries changed while reading")
        assert insp.tree_lines(insp.tree(snap))[-1].startswith("# 7 entries changed while reading")
        del tables, host


def test_an_empty_tree(vm_name: str) -> None:
    vm, host = _vm(vm_name, faults=[])
    with vm:
        snap = insp.take_snapshot(vm_name)
        d = insp.tree(snap)
        assert len(d) == 0 and d.to_json()["ranges"] == [] and "(nothing mapped)" in insp.tree_lines(d)
        assert insp.summary(snap)["mappings"]["bytes"] == 0 and insp.run_checks(snap) == []
        del host


def test_parse_gfn() -> None:
    assert insp.parse_gfn("0x200") == 0x200 == insp.parse_gfn("512")
    for bad in ("zz", "-1", ""):
        with pytest.raises(ValueError):
            insp.parse_gfn(bad)


def test_pid_alive() -> None:
    import os
    assert insp.pid_alive(os.getpid())
    assert not insp.pid_alive(0) and not insp.pid_alive(-1) and not insp.pid_alive(2 ** 40)
