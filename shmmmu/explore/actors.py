"""Actors: the bodies the explorer's scenarios run: guest accesses, host operations, the reclaimer, a kworker,
readers and writers of mmu_lock alone.

Each returns the function an actor runs (shmmmu.explore.scenarios builds its
scenarios from them; shmmmu.explore.explorer's Context gives them their
handles).
"""
from __future__ import annotations

from typing import Any, Callable

from shmmmu.workloads import EXEC, WRITE, make_value

Context = Any                # shmmmu.explore.explorer.Context (not imported: the explorer imports the scenarios)


def accesses(ctx: Context, vcpu_id: int, ops: list[tuple[int, int]]) -> Callable[[], None]:
    """A vCPU actor: guest accesses (gfn, READ/WRITE/EXEC) in guest mode, as workers/vcpu.py runs them."""
    def run() -> None:
        v = ctx.vcpu(vcpu_id)
        v.enter()
        try:
            for gfn, kind in ops:
                if kind == WRITE:
                    v.write(gfn, make_value(gfn, vcpu_id, 2))      # iteration 2: the prologue wrote 1
                elif kind == EXEC:
                    v.fetch(gfn)
                else:
                    v.read(gfn)
        finally:
            v.exit()
    return run


def host_ops(ctx: Context, ops: list[tuple], host: int = 0) -> Callable[[], None]:
    """A host actor: Mmu entry points, by name, with their arguments."""
    def run() -> None:
        mmu = ctx.host(host)
        for name, *args in ops:
            getattr(mmu, name)(*args)
    return run


def reclaimer(ctx: Context) -> Callable[[], None]:
    """The reclaimer: grace periods and frees while the others run (a daemon: it ends when they have)."""
    def run() -> None:
        rcu, pool = ctx.reclaimer()
        while not ctx.others_done():
            if not rcu.reclaim_pass(pool.free, timeout=None):
                ctx.waits.relax()                # wait for something to be retired
    return run


def kworker(ctx: Context, host: int) -> Callable[[], None]:
    """A kworker of the VM's workqueue (B8): it runs the root zaps queued there while the others run (a daemon,
    as the reclaimer is)."""
    def run() -> None:
        roots = ctx.host(host).roots
        while not ctx.others_done():
            if not roots.kworker_pass():
                ctx.waits.relax()                # wait for work to be queued
    return run


# ---- mmu_lock alone: a writer and readers around it (qrwlock's fairness and its cmpxchg)

def reader_vs_waiting_writer(ctx: Context) -> None:
    from shmmmu.rwlock import QW_WAITING

    def writer() -> None:
        lock = ctx.host(0).lock
        lock.write_lock()
        lock.write_unlock()

    def reader() -> None:
        # qrwlock's fairness: a reader that finds a writer waiting for the readers to drain (_QW_WAITING)
        # queues behind it, so it can never hold the lock while that writer still waits
        lock = ctx.host(1).lock
        for _ in range(3):
            waiting = lock.w.load(lock.cnts) & QW_WAITING
            lock.read_lock()
            if waiting and lock.w.load(lock.cnts) & QW_WAITING:
                ctx.notes["barged"] = True
            lock.read_unlock()
    ctx.actor("host", writer)
    ctx.actor("host1", reader)


def readers_around_waiting_writer(ctx: Context) -> None:
    from shmmmu.rwlock import QW_WAITING

    # a reader that leaves while a writer waits for the readers to drain, and one that arrives in the moment the
    # writer sees them drained: the arrival's bias is in the count until it backs out, which is why
    # queued_write_lock_slowpath takes _QW_LOCKED with a cmpxchg (a plain store erases that bias)
    def writer() -> None:
        lock = ctx.host(0).lock
        lock.write_lock()
        ctx.notes["written"] = True         # set under the lock: a reader that sees it holds no read lock yet,
        lock.write_unlock()                 # and one that does not will see the writer's WAITING in the count

    def leaving() -> None:
        # a long read-side section (a walk) that ends once the writer waits (or has been): its spin lets the
        # writer run without a preemption, as a walk of many steps would
        lock = ctx.host(1).lock
        lock.read_lock()
        while not lock.w.load(lock.cnts) & QW_WAITING and not ctx.notes.get("written"):
            lock.waits.relax()
        lock.read_unlock()

    def arriving() -> None:
        lock = ctx.host(2).lock
        lock.read_lock()
        lock.read_unlock()
    ctx.actor("host1", leaving)
    ctx.actor("host", writer)
    ctx.actor("host2", arriving)
