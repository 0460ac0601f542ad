"""Explore: `shmmmu explore`: the deterministic interleaving explorer's search or replay, printed and drawn (shmmmu.exploration)."""
from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from shmmmu.explore import DEFAULT_EXECUTIONS
from shmmmu.workers.cli.common import app, fail_on, print_lines, running_a_vm


@app.command()
def explore(
    scenario: Annotated[str, typer.Option("--scenario", help="the scenario to explore (--list shows them).")] = "",
    bug: Annotated[list[str] | None, typer.Option("--bug", help="re-inject a fixed bug (repeatable); alone it "
                                                  "picks the scenario that targets it.")] = None,
    strategy: Annotated[str, typer.Option("--strategy", help="random, pct or dfs (default: the scenario's).")] = "",
    depth: Annotated[int, typer.Option("--depth", help="PCT's bug depth d (default: the scenario's).")] = 0,
    preemptions: Annotated[int, typer.Option("--preemptions", help="DFS: every schedule with 0 preemptions, "
                                             "then 1, ... up to this many (iterative bounding).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random and PCT strategies.")] = 1,
    executions: Annotated[int, typer.Option("--executions", "-n", help="the search's budget: stop after this "
                                            "many executions (the same answer on any machine).")
                          ] = DEFAULT_EXECUTIONS,
    time_limit: Annotated[float, typer.Option("--time", help="also stop after this many seconds (0: no cap); an "
                                              "answer cut by time depends on the machine's speed.")] = 0.0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="spread the search over N processes (same "
                                      "answer).")] = 1,
    mix_seed: Annotated[int, typer.Option("--mix-seed", help="the mix scenario's seed: which operations it "
                                          "races.")] = 0,
    atomic: Annotated[list[str] | None, typer.Option("--atomic", help="treat the operations inside this library "
                                                     "function as one step (no scheduling points): to see which "
                                                     "points a bug needs.")] = None,
    replay_token: Annotated[str, typer.Option("--replay", help="re-execute a counterexample from its "
                                              "token.")] = "",
    svg_file: Annotated[str, typer.Option("--svg", help="also draw the counterexample as swimlanes in this SVG "
                                          "file.")] = "",
    html_file: Annotated[str, typer.Option("--html", help="also write the counterexample as one self-contained "
                                           "HTML page: a cursor over every step, the tables at each step, the "
                                           "fix beside it.")] = "",
    with_fix: Annotated[bool, typer.Option("--with-fix", help="run the same decisions with the bug switches off: "
                                           "where the executions differ, and no finding (exit 0).")] = False,
    unfold: Annotated[bool, typer.Option("--unfold", help="show the setup steps the table folds into one "
                                         "line.")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="stop at the failing step and keep the region for shmmmu "
                                       "inspect until Ctrl-C.")] = False,
    no_shrink: Annotated[bool, typer.Option("--no-shrink", help="report the first failing schedule as "
                                            "found.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the scenarios and the bug switches each "
                                        "targets.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="the result as one JSON object on stdout.")] = False,
    coverage: Annotated[bool, typer.Option("--coverage", help="report the conflicting access pairs the search "
                                           "reached and in which orders, and the kernel functions it never ran "
                                           "(every scenario when none is named).")] = False,
    tracepoints: Annotated[str | None, typer.Option("--tracepoints", help="the counterexample's replay writes the "
                                                    "kernel's kvm/kvmmmu tracepoint lines to FILE (timestamps: "
                                                    "steps).")] = None,
) -> None:
    """Explore interleavings deterministically: find the bug's schedule, shrink it, replay it from one token.

    The actors (vCPUs, host operations, the reclaimer) run the library's real code in one process, one
    at a time; every shared-word operation is a scheduling point.  Exit 0: nothing found; 1: a finding;
    2: bad usage; 3: a replay that ran a different execution than its token recorded.  docs/explore.md
    has examples.
    """
    from shmmmu.exploration import ExploreRequest, explore, list_lines, prepare_explore
    from shmmmu.validate import UsageError
    from shmmmu.workers.explore import parallel_search

    if list_:
        print_lines(list_lines())
        return
    if coverage:
        from shmmmu.explore.coverage_report import coverage_command
        with fail_on(ValueError):
            raise typer.Exit(coverage_command(scenario, list(bug or []), strategy, preemptions, seed, depth,
                                              executions, jobs, json_out))
    req = ExploreRequest(scenario=scenario, bugs=list(bug or []), strategy=strategy, depth=depth,
                         preemptions=preemptions, seed=seed, executions=executions, time_limit=time_limit,
                         jobs=jobs, mix_seed=mix_seed, atomic=list(atomic or []), shrink=not no_shrink,
                         replay=replay_token, svg=svg_file, html=html_file, with_fix=with_fix, unfold=unfold,
                         tracepoints=tracepoints or "")
    with fail_on(ValueError):
        prepared = prepare_explore(req)
    shown = _SearchProgress(quiet=json_out)
    with running_a_vm(), prepared, fail_on(UsageError):     # the tracepoint parts merged inside
        found = explore(prepared, searcher=parallel_search, progress=shown, keep=_keep_here if keep else None)
        shown.end()
        if found.replay is not None:       # a replay says what it ran before its tracepoints are merged
            _show(found, json_out, req)
    if found.replay is None:
        _show(found, json_out, req)
    raise typer.Exit(found.status)


def _show(found, json_out: bool, req) -> None:
    import json
    if json_out:
        print(json.dumps(found.to_json()))
    else:
        print_lines(found.lines())
    for note in (found.draw(req.svg, req.unfold) if req.svg else None,
                 found.write_html(req.html) if req.html else None):
        if note:
            print(f"shmmmu: {note}", file=sys.stderr)


class _SearchProgress:
    """Executions, their rate and findings so far, over one line of a terminal's stderr, cleared at the end."""

    def __init__(self, quiet: bool) -> None:
        self.on = not quiet and sys.stderr.isatty()
        self.shown = False

    def __call__(self, n: int, secs: float, found: int) -> None:
        if self.on:
            print(f"\r{n} executions, {n / max(secs, 1e-9):.0f}/s, {found} findings   ", end="",
                  file=sys.stderr, flush=True)
            self.shown = True

    def end(self) -> None:
        if self.shown:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
            self.shown = False


def _keep_here(ex) -> None:
    """--keep: the region at the failing step stays, for `shmmmu inspect`, until Ctrl-C."""
    print(f"the region of the failing step is kept as VM {ex.name}: `shmmmu inspect {ex.name}`; "
          f"Ctrl-C to remove it", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
