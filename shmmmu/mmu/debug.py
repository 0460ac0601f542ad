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
  translations of one address (K5's aliasing, and K11's install in a yield);
- mmu_lock is never dropped while this worker holds unflushed changes (I6).
"""
from __future__ import annotations

import sys

from typing import TYPE_CHECKING, Callable

from shmmmu import spte as S
from shmmmu.layout import PIPE_LEN, Ctl, TableState, TMeta, WState
from shmmmu.rcu import pipe_age
from shmmmu.tdp_iter import TdpIter

if TYPE_CHECKING:
    from shmmmu.mmu import Mmu

_TM = TMeta.WORDS
_LIVE = TableState.LIVE


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
    """One Mmu's debug state: the tables the current walk stood in, and the root entries a zap-all visited."""

    def __init__(self, mmu: "Mmu"):
        self.mmu = mmu
        self.tm = mmu.tm
        self.pipe = mmu.region.words("pipe")
        self.pipe_base = mmu.worker * PIPE_LEN
        self.rcu_word = mmu.worker * WState.WORDS + WState.RCU
        self.walk_gens: dict[int, int] = {}
        self.last_table = -1
        self.root_visits: set[int] | None = None

    def arrive(self, it: TdpIter) -> None:
        """A walk stands on an entry: Reader-Pipe age and generation of its table (once per table per walk)."""
        table = it.table
        if self.root_visits is not None and it.level == it.root_level:
            self.root_visits.add(it.index)
        if table == self.last_table:
            return
        self.last_table = table
        t = table * _TM
        tm = self.tm
        if table not in self.walk_gens:
            self.walk_gens[table] = tm.load(t + TMeta.GEN)
        state = tm.load(t + TMeta.STATE)
        if state == _LIVE:
            age = 0
        else:
            mmu = self.mmu
            age = pipe_age(state, tm.load(t + TMeta.RETIRE_EPOCH), mmu.rcu.ws.load(self.rcu_word),
                           mmu.ctl.load(Ctl.EPOCH))
        self.pipe.fetch_add(self.pipe_base + min(age, PIPE_LEN - 1), 1)
        if age >= 2:
            self.mmu.violation("use-after-free", it.gfn, table, age)

    def new_walk(self) -> None:
        self.walk_gens.clear()
        self.last_table = -1

    def check_walk_gens(self, gfn: int) -> None:
        """No table the walk stood in was freed meanwhile (a grace period cannot end while we are inside)."""
        tm = self.tm
        for table, gen in self.walk_gens.items():
            if tm.load(table * _TM + TMeta.GEN) != gen:
                self.mmu.violation("use-after-free", gfn, table, gen)


