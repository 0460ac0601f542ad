"""Handles: the actors' Vcpu, Mmu and reclaimer handles, made once per explorer and put back in place for each execution.

An actor needs its handles (shmmmu.guest.Vcpu, shmmmu.mmu.Mmu, the
reclaimer's Rcu and Pool) as a worker process has them just after it
attached.  Made afresh for every execution they cost about a quarter of a
short one: the Mmu's nine parts, its kernel profile's variants and the debug
checkers put in place.  What a handle keeps from one call to the next is
small: counters, the lock's and RCU's records of this process, its memory
cache's count, the memslot cache, the TLB, the vCPU's root and fault record,
the debug checkers' walk state.  `Handles` makes each handle the first time
an execution asks for it and, every later time, puts that state back as the
constructors leave it, making the constructors' own reads of the region
again, in their order (each is a scheduling point: the execution takes the
same steps either way).

tests/model/test_explore_handles.py holds a handle put back equal, field by
field, to one made afresh, after executions of every scenario, and the
searches equal with and without reuse.  The explorer makes handles afresh
where the steps are traced (their step table names the constructor a step
is in), where coverage is recorded, and with tracepoints.
"""
from __future__ import annotations

import random

import numpy as np

from shmmmu.guest import Vcpu
from shmmmu.layout import N_STATS, VMConfig
from shmmmu.memslots import Memslots
from shmmmu.mmu import Mmu
from shmmmu.mmu.debug import Debug
from shmmmu.mmu.kvm import Kvm
from shmmmu.pool import Pool
from shmmmu.rcu import Rcu
from shmmmu.rwlock import HELD_NONE, LockStats
from shmmmu.tlb import Tlb, TlbControl
from shmmmu.region import Region
from shmmmu.vm import VM
from shmmmu.wait import Waits

_ZEROS = [0] * N_STATS


class Handles:
    """An explorer's handles by worker slot: made on first use, put back in place on every later one."""

    def __init__(self, region: Region, config: VMConfig, waits: Waits):
        """The explorer's region, its configuration and its waits (what every handle is made with)."""
        self.region = region
        self.config = config
        self.waits = waits
        self._vcpus: dict[int, Vcpu] = {}
        self._hosts: dict[int, Mmu] = {}
        self._reclaimer: VM | None = None

    def _vm(self, worker: int) -> VM:
        return VM(self.region, worker, waits=self.waits, config=self.config)

    def vcpu(self, i: int) -> Vcpu:
        """vCPU i's handle, as `Vcpu(VM(region, i), i)` makes it."""
        v = self._vcpus.get(i)
        if v is None:
            v = Vcpu(self._vm(i), i)
            if type(v.tlb) is Tlb:               # the Python processor (the explorer's): a TLB to put back
                self._vcpus[i] = v
            return v
        c = self.config
        Tlb.__init__(v.tlb, c.bits, c.tlb_entries)
        reset_mmu(v.mmu, v.tlb)
        v.sources = {}
        v._batch = ([], [])
        v._kinds = np.zeros(0, dtype=np.int8)
        v._storm_start = 0.0
        v.ad_race_every = 0
        v._ad_race_count = 0
        return v

    def host(self, worker: int) -> Mmu:
        """The Mmu of host worker slot `worker`, as `Mmu(VM(region, worker), worker)` makes it."""
        m = self._hosts.get(worker)
        if m is None:
            m = self._hosts[worker] = Mmu(self._vm(worker), worker)
            return m
        reset_mmu(m, None)
        return m

    def reclaimer(self) -> tuple[Rcu, Pool]:
        """The reclaimer's RCU and pool handles, as `VM(region, reclaimer_worker)` makes them (RCU first)."""
        vm = self._reclaimer
        if vm is None:
            vm = self._vm(self.config.reclaimer_worker)
            out = (vm.rcu, vm.pool)
            self._reclaimer = vm
            return out
        rcu, pool = vm.rcu, vm.pool
        Rcu.__init__(rcu, self.region, vm.worker, self.waits)
        Pool.__init__(pool, self.region, vm.worker, self.config, self.waits)
        return rcu, pool


def reset_mmu(mmu: Mmu, tlb: Tlb | None) -> None:
    """Put an Mmu back as its constructor (shmmmu.mmu.Mmu, Kvm, the parts, the debug checkers) leaves it, the
    constructor's reads made again in its order: the RCU epoch (Rcu), the memory cache's count (Pool), the root
    held and the requests it answers (MmuFault.start_process), the fault walk's first entry, twice (bound
    before and after the debug checkers are in place)."""
    kvm = mmu.kvm
    region, worker, waits, config = kvm.region, kvm.worker, kvm.waits, kvm.config
    # Kvm.__init__, in its order: the mmu_lock, the pages lock, RCU, the memory cache, memslots, TLB requests
    lock = kvm.lock
    lock.mode = HELD_NONE
    lock.abandoned = HELD_NONE
    lock.stats = LockStats()
    lock.on_sleep = None
    lock.wait_started = 0.0
    lock.read_acquired = 0
    lock.write_acquired = 0
    kvm.pages_lock.is_held = False
    Rcu.__init__(kvm.rcu, region, worker, waits)
    Pool.__init__(kvm.pool, region, worker, config, waits)
    Memslots.__init__(kvm.slots, kvm.vm)
    TlbControl.__init__(kvm.tlbctl, kvm.vm, worker, tlb)
    kvm.st[:] = _ZEROS                       # in place: every part and the Vcpu hold this list
    kvm.st_carried = region.array("stats")[worker][:N_STATS].tolist()     # Kvm's list of ints, made at once
    kvm.holds_unflushed = False
    if kvm._torture_delay_s:
        kvm._torture_rng = random.Random(config.seed * 1000 + worker)
    # the parts: MmuFault's state and its first binding (Kvm.new_iter itself: no checker is in place yet)
    fault = mmu.fault
    fault.start_process()
    Kvm.new_iter(kvm, fault.root, 1, 0)
    # the debug checkers (installed by the Mmu after the parts), then the fault path bound again over them
    if mmu.debug_state is not None:
        Debug.__init__(mmu.debug_state, mmu)
    fault.bind_fast_paths()
