"""vCPU worker: one process running a vCPU's guest accesses, faulting into the shared tables.

Started by the supervisor as `python -m shmmmu.workers.vcpu --vm NAME --id I`.  It
waits for the supervisor to publish an iteration, runs that iteration's
accesses (shmmmu.workloads) in guest mode, publishes its counters and
acknowledges; `stress` iterations run until the supervisor says stop.  With
Workload.zap_every, one chunk in N ends with a kvm_zap_gfn_range of 8 pages
from this vCPU's thread (outside guest mode, under the read lock), as a guest's
MTRR write causes: range walks over the roots then run from several threads at once.
"""
from __future__ import annotations

import sys
import time
import traceback

from shmmmu import violations
from shmmmu.guest import Vcpu
from shmmmu.layout import Ctl, Role, WorkerStatus, WState
from shmmmu.memslots import Memslots
from shmmmu.workloads import accesses, make_value, trace_chunk
from shmmmu.workers.common import set_status, start_worker

CHUNK = 256
PUBLISH_EVERY = 16       # chunks between publications of this vCPU's counters (about 2 us each)


def run_iteration(vm, vcpu: Vcpu, me: int, iteration: int, base_gfn: int) -> None:
    ctl = vm.region.words("ctl")
    row = vm.region.columns("wstate", WState)
    w = vm.config.workload
    seed = vm.config.seed
    continuous = w.kind == "stress"
    streamed = w.kind == "trace"         # a converted trace file, read a chunk at a time
    sub = 0
    chunks = me                          # staggered: the vCPUs' own zaps do not all fall together
    while True:
        if streamed:
            gfns, kinds = trace_chunk(w, base_gfn, me, sub)
            if not len(gfns):
                return
        else:
            gfns, kinds = accesses(w, base_gfn, me, iteration * 100000 + sub if continuous else iteration, seed)
        n = len(gfns)
        vcpu.load_batch(gfns, kinds)
        vbase = make_value(0, me, iteration)     # a write stores vbase | gfn (Vcpu.run_batch)
        vcpu.enter()
        try:
            for k in range(0, n, CHUNK):
                vcpu.run_batch(k, min(n, k + CHUNK), vbase)
                chunks += 1
                if w.zap_every and chunks % w.zap_every == 0:
                    vcpu.exit()
                    try:
                        g = int(gfns[k])
                        vcpu.mmu.zap_gfn_range_locked(g, g + 8)      # update_mtrr -> kvm_zap_gfn_range
                    finally:
                        vcpu.enter()
                row.heartbeat.store(me, row.heartbeat.load(me) + 1)
                row.progress_ns.store(me, time.monotonic_ns())
                if (k // CHUNK) % PUBLISH_EVERY == PUBLISH_EVERY - 1:
                    vcpu.mmu.publish_stats()        # counters move during a long iteration (inspect --watch)
                if ctl.load(Ctl.STOP):
                    return
        finally:
            vcpu.exit()
        vcpu.mmu.publish_stats()
        if not (continuous or streamed):
            return
        sub += 1


def main() -> None:
    vm, args = start_worker("a vCPU of a shmmmu VM", Role.VCPU)
    me = args.id
    ctl = vm.region.words("ctl")
    try:
        vcpu = Vcpu(vm, me)
        slots = Memslots(vm).slots()
        base_gfn = slots[0].base_gfn if slots else 0
        set_status(vm, me, WorkerStatus.READY)
        iteration_col = vm.region.columns("wstate", WState).iteration
        done = iteration_col.load(me)
        while True:
            spins = 0
            while ctl.load(Ctl.ITERATION) == done and not ctl.load(Ctl.STOP):
                spins += 1
                time.sleep(0 if spins < 100 else 0.0005)
            if ctl.load(Ctl.STOP):
                break
            target = ctl.load(Ctl.ITERATION)
            run_iteration(vm, vcpu, me, target, base_gfn)
            vcpu.mmu.publish_stats()
            done = target
            iteration_col.store(me, done)
        vcpu.mmu.publish_stats()
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
