"""Roots of 6.12: the TDP MMU's own reference, read-lock allocation and puts, the synchronous zap; B8's workqueue.

The 6.12 profile (variant roots-held-until-invalid) puts these in place of
5.13's root functions (roots.py).  The TDP MMU holds a root itself from its
allocation until its invalidation is zapped (edbdb43fc96b, 6.4), so a root
starts with a count of 2 and outlives its last vCPU; roots are allocated and put under the read lock (dab285e4ec73,
576a15de8d29, 6.9); kvm_tdp_mmu_invalidate_all_roots marks each valid root
invalid and scheduled to zap without taking a reference (the TDP MMU's is
gifted to the zap); kvm_tdp_mmu_zap_invalidated_roots zaps each scheduled root
(4K, 2M, 1G, then root passes) and puts that reference only after the zap, so
the root stays reachable by MMU notifiers meanwhile (0df9dab891ff, 6.6); the
last put only unlists the root and frees its (already empty) table.  B8
(switch roots-zapped-by-worker) puts the zap on a workqueue instead, as
5.18-6.5 did: a kworker zaps and puts, the caller waits (flush_workqueue).

The functions are methods of the roots part (Roots mixes this class in): the
variant table puts them in place of 5.13's when a 6.12 VM's Mmu is built.
"""
from __future__ import annotations

from typing import Any

from shmmmu.layout import MAX_ROOTS, NIL, STAT

_ST_ROOTS_ALLOC = STAT["roots_allocated"]
_ST_ROOTS_FREED = STAT["roots_freed"]
_U64 = (1 << 64) - 1


