"""Snapshot: whole-section numpy copies of a VM region, and the one vectorized walk of its tables that inspect and checks share.

`take_snapshot(name)` attaches read-only (`Region.attach(readonly=True)`: it
cannot write to a VM, even by mistake), copies whole sections with numpy,
detaches, and everything after reads only the copies: it takes no lock and no
semaphore, so it never waits on the VM and never makes the VM wait.
`snapshot(source)` does the same for a Region or VM this process holds.

A copy of a moving VM can be torn: a table may change between the copy of one
table and the next.  The tables are therefore copied twice on request and the
entries that differ are counted (`Snapshot.changed`).  `walk_tables` survives
anything a table can hold (a child pointer past the pool, a cycle, a table
reached from two parents, a REMOVED or poisoned entry): it records it as an
`Odd` entry and goes on; every table is followed once.  The checkers
(shmmmu.checks) turn odd entries into problems; the inspector shows them.

Everything is vectorized per level of the tree: one numpy pass over all the
reachable tables of a level, never a Python loop over entries.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from shmmmu import spte as S
from shmmmu.layout import (MAX_MEMSLOTS, MAX_ROOTS, STAT, Ctl, Lock, Locks, MemslotFlags, MemslotRow, RootRow,
                           VMConfig, WorkerStatus, WState)
from shmmmu.pool import POISON
from shmmmu.region import Region, RegionError

if TYPE_CHECKING:
    from shmmmu.vm import VM

_U = np.uint64
# every section a snapshot copies (the data words, guest memory, are not copied: integrity.py reads them)
SECTIONS = ("tables", "tmeta", "pool", "ctl", "locks", "wstate", "stats", "caches", "retire", "memslots",
            "roots", "host_map", "host_ad", "touched", "violations", "pipe")
MAX_LISTED = 1000            # odd entries listed one by one (all are counted)


@dataclass
class Snapshot:
    """Numpy copies of a VM's sections, taken at one moment (as near as a copy gets)."""

    name: str
    config: VMConfig
    sections: dict[str, np.ndarray]
    creator_pid: int = 0
    creator_start: int = 0        # the creator's start time (clock ticks since boot): a reused pid is not it
    size: int = 0
    created_ns: int = 0
    taken_ns: int = 0             # time.time_ns() when the copy began
    taken_mono: float = 0.0       # time.monotonic() when the copy began
    copy_s: float = 0.0           # how long the copies took
    changed: int = 0              # table entries that differed between two copies
    _walk: "Walk | None" = field(default=None, repr=False)

    def __getattr__(self, section: str) -> np.ndarray:
        """A copied section by name: snap.tables, snap.tmeta, snap.ctl, ..."""
        try:
            return self.__dict__["sections"][section]
        except KeyError:
            raise AttributeError(section) from None

    @property
    def geometry(self) -> S.Geometry:
        return self.config.geometry

    @property
    def n_tables(self) -> int:
        return int(self.tables.shape[0])

    def same_state(self, other: "Snapshot") -> bool:
        """Did `other` copy the very same state (every section equal, a torn copy in neither)?  Two such
        copies in a row are a consistent view of the VM: nothing moved while they were taken."""
        return (not self.changed and not other.changed and self.sections.keys() == other.sections.keys()
                and all(np.array_equal(a, other.sections[s]) for s, a in self.sections.items()))

    def busy(self) -> str:
        """What the copied VM is in the middle of ('' : nothing -- a quiet point, where every invariant of
        shmmmu.checks holds): a lock held, an RCU read-side section, a walk over the roots, a vCPU inside
        an iteration (whose counters it has not all published yet)."""
        ws = self.wstate
        if self.word(Ctl.STOP):
            return "the VM is stopping"          # its workers end, its supervisor publishes and tears down
        for k in range(ws.shape[0]):
            for i, lock in enumerate(Locks.NAMES[:self.locks.shape[0]]):
                if int(ws[k, WState.HELD + i]) or int(self.locks[i, Lock.CNTS]):
                    return f"{lock} is held"
            if int(ws[k, WState.RCU]):
                return f"worker {k} is in an RCU read-side section"
            if int(ws[k, WState.WALK_ROOT]):
                return f"worker {k} is walking the roots"
            if (k < self.config.n_vcpus and int(ws[k, WState.STATUS]) == WorkerStatus.READY
                    and int(ws[k, WState.ITERATION]) != self.word(Ctl.ITERATION)):
                return f"vCPU {k} is running"
        return ""

    def word(self, i: int) -> int:
        """A word of the ctl section (layout.Ctl)."""
        return int(self.ctl[i])

    def stats_total(self) -> dict[str, int]:
        """Every counter summed over the workers (maxima taken as max)."""
        rows = self.stats.astype(np.int64)
        tot, top = rows.sum(axis=0), rows.max(axis=0) if rows.size else rows.sum(axis=0)
        return {n: int(top[i] if n.endswith("_max_ns") else tot[i]) for n, i in STAT.items()}

    def slot_rows(self) -> list[dict[str, int]]:
        """Every memslot row that holds a slot, active or not."""
        out = []
        for k, row in enumerate(self.memslots[:MAX_MEMSLOTS]):
            if int(row[MemslotRow.NPAGES]):
                out.append({"slot": k, "base_gfn": int(row[MemslotRow.BASE_GFN]),
                            "npages": int(row[MemslotRow.NPAGES]),
                            "backing_level": int(row[MemslotRow.BACKING_LEVEL]),
                            "flags": int(row[MemslotRow.FLAGS]), "host_off": int(row[MemslotRow.HOST_OFF])})
        return out

    def active_slots(self) -> list[dict[str, int]]:
        return [s for s in self.slot_rows() if s["flags"] & MemslotFlags.ACTIVE]

    def root_rows(self) -> list[dict[str, int]]:
        """Every listed root (kvm->arch.tdp_mmu_roots): its row, table, role, count, state, and the
        workers recorded as holding it (WState.ROOT)."""
        holders = self.held_rows()
        out = []
        for k, row in enumerate(self.roots[:MAX_ROOTS]):
            if int(row[RootRow.TABLE]):
                out.append({"row": k, "table": int(row[RootRow.TABLE]), "role": int(row[RootRow.ROLE]),
                            "count": int(row[RootRow.COUNT]), "invalid": bool(row[RootRow.INVALID]),
                            "zapped": bool(row[RootRow.ZAPPED]), "holders": holders.get(k, [])})
        return out

    def held_rows(self) -> dict[int, list[int]]:
        """Roots rows the workers hold (WState.ROOT), listed or not: row -> workers."""
        out: dict[int, list[int]] = {}
        for k, row in enumerate(self.wstate):
            held = int(row[WState.ROOT])
            if held:
                out.setdefault(held - 1, []).append(k)
        return out


