"""The C atomics helper: every operation against a numpy reference, bounds, read-only views, two processes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmmmu.atomics import MASK64, Words, cpu_relax, to_signed, words_of
from shmmmu.region import Region

u64 = st.integers(min_value=0, max_value=MASK64)
N = 64
arrays = st.lists(u64, min_size=N, max_size=N).map(lambda xs: np.array(xs, dtype=np.uint64))
runs = st.tuples(st.integers(0, N), st.integers(0, N)).map(lambda t: (min(t), max(t) - min(t)))


def fresh(values: np.ndarray) -> tuple[np.ndarray, Words]:
    a = values.copy()
    return a, Words(a)


# ---------------------------------------------------------------- construction


def test_words_view_length_and_address() -> None:
    a = np.zeros(10, dtype=np.uint64)
    w = Words(a)
    assert w.n == len(w) == 10
    assert w.address == a.ctypes.data
    assert w.readonly is False


def test_words_keeps_buffer_alive() -> None:
    a = np.arange(4, dtype=np.uint64)
    w = Words(a)
    del a
    assert [w.load(i) for i in range(4)] == [0, 1, 2, 3]


def test_words_of_checks_dtype_and_layout() -> None:
    with pytest.raises(ValueError):
        words_of(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError):
        words_of(np.zeros(8, dtype=np.uint64)[::2])
    assert words_of(np.zeros(8, dtype=np.uint64)).n == 8


def test_unaligned_buffer_refused() -> None:
    raw = np.zeros(3, dtype=np.uint64)
    with pytest.raises(ValueError, match="aligned"):
        Words(memoryview(raw).cast("B")[1:17])


def test_wrong_argument_count() -> None:
    w = Words(np.zeros(2, dtype=np.uint64))
    with pytest.raises(TypeError):
        w.cas(0, 1)
    with pytest.raises(TypeError):
        w.load()
    with pytest.raises(TypeError):
        w.store(0, 1.5)


# ---------------------------------------------------------------- single-word operations


@given(arrays, st.integers(0, N - 1), u64)
def test_load_store(values: np.ndarray, i: int, v: int) -> None:
    a, w = fresh(values)
    assert w.load(i) == int(values[i])
    w.store(i, v)
    ref = values.copy()
    ref[i] = v
    np.testing.assert_array_equal(a, ref)
    assert w.load(i) == v


@given(arrays, st.integers(0, N - 1), u64, st.booleans())
def test_cas(values: np.ndarray, i: int, new: int, hit: bool) -> None:
    a, w = fresh(values)
    cur = int(values[i])
    expected = cur if hit else (cur ^ 1)
    seen = w.cas(i, expected, new)
    assert seen == cur
    ref = values.copy()
    if hit:
        ref[i] = new
    np.testing.assert_array_equal(a, ref)


@pytest.mark.parametrize("op, ref", [
    ("xchg", lambda old, v: v),
    ("fetch_add", lambda old, v: (old + v) & MASK64),
    ("fetch_or", lambda old, v: old | v),
    ("fetch_and", lambda old, v: old & v),
])
@given(values=arrays, i=st.integers(0, N - 1), v=u64)
def test_read_modify_write(op: str, ref, values: np.ndarray, i: int, v: int) -> None:
    a, w = fresh(values)
    old = getattr(w, op)(i, v)
    assert old == int(values[i])
    expect = values.copy()
    expect[i] = ref(int(values[i]), v)
    np.testing.assert_array_equal(a, expect)


def test_fetch_add_wraps_and_takes_negative_deltas() -> None:
    a, w = fresh(np.array([MASK64, 5], dtype=np.uint64))
    assert w.fetch_add(0, 1) == MASK64
    assert int(a[0]) == 0
    assert w.fetch_add(1, -7) == 5
    assert int(a[1]) == MASK64 - 1
    assert to_signed(w.load(1)) == -2
    w.store(0, -1)
    assert w.load(0) == MASK64


def test_numpy_integers_accepted() -> None:
    a, w = fresh(np.zeros(4, dtype=np.uint64))
    w.store(np.int64(2), np.uint64(MASK64))
    assert w.load(np.uint32(2)) == MASK64
    assert w.cas(np.intp(2), np.uint64(MASK64), np.uint64(3)) == MASK64
    assert int(a[2]) == 3


def test_to_signed() -> None:
    assert to_signed(0) == 0
    assert to_signed(MASK64) == -1
    assert to_signed(1 << 63) == -(1 << 63)
    assert to_signed((1 << 63) - 1) == (1 << 63) - 1


# ---------------------------------------------------------------- batch operations


@given(arrays, runs)
def test_load_range(values: np.ndarray, run: tuple[int, int]) -> None:
    s, n = run
    a, w = fresh(values)
    out = np.full(N, 0xDEAD, dtype=np.uint64)
    w.load_range(s, n, out)
    np.testing.assert_array_equal(out[:n], values[s:s + n])
    assert (out[n:] == 0xDEAD).all()
    np.testing.assert_array_equal(a, values)


@given(arrays, runs, u64)
def test_fill_range(values: np.ndarray, run: tuple[int, int], v: int) -> None:
    s, n = run
    a, w = fresh(values)
    w.fill_range(s, n, v)
    ref = values.copy()
    ref[s:s + n] = v
    np.testing.assert_array_equal(a, ref)


@given(arrays, runs, u64)
def test_xchg_range(values: np.ndarray, run: tuple[int, int], v: int) -> None:
    s, n = run
    a, w = fresh(values)
    out = np.zeros(n, dtype=np.uint64)
    w.xchg_range(s, n, v, out)
    np.testing.assert_array_equal(out, values[s:s + n])
    ref = values.copy()
    ref[s:s + n] = v
    np.testing.assert_array_equal(a, ref)


@given(arrays, runs, u64)
def test_and_range(values: np.ndarray, run: tuple[int, int], m: int) -> None:
    s, n = run
    a, w = fresh(values)
    changed = w.and_range(s, n, m)
    ref = values.copy()
    ref[s:s + n] &= np.uint64(m)
    np.testing.assert_array_equal(a, ref)
    assert changed == int((ref != values).sum())


@given(arrays, runs, u64)
def test_or_range(values: np.ndarray, run: tuple[int, int], m: int) -> None:
    s, n = run
    a, w = fresh(values)
    changed = w.or_range(s, n, m)
    ref = values.copy()
    ref[s:s + n] |= np.uint64(m)
    np.testing.assert_array_equal(a, ref)
    assert changed == int((ref != values).sum())


# Values built from a few bits so that the test mask matches often.
small_words = st.lists(st.integers(0, 15), min_size=N, max_size=N).map(lambda xs: np.array(xs, dtype=np.uint64))


@given(small_words, runs, st.integers(0, 15), st.integers(0, 15), st.integers(0, 15))
def test_clear_where(values: np.ndarray, run: tuple[int, int], tm: int, tv: int, cm: int) -> None:
    s, n = run
    a, w = fresh(values)
    out = np.full(n, 0xDEAD, dtype=np.uint64)
    changed = w.clear_where(s, n, tm, tv, cm, out)
    part = values[s:s + n]
    hit = ((part & np.uint64(tm)) == np.uint64(tv)) & ((part & np.uint64(cm)) != 0)
    ref = values.copy()
    ref[s:s + n] = np.where(hit, part & ~np.uint64(cm), part)
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(out, np.where(hit, part, np.uint64(0)))
    assert changed == int(hit.sum())


def test_clear_where_on_sptes() -> None:
    """The use it is made for: write-protect the present, writable entries of one table."""
    from shmmmu import spte
    table = np.array([0, spte.REMOVED, spte.make_leaf(5, 1, writable=True),
                      spte.make_leaf(6, 1, writable=False), spte.make_leaf(7, 1, writable=True)],
                     dtype=np.uint64)
    a, w = fresh(table)
    out = np.zeros(len(table), dtype=np.uint64)
    assert w.clear_where(0, len(a), spte.MMU_PRESENT, spte.MMU_PRESENT, spte.WRITABLE, out) == 2
    assert [spte.is_writable(int(x)) for x in a] == [False] * 5
    assert int(a[1]) == spte.REMOVED and int(a[0]) == 0
    assert [int(x) for x in out] == [0, 0, int(table[2]), 0, int(table[4])]


def test_batch_output_too_small() -> None:
    w = Words(np.zeros(8, dtype=np.uint64))
    with pytest.raises(ValueError):
        w.load_range(0, 8, np.zeros(7, dtype=np.uint64))
    with pytest.raises(ValueError):
        w.xchg_range(0, 4, 1, np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError):
        w.clear_where(0, 2, 0, 0, 1, np.zeros(1, dtype=np.uint64))


def test_wait_while() -> None:
    a, w = fresh(np.array([7, 0], dtype=np.uint64))
    assert w.wait_while(0, 3, 1_000_000) == 7      # already different: returns at once
    assert w.wait_while(0, 7, 200) == 7            # bounded: gives up after its spins
    assert w.wait_while(0, 7, 0) == 7
    cpu_relax()


# ---------------------------------------------------------------- bounds


BAD_INDICES = [-1, 8, 9, 1 << 40, 1 << 70, -(1 << 70)]


@pytest.mark.parametrize("i", BAD_INDICES)
@pytest.mark.parametrize("call", [
    lambda w, i: w.load(i),
    lambda w, i: w.store(i, 1),
    lambda w, i: w.cas(i, 0, 1),
    lambda w, i: w.xchg(i, 1),
    lambda w, i: w.fetch_add(i, 1),
    lambda w, i: w.fetch_or(i, 1),
    lambda w, i: w.fetch_and(i, 1),
    lambda w, i: w.wait_while(i, 1, 1),
])
def test_bad_index(call, i: int) -> None:
    a = np.zeros(8, dtype=np.uint64)
    with pytest.raises(IndexError):
        call(Words(a), i)
    assert not a.any()


@pytest.mark.parametrize("start, n", [(-1, 1), (0, -1), (0, 9), (8, 1), (9, 0), (4, 5), (1 << 70, 0), (2, 1 << 62)])
@pytest.mark.parametrize("call", [
    lambda w, s, n, out: w.load_range(s, n, out),
    lambda w, s, n, out: w.fill_range(s, n, 1),
    lambda w, s, n, out: w.xchg_range(s, n, 1, out),
    lambda w, s, n, out: w.and_range(s, n, 0),
    lambda w, s, n, out: w.or_range(s, n, 1),
    lambda w, s, n, out: w.clear_where(s, n, 0, 0, MASK64, out),
])
def test_bad_run(call, start: int, n: int) -> None:
    a = np.full(8, 5, dtype=np.uint64)
    out = np.zeros(16, dtype=np.uint64)
    with pytest.raises(IndexError):
        call(Words(a), start, n, out)
    assert (a == 5).all()


def test_empty_run_at_the_end_is_fine() -> None:
    a, w = fresh(np.full(8, 5, dtype=np.uint64))
    out = np.zeros(1, dtype=np.uint64)
    w.load_range(8, 0, out)
    w.fill_range(8, 0, 1)
    assert w.and_range(8, 0, 0) == 0
    assert (a == 5).all()


# ---------------------------------------------------------------- read-only views


@pytest.mark.parametrize("call", [
    lambda w: w.store(0, 1),
    lambda w: w.cas(0, 5, 1),
    lambda w: w.xchg(0, 1),
    lambda w: w.fetch_add(0, 1),
    lambda w: w.fetch_or(0, 1),
    lambda w: w.fetch_and(0, 0),
    lambda w: w.fill_range(0, 4, 1),
    lambda w: w.xchg_range(0, 4, 1, np.zeros(4, dtype=np.uint64)),
    lambda w: w.and_range(0, 4, 0),
    lambda w: w.or_range(0, 4, 1),
    lambda w: w.clear_where(0, 4, 0, 0, MASK64, np.zeros(4, dtype=np.uint64)),
])
def test_readonly_view_refuses_writes(call) -> None:
    a = np.full(4, 5, dtype=np.uint64)
    a.flags.writeable = False
    w = Words(a)
    assert w.readonly is True
    with pytest.raises(PermissionError):
        call(w)
    assert (a == 5).all()


def test_readonly_view_reads() -> None:
    w = Words(np.array([1, 2, 3], dtype=np.uint64).tobytes())     # bytes: a read-only buffer
    assert w.readonly is True
    assert w.load(2) == 3
    out = np.zeros(3, dtype=np.uint64)
    w.load_range(0, 3, out)
    assert out.tolist() == [1, 2, 3]
    assert w.wait_while(0, 1, 3) == 1


# ---------------------------------------------------------------- two processes on one word


HAMMER = textwrap.dedent("""
    import json, sys
    from shmmmu.region import Region
    name, iters = sys.argv[1], int(sys.argv[2])
    r = Region.attach(name)
    w = r.words("counters")
    load, cas, fetch_add = w.load, w.cas, w.fetch_add
    fetch_add(2, 1)                       # ready
    while load(3) == 0:                   # wait for the start signal, so both run at once
        pass
    for _ in range(iters):
        fetch_add(0, 1)
    failures = 0
    for _ in range(iters):
        old = load(1)
        while True:
            seen = cas(1, old, old + 1)
            if seen == old:
                break
            failures += 1
            old = seen
    print(json.dumps({"cas_failures": failures}))
    r.close()
""")


def test_two_processes_count_exactly(vm_name: str) -> None:
    iters, procs = 200_000, 2
    with Region.create(vm_name, {"counters": (8,)}, {"test": "hammer"}) as r:
        w = r.words("counters")
        children = [subprocess.Popen([sys.executable, "-c", HAMMER, vm_name, str(iters)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(procs)]
        try:
            deadline = time.monotonic() + 300          # a hang guard
            while w.load(2) < procs and time.monotonic() < deadline:
                if any(c.poll() is not None for c in children):
                    break
                time.sleep(0.001)
            w.store(3, 1)
            results = [c.communicate(timeout=120) for c in children]
        finally:
            for c in children:
                if c.poll() is None:
                    c.kill()
                    c.wait()
        for c, (out, err) in zip(children, results):
            assert c.returncode == 0, err
            json.loads(out)
        assert w.load(0) == procs * iters          # fetch_add
        assert w.load(1) == procs * iters          # cas loop
        del w
