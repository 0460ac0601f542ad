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

import numpy as np

from shmmmu import spte as S
from shmmmu.hostpage import clear_bits, host_pages, leaf_pages, lost
from shmmmu.layout import STAT, Ctl, HostPage, MemslotFlags, WState
from shmmmu.tdp_iter import TdpIter, for_each_leaf
from shmmmu.mmu.mmu import MmuFault

_U64 = (1 << 64) - 1
_LOG_DIRTY = MemslotFlags.LOG_DIRTY


class KvmIoctls(MmuFault):
    """The host side's operations on the MMU, each a whole locked operation."""
    __slots__ = ()

    def _lock(self, shared: bool) -> None:
        self.lock.read_lock() if shared else self.lock.write_lock()

    def _unlock(self, shared: bool) -> None:
        self.lock.read_unlock() if shared else self.lock.write_unlock()

    def flush_remote_tlbs(self) -> None:
        """A bare kvm_flush_remote_tlbs() (stress issues them between other operations)."""
        self.kvm_flush_remote_tlbs()

    # ------------------------------------------------------------------ zaps

    def zap_gfn_range_locked(self, start: int, end: int) -> None:
        """kvm_zap_gfn_range() (5.13, 6103bc074048): the TDP MMU part under the read lock, then the flush."""
        shared = self.parallel
        self._lock(shared)
        try:
            if self.kvm_tdp_mmu_zap_gfn_range(start, end, True, False, shared) or self.holds_unflushed:
                self.kvm_flush_remote_tlbs()
        finally:
            self._unlock(shared)

    def zap_all(self) -> None:
        """kvm_mmu_zap_all(): kvm_tdp_mmu_zap_all under the write lock."""
        self.lock.write_lock()
        try:
            self.kvm_tdp_mmu_zap_all()
        finally:
            self.lock.write_unlock()

    def destroy(self) -> int:
        """VM destruction (no vCPU runs): kvm_mmu_zap_all (kvm_arch_flush_shadow_all), every vCPU's root put
        (kvm_mmu_unload from kvm_arch_destroy_vm), then kvm_mmu_uninit_tdp_mmu's WARNs: no table may be
        left counted (tdp_mmu_pages) and no root listed (tdp_mmu_roots).  Returns how many tables and roots
        were left, recorded as a table-leak violation.
        """
        self.zap_all()
        ws = self.ws
        self.lock.write_lock()
        try:
            for k in range(self.config.n_workers):
                held = ws.load(k * WState.WORDS + WState.ROOT)
                if held:
                    ws.store(k * WState.WORDS + WState.ROOT, 0)
                    self.kvm_tdp_mmu_put_root(held - 1, False)
        finally:
            self.lock.write_unlock()
        self.root_row, self.root = -1, 0
        left = self.ctl.load(Ctl.PAGE_COUNT)
        left = left - (1 << 64) if left >> 63 else left
        roots = len(self.for_each_tdp_mmu_root())
        if left or roots:
            self.violation("table-leak", 0, left, roots)
        return left + roots

    # ------------------------------------------------------------------ host unmaps (MMU notifier)

    def host_unmap(self, start: int, end: int, migrate: bool = True, may_block: bool = True) -> int:
        """An MMU-notifier invalidation of [start, end) in 5.13's gfn-range form: zap, flush, (migrate the
        host pages), then end the invalidation.

        invalidate_range_start takes the write lock, counts the invalidation in
        progress with its range merged into any other in progress (kvm_inc_notifier_count)
        and unmaps (kvm_tdp_mmu_unmap_gfn_range, yielding if `may_block`); a fault that
        resolved its host page before retries (mmu_notifier_retry_hva).  With `migrate`,
        the host moves whole backing pages (a 2 MiB host page moves as one), so the range
        is widened to the backing pages it touches, as the kernel's notifier range covers
        the whole host mapping that changes.  invalidate_range_end bumps the sequence and
        drops the count (kvm_dec_notifier_count).  Returns how many host blocks moved.
        """
        if migrate:
            start, end = self._backing_range(start, end)
        self.lock.write_lock()
        try:
            self.kvm_inc_notifier_count(start, end)
            if self.kvm_tdp_mmu_unmap_gfn_range(start, end, may_block, False) or self.holds_unflushed:
                self.kvm_flush_remote_tlbs()
            if self.debug:
                # the notifier must not return while any root maps the range (d62007edf01f), and the
                # host must have heard of every access to the pages it is about to move (C7)
                self.check_range_unmapped(start, end)
                if migrate:
                    self.check_host_pages(start, end, "unmapped")
        finally:
            self.lock.write_unlock()
        moved = 0
        done = np.zeros(0, np.int64)
        if migrate:
            runs = []
            for slot in self.slots.slots():
                if slot.base_gfn < end and start < slot.end_gfn:
                    blocks = self.slots.migrate(slot, start, end)
                    moved += len(blocks)
                    blk = 1 << (self.bits * (slot.backing_level - 1))
                    runs += [np.arange(p, p + blk, dtype=np.int64) for b in blocks for p in b]
            if runs:
                done = np.concatenate(runs)
        self.lock.write_lock()
        try:
            # the pages were written back (if dirty) and moved: old and new start clean.  Reset under the
            # lock, which every reader of that state holds (aging, another notifier's check)
            clear_bits(self.host_ad, done, HostPage.ACCESSED | HostPage.DIRTY)
            if self.debug:
                clear_bits(self.touched, done, HostPage.TOUCHED | HostPage.WRITTEN)
            self.kvm_dec_notifier_count()
        finally:
            self.lock.write_unlock()
        return moved

    def check_host_pages(self, start: int, end: int, when: str) -> None:
        """Debug: every host page of [start, end) the guest touched is host-accessed or mapped young, every
        one it wrote host-dirty or mapped dirty (mmu_lock held for write)."""
        gfns, pages = host_pages(self.slots, start, end)
        if not pages.size:
            return
        for page in pages.tolist():
            self.touched.touch(page, 1, False)
        touched = self.touched_np[pages]                    # first: see hostpage.lost
        leaves = self.present_leaves(start, end)
        young = leaf_pages([(g, lv) for g, lv, v in leaves if v & S.ACCESSED], self.bits, gfns)
        dirty = leaf_pages([(g, lv) for g, lv, v in leaves if v & S.DIRTY], self.bits, gfns)
        for page in pages.tolist():
            self.host_ad.touch(page, 1, False)
        acc, wr = lost(touched, self.host_ad_np[pages], young, dirty)
        for i in wr[:4]:
            self.violation("host-dirty-lost", int(gfns[i]), int(pages[i]), 1 if when == "unmapped" else 2)
        for i in acc[:4]:
            self.violation("host-accessed-lost", int(gfns[i]), int(pages[i]), 1 if when == "unmapped" else 2)

    # ------------------------------------------------------------------ aging (the notifier's young callbacks)

    def clear_young(self, start: int, end: int, flush: bool = True) -> bool:
        """kvm_mmu_notifier_clear_flush_young (flush) / clear_young (no flush) in 5.13: under the write lock
        (kvm_handle_hva_range), kvm_tdp_mmu_age_gfn_range on every root; True if anything was young.

        A young leaf's pages are reported referenced, the whole leaf (a huge page ages as one).
        With debug on, the host first checks that it heard of every access to the pages the
        aged leaves cover, then, after the flush, consumes their accessed state: a later
        access walks the tables and sets A again.
        """
        self.lock.write_lock()
        try:
            if self.debug:
                spans = [(g, g + self.pages[lv]) for g, lv, _ in self.present_leaves(start, end)]
                lo = min([start] + [a for a, _ in spans])
                hi = max([end] + [b for _, b in spans])
                self.check_host_pages(lo, hi, "aged")
            young = self.kvm_tdp_mmu_age_gfn_range(start, end)
            for g, lv in young:
                # what the reclaim's rmap walk takes from the callback: the page is referenced
                _, pages = host_pages(self.slots, g, g + self.pages[lv])
                if pages.size and int(pages[-1]) - int(pages[0]) + 1 == pages.size:     # one folio
                    self.host_ad.or_range(int(pages[0]), int(pages.size), HostPage.ACCESSED)
                else:
                    for p in pages.tolist():
                        self.host_ad.fetch_or(p, HostPage.ACCESSED)
            if flush and young:
                self.kvm_flush_remote_tlbs()
            if self.debug and flush:
                _, pages = host_pages(self.slots, lo, hi)
                clear_bits(self.host_ad, pages, HostPage.ACCESSED)
                clear_bits(self.touched, pages, HostPage.TOUCHED)
        finally:
            self.lock.write_unlock()
        self.st[STAT["aged_young"]] += len(young)
        return bool(young)

    def test_young(self, start: int, end: int) -> bool:
        """kvm_mmu_notifier_test_young (5.13): kvm_tdp_mmu_test_age_gfn under the write lock."""
        self.lock.write_lock()
        try:
            return self.kvm_tdp_mmu_test_age_gfn(start, end)
        finally:
            self.lock.write_unlock()

    def young_pages(self, start: int, end: int) -> np.ndarray:
        """What test_young answers for each page of [start, end), in one walk under the write lock: a page
        is young if a leaf mapping it, in any root, has A set (access_tracking_perf_test's check)."""
        self.lock.write_lock()
        try:
            leaves = self.present_leaves(start, end)
        finally:
            self.lock.write_unlock()
        young = np.zeros(end - start, dtype=bool)
        for g, lv, v in leaves:
            if v & S.ACCESSED:
                young[max(g, start) - start: min(g + self.pages[lv], end) - start] = True
        return young

    def present_leaves(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(first gfn, level, spte) of every present leaf that maps part of [start, end), in any root
        (mmu_lock held; for the debug checks)."""
        out = []
        self.rcu.read_lock()
        try:
            for row in self.for_each_tdp_mmu_root():
                it = TdpIter(self.tables, self.geometry, self.root_table(row), self.root_level, 1, start)
                for it in for_each_leaf(it, end):
                    out.append((it.gfn, it.level, it.old_spte))
        finally:
            self.rcu.read_unlock()
        return out

    def kvm_inc_notifier_count(self, start: int, end: int) -> None:
        """kvm_inc_notifier_count() (5.13): mmu_notifier_count++, the range recorded or merged (write lock)."""
        ctl = self.ctl
        if ctl.fetch_add(Ctl.NOTIFIER_COUNT, 1) == 0:
            ctl.store(Ctl.NOTIFIER_START, start)
            ctl.store(Ctl.NOTIFIER_END, end)
        else:
            ctl.store(Ctl.NOTIFIER_START, min(ctl.load(Ctl.NOTIFIER_START), start))
            ctl.store(Ctl.NOTIFIER_END, max(ctl.load(Ctl.NOTIFIER_END), end))

    def kvm_dec_notifier_count(self) -> None:
        """kvm_dec_notifier_count() (5.13): mmu_notifier_seq++, then mmu_notifier_count-- (write lock)."""
        self.ctl.fetch_add(Ctl.NOTIFIER_SEQ, 1)
        self.ctl.fetch_add(Ctl.NOTIFIER_COUNT, _U64)

    def check_range_unmapped(self, start: int, end: int) -> None:
        """Debug: no root, valid or invalid, maps a GFN of [start, end) (mmu_lock held; no yield, so no
        reference is needed on the roots)."""
        self.rcu.read_lock()
        try:
            for row in self.for_each_tdp_mmu_root():
                it = TdpIter(self.tables, self.geometry, self.root_table(row), self.root_level, 1, start)
                for it in for_each_leaf(it, end):
                    self.violation("mapping-after-unmap", it.gfn, row, it.old_spte)
                    break
        finally:
            self.rcu.read_unlock()

    def _backing_range(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) widened to whole backing pages of the memslots it overlaps."""
        lo, hi = start, end
        for slot in self.slots.slots():
            if slot.base_gfn < end and start < slot.end_gfn:
                blk = 1 << (self.bits * (slot.backing_level - 1))
                first = max(start, slot.base_gfn) - slot.base_gfn
                last = min(end, slot.end_gfn) - slot.base_gfn
                lo = min(lo, slot.base_gfn + first // blk * blk)
                hi = max(hi, min(slot.end_gfn, slot.base_gfn + -(-last // blk) * blk))
        return lo, hi

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
            self._lock(shared)
            try:
                self.check_range_unmapped(slot.base_gfn, slot.end_gfn)
            finally:
                self._unlock(shared)

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
            self.kvm_tdp_mmu_invalidate_all_roots()
            self.kvm_reload_remote_mmus()
        finally:
            self.lock.write_unlock()

    def zap_all_fast_zap(self) -> None:
        """kvm_mmu_zap_all_fast's read-lock half: kvm_tdp_mmu_zap_invalidated_roots."""
        ctl = self.ctl
        shared = self.parallel
        ctl.fetch_add(Ctl.FAST_ZAPS, 1)
        self._lock(shared)
        try:
            self.kvm_tdp_mmu_zap_invalidated_roots(shared)
        finally:
            self._unlock(shared)
            ctl.fetch_add(Ctl.FAST_ZAPS, _U64)
        self.st[STAT["fast_zaps"]] += 1

    def kvm_reload_remote_mmus(self) -> None:
        """kvm_reload_remote_mmus(): KVM_REQ_MMU_RELOAD to every vCPU, waiting for those in guest mode.

        The roots generation moves (under the write lock), then the kick and wait of a
        remote flush carries the request: a vCPU that acknowledges it sees the new
        generation before its next access and reloads.
        """
        self.lockdep_assert_held_write()
        self.ctl.fetch_add(Ctl.ROOTS_GEN, 1)
        self.tlbctl.flush_remote_tlbs()

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
            slots.set_flags(slot_id, set_mask=_LOG_DIRTY)
        finally:
            self.lock.write_unlock()
        return self.kvm_mmu_slot_remove_write_access(slot_id, initially_set)

    def kvm_mmu_slot_remove_write_access(self, slot_id: int, initially_set: bool) -> int:
        """kvm_mmu_slot_apply_flags() -> kvm_mmu_slot_remove_write_access(): write-protect the slot's leaves.

        5.12: INITIALLY_SET reports every 4K page dirty already, so only huge leaves are
        protected now (they must be split lazily); without it every leaf is.
        """
        if self.bugs.no_wrprot_on_enable:
            return 0
        slot = self.slots.read(slot_id)
        shared = self.parallel
        self._lock(shared)
        try:
            return self.kvm_tdp_mmu_wrprot_slot(slot, 2 if initially_set else 1, shared)
        finally:
            self._unlock(shared)

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
                    flush |= self.kvm_tdp_mmu_clear_dirty_pt_masked(slot, slot.base_gfn + 64 * k, mask)
            if flush or self.holds_unflushed:
                self.kvm_flush_remote_tlbs()
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
                    flush |= self.kvm_tdp_mmu_clear_dirty_pt_masked(slot, slot.base_gfn + first + 64 * k, mask)
            if flush or self.holds_unflushed:
                self.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        return cleared

    def disable_dirty_logging(self, slot_id: int) -> int:
        """Clear the flag and zap collapsible mappings (5.13: under the read lock, vCPUs running)."""
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, clear_mask=_LOG_DIRTY)
        finally:
            self.lock.write_unlock()
        slot = self.slots.read(slot_id)
        shared = self.parallel
        self._lock(shared)
        try:
            n = self.kvm_tdp_mmu_zap_collapsible_sptes(slot, shared)
            if self.holds_unflushed:
                self.kvm_flush_remote_tlbs()
            return n
        finally:
            self._unlock(shared)
