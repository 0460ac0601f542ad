"""RCU: epoch-based read-side sections for processes, retire queues, and grace-period detection.

A worker's read-side section publishes the global epoch it entered in (a single
store into its slot; 0 means quiescent).  `call_rcu(table)` tags the table with
the current epoch and appends it to the worker's own retire ring (one producer,
one consumer: no lock).  The reclaimer ends a grace period by advancing the
epoch and waiting until every slot is quiescent or newer than the epoch it
advanced from; only then are the tables retired up to that epoch freed.

Ordering argument (all operations sequentially consistent): a table is retired
after it was unlinked; a reader that publishes its slot after the reclaimer
scanned it started its walk after the unlink, so it cannot reach the table.

A worker that dies inside a section would hold back reclamation forever, so the
supervisor clears its slot (`recover`).  Grace-period latency, the retire
backlog and each table's age (grace periods lived through since retirement, for
the Reader-Pipe histogram) are recorded in the region.
"""
from __future__ import annotations

from typing import Callable

from shmmmu._atomics import RcuReadFast, Words
from shmmmu.layout import Ctl, TableState, TMeta, WState
from shmmmu.region import Region
from shmmmu.wait import REAL, Waits

_LIVE, _RETIRED = TableState.LIVE, TableState.RETIRED
_EPOCH = Ctl.EPOCH


class RcuError(RuntimeError):
    pass


