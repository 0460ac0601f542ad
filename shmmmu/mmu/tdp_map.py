"""TDP map: tdp_mmu.c's page-fault map (kvm_tdp_mmu_map) and the allocation, linking and accounting of tables.

A fault walks from its vCPU's root to the level it maps at, splitting a huge
page in the way and linking a fresh table under every empty entry, then makes
the leaf.  A table comes from the vCPU's memory cache (alloc_tdp_mmu_page),
is published by one compare-exchange and then accounted: 6.2's page count and
NX tracking (tdp_mmu_link_sp, what the default follows), or, with the
link-after-publish variant, 5.13's tdp_mmu_pages list (K18).
"""
from __future__ import annotations

from typing import Any

from shmmmu import spte as S
from shmmmu.layout import NIL, STAT, Ctl
from shmmmu.mmu.instruments import site
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu.mmu.records import RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, Fault
from shmmmu.tdp_iter import TdpIter

_P = S.MMU_PRESENT
_PL = S.PRESENT_LARGE
_PFN_SHIFT = S.PFN_SHIFT
_U64 = (1 << 64) - 1

_ST_ALLOC = STAT["tables_allocated"]
_ST_LINKED = STAT["tables_linked"]
_ST_LINK_RACE = STAT["link_races"]
_ST_SPLITS = STAT["huge_splits"]
_C_LIST_HEAD, _C_PAGE_COUNT = Ctl.LIST_HEAD, Ctl.PAGE_COUNT


