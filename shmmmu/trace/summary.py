"""Summary: `shmmmu trace summary FILE`: a file of the kernel's kvm/kvmmmu tracepoint lines, counted.

It reads the emulator's `--tracepoints` files and any kernel's `trace-cmd
report`, `perf script` or trace file output alike, also pasted into mail
(shmmmu.trace.kernel_lines reads every format), streaming, so the two can be
compared side by side: events by kind, levels, page faults by access, huge
pages split, zaps, and how often each GFN's entries changed.  A line it cannot
read is counted and the first named; only a file with no event it can read is
refused.  A trace.dat is read through `trace-cmd report`.

An SPTE is present when any of EPT's R, W, X bits is set (what
is_shadow_present_pte comes to for a TDP entry; REMOVED_SPTE, 0x5a0, and 6.x's
non-present value with bit 63 set have none), a leaf at level 1 or with bit
7.  An entry is frozen when it becomes REMOVED_SPTE: 0x5a0, or 0x5a0 with bit
63 (6.10's FROZEN_SPTE over SHADOW_NONPRESENT_VALUE).  A split is a huge leaf
removed and, later, a table linked in its place (the same GFN and level).

kvm_page_fault's error code is VMX's exit qualification (bit 1 a write, bit 2
a fetch) unless bits 32-63 say it is SVM's #NPF error code (6.x records it
whole, and the CPU sets bit 32 or 33 in every one): then bit 1 is a write and
bit 4 a fetch.  5.x kept 32 bits, so an AMD host's 5.x faults read as VMX's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from shmmmu.trace.formats import TraceError, fault_kind
from shmmmu.trace.kernel_lines import KNOWN, Reader

_RWX, _LARGE = 0x7, 0x80
REMOVED_SPTE, BIT63 = 0x5a0, 1 << 63
TRACED = KNOWN


@dataclass
class Summary:
    events: Counter = field(default_factory=Counter)
    other_events: int = 0
    tasks: set = field(default_factory=set)
    first_ts: float = 0.0
    last_ts: float = 0.0
    faults: Counter = field(default_factory=Counter)               # read / write / fetch
    fault_pages: set = field(default_factory=set)
    requested_levels: Counter = field(default_factory=Counter)
    changed_levels: Counter = field(default_factory=Counter)
    pages_created: Counter = field(default_factory=Counter)       # kvm_mmu_get_page "new", by level
    pages_found: Counter = field(default_factory=Counter)         # kvm_mmu_get_page "existing", by level
    pages_zapped: Counter = field(default_factory=Counter)        # kvm_mmu_prepare_zap_page by level
    leaves_installed: Counter = field(default_factory=Counter)
    leaves_removed: Counter = field(default_factory=Counter)
    tables_linked: Counter = field(default_factory=Counter)
    frozen: Counter = field(default_factory=Counter)              # entries set to REMOVED_SPTE, by level
    splits: Counter = field(default_factory=Counter)
    set_spte_levels: Counter = field(default_factory=Counter)
    fast_faults: Counter = field(default_factory=Counter)         # fixed / spurious / neither
    split_huge: Counter = field(default_factory=Counter)          # kvm_mmu_split_huge_page by level
    split_errors: int = 0
    changes_per_gfn: Counter = field(default_factory=Counter)
    skipped: int = 0
    first_skipped: tuple[int, str] | None = None
    _huge_gone: set = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        per = self.changes_per_gfn
        hist = Counter(_bucket(n) for n in per.values())
        return {
            "events": dict(self.events), "other_events": self.other_events, "tasks": len(self.tasks),
            "seconds": round(self.last_ts - self.first_ts, 6) if self.events else 0.0,
            "page_faults": dict(self.faults), "fault_pages": len(self.fault_pages),
            "spte_requested_by_level": _levels(self.requested_levels),
            "spte_changed_by_level": _levels(self.changed_levels),
            "pages_created_by_level": _levels(self.pages_created),
            "pages_found_by_level": _levels(self.pages_found),
            "pages_zapped_by_level": _levels(self.pages_zapped),
            "leaves_installed_by_level": _levels(self.leaves_installed),
            "leaves_removed_by_level": _levels(self.leaves_removed),
            "tables_linked_by_level": _levels(self.tables_linked),
            "entries_frozen_by_level": _levels(self.frozen),
            "huge_pages_split_by_level": _levels(self.splits),
            "set_spte_by_level": _levels(self.set_spte_levels),
            "fast_page_faults": dict(self.fast_faults),
            "split_huge_page_by_level": _levels(self.split_huge), "split_huge_page_errors": self.split_errors,
            "gfns_changed": len(per),
            "changes_per_gfn": {_bucket_name(k): hist[k] for k in sorted(hist)},
            "most_changed_gfns": [[f"{g:x}", n] for g, n in per.most_common(5)],
            "lines_skipped": self.skipped,
            "first_skipped": ({"line": self.first_skipped[0], "text": self.first_skipped[1]}
                              if self.first_skipped else None),
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
    reader = Reader(f, name)
    for ev in reader:
        if ev.fields is None:
            s.other_events += 1                        # kvm_exit, kvm_entry, ...: not counted here
            continue
        if not s.events:
            s.first_ts = ev.ts
        s.last_ts = max(s.last_ts, ev.ts)
        s.events[ev.name] += 1
        s.tasks.add((ev.comm, ev.tid))                 # the explorer's actors: a thread id each
        _count(s, ev.name, ev.fields)
    s.skipped, s.first_skipped = reader.skipped, reader.first_skipped
    if not s.events:
        why = f"no kvm or kvmmmu tracepoint events ({', '.join(TRACED)})"
        if reader.first_skipped:
            k, text = reader.first_skipped
            why += (f"; {reader.skipped} line{'s' if reader.skipped != 1 else ''} not in a known format, "
                    f"the first: line {k}: {text!r}")
        raise TraceError(f"{name}: {why}")
    return s


def _count(s: Summary, event: str, f: dict[str, Any]) -> None:
    if event == "kvm_tdp_mmu_spte_changed":
        _changed(s, f["gfn"], f["level"], f["old_spte"], f["new_spte"])
    elif event == "kvm_mmu_get_page":
        (s.pages_created if f["created"] == "new" else s.pages_found)[f["level"]] += 1
    elif event == "kvm_mmu_prepare_zap_page":
        s.pages_zapped[f["level"]] += 1
    elif event == "kvm_mmu_spte_requested":
        s.requested_levels[f["level"]] += 1
    elif event == "kvm_page_fault":
        s.faults[fault_kind(f["error_code"])] += 1
        s.fault_pages.add(f["address"] >> 12)
    elif event == "kvm_mmu_set_spte":
        s.set_spte_levels[f["level"]] += 1
    elif event == "fast_page_fault":
        s.fast_faults["fixed" if f["fixed"] else "spurious" if f["spurious"] else "neither"] += 1
    elif event == "kvm_mmu_split_huge_page":
        s.split_huge[f["level"]] += 1
        s.split_errors += f["errno"] != 0


def is_frozen(spte: int) -> bool:
    return spte & ~BIT63 == REMOVED_SPTE


def _changed(s: Summary, gfn: int, level: int, old: int, new: int) -> None:
    s.changed_levels[level] += 1
    s.changes_per_gfn[gfn] += 1
    if is_frozen(new):
        s.frozen[level] += 1
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


def summarize(path: str) -> Summary:
    """The summary of a tracepoint text file, or of a trace.dat (through `trace-cmd report`)."""
    from shmmmu.trace.tracedat import open_text
    with open_text(path) as f:
        return summarize_stream(f, path)


def report(s: Summary, path: str) -> list[str]:
    """The summary as text, one measure a line."""
    j = s.to_json()

    def lv(d: dict[str, int]) -> str:
        return " ".join(f"L{k}:{v}" for k, v in d.items()) or "-"
    out = [f"{path}: {sum(s.events.values())} events from {j['tasks']} tasks over {j['seconds']:.6f} s"
           f" ({s.other_events} other events)"]
    for e in TRACED:
        out.append(f"  {e:<26} {s.events.get(e, 0)}")
    f, ff = s.faults, s.fast_faults
    out += [
        f"page faults (read/write/fetch)  {f['read']} / {f['write']} / {f['fetch']} on {j['fault_pages']} pages",
        f"fast page faults (fixed/spurious/neither)  {ff['fixed']} / {ff['spurious']} / {ff['neither']}",
        f"SPTEs requested by level        {lv(j['spte_requested_by_level'])}",
        f"SPTEs set (set_spte) by level   {lv(j['set_spte_by_level'])}",
        f"SPTE changes by level           {lv(j['spte_changed_by_level'])}",
        f"leaves installed by level       {lv(j['leaves_installed_by_level'])}",
        f"leaves removed by level         {lv(j['leaves_removed_by_level'])}",
        f"tables linked by level          {lv(j['tables_linked_by_level'])}",
        f"entries frozen by level         {lv(j['entries_frozen_by_level'])}",
        f"page tables created by level    {lv(j['pages_created_by_level'])}",
        f"page tables found by level      {lv(j['pages_found_by_level'])}",
        f"page tables zapped by level     {lv(j['pages_zapped_by_level'])}",
        f"huge pages split by level       {lv(j['huge_pages_split_by_level'])}",
        f"split_huge_page by level        {lv(j['split_huge_page_by_level'])} ({s.split_errors} failed)",
        f"GFNs changed                    {j['gfns_changed']}",
        "GFNs by changes (changes:GFNs)  " + (" ".join(f"{k}:{v}" for k, v in j["changes_per_gfn"].items()) or "-"),
        "most changed GFNs               " + (" ".join(f"{g}({n})" for g, n in j["most_changed_gfns"]) or "-"),
    ]
    if s.first_skipped:
        k, text = s.first_skipped
        out.append(f"lines skipped (not in a known format)  {s.skipped}, the first: line {k}: {text!r}")
    return out
