#!/usr/bin/env python3
"""Mix's parts: which of the `mix` scenario's actors makes its bounded DFS grow, one left out at a time.

`mix` draws its actors from --mix-seed (shmmmu.explore.scenarios._mix): two
vCPUs' accesses, one or two host operations, and at random the reclaimer.
This runs the scenario's own builder with one part left out (`--drop vCPU0`,
`--drop vCPU1`, `--drop reclaimer`, or `--drop OP` for a host operation:
zap_all, delete_memslot, ...; repeatable) and prints, per bound of an
iterative DFS, the executions that bound took to be exhausted, in this one
process (one core), capped at --executions.

    .venv/bin/python tools/mix_parts.py --bound 1 [--seed 0] [--drop reclaimer ...] [--executions 20000]
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import dataclasses
import time
from typing import Any

from shmmmu.explore import scenarios as S
from shmmmu.explore.explorer import Explorer, make_strategy, scenario_with, search, seed_points


def mix_without(seed: int, drop: set[str]) -> S.Scenario:
    """mix at `seed`, its builder run with the parts named in `drop` left out."""
    mix = scenario_with("mix", {"seed": seed})

    def build(ctx: Any) -> None:
        add = ctx.actor
        host_ops = S.host_ops

        def actor(name: str, fn: Any, daemon: bool = False) -> None:
            if name not in drop:
                add(name, fn, daemon)

        def kept_ops(c: Any, ops: list[tuple], host: int = 0) -> Any:
            return host_ops(c, [op for op in ops if op[0] not in drop], host)

        ctx.actor, S.host_ops = actor, kept_ops
        try:
            mix.build(ctx)
        finally:
            ctx.actor, S.host_ops = add, host_ops

    return dataclasses.replace(mix, build=build, name="mix-without-" + "-".join(sorted(drop)) if drop else "mix")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="--mix-seed")
    ap.add_argument("--drop", action="append", default=[], help="an actor or host operation to leave out")
    ap.add_argument("--bound", type=int, default=1)
    ap.add_argument("--executions", type=int, default=20000)
    a = ap.parse_args()
    t0 = time.monotonic()
    with Explorer(mix_without(a.seed, set(a.drop)), []) as ex:
        seed_points(ex)
        dfs = make_strategy("dfs", 1, preemptions=a.bound, points=ex.points)
        r = search(ex, dfs, max_executions=a.executions)
    done = ", ".join(f"bound {b} exhausted at {n:,}" for b, n in dfs.completed)
    cut = "" if r.exhausted else f"; bound {r.bound_done + 1} cut at {r.executions:,} executions"
    print(f"mix --mix-seed {a.seed} without {sorted(a.drop) or 'nothing'}: {done}{cut}; "
          f"{'a finding' if r.first else 'no finding'}; {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
