"""Explain: a counterexample recorded, its decisive steps marked, and the same decisions run with the fix.

`explain(explorer, switches)` records the failing execution with its state
at every step (shmmmu.explore.recorder), marks the steps that matter
(shmmmu.explore.decisive), says the violation in words and, with `with_fix`,
runs the same decisions with the bug switches off in a second explorer and
finds where the two executions first differ.  `Explained` is what every form
of the counterexample is drawn from: the text table, the SVG, the JSON and the
HTML page (shmmmu.explore.html).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shmmmu.explore import decisive as dec
from shmmmu.explore import render
from shmmmu.explore.explorer import Explorer
from shmmmu.explore.recorder import Divergence, Recording, first_difference, record


@dataclass
class Side:
    """One execution as the outputs show it."""

    rec: Recording
    describe: render.Describer
    marks: dec.Marks
    rows: list[render.StepRow]

    @classmethod
    def of(cls, rec: Recording, marks: dec.Marks | None = None) -> "Side":
        d = render.Describer.of(rec)
        m = marks or dec.Marks()
        return cls(rec, d, m, render.step_rows(rec.log, d, rec.actors, m))


@dataclass
class Explained:
    """A failing execution explained, and (with_fix) the same decisions with the fix."""

    bug: Side
    bugs: list[str]
    fix: Side | None = None
    divergence: Divergence | None = None
    notes: list[str] = field(default_factory=list)        # what the with-fix run says of the decisions

    @property
    def actors(self) -> list[str]:
        return self.bug.rec.actors

    # ---------------------------------------------------------------- words

    def sentences(self) -> list[str]:
        """The finding in words: each recorded violation's sentence with the step that recorded it, else the
        finding's own message (an oracle's problems, a crash, a deadlock are sentences already)."""
        rec = self.bug.rec
        f = rec.result.finding
        if f is None:
            return []
        out = []
        if rec.violations:
            at = [s for s in rec.log if s.function.startswith("violations.py:")]
            for k, v in enumerate(rec.violations[:3]):
                where = f" (recorded by {rec.who(v.worker)} at step {at[0].index})" if at and k == 0 else ""
                out.append(v.sentence(rec.who, rec.entries) + where)
        elif f.kind != "check":
            out.append(f.message)
        out += self.story()
        return out

    def story(self) -> list[str]:
        """The decisive steps in one sentence per preemption: who did what to which words before whom."""
        m, rec, d = self.bug.marks, self.bug.rec, self.bug.describe
        log, names = rec.log, rec.actors
        out = []
        by_pre: dict[int, list[dec.Pair]] = {}
        for p in m.pairs:
            by_pre.setdefault(p.preemption, []).append(p)
        for pre, pairs in by_pre.items():
            a, b = names[pairs[0].first.actor], names[pairs[0].later.actor]
            ys = ", ".join(f"{d.word(p.later.section, p.later.word)} (step {p.later.index})" for p in pairs)
            fns = " and ".join(sorted({render.kernel_name(p.first.function) for p in pairs}))
            never = all(p.first_pos is None for p in pairs)
            out.append(f"why: {b} preempted {a} at step {log[pre].index}; then {b} {_verb(p.later for p in pairs)} "
                       f"{ys} before {a}'s {fns} {_verb((p.first for p in pairs), 'infinitive')} "
                       f"{'it' if len(pairs) == 1 else 'them'}"
                       + (f"; {a} never did: it was still stopped when the check fired" if never else
                          f"; {a} did only after, at step "
                          + ", ".join(str(log[p.first_pos].index) for p in pairs if p.first_pos is not None))
                       + f". Without the preemption {a} comes first.")
        for src, read in m.sources:
            out.append(f"why: {names[log[read].actor]}'s check at step {log[read].index} read "
                       f"{d.word(log[read].section, log[read].word)}, which {names[log[src].actor]} wrote at step "
                       f"{log[src].index} ({d.op(log[src])})")
        return out

    def decisive_line(self) -> str:
        """The decisive pair in one line (docs/explore.md lists it for every switch)."""
        m, rec, d = self.bug.marks, self.bug.rec, self.bug.describe
        log, names = rec.log, rec.actors
        if m.pairs:
            p = m.pairs[0]
            first = (f"step {log[p.first_pos].index}" if p.first_pos is not None
                     else f"never run: stopped at step {log[p.preemption].index}")
            more = (f"; and {len(m.pairs) - 1} more on " + ", ".join(d.word(q.later.section, q.later.word)
                                                                    for q in m.pairs[1:])) if len(m.pairs) > 1 else ""
            return (f"decisive pair: {names[p.later.actor]}'s {d.step(p.later)} (step {p.later.index}) before "
                    f"{names[p.first.actor]}'s {d.step(p.first)} ({first}){more}")
        if m.sources:
            src, read = m.sources[0]
            return (f"decisive pair: {names[log[src].actor]}'s {d.step(log[src])} (step {log[src].index}), read by "
                    f"{names[log[read].actor]}'s check {d.step(log[read])} (step {log[read].index}); no preemption "
                    f"reordered it")
        pre = rec.result.preemptions
        return (f"decisive pair: none: {'no preemption' if not pre else 'no reordered access the check read'}; the "
                f"order without {'any switch' if not pre else 'them'} fails, so the bug is in one actor's own steps")

    def finding_lines(self) -> list[str]:
        f = self.bug.rec.result.finding
        return [str(f)] + self.sentences() + [self.decisive_line()] if f is not None else ["no finding"]

    # ---------------------------------------------------------------- forms

    def table(self, title: list[str], unfold: bool = False) -> list[str]:
        b = self.bug
        return render.table_lines(title, b.rows, b.rec.actors, self.finding_lines(),
                                  None if unfold else b.marks.fold, legend=_legend(b.marks))

    def svg(self, title: list[str], unfold: bool = False) -> str:
        b = self.bug
        return render.svg(title, b.rows, b.rec.actors, self.finding_lines(), None if unfold else b.marks.fold)

    def fix_lines(self, unfold: bool = False) -> list[str]:
        """`--with-fix`: the decisions placed, the first difference, the fix's table and its verdict."""
        if self.fix is None:
            return []
        fx, bug = self.fix.rec, self.bug.rec
        off = ", ".join(self.bugs) or "no switch"
        bf = bug.result.finding
        out = [f"with the fix ({off} off), the same decisions: {fx.result.steps} steps, {fx.result.preemptions} "
               f"preemption{'s' if fx.result.preemptions != 1 else ''}; with the bug: {bug.result.steps} steps, "
               f"{bf.kind + ' at step ' + str(bf.step) if bf else 'no finding'}"]
        out += self.notes
        out.append(self.divergence_line())
        out.append("")
        finding = fx.result.finding
        verdict = (["no finding with the fix: the same decisions end cleanly"] if finding is None else
                   [f"!!! THE FIXED CODE FAILS UNDER THE SAME DECISIONS: {finding}",
                    "this is a bug of shmmmu (its MMU, a checker or the explorer), not of the kernel's fix: "
                    "please report it with the replay token"])
        out += render.table_lines([f"the execution with the fix ({off} off):"], self.fix.rows, fx.actors, verdict,
                                  None if unfold else self.fix.marks.fold, legend=_legend(self.fix.marks))
        return out

    def divergence_line(self) -> str:
        d = self.divergence
        if d is None or d.position < 0:
            return "the two executions take the same steps"
        names = self.actors

        def side(s, describe) -> str:
            if s is None:
                return "nothing (it has ended)"
            return f"{names[s.actor]} in {render.kernel_name(s.function)} ({describe.op(s)})"
        step = (d.bug or d.fix).index
        return (f"the executions first differ at step {step}: with the bug {side(d.bug, self.bug.describe)}; with "
                f"the fix {side(d.fix, self.fix.describe)}")

    def to_json(self) -> dict[str, Any]:
        b = self.bug
        out: dict[str, Any] = {
            "violations": [v.to_json(b.rec.who, b.rec.entries) for v in b.rec.violations],
            "sentences": self.sentences(),
            "decisive": [{"preemption_step": b.rec.log[p.preemption].index, "later_step": p.later.index,
                          "later": b.describe.step(p.later),
                          "first_step": b.rec.log[p.first_pos].index if p.first_pos is not None else None,
                          "first": b.describe.step(p.first)} for p in b.marks.pairs],
            "marks": [{"step": b.rec.log[k].index, "position": k, "mark": v, "note": b.marks.note.get(k, "")}
                      for k, v in sorted(b.marks.mark.items())],
            "fold": [b.rec.log[k].index for k in b.marks.fold] if b.marks.fold else None,
            "steps": render.rows_json(b.rows, b.rec.actors)}
        if self.fix is not None:
            d = self.divergence
            f = self.fix.rec.result.finding
            out["with_fix"] = {"bugs_off": self.bugs, "steps": self.fix.rec.result.steps,
                               "finding": str(f) if f else None, "notes": self.notes,
                               "first_difference": self.divergence_line(),
                               "first_difference_step": (d.bug or d.fix).index if d and d.position >= 0 else None}
        return out


