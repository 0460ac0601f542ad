"""Actors: the bodies the explorer's scenarios run: guest accesses, host operations, the reclaimer, a kworker.

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
