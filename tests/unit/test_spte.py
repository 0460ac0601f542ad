"""SPTE bits (5.13 EPT layout), constructors, predicates, geometry and vectorized masks.

Raw values marked "KVM_TDP_MMU.md 1.6" are copied from that table, not computed
by the code under test; those marked "5.13 form" are the table's 5.12 examples
with the host/MMU-writable bits moved to 57/58 and MMU-present (bit 11) added,
worked out by hand as the document's 1.3 describes.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmmmu import spte as S
from shmmmu.spte import Geometry

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
pfns = st.integers(min_value=0, max_value=(1 << 40) - 1)
levels = st.integers(min_value=1, max_value=4)


# ---------------------------------------------------------------- bit layout


def test_bit_positions() -> None:
    assert S.MMU_PRESENT == 1 << 11
    assert S.HOST_WRITABLE == 1 << 57
    assert S.MMU_WRITABLE == 1 << 58
    assert S.REMOVED == 0x5A0
    assert S.PFN_MASK == 0x000FFFFFFFFFF000
    assert (S.READABLE, S.WRITABLE, S.EXECUTABLE) == (1, 2, 4)
    assert (S.IPAT, S.LARGE, S.ACCESSED, S.DIRTY) == (0x40, 0x80, 0x100, 0x200)
    assert S.MEMTYPE_MASK == 0x38 and S.MT_WB << S.MT_SHIFT == 0x30


# ---------------------------------------------------------------- worked examples (KVM_TDP_MMU.md 1.6)


def test_worked_example_4k_writable_leaf() -> None:
    raw = 0x06000000ABCDEB77                     # KVM_TDP_MMU.md 1.6 [5.13+]
    assert S.make_leaf(0xABCDE, S.PG_LEVEL_4K, writable=True) == raw
    d = S.decode(raw, 1)
    assert (d.kind, d.pfn, d.size) == ("leaf", 0xABCDE, "4K")
    assert d.flags.split() == ["R", "W", "X", "WB", "IPAT", "A", "D", "MMUW", "HOSTW"]
    assert S.is_present(raw) and S.is_leaf(raw, 1) and not S.is_nonleaf(raw, 1)
    assert S.is_writable(raw) and S.is_mmu_writable(raw) and S.is_dirty(raw) and S.is_accessed(raw)
    assert S.is_executable(raw) and not S.is_large(raw)
    assert raw & (1 << 10) == 0                  # bit 10 is no longer host-writable in 5.13
    assert S.child_table(raw, 1) is None


def test_worked_example_removed() -> None:
    raw = 0x00000000000005A0                     # KVM_TDP_MMU.md 1.6 [5.13-6.9]
    assert S.is_removed(raw)
    assert not S.is_present(raw)
    assert S.decode(raw, 3).kind == "removed"
    assert raw & S.RWX == 0                      # hardware-non-present
    assert not S.is_removed(raw | S.MMU_PRESENT)  # a value, not a flag


@pytest.mark.parametrize("level", [2, 3, 4])
def test_worked_example_nonleaf(level: int) -> None:
    raw = 0x0000000012345907                     # 1.6's 0x...12345107 plus MMU_PRESENT (bit 11), 1.5 [5.13+]
    assert S.make_nonleaf(0x12345) == raw
    assert S.is_nonleaf(raw, level) and not S.is_leaf(raw, level)
    assert S.child_table(raw, level) == 0x12345
    d = S.decode(raw, level)
    assert (d.kind, d.pfn) == ("nonleaf", 0x12345)
    assert "table #74565" in str(d)


def test_worked_example_mmio() -> None:
    raw = 0x00300000FEE00006                     # KVM_TDP_MMU.md 1.6: RWX=110
    assert not S.is_present(raw)
    d = S.decode(raw, 1)
    assert d.kind == "mmio"
    assert d.pfn == 0xFEE00
    assert S.decode(0xFEE00006, 2).kind == "mmio"          # the 5.13 test is RWX == 110 alone


def test_worked_example_zero() -> None:
    assert S.decode(0, 4).kind == "none"
    assert not S.is_present(0) and not S.is_removed(0)


@pytest.mark.parametrize("raw, level, expect", [
    # 5.13 forms of the 1.6 examples: HostW 1<<57, MMUW 1<<58, present 1<<11, no bit 10.
    (0x06000000ABCDEB75, 1, dict(writable=False, mmu_writable=True, dirty=True)),     # dirty-log write-protected
    (0x06000000ABCDE977, 1, dict(writable=True, mmu_writable=True, dirty=False)),     # D cleared
    (0x02000000ABCDEB75, 1, dict(writable=False, mmu_writable=False, dirty=True)),    # shadow write-tracked
    (0x00000000ABCDE975, 1, dict(writable=False, mmu_writable=False, dirty=False)),   # host read-only page
    (0x0600000040000BF7, 2, dict(writable=True, mmu_writable=True, dirty=True)),      # 2M leaf
    (0x0600000040000BF3, 2, dict(writable=True, mmu_writable=True, dirty=True)),      # 2M leaf, NX huge page
])
def test_worked_examples_513_forms(raw: int, level: int, expect: dict[str, bool]) -> None:
    assert S.is_leaf(raw, level) and S.is_present(raw)
    assert S.is_writable(raw) == expect["writable"]
    assert S.is_mmu_writable(raw) == expect["mmu_writable"]
    assert S.is_dirty(raw) == expect["dirty"]
    assert S.decode(raw, level).kind == "leaf"


def test_constructors_give_the_513_forms() -> None:
    assert S.write_protect(0x06000000ABCDEB77) == 0x06000000ABCDEB75
    assert S.make_leaf(0xABCDE, 1, writable=False) == 0x06000000ABCDE975
    assert S.make_writable(0x06000000ABCDE975) == 0x06000000ABCDEB77
    assert S.make_leaf(0x40000, 2, writable=True) == 0x0600000040000BF7
    assert S.make_leaf(0x40000, 2, writable=True, exec_ok=False) == 0x0600000040000BF3
    assert S.make_leaf(0x40000, 3, writable=True) == 0x0600000040000BF7
    assert S.make_leaf(1, 1, writable=False, accessed=False) == 0x0600000000001875
    assert S.decode(0x0600000040000BF7, 2).size == "2M"
    assert S.decode(0x0600000040000BF7, 3).size == "1G"


# ---------------------------------------------------------------- round trips and predicates


@given(pfns, st.integers(1, 3), st.booleans(), st.booleans(), st.booleans())
def test_leaf_round_trip(pfn: int, level: int, writable: bool, accessed: bool, exec_ok: bool) -> None:
    raw = S.make_leaf(pfn, level, writable=writable, accessed=accessed, exec_ok=exec_ok)
    assert S.pfn(raw) == pfn
    assert S.is_present(raw) and S.is_leaf(raw, level) and S.is_last(raw, level)
    assert not S.is_nonleaf(raw, level) and not S.is_removed(raw)
    assert S.is_large(raw) == (level > 1)
    assert S.is_writable(raw) == writable
    assert S.is_dirty(raw) == writable            # KVM pre-dirties writable mappings
    assert S.is_accessed(raw) == accessed
    assert S.is_executable(raw) == exec_ok
    assert S.is_mmu_writable(raw) and raw & S.HOST_WRITABLE
    assert S.child_table(raw, level) is None
    d = S.decode(raw, level)
    assert d.kind == "leaf" and d.pfn == pfn and d.raw == raw and d.level == level
    assert d.size == S.LEVEL_NAMES[level]
    assert ("W" in d.flags.split()) == writable
    assert f"{raw:#018x}" in str(d)
    # write-protect and make-writable undo each other on a writable leaf
    wp = S.write_protect(raw)
    assert not S.is_writable(wp) and S.is_mmu_writable(wp) and S.pfn(wp) == pfn
    if writable:
        assert S.make_writable(wp) == raw | S.ACCESSED


@given(pfns, st.integers(2, 4))
def test_nonleaf_round_trip(child: int, level: int) -> None:
    raw = S.make_nonleaf(child)
    assert S.pfn(raw) == child and S.child_table(raw, level) == child
    assert S.is_nonleaf(raw, level) and not S.is_leaf(raw, level) and not S.is_last(raw, level)
    d = S.decode(raw, level)
    assert d.kind == "nonleaf" and d.pfn == child


def test_nonleaf_bits_at_level_1_read_as_a_leaf() -> None:
    raw = S.make_nonleaf(9)
    assert S.is_last(raw, 1) and S.is_leaf(raw, 1) and not S.is_nonleaf(raw, 1)
    assert S.child_table(raw, 1) is None


@given(u64, levels)
def test_predicates_agree(raw: int, level: int) -> None:
    present = bool(raw & (1 << 11))
    last = level == 1 or bool(raw & 0x80)
    assert S.is_present(raw) == present
    assert S.is_leaf(raw, level) == (present and last)
    assert S.is_nonleaf(raw, level) == (present and not last)
    assert S.is_removed(raw) == (raw == 0x5A0)
    assert S.pfn(raw) == (raw >> 12) & ((1 << 40) - 1)
    assert (S.child_table(raw, level) is not None) == S.is_nonleaf(raw, level)
    kind = S.decode(raw, level).kind
    if raw == 0:
        assert kind == "none"
    elif raw == 0x5A0:
        assert kind == "removed"
    elif not present:
        assert kind == ("mmio" if raw & 7 == 6 else "garbage")
    else:
        assert kind == ("leaf" if last else "nonleaf")


def test_flag_string_names_memory_type() -> None:
    raw = S.make_leaf(1, 1, writable=True) & ~S.MEMTYPE_MASK
    assert "MT0" in S.flag_string(raw).split()
    assert "WB" not in S.flag_string(raw).split()
    assert "PS" in S.flag_string(S.make_leaf(1, 2, writable=True)).split()


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("bits", [9, 3])
def test_geometry_basics(bits: int) -> None:
    g = Geometry(bits=bits)
    assert g.entries == 2 ** bits
    assert [g.pages(lv) for lv in (1, 2, 3, 4)] == [1, 2 ** bits, 2 ** (2 * bits), 2 ** (3 * bits)]
    assert [g.shift(lv) for lv in (1, 2, 3, 4)] == [0, bits, 2 * bits, 3 * bits]
    assert g.max_gfn == 2 ** (4 * bits)


def test_geometry_real_numbers() -> None:
    g = S.DEFAULT_GEOMETRY
    assert g.bits == 9 and g.entries == 512 and g.root_level == 4
    assert [g.pages(lv) for lv in (1, 2, 3, 4)] == [1, 512, 262144, 1 << 27]
    gfn = 0x123456789                            # (gfn >> 9*(L-1)) & 511, by hand
    assert [g.index(gfn, lv) for lv in (1, 2, 3, 4)] == [0x189, 0xB3, 0xD1, 0x24]
    assert g.round(gfn, 2) == 0x123456600
    assert g.round(gfn, 3) == 0x123440000
    assert g.round(gfn, 4) == 0x120000000
    assert g.round(gfn, 1) == gfn


def test_geometry_small_numbers() -> None:
    g = Geometry(bits=3)
    gfn = 0b101_110_011_010                      # indices 5, 6, 3, 2 from level 4 down
    assert [g.index(gfn, lv) for lv in (4, 3, 2, 1)] == [5, 6, 3, 2]
    assert g.round(gfn, 2) == 0b101_110_011_000
    assert g.round(gfn, 3) == 0b101_110_000_000
    assert g.pages(2) == 8 and g.max_gfn == 4096


@pytest.mark.parametrize("bits", [9, 3])
@given(data=st.data())
def test_geometry_indices_rebuild_the_gfn(bits: int, data: st.DataObject) -> None:
    g = Geometry(bits=bits)
    gfn = data.draw(st.integers(0, g.max_gfn - 1))
    level = data.draw(st.integers(1, 4))
    rebuilt = sum(g.index(gfn, lv) << g.shift(lv) for lv in range(1, 5))
    assert rebuilt == gfn
    base = g.round(gfn, level)
    assert base % g.pages(level) == 0 and base <= gfn < base + g.pages(level)
    assert all(g.index(base, lv) == g.index(gfn, lv) for lv in range(level, 5))
    assert all(g.index(base, lv) == 0 for lv in range(1, level))


# ---------------------------------------------------------------- vectorized forms


def _interesting_table(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random words mixed with the special values, so every kind of entry appears."""
    t = rng.integers(0, 1 << 64, size=n, dtype=np.uint64, endpoint=False)
    specials = np.array([0, S.REMOVED, S.make_nonleaf(3), S.make_leaf(7, 1, writable=True),
                         S.make_leaf(512, 2, writable=False), 0xFEE00006], dtype=np.uint64)
    pick = rng.integers(0, 2 * len(specials), size=n)
    return np.where(pick < len(specials), specials[np.minimum(pick, len(specials) - 1)], t)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_vector_masks_match_scalar_predicates(seed: int, level: int) -> None:
    rng = np.random.default_rng(seed)
    table = _interesting_table(rng, 512)
    vals = [int(x) for x in table]
    np.testing.assert_array_equal(S.present_mask(table), [S.is_present(v) for v in vals])
    np.testing.assert_array_equal(S.leaf_mask(table, level), [S.is_leaf(v, level) for v in vals])
    np.testing.assert_array_equal(S.nonleaf_mask(table, level), [S.is_nonleaf(v, level) for v in vals])
    np.testing.assert_array_equal(S.removed_mask(table), [S.is_removed(v) for v in vals])
    np.testing.assert_array_equal(S.pfn_array(table), np.array([S.pfn(v) for v in vals], dtype=np.uint64))
    assert S.removed_mask(table).any() and S.present_mask(table).any()


def test_vector_masks_on_2d_tables() -> None:
    tables = _interesting_table(np.random.default_rng(99), 4 * 512).reshape(4, 512)
    assert S.present_mask(tables).shape == (4, 512)
    assert S.nonleaf_mask(tables, 1).shape == (4, 512) and not S.nonleaf_mask(tables, 1).any()
    np.testing.assert_array_equal(S.leaf_mask(tables, 2)[1], S.leaf_mask(tables[1], 2))
