"""MMU: the KVM x86 TDP MMU of one process, split as the kernel splits it, composed by one small front (`Mmu`).

  records.py    struct kvm_page_fault and RET_PF_* (the bottom: every part may import it)
  kvm.py        the per-process view of struct kvm: handles, counters, pending flushes; `Part`
  roots.py      the roots: roles, reference counts, invalidation, yield-safe walks over them
  tdp_mmu.py    tdp_mmu.c's core: setters, handle_changed_spte, teardown, the yield
  tdp_map.py    tdp_mmu.c's kvm_tdp_mmu_map, and allocating, linking and accounting tables
  tdp_zap.py    tdp_mmu.c's zaps: a range, all roots, zap-all, one table, collapsible leaves
  tdp_dirty.py  tdp_mmu.c's write protection, dirty-log re-protection and aging
  nx.py         NX huge pages: tracking and recovery (mmu.c)
  mmu.py        the fault entry of mmu.c and the vCPU's root
  notifier.py   the MMU notifier: unmaps (migration) and aging
  ioctl.py      the other lock-taking entry points: zap range, zap-all, memslots, dirty log, destruction
  instruments.py  where debug checks and tracepoints attach (`@site`)
  debug.py      the debug checkers (installed only with debug on)
  tracepoints.py  the kernel's kvm/kvmmmu tracepoint lines (installed only with --tracepoints)

Each part is an object over one `Kvm` owning one kernel file's functions;
none inherits another's, and each holds the siblings it calls by name.  `Mmu`
makes them and, once: puts in place the variants of the VM's kernel profile and
the bug switches it names (shmmmu.variants: each a declared replacement of
kernel functions), chooses the
fault entry and the free for the VM's lock mode, and installs the debug and
tracepoint instruments.  Nothing on the fast paths tests a switch or a flag.
Mirrors the series "Allow parallel MMU operations with TDP MMU" as merged in
5.12-5.13 (docs/internals.md has the version of every behaviour).
"""
from __future__ import annotations

from typing import Any, Callable

from shmmmu.mmu.ioctl import Ioctls
from shmmmu.mmu.kvm import Kvm
from shmmmu.mmu.mmu import MmuFault
from shmmmu.mmu.notifier import Notifier
from shmmmu.mmu.nx import NxHugePages
from shmmmu.mmu.records import (RET_NAMES, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_INVALID, RET_PF_RETRY,
                                RET_PF_SPURIOUS, Fault)
from shmmmu.mmu.roots import Roots
from shmmmu.mmu.tdp_dirty import TdpDirty
from shmmmu.mmu.tdp_map import TdpMap
from shmmmu.mmu.tdp_mmu import TdpMmu
from shmmmu.mmu.tdp_zap import TdpZap
from shmmmu.tlb import Tlb
from shmmmu.variants import replaced_functions
from shmmmu.vm import VM

__all__ = ["Mmu", "Fault", "PARTS", "RET_NAMES", "RET_PF_EMULATE", "RET_PF_FIXED", "RET_PF_INVALID",
           "RET_PF_RETRY", "RET_PF_SPURIOUS"]

# the parts an Mmu is made of: attribute name -> class
PARTS = {"roots": Roots, "tdp": TdpMmu, "map": TdpMap, "zap": TdpZap, "dirty": TdpDirty, "nx_part": NxHugePages,
         "fault": MmuFault, "notifier": Notifier, "ioctl": Ioctls}

# what each part calls on which sibling (the kernel files' calls into each other)
SIBLINGS = {
    "roots": ("zap", "tdp", "map"),
    "tdp": ("map",),
    "map": ("tdp", "nx_part"),
    "zap": ("tdp", "roots"),
    "dirty": ("tdp", "roots", "map"),
    "nx_part": ("zap",),
    "fault": ("roots", "map"),
    "notifier": ("zap", "dirty", "roots"),
    "ioctl": ("roots", "zap", "dirty", "notifier", "fault"),
}