def install(mmu: "Mmu") -> Debug:
    """Wrap the functions of one Mmu that the debug checkers watch; returns the debug state."""
    d = Debug(mmu)
    tm = mmu.tm
    E = mmu.E
    geometry, root_level, tables = mmu.geometry, mmu.root_level, mmu.tables

    def new_iter(root: int, min_level: int, start: int) -> TdpIter:
        d.new_walk()
        return CheckedTdpIter(d.arrive, tables, geometry, root, root_level, min_level, start)
    mmu.new_iter = new_iter
    # made before this process has a root: it reports from its first start() on, not on construction
    mmu.fault_walk = CheckedTdpIter(lambda it: None, tables, geometry, mmu.root, root_level, 1, 0)
    mmu.fault_walk.arrive = d.arrive

    # The zap ledger: an entry a zap made non-present holds the zapper's token (worker + 1, and the number
    # of flushes that worker has done, so a later mark is told from an earlier one) until that worker's
    # flush returns.  An install over a non-present entry is one too early if the same token stood there
    # before its store and still stands after it: the zap came before the install, and the flush after it.
    pending_w = mmu.region.words("zap_pending")
    pending: list[int] = []
    present = S.MMU_PRESENT
    epoch = [1]

    def ledger_before(old: int, sptep: int) -> int:
        return 0 if old & present else pending_w.load(sptep)

    def zap_ledger(sptep: int, gfn: int, old: int, new: int, before: int) -> None:
        if new & present:
            if before and pending_w.load(sptep) == before:
                mmu.violation("install-before-flush", gfn, sptep, (before & 0xff) - 1)
        elif old & present:
            pending_w.store(sptep, (epoch[0] << 8) | (mmu.worker + 1))
            pending.append(sptep)

    flush_remote = mmu.kvm_flush_remote_tlbs

    def checked_flush() -> None:
        flush_remote()
        token = (epoch[0] << 8) | (mmu.worker + 1)
        for sptep in pending:
            pending_w.cas(sptep, token, 0)          # a later zap's mark stays
        pending.clear()
        epoch[0] += 1
    mmu.kvm_flush_remote_tlbs = checked_flush

    set_spte = mmu.tdp_mmu_set_spte

    def checked_set_spte(it: TdpIter, new: int, record_dirty_log: bool = True,
                         record_acc_track: bool = True) -> None:
        sptep, gfn, old = it.sptep, it.gfn, it.old_spte
        before = ledger_before(old, sptep)
        set_spte(it, new, record_dirty_log, record_acc_track)
        zap_ledger(sptep, gfn, old, new, before)
    mmu.tdp_mmu_set_spte = checked_set_spte

    lock = mmu.lock
    for name in ("read_unlock", "write_unlock"):
        def checked_unlock(unlock=getattr(lock, name)) -> None:
            # not while an exception unwinds the holder (the explorer aborting an actor, a crash):
            # the kernel's code has no such path
            if mmu.holds_unflushed and sys.exc_info()[0] is None:
                mmu.violation("lock-dropped-unflushed", 0, mmu.worker, 2)     # I6
            unlock()
        setattr(lock, name, checked_unlock)
    mmu.mmu_read_unlock = lock.read_unlock          # the fault path's bound copy (kvm.py)

    set_spte_atomic = mmu.tdp_mmu_set_spte_atomic

    def checked_set_spte_atomic(it: TdpIter, new: int) -> bool:
        # sampled before the CAS: a table retires only after all its entries are frozen,
        # so a CAS can succeed on a table that was already dead only if freezing is broken
        state_before = tm.load(it.table * _TM + TMeta.STATE)
        old = it.old_spte
        before = ledger_before(old, it.sptep)
        if not set_spte_atomic(it, new):
            return False
        zap_ledger(it.sptep, it.gfn, old, new, before)
        if state_before != _LIVE and new & S.MMU_PRESENT:
            mmu.violation("install-into-dead-table", it.gfn, it.table, state_before)
        gen = d.walk_gens.get(it.table)
        if gen is not None and gen != tm.load(it.table * _TM + TMeta.GEN):
            # the table was freed (and maybe reused) while this RCU reader held it
            mmu.violation("use-after-free", it.gfn, it.table, gen)
        return True
    mmu.tdp_mmu_set_spte_atomic = checked_set_spte_atomic

    kvm_tdp_mmu_map = mmu.kvm_tdp_mmu_map

    def checked_map(fault, shared: bool) -> int:
        # an outer read-side section, so that the end-of-section check is still inside it
        mmu.rcu.read_lock()
        try:
            d.new_walk()
            r = kvm_tdp_mmu_map(fault, shared)
            d.check_walk_gens(fault.gfn)
        finally:
            mmu.rcu.read_unlock()
        return r
    mmu.kvm_tdp_mmu_map = checked_map

    def checked_clear_frozen_spte(sptep: int, gfn: int) -> None:
        seen = tables.xchg(sptep, 0)
        if seen != S.REMOVED:
            mmu.violation("frozen-entry-overwritten", gfn, seen, 0)
    mmu.clear_frozen_spte = checked_clear_frozen_spte

    free_sp = mmu.free_sp

    def checked_free_sp(table: int) -> None:
        state = tm.load(table * _TM + TMeta.STATE)
        if state != _LIVE:
            mmu.violation("table-leak", 0, table, state)     # torn down twice, or not live
            return
        free_sp(table)
    mmu.free_sp = checked_free_sp

    zap_gfn_range = mmu.zap_gfn_range

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
        sh = mmu.bits * (root_level - 1)
        missed = sorted(set(range(start >> sh, min(E, -(-end >> sh)))) - visited)
        for idx in missed[:4]:
            # a walk of the root level must visit every entry of its range (CVE-2021-47094)
            mmu.violation("invariant", idx << sh, idx, len(missed))
        return flush
    mmu.zap_gfn_range = checked_zap_gfn_range

    cond_resched = mmu.tdp_mmu_iter_cond_resched

    def checked_cond_resched(it: TdpIter, flush: bool, shared: bool) -> bool:
        index, level = it.index, it.level
        root = it.pt_path[root_level] >> mmu.bits       # the root's first word -> its table index
        root_gen = tm.load(root * _TM + TMeta.GEN)
        if not cond_resched(it, flush, shared):
            return False
        # the read-side section ended at the yield: what the walk stood in before may have been freed and
        # reused legally since, so the restarted walk records its tables afresh (a generation kept from
        # before the yield made a CAS into a reused table look like a use after free: the soak found it)
        d.walk_gens.clear()
        d.last_table = -1
        if tm.load(root * _TM + TMeta.GEN) != root_gen or tm.load(root * _TM + TMeta.STATE) != _LIVE:
            # the root was freed (and maybe reused) while the lock was dropped: the walk resumes in it
            mmu.violation("use-after-free", it.next_last_level_gfn, root, root_gen)
        if d.root_visits is not None and level == root_level:
            d.root_visits.discard(index)         # not processed yet: the restart must come back to it
        return True
    mmu.tdp_mmu_iter_cond_resched = checked_cond_resched
    return d
