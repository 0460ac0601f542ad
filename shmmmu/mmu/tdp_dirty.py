"""TDP dirty: tdp_mmu.c's write protection, dirty-log re-protection and aging (the A bit).

Write protection at dirty-log enable runs under the read lock with
compare-exchange (5.13, 24ae4cfaaaa2); the masked re-protection of
KVM_GET/CLEAR_DIRTY_LOG and aging (the MMU notifier's clear/test_young) run
under the write lock without yielding, through the exclusive setter.  The 6.12
profile splits huge leaves eagerly when logging is enabled (a3fe5dbda0a4):
`kvm_tdp_mmu_try_split_huge_pages`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import STAT
from shmmmu.memslots import Slot
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu.tdp_iter import for_each_leaf, for_each_pte

_P = S.MMU_PRESENT
_L = S.LARGE
_W = S.WRITABLE
_A = S.ACCESSED
_PFN_MASK = S.PFN_MASK
_PFN_SHIFT = S.PFN_SHIFT
_PL = _P | _L
_ST_MAPPED = [0, STAT["mapped_4k"], STAT["mapped_2m"], STAT["mapped_1g"], STAT["mapped_1g"]]
_ST_ZAPPED = STAT["zapped_leaves"]
_ST_SPLITS = STAT["huge_splits"]


class TdpDirty(Part):
    """wrprot_gfn_range, clear_dirty_pt_masked, age_gfn_range and their walks over roots."""

    __slots__ = ("tdp", "roots", "map")
    tdp: Any                        # the tdp_mmu part: setters and the yield
    roots: Any                      # the roots part
    map: Any                        # the tdp_map part: allocating and linking a split's table

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)

    # ------------------------------------------------------------------ aging (C9: the notifier's clear/test_young)

    def age_gfn_range(self, root: int, start: int, end: int) -> list[tuple[int, int]]:
        """age_gfn_range() (5.13, through kvm_tdp_mmu_handle_gfn: write lock, no yield): clear A on every
        accessed leaf of [start, end) with tdp_mmu_set_spte_no_acc_track; returns the leaves that were young."""
        self.kvm.lockdep_assert_held_write()
        young = []
        self.rcu.read_lock()
        try:
            for it in for_each_leaf(self.kvm.new_iter(root, 1, start), end):
                old = it.old_spte
                if not old & _A:
                    continue                     # a non-accessed entry need not change
                young.append((it.gfn, it.level))
                self.tdp.tdp_mmu_set_spte(it, old & ~_A, record_acc_track=False)
        finally:
            self.rcu.read_unlock()
        return young

    def age_gfn_range_612(self, root: int, start: int, end: int) -> list[tuple[int, int]]:
        """age_gfn_range() of 6.12 (write lock, no yield): A is cleared alone by tdp_mmu_clear_spte_bits, an
        atomic AND where the processor may set A/D meanwhile; nothing else of the entry changes, so nothing is
        handed to handle_changed_spte (6.12 only traces the change)."""
        self.kvm.lockdep_assert_held_write()
        young = []
        clear_bits = self.tdp.tdp_mmu_clear_spte_bits
        self.rcu.read_lock()
        try:
            for it in for_each_leaf(self.kvm.new_iter(root, 1, start), end):
                if not it.old_spte & _A:
                    continue
                young.append((it.gfn, it.level))
                it.old_spte = clear_bits(it.sptep, it.old_spte, _A, it.level)
        finally:
            self.rcu.read_unlock()
        return young

    def kvm_tdp_mmu_age_gfn_range(self, start: int, end: int) -> list[tuple[int, int]]:
        """kvm_tdp_mmu_age_gfn_range(): age_gfn_range on every root (for_each_tdp_mmu_root)."""
        roots = self.roots
        young = []
        for row in roots.for_each_tdp_mmu_root():
            young += self.age_gfn_range(roots.root_table(row), start, end)
        return young

    def kvm_tdp_mmu_test_age_gfn(self, start: int, end: int) -> bool:
        """kvm_tdp_mmu_test_age_gfn(): is any leaf of [start, end) accessed, in any root."""
        self.kvm.lockdep_assert_held_write()
        roots = self.roots
        self.rcu.read_lock()
        try:
            for row in roots.for_each_tdp_mmu_root():
                for it in for_each_leaf(self.kvm.new_iter(roots.root_table(row), 1, start), end):
                    if it.old_spte & _A:
                        return True
        finally:
            self.rcu.read_unlock()
        return False

    # ------------------------------------------------------------------ write protection (§9)

    def wrprot_gfn_range(self, root: int, start: int, end: int, min_level: int, shared: bool) -> int:
        """wrprot_gfn_range(): clear W on every present leaf at min_level or above in [start, end).

        Walks to level 2 with the iterator (yielding with forward progress); each 4K
        table below is write-protected with one compare-exchange loop in C; huge
        leaves are protected one by one.  Returns the number of leaves changed.
        """
        kvm, tdp = self.kvm, self.tdp
        kvm.lockdep_assert_held(shared)
        changed = 0
        flush = False
        E = self.E
        old = np.empty(E, dtype=np.uint64)
        self.rcu.read_lock()
        try:
            it = kvm.new_iter(root, min(2, self.root_level), start)
            for it in for_each_pte(it, end):
                while True:
                    if tdp.tdp_mmu_iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    if not spte & _P:
                        break
                    if spte & _L:                                     # a huge leaf
                        if not spte & _W:
                            break
                        kvm.mark_unflushed()                 # before the change a vCPU may observe
                        flush = True                         # owed from here on, changed or not (I6)
                        if shared:
                            if not tdp.tdp_mmu_set_spte_atomic(it, spte & ~_W):
                                it.old_spte = self.tables.load(it.sptep)
                                continue
                        else:
                            tdp.tdp_mmu_set_spte(it, spte & ~_W, record_dirty_log=False)
                        changed += 1
                        break
                    if it.level == 2 and min_level == 1:              # a table of 4K leaves: one batch
                        child = (spte & _PFN_MASK) >> _PFN_SHIFT
                        kvm.mark_unflushed()
                        flush = True
                        changed += self.tables.clear_where(child * E, E, _P, _P, _W, old)
                    break
        finally:
            self.rcu.read_unlock()
        if flush or kvm.holds_unflushed:
            kvm.kvm_flush_remote_tlbs()
        self.st[STAT["wrprot_leaves"]] += changed
        return changed

    def kvm_tdp_mmu_wrprot_slot(self, slot: Slot, min_level: int, shared: bool) -> int:
        """kvm_tdp_mmu_wrprot_slot(): wrprot_gfn_range over the slot, on every valid root (yield-safe)."""
        roots = self.roots
        return sum(self.wrprot_gfn_range(roots.root_table(row), slot.base_gfn, slot.end_gfn, min_level, shared)
                   for row in roots.for_each_tdp_mmu_root_yield_safe(shared))

    def clear_dirty_pt_masked(self, root: int, gfn: int, mask: int) -> bool:
        """clear_dirty_pt_masked(): write-protect the 4K leaves of [gfn, gfn+64) named by mask (write lock).
        The mask bit is cleared before the skip of an already protected leaf (f1b3b06a058b), so the walk
        stops as soon as the mask is done."""
        return self._clear_dirty_pt_masked(root, gfn, mask, False)

    def clear_dirty_pt_masked_k3_late_clear(self, root: int, gfn: int, mask: int) -> bool:
        """Variant dirty-mask-late-clear (K3, before f1b3b06a058b): the mask bit is cleared only after the skip
        of an already protected leaf, so the walk cannot stop early and runs on past the mask."""
        return self._clear_dirty_pt_masked(root, gfn, mask, True)

    def clear_dirty_pt_masked_612(self, root: int, gfn: int, mask: int) -> bool:
        """clear_dirty_pt_masked() of 6.12 (write lock): W (no PML here) is cleared alone by
        tdp_mmu_clear_spte_bits, then the host page is marked dirty (kvm_set_pfn_dirty), with no
        handle_changed_spte: only W changed, and the guest may have written the page since the last harvest."""
        return self._clear_dirty_pt_masked(root, gfn, mask, False, clear_bits=True)

    def _clear_dirty_pt_masked(self, root: int, gfn: int, mask: int, late: bool, clear_bits: bool = False) -> bool:
        kvm = self.kvm
        kvm.lockdep_assert_held_write()
        if not mask:
            return False
        first = (mask & -mask).bit_length() - 1
        changed = False
        visited = 0
        self.rcu.read_lock()
        try:
            for it in for_each_leaf(kvm.new_iter(root, 1, gfn + first), gfn + 64):
                if not mask:
                    break
                if it.level > 1:
                    continue                                  # huge leaves: protected at enable (may start below gfn)
                bit = 1 << (it.gfn - gfn)
                if not mask & bit:
                    continue
                visited |= bit
                if not late:
                    mask &= ~bit                              # f1b3b06a058b: before the early continue
                spte = it.old_spte
                if not spte & _W:
                    continue
                if late:
                    mask &= ~bit                              # K3: only after it
                kvm.mark_unflushed()
                if clear_bits:
                    it.old_spte = self.tdp.tdp_mmu_clear_spte_bits(it.sptep, spte, _W, 1)
                    kvm.kvm_set_pfn_dirty((it.old_spte & _PFN_MASK) >> _PFN_SHIFT)
                else:
                    self.tdp.tdp_mmu_set_spte(it, spte & ~_W, record_dirty_log=False)
                changed = True
            if mask & visited:
                # the mask must only name leaves not yet handled, or the walk cannot stop early (K3)
                kvm.violation("mask-walk-overrun", gfn, mask & visited, mask)
        finally:
            self.rcu.read_unlock()
        return changed

    def kvm_tdp_mmu_clear_dirty_pt_masked(self, slot: Slot, gfn: int, mask: int) -> bool:
        """kvm_tdp_mmu_clear_dirty_pt_masked(): clear_dirty_pt_masked on every root (write lock, no yield)."""
        roots = self.roots
        changed = False
        for row in roots.for_each_tdp_mmu_root():
            changed |= self.clear_dirty_pt_masked(roots.root_table(row), gfn, mask)
        return changed

    # ------------------------------------------------------------------ eager page splitting (6.12)

    def kvm_tdp_mmu_try_split_huge_pages(self, slot: Slot, start: int, end: int, target_level: int,
                                         shared: bool) -> int:
        """kvm_tdp_mmu_try_split_huge_pages() (a3fe5dbda0a4): split every huge leaf of [start, end) of the slot
        down to target_level, on every valid root (yield-safe).  Returns the number of huge leaves split."""
        roots = self.roots
        self.kvm.lockdep_assert_held(shared)
        return sum(self.tdp_mmu_split_huge_pages_root(roots.root_table(row), start, end, target_level, shared)
                   for row in roots.for_each_tdp_mmu_root_yield_safe(shared))

    def tdp_mmu_split_huge_pages_root(self, root: int, start: int, end: int, target_level: int,
                                      shared: bool) -> int:
        """tdp_mmu_split_huge_pages_root(): walk [start, end) above target_level in pre-order, replacing each
        huge leaf by a table of the next level (so a 1G leaf's new 2M leaves are split in turn as the walk
        steps down into them).  A table is allocated with mmu_lock and RCU dropped, as the kernel's
        GFP_KERNEL_ACCOUNT allocation may sleep; the walk then restarts as after a yield."""
        kvm, tdp, pool = self.kvm, self.tdp, self.pool
        split = 0
        sp = -1
        self.rcu.read_lock()
        try:
            it = kvm.new_iter(root, target_level + 1, start)
            for it in for_each_pte(it, end):
                while True:                                      # retry:
                    if tdp.tdp_mmu_iter_cond_resched(it, False, shared):
                        break
                    spte = it.old_spte
                    if spte & _PL != _PL:
                        break                                    # not a present huge leaf
                    if sp < 0:
                        self.rcu.read_unlock()
                        kvm.mmu_unlock(shared)
                        if pool.count < pool.min:
                            pool.topup()                         # tdp_mmu_alloc_sp_for_split(): may sleep
                        sp = self.map.alloc_tdp_mmu_page(it.level - 1, it.gfn)
                        kvm.mmu_lock(shared)
                        self.rcu.read_lock()
                        it.mark_yielded()                        # iter.yielded = true: restart from the root
                        break
                    if self.tdp_mmu_split_huge_page(it, sp, shared):
                        sp = -1
                        split += 1
                        break
                    it.old_spte = self.tables.load(it.sptep)     # the link lost: look again (goto retry)
        finally:
            self.rcu.read_unlock()
        if sp >= 0:
            self.map.tdp_mmu_free_sp(sp)                         # never linked: back to the cache
        return split

    def tdp_mmu_split_huge_page(self, it: Any, sp: int, shared: bool) -> bool:
        """tdp_mmu_split_huge_page(): fill `sp` with the huge leaf's translation at the next level
        (make_huge_page_split_spte: the same bits and host pages, PS cleared at 4K), then link it in place of
        the leaf with one cmpxchg.  No flush: the translation of every address is unchanged."""
        huge = it.old_spte
        level = it.level
        child_level = level - 1
        E = self.E
        step = 1 << (self.bits * (child_level - 1))          # host pages per child entry
        base = huge & ~_PFN_MASK
        if child_level == 1:
            base &= ~_L
        pfn = (huge & _PFN_MASK) >> _PFN_SHIFT
        store = self.tables.store
        for i in range(E):                                       # sp is not visible yet: plain stores
            store(sp * E + i, base | ((pfn + i * step) << _PFN_SHIFT))
        if not self.map.tdp_mmu_link_sp(it, sp, False, False, shared):
            self.tables.fill_range(sp * E, E, 0)                 # unlinked: the cache hands out zeroed tables
            return False
        st = self.st
        st[_ST_MAPPED[child_level]] += E                         # kvm_update_page_stats(kvm, level - 1, 512)
        st[_ST_ZAPPED] -= 1                     # handle_changed_spte counted the leaf gone: replaced, not zapped
        st[_ST_SPLITS] += 1
        return True
