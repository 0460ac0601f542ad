"""Results: a campaign's directory (its plan, a JSON line per finished task) and the summary made from it.

    DIR/plan.json       the tasks, as planned (what --resume runs again)
    DIR/results.jsonl   one JSON object per finished task, appended as it arrives (the last line of an id wins)
    DIR/summary.txt     the summary printed at the end

A line holds the task's id, kind, switch, kernel profile and command line
(`args`), then its verdict -- found (a checker fired: a finding), clean,
hung (stopped at its wall cap: never a finding) or lost (failed twice
without a verdict: never a finding) -- the first violation's kind and text,
the replay (a command, or explore's token), the time to detect (seconds into
a stress run, executions into a search), and how it ran: seconds, worker,
attempts.  Of these, `first`, `detect`, `time`, `worker` and `attempts`
depend on the machine and the run (a stress run's races are timed by the
scheduler); the rest is the same on any machine for a DFS search, and for a
stress run whose verdict the seed makes reliable.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

VERDICTS = ("found", "clean", "hung", "lost")
RUN_FIELDS = ("first", "detect", "time", "worker", "attempts")    # what depends on the machine and the run


def _kind_of(problem: str) -> str:
    return problem.split(":")[0].strip("! ").strip()


def outcome_of_stress(report: dict[str, Any]) -> dict[str, Any]:
    """What a `shmmmu stress --json` report says, as a result line's fields."""
    if report.get("result") == "SUCCESS":
        return {"verdict": "clean", "violation": None, "first": None, "replay": None, "detect": None}
    first = report["problems"][0] if report.get("problems") else "FAILURE"
    return {"verdict": "found", "violation": _kind_of(first), "first": first, "replay": report.get("replay"),
            "detect": {"seconds": report.get("first_violation_s")}}


def outcome_of_explore(report: dict[str, Any]) -> dict[str, Any]:
    """What a `shmmmu explore --json` report (or its Report.to_json()) says, as a result line's fields."""
    if report.get("result") == "SUCCESS":
        return {"verdict": "clean", "violation": None, "first": None, "replay": None, "detect": None,
                "executions": report.get("executions"), "capped": report.get("capped") or None}
    f = report["finding"]
    kind = _kind_of(f["message"]) if f["kind"] in ("violation", "check") else f["kind"]
    return {"verdict": "found", "violation": kind, "first": f"{f['kind']}: {f['message']}",
            "replay": report.get("replay"), "detect": {"executions": report.get("found_after_executions")},
            "executions": report.get("executions"), "capped": None}


class ResultsDir:
    """A campaign directory: the plan written once, result lines appended (and flushed) as they arrive."""

    def __init__(self, path: str):
        self.path = path
        self.plan_file = os.path.join(path, "plan.json")
        self.lines_file = os.path.join(path, "results.jsonl")
        self.summary_file = os.path.join(path, "summary.txt")

    def create(self, plan: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
        os.makedirs(self.path, exist_ok=True)
        with open(self.plan_file, "x") as f:
            json.dump({"version": 1, "plan": plan, "tasks": tasks}, f, indent=1)
            f.write("\n")

    def read_plan(self) -> dict[str, Any]:
        with open(self.plan_file) as f:
            return json.load(f)

    def lines(self) -> dict[str, dict[str, Any]]:
        """Each task's last line (a torn last line, from a campaign killed mid-write, is skipped)."""
        out: dict[str, dict[str, Any]] = {}
        try:
            with open(self.lines_file) as f:
                for text in f:
                    try:
                        d = json.loads(text)
                    except ValueError:
                        continue
                    if isinstance(d, dict) and "id" in d:
                        out[d["id"]] = d
        except FileNotFoundError:
            pass
        return out

    def append(self, line: dict[str, Any]) -> None:
        with open(self.lines_file, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def write_summary(self, text: list[str]) -> None:
        with open(self.summary_file, "w") as f:
            f.write("\n".join(text) + "\n")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of a non-empty list."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


@dataclass
class Row:
    kind: str
    switch: str
    profile: str
    total: int = 0
    found: int = 0
    hung: int = 0
    lost: int = 0
    detect: list[float] = field(default_factory=list)
    unit: str = "s"


def _detect(line: dict[str, Any]) -> tuple[float, str] | None:
    d = line.get("detect") or {}
    if d.get("seconds") is not None:
        return float(d["seconds"]), "s"
    if d.get("executions") is not None:
        return float(d["executions"]), "ex"
    return None


def _fmt(v: float, unit: str) -> str:
    return f"{v:.2f} s" if unit == "s" else f"{v:.0f} ex"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]


def summary(lines: Iterable[dict[str, Any]], planned: int, seconds: float, workers: int,
            cancelled: int = 0) -> list[str]:
    """The summary: per kind, switch and profile, detected in N of M and the time to detect (median, p90);
    then every finding's replay."""
    lines = list(lines)
    rows: dict[tuple[str, str, str], Row] = {}
    for ln in lines:
        key = (ln["kind"], ln.get("switch") or "none", ln["profile"])
        r = rows.setdefault(key, Row(*key))
        r.total += 1
        r.found += ln["verdict"] == "found"
        r.hung += ln["verdict"] == "hung"
        r.lost += ln["verdict"] == "lost"
        d = _detect(ln) if ln["verdict"] == "found" else None
        if d is not None:
            r.detect.append(d[0])
            r.unit = d[1]
    counts = {v: sum(ln["verdict"] == v for ln in lines) for v in VERDICTS}
    out = [f"campaign: {len(lines)} of {planned} tasks finished in {seconds:.1f} s on {workers} worker"
           f"{'s' if workers != 1 else ''}: " + ", ".join(f"{n} {v}" for v, n in counts.items())
           + (f"; {cancelled} cancelled" if cancelled else "")]
    table = []
    for r in rows.values():
        med = _fmt(statistics.median(r.detect), r.unit) if r.detect else "-"
        p90 = _fmt(percentile(r.detect, 0.9), r.unit) if r.detect else "-"
        table.append([r.kind, r.switch, r.profile, f"{r.found} of {r.total}", med, p90,
                      str(r.hung), str(r.lost)])
    if table:
        out += [""] + _table(["kind", "switch", "kernel", "detected", "median", "p90", "hung", "lost"], table)
    found = [ln for ln in lines if ln["verdict"] == "found"]
    if found:
        out += ["", f"findings ({len(found)}):"]
        for ln in found:
            out.append(f"  {ln['id']}: {ln.get('violation')}")
            out.append(f"    replay: {ln.get('replay') or 'shmmmu ' + ' '.join(ln['args'])}")
    for ln in lines:
        if ln["verdict"] in ("hung", "lost"):
            out.append(f"{ln['verdict']}: {ln['id']}: {ln.get('first') or ''}".rstrip())
    return out
