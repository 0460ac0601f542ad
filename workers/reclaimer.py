"""Reclaimer worker: the process that ends grace periods and returns retired tables to the pool.

Started as `python -m shmmmu.workers.reclaimer --vm NAME --id I`.  Each pass advances
the RCU epoch, waits for every read-side section that could hold a retired
table, then frees the tables (zeroed, or poisoned in debug mode).  A grace
period longer than the stall bound is reported (the RCU stall warning).

With nx_huge_pages it is also the kernel's kvm-nx-lpage-recovery thread: every
`nx_recovery_period_s` it runs Mmu.recover_nx_lpages (a 1/ratio share of the
NX list zapped under the write lock).  It lives here rather than in a worker
of its own because this process is the VM's one housekeeping process and is
idle between grace periods, and a VM slot per worker is fixed when the region
is created; the tables the pass tears down retire into this process's own
ring, which it reclaims next.  For the same reason, with the switch B8
(roots-zapped-by-worker: 5.18-6.5's workqueue) it is also the kworker that
runs the root zaps a memslot update queues (Roots.kworker_pass).
"""
from __future__ import annotations

import sys
import time
import traceback

from shmmmu import violations
from shmmmu.layout import Ctl, Role, WorkerStatus, WState
from shmmmu.variants import traits
from shmmmu.workers.common import set_status, start_worker


def main() -> None:
    vm, args = start_worker("the reclaimer of a shmmmu VM", Role.RECLAIMER)
    me = args.id
    ctl = vm.region.words("ctl")
    heartbeat = vm.region.columns("wstate", WState).heartbeat
    c = vm.config
    stall = c.gp_stall_s
    nx_period = c.nx_recovery_period_s if c.nx_huge_pages and c.nx_recovery_ratio > 0 else 0.0
    kworker = "root-zap-worker" in traits(c.kernel, list(c.bugs))
    try:
        rcu, pool = vm.rcu, vm.pool
        mmu = None
        if nx_period > 0 or c.tracepoints or kworker:   # NX recovery; --timeline's instruments; B8's kworker
            from shmmmu.mmu import Mmu
            mmu = Mmu(vm, me)
        next_nx = time.monotonic() + nx_period
        set_status(vm, me, WorkerStatus.READY)
        stalled = False
        idle = 0
        while not ctl.load(Ctl.STOP):
            if nx_period > 0 and mmu is not None and time.monotonic() >= next_nx:
                mmu.recover_nx_lpages()
                mmu.publish_stats()
                next_nx = time.monotonic() + nx_period
            if kworker and mmu is not None and mmu.roots.kworker_pass():
                mmu.publish_stats()
            pending = rcu.backlog()
            if pending == 0:
                idle += 1
                time.sleep(0.0002 if idle < 50 else 0.002)
                continue
            idle = 0
            t0 = time.monotonic()
            n = rcu.reclaim_pass(pool.free, timeout=stall, alive=lambda: not ctl.load(Ctl.STOP))
            if n == 0 and time.monotonic() - t0 >= stall and not ctl.load(Ctl.STOP) and not stalled:
                stalled = True
                violations.record(vm.region, "grace-period-stall", me, 0, int(stall * 1000), pending)
            elif n:
                stalled = False
            heartbeat.store(me, heartbeat.load(me) + 1)
        # drain what is left so the pool adds up at the end
        for _ in range(100):
            if not rcu.backlog() or not rcu.reclaim_pass(pool.free, timeout=1.0):
                break
        set_status(vm, me, WorkerStatus.DONE)
    except Exception:
        traceback.print_exc()
        violations.record(vm.region, "worker-crashed", me)
        set_status(vm, me, WorkerStatus.FAILED)
        sys.exit(1)


if __name__ == "__main__":
    main()
