"""SPTE: every bit of an EPT entry as KVM uses it (5.13+ layout), level arithmetic, and decoding.

One module owns every mask: nothing else writes a bit pattern.  The layout is
the one KVM settled on with the MMU-present series (KVM_TDP_MMU.md §1.3):
present is bit 11, host-writable bit 57, MMU-writable bit 58, and the frozen
REMOVED value is 0x5a0.  Predicates mirror spte.h; vectorized forms work on a
whole table at once for range operations and the inspector.

A non-leaf entry's PFN is the index of its child table in the region's table
pool; a leaf's PFN is a host page (an index into the region's data words).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- hardware EPT bits (Intel SDM), KVM_TDP_MMU.md §1.2 ---
READABLE = 1 << 0
WRITABLE = 1 << 1            # PT_WRITABLE_MASK
EXECUTABLE = 1 << 2          # shadow_x_mask
RWX = READABLE | WRITABLE | EXECUTABLE
MT_SHIFT = 3
MT_WB = 6                    # write-back memory type
MEMTYPE_MASK = 7 << MT_SHIFT
IPAT = 1 << 6                # ignore PAT
LARGE = 1 << 7               # PT_PAGE_SIZE_MASK: a leaf at level 2 or 3
ACCESSED = 1 << 8            # shadow_accessed_mask (EPT A/D on)
DIRTY = 1 << 9               # shadow_dirty_mask
# --- KVM software bits ---
MMU_PRESENT = 1 << 11        # SPTE_MMU_PRESENT_MASK: "present" is one bit test
# is_shadow_present_pte() and is_large_pte() in one test: `spte & PRESENT_LARGE` is MMU_PRESENT for a table
# (above 4K), PRESENT_LARGE for a huge leaf, anything else for an entry that is not present
PRESENT_LARGE = MMU_PRESENT | LARGE
PFN_SHIFT = 12
PFN_MASK = ((1 << 52) - 1) & ~((1 << PFN_SHIFT) - 1)   # bits 51:12
AD_TYPE_MASK = 3 << 52       # SPTE_TDP_AD_* (always ENABLED=0 here)
HOST_WRITABLE = 1 << 57      # EPT_SPTE_HOST_WRITABLE
MMU_WRITABLE = 1 << 58       # EPT_SPTE_MMU_WRITABLE: KVM may make the entry writable again
SUPPRESS_VE = 1 << 63

# The frozen value written while a thread owns an entry (REMOVED_SPTE, later FROZEN_SPTE).
# Not present to hardware (RWX = 0), no PFN bits, and no MMU_PRESENT bit.
REMOVED = 0x5A0

MMIO_MASK = RWX
MMIO_VALUE = WRITABLE | EXECUTABLE    # RWX = 110: an EPT misconfiguration exit

assert REMOVED & MMU_PRESENT == 0 and REMOVED & RWX == 0 and REMOVED & PFN_MASK == 0
assert (REMOVED & MMIO_MASK) != MMIO_VALUE
for _a, _b in [(RWX, MEMTYPE_MASK), (IPAT, LARGE), (ACCESSED, DIRTY), (MMU_PRESENT, PFN_MASK),
               (PFN_MASK, HOST_WRITABLE | MMU_WRITABLE), (AD_TYPE_MASK, PFN_MASK)]:
    assert _a & _b == 0, "SPTE masks overlap"

# Leaf bits set on every mapping of guest RAM: R, X, WB memory type, ignore PAT, present.
_LEAF_BASE = READABLE | EXECUTABLE | (MT_WB << MT_SHIFT) | IPAT | MMU_PRESENT
# A non-leaf entry: RWX, accessed (KVM sets it and ignores it later), present.
_NONLEAF_BITS = RWX | ACCESSED | MMU_PRESENT

# Levels (PG_LEVEL_*): the entries of a level-L table map pages(L) 4 KiB pages each.
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
ROOT_LEVEL = 4
MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G", 4: "512G"}


# ---------------------------------------------------------------- constructors

def make_nonleaf(child_table: int) -> int:
    """make_nonleaf_spte(): a link to a child table (RWX, A, present)."""
    return (child_table << PFN_SHIFT) | _NONLEAF_BITS


def make_leaf(pfn: int, level: int, *, writable: bool, accessed: bool = True,
              exec_ok: bool = True) -> int:
    """make_spte() for guest RAM on a host-writable page.

    A writable mapping is made dirty at once (KVM pre-dirties writable SPTEs), so a
    read fault on a writable page installs W+D, as the kernel does.  `writable=False`
    gives the dirty-logging write-protected form: W clear, MMU-writable kept.
    `exec_ok=False` drops X (the NX huge page mitigation on a huge leaf).
    """
    spte = _LEAF_BASE | HOST_WRITABLE | MMU_WRITABLE | (pfn << PFN_SHIFT)
    if not exec_ok:
        spte &= ~EXECUTABLE
    if level > PG_LEVEL_4K:
        spte |= LARGE
    if accessed:
        spte |= ACCESSED
    if writable:
        spte |= WRITABLE | DIRTY
    return spte


# ---------------------------------------------------------------- predicates (spte.h)

def is_removed(spte: int) -> bool:
    """is_removed_spte(): an exact value, not a flag."""
    return spte == REMOVED


def is_present(spte: int) -> bool:
    """is_shadow_present_pte()."""
    return bool(spte & MMU_PRESENT)


def is_large(spte: int) -> bool:
    return bool(spte & LARGE)


def is_last(spte: int, level: int) -> bool:
    """is_last_spte(): any 4K-level entry is a leaf, above that the page-size bit says."""
    return level == PG_LEVEL_4K or bool(spte & LARGE)


def is_leaf(spte: int, level: int) -> bool:
    return bool(spte & MMU_PRESENT) and (level == PG_LEVEL_4K or bool(spte & LARGE))


def is_nonleaf(spte: int, level: int) -> bool:
    return bool(spte & MMU_PRESENT) and level > PG_LEVEL_4K and not spte & LARGE


def is_writable(spte: int) -> bool:
    return bool(spte & WRITABLE)


def spte_has_volatile_bits(spte: int, level: int) -> bool:
    """spte_has_volatile_bits() for A/D-enabled EPT: a present leaf whose A (or, if writable, D) the
    processor may still set without any lock, so a store over it must exchange (ba3a6120a4e7)."""
    if not spte & MMU_PRESENT or (level != PG_LEVEL_4K and not spte & LARGE):
        return False                                  # not a present leaf: nothing the processor sets
    return not spte & ACCESSED or (spte & WRITABLE != 0 and not spte & DIRTY)


def is_mmu_writable(spte: int) -> bool:
    return bool(spte & MMU_WRITABLE)


def is_accessed(spte: int) -> bool:
    return bool(spte & ACCESSED)


def is_dirty(spte: int) -> bool:
    return bool(spte & DIRTY)


def is_executable(spte: int) -> bool:
    return bool(spte & EXECUTABLE)


def pfn(spte: int) -> int:
    """spte_to_pfn(): for a non-leaf, the child table's index."""
    return (spte & PFN_MASK) >> PFN_SHIFT