Source = Union[Region, Snapshot, "VM"]


def _config_of(region: Region) -> VMConfig:
    """The region's configuration, checked against its sections: a header whose config disagrees with the
    shapes it records (bits, table counts, workers) is refused before a walk indexes past a section."""
    from shmmmu.layout import ConfigError, section_shapes
    try:
        config = VMConfig.from_json(region.config)       # every field's type and range
    except ConfigError as e:
        raise RegionError(f"the region of VM {region.name!r} has a damaged header: {e}") from None
    try:
        expected = section_shapes(config)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, ZeroDivisionError):
        raise RegionError(f"the VM {region.name!r} has a configuration this shmmmu cannot read") from None
    for s in SECTIONS:
        have = region.sections.get(s)
        if have is not None and tuple(have.shape) != tuple(expected.get(s, ())):
            raise RegionError(f"the region of VM {region.name!r} has a damaged header: section {s!r} has shape "
                              f"{tuple(have.shape)} but its configuration needs {tuple(expected.get(s, ()))}")
    return config


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def _copy(region: Region, section: str) -> np.ndarray:
    """One whole-section copy (the only read of the shared mapping)."""
    return np.array(region.array(section), copy=True)


def _copy_region(region: Region, recheck: bool) -> Snapshot:
    config = _config_of(region)
    missing = [s for s in SECTIONS if s not in region.sections]
    if missing:
        raise RegionError(f"the region of VM {region.name!r} has no section {missing[0]!r}")
    need = sum(region.sections[s].nbytes for s in SECTIONS) * (2 if recheck else 1)
    if need > _available_memory():             # checked before a byte is allocated (a sparse segment can lie)
        raise RegionError(f"copying the region of VM {region.name!r} needs {need >> 20} MiB, more than the "
                          f"{_available_memory() >> 20} MiB of memory available")
    t_ns, t0 = time.time_ns(), time.monotonic()
    copies = {s: _copy(region, s) for s in SECTIONS}
    changed = 0
    if recheck:
        again = _copy(region, "tables")
        changed = int(np.count_nonzero(again != copies["tables"]))
        del again
    return Snapshot(name=region.name, config=config, sections=copies, creator_pid=region.creator_pid,
                    creator_start=region.creator_start,
                    size=region.size, created_ns=region.created_ns, taken_ns=t_ns, taken_mono=t0,
                    copy_s=time.monotonic() - t0, changed=changed)


