"""The TDP iterator (KVM_TDP_MMU.md §3-§4) over small trees built by page faults, in the 8-entry test geometry.

With bits=3 a table has 8 entries and the 4-level root covers 8**4 = 4096
GFNs, so a handful of faults builds a tree with every shape of interest: 4K
leaves, 2M and 1G leaves, empty entries, several root entries in use.  The
walk is compared with a recursive pre-order over a numpy copy of the tables.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

from shmmmu import checks
from shmmmu import spte as S
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.tdp_iter import TdpIter, for_each_leaf, for_each_pte
from shmmmu.mmu import RET_PF_FIXED, Mmu
from shmmmu.vm import VM, create_vm

BITS = 3
E = 1 << BITS
ROOT_LEVEL = 4
MAX_GFN = E ** ROOT_LEVEL                    # 4096
FAULTS = [0, 1, 9, 63, 64, 500, 511, 512, 700, 1024, 1100, 2048, 3000]


def span(level: int) -> int:
    return 1 << (BITS * (level - 1))


@pytest.fixture
def tree(vm_name: str) -> Iterator[tuple[VM, Mmu]]:
    """A VM whose tables hold 4K leaves in [0, 1024), 2M leaves in [1024, 1152), a 1G leaf at 2048, 4K at 3000."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=BITS,
                   memslots=[MemslotSpec(0, 1024, 1), MemslotSpec(1024, 128, 2), MemslotSpec(2048, 64, 3),
                             MemslotSpec(3000, 8, 1)])
    with create_vm(cfg) as vm:
        mmu = Mmu(vm, vm.config.host_worker)
        for gfn in FAULTS:
            assert mmu.page_fault(gfn, write=True) == RET_PF_FIXED
        assert checks.count_leaves(vm) == {1: 10, 2: 2, 3: 1}
        yield vm, mmu


def new_iter(mmu: Mmu, goal: int, min_level: int = 1) -> TdpIter:
    return TdpIter(mmu.tables, mmu.geometry, mmu.root, mmu.root_level, min_level, goal)


def yield_here(it: TdpIter, advance: bool) -> None:
    """What tdp_mmu_iter_cond_resched() does to the walk after dropping the lock: 5.16+ marks it yielded
    (the next step restarts instead of advancing); 5.13 restarted at once, and the caller's next step advances."""
    if advance:
        it.restart()
    else:
        it.mark_yielded()


def reference_preorder(tables: np.ndarray, root: int, min_level: int = 1) -> list[tuple[int, int, int]]:
    """(level, gfn, entry) of every entry in every table a walk from `root` reaches, parents before children."""
    out: list[tuple[int, int, int]] = []

    def visit(table: int, level: int, base: int) -> None:
        for i in range(E):
            spte = int(tables[table, i])
            gfn = base + i * span(level)
            out.append((level, gfn, spte))
            if level > min_level and S.child_table(spte, level) is not None:
                visit(S.pfn(spte), level - 1, gfn)

    visit(root, ROOT_LEVEL, 0)
    return out


def walk(it: TdpIter, end: int) -> list[tuple[int, int, int]]:
    return [(i.level, i.gfn, i.old_spte) for i in for_each_pte(it, end)]


# ---------------------------------------------------------------- pre-order


def test_full_walk_is_preorder(tree) -> None:
    vm, mmu = tree
    ref = reference_preorder(vm.region.array("tables"), mmu.root)
    got = walk(new_iter(mmu, 0), MAX_GFN)
    assert got == ref
    # every entry of the 8 root entries, and of every table below a present non-leaf
    assert [g for lv, g, _ in got if lv == ROOT_LEVEL] == [k * 512 for k in range(E)]
    levels = [lv for lv, _, _ in got]
    for a, b in zip(levels, levels[1:]):
        assert b >= a - 1, "a pre-order walk steps down one level at a time"


@pytest.mark.parametrize("start,end", [(0, 1), (9, 10), (5, 70), (63, 65), (500, 1030), (1100, 2049),
                                       (2047, 3001), (4000, 4096), (511, 513)])
def test_range_walk_is_the_preorder_slice(tree, start: int, end: int) -> None:
    """From the entry covering `start` at each level, until the first entry at or past `end`."""
    vm, mmu = tree
    ref = [(lv, g, s) for lv, g, s in reference_preorder(vm.region.array("tables"), mmu.root)
           if g + span(lv) > start and g < end]
    got = walk(new_iter(mmu, start), end)
    assert got == ref
    assert got[0][0] == ROOT_LEVEL and got[0][1] == start - start % 512


def test_min_level_stops_descending(tree) -> None:
    vm, mmu = tree
    tables = vm.region.array("tables")
    for min_level in (2, 3, 4):
        got = walk(new_iter(mmu, 0, min_level=min_level), MAX_GFN)
        assert got == reference_preorder(tables, mmu.root, min_level)
        assert min(lv for lv, _, _ in got) == min_level


def test_for_each_leaf_yields_present_leaves_in_gfn_order(tree) -> None:
    vm, mmu = tree
    leaves = [(i.level, i.gfn) for i in for_each_leaf(new_iter(mmu, 0), MAX_GFN)]
    assert leaves == [(1, 0), (1, 1), (1, 9), (1, 63), (1, 64), (1, 500), (1, 511), (1, 512), (1, 700),
                      (2, 1024), (2, 1096), (3, 2048), (1, 3000)]
    w = checks.walk_tables(vm)
    assert sorted(zip(w.leaf_level.tolist(), w.leaf_gfn.tolist()), key=lambda x: x[1]) == leaves


