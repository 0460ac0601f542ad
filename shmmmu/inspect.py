"""Inspect: a read-only look at a running VM: snapshot, summary, page-table dump, one GFN's walk, invariant checks.

`shmmmu inspect NAME` attaches to a VM's region with a read-only mapping
(`Region.attach(readonly=True)`: the inspector cannot write to a VM, even by
mistake), copies whole sections with numpy (`take_snapshot`), closes the
mapping, and decodes only the copies.  It takes no lock and no semaphore, so
it never waits on the VM and never makes the VM wait.

A copy of a moving VM can be torn: a table may change between the copy of
one table and the next.  The table section is therefore copied twice and the
entries that differ are counted (`Snapshot.changed`), and every decoder here
survives anything a table can hold (a child pointer past the pool, a cycle, a
REMOVED or poisoned entry): it reports it and goes on.

Everything is vectorized per level of the tree: one numpy pass over all the
reachable tables of a level, never a Python loop over entries.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import (C_EPOCH, C_GP_COUNT, C_GP_MAX_NS, C_GP_TOTAL_NS, C_ITERATION, C_LIST_COUNT,
                           C_POOL_TOP, C_RCU_BACKLOG_MAX, C_STOP, C_VIOLATIONS, LOCK_NAMES, MAX_VIOLATIONS,
                           MS_BACKING_LEVEL, MS_BASE_GFN, MS_FLAGS, MS_HOST_OFF, MS_NPAGES, MSF_ACTIVE,
                           MSF_LOG_DIRTY, NIL, N_LOCKS, ROLE_HOST, ROLE_RECLAIMER, ROLE_VCPU, ROOT_TABLE, STAT,
                           STAT_NAMES, T_GFN, T_LEVEL, T_OWNER, T_STATE, TABLE_STATE_NAMES, TS_CACHED, TS_FREE,
                           TS_LIVE, TS_RETIRED, V_A, V_B, V_GFN, V_KIND, V_WORKER, W_CACHE_COUNT, W_HEARTBEAT,
                           W_HELD, W_ITERATION, W_PID, W_RCU, W_RETIRE_HEAD, W_RETIRE_TAIL, W_ROLE, W_STATUS,
                           VMConfig)
from shmmmu.region import Region, RegionError
from shmmmu.rwlock import (HELD_READ, HELD_WRITE, L_CNTS, L_CONTENDED, L_WAIT, L_WRITER, QR_BIAS, QW_LOCKED,
                           QW_WAITING)

_U = np.uint64
SECTIONS = ("ctl", "locks", "wstate", "stats", "tmeta", "pool", "caches", "retire", "memslots", "violations")
ROLE_NAMES = {0: "-", ROLE_VCPU: "vCPU", ROLE_HOST: "host", ROLE_RECLAIMER: "reclaimer"}
STATUS_NAMES = {0: "starting", 1: "ready", 2: "done", 3: "failed"}       # workers.common STATUS_*
BACKING_NAMES = {1: "4K", 2: "2M", 3: "1G"}
MAX_LISTED = 1000            # problem entries listed one by one (all are counted)


# ---------------------------------------------------------------- processes

def pid_alive(pid: int) -> bool:
    """Is a process with this pid running (a zombie, killed but not yet reaped, is not)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        state = stat[stat.rindex(b")") + 2:][:1]
        return state not in (b"Z", b"X")
    except (OSError, ValueError):
        return True


# ---------------------------------------------------------------- snapshot

@dataclass
class Snapshot:
    """Numpy copies of a VM's sections, taken at one moment (as near as a copy gets)."""

    name: str
    config: VMConfig
    creator_pid: int
    size: int
    created_ns: int
    taken_ns: int                 # time.time_ns() when the copy began
    taken_mono: float             # time.monotonic() when the copy began
    copy_s: float                 # how long the copies took
    tables: np.ndarray
    a: dict[str, np.ndarray]      # the other sections by name
    changed: int = 0              # table entries that differed between two copies
    host_map: np.ndarray | None = None

    @property
    def geometry(self) -> S.Geometry:
        return self.config.geometry

    @property
    def n_tables(self) -> int:
        return int(self.tables.shape[0])

    def ctl(self, word: int) -> int:
        return int(self.a["ctl"][word])

    def stats_total(self) -> dict[str, int]:
        tot = self.a["stats"].astype(np.int64).sum(axis=0)
        return {n: int(tot[i]) for n, i in STAT.items()}


def _read_config(region: Region) -> VMConfig:
    try:
        return VMConfig.from_json(region.config)
    except (TypeError, ValueError, KeyError, AttributeError):
        raise RegionError(f"the VM {region.name!r} has a configuration this shmmmu cannot read") from None


def _copy(region: Region, section: str) -> np.ndarray:
    """One whole-section copy (the only read of the shared mapping)."""
    return np.array(region.array(section), copy=True)


def take_snapshot(name: str, *, host_map: bool = False, recheck: bool = True) -> Snapshot:
    """Attach read-only, copy every section the inspector reads, detach.

    The tables are copied twice (`recheck`); the entries that differ are
    counted in `changed` and the first copy is kept.
    """
    region = Region.attach(name, readonly=True)
    try:
        config = _read_config(region)
        missing = [s for s in SECTIONS + ("tables",) if s not in region.sections]
        if missing:
            raise RegionError(f"the region of VM {name!r} has no section {missing[0]!r}")
        t_ns, t0 = time.time_ns(), time.monotonic()
        tables = _copy(region, "tables")
        a = {s: _copy(region, s) for s in SECTIONS}
        hm = _copy(region, "host_map") if host_map and "host_map" in region.sections else None
        changed = 0
        if recheck:
            again = _copy(region, "tables")
            changed = int(np.count_nonzero(again != tables))
            del again
        snap = Snapshot(name=name, config=config, creator_pid=region.creator_pid, size=region.size,
                        created_ns=region.created_ns, taken_ns=t_ns, taken_mono=t0,
                        copy_s=time.monotonic() - t0, tables=tables, a=a, changed=changed, host_map=hm)
    finally:
        region.close()
    return snap


# ---------------------------------------------------------------- the walk