def snapshot(source: Source, recheck: bool = False) -> Snapshot:
    """Copy every section out of a region (or a VM's region) this process holds; a Snapshot is returned as is."""
    if isinstance(source, Snapshot):
        return source
    return _copy_region(source if isinstance(source, Region) else source.region, recheck)


def take_snapshot(name: str, *, recheck: bool = True) -> Snapshot:
    """Attach the VM `name` read-only, copy every section, detach."""
    region = Region.attach(name, readonly=True)
    try:
        return _copy_region(region, recheck)
    finally:
        region.close()


# ---------------------------------------------------------------- the walk


@dataclass(frozen=True)
class Odd:
    """An entry of a reachable table that the walk could not take at face value."""

    table: int
    index: int
    level: int
    gfn: int
    raw: int
    what: str                     # one phrase
    kind: str                     # the violations.KINDS name a checker reports it under

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "index": self.index, "level": self.level, "gfn": self.gfn, "raw": self.raw,
                "what": self.what}


@dataclass
class Walk:
    """Everything reachable from the roots, decoded level by level.

    `tables`, `t_level`, `t_gfn`, `t_root`: the reachable tables (the roots first),
    each once, in walk order, with the level of their entries, the first GFN they
    cover and the roots row they hang from.  `leaf_gfn`, `leaf_level`, `leaf_spte`,
    `leaf_root`: every present leaf, sorted by GFN (then by root).
    `odd`: the first MAX_LISTED odd entries (all are counted in `odd_count`).
    """

    tables: np.ndarray
    t_level: np.ndarray
    t_gfn: np.ndarray
    t_root: np.ndarray
    leaf_gfn: np.ndarray
    leaf_level: np.ndarray
    leaf_spte: np.ndarray
    leaf_root: np.ndarray
    odd: list[Odd] = field(default_factory=list)
    odd_count: int = 0
    removed_count: int = 0
    reached_twice: int = 0

    def per_level(self) -> dict[int, int]:
        lv, n = np.unique(self.t_level, return_counts=True)
        return {int(a): int(b) for a, b in zip(lv, n)}

    def mappings(self) -> dict[int, int]:
        return {lv: int(np.count_nonzero(self.leaf_level == lv)) for lv in (1, 2, 3)}

    def root_tables(self) -> np.ndarray:
        return self.tables[self.t_level == self.t_level.max()] if self.tables.size else self.tables


def _note(walk: Walk, table: int, index: int, level: int, gfn: int, raw: int, what: str,
          kind: str = "invariant") -> None:
    walk.odd_count += 1
    if len(walk.odd) < MAX_LISTED:
        walk.odd.append(Odd(int(table), int(index), int(level), int(gfn), int(raw), what, kind))


