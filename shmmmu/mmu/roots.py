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

Rows are scanned in index order (the kernel walks a list; a root added during
a walk may or may not be seen, in both).  A row is filled and emptied under
tdp_mmu_pages_lock; a row with TABLE 0 is free, and rows are reused only under
the write lock, so a reader under the read lock never sees a row change roles.
The row memory itself is never freed, which is what RCU protects in the
kernel's list walk.

The functions here are a mixin over Kvm: the zaps they call (zap_gfn_range)
are tdp_mmu.py's.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import MAX_ROOTS, NIL, STAT, Ctl, RootRow, TMeta, WState
from shmmmu.mmu.kvm import Kvm

_R = RootRow.WORDS
_TABLE, _ROLE, _COUNT, _INVALID, _ZAPPED = (RootRow.TABLE, RootRow.ROLE, RootRow.COUNT, RootRow.INVALID,
                                            RootRow.ZAPPED)
_U64 = (1 << 64) - 1
_ST_ROOTS_ALLOC = STAT["roots_allocated"]
_ST_ROOTS_FREED = STAT["roots_freed"]


class TdpMmuRoots(Kvm):
    """The root list, its reference counts, and the walks over it."""
    __slots__ = ("rw", "ws", "root_word", "walk_root_word", "role", "root_row", "root")

    def __init__(self, vm, worker: int, tlb=None):
        super().__init__(vm, worker, tlb)
        c = self.config
        self.rw = vm.region.words("roots")
        self.ws = vm.region.words("wstate")
        # the root this process's MMU uses (a vCPU's mmu->root_hpa): its row and table; -1 / 0 none.
        # WState.ROOT records the reference it holds, for VM destruction, recovery and the checkers
        self.root_word = worker * WState.WORDS + WState.ROOT
        # and WState.WALK_ROOT the one a yield-safe walk holds, so that recovery can put it if we die mid-walk
        self.walk_root_word = worker * WState.WORDS + WState.WALK_ROOT
        self.role = worker % c.root_roles if worker < c.n_vcpus else 0
        held = self.ws.load(self.root_word)
        self.root_row = held - 1
        self.root = self.rw.load(self.root_row * _R + _TABLE) if held else 0
        # the reload requests (kvm_reload_remote_mmus) this root answers (TlbControl.roots_gen, which
        # guest entry compares); an invalid or missing root answers none.  The generation is read first:
        # an invalidation between the two reads then shows as a generation that moved
        gen = self.ctl.load(Ctl.ROOTS_GEN)
        self.tlbctl.roots_gen = gen if held and not self.rw.load(self.root_row * _R + _INVALID) else -1

    # ------------------------------------------------------------------ reference counts

    def root_table(self, row: int) -> int:
        return self.rw.load(row * _R + _TABLE)

    def valid_root(self, role: int = 0) -> int:
        """The table of the valid root of `role` (0: none), for readers that walk what a vCPU sees."""
        rw = self.rw
        for row in self.for_each_tdp_mmu_root():
            if rw.load(row * _R + _ROLE) == role and not rw.load(row * _R + _INVALID):
                return rw.load(row * _R + _TABLE)
        return 0

    def refcount_inc_not_zero(self, row: int) -> bool:
        """refcount_inc_not_zero(&root->tdp_mmu_root_count): a compare-exchange loop (11cccf5c0472)."""
        rw, w = self.rw, row * _R + _COUNT
        c = rw.load(w)
        while c:
            seen = rw.cas(w, c, c + 1)
            if seen == c:
                return True
            c = seen
        return False

    def refcount_dec_and_test(self, row: int) -> bool:
        """refcount_dec_and_test(): True for the thread that dropped the last reference."""
        return self.rw.fetch_add(row * _R + _COUNT, _U64) == 1

    def refcount_inc_not_zero_plain(self, row: int) -> bool:
        """The 5.12 count (before 11cccf5c0472): ++root->root_count, a load and a store, safe only
        under the write lock; here it also runs under the read lock, and two increments can make one."""
        rw, w = self.rw, row * _R + _COUNT
        c = rw.load(w)
        if not c:
            return False
        self.torture_delay()
        rw.store(w, c + 1)
        return True

    def refcount_dec_and_test_plain(self, row: int) -> bool:
        """The 5.12 --root->root_count: a load and a store."""
        rw, w = self.rw, row * _R + _COUNT
        c = rw.load(w)
        self.torture_delay()
        rw.store(w, (c - 1) & _U64)
        return c == 1

    def kvm_tdp_mmu_get_root(self, row: int) -> bool:
        """kvm_tdp_mmu_get_root() (5.13): a reference on a valid root; an invalid one is being torn down."""
        if self.rw.load(row * _R + _INVALID):
            return False
        return self.refcount_inc_not_zero(row)

    def kvm_tdp_mmu_put_root(self, row: int, shared: bool) -> None:
        """kvm_tdp_mmu_put_root(): drop a reference; the last one unlists the root, zaps it whole, frees it."""
        self.lockdep_assert_held(shared)
        if not self.refcount_dec_and_test(row):
            return
        rw = self.rw
        table = rw.load(row * _R + _TABLE)
        if shared:
            self.pages_lock.acquire()
        try:
            rw.store(row * _R + _TABLE, 0)             # list_del_rcu(&root->link)
        finally:
            if shared:
                self.pages_lock.release()
        if self.debug:
            self.check_root_unheld(row, table)
        self.tdp_mmu_zap_root(table, False, False, shared)
        self.free_sp(table)
        self.st[_ST_ROOTS_FREED] += 1

    def check_root_unheld(self, row: int, table: int) -> None:
        """Debug, when a root's count reaches 0: no vCPU still uses it (a count lower than its holders), and
        a root its invalidating zap emptied holds nothing (an install into an invalid root, a955cad84cda)."""
        ws = self.ws
        for k in range(self.config.n_workers):
            if ws.load(k * WState.WORDS + WState.ROOT) == row + 1:
                self.violation("root-refcount", 0, row, k)
        if self.rw.load(row * _R + _ZAPPED):
            self.tables.touch(table * self.E, self.E, False)
            present = np.flatnonzero(self.tables_np[table] & np.uint64(S.MMU_PRESENT))
            if present.size:
                sh = self.bits * (self.root_level - 1)
                self.violation("install-into-invalid-root", int(present[0]) << sh, table, int(present.size))

    # ------------------------------------------------------------------ a vCPU's root

    def kvm_tdp_mmu_get_vcpu_root(self, role: int) -> int:
        """kvm_tdp_mmu_get_vcpu_root_hpa(): a valid root of this role with one more reference, or a new one."""
        self.lockdep_assert_held_write()
        rw = self.rw
        for row in self.for_each_tdp_mmu_root():
            if rw.load(row * _R + _ROLE) == role and self.kvm_tdp_mmu_get_root(row):
                return row
        table = self.pool.alloc(self.root_level, 0)     # alloc_tdp_mmu_page(vcpu, 0, shadow_root_level)
        self.pages_lock.acquire()
        try:
            for row in range(MAX_ROOTS):
                if not rw.load(row * _R + _TABLE):
                    break
            else:
                raise RuntimeError(f"more than {MAX_ROOTS} roots at once")
            b = row * _R
            rw.store(b + _ROLE, role)
            rw.store(b + _COUNT, 1)                     # refcount_set(&root->tdp_mmu_root_count, 1)
            rw.store(b + _INVALID, 0)
            rw.store(b + _ZAPPED, 0)
            rw.store(b + _TABLE, table)                 # list_add_rcu: last, it publishes the row
        finally:
            self.pages_lock.release()
        self.tm.store(table * TMeta.WORDS + TMeta.OWNER, NIL)
        self.st[_ST_ROOTS_ALLOC] += 1
        self.publish_stat(_ST_ROOTS_ALLOC)
        return row

    # ------------------------------------------------------------------ walks over the roots

    def for_each_tdp_mmu_root(self) -> list[int]:
        """for_each_tdp_mmu_root(): the rows of every listed root, no reference taken (write lock held, or
        a walk that never drops the lock)."""
        rw = self.rw
        return [row for row in range(MAX_ROOTS) if rw.load(row * _R + _TABLE)]

    def tdp_mmu_next_root(self, prev: int, shared: bool, only_valid: bool) -> int:
        """tdp_mmu_next_root(): the next root after `prev` (-1: the first) with a reference taken, and the
        reference on `prev` dropped; -1 at the end.  `only_valid` skips invalid roots (5.13's
        kvm_tdp_mmu_get_root refused them, b7cccd397f31; the zaps walk every root since d62007edf01f, 5.18)."""
        rw = self.rw
        row = prev + 1
        while row < MAX_ROOTS:
            b = row * _R
            if rw.load(b + _TABLE) and not (only_valid and rw.load(b + _INVALID)) \
                    and self.refcount_inc_not_zero(row):
                break
            row += 1
        else:
            row = -1
        self.ws.store(self.walk_root_word, row + 1)     # not the kernel's: a record for crash recovery
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
        self.lockdep_assert_held_write()
        rw = self.rw
        for row in self.for_each_tdp_mmu_root():
            if self.refcount_inc_not_zero(row):
                rw.store(row * _R + _INVALID, 1)

    def next_invalidated_root(self, prev: int) -> int:
        """next_invalidated_root(): the next invalid root that still has references (-1: none)."""
        rw = self.rw
        for row in range(prev + 1, MAX_ROOTS):
            b = row * _R
            if rw.load(b + _TABLE) and rw.load(b + _INVALID) and rw.load(b + _COUNT):
                return row
        return -1

    def kvm_tdp_mmu_zap_invalidated_roots(self, shared: bool) -> None:
        """kvm_tdp_mmu_zap_invalidated_roots(): zap each invalidated root whole, yielding, then drop the
        reference kvm_tdp_mmu_invalidate_all_roots took (5.13, 4c6654bd160d: under the read lock, shared)."""
        self.lockdep_assert_held(shared)
        flush = False
        rw = self.rw
        row = self.next_invalidated_root(-1)
        while row >= 0:
            nxt = self.next_invalidated_root(row)
            flush = self.tdp_mmu_zap_root(rw.load(row * _R + _TABLE), True, flush, shared)
            rw.store(row * _R + _ZAPPED, 1)
            self.kvm_tdp_mmu_put_root(row, shared)
            row = nxt
        if flush or self.holds_unflushed:
            self.kvm_flush_remote_tlbs()

    def tdp_mmu_zap_root(self, table: int, can_yield: bool, flush: bool, shared: bool) -> bool:
        """zap_gfn_range(kvm, root, 0, -1ull, ...): every root entry zapped whole (524a1e4e381f); with K17
        5.13's end at the host's physical limit (1 << (shadow_phys_bits - PAGE_SHIFT))."""
        if self.bugs.zap_all_phys_end:
            return self.zap_gfn_range(table, 0, self.phys_max_gfn, can_yield, flush, shared)
        return self.zap_gfn_range(table, 0, self.max_gfn, can_yield, flush, shared, zap_all=True)

    def zap_gfn_range(self, root: int, start: int, end: int, can_yield: bool, flush: bool, shared: bool,
                      min_level: int = 1, zap_all: bool = False) -> bool:
        raise NotImplementedError("tdp_mmu.TdpMmu defines zap_gfn_range")
