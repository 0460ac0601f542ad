"""Reclaimer worker: the process that ends grace periods and returns retired tables to the pool.

Started as `python -m workers.reclaimer --vm NAME --id I`.  Each pass advances
the RCU epoch, waits for every read-side section that could hold a retired
table, then frees the tables (zeroed, or poisoned in debug mode).  A grace
period longer than the stall bound is reported (the RCU stall warning).
"""
from __future__ import annotations

import sys
import time
import traceback

from shmmmu import violations
from shmmmu.layout import C_STOP, ROLE_RECLAIMER, W_HEARTBEAT, WSTATE_WORDS
from workers.common import STATUS_DONE, STATUS_FAILED, STATUS_READY, set_status, start_worker


def main() -> None:
    vm, args = start_worker("the reclaimer of a shmmmu VM", ROLE_RECLAIMER)
    me = args.id
    ctl = vm.region.words("ctl")
    ws = vm.region.words("wstate")
    stall = float(vm.config.workload.get("gp_stall_s", 10.0))
    try:
        rcu, pool = vm.rcu, vm.pool
        set_status(vm, me, STATUS_READY)
        stalled = False
        idle = 0
        while not ctl.load(C_STOP):
            pending = rcu.backlog()
            if pending == 0:
                idle += 1
                time.sleep(0.0002 if idle < 50 else 0.002)
                continue
            idle = 0
            t0 = time.monotonic()
            n = rcu.reclaim_pass(pool.free, timeout=stall, alive=lambda: not ctl.load(C_STOP))
            if n == 0 and time.monotonic() - t0 >= stall and not ctl.load(C_STOP) and not stalled:
                stalled = True
                violations.record(vm.region, "grace-period-stall", me, 0, int(stall * 1000), pending)
            elif n:
                stalled = False
            ws.store(me * WSTATE_WORDS + W_HEARTBEAT, ws.load(me * WSTATE_WORDS + W_HEARTBEAT) + 1)
        # drain what is left so the pool adds up at the end
        for _ in range(100):
            if not rcu.backlog() or not rcu.reclaim_pass(pool.free, timeout=1.0):
                break
        set_status(vm, me, STATUS_DONE)
    except Exception:
        traceback.print_exc()
        violations.record(vm.region, "worker-crashed", me)
        set_status(vm, me, STATUS_FAILED)
        sys.exit(1)


if __name__ == "__main__":
    main()
