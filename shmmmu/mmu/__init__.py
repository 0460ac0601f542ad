"""MMU: the KVM x86 TDP MMU of one process, split as the kernel splits it, behind one facade (`Mmu`).

  kvm.py       the per-process view of struct kvm: handles, counters, pending flushes
  roots.py     the roots: roles, reference counts, invalidation, yield-safe walks over them
  tdp_mmu.py   arch/x86/kvm/mmu/tdp_mmu.c: setters, changes, teardown, map, zaps, write protection
  nx.py        NX huge pages: accounting and recovery (mmu.c)
  mmu.py       the fault entry of mmu.c: struct kvm_page_fault, the notifier recheck, hugepage adjust
  ioctl.py     the lock-taking entry points: zap range, zap-all, notifier, memslots, dirty logging
  debug.py     the debug checkers, installed over an Mmu only when the VM runs with debug on
  tracepoints.py  the kernel's kvm/kvmmmu tracepoint lines, installed only with --tracepoints

`Mmu(vm, worker)` composes them and, once, chooses: the fault entry for the
VM's lock mode, the reverted variant of each function a bug switch names, the
debug wrappers and the tracepoint wrappers.  Nothing on the fast paths tests a switch or a debug flag.
Mirrors the series "Allow parallel MMU operations with TDP MMU" as merged in
5.12-5.13 (docs/internals.md has the version of every behaviour).
"""
from __future__ import annotations

from shmmmu.mmu.ioctl import KvmIoctls
from shmmmu.mmu.mmu import Fault
from shmmmu.mmu.tdp_mmu import (RET_NAMES, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_INVALID, RET_PF_RETRY,
                                RET_PF_SPURIOUS)
from shmmmu.tlb import Tlb
from shmmmu.vm import VM

__all__ = ["Mmu", "Fault", "RET_NAMES", "RET_PF_EMULATE", "RET_PF_FIXED", "RET_PF_INVALID", "RET_PF_RETRY",
           "RET_PF_SPURIOUS"]


class Mmu(KvmIoctls):
    """One process's handle on the VM's TDP MMU (kvm->arch.tdp_mmu_*), as worker slot `worker`."""
    __slots__ = ("debug_state", "tracepoints")

    def __init__(self, vm: VM, worker: int, tlb: Tlb | None = None):
        super().__init__(vm, worker, tlb)
        b = self.bugs
        # the fault entry: the series' or the baseline's, or 5.13's with a fault-entry switch on
        if b.pages_lock_in_read_fault or b.no_notifier_recheck or b.fault_into_invalid_root:
            self.page_fault = self.page_fault_reverted
        elif self.parallel:
            self.page_fault = self.kvm_tdp_mmu_page_fault
        else:
            self.page_fault = self.direct_page_fault
        # functions a switch reverts whole
        if b.fault_plain_store:
            self.tdp_mmu_set_spte_atomic = self.set_spte_atomic_k4_plain_store
        elif b.cas_over_removed:
            self.tdp_mmu_set_spte_atomic = self.set_spte_atomic_k8_accepts_removed
        if b.fault_zap_flush_late:
            self.tdp_mmu_zap_spte_atomic = self.zap_spte_atomic_k5_flush_late
        if b.yield_with_owed_flush:
            self.kvm_tdp_mmu_zap_gfn_range = self.zap_gfn_range_k11_flush_not_passed
        if b.exclusive_plain_store:
            self.kvm_tdp_mmu_write_spte = self.write_spte_k14_plain_store
        if b.zero_removed_children:
            self.freeze_removed_entries = self.freeze_k6_zero_children
        if b.link_after_publish:
            self.tdp_mmu_link_sp = self.link_sp_k18_page_list
            self.tdp_mmu_unlink_sp = self.unlink_sp_k18_page_list
        if b.root_refcount_plain:
            self.refcount_inc_not_zero = self.refcount_inc_not_zero_plain
            self.refcount_dec_and_test = self.refcount_dec_and_test_plain
        if b.notifier_unsafe_root_walk:
            self.kvm_tdp_mmu_unmap_gfn_range = self.unmap_gfn_range_unsafe_root_walk
        if b.rcu_free_immediately or not self.parallel:
            self.free_sp = self.free_sp_now
        self.debug_state = None
        if self.debug:
            from shmmmu.mmu import debug
            self.debug_state = debug.install(self)
        self.tracepoints = None
        if self.config.tracepoints:             # --tracepoints: the kernel's trace lines (outermost wrappers)
            from shmmmu.mmu import tracepoints
            self.tracepoints = tracepoints.install(self, self.config.tracepoints)
