"""MMU fault: arch/x86/kvm/mmu/mmu.c's side of a TDP page fault, from the EPT violation to kvm_tdp_mmu_map, and a vCPU's root.

A fault is described by one `Fault` record (struct kvm_page_fault): the vCPU
fills in what it knows (gfn, write, exec), the prologue adds the memslot, the
host page, the notifier sequence and the levels, and kvm_tdp_mmu_map
(tdp_map.py) works from it.  The entry point is chosen when the Mmu is built:

- `kvm_tdp_mmu_page_fault` (the series, lock_mode shared): read lock, the
  notifier recheck, map; make_mmu_pages_available is not called, as after the
  fix of CVE-2022-45869;
- `direct_page_fault` (the pre-series baseline, lock_mode exclusive): write
  lock, make_mmu_pages_available, the same recheck and map with plain stores.

Both entries retry a fault whose root was invalidated while it was on its way
to the lock (is_page_fault_stale, a955cad84cda): the vCPU then takes its
reload request on the way back into the guest.  A vCPU's root is loaded
(kvm_mmu_load) on guest entry when it has none, and unloaded when a reload
request (kvm_reload_remote_mmus) reaches it; a fault taken with no root loaded
(a caller driving the MMU without a Vcpu) loads one first, as the entry would.
This part holds what struct kvm_mmu holds for the vCPU: its root, and the
fault's walk and record, made once and reused (the kernel's are on the stack).
"""
from __future__ import annotations

from typing import Any

from shmmmu.layout import STAT, Ctl, MemslotFlags
from shmmmu.memslots import Slot
from shmmmu.mmu.instruments import site
from shmmmu.mmu.kvm import Kvm, Part
from shmmmu import spte as S
from shmmmu.mmu.records import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_INVALID, RET_PF_RETRY, RET_PF_SPURIOUS, Fault
from shmmmu.rwlock import HELD_WRITE
from shmmmu.userfault import MISSING, handle_userfault

_ST_FAULTS = STAT["faults"]
_ST_EMULATED = STAT["emulated"]
_ST_FIXED = STAT["fixed"]
_ST_SPURIOUS = STAT["spurious"]
_ST_RETRIES = STAT["retries"]
_ST_RESULT = [0] * 5                     # RET_PF_* -> its counter (a list: the values are 0..4)
_ST_RESULT[RET_PF_RETRY], _ST_RESULT[RET_PF_FIXED], _ST_RESULT[RET_PF_SPURIOUS] = _ST_RETRIES, _ST_FIXED, _ST_SPURIOUS
_ST_NOTIFIER_RETRIES = STAT["notifier_retries"]
_ST_STALE_ROOT = STAT["stale_root_retries"]
_ST_DURING_FAST_ZAP = STAT["faults_during_fast_zap"]
_ST_RELOADS = STAT["root_reloads"]
_C_FAST_ZAPS = Ctl.FAST_ZAPS
_C_SEQ, _C_COUNT, _C_START, _C_END = Ctl.NOTIFIER_SEQ, Ctl.NOTIFIER_COUNT, Ctl.NOTIFIER_START, Ctl.NOTIFIER_END
_MSF_LOG_DIRTY = MemslotFlags.LOG_DIRTY
_ST_FAST_FIXED = STAT["fast_pf_fixed"]
_P, _L, _W, _X, _MMU_W = S.MMU_PRESENT, S.LARGE, S.WRITABLE, S.EXECUTABLE, S.MMU_WRITABLE
_U32_SIGN = 1 << 31
_MISSING_SHIFT = MISSING.bit_length() - 1     # the only bit of a host map entry from there up