def _verb(steps, form: str = "past") -> str:
    """What steps did to their words: read, wrote, or read and wrote."""
    kinds = {dec.is_write(s) for s in steps}
    if kinds == {False}:
        return "read"
    if kinds == {True}:
        return "wrote"
    return "read and wrote" if form == "past" else "touched"


def _legend(m: dec.Marks) -> dict[str, str]:
    used = set(m.mark.values())
    return {k: v for k, v in dec.MARKS.items() if k in used}


def explain(explorer: Explorer, switches: list[tuple[int, int, int]], with_fix: bool = False,
            tracepoints: str = "") -> Explained:
    """Record `switches` on `explorer` (its bug switches on), mark it, and with `with_fix` run the same
    decisions with every switch off.  `tracepoints`: the recorded execution alone writes the kernel's
    tracepoint lines there (the other executions the marking runs write none)."""
    explorer.config.tracepoints = tracepoints
    try:
        rec = record(explorer, switches)
    finally:
        explorer.config.tracepoints = ""
    describe = render.Describer.of(rec)
    marks = dec.decisive(explorer, rec, describe) if rec.result.finding is not None else dec.Marks()
    if rec.result.finding is None:
        marks.fold = dec.fold(rec.log, marks)
    out = Explained(Side(rec, describe, marks, render.step_rows(rec.log, describe, rec.actors, marks)),
                    list(explorer.bugs))
    if with_fix:
        with Explorer(explorer.scenario, [], atomic=explorer.atomic, kernel=explorer.kernel) as fx:
            fixed = record(fx, None, rec.anchors)
        out.divergence = first_difference(rec.log, fixed.log)
        fm = dec.Marks()
        for step, anchor, actor in fixed.placed:
            src = next((st for st, a, _ in rec.placed if a == anchor), None)
            first = next((k for k, s in enumerate(fixed.log) if s.index > step), len(fixed.log) - 1)
            fm.put(first, "P", f"the same decision as the bug's at step {src}: {rec.actors[actor]} runs "
                               f"{_anchor_words(rec, anchor, describe)}")
        if out.divergence.position >= 0:
            fm.put(min(out.divergence.position, len(fixed.log) - 1), "≠",
                   "the first step that differs from the bug's execution")
        fm.fold = dec.fold(fixed.log, fm)
        out.fix = Side.of(fixed, fm)
        for anchor in fixed.unplaced:
            out.notes.append(f"a decision of the bug's execution has no counterpart with the fix (the default "
                             f"order ran there): {_anchor_words(rec, anchor, describe)}")
        for step, anchor, actor in fixed.placed:
            src = next((s for s, a, _ in rec.placed if a == anchor), None)
            out.notes.append(f"the switch to {rec.actors[actor]} {_anchor_words(rec, anchor, describe)} (step {src} "
                             f"with the bug) is made at step {step}")
    return out


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _anchor_words(rec: Recording, anchor: tuple, describe: render.Describer) -> str:
    """An anchor in words: after which operation of which actor the switch is made."""
    actor, last, kind, j = anchor
    if actor < 0 or not last:
        return "at the start" if actor < 0 else f"before {rec.actors[actor]}'s first step"
    rw, section, word, n = last
    what = f"{'write of' if rw == 'w' else 'read of'} {describe.word(section, word)}"
    times = "" if n == 1 else f" (the {_ordinal(n)} time)"
    when = "" if kind == "p" else " once it waits"
    return f"after {rec.actors[actor]}'s {what}{times}{when}"
