"""TDP zap: tdp_mmu.c's zapping: a GFN range of one root or of all of them, zap-all, one table, a whole root, collapsible leaves.

Shared (5.13): each entry is frozen, flushed and cleared
(tdp_mmu_zap_spte_atomic), and a lost compare-exchange re-reads the entry and
tries again (`goto retry`).  Exclusive: plain stores, and the flush is the
caller's.  A walk that may yield threads its pending flush through every
yield (a835429cda91) and through every root.
"""
from __future__ import annotations

from typing import Any, Callable

from shmmmu import spte as S
from shmmmu.layout import STAT
from shmmmu.memslots import Slot
from shmmmu.mmu.instruments import site
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu.tdp_iter import for_each_pte

_P = S.MMU_PRESENT
_L = S.LARGE
_MAX_HUGE_LEVEL = 3                 # KVM_MAX_HUGEPAGE_LEVEL: 1G


class TdpZap(Part):
    """zap_gfn_range and the walks that call it."""

    __slots__ = ("tdp", "roots", "phys_max_gfn")
    tdp: Any                        # the tdp_mmu part: setters and the yield
    roots: Any                 # the roots part: the walks over roots

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)
        self.phys_max_gfn = kvm.phys_max_gfn

    @site("debug", "timeline")
    def zap_gfn_range(self, root: int, start: int, end: int, can_yield: bool, flush: bool, shared: bool,
                      min_level: int = 1, zap_all: bool = False) -> bool:
        """zap_gfn_range(): clear every entry covering [start, end); returns whether a flush is pending.

        A non-leaf entry the range covers only in part is descended into, unless this is
        a zap of everything (524a1e4e381f: zap-all zaps every root entry whole).
        """
        kvm, tdp = self.kvm, self.tdp
        kvm.lockdep_assert_held(shared)
        self.rcu.read_lock()
        try:
            bits = self.bits
            for it in for_each_pte(kvm.new_iter(root, min_level, start), end):
                while True:                      # retry:
                    if can_yield and tdp.tdp_mmu_iter_cond_resched(it, flush, shared):
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
                        if not tdp.tdp_mmu_zap_spte_atomic(it):
                            it.old_spte = self.tables.load(it.sptep)
                            continue             # goto retry
                    else:
                        kvm.mark_unflushed()
                        tdp.tdp_mmu_set_spte(it, 0)
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
        (switch unmap-skips-invalid-roots: 5.16-5.17's notifier on 5.13's code)."""
        roots = self.roots
        for row in roots.for_each_tdp_mmu_root_yield_safe(shared, False):
            flush = self.zap_gfn_range(roots.root_table(row), start, end, can_yield, flush, shared)
        return flush

    def zap_gfn_range_k11_flush_not_passed(self, start: int, end: int, can_yield: bool, flush: bool,
                                           shared: bool) -> bool:
        """Variant yield-with-owed-flush (K11, before a835429cda91): `flush |= zap_gfn_range(root, ...,
        flush=false)`: each root's walk starts owing nothing, so a yield in a later root drops the lock with
        an earlier root's zaps unflushed; the caller flushes at the end."""
        roots = self.roots
        for row in roots.for_each_tdp_mmu_root_yield_safe(shared, False):
            flush |= self.zap_gfn_range(roots.root_table(row), start, end, can_yield, False, shared)
        return flush

    def zap_gfn_range_valid_roots_only(self, start: int, end: int, can_yield: bool, flush: bool,
                                       shared: bool) -> bool:
        """Variant unmap-skips-invalid-roots: the yield-safe walk skips invalid roots (kvm_tdp_mmu_get_root's
        check), as before d62007edf01f: an invalid root whose zapper yielded still maps the range when the
        MMU notifier returns."""
        roots = self.roots
        for row in roots.for_each_tdp_mmu_root_yield_safe(shared, True):
            flush = self.zap_gfn_range(roots.root_table(row), start, end, can_yield, flush, shared)
        return flush

    # ------------------------------------------------------------------ 6.12: leafs only, under the write lock

    def tdp_mmu_zap_leafs(self, root: int, start: int, end: int, can_yield: bool, flush: bool) -> bool:
        """tdp_mmu_zap_leafs() (6.12; the write lock): clear every present leaf covering [start, end) and keep
        the tables; returns whether a flush is pending.  A yield restarts the walk at the GFN it reached.

        6.12 owes no flush for a root that is invalid (a vCPU flushes when it loads its next root);
        here the walk covers valid roots only, and one invalidated during a yield is flushed too."""
        kvm, tdp = self.kvm, self.tdp
        kvm.lockdep_assert_held_write()
        end = min(end, self.max_gfn)
        self.rcu.read_lock()
        try:
            for it in for_each_pte(kvm.new_iter(root, 1, start), end):
                if can_yield and tdp.tdp_mmu_iter_cond_resched(it, flush, False):
                    flush = False
                    continue
                spte = it.old_spte
                if not spte & _P or not (it.level == 1 or spte & _L):
                    continue
                kvm.mark_unflushed()
                tdp.tdp_mmu_set_spte(it, 0)
                flush = True
        finally:
            self.rcu.read_unlock()
        return flush

    @site("debug")
    def kvm_tdp_mmu_zap_leafs(self, start: int, end: int, flush: bool) -> bool:
        """kvm_tdp_mmu_zap_leafs() (6.12): tdp_mmu_zap_leafs over every valid root, yield-safe, the pending
        flush threaded through (the write lock held)."""
        roots = self.roots
        for row in roots.for_each_tdp_mmu_root_yield_safe(False, True):
            flush = self.tdp_mmu_zap_leafs(roots.root_table(row), start, end, True, flush)
        return flush

    def kvm_tdp_mmu_unmap_gfn_range_612(self, start: int, end: int, may_block: bool, flush: bool) -> bool:
        """kvm_tdp_mmu_unmap_gfn_range() (6.12; the MMU notifier, write lock): tdp_mmu_zap_leafs over every
        root, valid or invalid (__for_each_tdp_mmu_root_yield_safe with only_valid false: d62007edf01f), a
        reference held across yields, yielding only if range->may_block: the leaves go, the tables stay
        (f47e5bbbc92f).  The leaf zap is zap-range-leafs' own (tdp_mmu_zap_leafs), so an invalid root's zaps
        are flushed too, where 6.12 owes them no flush (a departure: a superset)."""
        roots = self.roots
        for row in roots.for_each_tdp_mmu_root_yield_safe(False, False):
            flush = self.tdp_mmu_zap_leafs(roots.root_table(row), start, end, may_block, flush)
        return flush

    def kvm_tdp_mmu_unmap_gfn_range(self, start: int, end: int, may_block: bool, flush: bool) -> bool:
        """kvm_tdp_mmu_unmap_gfn_range() (the MMU notifier, write lock): __kvm_tdp_mmu_zap_gfn_range with
        can_yield = range->may_block (7533377215b6: the yield-safe root walk)."""
        return self.kvm_tdp_mmu_zap_gfn_range(start, end, may_block, flush, False)

    def unmap_gfn_range_unsafe_root_walk(self, start: int, end: int, may_block: bool, flush: bool) -> bool:
        """Variant notifier-unsafe-root-walk (5.13 as released, before 7533377215b6): for_each_tdp_mmu_root,
        no reference on the root, yet zap_gfn_range may yield (may_block, e1eed5847b09); while the lock is
        dropped the root's last reference can go and its table be freed, and the walk resumes in it."""
        roots = self.roots
        for row in roots.for_each_tdp_mmu_root():
            table = roots.root_table(row)             # the root pointer the list walk holds
            if table:
                flush |= self.zap_gfn_range(table, start, end, may_block, flush, False)
        return flush

    # ------------------------------------------------------------------ everything

    def kvm_tdp_mmu_zap_all(self) -> None:
        """kvm_tdp_mmu_zap_all(): every root entry zapped whole (524a1e4e381f), with the write lock held, the
        pending flush threaded through the roots, then the flush."""
        kvm, roots = self.kvm, self.roots
        kvm.lockdep_assert_held_write()
        flush = False
        for row in roots.for_each_tdp_mmu_root_yield_safe(False, False):
            flush = self.zap_gfn_range(roots.root_table(row), 0, self.max_gfn, True, flush, False, 1, True)
        if flush or kvm.holds_unflushed:
            kvm.kvm_flush_remote_tlbs()

    def _zap_all_with(self, end: int, min_level: int, pass_flush: bool, only_valid: bool, whole: bool) -> None:
        """kvm_tdp_mmu_zap_all as the variants below have it: an end, a first level, whether the pending
        flush is passed to the next root, whether invalid roots are skipped, whether root entries the range
        covers in part are zapped whole."""
        kvm, roots = self.kvm, self.roots
        kvm.lockdep_assert_held_write()
        flush = False
        for row in roots.for_each_tdp_mmu_root_yield_safe(False, only_valid):
            done = self.zap_gfn_range(roots.root_table(row), 0, end, True, flush if pass_flush else False, False,
                                      min_level, whole)
            flush = done if pass_flush else flush or done
        if flush or kvm.holds_unflushed:
            kvm.kvm_flush_remote_tlbs()

    def zap_all_k9_root_entries(self) -> None:
        """Variant advance-after-restart (K9): 5.14's zap-all, which walks the root entries only (0103098fb4f1),
        the form in which advancing after a restart skips a whole subtree (CVE-2021-47094)."""
        self._zap_all_with(self.max_gfn, self.root_level, True, False, True)

    def zap_all_k11_flush_not_passed(self) -> None:
        """Variant yield-with-owed-flush (K11): each root's zap starts owing nothing."""
        self._zap_all_with(self.max_gfn, 1, False, False, True)

    def zap_all_k17_phys_end(self) -> None:
        """Variant zap-all-phys-end (K17, before 524a1e4e381f): 5.13's zap-all ends at the host's physical
        limit (1 << (shadow_phys_bits - PAGE_SHIFT)) and skips a root entry that reaches past it."""
        self._zap_all_with(self.phys_max_gfn, 1, True, False, False)

    def zap_all_valid_roots_only(self) -> None:
        """Variant unmap-skips-invalid-roots: zap-all's root walk skips invalid roots too."""
        self._zap_all_with(self.max_gfn, 1, True, True, True)

    def tdp_mmu_zap_root(self, table: int, can_yield: bool, flush: bool, shared: bool) -> bool:
        """zap_gfn_range(kvm, root, 0, -1ull, ...): every root entry zapped whole (524a1e4e381f)."""
        return self.zap_gfn_range(table, 0, self.max_gfn, can_yield, flush, shared, zap_all=True)

    def tdp_mmu_zap_root_612(self, table: int, can_yield: bool, flush: bool, shared: bool) -> bool:
        """tdp_mmu_zap_root() (6.9's, in 6.12): the whole root zapped in passes of decreasing granularity, 4K
        leaves, then 2M entries, then 1G, then the root's own entries (each pass zaps the entries of exactly
        its level: a table met there is torn down with what little is left below it), so that a yield is never
        far away.  Always yields if contended and owes no flush in shared mode (the root is invalid: its vCPUs
        flush as they load their next root; `can_yield` and `flush` are 5.13's signature, unused); under the
        write lock the zaps are counted unflushed and the flush threaded through the yields (the 5.11 baseline
        mode, which 6.12 has not).  Returns whether anything was zapped (Roots._zap_invalidated_root then flushes:
        its departure)."""
        self.kvm.lockdep_assert_held(shared)
        zapped = False
        owed = False
        self.rcu.read_lock()
        try:
            done: list[int] = []
            for level in (1, 2, 3, self.root_level):
                if level <= self.root_level and level not in done:
                    done.append(level)
                    z, owed = self._zap_root_pass(table, level, shared, owed)
                    zapped |= z
        finally:
            self.rcu.read_unlock()
        return zapped

    def _zap_root_pass(self, table: int, zap_level: int, shared: bool, owed: bool) -> tuple[bool, bool]:
        """__tdp_mmu_zap_root(): one pass, zapping the present entries of level `zap_level` (cmpxchg to 0 under
        the read lock, `goto retry` on a lost race; a store under the write lock).  Returns (anything zapped,
        a flush still owed: write lock only)."""
        kvm, tdp = self.kvm, self.tdp
        zapped = False
        for it in for_each_pte(kvm.new_iter(table, zap_level, 0), self.max_gfn):
            while True:                          # retry:
                if tdp.tdp_mmu_iter_cond_resched(it, owed, shared):
                    owed = False
                    break
                spte = it.old_spte
                if not spte & _P or it.level > zap_level:
                    break
                if shared:
                    if not tdp.tdp_mmu_set_spte_atomic(it, 0):
                        it.old_spte = self.tables.load(it.sptep)
                        continue                 # goto retry
                else:
                    kvm.mark_unflushed()
                    tdp.tdp_mmu_set_spte(it, 0)
                    owed = True
                zapped = True
                break
        return zapped, owed

    def zap_root_k17_phys_end(self, table: int, can_yield: bool, flush: bool, shared: bool) -> bool:
        """Variant zap-all-phys-end (K17): a root's zap ends at the host's physical limit."""
        return self.zap_gfn_range(table, 0, self.phys_max_gfn, can_yield, flush, shared)

    def kvm_tdp_mmu_zap_sp(self, table: int) -> bool:
        """kvm_tdp_mmu_zap_sp(): zap a table's span without yielding (the caller may hold a pending flush,
        33a3164161fc); returns whether a flush is owed (048f49809c52)."""
        tmeta = self.tmeta
        gfn = tmeta.gfn.load(table)
        span = 1 << (self.bits * tmeta.level.load(table))
        return self.kvm_tdp_mmu_zap_gfn_range(gfn, gfn + span, False, False, False)

    # ------------------------------------------------------------------ collapsible leaves (dirty logging off)

    def zap_collapsible_spte_range(self, root: int, slot: Slot, flush: bool, shared: bool) -> tuple[int, bool]:
        """zap_collapsible_spte_range() (5.13): zap every leaf below the level its slot could now map,
        each with its own freeze and flush (tdp_mmu_zap_spte_atomic); a later fault maps the huge page
        over the empty table, which tears it down.  Returns (leaves zapped, flush pending)."""
        max_level = self.slots.max_mapping_level

        def collapsible(spte: int, level: int, gfn: int) -> bool:
            return (level == 1 or bool(spte & _L)) and level < max_level(slot, gfn)
        return self._zap_collapsible(root, slot, 1, collapsible, flush, shared)

    def zap_collapsible_spte_range_612(self, root: int, slot: Slot, flush: bool, shared: bool) -> tuple[int, bool]:
        """zap_collapsible_spte_range() as 6.12 has it (6.13 recovers in place instead): from 2M up, zap the
        highest non-leaf inside the slot whose span the slot could now map huge, with one atomic zap (freeze,
        flush, clear), which tears the table below down; a later fault maps the huge page.  Under the read
        lock, so a fault linking a table there races it (21a36ac6b6c7).  Returns (tables zapped, flush
        pending)."""
        max_level = self.slots.max_mapping_level
        start, end = slot.base_gfn, slot.end_gfn

        def collapsible(spte: int, level: int, gfn: int) -> bool:
            # not a leaf (a leaf that could be huger has a parent that would have been zapped instead),
            # wholly inside the slot, and no larger than the slot allows there
            return not spte & _L and level <= _MAX_HUGE_LEVEL and start <= gfn < end and max_level(slot, gfn) >= level
        return self._zap_collapsible(root, slot, 2, collapsible, flush, shared)

    def _zap_collapsible(self, root: int, slot: Slot, min_level: int, collapsible: Callable[[int, int, int], bool],
                         flush: bool, shared: bool) -> tuple[int, bool]:
        """The walk both shapes share: present entries of the slot from min_level up, each one `collapsible`
        zapped atomically (retried if the cmpxchg lost) or, under the write lock, set to 0."""
        kvm, tdp = self.kvm, self.tdp
        kvm.lockdep_assert_held(shared)
        if slot.huge_level < 2:
            return 0, flush
        zapped = 0
        self.rcu.read_lock()
        try:
            for it in for_each_pte(kvm.new_iter(root, min_level, slot.base_gfn), slot.end_gfn):
                while True:                      # retry:
                    if tdp.tdp_mmu_iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    if not spte & _P or not collapsible(spte, it.level, it.gfn):
                        break
                    if shared:
                        if not tdp.tdp_mmu_zap_spte_atomic(it):
                            it.old_spte = self.tables.load(it.sptep)
                            continue             # goto retry
                    else:
                        kvm.mark_unflushed()
                        tdp.tdp_mmu_set_spte(it, 0)
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
        roots = self.roots
        total, flush = 0, False
        for row in roots.for_each_tdp_mmu_root_yield_safe(shared):
            n, flush = self.zap_collapsible_spte_range(roots.root_table(row), slot, flush, shared)
            total += n
        if flush or self.kvm.holds_unflushed:
            self.kvm.kvm_flush_remote_tlbs()
        return total