def walk_tables(source: Source) -> Walk:
    """Walk the copied tables from every listed root, one vectorized pass per level (cached on the snapshot).

    A root table outside the pool, or listed twice, is an odd entry of the roots section.
    """
    snap = snapshot(source)
    if snap._walk is not None:
        return snap._walk
    g = snap.geometry
    n = snap.n_tables
    tables = snap.tables
    walk = Walk(*(np.empty(0, np.int64),) * 6, np.empty(0, _U), np.empty(0, np.int64))
    seen = np.zeros(n, dtype=bool)
    rows, roots = [], []
    for r in snap.root_rows():
        t = r["table"]
        if not 0 < t < n:
            _note(walk, t, r["row"], g.root_level, 0, t, f"root row {r['row']} names table {t}, outside the pool")
        elif seen[t]:
            _note(walk, t, r["row"], g.root_level, 0, t, f"root row {r['row']} names table {t}, another root's")
            walk.reached_twice += 1
        else:
            seen[t] = True
            rows.append(r["row"])
            roots.append(t)
    cur = np.array(roots, dtype=np.int64)
    cur_gfn = np.zeros(cur.size, dtype=np.int64)
    cur_root = np.array(rows, dtype=np.int64)
    all_t, all_l, all_g, all_r = [cur], [np.full(cur.size, g.root_level, dtype=np.int64)], [cur_gfn], [cur_root]
    lg, ll, ls, lr = [], [], [], []
    for level in range(g.root_level, 0, -1):
        if cur.size == 0:
            break
        shift = g.shift(level)
        rows = tables[cur]                                   # (k, E) copy of this level's tables
        present = (rows & _U(S.MMU_PRESENT)) != 0
        large = (rows & _U(S.LARGE)) != 0
        if level == 1:
            leaf, nonleaf = present, np.zeros_like(present)
            for i, j in zip(*np.nonzero(present & large)):
                _note(walk, cur[i], j, level, int(cur_gfn[i]) + (int(j) << shift), int(rows[i, j]),
                      "page-size bit on a 4K entry")
        elif level > S.MAX_HUGEPAGE_LEVEL:
            for i, j in zip(*np.nonzero(present & large)):
                _note(walk, cur[i], j, level, int(cur_gfn[i]) + (int(j) << shift), int(rows[i, j]),
                      f"huge bit at level {level}, which has no huge pages")
            leaf, nonleaf = np.zeros_like(present), present & ~large
        else:
            leaf, nonleaf = present & large, present & ~large
        # entries neither empty nor present: REMOVED (frozen), MMIO, poison of a freed table, garbage
        odd = ~present & (rows != 0)
        if odd.any():
            r, c = np.nonzero(odd)
            vals = rows[r, c]
            walk.removed_count += int(np.count_nonzero(vals == _U(S.REMOVED)))
            room = max(0, MAX_LISTED - len(walk.odd))
            for i, j, v in zip(r[:room].tolist(), c[:room].tolist(), vals[:room].tolist()):
                kind = S.decode(int(v), level).kind
                what = {"removed": "REMOVED (frozen) entry in a reachable table"}.get(kind, kind)
                _note(walk, cur[i], j, level, int(cur_gfn[i]) + (j << shift), int(v), what,
                      "poison-read" if int(v) == POISON else "invariant")
            walk.odd_count += max(0, r.size - room)
        # leaves
        r, c = np.nonzero(leaf)
        if r.size:
            gfns = cur_gfn[r] + (c.astype(np.int64) << shift)
            vals = rows[r, c]
            if level > 1:
                pfn = (vals & _U(S.PFN_MASK)) >> _U(S.PFN_SHIFT)
                for k in np.flatnonzero((pfn & _U(g.pages(level) - 1)) != 0)[:MAX_LISTED].tolist():
                    _note(walk, cur[r[k]], c[k], level, gfns[k], int(vals[k]),
                          f"a {S.LEVEL_NAMES[level]} leaf whose host page is not aligned to its size")
            lg.append(gfns)
            ll.append(np.full(r.size, level, dtype=np.int64))
            ls.append(vals)
            lr.append(cur_root[r])
        # children
        r, c = np.nonzero(nonleaf)
        if r.size == 0:
            break
        child = ((rows[r, c] & _U(S.PFN_MASK)) >> _U(S.PFN_SHIFT)).astype(np.int64)
        cgfn = cur_gfn[r] + (c.astype(np.int64) << shift)
        bad = (child >= n) | (child <= 0)
        for i in np.flatnonzero(bad)[:MAX_LISTED].tolist():
            _note(walk, cur[r[i]], c[i], level, cgfn[i], int(rows[r[i], c[i]]),
                  f"child table #{child[i]} is outside the pool (1..{n - 1})")
        walk.odd_count += max(0, int(bad.sum()) - MAX_LISTED)
        ok = ~bad
        child, cgfn, r, c = child[ok], cgfn[ok], r[ok], c[ok]
        # a table reached twice (two parents, or a cycle back up the tree) is followed once
        uniq, first = np.unique(child, return_index=True)
        dup = np.ones(child.size, dtype=bool)
        dup[first] = False
        dup |= seen[child]
        dups = np.flatnonzero(dup)
        walk.reached_twice += int(dups.size)
        for i in dups[:MAX_LISTED].tolist():
            _note(walk, cur[r[i]], c[i], level, cgfn[i], int(rows[r[i], c[i]]),
                  f"child table #{child[i]} is reached twice")
        walk.odd_count += max(0, int(dups.size) - MAX_LISTED)
        keep = np.sort(first[~seen[child[first]]])
        croot = cur_root[r]
        cur, cur_gfn, cur_root = child[keep], cgfn[keep], croot[keep]
        seen[cur] = True
        all_t.append(cur)
        all_l.append(np.full(cur.size, level - 1, dtype=np.int64))
        all_g.append(cur_gfn)
        all_r.append(cur_root)
    walk.tables = np.concatenate(all_t)
    walk.t_level = np.concatenate(all_l)
    walk.t_gfn = np.concatenate(all_g)
    walk.t_root = np.concatenate(all_r)
    if lg:
        gfn, lvl, sp, rt = np.concatenate(lg), np.concatenate(ll), np.concatenate(ls), np.concatenate(lr)
        if len(lg) > 1 or len(rows) > 1:       # leaves of several levels or roots: merge them by GFN, then root
            order = np.lexsort((rt, gfn))
            gfn, lvl, sp, rt = gfn[order], lvl[order], sp[order], rt[order]
        walk.leaf_gfn, walk.leaf_level, walk.leaf_spte, walk.leaf_root = gfn, lvl, sp, rt
    snap._walk = walk
    return walk