def child_table(spte: int, level: int) -> int | None:
    """spte_to_child_pt(): the child table of a present non-leaf entry, else None."""
    if spte & MMU_PRESENT and level > PG_LEVEL_4K and not spte & LARGE:
        return (spte & PFN_MASK) >> PFN_SHIFT
    return None


def write_protect(spte: int) -> int:
    """Dirty-logging write protection: clear W, keep MMU-writable so a fault may restore it."""
    return spte & ~WRITABLE


def make_writable(spte: int) -> int:
    """What a write fault installs over a write-protected, MMU-writable leaf: W and D set."""
    return spte | WRITABLE | DIRTY | ACCESSED


# ---------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Geometry:
    """Level and index arithmetic for tables of 2**bits entries (9 bits: the real 512).

    The test mode uses 3 bits (8 entries) so small memories build deep trees, as
    the kernel's user-space radix-tree tests do with SHIFT=3.
    """

    bits: int = 9
    root_level: int = ROOT_LEVEL

    @property
    def entries(self) -> int:
        return 1 << self.bits

    def pages(self, level: int) -> int:
        """KVM_PAGES_PER_HPAGE(level): 4 KiB pages mapped by one entry at `level`."""
        return 1 << (self.bits * (level - 1))

    def shift(self, level: int) -> int:
        return self.bits * (level - 1)

    def index(self, gfn: int, level: int) -> int:
        """SPTE_INDEX(): the entry of a level-`level` table that covers gfn."""
        return (gfn >> (self.bits * (level - 1))) & ((1 << self.bits) - 1)

    def round(self, gfn: int, level: int) -> int:
        """round_gfn_for_level()."""
        return gfn & ~((1 << (self.bits * (level - 1))) - 1)

    @property
    def max_gfn(self) -> int:
        """One past the last GFN the root can map."""
        return 1 << (self.bits * self.root_level)