@dataclass
class Walk:
    """Everything reachable from the root, decoded level by level.

    `tables`, `t_level`, `t_gfn`: the reachable tables (the root first), in walk order.
    `leaf_gfn`, `leaf_level`, `leaf_spte`: every present leaf, sorted by GFN.
    `odd`: entries of reachable tables that are neither empty nor present (REMOVED,
    MMIO, garbage), and present entries that cannot be followed (a child index
    outside the pool, a table reached twice, a huge bit at the root level): dicts
    with table, index, level, gfn, raw and what.
    """

    tables: np.ndarray
    t_level: np.ndarray
    t_gfn: np.ndarray
    leaf_gfn: np.ndarray
    leaf_level: np.ndarray
    leaf_spte: np.ndarray
    odd: list[dict[str, Any]] = field(default_factory=list)
    odd_count: int = 0
    removed_count: int = 0

    def per_level(self) -> dict[int, int]:
        lv, n = np.unique(self.t_level, return_counts=True)
        return {int(a): int(b) for a, b in zip(lv, n)}

    def mappings(self) -> dict[int, int]:
        return {lv: int(np.count_nonzero(self.leaf_level == lv)) for lv in (1, 2, 3)}


def _note(walk: Walk, table: int, index: int, level: int, gfn: int, raw: int, what: str) -> None:
    walk.odd_count += 1
    if len(walk.odd) < MAX_LISTED:
        walk.odd.append({"table": int(table), "index": int(index), "level": int(level), "gfn": int(gfn),
                         "raw": int(raw), "what": what})


def walk_tables(snap: Snapshot) -> Walk:
    """Walk the copied tables from the root, one vectorized pass per level."""
    g = snap.geometry
    E, n = g.entries, snap.n_tables
    tables = snap.tables
    cur = np.array([ROOT_TABLE], dtype=np.int64)
    cur_gfn = np.array([0], dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    seen[ROOT_TABLE] = True
    all_t, all_l, all_g = [cur], [np.full(1, g.root_level, dtype=np.int64)], [cur_gfn]
    lg, ll, ls = [], [], []
    walk = Walk(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64),
                np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, _U))
    for level in range(g.root_level, 0, -1):
        if cur.size == 0:
            break
        shift = g.shift(level)
        rows = tables[cur]                                   # (k, E) copy of this level's tables
        present = (rows & _U(S.MMU_PRESENT)) != 0
        if level == 1:
            leaf = present
            nonleaf = np.zeros_like(present)
        else:
            large = (rows & _U(S.LARGE)) != 0
            if level > S.MAX_HUGEPAGE_LEVEL:
                # no leaf above 1 GiB: a page-size bit here is garbage
                r, c = np.nonzero(present & large)
                for i, j in zip(r.tolist(), c.tolist()):
                    _note(walk, cur[i], j, level, int(cur_gfn[i]) + (j << shift), int(rows[i, j]),
                          "huge bit at a level with no huge pages")
                leaf = np.zeros_like(present)
            else:
                leaf = present & large
            nonleaf = present & ~large
        # entries neither empty nor present
        odd = ~present & (rows != 0)
        if odd.any():
            r, c = np.nonzero(odd)
            vals = rows[r, c]
            walk.removed_count += int(np.count_nonzero(vals == _U(S.REMOVED)))
            room = max(0, MAX_LISTED - len(walk.odd))
            for i, j, v in zip(r[:room].tolist(), c[:room].tolist(), vals[:room].tolist()):
                _note(walk, cur[i], j, level, int(cur_gfn[i]) + (j << shift), int(v), S.decode(int(v), level).kind)
            walk.odd_count += max(0, r.size - room)
        # leaves
        r, c = np.nonzero(leaf)
        if r.size:
            lg.append(cur_gfn[r] + (c.astype(np.int64) << shift))
            ll.append(np.full(r.size, level, dtype=np.int64))
            ls.append(rows[r, c])
        # children
        r, c = np.nonzero(nonleaf)
        if r.size == 0:
            break
        child = ((rows[r, c] & _U(S.PFN_MASK)) >> _U(S.PFN_SHIFT)).astype(np.int64)
        cgfn = cur_gfn[r] + (c.astype(np.int64) << shift)
        bad = child >= n
        for i in np.flatnonzero(bad)[:MAX_LISTED].tolist():
            _note(walk, cur[r[i]], c[i], level, cgfn[i], int(rows[r[i], c[i]]),
                  f"child table #{child[i]} is outside the pool of {n}")
        walk.odd_count += max(0, int(bad.sum()) - MAX_LISTED)
        ok = ~bad
        child, cgfn, r, c = child[ok], cgfn[ok], r[ok], c[ok]
        # a table reached twice (two parents, or a cycle back up the tree) is followed once
        uniq, first = np.unique(child, return_index=True)
        dup = np.ones(child.size, dtype=bool)
        dup[first] = False
        dup |= seen[child]
        dups = np.flatnonzero(dup)
        for i in dups[:MAX_LISTED].tolist():
            _note(walk, cur[r[i]], c[i], level, cgfn[i], int(rows[r[i], c[i]]),
                  f"child table #{child[i]} is reached twice")
        walk.odd_count += max(0, int(dups.size) - MAX_LISTED)
        keep = np.sort(first[~seen[child[first]]])
        cur, cur_gfn = child[keep], cgfn[keep]
        seen[cur] = True
        all_t.append(cur)
        all_l.append(np.full(cur.size, level - 1, dtype=np.int64))
        all_g.append(cur_gfn)
    walk.tables = np.concatenate(all_t)
    walk.t_level = np.concatenate(all_l)
    walk.t_gfn = np.concatenate(all_g)
    if lg:
        gfn, lvl, sp = np.concatenate(lg), np.concatenate(ll), np.concatenate(ls)
        if len(lg) > 1 and np.any(gfn[1:] < gfn[:-1]):     # leaves of several levels: merge them by GFN
            order = np.argsort(gfn, kind="stable")
            gfn, lvl, sp = gfn[order], lvl[order], sp[order]
        walk.leaf_gfn, walk.leaf_level, walk.leaf_spte = gfn, lvl, sp
    return walk


# ---------------------------------------------------------------- the page-table dump

