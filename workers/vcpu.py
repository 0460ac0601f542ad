"""vCPU worker: one process running a vCPU's guest accesses, faulting into the shared tables.

Started by the supervisor as `python -m workers.vcpu --vm NAME --id I`.  It
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
from shmmmu.workloads import EXEC, GFN_MASK, WRITE, accesses, make_value
from workers.common import set_status, start_worker

CHUNK = 256
PUBLISH_EVERY = 16       # chunks between publications of this vCPU's counters (about 2 us each)


def run_iteration(vm, vcpu: Vcpu, me: int, iteration: int, base_gfn: int) -> None:
    ctl = vm.region.words("ctl")
    ws = vm.region.words("wstate")
    row = me * WState.WORDS
    w = vm.config.workload
    seed = vm.config.seed
    continuous = w.kind == "stress"
    sub = 0
    chunks = me                          # staggered: the vCPUs' own zaps do not all fall together
    while True:
        gfns, kinds = accesses(w, base_gfn, me, iteration * 100000 + sub if continuous else iteration, seed)
        gl, wl = gfns.tolist(), kinds.tolist()
        vcpu.enter()
        try:
            for k in range(0, len(gl), CHUNK):
                for g, kind in zip(gl[k:k + CHUNK], wl[k:k + CHUNK]):
                    if kind == WRITE:
                        vcpu.write(g, make_value(g, me, iteration))
                    else:
                        v = vcpu.fetch(g) if kind == EXEC else vcpu.read(g)
                        if v and (v & GFN_MASK) != (g & GFN_MASK) and v >> 63:
                            vcpu.mmu.violation("guest-memory-corrupt", g, v, 0)
                chunks += 1
                if w.zap_every and chunks % w.zap_every == 0:
                    vcpu.exit()
                    try:
                        vcpu.mmu.zap_gfn_range_locked(gl[k], gl[k] + 8)      # update_mtrr -> kvm_zap_gfn_range
                    finally:
                        vcpu.enter()
                ws.store(row + WState.HEARTBEAT, ws.load(row + WState.HEARTBEAT) + 1)
                ws.store(row + WState.PROGRESS_NS, time.monotonic_ns())
                if (k // CHUNK) % PUBLISH_EVERY == PUBLISH_EVERY - 1:
                    vcpu.mmu.publish_stats()        # counters move during a long iteration (inspect --watch)
                if ctl.load(Ctl.STOP):
                    return
        finally:
            vcpu.exit()
        vcpu.mmu.publish_stats()
        if not continuous:
            return
        sub += 1


def main() -> None:
    vm, args = start_worker("a vCPU of a shmmmu VM", Role.VCPU)
    me = args.id
    ctl = vm.region.words("ctl")
    ws = vm.region.words("wstate")
    try:
        vcpu = Vcpu(vm, me)
        slots = Memslots(vm).slots()
        base_gfn = slots[0].base_gfn if slots else 0
        set_status(vm, me, WorkerStatus.READY)
        done = ws.load(me * WState.WORDS + WState.ITERATION)
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
            ws.store(me * WState.WORDS + WState.ITERATION, done)
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
