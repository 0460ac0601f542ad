"""Exploration: `shmmmu explore` from its command line: checked, then a search or a token's replay, and its end.

The explorer is shmmmu.explore (`run_explore`, `run_replay`); this module
holds what the command adds around it: the options that cannot go together
(a replay runs its token's own search options), the output files checked
before the search, the directory the tracepoints are written to, a search
spread over processes when --jobs asks for more than one (the caller makes
that searcher: the library starts no processes), and what the command prints,
draws and exits with: 0 nothing found, 1 a finding, 3 a replay that ran
another execution than its token recorded.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

from shmmmu import outfile
from shmmmu.explore import DEFAULT_EXECUTIONS, html
from shmmmu.explore.explorer import Explorer, SearchResult
from shmmmu.explore.report import ExploreOptions, ReplayReport, Report, list_lines, run_explore, run_replay
from shmmmu.validate import UsageError

__all__ = ["EXIT_DIVERGED", "Exploration", "ExploreRequest", "PreparedExplore", "explore", "list_lines",
           "prepare_explore"]

EXIT_DIVERGED = 3          # a replay that ran another execution than its token recorded
MAX_JOBS = 64
# the search's options, which a replay takes from its token: (option, field of ExploreRequest)
SEARCH_OPTIONS = (("--scenario", "scenario"), ("--bug", "bugs"), ("--strategy", "strategy"), ("--depth", "depth"),
                  ("--preemptions", "preemptions"), ("--seed", "seed"), ("--executions", "executions"),
                  ("--time", "time_limit"), ("--jobs", "jobs"), ("--mix-seed", "mix_seed"), ("--atomic", "atomic"),
                  ("--no-shrink", "shrink"))


@dataclass
class ExploreRequest:
    """`shmmmu explore`'s command line as given (the defaults are the command's)."""
    scenario: str = ""
    bugs: list[str] = field(default_factory=list)
    strategy: str = ""
    depth: int = 0
    preemptions: int = 3
    seed: int = 1
    executions: int = DEFAULT_EXECUTIONS
    time_limit: float = 0.0
    jobs: int = 1
    mix_seed: int = 0
    atomic: list[str] = field(default_factory=list)
    shrink: bool = True
    replay: str = ""                    # a token: re-execute it instead of searching
    svg: str = ""                       # draw the counterexample here
    html: str = ""                      # the counterexample as one self-contained page here
    with_fix: bool = False              # also run the counterexample's decisions with its bug switches off
    unfold: bool = False                # show the setup steps instead of folding them
    tracepoints: str = ""               # the counterexample's replay writes its tracepoint lines here

    def search_options_given(self) -> list[str]:
        """The search options given other than at their defaults."""
        default = ExploreRequest()
        return [option for option, name in SEARCH_OPTIONS if getattr(self, name) != getattr(default, name)]

    def options(self, tracepoints: str) -> ExploreOptions:
        return ExploreOptions(scenario=self.scenario, bugs=list(self.bugs), strategy=self.strategy, seed=self.seed,
                              depth=self.depth, preemptions=self.preemptions, executions=self.executions,
                              time_limit=self.time_limit, mix_seed=self.mix_seed, atomic=list(self.atomic),
                              shrink=self.shrink, tracepoints=tracepoints, with_fix=self.with_fix or bool(self.html))


class PreparedExplore:
    """A request checked, with the directory its tracepoint parts go to (empty: none); leaving it (`with`)
    merges the parts into the --tracepoints file, however the exploration ended."""

    def __init__(self, request: ExploreRequest, tracepoints: str, stack: ExitStack):
        self.request = request
        self.tracepoints = tracepoints
        self._stack = stack

    def __enter__(self) -> PreparedExplore:
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)


def prepare_explore(req: ExploreRequest) -> PreparedExplore:
    """What is checked before anything runs: --jobs, the options a replay cannot take, the output files (so a
    bad path is one line before a long search).  A ValueError carries the one line to say."""
    from shmmmu.mmu.tracepoints import tracepoint_parts
    if not 1 <= req.jobs <= MAX_JOBS:
        raise UsageError(f"--jobs must be between 1 and {MAX_JOBS}")
    if req.replay:
        given = req.search_options_given()
        if given:
            raise UsageError(f"--replay runs the token's own scenario, switches and schedule: {', '.join(given)} "
                             f"cannot go with it")
    for path in (req.svg, req.html):
        if path:
            outfile.check(path)
    stack = ExitStack()
    parts = stack.enter_context(tracepoint_parts(req.tracepoints)) if req.tracepoints else ""
    return PreparedExplore(req, parts, stack)


@dataclass
class Exploration:
    """What an exploration ended with: a search's report, or a replay's (`with_fix`: the replay's verdict is the
    fix's)."""
    search: Report | None = None
    replay: ReplayReport | None = None
    with_fix: bool = False
    command: str = ""

    @property
    def status(self) -> int:
        if self.replay is not None:
            if not self.replay.same:
                return EXIT_DIVERGED
            if self.with_fix:
                # what is asked is the fix's verdict: a finding with the fix is a bug of shmmmu (said loudly)
                return 1 if self.replay.explained.fix.rec.result.finding is not None else 0
            return 1 if self.replay.result.finding is not None else 0
        return 0 if self.search.ok else 1

    def lines(self) -> list[str]:
        return self.replay.lines() if self.replay is not None else self.search.lines()

    def to_json(self) -> dict[str, Any]:
        return self.search.to_json() if self.replay is None else self.replay.to_json()

    def _explained(self, what: str, path: str):
        """The counterexample and its title, or the sentence that says why nothing was written."""
        if self.replay is not None:
            r = self.replay
            if r.result.finding is None:
                return None, f"the replay found nothing: no {what} written to {path}"
            return (r.explained, r.title(), r.token.encode()), None
        if self.search.found is None:
            return None, f"no finding: no {what} written to {path}"
        s = self.search
        return (s.explained, s.title, s.token), None

    def draw(self, path: str, unfold: bool = False) -> str | None:
        """Write the counterexample's swimlanes to `path` as SVG; with nothing found, the sentence that says
        no picture was written (None: it was)."""
        got, why = self._explained("picture", path)
        if got is None:
            return why
        e, title, _ = got
        outfile.write(path, e.svg(title, unfold))
        return None

    def write_html(self, path: str) -> str | None:
        """Write the counterexample as one self-contained HTML page (the with-fix execution beside it)."""
        got, why = self._explained("page", path)
        if got is None:
            return why
        e, title, token = got
        outfile.write(path, html.page(e, title, token, self.command))
        return None


def explore(prepared: PreparedExplore, searcher: Callable[[int], Callable[..., SearchResult]] | None = None,
            progress: Callable[[int, float, int], None] | None = None,
            keep: Callable[[Explorer], None] | None = None) -> Exploration:
    """The search the request asks for, or its token's replay.  `searcher(jobs)` makes a search spread over
    that many processes (asked for only with --jobs above 1); `progress(executions, seconds, findings)`;
    `keep(explorer)` is called with the region at the failing step (--keep).  Options the explorer refuses
    (an unknown scenario, a bad token) are a UsageError."""
    req = prepared.request
    if req.replay:
        try:
            r = run_replay(req.replay, keep=keep, tracepoints=prepared.tracepoints,
                           with_fix=req.with_fix or bool(req.html))
        except ValueError as e:
            raise UsageError(str(e)) from e
        r.unfold, r.show_fix = req.unfold, req.with_fix
        return Exploration(replay=r, with_fix=req.with_fix, command=command_of(req))
    opts = req.options(prepared.tracepoints)
    try:
        opts.resolve()
    except ValueError as e:
        raise UsageError(str(e)) from e
    spread = searcher(req.jobs) if searcher is not None and req.jobs > 1 else None
    rep = run_explore(opts, searcher=spread, progress=progress, keep=keep)
    rep.unfold, rep.show_fix = req.unfold, req.with_fix
    return Exploration(search=rep, command=command_of(req))


def command_of(req: ExploreRequest) -> str:
    """The command line that makes this counterexample (for the page's header)."""
    if req.replay:
        return f"shmmmu explore --replay {req.replay}" + (" --with-fix" if req.with_fix else "")
    words = ["shmmmu explore"]
    for option, name in SEARCH_OPTIONS:
        value, default = getattr(req, name), getattr(ExploreRequest(), name)
        if value == default:
            continue
        if option == "--no-shrink":
            words.append(option)
        elif isinstance(value, list):
            words += [f"{option} {v}" for v in value]
        else:
            words.append(f"{option} {value}")
    return " ".join(words)
