"""HTML: a counterexample as one self-contained page: swimlanes, a cursor, the state at the cursor, the fix beside it.

`page(explained, meta)` fills the template explain.html (beside this module:
inline script and style, no network, no external font) with one JSON object:
the executions (the failing one and, when it was run, the same decisions with
the fix), every step with its text and mark, and the state as *cells* (an
entry of a table, a table's state or list link, a root's count, a lock word,
the RCU epoch, an actor's held locks and TLB mode, each vCPU's TLB): their
values at the start and the changes, each charged to a step.  The page applies
changes forward and undoes them backward as the cursor moves, so a 5,000-step
execution stays small: every text (a step's line, a decoded value) is stored
once and referred to by number.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from shmmmu import __version__
from shmmmu.explore.decisive import MARKS
from shmmmu.explore.explain import Explained, Side
from shmmmu.pool import POISON
from shmmmu.atomics import Words
from shmmmu.layout import Columns, Ctl, Lock, Locks, RootRow, TableState, TMeta, WState

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explain.html")
PLACEHOLDER = "/*__SHMMMU_DATA__*/null"

# the VM words the page shows (ctl), and a worker's words (wstate) beside its held locks
CTL_SHOWN = (("epoch", Ctl.EPOCH), ("gp_count", Ctl.GP_COUNT), ("page_count", Ctl.PAGE_COUNT),
             ("list_head", Ctl.LIST_HEAD), ("unflushed", Ctl.UNFLUSHED),
             ("notifier_seq", Ctl.NOTIFIER_SEQ), ("notifier_count", Ctl.NOTIFIER_COUNT), ("nx_count", Ctl.NX_COUNT),
             ("roots_gen", Ctl.ROOTS_GEN), ("pool_top", Ctl.POOL_TOP))
WSTATE_SHOWN = ("rcu", "tlb_mode", "tlb_requests", "root", "walk_root")          # Columns' names of the words
TMETA_SHOWN = ("state", "level", "gfn", "prev", "next", "nx", "gen")


@dataclass
class Strings:
    """Every text of the page once: its number is its place."""

    index: dict[str, int] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)

    def __call__(self, text: str) -> int:
        k = self.index.get(text)
        if k is None:
            k = self.index[text] = len(self.items)
            self.items.append(text)
        return k


class Cells:
    """The state the page shows as cells: (section, word) -> cell, each cell with its group and label."""

    def __init__(self, strings: Strings):
        self.s = strings
        self.of: dict[tuple[str, int], int] = {}
        self.desc: list[list[int]] = []          # [group, label] string numbers

    def add(self, key: tuple[str, Any], group: str, label: str) -> int:
        c = self.of.get(key)
        if c is None:
            c = self.of[key] = len(self.desc)
            self.desc.append([self.s(group), self.s(label)])
        return c


def _tables_shown(side: Side) -> list[int]:
    """The tables that were ever live or retired, or held an entry, during the execution."""
    rec = side.rec
    E = rec.entries
    state, tb = Columns(TMeta, Words(rec.initial["tmeta"])).state, rec.initial["tables"]
    shown = set()
    for t in range(state.rows):
        entries = tb[t * E:(t + 1) * E]
        if state.load(t) in (TableState.LIVE, TableState.RETIRED) or \
                ((entries != 0) & (entries != POISON)).any():
            shown.add(t)
    for _step, section, word, _old, new in rec.deltas:
        if section == "tmeta" and word % TMeta.WORDS == TMeta.STATE and new in (TableState.LIVE, TableState.RETIRED):
            shown.add(word // TMeta.WORDS)
        elif section == "tables" and new not in (0, POISON):
            shown.add(word // E)
    shown.discard(0)                 # table 0 is never handed out
    return sorted(shown)


def _execution(side: Side, name: str, s: Strings, divergence: int | None) -> dict[str, Any]:
    rec, d = side.rec, side.describe
    E = rec.entries
    cells = Cells(s)
    # the cells: the shown tables' entries and fields, the roots, the locks, the VM words, each worker's words
    listed = _list_used(rec)
    # the rows of the recorded sections by name: a cell's key is its section's word index (Column.word)
    tmeta, wstate = (Columns(row, Words(rec.initial[sec])) for sec, row in (("tmeta", TMeta), ("wstate", WState)))
    for t in _tables_shown(side):
        for f in TMETA_SHOWN:
            if f in ("prev", "next") and not listed:
                continue
            cells.add(("tmeta", getattr(tmeta, f).word(t)), f"t{t}", f)
        for i in range(E):
            cells.add(("tables", t * E + i), f"t{t}", f"[{i}]")
    roots = rec.initial["roots"]
    for r in range(len(roots) // RootRow.WORDS):
        if roots[r * RootRow.WORDS + RootRow.TABLE] or any(sec == "roots" and w // RootRow.WORDS == r
                                                          for _, sec, w, _, _ in rec.deltas):
            for f, off in (("table", RootRow.TABLE), ("role", RootRow.ROLE), ("count", RootRow.COUNT),
                           ("invalid", RootRow.INVALID)):
                cells.add(("roots", r * RootRow.WORDS + off), "roots", f"root{r}.{f}")
    for k, lock in enumerate(Locks.NAMES):
        for f, off in (("cnts", Lock.CNTS), ("wait", Lock.WAIT), ("writer", Lock.WRITER)):
            cells.add(("locks", k * Lock.WORDS + off), "locks", f"{lock}.{f}")
    for f, off in CTL_SHOWN:
        if f == "list_head" and not listed:
            continue
        cells.add(("ctl", off), "rcu" if f in ("epoch", "gp_count") else "vm", f)
    workers = sorted(rec.workers)
    for w in workers:
        who = rec.who(w)
        for f in WSTATE_SHOWN:
            cells.add(("wstate", getattr(wstate, f).word(w)), f"actor:{who}", f)
        for k, lock in enumerate(Locks.NAMES):
            cells.add(("wstate", wstate.held.word(w) + k), f"actor:{who}", f"holds {lock}")
    for a, name_ in enumerate(rec.actors):
        cells.add(("sched", a), f"actor:{name_}", "scheduler")
    for v in sorted({v for _, v, _ in rec.tlbs}):
        cells.add(("tlb", v), f"actor:{rec.who(v)}", "TLB")

    # the steps, one per row in log order (a row's index is its log position), with the cell each one touched
    steps: list[int] = []
    for r, st in zip(side.rows, rec.log):
        how = 1 if r.how.startswith("preempts") else 2 if r.how else 0
        steps += [r.step, r.actor, s(r.text), s(r.mark), s(r.note), how, cells.of.get((st.section, st.word), -1)]

    init: list[int] = []
    flat = {sec: arr for sec, arr in rec.initial.items()}
    for (section, word), c in cells.of.items():
        if section in flat:
            init += [c, s(d.value(section, word, int(flat[section][word]), -1))]
    deltas: list[int] = []
    last: dict[int, int] = dict(zip(init[::2], init[1::2]))     # each cell's value so far
    for step, section, word, _old, new in rec.deltas:
        c = cells.of.get((section, word))
        if c is None:
            continue
        text = s(d.value(section, word, new, step))
        if last.get(c) != text:
            deltas += [step, c, last.get(c, s("")), text]
            last[c] = text
    for step, states in rec.states:
        for a, state in enumerate(states):
            c = cells.of[("sched", a)]
            text = s(state)
            if last.get(c) != text:
                deltas += [step, c, last.get(c, s("")), text]
                last[c] = text
    for step, v, entries in rec.tlbs:
        c = cells.of[("tlb", v)]
        text = s(_tlb_text(entries, rec.entries.bit_length() - 1))
        if last.get(c) != text:
            deltas += [step, c, last.get(c, s("")), text]
            last[c] = text
    # in position order (stable: one cell's changes keep theirs), as the page applies them forward and undoes them
    # backward; a change charged at -1 (before the first step) is always applied
    order = sorted(range(0, len(deltas), 4), key=lambda k: deltas[k])
    deltas = [x for k in order for x in deltas[k:k + 4]]
    marks = side.marks
    return {"name": name, "steps": steps, "cells": cells.desc, "init": init, "deltas": deltas,
            "fold": list(marks.fold) if marks.fold else None,
            "diverge": divergence if divergence is not None else -1}


def _list_used(rec) -> bool:
    """5.13's page list is in use (the K18 variant): its head or a table's links changed."""
    return any(sec == "ctl" and w == Ctl.LIST_HEAD for _, sec, w, _, _ in rec.deltas) or \
        bool(rec.initial["ctl"][Ctl.LIST_HEAD])


def _tlb_text(entries: tuple, bits: int) -> str:
    if not entries:
        return "empty"
    out = []
    for level, key, (pfn, writable, executable) in entries:
        span = 1 << (bits * (level - 1))
        g = key * span
        gfns = f"gfn {g:#x}" if level == 1 else f"gfns {g:#x}-{g + span - 1:#x}"
        out.append(f"{gfns} -> host page {pfn:#x} ({'4K' if level == 1 else 'huge'}"
                   f"{', W' if writable else ''}{', X' if executable else ''})")
    return "; ".join(out)


def commit() -> str:
    """The checkout's commit, if shmmmu runs from one."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if out.returncode != 0:
        return "unknown (not a git checkout)"
    return out.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")


