"""Integrity: guest-memory checks in the manner of the kernel's dirty_log_test, on whole arrays at once.

Every value a vCPU writes names its GFN (shmmmu.workloads.make_value), so a
page holding another GFN's value, or a host page that no mapping owns but that
lost its poison, shows a write that went astray.  The dirty-log oracle checks
that every page whose contents changed since the last collection was reported.
"""
from __future__ import annotations

import numpy as np

from shmmmu.memslots import DATA_POISON, Memslots, bank_size
from shmmmu.workloads import GFN_MASK

_MARK = np.uint64(1 << 63)


def guest_values(vm, slot_id: int = 0) -> np.ndarray:
    """The current contents of every page of a slot, through the host map (a snapshot)."""
    s = Memslots(vm).read(slot_id)
    hm = vm.region.array("host_map")[s.host_off: s.host_off + s.npages].astype(np.intp)
    return vm.region.array("data")[hm].copy()


def check_guest_memory(vm) -> list[str]:
    """Each page holds 0 or a value naming itself; each host page no GFN maps still holds poison."""
    problems = []
    ms = Memslots(vm)
    data = vm.region.array("data")
    for s in ms.slots():
        hm = vm.region.array("host_map")[s.host_off: s.host_off + s.npages].astype(np.intp)
        vals = data[hm]
        gfns = np.arange(s.base_gfn, s.end_gfn, dtype=np.uint64)
        written = (vals & _MARK) != 0
        bad = written & ((vals & np.uint64(GFN_MASK)) != (gfns & np.uint64(GFN_MASK)))
        bad |= ~written & (vals != 0)
        for i in np.flatnonzero(bad)[:10]:
            problems.append(f"guest-memory-corrupt: gfn {int(gfns[i]):#x} holds {int(vals[i]):#x}")
        owned = np.zeros(2 * bank_size(s, ms.bits), dtype=bool)
        owned[hm - s.data_off] = True
        unowned = np.flatnonzero(~owned)
        stray = unowned[data[s.data_off + unowned] != np.uint64(DATA_POISON)]
        for i in stray[:10]:
            problems.append(f"write-to-unmapped-host-page: host page {int(s.data_off + i):#x} of slot {s.id} "
                            f"holds {int(data[s.data_off + i]):#x}")
    return problems


def dirty_log_missed(before: np.ndarray, after: np.ndarray, bitmap: np.ndarray, base_gfn: int) -> list[int]:
    """GFNs whose contents changed between two collections but whose dirty bit was not reported."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: before.size].astype(bool)
    changed = before != after
    return [base_gfn + int(i) for i in np.flatnonzero(changed & ~bits)]


def table_problems(vm) -> list[str]:
    """At a quiet point (no worker running): reachability and accounting of the table pool.

    Every table reachable from the root is live and reached once, holds no REMOVED
    entry, and every live table is reachable (else it leaked); states add up:
    live + free + cached + retired == pool size, free == the free stack, retired == the
    retire backlog.
    """
    from shmmmu import spte as S
    from shmmmu.layout import (C_POOL_TOP, T_STATE, TS_CACHED, TS_FREE, TS_LIVE, TS_RETIRED, W_CACHE_COUNT,
                               W_RETIRE_HEAD, W_RETIRE_TAIL, WSTATE_WORDS)
    problems = []
    tables = vm.region.array("tables").copy()
    state = vm.region.array("tmeta")[:, T_STATE].copy()
    n = tables.shape[0]
    seen = np.zeros(n, dtype=np.int64)
    frontier = np.array([0], dtype=np.int64)
    level = vm.config.geometry.root_level
    seen[0] = 1
    while frontier.size and level > 1:
        ent = tables[frontier]
        removed = int((ent == np.uint64(S.REMOVED)).sum())
        if removed:
            problems.append(f"invariant: {removed} REMOVED entries in reachable level-{level} tables")
        nonleaf = S.nonleaf_mask(ent, level)
        children = S.pfn_array(ent[nonleaf]).astype(np.int64)
        bad = children[(children <= 0) | (children >= n)]
        if bad.size:
            problems.append(f"invariant: a level-{level} entry points at table {int(bad[0])}, out of the pool")
        children = children[(children > 0) & (children < n)]
        np.add.at(seen, children, 1)
        frontier = children
        level -= 1
    if frontier.size:
        ent = tables[frontier]
        removed = int((ent == np.uint64(S.REMOVED)).sum())
        if removed:
            problems.append(f"invariant: {removed} REMOVED entries in reachable 4K tables")
    twice = np.flatnonzero(seen > 1)
    if twice.size:
        problems.append(f"invariant: table {int(twice[0])} is reachable {int(seen[twice[0]])} times")
    reach = seen > 0
    not_live = np.flatnonzero(reach & (state != TS_LIVE))
    if not_live.size:
        problems.append(f"use-after-free: reachable table {int(not_live[0])} is in state {int(state[not_live[0]])}")
    leaked = np.flatnonzero(~reach & (state == TS_LIVE))
    if leaked.size:
        from shmmmu.layout import NIL, T_GFN, T_LEVEL, T_OWNER
        tm = vm.region.array("tmeta")
        t = int(leaked[0])
        owner = int(tm[t, T_OWNER])
        how = "never linked, allocated by worker %d" % owner if owner != NIL else "linked once, then lost"
        from shmmmu.layout import T_PARENT
        parent = int(tm[t, T_PARENT])
        if parent != NIL and owner == NIL:
            E = tables.shape[1]
            p_t, p_i = divmod(parent, E)
            from shmmmu.layout import T_RETIRE_FLUSH
            td = int(tm[p_t, T_RETIRE_FLUSH])
            how += (f"; linked at table {p_t} entry {p_i} (table state {int(state[p_t])}, entry now "
                    f"{int(tables[p_t, p_i]):#x}, torn down by worker {td >> 8} shared={(td >> 4) & 1} "
                    f"lock={td & 3})")
        problems.append(f"table-leak: {leaked.size} live tables are unreachable (first: table {t}, level "
                        f"{int(tm[t, T_LEVEL])}, gfn {int(tm[t, T_GFN]):#x}, {how})")
    ws = vm.region.array("wstate")
    n_free, n_cached = int((state == TS_FREE).sum()), int((state == TS_CACHED).sum())
    n_retired = int((state == TS_RETIRED).sum())
    top = int(vm.region.array("ctl")[C_POOL_TOP])
    cached = int(ws[:, W_CACHE_COUNT].sum())
    backlog = int((ws[:, W_RETIRE_TAIL] - ws[:, W_RETIRE_HEAD]).sum())
    if n_free != top:
        problems.append(f"table-leak: {n_free} tables are free but the free stack holds {top}")
    if n_cached != cached:
        problems.append(f"table-leak: {n_cached} tables are cached but the vCPU caches hold {cached}")
    if n_retired != backlog:
        problems.append(f"table-leak: {n_retired} tables are retired but the retire rings hold {backlog}")
    live = int(reach.sum())
    leak = n - (live + n_free + n_cached + n_retired) - int((~reach & (state == TS_LIVE)).sum())
    if leak:
        problems.append(f"table-leak: allocated - freed - reachable - pending = {leak}")
    return problems
