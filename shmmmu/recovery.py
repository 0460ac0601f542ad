"""Recovery: repair the page tables after a worker died in the middle of an MMU operation (an fsck under the write lock).

A vCPU killed with SIGKILL can leave behind, besides the locks and the RCU slot
its own recovery calls release:
  - zaps it made and never flushed: one flush covers them;
  - the reference it held on its root (WState.ROOT): put here, as kvm_mmu_unload
    would have (a kill between the count's increment in kvm_mmu_load and the
    store that records it, two adjacent steps, would leak one reference);
  - the invalidation its kvm_zap_gfn_range began (6.12, WState.INVALIDATING): ended
    here, or the faults on its range would retry for ever;
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
from shmmmu.layout import NIL, ROOT_TABLE, Ctl, RootRow, TableState, TMeta, WState
from shmmmu.variants import traits

TS_FREE, TS_CACHED, TS_LIVE, TS_RETIRED = TableState.FREE, TableState.CACHED, TableState.LIVE, TableState.RETIRED


def root_tables(roots: np.ndarray) -> list[int]:
    """The tables of the listed roots (rows of the roots section with a table)."""
    return [int(t) for t in roots[:, RootRow.TABLE] if t]


def reachable_tables(tables: np.ndarray, root_level: int, roots: list[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The tables reachable from the roots (a boolean mask) and the REMOVED entries found in them."""
    n = tables.shape[0]
    seen = np.zeros(n, dtype=bool)
    frontier = np.unique(np.array([r for r in roots if 0 < r < n], dtype=np.int64))
    seen[frontier] = True
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


def repair_after_crash(mmu, dead: int | None = None) -> list[str]:
    """Run by the supervisor after a worker died and its locks were released; returns what it did.

    `dead` is the dead worker's slot, for the pool's bookkeeping it may have cut short.
    """
    done: list[str] = []
    lock = mmu.lock
    lock.write_lock()
    try:
        if dead is not None:
            ws = mmu.wstate
            held = ws.root.load(dead)
            if held:
                ws.root.store(dead, 0)
                mmu.roots.kvm_tdp_mmu_put_root(held - 1, False)
                done.append(f"recovery: put the dead worker {dead}'s reference on root {held - 1}")
            if ws.invalidating.load(dead):
                # it died inside 6.12's kvm_zap_gfn_range: the invalidation it began is ended, as the zap would
                ws.invalidating.store(dead, 0)
                mmu.notifier.kvm_dec_notifier_count()
                if mmu.debug_state is not None:
                    mmu.debug_state.zap_range_abandoned(dead)
                done.append(f"recovery: ended the invalidation the dead worker {dead}'s kvm_zap_gfn_range began")
            walking = ws.walk_root.load(dead)
            if walking:
                ws.walk_root.store(dead, 0)
                mmu.roots.kvm_tdp_mmu_put_root(walking - 1, False)
                done.append(f"recovery: put the reference the dead worker {dead}'s walk held on root {walking - 1}")
        tables_np = mmu.region.array("tables")
        tw = mmu.tables
        E = mmu.E
        roots = root_tables(mmu.region.array("roots"))
        reach, removed = reachable_tables(tables_np.copy(), mmu.root_level, roots)
        for table, idx in removed:
            if tw.cas(table * E + idx, S.REMOVED, 0) == S.REMOVED:
                done.append(f"recovery: cleared the frozen entry {idx} of table {table} left by the dead worker")
        tm = mmu.region.array("tmeta")
        state = tm[:, TMeta.STATE].copy()
        orphans = np.flatnonzero((state == TS_LIVE) & ~reach)
        if orphans.size:
            # they may still hold present entries (a teardown cut short): freeze them all, count the leaves
            for t in orphans:
                old = np.empty(E, dtype=np.uint64)
                tw.xchg_range(int(t) * E, E, S.REMOVED, old)
            mmu.mark_unflushed()
            mmu.kvm_flush_remote_tlbs()
            for t in orphans:
                mmu.tdp.free_sp(int(t))
            done.append(f"recovery: retired {orphans.size} live tables no entry reached any more")
        done += _repair_pool_and_rings(mmu, dead)
        done += _mark_logging_slots_dirty(mmu)
        # the unflushed-change count the dead left raised: under the write lock nobody else has any;
        # one flush covers the zaps it made, and clears what the debug ledger holds for them
        ctl_w = mmu.ctl
        if ctl_w.load(Ctl.UNFLUSHED):
            ctl_w.store(Ctl.UNFLUSHED, 0)
        if dead is not None and mmu.debug:
            mmu.kvm_flush_remote_tlbs()
            zp = mmu.region.array("zap_pending")[: mmu.config.n_tables * mmu.E]     # not the zap-range records
            zp[(zp & 0xff) == dead + 1] = 0           # its tokens (debug.py's zap ledger)
        # the page count (and with K18 the 5.13 page list) covers exactly the reachable tables below the roots
        live = np.flatnonzero(reach)
        live = live[~np.isin(live, roots)]
        ctl = mmu.ctl
        if "page-list" in traits(mmu.config.kernel, mmu.config.bugs):
            tmeta = mmu.tmeta
            prev = NIL
            for t in live[::-1]:
                t = int(t)
                tmeta.next.store(t, prev if prev != NIL else NIL)
                tmeta.prev.store(t, NIL)
                if prev != NIL:
                    tmeta.prev.store(prev - 1, t + 1)
                prev = t + 1
            ctl.store(Ctl.LIST_HEAD, prev if prev != NIL else 0)
        ctl.store(Ctl.PAGE_COUNT, int(live.size))
        rebuilt = rebuild_nx_list(mmu, reach)
        if rebuilt:
            done.append(rebuilt)
    finally:
        lock.write_unlock()
    return done


