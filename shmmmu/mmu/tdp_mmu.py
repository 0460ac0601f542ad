"""TDP MMU: arch/x86/kvm/mmu/tdp_mmu.c's core: setting entries, handling their changes, tearing tables down, yielding.

Every function here takes `shared` (read lock held, atomic updates) or is
one side of that choice, opens with the held-lock assertion the kernel has
(lockdep_assert_held*), and takes no lock of its own except the page-list lock
inside mmu_lock.  The rest of tdp_mmu.c is beside it: the fault's map and the
accounting of linked tables (tdp_map.py), zapping (tdp_zap.py), write
protection, dirty logging and aging (tdp_dirty.py).  Everything is written on
the TDP iterator (shmmmu.tdp_iter).

Freeing a table needs three things: it is unreachable, a TLB flush completed
after it was unlinked, and a grace period ended (software walkers under the
read lock are RCU readers).  Changes that leave a vCPU translation stale are
counted in the region's "unflushed" word until their flush completes, which is
what lets a vCPU tell a legitimately stale translation (flush in progress) from
a forgotten flush.

A variant (shmmmu.variants: a bug switch, or a later kernel's behaviour) is a
function beside the one it replaces, named after what it re-creates; the Mmu
front puts it in place when it is built.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import STAT
from shmmmu.mmu.instruments import site
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu.rwlock import HELD_READ
from shmmmu.spte import spte_has_volatile_bits
from shmmmu.tdp_iter import TdpIter

_P = S.MMU_PRESENT
_L = S.LARGE
_W = S.WRITABLE
_A = S.ACCESSED
_D = S.DIRTY
_REMOVED = S.REMOVED
_PFN_MASK = S.PFN_MASK
_PFN_SHIFT = S.PFN_SHIFT
_U64 = (1 << 64) - 1

_ST_CAS_FAIL = STAT["cas_failures"]
_ST_REMOVED_SEEN = STAT["removed_seen"]
_ST_MAPPED = [0, STAT["mapped_4k"], STAT["mapped_2m"], STAT["mapped_1g"], STAT["mapped_1g"]]
_ST_ZAPPED = STAT["zapped_leaves"]
_ST_DIRTY = STAT["dirty_marked"]


class TdpMmu(Part):
    """The setters, handle_changed_spte, the teardown of disconnected tables, and the yield of a walk."""

    __slots__ = ("map", "n_tables")
    map: Any                        # the tdp_map part: a torn-down table is unaccounted there

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)
        self.n_tables = self.tables_np.shape[0]

    # ------------------------------------------------------------------ setters (KVM_TDP_MMU.md §5)

    @site("debug")
    def tdp_mmu_set_spte_atomic(self, it: TdpIter, new: int) -> bool:
        """tdp_mmu_set_spte_atomic(): cmpxchg against the value the walk saw; False if it changed.

        Only the thread that froze an entry may write it: a REMOVED old value fails.
        """
        if self.lock.mode != HELD_READ:
            self.kvm._lockdep(HELD_READ)
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
        """Variant fault-plain-store (K4, before 9a77daacc87d): the fault path writes entries with a plain
        store under the read lock."""
        old = it.old_spte
        if old == _REMOVED:
            self.st[_ST_REMOVED_SEEN] += 1
            return False
        self.tables.store(it.sptep, new)
        self.handle_changed_spte(it.gfn, old, new, it.level, True)
        return True

    def set_spte_atomic_k8_accepts_removed(self, it: TdpIter, new: int) -> bool:
        """Variant cas-over-removed (K8): tdp_mmu_set_spte_atomic without its REMOVED check: a frozen entry
        is overwritten."""
        old = it.old_spte
        if self.tables.cas(it.sptep, old, new) != old:
            self.st[_ST_CAS_FAIL] += 1
            return False
        self.handle_changed_spte(it.gfn, old, new, it.level, True)
        return True

    @site("debug")
    def tdp_mmu_set_spte(self, it: TdpIter, new: int, record_dirty_log: bool = True,
                         record_acc_track: bool = True) -> None:
        """__tdp_mmu_set_spte(): the exclusive setter under the write lock, through kvm_tdp_mmu_write_spte.

        `record_acc_track=False` is tdp_mmu_set_spte_no_acc_track (aging clears A itself).
        """
        self.kvm.lockdep_assert_held_write()
        old = it.old_spte
        if old == _REMOVED:
            self.kvm.violation("frozen-entry-overwritten", it.gfn, old, new)     # WARN_ON(is_removed_spte(old))
        old = self.kvm_tdp_mmu_write_spte(it.sptep, old, new, it.level)
        it.old_spte = new
        self.handle_changed_spte(it.gfn, old, new, it.level, False, record_dirty_log, record_acc_track)

    def kvm_tdp_mmu_write_spte(self, sptep: int, old: int, new: int, level: int) -> int:
        """kvm_tdp_mmu_write_spte() (ba3a6120a4e7, 5.18; K14): a leaf whose A or D hardware may still set
        (S.spte_has_volatile_bits) is written with xchg, and the value it really replaced is returned for the
        bookkeeping; anything else is a plain store."""
        if spte_has_volatile_bits(old, level):
            self.kvm.torture_delay_volatile()        # the processor may set A/D meanwhile
            return self.tables.xchg(sptep, new)
        self.tables.store(sptep, new)
        return old

    def tdp_mmu_clear_spte_bits(self, sptep: int, old: int, mask: int, level: int) -> int:
        """tdp_mmu_clear_spte_bits() (tdp_iter.h, 6.4 on; profile 6.12): clear only `mask`, with one atomic AND
        where the processor may still set A or D (kvm_tdp_mmu_spte_need_atomic_write), so a bit it sets
        meanwhile stays in the entry, where 5.13's exchange of a whole value computed from `old` drops it from
        the entry (reporting it to the host page); a plain store elsewhere.  Returns the value replaced."""
        if spte_has_volatile_bits(old, level):
            self.kvm.torture_delay_volatile()        # the processor may set A/D meanwhile
            return self.tables.fetch_and(sptep, ~mask & _U64)
        self.tables.store(sptep, old & ~mask)
        return old

    def write_spte_k14_plain_store(self, sptep: int, old: int, new: int, level: int) -> int:
        """Variant exclusive-plain-store (K14, 5.13 before ba3a6120a4e7): WRITE_ONCE whatever the old value;
        an A/D bit the processor set after the walk read `old` is lost, and the host page never hears of
        the access."""
        if spte_has_volatile_bits(old, level):
            self.kvm.torture_delay_volatile()
        self.tables.store(sptep, new)
        return old

    def tdp_mmu_zap_spte_atomic(self, it: TdpIter) -> bool:
        """tdp_mmu_zap_spte_atomic(): freeze with REMOVED, flush, then clear.

        Between clearing a present entry and the flush no other thread may install
        a present entry (maybe for another page) in the same slot: REMOVED ensures it.
        """
        kvm = self.kvm
        owed = kvm.holds_unflushed
        kvm.mark_unflushed()
        if not self.tdp_mmu_set_spte_atomic(it, _REMOVED):
            if not owed:
                kvm.unmark_unflushed()          # nothing changed: nothing is owed
            return False
        kvm.kvm_flush_remote_tlbs()
        self.clear_frozen_spte(it.sptep, it.gfn)
        it.old_spte = 0
        return True

    def zap_spte_atomic_k5_flush_late(self, it: TdpIter) -> bool:
        """Variant fault-zap-flush-late (K5, before 08f07c800e9d): the huge leaf cleared to 0 with the
        atomic setter, the flush after it; in between the entry is free for another vCPU to install into
        while a TLB holds the old leaf."""
        kvm = self.kvm
        owed = kvm.holds_unflushed
        kvm.mark_unflushed()
        if not self.tdp_mmu_set_spte_atomic(it, 0):
            if not owed:
                kvm.unmark_unflushed()
            return False
        kvm.torture_delay()
        kvm.kvm_flush_remote_tlbs()
        it.old_spte = 0
        return True

    @site("debug")
    def clear_frozen_spte(self, sptep: int, gfn: int) -> None:
        """The freezer's closing plain store of 0: nobody else may write a REMOVED entry."""
        self.tables.store(sptep, 0)

    # ------------------------------------------------------------------ changes (§5.4, §6)

    @site("trace")
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
            kvm = self.kvm
            if is_leaf and pfn_changed:
                # a present leaf replaced by a present leaf for another page: must zap + flush first
                kvm.violation("pfn-changed-without-zap", gfn, old, new)
            # the host page hears what the leaf saw (handle_changed_spte_acc_track, kvm_set_pfn_dirty)
            gone = not is_present or pfn_changed
            if old & _A and record_acc_track and (gone or not new & _A):
                kvm.kvm_set_pfn_accessed((old & _PFN_MASK) >> _PFN_SHIFT, self.pages[level])
            if old & _D and (gone or not new & _D):
                kvm.kvm_set_pfn_dirty((old & _PFN_MASK) >> _PFN_SHIFT, self.pages[level])
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

    # ------------------------------------------------------------------ teardown

    def handle_removed_pt(self, table: int, shared: bool) -> None:
        """handle_removed_tdp_mmu_page(): unlink, freeze every entry (with the tables below), flush, retire.

        In shared mode every entry is exchanged to REMOVED, waiting out an entry that
        another thread holds frozen; afterwards no thread can install into the table.
        The tables below are taken down in the same pass, and one flush covers them all
        before any is retired (5.13 flushed once per table: docs/internals.md).
        """
        kvm = self.kvm
        kvm.mark_unflushed()                     # the entries are about to change under vCPUs' TLBs
        n_tables = self.n_tables
        removed = [table]
        for t in removed:                        # grows as child tables are found
            if t < n_tables:
                self.remove_table(t, shared, removed)
        if any(t >= n_tables for t in removed):
            # a table number past the pool was read from a freed, recycled table (a correct MMU never
            # gets here; the kernel would follow it): recorded, not followed
            kvm.violation("use-after-free", 0, max(removed), 2)
            removed = [t for t in removed if t < n_tables]
        # no hardware walk may still stand in the table (or the tables below it) when it is freed
        kvm.kvm_flush_remote_tlbs()
        for t in removed:
            self.free_sp(t)

    @site("debug", "trace")
    def remove_table(self, table: int, shared: bool, removed: list[int]) -> None:
        """One table of a teardown: off the page list, every entry frozen, its leaves counted, its children
        queued (the loop body of handle_removed_tdp_mmu_page)."""
        tmeta = self.tmeta
        level = tmeta.level.load(table)
        base = tmeta.gfn.load(table)
        self.map.tdp_mmu_unlink_sp(table, shared)
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
                kvm = self.kvm
                for v in vals[leaf].tolist():
                    if v & _A:
                        kvm.kvm_set_pfn_accessed((v & _PFN_MASK) >> _PFN_SHIFT, npages)
                    if v & _D:
                        kvm.kvm_set_pfn_dirty((v & _PFN_MASK) >> _PFN_SHIFT, npages)
            for v in vals[~leaf]:
                removed.append((int(v) & _PFN_MASK) >> _PFN_SHIFT)

    @site("trace")
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
                    self.kvm.violation("no-forward-progress", base, table, i)
                    old[i] = 0
                    break

    def freeze_k6_zero_children(self, start: int, base: int, table: int, old: np.ndarray) -> None:
        """Variant zero-removed-children (K6, before e25f0e0cd51b): the entries of a disconnected table are
        exchanged to 0, not REMOVED."""
        self.tables.xchg_range(start, self.E, 0, old)

    @site("debug")
    def free_sp(self, table: int) -> None:
        """call_rcu(tdp_mmu_free_sp_rcu_callback): the table is freed after a grace period."""
        self.rcu.call_rcu(table)
        self.st[STAT["tables_retired"]] += 1

    def free_sp_now(self, table: int) -> None:
        """Free at once: the pre-series baseline (exclusive mode), and variant rcu-free-immediately (K7,
        before 7cca2d0b7e7d) in shared mode."""
        self.pool.free([table])
        self.st[STAT["tables_freed"]] += 1

    # ------------------------------------------------------------------ yielding (§4)

    @site("debug")
    def tdp_mmu_iter_cond_resched(self, it: TdpIter, flush: bool, shared: bool) -> bool:
        """tdp_mmu_iter_cond_resched(): yield the lock if contended, with forward progress.

        A pending flush completes before the lock is dropped.  Returns True if it yielded;
        the caller then `continue`s, and the walk restarts from the root (5.16's
        `yielded`: the next step restarts instead of advancing).
        """
        if not it.can_yield():               # ed5e484b79e8: no yield before progress
            return False
        if not self.lock.needbreak():
            return False
        self._yield(flush, shared)
        it.mark_yielded()
        return True

    def cond_resched_k1_no_progress_check(self, it: TdpIter, flush: bool, shared: bool) -> bool:
        """Variant no-forward-progress (K1, before ed5e484b79e8): yield whenever the lock is contended, even
        at the GFN the walk last yielded at; two walkers can hand the lock to each other for ever."""
        if not self.lock.needbreak():
            return False
        if not it.can_yield():
            # I6: a yield must follow progress, else two walkers can yield to each other forever (K1)
            self.kvm.violation("no-forward-progress", it.next_last_level_gfn, it.yielded_gfn, it.level)
        self._yield(flush, shared)
        it.mark_yielded()
        return True

    def cond_resched_k9_restart_then_advance(self, it: TdpIter, flush: bool, shared: bool) -> bool:
        """Variant advance-after-restart (K9, 5.13 before 3a0f64de479c): the walk restarts inside the yield
        and the caller's `continue` then advances it, skipping the entry at next_last_level_gfn."""
        if not it.can_yield() or not self.lock.needbreak():
            return False
        self._yield(flush, shared)
        it.restart()
        return True

    def _yield(self, flush: bool, shared: bool) -> None:
        """The yield of tdp_mmu_iter_cond_resched (5.13's order): end the read-side section, flush what is
        owed, drop and retake mmu_lock (cond_resched_rwlock_read/write), begin a new section.

        5.18 put the flush before rcu_read_unlock (bd29677952fa) ahead of deferring the teardown's flush to
        the caller (bb95dfb9e2df); 5.13 flushes inside the teardown, before call_rcu, so no table it frees
        can be reached once the section ends and the order here changes nothing (docs/internals.md, 6.12)."""
        self.rcu.read_unlock()
        if flush:
            self.kvm.kvm_flush_remote_tlbs()         # I6 (debug checks the unlock: K11 yields with one owed)
        self._drop_and_retake(shared)

    def _drop_and_retake(self, shared: bool) -> None:
        """cond_resched_rwlock_read/write, then a new read-side section."""
        if shared:
            self.lock.read_unlock()
        else:
            self.lock.write_unlock()
        self.kvm.torture_delay()                     # cond_resched(): the others run meanwhile
        try:
            self.lock.reacquire(shared)
        except BaseException:
            self.rcu.read_lock()                     # the caller's rcu_read_unlock ends the section it opened
            raise
        self.lock.stats.yields += 1
        self.st[STAT["yields"]] += 1
        self.rcu.read_lock()
