"""Render: a counterexample as a step table (one column per actor), as SVG swimlanes, and as JSON, every step whole.

The recorded execution (shmmmu.explore.recorder) is a list of steps
(shmmmu.explore.sched.Step).  Every step is one row, in its actor's column:
the kernel function it is in, the operation, the word (an SPTE as level, table
and index; any other word by its field) and its old -> new values, whole: an
SPTE decoded in full (level, PFN or child table, R/W/X, A/D, MMU-present,
REMOVED), a metadata word by what it means (a table state, a list link, a
lock's readers).  Nothing is cut: a long cell wraps inside its column.

A marker column carries the decisive marks (shmmmu.explore.decisive: P, D, T,
R, !, and ≠ with the fix), each explained on the line below its row; the
setup steps fold into one line (`--unfold` shows them).  A change of actor
starts with how control came to it: a preemption (">>"), or the previous
actor waited or ended.  The finding is the last row, with its sentence.  The
SVG draws the same rows as swimlanes with the same marks.
"""
from __future__ import annotations

import bisect
import html
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from shmmmu import spte as S
from shmmmu.explore.sched import Step
from shmmmu.atomics import Words
from shmmmu.layout import NIL, Columns, Ctl, Held, Lock, Locks, RootRow, Row, TableState, TMeta, ViolationRow, WState
from shmmmu.pool import POISON
from shmmmu.violations import KINDS, SITES

# kernel names for the library's functions where the Python name is not the kernel's
KERNEL_NAMES = {
    "tdp_iter.py:TdpIter.next": "tdp_iter_next", "tdp_iter.py:TdpIter.start": "tdp_iter_start",
    "tdp_iter.py:TdpIter.restart": "tdp_iter_restart", "tdp_iter.py:TdpIter._step_down": "try_step_down",
    "tdp_iter.py:TdpIter._step_side": "try_step_side", "tdp_iter.py:TdpIter._step_up": "try_step_up",
    "rwlock.py:RWLockReference.read_lock": "read_lock(mmu_lock)",
    "rwlock.py:RWLockReference.read_unlock": "read_unlock(mmu_lock)",
    "rwlock.py:RWLockReference.write_lock": "write_lock(mmu_lock)",
    "rwlock.py:RWLockReference.write_unlock": "write_unlock(mmu_lock)",
    "rwlock.py:RWLock._read_contended": "queued_read_lock (backed out: a writer to wake?)",
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
    "debug.py:Debug.flushed": "debug: zap ledger cleared (the zapper's flush returned)",
    "debug.py:Debug.zap_ledger": "debug: zap ledger (an install before the zap's flush?)",
    "debug.py:Debug.ledger_before": "debug: zap ledger read before the store",
    "debug.py:install.<locals>.checked_clear_frozen_spte": "tdp_mmu_zap_spte_atomic (clear the frozen entry)",
}
SECTION_NAMES = {"locks": "lock", "wstate": "worker state", "ctl": "VM words", "tmeta": "page metadata",
                 "pipe": "Reader Pipe", "stats": "counters", "data": "guest memory", "host_map": "host map",
                 "dirty": "dirty bitmap", "memslots": "memslots", "retire": "retire ring", "caches": "memory cache",
                 "pool": "free stack", "violations": "violation record"}


SECTION_NAMES = {"locks": "lock", "wstate": "worker state", "ctl": "VM words", "tmeta": "page metadata",
                 "pipe": "Reader Pipe", "stats": "counters", "data": "guest memory", "host_map": "host map",
                 "dirty": "dirty bitmap", "memslots": "memslots", "retire": "retire ring", "caches": "memory cache",
                 "pool": "free stack", "violations": "violation record", "zap_pending": "zap ledger",
                 "touched": "guest access record", "roots": "roots", "host_ad": "host A/D bits"}
U64 = (1 << 64) - 1
_LINKS = {TMeta.PREV, TMeta.NEXT, TMeta.NX_PREV, TMeta.NX_NEXT}


def kernel_name(function: str) -> str:
    if function in KERNEL_NAMES:
        return KERNEL_NAMES[function]
    where, _, name = function.partition(":")
    if not name:
        return "(the scenario's own step)"          # no library function on the stack: the scenario's body
    if name == "__init__":
        return f"({where.removesuffix('.py')} handle made)"
    if where == "debug.py":
        return f"debug check ({name.split('.')[-1]})"
    if where == "violations.py":
        return "checker records a violation"
    return name.split(".")[-1]


