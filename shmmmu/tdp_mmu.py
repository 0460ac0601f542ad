"""TDP MMU: page faults, entry changes, disconnected tables, zaps, dirty logging and host unmaps on the shared tables.

Mirrors arch/x86/kvm/mmu/tdp_mmu.c of the series "Allow parallel MMU
operations with TDP MMU" as merged over 5.12-5.13 (KVM_TDP_MMU.md §5-10):
page faults, zap range, collapsible zaps and dirty-log write protection run
under the *read* lock with compare-exchange on entries; get/clear dirty log,
memslot changes and host unmaps take the *write* lock.  `lock_mode="exclusive"`
is the pre-series baseline: every operation under the write lock, plain
stores, tables freed at once instead of after a grace period.

Every function that the kernel guards with lockdep_assert_held* asserts the
mode it needs.  Everything is written on the TDP iterator (tdp_iter.py).

Freeing a table needs three things: it is unreachable, a TLB flush completed
after it was unlinked, and a grace period ended (software walkers under the
read lock are RCU readers).  Changes that leave a vCPU translation stale are
counted in the region's "unflushed" word until their flush completes, which is
what lets a vCPU tell a legitimately stale translation (flush in progress) from
a forgotten flush.
"""
from __future__ import annotations

import random
import time

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import (C_LIST_COUNT, C_LIST_HEAD, C_NOTIFIER_COUNT, C_NOTIFIER_END, C_NOTIFIER_SEQ,
                           C_NOTIFIER_START, C_NX_COUNT, C_NX_HEAD, C_NX_TAIL, C_UNFLUSHED, MS_FLAGS, MS_GEN, MS_WORDS,
                           MSF_LOG_DIRTY, N_STATS, NIL, ROOT_TABLE, STAT, TMETA_WORDS, T_GEN, T_GFN, T_LEVEL,
                           T_LINKER, T_NEXT, T_NX, T_NX_NEXT, T_NX_PREV, T_OWNER, T_PARENT, T_PREV, T_RETIRE_FLUSH,
                           T_STATE, TS_LIVE,
                           TS_RETIRED)
from shmmmu.layout import C_EPOCH, PIPE_LEN, T_RETIRE_EPOCH, W_RCU, WSTATE_WORDS
from shmmmu.memslots import Memslots, Slot
from shmmmu.rcu import pipe_age
from shmmmu.rwlock import HELD_READ, HELD_WRITE, QW_LOCKED, LockError
from shmmmu.tdp_iter import TdpIter, for_each_leaf, for_each_pte
from shmmmu.tlb import Tlb, TlbControl
from shmmmu.vm import VM
from shmmmu import violations

# page-fault return values (the 5.12 enum)
RET_PF_RETRY, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = range(5)
RET_NAMES = {RET_PF_RETRY: "RETRY", RET_PF_EMULATE: "EMULATE", RET_PF_INVALID: "INVALID",
             RET_PF_FIXED: "FIXED", RET_PF_SPURIOUS: "SPURIOUS"}

_P = S.MMU_PRESENT
_L = S.LARGE
_W = S.WRITABLE
_REMOVED = S.REMOVED
_PFN_MASK = S.PFN_MASK
_U64 = (1 << 64) - 1

_ST_FAULTS = STAT["faults"]
_ST_EMULATED = STAT["emulated"]
_ST_FIXED = STAT["fixed"]
_ST_SPURIOUS = STAT["spurious"]
_ST_RETRIES = STAT["retries"]
_ST_CAS_FAIL = STAT["cas_failures"]
_ST_REMOVED_SEEN = STAT["removed_seen"]
_ST_ALLOC = STAT["tables_allocated"]
_ST_LINKED = STAT["tables_linked"]
_ST_LINK_RACE = STAT["link_races"]
_ST_MAPPED = [0, STAT["mapped_4k"], STAT["mapped_2m"], STAT["mapped_1g"], STAT["mapped_1g"]]
_ST_FAULT_NS = STAT["fault_ns"]
_ST_NOTIFIER_RETRIES = STAT["notifier_retries"]
_now_ns = time.perf_counter_ns


