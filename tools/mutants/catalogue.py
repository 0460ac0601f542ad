"""Mutants: plausible protocol bugs in the kernel's shape, none of them a bug switch, to measure the checkers.

Each mutant is a few textual changes to one file of a scratch copy of shmmmu:
each `old` must occur exactly once in `path` and is replaced by its `new`.
`area` is the mechanism it breaks; `why` says what a kernel developer could
have written and what should then go wrong.  A mutant that no search and no
stress run kills needs a scenario or a checker, or an entry in SURVIVORS
saying why no execution can observe it.  tools/mutants/run.py applies them;
tests/model/test_mutants.py holds the catalogue to its rules.
"""
from __future__ import annotations

from dataclasses import dataclass

AREAS = ("fault", "setters", "teardown", "roots", "notifier", "memslots", "dirty-log", "aging", "nx", "rwlock",
         "rcu", "pool", "tlb")


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str                               # one of AREAS
    path: str                               # relative to the checkout: shmmmu/... or workers/...
    edits: tuple[tuple[str, str], ...]      # (old, new): old occurs exactly once in the file
    why: str


MUTANTS: list[Mutant] = [
    Mutant("zap-range-outside-rcu", "rcu", "shmmmu/mmu/tdp_zap.py",
           (("""        kvm.lockdep_assert_held(shared)
        self.rcu.read_lock()
        try:
            bits = self.bits""", """        kvm.lockdep_assert_held(shared)
        try:
            bits = self.bits"""),
            ("""                    break
        finally:
            self.rcu.read_unlock()
        return flush

    def kvm_tdp_mmu_zap_gfn_range(""",
             """                    break
        finally:
            pass
        return flush

    def kvm_tdp_mmu_zap_gfn_range(""")),
           "zap_gfn_range walks without rcu_read_lock, as before 7cca2d0b7e7d: under the read lock another "
           "zapper's teardown may free a table this walk stands in (the walk's rcu_dereference is unprotected)"),
    Mutant("clear-dirty-log-read-lock", "dirty-log", "shmmmu/mmu/ioctl.py",
           (("""        cleared = 0
        self.lock.write_lock()""", """        cleared = 0
        self.lock.read_lock()"""),
            ("""                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        return cleared""", """                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.read_unlock()
        return cleared""")),
           "KVM_CLEAR_DIRTY_LOG takes mmu_lock for read, as 24ae4cfaaaa2 did for enabling: clear_dirty_pt_masked "
           "stores plainly and walks the roots without references, which needs the write lock"),
    # ---------------------------------------------------------------- the fault path (mmu.c, kvm_tdp_mmu_map)
    Mutant("fault-seq-read-after-gup", "fault", "shmmmu/mmu/mmu.py",
           (("""        fault.mmu_seq = self.ctl.load(_C_SEQ)
        slots = self.slots
        gfn = fault.gfn
        slot = fault.slot = slots.lookup(gfn)
        if slot is None:
            return False
        pfn = fault.pfn = slots.gfn_to_pfn(slot, gfn)      # may be stale by the time we install
        if pfn >> _MISSING_SHIFT:                     # (pfn & MISSING: no host page reaches that bit)
            fault.pfn = handle_userfault(self, slot, gfn)  # the GUP met a userfaultfd MISSING page
""", """        slots = self.slots
        gfn = fault.gfn
        slot = fault.slot = slots.lookup(gfn)
        if slot is None:
            return False
        pfn = fault.pfn = slots.gfn_to_pfn(slot, gfn)      # may be stale by the time we install
        if pfn >> _MISSING_SHIFT:                     # (pfn & MISSING: no host page reaches that bit)
            fault.pfn = handle_userfault(self, slot, gfn)  # the GUP met a userfaultfd MISSING page
        fault.mmu_seq = self.ctl.load(_C_SEQ)
"""),),
           "the fault reads mmu_notifier_seq after the GUP instead of before it (direct_page_fault's "
           "`mmu_seq = kvm->mmu_notifier_seq; smp_rmb();` moved below try_async_pf): an invalidation that "
           "completes between the GUP and the read leaves no trace in the recheck, and the fault installs the "
           "host page the notifier has migrated away (a write through it lands in a poisoned page)"),
    Mutant("fault-stale-root-check-unlocked", "fault", "shmmmu/mmu/mmu.py",
           (("""        read_lock, read_unlock = self.mmu_read_lock, self.mmu_read_unlock      # of kvm->mmu_lock
        read_lock()
        try:
            if self.root_is_obsolete():""", """        read_lock, read_unlock = self.mmu_read_lock, self.mmu_read_unlock      # of kvm->mmu_lock
        obsolete = self.root_is_obsolete()
        read_lock()
        try:
            if obsolete:"""),),
           "is_page_fault_stale() tested before read_lock(&kvm->mmu_lock) instead of under it: a fast "
           "invalidation (kvm_mmu_zap_all_fast) between the test and the lock goes unseen, and the fault installs "
           "into its invalid root behind the zapper that already emptied it (a955cad84cda's race, by a "
           "misplaced test rather than a missing one)"),
    Mutant("fault-lost-link-leaks-table", "fault", "shmmmu/mmu/tdp_map.py",
           (("""                    if not self.tdp_mmu_link_sp(it, child, dis, dis and fault.req_level >= it.level, shared):
                        self.tdp_mmu_free_sp(child)          # lost the race: never visible, back to the cache
                        break""", """                    if not self.tdp_mmu_link_sp(it, child, dis, dis and fault.req_level >= it.level, shared):
                        break"""),),
           "kvm_tdp_mmu_map's error path after a lost link cmpxchg breaks out without tdp_mmu_free_sp(sp): the "
           "table allocated for the link is neither visible nor back in the cache (a leaked page table: live, "
           "reachable from no root)"),

    # ---------------------------------------------------------------- the setters
    Mutant("zap-atomic-no-flush", "setters", "shmmmu/mmu/tdp_mmu.py",
           (("""        kvm.kvm_flush_remote_tlbs()
        self.clear_frozen_spte(it.sptep, it.gfn)
        it.old_spte = 0
        return True""", """        self.clear_frozen_spte(it.sptep, it.gfn)
        it.old_spte = 0
        return True"""),),
           "tdp_mmu_zap_spte_atomic freezes and clears the entry but leaves out the kvm_flush_remote_tlbs between "
           "them (the flush is not moved, as K5 moves it: it is gone): another vCPU installs over the cleared "
           "entry while TLBs still hold the zapped translation, and the flush is still owed when mmu_lock is "
           "dropped"),
    Mutant("atomic-setter-rereads-old", "setters", "shmmmu/mmu/tdp_mmu.py",
           (("""            self.kvm._lockdep(HELD_READ)
        old = it.old_spte
        if old == _REMOVED:
            self.st[_ST_REMOVED_SEEN] += 1
            return False
        if self.tables.cas(it.sptep, old, new) != old:""", """            self.kvm._lockdep(HELD_READ)
        if it.old_spte == _REMOVED:
            self.st[_ST_REMOVED_SEEN] += 1
            return False
        old = self.tables.load(it.sptep)                  # the entry as it is now
        if self.tables.cas(it.sptep, old, new) != old:"""),),
           "tdp_mmu_set_spte_atomic compares against a fresh READ_ONCE of the entry instead of iter->old_spte, "
           "so the cmpxchg no longer says whether the entry is what the walk decided on: a table another vCPU "
           "just linked is replaced (and torn down under it), and an entry frozen since the walk read it is "
           "overwritten"),
    Mutant("write-spte-xchg-result-ignored", "setters", "shmmmu/mmu/tdp_mmu.py",
           (("""            self.kvm.torture_delay_volatile()        # the processor may set A/D meanwhile
            return self.tables.xchg(sptep, new)""", """            self.kvm.torture_delay_volatile()        # the processor may set A/D meanwhile
            self.tables.xchg(sptep, new)
            return old"""),),
           "kvm_tdp_mmu_write_spte exchanges atomically but returns the value the walk read, not the one the "
           "xchg replaced (ba3a6120a4e7 with `old_spte = ...` dropped): an A bit the processor set after the "
           "walk is lost to the bookkeeping, and the host never hears of the access"),

    # ---------------------------------------------------------------- teardown
    Mutant("teardown-children-not-recursed", "teardown", "shmmmu/mmu/tdp_mmu.py",
           (("""            for v in vals[~leaf]:
                removed.append((int(v) & _PFN_MASK) >> _PFN_SHIFT)
""", ""),),
           "handle_removed_tdp_mmu_page accounts the leaves of a disconnected table but does not recurse into "
           "its non-leaf children (the handle_changed_spte of each child entry left out): the tables below a "
           "zapped table are never unlinked, flushed or freed, and stay counted"),
    Mutant("teardown-dirty-not-reported", "teardown", "shmmmu/mmu/tdp_mmu.py",
           (("""                    if v & _D:
                        kvm.kvm_set_pfn_dirty((v & _PFN_MASK) >> _PFN_SHIFT, npages)
""", ""),),
           "the teardown of a disconnected table reports each leaf's A bit to the host page but not its D bit "
           "(handle_changed_spte_acc_track without kvm_set_pfn_dirty on the REMOVED path): a page the guest wrote "
           "through a leaf of a zapped table is not host-dirty and nothing maps it dirty"),
    Mutant("teardown-plain-freeze", "teardown", "shmmmu/mmu/tdp_mmu.py",
           (("""        E = self.E
        self.tables.xchg_range(start, E, _REMOVED, old)
        waits = self.waits""", """        E = self.E
        for i in range(E):                                # READ_ONCE, then WRITE_ONCE(REMOVED_SPTE)
            old[i] = self.tables.load(start + i)
            self.tables.store(start + i, _REMOVED)
        waits = self.waits"""),),
           "handle_removed_tdp_mmu_page freezes each child entry with a read and a plain store of REMOVED_SPTE "
           "instead of an xchg (under the read lock): a fault's cmpxchg that lands between the read and the "
           "store installs a leaf the store then erases, unaccounted, and its A/D state is lost"),

    # ---------------------------------------------------------------- roots
    Mutant("vcpu-root-reuses-invalid", "roots", "shmmmu/mmu/roots.py",
           (("""            if self.role_col.load(row) == role and self.kvm_tdp_mmu_get_root(row):""",
             """            if self.role_col.load(row) == role and self.refcount_inc_not_zero(row):"""),),
           "kvm_tdp_mmu_get_vcpu_root_hpa matches a root on its role without role.invalid (refcount_inc_not_zero "
           "instead of kvm_tdp_mmu_get_root): a vCPU reloading after kvm_mmu_zap_all_fast takes the invalidated "
           "root back, and its faults retry on an obsolete root for ever"),
    Mutant("invalidate-roots-no-extra-ref", "roots", "shmmmu/mmu/roots.py",
           (("""        for row in self.for_each_tdp_mmu_root():
            if self.refcount_inc_not_zero(row):
                self.invalid_col.store(row, 1)""", """        for row in self.for_each_tdp_mmu_root():
            if self.count_col.load(row):
                self.invalid_col.store(row, 1)"""),),
           "kvm_tdp_mmu_invalidate_all_roots marks the roots invalid without taking the reference that "
           "kvm_tdp_mmu_zap_invalidated_roots drops when it is done: the zapper puts a reference a vCPU still "
           "holds, and the root is freed under it"),
    Mutant("next-root-no-reference", "roots", "shmmmu/mmu/roots.py",
           (("""            if table.load(row) and not (only_valid and invalid.load(row)) and self.refcount_inc_not_zero(row):""",
             """            if table.load(row) and not (only_valid and invalid.load(row)) and self.count_col.load(row):"""),
            ("""        if prev >= 0:
            self.kvm_tdp_mmu_put_root(prev, shared)
        return row""", """        return row""")),
           "tdp_mmu_next_root checks that the next root is live but takes no reference on it (and so puts none): "
           "for_each_tdp_mmu_root_yield_safe is no longer yield-safe, and a walk that yields can come back to a "
           "root whose last reference went meanwhile, freed"),

    # ---------------------------------------------------------------- the MMU notifier
    Mutant("notifier-seq-bumped-at-start", "notifier", "shmmmu/mmu/notifier.py",
           (("""        ctl = self.ctl
        if ctl.fetch_add(Ctl.NOTIFIER_COUNT, 1) == 0:""", """        ctl = self.ctl
        ctl.fetch_add(Ctl.NOTIFIER_SEQ, 1)
        if ctl.fetch_add(Ctl.NOTIFIER_COUNT, 1) == 0:"""),
            ("""        self.ctl.fetch_add(Ctl.NOTIFIER_SEQ, 1)
        self.ctl.fetch_add(Ctl.NOTIFIER_COUNT, _U64)""", """        self.ctl.fetch_add(Ctl.NOTIFIER_COUNT, _U64)""")),
           "mmu_notifier_seq is bumped in invalidate_range_start, before the zap, instead of in "
           "invalidate_range_end: a fault that reads the sequence during the invalidation and resolves the "
           "old host page sees an unchanged sequence once the count is back to 0, and installs the page the "
           "host has since migrated"),
    Mutant("notifier-count-ignored", "notifier", "shmmmu/mmu/mmu.py",
           (("""        if ctl.load(_C_COUNT) and ctl.load(_C_START) <= fault.gfn < ctl.load(_C_END):
            return True
""", ""),),
           "mmu_notifier_retry_hva tests only the sequence, not mmu_notifier_count and the range in progress: "
           "a fault that takes mmu_lock between invalidate_range_start and _end installs the host page the "
           "invalidation is about to move (the sequence moves only at the end)"),
    Mutant("notifier-range-off-by-one", "notifier", "shmmmu/mmu/mmu.py",
           (("""        if ctl.load(_C_COUNT) and ctl.load(_C_START) <= fault.gfn < ctl.load(_C_END):""",
             """        if ctl.load(_C_COUNT) and ctl.load(_C_START) < fault.gfn < ctl.load(_C_END):"""),),
           "mmu_notifier_retry_hva compares the range in progress with `hva > start` instead of `>=`: a fault "
           "on the first page of an invalidation in progress is not retried, and installs the host page the "
           "invalidation is about to migrate"),
    Mutant("notifier-unmap-no-flush", "notifier", "shmmmu/mmu/notifier.py",
           (("""            if self.zap.kvm_tdp_mmu_unmap_gfn_range(start, end, may_block, False) or self.kvm.holds_unflushed:
                self.kvm.kvm_flush_remote_tlbs()""", """            self.zap.kvm_tdp_mmu_unmap_gfn_range(start, end, may_block, False)"""),),
           "invalidate_range_start ignores the flush kvm_tdp_mmu_unmap_gfn_range asks for (`if (ret) "
           "kvm_flush_remote_tlbs(kvm)` left out): the host migrates the pages while vCPUs still translate to "
           "them"),

    # ---------------------------------------------------------------- memslots
    Mutant("memslot-gen-not-bumped", "memslots", "shmmmu/memslots.py",
           (("""        flags.store(k, (f | set_mask) & ~clear_mask)
        self.slot_rows.gen.fetch_add(k, 1)
""", """        flags.store(k, (f | set_mask) & ~clear_mask)
"""),),
           "a memslot's flags change (dirty logging on) without a new slot generation (the kernel's "
           "slots->generation / SRCU sync skipped for a flags-only update): a fault that read the slot before "
           "logging was enabled installs a writable huge leaf behind the write protection"),
    Mutant("memslot-invalid-after-zap", "memslots", "shmmmu/mmu/ioctl.py",
           (("""        slot = self.slots.read(slot_id)
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, clear_mask=MemslotFlags.ACTIVE)
        finally:
            self.lock.write_unlock()
        self.kvm_mmu_zap_all_fast()""", """        slot = self.slots.read(slot_id)
        self.kvm_mmu_zap_all_fast()
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, clear_mask=MemslotFlags.ACTIVE)
        finally:
            self.lock.write_unlock()"""),),
           "kvm_set_memslot flushes the shadow (kvm_arch_flush_shadow_memslot) before it installs the memslots "
           "with the slot marked KVM_MEMSLOT_INVALID: a fault between the fast zap and the swap maps the dying "
           "slot again, and the mapping outlives its deletion"),
    Mutant("memslot-lru-not-reset", "memslots", "shmmmu/memslots.py",
           (("""            self._slots = [s for s in (self.read(k) for k in range(MAX_MEMSLOTS)) if s.npages]
            self._lru = _NO_SLOT
""", """            self._slots = [s for s in (self.read(k) for k in range(MAX_MEMSLOTS)) if s.npages]
"""),),
           "search_memslots keeps its lru_slot across a memslots update (the cached slot is not reset when the "
           "generation moves): lookups return the old copy of the slot, with its old flags and generation"),

    # ---------------------------------------------------------------- dirty logging
    Mutant("dirty-fresh-leaf-not-logged", "dirty-log", "shmmmu/mmu/tdp_mmu.py",
           (("""        if record_dirty_log and level == 1 and is_present and new & _W and (not old & _W or (old ^ new) & _PFN_MASK):""",
             """        if record_dirty_log and level == 1 and is_present and new & _W and old & _P and (not old & _W or (old ^ new) & _PFN_MASK):"""),),
           "handle_changed_spte_dirty_log logs a 4K leaf whose W goes 0 -> 1 only when the old entry was present: "
           "a write fault that installs a writable leaf over an empty entry (a fresh page, or the 4K leaves of "
           "a huge page split for logging) is never reported"),
    Mutant("wrprot-4k-flush-not-owed", "dirty-log", "shmmmu/mmu/tdp_dirty.py",
           (("""                        child = (spte & _PFN_MASK) >> _PFN_SHIFT
                        kvm.mark_unflushed()
                        flush = True
                        changed += self.tables.clear_where(""", """                        child = (spte & _PFN_MASK) >> _PFN_SHIFT
                        changed += self.tables.clear_where("""),),
           "wrprot_gfn_range sets `flush = true` only on the huge-leaf path, not for a table of 4K leaves it "
           "write-protects: with no huge leaf in the slot no flush follows, and vCPUs keep writing through "
           "writable translations after logging was enabled (writes never reported)"),

    # ---------------------------------------------------------------- aging
    Mutant("age-no-flush", "aging", "shmmmu/mmu/notifier.py",
           (("""            if flush and young:
                self.kvm.kvm_flush_remote_tlbs()
""", ""),),
           "kvm_mmu_notifier_clear_flush_young clears A but does not flush when something was young: vCPUs keep "
           "using their cached translations, which set no A bit, and the host takes the page for idle while the "
           "guest uses it"),
    Mutant("age-flush-before-clear", "aging", "shmmmu/mmu/notifier.py",
           (("""            young = self.dirty.kvm_tdp_mmu_age_gfn_range(start, end)
""", """            if flush:
                self.kvm.kvm_flush_remote_tlbs()
            young = self.dirty.kvm_tdp_mmu_age_gfn_range(start, end)
"""), ("""            if flush and young:
                self.kvm.kvm_flush_remote_tlbs()
""", "")),
           "clear_flush_young flushes before it clears A instead of after: a vCPU that walks the tables between "
           "the flush and the clear caches a translation while A is still set, keeps using it, and the access "
           "never reaches the A bit the host reads"),
    Mutant("age-under-read-lock", "aging", "shmmmu/mmu/notifier.py",
           (("""        self.lock.write_lock()
        try:
            if self.debug:
                spans =""", """        self.lock.read_lock()
        try:
            if self.debug:
                spans ="""), ("""        finally:
            self.lock.write_unlock()
        self.st[STAT["aged_young"]] += len(young)""", """        finally:
            self.lock.read_unlock()
        self.st[STAT["aged_young"]] += len(young)""")),
           "clear_young takes mmu_lock for read, as later kernels' aging does, but keeps 5.13's age_gfn_range, "
           "which stores through the write-lock setter without a cmpxchg and walks the roots without references"),

    # ---------------------------------------------------------------- NX huge pages
    Mutant("nx-recover-no-flush", "nx", "shmmmu/mmu/nx.py",
           (("""            if flush or kvm.holds_unflushed:
                kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        self.st[STAT["nx_recovered"]] += zapped""", """        finally:
            self.lock.write_unlock()
        self.st[STAT["nx_recovered"]] += zapped"""),),
           "kvm_recover_nx_lpages drops the flush kvm_tdp_mmu_zap_sp returns at the end of the pass (the shape "
           "048f49809c52 fixed, at the end instead of at the yield): mmu_lock is released with the zapped "
           "tables' translations still in vCPU TLBs"),
    Mutant("nx-untrack-keeps-flag", "nx", "shmmmu/mmu/tdp_map.py",
           (("""        try:
            nx.store(table, 0)
            self.nx_part.untrack_possible_nx_huge_page(table)""", """        try:
            self.nx_part.untrack_possible_nx_huge_page(table)"""),),
           "tdp_mmu_unlink_sp takes an NX-disallowed table off the NX list but leaves "
           "sp->nx_huge_page_disallowed set: a fault that published the table just before the zap then sees the "
           "flag in its late recheck and puts the torn-down table on the list"),
    Mutant("nx-track-unlocked", "nx", "shmmmu/mmu/tdp_map.py",
           (("""        if shared:
            self.pages_lock.acquire()
        try:
            if self.tmeta.nx.load(child):
                self.nx_part.track_possible_nx_huge_page(child)
        finally:
            if shared:
                self.pages_lock.release()""", """        if self.tmeta.nx.load(child):
            self.nx_part.track_possible_nx_huge_page(child)"""),),
           "the fault path adds its table to possible_nx_huge_pages without tdp_mmu_pages_lock (as if mmu_lock "
           "were held for write): two faults under the read lock append at once, and one table is lost from "
           "the list (or the list is corrupted)"),

    # ---------------------------------------------------------------- the rwlock (qrwlock)
    Mutant("rwlock-reader-ignores-waiting", "rwlock", "shmmmu/rwlock.py",
           (("""        if w.fetch_add(self.cnts, QR_BIAS) & QW_WMASK:""",
             """        if w.fetch_add(self.cnts, QR_BIAS) & QW_LOCKED:"""),),
           "queued_read_lock's fast path tests only _QW_LOCKED, not _QW_WMASK: a reader no longer backs off "
           "from a writer waiting for the readers to drain, and readers that keep coming starve the writer. "
           "Only RWLockReference (what the explorer runs) has this fast path: stress runs _locks.c's"),
    Mutant("rwlock-reader-keeps-bias", "rwlock", "shmmmu/rwlock.py",
           (("""            self._read_contended((w.fetch_add(self.cnts, _NEG_BIAS) - QR_BIAS) & _U64)   # back out at once""",
             """            self._read_contended(w.load(self.cnts))"""),),
           "a reader whose fast path found a writer queues without taking its bias back (queued_read_lock_slowpath "
           "without its atomic_sub(_QR_BIAS)): the slow path adds a second one, a reader count that never "
           "drains, and the next writer waits for ever.  The back-out is in the fast path (so that a killed "
           "process cannot die between the two): this edits RWLockReference's, which the explorer runs"),
    Mutant("rwlock-writer-plain-store", "rwlock", "shmmmu/rwlock.py",
           (("""                while w.cas(cnts, QW_WAITING, QW_LOCKED) != QW_WAITING:""",
             """                while w.load(cnts) != QW_WAITING or w.store(cnts, QW_LOCKED):"""),),
           "queued_write_lock_slowpath stores _QW_LOCKED once it has seen the readers drained instead of "
           "taking it with a cmpxchg: a reader that adds its bias between the read and the store is erased "
           "from the count, and its unlock later corrupts it (a writer beside readers, or a lock that never "
           "frees)"),

    # ---------------------------------------------------------------- RCU
    Mutant("gp-ends-one-epoch-early", "rcu", "shmmmu/rcu.py",
           (("""                if v == 0 or v > epoch:""", """                if v == 0 or v >= epoch:"""),),
           "the grace period counts a reader that entered in the epoch being closed as done (`>=` for `>`): a "
           "walker that entered just before the advance is not waited for, and the tables retired before it "
           "entered are freed under it"),
    Mutant("yield-no-rcu-relock", "rcu", "shmmmu/mmu/tdp_mmu.py",
           (("""        self.lock.stats.yields += 1
        self.st[STAT["yields"]] += 1
        self.rcu.read_lock()""", """        self.lock.stats.yields += 1
        self.st[STAT["yields"]] += 1"""),),
           "tdp_mmu_iter_cond_resched drops rcu_read_lock before cond_resched_rwlock_*() and does not take it "
           "again: the restarted walk dereferences tables outside any read-side section, and a grace period can "
           "end under it"),
    Mutant("reclaim-frees-new-epoch", "rcu", "shmmmu/rcu.py",
           (("""                if retire_epoch.load(table) > epoch:""", """                if retire_epoch.load(table) > epoch + 1:"""),),
           "the reclaimer frees the tables retired in the epoch it just opened as well as those before it: a "
           "table retired after the advance may still be held by a reader that entered after the scan began, "
           "and is freed under it"),

    # ---------------------------------------------------------------- the page-table pool
    Mutant("pool-take-unlocked", "pool", "shmmmu/pool.py",
           (("""    def _take(self, want: int) -> int:
        with self.lock:""", """    def _take(self, want: int) -> int:
        if True:                                           # the free list is popped without its lock"""),),
           "mmu_topup_memory_caches pops the global free list without its lock (each vCPU's cache is private, "
           "the list is not): two vCPUs topping up at once take the same tables, and one table ends up linked "
           "in two places"),
    Mutant("pool-free-push-before-poison", "pool", "shmmmu/pool.py",
           (("""        for t in tables:                              # the poison (or clear) writes them: its own point
            self.tw.touch(t * E, E, True)
        self.tables[idx] = POISON if self.debug else 0
        tmeta = self.tmeta
        for table in tables:
            tmeta.gen.fetch_add(table, 1)
            tmeta.parent.store(table, NIL)
        with self.lock:
            # FREE and on the stack in one step under the lock (a crash recovery scans under it)
            for table in tables:
                tmeta.state.store(table, TS_FREE)
            top = self.ctl.load(Ctl.POOL_TOP)
            self.stack[top: top + len(tables)] = idx
            self.ctl.store(Ctl.POOL_TOP, top + len(tables))""", """        tmeta = self.tmeta
        with self.lock:
            # FREE and on the stack in one step under the lock (a crash recovery scans under it)
            for table in tables:
                tmeta.state.store(table, TS_FREE)
            top = self.ctl.load(Ctl.POOL_TOP)
            self.stack[top: top + len(tables)] = idx
            self.ctl.store(Ctl.POOL_TOP, top + len(tables))
        for t in tables:                              # the poison (or clear) writes them: its own point
            self.tw.touch(t * E, E, True)
        self.tables[idx] = POISON if self.debug else 0
        for table in tables:
            tmeta.gen.fetch_add(table, 1)
            tmeta.parent.store(table, NIL)"""),),
           "the RCU callback pushes a table on the free list before it poisons (clears) it: a vCPU topping up "
           "meanwhile takes the table, links it, and the late poison erases a live table's entries"),

    # ---------------------------------------------------------------- the TLB protocol
    Mutant("flush-no-wait", "tlb", "shmmmu/tlb.py",
           (("""        for k in self.make_all_cpus_request():
            spins = 0""", """        for k in self.make_all_cpus_request() if False else ():   # KVM_REQ_TLB_FLUSH without KVM_REQUEST_WAIT
            spins = 0"""),),
           "kvm_flush_remote_tlbs makes the request and kicks, but does not wait for the kicked vCPUs to leave "
           "guest mode (KVM_REQ_TLB_FLUSH without KVM_REQUEST_WAIT): it returns while a vCPU still translates "
           "through the old entry, and the caller frees or migrates what it maps"),
    Mutant("flush-own-tlb-not-flushed", "tlb", "shmmmu/tlb.py",
           (("""        if self.tlb is not None:                       # our own caches, if we are a vCPU (outside guest mode)
            self.tlb.flush_local()
""", ""),),
           "a vCPU that issues a remote flush (a fault splitting a huge page) requests it of the others only and "
           "does not flush its own caches (kvm_make_all_cpus_request skipping the current CPU, as if "
           "kvm_vcpu_flush_tlb_current were done elsewhere): it keeps the translation it zapped"),
]

# mutants that no execution can observe, each with the reason (empty: every mutant must be killed)
SURVIVORS: dict[str, str] = {
    "flush-own-tlb-not-flushed":
        "not observed since the processor became hardware-shaped (issue 28 item 5; killed at execution 1 of "
        "dirty-split-reread before it): a vCPU flushes remotely only from its own fault, and the EPT "
        "violation that began the fault already dropped every cached entry of the faulting address, which "
        "is all that the split of a huge leaf removes. A fault that replaces a table by a huge leaf (mapping "
        "huge again after logging is off) while the vCPU still caches 4K neighbours under that table would "
        "show it; no scenario builds that yet",
}
