"""Render: a counterexample as a step table (one column per actor), as SVG swimlanes, and as JSON.

The traced replay of a schedule is a list of steps (shmmmu.explore.sched.Step).
It is cut into runs, a run being the steps one actor takes between two
switches; each run becomes a block in its actor's column, each line of a
block a function of the kernel's with what it did:

- every operation on an SPTE (the tables section) on a line of its own: the
  kernel function, the entry (level, table, index) and old -> new decoded by
  spte.py;
- everything else the same function did in one stretch, on one line: how many
  words it read and wrote and in which of the region's mechanisms (the lock,
  RCU, the TLB protocol, the page list, ...).

The debug checkers' own operations (Reader Pipe, generations, the violation
record) and the making of handles are left out of the table (they are steps:
the step numbers count them).

A block starts with how control came to that actor: a preemption (the
strategy switched away from a runnable actor: marked ">>"), or the previous
actor blocked or finished.  The finding is the last row.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from shmmmu import spte as S
from shmmmu.explore.sched import Step
from shmmmu.layout import Ctl, Lock, Locks, Row, TMeta, WState

# kernel names for the library's functions where the Python name is not the kernel's
KERNEL_NAMES = {
    "tdp_iter.py:TdpIter.next": "tdp_iter_next", "tdp_iter.py:TdpIter.start": "tdp_iter_start",
    "tdp_iter.py:TdpIter.restart": "tdp_iter_restart", "tdp_iter.py:TdpIter._step_down": "try_step_down",
    "tdp_iter.py:TdpIter._step_side": "try_step_side", "tdp_iter.py:TdpIter._step_up": "try_step_up",
    "rwlock.py:RWLockReference.read_lock": "read_lock(mmu_lock)",
    "rwlock.py:RWLockReference.read_unlock": "read_unlock(mmu_lock)",
    "rwlock.py:RWLockReference.write_lock": "write_lock(mmu_lock)",
    "rwlock.py:RWLockReference.write_unlock": "write_unlock(mmu_lock)",
    "rwlock.py:RWLock._read_contended": "queued_read_lock (a writer present: back out)",
    "rwlock.py:RWLock._wake": "rwlock wake-up (the unlock's)",
    "rwlock.py:RWLock._read_slowpath": "queued_read_lock_slowpath",
    "rwlock.py:RWLock._write_slowpath": "queued_write_lock_slowpath",
    "rwlock.py:RWLock.needbreak": "rwlock_needbreak", "rwlock.py:_WaitQueue.acquire": "spin_lock(wait_lock)",
    "rwlock.py:_WaitQueue.release": "spin_unlock(wait_lock)", "rwlock.py:_WaitQueue.held": "rwlock_needbreak",
    "rwlock.py:Mutex.acquire": "spin_lock", "rwlock.py:Mutex.release": "spin_unlock",
    "rcu.py:RcuReference.read_lock": "rcu_read_lock", "rcu.py:RcuReference.read_unlock": "rcu_read_unlock",
    "rcu.py:Rcu.call_rcu": "call_rcu", "rcu.py:Rcu.reclaim_pass": "rcu reclaim (grace period + free)",
    "rcu.py:Rcu.wait_for_readers": "synchronize_rcu (wait for readers)",
    "tlb.py:TlbControl.flush_remote_tlbs": "kvm_flush_remote_tlbs", "tlb.py:TlbControl.enter_guest": "vcpu_enter_guest",
    "tlb.py:TlbControl.exit_guest": "vcpu exits guest mode", "tlb.py:TlbControl.process_requests":
        "kvm_check_request(KVM_REQ_TLB_FLUSH)", "tlb.py:TlbControl.kicked": "the kick's IPI (a VM exit)?",
    "tlb.py:TlbControl.make_all_cpus_request": "kvm_make_all_cpus_request (request, kick)",
    "pool.py:Pool.alloc": "alloc_tdp_mmu_page", "pool.py:Pool.unalloc": "tdp_mmu_free_sp (never visible)",
    "pool.py:Pool.free": "tdp_mmu_free_sp_rcu_callback", "pool.py:Pool._take": "mmu_topup_memory_caches",
    "memslots.py:Memslots.lookup": "gfn_to_memslot", "memslots.py:Memslots.gfn_to_pfn": "__gfn_to_pfn_memslot",
    "memslots.py:Memslots.mark_dirty": "mark_page_dirty_in_slot",
    "memslots.py:Memslots.slots.<locals>.<listcomp>": "kvm_memslots (re-read)",
    "memslots.py:Memslots.slots": "kvm_memslots",
    "memslots.py:Memslots.read.<locals>.<listcomp>": "kvm_memslots (re-read)",
    "guest.py:Vcpu.write": "guest write", "guest.py:Vcpu.read": "guest read", "guest.py:Vcpu.fetch": "guest fetch",
    "guest.py:Vcpu._check_fresh": "debug: TLB hit check", "violations.py:record": "checker records a violation",
    "debug.py:Debug.arrive": "debug: Reader Pipe", "debug.py:Debug.check_walk_gens": "debug: end-of-section check",
    "debug.py:install.<locals>.checked_set_spte_atomic": "debug: table state before the cmpxchg",
    "debug.py:install.<locals>.checked_clear_frozen_spte": "tdp_mmu_zap_spte_atomic (clear the frozen entry)",
}
SECTION_NAMES = {"locks": "lock", "wstate": "worker state", "ctl": "VM words", "tmeta": "page metadata",
                 "pipe": "Reader Pipe", "stats": "counters", "data": "guest memory", "host_map": "host map",
                 "dirty": "dirty bitmap", "memslots": "memslots", "retire": "retire ring", "caches": "memory cache",
                 "pool": "free stack", "violations": "violation record"}


def kernel_name(function: str) -> str:
    if function in KERNEL_NAMES:
        return KERNEL_NAMES[function]
    return function.rsplit(":", 1)[-1].split(".")[-1]


def _field(row: type[Row], offset: int) -> str:
    for name, off in row.fields().items():
        if off == offset:
            return name.lower()
    return f"+{offset}"


def word_name(section: str, word: int, entries: int, tm_level) -> str:
    """A shared word by what it is: an SPTE as L<level> t<table>[<index>], a metadata word by its field."""
    if section == "tables":
        t, i = divmod(word, entries)
        return f"L{tm_level(t)} t{t}[{i}]"
    if section == "tmeta":
        t, f = divmod(word, TMeta.WORDS)
        return f"t{t}.{_field(TMeta, f)}"
    if section == "wstate":
        w, f = divmod(word, WState.WORDS)
        if f >= WState.HELD:
            return f"w{w}.held[{Locks.NAMES[f - WState.HELD] if f - WState.HELD < Locks.COUNT else f}]"
        return f"w{w}.{_field(WState, f)}"
    if section == "ctl":
        return f"ctl.{_field(Ctl, word)}"
    if section == "locks":
        k, f = divmod(word, Lock.WORDS)
        return f"{Locks.NAMES[k] if k < Locks.COUNT else k}.{_field(Lock, f)}"
    return f"{section}[{word}]"


def _spte(v: int, level: int) -> str:
    if v == 0:
        return "0"
    if v == S.REMOVED:
        return "REMOVED"
    d = S.decode(v, level)
    if d.kind == "nonleaf":
        return f"{v:#x} (table t{d.pfn})"
    if d.kind == "leaf":
        return f"{v:#x} ({d.size} pfn {d.pfn:#x} {d.flags})"
    return f"{v:#x} ({d.kind})"


def spte_line(s: Step, entries: int, tm_level) -> str:
    t, _ = divmod(s.word, entries)
    level = tm_level(t)
    where = word_name("tables", s.word, entries, tm_level)
    fn = kernel_name(s.function)
    if s.op == "load":
        return f"{fn}: read {where} = {_spte(s.result, level)}"
    if s.op == "cas":
        exp, new = s.args
        if s.result == exp:
            return f"{fn}: cmpxchg {where} {_spte(exp, level)} -> {_spte(new, level)}"
        return f"{fn}: cmpxchg {where} fails (expected {_spte(exp, level)}, found {_spte(s.result, level)})"
    if s.op == "xchg":
        return f"{fn}: xchg {where} {_spte(s.result, level)} -> {_spte(s.args[0], level)}"
    if s.op == "store":
        return f"{fn}: store {where} {_spte(s.before, level)} -> {_spte(s.args[0], level)}"
    return f"{fn}: {s.op} {where} {s.before:#x} -> ..."


@dataclass
class Run:
    """The steps one actor took between two switches, as lines."""

    actor: int
    first: int                          # first step number
    last: int
    how: str                            # how control came here: "start", "preempted", "after <actor> <what>"
    lines: list[str] = field(default_factory=list)


def _hidden(s: Step) -> bool:
    """Steps the table leaves out: the debug checkers' own reads and writes, and handles being made."""
    f = s.function
    return f.startswith("debug.py:") or f.endswith("__init__") or f.startswith("violations.py:")