class Rcu(RcuReadFast):
    """One process's view of the VM's RCU state.

    The read side's fast path (read_lock, read_unlock, the `nesting` count) is the C base's
    (shmmmu/_locks.c).  Where every word operation must be seen (the explorer), the object is an
    `RcuReference`: the same steps in Python.
    """

    def __new__(cls, region: Region, worker: int, waits: Waits = REAL):
        if cls is Rcu and (waits is not REAL or type(region.words("ctl")) is not Words
                           or type(region.words("wstate")) is not Words):
            cls = RcuReference
        return super().__new__(cls)

    def __init__(self, region: Region, worker: int, waits: Waits = REAL):
        self.worker = worker
        self.waits = waits
        self.ctl = region.words("ctl")
        self.ws = region.words("wstate")
        self.tm = region.words("tmeta")
        self.ring = region.words("retire")
        self.ring_len = region.array("retire").shape[1]
        self.n_workers = region.array("wstate").shape[0]
        self.wstate = region.columns("wstate", WState)
        self.tmeta = region.columns("tmeta", TMeta)
        self.slot = self.wstate.rcu.word(worker)
        self.nesting = 0
        if self.ctl.load(Ctl.EPOCH) == 0:
            self.ctl.cas(Ctl.EPOCH, 0, 1)
        if type(self) is Rcu:
            self._bind_fast(self.ctl, _EPOCH, self.ws, self.slot)

    # ---- read side (the fast path: _locks.c, or RcuReference below)

    def _unbalanced(self) -> None:
        raise RcuError("rcu_read_unlock without rcu_read_lock")

    def in_read_section(self) -> bool:
        return self.nesting > 0

    # ---- update side

    def call_rcu(self, table: int) -> None:
        """Retire a table: it is freed after a grace period (tdp_mmu_free_sp_rcu_callback)."""
        ws, me = self.wstate, self.worker
        tail = ws.retire_tail.load(me)
        head = ws.retire_head.load(me)
        if tail - head >= self.ring_len:
            raise RcuError(f"worker {self.worker}'s retire ring is full ({self.ring_len} tables)")
        self.tmeta.retire_epoch.store(table, self.ctl.load(Ctl.EPOCH))
        self.tmeta.state.store(table, _RETIRED)
        self.ring.store(self._ring_word(me, tail), table)
        ws.retire_tail.store(me, tail + 1)

    def _ring_word(self, worker: int, position: int) -> int:
        """The word of `worker`'s retire ring (its row of the retire section) that holds entry `position`."""
        return worker * self.ring_len + position % self.ring_len

    def backlog(self) -> int:
        n = 0
        ws = self.wstate
        for k in range(self.n_workers):
            n += ws.retire_tail.load(k) - ws.retire_head.load(k)
        return n

    def wait_for_readers(self, epoch: int, timeout: float | None = None,
                         alive: Callable[[], bool] | None = None) -> bool:
        """Wait until every slot is quiescent or entered after `epoch` (advanced past already)."""
        waits = self.waits
        t_end = None if timeout is None else waits.now() + timeout
        rcu, n = self.wstate.rcu, self.n_workers
        for k in range(n):
            if k == self.worker:
                continue
            spins = 0
            while True:
                v = rcu.load(k)
                if v == 0 or v > epoch:
                    break
                spins += 1
                if spins < 32:
                    waits.relax()
                    continue
                if t_end is not None and waits.now() > t_end:
                    return False
                if alive is not None and not alive():
                    return False
                waits.pause(0.00002 if spins < 256 else 0.0005)
        return True

    def synchronize(self, timeout: float | None = None) -> bool:
        """synchronize_rcu(): returns once every read section that began before the call has ended."""
        if self.nesting:
            raise RcuError("synchronize_rcu inside a read-side section would wait for itself")
        t0 = self.waits.now_ns()
        epoch = self.ctl.fetch_add(Ctl.EPOCH, 1)
        ok = self.wait_for_readers(epoch, timeout)
        if ok:
            self._gp_done(self.waits.now_ns() - t0)
        return ok

    def _gp_done(self, ns: int) -> None:
        self.ctl.fetch_add(Ctl.GP_COUNT, 1)
        self.ctl.fetch_add(Ctl.GP_TOTAL_NS, ns)
        while True:
            cur = self.ctl.load(Ctl.GP_MAX_NS)
            if ns <= cur or self.ctl.cas(Ctl.GP_MAX_NS, cur, ns) == cur:
                break

    def reclaim_pass(self, free: Callable[[list[int]], None], timeout: float | None = None,
                     alive: Callable[[], bool] | None = None, wait_for_gp: bool = True) -> int:
        """The reclaimer's step: one grace period, then free every table retired before it.

        `wait_for_gp=False` is bug K7: free without waiting for readers.
        Returns the number of tables freed.
        """
        pending = self.backlog()
        if pending == 0:
            return 0
        while True:
            cur = self.ctl.load(Ctl.RCU_BACKLOG_MAX)
            if pending <= cur or self.ctl.cas(Ctl.RCU_BACKLOG_MAX, cur, pending) == cur:
                break
        t0 = self.waits.now_ns()
        epoch = self.ctl.fetch_add(Ctl.EPOCH, 1)
        if wait_for_gp:
            if not self.wait_for_readers(epoch, timeout, alive):
                return 0
        self._gp_done(self.waits.now_ns() - t0)
        n = 0
        ws, retire_epoch = self.wstate, self.tmeta.retire_epoch
        for k in range(self.n_workers):
            head = ws.retire_head.load(k)
            tail = ws.retire_tail.load(k)
            batch: list[int] = []
            while head < tail:
                table = self.ring.load(self._ring_word(k, head))
                if retire_epoch.load(table) > epoch:
                    break
                batch.append(table)
                head += 1
            if batch:
                # freed before they leave the ring: a retired table is always on a ring or free, never
                # between (a crash recovery re-queues a retired table it finds on no ring)
                free(batch)
                ws.retire_head.store(k, head)
                n += len(batch)
        return n

    def recover(self, dead: int) -> list[str]:
        """Clear a dead worker's read-side slot so grace periods can end."""
        if self.wstate.rcu.load(dead):
            self.wstate.rcu.store(dead, 0)
            return [f"rcu: cleared the read-side section of dead worker {dead}"]
        return []

    def stats(self) -> dict[str, int]:
        return {"epoch": self.ctl.load(Ctl.EPOCH), "grace_periods": self.ctl.load(Ctl.GP_COUNT),
                "gp_max_ns": self.ctl.load(Ctl.GP_MAX_NS), "gp_total_ns": self.ctl.load(Ctl.GP_TOTAL_NS),
                "backlog": self.backlog(), "backlog_max": self.ctl.load(Ctl.RCU_BACKLOG_MAX)}


def pipe_age(state: int, retire_epoch: int, reader_epoch: int, now_epoch: int) -> int:
    """The Reader-Pipe age of a table as one reader saw it (rcutorture's rtort_pipe_count).

    0: live.  1: retired while this reader could still hold it (retired at or after
    the epoch the reader entered in).  2 and more: the table was retired before the
    reader entered, or already freed: a use after free, one bucket per epoch since.
    """
    if state == _LIVE:
        return 0
    if state == _RETIRED:
        return 1 + max(0, reader_epoch - retire_epoch)
    return max(2, 1 + now_epoch - retire_epoch)


class RcuReference(Rcu):
    """The read side in Python, step for step that of _locks.c: every word operation is a call the
    explorer can schedule; tests/unit/test_rcu.py holds the two equal."""

    def read_lock(self) -> None:
        """rcu_read_lock(): one load and one store at the outermost level."""
        n = self.nesting
        if not n:
            self.ws.store(self.slot, self.ctl.load(_EPOCH))
        self.nesting = n + 1

    def read_unlock(self) -> None:
        """rcu_read_unlock()."""
        n = self.nesting - 1
        self.nesting = n
        if not n:
            self.ws.store(self.slot, 0)
        elif n < 0:
            self._unbalanced()
