"""Debug: the checkers that run inside the MMU in debug mode (stress always), installed over it when it is built.

With `debug` off nothing here is installed and the MMU runs without a single
debug test; with it on, `install(mmu)` wraps a few functions of one Mmu:

- every walk uses `CheckedTdpIter`, which records, for each table it steps
  into, the table's Reader-Pipe age (rcutorture's: 0 live, 1 retired during
  this reader's section, 2+ freed or retired before it entered: a use after
  free) and its generation;
- tdp_mmu_set_spte_atomic samples the table's state before its cmpxchg (a
  present entry landing in a retired or freed table is an install into a dead
  table) and checks the generations of the tables this walk stood in;
- kvm_tdp_mmu_map checks them again at the end of the read-side section
  (rcutorture's end-of-section check);
- the freezer's closing store is an exchange that must find REMOVED;
- a table is retired only from the live state (else it was torn down twice);
- a walk of the root level only (5.14's zap-all) must visit every entry of
  its range (CVE-2021-47094 skips one);
- a walk that yielded resumes in a root that is still the one it left: the
  reference it holds (for_each_tdp_mmu_root_yield_safe) kept the root's table
  alive (the 5.13 notifier held none: 7533377215b6);
- an entry a zap cleared is marked in `zap_pending` until the zapper's flush
  returns; a present value installed there before that is two live
  translations of one address (K5's aliasing, and K11's install in a yield),
  unless the table was freed meanwhile (its teardown's flush covered the zap);
- mmu_lock is never dropped while this worker holds unflushed changes (I6);
- a KVM_CLEAR_DIRTY_LOG that splits (6.12, INITIALLY_SET) leaves no huge leaf
  in the range it named (dirty_log_page_splitting_test's assertion: B5);
- a fault retried as stale has a cause: an invalidation covering it, one
  completed since its snapshot, or a memslot change (B10's sign-extended
  snapshot retries for ever);
- where kvm_zap_gfn_range takes part in the invalidation protocol (6.12), no
  fault installs a leaf for a GFN a zap range is removing: one in progress when
  it installs, or one that ended after the fault's snapshot of the sequence
  (B9: before 6d3085e4d89a, a fault that took mmu_lock while the zap had
  yielded it installed);
- every table a walk or a teardown reads is read inside an RCU read-side
  section: the kernel's `rcu_dereference` of each `tdp_ptep_t` (tdp_iter.c,
  handle_removed_tdp_mmu_page); the exclusive baseline, which had no RCU,
  may read under the write lock instead.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from shmmmu import spte as S
from shmmmu.layout import LINE, PIPE_LEN, Ctl, TableState, TMeta
from shmmmu.mmu.instruments import site_target
from shmmmu.rcu import pipe_age
from shmmmu.rwlock import HELD_WRITE
from shmmmu.tdp_iter import TdpIter

Mmu = Any                    # shmmmu.mmu.Mmu (not imported: the front imports this module)

_LIVE = TableState.LIVE
_GEN_MASK = 0xffff                  # the table generation a zap-ledger token carries (bits 8-23)
_U64 = (1 << 64) - 1


class ZapRange:
    """The zap-range records after the entries of the zap ledger (layout: 9 lines of the zap_pending section):
    line 0 counts the kvm_zap_gfn_range calls begun, ended and in progress; lines 1..RING each record one of the
    last RING: its number + 1 (0: unused), its GFN range, the count of zaps ended once it ended (0: in
    progress), its worker + 1."""

    BEGUN, ENDED, ACTIVE = 0, 1, 2                  # line 0
    NUMBER, START, END, ENDED_AT, WORKER = range(5)  # a record
    RING = 8


class CheckedTdpIter(TdpIter):
    """A TdpIter that reports every entry it arrives at (start and each step) to `arrive`."""

    __slots__ = ("arrive",)

    def __init__(self, arrive: Callable[[TdpIter], None], *args, **kw):
        self.arrive = arrive
        super().__init__(*args, **kw)

    def start(self, root: int, min_level: int, goal_gfn: int) -> "CheckedTdpIter":
        TdpIter.start(self, root, min_level, goal_gfn)
        self.arrive(self)
        return self

    def next(self) -> None:
        TdpIter.next(self)
        if self.valid:
            self.arrive(self)


class Debug:
    """One Mmu's debug state: the tables the current walk stood in, the root entries a zap-all visited, and the
    zap ledger (the entries this process zapped whose flush has not returned yet)."""

    def __init__(self, mmu: Mmu):
        self.mmu = mmu
        self.tmeta = mmu.kvm.tmeta
        self.pending_w = mmu.region.words("zap_pending")
        self.pending: list[tuple[int, int]] = []        # (entry, token) this process marked, unflushed
        self.epoch = 1
        # each table's generation (bumped when it is freed), read as plain memory: no step of the explorer's
        self.gen_np = mmu.region.array("tmeta")[:, TMeta.GEN]
        self.E = mmu.kvm.E
        self.pipe = mmu.region.words("pipe")
        self.pipe_base = mmu.worker * PIPE_LEN          # this worker's row of the Reader Pipe
        self.rcu_epoch = mmu.kvm.wstate.rcu
        self.walk_gens: dict[int, int] = {}
        self.last_table = -1
        self.root_visits: set[int] | None = None
        self.rcu = mmu.kvm.rcu
        self.lock = mmu.kvm.lock
        self.rcu_floor = 0              # read-side sections of this module's own (checked_map's outer one)
        self.rcu_strict = mmu.kvm.parallel
        self.zaps_seen = 0              # zaps ended when this process's fault took its snapshot of the sequence
        self.zr = self.pending_w        # the zap-range records follow the ledger's entries
        self.zr_base = mmu.config.n_tables * mmu.kvm.E

    def rcu_dereference(self, gfn: int, table: int) -> None:
        """rcu_dereference() of a table pointer: inside an RCU read-side section of the MMU's own.  The series
        reads every table under rcu_read_lock, write lock or not (7cca2d0b7e7d); the exclusive baseline (5.11)
        had no RCU and read under the write lock."""
        if self.rcu.nesting > self.rcu_floor:
            return
        if not self.rcu_strict and self.lock.mode == HELD_WRITE:
            return
        self.mmu.kvm.violation("rcu-dereference", gfn, table, self.lock.mode)

    def arrive(self, it: TdpIter) -> None:
        """A walk stands on an entry: Reader-Pipe age and generation of its table (once per table per walk)."""
        table = it.table
        if self.rcu.nesting <= self.rcu_floor:
            self.rcu_dereference(it.gfn, table)
        if self.root_visits is not None and it.level == it.root_level:
            self.root_visits.add(it.index)
        if table == self.last_table:
            return
        self.last_table = table
        tmeta = self.tmeta
        if table not in self.walk_gens:
            self.walk_gens[table] = tmeta.gen.load(table)
        state = tmeta.state.load(table)
        if state == _LIVE:
            age = 0
        else:
            mmu = self.mmu
            age = pipe_age(state, tmeta.retire_epoch.load(table), self.rcu_epoch.load(mmu.worker),
                           mmu.ctl.load(Ctl.EPOCH))
        self.pipe.fetch_add(self.pipe_base + min(age, PIPE_LEN - 1), 1)
        if age >= 2:
            self.mmu.kvm.violation("use-after-free", it.gfn, table, age)

    def new_walk(self) -> None:
        self.walk_gens.clear()
        self.last_table = -1

    def check_walk_gens(self, gfn: int) -> None:
        """No table the walk stood in was freed meanwhile (a grace period cannot end while we are inside)."""
        gen_col = self.tmeta.gen
        for table, gen in self.walk_gens.items():
            if gen_col.load(table) != gen:
                self.mmu.kvm.violation("use-after-free", gfn, table, gen)


    # ---- the zap ledger: an entry a zap made non-present holds the zapper's token (worker + 1, the number of
    # flushes that worker has done, so a later mark is told from an earlier one, and the generation of the
    # entry's table) until that worker's flush returns.  An install over a non-present entry is one too early if
    # the same token stood there before its store and still stands after it: the zap came before the install,
    # the flush after it.  A table freed since the zap was torn down (every entry frozen) and flushed before it
    # was retired (handle_removed_pt), which covers the zap whoever made it: its generation moved, and a token
    # of the earlier generation is spent (6.12's zap of an invalid root owes no flush; NX recovery may tear its
    # table down and a fault reuse it before the zapper flushes).

    def ledger_before(self, old: int, sptep: int) -> int:
        return 0 if old & S.MMU_PRESENT else self.pending_w.load(sptep)

    def zap_ledger(self, sptep: int, gfn: int, old: int, new: int, before: int) -> None:
        if new & S.MMU_PRESENT:
            if before and self.pending_w.load(sptep) == before and \
                    (before >> 8) & _GEN_MASK == int(self.gen_np[sptep // self.E]) & _GEN_MASK:
                self.mmu.kvm.violation("install-before-flush", gfn, sptep, (before & 0xff) - 1)
        elif old & S.MMU_PRESENT:
            gen = int(self.gen_np[sptep // self.E]) & _GEN_MASK
            token = (self.epoch << 24) | (gen << 8) | (self.mmu.worker + 1)
            self.pending_w.store(sptep, token)
            self.pending.append((sptep, token))

    def flushed(self) -> None:
        """This worker's flush returned: its marks are cleared (a later zap's mark stays)."""
        for sptep, token in self.pending:
            self.pending_w.cas(sptep, token, 0)
        self.pending.clear()
        self.epoch += 1

    # ---- the zap-range records (6.12's kvm_zap_gfn_range, B9): each zap is numbered when it begins to zap
    # (after the invalidation began, under the write lock) and stamped with the count of zaps ended when it
    # stops (before the invalidation ends).  A fault notes that count after it read the sequence; when it
    # installs, a zap covering its GFN that is in progress, or that ended after the fault's note, is one the
    # protocol must have made it retry: the invalidation in progress covers the GFN, or the sequence moved
    # after the fault read it.  A record overwritten by later zaps (RING of them) is no longer seen.

    def _record(self, n: int) -> int:
        return self.zr_base + (1 + n % ZapRange.RING) * LINE

    def zap_range_begun(self, start: int, end: int) -> int:
        zr, Z = self.zr, ZapRange
        n = zr.fetch_add(self.zr_base + Z.BEGUN, 1)
        base = self._record(n)
        zr.store(base + Z.NUMBER, 0)
        zr.store(base + Z.START, start)
        zr.store(base + Z.END, end)
        zr.store(base + Z.ENDED_AT, 0)
        zr.store(base + Z.WORKER, self.mmu.worker + 1)
        zr.store(base + Z.NUMBER, n + 1)
        zr.fetch_add(self.zr_base + Z.ACTIVE, 1)
        return n

    def zap_range_ended(self, n: int) -> None:
        zr, Z = self.zr, ZapRange
        stamp = zr.fetch_add(self.zr_base + Z.ENDED, 1) + 1
        base = self._record(n)
        if zr.load(base + Z.NUMBER) == n + 1:
            zr.store(base + Z.ENDED_AT, stamp)
        zr.fetch_add(self.zr_base + Z.ACTIVE, _U64)

    def zap_range_abandoned(self, dead: int) -> None:
        """Recovery: the zaps a killed worker had in progress end now."""
        zr, Z = self.zr, ZapRange
        for k in range(Z.RING):
            base = self._record(k)
            n = zr.load(base + Z.NUMBER)
            if n and zr.load(base + Z.WORKER) == dead + 1 and not zr.load(base + Z.ENDED_AT):
                self.zap_range_ended(n - 1)

    def check_zap_ranges(self, gfn: int) -> None:
        """A fault installed a leaf for gfn (mmu_lock held, so no zap begins or ends meanwhile)."""
        zr, Z, seen = self.zr, ZapRange, self.zaps_seen
        if not zr.load(self.zr_base + Z.ACTIVE) and zr.load(self.zr_base + Z.ENDED) == seen:
            return                                       # none in progress, none ended since the snapshot
        for k in range(Z.RING):
            base = self._record(k)
            if not zr.load(base + Z.NUMBER):
                continue
            ended = zr.load(base + Z.ENDED_AT)
            start, end = zr.load(base + Z.START), zr.load(base + Z.END)
            if (not ended or ended > seen) and start <= gfn < end:
                self.mmu.kvm.violation("install-in-zapped-range", gfn, start, end | (0 if ended else 1 << 63))
                return


# ---------------------------------------------------------------- the checks, by site ("part.function")

Wrap = Callable[[Mmu, Debug, Callable], Callable]


def _new_iter(mmu: Mmu, d: Debug, new_iter: Callable) -> Callable:
    """Every walk reports the tables it stands in (Reader-Pipe age, generation)."""
    kvm = mmu.kvm

    def checked_new_iter(root: int, min_level: int, start: int) -> TdpIter:
        d.new_walk()
        # made reporting nothing: the iterator's own start() in its constructor is no walk yet
        it = CheckedTdpIter(lambda _it: None, kvm.tables, kvm.geometry, root, kvm.root_level, min_level, start)
        it.arrive = d.arrive
        return it
    return checked_new_iter


def _flush(mmu: Mmu, d: Debug, flush_remote: Callable) -> Callable:
    def checked_flush() -> None:
        flush_remote()
        d.flushed()
    return checked_flush


def _set_spte(mmu: Mmu, d: Debug, set_spte: Callable) -> Callable:
    def checked_set_spte(it: TdpIter, new: int, record_dirty_log: bool = True,
                         record_acc_track: bool = True) -> None:
        sptep, gfn, old = it.sptep, it.gfn, it.old_spte
        before = d.ledger_before(old, sptep)
        set_spte(it, new, record_dirty_log, record_acc_track)
        d.zap_ledger(sptep, gfn, old, new, before)
    return checked_set_spte


def _unlock(mmu: Mmu, d: Debug, unlock: Callable) -> Callable:
    kvm = mmu.kvm

    def checked_unlock() -> None:
        # not while an exception unwinds the holder (the explorer aborting an actor, a crash):
        # the kernel's code has no such path
        if kvm.holds_unflushed and sys.exc_info()[0] is None:
            kvm.violation("lock-dropped-unflushed", 0, kvm.worker, 2)     # I6
        unlock()
    return checked_unlock


def _set_spte_atomic(mmu: Mmu, d: Debug, set_spte_atomic: Callable) -> Callable:
    tmeta = mmu.kvm.tmeta

    def checked_set_spte_atomic(it: TdpIter, new: int) -> bool:
        # sampled before the CAS: a table retires only after all its entries are frozen,
        # so a CAS can succeed on a table that was already dead only if freezing is broken
        state_before = tmeta.state.load(it.table)
        old = it.old_spte
        before = d.ledger_before(old, it.sptep)
        if not set_spte_atomic(it, new):
            return False
        d.zap_ledger(it.sptep, it.gfn, old, new, before)
        if state_before != _LIVE and new & S.MMU_PRESENT:
            mmu.kvm.violation("install-into-dead-table", it.gfn, it.table, state_before)
        gen = d.walk_gens.get(it.table)
        if gen is not None and gen != tmeta.gen.load(it.table):
            # the table was freed (and maybe reused) while this RCU reader held it
            mmu.kvm.violation("use-after-free", it.gfn, it.table, gen)
        return True
    return checked_set_spte_atomic


def _map(mmu: Mmu, d: Debug, kvm_tdp_mmu_map: Callable) -> Callable:
    from shmmmu.mmu.records import RET_PF_FIXED
    rcu = mmu.kvm.rcu
    zap_ranges = _zap_range_checked(mmu)

    def checked_map(vcpu, fault, shared: bool) -> int:
        # an outer read-side section, so that the end-of-section check is still inside it; the map's own
        # section must still be there for its reads (rcu_floor)
        rcu.read_lock()
        floor, d.rcu_floor = d.rcu_floor, rcu.nesting
        try:
            d.new_walk()
            r = kvm_tdp_mmu_map(vcpu, fault, shared)
            d.rcu_floor = floor
            d.check_walk_gens(fault.gfn)
        finally:
            d.rcu_floor = floor
            rcu.read_unlock()
        if zap_ranges and r == RET_PF_FIXED:
            d.check_zap_ranges(fault.gfn)
        return r
    return checked_map


def _zap_range_checked(mmu: Mmu) -> bool:
    """Whether this VM's kvm_zap_gfn_range takes part in the invalidation protocol (6.12): 5.13's zap range
    ran under the read lock with no invalidation at all (faults raced it legitimately), so it is not judged.
    The profile's own variant says so; a switch never adds it (B9 keeps the shape, with a range that matches
    nothing)."""
    from shmmmu.variants import traits
    return "zap-range-invalidates" in traits(mmu.kvm.config.kernel, [])


def _faultin(mmu: Mmu, d: Debug, faultin: Callable) -> Callable:
    if not _zap_range_checked(mmu):
        return faultin
    ended, at = d.zr, d.zr_base + ZapRange.ENDED

    def checked_kvm_faultin_pfn(fault: Any) -> bool:
        out = faultin(fault)
        d.zaps_seen = ended.load(at)         # after the sequence was read: a zap ending later moves it too
        return out
    return checked_kvm_faultin_pfn


def _zap_leafs(mmu: Mmu, d: Debug, zap_leafs: Callable) -> Callable:
    def checked_kvm_tdp_mmu_zap_leafs(start: int, end: int, flush: bool) -> bool:
        # numbered after the caller began its invalidation, stamped before it ends it (the write lock held)
        n = d.zap_range_begun(start, end)
        flush = zap_leafs(start, end, flush)
        d.zap_range_ended(n)
        return flush
    return checked_kvm_tdp_mmu_zap_leafs


def _clear_frozen_spte(mmu: Mmu, d: Debug, clear: Callable) -> Callable:
    tables = mmu.kvm.tables

    def checked_clear_frozen_spte(sptep: int, gfn: int) -> None:
        seen = tables.xchg(sptep, 0)                 # an exchange, to see what it overwrites
        if seen != S.REMOVED:
            mmu.kvm.violation("frozen-entry-overwritten", gfn, seen, 0)
    return checked_clear_frozen_spte


def _remove_table(mmu: Mmu, d: Debug, remove_table: Callable) -> Callable:
    tmeta = mmu.kvm.tmeta

    def checked_remove_table(table: int, shared: bool, removed: list[int]) -> None:
        d.rcu_dereference(tmeta.gfn.load(table), table)     # handle_removed_tdp_mmu_page's rcu_dereference(pt)
        remove_table(table, shared, removed)
    return checked_remove_table


def _free_sp(mmu: Mmu, d: Debug, free_sp: Callable) -> Callable:
    state_col = mmu.kvm.tmeta.state

    def checked_free_sp(table: int) -> None:
        state = state_col.load(table)
        if state != _LIVE:
            mmu.kvm.violation("table-leak", 0, table, state)     # torn down twice, or not live
            return
        free_sp(table)
    return checked_free_sp


def _zap_gfn_range(mmu: Mmu, d: Debug, zap_gfn_range: Callable) -> Callable:
    kvm = mmu.kvm
    root_level, E = kvm.root_level, kvm.E

    def checked_zap_gfn_range(root: int, start: int, end: int, can_yield: bool, flush: bool, shared: bool,
                              min_level: int = 1, zap_all: bool = False) -> bool:
        if min_level != root_level:
            return zap_gfn_range(root, start, end, can_yield, flush, shared, min_level, zap_all)
        d.root_visits = set()
        try:
            flush = zap_gfn_range(root, start, end, can_yield, flush, shared, min_level, zap_all)
            visited = d.root_visits
        finally:
            d.root_visits = None
        sh = kvm.bits * (root_level - 1)
        missed = sorted(set(range(start >> sh, min(E, -(-end >> sh)))) - visited)
        for idx in missed[:4]:
            # a walk of the root level must visit every entry of its range (CVE-2021-47094)
            kvm.violation("invariant", idx << sh, idx, len(missed))
        return flush
    return checked_zap_gfn_range


def _cond_resched(mmu: Mmu, d: Debug, cond_resched: Callable) -> Callable:
    kvm = mmu.kvm
    root_level, tmeta = kvm.root_level, kvm.tmeta

    def checked_cond_resched(it: TdpIter, flush: bool, shared: bool) -> bool:
        index, level = it.index, it.level
        root = it.pt_path[root_level] >> kvm.bits       # the root's first word -> its table index
        root_gen = tmeta.gen.load(root)
        if not cond_resched(it, flush, shared):
            return False
        # the read-side section ended at the yield: what the walk stood in before may have been freed and
        # reused legally since, so the restarted walk records its tables afresh (a generation kept from
        # before the yield made a CAS into a reused table look like a use after free: the soak found it)
        d.walk_gens.clear()
        d.last_table = -1
        if tmeta.gen.load(root) != root_gen or tmeta.state.load(root) != _LIVE:
            # the root was freed (and maybe reused) while the lock was dropped: the walk resumes in it
            kvm.violation("use-after-free", it.next_last_level_gfn, root, root_gen)
        if d.root_visits is not None and level == root_level:
            d.root_visits.discard(index)         # not processed yet: the restart must come back to it
        return True
    return checked_cond_resched


def _notifier_retry(mmu: Mmu, d: Debug, retry: Callable) -> Callable:
    kvm = mmu.kvm
    ctl, memslot_gen = kvm.ctl, mmu.fault.memslot_gen

    def checked_mmu_notifier_retry_hva(fault: Any) -> bool:
        if not retry(fault):
            return False
        # a stale fault needs a cause, or it is retried for ever (B10): an invalidation covering it in
        # progress, one completed since the snapshot, or its memslot changed.  Read after the check, so a
        # cause that came and went has moved the sequence (kvm_dec_notifier_count bumps it first).
        seq = ctl.load(Ctl.NOTIFIER_SEQ)
        covered = ctl.load(Ctl.NOTIFIER_COUNT) and \
            ctl.load(Ctl.NOTIFIER_START) <= fault.gfn < ctl.load(Ctl.NOTIFIER_END)
        if not covered and seq == fault.mmu_seq and memslot_gen.load(fault.slot.id) == fault.slot.gen:
            kvm.violation("fault-retry-without-cause", fault.gfn, fault.mmu_seq, seq)
        return True
    return checked_mmu_notifier_retry_hva


def _enable_log_masked(mmu: Mmu, d: Debug, enable: Callable) -> Callable:
    from shmmmu.layout import MemslotFlags
    from shmmmu.variants import traits
    kvm = mmu.kvm
    if "eager-split" not in traits(kvm.config.kernel, []):     # the profile's own: no switch adds a split
        return enable                             # no split at CLEAR in this kernel: nothing to check
    want = MemslotFlags.LOG_DIRTY | MemslotFlags.INITIALLY_SET

    def checked_enable_log_dirty_pt_masked(slot: Any, gfn: int, mask: int) -> bool:
        changed = enable(slot, gfn, mask)
        if mask and mmu.slots.read(slot.id).flags & want == want:
            start = gfn + (mask & -mask).bit_length() - 1
            end = gfn + mask.bit_length() - 1
            roots = mmu.roots
            mmu.rcu.read_lock()
            try:
                for row in roots.listed_roots():
                    if roots.invalid_col.load(row):
                        continue
                    it = TdpIter(kvm.tables, kvm.geometry, roots.root_table(row), kvm.root_level, 2, start)
                    while it.valid and it.gfn <= end:
                        if it.old_spte & S.MMU_PRESENT and it.old_spte & S.LARGE:
                            kvm.violation("huge-page-after-clear", start, end, max(it.gfn, start))
                            return changed
                        it.next()
            finally:
                mmu.rcu.read_unlock()
        return changed
    return checked_enable_log_dirty_pt_masked


WRAPPERS: dict[str, Wrap] = {
    "kvm.new_iter": _new_iter,
    "kvm.kvm_flush_remote_tlbs": _flush,
    "lock.read_unlock": _unlock,
    "lock.write_unlock": _unlock,
    "tdp.tdp_mmu_set_spte": _set_spte,
    "tdp.tdp_mmu_set_spte_atomic": _set_spte_atomic,
    "tdp.clear_frozen_spte": _clear_frozen_spte,
    "tdp.free_sp": _free_sp,
    "tdp.remove_table": _remove_table,
    "tdp.tdp_mmu_iter_cond_resched": _cond_resched,
    "map.kvm_tdp_mmu_map": _map,
    "zap.zap_gfn_range": _zap_gfn_range,
    "fault.mmu_notifier_retry_hva": _notifier_retry,
    "fault.kvm_faultin_pfn": _faultin,
    "zap.kvm_tdp_mmu_zap_leafs": _zap_leafs,
    "ioctl.kvm_arch_mmu_enable_log_dirty_pt_masked": _enable_log_masked,
}


def install(mmu: Mmu) -> Debug:
    """Put every check in place over its site of this one Mmu; returns the debug state."""
    d = Debug(mmu)
    for key, wrap in WRAPPERS.items():
        target = site_target(mmu, key, "debug")
        name = key.split(".")[1]
        setattr(target, name, wrap(mmu, d, getattr(target, name)))
    return d