@dataclass
class Dump:
    """The page-table dump: coalesced leaf ranges as numpy columns, plus what the walk could not follow.

    A range is a run of leaves of one size and one set of flags with
    contiguous GFNs and contiguous host pages (`start`, `end`: GFNs, end
    exclusive; `pfn`: the host page of `start`; `attrs`: the SPTE bits other
    than the PFN, shared by every leaf of the run).
    """

    vm: str
    width: int                      # hex digits of a GFN
    tables_per_level: dict[str, int]
    leaves: int
    changed: int
    odd: list[dict[str, Any]]
    odd_count: int
    start: np.ndarray
    end: np.ndarray
    level: np.ndarray
    count: np.ndarray
    attrs: np.ndarray
    pfn: np.ndarray

    def __len__(self) -> int:
        return int(self.start.size)

    def _flags(self) -> list[str]:
        uniq, inv = np.unique(self.attrs, return_inverse=True)
        names = [S.flag_string(int(u)) for u in uniq]
        return [names[i] for i in inv.tolist()]

    def to_json(self) -> dict[str, Any]:
        flags = self._flags()
        ranges = [{"start": a, "end": b, "size": S.LEVEL_NAMES[lv], "count": k, "flags": f, "pfn": p}
                  for a, b, lv, k, f, p in zip(self.start.tolist(), self.end.tolist(), self.level.tolist(),
                                               self.count.tolist(), flags, self.pfn.tolist())]
        return {"vm": self.vm, "ranges": ranges, "odd": self.odd, "odd_count": self.odd_count,
                "tables_per_level": self.tables_per_level, "leaves": self.leaves,
                "changed_while_reading": self.changed}

    def lines(self) -> list[str]:
        w = self.width
        levels = ", ".join(f"L{k} {v}" for k, v in self.tables_per_level.items())
        out = [f"# VM {self.vm}: page tables reachable from the root: {levels}; {self.leaves} leaves "
               f"in {len(self)} ranges (GFN ranges end exclusive)"]
        rw = 2 * (w + 2) + 1
        out.append(f"{'# GFN range':<{rw}s}  {'size':>4s} {'count':<8s} {'flags':<32s} first pfn")
        if not len(self):
            out.append("(nothing mapped)")
        fmt = f"0x%0{w}x-0x%0{w}x  %4s x%-7d %-32s pfn 0x%x"
        sizes = [S.LEVEL_NAMES[lv] for lv in self.level.tolist()]
        out += [fmt % t for t in zip(self.start.tolist(), self.end.tolist(), sizes, self.count.tolist(),
                                     self._flags(), self.pfn.tolist())]
        for o in self.odd:
            out.append(f"0x{o['gfn']:0{w}x}  L{o['level']} table #{o['table']}[{o['index']}] = {o['raw']:#018x}: "
                       f"{o['what']}")
        if self.odd_count > len(self.odd):
            out.append(f"... and {self.odd_count - len(self.odd)} more such entries")
        if self.changed:
            out.append(f"# {self.changed} entries changed while reading (the VM is running; a copy is not atomic)")
        return out


def _pages_of(g: S.Geometry) -> np.ndarray:
    return np.array([0] + [g.pages(lv) for lv in range(1, g.root_level + 1)], dtype=np.int64)


def tree(snap: Snapshot, walk: Walk | None = None) -> Dump:
    """Merge consecutive leaves of the same size and flags, with contiguous GFNs and PFNs (vectorized)."""
    walk = walk or walk_tables(snap)
    g = snap.geometry
    gfn, level, sp = walk.leaf_gfn, walk.leaf_level, walk.leaf_spte
    n = gfn.size
    span = _pages_of(g)[level]
    attrs = sp & _U(~S.PFN_MASK & ((1 << 64) - 1))
    pfn = ((sp & _U(S.PFN_MASK)) >> _U(S.PFN_SHIFT)).astype(np.int64)
    brk = np.ones(n, dtype=bool)
    brk[1:] = ((level[1:] != level[:-1]) | (attrs[1:] != attrs[:-1])
               | (gfn[1:] != gfn[:-1] + span[:-1]) | (pfn[1:] != pfn[:-1] + span[:-1]))
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n).astype(np.int64) if n else np.empty(0, np.int64)
    last = ends - 1
    return Dump(vm=snap.name, width=len(f"{g.max_gfn:x}"),
                tables_per_level={str(k): v for k, v in sorted(walk.per_level().items(), reverse=True)},
                leaves=int(n), changed=snap.changed, odd=walk.odd, odd_count=walk.odd_count,
                start=gfn[starts], end=gfn[last] + span[last], level=level[starts], count=ends - starts,
                attrs=attrs[starts], pfn=pfn[starts])


# ---------------------------------------------------------------- one GFN's walk

def parse_gfn(text: str) -> int:
    """'0x40000', '262144' -> GFN; ValueError with a sentence otherwise."""
    try:
        v = int(text.strip().replace("_", ""), 0)
    except (ValueError, AttributeError):
        raise ValueError(f"bad GFN {text!r}: use a decimal or 0x-prefixed hexadecimal number") from None
    if v < 0:
        raise ValueError(f"bad GFN {text!r}: it is negative")
    return v


def slot_rows(snap: Snapshot) -> list[dict[str, int]]:
    out = []
    for k, row in enumerate(snap.a["memslots"]):
        if int(row[MS_NPAGES]):
            out.append({"slot": k, "base_gfn": int(row[MS_BASE_GFN]), "npages": int(row[MS_NPAGES]),
                        "backing_level": int(row[MS_BACKING_LEVEL]), "flags": int(row[MS_FLAGS]),
                        "host_off": int(row[MS_HOST_OFF])})
    return out


