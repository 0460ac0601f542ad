"""One GFN's walk (`shmmmu inspect --gfn G`): the entries a hardware page walker reads from the root, decoded."""
from __future__ import annotations

from typing import Any

from shmmmu import spte as S
from shmmmu.layout import TableState, TMeta
from shmmmu.snapshot import Snapshot


def parse_gfn(text: str) -> int:
    """'0x40000', '262144' -> GFN; ValueError with a sentence otherwise."""
    try:
        v = int(text.strip().replace("_", ""), 0)
    except (ValueError, AttributeError):
        raise ValueError(f"bad GFN {text!r}: use a decimal or 0x-prefixed hexadecimal number") from None
    if v < 0:
        raise ValueError(f"bad GFN {text!r}: it is negative")
    return v


def gfn_walk(snap: Snapshot, gfn: int, root: int | None = None) -> dict[str, Any]:
    """The walk a hardware page walker would do for one GFN, entry by entry from a root: roots row `root`,
    or the first valid root (the one vCPUs of role 0 use)."""
    g = snap.geometry
    if gfn >= g.max_gfn:
        raise ValueError(f"GFN {gfn:#x} is beyond what {g.root_level}-level tables map (below {g.max_gfn:#x})")
    rows = snap.root_rows()
    if root is not None:
        chosen = next((r for r in rows if r["row"] == root), None)
        if chosen is None:
            raise ValueError(f"root {root} is not listed; listed roots: {[r['row'] for r in rows] or 'none'}")
    else:
        chosen = next((r for r in rows if not r["invalid"]), rows[0] if rows else None)
    steps = []
    result = "not mapped" if chosen else "no root: no vCPU has loaded one"
    pfn_host = None
    visited = set()
    table = chosen["table"] if chosen else 0
    for level in range(g.root_level, 0, -1) if chosen else ():
        idx = g.index(gfn, level)
        raw = int(snap.tables[table, idx])
        d = S.decode(raw, level)
        tm = snap.tmeta[table]
        step = {"level": level, "table": table, "index": idx, "raw": raw, "kind": d.kind, "flags": d.flags,
                "table_state": TableState.NAMES.get(int(tm[TMeta.STATE]), str(int(tm[TMeta.STATE]))),
                "table_level": int(tm[TMeta.LEVEL]), "table_gfn": int(tm[TMeta.GFN])}
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
    slot = next((s for s in snap.slot_rows() if s["base_gfn"] <= gfn < s["base_gfn"] + s["npages"]), None)
    out = {"vm": snap.name, "gfn": gfn, "root": chosen, "steps": steps, "result": result, "host_page": pfn_host,
           "memslot": slot, "changed_while_reading": snap.changed}
    if slot is not None:
        out["memslot_host_page"] = int(snap.host_map[slot["host_off"] + gfn - slot["base_gfn"]])
    return out


