"""TDP iterator: the pre-order walk over a GFN range of the page tables that every MMU operation is written on.

Mirrors arch/x86/kvm/mmu/tdp_iter.c: a walk keeps the path of tables from the
root (`pt_path`), the entry it stands on (`table`, `index`, its last-read value
`old_spte`), and `next_last_level_gfn`, the lowest GFN it will map next at the
last level.  It steps down into a present non-leaf (re-reading the entry first,
so a concurrently zapped entry is not followed), sideways, and up.

Yielding: after the lock was dropped, every table pointer is dead, so the walk
restarts from the root at `next_last_level_gfn` (`restart`).  `yielded_gfn`
records where the last (re)start was; a walk may only yield again after it has
stepped sideways (`next_last_level_gfn != yielded_gfn`): forward progress
(ed5e484b79e8).  Since 5.16 a yield sets `yielded` and the next `next()`
restarts *instead of* advancing (3a0f64de479c); 5.13 restarted inside
tdp_mmu_iter_cond_resched and then advanced, which skips the entry at
`next_last_level_gfn` (CVE-2021-47094, bug K9: tdp_mmu.py re-creates it there).
"""
from __future__ import annotations

from typing import Iterator

from shmmmu.atomics import Words
from shmmmu.spte import LARGE, MMU_PRESENT, PFN_MASK, PFN_SHIFT, PRESENT_LARGE, Geometry


