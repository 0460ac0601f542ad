"""Memslots: guest-physical ranges backed by host pages of 4 KiB, 2 MiB or 1 GiB, their dirty bitmaps, and guest memory.

A memslot maps GFNs [base, base + npages) to host pages through the slot's
host map (the host's own page table: gfn -> host page), so the host can
migrate a range to fresh pages (`migrate`) as an MMU-notifier unmap does; each
slot owns two banks of host pages for that, and the bank a range leaves is
poisoned, so a write through a stale translation lands in a poisoned page and
is caught.  The largest level a fault may map at is bounded by the backing
page size, the slot's alignment and dirty logging (kvm_mmu_hugepage_adjust).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shmmmu.layout import MAX_MEMSLOTS, Ctl, MemslotFlags, MemslotRow as MS, memslot_areas

MSF_ACTIVE, MSF_LOG_DIRTY = MemslotFlags.ACTIVE, MemslotFlags.LOG_DIRTY
_SLOTS_GEN = Ctl.SLOTS_GEN

DATA_POISON = 0xBADBADBADBADBAD0      # the contents of a host page no guest mapping may reach


@dataclass(frozen=True, slots=True)
class Slot:
    """A process-local snapshot of one memslot row."""

    id: int
    base_gfn: int
    npages: int
    backing_level: int
    flags: int
    host_off: int
    dirty_off: int
    data_off: int
    gen: int
    huge_level: int          # the largest level alignment and backing allow (before dirty logging)
    end_gfn: int             # base_gfn + npages
    host_base: int           # host_off - base_gfn: gfn's word in the host map is host_base + gfn

    @property
    def active(self) -> bool:
        return bool(self.flags & MSF_ACTIVE)

    @property
    def logging(self) -> bool:
        return bool(self.flags & MSF_LOG_DIRTY)

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


# the lru slot before any lookup found one: it holds no GFN
_NO_SLOT = Slot(-1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0)


def init_memslots(vm) -> None:
    """Write the memslot rows, point each GFN at bank 0, and poison bank 1 (the creator, once)."""
    c = vm.config
    rows = vm.region.array("memslots")
    host_map = vm.region.array("host_map")
    data = vm.region.array("data")
    data[:] = DATA_POISON
    for k, (m, (host, dirty, doff)) in enumerate(zip(c.memslots, memslot_areas(c))):
        if k >= MAX_MEMSLOTS:
            raise ValueError(f"at most {MAX_MEMSLOTS} memslots")
        rows[k, MS.BASE_GFN] = m.base_gfn
        rows[k, MS.NPAGES] = m.npages
        rows[k, MS.BACKING_LEVEL] = m.backing_level
        rows[k, MS.HOST_OFF] = host
        rows[k, MS.DIRTY_OFF] = dirty
        rows[k, MS.DATA_OFF] = doff
        rows[k, MS.GEN] = 1
        rows[k, MS.FLAGS] = MSF_ACTIVE
        host_map[host: host + m.npages] = np.arange(doff, doff + m.npages, dtype=np.uint64)
        data[doff: doff + m.npages] = 0


def bank_size(slot: Slot, bits: int) -> int:
    align = 1 << (bits * (slot.backing_level - 1))
    return -(-slot.npages // align) * align


class Memslots:
    """One process's view: lookup by GFN (cached until the slot generation moves), levels, dirty bits."""

    def __init__(self, vm):
        self.region = vm.region
        self.bits = vm.config.bits
        self.ctl = vm.region.words("ctl")
        self.rows = vm.region.words("memslots")
        self.slot_rows = vm.region.columns("memslots", MS)
        self.host_map = vm.region.words("host_map")
        self.dirty = vm.region.words("dirty")
        self.data = vm.region.words("data")
        self.max_level = min(3, vm.config.geometry.root_level - 1)
        self._gen = -1
        self._slots: list[Slot] = []
        self._lru: Slot = _NO_SLOT              # kvm_memslots' lru_slot: the slot the last lookup found
        self._logging = False                   # some slot logs dirty pages

    def slots(self) -> list[Slot]:
        gen = self.ctl.load(_SLOTS_GEN)
        if gen != self._gen:
            self._slots = [s for s in (self.read(k) for k in range(MAX_MEMSLOTS)) if s.npages]
            self._lru = _NO_SLOT
            self._logging = any(s.flags & MSF_LOG_DIRTY for s in self._slots)
            self._gen = gen
        return self._slots

    def read(self, k: int) -> Slot:
        start = self.slot_rows.start(k)
        r = [0] * 8
        # the generation first, as a seqlock reader does: a change landing during the read (set_flags stores the
        # flags, then bumps the generation) then shows as a generation that moved when the fault rechecks it
        # under the lock, never as the old flags under the new generation (the explorer found that torn read:
        # a huge leaf installed writable beside the enabling of dirty logging)
        for i in (MS.GEN, MS.BASE_GFN, MS.NPAGES, MS.BACKING_LEVEL, MS.FLAGS, MS.HOST_OFF, MS.DIRTY_OFF, MS.DATA_OFF):
            r[i] = self.rows.load(start + i)
        base, npages, backing = r[MS.BASE_GFN], r[MS.NPAGES], r[MS.BACKING_LEVEL]
        huge = 1
        for level in range(2, min(backing, self.max_level) + 1):
            if base % (1 << (self.bits * (level - 1))) == 0:
                huge = level
        return Slot(k, base, npages, backing, r[MS.FLAGS], r[MS.HOST_OFF], r[MS.DIRTY_OFF], r[MS.DATA_OFF],
                    r[MS.GEN], huge, base + npages, r[MS.HOST_OFF] - base)

    def lookup(self, gfn: int) -> Slot | None:
        """gfn_to_memslot() (search_memslots with its lru_slot): the active slot holding gfn, or None
        (an MMIO/emulated access)."""
        if self.ctl.load(_SLOTS_GEN) != self._gen:
            self.slots()
        s = self._lru
        if s.base_gfn <= gfn < s.end_gfn:
            return s
        for s in self._slots:
            if s.base_gfn <= gfn < s.end_gfn:
                if s.flags & MSF_ACTIVE:
                    self._lru = s
                    return s
                return None
        return None

    def gfn_to_memslot_dirty_bitmap(self, gfn: int) -> Slot | None:
        """gfn_to_memslot_dirty_bitmap(): the slot holding gfn if it logs dirty pages, else None."""
        if self.ctl.load(_SLOTS_GEN) != self._gen:
            self.slots()
        if not self._logging:
            return None
        slot = self.lookup(gfn)
        return slot if slot is not None and slot.flags & MSF_LOG_DIRTY else None

    def max_mapping_level(self, slot: Slot, gfn: int) -> int:
        """kvm_mmu_hugepage_adjust() without NX: 4K while logging, else the largest huge page inside the slot."""
        if slot.flags & MSF_LOG_DIRTY or slot.huge_level == 1:
            return 1
        bits = self.bits
        for level in range(slot.huge_level, 1, -1):
            n = 1 << (bits * (level - 1))
            start = gfn & ~(n - 1)
            if start >= slot.base_gfn and start + n <= slot.base_gfn + slot.npages:
                return level
        return 1

    def gfn_to_pfn(self, slot: Slot, gfn: int) -> int:
        """The host page backing gfn now (the GUP of the fault path)."""
        return self.host_map.load(slot.host_base + gfn)

    def mark_dirty(self, slot: Slot, gfn: int) -> None:
        """mark_page_dirty_in_slot(): an atomic set_bit in the slot's dirty bitmap."""
        rel = gfn - slot.base_gfn
        self.dirty.fetch_or(slot.dirty_off + (rel >> 6), 1 << (rel & 63))

    def set_flags(self, k: int, set_mask: int = 0, clear_mask: int = 0) -> None:
        """Change a slot's flags and bump its generation and the global slots generation (the host, under the lock)."""
        flags = self.slot_rows.flags
        f = flags.load(k)
        flags.store(k, (f | set_mask) & ~clear_mask)
        self.slot_rows.gen.fetch_add(k, 1)
        self.ctl.fetch_add(_SLOTS_GEN, 1)

    def dirty_words(self, slot: Slot) -> int:
        return -(-slot.npages // 64)

    def migrate(self, slot: Slot, gfn_start: int, gfn_end: int) -> list[tuple[int, int]]:
        """Move the host pages backing [gfn_start, gfn_end) to the other bank, copy, poison the old pages.

        Whole backing pages move (a 2 MiB host page moves as one).  Returns the
        (old, new) host page of each moved block's first page.  The caller has
        already zapped the range and flushed (the MMU notifier's invalidate_range_start).
        """
        bits = self.bits
        blk = 1 << (bits * (slot.backing_level - 1))
        bank = bank_size(slot, bits)
        lo = max(slot.base_gfn, gfn_start)
        hi = min(slot.end_gfn, gfn_end)
        start = slot.base_gfn + ((lo - slot.base_gfn) // blk) * blk
        moved = []
        data_np = self.region.array("data")
        hm_np = self.region.array("host_map")
        for b in range(start, hi, blk):
            n = min(blk, slot.end_gfn - b)
            rel = b - slot.base_gfn
            self.host_map.touch(slot.host_off + rel, n, True)
            old = int(hm_np[slot.host_off + rel])
            in_bank0 = old < slot.data_off + bank
            new = old + bank if in_bank0 else old - bank
            self.data.touch(old, n, True)
            self.data.touch(new, n, True)
            data_np[new: new + n] = data_np[old: old + n]
            hm_np[slot.host_off + rel: slot.host_off + rel + n] = np.arange(new, new + n, dtype=np.uint64)
            data_np[old: old + n] = DATA_POISON
            moved.append((old, new))
        return moved