def _field(row: type[Row], offset: int) -> str:
    for name, off in row.fields().items():
        if off == offset:
            return name.lower()
    return f"+{offset}"


def word_name(section: str, word: int, entries: int, tm_level: Callable[[int], int]) -> str:
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
    if section == "roots":
        r, f = divmod(word, RootRow.WORDS)
        return f"root{r}.{_field(RootRow, f)}"
    if section == "zap_pending":
        t, i = divmod(word, entries)
        return f"zap ledger of t{t}[{i}]"
    if section == "violations":
        r, f = divmod(word, ViolationRow.WORDS)
        return f"violation{r}.{_field(ViolationRow, f)}"
    return f"{section}[{word}]"


def spte_text(v: int, level: int) -> str:
    """An SPTE whole: its value and every field that matters, decoded at the level of its table."""
    if v == 0:
        return "0 (not present)"
    if v == S.REMOVED:
        return f"{v:#x} (REMOVED: frozen)"
    if v == POISON:
        return f"{v:#x} (poison: a freed table)"
    d = S.decode(v, level)
    if d.kind == "nonleaf":
        flags = " ".join(n for bit, n in ((S.READABLE, "R"), (S.WRITABLE, "W"), (S.EXECUTABLE, "X"),
                                          (S.ACCESSED, "A"), (S.DIRTY, "D")) if v & bit)
        return f"{v:#x} (L{level} non-leaf -> t{d.pfn}; {flags}; MMU-present)"
    if d.kind == "leaf":
        return f"{v:#x} (L{level} leaf {d.size} PFN {d.pfn:#x}; {d.flags}; MMU-present)"
    return f"{v:#x} ({d.kind}, not present{'; ' + d.flags if d.flags else ''})"


def _link(v: int) -> str:
    """A list word (table + 1; 0 or NIL: none)."""
    return "none" if v in (0, NIL) else f"t{v - 1}"


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def lock_cnts(v: int) -> str:
    """qrwlock's counter in words: the writer byte, WAITING, and the readers."""
    parts = []
    if v & 0xFF == 0xFF:
        parts.append("write-locked")
    if v & 0x100:
        parts.append("a writer waiting")
    readers = (v >> 9) & ((1 << 55) - 1)
    if readers:
        parts.append(f"{readers} reader{'s' if readers != 1 else ''}")
    return f"{v:#x} ({', '.join(parts) or 'free'})"