def data(e: Explained, title: list[str], token: str, command: str) -> dict[str, Any]:
    """The page's JSON object."""
    s = Strings()
    s("")                                         # string 0: empty
    d = e.divergence
    div_bug = div_fix = None
    if d is not None and d.position >= 0:
        div_bug = min(d.position, len(e.bug.rows) - 1)
        div_fix = min(d.position, len(e.fix.rows) - 1) if e.fix is not None else None
    runs = [_execution(e.bug, "the failing execution (" + (", ".join(e.bugs) or "no switch") + " on)", s, div_bug)]
    if e.fix is not None:
        runs.append(_execution(e.fix, "the same decisions with the fix (" + (", ".join(e.bugs) or "no switch")
                               + " off)", s, div_fix))
    fix_words = []
    if e.fix is not None:
        f = e.fix.rec.result.finding
        fix_words = e.notes + [e.divergence_line(),
                               "no finding with the fix: the same decisions end cleanly" if f is None else
                               f"!!! THE FIXED CODE FAILS UNDER THE SAME DECISIONS: {f} (a bug of shmmmu)"]
    return {"meta": {"title": title, "token": token, "command": command, "version": __version__, "commit": commit(),
                     "finding": e.finding_lines(), "fix": fix_words, "marks": dict(MARKS)},
            "actors": e.actors, "s": s.items, "runs": runs}


def page(e: Explained, title: list[str], token: str, command: str) -> str:
    """The whole page: the template with the data in it (every `<` of the data escaped, so no text of a step can
    end the script)."""
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    blob = json.dumps(data(e, title, token, command), separators=(",", ":"), ensure_ascii=False)
    blob = blob.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    if PLACEHOLDER not in template:
        raise RuntimeError(f"{TEMPLATE} lost its data placeholder")
    return template.replace(PLACEHOLDER, blob)