def runs(log: list[Step], actors: list[str], entries: int, tm_level, everything: bool = False) -> list[Run]:
    """The log cut into runs; the debug checkers' operations are left out unless `everything`."""
    out: list[Run] = []
    cur: Run | None = None
    group: tuple[str, int, int, set[str]] | None = None     # (function, reads, writes, sections)

    def flush_group() -> None:
        nonlocal group
        if group is not None and cur is not None:
            fn, r, w, secs = group
            parts = []
            if w:
                parts.append(f"{w} write{'s' if w > 1 else ''}")
            if r:
                parts.append(f"{r} read{'s' if r > 1 else ''}")
            names = ", ".join(sorted(SECTION_NAMES.get(x, x) for x in secs))
            cur.lines.append(f"{kernel_name(fn)}: {' and '.join(parts)} ({names})")
        group = None

    for s in log:
        if not everything and _hidden(s) and not (cur is None or s.actor != cur.actor):
            continue
        if cur is None or s.actor != cur.actor:
            flush_group()
            if cur is None:
                how = "start"
            elif s.preempted:
                how = f"preempts {actors[cur.actor]}"
            else:
                how = f"after {actors[cur.actor]} waits or ends"
            cur = Run(s.actor, s.index, s.index, how)
            out.append(cur)
        cur.last = s.index
        if not everything and _hidden(s):
            continue
        if s.section == "tables":
            flush_group()
            cur.lines.append(spte_line(s, entries, tm_level))
            continue
        if s.section.startswith("sem:"):
            flush_group()
            cur.lines.append(f"{kernel_name(s.function)}: {'sleeps on' if s.op == 'sem_acquire' else 'wakes'} "
                             f"semaphore {s.section[4:]}")
            continue
        write = s.op != "load"
        if group is not None and group[0] == s.function:
            fn, r, w, secs = group
            group = (fn, r + (not write), w + write, secs | {s.section})
        else:
            flush_group()
            group = (s.function, int(not write), int(write), {s.section})
    flush_group()
    return out


