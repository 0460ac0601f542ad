"""The page-table dump of `shmmmu inspect --tree`: leaves coalesced into GFN ranges of one size and one set of flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shmmmu import spte as S
from shmmmu.snapshot import Odd, Snapshot, Walk, walk_tables

_U = np.uint64


@dataclass
class Dump:
    """The page-table dump: coalesced leaf ranges as numpy columns, plus what the walk could not follow.

    A range is a run of leaves of one size and one set of flags with
    contiguous GFNs and contiguous host pages (`start`, `end`: GFNs, end
    exclusive; `pfn`: the host page of `start`; `attrs`: the SPTE bits other
    than the PFN, shared by every leaf of the run; `root`: the roots row the run
    hangs from; the runs of each root are listed together).
    """

    vm: str
    width: int                      # hex digits of a GFN
    tables_per_level: dict[str, int]
    leaves: int
    changed: int
    odd: list[Odd]
    odd_count: int
    start: np.ndarray
    end: np.ndarray
    level: np.ndarray
    count: np.ndarray
    attrs: np.ndarray
    pfn: np.ndarray
    root: np.ndarray
    root_notes: dict[int, str]

    def __len__(self) -> int:
        return int(self.start.size)

    def flags(self) -> list[str]:
        uniq, inv = np.unique(self.attrs, return_inverse=True)
        names = [S.flag_string(int(u)) for u in uniq]
        return [names[i] for i in inv.tolist()]

    def to_json(self) -> dict[str, Any]:
        flags = self.flags()
        ranges = [{"root": r, "start": a, "end": b, "size": S.LEVEL_NAMES[lv], "count": k, "flags": f, "pfn": p}
                  for r, a, b, lv, k, f, p in zip(self.root.tolist(), self.start.tolist(), self.end.tolist(),
                                                  self.level.tolist(), self.count.tolist(), flags,
                                                  self.pfn.tolist())]
        return {"vm": self.vm, "ranges": ranges, "odd": [o.to_json() for o in self.odd], "odd_count": self.odd_count,
                "tables_per_level": self.tables_per_level, "leaves": self.leaves,
                "changed_while_reading": self.changed}


def _pages_of(g: S.Geometry) -> np.ndarray:
    return np.array([0] + [g.pages(lv) for lv in range(1, g.root_level + 1)], dtype=np.int64)


def tree(snap: Snapshot, walk: Walk | None = None) -> Dump:
    """Merge consecutive leaves of the same size and flags, with contiguous GFNs and PFNs (vectorized)."""
    walk = walk or walk_tables(snap)
    g = snap.geometry
    order = np.lexsort((walk.leaf_gfn, walk.leaf_root))        # each root's leaves together, by GFN
    gfn, level, sp, root = walk.leaf_gfn[order], walk.leaf_level[order], walk.leaf_spte[order], walk.leaf_root[order]
    n = gfn.size
    span = _pages_of(g)[level]
    attrs = sp & _U(~S.PFN_MASK & ((1 << 64) - 1))
    pfn = ((sp & _U(S.PFN_MASK)) >> _U(S.PFN_SHIFT)).astype(np.int64)
    brk = np.ones(n, dtype=bool)
    brk[1:] = ((level[1:] != level[:-1]) | (attrs[1:] != attrs[:-1]) | (root[1:] != root[:-1])
               | (gfn[1:] != gfn[:-1] + span[:-1]) | (pfn[1:] != pfn[:-1] + span[:-1]))
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n).astype(np.int64) if n else np.empty(0, np.int64)
    last = ends - 1
    return Dump(vm=snap.name, width=len(f"{g.max_gfn:x}"),
                tables_per_level={str(k): v for k, v in sorted(walk.per_level().items(), reverse=True)},
                leaves=int(n), changed=snap.changed, odd=walk.odd, odd_count=walk.odd_count,
                start=gfn[starts], end=gfn[last] + span[last], level=level[starts], count=ends - starts,
                attrs=attrs[starts], pfn=pfn[starts], root=root[starts],
                root_notes={r["row"]: f"table #{r['table']}, role {r['role']}, count {r['count']}"
                                      + (", INVALID" if r["invalid"] else "") for r in snap.root_rows()})