def _repair_pool_and_rings(mmu, dead: int | None) -> list[str]:
    """Tables the dead left between two places: taken from the free stack but not yet in its cache,
    taken from its cache but not yet live, or marked retired but not yet on its retire ring."""
    # The MMU write lock keeps out faults and zaps, not the pool's and the reclaimer's moves, which run
    # outside it: the scan holds the pool lock (a table leaves or joins the free stack with its state, in
    # one step under that lock), counts a cached table not in any cache as lost only if the dead owned it
    # (a live worker's is on its way into its cache), and reads the rings before the states (the
    # reclaimer frees a table before it leaves the ring, so one found on no ring after that is not
    # retired any more, or was never queued).
    done: list[str] = []
    tm = mmu.region.array("tmeta")
    ws = mmu.region.array("wstate")
    caches = mmu.region.array("caches")
    ring = mmu.region.array("retire")
    with mmu.pool.lock:
        in_ring = np.zeros(tm.shape[0], dtype=bool)
        for k in range(ws.shape[0]):
            head, tail = int(ws[k, WState.RETIRE_HEAD]), int(ws[k, WState.RETIRE_TAIL])
            for pos in range(head, tail):
                in_ring[int(ring[k, pos % ring.shape[1]])] = True
        state = tm[:, TMeta.STATE].copy()
        owner = tm[:, TMeta.OWNER].copy()
        in_cache = np.zeros(state.size, dtype=bool)
        for k in range(ws.shape[0]):
            n = int(ws[k, WState.CACHE_COUNT])
            in_cache[caches[k, :n].astype(np.intp)] = True
        on_stack = np.zeros(state.size, dtype=bool)
        on_stack[mmu.region.array("pool")[: int(mmu.ctl.load(Ctl.POOL_TOP))].astype(np.intp)] = True
    cached_lost = (state == TS_CACHED) & ~in_cache
    if dead is not None:
        cached_lost &= owner == dead
    lost = np.flatnonzero(cached_lost | ((state == TS_FREE) & ~on_stack))
    lost = lost[lost != ROOT_TABLE]
    if lost.size:
        mmu.pool.free([int(t) for t in lost], from_cache=True)
        done.append(f"recovery: returned {lost.size} tables the dead worker {dead} had between pool and cache")
    unringed = np.flatnonzero((state == TS_RETIRED) & ~in_ring)
    for t in unringed:
        mmu.rcu.call_rcu(int(t))
    if unringed.size:
        done.append(f"recovery: queued {unringed.size} retired tables the dead worker {dead} never queued")
    return done


def _mark_logging_slots_dirty(mmu) -> list[str]:
    """A vCPU killed between making a leaf writable and setting its dirty bit leaves a page that
    takes writes unlogged; nobody can tell which, so every page of a logging slot is reported
    dirty at the next collection (false positives are allowed, a miss is not)."""
    done = []
    slots = mmu.slots
    for slot in slots.slots():
        if slot.active and slot.logging:
            for k in range(slots.dirty_words(slot)):
                bits = min(64, slot.npages - 64 * k)
                slots.dirty.fetch_or(slot.dirty_off + k, (1 << bits) - 1)
            done.append(f"recovery: reported all {slot.npages} pages of logging slot {slot.id} dirty")
    return done


def rebuild_nx_list(mmu, reach: np.ndarray) -> str:
    """The NX list holds exactly the reachable tables marked listed, in its old order as far as it is intact.

    A worker killed inside account/unaccount_huge_nx_page can leave the links
    half-written, and the orphans retired above were never taken off it.
    Returns what changed ("" if nothing).
    """
    cols, ctl = mmu.tmeta, mmu.ctl
    n = reach.size
    order: list[int] = []
    seen: set[int] = set()
    cur = ctl.load(Ctl.NX_HEAD)
    while cur and 0 < cur <= n and len(order) <= n and cur - 1 not in seen:
        order.append(cur - 1)
        seen.add(cur - 1)
        cur = cols.nx_next.load(cur - 1)
    tmeta = mmu.region.array("tmeta")
    marked = np.flatnonzero(tmeta[:, TMeta.NX_LISTED] != 0)
    keep = [t for t in order if reach[t] and tmeta[t, TMeta.NX_LISTED]]
    keep += [int(t) for t in marked if reach[t] and int(t) not in seen]
    dropped = [int(t) for t in marked if not reach[t]]
    before = (order, ctl.load(Ctl.NX_COUNT))
    for t in dropped:
        cols.nx_listed.store(t, 0)
        cols.nx.store(t, 0)
    prev = 0
    for t in keep:
        cols.nx_prev.store(t, prev)
        cols.nx_next.store(t, 0)
        if prev:
            cols.nx_next.store(prev - 1, t + 1)
        prev = t + 1
    ctl.store(Ctl.NX_HEAD, keep[0] + 1 if keep else 0)
    ctl.store(Ctl.NX_TAIL, prev)
    ctl.store(Ctl.NX_COUNT, len(keep))
    if before == (keep, len(keep)) and not dropped:
        return ""
    return f"recovery: rebuilt the NX list ({len(keep)} tables, {len(dropped)} unreachable dropped)"
