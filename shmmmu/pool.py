"""Pool: the VM's page-table pages: a global free stack, per-vCPU memory caches, accounting and poisoning.

Tables are handed out already zeroed: whoever frees a table clears it in bulk
(the reclaimer, after a grace period), so the fault path never clears one (the
series' "don't redundantly clear TDP MMU pt memory").  Each vCPU tops its own
cache up *before* it takes the MMU lock (mmu_topup_memory_caches), so a fault
allocates up to `cache_min` tables without touching the global pool.

In debug mode a freed table is filled with POISON instead of zeros, so a walker
that reads a freed table sees it; the poison is cleared when the table moves
into a vCPU cache (still outside the MMU lock).  Every free bumps the table's
generation, so a reader holding a stale reference can tell.
"""
from __future__ import annotations

import numpy as np

from shmmmu import spte as S
from shmmmu import violations
from shmmmu.layout import NIL, ROOT_TABLE, Ctl, Locks, TableState, TMeta, VMConfig, WState
from shmmmu.region import Region
from shmmmu.rwlock import Mutex
from shmmmu.wait import REAL, Waits

TS_FREE, TS_CACHED, TS_LIVE = TableState.FREE, TableState.CACHED, TableState.LIVE

POISON = 0xDEADBEEFDEADB000      # not present (bit 11 clear, RWX clear): reads as "empty" unless checked


class PoolExhausted(RuntimeError):
    """No free page table is left, even after waiting for reclamation."""