def table_lines(title: list[str], rs: list[Run], actors: list[str], finding: str, width: int = 64) -> list[str]:
    """The step table as text: a column per actor, a row per line of a run."""
    n = len(actors)
    colw = max(24, min(width, (150 - 8) // max(1, n)))

    def cut(t: str) -> str:
        return t if len(t) <= colw else t[:colw - 1] + "…"

    out = list(title)
    out.append("")
    out.append("step   " + " | ".join(f"{a:<{colw}s}" for a in actors))
    out.append("-----  " + "-+-".join("-" * colw for _ in actors))
    for r in rs:
        cells = [""] * n
        cells[r.actor] = (">> " if r.how.startswith("preempts") else "") + f"[{r.how}]"
        out.append(f"{r.first:5d}  " + " | ".join(f"{cut(c):<{colw}s}" for c in cells))
        for ln in r.lines:
            cells = [""] * n
            cells[r.actor] = ln
            out.append("       " + " | ".join(f"{cut(c):<{colw}s}" for c in cells))
    out.append("")
    out.append(f"=> {finding}")
    return out


def svg(title: list[str], rs: list[Run], actors: list[str], finding: str) -> str:
    """The same as swimlanes: one lane per actor, one block per run, arrows where control passes."""
    lane_w, line_h, pad, top = 520, 15, 10, 40 + 16 * len(title)
    width = pad * 2 + lane_w * len(actors)
    y = top + 30
    blocks = []
    for r in rs:
        h = line_h * (len(r.lines) + 1) + 8
        blocks.append((r, y, h))
        y += h + 14
    height = y + 40
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="DejaVu Sans Mono, monospace" font-size="11">',
             '<style>.t{font-size:13px;font-weight:bold}.h{font-weight:bold}.p{fill:#b00020}'
             '.l{fill:#222}.f{fill:#b00020;font-weight:bold}</style>',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for k, line in enumerate(title):
        parts.append(f'<text x="{pad}" y="{20 + 16 * k}" class="{"t" if k == 0 else "l"}">{e(line)}</text>')
    for i, a in enumerate(actors):
        x = pad + i * lane_w
        parts.append(f'<rect x="{x}" y="{top}" width="{lane_w - 8}" height="{height - top - 30}" fill="#f4f6f8" '
                     f'stroke="#ccd"/>')
        parts.append(f'<text x="{x + 8}" y="{top + 18}" class="h">{e(a)}</text>')
    prev = None
    for r, y0, h in blocks:
        x = pad + r.actor * lane_w + 6
        pre = r.how.startswith("preempts")
        parts.append(f'<rect x="{x}" y="{y0}" width="{lane_w - 20}" height="{h}" rx="4" fill="white" '
                     f'stroke="{"#b00020" if pre else "#557"}" stroke-width="{2 if pre else 1}"/>')
        parts.append(f'<text x="{x + 6}" y="{y0 + 13}" class="{"p" if pre else "h"}">'
                     f'{e(f"steps {r.first}-{r.last}: {r.how}")}</text>')
        for k, ln in enumerate(r.lines):
            parts.append(f'<text x="{x + 6}" y="{y0 + 13 + line_h * (k + 1)}" class="l">{e(ln[:78])}</text>')
        if prev is not None and prev[0].actor != r.actor:
            px = pad + prev[0].actor * lane_w + lane_w // 2
            py = prev[1] + prev[2]
            cx = pad + r.actor * lane_w + lane_w // 2
            parts.append(f'<line x1="{px}" y1="{py}" x2="{cx}" y2="{y0}" stroke="{"#b00020" if pre else "#889"}" '
                         f'stroke-width="1.5" marker-end="url(#arrow)"/>')
        prev = (r, y0, h)
    parts.insert(3, '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
                    'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>')
    parts.append(f'<text x="{pad}" y="{height - 14}" class="f">{e("=> " + finding)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def runs_json(rs: list[Run], actors: list[str]) -> list[dict[str, Any]]:
    return [{"actor": actors[r.actor], "first_step": r.first, "last_step": r.last, "how": r.how,
             "lines": r.lines} for r in rs]
