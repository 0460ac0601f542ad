"""Coverage report: `shmmmu explore --coverage`: a search per scenario with coverage on, and what it reached."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shmmmu.explore.coverage import Coverage, kernel_functions, never_ran
from shmmmu.explore.explorer import Explorer, make_strategy, search, seed_points
from shmmmu.explore.scenarios import SCENARIOS


@dataclass
class ScenarioCoverage:
    scenario: str
    strategy: str
    executions: int
    exhausted: bool
    finding: str
    summary: dict[str, int]
    rows: list[dict[str, Any]]
    ran: set = field(repr=False, default_factory=set)


def cover(scenario: str, bugs: list[str], strategy: str, preemptions: int, seed: int, depth: int,
          executions: int) -> ScenarioCoverage:
    """One scenario's search (the strategy and budget a search would use) with coverage recorded."""
    sc = SCENARIOS[scenario]
    name = strategy or sc.strategy
    with Explorer(sc, bugs) as ex:
        ex.coverage = Coverage()
        seed_points(ex)
        strat = make_strategy(name, seed, depth or sc.depth, preemptions, points=ex.points)
        r = search(ex, strat, max_executions=executions)
        cov = ex.coverage
        described = f"dfs --preemptions {preemptions}" if name == "dfs" else f"{name} --seed {seed}"
        finding = str(r.first.finding) if r.first is not None else ""
        return ScenarioCoverage(scenario, described, cov.executions, r.exhausted, finding, cov.summary(),
                                cov.rows(), set(cov.ran))


def coverage_report(scenarios: list[str], bugs: list[str], strategy: str, preemptions: int, seed: int,
                    depth: int, executions: int) -> dict[str, Any]:
    """Per scenario: the pairs, their orders, the functions it never ran; over all: those no scenario ran."""
    universe = kernel_functions(bugs)
    per = [cover(s, bugs, strategy, preemptions, seed, depth, executions) for s in scenarios]
    ran_any: set = set().union(*(c.ran for c in per)) if per else set()
    return {
        "scenarios": [{"scenario": c.scenario, "strategy": c.strategy, "executions": c.executions,
                       "exhausted": c.exhausted, "finding": c.finding, **c.summary, "pairs_list": c.rows,
                       "never_ran": never_ran(universe, c.ran)}
                      for c in per],
        "kernel_functions": len(universe),
        "never_ran_by_any": never_ran(universe, ran_any),
    }


def coverage_lines(report: dict[str, Any], detail: bool) -> list[str]:
    """The report as text: a table per scenario (with `detail`, every pair), then the functions no scenario ran."""
    out = []
    if detail:
        for s in report["scenarios"]:
            out.append(f"scenario {s['scenario']} ({s['strategy']}, {s['executions']} executions"
                       f"{', exhaustive' if s['exhausted'] else ''}): {s['pairs']} conflicting pairs, "
                       f"{s['both_orders']} reached in both orders, {s['one_order']} in one order only")
            if s["finding"]:
                out.append(f"  (the search stopped at a finding: {s['finding']})")
            w = max((len(r["first"]) for r in s["pairs_list"]), default=5)
            for r in s["pairs_list"]:
                mark = "  " if r["orders"] == "both" else "! "
                out.append(f"{mark}{r['section']:9} {r['first']:{w}}  {r['second']}   [{r['orders']}]")
            if s["never_ran"]:
                out.append(f"  kernel functions this scenario never ran ({len(s['never_ran'])}): "
                           + ", ".join(n.split(":")[1] for n in s["never_ran"]))
            out.append("")
    else:
        out.append("| scenario | search | executions | pairs | both orders | one order only | kernel functions run |")
        out.append("|---|---|---|---|---|---|---|")
        n = report["kernel_functions"]
        for s in report["scenarios"]:
            out.append(f"| {s['scenario']} | {s['strategy']}{' (exhaustive)' if s['exhausted'] else ''} | "
                       f"{s['executions']} | {s['pairs']} | {s['both_orders']} | {s['one_order']} | "
                       f"{n - len(s['never_ran'])} of {n} |")
        out.append("")
    never = report["never_ran_by_any"]
    out.append(f"kernel functions no scenario ran ({len(never)} of {report['kernel_functions']}): "
               + (", ".join(never) if never else "none"))
    return out


def coverage_command(scenario: str, bugs: list[str], strategy: str, preemptions: int, seed: int, depth: int,
                     executions: int, jobs: int, as_json: bool) -> int:
    """`shmmmu explore --coverage`: print the report (ValueError: bad usage, one line)."""
    import json
    from shmmmu.variants import check_names
    if jobs != 1:
        raise ValueError("--coverage runs in one process: leave out --jobs")
    if scenario and scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (--list shows them)")
    if strategy not in ("", "dfs", "pct", "random"):
        raise ValueError(f"unknown strategy {strategy!r}: use random, pct or dfs")
    if executions < 1:
        raise ValueError("--executions must be at least 1")
    check_names(bugs)
    names = [scenario] if scenario else list(SCENARIOS)
    report = coverage_report(names, bugs, strategy, preemptions, seed, depth, executions)
    if as_json:
        print(json.dumps(report))
    else:
        print("\n".join(coverage_lines(report, detail=bool(scenario))))
    return 0
