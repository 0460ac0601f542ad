"""Crosscheck: the reduced search against plain enumeration within one preemption bound: the same findings, the
same final states.

The explorer's searches make two reductions: decisions only before operations on
conflicting words (strategy.py), and bounded partial-order reduction (races ask
for the alternatives; BPOR's conservative backtracking points).  Both are sound
only if no schedule within the bound reaches a state or a finding that no
schedule they explore reaches.  `crosscheck` shows it for one scenario and
bound: it runs every schedule within the bound with a decision at every
scheduling point and no reduction, then the reduced search, and compares the
sets of distinct findings and of final states (a digest of the tables and
everything the MMU keeps about them, Explorer.state_digest).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from shmmmu.explore.explorer import Explorer, same_failure
from shmmmu.explore.split import split_search
from shmmmu.explore.scenarios import Scenario
from shmmmu.explore.strategy import DfsStrategy


def finding_key(r) -> str:
    """A finding by kind and first problem (what same_failure compares); "" for none."""
    f = r.finding
    return "" if f is None else f"{f.kind}: {f.message.split(':')[0]}"


@dataclass
class Enumeration:
    executions: int = 0
    exhausted: bool = False
    findings: set[str] = field(default_factory=set)
    states: set[str] = field(default_factory=set)


def enumerate_schedules(explorer: Explorer, bound: int, reduce: bool, budget: int) -> Enumeration:
    """Every schedule within `bound` preemptions (reduced: the search explore runs, shmmmu.explore.split; or
    with a decision at every point and no reduction), at most `budget` executions, without stopping at a
    finding; the findings and final states they reached."""
    out = Enumeration()
    if reduce:
        def observe(r) -> None:
            out.findings.add(finding_key(r))
            if r.state:
                out.states.add(r.state)
        sr = split_search(explorer, bound, budget, first_bound=bound, observe=observe, stop=False)
        out.executions, out.exhausted = sr.executions, sr.exhausted
        return out
    dfs = DfsStrategy(bound, None, first_bound=bound, iterate=False, reduce=False)
    for i in range(budget):
        r = explorer.execute(dfs, i, state=True)
        out.executions += 1
        out.findings.add(finding_key(r))
        if r.state:
            out.states.add(r.state)
        if not r.more:
            out.exhausted = True
            break
    return out


@dataclass
class Crosscheck:
    scenario: str
    bound: int
    plain: Enumeration
    reduced: Enumeration

    @property
    def complete(self) -> bool:
        return self.plain.exhausted and self.reduced.exhausted

    @property
    def agree(self) -> bool:
        return self.plain.findings == self.reduced.findings and self.plain.states == self.reduced.states

    def lines(self) -> list[str]:
        p, r = self.plain, self.reduced
        out = [f"{self.scenario} at bound {self.bound}: plain {p.executions} executions"
               f"{'' if p.exhausted else ' (cut)'}, {len(p.states)} final states, findings {sorted(p.findings)}; "
               f"reduced {r.executions}{'' if r.exhausted else ' (cut)'}, {len(r.states)} final states, "
               f"findings {sorted(r.findings)}: " + ("the same" if self.agree else "DIFFERENT")]
        if not self.agree:
            out.append(f"  only plain: findings {sorted(p.findings - r.findings)}, "
                       f"{len(p.states - r.states)} states; only reduced: findings {sorted(r.findings - p.findings)}, "
                       f"{len(r.states - p.states)} states")
        return out


def crosscheck(scenario: Scenario, bugs: list[str], bound: int, budget: int = 200_000) -> Crosscheck:
    """Plain enumeration and the reduced search of one scenario within `bound`, each on a fresh explorer."""
    with Explorer(scenario, bugs) as ex:
        plain = enumerate_schedules(ex, bound, False, budget)
    with Explorer(scenario, bugs) as ex:
        reduced = enumerate_schedules(ex, bound, True, budget)
    return Crosscheck(scenario.name, bound, plain, reduced)


__all__ = ["Crosscheck", "Enumeration", "crosscheck", "enumerate_schedules", "finding_key", "same_failure"]