class MmuFault(Part):
    """The fault entry of mmu.c over the TDP MMU, and the vCPU's root (vcpu->arch.mmu)."""

    __slots__ = ("roots", "map", "role", "root_row", "root", "fault_record", "fault_walk", "memslot_gen",
                 "invalid_col", "mmu_read_lock", "mmu_read_unlock", "rcu_read_lock", "rcu_read_unlock")
    roots: Any                      # the roots part
    map: Any                        # the tdp_map part: kvm_tdp_mmu_map

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)
        c = self.config
        self.role = self.worker % c.root_roles if self.worker < c.n_vcpus else 0
        self.invalid_col = self.root_rows.invalid
        self.memslot_gen = self.slots.slot_rows.gen
        self.start_process()
        self.bind_fast_paths()

    def start_process(self) -> None:
        """What this process's MMU starts from, read from the region: the root it holds and the requests that
        root answers, and an empty fault record.  The constructor's; the explorer calls it again when it puts
        a handle it keeps from one execution to the next back in place (shmmmu.explore.handles)."""
        # the root this process's MMU uses (a vCPU's mmu->root_hpa): its row and table; -1 / 0 none.
        # WState.ROOT records the reference it holds, for VM destruction, recovery and the checkers
        held = self.wstate.root.load(self.worker)
        self.root_row = held - 1
        self.root = self.root_rows.table.load(self.root_row) if held else 0
        # the reload requests (kvm_reload_remote_mmus) this root answers (TlbControl.roots_gen, which
        # guest entry compares); an invalid or missing root answers none.  The generation is read first:
        # an invalidation between the two reads then shows as a generation that moved
        gen = self.ctl.load(Ctl.ROOTS_GEN)
        self.tlbctl.roots_gen = gen if held and not self.invalid_col.load(self.root_row) else -1
        # struct kvm_page_fault lives on the fault's stack in the kernel: one record per process, filled
        # in afresh by each fault (a fault never outlives its call, and a process takes one at a time)
        self.fault_record = Fault(0, False, False)

    def bind_fast_paths(self) -> None:
        """The fault path's walk, and its lock and RCU calls bound once (Python 3.11 specializes the call of
        a bound C function, not that of a C method on a subclass; RWLock and Rcu derive from their C fast
        paths).  The Mmu front binds them again once the instruments are in place."""
        self.fault_walk = self.kvm.new_iter(self.root, 1, 0)
        self.mmu_read_lock, self.mmu_read_unlock = self.lock.read_lock, self.lock.read_unlock
        self.rcu_read_lock, self.rcu_read_unlock = self.rcu.read_lock, self.rcu.read_unlock

    # ------------------------------------------------------------------ the vCPU's root

    def kvm_mmu_load(self) -> None:
        """kvm_mmu_load(): top up the caches, get a root under the write lock (mmu_alloc_direct_roots ->
        kvm_tdp_mmu_get_vcpu_root_hpa), load it, and flush this vCPU's translations (tlb_flush_current)."""
        self.pool.topup()
        lock = self.lock
        lock.write_lock()
        try:
            gen = self.ctl.load(Ctl.ROOTS_GEN)      # every reload request before this one is answered
            row = self.roots.kvm_tdp_mmu_get_vcpu_root(self.role)
            self.wstate.root.store(self.worker, row + 1)
        finally:
            lock.write_unlock()
        self.root_row = row
        self.root = self.roots.root_table(row)
        self.tlbctl.roots_gen = gen
        self.tlbctl.flush_current()
        self.st[_ST_RELOADS] += 1

    def kvm_mmu_unload(self) -> None:
        """kvm_mmu_unload() -> kvm_mmu_free_roots(): put this vCPU's root under the write lock."""
        row = self.root_row
        if row < 0:
            return
        lock = self.lock
        lock.write_lock()
        try:
            self.wstate.root.store(self.worker, 0)
            self.roots.kvm_tdp_mmu_put_root(row, False)
        finally:
            lock.write_unlock()
        self.root_row = -1
        self.root = 0

    def kvm_mmu_load_612(self) -> None:
        """kvm_mmu_load() (6.12): top up the caches, get a root (mmu_alloc_direct_roots -> kvm_tdp_mmu_alloc_root,
        which takes mmu_lock for read itself: dab285e4ec73), load it, and flush this vCPU's translations.  The
        reload requests it answers are read before the lock: one made meanwhile only costs a second reload."""
        self.pool.topup()
        gen = self.ctl.load(Ctl.ROOTS_GEN)
        row = self.roots.kvm_tdp_mmu_get_vcpu_root(self.role)       # kvm_tdp_mmu_alloc_root in 6.12
        self.root_row = row
        self.root = self.roots.root_table(row)
        self.tlbctl.roots_gen = gen
        self.tlbctl.flush_current()
        self.st[_ST_RELOADS] += 1

    def kvm_mmu_unload_612(self) -> None:
        """kvm_mmu_unload() -> kvm_mmu_free_roots() (6.12): a TDP MMU root is put under the read lock
        (576a15de8d29); its last reference is not the vCPU's (the TDP MMU holds one until the root is zapped)."""
        row = self.root_row
        if row < 0:
            return
        kvm = self.kvm
        shared = self.parallel                  # the exclusive baseline takes the write lock for everything
        kvm.mmu_lock(shared)
        try:
            self.wstate.root.store(self.worker, 0)
            self.roots.kvm_tdp_mmu_put_root(row, shared)
        finally:
            kvm.mmu_unlock(shared)
        self.root_row = -1
        self.root = 0

    def kvm_mmu_reload(self) -> None:
        """The root half of vcpu_enter_guest: KVM_REQ_MMU_RELOAD unloads the root, kvm_mmu_reload loads one."""
        if self.tlbctl.roots_gen != self.ctl.load(Ctl.ROOTS_GEN):
            self.kvm_mmu_unload()
        if self.root_row < 0:
            self.kvm_mmu_load()

    def forget_root(self) -> None:
        """The root this process held was put by someone else (VM destruction puts every vCPU's)."""
        self.root_row, self.root = -1, 0

    def root_is_obsolete(self) -> bool:
        """is_obsolete_sp(vcpu->arch.mmu->root_hpa): the root was invalidated (a955cad84cda)."""
        if self.invalid_col.load(self.root_row):     # (a branch, not `!= 0`: CPython specializes that)
            return True
        return False

    def root_never_obsolete(self) -> bool:
        """Variant fault-into-invalid-root (5.13 before a955cad84cda): no check of the root under the lock."""
        return False

    # ------------------------------------------------------------------ the fault's prologue

    @site("debug")
    def kvm_faultin_pfn(self, fault: Fault) -> bool:
        """The fault's prologue, outside the lock: top up the caches, read mmu_seq, find the slot and the
        host page (the GUP), and the levels; False if there is no memslot (an emulated MMIO access)."""
        pool = self.pool
        if pool.count < pool.min:
            pool.topup()                              # mmu_topup_memory_caches(): may sleep
        fault.mmu_seq = self.ctl.load(_C_SEQ)
        slots = self.slots
        gfn = fault.gfn
        slot = fault.slot = slots.lookup(gfn)
        if slot is None:
            return False
        pfn = fault.pfn = slots.gfn_to_pfn(slot, gfn)      # may be stale by the time we install
        if pfn >> _MISSING_SHIFT:                     # (pfn & MISSING: no host page reaches that bit)
            fault.pfn = handle_userfault(self, slot, gfn)  # the GUP met a userfaultfd MISSING page
        self.kvm_mmu_hugepage_adjust(fault, slot)
        return True

    def kvm_mmu_hugepage_adjust(self, fault: Fault, slot: Slot) -> None:
        """kvm_mmu_hugepage_adjust(): the largest level the slot allows (4K while logging), then the NX clamp.
        Like the kernel's, it returns early on a slot that tracks dirty pages (or allows only 4K) before it
        asks for the host mapping level."""
        if slot.huge_level == 1 or slot.flags & _MSF_LOG_DIRTY:
            level = fault.max_level = fault.req_level = 1
        else:
            level = fault.max_level = fault.req_level = self.slots.max_mapping_level(slot, fault.gfn)
        if fault.exec and self.nx:
            fault.huge_page_disallowed = True
            if level > 1:
                level = 1                         # the iTLB multihit workaround (nx_huge_pages)
        fault.goal_level = level

    @site("debug")
    def mmu_notifier_retry_hva(self, fault: Fault) -> bool:
        """mmu_notifier_retry_hva(): an invalidation in progress covers the page, or one completed since
        mmu_seq was read; plus the memslot-generation recheck (the kernel uses SRCU for the latter)."""
        ctl = self.ctl
        if ctl.load(_C_COUNT) and ctl.load(_C_START) <= fault.gfn < ctl.load(_C_END):
            return True
        if ctl.load(_C_SEQ) != fault.mmu_seq:
            return True
        slot = fault.slot
        if self.memslot_gen.load(slot.id) != slot.gen:
            return True
        return False

    def mmu_notifier_retry_hva_b10_int_snapshot(self, fault: Fault) -> bool:
        """Variant mmu-seq-int-snapshot (B10, 6.1.y before d75c1b7bdedd): the fault's snapshot of
        mmu_invalidate_seq is an int, compared with the unsigned long sequence after sign extension; from
        2^31 on they never match, and every fault is stale."""
        ctl = self.ctl
        if ctl.load(_C_COUNT) and ctl.load(_C_START) <= fault.gfn and fault.gfn < ctl.load(_C_END):
            return True                                       # (as mmu_notifier_retry_hva)
        snapshot = fault.mmu_seq & 0xFFFFFFFF                 # int mmu_seq = kvm->mmu_invalidate_seq
        if snapshot & _U32_SIGN:
            snapshot |= ~0xFFFFFFFF & 0xFFFFFFFFFFFFFFFF        # (unsigned long)mmu_seq: sign-extended
        if ctl.load(_C_SEQ) != snapshot:
            return True
        slot = fault.slot
        return self.memslot_gen.load(slot.id) != slot.gen

    def notifier_retry_never(self, fault: Fault) -> bool:
        """Variant no-notifier-recheck: no mmu_notifier_retry_hva under the lock; a fault that resolved its
        host page before an unmap installs it afterwards."""
        return False

    def make_mmu_pages_available(self) -> None:
        """Legacy shadow-page reclaim: it needs the write lock (CVE-2022-45869 ran it under the read lock)."""
        if self.lock.mode != HELD_WRITE:
            self.kvm._lockdep(HELD_WRITE)

    # ------------------------------------------------------------------ the entry points

    @site("trace", "timeline")
    def page_fault(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """An EPT violation on gfn; returns a RET_PF_* value (the Mmu front binds it to its VM's entry)."""
        raise NotImplementedError("the Mmu binds page_fault to its entry point when it is built")

    def _begin(self, gfn: int, write: bool, exec_fault: bool) -> Fault | None:
        """What both entries do before the lock: count, load a root if none, fill in the record, faultin."""
        st = self.st
        st[_ST_FAULTS] += 1
        if self.root_row < 0:
            self.kvm_mmu_load()
        fault = self.fault_record
        fault.gfn, fault.write, fault.exec, fault.huge_page_disallowed = gfn, write, exec_fault, False
        if not self.kvm_faultin_pfn(fault):
            st[_ST_EMULATED] += 1
            return None
        return fault

    def kvm_tdp_mmu_page_fault(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """kvm_tdp_mmu_page_fault() (the series, after the CVE-2022-45869 fix): the map under the read lock."""
        st = self.st                                     # _begin(), written out: the fault path's own
        st[_ST_FAULTS] += 1
        if self.root_row < 0:
            self.kvm_mmu_load()
        fault = self.fault_record
        fault.gfn = gfn
        fault.write = write
        fault.exec = exec_fault
        fault.huge_page_disallowed = False
        if not self.kvm_faultin_pfn(fault):
            st[_ST_EMULATED] += 1
            return RET_PF_EMULATE
        r = RET_PF_RETRY
        read_lock, read_unlock = self.mmu_read_lock, self.mmu_read_unlock      # of kvm->mmu_lock
        read_lock()
        try:
            if self.root_is_obsolete():
                st[_ST_STALE_ROOT] += 1
            elif self.mmu_notifier_retry_hva(fault):
                st[_ST_NOTIFIER_RETRIES] += 1
            else:
                r = self.map.kvm_tdp_mmu_map(self, fault, True)
                if r == RET_PF_FIXED and self.ctl.load(_C_FAST_ZAPS):
                    st[_ST_DURING_FAST_ZAP] += 1
        finally:
            read_unlock()
        st[_ST_RESULT[r]] += 1
        return r

    # ------------------------------------------------------------------ 6.12: the lockless fast page fault

    def page_fault_fast_first(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """6.12's direct_page_fault over the TDP MMU (profile 6.12): fast_page_fault first, and the fault path
        proper (kvm_tdp_mmu_page_fault, as 5.13 has it) only if that could not fix the fault."""
        r = self.fast_page_fault(gfn, write, exec_fault)
        if r != RET_PF_INVALID:
            st = self.st
            st[_ST_FAULTS] += 1
            st[_ST_RESULT[r]] += 1
            return r
        return MmuFault.kvm_tdp_mmu_page_fault(self, gfn, write, exec_fault)

    def fast_page_fault(self, gfn: int, write: bool, exec_fault: bool) -> int:
        """fast_page_fault() (mmu.c; the TDP MMU's since 6e8eb2060cc7): without mmu_lock, inside an RCU
        read-side section (kvm_tdp_mmu_walk_lockless_begin), find the last entry on gfn's path; a write to a
        present leaf that is MMU-writable but not writable (write-protected for dirty logging) is fixed by
        one cmpxchg that sets W, and the page is then logged dirty (fast_pf_fix_direct_spte).  A huge leaf
        in a slot that logs is left to the slow path, which splits it.  RET_PF_INVALID: not fixed here."""
        if not write:                              # page_fault_can_be_fast(): A/D bits on, so only a write
            return RET_PF_INVALID
        slot = self.slots.lookup(gfn)              # fault->slot, looked up before the fast path
        if slot is None:
            return RET_PF_INVALID
        ret = RET_PF_INVALID
        tables = self.tables
        self.rcu_read_lock()
        try:
            retry_count = 0
            while True:
                sptep, spte, level = self.kvm_tdp_mmu_fast_pf_get_last_sptep(gfn)
                if not spte & _P:
                    break
                if not (level == 1 or spte & _L):
                    break                          # !is_last_spte()
                if spte & _W and (not exec_fault or spte & _X):
                    ret = RET_PF_SPURIOUS          # is_access_allowed(): fixed already, or a lazy TLB
                    break
                new = spte
                if spte & _MMU_W:
                    new |= _W
                    if level > 1 and slot.flags & _MSF_LOG_DIRTY:
                        break                      # a huge page in a logging slot: the slow path splits it
                if new == spte or (exec_fault and not new & _X):
                    break
                if tables.cas(sptep, spte, new) == spte:     # fast_pf_fix_direct_spte()
                    if new & _W and not spte & _W and slot.flags & _MSF_LOG_DIRTY:
                        self.slots.mark_dirty(slot, gfn)    # mark_page_dirty_in_slot(fault->slot)
                    self.st[_ST_FAST_FIXED] += 1
                    ret = RET_PF_FIXED
                    break
                retry_count += 1
                if retry_count > 4:                # "Fast #PF retrying more than 4 times."
                    break
        finally:
            self.rcu_read_unlock()
        return ret

    def kvm_tdp_mmu_fast_pf_get_last_sptep(self, gfn: int) -> tuple[int, int, int]:
        """kvm_tdp_mmu_fast_pf_get_last_sptep(): walk this vCPU's root towards gfn (caller in an RCU read-side
        section, no lock) and return the last entry reached: (sptep, value, level)."""
        it = self.fault_walk.start(self.root, 1, gfn)     # the slow path's walk, unused until it runs
        sptep, spte, level = it.sptep, it.old_spte, it.level
        while it.valid and it.gfn <= gfn:
            sptep, spte, level = it.sptep, it.old_spte, it.level
            if not spte & _P or level == 1 or spte & _L:
                break
            it.next()
        return sptep, spte, level

    def page_fault_k15_reclaim_under_read_lock(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """Variant pages-lock-in-read-fault (K15, CVE-2022-45869): 5.13's direct_page_fault for a TDP fault,
        make_mmu_pages_available (write-lock-only reclaim) under the read lock."""
        fault = self._begin(gfn, write, exec_fault)
        if fault is None:
            return RET_PF_EMULATE
        st = self.st
        r = RET_PF_RETRY
        self.lock.read_lock()
        try:
            if self.root_is_obsolete():
                st[_ST_STALE_ROOT] += 1
            elif self.mmu_notifier_retry_hva(fault):
                st[_ST_NOTIFIER_RETRIES] += 1
            else:
                self.make_mmu_pages_available()
                r = self.map.kvm_tdp_mmu_map(self, fault, True)
        finally:
            self.lock.read_unlock()
        st[_ST_RESULT[r]] += 1
        return r

    def page_fault_fast_first_k15(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """Variant pages-lock-in-tdp-mmu-fault (K15 in 6.12's shape, before 47b0c2e4c220): 6.12's fault, the fast
        page fault first, and a fault it could not fix takes the read lock and runs make_mmu_pages_available
        before the map, as direct_page_fault ran a TDP MMU fault before the fix (read in a 5.19-6.0 mmu.c)."""
        r = self.fast_page_fault(gfn, write, exec_fault)
        if r != RET_PF_INVALID:
            st = self.st
            st[_ST_FAULTS] += 1
            st[_ST_RESULT[r]] += 1
            return r
        return self.page_fault_k15_reclaim_under_read_lock(gfn, write, exec_fault)

    def direct_page_fault(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """direct_page_fault() of the pre-series MMU (the exclusive baseline): everything under the write lock."""
        fault = self._begin(gfn, write, exec_fault)
        if fault is None:
            return RET_PF_EMULATE
        st = self.st
        r = RET_PF_RETRY
        lock = self.lock
        lock.write_lock()
        try:
            if self.root_is_obsolete():
                st[_ST_STALE_ROOT] += 1
            elif self.mmu_notifier_retry_hva(fault):
                st[_ST_NOTIFIER_RETRIES] += 1
            else:
                self.make_mmu_pages_available()
                r = self.map.kvm_tdp_mmu_map(self, fault, False)
        finally:
            lock.write_unlock()
        st[_ST_RESULT[r]] += 1
        return r