class Roots612:
    """6.12's root functions and B8's, over the roots part's handles (a mixin of shmmmu.mmu.roots.Roots)."""

    __slots__ = ()
    zap: Any
    tdp: Any
    map: Any

    # ------------------------------------------------------------------ 6.12 (variant roots-held-until-invalid)

    def kvm_tdp_mmu_alloc_root(self, role: int) -> int:
        """kvm_tdp_mmu_alloc_root() (6.9's, in 6.12: kvm_tdp_mmu_get_vcpu_root_hpa renamed and moved under the
        read lock, which it takes itself, dab285e4ec73): a valid root of this role keeps the reference the
        yield-safe walk took on it; else, under tdp_mmu_pages_lock, the list is searched again (another vCPU
        may have added one meanwhile) and a new root is listed with a count of 2: the vCPU's reference and the
        TDP MMU's own, held until the root is invalidated (edbdb43fc96b).  The vCPU's reference is recorded in
        WState.ROOT before the lock is dropped (not the kernel's: the record recovery and the checks use)."""
        kvm = self.kvm
        shared = self.parallel                  # the exclusive baseline takes the write lock for everything
        kvm.mmu_lock(shared)
        try:
            row = -1
            for r in self.for_each_tdp_mmu_root_yield_safe(shared, True):   # for_each_valid_..._yield_safe
                if self.role_col.load(r) == role:
                    row = r                      # leaving the walk early keeps its reference: the vCPU's
                    break
            if row >= 0:
                # not the kernel's: the walk's crash-recovery record becomes the vCPU's (a kill between the
                # two stores leaks the reference rather than putting it twice)
                self.wstate.walk_root.store(self.worker, 0)
            else:
                row = self._alloc_root_locked(role)
            self.wstate.root.store(self.worker, row + 1)
        finally:
            kvm.mmu_unlock(shared)
        return row

    def kvm_tdp_mmu_get_root_612(self, row: int) -> bool:
        """kvm_tdp_mmu_get_root() (6.12): refcount_inc_not_zero alone; whether an invalid root may be taken is
        the walk's choice (tdp_mmu_next_root's only_valid), no longer this function's."""
        return self.refcount_inc_not_zero(row)

    def _alloc_root_locked(self, role: int) -> int:
        """kvm_tdp_mmu_alloc_root's part under tdp_mmu_pages_lock: a usable root listed meanwhile gets a
        reference (which cannot fail: a root's last reference is put only once it is invalid, under the write
        lock: WARN_ON_ONCE), else a new root with a count of 2 (list_add_rcu)."""
        table_col, role_col, invalid_col = self.table_col, self.role_col, self.invalid_col
        self.pages_lock.acquire()
        try:
            for r in range(MAX_ROOTS):
                if table_col.load(r) and role_col.load(r) == role and not invalid_col.load(r):
                    if self.kvm_tdp_mmu_get_root(r):
                        return r
                    self.kvm.violation("root-refcount", 0, r, self.worker)    # WARN_ON_ONCE
            table = self.map.alloc_tdp_mmu_page(self.root_level, 0)
            for row in range(MAX_ROOTS):
                if not table_col.load(row):
                    break
            else:
                raise RuntimeError(f"more than {MAX_ROOTS} roots at once")
            role_col.store(row, role)
            invalid_col.store(row, 0)
            self.zapped_col.store(row, 0)
            self.scheduled_col.store(row, 0)
            table_col.store(row, table)            # list_add_rcu: it lists the row ...
            # ... and the count, last, lets a walk take it.  Not the kernel's order (it sets the count first, on an
            # object no reader can have seen): here the row may be the last root's, reused under the read lock,
            # and a walk that read that root's table before it was unlisted must not take a reference on this
            # one before its table is in the row (a walk of the explorer's memslot-roots did, at bound 2)
            self.count_col.store(row, 2)           # refcount_set(&root->tdp_mmu_root_count, 2)
        finally:
            self.pages_lock.release()
        self.tmeta.owner.store(table, NIL)
        self.st[_ST_ROOTS_ALLOC] += 1
        self.kvm.publish_stat(_ST_ROOTS_ALLOC)
        return row

    def kvm_tdp_mmu_put_root_612(self, row: int, shared: bool) -> None:
        """kvm_tdp_mmu_put_root() (6.12): drop a reference, under mmu_lock held either way; the last one, put
        only on an invalid root whose zap is done (the TDP MMU's own reference goes after that zap), takes the
        root off the list under tdp_mmu_pages_lock and frees its table after a grace period: nothing is left in
        it to zap (KVM_BUG_ON of a valid root's last put)."""
        self.kvm.lockdep_assert_held(shared)
        if not self.refcount_dec_and_test(row):
            return
        table = self.table_col.load(row)
        if not self.invalid_col.load(row):
            self.kvm.violation("root-refcount", 0, row, _U64)   # KVM_BUG_ON(!root->role.invalid)
        if self.debug:
            # before the row leaves the list: 6.12 allocates under the read lock, and a vCPU may list its new
            # root in this row (and record it as its own) as soon as it is free
            self.check_root_unheld(row, table)
        self.pages_lock.acquire()
        try:
            self.table_col.store(row, 0)               # list_del_rcu(&root->link)
        finally:
            self.pages_lock.release()
        self.tdp.free_sp(table)                        # call_rcu(&root->rcu_head, tdp_mmu_free_sp_rcu_callback)
        self.st[_ST_ROOTS_FREED] += 1

    def kvm_tdp_mmu_invalidate_all_roots_612(self) -> None:
        """kvm_tdp_mmu_invalidate_all_roots() (6.12, write lock): every valid root marked invalid and
        scheduled to zap (tdp_mmu_scheduled_root_to_zap, 0df9dab891ff); no reference is taken: the TDP MMU's
        own is gifted to the zap that follows.  A root already invalid is skipped (it was zapped, or is
        scheduled, by an earlier invalidation)."""
        self.kvm.lockdep_assert_held_write()
        scheduled, invalid = self.scheduled_col, self.invalid_col
        for row in self.for_each_tdp_mmu_root():
            if not invalid.load(row):
                scheduled.store(row, 1)
                invalid.store(row, 1)

    def kvm_tdp_mmu_zap_invalidated_roots_612(self, shared: bool) -> None:
        """kvm_tdp_mmu_zap_invalidated_roots() (6.12; the memslot update holds the read lock, the VM's
        destruction the write lock): over every root, a reference held across yields, each root scheduled to
        zap is unscheduled, zapped whole (tdp_mmu_zap_root: 4K, 2M, 1G, root) and only then loses the TDP MMU's
        reference, so an MMU notifier can reach its entries until they are gone (0df9dab891ff)."""
        self.kvm.lockdep_assert_held(shared)
        self.zap_caller = True
        try:
            for row in self.for_each_tdp_mmu_root_yield_safe(shared, False):
                if not self.scheduled_col.load(row):
                    continue
                self.scheduled_col.store(row, 0)
                self._zap_invalidated_root(row, shared)
        finally:
            self.zap_caller = False

    def _zap_invalidated_root(self, row: int, shared: bool) -> None:
        """The loop body of kvm_tdp_mmu_zap_invalidated_roots (and of B8's tdp_mmu_zap_root_work): zap the
        root, mark it zapped (debug: nothing may be installed behind this zap), put the TDP MMU's reference.

        Departure: a flush between the zap and the put, if anything was zapped.  6.12 flushes nothing here
        (the root's vCPUs were asked to reload, and flush when they load their next root); shmmmu's zap
        ledger (debug) counts a zapped entry unflushed until its zapper's next flush, and the root's table,
        freed by the put and reused, would otherwise look installed into too early."""
        kvm = self.kvm
        if not self.invalid_col.load(row):
            kvm.violation("root-refcount", 0, row, _U64 - 1)   # KVM_BUG_ON(!root->role.invalid)
        if self.debug and not self.zap_caller:
            # the zap runs in a task that did not ask for it: B8's kworker (0df9dab891ff's subject)
            kvm.violation("root-zap-off-caller", 0, row, self.worker)
        if self.zap.tdp_mmu_zap_root(self.table_col.load(row), True, False, shared) or kvm.holds_unflushed:
            kvm.kvm_flush_remote_tlbs()
        self.zapped_col.store(row, 1)
        self.kvm_tdp_mmu_put_root(row, shared)        # after the zap: the root stays reachable meanwhile

    def kvm_mmu_uninit_tdp_mmu_612(self) -> None:
        """kvm_mmu_uninit_tdp_mmu() (6.12), at VM destruction after every vCPU put its root: invalidate every
        root and zap the invalidated roots, which puts the TDP MMU's references and so frees every root.  The
        kernel holds no mmu_lock here (nothing else can reach the VM); shmmmu takes it for write, which its
        lock assertions ask for."""
        lock = self.lock
        lock.write_lock()
        try:
            self.kvm_tdp_mmu_invalidate_all_roots()
            self.kvm_tdp_mmu_zap_invalidated_roots(False)
        finally:
            lock.write_unlock()

    # ------------------------------------------------------------------ B8: the zap on a workqueue (5.18-6.5)

    def invalidate_all_roots_b8_queue_work(self) -> None:
        """Variant roots-zapped-by-worker (B8, before 0df9dab891ff): kvm_tdp_mmu_invalidate_all_roots marks
        each valid root invalid and queues its zap on the VM's unbound workqueue (tdp_mmu_schedule_zap_root,
        queue_work), gifting the work item the TDP MMU's reference; a kworker runs it
        (tdp_mmu_zap_root_work), not the task that invalidated."""
        self.kvm.lockdep_assert_held_write()
        scheduled, invalid = self.scheduled_col, self.invalid_col
        for row in self.for_each_tdp_mmu_root():
            if not invalid.load(row):
                invalid.store(row, 1)
                scheduled.store(row, 1)             # queue_work(kvm->arch.tdp_mmu_zap_wq, ...)

    def zap_invalidated_roots_b8_flush_workqueue(self, shared: bool) -> None:
        """Variant roots-zapped-by-worker (B8): kvm_tdp_mmu_zap_invalidated_roots is
        flush_workqueue(kvm->arch.tdp_mmu_zap_wq): it waits until every queued zap has run in a kworker.  The
        caller holds mmu_lock, which the kernel's did not (the workers take it for read themselves): it is
        dropped for the wait and taken again."""
        kvm = self.kvm
        kvm.lockdep_assert_held(shared)
        kvm.mmu_unlock(shared)
        try:
            self.flush_workqueue()
        finally:
            kvm.mmu_lock(shared)

    def flush_workqueue(self) -> None:
        """flush_workqueue(): wait until no root's zap is queued or running."""
        col, words, waits = self.scheduled_col, self.roots_words, self.waits
        for row in range(MAX_ROOTS):
            v = col.load(row)
            while v:
                v = waits.wait_while(words, col.word(row), v, waits.spins(1000))

    def tdp_mmu_zap_root_work(self, row: int) -> None:
        """tdp_mmu_zap_root_work() (B8, 5.18-6.5), in a kworker: under the read lock, zap the root and put the
        reference the invalidation gifted it ("By design, the root is reachable while it's being
        asynchronously zapped": the put follows the zap, as in 6.12)."""
        kvm = self.kvm
        shared = self.parallel                      # the exclusive baseline takes the write lock for everything
        kvm.mmu_lock(shared)
        try:
            self._zap_invalidated_root(row, shared)
        finally:
            kvm.mmu_unlock(shared)

    def kworker_pass(self) -> int:
        """One pass of a kworker over the VM's root-zap workqueue (B8): each queued item is claimed and run;
        returns how many ran.  Not the kernel's code: the worker pool that runs it."""
        col = self.scheduled_col
        ran = 0
        for row in range(MAX_ROOTS):
            if col.load(row) == 1 and col.cas(row, 1, 2) == 1:
                try:
                    self.tdp_mmu_zap_root_work(row)
                finally:
                    col.store(row, 0)               # the work item is done: flush_workqueue may return
                ran += 1
        return ran

    def uninit_tdp_mmu_b8_destroy_workqueue(self) -> None:
        """Variant roots-zapped-by-worker (B8): kvm_mmu_uninit_tdp_mmu invalidates every root, queueing its zap,
        and destroys the workqueue, which first runs what is queued.  shmmmu's kworker may have stopped by then
        (stress stops its housekeeping process first), so the destroying task runs the queued items through
        the workqueue's own function (a departure), then waits for any a kworker still runs."""
        lock = self.lock
        lock.write_lock()
        try:
            self.kvm_tdp_mmu_invalidate_all_roots()
        finally:
            lock.write_unlock()
        self.kworker_pass()
        self.flush_workqueue()
