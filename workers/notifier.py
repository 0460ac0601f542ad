"""Notifier worker: the host mm's side of stress, a process that migrates guest pages through the MMU notifier.

Started by the supervisor as `python -m shmmmu.workers.notifier --vm NAME --id I`
when a stress run has one (VMConfig.n_host >= 3).  Until the supervisor says
stop, it picks a random range of the memslots it is given (stress gives it the
hot-plug slot, which the supervisor deletes and re-adds, so its invalidations
race with fast invalidation) and runs one invalidation (Mmu.host_unmap with
may_block: kvm_mmu_notifier_invalidate_range_start/end around a migration),
three times in four after aging the range first as page reclaim does
(clear_flush_young, then unmap), then pauses a little.  It runs beside the supervisor's own host operations, as
the kernel's notifier runs in whatever thread changes the mm.
"""
from __future__ import annotations

import random
import sys
import time
import traceback

from shmmmu import violations
from shmmmu.layout import Ctl, Role, WorkerStatus
from shmmmu.mmu import Mmu
from shmmmu.workers.common import set_status, start_worker


def main() -> None:
    vm, args = start_worker("the MMU-notifier process of a shmmmu stress run", Role.HOST)
    me = args.id
    ctl = vm.region.words("ctl")
    c = vm.config
    rng = random.Random(c.seed * 7919 + me)
    try:
        mmu = Mmu(vm, me)
        # the slots it migrates: all but the first (the supervisor's own unmaps and dirty-log oracle use it)
        spans = [(m.base_gfn, m.base_gfn + m.npages) for m in c.memslots[1:]] or \
                [(m.base_gfn, m.base_gfn + m.npages) for m in c.memslots]
        set_status(vm, me, WorkerStatus.READY)
        n = 0
        while not ctl.load(Ctl.STOP):
            lo, hi = rng.choice(spans)
            a = rng.randrange(lo, hi)
            b = min(hi, a + rng.choice([1, 8, 64, hi - lo]))
            if rng.random() < 0.75:
                # reclaim's order: age the pages (clear_flush_young), then unmap them: the guest may touch
                # an aged page while the unmap runs under the write lock
                mmu.clear_young(a, b)
            mmu.host_unmap(a, b, migrate=True, may_block=True)
            n += 1
            if n % 16 == 0:
                mmu.publish_stats()
            time.sleep(rng.random() * 0.002)
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