class Describer:
    """Words and values in words, for one recorded execution (the level of a table as it was at each step)."""

    def __init__(self, entries: int, levels: dict[int, list[tuple[int, int]]], who: Callable[[int], str],
                 log: list[Step] | None = None):
        self.entries = entries
        self.levels = levels                   # table -> [(log position, level)] from the start
        self.who = who
        self.at = {id(s): k for k, s in enumerate(log or [])}     # a step of this execution -> its position

    @classmethod
    def of(cls, rec: Any) -> "Describer":
        """From a recorder.Recording: the tables' levels through the execution."""
        level = Columns(TMeta, Words(rec.initial["tmeta"])).level     # the snapshot's rows, by name
        levels: dict[int, list[tuple[int, int]]] = {}
        for t in range(level.rows):
            lv = level.load(t)
            if lv:
                levels[t] = [(-1, lv)]
        for pos, section, word, _old, new in rec.deltas:
            if section == "tmeta" and word % TMeta.WORDS == TMeta.LEVEL:
                levels.setdefault(word // TMeta.WORDS, []).append((pos, new))
        return cls(rec.entries, levels, rec.who, rec.log)

    def level(self, table: int, pos: int = 1 << 62) -> int:
        """The level of a table's entries after the step at log position `pos` (by default: at the end)."""
        hist = self.levels.get(table)
        if not hist:
            return 0
        k = bisect.bisect_right(hist, (pos, 1 << 62)) - 1
        return hist[max(k, 0)][1]

    def word(self, section: str, word: int, pos: int = 1 << 62) -> str:
        return word_name(section, word, self.entries, lambda t: self.level(t, pos))

    def value(self, section: str, word: int, v: int, pos: int = 1 << 62) -> str:
        """A word's value in words."""
        if section == "tables":
            return spte_text(v, self.level(word // self.entries, pos))
        if section == "tmeta":
            f = word % TMeta.WORDS
            if f == TMeta.STATE:
                return TableState.NAMES.get(v, str(v))
            if f in _LINKS:
                return _link(v)
            if f == TMeta.GFN:
                return f"{v:#x}"
            if f == TMeta.OWNER:
                return "none" if v == NIL else self.who(v)
            if f == TMeta.PARENT:
                return "none" if v == NIL else f"t{v // self.entries}[{v % self.entries}]"
            return str(_signed(v))
        if section == "ctl":
            if word in (Ctl.LIST_HEAD, Ctl.NX_HEAD, Ctl.NX_TAIL):
                return _link(v)
            return str(_signed(v))
        if section == "locks":
            f = word % Lock.WORDS
            if f == Lock.CNTS:
                return lock_cnts(v)
            if f in (Lock.WAIT_OWNER, Lock.WRITER):
                return "none" if v == 0 else self.who(v - 1)
            if f == Lock.WAIT:
                return {0: "0 (free)", 1: "1 (held)", 2: "2 (held, sleepers)"}.get(v, str(v))
            return str(_signed(v))
        if section == "wstate":
            f = word % WState.WORDS
            if f >= WState.HELD:
                return {Held.NONE: "not held", Held.READ: "held for read", Held.WRITE: "held for write"}.get(v, str(v))
            if f in (WState.ROOT, WState.WALK_ROOT):
                return "none" if v == 0 else f"root{v - 1}"
            if f == WState.RCU:
                return "quiescent" if v == 0 else f"reader since epoch {v}"
            if f == WState.TLB_MODE:
                return {0: "outside guest mode", 1: "in guest mode"}.get(v, str(v))
            return str(_signed(v))
        if section == "violations":
            f = word % ViolationRow.WORDS
            if f == ViolationRow.TIME_NS:
                return "(the time)"                # the clock's: not part of the execution
            if f == ViolationRow.KIND:
                return KINDS[v - 1] if 0 < v <= len(KINDS) else str(v)
            if f == ViolationRow.WORKER:
                return self.who(v)
            if f == ViolationRow.SITE:
                return SITES[v - 1][1] if 0 < v <= len(SITES) else "unknown"
            return f"{v:#x}"
        if section == "roots":
            f = word % RootRow.WORDS
            if f == RootRow.TABLE:
                return "free row" if v == 0 else f"t{v}"
            return str(_signed(v))
        return f"{v:#x}" if v > 9 else str(v)

    def op(self, s: Step) -> str:
        """What a step did: the operation, the word, old -> new whole."""
        if s.section.startswith("sem:"):
            name = s.section.split(".", 1)[1] if "." in s.section else s.section[4:]
            return f"{'sleeps on' if s.op == 'sem_acquire' else 'wakes'} semaphore {name}"
        if s.section == "actor-done":
            return "looks whether the others are done"
        n = self.at.get(id(s), 1 << 62)
        w = self.word(s.section, s.word, n)
        val = lambda v: self.value(s.section, s.word, v, n)       # noqa: E731
        if s.op == "load":
            return f"read {w} = {val(s.result)}"
        if s.op == "store":
            return f"store {w}: {val(s.before)} -> {val(s.args[0])}"
        if s.op == "cas":
            exp, new = s.args
            if s.result == exp:
                return f"cmpxchg {w}: {val(exp)} -> {val(new)}"
            return f"cmpxchg {w} fails: expected {val(exp)}, found {val(s.result)}"
        if s.op == "xchg":
            return f"xchg {w}: {val(s.result)} -> {val(s.args[0])}"
        if s.op == "fetch_add":
            d = _signed(s.args[0])
            return f"fetch_add {w} {d:+d}: {val(s.before)} -> {val((s.before + s.args[0]) & U64)}"
        if s.op in ("fetch_or", "fetch_and"):
            new = s.before | s.args[0] if s.op == "fetch_or" else s.before & s.args[0]
            return f"{s.op} {w} {s.args[0]:#x}: {val(s.before)} -> {val(new)}"
        if s.op == "touch":
            count, write = s.args
            return f"{'writes' if write else 'reads'} {count} words from {w} at once"
        return f"{s.op} {w}"

    def step(self, s: Step) -> str:
        return f"{kernel_name(s.function)}: {self.op(s)}"


@dataclass
class StepRow:
    """One step of the table: its actor, the line, and its mark with the note that explains it."""

    step: int
    actor: int
    text: str
    how: str = ""                   # set on the first step of a run: "preempts vCPU0", "after vCPU0 waits or ends"
    mark: str = ""
    note: str = ""


def step_rows(log: list[Step], describe: Describer, actors: list[str], marks: Any = None) -> list[StepRow]:
    """Every step as a row, with how control came to its actor, and the marks (decisive.Marks) if given."""
    out: list[StepRow] = []
    prev = None
    for s in log:
        how = ""
        if prev is None:
            how = "start"
        elif s.actor != prev:
            how = f"preempts {actors[prev]}" if s.preempted else f"after {actors[prev]} waits or ends"
        row = StepRow(s.index, s.actor, describe.step(s), how)
        if marks is not None:
            row.mark = marks.mark.get(len(out), "")
            row.note = marks.note.get(len(out), "")
        out.append(row)
        prev = s.actor
    return out


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def table_lines(title: list[str], rows: list[StepRow], actors: list[str], finding: list[str],
                fold: tuple[int, int] | None = None, legend: dict[str, str] | None = None,
                width: int = 0) -> list[str]:
    """The step table as text: a marker column and a column per actor, every step, long cells wrapped (never
    cut); the steps of `fold` as one line; the finding (and its sentences) last."""
    n = len(actors)
    colw = width or max(44, min(96, (210 - 14) // max(1, n)))
    out = list(title)
    out.append("")
    out.append("step   mark  " + " | ".join(f"{a:<{colw}s}" for a in actors))
    out.append("-----  ----  " + "-+-".join("-" * colw for _ in actors))

    def put(step: str, mark: str, actor: int, text: str) -> None:
        for k, piece in enumerate(_wrap(text, colw)):
            cells = [""] * n
            cells[actor] = piece
            out.append(f"{step if k == 0 else '':>5s}  {mark if k == 0 else '':<4s}  "
                       + " | ".join(f"{c:<{colw}s}" for c in cells).rstrip())

    for k, r in enumerate(rows):
        if fold is not None and fold[0] <= k <= fold[1]:
            if k == fold[0]:
                inside = rows[fold[0]:fold[1] + 1]
                who = sorted({actors[x.actor] for x in inside})
                out.append(f"{inside[0].step:>5d}        [setup, folded: steps {inside[0].step}-{inside[-1].step}, "
                           f"{len(inside)} steps of {', '.join(who)}, before any step touches a word another actor "
                           f"touched (--unfold shows them)]")
            continue
        if r.how:
            pre = r.how.startswith("preempts")
            put("", "", r.actor, (">> " if pre else "") + f"[{r.how}]")
        put(str(r.step), r.mark, r.actor, r.text)
        if r.note:
            put("", "", r.actor, f"^ {r.mark}: {r.note}")
    out.append("")
    out += [("=> " if k == 0 else "   ") + line for k, line in enumerate(finding)]
    if legend:
        out.append("")
        out.append("marks: " + "; ".join(f"{k} {v}" for k, v in legend.items()))
    return out


MARK_COLOURS = {"P": "#b00020", "D": "#d35400", "T": "#7d3c98", "R": "#1f618d", "!": "#b00020", "≠": "#117a65"}


def svg(title: list[str], rows: list[StepRow], actors: list[str], finding: list[str],
        fold: tuple[int, int] | None = None) -> str:
    """The same rows as swimlanes: one lane per actor, a line per step (wrapped, never cut), the marks in a gutter
    and as a background, an arrow where control passes to another actor."""
    e = html.escape
    lane_w, line_h, gutter, pad = 560, 14, 70, 10
    chars = (lane_w - 16) // 6                      # DejaVu Sans Mono at 10px: about 6px a character
    top = 30 + 16 * len(title)
    width = pad * 2 + gutter + lane_w * len(actors)
    body: list[str] = []
    y = top + 34
    last: tuple[int, int] | None = None             # (actor, y) of the previous row
    for k, r in enumerate(rows):
        if fold is not None and fold[0] <= k <= fold[1]:
            if k == fold[0]:
                inside = rows[fold[0]:fold[1] + 1]
                body.append(f'<text x="{pad}" y="{y + 10}" class="s">{inside[0].step}-{inside[-1].step}</text>'
                            f'<text x="{pad + gutter}" y="{y + 10}" class="fold">[setup, folded: {len(inside)} steps '
                            f'before any step touches a word another actor touched; shmmmu explore --unfold draws '
                            f'them]</text>')
                y += line_h + 6
            continue
        x = pad + gutter + r.actor * lane_w
        lines = _wrap(r.text, chars)
        if r.how and r.how != "start":
            pre = r.how.startswith("preempts")
            if last is not None and last[0] != r.actor:
                px = pad + gutter + last[0] * lane_w + lane_w // 2
                cx = x + lane_w // 2
                body.append(f'<line x1="{px}" y1="{last[1]}" x2="{cx}" y2="{y + 2}" stroke="{"#b00020" if pre else "#889"}" '
                            f'stroke-width="1.5" marker-end="url(#arrow)"/>')
            body.append(f'<text x="{x + 6}" y="{y + 10}" class="{"p" if pre else "h"}">'
                        f'{e((">> " if pre else "") + "[" + r.how + "]")}</text>')
            y += line_h
        notes = _wrap(f"^ {r.mark}: {r.note}", chars) if r.note else []
        h = line_h * (len(lines) + len(notes))
        if r.mark:
            c = MARK_COLOURS.get(r.mark, "#555")
            body.append(f'<rect x="{x + 2}" y="{y}" width="{lane_w - 12}" height="{h + 2}" fill="{c}" '
                        f'fill-opacity="0.12" stroke="{c}"/>')
            body.append(f'<text x="{pad + 44}" y="{y + 10}" class="m" fill="{c}">{e(r.mark)}</text>')
        body.append(f'<text x="{pad}" y="{y + 10}" class="s">{r.step}</text>')
        for k, ln in enumerate(lines):
            body.append(f'<text x="{x + 6}" y="{y + 10 + line_h * k}" class="l">{e(ln)}</text>')
        for k, ln in enumerate(notes):
            body.append(f'<text x="{x + 6}" y="{y + 10 + line_h * (len(lines) + k)}" class="n">{e(ln)}</text>')
        last = (r.actor, y + h)
        y += h + 2
    fy = y + 20
    for k, ln in enumerate(finding):
        for j, piece in enumerate(_wrap(("=> " if k == 0 else "   ") + ln, (width - 2 * pad) // 6)):
            body.append(f'<text x="{pad}" y="{fy}" class="f">{e(piece)}</text>')
            fy += line_h
    height = fy + 10
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="DejaVu Sans Mono, monospace" font-size="10">',
            '<style>.t{font-size:13px;font-weight:bold}.h{font-weight:bold}.p{fill:#b00020;font-weight:bold}'
            '.l{fill:#222}.n{fill:#555;font-style:italic}.s{fill:#777}.m{font-weight:bold;font-size:12px}'
            '.fold{fill:#555;font-style:italic}.f{fill:#b00020;font-weight:bold}</style>',
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>',
            f'<rect width="{width}" height="{height}" fill="white"/>']
    for k, line in enumerate(title):
        head.append(f'<text x="{pad}" y="{20 + 16 * k}" class="{"t" if k == 0 else "l"}">{e(line)}</text>')
    head.append(f'<text x="{pad}" y="{top + 18}" class="h">step</text>'
                f'<text x="{pad + 40}" y="{top + 18}" class="h">mark</text>')
    for i, a in enumerate(actors):
        x = pad + gutter + i * lane_w
        head.append(f'<rect x="{x}" y="{top}" width="{lane_w - 8}" height="{y - top + 4}" fill="#f4f6f8" '
                    f'stroke="#ccd"/>')
        head.append(f'<text x="{x + 8}" y="{top + 18}" class="h">{e(a)}</text>')
    return "\n".join(head + body + ["</svg>"])


def rows_json(rows: list[StepRow], actors: list[str]) -> list[dict[str, Any]]:
    return [{"step": r.step, "actor": actors[r.actor], "text": r.text, "how": r.how, "mark": r.mark,
             "note": r.note} for r in rows]
