"""The MMU RWLock and Mutex: fast paths, exclusion, qrwlock fairness, needbreak/cond_resched, wake-ups, recovery.

Several handles on one lock in one process (one per worker slot, used from
threads) stand in for processes here; the SIGKILL tests use real processes.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import pytest

from conftest import HANG_GUARD_S

from shmmmu.layout import Lock, Locks, TortureCtl, WState
from shmmmu.region import Region
from shmmmu.rwlock import HELD_NONE, HELD_READ, HELD_WRITE, SLEEP_TIMEOUT, LockError, Mutex, RWLock, assert_held
from shmmmu.torture import dead_workers, torture_config
from shmmmu.vm import create_region

N = 6


@pytest.fixture
def region(vm_name: str) -> Iterator[Region]:
    with create_region(torture_config(vm_name, N)) as r:
        yield r


def handles(region: Region, n: int = N) -> list[RWLock]:
    return [RWLock(region, Locks.MMU, k) for k in range(n)]


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, threading.Event]:
    """Run fn in a daemon thread; the event is set once it returned."""
    done = threading.Event()

    def body() -> None:
        fn()
        done.set()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, done


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.001)
    return cond()


# ---------------------------------------------------------------- one process, one handle

def test_read_and_write_fast_paths_update_state_and_records(region: Region) -> None:
    a = handles(region)[0]
    a.read_lock()
    assert a.state()["readers"] == 1 and not a.state()["write_locked"]
    assert [(k, mode) for k, _, mode in a.held_by()] == [(0, HELD_READ)]
    a.assert_held(HELD_READ)
    a.assert_held()
    a.read_unlock()
    assert a.held_by() == [] and a.state()["readers"] == 0
    a.write_lock()
    st = a.state()
    assert st["write_locked"] == 1 and st["writer"] == 0 and st["readers"] == 0
    assert [(k, mode) for k, _, mode in a.held_by()] == [(0, HELD_WRITE)]
    a.write_unlock()
    assert a.state() == {"readers": 0, "write_locked": 0, "writer_waiting": 0, "queue": 0, "writer": -1,
                         "contended": 0}
    assert a.read_acquired == 1 and a.write_acquired == 1 and a.stats.contended == 0


def test_held_by_names_the_pid_from_the_worker_row(region: Region) -> None:
    a = handles(region)[2]
    region.words("wstate").store(2 * WState.WORDS + WState.PID, os.getpid())
    with a.read():
        assert a.held_by() == [(2, os.getpid(), HELD_READ)]


def test_assert_held_and_misuse_raise_lock_error(region: Region) -> None:
    a = handles(region)[0]
    with pytest.raises(LockError, match="not held"):
        a.assert_held()
    with pytest.raises(LockError):
        a.read_unlock()
    with pytest.raises(LockError):
        a.write_unlock()
    with a.read():
        with pytest.raises(LockError, match="held for write"):
            assert_held(a, HELD_WRITE)
        with pytest.raises(LockError):
            a.write_unlock()
    with a.write():
        assert_held(a, HELD_WRITE)
        with pytest.raises(LockError, match="held for read"):
            a.assert_held(HELD_READ)


def test_the_fast_calls_take_no_arguments_and_touch_nothing_when_given_some(region: Region) -> None:
    a = handles(region)[0]
    for call in (a.read_lock, a.read_unlock, a.write_lock, a.write_unlock):
        with pytest.raises(TypeError, match="takes no arguments"):
            call(1)
    assert a.mode == HELD_NONE
    with a.read():                          # still usable, and no reader was counted by the refused calls
        assert a.mode == HELD_READ
    with a.write():
        assert a.mode == HELD_WRITE


def test_context_managers_release_on_exception(region: Region) -> None:
    a = handles(region)[0]
    with pytest.raises(ValueError):
        with a.write():
            raise ValueError
    with pytest.raises(ValueError):
        with a.read():
            raise ValueError
    assert a.state()["readers"] == 0 and not a.state()["write_locked"] and a.held_by() == []


def test_no_contention_no_needbreak_no_resched(region: Region) -> None:
    a = handles(region)[0]
    with a.read():
        assert not a.needbreak()
        assert a.cond_resched_read() is False
    with a.write():
        assert a.cond_resched_write() is False
    assert a.stats.yields == 0 and a.stats.needbreak_seen == 0
    with pytest.raises(LockError):
        a.cond_resched_read()


# ---------------------------------------------------------------- several handles (threads)

def test_readers_share(region: Region) -> None:
    hs = handles(region)
    for h in hs[:4]:
        h.read_lock()
    assert hs[0].state()["readers"] == 4
    assert sorted(k for k, _, _ in hs[0].held_by()) == [0, 1, 2, 3]
    for h in hs[:4]:
        h.read_unlock()
    assert hs[0].state()["readers"] == 0


def test_writer_excludes_readers_and_writers(region: Region) -> None:
    a, b, c = handles(region)[:3]
    a.write_lock()
    tb, rb = in_thread(lambda: (b.read_lock(), b.read_unlock()))
    tc, wc = in_thread(lambda: (c.write_lock(), c.write_unlock()))
    assert not rb.wait(0.15) and not wc.wait(0.01)
    assert a.needbreak()            # somebody queued behind the holder
    a.write_unlock()
    assert rb.wait(5) and wc.wait(5)
    assert b.stats.contended == 1 and c.stats.contended == 1
    assert a.state()["readers"] == 0 and not a.state()["write_locked"]


def test_waiting_writer_blocks_new_readers(region: Region) -> None:
    """qrwlock fairness: once a writer waits, a new reader queues behind it (no writer starvation)."""
    a, w, c = handles(region)[:3]
    order: list[str] = []
    a.read_lock()
    tw, wd = in_thread(lambda: (w.write_lock(), order.append("writer"), time.sleep(0.05), w.write_unlock()))
    assert wait_for(lambda: a.state()["writer_waiting"] == 1)
    tc, cd = in_thread(lambda: (c.read_lock(), order.append("reader"), c.read_unlock()))
    assert not cd.wait(0.1), "a new reader got in beside a waiting writer"
    assert a.needbreak()
    a.read_unlock()
    assert wd.wait(5) and cd.wait(5)
    assert order == ["writer", "reader"]


def test_cond_resched_read_lets_the_waiting_writer_in(region: Region) -> None:
    a, w = handles(region)[:2]
    got = threading.Event()
    a.read_lock()
    tw, wd = in_thread(lambda: (w.write_lock(), got.set(), w.write_unlock()))
    assert wait_for(lambda: a.state()["writer_waiting"] == 1)
    assert a.cond_resched_read() is True          # drops, the writer runs, retakes
    assert got.is_set() and wd.wait(5)
    a.assert_held(HELD_READ)
    assert a.stats.yields == 1 and a.stats.needbreak_seen >= 1
    a.read_unlock()


def test_cond_resched_write_lets_a_waiting_reader_in(region: Region) -> None:
    a, r = handles(region)[:2]
    got = threading.Event()
    a.write_lock()
    tr, rd = in_thread(lambda: (r.read_lock(), got.set(), r.read_unlock()))
    assert wait_for(a.needbreak)
    assert a.cond_resched_write() is True
    assert wait_for(got.is_set)
    a.assert_held(HELD_WRITE)
    assert a.stats.yields == 1
    a.write_unlock()
    assert rd.wait(5)


@pytest.mark.parametrize("first,second", [("w", "w"), ("w", "r"), ("r", "w")])
def test_handoff_wakes_the_sleeper_at_once(region: Region, first: str, second: str) -> None:
    """A sleeper is woken by the release, not by its SLEEP_TIMEOUT (regression: writer after writer slept 0.2 s):
    its semaphore wait never times out (on_sleep runs at each timeout), however slow the machine."""
    a, b = handles(region)[:2]
    lock_a, unlock_a = (a.write_lock, a.write_unlock) if first == "w" else (a.read_lock, a.read_unlock)
    lock_b, unlock_b = (b.write_lock, b.write_unlock) if second == "w" else (b.read_lock, b.read_unlock)
    timeouts: list[int] = []
    b.on_sleep = lambda: timeouts.append(1)
    locks = region.words("locks")
    flag = Locks.MMU * Lock.WORDS + (Lock.WSLEEP if second == "w" else Lock.RSLEEP)
    for _ in range(5):
        lock_a()
        t, done = in_thread(lambda: (lock_b(), unlock_b()))
        while not locks.load(flag):
            assert not done.is_set()
            time.sleep(0.002)                      # until b goes to sleep on its semaphore
        unlock_a()
        assert done.wait(HANG_GUARD_S)
    assert timeouts == [], f"woken by the timeout, not the release: {len(timeouts)} times"


def test_busted_writer_barges_in_beside_a_reader(region: Region) -> None:
    """lock_busted, the negative control: the slow-path writer does not wait for readers."""
    a = handles(region)[0]
    w = RWLock(region, Locks.MMU, 1, busted=True)
    a.read_lock()
    t, done = in_thread(w.write_lock)
    assert done.wait(5)
    st = a.state()
    assert st["readers"] == 1 and st["write_locked"] == 1
    w.write_unlock()
    a.read_unlock()


def test_recover_a_write_hold_wakes_queued_waiters(region: Region) -> None:
    dead, r, w = handles(region)[:3]
    dead.write_lock()
    tr, rd = in_thread(lambda: (r.read_lock(), r.read_unlock()))
    assert wait_for(dead.needbreak)
    done = r.recover(0)
    assert done and "write hold of worker 0" in done[0]
    assert rd.wait(5)
    tw, wd = in_thread(lambda: (w.write_lock(), w.write_unlock()))
    assert wd.wait(5)
    assert r.held_by() == [] and r.state()["readers"] == 0 and not r.state()["write_locked"]


def test_recover_a_read_hold_lets_the_waiting_writer_in(region: Region) -> None:
    dead, w = handles(region)[:2]
    dead.read_lock()
    tw, wd = in_thread(lambda: (w.write_lock(), w.write_unlock()))
    assert wait_for(lambda: w.state()["writer_waiting"] == 1)
    assert not wd.wait(0.05)
    assert "read hold of worker 0" in w.recover(0)[0]
    assert wd.wait(5)
    assert w.recover(0) == []                      # nothing left to recover


@pytest.mark.parametrize("reference", [False, True])
def test_a_reader_killed_right_after_the_slow_paths_add_is_recovered(region: Region, reference: bool) -> None:
    """The slow path adds its bias and records its hold in one call (_locks.c's _add_reader_bias; the explorer's
    reference does the same two word operations): a process that stops right after it holds a recorded read
    hold, and `recover` takes the bias back, so a waiting writer gets in.  (Before, the add and the record were
    two Python calls, and a SIGKILL between them left a bias no record named.)"""
    from shmmmu.rwlock import RWLockReference
    dead = (RWLockReference if reference else RWLock)(region, Locks.MMU, 0)
    w = handles(region)[1]
    dead._add_reader_bias()
    assert w.state()["readers"] == 1 and [(k, m) for k, _, m in w.held_by()] == [(0, HELD_READ)]
    tw, wd = in_thread(lambda: (w.write_lock(), w.write_unlock()))
    assert wait_for(lambda: w.state()["writer_waiting"] == 1)
    assert "read hold of worker 0" in w.recover(0)[0]
    assert wd.wait(5)
    assert w.state()["readers"] == 0 and w.recover(0) == []


# ---------------------------------------------------------------- Mutex

def test_mutex_excludes_and_records(region: Region) -> None:
    m0, m1 = Mutex(region, Locks.PAGES, 0), Mutex(region, Locks.PAGES, 1)
    with pytest.raises(LockError):
        m0.release()
    with pytest.raises(LockError):
        m0.assert_held()
    with m0:
        m0.assert_held()
        t, done = in_thread(lambda: (m1.acquire(), m1.release()))
        assert not done.wait(0.1)
    assert done.wait(5)


def test_mutex_recover_releases_a_dead_holder(region: Region) -> None:
    m0, m1 = Mutex(region, Locks.PAGES, 0), Mutex(region, Locks.PAGES, 1)
    m0.acquire()
    t, done = in_thread(lambda: (m1.acquire(), m1.release()))
    assert not done.wait(0.05)
    assert m1.recover(0) and done.wait(5)
    assert m1.recover(0) == []


# ---------------------------------------------------------------- SIGKILL while holding (real processes)

def spawn_holder(region: Region, worker: int, what: str) -> subprocess.Popen:
    """A process that takes `what` (write, read, rcu) in slot `worker` and keeps it until killed."""
    holding = region.words("tables").load(TortureCtl.HOLDING)
    p = subprocess.Popen([sys.executable, "-m", "shmmmu.workers.torture", "worker", "hold", "--region", region.name,
                          "--worker", str(worker), "--role", what], stdin=subprocess.DEVNULL)
    if not wait_for(lambda: region.words("tables").load(TortureCtl.HOLDING) > holding or p.poll() is not None, 30):
        p.kill()
        p.wait()
        pytest.fail("the holder process did not take its lock")
    assert p.poll() is None
    return p


def kill_and_reap(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL


@pytest.mark.parametrize("what", ["write", "read"])
def test_sigkill_while_holding_then_recover(region: Region, what: str) -> None:
    lock, other = handles(region)[:2]
    p = spawn_holder(region, 3, what)
    try:
        mode = HELD_WRITE if what == "write" else HELD_READ
        assert lock.held_by() == [(3, p.pid, mode)]
        # someone blocks on the dead process's hold: a writer (and, for a write hold, a reader)
        tw, wd = in_thread(lambda: (lock.write_lock(), lock.write_unlock()))
        if what == "write":
            tr, rd = in_thread(lambda: (other.read_lock(), other.read_unlock()))
        kill_and_reap(p)
        assert dead_workers(region) == [(3, p.pid)]
        assert not wd.wait(0.3), "the lock went free by itself"
        assert lock.held_by() == [(3, p.pid, mode)]
        done = other.recover(3)
        assert done and f"worker 3" in done[0]
        assert wd.wait(5), "the waiting writer did not get the lock after recover()"
        if what == "write":
            assert rd.wait(5)
        assert lock.held_by() == []
        lock.write_lock()                          # and the others go on
        lock.write_unlock()
        st = lock.state()
        assert st["readers"] == 0 and not st["write_locked"] and not st["writer_waiting"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- a re-acquisition given up

class GiveUp(Exception):
    pass


@pytest.mark.parametrize("shared", [True, False])
def test_a_given_up_reacquire_forgives_the_one_unlock_of_the_code_unwinding(region: Region, shared: bool) -> None:
    """cond_resched's relock, given up by on_sleep (an interrupt at the supervisor's safe point, LockStuck):
    the caller unwinds through its unlock of a lock it no longer holds; that one unlock passes, the lock
    is left free for the others, and a second unlock is still a LockError."""
    holder, yielder = handles(region, 2)
    unlock = yielder.read_unlock if shared else yielder.write_unlock
    yielder.read_lock() if shared else yielder.write_lock()
    unlock()                                     # the yield
    holder.write_lock()                          # someone else got it meanwhile, and keeps it
    calls = []

    def give_up() -> None:
        calls.append(1)
        raise GiveUp()
    yielder.on_sleep = give_up
    with pytest.raises(GiveUp):
        yielder.reacquire(shared)
    assert calls and yielder.mode == 0
    unlock()                                     # the caller's `finally`: forgiven
    with pytest.raises(LockError):
        unlock()                                 # only once
    holder.write_unlock()
    yielder.on_sleep = None
    yielder.write_lock()                         # nothing of the abandoned wait is left in the lock
    yielder.write_unlock()
    holder.read_lock()
    holder.read_unlock()


def test_a_signal_whose_handler_returns_ends_a_sleep_like_a_timeout(region: Region) -> None:
    """EINTR from a semaphore sleep (a deferred interrupt and its recheck timer) is not an exception in
    the MMU's code: the sleep returns False, as on a timeout, and the waiter reaches its safe point."""
    from shmmmu.wait import Waits
    seen = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        got = Waits().sem_acquire(region.semaphore("mmu_lock.w"), 30.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert got is False and seen == [signal.SIGALRM]


# ---------------------------------------------------------------- the C fast paths and their Python reference

@pytest.mark.parametrize("seed", range(6))
def test_the_c_fast_paths_do_what_the_python_reference_does(vm_name: str, seed: int) -> None:
    """The same random stream of uncontended operations on four handles, once through _locks.c and once
    through RWLockReference, each on its own region: after every step the lock block, every held record,
    the gate semaphores (wake-ups), and each handle's mode and counters are equal.  The stream has
    unlocks of a lock not held (LockError), a given-up re-acquisition's forgiven unlock, and sleepers'
    flags and a waiting writer's WAITING bit set in the words, so every wake-up branch is taken."""
    import random

    from shmmmu.layout import Lock
    from shmmmu.rwlock import QW_WAITING, RWLockReference
    rng = random.Random(seed)
    with create_region(torture_config(f"{vm_name}c", 4)) as rc, create_region(torture_config(f"{vm_name}p", 4)) as rp:
        fast = [RWLock(rc, Locks.MMU, k) for k in range(4)]
        ref = [RWLockReference(rp, Locks.MMU, k) for k in range(4)]
        assert all(type(h) is RWLock for h in fast)

        def view(region: Region, hs: list[RWLock]) -> tuple:
            w, ws = region.words("locks"), region.words("wstate")
            block = tuple(w.load(i) for i in range(Lock.WORDS) if i not in (Lock.WAIT, Lock.WAIT_OWNER))
            held = tuple(ws.load(k * WState.WORDS + WState.HELD + Locks.MMU) for k in range(4))
            gates = (region.semaphore("mmu_lock.r").value, region.semaphore("mmu_lock.w").value)
            return block, held, gates, tuple((h.mode, h.read_acquired, h.write_acquired, h.abandoned) for h in hs)

        for step in range(400):
            k = rng.randrange(4)
            cnts = fast[k].w.load(fast[k].cnts)
            op = rng.choice(["read", "write", "unlock", "unlock", "bad-unlock", "forgive", "flags"])
            rsleep, wsleep = rng.random() < 0.5, rng.random() < 0.5
            outcomes = []
            for region, hs in ((rc, fast), (rp, ref)):
                h, w = hs[k], hs[k].w
                try:
                    if op == "read" and h.mode == 0 and not cnts & 0x1FF:
                        h.read_lock()
                    elif op == "write" and h.mode == 0 and cnts == 0:
                        h.write_lock()
                    elif op == "unlock" and h.mode:
                        h.read_unlock() if h.mode == HELD_READ else h.write_unlock()
                    elif op == "bad-unlock" and h.mode == 0:
                        h.read_unlock() if step & 1 else h.write_unlock()
                    elif op == "forgive" and h.mode == 0:
                        h.abandoned = HELD_READ if step & 1 else HELD_WRITE     # a re-acquisition given up
                        h.read_unlock() if step & 1 else h.write_unlock()
                    elif op == "flags":
                        # sleepers on the gates, and (with readers in) a writer waiting for them to drain
                        w.store(h.rsleep, rsleep)
                        w.store(h.wsleep, wsleep)
                        if cnts and not cnts & 0xFF and not cnts & QW_WAITING and step % 3 == 0:
                            w.fetch_or(h.cnts, QW_WAITING)
                        elif cnts & QW_WAITING and step % 3 == 1:
                            w.fetch_and(h.cnts, ~QW_WAITING)
                    outcomes.append("ok")
                except LockError as e:
                    outcomes.append(str(e))
            assert outcomes[0] == outcomes[1], (seed, step, op, outcomes)
            assert view(rc, fast) == view(rp, ref), (seed, step, op)
        for region in (rc, rp):
            for g in ("mmu_lock.r", "mmu_lock.w"):
                while region.semaphore(g).value:
                    region.semaphore(g).acquire(0)