def gfn_walk(snap: Snapshot, gfn: int) -> dict[str, Any]:
    """The walk a hardware page walker would do for one GFN, entry by entry from the root."""
    g = snap.geometry
    if gfn >= g.max_gfn:
        raise ValueError(f"GFN {gfn:#x} is beyond what {g.root_level}-level tables map (below {g.max_gfn:#x})")
    steps = []
    table, result = ROOT_TABLE, "not mapped"
    pfn_host = None
    visited = set()
    for level in range(g.root_level, 0, -1):
        idx = g.index(gfn, level)
        raw = int(snap.tables[table, idx])
        d = S.decode(raw, level)
        tm = snap.a["tmeta"][table]
        step = {"level": level, "table": table, "index": idx, "raw": raw, "kind": d.kind, "flags": d.flags,
                "table_state": TABLE_STATE_NAMES.get(int(tm[T_STATE]), str(int(tm[T_STATE]))),
                "table_level": int(tm[T_LEVEL]), "table_gfn": int(tm[T_GFN])}
        steps.append(step)
        visited.add(table)
        if d.kind == "nonleaf":
            if level > 1 and raw & S.LARGE == 0:
                child = d.pfn
                step["meaning"] = f"points to table #{child}"
                if child >= snap.n_tables:
                    step["meaning"] += f", outside the pool of {snap.n_tables}"
                    result = "broken: child pointer outside the pool"
                    break
                if child in visited:
                    result = "broken: the walk loops"
                    break
                table = child
                continue
        if d.kind == "leaf":
            span = g.pages(level)
            pfn_host = d.pfn + (gfn - g.round(gfn, level))
            step["meaning"] = (f"{S.LEVEL_NAMES[level]} page at GFN {g.round(gfn, level):#x}, host page {d.pfn:#x}"
                               + (f" (+{gfn - g.round(gfn, level):#x} -> {pfn_host:#x})"
                                  if span > 1 and gfn != g.round(gfn, level) else ""))
            result = f"mapped: {S.LEVEL_NAMES[level]} page, host page {pfn_host:#x}"
        elif d.kind == "none":
            step["meaning"] = "empty: a fault would fill it"
            result = f"not mapped (empty entry at level {level})"
        elif d.kind == "removed":
            step["meaning"] = "REMOVED: frozen by a thread that is zapping or tearing down this table"
            result = "frozen (REMOVED entry): a fault here would retry"
        elif d.kind == "mmio":
            step["meaning"] = "MMIO: a misconfiguration exit on access"
            result = "MMIO"
        else:
            step["meaning"] = "garbage: neither empty, present, REMOVED nor MMIO"
            result = "broken: garbage entry"
        break
    slot = next((s for s in slot_rows(snap) if s["base_gfn"] <= gfn < s["base_gfn"] + s["npages"]), None)
    out = {"vm": snap.name, "gfn": gfn, "steps": steps, "result": result, "host_page": pfn_host,
           "memslot": slot, "changed_while_reading": snap.changed}
    if slot is not None and snap.host_map is not None:
        out["memslot_host_page"] = int(snap.host_map[slot["host_off"] + gfn - slot["base_gfn"]])
    return out


def gfn_lines(w: dict[str, Any]) -> list[str]:
    out = [f"GFN {w['gfn']:#x} in VM {w['vm']}:"]
    for s in w["steps"]:
        out.append(f"  L{s['level']} table #{s['table']:<6d} [{s['index']:3d}] = {s['raw']:#018x}  "
                   f"{s['kind']:<8s} {s.get('meaning', '')}" + (f"  [{s['flags']}]" if s["flags"] else ""))
        if s["table_state"] != "live" or s["table_level"] != s["level"]:
            out.append(f"      table #{s['table']} is {s['table_state']} at level {s['table_level']}: "
                       f"the walk stands in a table that is not live at its level")
    out.append(f"  => {w['result']}")
    slot = w["memslot"]
    if slot is None:
        out.append("  no memslot holds this GFN (an access would be MMIO / emulated)")
    else:
        line = (f"  memslot {slot['slot']}: GFNs {slot['base_gfn']:#x}-{slot['base_gfn'] + slot['npages']:#x}, "
                f"{BACKING_NAMES.get(slot['backing_level'], '?')} backing"
                + (", dirty logging on" if slot["flags"] & MSF_LOG_DIRTY else ""))
        if "memslot_host_page" in w:
            line += f"; the host backs this GFN with page {w['memslot_host_page']:#x}"
            if w["host_page"] is not None and w["host_page"] != w["memslot_host_page"]:
                line += " (THE MAPPING POINTS ELSEWHERE)"
        out.append(line)
    if w["changed_while_reading"]:
        out.append(f"  ({w['changed_while_reading']} entries changed while reading)")
    return out


# ---------------------------------------------------------------- invariant checks (DESIGN.md §7)