# the operations the rest of shmmmu calls, and the part that has each
ENTRY_POINTS = {
    "fault": ("kvm_mmu_load", "kvm_mmu_unload", "kvm_mmu_reload"),
    "ioctl": ("flush_remote_tlbs", "zap_gfn_range_locked", "zap_all", "destroy", "delete_memslot", "add_memslot",
              "move_memslot",
              "kvm_mmu_zap_all_fast", "zap_all_fast_invalidate", "zap_all_fast_zap", "enable_dirty_logging",
              "disable_dirty_logging", "get_dirty_log", "clear_dirty_log"),
    "notifier": ("host_unmap", "clear_young", "test_young", "young_pages", "present_leaves", "kvm_inc_notifier_count",
                 "kvm_dec_notifier_count", "check_range_unmapped"),
    "nx_part": ("recover_nx_lpages", "nx_list"),
    "roots": ("root_table", "valid_root", "for_each_tdp_mmu_root", "listed_roots"),
}


def _then_pause(faultin: Callable[[Fault], bool], pause: Callable[[], None]) -> Callable[[Fault], bool]:
    """kvm_faultin_pfn, then sometimes a pause (VMConfig.gup_delay_us): between the prologue and mmu_lock is
    the window where a root is invalidated (a955cad84cda) or an invalidation begins (mmu_seq) under a fault;
    the GUP may sleep there in the kernel."""
    def kvm_faultin_pfn_then_pause(fault: Fault) -> bool:
        if faultin(fault):
            pause()
            return True
        return False
    return kvm_faultin_pfn_then_pause


class Mmu:
    """One process's handle on the VM's TDP MMU, as worker slot `worker`: the parts, and the entry points."""

    def __init__(self, vm: VM, worker: int, tlb: Tlb | None = None):
        kvm = self.kvm = Kvm(vm, worker, tlb)
        self.debug_state = None
        self.tracepoints = None
        parts = {name: cls(kvm) for name, cls in PARTS.items()}
        for name, part in parts.items():
            for sibling in SIBLINGS[name]:
                setattr(part, sibling, parts[sibling])
            setattr(self, name, part)
        # the variants of this VM's kernel and the switches it names, each in place of the function it replaces
        for target, replacement in replaced_functions(vm.config.kernel, list(vm.config.bugs)).items():
            part_name, fn = target.split(".")
            part = parts[part_name]
            setattr(part, fn, getattr(part, replacement))
        # the lock mode's design: the series' fault entry and RCU-deferred free, or the baseline's
        fault, tdp = self.fault, self.tdp
        if kvm.config.gup_delay_us:             # the fault's prologue sleeps sometimes, as the GUP may
            fault.kvm_faultin_pfn = _then_pause(fault.kvm_faultin_pfn, kvm.gup_delay)
        fault.page_fault = fault.kvm_tdp_mmu_page_fault if kvm.parallel else fault.direct_page_fault
        if not kvm.parallel:
            tdp.free_sp = tdp.free_sp_now
        if kvm.debug:                           # the debug checkers, at their sites
            from shmmmu.mmu import debug
            self.debug_state = debug.install(self)
        if kvm.config.tracepoints:              # --tracepoints: the kernel's trace lines (outermost wrappers)
            from shmmmu.mmu import tracepoints
            self.tracepoints = tracepoints.install(self, kvm.config.tracepoints)
        fault.bind_fast_paths()                 # after the instruments: the fault path binds what they made
        # the entry points, bound once (a vCPU's fault path calls page_fault at every EPT violation)
        self.page_fault = fault.page_fault
        self.publish_stats = kvm.publish_stats
        for part_name, names in ENTRY_POINTS.items():
            part = parts[part_name]
            for n in names:
                setattr(self, n, getattr(part, n))

    @property
    def root(self) -> int:
        """This vCPU's root table (vcpu->arch.mmu->root_hpa; 0: none loaded)."""
        return self.fault.root

    @property
    def root_row(self) -> int:
        return self.fault.root_row

    def __getattr__(self, name: str) -> Any:
        # the handles of struct kvm (lock, rcu, pool, tables, ctl, st, config, ...): the Kvm's
        if name == "kvm":
            raise AttributeError(name)
        return getattr(self.kvm, name)
