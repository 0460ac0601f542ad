"""RCU: read-side slots and nesting, synchronize, call_rcu and the reclaimer's pass, pipe_age, recovery of a dead reader."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from shmmmu.layout import Ctl, TMeta, TableState, TortureCtl, WState
from shmmmu.region import Region
from shmmmu.rcu import Rcu, RcuError, pipe_age
from shmmmu.torture import dead_workers, torture_config
from shmmmu.vm import create_region

N = 4


@pytest.fixture
def region(vm_name: str) -> Iterator[Region]:
    with create_region(torture_config(vm_name, N, n_tables=32)) as r:
        yield r


def rcus(region: Region, n: int = N) -> list[Rcu]:
    return [Rcu(region, k) for k in range(n)]


def slot(region: Region, k: int) -> int:
    return region.words("wstate").load(k * WState.WORDS + WState.RCU)


def test_epoch_starts_at_one_and_read_sections_nest(region: Region) -> None:
    a = rcus(region)[0]
    assert region.words("ctl").load(Ctl.EPOCH) == 1
    assert slot(region, 0) == 0 and not a.in_read_section()
    a.read_lock()
    assert slot(region, 0) == 1 and a.in_read_section()
    region.words("ctl").store(Ctl.EPOCH, 5)
    a.read_lock()                                  # nested: the outer epoch stays published
    assert slot(region, 0) == 1
    a.read_unlock()
    assert slot(region, 0) == 1 and a.in_read_section()
    a.read_unlock()
    assert slot(region, 0) == 0 and not a.in_read_section()
    with pytest.raises(RcuError):
        a.read_unlock()


def test_synchronize_without_readers_advances_the_epoch_and_counts(region: Region) -> None:
    a = rcus(region)[0]
    assert a.synchronize(timeout=1.0)
    st = a.stats()
    assert st["epoch"] == 2 and st["grace_periods"] == 1 and st["gp_total_ns"] >= st["gp_max_ns"] > 0
    a.read_lock()
    with pytest.raises(RcuError, match="wait for itself"):
        a.synchronize()
    a.read_unlock()


def test_synchronize_waits_for_an_older_reader_only(region: Region) -> None:
    a, b, c = rcus(region)[:3]
    b.read_lock()                                  # entered before the grace period: must be waited for
    assert a.synchronize(timeout=0.1) is False
    b.read_unlock()
    c.read_lock()                                  # entered before this call: waited for too
    assert a.synchronize(timeout=0.05) is False
    epoch = region.words("ctl").fetch_add(Ctl.EPOCH, 1)
    b.read_lock()                                  # entered after the epoch moved on: not waited for
    assert slot(region, 1) == epoch + 1
    c.read_unlock()
    assert a.wait_for_readers(epoch, timeout=1.0) is True
    b.read_unlock()


def test_wait_for_readers_gives_up_when_not_alive(region: Region) -> None:
    a, b = rcus(region)[:2]
    b.read_lock()
    epoch = region.words("ctl").fetch_add(Ctl.EPOCH, 1)
    asked: list[int] = []
    assert a.wait_for_readers(epoch, timeout=None, alive=lambda: bool(asked.append(1))) is False
    assert asked == [1]                           # it gave up the first time it asked, not after a timeout
    b.read_unlock()
    assert a.wait_for_readers(epoch, timeout=1.0)


def test_call_rcu_and_reclaim_pass_free_only_after_the_grace_period(region: Region) -> None:
    reclaimer, writer, reader = rcus(region)[:3]
    tm = region.words("tmeta")
    freed: list[int] = []
    reader.read_lock()
    writer.call_rcu(7)
    writer.call_rcu(9)
    assert tm.load(7 * TMeta.WORDS + TMeta.STATE) == TableState.RETIRED
    assert tm.load(7 * TMeta.WORDS + TMeta.RETIRE_EPOCH) == region.words("ctl").load(Ctl.EPOCH)
    assert reclaimer.backlog() == 2
    assert reclaimer.reclaim_pass(freed.extend, timeout=0.1) == 0     # the reader pins them
    assert freed == [] and reclaimer.backlog() == 2
    reader.read_unlock()
    assert reclaimer.reclaim_pass(freed.extend, timeout=1.0) == 2
    assert freed == [7, 9] and reclaimer.backlog() == 0
    assert reclaimer.reclaim_pass(freed.extend) == 0                  # nothing pending: no grace period
    st = reclaimer.stats()
    assert st["backlog_max"] == 2 and st["grace_periods"] == 1


def test_tables_retired_after_the_grace_period_began_wait_for_the_next(region: Region) -> None:
    reclaimer, writer = rcus(region)[:2]
    freed: list[int] = []
    writer.call_rcu(3)
    region.words("ctl").fetch_add(Ctl.EPOCH, 1)
    writer.call_rcu(4)                              # retired in a newer epoch than ...
    epoch = region.words("ctl").load(Ctl.EPOCH)
    region.words("ctl").store(Ctl.EPOCH, epoch - 1)  # ... the one this pass advances from
    assert reclaimer.reclaim_pass(freed.extend, timeout=1.0) == 1 and freed == [3]
    assert reclaimer.reclaim_pass(freed.extend, timeout=1.0) == 1 and freed == [3, 4]


def test_reclaim_without_grace_period_frees_under_a_reader(region: Region) -> None:
    """wait_for_gp=False (bug K7): the negative control frees what a reader may still hold."""
    reclaimer, writer, reader = rcus(region)[:3]
    freed: list[int] = []
    reader.read_lock()
    writer.call_rcu(5)
    assert reclaimer.reclaim_pass(freed.extend, wait_for_gp=False) == 1 and freed == [5]
    reader.read_unlock()


def test_retire_ring_full_raises(region: Region) -> None:
    w = rcus(region)[0]
    ring = region.array("retire").shape[1]
    for k in range(ring):
        w.call_rcu(k % 32)
    with pytest.raises(RcuError, match="full"):
        w.call_rcu(1)


def test_pipe_age() -> None:
    assert pipe_age(TableState.LIVE, 0, 5, 9) == 0
    assert pipe_age(TableState.RETIRED, 5, 5, 9) == 1       # retired while the reader was inside
    assert pipe_age(TableState.RETIRED, 7, 5, 9) == 1
    assert pipe_age(TableState.RETIRED, 5, 6, 9) == 2       # retired before the reader entered: it cannot reach it
    assert pipe_age(TableState.RETIRED, 5, 8, 9) == 4
    assert pipe_age(TableState.FREE, 5, 5, 5) == 2          # freed under a reader: at least 2
    assert pipe_age(TableState.FREE, 5, 5, 9) == 5
    assert pipe_age(TableState.CACHED, 5, 5, 6) == 2


def test_recover_clears_a_dead_readers_slot(region: Region) -> None:
    a, b = rcus(region)[:2]
    b.read_lock()
    assert a.synchronize(timeout=0.05) is False
    assert a.recover(1) == ["rcu: cleared the read-side section of dead worker 1"]
    assert a.recover(1) == []
    assert a.synchronize(timeout=1.0)


def test_sigkill_inside_a_read_section_then_recover(region: Region) -> None:
    """A process killed inside a read section pins grace periods until recover(); then they complete."""
    a = rcus(region)[0]
    holding = region.words("tables").load(TortureCtl.HOLDING)
    p = subprocess.Popen([sys.executable, "-m", "shmmmu.workers.torture", "worker", "hold", "--region", region.name,
                          "--worker", "2", "--role", "rcu"], stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 300               # a hang guard
        while region.words("tables").load(TortureCtl.HOLDING) == holding and p.poll() is None and time.monotonic() < end:
            time.sleep(0.005)
        assert p.poll() is None and slot(region, 2) != 0
        a.call_rcu(6)
        freed: list[int] = []
        assert a.reclaim_pass(freed.extend, timeout=0.1) == 0
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        assert dead_workers(region) == [(2, p.pid)]
        assert slot(region, 2) != 0                # still pinned: the dead cannot leave its section
        assert a.synchronize(timeout=0.1) is False
        assert a.recover(2)
        assert a.synchronize(timeout=2.0), "no grace period after recover()"
        assert a.reclaim_pass(freed.extend, timeout=2.0) == 1 and freed == [6]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("seed", range(4))
def test_the_c_read_side_does_what_the_python_reference_does(vm_name: str, seed: int) -> None:
    """The same random stream of nested rcu_read_lock/unlock (unbalanced ones included) and epoch moves,
    once through _locks.c and once through RcuReference: the slots and nesting counts stay equal."""
    import random

    from shmmmu.rcu import RcuReference
    rng = random.Random(seed)
    with create_region(torture_config(f"{vm_name}c", N, n_tables=32)) as rc, \
            create_region(torture_config(f"{vm_name}p", N, n_tables=32)) as rp:
        fast = rcus(rc)
        ref = [RcuReference(rp, k) for k in range(N)]
        assert all(type(r) is Rcu for r in fast)
        for step in range(500):
            k = rng.randrange(N)
            op = rng.choice(["lock", "lock", "unlock", "unlock", "epoch"])
            outcomes = []
            for region, rs in ((rc, fast), (rp, ref)):
                try:
                    if op == "lock":
                        rs[k].read_lock()
                    elif op == "unlock":
                        rs[k].read_unlock()
                    else:
                        region.words("ctl").fetch_add(Ctl.EPOCH, 1)
                    outcomes.append("ok")
                except RcuError as e:
                    outcomes.append(str(e))
                    rs[k].nesting = 0                # the caller's state after the bug, reset alike
                    region.words("wstate").store(k * WState.WORDS + WState.RCU, 0)
            assert outcomes[0] == outcomes[1], (seed, step, op, outcomes)
            assert [slot(rc, j) for j in range(N)] == [slot(rp, j) for j in range(N)], (seed, step, op)
            assert [r.nesting for r in fast] == [r.nesting for r in ref], (seed, step, op)
