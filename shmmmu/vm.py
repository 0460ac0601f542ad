"""VM: create, attach and tear down one VM's region, and hand each process its handles on the shared mechanisms.

`create_vm(config)` builds the region from `layout.section_shapes`, fills the
table pool, the memslots and guest memory, and returns a `VM` owned by the
creator.  Workers and the inspector call `attach_vm(name)`.  A `VM` gives one
process its handles (`mmu_lock`, `rcu`, `pool`, ...) made for its worker slot,
each waiting through the VM's `waits` (shmmmu.wait: the real thing, or the
interleaving explorer's scheduler).
"""
from __future__ import annotations

import dataclasses
import os
from functools import cached_property

from shmmmu.layout import Locks, VMConfig, WState, section_shapes, semaphore_purposes
from shmmmu.region import NameInUse, Region, RegionError
from shmmmu.rwlock import Mutex, RWLock
from shmmmu.wait import REAL, Waits


class VM:
    """One process's attachment to a VM region, as worker slot `worker`."""

    def __init__(self, region: Region, worker: int | None = None, waits: Waits = REAL,
                 config: VMConfig | None = None):
        self.region = region
        self.config = config if config is not None else VMConfig.from_json(region.config)
        self.name = region.name
        self.worker = worker
        self.waits = waits

    # per-process handles, made on first use
    @cached_property
    def mmu_lock(self) -> RWLock:
        return RWLock(self.region, Locks.MMU, self._me(), waits=self.waits)

    @cached_property
    def pages_lock(self) -> Mutex:
        return Mutex(self.region, Locks.PAGES, self._me(), self.waits)

    @cached_property
    def rcu(self):
        from shmmmu.rcu import Rcu
        return Rcu(self.region, self._me(), self.waits)

    @cached_property
    def pool(self):
        from shmmmu.pool import Pool
        return Pool(self.region, self._me(), self.config, self.waits)

    def _me(self) -> int:
        if self.worker is None:
            raise RegionError("this attachment has no worker slot (read-only inspection)")
        return self.worker

    def register(self, worker: int, role: int) -> None:
        """Claim a worker slot: record pid and role so the supervisor and `held_by` can name us."""
        self.worker = worker
        ws = self.region.columns("wstate", WState)
        ws.pid.store(worker, os.getpid())
        ws.role.store(worker, role)

    def close(self) -> None:
        for k in ("mmu_lock", "pages_lock", "rcu", "pool"):
            self.__dict__.pop(k, None)
        self.region.close()

    def unlink(self) -> None:
        self.region.unlink()

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: object) -> None:
        owner = self.region.owner
        try:
            self.close()
        finally:
            if owner:
                self.unlink()


def create_region(config: VMConfig, replace: bool = False) -> Region:
    """The bare region of a VM (sections and semaphores), nothing initialised beyond zeros."""
    config = config.derived()
    return Region.create(config.name, section_shapes(config), config.to_json(), semaphore_purposes(config),
                         replace=replace)


FREE_NAME_TRIES = 1000


def create_vm(config: VMConfig, worker: int | None = None, replace: bool = False, free_name: bool = False) -> VM:
    """Create and initialise a VM region; the caller owns it (context exit unlinks it).

    With `free_name`, a name in use is no error: the VM takes the first free of NAME, NAME-2, NAME-3, ...
    The segment's O_EXCL creation is what decides, so two creators at once never take the same name."""
    base = config.name
    for k in range(1, FREE_NAME_TRIES + 1):
        try:
            region = create_region(config, replace=replace)
            break
        except NameInUse:
            if not free_name or k == FREE_NAME_TRIES:
                raise
            config = dataclasses.replace(config, name=f"{base}-{k + 1}")
    try:
        vm = VM(region, worker)
        from shmmmu.pool import Pool
        Pool(region, vm.config.host_worker, vm.config).init_all_free()
        from shmmmu.memslots import init_memslots
        init_memslots(vm)
        if vm.config.mmu_seq_start:
            from shmmmu.layout import Ctl
            vm.region.words("ctl").store(Ctl.NOTIFIER_SEQ, vm.config.mmu_seq_start)
    except BaseException:
        region.close()
        region.unlink()
        raise
    return vm


def attach_vm(name: str, worker: int | None = None, readonly: bool = False) -> VM:
    return VM(Region.attach(name, readonly=readonly), worker)
