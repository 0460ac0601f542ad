"""Summary: `shmmmu trace summary FILE`: a file of the kernel's kvm/kvmmmu tracepoint lines, counted.

It reads the emulator's `--tracepoints` files and a real kernel's
`trace-cmd report` or `perf script` output alike (the events' printk formats
are the kernel's: shmmmu.mmu.tracepoints), streaming, so the two can be
compared side by side: events by kind, levels, page faults by access, huge
pages split, zaps, and how often each GFN's entries changed.

An SPTE is present when any of EPT's R, W, X bits is set (what 5.13's
is_shadow_present_pte comes to for a TDP entry; REMOVED_SPTE, 0x5a0, has none),
a leaf at level 1 or with bit 7.  A split is a huge leaf removed and, later, a
table linked in its place (the same GFN and level).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from shmmmu.trace.formats import TraceError, event_line, text_lines

_CHANGED = re.compile(r"as id (\d+) gfn ([0-9a-fA-F]+) level (\d+) old_spte ([0-9a-fA-F]+) new_spte ([0-9a-fA-F]+)")
_SP = re.compile(r"sp gen \d+ gfn ([0-9a-fA-F]+) l(\d+) ")
_REQUESTED = re.compile(r"gfn ([0-9a-fA-F]+) pfn ([0-9a-fA-F]+) level (\d+)")
_FAULT = re.compile(r"address (?:0x)?([0-9a-fA-F]+)\s+error_code (?:0x)?([0-9a-fA-F]+)")
_RWX, _LARGE = 0x7, 0x80
TRACED = ("kvm_page_fault", "kvm_mmu_spte_requested", "kvm_tdp_mmu_spte_changed", "kvm_mmu_get_page",
          "kvm_mmu_prepare_zap_page")


@dataclass
class Summary:
    events: Counter = field(default_factory=Counter)
    tasks: set = field(default_factory=set)
    first_ts: float = 0.0
    last_ts: float = 0.0
    faults: Counter = field(default_factory=Counter)               # read / write / fetch
    fault_pages: set = field(default_factory=set)
    requested_levels: Counter = field(default_factory=Counter)
    changed_levels: Counter = field(default_factory=Counter)
    pages_created: Counter = field(default_factory=Counter)       # kvm_mmu_get_page by level
    pages_zapped: Counter = field(default_factory=Counter)        # kvm_mmu_prepare_zap_page by level
    leaves_installed: Counter = field(default_factory=Counter)
    leaves_removed: Counter = field(default_factory=Counter)
    tables_linked: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    changes_per_gfn: Counter = field(default_factory=Counter)
    _huge_gone: set = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        per = self.changes_per_gfn
        hist = Counter(_bucket(n) for n in per.values())
        return {
            "events": dict(self.events), "tasks": len(self.tasks),
            "seconds": round(self.last_ts - self.first_ts, 6) if self.events else 0.0,
            "page_faults": dict(self.faults), "fault_pages": len(self.fault_pages),
            "spte_requested_by_level": _levels(self.requested_levels),
            "spte_changed_by_level": _levels(self.changed_levels),
            "pages_created_by_level": _levels(self.pages_created),
            "pages_zapped_by_level": _levels(self.pages_zapped),
            "leaves_installed_by_level": _levels(self.leaves_installed),
            "leaves_removed_by_level": _levels(self.leaves_removed),
            "tables_linked_by_level": _levels(self.tables_linked),
            "huge_pages_split_by_level": _levels(self.splits),
            "gfns_changed": len(per),
            "changes_per_gfn": {_bucket_name(k): hist[k] for k in sorted(hist)},
            "most_changed_gfns": [[f"{g:x}", n] for g, n in per.most_common(5)],
        }


def _bucket(n: int) -> int:
    """Power-of-two buckets of a count: 1, 2, 3-4, 5-8, ..."""
    return (n - 1).bit_length()


def _bucket_name(b: int) -> str:
    lo, hi = (1 << (b - 1)) + 1 if b else 1, 1 << b
    return str(hi) if lo == hi else f"{lo}-{hi}"


def _levels(c: Counter) -> dict[str, int]:
    return {str(k): c[k] for k in sorted(c)}


def summarize_stream(f: BinaryIO, name: str) -> Summary:
    s = Summary()
    for lineno, line in text_lines(f, name):
        m = event_line(line)
        if m is None:
            continue                                   # headers, comments, blank lines
        event = m["event"].rsplit(":", 1)[-1]          # perf script's kvmmmu:kvm_mmu_get_page
        if event not in TRACED:
            continue
        rest = m["rest"]
        ts = float(m["ts"])
        if not s.events:
            s.first_ts = ts
        s.last_ts = max(s.last_ts, ts)
        s.events[event] += 1
        s.tasks.add((m["comm"].strip(), m["tid"]))     # the explorer's actors share one process
        if event == "kvm_tdp_mmu_spte_changed":
            c = _CHANGED.search(rest)
            if c is None:
                raise TraceError(f"{name}: line {lineno}: {event} not in its format "
                                 f"('as id %d gfn %llx level %d old_spte %llx new_spte %llx')")
            gfn, level, old, new = int(c[2], 16), int(c[3]), int(c[4], 16), int(c[5], 16)
            s.changed_levels[level] += 1
            s.changes_per_gfn[gfn] += 1
            was, now = old & _RWX, new & _RWX
            was_leaf = was and (level == 1 or old & _LARGE)
            now_leaf = now and (level == 1 or new & _LARGE)
            if was_leaf and not now_leaf:
                s.leaves_removed[level] += 1
                if level > 1:
                    s._huge_gone.add((gfn, level))
            if now_leaf and not was_leaf:
                s.leaves_installed[level] += 1
            if now and not now_leaf and not was:
                s.tables_linked[level] += 1
                if (gfn, level) in s._huge_gone:
                    s._huge_gone.discard((gfn, level))
                    s.splits[level] += 1
            elif was_leaf and now and not now_leaf:    # a huge leaf replaced by a table in one step
                s.tables_linked[level] += 1
                s._huge_gone.discard((gfn, level))
                s.splits[level] += 1
        elif event in ("kvm_mmu_get_page", "kvm_mmu_prepare_zap_page"):
            c = _SP.search(rest)
            if c is None:
                raise TraceError(f"{name}: line {lineno}: {event} not in its format ('sp gen %u gfn %llx l%u ...')")
            (s.pages_created if event == "kvm_mmu_get_page" else s.pages_zapped)[int(c[2])] += 1
        elif event == "kvm_mmu_spte_requested":
            c = _REQUESTED.search(rest)
            if c is None:
                raise TraceError(f"{name}: line {lineno}: {event} not in its format ('gfn %llx pfn %llx level %d')")
            s.requested_levels[int(c[3])] += 1
        else:
            c = _FAULT.search(rest)
            if c is None:
                raise TraceError(f"{name}: line {lineno}: {event} not in its format ('address %lx error_code %x')")
            err = int(c[2], 16)
            s.faults["write" if err & 0x2 else "fetch" if err & 0x4 else "read"] += 1
            s.fault_pages.add(int(c[1], 16) >> 12)
    if not s.events:
        raise TraceError(f"{name}: no kvm or kvmmmu tracepoint events ({', '.join(TRACED)})")
    return s


def summarize(path: str) -> Summary:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(f"cannot read {path}: {e.strerror}") from None
    with f:
        return summarize_stream(f, path)


def report(s: Summary, path: str) -> list[str]:
    """The summary as text, one measure a line."""
    j = s.to_json()

    def lv(d: dict[str, int]) -> str:
        return " ".join(f"L{k}:{v}" for k, v in d.items()) or "-"
    out = [f"{path}: {sum(s.events.values())} events from {j['tasks']} tasks over {j['seconds']:.6f} s"]
    for e in TRACED:
        out.append(f"  {e:<26} {s.events.get(e, 0)}")
    f = s.faults
    out += [
        f"page faults (read/write/fetch)  {f['read']} / {f['write']} / {f['fetch']} on {j['fault_pages']} pages",
        f"SPTEs requested by level        {lv(j['spte_requested_by_level'])}",
        f"SPTE changes by level           {lv(j['spte_changed_by_level'])}",
        f"leaves installed by level       {lv(j['leaves_installed_by_level'])}",
        f"leaves removed by level         {lv(j['leaves_removed_by_level'])}",
        f"tables linked by level          {lv(j['tables_linked_by_level'])}",
        f"page tables created by level    {lv(j['pages_created_by_level'])}",
        f"page tables zapped by level     {lv(j['pages_zapped_by_level'])}",
        f"huge pages split by level       {lv(j['huge_pages_split_by_level'])}",
        f"GFNs changed                    {j['gfns_changed']}",
        "GFNs by changes (changes:GFNs)  " + (" ".join(f"{k}:{v}" for k, v in j["changes_per_gfn"].items()) or "-"),
        "most changed GFNs               " + (" ".join(f"{g}({n})" for g, n in j["most_changed_gfns"]) or "-"),
    ]
    return out