def check(snap: Snapshot, walk: Walk | None = None) -> list[str]:
    """The page-table invariants of DESIGN.md §7 on a snapshot; one sentence per violation.

    Meaningful at a quiet point (a kept VM after its workload): on a moving VM
    a fault's freshly allocated table is live but not yet linked, and is excused
    only while its owner record says a worker holds it.
    """
    walk = walk or walk_tables(snap)
    g = snap.geometry
    n = snap.n_tables
    tm = snap.a["tmeta"]
    state = tm[:, T_STATE]
    out: list[str] = []

    def add(msg: str) -> None:
        out.append(msg)

    # structure: everything the walk could not follow
    for o in walk.odd:
        add(f"table #{o['table']} (L{o['level']}) entry {o['index']} (GFN {o['gfn']:#x}) = {o['raw']:#x}: {o['what']}")
    if walk.odd_count > len(walk.odd):
        add(f"... and {walk.odd_count - len(walk.odd)} more odd entries in reachable tables")
    # every reachable table live, at the level and GFN its parent implies
    reach = walk.tables
    bad_state = reach[state[reach] != _U(TS_LIVE)]
    for t in bad_state[:MAX_LISTED].tolist():
        add(f"table #{t} is reachable but {TABLE_STATE_NAMES.get(int(state[t]), int(state[t]))}")
    lv_bad = np.flatnonzero(tm[reach, T_LEVEL].astype(np.int64) != walk.t_level)
    for i in lv_bad[:MAX_LISTED].tolist():
        add(f"table #{reach[i]} is reached at level {walk.t_level[i]} but records level {int(tm[reach[i], T_LEVEL])}")
    gfn_bad = np.flatnonzero(tm[reach, T_GFN].astype(np.int64) != walk.t_gfn)
    for i in gfn_bad[:MAX_LISTED].tolist():
        add(f"table #{reach[i]} is reached for GFN {walk.t_gfn[i]:#x} but records GFN {int(tm[reach[i], T_GFN]):#x}")
    # every live table reachable (exactly once: the walk reports a second parent)
    reachable = np.zeros(n, dtype=bool)
    reachable[reach] = True
    stray = np.flatnonzero((state == _U(TS_LIVE)) & ~reachable & (tm[:, T_OWNER] == _U(NIL)))
    for t in stray[:MAX_LISTED].tolist():
        add(f"table #{t} is live (level {int(tm[t, T_LEVEL])}, GFN {int(tm[t, T_GFN]):#x}) but not reachable from the root")
    # accounting: reachable + in flight + free + cached + retired = pool size
    counts = {k: int(np.count_nonzero(state == _U(v))) for k, v in
              (("free", TS_FREE), ("cached", TS_CACHED), ("live", TS_LIVE), ("retired", TS_RETIRED))}
    other = n - sum(counts.values())
    if other:
        add(f"{other} tables have an unknown state")
    top = snap.ctl(C_POOL_TOP)
    if top > n:
        add(f"the free stack's top {top} is past the pool of {n}")
    else:
        stack = snap.a["pool"][:top].astype(np.int64)
        if stack.size and (stack.max() >= n or stack.min() < 0):
            add("the free stack holds a table index outside the pool")
        else:
            if np.unique(stack).size != stack.size:
                add("a table is on the free stack twice")
            not_free = stack[state[stack] != _U(TS_FREE)]
            for t in not_free[:MAX_LISTED].tolist():
                add(f"table #{t} is on the free stack but {TABLE_STATE_NAMES.get(int(state[t]), int(state[t]))}")
        if counts["free"] != top:
            add(f"{counts['free']} tables are free but the free stack holds {top}")
    ws = snap.a["wstate"]
    cached = int(ws[:, W_CACHE_COUNT].astype(np.int64).sum())
    if counts["cached"] != cached:
        add(f"{counts['cached']} tables are cached but the vCPU caches hold {cached}")
    backlog = int((ws[:, W_RETIRE_TAIL].astype(np.int64) - ws[:, W_RETIRE_HEAD].astype(np.int64)).sum())
    if counts["retired"] != backlog:
        add(f"{counts['retired']} tables are retired but the retire queues hold {backlog}")
    in_flight = int(np.count_nonzero((state == _U(TS_LIVE)) & ~reachable & (tm[:, T_OWNER] != _U(NIL))))
    leak = n - (int(reach.size) + in_flight + counts["free"] + counts["cached"] + counts["retired"])
    if leak and not stray.size:
        add(f"tables do not add up: {n} in the pool != {reach.size} reachable + {in_flight} in flight + "
            f"{counts['free']} free + {counts['cached']} cached + {counts['retired']} retired")
    listed = snap.ctl(C_LIST_COUNT)
    if listed != reach.size - 1:
        add(f"the page list counts {listed} tables but {reach.size - 1} are linked below the root")
    # leaves: inside a memslot, aligned, at the host page the slot maps, and never above the backing
    pages = _pages_of(g)
    lg, ll, lsp = walk.leaf_gfn, walk.leaf_level, walk.leaf_spte
    if lg.size:
        span = pages[ll]
        pfn = ((lsp & _U(S.PFN_MASK)) >> _U(S.PFN_SHIFT)).astype(np.int64)
        covered = np.zeros(lg.size, dtype=bool)
        for s in slot_rows(snap):
            lo, hi = s["base_gfn"], s["base_gfn"] + s["npages"]
            inside = (lg >= lo) & (lg < hi)
            if not inside.any():
                continue
            covered |= inside
            i_in = np.flatnonzero(inside)
            over = i_in[lg[i_in] + span[i_in] > hi]
            for i in over[:MAX_LISTED].tolist():
                add(f"the {S.LEVEL_NAMES[int(ll[i])]} leaf at GFN {lg[i]:#x} runs past the end of memslot {s['slot']}")
            if not s["flags"] & MSF_ACTIVE:
                add(f"memslot {s['slot']} is inactive but {i_in.size} leaves map it")
            big = i_in[ll[i_in] > s["backing_level"]]
            for i in big[:MAX_LISTED].tolist():
                add(f"the {S.LEVEL_NAMES[int(ll[i])]} leaf at GFN {lg[i]:#x} is larger than memslot {s['slot']}'s "
                    f"{BACKING_NAMES.get(s['backing_level'], '?')} backing")
            if s["flags"] & MSF_LOG_DIRTY:
                huge = i_in[ll[i_in] > 1]
                if huge.size:
                    add(f"memslot {s['slot']} logs dirty pages but {huge.size} huge leaves map it")
            if snap.host_map is not None and s["host_off"] + s["npages"] > snap.host_map.size:
                add(f"memslot {s['slot']}'s host map runs past the host_map section")
            elif snap.host_map is not None:
                want = snap.host_map[s["host_off"] + (lg[i_in] - lo)].astype(np.int64)
                wrong = i_in[pfn[i_in] != want]
                for i in wrong[:MAX_LISTED].tolist():
                    add(f"the leaf at GFN {lg[i]:#x} maps host page {pfn[i]:#x} but memslot {s['slot']} backs it with "
                        f"{int(snap.host_map[s['host_off'] + lg[i] - lo]):#x}")
        for i in np.flatnonzero(~covered)[:MAX_LISTED].tolist():
            add(f"the {S.LEVEL_NAMES[int(ll[i])]} leaf at GFN {lg[i]:#x} lies in no memslot")
        misaligned = np.flatnonzero((pfn % span) != 0)
        for i in misaligned[:MAX_LISTED].tolist():
            add(f"the {S.LEVEL_NAMES[int(ll[i])]} leaf at GFN {lg[i]:#x} maps host page {pfn[i]:#x}, "
                f"not aligned to its size")
    # statistics: mapped pages per size are gauges; at a quiet point they equal the leaves counted
    st = snap.stats_total()
    have = walk.mappings()
    for lv, key in ((1, "mapped_4k"), (2, "mapped_2m"), (3, "mapped_1g")):
        if st[key] != have[lv]:
            add(f"the statistics count {st[key]} {S.LEVEL_NAMES[lv]} mappings, the tables hold {have[lv]}")
    nv = snap.ctl(C_VIOLATIONS)
    if nv:
        add(f"the VM recorded {nv} violations while running (shmmmu inspect {snap.name} lists them)")
    return out


