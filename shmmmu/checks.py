"""Checks: the page-table invariants of DESIGN.md §7, verified on a read-only snapshot of a VM region.

Every checker works on a `shmmmu.snapshot.Snapshot`: whole-array numpy copies
of the sections it reads, taken first.  The checkers then read only the
copies, so they never block or disturb a running VM and can work on a region
attached read-only (`shmmmu inspect --check`).  The copies are taken one
section after the other: only at a quiet point (no fault, zap or reclaim in
flight) do they describe one instant.  On a live VM a checker may report a
transient state (a table between its link and its page-list entry, an entry
frozen mid-zap) as a problem.

Each public `check_*` function states its invariant in its docstring and
returns a list of `Problem`s (empty: the invariant holds).  `check_all` runs
them all.  The table walk is snapshot.walk_tables, the one the inspector
uses too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shmmmu import hostpage
from shmmmu import spte as S
from shmmmu.layout import N_STATS, NIL, STAT, Ctl, MemslotFlags, TableState, TMeta, WState
from shmmmu.snapshot import Snapshot, Source, Walk, snapshot, take_snapshot, walk_tables
from shmmmu.variants import traits

__all__ = ["Problem", "Snapshot", "Walk", "Leaf", "snapshot", "take_snapshot", "walk_tables", "count_leaves",
           "leaves_by_gfn", "retired_count", "check_table_structure", "check_table_accounting",
           "check_roots", "check_leaves_in_memslots", "check_leaf_pfns", "check_stats", "check_logging_slots", "check_nx_list", "check_host_pages",
           "check_all"]

_U = np.uint64
_W = _U(S.WRITABLE)
_PFN = _U(S.PFN_MASK)
_SHIFT = _U(S.PFN_SHIFT)
TS_FREE, TS_CACHED, TS_LIVE, TS_RETIRED = TableState.FREE, TableState.CACHED, TableState.LIVE, TableState.RETIRED


@dataclass(frozen=True)
class Problem:
    """One invariant breach: `kind` is a violations.KINDS name, `message` one sentence."""

    kind: str
    message: str
    gfn: int | None = None

    def __str__(self) -> str:
        where = f" (gfn {self.gfn:#x})" if self.gfn is not None else ""
        return f"{self.kind}: {self.message}{where}"


@dataclass(frozen=True)
class Leaf:
    """One 4 KiB GFN's translation, decoded: the leaf's level, the host page of this GFN, the leaf's flags."""

    level: int
    pfn: int
    flags: int                   # the leaf entry with its PFN bits cleared


def count_leaves(source: Source) -> dict[int, int]:
    """Present leaves reachable from the roots (all of them), per level (1: 4K, 2: 2M, 3: 1G)."""
    return walk_tables(source).mappings()


