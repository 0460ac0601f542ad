"""Report: what `shmmmu explore` does end to end: search, shrink, replay with a trace, and the counterexample's forms.

`run_explore(options)` resolves the scenario (by name, or the one that targets
a bug switch), searches with the chosen strategy (in this process, or through
the `searcher` the caller passes: workers/explore.py spreads a search over
processes), shrinks the first failing schedule, replays it with a trace and
returns a `Report`: text lines (the step table), an SVG, a JSON object and the
replay token.  `run_replay(token)` re-executes a token and says whether the
same steps and the same finding happened.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable

from shmmmu import validate
from shmmmu.variants import BUGS, DEFAULT_PROFILE, check_names
from shmmmu.explore import DEFAULT_EXECUTIONS
from shmmmu.explore.explain import Explained, explain
from shmmmu.explore.explorer import (Explorer, Result, SearchResult, Token, make_strategy, replay, same_failure,
                                     scenario_with, search, seed_points, shrink)
from shmmmu.explore.scenarios import SCENARIOS, Scenario, for_bug
from shmmmu.explore.split import split_search
from shmmmu.layout import TMeta

STRATEGIES = ("random", "pct", "dfs")


@dataclass
class ExploreOptions:
    scenario: str = ""                  # empty: the scenario that targets the first bug
    bugs: list[str] = field(default_factory=list)
    strategy: str = ""                  # empty: the scenario's
    seed: int = 1
    depth: int = 0                      # PCT depth (0: the scenario's)
    preemptions: int = 3                # DFS: the last bound (0, 1, ... up to it: iterative bounding)
    executions: int = DEFAULT_EXECUTIONS    # the search's budget (the same answer on any machine)
    time_limit: float = 0.0             # an optional cap in seconds (0: none): an answer that depends on speed
    mix_seed: int = 0
    atomic: list[str] = field(default_factory=list)    # functions whose operations are no scheduling points
    shrink: bool = True
    tracepoints: str = ""               # the counterexample's replay writes the kernel's tracepoint lines here
    with_fix: bool = False              # also run the counterexample's decisions with the bug switches off
    kernel: str = ""                    # the kernel profile; empty: the default, or the first bug's own profile

    def resolve(self) -> tuple[Scenario, str, int]:
        """The scenario, strategy and depth these options name; ValueError (one line) for bad ones."""
        for b in self.bugs:
            if b not in BUGS:
                raise ValueError(f"unknown bug {b!r}; known: {', '.join(BUGS)}")
        if not self.kernel:
            # a switch that exists in one profile only picks it (--bug mmu-seq-int-snapshot: 6.12)
            self.kernel = DEFAULT_PROFILE
            if self.bugs and DEFAULT_PROFILE not in BUGS[self.bugs[0]].profiles:
                self.kernel = BUGS[self.bugs[0]].profiles[0]
        check_names(list(self.bugs), self.kernel)
        validate.seed(self.mix_seed, "--mix-seed")
        for fn in self.atomic:                         # matched by name on the stack: a typo matches nothing
            if fn not in library_functions():
                raise ValueError(f"--atomic {fn}: no function of that name in the shmmmu library")
        if self.scenario:
            if self.scenario not in SCENARIOS:
                raise ValueError(f"unknown scenario {self.scenario!r}; known: {', '.join(SCENARIOS)}")
            sc = SCENARIOS[self.scenario]
        elif self.bugs:
            sc = for_bug(self.bugs[0])
        else:
            raise ValueError("name a scenario (--scenario NAME) or a bug switch (--bug NAME); --list shows them")
        if sc.name == "mix":
            sc = scenario_with("mix", {"seed": self.mix_seed})
        strategy = self.strategy or sc.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use random, pct or dfs")
        if self.seed < 0:
            raise ValueError("--seed must not be negative")
        if self.preemptions < 0 or self.preemptions > 6:
            raise ValueError("--preemptions must be between 0 and 6")
        if self.depth < 0 or self.depth > 10:
            raise ValueError("--depth must be between 1 and 10")
        if not 1 <= self.executions <= 100_000_000:
            raise ValueError("--executions must be between 1 and 100000000")
        if not math.isfinite(self.time_limit):
            raise ValueError(f"--time must be a finite number of seconds, not {self.time_limit}")
        if not 0 <= self.time_limit <= 1e6:
            raise ValueError("--time must be a number of seconds from 0 (no cap) to 1000000")
        return sc, strategy, self.depth or sc.depth

    def describe(self, strategy: str, depth: int) -> str:
        if strategy == "dfs":
            return f"dfs --preemptions {self.preemptions}"          # no seed: the search is the same for all
        s = {"pct": f"pct --depth {depth}", "random": "random"}[strategy]
        return f"{s} --seed {self.seed}"


@functools.cache
def library_functions() -> frozenset[str]:
    """The name of every function defined in the shmmmu package (methods and nested functions too), read
    from its sources: what --atomic may name."""
    names = set()
    for path in pathlib.Path(__file__).resolve().parent.parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
    return frozenset(names)


@dataclass
class Report:
    scenario: str
    bugs: list[str]
    strategy: str
    search: SearchResult
    found: Result | None = None         # the shrunk counterexample, traced
    shrink_runs: int = 0
    token: str = ""
    title: list[str] = field(default_factory=list)
    explained: Explained | None = None
    region: str = ""
    unfold: bool = False
    show_fix: bool = False              # --with-fix: the lines say what the fix does with the same decisions

    @property
    def ok(self) -> bool:
        return self.found is None

    def lines(self) -> list[str]:
        if self.found is None:
            s = self.search
            if s.exhausted:
                what = f"exhaustive at bound {s.bound_done}: every schedule within it ran ({s.executions} executions)"
            elif s.bound_done >= 0:
                what = (f"exhaustive at bound {s.bound_done} only; stopped by the {s.capped} limit after "
                        f"{s.executions} executions")
            else:
                what = f"stopped by the {s.capped} limit after {s.executions} executions" if s.capped else \
                    f"{s.executions} executions"
            if s.capped == "time":
                what += " (a time cap: another machine may go further)"
            return [f"shmmmu explore: {self.scenario}" + (f" with {', '.join(self.bugs)}" if self.bugs else "")
                    + f" by {self.strategy}: no finding; {what}; {s.seconds:.1f} s "
                    f"({s.per_second:.0f} executions/s, {s.steps / max(s.seconds, 1e-9):.0f} steps/s)"]
        e = self.explained
        out = e.table(self.title, self.unfold) + ["", f"replay: shmmmu explore --replay {self.token}"]
        if e.fix is not None and self.show_fix:
            out += ["", "the same decisions with the fix (--with-fix):"] + e.fix_lines(self.unfold)
        return out

    def svg(self) -> str:
        return self.explained.svg(self.title, self.unfold) if self.found is not None else ""

    def to_json(self) -> dict[str, Any]:
        s = self.search
        out: dict[str, Any] = {"scenario": self.scenario, "bugs": self.bugs, "strategy": self.strategy,
                               "executions": s.executions, "seconds": s.seconds,
                               "executions_per_s": s.per_second, "steps": s.steps,
                               "steps_per_s": s.steps / s.seconds if s.seconds else 0.0,
                               "exhausted": s.exhausted, "bound_done": s.bound_done, "reruns": s.reruns,
                               "capped": s.capped,
                               "result": "SUCCESS" if self.ok else "FAILURE"}
        if self.found is not None:
            f = self.found
            out.update({"found_after_executions": s.first_index + 1, "finding": dataclasses.asdict(f.finding),
                        "preemptions": f.preemptions, "steps_to_failure": f.steps, "shrink_runs": self.shrink_runs,
                        "token": self.token, "actors": f.actors,
                        "replay": f"shmmmu explore --replay {self.token}"})
            ex = self.explained.to_json()
            out["runs"] = ex.pop("steps")
            out.update(ex)
        return out


def _tm_level(explorer: Explorer) -> Callable[[int], int]:
    tm = explorer.region.array("tmeta")
    return lambda t: int(tm[t, TMeta.LEVEL]) if 0 <= t < tm.shape[0] else 0


def _explained(explorer: Explorer, switches: list[tuple[int, int, int]], with_fix: bool,
               tracepoints: str = "") -> Explained:
    """The counterexample recorded and explained; with `tracepoints` (a directory: shmmmu.mmu.tracepoints) its
    actors' Mmus also write the kernel's tracepoint lines, stamped with the step count."""
    return explain(explorer, switches, with_fix, tracepoints)


def _keep(explorer: Explorer, r: Result, keep: Callable[[Explorer], None]) -> None:
    """--keep: the region as the failing execution left it (the explanation ran other executions since),
    every end check run (a remembered verdict would leave the region before the destruction that found it)."""
    replay(explorer, r.switches, trace=True)
    _record_oracle_problems(explorer, r)
    keep(explorer)


def run_explore(opts: ExploreOptions, *, searcher: Callable[..., SearchResult] | None = None, progress: Callable[[int, float, int], None] | None = None,
                keep: Callable[[Explorer], None] | None = None) -> Report:
    """Search, shrink, trace.  `keep(explorer)` is called with the region at the failing step (--keep)."""
    sc, strategy, depth = opts.resolve()
    with Explorer(sc, opts.bugs, atomic=frozenset(opts.atomic), kernel=opts.kernel) as ex:
        if searcher is not None:
            sr = searcher(opts, sc, strategy, depth, ex, progress)
        elif strategy == "dfs":
            sr = split_search(ex, opts.preemptions, opts.executions, progress=progress, time_limit=opts.time_limit)
        else:
            seed_points(ex)
            sr = search(ex, make_strategy(strategy, opts.seed, depth, opts.preemptions, ex.points),
                        max_executions=opts.executions, time_limit=opts.time_limit, progress=progress)
        rep = Report(sc.name, list(opts.bugs), opts.describe(strategy, depth), sr, region=ex.name)
        if sr.first is None:
            return rep
        best, runs = (shrink(ex, sr.first) if opts.shrink else (replay(ex, sr.first.switches), 1))
        exp = _explained(ex, best.switches, opts.with_fix, opts.tracepoints)
        if not same_failure(exp.bug.rec.result.finding, best.finding):
            exp = _explained(ex, sr.first.switches, opts.with_fix, opts.tracepoints)
        traced = exp.bug.rec.result
        rep.found, rep.shrink_runs, rep.explained = traced, runs, exp
        rep.token = Token(sc.name, list(opts.bugs), dict(sc.params), traced.switches, list(opts.atomic),
                          traced.steps, traced.finding.kind, opts.kernel).encode()
        refs = ", ".join(f"{b}{' (' + BUGS[b].ref + ')' if BUGS[b].ref else ''}" for b in opts.bugs) or "the fixed code"
        rep.title = [f"shmmmu explore: scenario {sc.name} with {refs}, kernel {opts.kernel}",
                     f"{sc.summary}",
                     f"found by {rep.strategy} at execution {sr.first_index + 1} of its sequence ({sr.executions} "
                     f"executions run, {sr.seconds:.1f} s); "
                     f"shrunk in {runs} executions to {traced.preemptions} preemption"
                     f"{'s' if traced.preemptions != 1 else ''}, {traced.steps} steps"]
        if keep is not None:
            _keep(ex, traced, keep)
        return rep


def _record_oracle_problems(explorer: Explorer, r: Result) -> None:
    """Before a region is kept (--keep): what the end-of-execution oracles found goes into its violation record
    too, so that `shmmmu inspect` counts what `inspect --check` lists (the checkers' own are there already)."""
    if r.finding is None or r.finding.kind != "check":
        return
    from shmmmu import violations
    from shmmmu.checks import check_all
    from shmmmu.integrity import check_guest_memory
    for problem in [str(p) for p in check_all(explorer.vm)] + check_guest_memory(explorer.vm):
        kind = problem.split(":")[0].strip()
        violations.record(explorer.region, kind if kind in violations.KIND else "invariant", 0)


@dataclass
class ReplayReport:
    token: Token
    explained: Explained
    same: bool
    differences: list[str]
    unfold: bool = False
    show_fix: bool = False              # --with-fix: the lines say what the fix does with the same decisions

    @property
    def result(self) -> Result:
        return self.explained.bug.rec.result

    @property
    def with_fix(self) -> bool:
        return self.explained.fix is not None

    def title(self) -> list[str]:
        t, r = self.token, self.result
        title = [f"shmmmu explore --replay: scenario {t.scenario} with {', '.join(t.bugs) or 'the fixed code'}, "
                 f"kernel {t.kernel}",
                 ("the same execution: " if self.same else "A DIFFERENT EXECUTION: ")
                 + f"{r.steps} steps, {r.preemptions} preemptions, finding: {r.finding.kind if r.finding else 'none'}"]
        return title + [f"  {d}" for d in self.differences]

    def lines(self) -> list[str]:
        e = self.explained
        if e.fix is not None and self.show_fix:
            # --with-fix: the replay's verdict, then what the fix does with the same decisions
            return self.title() + [""] + e.fix_lines(self.unfold)
        if self.result.finding is None:
            return self.title()
        return e.table(self.title(), self.unfold)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        out = {"same": self.same, "differences": self.differences, "steps": r.steps,
               "finding": str(r.finding) if r.finding else None}
        ex = self.explained.to_json()
        out["runs"] = ex.pop("steps")
        out.update(ex)
        return out


def run_replay(text: str, keep: Callable[[Explorer], None] | None = None, tracepoints: str = "",
               with_fix: bool = False) -> ReplayReport:
    """Re-execute a token's schedule exactly, with a trace; say so if its steps or finding differ.  `with_fix`:
    also run the same decisions with the token's bug switches off."""
    t = Token.decode(text)
    for b in t.bugs:
        if b not in BUGS:
            raise ValueError(f"the token names a bug switch this shmmmu does not have: {b!r}")
    sc = scenario_with(t.scenario, t.params)
    with Explorer(sc, t.bugs, atomic=frozenset(t.atomic), kernel=t.kernel) as ex:
        exp = _explained(ex, t.switches, with_fix, tracepoints)
        r = exp.bug.rec.result
        diffs = []
        if r.diverged:
            diffs.append(f"the schedule diverged: {r.diverged}")
        if r.steps != t.steps:
            diffs.append(f"{r.steps} steps, the token recorded {t.steps}")
        kind = r.finding.kind if r.finding else ""
        if kind != t.finding:
            diffs.append(f"finding {kind or 'none'}, the token recorded {t.finding or 'none'}")
        if keep is not None and r.finding is not None:
            _keep(ex, r, keep)
        return ReplayReport(t, exp, not diffs, diffs)


def list_lines() -> list[str]:
    """`shmmmu explore --list`: every scenario, what it races, and the bug switches it targets."""
    out = []
    for s in SCENARIOS.values():
        out.append(f"{s.name:18s} {s.summary}")
        out.append(f"{'':18s} targets: {', '.join(s.targets) or '(any: a random mix)'}; lock mode {s.lock_mode}; "
                   f"default strategy {s.strategy}" + (f" --depth {s.depth}" if s.strategy == "pct" else ""))
    covered = {b for s in SCENARIOS.values() for b in s.targets}
    missing = [b for b in BUGS if b not in covered]
    if missing:
        out.append(f"bug switches no scenario targets: {', '.join(missing)}")
    return out