def run_checks(snap: Snapshot) -> list[str]:
    """`shmmmu inspect --check`: the invariant checkers of shmmmu.checks on this snapshot, one sentence each.

    Falls back on `check` above when shmmmu.checks is not there, and when the
    tree shares a subtree (a table reached twice): a walk that does not merge
    repeated tables would follow such a table once per parent at every level
    below, which a corrupted or torn tree can make explode.
    """
    walk = walk_tables(snap)
    try:
        from shmmmu import checks
    except ImportError:
        checks = None
    shared_subtree = any("reached twice" in o["what"] for o in walk.odd)
    if checks is None or snap.host_map is None or shared_subtree:
        return check(snap, walk)
    a = snap.a
    cs = checks.Snapshot(config=snap.config, tables=snap.tables, tmeta=a["tmeta"], pool=a["pool"], ctl=a["ctl"],
                         wstate=a["wstate"], caches=a["caches"], retire=a["retire"], memslots=a["memslots"],
                         host_map=snap.host_map, stats=a["stats"])
    found = [str(p) for p in checks.check_all(cs)]
    nv = snap.ctl(C_VIOLATIONS)
    if nv:
        found.append(f"the VM recorded {nv} violations while running (shmmmu inspect {snap.name} lists them)")
    return found


# ---------------------------------------------------------------- summary

def _mode_name(m: int) -> str:
    return {HELD_READ: "read", HELD_WRITE: "write"}.get(m, str(m))


def lock_states(snap: Snapshot) -> list[dict[str, Any]]:
    locks, ws = snap.a["locks"], snap.a["wstate"]
    out = []
    for i in range(min(N_LOCKS, locks.shape[0])):
        c = int(locks[i, L_CNTS])
        holders = []
        for k in np.flatnonzero(ws[:, W_HELD + i]).tolist():
            holders.append({"worker": k, "pid": int(ws[k, W_PID]), "role": ROLE_NAMES.get(int(ws[k, W_ROLE]), "?"),
                            "mode": _mode_name(int(ws[k, W_HELD + i]))})
        out.append({"name": LOCK_NAMES[i], "readers": c // QR_BIAS,
                    "write_locked": (c & QW_LOCKED) == QW_LOCKED, "writer_waiting": bool(c & QW_WAITING),
                    "queue_held": int(locks[i, L_WAIT]) != 0, "writer": int(locks[i, L_WRITER]) - 1,
                    "contended": int(locks[i, L_CONTENDED]), "holders": holders})
    return out


def _role(snap: Snapshot, k: int) -> str:
    c = snap.config
    if k < c.n_vcpus:
        return f"vCPU {k}"
    if k == c.host_worker:
        return "supervisor"
    if k == c.reclaimer_worker:
        return "reclaimer"
    return f"host {k}"