class TdpMap(Part):
    """kvm_tdp_mmu_map, and what it does with tables: allocate, link, account, unaccount."""

    __slots__ = ("tdp", "nx_part", "leaf_template", "level_pfn_mask")
    tdp: Any                        # the tdp_mmu part: the setters
    nx_part: Any                    # the nx part: tracking of NX-disallowed tables

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)
        # make_spte() of a fault, per level, for host page 0: the PFN is the only part that varies
        # (spte.make_leaf ORs it in), so a fault ORs its page into this instead of rebuilding the bits
        self.leaf_template = [0] + [S.make_leaf(0, level, writable=True, exec_ok=not (self.nx and level > 1))
                                    for level in range(1, self.root_level + 1)]
        # per level: the mask that rounds a host page down to the first page of a leaf of that level
        self.level_pfn_mask = [0] + [~((1 << (self.bits * (level - 1))) - 1)
                                     for level in range(1, self.root_level + 1)]

    # ------------------------------------------------------------------ the fault's map (§7.2)

    @site("debug", "trace")
    def kvm_tdp_mmu_map(self, vcpu: Any, fault: Fault, shared: bool) -> int:
        """kvm_tdp_mmu_map(): walk from the vCPU's root to the target level, linking tables and splitting
        huge pages.  Shared (the series): atomic updates under the read lock.  Not shared: the pre-series
        map, plain stores under the write lock (the exclusive baseline)."""
        rcu_read_lock, rcu_read_unlock = vcpu.rcu_read_lock, vcpu.rcu_read_unlock
        rcu_read_lock()                              # (called from locals: 3.11 specializes that, not a slot's)
        try:
            gfn = fault.gfn
            level = fault.goal_level
            it = vcpu.fault_walk.start(vcpu.root, 1, gfn)
            nx = self.nx
            while it.valid:                          # tdp_mmu_for_each_pte(iter, mmu, gfn, gfn + 1)
                if it.gfn > gfn:                     # (its test apart: a compare next to a far jump is
                    break                            # not specialized by CPython 3.11)
                spte = it.old_spte
                if it.level == level:
                    if not (nx and level > 1 and spte & _PL == _P):
                        break
                    level -= 1                       # disallowed_hugepage_adjust(): keep small mappings
                if spte & _PL == _P:                 # is_shadow_present_pte() and !is_large_pte() in one test
                    it.next()                        # a present non-leaf: step down into it
                    continue
                if spte & _PL == _PL:
                    # a huge page above the target level: zap it so it can be split
                    tdp = self.tdp
                    if shared:
                        if not tdp.tdp_mmu_zap_spte_atomic(it):
                            break
                    else:
                        kvm = self.kvm
                        kvm.mark_unflushed()
                        tdp.tdp_mmu_set_spte(it, 0)
                        kvm.kvm_flush_remote_tlbs()
                    self.st[_ST_SPLITS] += 1
                    spte = it.old_spte = self.tables.load(it.sptep)
                if not spte & _P:
                    child = self.alloc_tdp_mmu_page(it.level - 1, it.gfn)
                    self.st[_ST_ALLOC] += 1
                    dis = fault.huge_page_disallowed
                    if not self.tdp_mmu_link_sp(it, child, dis, dis and fault.req_level >= it.level, shared):
                        self.tdp_mmu_free_sp(child)          # lost the race: never visible, back to the cache
                        break
                    self.st[_ST_LINKED] += 1
                it.next()
            if not it.valid or it.level != level:
                return RET_PF_RETRY
            fault.goal_level = level
            return self.tdp_mmu_map_handle_target_level(fault, it, shared)
        except IndexError:
            # the walk followed an entry to a table outside the pool: it read garbage from a
            # freed or recycled table (a correct MMU never gets here)
            self.kvm.violation("use-after-free", fault.gfn, 0, 1)
            return RET_PF_RETRY
        finally:
            rcu_read_unlock()

    def tdp_mmu_map_handle_target_level(self, fault: Fault, it: TdpIter, shared: bool) -> int:
        """tdp_mmu_map_handle_target_level(): make_spte() and install the leaf.  Returns FIXED for a changed
        leaf where 5.13 returned 0 (= RETRY; 57a3e96d6d17 fixed it in 5.14): internals.md departure 10."""
        level = fault.goal_level
        pfn = fault.pfn
        if level > 1:
            pfn &= self.level_pfn_mask[level]        # the huge page's first host page
        new = self.leaf_template[level] | (pfn << _PFN_SHIFT)    # == S.make_leaf(pfn, level, ...)
        if new == it.old_spte:
            return RET_PF_SPURIOUS
        if shared:
            if not self.tdp.tdp_mmu_set_spte_atomic(it, new):
                return RET_PF_RETRY
        else:
            self.tdp.tdp_mmu_set_spte(it, new)
        return RET_PF_FIXED

    # ------------------------------------------------------------------ tables (§2, tdp_mmu_pages_lock)

    @site("trace")
    def alloc_tdp_mmu_page(self, level: int, gfn: int) -> int:
        """alloc_tdp_mmu_page(): a zeroed table from this vCPU's memory cache, for entries of `level` (a root
        too: kvm_tdp_mmu_get_vcpu_root_hpa allocates its table here)."""
        return self.pool.alloc(level, gfn)

    def tdp_mmu_free_sp(self, child: int) -> None:
        """tdp_mmu_free_sp() of a table that lost its link race: it was never visible, so it goes straight
        back to this vCPU's memory cache, still zeroed."""
        self.tmeta.nx.store(child, 0)
        self.pool.unalloc(child)
        self.st[_ST_LINK_RACE] += 1

    def tdp_mmu_link_sp(self, it: TdpIter, child: int, nx: bool, track_nx: bool, shared: bool) -> bool:
        """Publish a new child table, then account it: 6.2's tdp_mmu_link_sp and the NX tracking after it.

        5.13 put the table on the tdp_mmu_pages list after the cmpxchg (K18); 6.2 keeps
        only a count (d25ceb926436), marks nx_huge_page_disallowed *before* the table is
        visible and adds it to the NX list afterwards (61f94478547b), under
        tdp_mmu_pages_lock: track_nx_after_link.  False: the cmpxchg lost.
        """
        tmeta = self.tmeta
        if nx:
            tmeta.nx.store(child, 1)                 # sp->nx_huge_page_disallowed = fault->huge_page_disallowed
        if shared:
            if not self.tdp.tdp_mmu_set_spte_atomic(it, S.make_nonleaf(child)):
                return False
        else:
            self.tdp.tdp_mmu_set_spte(it, S.make_nonleaf(child))
        self.kvm.torture_delay()                     # a zap of the new entry may run here
        self.ctl.fetch_add(_C_PAGE_COUNT, 1)         # tdp_account_mmu_page()
        tmeta.owner.store(child, NIL)
        if track_nx:
            self.track_nx_after_link(child, shared)
        return True

    def track_nx_after_link(self, child: int, shared: bool) -> None:
        """kvm_tdp_mmu_map's NX tracking of the table it just linked, under tdp_mmu_pages_lock: only if the flag
        is still set (21a36ac6b6c7, 6.2): a zap of the new entry in between (a collapsible zap under the read
        lock) cleared it in tdp_mmu_unlink_sp, and the table is on its way to RCU."""
        if shared:
            self.pages_lock.acquire()
        try:
            if self.tmeta.nx.load(child):
                self.nx_part.track_possible_nx_huge_page(child)
        finally:
            if shared:
                self.pages_lock.release()

    def track_nx_after_link_unchecked(self, child: int, shared: bool) -> None:
        """Variant nx-add-after-zap (reverts 21a36ac6b6c7; 61f94478547b's code, 6.2-rc): the table goes on the
        NX list without the flag looked at again, so a table zapped between the link and the add is listed
        while RCU frees it (check_nx_list: a listed table no root reaches)."""
        if shared:
            self.pages_lock.acquire()
        try:
            self.nx_part.track_possible_nx_huge_page(child)
        finally:
            if shared:
                self.pages_lock.release()

    def link_sp_k18_page_list(self, it: TdpIter, child: int, nx: bool, track_nx: bool, shared: bool) -> bool:
        """Variant link-after-publish (K18), 5.13's kvm_tdp_mmu_map: the cmpxchg, then tdp_mmu_link_page
        (list_add on tdp_mmu_pages and account_huge_nx_page under tdp_mmu_pages_lock).  A zap of the new
        entry in between runs list_del on a table not yet on the list, which the late list_add then puts
        there, freed."""
        if shared:
            if not self.tdp.tdp_mmu_set_spte_atomic(it, S.make_nonleaf(child)):
                return False
        else:
            self.tdp.tdp_mmu_set_spte(it, S.make_nonleaf(child))
        self.kvm.torture_delay()
        if shared:
            self.pages_lock.acquire()
        try:
            tmeta, ctl = self.tmeta, self.ctl
            head = ctl.load(_C_LIST_HEAD)
            tmeta.prev.store(child, NIL)
            # list words hold table + 1 so that 0 (a zeroed region) is "empty"
            tmeta.next.store(child, head)
            if head != NIL and head != 0:
                tmeta.prev.store(head - 1, child + 1)
            ctl.store(_C_LIST_HEAD, child + 1)
            ctl.fetch_add(_C_PAGE_COUNT, 1)
            if track_nx:
                self.nx_part.account_huge_nx_page(child)
            tmeta.owner.store(child, NIL)
        finally:
            if shared:
                self.pages_lock.release()
        return True

    def tdp_mmu_unlink_sp(self, table: int, shared: bool) -> None:
        """tdp_mmu_unlink_sp() (6.2): the count down; if the table is NX-disallowed, clear that and take it
        off the NX list if it made it there (under tdp_mmu_pages_lock).  Not shared: mmu_lock held for write
        (the lockdep assertion of 5.13's tdp_mmu_unlink_page)."""
        if not shared:
            self.kvm.lockdep_assert_held_write()
        self.ctl.fetch_add(_C_PAGE_COUNT, _U64)      # tdp_unaccount_mmu_page()
        nx = self.tmeta.nx
        if not nx.load(table):
            return
        if shared:
            self.pages_lock.acquire()
        try:
            nx.store(table, 0)
            self.nx_part.untrack_possible_nx_huge_page(table)
        finally:
            if shared:
                self.pages_lock.release()

    def unlink_sp_k18_page_list(self, table: int, shared: bool) -> None:
        """Variant link-after-publish (K18): 5.13's tdp_mmu_unlink_page(): list_del from tdp_mmu_pages (and
        the NX list) under the lock."""
        if shared:
            self.pages_lock.acquire()
        else:
            self.kvm.lockdep_assert_held_write()
        try:
            tmeta, ctl = self.tmeta, self.ctl
            prev, nxt = tmeta.prev.load(table), tmeta.next.load(table)
            if prev == NIL and ctl.load(_C_LIST_HEAD) != table + 1:
                # list_del of an entry that is not on the list: the corruption behind K18
                self.kvm.violation("table-leak", tmeta.gfn.load(table), table, 0)
                return
            if prev == NIL:
                ctl.store(_C_LIST_HEAD, nxt)
            else:
                tmeta.next.store(prev - 1, nxt)
            if nxt not in (NIL, 0):
                tmeta.prev.store(nxt - 1, prev)
            tmeta.prev.store(table, NIL)
            tmeta.next.store(table, NIL)
            ctl.fetch_add(_C_PAGE_COUNT, _U64)
            if tmeta.nx.load(table):
                self.nx_part.unaccount_huge_nx_page(table)
        finally:
            if shared:
                self.pages_lock.release()
