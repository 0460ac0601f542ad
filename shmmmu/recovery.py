"""Recovery: repair the page tables after a worker died in the middle of an MMU operation (an fsck under the write lock).

A vCPU killed with SIGKILL can leave behind, besides the locks and the RCU slot
its own recovery calls release:
  - an entry it froze (REMOVED) and never cleared: faults on it would retry forever;
  - a table it allocated and linked but never put on the page list, or a table
    it was tearing down when it died: live, but unreachable (a leak);
  - tables in its memory cache.
Under the write lock no software walker is inside (faults allocate and freeze
only under the read lock), so every REMOVED entry in a reachable table and every
live table that is not reachable belongs to the dead.  The repair clears the
former, retires the latter after a flush (hardware walks may still stand in
them), and rebuilds the page list from the reachable set.
"""
from __future__ import annotations

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import (C_LIST_COUNT, C_LIST_HEAD, NIL, ROOT_TABLE, TMETA_WORDS, T_NEXT, T_PREV, T_STATE,
                           TS_LIVE)


def reachable_tables(tables: np.ndarray, root_level: int, root: int = ROOT_TABLE) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The tables reachable from the root (a boolean mask) and the REMOVED entries found in them."""
    n = tables.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[root] = True
    frontier = np.array([root], dtype=np.int64)
    removed: list[tuple[int, int]] = []
    level = root_level
    while frontier.size:
        ent = tables[frontier]
        for r, c in np.argwhere(ent == np.uint64(S.REMOVED)):
            removed.append((int(frontier[r]), int(c)))
        if level == 1:
            break
        kids = S.pfn_array(ent[S.nonleaf_mask(ent, level)]).astype(np.int64)
        kids = kids[(kids > 0) & (kids < n)]
        kids = kids[~seen[kids]]
        seen[kids] = True
        frontier = np.unique(kids)
        level -= 1
    return seen, removed


def repair_after_crash(mmu) -> list[str]:
    """Run by the supervisor after a worker died and its locks were released; returns what it did."""
    done: list[str] = []
    lock = mmu.lock
    lock.write_lock()
    try:
        tables_np = mmu.region.array("tables")
        tw = mmu.tables
        E = mmu.E
        reach, removed = reachable_tables(tables_np.copy(), mmu.root_level)
        for table, idx in removed:
            if tw.cas(table * E + idx, S.REMOVED, 0) == S.REMOVED:
                done.append(f"recovery: cleared the frozen entry {idx} of table {table} left by the dead worker")
        tm = mmu.region.array("tmeta")
        state = tm[:, T_STATE].copy()
        orphans = np.flatnonzero((state == TS_LIVE) & ~reach)
        if orphans.size:
            # they may still hold present entries (a teardown cut short): freeze them all, count the leaves
            for t in orphans:
                old = np.empty(E, dtype=np.uint64)
                tw.xchg_range(int(t) * E, E, S.REMOVED, old)
            mmu._mark_unflushed()
            mmu.flush_remote_tlbs()
            for t in orphans:
                mmu._free_table(int(t))
            done.append(f"recovery: retired {orphans.size} live tables no entry reached any more")
        # the page list holds exactly the reachable tables below the root
        live = np.flatnonzero(reach)
        live = live[live != ROOT_TABLE]
        tmw = mmu.tm
        ctl = mmu.ctl
        prev = NIL
        for t in live[::-1]:
            t = int(t)
            tmw.store(t * TMETA_WORDS + T_NEXT, prev if prev != NIL else NIL)
            tmw.store(t * TMETA_WORDS + T_PREV, NIL)
            if prev != NIL:
                tmw.store((prev - 1) * TMETA_WORDS + T_PREV, t + 1)
            prev = t + 1
        ctl.store(C_LIST_HEAD, prev if prev != NIL else 0)
        ctl.store(C_LIST_COUNT, int(live.size))
    finally:
        lock.write_unlock()
    return done
