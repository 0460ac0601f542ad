"""The lock-taking entry points: what userspace ioctls and the MMU notifier reach (kvm_main.c, x86.c, mmu.c).

Each takes mmu_lock the way its 5.13 caller does and calls the tdp_mmu.c
functions with the matching `shared`: zap range (kvm_zap_gfn_range, read
lock), zap-all (kvm_mmu_zap_all, write lock), host unmaps (the MMU notifier in
5.13's gfn-range form, write lock, may yield), memslot deletion by fast
invalidation (kvm_mmu_zap_all_fast: roots invalidated under the write lock,
zapped under the read lock), dirty logging on and off (kvm_mmu_slot_apply_flags:
write protection and collapsible zaps under the read lock), KVM_GET_DIRTY_LOG
and KVM_CLEAR_DIRTY_LOG (write lock), and VM destruction.  In the exclusive
baseline every one of them takes the write lock.

Memslot updates are serialized by the caller (kvm->slots_lock: one host thread
makes them).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from shmmmu.layout import STAT, Ctl, MemslotFlags
from shmmmu.mmu.instruments import site
from shmmmu.mmu.kvm import Kvm, Part

_U64 = (1 << 64) - 1
_LOG_DIRTY = MemslotFlags.LOG_DIRTY
_INIT_SET = MemslotFlags.INITIALLY_SET


class Ioctls(Part):
    """The host side's operations on the MMU, each a whole locked operation."""

    __slots__ = ("roots", "zap", "dirty", "notifier", "fault")
    roots: Any                      # the roots part
    zap: Any                        # the tdp_zap part
    dirty: Any                      # the tdp_dirty part
    notifier: Any                   # the notifier part: its debug check of an unmapped range
    fault: Any                      # this process's vCPU side: destruction forgets its root

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)

    def flush_remote_tlbs(self) -> None:
        """A bare kvm_flush_remote_tlbs() (stress issues them between other operations)."""
        self.kvm.kvm_flush_remote_tlbs()

    # ------------------------------------------------------------------ zaps

    def zap_gfn_range_locked(self, start: int, end: int) -> None:
        """kvm_zap_gfn_range() (5.13, 6103bc074048): the TDP MMU part under the read lock, then the flush."""
        shared = self.parallel
        self.kvm.mmu_lock(shared)
        try:
            if self.zap.kvm_tdp_mmu_zap_gfn_range(start, end, True, False, shared) or self.kvm.holds_unflushed:
                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.kvm.mmu_unlock(shared)

    def zap_gfn_range_612(self, start: int, end: int) -> None:
        """kvm_zap_gfn_range() (6.12): under the write lock, inside an invalidation of [start, end)
        (kvm_mmu_invalidate_begin and kvm_mmu_invalidate_range_add; 6d3085e4d89a made the zap block faults),
        the leafs of every valid root zapped (kvm_tdp_mmu_zap_leafs), the flush, then kvm_mmu_invalidate_end:
        a fault that resolved its page before or during the zap retries (mmu_notifier_retry_hva, which is
        6.12's mmu_invalidate_retry_gfn: the model's notifier ranges are GFNs).  The kernel flushes the range
        (kvm_flush_remote_tlbs_range); the model has one flush for everything."""
        self._zap_gfn_range_invalidating(start, end, start, end)

    def zap_gfn_range_b9_faults_not_blocked(self, start: int, end: int) -> None:
        """Variant zap-range-faults-not-blocked (B9, before 6d3085e4d89a): the invalidation is begun with the
        zap's GFNs where the helpers compare host addresses (the wrong space, and frames for bytes), so its
        range holds no fault's address: modelled as a range that holds nothing (merged with a notifier's range
        in progress it adds nothing here, where the kernel's min/max widened that range down to the small GFN
        numbers).  The sequence still moves at the end; only a fault that takes mmu_lock while the zap has
        yielded it is not stopped."""
        self._zap_gfn_range_invalidating(start, end, _U64, 0)

    def _zap_gfn_range_invalidating(self, start: int, end: int, inv_start: int, inv_end: int) -> None:
        """6.12's kvm_zap_gfn_range with the invalidation begun over [inv_start, inv_end)."""
        lock, notifier, kvm = self.lock, self.notifier, self.kvm
        lock.write_lock()
        try:
            notifier.kvm_inc_notifier_count(inv_start, inv_end)
            # not the kernel's: a record for crash recovery, which ends the invalidation of a worker killed inside
            # it.  Set after the count rises and cleared before it falls: a kill between the two steps leaves the
            # invalidation begun (its faults retry), never ends it twice
            invalidating = self.wstate.invalidating
            invalidating.store(self.worker, 1)
            if self.zap.kvm_tdp_mmu_zap_leafs(start, end, False) or kvm.holds_unflushed:
                kvm.kvm_flush_remote_tlbs()
            invalidating.store(self.worker, 0)
            notifier.kvm_dec_notifier_count()
        finally:
            lock.write_unlock()

    def zap_all(self) -> None:
        """kvm_mmu_zap_all(): kvm_tdp_mmu_zap_all under the write lock."""
        self.lock.write_lock()
        try:
            self.zap.kvm_tdp_mmu_zap_all()
        finally:
            self.lock.write_unlock()

    def destroy(self) -> int:
        """VM destruction (no vCPU runs): kvm_mmu_zap_all (kvm_arch_flush_shadow_all), every vCPU's root put
        (kvm_mmu_unload from kvm_arch_destroy_vm), then kvm_mmu_uninit_tdp_mmu's WARNs: no table may be
        left counted (tdp_mmu_pages) and no root listed (tdp_mmu_roots).  Returns how many tables and roots
        were left, recorded as a table-leak violation.
        """
        self.zap_all()
        root_of = self.wstate.root
        self.lock.write_lock()
        try:
            for k in range(self.config.n_workers):
                held = root_of.load(k)
                if held:
                    root_of.store(k, 0)
                    self.roots.kvm_tdp_mmu_put_root(held - 1, False)
        finally:
            self.lock.write_unlock()
        self.fault.forget_root()
        self.roots.kvm_mmu_uninit_tdp_mmu()        # 6.12: the TDP MMU's own references go here
        left = self.ctl.load(Ctl.PAGE_COUNT)
        left = left - (1 << 64) if left >> 63 else left
        roots = len(self.roots.listed_roots())
        if left or roots:
            self.kvm.violation("table-leak", 0, left, roots)
        return left + roots

    # ------------------------------------------------------------------ memslots

    def delete_memslot(self, slot_id: int) -> None:
        """KVM_SET_USER_MEMORY_REGION deleting a slot (5.13's kvm_set_memslot): the slot goes invalid, then
        kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_all_fast.

        The flag changes under the write lock, which stands for the kernel's
        synchronize_srcu: a fault that saw the slot active either installed before or
        rechecks its generation under the lock (mmu_notifier_retry_hva) and retries.
        """
        slot = self.slots.read(slot_id)
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, clear_mask=MemslotFlags.ACTIVE)
        finally:
            self.lock.write_unlock()
        self.kvm_mmu_zap_all_fast()
        if self.debug:
            shared = self.parallel
            self.kvm.mmu_lock(shared)
            try:
                self.notifier.check_range_unmapped(slot.base_gfn, slot.end_gfn)
            finally:
                self.kvm.mmu_unlock(shared)

    def kvm_mmu_zap_all_fast(self) -> None:
        """kvm_mmu_zap_all_fast() (5.13, b7cccd397f31): every root invalidated and every vCPU asked to reload
        under the write lock; then the invalidated roots zapped under the read lock (4c6654bd160d) while the
        vCPUs fault into their new roots (the exclusive baseline keeps the write lock for both halves)."""
        self.zap_all_fast_invalidate()
        self.zap_all_fast_zap()

    def zap_all_fast_invalidate(self) -> None:
        """kvm_mmu_zap_all_fast's write-lock half: kvm_tdp_mmu_invalidate_all_roots, kvm_reload_remote_mmus."""
        self.lock.write_lock()
        try:
            self.roots.kvm_tdp_mmu_invalidate_all_roots()
            self.kvm_reload_remote_mmus()
        finally:
            self.lock.write_unlock()

    def zap_all_fast_zap(self) -> None:
        """kvm_mmu_zap_all_fast's read-lock half: kvm_tdp_mmu_zap_invalidated_roots."""
        ctl = self.ctl
        shared = self.parallel
        ctl.fetch_add(Ctl.FAST_ZAPS, 1)
        self.kvm.mmu_lock(shared)
        try:
            self.roots.kvm_tdp_mmu_zap_invalidated_roots(shared)
        finally:
            self.kvm.mmu_unlock(shared)
            ctl.fetch_add(Ctl.FAST_ZAPS, _U64)
        self.st[STAT["fast_zaps"]] += 1

    def kvm_reload_remote_mmus(self) -> None:
        """kvm_reload_remote_mmus(): KVM_REQ_MMU_RELOAD to every vCPU, waiting for those in guest mode.

        The roots generation moves (under the write lock), then the kick and wait of a
        remote flush carries the request: a vCPU that acknowledges it sees the new
        generation before its next access and reloads.
        """
        self.kvm.lockdep_assert_held_write()
        self.ctl.fetch_add(Ctl.ROOTS_GEN, 1)
        self.tlbctl.flush_remote_tlbs()

    def move_memslot(self, slot_id: int, base_gfn: int) -> None:
        """KVM_SET_USER_MEMORY_REGION moving a slot (5.13's kvm_set_memslot with KVM_MR_MOVE): the old slot
        goes invalid and kvm_arch_flush_shadow_memslot zaps it (kvm_mmu_zap_all_fast, as a deletion), then the
        slot is installed at its new base with the same host pages, contents and all."""
        self.delete_memslot(slot_id)
        self.lock.write_lock()
        try:
            self.slots.slot_rows.base_gfn.store(slot_id, base_gfn)
            self.slots.set_flags(slot_id, set_mask=MemslotFlags.ACTIVE, clear_mask=_LOG_DIRTY)
        finally:
            self.lock.write_unlock()

    def add_memslot(self, slot_id: int) -> None:
        """Re-activate a slot (its pages keep their contents)."""
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, set_mask=MemslotFlags.ACTIVE, clear_mask=_LOG_DIRTY)
        finally:
            self.lock.write_unlock()

    # ------------------------------------------------------------------ dirty logging (§9)

    def enable_dirty_logging(self, slot_id: int, initially_set: bool = False) -> int:
        """Set KVM_MEM_LOG_DIRTY_PAGES and write-protect every leaf of the slot (5.13: under the read lock).

        With initially_set (KVM_DIRTY_LOG_INITIALLY_SET) the bitmap starts full and only
        huge leaves are write-protected: 4K pages are protected when CLEAR_DIRTY_LOG names them.

        The flag changes under the write lock, so a fault that checked the slot before
        has finished installing before the write protection starts (the kernel's SRCU sync).
        The bitmap starts empty, as KVM allocates a zeroed one when the flag is set
        (bits left from an earlier logging period would be reported as new writes).
        Returns how many leaves were write-protected.
        """
        slots = self.slots
        self.lock.write_lock()
        try:
            slot = slots.read(slot_id)
            if not slot.flags & _LOG_DIRTY:
                slots.dirty.fill_range(slot.dirty_off, slots.dirty_words(slot), 0)
                if initially_set:                     # KVM_DIRTY_LOG_INITIALLY_SET (manual protect)
                    for k in range(slots.dirty_words(slot)):
                        bits = min(64, slot.npages - 64 * k)
                        slots.dirty.store(slot.dirty_off + k, (1 << bits) - 1)
            slots.set_flags(slot_id, set_mask=_LOG_DIRTY | (_INIT_SET if initially_set else 0))
        finally:
            self.lock.write_unlock()
        return self.kvm_mmu_slot_remove_write_access(slot_id, initially_set)

    def kvm_mmu_slot_remove_write_access(self, slot_id: int, initially_set: bool) -> int:
        """kvm_mmu_slot_apply_flags() -> kvm_mmu_slot_remove_write_access(): write-protect the slot's leaves.

        5.12: INITIALLY_SET reports every 4K page dirty already, so only huge leaves are
        protected now (they must be split lazily); without it every leaf is.
        """
        slot = self.slots.read(slot_id)
        shared = self.parallel
        self.kvm.mmu_lock(shared)
        try:
            return self.dirty.kvm_tdp_mmu_wrprot_slot(slot, 2 if initially_set else 1, shared)
        finally:
            self.kvm.mmu_unlock(shared)

    def slot_apply_flags_612(self, slot_id: int, initially_set: bool) -> int:
        """6.12's kvm_mmu_slot_apply_flags() on enabling logging (profile 6.12): wait out the faults that
        looked at the slot before the flag (kvm_swap_active_memslots' synchronize_srcu: the fast page fault
        runs without mmu_lock, so the write lock around the flag no longer orders it), split every huge leaf
        eagerly under the read lock (a3fe5dbda0a4), then write-protect at 4K.

        With INITIALLY_SET it returns before either: every page counts as dirty, and KVM_CLEAR_DIRTY_LOG splits
        and protects what it names (enable_log_dirty_pt_masked_612, cb00a70bd4b7)."""
        self.rcu.synchronize()
        if initially_set:
            return 0
        slot = self.slots.read(slot_id)
        shared = self.parallel
        self.kvm.mmu_lock(shared)
        try:
            self.dirty.kvm_tdp_mmu_try_split_huge_pages(slot, slot.base_gfn, slot.end_gfn, 1, shared)
        finally:
            self.kvm.mmu_unlock(shared)
        return Ioctls.kvm_mmu_slot_remove_write_access(self, slot_id, False)

    def slot_remove_write_access_skipped(self, slot_id: int, initially_set: bool) -> int:
        """Variant no-wrprot-on-enable: enabling dirty logging leaves the slot's writable mappings as they are."""
        return 0

    def get_dirty_log(self, slot_id: int, clear: bool = True) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: harvest the bitmap (xchg each word to 0) and re-protect what it reports.

        Under the write lock (5.13).  With clear=False (manual protect) it only copies.
        """
        slot = self.slots.read(slot_id)
        nwords = self.slots.dirty_words(slot)
        out = np.zeros(nwords, dtype=np.uint64)
        dirty = self.slots.dirty
        self.lock.write_lock()
        try:
            flush = False
            for k in range(nwords):
                if not clear:
                    out[k] = dirty.load(slot.dirty_off + k)
                    continue
                if dirty.load(slot.dirty_off + k) == 0:
                    continue
                mask = dirty.xchg(slot.dirty_off + k, 0)
                out[k] = mask
                if mask:
                    flush |= self.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, slot.base_gfn + 64 * k, mask)
            if flush or self.kvm.holds_unflushed:
                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        return out

    def clear_dirty_log(self, slot_id: int, first: int, bitmap: np.ndarray) -> int:
        """KVM_CLEAR_DIRTY_LOG: per word, clear the given bits and re-protect the pages that were dirty."""
        slot = self.slots.read(slot_id)
        dirty = self.slots.dirty
        cleared = 0
        self.lock.write_lock()
        try:
            flush = False
            for k, m in enumerate(bitmap):
                m = int(m)
                if not m:
                    continue
                word = slot.dirty_off + (first // 64) + k
                mask = m & dirty.fetch_and(word, ~m & _U64)   # mask &= atomic_fetch_andnot(mask, word)
                if mask:
                    cleared += bin(mask).count("1")
                    flush |= self.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, slot.base_gfn + first + 64 * k,
                                                                           mask)
            if flush or self.kvm.holds_unflushed:
                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        return cleared

    @site("debug")
    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot: Any, gfn: int, mask: int) -> bool:
        """kvm_arch_mmu_enable_log_dirty_pt_masked() (write lock): re-protect the 4K pages of [gfn, gfn+64) that
        `mask` names (5.13: huge leaves were protected at enable, see enable_dirty_logging)."""
        return self.dirty.kvm_tdp_mmu_clear_dirty_pt_masked(slot, gfn, mask)

    def enable_log_dirty_pt_masked_612(self, slot: Any, gfn: int, mask: int) -> bool:
        """6.12's kvm_arch_mmu_enable_log_dirty_pt_masked(): with INITIALLY_SET, first split the huge pages of
        [first, last] of the mask down to 4K (cb00a70bd4b7: eager splitting at CLEAR, lock dropped to
        allocate) and write-protect the huge leaves still at either end; then the 4K pages."""
        return self._split_protect_masked(slot, gfn, mask, 1)

    def enable_log_dirty_pt_masked_b5_off_by_one(self, slot: Any, gfn: int, mask: int) -> bool:
        """Variant clear-split-off-by-one (B5, before 1aa4bb916808): the split range ends at the mask's last
        page, exclusive, so the huge page holding that page is left unsplit (write-protected instead)."""
        return self._split_protect_masked(slot, gfn, mask, 0)

    def _split_protect_masked(self, slot: Any, gfn: int, mask: int, past_end: int) -> bool:
        if mask and self.slots.read(slot.id).flags & _INIT_SET:
            start = gfn + (mask & -mask).bit_length() - 1           # __ffs(mask)
            end = gfn + mask.bit_length() - 1                        # __fls(mask)
            if self.kvm.holds_unflushed:
                # departure: the split may drop the lock (to allocate, or to yield), and 6.12 does so with the
                # write protections of the words before unflushed (it flushes after its unlock); shmmmu flushes
                # them first, as its I6 check allows no unflushed change across a lock drop
                self.kvm.kvm_flush_remote_tlbs()
            self.dirty.kvm_tdp_mmu_try_split_huge_pages(slot, start, end + past_end, 1, False)   # write lock
            self.kvm_mmu_slot_gfn_write_protect(slot, start)
            huge = self.E                                            # pages of a level-2 leaf (PMD_SIZE)
            if start // huge != end // huge:                         # crosses two large pages
                self.kvm_mmu_slot_gfn_write_protect(slot, end)
        return self.dirty.kvm_tdp_mmu_clear_dirty_pt_masked(slot, gfn, mask)

    def kvm_mmu_slot_gfn_write_protect(self, slot: Any, gfn: int) -> bool:
        """kvm_mmu_slot_gfn_write_protect(kvm, slot, gfn, PG_LEVEL_2M): write-protect a huge leaf mapping gfn in
        every root (write lock)."""
        roots = self.roots
        return any([self.dirty.wrprot_gfn_range(roots.root_table(row), gfn, gfn + 1, 2, False)
                    for row in roots.for_each_tdp_mmu_root()])

    def disable_dirty_logging(self, slot_id: int) -> int:
        """Clear the flag and zap collapsible mappings (5.13: under the read lock, vCPUs running)."""
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, clear_mask=_LOG_DIRTY | _INIT_SET)
        finally:
            self.lock.write_unlock()
        slot = self.slots.read(slot_id)
        shared = self.parallel
        self.kvm.mmu_lock(shared)
        try:
            n = self.zap.kvm_tdp_mmu_zap_collapsible_sptes(slot, shared)
            if self.kvm.holds_unflushed:
                self.kvm.kvm_flush_remote_tlbs()
            return n
        finally:
            self.kvm.mmu_unlock(shared)