def test_next_last_level_gfn_never_decreases(tree) -> None:
    _, mmu = tree
    it = new_iter(mmu, 5)
    seen = []
    for i in for_each_pte(it, MAX_GFN):
        seen.append(i.next_last_level_gfn)
    assert seen == sorted(seen) and seen[0] == 5


# ---------------------------------------------------------------- forward progress and restarts


def test_can_yield_only_after_a_side_step(tree) -> None:
    """ed5e484b79e8: no yield until next_last_level_gfn moved past where the walk last (re)started."""
    _, mmu = tree
    it = new_iter(mmu, 9)
    assert (it.level, it.gfn) == (4, 0) and not it.can_yield()
    it.next()                                      # down to level 3: same goal
    assert (it.level, it.gfn) == (3, 0) and not it.can_yield()
    it.next()
    it.next()                                      # down to the 4K entry of gfn 9
    assert (it.level, it.gfn) == (1, 9) and not it.can_yield()
    it.next()                                      # sideways: progress
    assert (it.level, it.gfn) == (1, 10) and it.can_yield()
    it.mark_yielded()
    it.next()                                      # restart from the root at gfn 10
    assert (it.level, it.gfn, it.yielded_gfn) == (4, 0, 10) and not it.can_yield()
    while it.level > 1:
        it.next()
        assert not it.can_yield()                  # stepping down is not progress
    assert it.gfn == 10
    it.next()
    assert it.gfn == 11 and it.can_yield()


def steps_after_yield(mmu: Mmu, at_gfn: int, advance: bool, n: int) -> tuple[list, list]:
    """Walk from 0 until the 4K entry at at_gfn; yield there; return what was visited before and the next n."""
    it = new_iter(mmu, 0)
    before = []
    for i in for_each_pte(it, MAX_GFN):
        before.append((i.level, i.gfn))
        if (i.level, i.gfn) == (1, at_gfn):
            assert i.can_yield()
            yield_here(i, advance)
            break
    after = []
    it.next()
    while it.valid and len(after) < n:
        after.append((it.level, it.gfn))
        it.next()
    return before, after


def test_restart_revisits_the_entry_at_next_last_level_gfn(tree) -> None:
    """3a0f64de479c: after a yield the walk restarts at the root and comes back down to the same entry."""
    _, mmu = tree
    before, after = steps_after_yield(mmu, 9, advance=False, n=5)
    assert before[-1] == (1, 9)
    assert after == [(4, 0), (3, 0), (2, 8), (1, 9), (1, 10)]


def test_advance_after_restart_skips_the_root_entry(tree) -> None:
    """K9 (CVE-2021-47094): restart and then advance: the root-level entry at the goal is never visited again.

    Stepping down still reaches gfn 9 here, so the walk is "benign-ish"; the test below
    shows the walk that cannot step down.
    """
    _, mmu = tree
    _, fixed = steps_after_yield(mmu, 9, advance=False, n=5)
    _, k9 = steps_after_yield(mmu, 9, advance=True, n=4)
    assert fixed[0] == (4, 0)
    assert k9 == [(3, 0), (2, 8), (1, 9), (1, 10)]
    assert (4, 0) not in k9


def root_level_zap_walk(mmu: Mmu, advance: bool) -> list[int]:
    """A zap-all shaped walk at min_level == root_level that yields whenever the rule allows.

    As tdp_mmu_iter_cond_resched() is called at the top of each iteration, a
    yield skips the body and `continue`s; returns the root entries processed.
    """
    it = new_iter(mmu, 0, min_level=ROOT_LEVEL)
    processed = []
    for i in for_each_pte(it, MAX_GFN):
        if i.can_yield():
            yield_here(i, advance)
            continue
        processed.append(i.gfn // 512)
    return processed


def test_root_level_walk_with_yields_fixed_vs_k9(tree) -> None:
    """With the fix every root entry is processed (each right after its restart); with K9 none after the first."""
    _, mmu = tree
    assert root_level_zap_walk(mmu, advance=False) == list(range(E))
    assert root_level_zap_walk(mmu, advance=True) == [0]


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
@pytest.mark.parametrize("bug", [False, True])
def test_zap_all_with_contention(vm_name: str, bug: bool, kernel: str) -> None:
    """Under constant contention K9 (with the root-level zap-all it needs: 5.14's, and 6.12's last pass of
    tdp_mmu_zap_root) leaves mappings behind in both profiles; the fixed zap-all (every root entry zapped whole)
    leaves none."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=BITS, memslots=[MemslotSpec(0, 4096, 1)], kernel=kernel,
                   bugs=["advance-after-restart"] if bug else [])
    with create_vm(cfg) as vm:
        mmu = Mmu(vm, vm.config.host_worker)
        for gfn in range(0, 4096, 300):
            mmu.page_fault(gfn, write=True)
        mmu.lock.needbreak = lambda: True                # a waiter is always queued
        mmu.zap_all()
        left = checks.count_leaves(vm)[1]
        if bug:
            assert left > 0
        else:
            assert left == 0
            mmu.publish_stats()
            assert checks.check_all(vm) == []
