"""Uffd worker: one reader of a demand-paging userfaultfd, the process that copies in the pages vCPU faults wait for.

Started by the supervisor as `python -m shmmmu.workers.uffd --vm NAME --id I`
for each slot of VMConfig.uffd_workers (`shmmmu bench demand-paging`): the
reader threads of demand_paging_test's uffd handler (lib/userfaultfd_util.c),
as processes.  Until the supervisor says stop it polls the wstate words of
its uffd's vCPUs and serves each fault it claims (shmmmu.userfault.Handler).
"""
from __future__ import annotations

import sys
import time
import traceback

from shmmmu import violations
from shmmmu.layout import Ctl, Role, WorkerStatus
from shmmmu.mmu import Mmu
from shmmmu.userfault import Handler
from shmmmu.workers.common import set_status, start_worker


def main() -> None:
    vm, args = start_worker("a demand-paging userfaultfd reader of a shmmmu VM", Role.HOST)
    me = args.id
    ctl = vm.region.words("ctl")
    try:
        mmu = Mmu(vm, me)                      # for its counters row (publish_stats)
        handler = Handler(vm, me, mmu.kvm.st)
        set_status(vm, me, WorkerStatus.READY)
        idle = 0
        while not ctl.load(Ctl.STOP):
            if handler.serve():
                idle = 0
                mmu.publish_stats()
            else:
                idle += 1                      # poll(): sleep a little once nothing has come for a while
                if idle > 256:
                    time.sleep(0.0001)
        mmu.publish_stats()
        set_status(vm, me, WorkerStatus.DONE)
    except Exception:
        traceback.print_exc()
        try:
            violations.record(vm.region, "worker-crashed", me)
            set_status(vm, me, WorkerStatus.FAILED)
        finally:
            sys.exit(1)


if __name__ == "__main__":
    main()
