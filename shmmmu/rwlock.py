"""RWLock: the MMU reader/writer lock for processes, shaped like the kernel's qrwlock, sleeping on POSIX semaphores.

Word layout of a lock block (layout.Lock, one block per lock in the region's `locks` section):

  CNTS     qrwlock's counter: writer byte (0xff = write-locked), WAITING (0x100: a
           writer waits for readers to drain), readers counted in units of 0x200.
  WAIT     the wait-queue mutex (0 free, 1 held, 2 held with sleepers).  Every
           slow path goes through it, so "someone holds WAIT" is exactly the
           kernel's queued_rwlock_is_contended(): `needbreak()`.
  owners   which worker holds WAIT / the write side; how many sleep on each gate.

Fast paths are one atomic operation (a reader's fetch_add, a writer's cas).  A
reader that finds a writer (or a waiting writer) backs out and queues on WAIT,
so a waiting writer blocks new readers: writers are not starved (qrwlock
fairness).  Waits spin while a sleep would cost more (a semaphore round trip
between processes costs about 57 µs here, a spin on a shared word about 1 µs),
then sleep on a semaphore: never an unbounded spin.

Each process keeps a record of what it holds, for `assert_held` (the kernel's
lockdep_assert_held_read/write), and publishes it in its worker row so a dead
holder can be found (`held_by`) and released (`recover`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import posix_ipc

from shmmmu._atomics import QrwlockFast, Words
from shmmmu.layout import Held, Lock, Locks, WState
from shmmmu.region import Region
from shmmmu.wait import REAL, Waits

# CNTS bits (include/asm-generic/qrwlock_types.h)
QW_LOCKED = 0xFF
QW_WAITING = 0x100
QW_WMASK = 0x1FF
QR_BIAS = 0x200
_NEG_BIAS = (1 << 64) - QR_BIAS
_U64 = (1 << 64) - 1
_NEG_LOCKED = (1 << 64) - QW_LOCKED

HELD_NONE, HELD_READ, HELD_WRITE = Held.NONE, Held.READ, Held.WRITE
SPIN = 48                # loads before sleeping
# ... and beyond them, a spin goes on while it is younger than a sleep and wake-up costs (a semaphore round trip
# between processes: about 57 µs here).  A holder that runs hands over within a spin (a fault holds the lock a
# few µs), as the kernel's spinning mmu_lock does; one that does not run (preempted, more processes than cores)
# costs the waiter at most twice what sleeping at once would have: the classic competitive bound.  That part
# of the spin yields the CPU at each turn (sched_yield returns at once when nothing else is runnable), so a
# holder preempted on the waiter's own CPU gets it back instead of waiting out the spin.
SPIN_NS = 50_000
SLEEP_TIMEOUT = 0.2      # a sleeper re-checks this often (a dead holder, a lost wake-up)


class LockError(AssertionError):
    """A lock was used against its rules (not held, held in the wrong mode): a bug."""


@dataclass
class LockStats:
    """Contention counted by this process (lock_stat style; acquisitions are the lock's read_acquired and
    write_acquired)."""

    contended: int = 0
    wait_ns: int = 0
    wait_max_ns: int = 0
    needbreak_seen: int = 0
    yields: int = 0


class _WaitQueue:
    """A sleeping mutex on one word (Drepper's three-state mutex with a semaphore for the futex)."""

    def __init__(self, words, word: int, owner: int, sem: posix_ipc.Semaphore, me: int, waits: Waits):
        self.w = words
        self.word = word                 # the lock block's WAIT word
        self.owner = owner               # ... and its WAIT_OWNER
        self.sem = sem
        self.me = me + 1
        self.waits = waits

    def acquire(self) -> None:
        w, word = self.w, self.word
        if w.cas(word, 0, 1) != 0:
            waits = self.waits
            relax = waits.relax
            turns, budget = waits.spins(SPIN), waits.spin_ns(SPIN_NS)
            t0 = waits.now_ns() if budget else 0
            k = 0
            while k < turns or (budget and waits.now_ns() - t0 < budget):
                k += 1
                if w.load(word) == 0 and w.cas(word, 0, 1) == 0:
                    break
                relax() if k < turns else waits.yield_cpu()
            else:
                while w.xchg(word, 2) != 0:
                    waits.sem_acquire(self.sem, SLEEP_TIMEOUT)
        w.store(self.owner, self.me)

    def release(self) -> None:
        w = self.w
        w.store(self.owner, 0)
        if w.xchg(self.word, 0) == 2:
            self.waits.sem_release(self.sem)

    def held(self) -> bool:
        return self.w.load(self.word) != 0


class RWLock(QrwlockFast):
    """One process's handle on a reader/writer lock that lives in a region.

    `worker` is this process's worker slot (for holder records).  `busted=True`
    gives locktorture's lock_busted: a writer that does not wait for readers,
    the negative control the torture test must catch.

    The four fast paths (read_lock, read_unlock, write_lock, write_unlock) are
    the C base's (shmmmu/_locks.c); they call back here on contention.  Where
    every word operation must be seen (the explorer's waits or words) or the
    lock is busted, the object is an `RWLockReference`: the same steps in Python.
    """

    def __new__(cls, region: Region, index: int, worker: int, *, busted: bool = False, waits: Waits = REAL):
        if cls is RWLock and (busted or waits is not REAL or type(region.words("locks")) is not Words
                              or type(region.words("wstate")) is not Words):
            cls = RWLockReference
        return super().__new__(cls)

    def __init__(self, region: Region, index: int, worker: int, *, busted: bool = False, waits: Waits = REAL):
        self.name = Locks.NAMES[index]
        self.waits = waits
        self.index = index
        self.worker = worker
        self.busted = busted
        self.w = region.words("locks")
        self._words_of(region, index)
        self.ws = region.words("wstate")
        self.held = self.ws.column(WState.WORDS, WState.HELD + index)   # each worker's hold of this lock
        self.pid = region.columns("wstate", WState).pid
        self.held_word = self.held.word(worker)
        self.n_workers = region.array("wstate").shape[0]
        self.sem_r = region.semaphore(f"{self.name}.r")
        self.sem_w = region.semaphore(f"{self.name}.w")
        self.queue = _WaitQueue(self.w, self.wait, self.wait_owner, region.semaphore(f"{self.name}.q"), worker,
                                waits)
        self.mode = HELD_NONE            # this process's record, for assert_held
        self.abandoned = HELD_NONE       # a re-acquisition given up (see reacquire): its unlock is owed
        self.stats = LockStats()
        # called each time a sleeper's wait times out (every SLEEP_TIMEOUT s): a supervisor
        # checks its workers' health there and may raise to abandon the wait
        self.on_sleep: Callable[[], None] | None = None
        self.wait_started = 0.0          # waits.now() when the current slow-path wait began
        if type(self) is RWLock:
            self._bind_fast(self.w, self.ws, self.held_word, worker, self.cnts, self.writer, self.rsleep,
                            self.wsleep)

    # ---- read side (the fast paths: _locks.c, or RWLockReference below)

    def _read_contended(self, backed_out: int) -> None:
        """queued_read_lock() after its fetch_add found a writer and the fast path backed out (`backed_out`: the
        count after it): queue, take the lock."""
        # if a writer is waiting for readers to drain, our bias may have been what it saw last before sleeping
        if backed_out == QW_WAITING:
            if self.w.load(self.wsleep):
                self.waits.sem_release(self.sem_w)
        self._read_slowpath()
        self.mode = HELD_READ
        self.ws.store(self.held_word, HELD_READ)
        self.read_acquired += 1

    def _read_slowpath(self) -> None:
        """queued_read_lock_slowpath(): queue behind earlier waiters, then wait out the writer."""
        w, cnts = self.w, self.cnts
        waits = self.waits
        t0 = waits.now_ns()
        self.wait_started = waits.now()
        self.stats.contended += 1
        w.fetch_add(self.contended, 1)
        self.queue.acquire()
        # our bias, recorded in the same call, so that `recover` takes it back if we die while we wait
        self._add_reader_bias()
        if w.load(cnts) & QW_LOCKED:
            turns, budget = waits.spins(SPIN), waits.spin_ns(SPIN_NS)
            t_spin = waits.now_ns() if budget else 0
            k = 0
            while k < turns or (budget and waits.now_ns() - t_spin < budget):
                k += 1
                if not w.load(cnts) & QW_LOCKED:
                    break
                waits.relax() if k < turns else waits.yield_cpu()
            else:
                while True:
                    w.store(self.rsleep, 1)
                    if not w.load(cnts) & QW_LOCKED:
                        break
                    self._sleep(self.sem_r, self.rsleep, lambda: w.fetch_add(cnts, _NEG_BIAS))
                w.store(self.rsleep, 0)
        self.queue.release()
        self._waited(t0)

    def _unlock_unheld(self, mode: int) -> None:
        """An unlock of a lock this process does not hold: the one owed by a given-up re-acquisition, or a bug."""
        if self._forgiven(mode):
            return
        raise LockError(f"{self.name}: {'read' if mode == HELD_READ else 'write'}_unlock without the "
                        f"{'read' if mode == HELD_READ else 'write'} lock")

    def _wake(self, readers: bool, writer: bool) -> None:
        """After an unlock: wake the readers asleep on the reader gate, the writer asleep on the writer gate."""
        if readers:
            self.waits.sem_release(self.sem_r)
        if writer:
            self.waits.sem_release(self.sem_w)

    # ---- write side

    def _write_slowpath(self) -> None:
        """queued_write_lock_slowpath(): take the queue, announce WAITING, wait for readers to drain."""
        w, cnts = self.w, self.cnts
        waits = self.waits
        t0 = waits.now_ns()
        self.wait_started = waits.now()
        self.stats.contended += 1
        w.fetch_add(self.contended, 1)
        self.queue.acquire()
        if w.cas(cnts, 0, QW_LOCKED) != 0:
            if self.busted:
                w.fetch_or(cnts, QW_LOCKED)      # lock_busted: barge in beside the readers
            else:
                w.fetch_or(cnts, QW_WAITING)
                spins, spin_max, budget = 0, waits.spins(SPIN), waits.spin_ns(SPIN_NS)
                t_spin = waits.now_ns() if budget else 0
                while w.cas(cnts, QW_WAITING, QW_LOCKED) != QW_WAITING:
                    spins += 1
                    if spins < spin_max:
                        waits.relax()
                        continue
                    if budget and waits.now_ns() - t_spin < budget:
                        waits.yield_cpu()
                        continue
                    w.store(self.wsleep, 1)
                    if w.load(cnts) == QW_WAITING:
                        continue
                    self._sleep(self.sem_w, self.wsleep, lambda: w.fetch_and(cnts, ~QW_WAITING))
                w.store(self.wsleep, 0)
        self.queue.release()
        self._waited(t0)

    def _sleep(self, gate: posix_ipc.Semaphore, flag: int, back_out: Callable[[], object]) -> None:
        """One bounded sleep on a gate.  On a timeout `on_sleep` may abandon the wait by raising:
        then our sleeper flag, our claim on the counter (`back_out`) and the queue are given back."""
        if not self.waits.sem_acquire(gate, SLEEP_TIMEOUT):
            if self.on_sleep is not None:
                try:
                    self.on_sleep()
                except BaseException:
                    self.w.store(flag, 0)
                    back_out()
                    self.queue.release()
                    raise

    def reacquire(self, shared: bool) -> None:
        """Take the lock again after a yield (cond_resched's relock).  The caller is inside code that
        unlocks on its way out; if the wait is given up (on_sleep raised: an interrupt at the
        supervisor's safe point, LockStuck, a dead worker), that one unlock finds the lock not held
        and is forgiven instead of raising over the exception that is unwinding."""
        try:
            self.read_lock() if shared else self.write_lock()
        except BaseException:
            self.abandoned = HELD_READ if shared else HELD_WRITE
            raise

    def _forgiven(self, mode: int) -> bool:
        if self.abandoned != mode or self.mode != HELD_NONE:
            return False
        self.abandoned = HELD_NONE
        return True

    def _waited(self, t0: int) -> None:
        dt = self.waits.now_ns() - t0
        self.stats.wait_ns += dt
        if dt > self.stats.wait_max_ns:
            self.stats.wait_max_ns = dt

    # ---- context managers

    @contextmanager
    def read(self) -> Iterator[None]:
        self.read_lock()
        try:
            yield
        finally:
            self.read_unlock()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.write_lock()
        try:
            yield
        finally:
            self.write_unlock()

    # ---- contention and yielding

    def needbreak(self) -> bool:
        """rwlock_needbreak(): is another process queued behind the holders?"""
        if self.queue.held():
            self.stats.needbreak_seen += 1
            return True
        return False

    def cond_resched_read(self) -> bool:
        """cond_resched_rwlock_read(): if contended, drop the read lock, let the waiter in, retake it."""
        self.assert_held(HELD_READ)
        if not self.needbreak():
            return False
        self.read_unlock()
        self.waits.yield_cpu()
        self.reacquire(True)
        self.stats.yields += 1
        return True

    def cond_resched_write(self) -> bool:
        """cond_resched_rwlock_write()."""
        self.assert_held(HELD_WRITE)
        if not self.needbreak():
            return False
        self.write_unlock()
        self.waits.yield_cpu()
        self.reacquire(False)
        self.stats.yields += 1
        return True

    # ---- holder records and recovery

    def assert_held(self, mode: int | None = None) -> None:
        """lockdep_assert_held(): mode None accepts either side."""
        if self.mode == HELD_NONE or (mode is not None and self.mode != mode):
            want = {None: "held", HELD_READ: "held for read", HELD_WRITE: "held for write"}[mode]
            have = {HELD_NONE: "not held", HELD_READ: "held for read", HELD_WRITE: "held for write"}[self.mode]
            raise LockError(f"{self.name} must be {want} here, but it is {have} by this process")

    def _words_of(self, region: Region, index: int) -> None:
        """The words of this lock's block in the locks section (shmmmu.layout.Lock), by name."""
        lk = region.columns("locks", Lock)
        self.cnts, self.wait, self.wait_owner = lk.cnts.word(index), lk.wait.word(index), lk.wait_owner.word(index)
        self.writer, self.rsleep, self.wsleep = lk.writer.word(index), lk.rsleep.word(index), lk.wsleep.word(index)
        self.contended = lk.contended.word(index)

    def held_by(self) -> list[tuple[int, int, int]]:
        """(worker, pid, mode) for every worker whose record says it holds this lock."""
        out = []
        for k in range(self.n_workers):
            mode = self.held.load(k)
            if mode:
                out.append((k, self.pid.load(k), mode))
        return out

    def state(self) -> dict[str, int]:
        c = self.w.load(self.cnts)
        return {"readers": c // QR_BIAS, "write_locked": int(c & QW_LOCKED == QW_LOCKED),
                "writer_waiting": int(bool(c & QW_WAITING)), "queue": self.w.load(self.wait),
                "writer": self.w.load(self.writer) - 1, "contended": self.w.load(self.contended)}

    def recover(self, dead: int) -> list[str]:
        """Release whatever the dead worker `dead` held (the supervisor calls this); returns what it did."""
        done = []
        w = self.w
        mode = self.held.load(dead)
        if mode == HELD_READ:
            if (w.fetch_add(self.cnts, _NEG_BIAS) - QR_BIAS) & ((1 << 64) - 1) == QW_WAITING:
                self.waits.sem_release(self.sem_w)
            done.append(f"{self.name}: dropped the read hold of worker {dead}")
        elif mode == HELD_WRITE or w.load(self.writer) == dead + 1:
            w.store(self.writer, 0)
            if w.fetch_and(self.cnts, ~QW_LOCKED) & QW_WAITING:
                self.waits.sem_release(self.sem_w)         # a writer queued behind the dead one
            self.waits.sem_release(self.sem_r)
            done.append(f"{self.name}: dropped the write hold of worker {dead}")
        self.held.store(dead, HELD_NONE)
        if w.load(self.wait_owner) == dead + 1:
            # it died in a slow path: take back a WAITING it announced, and its queue slot
            w.fetch_and(self.cnts, ~QW_WAITING)
            w.store(self.wait_owner, 0)
            if w.xchg(self.wait, 0) == 2:
                self.waits.sem_release(self.queue.sem)
            done.append(f"{self.name}: released the wait queue held by worker {dead}")
        return done


class RWLockReference(RWLock):
    """The lock's fast paths in Python, step for step those of _locks.c: every word operation is a call
    the explorer can schedule; tests/unit/test_rwlock.py holds the two equal.  The busted lock is one too."""

    def read_lock(self) -> None:
        """queued_read_lock()."""
        w = self.w
        if w.fetch_add(self.cnts, QR_BIAS) & QW_WMASK:
            self._read_contended((w.fetch_add(self.cnts, _NEG_BIAS) - QR_BIAS) & _U64)   # back out at once
            return
        self.mode = HELD_READ
        self.ws.store(self.held_word, HELD_READ)
        self.read_acquired += 1

    def _add_reader_bias(self) -> None:
        """The slow path's bias and its hold record (one C call in _locks.c)."""
        self.w.fetch_add(self.cnts, QR_BIAS)
        self.ws.store(self.held_word, HELD_READ)

    def read_unlock(self) -> None:
        """queued_read_unlock()."""
        if self.mode != HELD_READ:
            self._unlock_unheld(HELD_READ)
            return
        self.mode = HELD_NONE
        self.ws.store(self.held_word, HELD_NONE)
        w = self.w
        if (w.fetch_add(self.cnts, _NEG_BIAS) - QR_BIAS) & ((1 << 64) - 1) == QW_WAITING:
            if w.load(self.wsleep):
                self._wake(False, True)

    def write_lock(self) -> None:
        """queued_write_lock()."""
        if self.w.cas(self.cnts, 0, QW_LOCKED) != 0:
            self._write_slowpath()
        self.mode = HELD_WRITE
        self.w.store(self.writer, self.worker + 1)
        self.ws.store(self.held_word, HELD_WRITE)
        self.write_acquired += 1

    def write_unlock(self) -> None:
        """queued_write_unlock()."""
        if self.mode != HELD_WRITE:
            self._unlock_unheld(HELD_WRITE)
            return
        self.mode = HELD_NONE
        self.ws.store(self.held_word, HELD_NONE)
        w = self.w
        w.store(self.writer, 0)
        if self.busted:
            old = w.fetch_and(self.cnts, ~QW_LOCKED)
        else:
            old = w.fetch_add(self.cnts, _NEG_LOCKED)
        # readers asleep on the reader gate; a writer queued behind us set WAITING and may sleep on the
        # writer gate (without its wake-up it only woke on its SLEEP_TIMEOUT: waits of 0.15-0.2 s)
        readers = w.load(self.rsleep) != 0
        writer = bool(old & QW_WAITING) and w.load(self.wsleep) != 0
        if readers or writer:
            self._wake(readers, writer)


class Mutex:
    """An exclusive sleeping lock in a region (the page-list lock, the pool lock): the wait-queue mutex alone."""

    def __init__(self, region: Region, index: int, worker: int, waits: Waits = REAL):
        self.name = Locks.NAMES[index]
        self.index = index
        self.worker = worker
        self.waits = waits
        w = region.words("locks")
        lk = region.columns("locks", Lock)
        self.wait, self.wait_owner = lk.wait.word(index), lk.wait_owner.word(index)
        self.queue = _WaitQueue(w, self.wait, self.wait_owner, region.semaphore(f"{self.name}.q"), worker, waits)
        self.ws = region.words("wstate")
        self.held = self.ws.column(WState.WORDS, WState.HELD + index)
        self.held_word = self.held.word(worker)
        self.is_held = False

    def acquire(self) -> None:
        self.queue.acquire()
        self.is_held = True
        self.ws.store(self.held_word, HELD_WRITE)

    def release(self) -> None:
        if not self.is_held:
            raise LockError(f"{self.name}: release without holding it")
        self.is_held = False
        self.ws.store(self.held_word, HELD_NONE)
        self.queue.release()

    def __enter__(self) -> "Mutex":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def assert_held(self) -> None:
        if not self.is_held:
            raise LockError(f"{self.name} must be held here")

    def recover(self, dead: int) -> list[str]:
        if self.queue.w.load(self.wait_owner) == dead + 1:
            self.queue.w.store(self.wait_owner, 0)
            if self.queue.w.xchg(self.wait, 0) == 2:
                self.waits.sem_release(self.queue.sem)
            self.held.store(dead, HELD_NONE)
            return [f"{self.name}: released the hold of worker {dead}"]
        self.held.store(dead, HELD_NONE)
        return []


def assert_held(lock: RWLock, mode: int | None = None) -> None:
    """lockdep_assert_held_read/write as a function, for MMU code."""
    lock.assert_held(mode)
