"""Points: the explorer's face of a region: every word operation a scheduling point, every wait the scheduler's.

The region's Words are wrapped (Region.wrap_words) in `PointWords`: each
operation first calls Scheduler.point, where the strategy may hand the
processor to another actor, and is noted for the reduction and the spinners'
wake-up.  Batch operations over a table are split into one point per entry,
as the kernel does them entry by entry; a bulk access made through numpy
(Words.touch) is one point.  `ExploreWaits` binds shmmmu.wait's names to the
scheduler: a spin blocks the actor until a word it read changes, a semaphore
is a counter of the scheduler's own, the clock counts steps.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from shmmmu.explore.sched import ADD, AND, CAS, LOAD, OR, STORE, TOUCH, XCHG, Abort, Scheduler, SectionKeys
from shmmmu.wait import Waits


class PointWords:
    """A `Words` view whose every operation is a scheduling point (and a traced step)."""

    __slots__ = ("_w", "_sec", "_s", "n", "readonly", "address", "_decide", "_base", "_load", "_store", "_cas",
                 "_xchg", "_add", "_or", "_and")

    def __init__(self, section: str, words, sched_ref: "SchedRef", decide: bool = True):
        """`decide=False`: the debug checkers' own records (what the guest touched, the zap ledger): noted,
        so that the reduction sees them, but never a place to switch actors."""
        self._w = words
        self._sec = section
        self._s = sched_ref
        self._decide = decide
        self._base = sched_ref.keys.base(section)    # word i's key is _base + i (sched.SectionKeys)
        # the C operations, bound once: each operation below is one Python call and the scheduler's point
        self._load, self._store, self._cas, self._xchg = words.load, words.store, words.cas, words.xchg
        self._add, self._or, self._and = words.fetch_add, words.fetch_or, words.fetch_and
        self.n = words.n
        self.readonly = words.readonly
        self.address = words.address

    def __len__(self) -> int:
        return self.n

    def touch(self, start: int, n: int, write: bool) -> None:
        self._w.touch(start, n, write)
        s = self._s.sched
        if s is not None and s.on and n > 0:
            s.touch(self._sec, start, n, write)
            if s.trace:
                s.record(TOUCH, self._sec, start, (n, write), None, 0)

    def _other(self, op: int, i: int, write: bool, fn, *args):
        """An operation with a scheduler in place that is not running an execution fast: between its start and
        its run (straight through), or in a traced or covered execution (the full point, the step recorded)."""
        s = self._s.sched
        if not s.on:
            return fn(i, *args)
        s.point(self._sec, i, write, self._decide)
        before = self._load(i) if s.trace else 0
        r = fn(i, *args)
        if write and (op != CAS or r == args[0]):
            s.wrote(self._sec, i)
        if s.trace:
            s.record(op, self._sec, i, args, r, before)
        return r

    # each operation: in an execution the point (the C base notes one that decides nothing, SchedCore._note;
    # else Scheduler._point, where the strategy may hand the processor to another actor), the operation, and
    # a write noted for the spinners' wake-up; outside an execution straight through

    def load(self, i: int) -> int:
        ref = self._s
        s = ref.fast
        if s is not None:
            key = self._base + i
            if s._note(key, False):
                s._point(self._sec, key, i, False, self._decide)
            return self._load(i)
        if ref.sched is None:
            return self._load(i)
        return self._other(LOAD, i, False, self._load)

    def store(self, i: int, value: int) -> None:
        ref = self._s
        s = ref.fast
        if s is not None:
            key = self._base + i
            if s._note(key, True):
                s._point(self._sec, key, i, True, self._decide)
            self._store(i, value)
            s._wrote(key)
            return None
        if ref.sched is None:
            return self._store(i, value)
        return self._other(STORE, i, True, self._store, value)

    def cas(self, i: int, expected: int, new: int) -> int:
        ref = self._s
        s = ref.fast
        if s is not None:
            key = self._base + i
            if s._note(key, True):
                s._point(self._sec, key, i, True, self._decide)
            r = self._cas(i, expected, new)
            if r == expected:
                s._wrote(key)
            return r
        if ref.sched is None:
            return self._cas(i, expected, new)
        return self._other(CAS, i, True, self._cas, expected, new)

    def _rmw(self, op: int, fn, i: int, arg: int) -> int:
        ref = self._s
        s = ref.fast
        if s is not None:
            key = self._base + i
            if s._note(key, True):
                s._point(self._sec, key, i, True, self._decide)
            r = fn(i, arg)
            s._wrote(key)
            return r
        if ref.sched is None:
            return fn(i, arg)
        return self._other(op, i, True, fn, arg)

    def xchg(self, i: int, value: int) -> int:
        return self._rmw(XCHG, self._xchg, i, value)

    def fetch_add(self, i: int, delta: int) -> int:
        return self._rmw(ADD, self._add, i, delta)

    def fetch_or(self, i: int, mask: int) -> int:
        return self._rmw(OR, self._or, i, mask)

    def fetch_and(self, i: int, mask: int) -> int:
        return self._rmw(AND, self._and, i, mask)

    # batch forms: one point per entry, as the kernel does them entry by entry

    def load_range(self, start: int, n: int, out: np.ndarray) -> None:
        for k in range(n):
            out[k] = self.load(start + k)

    def fill_range(self, start: int, n: int, value: int) -> None:
        for k in range(n):
            self.store(start + k, value)

    def xchg_range(self, start: int, n: int, value: int, out: np.ndarray) -> None:
        for k in range(n):
            out[k] = self.xchg(start + k, value)

    def and_range(self, start: int, n: int, mask: int) -> int:
        return sum(1 for k in range(n) if self.fetch_and(start + k, mask) & ~mask & ((1 << 64) - 1))

    def or_range(self, start: int, n: int, mask: int) -> int:
        return sum(1 for k in range(n) if ~self.fetch_or(start + k, mask) & mask)

    def clear_where(self, start: int, n: int, test_mask: int, test_value: int, clear_mask: int,
                    out: np.ndarray) -> int:
        changed = 0
        for k in range(n):
            out[k] = 0
            old = self.load(start + k)
            while (old & test_mask) == test_value and old & clear_mask:
                seen = self.cas(start + k, old, old & ~clear_mask & ((1 << 64) - 1))
                if seen == old:
                    out[k] = old
                    changed += 1
                    break
                old = seen
        return changed

    def wait_while(self, i: int, value: int, spins: int) -> int:
        return self.load(i)

    def column(self, width: int, field: int) -> "PointColumn":
        return PointColumn(self, width, field)


class PointColumn:
    """A column of a PointWords section (Words.column's face): row -> word row * width + field, each
    operation the section's own scheduling point."""

    __slots__ = ("_p", "width", "field", "rows")

    def __init__(self, words: PointWords, width: int, field: int):
        self._p = words
        self.width = width
        self.field = field
        self.rows = words.n // width

    def _word(self, row: int) -> int:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range [0, {self.rows})")
        return row * self.width + self.field

    def word(self, row: int) -> int:
        return self._word(row)

    # load and store, the columns' hot operations, are PointWords' written out (one call fewer each)

    def load(self, row: int) -> int:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range [0, {self.rows})")
        p = self._p
        i = row * self.width + self.field
        s = p._s.fast
        if s is None:
            return p.load(i)
        key = p._base + i
        if s._note(key, False):
            s._point(p._sec, key, i, False, p._decide)
        return p._load(i)

    def store(self, row: int, value: int) -> None:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range [0, {self.rows})")
        p = self._p
        i = row * self.width + self.field
        s = p._s.fast
        if s is None:
            return p.store(i, value)
        key = p._base + i
        if s._note(key, True):
            s._point(p._sec, key, i, True, p._decide)
        p._store(i, value)
        s._wrote(key)
        return None

    def cas(self, row: int, expected: int, new: int) -> int:
        return self._p.cas(self._word(row), expected, new)

    def xchg(self, row: int, value: int) -> int:
        return self._p.xchg(self._word(row), value)

    def fetch_add(self, row: int, delta: int) -> int:
        return self._p.fetch_add(self._word(row), delta)

    def fetch_or(self, row: int, mask: int) -> int:
        return self._p.fetch_or(self._word(row), mask)

    def fetch_and(self, row: int, mask: int) -> int:
        return self._p.fetch_and(self._word(row), mask)


class SchedRef:
    """The scheduler the region's PointWords consult (None between executions: every operation passes through),
    the same scheduler as `fast` while it runs an execution neither traced nor covered (Scheduler._point's
    path), and the explorer's section numbers (the words' keys)."""

    __slots__ = ("sched", "fast", "keys")

    def __init__(self) -> None:
        self.sched: Scheduler | None = None
        self.fast: Scheduler | None = None
        self.keys = SectionKeys()


class ExploreWaits(Waits):
    """shmmmu.wait's names bound to the scheduler; outside an execution they do nothing and never sleep."""

    __slots__ = ("ref",)

    def __init__(self, ref: SchedRef):
        self.ref = ref

    def _sched(self) -> Scheduler | None:
        s = self.ref.sched
        if s is not None and s.aborting:
            raise Abort
        return s if s is not None and s.on else None

    def relax(self) -> None:
        s = self._sched()
        if s is not None:
            s.spin()

    def yield_cpu(self) -> None:
        s = self._sched()
        if s is not None:
            s.spin(backoff=True)

    def pause(self, seconds: float) -> None:
        self.yield_cpu()

    def sem_acquire(self, sem, timeout: float | None) -> bool:
        s = self._sched()
        if s is None:
            return True
        return s.sem_acquire(sem.name, timeout is not None)

    def sem_release(self, sem) -> None:
        s = self._sched()
        if s is not None:
            s.sem_release(sem.name)

    def wait_while(self, words: Any, i: int, value: int, spins: int) -> int:
        v = words.load(i)
        if v == value:
            self.relax()
        return v

    def spins(self, n: int) -> int:
        return 1

    def spin_ns(self, ns: int) -> int:
        return 0

    def now(self) -> float:
        s = self.ref.sched
        return s.steps * 1e-6 if s is not None else 0.0

    def now_ns(self) -> int:
        s = self.ref.sched
        return s.steps * 1000 if s is not None else 0

    @property
    def deterministic(self) -> bool:
        return True
