"""Roots: the VM's TDP MMU roots (kvm->arch.tdp_mmu_roots): roles, reference counts, invalidation, yield-safe iteration.

A root is a pool table plus a row of the region's roots section (RootRow):
its role, tdp_mmu_root_count and role.invalid.  As in 5.13 (Ben Gardon's
"More parallel operations for the TDP MMU": 11cccf5c0472 atomic root
refcount, c0e64238ac53 RCU-protected root list, b7cccd397f31 fast invalidation,
4c6654bd160d invalidated roots zapped under the read lock before the fast zap
returns; ids in docs/reference/commits.md):

- a vCPU gets its root under the write lock (kvm_tdp_mmu_get_vcpu_root_hpa):
  a valid root of its role gains a reference, else one is allocated from the
  vCPU's memory cache with a count of 1;
- kvm_tdp_mmu_put_root drops one; the last takes the row off the list, zaps
  the whole root and frees its table after a grace period (call_rcu);
- kvm_tdp_mmu_invalidate_all_roots (write lock) marks every root invalid and
  takes a reference on each for the zapper that follows
  (kvm_tdp_mmu_zap_invalidated_roots, read lock);
- the yield-safe walk over roots (tdp_mmu_next_root) holds a reference on the
  root it is in, so the lock may be dropped inside it.

6.12's lifecycle, and B8's workqueue, are roots_612.py's (mixed into Roots).

Rows are scanned in index order (the kernel walks a list; a root added during
a walk may or may not be seen, in both).  A row is filled and emptied under
tdp_mmu_pages_lock; a row with TABLE 0 is free, and rows are reused only under
the write lock (5.13; 6.12 allocates and frees under the read lock: a walk that
read a row may then take its reference on the row's next root, one the kernel's
list walk may or may not have met), so a reader never sees a row change roles
under it.
The row memory itself is never freed, which is what RCU protects in the
kernel's list walk.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import MAX_ROOTS, NIL, STAT, Ctl
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu.mmu.roots_612 import Roots612

_U64 = (1 << 64) - 1
_ST_ROOTS_ALLOC = STAT["roots_allocated"]
_ST_ROOTS_FREED = STAT["roots_freed"]


class Roots(Part, Roots612):
    """The root list, its reference counts, and the walks over it."""

    __slots__ = ("zap", "tdp", "map", "table_col", "role_col", "count_col", "invalid_col", "zapped_col",
                 "scheduled_col", "roots_words", "zap_caller")
    zap: Any                        # the tdp_zap part: a root's last put zaps it whole
    tdp: Any                        # the tdp_mmu part: ... and frees its table
    map: Any                        # the tdp_map part: a root's table is allocated there

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)
        r = self.root_rows
        self.table_col, self.role_col, self.count_col = r.table, r.role, r.count
        self.invalid_col, self.zapped_col = r.invalid, r.zapped
        self.scheduled_col = r.scheduled
        self.roots_words = self.region.words("roots")
        # debug, not the kernel's: this task is inside a zap of invalidated roots that it asked for itself
        # (kvm_tdp_mmu_zap_invalidated_roots, called by the memslot update or the VM's destruction)
        self.zap_caller = False

    # ------------------------------------------------------------------ reference counts

    def root_table(self, row: int) -> int:
        return self.table_col.load(row)

    def valid_root(self, role: int = 0) -> int:
        """The table of the valid root of `role` (0: none), for readers that walk what a vCPU sees."""
        for row in self.listed_roots():
            if self.role_col.load(row) == role and not self.invalid_col.load(row):
                return self.table_col.load(row)
        return 0

    def refcount_inc_not_zero(self, row: int) -> bool:
        """refcount_inc_not_zero(&root->tdp_mmu_root_count): a compare-exchange loop (11cccf5c0472)."""
        count = self.count_col
        c = count.load(row)
        while c:
            seen = count.cas(row, c, c + 1)
            if seen == c:
                return True
            c = seen
        return False

    def refcount_dec_and_test(self, row: int) -> bool:
        """refcount_dec_and_test(): True for the thread that dropped the last reference."""
        return self.count_col.fetch_add(row, _U64) == 1

    def refcount_inc_not_zero_plain(self, row: int) -> bool:
        """Variant root-refcount-not-atomic: 5.12's ++root->root_count (before 11cccf5c0472), a load and a
        store, safe only under the write lock; here it also runs under the read lock, and two increments can
        make one."""
        count = self.count_col
        c = count.load(row)
        if not c:
            return False
        self.kvm.torture_delay()
        count.store(row, c + 1)
        return True

    def refcount_dec_and_test_plain(self, row: int) -> bool:
        """Variant root-refcount-not-atomic: 5.12's --root->root_count, a load and a store."""
        count = self.count_col
        c = count.load(row)
        self.kvm.torture_delay()
        count.store(row, (c - 1) & _U64)
        return c == 1

    def kvm_tdp_mmu_get_root(self, row: int) -> bool:
        """kvm_tdp_mmu_get_root() (5.13): a reference on a valid root; an invalid one is being torn down."""
        if self.invalid_col.load(row):
            return False
        return self.refcount_inc_not_zero(row)

    def kvm_tdp_mmu_put_root(self, row: int, shared: bool) -> None:
        """kvm_tdp_mmu_put_root(): drop a reference; the last one unlists the root, zaps it whole, frees it."""
        self.kvm.lockdep_assert_held(shared)
        if not self.refcount_dec_and_test(row):
            return
        table = self.table_col.load(row)
        if shared:
            self.pages_lock.acquire()
        try:
            self.table_col.store(row, 0)               # list_del_rcu(&root->link)
        finally:
            if shared:
                self.pages_lock.release()
        if self.debug:
            self.check_root_unheld(row, table)
        self.zap.tdp_mmu_zap_root(table, False, False, shared)
        self.tdp.free_sp(table)
        self.st[_ST_ROOTS_FREED] += 1

    def check_root_unheld(self, row: int, table: int) -> None:
        """Debug, when a root's count reaches 0: no vCPU still uses it (a count lower than its holders), and
        a root its invalidating zap emptied holds nothing (an install into an invalid root, a955cad84cda)."""
        root_of = self.wstate.root
        for k in range(self.config.n_workers):
            if root_of.load(k) == row + 1:
                self.kvm.violation("root-refcount", 0, row, k)
        if self.zapped_col.load(row):
            self.tables.touch(table * self.E, self.E, False)
            present = np.flatnonzero(self.tables_np[table] & np.uint64(S.MMU_PRESENT))
            if present.size:
                sh = self.bits * (self.root_level - 1)
                self.kvm.violation("install-into-invalid-root", int(present[0]) << sh, table, int(present.size))

    # ------------------------------------------------------------------ a vCPU's root

    def kvm_tdp_mmu_get_vcpu_root(self, role: int) -> int:
        """kvm_tdp_mmu_get_vcpu_root_hpa(): a valid root of this role with one more reference, or a new one."""
        self.kvm.lockdep_assert_held_write()
        for row in self.for_each_tdp_mmu_root():
            if self.role_col.load(row) == role and self.kvm_tdp_mmu_get_root(row):
                return row
        table = self.map.alloc_tdp_mmu_page(self.root_level, 0)
        self.pages_lock.acquire()
        try:
            for row in range(MAX_ROOTS):
                if not self.table_col.load(row):
                    break
            else:
                raise RuntimeError(f"more than {MAX_ROOTS} roots at once")
            self.role_col.store(row, role)
            self.count_col.store(row, 1)               # refcount_set(&root->tdp_mmu_root_count, 1)
            self.invalid_col.store(row, 0)
            self.zapped_col.store(row, 0)
            self.table_col.store(row, table)           # list_add_rcu: last, it publishes the row
        finally:
            self.pages_lock.release()
        self.tmeta.owner.store(table, NIL)
        self.st[_ST_ROOTS_ALLOC] += 1
        self.kvm.publish_stat(_ST_ROOTS_ALLOC)
        return row

    # ------------------------------------------------------------------ walks over the roots

    def for_each_tdp_mmu_root(self) -> list[int]:
        """for_each_tdp_mmu_root(): the rows of every listed root, no reference taken.  5.13's
        list_for_each_entry_rcu names its lockdep condition: mmu_lock held for write (or the pages lock,
        which no caller here holds)."""
        self.kvm.lockdep_assert_held_write()
        return self.listed_roots()

    def listed_roots(self) -> list[int]:
        """The rows of every listed root, for shmmmu's own readers (checks, the inspector): no lock needed."""
        table = self.table_col
        return [row for row in range(MAX_ROOTS) if table.load(row)]

    def tdp_mmu_next_root(self, prev: int, shared: bool, only_valid: bool) -> int:
        """tdp_mmu_next_root(): the next root after `prev` (-1: the first) with a reference taken, and the
        reference on `prev` dropped; -1 at the end.  `only_valid` skips invalid roots (5.13's
        kvm_tdp_mmu_get_root refused them, b7cccd397f31; the zaps walk every root since d62007edf01f, 5.18)."""
        table, invalid = self.table_col, self.invalid_col
        row = prev + 1
        while row < MAX_ROOTS:
            if table.load(row) and not (only_valid and invalid.load(row)) and self.refcount_inc_not_zero(row):
                break
            row += 1
        else:
            row = -1
        self.wstate.walk_root.store(self.worker, row + 1)    # not the kernel's: a record for crash recovery
        if prev >= 0:
            self.kvm_tdp_mmu_put_root(prev, shared)
        return row

    def for_each_tdp_mmu_root_yield_safe(self, shared: bool, only_valid: bool = True) -> Iterator[int]:
        """for_each_tdp_mmu_root_yield_safe(): each root's row, a reference held while the body runs."""
        row = self.tdp_mmu_next_root(-1, shared, only_valid)
        while row >= 0:
            yield row
            row = self.tdp_mmu_next_root(row, shared, only_valid)

    # ------------------------------------------------------------------ fast invalidation (b7cccd397f31)

    def kvm_tdp_mmu_invalidate_all_roots(self) -> None:
        """kvm_tdp_mmu_invalidate_all_roots(): every root invalid, each with a reference for the zapper
        (a root already at 0 is being torn down and is skipped)."""
        self.kvm.lockdep_assert_held_write()
        for row in self.for_each_tdp_mmu_root():
            if self.refcount_inc_not_zero(row):
                self.invalid_col.store(row, 1)

    def next_invalidated_root(self, prev: int) -> int:
        """next_invalidated_root(): the next invalid root that still has references (-1: none)."""
        table, invalid, count = self.table_col, self.invalid_col, self.count_col
        for row in range(prev + 1, MAX_ROOTS):
            if table.load(row) and invalid.load(row) and count.load(row):
                return row
        return -1

    def kvm_tdp_mmu_zap_invalidated_roots(self, shared: bool) -> None:
        """kvm_tdp_mmu_zap_invalidated_roots(): zap each invalidated root whole, yielding, then drop the
        reference kvm_tdp_mmu_invalidate_all_roots took (5.13, 4c6654bd160d: under the read lock, shared)."""
        kvm = self.kvm
        kvm.lockdep_assert_held(shared)
        flush = False
        row = self.next_invalidated_root(-1)
        while row >= 0:
            nxt = self.next_invalidated_root(row)
            flush = self.zap.tdp_mmu_zap_root(self.table_col.load(row), True, flush, shared)
            self.zapped_col.store(row, 1)
            self.kvm_tdp_mmu_put_root(row, shared)
            row = nxt
        if flush or kvm.holds_unflushed:
            kvm.kvm_flush_remote_tlbs()

    def roots_gen(self) -> int:
        """The reload requests (kvm_reload_remote_mmus) made so far."""
        return self.ctl.load(Ctl.ROOTS_GEN)

    def kvm_mmu_uninit_tdp_mmu(self) -> None:
        """kvm_mmu_uninit_tdp_mmu() (5.13): nothing to release; VM destruction checks that no table and no
        root is left (Ioctls.destroy)."""
