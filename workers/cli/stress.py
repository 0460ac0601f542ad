"""Stress: `shmmmu stress`: rcutorture-style stress of the whole MMU, its report and verdict (shmmmu.stress does the work)."""
from __future__ import annotations

from typing import Annotated

import typer

from shmmmu.workers.cli.common import app, fail_on, print_lines, running_a_vm


@app.command()
def stress(
    duration: Annotated[float, typer.Option("--duration", "-d", help="seconds of stress.")] = 10.0,
    vcpus: Annotated[int, typer.Option("--vcpus", "-v", help="vCPU worker processes.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="seed of every operation stream (printed with any "
                                      "failure).")] = 1,
    bits: Annotated[int, typer.Option("--bits", help="index bits per level: 3 (8-entry test tables) or 9 "
                                      "(512).")] = 3,
    lock_mode: Annotated[str, typer.Option("--lock-mode", help="shared (the series) or exclusive "
                                           "(baseline).")] = "shared",
    bug: Annotated[list[str] | None, typer.Option("--bug", help="re-inject a fixed bug (repeatable; "
                                                  "--list-bugs).")] = None,
    kill_every: Annotated[float, typer.Option("--kill-every", help="SIGKILL a random vCPU every S "
                                              "seconds.")] = 0.0,
    nx_huge_pages: Annotated[bool, typer.Option("--nx-huge-pages", help="the NX huge page mitigation: vCPUs also "
                                                "fetch instructions (mapped 4K, tables on the NX list) and the "
                                                "reclaimer runs NX recovery every 0.25 s.")] = False,
    torture_delay_us: Annotated[int, typer.Option("--torture-delay-us", help="rcutorture-style pauses: one in 8 "
                                                  "passes through a race window (publish->list_add, a yield) "
                                                  "sleeps this long, in clean and bug runs alike; 0: "
                                                  "none.")] = 200,
    root_roles: Annotated[int, typer.Option("--root-roles", help="root roles: vCPU i uses role i mod N, so N "
                                            "valid roots coexist (1: one shared root).")] = 2,
    list_bugs: Annotated[bool, typer.Option("--list-bugs", help="describe every bug switch and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="the report as one JSON object on stdout.")] = False,
    tracepoints: Annotated[str | None, typer.Option("--tracepoints", help="write the kernel's kvm/kvmmmu "
                                                    "tracepoint lines (trace-cmd report's form) to FILE; `shmmmu "
                                                    "trace summary FILE` reads it.")] = None,
) -> None:
    """rcutorture-style stress of the whole MMU with every checker on; SUCCESS or FAILURE (exit 0/1)."""
    import json

    from shmmmu.stress import StressOptions, prepare_stress, run_stress
    from shmmmu.variants import bug_lines
    from shmmmu.workers.supervisor import Supervisor

    if list_bugs:
        for text in bug_lines():
            typer.echo(text)
        return
    opts = StressOptions(duration=duration, vcpus=vcpus, seed=seed, bits=bits, lock_mode=lock_mode,
                         bugs=list(bug or []), kill_every=kill_every, nx_huge_pages=nx_huge_pages,
                         torture_delay_us=torture_delay_us, root_roles=root_roles)
    with fail_on(ValueError):
        parts = prepare_stress(opts, tracepoints)
    log = None if json_out else (lambda line: print(line, flush=True))
    with running_a_vm(), parts:        # the tracepoint parts merged inside
        result = run_stress(opts, Supervisor, log=log)
    if json_out:
        print(json.dumps(result.to_json()))
    else:
        print_lines(result.report(header=False))     # the start line was logged before the run
    if not result.ok:
        raise typer.Exit(1)