def leaves_by_gfn(source: Source, role: int = 0) -> dict[int, Leaf]:
    """Every 4 KiB GFN the valid root of `role` maps: the level of its leaf, its own host page, and the
    leaf's flag bits.

    Two VMs that ran the same operations map the same GFNs alike exactly when
    these dictionaries are equal, whichever pool tables their walks used.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    g = snap.geometry
    rows = {r["row"] for r in snap.root_rows() if r["role"] == role and not r["invalid"]}
    out: dict[int, Leaf] = {}
    for gfn, level, spte, root in zip(w.leaf_gfn.tolist(), w.leaf_level.tolist(), w.leaf_spte.tolist(),
                                      w.leaf_root.tolist()):
        if root not in rows:
            continue
        pfn = (spte & S.PFN_MASK) >> S.PFN_SHIFT
        flags = spte & ~S.PFN_MASK
        for k in range(g.pages(level)):
            out[gfn + k] = Leaf(level, pfn + k, flags)
    return out


def retired_count(source: Source) -> int:
    """Tables retired to RCU and not yet freed (pending in the workers' retire rings)."""
    snap = snapshot(source)
    return sum(int(r[WState.RETIRE_TAIL]) - int(r[WState.RETIRE_HEAD]) for r in snap.wstate)


# ---------------------------------------------------------------- checkers


def check_table_structure(source: Source) -> list[Problem]:
    """Every live table is reachable exactly once, and is what its metadata says.

    Invariant (DESIGN.md §7, KVM_TDP_MMU.md §13 I3): walking from every root, no
    table is reached twice (no shared subtree between roots or within one, no
    cycle), no entry of a
    reachable table is REMOVED (a frozen entry never outlives its zap) or a
    non-present non-zero value (poison of a freed table), every child link
    names a pool table other than the root, every reachable table's recorded
    level is the level of its entries and its recorded GFN the first GFN it
    covers, and its state is live.  Leaves exist only at levels 1-3, the
    page-size bit only on huge leaves, and a huge leaf's host page is aligned
    to its size.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    problems = [Problem(o.kind, f"table {o.table} (level {o.level}) entry {o.index} = {o.raw:#x}: {o.what}", o.gfn)
                for o in w.odd]
    if w.odd_count > len(w.odd):
        problems.append(Problem("invariant", f"... and {w.odd_count - len(w.odd)} more odd entries in reachable "
                                             f"tables"))
    tm = snap.tmeta[w.tables]
    lvl_bad = tm[:, TMeta.LEVEL].astype(np.int64) != w.t_level
    gfn_bad = tm[:, TMeta.GFN].astype(np.int64) != w.t_gfn
    state_bad = tm[:, TMeta.STATE] != _U(TS_LIVE)
    for k in np.flatnonzero(lvl_bad):
        problems.append(Problem("invariant", f"table {int(w.tables[k])} records level {int(tm[k, TMeta.LEVEL])} but "
                                             f"holds level-{int(w.t_level[k])} entries",
                                int(w.t_gfn[k])))
    for k in np.flatnonzero(gfn_bad):
        problems.append(Problem("invariant", f"table {int(w.tables[k])} records GFN {int(tm[k, TMeta.GFN]):#x} but "
                                             f"covers from {int(w.t_gfn[k]):#x}", int(w.t_gfn[k])))
    for k in np.flatnonzero(state_bad):
        st = int(tm[k, TMeta.STATE])
        problems.append(Problem("use-after-free" if st in (TS_FREE, TS_RETIRED) else "invariant",
                                f"reachable table {int(w.tables[k])} is {TableState.NAMES.get(st, st)}, not live",
                                int(w.t_gfn[k])))
    return problems


def check_table_accounting(source: Source) -> list[Problem]:
    """Every pool table is in exactly one place: reachable + free + cached + retired = pool size.

    Invariant (DESIGN.md §7): each table of the pool (all but table 0, which is
    never handed out) is exactly one of reachable from a root (state live), on
    the free stack (free), in a worker's memory cache (cached), or in a worker's
    retire ring awaiting a grace period (retired); the four counts add up to the
    pool size, and each table's recorded state names its place (a live table
    nobody reaches is a leak).  The page count (6.2's tdp_mmu_pages) is the
    number of reachable tables other than the roots; with K18, 5.13's page list
    holds exactly those tables.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    n = snap.tables.shape[0]
    problems: list[Problem] = []
    place = np.zeros(n, dtype=np.int64)          # how many places claim each table
    place[0] = 1                                 # table 0: never handed out
    where: dict[str, np.ndarray] = {}
    where["reachable"] = np.unique(w.tables)
    top = int(snap.ctl[Ctl.POOL_TOP])
    if top > n:
        problems.append(Problem("table-leak", f"the free stack claims {top} tables, the pool has {n}"))
        top = n
    where["free"] = snap.pool[:top].astype(np.int64)
    cached, retired = [], []
    ring_len = snap.retire.shape[1]
    for k, row in enumerate(snap.wstate):
        c = int(row[WState.CACHE_COUNT])
        if c > snap.caches.shape[1]:
            problems.append(Problem("table-leak", f"worker {k}'s cache claims {c} tables, capacity "
                                                  f"{snap.caches.shape[1]}"))
            c = snap.caches.shape[1]
        cached.append(snap.caches[k, :c].astype(np.int64))
        head, tail = int(row[WState.RETIRE_HEAD]), int(row[WState.RETIRE_TAIL])
        if not 0 <= tail - head <= ring_len:
            problems.append(Problem("table-leak", f"worker {k}'s retire ring has head {head}, tail {tail}"))
            continue
        retired.append(snap.retire[k, [i % ring_len for i in range(head, tail)]].astype(np.int64))
    where["cached"] = np.concatenate(cached) if cached else np.zeros(0, np.int64)
    where["retired"] = np.concatenate(retired) if retired else np.zeros(0, np.int64)
    want_state = {"reachable": TS_LIVE, "free": TS_FREE, "cached": TS_CACHED, "retired": TS_RETIRED}
    for name, tabs in where.items():
        outside = (tabs < 0) | (tabs >= n)
        if outside.any():
            problems.append(Problem("table-leak", f"{name} tables outside the pool: {tabs[outside].tolist()[:8]}"))
            tabs = tabs[~outside]
        np.add.at(place, tabs, 1)
        st = snap.tmeta[tabs, TMeta.STATE]
        bad = st != _U(want_state[name])
        if name != "reachable":          # reachable tables' states are check_table_structure's
            for t in tabs[bad][:8]:
                s = int(snap.tmeta[t, TMeta.STATE])
                problems.append(Problem("table-leak", f"{name} table {int(t)} has state "
                                                      f"{TableState.NAMES.get(s, s)}"))
    total = sum(len(v) for v in where.values())
    counts = ", ".join(f"{k} {len(v)}" for k, v in where.items())
    if total != n - 1:
        problems.append(Problem("table-leak", f"{counts}: {total} tables accounted of {n - 1} "
                                              f"(leak {n - 1 - total})"))
    twice = np.flatnonzero(place > 1)
    if twice.size:
        problems.append(Problem("table-leak", f"tables in two places at once: {twice.tolist()[:8]} ({counts})"))
    lost = np.flatnonzero(place == 0)
    if lost.size:
        states = [TableState.NAMES.get(int(snap.tmeta[t, TMeta.STATE]), "?") for t in lost[:8]]
        problems.append(Problem("table-leak", f"tables in no place: {lost.tolist()[:8]} (states {states})"))
    below = set(where["reachable"].tolist()) - set(w.root_tables().tolist())
    count = int(snap.ctl[Ctl.PAGE_COUNT])
    count = count - (1 << 64) if count >> 63 else count
    if count != len(below):
        problems.append(Problem("table-leak", f"the page count (tdp_mmu_pages) says {count}, {len(below)} "
                                              f"tables hang below the roots"))
    if "page-list" in traits(snap.config.kernel, snap.config.bugs):
        problems += _check_page_list(snap, below)
    return problems


def _check_page_list(snap: Snapshot, below: set[int]) -> list[Problem]:
    """With K18: 5.13's tdp_mmu_pages list holds exactly the tables below the roots."""
    n = snap.tables.shape[0]
    problems: list[Problem] = []
    members, cur, steps = [], int(snap.ctl[Ctl.LIST_HEAD]), 0
    while cur not in (0, NIL) and steps <= n:
        t = cur - 1
        if not 0 <= t < n:
            problems.append(Problem("table-leak", f"the page list links table {t}, outside the pool"))
            break
        members.append(t)
        cur = int(snap.tmeta[t, TMeta.NEXT])
        steps += 1
    if steps > n:
        problems.append(Problem("table-leak", "the page list does not end (a cycle)"))
    listed = set(members)
    if listed != below:
        problems.append(Problem("table-leak", f"page list and reachable tables differ: listed only "
                                              f"{sorted(listed - below)[:8]}, reachable only "
                                              f"{sorted(below - listed)[:8]}"))
    return problems


def check_roots(source: Source) -> list[Problem]:
    """Every listed root is live and held exactly as often as its count says; invalid roots are on their way out.

    Invariant (KVM_TDP_MMU.md C5; kvm_tdp_mmu_get_vcpu_root_hpa, kvm_tdp_mmu_put_root):
    at a quiet point (no walk over the roots in flight, no fast zap running), each
    listed root's table is live and at the root level, its reference count is
    the number of workers recorded as holding it (WState.ROOT) and at least 1 (the
    last put unlists a root), every recorded holder names a listed root, at most
    one valid root exists per role, and an invalid root whose invalidating zap is
    done holds no present entry (nothing may be installed behind that zap).  In
    6.12 the TDP MMU holds one more reference on each root until the zap of its
    invalidation is done (edbdb43fc96b: the trait root-held-by-tdp-mmu).
    """
    snap = snapshot(source)
    problems: list[Problem] = []
    g = snap.geometry
    rows = snap.root_rows()
    own = "root-held-by-tdp-mmu" in traits(snap.config.kernel, snap.config.bugs)
    listed = {r["row"] for r in rows}
    valid_roles: dict[int, int] = {}
    for r in rows:
        t, where = r["table"], f"root row {r['row']} (table {r['table']})"
        if not 0 < t < snap.n_tables:
            continue                                  # walk_tables reports it
        st = int(snap.tmeta[t, TMeta.STATE])
        if st != TS_LIVE:
            problems.append(Problem("use-after-free", f"{where} is {TableState.NAMES.get(st, st)}, not live"))
        if int(snap.tmeta[t, TMeta.LEVEL]) != g.root_level:
            problems.append(Problem("invariant", f"{where} records level {int(snap.tmeta[t, TMeta.LEVEL])}, "
                                                 f"not the root level {g.root_level}"))
        if r["count"] != len(r["holders"]) + (own and not r["zapped"]) or r["count"] == 0:
            problems.append(Problem("root-refcount", f"{where}: count {r['count']}, held by "
                                                     f"{len(r['holders'])} ({r['holders']})"))
        if not r["invalid"]:
            if r["role"] in valid_roles:
                problems.append(Problem("invariant", f"two valid roots of role {r['role']}: rows "
                                                     f"{valid_roles[r['role']]} and {r['row']}"))
            valid_roles[r["role"]] = r["row"]
        elif r["zapped"]:
            present = np.flatnonzero(snap.tables[t] & _U(S.MMU_PRESENT))
            if present.size:
                problems.append(Problem("install-into-invalid-root", f"{where} is invalid and its zap is done, "
                                                                     f"yet {present.size} root entries are "
                                                                     f"present", int(present[0]) << g.shift(g.root_level)))
    for row, workers in snap.held_rows().items():
        if row not in listed:
            problems.append(Problem("root-refcount", f"workers {workers} hold root row {row}, which is not listed"))
    return problems


def check_nx_list(source: Source) -> list[Problem]:
    """The NX list holds exactly the reachable tables marked listed, linked both ways, and its count agrees.

    Invariant (KVM_TDP_MMU.md §7.2, §10; 6.2's track_possible_nx_huge_page): a
    table linked for a fault that the NX huge page mitigation kept below the level
    the host could map is marked nx_huge_page_disallowed (TMeta.NX) and goes on
    possible_nx_huge_pages (TMeta.NX_LISTED), until it is torn down, which takes it
    off.  So: the list, walked from Ctl.NX_HEAD by TMeta.NX_NEXT, ends at
    Ctl.NX_TAIL, every TMeta.NX_PREV points back, the members are exactly the
    tables marked listed, each of them also marked NX, all of them reachable
    (live), none twice, and Ctl.NX_COUNT (nx_lpage_splits) is the list's length.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    n = snap.tables.shape[0]
    problems: list[Problem] = []
    members: list[int] = []
    cur, prev = int(snap.ctl[Ctl.NX_HEAD]), 0
    while cur:
        t = cur - 1
        if not 0 <= t < n:
            problems.append(Problem("table-leak", f"the NX list links table {t}, outside the pool"))
            break
        if len(members) > n:
            problems.append(Problem("table-leak", "the NX list does not end (a cycle)"))
            break
        if int(snap.tmeta[t, TMeta.NX_PREV]) != prev:
            problems.append(Problem("table-leak", f"NX list: table {t} links back to {int(snap.tmeta[t, TMeta.NX_PREV]) - 1}"
                                                  f", not {prev - 1}"))
        members.append(t)
        prev, cur = cur, int(snap.tmeta[t, TMeta.NX_NEXT])
    if int(snap.ctl[Ctl.NX_TAIL]) != prev:
        problems.append(Problem("table-leak", f"the NX list ends at table {prev - 1} but its tail word names "
                                              f"{int(snap.ctl[Ctl.NX_TAIL]) - 1}"))
    listed = set(members)
    if len(listed) != len(members):
        problems.append(Problem("table-leak", "a table is on the NX list twice"))
    marked = set(np.flatnonzero(snap.tmeta[:, TMeta.NX_LISTED] != 0).tolist())
    if listed != marked:
        problems.append(Problem("table-leak", f"NX list and tables marked listed differ: listed only "
                                              f"{sorted(listed - marked)[:8]}, marked only "
                                              f"{sorted(marked - listed)[:8]}"))
    not_nx = sorted(t for t in listed if not snap.tmeta[t, TMeta.NX])
    if not_nx:
        problems.append(Problem("table-leak", f"the NX list holds tables not marked nx_huge_page_disallowed: "
                                              f"{not_nx[:8]}"))
    unreachable = listed - set(w.tables.tolist())
    if unreachable:
        problems.append(Problem("table-leak", f"the NX list holds tables no entry reaches: {sorted(unreachable)[:8]}"))
    if int(snap.ctl[Ctl.NX_COUNT]) != len(members):
        problems.append(Problem("table-leak", f"the NX count (nx_lpage_splits) says {int(snap.ctl[Ctl.NX_COUNT])}, "
                                              f"the NX list holds {len(members)}"))
    return problems


def _leaf_slots(snap: Snapshot, w: Walk) -> np.ndarray:
    """For each leaf, the index into snap.active_slots() of the slot holding its whole span, or -1."""
    g = snap.geometry
    span = np.array([g.pages(int(lv)) for lv in w.leaf_level], dtype=np.int64)
    out = np.full(w.leaf_gfn.size, -1, dtype=np.int64)
    for k, slot in enumerate(snap.active_slots()):
        base, npages = slot["base_gfn"], slot["npages"]
        inside = (w.leaf_gfn >= base) & (w.leaf_gfn + span <= base + npages)
        out[inside & (out < 0)] = k
    return out


def check_leaves_in_memslots(source: Source) -> list[Problem]:
    """No leaf maps a GFN outside an active memslot.

    Invariant (DESIGN.md §7): every GFN a present leaf maps (all of a huge
    leaf's span) lies inside one active memslot: deleting a slot zaps its
    range, faults outside slots install nothing, and huge leaves never
    straddle a slot boundary.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    slot_of = _leaf_slots(snap, w)
    g = snap.geometry
    return [Problem("mapping-outside-memslot", f"a level-{int(lv)} leaf {int(v):#x} maps GFNs "
                                               f"[{int(gf):#x}, {int(gf) + g.pages(int(lv)):#x}) outside "
                                               f"any active memslot", int(gf))
            for gf, lv, v in zip(w.leaf_gfn[slot_of < 0], w.leaf_level[slot_of < 0], w.leaf_spte[slot_of < 0])]


def check_leaf_pfns(source: Source) -> list[Problem]:
    """Every leaf points at the host pages its memslot's host map names now, at the right offset.

    Invariant (DESIGN.md §7): for a leaf mapping GFNs [g, g + span) in a slot
    based at `base`, host_map[host_off + g - base + k] == pfn + k for every k
    < span: a 4 KiB leaf names the GFN's host page, a huge leaf names the first
    page of a host-contiguous, size-aligned block (alignment is
    check_table_structure's).  A leaf naming a page the host has since
    migrated away from is a stale mapping that survived an unmap.
    Leaves outside any active slot are check_leaves_in_memslots' problem.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    slots = snap.active_slots()
    slot_of = _leaf_slots(snap, w)
    g = snap.geometry
    problems: list[Problem] = []
    pfn_all = ((w.leaf_spte & _PFN) >> _SHIFT).astype(np.int64)
    for level in (1, 2, 3):
        sel = (w.leaf_level == level) & (slot_of >= 0)
        if not sel.any():
            continue
        span = g.pages(level)
        gf, pf, sk = w.leaf_gfn[sel], pfn_all[sel], slot_of[sel]
        base = np.array([slots[k]["base_gfn"] for k in sk], dtype=np.int64)
        hoff = np.array([slots[k]["host_off"] for k in sk], dtype=np.int64)
        off = np.arange(span, dtype=np.int64)
        want = snap.host_map[(hoff + gf - base)[:, None] + off[None, :]].astype(np.int64)
        have = pf[:, None] + off[None, :]
        bad = np.flatnonzero((want != have).any(axis=1))
        for b in bad[:16]:
            k = int(np.flatnonzero(want[b] != have[b])[0])
            problems.append(Problem("invariant", f"level-{level} leaf maps GFN {int(gf[b]) + k:#x} to host page "
                                                 f"{int(have[b, k]):#x}, the host map says "
                                                 f"{int(want[b, k]):#x}", int(gf[b]) + k))
        if bad.size > 16:
            problems.append(Problem("invariant", f"... and {bad.size - 16} more level-{level} leaves with the "
                                                 f"wrong host page"))
    return problems


def check_logging_slots(source: Source) -> list[Problem]:
    """No writable huge leaf in a dirty-logging slot.

    Invariant (KVM_TDP_MMU.md §13 I7, §9): while a slot logs dirty pages, a
    huge leaf in it is write-protected (enabling logging protects it; faults
    then map 4 KiB pages only), so every write is logged per 4 KiB page.
    """
    snap = snapshot(source)
    w = walk_tables(snap)
    problems: list[Problem] = []
    slots = snap.active_slots()
    slot_of = _leaf_slots(snap, w)
    for k, slot in enumerate(slots):
        sid = slot["slot"]
        if not slot["flags"] & MemslotFlags.LOG_DIRTY:
            continue
        sel = (slot_of == k) & (w.leaf_level > 1) & ((w.leaf_spte & _W) != 0)
        for gf, lv in zip(w.leaf_gfn[sel], w.leaf_level[sel]):
            problems.append(Problem("dirty-log-missed", f"a writable level-{int(lv)} leaf in dirty-logging "
                                                        f"slot {sid}", int(gf)))
    return problems


def check_stats(source: Source) -> list[Problem]:
    """The published page counters agree with a count of the leaves.

    Invariant (DESIGN.md §7): summed over every worker's statistics row, the
    mapped_4k / mapped_2m / mapped_1g counters equal the present leaves at
    levels 1 / 2 / 3.  Each worker publishes its own row (Mmu.publish_stats),
    so this holds at a quiet point after every worker has published.
    """
    snap = snapshot(source)
    counts = count_leaves(snap)
    sums = snap.stats.astype(np.uint64).sum(axis=0, dtype=np.uint64) if snap.stats.size else np.zeros(N_STATS, _U)
    problems = []
    for level, name in ((1, "mapped_4k"), (2, "mapped_2m"), (3, "mapped_1g")):
        v = int(sums[STAT[name]])
        v = v - (1 << 64) if v >> 63 else v
        if v != counts[level]:
            problems.append(Problem("invariant", f"stats {name} sum to {v}, the tables hold {counts[level]} "
                                                 f"level-{level} leaves"))
    return problems


def check_host_pages(source: Source) -> list[Problem]:
    """Every page the guest touched is host-accessed or mapped young; every page it wrote host-dirty or mapped dirty.

    Invariant (KVM_TDP_MMU.md C7, shmmmu.hostpage): KVM reports a leaf's A and D
    to the host page when the leaf loses them or goes away, so at any quiet point
    a page the guest accessed since the host last consumed its state (aging,
    write-back at migration) is either marked on the host or still mapped by a
    leaf with the bit set, in some root.  Needs the guest's record of its own
    accesses (debug mode); without it there is nothing to check.
    """
    snap = snapshot(source)
    if not snap.config.debug:
        return []
    w = walk_tables(snap)
    g = snap.geometry
    problems: list[Problem] = []
    for slot in snap.slot_rows():
        base, n = slot["base_gfn"], slot["npages"]
        pages = snap.host_map[slot["host_off"]: slot["host_off"] + n].astype(np.int64)
        young = np.zeros(n, dtype=bool)
        dirty = np.zeros(n, dtype=bool)
        for gf, lv, v in zip(w.leaf_gfn.tolist(), w.leaf_level.tolist(), w.leaf_spte.tolist()):
            lo, hi = max(gf, base), min(gf + g.pages(lv), base + n)
            if lo < hi:
                if v & S.ACCESSED:
                    young[lo - base: hi - base] = True
                if v & S.DIRTY:
                    dirty[lo - base: hi - base] = True
        acc, wr = hostpage.lost(snap.touched[pages], snap.host_ad[pages], young, dirty)
        for i in wr[:8]:
            problems.append(Problem("host-dirty-lost", f"host page {int(pages[i]):#x} was written by the guest, is "
                                                       f"not host-dirty and no leaf maps it dirty", base + int(i)))
        for i in acc[:8]:
            problems.append(Problem("host-accessed-lost", f"host page {int(pages[i]):#x} was touched by the guest, "
                                                          f"is not host-accessed and no leaf maps it young",
                                    base + int(i)))
    return problems


def check_all(source: Source, stats: bool = True) -> list[Problem]:
    """Every checker above on one snapshot; `stats=False` skips check_stats (workers not yet published)."""
    snap = snapshot(source)
    problems = check_table_structure(snap) + check_table_accounting(snap) + check_roots(snap)
    problems += check_leaves_in_memslots(snap)
    problems += check_leaf_pfns(snap) + check_logging_slots(snap) + check_nx_list(snap) + check_host_pages(snap)
    if stats:
        problems += check_stats(snap)
    return problems