def summary(snap: Snapshot, walk: Walk | None = None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `shmmmu inspect NAME` prints, as one JSON-able dict.

    `previous` (an earlier summary) gives rates per second between the two.
    """
    walk = walk or walk_tables(snap)
    c = snap.config
    g = snap.geometry
    tm = snap.a["tmeta"]
    state = tm[:, T_STATE]
    ws = snap.a["wstate"]
    slots = slot_rows(snap)
    live = state == _U(TS_LIVE)
    lv, cnt = np.unique(tm[live, T_LEVEL], return_counts=True)
    maps = walk.mappings()
    st = snap.stats_total()
    workers = []
    for k in range(ws.shape[0]):
        pid = int(ws[k, W_PID])
        status = STATUS_NAMES.get(int(ws[k, W_STATUS]), str(int(ws[k, W_STATUS])))
        if k == c.host_worker:
            status = "-"                      # the supervisor keeps no worker status
        workers.append({"slot": k, "role": _role(snap, k), "pid": pid, "alive": pid_alive(pid) if pid else False,
                        "status": status,
                        "iteration": int(ws[k, W_ITERATION]), "heartbeat": int(ws[k, W_HEARTBEAT]),
                        "rcu_epoch": int(ws[k, W_RCU])})
    gp = snap.ctl(C_GP_COUNT)
    counters = {k: st[k] for k in ("faults", "fixed", "spurious", "retries", "cas_failures", "removed_seen",
                                   "link_races", "tables_allocated", "tables_retired", "tables_freed",
                                   "zapped_leaves", "huge_splits", "flushes", "accesses", "yields",
                                   "lock_contended")}
    now = snap.taken_mono
    rates = None
    if previous is not None and now > previous["_mono"]:
        dt = now - previous["_mono"]
        rates = {f"{k}_per_s": (counters[k] - previous["counters"][k]) / dt
                 for k in ("faults", "retries", "cas_failures", "accesses")}
    vio = []
    nv = snap.ctl(C_VIOLATIONS)
    from shmmmu.violations import KINDS
    for row in snap.a["violations"][:min(nv, MAX_VIOLATIONS, 20)]:
        kind = int(row[V_KIND])
        vio.append({"kind": KINDS[kind - 1] if 0 < kind <= len(KINDS) else "unknown", "worker": int(row[V_WORKER]),
                    "gfn": int(row[V_GFN]), "a": int(row[V_A]), "b": int(row[V_B])})
    mapped = sum(maps[l] * g.pages(l) for l in maps) * 4096
    return {
        "vm": snap.name,
        "creator_pid": snap.creator_pid,
        "alive": pid_alive(snap.creator_pid),
        "region_bytes": snap.size,
        "uptime_s": max(0.0, (snap.taken_ns - snap.created_ns) / 1e9),
        "config": {"vcpus": c.n_vcpus, "lock_mode": c.lock_mode, "memory_bytes": c.guest_pages * 4096,
                   "backing": [BACKING_NAMES.get(m.backing_level, "?") for m in c.memslots],
                   "workload": c.workload.get("kind", ""), "overlap": bool(c.workload.get("overlap", False)),
                   "table_bits": c.bits, "pool_tables": c.n_tables, "debug": c.debug, "bugs": list(c.bugs),
                   "seed": c.seed},
        "memslots": [{**s, "logging": bool(s["flags"] & MSF_LOG_DIRTY), "active": bool(s["flags"] & MSF_ACTIVE),
                      "backing": BACKING_NAMES.get(s["backing_level"], "?")} for s in slots],
        "run": {"iteration": snap.ctl(C_ITERATION), "stopping": bool(snap.ctl(C_STOP))},
        "tables": {"pool": snap.n_tables, "live": int(live.sum()),
                   "free": int(np.count_nonzero(state == _U(TS_FREE))),
                   "cached": int(np.count_nonzero(state == _U(TS_CACHED))),
                   "retired": int(np.count_nonzero(state == _U(TS_RETIRED))),
                   "free_stack": snap.ctl(C_POOL_TOP),
                   "live_per_level": {str(int(a)): int(b) for a, b in sorted(zip(lv, cnt), reverse=True)},
                   "reachable": int(walk.tables.size),
                   "reachable_per_level": {str(k): v for k, v in sorted(walk.per_level().items(), reverse=True)}},
        "mappings": {"4K": maps[1], "2M": maps[2], "1G": maps[3], "bytes": mapped,
                     "removed_entries": walk.removed_count, "odd_entries": walk.odd_count},
        "locks": lock_states(snap),
        "rcu": {"epoch": snap.ctl(C_EPOCH), "grace_periods": gp, "gp_max_ms": snap.ctl(C_GP_MAX_NS) / 1e6,
                "gp_mean_ms": (snap.ctl(C_GP_TOTAL_NS) / gp / 1e6) if gp else 0.0,
                "backlog": int((ws[:, W_RETIRE_TAIL].astype(np.int64) - ws[:, W_RETIRE_HEAD].astype(np.int64)).sum()),
                "backlog_max": snap.ctl(C_RCU_BACKLOG_MAX),
                "readers": [k for k in range(ws.shape[0]) if int(ws[k, W_RCU])]},
        "counters": counters,
        "rates": rates,
        "workers": workers,
        "violations": {"count": nv, "first": vio},
        "snapshot": {"copy_ms": snap.copy_s * 1e3, "bytes": int(snap.tables.nbytes + sum(a.nbytes for a in snap.a.values())),
                     "changed_while_reading": snap.changed},
        "_mono": now,
    }


def public(d: dict[str, Any]) -> dict[str, Any]:
    """A summary without its private keys, for JSON."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _mib(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def summary_lines(s: dict[str, Any]) -> list[str]:
    c, t, m, r, k = s["config"], s["tables"], s["mappings"], s["rcu"], s["counters"]
    out = [f"VM {s['vm']}: creator pid {s['creator_pid']} ({'alive' if s['alive'] else 'stale: not running'}), "
           f"region {_mib(s['region_bytes'])}, up {s['uptime_s']:.1f} s"]
    backing = "/".join(c["backing"]) or "-"
    out.append(f"config      {c['vcpus']} vCPUs, lock mode {c['lock_mode']}, memory {_mib(c['memory_bytes'])} "
               f"backed by {backing} pages, workload {c['workload'] or '-'}"
               + (" (overlapping)" if c["overlap"] else "") + f", seed {c['seed']}"
               + (f", bugs {','.join(c['bugs'])}" if c["bugs"] else "") + (", debug" if c["debug"] else ""))
    for ms in s["memslots"]:
        out.append(f"memslot {ms['slot']}   GFN {ms['base_gfn']:#x}-{ms['base_gfn'] + ms['npages']:#x} "
                   f"({_mib(ms['npages'] * 4096)}), {ms['backing']} backing"
                   + (", dirty logging" if ms["logging"] else "") + ("" if ms["active"] else ", INACTIVE"))
    out.append(f"run         iteration {s['run']['iteration']}" + (", stopping" if s["run"]["stopping"] else ""))
    per = ", ".join(f"L{a} {b}" for a, b in t["reachable_per_level"].items())
    out.append(f"tables      pool {t['pool']}: {t['live']} live, {t['free']} free, {t['cached']} cached, "
               f"{t['retired']} retired; reachable {t['reachable']} ({per})")
    out.append(f"mappings    4K {m['4K']}, 2M {m['2M']}, 1G {m['1G']}: {_mib(m['bytes'])} mapped"
               + (f"; {m['removed_entries']} REMOVED entries" if m["removed_entries"] else "")
               + (f"; {m['odd_entries']} odd entries" if m["odd_entries"] > m["removed_entries"] else ""))
    for lk in s["locks"]:
        state = []
        if lk["write_locked"]:
            state.append("write-locked")
        if lk["readers"]:
            state.append(f"{lk['readers']} readers")
        if lk["writer_waiting"]:
            state.append("writer waiting")
        if lk["queue_held"]:
            state.append("queue held")
        holders = ", ".join(f"worker {h['worker']} ({h['role']}, pid {h['pid']}) {h['mode']}" for h in lk["holders"])
        out.append(f"{lk['name']:<11s} {' + '.join(state) or 'free'}; contended {lk['contended']} times"
                   + (f"; held by {holders}" if holders else ""))
    out.append(f"rcu         epoch {r['epoch']}, {r['grace_periods']} grace periods (longest {r['gp_max_ms']:.2f} ms, "
               f"mean {r['gp_mean_ms']:.2f} ms), retire backlog {r['backlog']} (max {r['backlog_max']})"
               + (f", readers in a section: {', '.join(map(str, r['readers']))}" if r["readers"] else ""))
    out.append(f"faults      {k['faults']} (fixed {k['fixed']}, spurious {k['spurious']}), retries {k['retries']}, "
               f"CAS failures {k['cas_failures']}, REMOVED seen {k['removed_seen']}, link races {k['link_races']}")
    out.append(f"tables      allocated {k['tables_allocated']}, retired {k['tables_retired']}, freed at once "
               f"{k['tables_freed']}; zapped leaves {k['zapped_leaves']}, huge splits {k['huge_splits']}, "
               f"TLB flushes {k['flushes']}, guest accesses {k['accesses']}")
    if s["rates"] is not None:
        rt = s["rates"]
        out.append(f"rates       {rt['faults_per_s']:.0f} faults/s, {rt['retries_per_s']:.0f} retries/s, "
                   f"{rt['cas_failures_per_s']:.0f} CAS failures/s, {rt['accesses_per_s']:.0f} accesses/s")
    out.append("workers     slot  role        pid      process  status    iteration  heartbeat")
    for w in s["workers"]:
        out.append(f"            {w['slot']:<5d} {w['role']:<11s} {w['pid'] or '-':<8} "
                   f"{'alive' if w['alive'] else ('-' if not w['pid'] else 'gone'):<8s} {w['status']:<9s} "
                   f"{w['iteration']:<10d} {w['heartbeat']}")
    v = s["violations"]
    out.append(f"violations  {v['count']}")
    for x in v["first"]:
        out.append(f"            !!! {x['kind']}: worker {x['worker']} gfn {x['gfn']:#x} ({x['a']:#x}, {x['b']:#x})")
    sn = s["snapshot"]
    out.append(f"snapshot    {_mib(sn['bytes'])} copied in {sn['copy_ms']:.1f} ms"
               + (f"; {sn['changed_while_reading']} entries changed while reading" if sn["changed_while_reading"]
                  else "; no entry changed while reading"))
    return out


# ---------------------------------------------------------------- the VMs in /dev/shm (shmmmu ls, shmmmu rm)

HALF_MADE_GRACE_S = 10.0     # a segment without a readable header younger than this may be being created


@dataclass
class VmEntry:
    """One VM name found in /dev/shm, as `shmmmu ls` shows it."""

    name: str
    state: str                  # alive, stale, half-made, foreign, other-version, damaged, semaphores-only
    creator_pid: int = 0
    size: int = 0
    vcpus: int | None = None
    lock_mode: str | None = None
    memory_bytes: int | None = None
    age_s: float | None = None
    note: str = ""
    semaphores: int = 0

    @property
    def live(self) -> bool:
        """Might processes be using it?  (alive, or unreadable and too young to call abandoned)."""
        if self.state == "alive":
            return True
        if self.state in ("half-made", "foreign", "damaged", "other-version"):
            if self.creator_pid:
                return pid_alive(self.creator_pid)
            return self.age_s is not None and self.age_s < HALF_MADE_GRACE_S
        return False

    @property
    def known_live(self) -> bool:
        """Is a process known to be using it (its header names a creator that runs)?"""
        if self.state == "alive":
            return True
        return self.state in ("other-version", "damaged") and bool(self.creator_pid) and pid_alive(self.creator_pid)

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["live"] = self.live
        return d


def _raw_header(name: str) -> tuple[int, int, int, int] | None:
    """(magic, version, pid, size) read straight from a segment's first words, or None."""
    import mmap
    import posix_ipc
    from shmmmu.region import H_MAGIC, H_PID, H_VERSION, segment_name
    try:
        shm = posix_ipc.SharedMemory(segment_name(name), read_only=True)
    except (posix_ipc.Error, RegionError):
        return None
    try:
        size = shm.size
        if size < 64:
            return (0, 0, 0, size)
        mm = mmap.mmap(shm.fd, 64, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    finally:
        shm.close_fd()
    try:
        h = np.frombuffer(mm, dtype=np.uint64, count=8).copy()
    finally:
        mm.close()
    return int(h[H_MAGIC]), int(h[H_VERSION]), int(h[H_PID]), size


def _semaphore_names() -> dict[str, int]:
    from shmmmu.region import NAME_RE, PREFIX, SEM_SEP
    out: dict[str, int] = {}
    try:
        files = os.listdir("/dev/shm")
    except OSError:
        return out
    head = "sem." + PREFIX
    for f in files:
        if f.startswith(head) and SEM_SEP in f[len(head):]:
            vm = f[len(head):].split(SEM_SEP, 1)[0]
            if NAME_RE.match(vm):
                out[vm] = out.get(vm, 0) + 1
    return out


def _age(name: str) -> float | None:
    from shmmmu.region import PREFIX
    try:
        return max(0.0, time.time() - os.stat(f"/dev/shm/{PREFIX}{name}").st_ctime)
    except OSError:
        return None


def describe_vm(name: str, sems: dict[str, int] | None = None) -> VmEntry | None:
    """What /dev/shm holds under one VM name (None: nothing at all)."""
    from shmmmu.region import MAGIC, list_names
    sems = _semaphore_names() if sems is None else sems
    if name not in list_names():
        if sems.get(name):
            return VmEntry(name, "semaphores-only", semaphores=sems[name],
                           note="semaphores without a segment (a teardown was cut short)")
        return None
    e = VmEntry(name, "alive", semaphores=sems.get(name, 0), age_s=_age(name))
    try:
        region = Region.attach(name, readonly=True)
    except RegionError as err:
        raw = _raw_header(name)
        e.note = str(err)
        if raw is None:
            e.state = "damaged"
        else:
            magic, version, pid, size = raw
            e.size = size
            if magic != MAGIC:
                e.state = "half-made" if e.age_s is not None and e.age_s < HALF_MADE_GRACE_S else "foreign"
                if e.state == "foreign" and magic == 0:
                    e.state = "half-made"
            else:
                e.creator_pid = pid
                e.state = "other-version" if version != _layout_version() else "damaged"
        return e
    try:
        e.creator_pid = region.creator_pid
        e.size = region.size
        cfg = region.config
        e.vcpus = cfg.get("n_vcpus") if isinstance(cfg, dict) else None
        e.lock_mode = cfg.get("lock_mode") if isinstance(cfg, dict) else None
        try:
            e.memory_bytes = sum(int(m["npages"]) for m in cfg.get("memslots", [])) * 4096
        except (TypeError, KeyError, ValueError, AttributeError):
            e.memory_bytes = None
        e.age_s = max(0.0, (time.time_ns() - region.created_ns) / 1e9)
    finally:
        region.close()
    e.state = "alive" if pid_alive(e.creator_pid) else "stale"
    return e


def _layout_version() -> int:
    from shmmmu.region import LAYOUT_VERSION
    return LAYOUT_VERSION


def list_vms() -> list[VmEntry]:
    """Every VM name in /dev/shm: segments (readable or not) and semaphores left without one."""
    from shmmmu.region import list_names
    sems = _semaphore_names()
    names = sorted(set(list_names()) | set(sems))
    return [e for e in (describe_vm(n, sems) for n in names) if e is not None]


def remove_vm(name: str) -> list[str]:
    """Unlink a VM's segment and every semaphore named after it; returns what went."""
    from shmmmu.region import unlink_all
    return unlink_all(name)