DEFAULT_GEOMETRY = Geometry()


# ---------------------------------------------------------------- decoding

@dataclass(frozen=True)
class Decoded:
    """A readable record of one entry, for the inspector and error messages."""

    raw: int
    level: int
    kind: str            # "none", "removed", "mmio", "nonleaf", "leaf", "garbage"
    pfn: int
    flags: str           # e.g. "R W X A D MMUW HOSTW"
    size: str            # "4K", "2M", "1G" for leaves

    def __str__(self) -> str:
        if self.kind in ("none", "removed", "garbage"):
            return f"{self.raw:#018x} L{self.level} {self.kind}"
        what = f"table #{self.pfn}" if self.kind == "nonleaf" else f"{self.size} pfn {self.pfn:#x}"
        return f"{self.raw:#018x} L{self.level} {self.kind:7s} {what} [{self.flags}]"


_FLAG_NAMES = [(READABLE, "R"), (WRITABLE, "W"), (EXECUTABLE, "X"), (IPAT, "IPAT"), (LARGE, "PS"),
               (ACCESSED, "A"), (DIRTY, "D"), (MMU_WRITABLE, "MMUW"), (HOST_WRITABLE, "HOSTW")]


def flag_string(spte: int) -> str:
    """The set bits by name, in bit order, with the memory type after RWX."""
    names = [n for bit, n in _FLAG_NAMES[:3] if spte & bit]
    mt = (spte & MEMTYPE_MASK) >> MT_SHIFT
    if spte & MMU_PRESENT:
        names.append("WB" if mt == MT_WB else f"MT{mt}")
    names += [n for bit, n in _FLAG_NAMES[3:] if spte & bit]
    return " ".join(names)


def decode(spte: int, level: int) -> Decoded:
    """Decode one entry found at `level` (the level of the table holding it)."""
    if spte == 0:
        return Decoded(spte, level, "none", 0, "", "")
    if spte == REMOVED:
        return Decoded(spte, level, "removed", 0, "", "")
    if not spte & MMU_PRESENT:
        kind = "mmio" if (spte & MMIO_MASK) == MMIO_VALUE else "garbage"
        return Decoded(spte, level, kind, pfn(spte), flag_string(spte), "")
    if is_last(spte, level):
        return Decoded(spte, level, "leaf", pfn(spte), flag_string(spte), LEVEL_NAMES.get(level, "?"))
    return Decoded(spte, level, "nonleaf", pfn(spte), flag_string(spte), "")


# ---------------------------------------------------------------- vectorized forms

_U = np.uint64


def present_mask(table: np.ndarray) -> np.ndarray:
    """Boolean array: which entries of a table (or tables) are present."""
    return (table & _U(MMU_PRESENT)) != 0


def leaf_mask(table: np.ndarray, level: int) -> np.ndarray:
    present = present_mask(table)
    if level == PG_LEVEL_4K:
        return present
    return present & ((table & _U(LARGE)) != 0)


def nonleaf_mask(table: np.ndarray, level: int) -> np.ndarray:
    if level == PG_LEVEL_4K:
        return np.zeros(table.shape, dtype=bool)
    return present_mask(table) & ((table & _U(LARGE)) == 0)


def removed_mask(table: np.ndarray) -> np.ndarray:
    return table == _U(REMOVED)


def pfn_array(table: np.ndarray) -> np.ndarray:
    """spte_to_pfn() over an array (meaningful where present)."""
    return (table & _U(PFN_MASK)) >> _U(PFN_SHIFT)