class Mmu:
    """One process's handle on the VM's TDP MMU (kvm->arch.tdp_mmu_*), as worker slot `worker`.

    `tlb` is given by vCPUs: their own TLB is flushed with every remote flush
    they issue.  The supervisor and other host processes pass none.
    """

    def __init__(self, vm, worker: int, tlb: Tlb | None = None):
        self.vm = vm
        self.worker = worker
        c = vm.config
        self.config = c
        self.shared = c.lock_mode == "shared"
        self.region = vm.region
        self.geometry = c.geometry
        self.bits = c.bits
        self.E = c.geometry.entries
        self.root = ROOT_TABLE
        self.root_level = c.geometry.root_level
        self.max_gfn = c.geometry.max_gfn
        # 1 << (shadow_phys_bits - 12): the host's physical address width, modelled as the
        # smallest that holds every memslot (only 5.13's zap-all used it as its end: K17)
        slots_end = max((m.base_gfn + m.npages for m in c.memslots), default=1)
        self.phys_max_gfn = 1 << max(0, (slots_end - 1).bit_length())
        self.tables = vm.region.words("tables")
        self.tables_np = vm.region.array("tables")
        self.tm = vm.region.words("tmeta")
        self.ctl = vm.region.words("ctl")
        # the lock, RCU slot and memory cache are this worker's, even when `vm` is attached as
        # another worker (one process may drive a vCPU and the host: each needs its own slot)
        h = vm if vm.worker == worker else VM(vm.region, worker)
        self.lock = h.mmu_lock
        self.pages_lock = h.pages_lock
        self.rcu = h.rcu
        self.pool = h.pool
        self.slots = Memslots(vm)
        self.tlbctl = TlbControl(vm, worker, tlb)
        self.stats_row = vm.region.words("stats")
        self.st = [0] * N_STATS
        self.debug = c.debug
        bugs = set(c.bugs)
        self.bug_rcu_free = "rcu-free-immediately" in bugs
        self.bug_zero_children = "zero-removed-children" in bugs
        self.bug_fault_zap_no_flush = "fault-zap-no-flush" in bugs
        self.bug_plain_store = "fault-plain-store" in bugs
        self.bug_cas_removed = "cas-over-removed" in bugs
        self.bug_no_progress = "no-forward-progress" in bugs
        self.bug_advance = "advance-after-restart" in bugs
        self.bug_drop_flush = "drop-flush-on-yield" in bugs
        self.bug_mask_late = "dirty-mask-late-clear" in bugs
        self.bug_no_recheck = "no-notifier-recheck" in bugs
        self.bug_no_wrprot = "no-wrprot-on-enable" in bugs
        self.bug_read_fault_reclaim = "pages-lock-in-read-fault" in bugs
        self.bug_link_after_publish = "link-after-publish" in bugs
        self.bug_zap_all_phys_end = "zap-all-phys-end" in bugs
        self.nx = c.nx_huge_pages
        self._torture_delay_s = c.torture_delay_us / 1e6
        self._torture_rng = random.Random(c.seed * 1000 + worker)
        self._unflushed = False
        # 5.14+ "don't step down when zapping all": zap-all clears root-level entries only,
        # which is what made CVE-2021-47094 (K9) leak whole subtrees
        self.zap_all_min_level = self.root_level
        self._scratch = np.empty(self.E, dtype=np.uint64)
        # the fault path reuses one iterator (a walk never outlives its fault)
        self._fault_iter = TdpIter(self.tables, self.geometry, self.root, self.root_level, 1, 0)
        self._fault_slot: Slot | None = None
        # make_spte() of a fault, per level, for host page 0: the PFN is the only part that varies
        # (spte.make_leaf ORs it in), so a fault ORs its page into this instead of rebuilding the bits
        self._leaf_template = [0] + [S.make_leaf(0, level, writable=True, exec_ok=not (self.nx and level > 1))
                                     for level in range(1, self.root_level + 1)]
        self._removed: list[int] = []           # tables torn down, freed after the outermost flush
        self._removed_depth = 0
        self._walk_gens: dict[int, int] = {}     # debug: generation of each table this walk stepped into

    # ------------------------------------------------------------------ bookkeeping

    def violation(self, kind: str, gfn: int = 0, a: int = 0, b: int = 0) -> None:
        violations.record(self.region, kind, self.worker, gfn, a, b)

    def publish_stats(self) -> None:
        """Copy this process's counters into its row of the region (read by the supervisor and inspector)."""
        st, row, base = self.st, self.stats_row, self.worker * N_STATS
        ls = self.lock.stats
        st[STAT["lock_wait_ns"]] = ls.wait_ns
        st[STAT["lock_contended"]] = ls.contended
        st[STAT["read_acquired"]] = ls.read_acquired
        st[STAT["write_acquired"]] = ls.write_acquired
        st[STAT["needbreak_seen"]] = ls.needbreak_seen
        st[STAT["flushes"]] = self.tlbctl.flushes
        st[STAT["flush_wait_ns"]] = self.tlbctl.wait_ns
        st[STAT["flush_wait_max_ns"]] = self.tlbctl.wait_max_ns
        st[STAT["lock_wait_max_ns"]] = ls.wait_max_ns
        st[STAT["pool_refills"]] = self.pool.refills
        for i, v in enumerate(st):
            row.store(base + i, v & _U64)

    # ------------------------------------------------------------------ flushing

    def _mark_unflushed(self) -> None:
        """A change that can leave a vCPU translation stale is now pending a flush."""
        if not self._unflushed:
            self._unflushed = True
            self.ctl.fetch_add(C_UNFLUSHED, 1)

    def flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs(); settles this process's pending changes."""
        self.tlbctl.flush_remote_tlbs()
        if self._unflushed:
            self._unflushed = False
            self.ctl.fetch_add(C_UNFLUSHED, _U64)

    def _forget_flush(self) -> None:
        """Bug K11: treat the pending changes as flushed without flushing."""
        if self._unflushed:
            self._unflushed = False
            self.ctl.fetch_add(C_UNFLUSHED, _U64)

    # ------------------------------------------------------------------ setters (§5)

    def set_spte_atomic(self, it: TdpIter, new: int) -> bool:
        """tdp_mmu_set_spte_atomic(): cmpxchg against the value the walk saw; False if it changed.

        Only the thread that froze an entry may write it: a REMOVED old value fails.
        """
        old = it.old_spte
        if old == _REMOVED and not self.bug_cas_removed:
            self.st[_ST_REMOVED_SEEN] += 1
            return False
        sptep = it.table * self.E + it.index
        if self.debug:
            # sampled before the CAS: a table retires only after all its entries are frozen,
            # so a CAS can succeed on a table that was already dead only if freezing is broken
            state_before = self.tm.load(it.table * TMETA_WORDS + T_STATE)
        if self.bug_plain_store:
            self.tables.store(sptep, new)            # K4: no atomicity at all
        elif self.tables.cas(sptep, old, new) != old:
            self.st[_ST_CAS_FAIL] += 1
            return False
        if self.debug:
            if state_before != TS_LIVE and new & _P:
                self.violation("install-into-dead-table", it.gfn, it.table, state_before)
            gen = self._walk_gens.get(it.table)
            if gen is not None and gen != self.tm.load(it.table * TMETA_WORDS + T_GEN):
                # the table was freed (and maybe reused) while this RCU reader held it
                self.violation("use-after-free", it.gfn, it.table, gen)
        self._handle_changed_spte(it.gfn, old, new, it.level, True)
        return True

    def set_spte(self, it: TdpIter, new: int, record_dirty_log: bool = True) -> None:
        """__tdp_mmu_set_spte(): the exclusive setter, a plain store under the write lock."""
        old = it.old_spte
        if old == _REMOVED:
            self.violation("frozen-entry-overwritten", it.gfn, old, new)
        if self.debug and self.lock.mode != HELD_WRITE:
            self.violation("lockdep", it.gfn, self.lock.mode, HELD_WRITE)
        self.tables.store(it.table * self.E + it.index, new)
        it.old_spte = new
        self._handle_changed_spte(it.gfn, old, new, it.level, False, record_dirty_log)

    def zap_spte_atomic(self, it: TdpIter) -> bool:
        """tdp_mmu_zap_spte_atomic(): freeze with REMOVED, flush, then clear.

        Between clearing a present entry and the flush no other thread may install
        a present entry (maybe for another page) in the same slot: REMOVED ensures it.
        """
        if self.bug_fault_zap_no_flush:              # K5: straight to 0, nobody waits for a flush
            if not self.set_spte_atomic(it, 0):
                return False
            it.old_spte = 0
            return True
        self._mark_unflushed()
        if not self.set_spte_atomic(it, _REMOVED):
            return False
        self.flush_remote_tlbs()
        sptep = it.table * self.E + it.index
        if self.debug:
            seen = self.tables.xchg(sptep, 0)
            if seen != _REMOVED:
                self.violation("frozen-entry-overwritten", it.gfn, seen, 0)
        else:
            self.tables.store(sptep, 0)
        it.old_spte = 0
        return True

    # ------------------------------------------------------------------ changes (§5.4, §6)

    def _handle_changed_spte(self, gfn: int, old: int, new: int, level: int, shared: bool,
                             record_dirty_log: bool = True) -> None:
        """handle_changed_spte(): accounting, dirty logging, and teardown of a disconnected table."""
        if old == new:
            return
        was_present = old & _P
        is_present = new & _P
        if not was_present and not is_present:
            return
        was_leaf = was_present and (level == 1 or old & _L)
        is_leaf = is_present and (level == 1 or new & _L)
        pfn_changed = (old ^ new) & _PFN_MASK
        if was_leaf and is_leaf and pfn_changed:
            # a present leaf replaced by a present leaf for another page: must zap + flush first
            self.violation("pfn-changed-without-zap", gfn, old, new)
        st = self.st
        if is_leaf and not was_leaf:
            st[_ST_MAPPED[level]] += 1
        elif was_leaf and not is_leaf:
            st[_ST_MAPPED[level]] -= 1
            st[STAT["zapped_leaves"]] += 1
        # A non-leaf replaced by anything but itself disconnects its table.  The kernel tests
        # only pfn_changed, which suffices where table pages and guest pages are all host
        # frames; here a child table's index and a huge leaf's host page are different
        # namespaces and can be equal, so a non-leaf -> leaf change always counts.
        if was_present and not was_leaf and (not is_present or is_leaf or pfn_changed):
            self._handle_removed_pt((old & _PFN_MASK) >> S.PFN_SHIFT, shared)
        if (record_dirty_log and level == 1 and is_present and new & _W
                and (not (old & _W and was_present) or pfn_changed)):
            slot = self._fault_slot
            if slot is None or not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
                slot = self.slots.lookup(gfn)
            if slot is not None and slot.flags & MSF_LOG_DIRTY:
                self.slots.mark_dirty(slot, gfn)
                st[STAT["dirty_marked"]] += 1

    def _handle_removed_pt(self, table: int, shared: bool) -> None:
        """handle_removed_tdp_mmu_page(): unlink, freeze every entry (recursing), flush, retire.

        In shared mode every entry is exchanged to REMOVED, waiting out an entry that
        another thread holds frozen; afterwards no thread can install into the table.
        """
        top = not self._removed_depth
        self._removed_depth += 1
        try:
            self._teardown(table, shared, top)
        finally:
            self._removed_depth -= 1

    def _teardown(self, table: int, shared: bool, top: bool) -> None:
        if top:
            self._mark_unflushed()                   # the entries are about to change under vCPUs' TLBs
        t = table * TMETA_WORDS
        level = self.tm.load(t + T_LEVEL)
        base = self.tm.load(t + T_GFN)
        if self.debug:
            # who tore it down, and how (for leak reports): worker, shared, lock mode held
            self.tm.store(t + T_RETIRE_FLUSH, (self.worker << 8) | (int(shared) << 4) | self.lock.mode)
        self._unlink_page(table, shared)
        E = self.E
        old = np.empty(E, dtype=np.uint64)
        start = table * E
        if shared:
            frozen = 0 if self.bug_zero_children else _REMOVED
            self.tables.xchg_range(start, E, frozen, old)
            if not self.bug_zero_children:
                for i in np.flatnonzero(old == np.uint64(_REMOVED)):
                    # another thread holds this entry frozen (mid zap_spte_atomic): wait for its 0, then claim
                    i = int(i)
                    t_wait = time.monotonic()
                    while True:
                        o = self.tables.xchg(start + i, _REMOVED)
                        if o != _REMOVED:
                            old[i] = o
                            break
                        self.tables.wait_while(start + i, _REMOVED, 10000)
                        if time.monotonic() - t_wait > 5.0:
                            # nobody will ever clear this frozen entry: report it instead of spinning
                            self.violation("no-forward-progress", base, table, i)
                            old[i] = 0
                            break
        else:
            self.tables.load_range(start, E, old)
            present = np.flatnonzero(old & np.uint64(_P))
            for i in present:
                self.tables.store(start + int(i), _REMOVED)
        present_idx = np.flatnonzero(old & np.uint64(_P))
        if present_idx.size:
            vals = old[present_idx]
            if level == 1:
                leaf = np.ones(present_idx.size, dtype=bool)
            else:
                leaf = (vals & np.uint64(_L)) != 0
            n_leaf = int(leaf.sum())
            if n_leaf:
                self.st[_ST_MAPPED[level]] -= n_leaf
                self.st[STAT["zapped_leaves"]] += n_leaf
            shift = self.bits * (level - 1)
            for i, v in zip(present_idx[~leaf], vals[~leaf]):
                child_gfn = base + (int(i) << shift)
                self._handle_changed_spte(child_gfn, int(v), _REMOVED, level, shared)
        self._removed.append(table)
        if top:
            # the 5.12 flush inside handle_removed: no hardware walk may still stand in the
            # table (or the tables below it) when it is freed
            self.flush_remote_tlbs()
            removed, self._removed = self._removed, []
            for t_ in removed:
                self._free_table(t_)

    def _free_table(self, table: int) -> None:
        """Retire to RCU (the series: also under the write lock), or free at once (the baseline, bug K7)."""
        if self.debug:
            state = self.tm.load(table * TMETA_WORDS + T_STATE)
            if state != TS_LIVE:
                self.violation("table-leak", 0, table, state)     # torn down twice, or not live
                return
        if self.config.lock_mode == "shared" and not self.bug_rcu_free:
            self.rcu.call_rcu(table)
            self.st[STAT["tables_retired"]] += 1
        else:
            self.pool.free([table])
            self.st[STAT["tables_freed"]] += 1

    # ------------------------------------------------------------------ page lists (§2, tdp_mmu_pages_lock)

    def _link_page(self, table: int, nx: bool) -> None:
        """tdp_mmu_link_page(): add to tdp_mmu_pages (and the NX list) under the page-list lock."""
        shared = self.shared
        if shared:
            self.pages_lock.acquire()
        try:
            tm, ctl = self.tm, self.ctl
            t = table * TMETA_WORDS
            head = ctl.load(C_LIST_HEAD)
            tm.store(t + T_PREV, NIL)
            tm.store(t + T_NEXT, head)
            if head != NIL and head != 0:
                tm.store((head - 1) * TMETA_WORDS + T_PREV, table + 1)
            # list words hold table + 1 so that 0 (a zeroed region) is "empty"
            tm.store(t + T_NEXT, head)
            ctl.store(C_LIST_HEAD, table + 1)
            ctl.fetch_add(C_LIST_COUNT, 1)
            if nx:
                self._account_nx(table)
            tm.store(t + T_OWNER, NIL)
        finally:
            if shared:
                self.pages_lock.release()

    def torture_delay(self) -> None:
        """rcu_read_delay() of rcutorture: sometimes sleep between two steps another thread may overtake.

        Stress runs (VMConfig.torture_delay_us) call it between steps whose order is
        the point of a fix, in the fixed and in the re-injected order alike, so a clean
        run takes the same pauses as a bug run; the pause turns a window a few
        instructions wide into one a racing zap reliably lands in.
        """
        if self._torture_delay_s and self._torture_rng.random() < 1 / 8:
            time.sleep(self._torture_delay_s)

    def _unlink_page(self, table: int, shared: bool) -> None:
        """tdp_mmu_unlink_page()."""
        if shared:
            self.pages_lock.acquire()
        try:
            tm, ctl = self.tm, self.ctl
            t = table * TMETA_WORDS
            prev, nxt = tm.load(t + T_PREV), tm.load(t + T_NEXT)
            if prev == NIL and ctl.load(C_LIST_HEAD) != table + 1:
                # list_del of an entry that is not on the list: the corruption behind K18
                self.violation("table-leak", self.tm.load(t + T_GFN), table, 0)
                return
            if prev == NIL:
                if ctl.load(C_LIST_HEAD) == table + 1:
                    ctl.store(C_LIST_HEAD, nxt)
            else:
                tm.store((prev - 1) * TMETA_WORDS + T_NEXT, nxt)
            if nxt not in (NIL, 0):
                tm.store((nxt - 1) * TMETA_WORDS + T_PREV, prev)
            tm.store(t + T_PREV, NIL)
            tm.store(t + T_NEXT, NIL)
            ctl.fetch_add(C_LIST_COUNT, _U64)
            if tm.load(t + T_NX):
                self._unaccount_nx(table)
        finally:
            if shared:
                self.pages_lock.release()

    def _account_nx(self, table: int) -> None:
        """account_huge_nx_page(): list_add_tail on lpage_disallowed_mmu_pages, nx_lpage_splits++.

        Called with the page-list lock held (shared mode) or the write lock: the NX
        list lives in the same critical section as the page list, as in 5.12.
        """
        tm, ctl = self.tm, self.ctl
        t = table * TMETA_WORDS
        if tm.load(t + T_NX):
            return
        tail = ctl.load(C_NX_TAIL)
        tm.store(t + T_NX_NEXT, 0)
        tm.store(t + T_NX_PREV, tail)
        if tail:
            tm.store((tail - 1) * TMETA_WORDS + T_NX_NEXT, table + 1)
        else:
            ctl.store(C_NX_HEAD, table + 1)
        ctl.store(C_NX_TAIL, table + 1)
        tm.store(t + T_NX, 1)
        ctl.fetch_add(C_NX_COUNT, 1)

    def _unaccount_nx(self, table: int) -> None:
        """unaccount_huge_nx_page(): list_del from the NX list, nx_lpage_splits-- (page-list lock held)."""
        tm, ctl = self.tm, self.ctl
        t = table * TMETA_WORDS
        prev, nxt = tm.load(t + T_NX_PREV), tm.load(t + T_NX_NEXT)
        if prev:
            tm.store((prev - 1) * TMETA_WORDS + T_NX_NEXT, nxt)
        elif ctl.load(C_NX_HEAD) == table + 1:
            ctl.store(C_NX_HEAD, nxt)
        else:
            self.violation("table-leak", tm.load(t + T_GFN), table, 1)   # not on the NX list it claims
        if nxt:
            tm.store((nxt - 1) * TMETA_WORDS + T_NX_PREV, prev)
        elif ctl.load(C_NX_TAIL) == table + 1:
            ctl.store(C_NX_TAIL, prev)
        tm.store(t + T_NX_PREV, 0)
        tm.store(t + T_NX_NEXT, 0)
        tm.store(t + T_NX, 0)
        ctl.fetch_add(C_NX_COUNT, _U64)

    # ------------------------------------------------------------------ page fault (§7)

    def page_fault(self, gfn: int, write: bool, exec_fault: bool = False) -> int:
        """direct_page_fault() + kvm_tdp_mmu_map() for a TDP root; returns a RET_PF_* value."""
        t0 = _now_ns()
        st = self.st
        st[_ST_FAULTS] += 1
        pool = self.pool
        if pool.count < pool.min:
            pool.topup()                              # may sleep: outside any lock
        mmu_seq = self.ctl.load(C_NOTIFIER_SEQ)
        slots = self.slots
        slot = slots.lookup(gfn)
        if slot is None:
            st[_ST_EMULATED] += 1
            return RET_PF_EMULATE                     # no memslot: MMIO, emulated
        pfn = slots.gfn_to_pfn(slot, gfn)             # the "GUP": may be stale by the time we install
        level = slots.max_mapping_level(slot, gfn)
        req_level = level
        if exec_fault and self.nx and level > 1:
            level = 1                                 # the NX huge page mitigation (iTLB multihit)
        lock = self.lock
        shared = self.shared
        if shared:
            lock.read_lock()
        else:
            lock.write_lock()
        try:
            if self.bug_read_fault_reclaim or not shared:
                self.make_mmu_pages_available()
            if not self.bug_no_recheck and self._notifier_retry(mmu_seq, gfn, slot):
                st[_ST_NOTIFIER_RETRIES] += 1
                st[_ST_RETRIES] += 1
                return RET_PF_RETRY
            rcu = self.rcu
            rcu.read_lock()
            self._fault_slot = slot
            try:
                r = self._map(gfn, write, exec_fault, pfn, level, req_level, slot)
                if self.debug:
                    self._check_walk_gens(gfn)
            except IndexError:
                # the walk followed an entry to a table outside the pool: it read garbage from a
                # freed or recycled table (a correct MMU never gets here)
                self.violation("use-after-free", gfn, 0, 1)
                r = RET_PF_RETRY
            finally:
                self._fault_slot = None
                rcu.read_unlock()
            if self._unflushed:
                self.flush_remote_tlbs()
        finally:
            if shared:
                lock.read_unlock()
            else:
                lock.write_unlock()
        if r == RET_PF_FIXED:
            st[_ST_FIXED] += 1
        elif r == RET_PF_SPURIOUS:
            st[_ST_SPURIOUS] += 1
        else:
            st[_ST_RETRIES] += 1
        st[_ST_FAULT_NS] += _now_ns() - t0
        return r

    def _notifier_retry(self, mmu_seq: int, gfn: int, slot: Slot) -> bool:
        """mmu_notifier_retry_hva() + a memslot-generation recheck (the kernel uses SRCU for the latter)."""
        ctl = self.ctl
        if ctl.load(C_NOTIFIER_COUNT) and ctl.load(C_NOTIFIER_START) <= gfn < ctl.load(C_NOTIFIER_END):
            return True
        if ctl.load(C_NOTIFIER_SEQ) != mmu_seq:
            return True
        return self.slots.rows.load(slot.id * MS_WORDS + MS_GEN) != slot.gen

    def make_mmu_pages_available(self) -> None:
        """Legacy shadow-page reclaim: takes the write lock in the kernel (CVE-2022-45869 ran it under read)."""
        try:
            self.lock.assert_held(HELD_WRITE)
        except LockError as e:
            self.violation("lockdep", 0, self.lock.mode, HELD_WRITE)
            raise e

    def _map(self, gfn: int, write: bool, exec_fault: bool, pfn: int, level: int, req_level: int,
             slot: Slot) -> int:
        """kvm_tdp_mmu_map(): walk to the target level, linking tables and splitting huge pages."""
        shared = self.shared
        E = self.E
        tables = self.tables
        it = self._fault_iter.start(self.root, 1, gfn)
        step = it.next
        debug, nx, P, L = self.debug, self.nx, _P, _L
        if debug:
            self._walk_gens.clear()
            self._pipe_table(self.root)
        while it.valid and it.gfn <= gfn:
            if nx and level > 1 and it.level == level and it.old_spte & P and not it.old_spte & L:
                level -= 1                           # disallowed_hugepage_adjust(): keep small mappings
            if it.level == level:
                break
            spte = it.old_spte
            if spte & P and not spte & L:
                step()                               # a present non-leaf: step down into it
                if debug and it.valid:
                    self._pipe_table(it.table)
                continue
            if spte & _P:
                # a huge page above the target level: zap it so it can be split
                if shared:
                    if not self.zap_spte_atomic(it):
                        break
                else:
                    self._mark_unflushed()
                    self.set_spte(it, 0)
                self.st[STAT["huge_splits"]] += 1
                spte = it.old_spte = tables.load(it.table * E + it.index)
            if not spte & _P:
                if spte == _REMOVED and not self.bug_cas_removed:
                    self.st[_ST_REMOVED_SEEN] += 1
                    break
                child = self.pool.alloc(it.level - 1, it.gfn)
                self.st[_ST_ALLOC] += 1
                new = S.make_nonleaf(child)
                if self.debug:
                    self.tm.store(child * TMETA_WORDS + T_PARENT, it.table * E + it.index)
                    # who linked it, at which gen of the parent: worker | parent gen << 8
                    self.tm.store(child * TMETA_WORDS + T_LINKER,
                                  self.worker | (self.tm.load(it.table * TMETA_WORDS + T_GEN) << 8))
                    if shared and self.lock.w.load(self.lock.cnts) & QW_LOCKED == QW_LOCKED:
                        self.violation("lockdep", it.gfn, self.lock.w.load(self.lock.cnts), 0)
                if shared:
                    nx_acct = self.nx and exec_fault and req_level >= it.level
                    if self.bug_link_after_publish:
                        # 5.12 (K18): list_add after the cmpxchg made the table visible; a zap of the
                        # new entry in between unlinks it before it is linked
                        if self.set_spte_atomic(it, new):
                            self.torture_delay()
                            self._link_page(child, nx_acct)
                            self.st[_ST_LINKED] += 1
                        else:
                            self.pool.unalloc(child)
                            self.st[_ST_LINK_RACE] += 1
                            break
                    else:
                        # account before publishing (as later kernels do), take it back if we lose
                        self._link_page(child, nx_acct)
                        self.torture_delay()
                        if self.set_spte_atomic(it, new):
                            self.st[_ST_LINKED] += 1
                        else:
                            self._unlink_page(child, True)
                            self.tm.store(child * TMETA_WORDS + T_OWNER, self.worker)
                            self.pool.unalloc(child)
                            self.st[_ST_LINK_RACE] += 1
                            break
                else:
                    self.set_spte(it, new)
                    self._link_page(child, self.nx and exec_fault and req_level >= it.level)
                    self.st[_ST_LINKED] += 1
            it.next()
            if debug and it.valid:
                self._pipe_table(it.table)
        if not it.valid or it.level != level:
            return RET_PF_RETRY
        return self._map_handle_target_level(it, write, exec_fault, pfn, level, slot)

    def _map_handle_target_level(self, it: TdpIter, write: bool, exec_fault: bool, pfn: int, level: int,
                                 slot: Slot) -> int:
        """tdp_mmu_map_handle_target_level()."""
        pfn_base = pfn & ~((1 << (self.bits * (level - 1))) - 1)
        new = self._leaf_template[level] | (pfn_base << S.PFN_SHIFT)    # == S.make_leaf(pfn_base, level, ...)
        old = it.old_spte
        if new == old:
            return RET_PF_SPURIOUS
        if old & _P and (old & _PFN_MASK) == (new & _PFN_MASK) and (old | S.ACCESSED | S.DIRTY) == new:
            return RET_PF_SPURIOUS                   # the hardware walk already set A/D: same mapping
        if self.shared:
            if not self.set_spte_atomic(it, new):
                return RET_PF_RETRY
        else:
            self.set_spte(it, new)
        return RET_PF_FIXED

    # ------------------------------------------------------------------ yielding (§4)

    def iter_cond_resched(self, it: TdpIter, flush: bool, shared: bool) -> bool:
        """tdp_mmu_iter_cond_resched(): yield the lock if contended, with forward progress.

        A pending flush completes before the lock is dropped.  Returns True if it yielded;
        the caller then `continue`s, and the walk restarts from the root.
        """
        if not it.can_yield() and not self.bug_no_progress:
            return False
        if not self.lock.needbreak():
            return False
        if not it.can_yield():
            # I6: a yield must follow progress, else two walkers can yield to each other forever (K1)
            self.violation("no-forward-progress", it.next_last_level_gfn, it.yielded_gfn, it.level)
        self.rcu.read_unlock()
        if flush:
            if self.bug_drop_flush:
                self._forget_flush()                 # K11: the changes so far are never flushed
            else:
                self.flush_remote_tlbs()
        if shared:
            self.lock.read_unlock()
            self.torture_delay()                     # cond_resched(): the others run meanwhile
            self.lock.read_lock()
        else:
            self.lock.write_unlock()
            self.torture_delay()
            self.lock.write_lock()
        self.lock.stats.yields += 1
        self.st[STAT["yields"]] += 1
        self.rcu.read_lock()
        it.mark_yielded()
        return True

    def _iter(self, start: int, min_level: int = 1) -> TdpIter:
        return TdpIter(self.tables, self.geometry, self.root, self.root_level, min_level, start,
                       advance_after_restart=self.bug_advance)

    # ------------------------------------------------------------------ zapping (§10)

    def zap_gfn_range(self, start: int, end: int, can_yield: bool = True, min_level: int = 1) -> bool:
        """zap_gfn_range(): clear every entry covering [start, end); returns whether a flush is pending.

        Shared mode (5.13): read lock, each entry frozen, flushed and cleared.  Exclusive:
        write lock, plain stores, one flush by the caller.
        """
        shared = self.shared
        self.lock.assert_held(HELD_READ if shared else HELD_WRITE)
        flush = False
        covered = set() if min_level == self.root_level else None
        self.rcu.read_lock()
        try:
            it = self._iter(start, min_level)
            E = self.E
            for it in for_each_pte(it, end):
                if covered is not None:
                    covered.add(it.index)
                while True:
                    if can_yield and self.iter_cond_resched(it, flush, shared):
                        flush = False
                        if covered is not None:
                            covered.discard(it.index)    # not processed yet: the restart must come back
                        break
                    spte = it.old_spte
                    if not spte & _P:
                        break
                    level = it.level
                    span = 1 << (self.bits * (level - 1))
                    last = level == 1 or spte & _L
                    if not last and (it.gfn < start or it.gfn + span > end) and (
                            level > it.min_level or self.bug_zap_all_phys_end):
                        break                           # partly covered table: descend instead (K17: or skip)
                    if shared:
                        if not self.zap_spte_atomic(it):
                            it.old_spte = self.tables.load(it.table * E + it.index)
                            continue                    # goto retry
                    else:
                        self._mark_unflushed()
                        self.set_spte(it, 0)
                        flush = True
                    break
        finally:
            self.rcu.read_unlock()
        if covered is not None:
            sh = self.bits * (self.root_level - 1)
            want = set(range(start >> sh, min(self.E, -(-end >> sh))))
            for idx in sorted(want - covered)[:4]:
                # a walk of the root level must visit every entry of its range (CVE-2021-47094)
                self.violation("invariant", idx << sh, idx, len(want - covered))
        return flush

    def zap_gfn_range_locked(self, start: int, end: int) -> None:
        """kvm_tdp_mmu_zap_gfn_range() with the locking of its 5.13 callers: read lock (or write), then flush."""
        self._with_lock(lambda: self.zap_gfn_range(start, end), shared_ok=True)

    def zap_all(self) -> None:
        """kvm_tdp_mmu_zap_all(): everything, under the write lock.

        The range is the whole tree and a root entry is zapped even where the range covers
        it only in part (524a1e4e381f); K17 ends at the host's physical limit instead and
        skips such entries.
        """
        end = self.phys_max_gfn if self.bug_zap_all_phys_end else self.max_gfn
        self.lock.write_lock()
        try:
            self._zap_under_write_lock(0, end, can_yield=True, min_level=self.zap_all_min_level)
        finally:
            self.lock.write_unlock()

    def _zap_under_write_lock(self, start: int, end: int, can_yield: bool, min_level: int = 1) -> None:
        """zap_gfn_range() with plain stores (the write lock is held, whatever the VM's mode), then the flush."""
        shared, self.shared = self.shared, False
        try:
            flush = self.zap_gfn_range(start, end, can_yield=can_yield, min_level=min_level)
        finally:
            self.shared = shared
        if flush or self._unflushed:
            self.flush_remote_tlbs()

    def destroy(self) -> int:
        """kvm_mmu_uninit_tdp_mmu() after the last zap-all of VM destruction (no vCPU runs).

        Zaps everything; every table but the root must then be off the page list, where
        the kernel WARNs (WARN_ON(!list_empty(&kvm->arch.tdp_mmu_pages))).  Returns how many
        tables were left on it, recorded as a table-leak violation.
        """
        self.zap_all()
        left = self.ctl.load(C_LIST_COUNT)
        if left:
            present = int(np.count_nonzero(self.tables_np[self.root] & np.uint64(_P)))
            self.violation("table-leak", 0, left, present)
        return left

    def _with_lock(self, body, shared_ok: bool):
        shared = self.shared and shared_ok
        if shared:
            self.lock.read_lock()
        else:
            self.lock.write_lock()
        saved, self.shared = self.shared, shared
        try:
            r = body()
            if r or self._unflushed:
                self.flush_remote_tlbs()
            return r
        finally:
            self.shared = saved
            if shared:
                self.lock.read_unlock()
            else:
                self.lock.write_unlock()

    # ------------------------------------------------------------------ NX huge page recovery (§10)

    def nx_list(self) -> list[int]:
        """The tables on the NX list, oldest first (lpage_disallowed_mmu_pages; a read for tests and tools)."""
        out, cur = [], self.ctl.load(C_NX_HEAD)
        limit = self.tables_np.shape[0]
        while cur and len(out) <= limit:
            out.append(cur - 1)
            cur = self.tm.load((cur - 1) * TMETA_WORDS + T_NX_NEXT)
        return out

    def recover_nx_lpages(self, ratio: int | None = None) -> int:
        """kvm_recover_nx_lpages() (5.12): zap ceil(nx_lpage_splits / ratio) tables from the head of the NX list.

        Under the write lock, as in 5.12 (the list is only changed under the write
        lock or the page-list lock, which faults take inside the read lock).  Each
        table is zapped as kvm_tdp_mmu_zap_sp() does: zap_gfn_range over the table's
        span without yielding (the caller may hold a pending flush, 33a3164161fc),
        the returned flush accumulated (048f49809c52) and done before the lock is
        dropped for a waiter (cond_resched_rwlock_write) and at the end.  Zapping the
        parent entry tears the table down, which takes it off the list; a later
        fault that is not an instruction fetch can then map a huge page there.
        Returns how many tables were zapped.
        """
        ratio = self.config.nx_recovery_ratio if ratio is None else ratio
        tm, ctl = self.tm, self.ctl
        zapped = 0
        self.lock.write_lock()
        saved, self.shared = self.shared, False
        try:
            to_zap = -(-ctl.load(C_NX_COUNT) // ratio) if ratio > 0 else 0
            flush = False
            while to_zap:
                head = ctl.load(C_NX_HEAD)
                if not head:
                    break
                sp = head - 1
                t = sp * TMETA_WORDS
                if not tm.load(t + T_NX) or tm.load(t + T_STATE) != TS_LIVE:
                    # WARN_ON_ONCE(!sp->lpage_disallowed): the list names a table it does not hold
                    self.violation("table-leak", tm.load(t + T_GFN), sp, 2)
                    break
                gfn = tm.load(t + T_GFN)
                flush |= self.zap_gfn_range(gfn, gfn + (1 << (self.bits * tm.load(t + T_LEVEL))), can_yield=False)
                if ctl.load(C_NX_HEAD) == head:
                    self.violation("table-leak", gfn, sp, 3)    # zapping its range did not tear it down
                    break
                zapped += 1
                to_zap -= 1
                if to_zap and self.lock.needbreak():
                    if flush or self._unflushed:
                        self.flush_remote_tlbs()
                    flush = False
                    self.lock.write_unlock()
                    self.lock.write_lock()
                    self.lock.stats.yields += 1
                    self.st[STAT["yields"]] += 1
            if flush or self._unflushed:
                self.flush_remote_tlbs()
        finally:
            self.shared = saved
            self.lock.write_unlock()
        self.st[STAT["nx_recovered"]] += zapped
        self.st[STAT["nx_recovery_passes"]] += 1
        return zapped

    # ------------------------------------------------------------------ host unmaps (MMU notifier)

    def host_unmap(self, start: int, end: int, migrate: bool = True) -> int:
        """An MMU-notifier invalidation of [start, end): zap, flush, (migrate the host pages), then bump the sequence.

        invalidate_range_start takes the write lock, counts the invalidation in
        progress and zaps; a fault that resolved its host page before it retries.
        With `migrate`, the host moves whole backing pages (a 2 MiB host page moves as
        one), so the invalidated range is widened to the backing pages it touches, as
        the kernel's notifier range covers the whole host mapping that changes: a 4K
        leaf elsewhere in a migrated huge host page must go too.
        Returns how many host blocks moved.
        """
        ctl = self.ctl
        if migrate:
            start, end = self._backing_range(start, end)
        self.lock.write_lock()
        try:
            ctl.fetch_add(C_NOTIFIER_COUNT, 1)
            ctl.store(C_NOTIFIER_START, start)
            ctl.store(C_NOTIFIER_END, end)
            self._zap_under_write_lock(start, end, can_yield=False)
        finally:
            self.lock.write_unlock()
        moved = 0
        if migrate:
            for slot in self.slots.slots():
                if slot.base_gfn < end and start < slot.end_gfn:
                    moved += len(self.slots.migrate(slot, start, end))
        self.lock.write_lock()
        try:
            ctl.fetch_add(C_NOTIFIER_SEQ, 1)          # invalidate_range_end
            ctl.fetch_add(C_NOTIFIER_COUNT, _U64)
        finally:
            self.lock.write_unlock()
        return moved

    def _backing_range(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) widened to whole backing pages of the memslots it overlaps."""
        lo, hi = start, end
        for slot in self.slots.slots():
            if slot.base_gfn < end and start < slot.end_gfn:
                blk = 1 << (self.bits * (slot.backing_level - 1))
                first = max(start, slot.base_gfn) - slot.base_gfn
                last = min(end, slot.end_gfn) - slot.base_gfn
                lo = min(lo, slot.base_gfn + first // blk * blk)
                hi = max(hi, min(slot.end_gfn, slot.base_gfn + -(-last // blk) * blk))
        return lo, hi

    # ------------------------------------------------------------------ memslots

    def delete_memslot(self, slot_id: int) -> None:
        """Mark a slot invalid and zap its range (kvm_arch_flush_shadow_memslot), under the write lock."""
        self.lock.write_lock()
        try:
            slot = self.slots.read(slot_id)
            self.slots.set_flags(slot_id, clear_mask=1)
            self._zap_under_write_lock(slot.base_gfn, slot.end_gfn, can_yield=True)
        finally:
            self.lock.write_unlock()

    def add_memslot(self, slot_id: int) -> None:
        """Re-activate a slot (its pages keep their contents)."""
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, set_mask=1, clear_mask=MSF_LOG_DIRTY)
        finally:
            self.lock.write_unlock()

    # ------------------------------------------------------------------ dirty logging (§9)

    def enable_dirty_logging(self, slot_id: int, initially_set: bool = False) -> int:
        """Set KVM_MEM_LOG_DIRTY_PAGES and write-protect every leaf of the slot (5.13: under the read lock).

        With initially_set (KVM_DIRTY_LOG_INITIALLY_SET) the bitmap starts full and only
        huge leaves are write-protected: 4K pages are protected when CLEAR_DIRTY_LOG names them.

        The flag changes under the write lock, so a fault that checked the slot before
        has finished installing before the write protection starts (the kernel's SRCU sync).
        The bitmap starts empty, as KVM allocates a zeroed one when the flag is set
        (bits left from an earlier logging period would be reported as new writes).
        Returns how many leaves were write-protected.
        """
        self.lock.write_lock()
        try:
            slot = self.slots.read(slot_id)
            if not slot.flags & MSF_LOG_DIRTY:
                self.slots.dirty.fill_range(slot.dirty_off, self.slots.dirty_words(slot), 0)
                if initially_set:                     # KVM_DIRTY_LOG_INITIALLY_SET (manual protect)
                    for k in range(self.slots.dirty_words(slot)):
                        bits = min(64, slot.npages - 64 * k)
                        self.slots.dirty.store(slot.dirty_off + k, (1 << bits) - 1)
            self.slots.set_flags(slot_id, set_mask=MSF_LOG_DIRTY)
        finally:
            self.lock.write_unlock()
        if self.bug_no_wrprot:
            return 0
        slot = self.slots.read(slot_id)
        # 5.12 kvm_mmu_slot_apply_flags(): INITIALLY_SET reports every 4K page dirty already, so only
        # huge leaves are protected now (they must be split lazily); without it every leaf is
        min_level = 2 if initially_set else 1
        return self._with_lock(lambda: self.wrprot_gfn_range(slot.base_gfn, slot.end_gfn, min_level),
                               shared_ok=True)

    def wrprot_gfn_range(self, start: int, end: int, min_level: int = 1) -> int:
        """wrprot_gfn_range(): clear W on every present leaf at min_level or above in [start, end).

        Walks to level 2 with the iterator (yielding with forward progress); each 4K
        table below is write-protected with one compare-exchange loop in C; huge
        leaves are protected one by one.  Returns the number of leaves changed.
        """
        shared = self.shared
        self.lock.assert_held(HELD_READ if shared else HELD_WRITE)
        changed = 0
        flush = False
        E = self.E
        old = self._scratch
        self.rcu.read_lock()
        try:
            it = self._iter(start, min_level=min(2, self.root_level))
            for it in for_each_pte(it, end):
                while True:
                    if self.iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    if not spte & _P:
                        break
                    if spte & _L:                                     # a huge leaf
                        if not spte & _W:
                            break
                        self._mark_unflushed()                # before the change a vCPU may observe
                        if shared:
                            if not self.set_spte_atomic(it, spte & ~_W):
                                it.old_spte = self.tables.load(it.table * E + it.index)
                                continue
                        else:
                            self.set_spte(it, spte & ~_W, record_dirty_log=False)
                        flush = True
                        changed += 1
                        break
                    if it.level == 2 and min_level == 1:              # a table of 4K leaves: one batch
                        child = (spte & _PFN_MASK) >> S.PFN_SHIFT
                        self._mark_unflushed()
                        n = self.tables.clear_where(child * E, E, _P, _P, _W, old)
                        if n:
                            flush = True
                            changed += n
                    break
        finally:
            self.rcu.read_unlock()
        if flush or self._unflushed:
            self.flush_remote_tlbs()
        self.st[STAT["wrprot_leaves"]] += changed
        return changed

    def get_dirty_log(self, slot_id: int, clear: bool = True) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: harvest the bitmap (xchg each word to 0) and re-protect what it reports.

        Under the write lock (5.13).  With clear=False (manual protect) it only copies.
        """
        slot = self.slots.read(slot_id)
        nwords = self.slots.dirty_words(slot)
        out = np.zeros(nwords, dtype=np.uint64)
        dirty = self.slots.dirty
        self.lock.write_lock()
        saved, self.shared = self.shared, False
        try:
            flush = False
            for k in range(nwords):
                if not clear:
                    out[k] = dirty.load(slot.dirty_off + k)
                    continue
                if dirty.load(slot.dirty_off + k) == 0:
                    continue
                mask = dirty.xchg(slot.dirty_off + k, 0)
                out[k] = mask
                if mask:
                    flush |= self.clear_dirty_pt_masked(slot.base_gfn + 64 * k, mask)
            if flush or self._unflushed:
                self.flush_remote_tlbs()
        finally:
            self.shared = saved
            self.lock.write_unlock()
        return out

    def clear_dirty_log(self, slot_id: int, first: int, bitmap: np.ndarray) -> int:
        """KVM_CLEAR_DIRTY_LOG: per word, clear the given bits and re-protect the pages that were dirty."""
        slot = self.slots.read(slot_id)
        dirty = self.slots.dirty
        cleared = 0
        self.lock.write_lock()
        saved, self.shared = self.shared, False
        try:
            flush = False
            for k, m in enumerate(bitmap):
                m = int(m)
                if not m:
                    continue
                word = slot.dirty_off + (first // 64) + k
                mask = m & dirty.fetch_and(word, ~m & _U64)   # mask &= atomic_fetch_andnot(mask, word)
                if mask:
                    cleared += bin(mask).count("1")
                    flush |= self.clear_dirty_pt_masked(slot.base_gfn + first + 64 * k, mask)
            if flush or self._unflushed:
                self.flush_remote_tlbs()
        finally:
            self.shared = saved
            self.lock.write_unlock()
        return cleared

    def clear_dirty_pt_masked(self, gfn: int, mask: int) -> bool:
        """clear_dirty_pt_masked(): write-protect the 4K leaves of [gfn, gfn+64) named by mask (write lock)."""
        self.lock.assert_held(HELD_WRITE)
        if not mask:
            return False
        first = (mask & -mask).bit_length() - 1
        changed = False
        visited = 0
        self.rcu.read_lock()
        try:
            it = self._iter(gfn + first)
            for it in for_each_leaf(it, gfn + 64):
                if not mask:
                    break
                if it.level > 1:
                    continue                                  # huge leaves: protected at enable (may start below gfn)
                bit = 1 << (it.gfn - gfn)
                if not mask & bit:
                    continue
                visited |= bit
                if not self.bug_mask_late:
                    mask &= ~bit                              # f1b3b06a058b: before the early continue
                spte = it.old_spte
                if not spte & _W:
                    continue
                if self.bug_mask_late:
                    mask &= ~bit
                self._mark_unflushed()
                self.set_spte(it, spte & ~_W, record_dirty_log=False)
                changed = True
            if mask & visited:
                # the mask must only name leaves not yet handled, or the walk cannot stop early (K3)
                self.violation("mask-walk-overrun", gfn, mask & visited, mask)
        finally:
            self.rcu.read_unlock()
        return changed

    def disable_dirty_logging(self, slot_id: int) -> int:
        """Clear the flag and zap collapsible mappings (5.13: under the read lock, vCPUs running)."""
        self.lock.write_lock()
        try:
            self.slots.set_flags(slot_id, clear_mask=MSF_LOG_DIRTY)
        finally:
            self.lock.write_unlock()
        slot = self.slots.read(slot_id)
        return self._with_lock(lambda: self.zap_collapsible_sptes(slot), shared_ok=True)

    def zap_collapsible_sptes(self, slot: Slot) -> int:
        """zap_collapsible_spte_range(): zap the parent table of 4K mappings that could now be one huge page.

        As later kernels do (~5.18+), the non-leaf entry at the highest level that could
        map huge is zapped, one freeze + flush per huge region, instead of every 4K leaf
        with a flush each (5.13), which the A.0 measurement shows costs ~3x.
        """
        shared = self.shared
        self.lock.assert_held(HELD_READ if shared else HELD_WRITE)
        if slot.huge_level < 2:
            return 0
        zapped = 0
        flush = False
        E = self.E
        self.rcu.read_lock()
        try:
            it = self._iter(slot.base_gfn, min_level=2)
            for it in for_each_pte(it, slot.end_gfn):
                while True:
                    if self.iter_cond_resched(it, flush, shared):
                        flush = False
                        break
                    spte = it.old_spte
                    level = it.level
                    if not spte & _P or spte & _L or level > slot.huge_level:
                        break
                    span = 1 << (self.bits * (level - 1))
                    if it.gfn < slot.base_gfn or it.gfn + span > slot.end_gfn:
                        break
                    if self.slots.max_mapping_level(slot, it.gfn) < level:
                        break
                    if shared:
                        if not self.zap_spte_atomic(it):
                            it.old_spte = self.tables.load(it.table * E + it.index)
                            continue
                    else:
                        self._mark_unflushed()
                        self.set_spte(it, 0)
                        flush = True
                    zapped += 1
                    break
        finally:
            self.rcu.read_unlock()
        self.st[STAT["collapsible_zaps"]] += zapped
        return zapped

    # ------------------------------------------------------------------ checks

    def _check_walk_gens(self, gfn: int) -> None:
        """Debug, at the end of the read-side section: no table the walk stood in was freed meanwhile.

        rcutorture's reader checks its object at the end of its section too: a grace period
        cannot end while we are inside, so a generation that moved means a free without one.
        """
        tm = self.tm
        for table, gen in self._walk_gens.items():
            if tm.load(table * TMETA_WORDS + T_GEN) != gen:
                self.violation("use-after-free", gfn, table, gen)

    def _pipe_table(self, table: int) -> None:
        """Debug: record the Reader-Pipe age of a table this RCU reader is about to read."""
        t = table * TMETA_WORDS
        self._walk_gens[table] = self.tm.load(t + T_GEN)
        state = self.tm.load(t + T_STATE)
        if state == TS_LIVE:
            age = 0
        else:
            age = pipe_age(state, self.tm.load(t + T_RETIRE_EPOCH),
                           self.rcu.ws.load(self.worker * WSTATE_WORDS + W_RCU), self.ctl.load(C_EPOCH))
        pipe = self.region.words("pipe")
        pipe.fetch_add(self.worker * PIPE_LEN + min(age, PIPE_LEN - 1), 1)
        if age >= 2:
            self.violation("use-after-free", 0, table, age)