class Pool:
    """One process's handle on the table pool and its own memory cache."""

    def __init__(self, region: Region, worker: int, config: VMConfig, waits: Waits = REAL):
        self.worker = worker
        self.waits = waits
        self.config = config
        self.debug = config.debug
        self.tables = region.array("tables")
        self.tables_region = region
        self.tw = region.words("tables")
        self.tmeta_np = region.array("tmeta")
        self.tm = region.words("tmeta")
        self.tmeta = region.columns("tmeta", TMeta)
        self.stack = region.array("pool")
        self.ctl = region.words("ctl")
        self.ws = region.words("wstate")
        self.caches = region.array("caches")
        self.cache = self.caches[worker]
        self.cache_count = region.columns("wstate", WState).cache_count
        self.count_word = self.cache_count.word(worker)
        self.count = self.ws.load(self.count_word)
        self.capacity = config.cache_capacity
        self.min = config.cache_min
        self.lock = Mutex(region, Locks.POOL, worker, waits)
        self.entries = self.tables.shape[1]
        self.refills = 0

    # ---- set-up (the creator, before any other process runs)

    def init_all_free(self) -> None:
        n = self.tables.shape[0]
        self.tables[:] = POISON if self.debug else 0
        self.tables[ROOT_TABLE] = 0
        self.tmeta_np[:] = 0
        self.tmeta_np[:, TMeta.PARENT] = NIL
        self.tmeta_np[:, TMeta.PREV] = NIL
        self.tmeta_np[:, TMeta.NEXT] = NIL
        self.tmeta_np[:, TMeta.OWNER] = NIL
        self.tmeta_np[:, TMeta.GEN] = 1
        # table 0 is never handed out: 0 means "no table" in the roots rows (roots are pool tables,
        # allocated by the vCPU that first needs one)
        free = np.arange(n - 1, 0, -1, dtype=np.uint64)
        self.stack[: n - 1] = free
        self.ctl.store(Ctl.POOL_TOP, n - 1)

    # ---- the vCPU cache

    def topup(self, wait: float = 5.0, on_wait=None) -> None:
        """mmu_topup_memory_caches(): if below `cache_min`, fill the cache to capacity (outside the MMU lock)."""
        if self.count >= self.min:
            return
        waits = self.waits
        deadline = waits.now() + wait
        while True:
            got = self._take(self.capacity - self.count)
            if self.count >= self.min:
                return
            if waits.now() > deadline:
                raise PoolExhausted(f"out of page tables: {self.tables.shape[0]} in the pool, none free after "
                                    f"waiting {wait:.0f}s for reclamation (give the VM more tables)")
            if on_wait is not None:
                on_wait()
            waits.pause(0.0005 if got == 0 else 0)

    def _take(self, want: int) -> int:
        with self.lock:
            top = self.ctl.load(Ctl.POOL_TOP)
            n = min(want, top)
            if n:
                got = self.stack[top - n: top][::-1].copy()
                self.ctl.store(Ctl.POOL_TOP, top - n)
                idx = got.astype(np.intp)
                if self.debug:
                    states = self.tmeta_np[idx, TMeta.STATE]
                    if (states != TS_FREE).any():
                        k = int(np.flatnonzero(states != TS_FREE)[0])
                        violations.record(self.tables_region, "table-leak", self.worker, 0, int(got[k]),
                                          int(states[k]))
                # off the stack and owned by us in one step under the lock: a crash recovery scans
                # under it, and must not take a table on its way into a live worker's cache for lost
                for t in got.tolist():
                    self.tm.touch(self.tmeta.start(int(t)), TMeta.WORDS, True)
                self.tmeta_np[idx, TMeta.OWNER] = self.worker
                self.tmeta_np[idx, TMeta.STATE] = TS_CACHED
        if not n:
            return 0
        if self.debug:
            for t in idx.tolist():
                self.tw.touch(t * self.entries, self.entries, True)
            self.tables[idx] = 0          # clear the poison, still outside the MMU lock
        self.cache[self.count: self.count + n] = got
        self.count += n
        self.ws.store(self.count_word, self.count)
        self.refills += 1
        return n

    def alloc(self, level: int, gfn: int) -> int:
        """Take a zeroed table from this worker's cache (never sleeps: the cache was topped up)."""
        if self.count == 0:
            raise PoolExhausted(f"worker {self.worker}'s memory cache is empty: topup() was not called "
                                f"before taking the MMU lock")
        self.count -= 1
        table = int(self.cache[self.count])
        self.ws.store(self.count_word, self.count)
        tmeta = self.tmeta
        tmeta.level.store(table, level)
        tmeta.gfn.store(table, gfn)
        tmeta.nx.store(table, 0)
        tmeta.owner.store(table, self.worker)     # cleared once linked (tdp_mmu_link_page)
        tmeta.state.store(table, TS_LIVE)
        return table

    def unalloc(self, table: int) -> None:
        """Give back a table that was never made visible (a lost link race): it is still zeroed."""
        self.tmeta.state.store(table, TS_CACHED)
        self.tmeta.owner.store(table, self.worker)
        self.cache[self.count] = table
        self.count += 1
        self.ws.store(self.count_word, self.count)

    # ---- freeing (the reclaimer after a grace period; exclusive mode at once)

    def free(self, tables: list[int], from_cache: bool = False) -> None:
        """Clear (or poison) tables in bulk, bump their generation, and push them on the free stack.

        `from_cache`: tables a dead worker held in (or on the way to) its cache, returned by
        recovery; they are not retired, so the debug check of the state is skipped.
        """
        if not tables:
            return
        idx = np.asarray(tables, dtype=np.intp)
        E = self.entries
        if self.debug:
            for t in tables:
                self.tw.touch(t * E, E, False)        # the checks below read them
            for t in tables:
                self.tm.touch(self.tmeta.start(t), TMeta.WORDS, False)
            states = self.tmeta_np[idx, TMeta.STATE]
            if not from_cache and ((states == TS_FREE).any() or (states == TS_CACHED).any()):
                k = int(np.flatnonzero((states == TS_FREE) | (states == TS_CACHED))[0])
                violations.record(self.tables_region, "table-leak", self.worker, 1, int(idx[k]), int(states[k]))
            # a table is freed only after teardown: no entry may still be present
            snap = self.tables[idx]
            bad = np.argwhere((snap & np.uint64(S.MMU_PRESENT)) != 0)
            if bad.size:
                row, col = (int(x) for x in bad[0])
                val = int(snap[row, col])
                child = S.pfn(val)
                linker = int(self.tmeta_np[child, TMeta.LINKER]) if child < self.tmeta_np.shape[0] else -1
                violations.record(self.tables_region, "install-into-dead-table", self.worker,
                                  (int(idx[row]) << 16) | col, val, linker)
        for t in tables:                              # the poison (or clear) writes them: its own point
            self.tw.touch(t * E, E, True)
        self.tables[idx] = POISON if self.debug else 0
        tmeta = self.tmeta
        for table in tables:
            tmeta.gen.fetch_add(table, 1)
            tmeta.parent.store(table, NIL)
        with self.lock:
            # FREE and on the stack in one step under the lock (a crash recovery scans under it)
            for table in tables:
                tmeta.state.store(table, TS_FREE)
            top = self.ctl.load(Ctl.POOL_TOP)
            self.stack[top: top + len(tables)] = idx
            self.ctl.store(Ctl.POOL_TOP, top + len(tables))

    def recover(self, dead: int) -> int:
        """Return a dead worker's cached tables to the pool; returns how many."""
        n = self.cache_count.load(dead)
        if n:
            cached = [int(x) for x in self.caches[dead, :n]]
            self.cache_count.store(dead, 0)
            self.free(cached, from_cache=True)
        return n

    def free_count(self) -> int:
        return self.ctl.load(Ctl.POOL_TOP)

