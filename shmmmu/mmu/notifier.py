"""Notifier: the MMU notifier's callbacks in 5.13's gfn-range form: invalidate (unmap, migrate), clear and test young.

invalidate_range_start takes the write lock, counts the invalidation in
progress (kvm_inc_notifier_count) and unmaps every root's mappings of the
range (kvm_tdp_mmu_unmap_gfn_range); invalidate_range_end bumps the sequence
and drops the count.  Aging (clear_flush_young, test_young) walks every root
under the write lock.  With debug on, the host checks on the way that it heard
of every access the guest made to the pages it is about to move or age (C7),
and that no root still maps an invalidated range.

6.12 (variant unmap-leafs): the unmap zaps only the leaves of the range, in
every root, valid or invalid (kvm_tdp_mmu_unmap_gfn_range -> tdp_mmu_zap_leafs,
f47e5bbbc92f); the tables stay.  The callbacks are otherwise 5.13's: the
invalidation count and sequence are 6.12's mmu_invalidate_in_progress and
mmu_invalidate_seq under their old names.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from shmmmu import spte as S
from shmmmu.hostpage import clear_bits, host_pages, leaf_pages, lost
from shmmmu.layout import STAT, Ctl, HostPage
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu.tdp_iter import TdpIter, for_each_leaf

_U64 = (1 << 64) - 1


class Notifier(Part):
    """The MMU notifier's side of the host: what the host's memory management asks of KVM."""

    __slots__ = ("zap", "dirty", "roots", "host_ad", "touched", "host_ad_np", "touched_np")
    zap: Any                        # the tdp_zap part: kvm_tdp_mmu_unmap_gfn_range
    dirty: Any                      # the tdp_dirty part: aging
    roots: Any                      # the roots part

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)
        self.host_ad, self.touched = kvm.host_ad, kvm.touched
        self.host_ad_np, self.touched_np = kvm.host_ad_np, kvm.touched_np

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
            if self.zap.kvm_tdp_mmu_unmap_gfn_range(start, end, may_block, False) or self.kvm.holds_unflushed:
                self.kvm.kvm_flush_remote_tlbs()
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
            self.kvm.violation("host-dirty-lost", int(gfns[i]), int(pages[i]), 1 if when == "unmapped" else 2)
        for i in acc[:4]:
            self.kvm.violation("host-accessed-lost", int(gfns[i]), int(pages[i]), 1 if when == "unmapped" else 2)

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
            young = self.dirty.kvm_tdp_mmu_age_gfn_range(start, end)
            for g, lv in young:
                # what the reclaim's rmap walk takes from the callback: the page is referenced
                _, pages = host_pages(self.slots, g, g + self.pages[lv])
                if pages.size and int(pages[-1]) - int(pages[0]) + 1 == pages.size:     # one folio
                    self.host_ad.or_range(int(pages[0]), int(pages.size), HostPage.ACCESSED)
                else:
                    for p in pages.tolist():
                        self.host_ad.fetch_or(p, HostPage.ACCESSED)
            if flush and young:
                self.kvm.kvm_flush_remote_tlbs()
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
            return self.dirty.kvm_tdp_mmu_test_age_gfn(start, end)
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
            for row in self.roots.listed_roots():
                it = TdpIter(self.tables, self.geometry, self.roots.root_table(row), self.root_level, 1, start)
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
            for row in self.roots.listed_roots():
                it = TdpIter(self.tables, self.geometry, self.roots.root_table(row), self.root_level, 1, start)
                for it in for_each_leaf(it, end):
                    self.kvm.violation("mapping-after-unmap", it.gfn, row, it.old_spte)
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