class TdpIter:
    """struct tdp_iter.  Read the fields in a loop body; write through `tdp_mmu` setters.

    `sptep` is the flat word index of the entry the walk stands on (table * entries
    + index), as the kernel keeps a pointer; pt_path[level] is likewise the word
    index of the table's first entry (the kernel's pt_path holds table pointers).
    """

    __slots__ = ("tables", "bits", "entries", "emask", "root_level", "min_level", "pt_path", "level", "gfn",
                 "sptep", "old_spte", "next_last_level_gfn", "yielded_gfn", "valid", "yielded",
                 "load", "shifts", "rmasks", "ptr_shift", "root", "root_base")

    def __init__(self, tables: Words, geometry: Geometry, root: int, root_level: int, min_level: int,
                 goal_gfn: int):
        self.tables = tables
        self.load = tables.load                      # bound once: every step reads one entry
        self.bits = geometry.bits
        self.entries = geometry.entries
        self.emask = geometry.entries - 1
        # a table entry's PFN field is the child's table index; shifted by this instead of PFN_SHIFT it is the
        # word index of the child's first entry (tables of 2**bits words, bits <= PFN_SHIFT)
        self.ptr_shift = PFN_SHIFT - geometry.bits
        self.root_level = root_level
        # per level: the shift of its index bits, and the mask that rounds a GFN down to its entry
        self.shifts = tuple(self.bits * (level - 1) if level else 0 for level in range(root_level + 1))
        self.rmasks = tuple(~((1 << sh) - 1) for sh in self.shifts)
        self.pt_path = [0] * (root_level + 1)        # pt_path[level] = first word of the table at that level
        self.root = -1                               # the root of the last start, and its first word
        self.root_base = 0
        self.start(root, min_level, goal_gfn)

    def start(self, root: int, min_level: int, goal_gfn: int) -> "TdpIter":
        """tdp_iter_start(): aim a (possibly reused) iterator at goal_gfn from the root."""
        self.min_level = min_level
        level = self.level = self.root_level
        if root != self.root:                        # the kernel's pt_path holds the root's pointer: no multiply
            self.root = root
            self.root_base = self.pt_path[level] = root << self.bits     # (only start writes the root's entry)
        base = self.root_base
        # restart(), written out: the fault path starts a walk per fault
        self.yielded = False
        self.next_last_level_gfn = self.yielded_gfn = goal_gfn
        self.gfn = goal_gfn & self.rmasks[level]
        sptep = self.sptep = base + ((goal_gfn >> self.shifts[level]) & self.emask)
        self.old_spte = self.tables.load(sptep)
        self.valid = True
        return self

    @property
    def table(self) -> int:
        """The table the walk stands in (its index in the pool)."""
        return self.sptep >> self.bits

    @property
    def index(self) -> int:
        """The entry's index in its table (SPTE_INDEX)."""
        return self.sptep & self.emask

    # The steps below are the fault path's inner loop: each computes the level's
    # shift and rounding from the per-level tuples and reads its entry with the
    # bound `load`, instead of going through a shared helper.

    def restart(self) -> None:
        """tdp_iter_restart(): back to the root, aimed at next_last_level_gfn."""
        self.yielded = False
        goal = self.yielded_gfn = self.next_last_level_gfn
        level = self.level = self.root_level
        self.gfn = goal & self.rmasks[level]
        sptep = self.sptep = self.pt_path[level] + ((goal >> self.shifts[level]) & self.emask)
        self.old_spte = self.load(sptep)
        self.valid = True

    def _step_down(self) -> bool:
        """try_step_down(): into the child table of a present non-leaf, re-reading the entry first."""
        level = self.level
        if level == self.min_level:
            return False
        spte = self.old_spte = self.load(self.sptep)
        if spte & PRESENT_LARGE != MMU_PRESENT:      # not a table (level > min_level >= 1: not a 4K entry)
            return False
        level = self.level = level - 1
        base = self.pt_path[level] = (spte & PFN_MASK) >> self.ptr_shift
        goal = self.next_last_level_gfn
        self.gfn = goal & self.rmasks[level]
        sptep = self.sptep = base + ((goal >> self.shifts[level]) & self.emask)
        self.old_spte = self.load(sptep)
        return True

    def _step_side(self) -> bool:
        """try_step_side(): to the next entry of the same table; the walk's goal moves with it."""
        sptep = self.sptep
        if sptep & self.emask == self.emask:         # the last entry (tables are entry-aligned in the pool)
            return False
        self.next_last_level_gfn = self.gfn = self.gfn + (1 << self.shifts[self.level])
        sptep = self.sptep = sptep + 1
        self.old_spte = self.load(sptep)
        return True

    def _step_up(self) -> bool:
        """try_step_up()."""
        level = self.level
        if level == self.root_level:
            return False
        level = self.level = level + 1
        gfn = self.gfn = self.gfn & self.rmasks[level]
        sptep = self.sptep = self.pt_path[level] + ((gfn >> self.shifts[level]) & self.emask)
        self.old_spte = self.load(sptep)
        return True

    def next(self) -> None:
        """tdp_iter_next(): the next entry in pre-order.

        The step down is `_step_down` written out in place: it is the fault path's
        common step, and the call it saves is a tenth of a step's cost.
        """
        if self.yielded:
            self.restart()
            return
        level = self.level
        if level != self.min_level:
            tables = self.tables
            spte = tables.load(self.sptep)
            if spte & PRESENT_LARGE == MMU_PRESENT:      # a table (level > min_level >= 1: not a 4K entry)
                level = self.level = level - 1
                base = self.pt_path[level] = (spte & PFN_MASK) >> self.ptr_shift
                goal = self.next_last_level_gfn
                self.gfn = goal & self.rmasks[level]
                sptep = self.sptep = base + ((goal >> self.shifts[level]) & self.emask)
                self.old_spte = tables.load(sptep)
                return
            self.old_spte = spte
        while True:
            if self._step_side():
                return
            if not self._step_up():
                break
        self.valid = False

    def mark_yielded(self) -> None:
        """After dropping the lock: the next `next()` restarts from the root (5.16+ `iter->yielded`)."""
        self.yielded = True

    def can_yield(self) -> bool:
        """The forward-progress rule: only after stepping sideways since the last (re)start."""
        return self.next_last_level_gfn != self.yielded_gfn


def for_each_pte(it: TdpIter, end: int) -> Iterator[TdpIter]:
    """for_each_tdp_pte(): every entry covering [goal, end) in pre-order, down to min_level.

    A body that writes an entry it stands on and wants to look at the new value
    re-reads `old_spte`; a body that yielded calls `it.mark_yielded()` and continues.
    """
    while it.valid and it.gfn < end:
        yield it
        it.next()


def for_each_leaf(it: TdpIter, end: int) -> Iterator[TdpIter]:
    """tdp_root_for_each_leaf_pte(): only present leaves."""
    for _ in for_each_pte(it, end):
        s = it.old_spte
        if s & MMU_PRESENT and (it.level == 1 or s & LARGE):
            yield it
