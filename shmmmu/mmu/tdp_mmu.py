"""TDP MMU: arch/x86/kvm/mmu/tdp_mmu.c: setting entries, handling changes and disconnected tables, map, zaps, write protection.

Every function here takes `shared` (read lock held, atomic updates) or is
one side of that choice, opens with the held-lock assertion the kernel has
(lockdep_assert_held*), and takes no lock of its own except the page-list lock
inside mmu_lock: the lock-taking entry points are in ioctl.py (the ioctl and
notifier side) and mmu.py (the fault).  Everything is written on the TDP
iterator (shmmmu.tdp_iter).

Freeing a table needs three things: it is unreachable, a TLB flush completed
after it was unlinked, and a grace period ended (software walkers under the
read lock are RCU readers).  Changes that leave a vCPU translation stale are
counted in the region's "unflushed" word until their flush completes, which is
what lets a vCPU tell a legitimately stale translation (flush in progress) from
a forgotten flush.

Functions a bug switch reverts have their reverted variant beside them, named
after the K number; mmu/__init__.py picks the variant when it builds the Mmu.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from shmmmu import spte as S
from shmmmu.spte import spte_has_volatile_bits
from shmmmu.layout import NIL, STAT, Ctl, TMeta
from shmmmu.memslots import Slot
from shmmmu.mmu.roots import TdpMmuRoots
from shmmmu.rwlock import HELD_READ
from shmmmu.tdp_iter import TdpIter, for_each_leaf, for_each_pte

if TYPE_CHECKING:
    from shmmmu.mmu.mmu import Fault

# page-fault return values (the 5.12-5.18 enum)
RET_PF_RETRY, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = range(5)
RET_NAMES = {RET_PF_RETRY: "RETRY", RET_PF_EMULATE: "EMULATE", RET_PF_INVALID: "INVALID",
             RET_PF_FIXED: "FIXED", RET_PF_SPURIOUS: "SPURIOUS"}

_P = S.MMU_PRESENT
_L = S.LARGE
_PL = S.PRESENT_LARGE
_W = S.WRITABLE
_A = S.ACCESSED
_D = S.DIRTY
_REMOVED = S.REMOVED
_PFN_MASK = S.PFN_MASK
_PFN_SHIFT = S.PFN_SHIFT
_U64 = (1 << 64) - 1

_ST_CAS_FAIL = STAT["cas_failures"]
_ST_REMOVED_SEEN = STAT["removed_seen"]
_ST_ALLOC = STAT["tables_allocated"]
_ST_LINKED = STAT["tables_linked"]
_ST_LINK_RACE = STAT["link_races"]
_ST_MAPPED = [0, STAT["mapped_4k"], STAT["mapped_2m"], STAT["mapped_1g"], STAT["mapped_1g"]]
_ST_ZAPPED = STAT["zapped_leaves"]
_ST_DIRTY = STAT["dirty_marked"]
_ST_SPLITS = STAT["huge_splits"]

_TM = TMeta.WORDS
_T_LEVEL, _T_GFN, _T_NX, _T_PREV, _T_NEXT, _T_OWNER = (TMeta.LEVEL, TMeta.GFN, TMeta.NX, TMeta.PREV,
                                                       TMeta.NEXT, TMeta.OWNER)
_C_LIST_HEAD, _C_PAGE_COUNT = Ctl.LIST_HEAD, Ctl.PAGE_COUNT


class TdpMmu(TdpMmuRoots):
    """The functions of tdp_mmu.c, as methods over one process's Kvm."""
    __slots__ = ("zap_skips_invalid_roots", "pages", "n_tables", "fault_walk", "leaf_template", "level_pfn_mask")

    def __init__(self, vm, worker: int, tlb=None):
        super().__init__(vm, worker, tlb)
        self.zap_skips_invalid_roots = self.bugs.unmap_skips_invalid_roots
        self.pages = [0] + [self.geometry.pages(level) for level in range(1, self.root_level + 1)]
        self.n_tables = self.tables_np.shape[0]
        # the fault path's walk: one iterator per process, reused (a walk never outlives its fault,
        # as the kernel's is a stack variable of kvm_tdp_mmu_map)
        self.fault_walk = self.new_iter(self.root, 1, 0)
        # make_spte() of a fault, per level, for host page 0: the PFN is the only part that varies
        # (spte.make_leaf ORs it in), so a fault ORs its page into this instead of rebuilding the bits
        self.leaf_template = [0] + [S.make_leaf(0, level, writable=True, exec_ok=not (self.nx and level > 1))
                                    for level in range(1, self.root_level + 1)]
        # per level: the mask that rounds a host page down to the first page of a leaf of that level
        self.level_pfn_mask = [0] + [~((1 << (self.bits * (level - 1))) - 1) for level in range(1, self.root_level + 1)]

    # ------------------------------------------------------------------ setters (KVM_TDP_MMU.md §5)

    def tdp_mmu_set_spte_atomic(self, it: TdpIter, new: int) -> bool:
        """tdp_mmu_set_spte_atomic(): cmpxchg against the value the walk saw; False if it changed.

        Only the thread that froze an entry may write it: a REMOVED old value fails.
        """
        if self.lock.mode != HELD_READ:
            self._lockdep(HELD_READ)
        old = it.old_spte
        if old == _REMOVED:
            self.st[_ST_REMOVED_SEEN] += 1
            return False
        if self.tables.cas(it.sptep, old, new) != old:
            self.st[_ST_CAS_FAIL] += 1
            return False
        self.handle_changed_spte(it.gfn, old, new, it.level, True)
        return True

    def set_spte_atomic_k4_plain_store(self, it: TdpIter, new: int) -> bool:
        """K4 (before 9a77daacc87d): the fault path writes entries with a plain store under the read lock."""
        old = it.old_spte
        if old == _REMOVED and not self.bugs.cas_over_removed:
            self.st[_ST_REMOVED_SEEN] += 1
            return False
        self.tables.store(it.sptep, new)
        self.handle_changed_spte(it.gfn, old, new, it.level, True)
        return True

    def set_spte_atomic_k8_accepts_removed(self, it: TdpIter, new: int) -> bool:
        """K8: tdp_mmu_set_spte_atomic without its REMOVED check: a frozen entry is overwritten."""
        old = it.old_spte
        if self.tables.cas(it.sptep, old, new) != old:
            self.st[_ST_CAS_FAIL] += 1
            return False
        self.handle_changed_spte(it.gfn, old, new, it.level, True)
        return True

    def tdp_mmu_set_spte(self, it: TdpIter, new: int, record_dirty_log: bool = True,
                         record_acc_track: bool = True) -> None:
        """__tdp_mmu_set_spte(): the exclusive setter under the write lock, through kvm_tdp_mmu_write_spte.

        `record_acc_track=False` is tdp_mmu_set_spte_no_acc_track (aging clears A itself).
        """
        self.lockdep_assert_held_write()
        old = it.old_spte
        if old == _REMOVED:
            self.violation("frozen-entry-overwritten", it.gfn, old, new)     # WARN_ON(is_removed_spte(old))
        old = self.kvm_tdp_mmu_write_spte(it.sptep, old, new, it.level)
        it.old_spte = new
        self.handle_changed_spte(it.gfn, old, new, it.level, False, record_dirty_log, record_acc_track)

    def kvm_tdp_mmu_write_spte(self, sptep: int, old: int, new: int, level: int) -> int:
        """kvm_tdp_mmu_write_spte() (ba3a6120a4e7, 5.18; K14): a leaf whose A or D hardware may still set
        (S.spte_has_volatile_bits) is written with xchg, and the value it really replaced is returned for the
        bookkeeping; anything else is a plain store."""
        if spte_has_volatile_bits(old, level):
            self.torture_delay_volatile()        # the processor may set A/D meanwhile
            return self.tables.xchg(sptep, new)
        self.tables.store(sptep, new)
        return old

    def write_spte_k14_plain_store(self, sptep: int, old: int, new: int, level: int) -> int:
        """K14 (5.13, before ba3a6120a4e7): WRITE_ONCE whatever the old value; an A/D bit the processor set
        after the walk read `old` is lost, and the host page never hears of the access."""
        if spte_has_volatile_bits(old, level):
            self.torture_delay_volatile()
        self.tables.store(sptep, new)
        return old

    def tdp_mmu_zap_spte_atomic(self, it: TdpIter) -> bool:
        """tdp_mmu_zap_spte_atomic(): freeze with REMOVED, flush, then clear.

        Between clearing a present entry and the flush no other thread may install
        a present entry (maybe for another page) in the same slot: REMOVED ensures it.
        """
        owed = self.holds_unflushed
        self.mark_unflushed()
        if not self.tdp_mmu_set_spte_atomic(it, _REMOVED):
            if not owed:
                self.unmark_unflushed()          # nothing changed: nothing is owed
            return False
        self.kvm_flush_remote_tlbs()
        self.clear_frozen_spte(it.sptep, it.gfn)
        it.old_spte = 0
        return True

    def zap_spte_atomic_k5_flush_late(self, it: TdpIter) -> bool:
        """K5 (before 08f07c800e9d): the huge leaf cleared to 0 with the atomic setter, the flush after it;
        in between the entry is free for another vCPU to install into while a TLB holds the old leaf."""
        owed = self.holds_unflushed
        self.mark_unflushed()
        if not self.tdp_mmu_set_spte_atomic(it, 0):
            if not owed:
                self.unmark_unflushed()
            return False
        self.torture_delay()
        self.kvm_flush_remote_tlbs()
        it.old_spte = 0
        return True

    def clear_frozen_spte(self, sptep: int, gfn: int) -> None:
        """The freezer's closing plain store of 0: nobody else may write a REMOVED entry."""
        self.tables.store(sptep, 0)

    # ------------------------------------------------------------------ changes (§5.4, §6)

    def handle_changed_spte(self, gfn: int, old: int, new: int, level: int, shared: bool,
                            record_dirty_log: bool = True, record_acc_track: bool = True) -> None:
        """handle_changed_spte(): accounting, the host page's A/D state, dirty logging, and teardown of a
        disconnected table."""
        if old == new:
            return
        was_present = old & _P
        is_present = new & _P
        if not was_present:
            if not is_present:
                return
            if level == 1 or new & _L:
                # a new leaf: counted, and a writable 4K one logged dirty (W went 0 -> 1)
                self.st[_ST_MAPPED[level]] += 1
                if level == 1 and new & _W and record_dirty_log:
                    self.mark_page_dirty(gfn)
            return
        was_leaf = level == 1 or old & _L
        is_leaf = is_present and (level == 1 or new & _L)
        pfn_changed = (old ^ new) & _PFN_MASK
        st = self.st
        if was_leaf:
            if is_leaf and pfn_changed:
                # a present leaf replaced by a present leaf for another page: must zap + flush first
                self.violation("pfn-changed-without-zap", gfn, old, new)
            # the host page hears what the leaf saw (handle_changed_spte_acc_track, kvm_set_pfn_dirty)
            gone = not is_present or pfn_changed
            if old & _A and record_acc_track and (gone or not new & _A):
                self.kvm_set_pfn_accessed((old & _PFN_MASK) >> _PFN_SHIFT, self.pages[level])
            if old & _D and (gone or not new & _D):
                self.kvm_set_pfn_dirty((old & _PFN_MASK) >> _PFN_SHIFT, self.pages[level])
            if not is_leaf:
                st[_ST_MAPPED[level]] -= 1
                st[_ST_ZAPPED] += 1
        elif is_leaf:
            st[_ST_MAPPED[level]] += 1
        # A non-leaf replaced by anything but itself disconnects its table.  The kernel tests
        # only pfn_changed, which suffices where table pages and guest pages are all host
        # frames; here a child table's index and a huge leaf's host page are different
        # namespaces and can be equal, so a non-leaf -> leaf change always counts.
        if not was_leaf and (not is_present or is_leaf or pfn_changed):
            self.handle_removed_pt((old & _PFN_MASK) >> _PFN_SHIFT, shared)
        # handle_changed_spte_dirty_log(): log when W becomes 1 on a 4K entry
        if record_dirty_log and level == 1 and is_present and new & _W and (not old & _W or pfn_changed):
            self.mark_page_dirty(gfn)

    def mark_page_dirty(self, gfn: int) -> None:
        """mark_page_dirty_in_slot(gfn_to_memslot_dirty_bitmap(gfn), gfn): only in a slot that logs."""
        slot = self.slots.gfn_to_memslot_dirty_bitmap(gfn)
        if slot is not None:
            self.slots.mark_dirty(slot, gfn)
            self.st[_ST_DIRTY] += 1

    def handle_removed_pt(self, table: int, shared: bool) -> None:
        """handle_removed_tdp_mmu_page(): unlink, freeze every entry (with the tables below), flush, retire.

        In shared mode every entry is exchanged to REMOVED, waiting out an entry that
        another thread holds frozen; afterwards no thread can install into the table.
        The tables below are taken down in the same pass, and one flush covers them all
        before any is retired (5.13 flushed once per table: docs/internals.md).
        """
        self.mark_unflushed()                    # the entries are about to change under vCPUs' TLBs
        n_tables = self.n_tables
        removed = [table]
        for t in removed:                        # grows as child tables are found
            if t < n_tables:
                self._remove_table(t, shared, removed)
        if any(t >= n_tables for t in removed):
            # a table number past the pool was read from a freed, recycled table (a correct MMU never
            # gets here; the kernel would follow it): recorded, not followed
            self.violation("use-after-free", 0, max(removed), 2)
            removed = [t for t in removed if t < n_tables]
        # no hardware walk may still stand in the table (or the tables below it) when it is freed
        self.kvm_flush_remote_tlbs()
        for t in removed:
            self.free_sp(t)

    def _remove_table(self, table: int, shared: bool, removed: list[int]) -> None:
        """One table of a teardown: off the page list, every entry frozen, its leaves counted, its children queued."""
        t = table * _TM
        level = self.tm.load(t + _T_LEVEL)
        base = self.tm.load(t + _T_GFN)
        self.tdp_mmu_unlink_sp(table, shared)
        E = self.E
        old = np.empty(E, dtype=np.uint64)
        start = table * E
        if shared:
            self.freeze_removed_entries(start, base, table, old)
        else:
            # exclusive: only present entries are written (no thread but the processor writes any)
            self.tables.load_range(start, E, old)
            write = self.kvm_tdp_mmu_write_spte
            for i in np.flatnonzero(old & np.uint64(_P)):
                i = int(i)
                old[i] = write(start + i, int(old[i]), _REMOVED, level)
        present_idx = np.flatnonzero(old & np.uint64(_P))
        if present_idx.size:
            vals = old[present_idx]
            leaf = np.ones(present_idx.size, dtype=bool) if level == 1 else (vals & np.uint64(_L)) != 0
            n_leaf = int(leaf.sum())
            if n_leaf:
                self.st[_ST_MAPPED[level]] -= n_leaf
                self.st[_ST_ZAPPED] += n_leaf
                # handle_changed_spte(old, REMOVED) of each leaf: the host pages hear A and D
                npages = self.pages[level]
                for v in vals[leaf].tolist():
                    if v & _A:
                        self.kvm_set_pfn_accessed((v & _PFN_MASK) >> _PFN_SHIFT, npages)
                    if v & _D:
                        self.kvm_set_pfn_dirty((v & _PFN_MASK) >> _PFN_SHIFT, npages)
            for v in vals[~leaf]:
                removed.append((int(v) & _PFN_MASK) >> _PFN_SHIFT)

    def freeze_removed_entries(self, start: int, base: int, table: int, old: np.ndarray) -> None:
        """The shared-mode loop of handle_removed: xchg every entry to REMOVED; an entry another thread
        holds frozen (mid zap_spte_atomic) is waited out until its 0, then claimed."""
        E = self.E
        self.tables.xchg_range(start, E, _REMOVED, old)
        waits = self.waits
        for i in np.flatnonzero(old == np.uint64(_REMOVED)):
            i = int(i)
            t_wait = waits.now()
            while True:
                o = self.tables.xchg(start + i, _REMOVED)
                if o != _REMOVED:
                    old[i] = o
                    break
                waits.wait_while(self.tables, start + i, _REMOVED, 10000)
                if waits.now() - t_wait > 5.0:
                    # nobody will ever clear this frozen entry: report it instead of spinning
                    self.violation("no-forward-progress", base, table, i)
                    old[i] = 0
                    break

    def freeze_k6_zero_children(self, start: int, base: int, table: int, old: np.ndarray) -> None:
        """K6 (before e25f0e0cd51b): the entries of a disconnected table are exchanged to 0, not REMOVED."""
        self.tables.xchg_range(start, self.E, 0, old)

    def free_sp(self, table: int) -> None:
        """call_rcu(tdp_mmu_free_sp_rcu_callback): the table is freed after a grace period."""
        self.rcu.call_rcu(table)
        self.st[STAT["tables_retired"]] += 1

    def free_sp_now(self, table: int) -> None:
        """Free at once: the pre-series baseline (exclusive mode), and bug K7 (before 7cca2d0b7e7d) in shared mode."""
        self.pool.free([table])
        self.st[STAT["tables_freed"]] += 1

    # ------------------------------------------------------------------ page accounting (§2, tdp_mmu_pages_lock)

    def tdp_mmu_link_sp(self, it: TdpIter, child: int, nx: bool, track_nx: bool, shared: bool) -> bool:
        """Publish a new child table, then account it: 6.2's tdp_mmu_link_sp and the NX tracking after it.

        5.13 put the table on the tdp_mmu_pages list after the cmpxchg (K18); 6.2 keeps
        only a count (d25ceb926436), marks nx_huge_page_disallowed *before* the table is
        visible and adds it to the NX list afterwards under tdp_mmu_pages_lock, only if
        the flag is still set (61f94478547b): a zap in between clears the flag in
        tdp_mmu_unlink_sp, and the late add is skipped.  False: the cmpxchg lost.
        """
        t = child * _TM
        if nx:
            self.tm.store(t + _T_NX, 1)              # sp->nx_huge_page_disallowed = fault->huge_page_disallowed
        if shared:
            if not self.tdp_mmu_set_spte_atomic(it, S.make_nonleaf(child)):
                return False
        else:
            self.tdp_mmu_set_spte(it, S.make_nonleaf(child))
        self.torture_delay()                         # a zap of the new entry may run here
        self.ctl.fetch_add(_C_PAGE_COUNT, 1)         # tdp_account_mmu_page()
        self.tm.store(t + _T_OWNER, NIL)
        if track_nx:
            if shared:
                self.pages_lock.acquire()
            try:
                if self.tm.load(t + _T_NX):
                    self.track_possible_nx_huge_page(child)
            finally:
                if shared:
                    self.pages_lock.release()
        return True

    def link_sp_k18_page_list(self, it: TdpIter, child: int, nx: bool, track_nx: bool, shared: bool) -> bool:
        """K18, 5.13's kvm_tdp_mmu_map: the cmpxchg, then tdp_mmu_link_page (list_add on tdp_mmu_pages and
        account_huge_nx_page under tdp_mmu_pages_lock).  A zap of the new entry in between runs
        list_del on a table not yet on the list, which the late list_add then puts there, freed."""
        if shared:
            if not self.tdp_mmu_set_spte_atomic(it, S.make_nonleaf(child)):
                return False
        else:
            self.tdp_mmu_set_spte(it, S.make_nonleaf(child))
        self.torture_delay()
        if shared:
            self.pages_lock.acquire()
        try:
            tm, ctl = self.tm, self.ctl
            t = child * _TM
            head = ctl.load(_C_LIST_HEAD)
            tm.store(t + _T_PREV, NIL)
            # list words hold table + 1 so that 0 (a zeroed region) is "empty"
            tm.store(t + _T_NEXT, head)
            if head != NIL and head != 0:
                tm.store((head - 1) * _TM + _T_PREV, child + 1)
            ctl.store(_C_LIST_HEAD, child + 1)
            ctl.fetch_add(_C_PAGE_COUNT, 1)
            if track_nx:
                self.account_huge_nx_page(child)
            tm.store(t + _T_OWNER, NIL)
        finally:
            if shared:
                self.pages_lock.release()
        return True

    def tdp_mmu_unlink_sp(self, table: int, shared: bool) -> None:
        """tdp_mmu_unlink_sp() (6.2): the count down; if the table is NX-disallowed, clear that and take it
        off the NX list if it made it there (under tdp_mmu_pages_lock)."""
        self.ctl.fetch_add(_C_PAGE_COUNT, _U64)      # tdp_unaccount_mmu_page()
        t = table * _TM
        if not self.tm.load(t + _T_NX):
            return
        if shared:
            self.pages_lock.acquire()
        try:
            self.tm.store(t + _T_NX, 0)
            self.untrack_possible_nx_huge_page(table)
        finally:
            if shared:
                self.pages_lock.release()

    def unlink_sp_k18_page_list(self, table: int, shared: bool) -> None:
        """K18: 5.13's tdp_mmu_unlink_page(): list_del from tdp_mmu_pages (and the NX list) under the lock."""
        if shared:
            self.pages_lock.acquire()
        try:
            tm, ctl = self.tm, self.ctl
            t = table * _TM
            prev, nxt = tm.load(t + _T_PREV), tm.load(t + _T_NEXT)
            if prev == NIL and ctl.load(_C_LIST_HEAD) != table + 1:
                # list_del of an entry that is not on the list: the corruption behind K18
                self.violation("table-leak", self.tm.load(t + _T_GFN), table, 0)
                return
            if prev == NIL:
                ctl.store(_C_LIST_HEAD, nxt)
            else:
                tm.store((prev - 1) * _TM + _T_NEXT, nxt)
            if nxt not in (NIL, 0):
                tm.store((nxt - 1) * _TM + _T_PREV, prev)
            tm.store(t + _T_PREV, NIL)
            tm.store(t + _T_NEXT, NIL)
            ctl.fetch_add(_C_PAGE_COUNT, _U64)
            if tm.load(t + _T_NX):
                self.unaccount_huge_nx_page(table)
        finally:
            if shared:
                self.pages_lock.release()

    # ------------------------------------------------------------------ the fault's map (§7.2)

    def kvm_tdp_mmu_map(self, fault: "Fault", shared: bool) -> int:
        """kvm_tdp_mmu_map(): walk to the target level, linking tables and splitting huge pages.

        Shared (the series): atomic updates under the read lock.  Not shared: the
        pre-series map, plain stores under the write lock (the exclusive baseline).
        """
        rcu_read_lock, rcu_read_unlock = self.rcu_read_lock, self.rcu_read_unlock
        rcu_read_lock()
        try:
            gfn = fault.gfn
            level = fault.goal_level
            it = self.fault_walk.start(self.root, 1, gfn)
            step = it.next
            nx = self.nx
            while it.valid and it.gfn <= gfn:
                spte = it.old_spte
                if it.level == level:
                    if not (nx and level > 1 and spte & _PL == _P):
                        break
                    level -= 1                       # disallowed_hugepage_adjust(): keep small mappings
                kind = spte & _PL                    # is_shadow_present_pte() and is_large_pte() in one test
                if kind == _P:
                    step()                           # a present non-leaf: step down into it
                    continue
                if kind == _PL:
                    # a huge page above the target level: zap it so it can be split
                    if shared:
                        if not self.tdp_mmu_zap_spte_atomic(it):
                            break
                    else:
                        self.mark_unflushed()
                        self.tdp_mmu_set_spte(it, 0)
                        self.kvm_flush_remote_tlbs()
                    self.st[_ST_SPLITS] += 1
                    spte = it.old_spte = self.tables.load(it.sptep)
                if not spte & _P:
                    child = self.pool.alloc(it.level - 1, it.gfn)
                    self.st[_ST_ALLOC] += 1
                    nx = fault.huge_page_disallowed
                    if not self.tdp_mmu_link_sp(it, child, nx, nx and fault.req_level >= it.level, shared):
                        self.tdp_mmu_free_sp(child)          # lost the race: never visible, back to the cache
                        break
                    self.st[_ST_LINKED] += 1
                step()
            if not it.valid or it.level != level:
                return RET_PF_RETRY
            fault.goal_level = level
            return self.tdp_mmu_map_handle_target_level(fault, it, shared)
        except IndexError:
            # the walk followed an entry to a table outside the pool: it read garbage from a
            # freed or recycled table (a correct MMU never gets here)
            self.violation("use-after-free", fault.gfn, 0, 1)
            return RET_PF_RETRY
        finally:
            rcu_read_unlock()

    def tdp_mmu_free_sp(self, child: int) -> None:
        """tdp_mmu_free_sp() of a table that lost its link race: it was never visible, so it goes straight
        back to this vCPU's memory cache, still zeroed."""
        self.tm.store(child * _TM + _T_NX, 0)
        self.pool.unalloc(child)
        self.st[_ST_LINK_RACE] += 1

    def tdp_mmu_map_handle_target_level(self, fault: "Fault", it: TdpIter, shared: bool) -> int:
        """tdp_mmu_map_handle_target_level(): make_spte() and install the leaf.  Returns FIXED for a changed
        leaf where 5.13 returned 0 (= RETRY; 57a3e96d6d17 fixed it in 5.14): internals.md departure 10."""
        level = fault.goal_level
        pfn_base = fault.pfn & self.level_pfn_mask[level]
        new = self.leaf_template[level] | (pfn_base << _PFN_SHIFT)    # == S.make_leaf(pfn_base, level, ...)
        if new == it.old_spte:
            return RET_PF_SPURIOUS
        if shared:
            if not self.tdp_mmu_set_spte_atomic(it, new):
                return RET_PF_RETRY
        else:
            self.tdp_mmu_set_spte(it, new)
        return RET_PF_FIXED

    # ------------------------------------------------------------------ yielding (§4)

    def tdp_mmu_iter_cond_resched(self, it: TdpIter, flush: bool, shared: bool) -> bool:
        """tdp_mmu_iter_cond_resched(): yield the lock if contended, with forward progress.

        A pending flush completes before the lock is dropped.  Returns True if it yielded;
        the caller then `continue`s, and the walk restarts from the root (5.16's
        `yielded`: the next step restarts instead of advancing).
        """
        bugs = self.bugs
        if not it.can_yield() and not bugs.no_forward_progress:     # K1: ed5e484b79e8
            return False
        if not self.lock.needbreak():
            return False
        if not it.can_yield():
            # I6: a yield must follow progress, else two walkers can yield to each other forever (K1)
            self.violation("no-forward-progress", it.next_last_level_gfn, it.yielded_gfn, it.level)
        self.rcu.read_unlock()
        if flush:
            self.kvm_flush_remote_tlbs()             # I6 (debug checks the unlock: K11 yields with one owed)
        if shared:
            self.lock.read_unlock()
        else:
            self.lock.write_unlock()
        self.torture_delay()                     # cond_resched(): the others run meanwhile
        try:
            self.lock.reacquire(shared)
        except BaseException:
            self.rcu.read_lock()                 # the caller's rcu_read_unlock ends the section it opened
            raise
        self.lock.stats.yields += 1
        self.st[STAT["yields"]] += 1
        self.rcu.read_lock()
        if bugs.advance_after_restart:
            it.restart()                         # K9, 5.13: restart here; the caller's continue advances
        else:
            it.mark_yielded()
        return True

    # ------------------------------------------------------------------ zapping (§10)

    def zap_gfn_range(self, root: int, start: int, end: int, can_yield: bool, flush: bool, shared: bool,
                      min_level: int = 1, zap_all: bool = False) -> bool:
        """zap_gfn_range(): clear every entry covering [start, end); returns whether a flush is pending.

        Shared (5.13): each entry frozen, flushed and cleared (tdp_mmu_zap_spte_atomic).
        Exclusive: plain stores, and the flush is the caller's.  A non-leaf entry the range
        covers only in part is descended into, unless this is a zap of everything
        (524a1e4e381f: zap-all zaps every root entry whole).
        """
        self.lockdep_assert_held(shared)
        self.rcu.read_lock()
        try:
            bits, E = self.bits, self.E
            for it in for_each_pte(self.new_iter(root, min_level, start), end):
                while True:                      # retry:
                    if can_yield and self.tdp_mmu_iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    if not spte & _P:
                        break
                    level = it.level
                    if (not zap_all and not (level == 1 or spte & _L)
                            and (it.gfn < start or it.gfn + (1 << (bits * (level - 1))) > end)):
                        break                    # partly covered table: descend instead
                    if shared:
                        if not self.tdp_mmu_zap_spte_atomic(it):
                            it.old_spte = self.tables.load(it.sptep)
                            continue             # goto retry
                    else:
                        self.mark_unflushed()
                        self.tdp_mmu_set_spte(it, 0)
                        flush = True
                    break
        finally:
            self.rcu.read_unlock()
        return flush

    def kvm_tdp_mmu_zap_gfn_range(self, start: int, end: int, can_yield: bool, flush: bool,
                                  shared: bool) -> bool:
        """__kvm_tdp_mmu_zap_gfn_range(): zap_gfn_range over every root, valid or invalid, a reference held
        across yields, the pending flush threaded through (a835429cda91: a flush owed from one root is
        honoured before yielding in the next).

        5.13's yield-safe walk skipped invalid roots (zap range, zap-all); 5.13's notifier did
        not use it (it walked every root, unsafe_root_walk below) until 7533377215b6 (5.16).
        d62007edf01f (5.18) walks invalid roots too: an invalid root whose zapper yielded
        still maps the range, and the MMU notifier must not return while any root does
        (switch unmap-skips-invalid-roots: 5.16-5.17's notifier on 5.13's code).
        """
        only_valid = self.zap_skips_invalid_roots
        for row in self.for_each_tdp_mmu_root_yield_safe(shared, only_valid):
            flush = self.zap_gfn_range(self.root_table(row), start, end, can_yield, flush, shared)
        return flush

    def zap_gfn_range_k11_flush_not_passed(self, start: int, end: int, can_yield: bool, flush: bool,
                                           shared: bool) -> bool:
        """K11 (before a835429cda91): `flush |= zap_gfn_range(root, ..., flush=false)`: each root's walk
        starts owing nothing, so a yield in a later root drops the lock with an earlier root's zaps
        unflushed; the caller flushes at the end."""
        for row in self.for_each_tdp_mmu_root_yield_safe(shared, self.zap_skips_invalid_roots):
            flush |= self.zap_gfn_range(self.root_table(row), start, end, can_yield, False, shared)
        return flush

    def kvm_tdp_mmu_unmap_gfn_range(self, start: int, end: int, may_block: bool, flush: bool) -> bool:
        """kvm_tdp_mmu_unmap_gfn_range() (the MMU notifier, write lock): __kvm_tdp_mmu_zap_gfn_range with
        can_yield = range->may_block (7533377215b6: the yield-safe root walk)."""
        return self.kvm_tdp_mmu_zap_gfn_range(start, end, may_block, flush, False)

    def unmap_gfn_range_unsafe_root_walk(self, start: int, end: int, may_block: bool, flush: bool) -> bool:
        """5.13 as released (before 7533377215b6): for_each_tdp_mmu_root, no reference on the root, yet
        zap_gfn_range may yield (may_block, e1eed5847b09); while the lock is dropped the root's last
        reference can go and its table be freed, and the walk resumes in it."""
        for row in self.for_each_tdp_mmu_root():
            table = self.root_table(row)             # the root pointer the list walk holds
            if table:
                flush |= self.zap_gfn_range(table, start, end, may_block, flush, False)
        return flush

    def kvm_tdp_mmu_zap_all(self) -> None:
        """kvm_tdp_mmu_zap_all(): everything, with the write lock held, then the flush.

        The range is the whole tree and every root entry is zapped whole (524a1e4e381f);
        K17 ends at the host's physical limit instead and so skips a root entry that
        reaches past it.  With K9 the walk is 5.14's (root entries only, 0103098fb4f1),
        the form in which advancing after a restart skips a whole subtree.
        """
        self.lockdep_assert_held_write()
        bugs = self.bugs
        min_level = self.root_level if bugs.advance_after_restart else 1
        flush = False
        for row in self.for_each_tdp_mmu_root_yield_safe(False, self.zap_skips_invalid_roots):
            root = self.root_table(row)
            owed = False if bugs.yield_with_owed_flush else flush        # K11: not passed on
            if bugs.zap_all_phys_end:
                done = self.zap_gfn_range(root, 0, self.phys_max_gfn, True, owed, False, min_level)
            else:
                done = self.zap_gfn_range(root, 0, self.max_gfn, True, owed, False, min_level, zap_all=True)
            flush = flush or done if bugs.yield_with_owed_flush else done
        if flush or self.holds_unflushed:
            self.kvm_flush_remote_tlbs()

    def kvm_tdp_mmu_zap_sp(self, table: int) -> bool:
        """kvm_tdp_mmu_zap_sp(): zap a table's span without yielding (the caller may hold a pending flush,
        33a3164161fc); returns whether a flush is owed (048f49809c52)."""
        tm = self.tm
        gfn = tm.load(table * _TM + _T_GFN)
        span = 1 << (self.bits * tm.load(table * _TM + _T_LEVEL))
        return self.kvm_tdp_mmu_zap_gfn_range(gfn, gfn + span, False, False, False)

    # ------------------------------------------------------------------ aging (C9: the notifier's clear/test_young)

    def age_gfn_range(self, root: int, start: int, end: int) -> list[tuple[int, int]]:
        """age_gfn_range() (5.13, through kvm_tdp_mmu_handle_gfn: write lock, no yield): clear A on every
        accessed leaf of [start, end) with tdp_mmu_set_spte_no_acc_track; returns the leaves that were young."""
        self.lockdep_assert_held_write()
        young = []
        self.rcu.read_lock()
        try:
            for it in for_each_leaf(self.new_iter(root, 1, start), end):
                old = it.old_spte
                if not old & _A:
                    continue                     # a non-accessed entry need not change
                young.append((it.gfn, it.level))
                self.tdp_mmu_set_spte(it, old & ~_A, record_acc_track=False)
        finally:
            self.rcu.read_unlock()
        return young

    def kvm_tdp_mmu_age_gfn_range(self, start: int, end: int) -> list[tuple[int, int]]:
        """kvm_tdp_mmu_age_gfn_range(): age_gfn_range on every root (for_each_tdp_mmu_root)."""
        young = []
        for row in self.for_each_tdp_mmu_root():
            young += self.age_gfn_range(self.root_table(row), start, end)
        return young

    def kvm_tdp_mmu_test_age_gfn(self, start: int, end: int) -> bool:
        """kvm_tdp_mmu_test_age_gfn(): is any leaf of [start, end) accessed, in any root."""
        self.lockdep_assert_held_write()
        self.rcu.read_lock()
        try:
            for row in self.for_each_tdp_mmu_root():
                for it in for_each_leaf(self.new_iter(self.root_table(row), 1, start), end):
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
        self.lockdep_assert_held(shared)
        changed = 0
        flush = False
        E = self.E
        old = np.empty(E, dtype=np.uint64)
        self.rcu.read_lock()
        try:
            it = self.new_iter(root, min(2, self.root_level), start)
            for it in for_each_pte(it, end):
                while True:
                    if self.tdp_mmu_iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    if not spte & _P:
                        break
                    if spte & _L:                                     # a huge leaf
                        if not spte & _W:
                            break
                        self.mark_unflushed()                # before the change a vCPU may observe
                        flush = True                         # owed from here on, changed or not (I6)
                        if shared:
                            if not self.tdp_mmu_set_spte_atomic(it, spte & ~_W):
                                it.old_spte = self.tables.load(it.sptep)
                                continue
                        else:
                            self.tdp_mmu_set_spte(it, spte & ~_W, record_dirty_log=False)
                        changed += 1
                        break
                    if it.level == 2 and min_level == 1:              # a table of 4K leaves: one batch
                        child = (spte & _PFN_MASK) >> _PFN_SHIFT
                        self.mark_unflushed()
                        flush = True
                        changed += self.tables.clear_where(child * E, E, _P, _P, _W, old)
                    break
        finally:
            self.rcu.read_unlock()
        if flush or self.holds_unflushed:
            self.kvm_flush_remote_tlbs()
        self.st[STAT["wrprot_leaves"]] += changed
        return changed

    def kvm_tdp_mmu_wrprot_slot(self, slot: Slot, min_level: int, shared: bool) -> int:
        """kvm_tdp_mmu_wrprot_slot(): wrprot_gfn_range over the slot, on every valid root (yield-safe)."""
        return sum(self.wrprot_gfn_range(self.root_table(row), slot.base_gfn, slot.end_gfn, min_level, shared)
                   for row in self.for_each_tdp_mmu_root_yield_safe(shared))

    def clear_dirty_pt_masked(self, root: int, gfn: int, mask: int) -> bool:
        """clear_dirty_pt_masked(): write-protect the 4K leaves of [gfn, gfn+64) named by mask (write lock)."""
        self.lockdep_assert_held_write()
        if not mask:
            return False
        late = self.bugs.dirty_mask_late_clear
        first = (mask & -mask).bit_length() - 1
        changed = False
        visited = 0
        self.rcu.read_lock()
        try:
            for it in for_each_leaf(self.new_iter(root, 1, gfn + first), gfn + 64):
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
                self.mark_unflushed()
                self.tdp_mmu_set_spte(it, spte & ~_W, record_dirty_log=False)
                changed = True
            if mask & visited:
                # the mask must only name leaves not yet handled, or the walk cannot stop early (K3)
                self.violation("mask-walk-overrun", gfn, mask & visited, mask)
        finally:
            self.rcu.read_unlock()
        return changed

    def kvm_tdp_mmu_clear_dirty_pt_masked(self, slot: Slot, gfn: int, mask: int) -> bool:
        """kvm_tdp_mmu_clear_dirty_pt_masked(): clear_dirty_pt_masked on every root (write lock, no yield)."""
        changed = False
        for row in self.for_each_tdp_mmu_root():
            changed |= self.clear_dirty_pt_masked(self.root_table(row), gfn, mask)
        return changed

    def zap_collapsible_spte_range(self, root: int, slot: Slot, flush: bool, shared: bool) -> tuple[int, bool]:
        """zap_collapsible_spte_range() (5.13): zap every leaf below the level its slot could now map,
        each with its own freeze and flush (tdp_mmu_zap_spte_atomic); a later fault maps the huge page
        over the empty table, which tears it down.  Returns (leaves zapped, flush pending)."""
        self.lockdep_assert_held(shared)
        if slot.huge_level < 2:
            return 0, flush
        zapped = 0
        max_level = self.slots.max_mapping_level
        self.rcu.read_lock()
        try:
            for it in for_each_pte(self.new_iter(root, 1, slot.base_gfn), slot.end_gfn):
                while True:                      # retry:
                    if self.tdp_mmu_iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    level = it.level
                    if not spte & _P or not (level == 1 or spte & _L):
                        break
                    if level >= max_level(slot, it.gfn):
                        break
                    if shared:
                        if not self.tdp_mmu_zap_spte_atomic(it):
                            it.old_spte = self.tables.load(it.sptep)
                            continue             # goto retry
                    else:
                        self.mark_unflushed()
                        self.tdp_mmu_set_spte(it, 0)
                    flush = True
                    zapped += 1
                    break
        finally:
            self.rcu.read_unlock()
        self.st[STAT["collapsible_zaps"]] += zapped
        return zapped, flush

    def kvm_tdp_mmu_zap_collapsible_sptes(self, slot: Slot, shared: bool) -> int:
        """kvm_tdp_mmu_zap_collapsible_sptes(): zap_collapsible_spte_range on every valid root (yield-safe),
        the pending flush threaded through and done at the end; returns the leaves zapped."""
        total, flush = 0, False
        for row in self.for_each_tdp_mmu_root_yield_safe(shared):
            n, flush = self.zap_collapsible_spte_range(self.root_table(row), slot, flush, shared)
            total += n
        if flush or self.holds_unflushed:
            self.kvm_flush_remote_tlbs()
        return total
