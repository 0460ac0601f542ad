"""Torture: `shmmmu torture lock|rcu`: locktorture and rcutorture of the MMU lock and RCU alone (shmmmu.workers.torture runs them)."""
from __future__ import annotations

from typing import Annotated

import typer

from shmmmu.workers.cli.common import fail_on, group, running_a_vm

torture_app = group("torture", "locktorture / rcutorture of the MMU lock and RCU alone: SUCCESS or FAILURE.")

Duration = Annotated[float, typer.Option("--duration", "-d", help="seconds.")]
Seed = Annotated[int | None, typer.Option("--seed", help="random seed (default: drawn and printed).")]


@torture_app.command("lock")
def torture_lock(
    readers: Annotated[int, typer.Option("--readers", help="reader processes (read_lock holders).")] = 2,
    writers: Annotated[int, typer.Option("--writers", help="writer processes (write_lock holders, at least "
                                         "1).")] = 2,
    busted: Annotated[bool, typer.Option("--busted", help="lock_busted: writers barge in beside readers (must "
                                         "FAIL).")] = False,
    duration: Duration = 3.0,
    seed: Seed = None,
) -> None:
    """locktorture of the MMU rwlock: writers must be alone, readers must overlap; exit 0 SUCCESS, 1 FAILURE."""
    from shmmmu.torture import check_options
    from shmmmu.validate import UsageError
    from shmmmu.workers.torture import run_lock_torture

    with fail_on(UsageError):
        check_options("lock", readers, writers, duration, seed)
    with running_a_vm():
        res = run_lock_torture(readers, writers, duration, seed, busted)
    print(res.report())
    if not res.ok:
        raise typer.Exit(1)


@torture_app.command("rcu")
def torture_rcu(
    readers: Annotated[int, typer.Option("--readers", help="reader processes (RCU read-side sections).")] = 2,
    writers: Annotated[int, typer.Option("--writers", help="writer processes (replace and call_rcu).")] = 1,
    no_gp: Annotated[bool, typer.Option("--no-gp", help="the reclaimer frees without a grace period (must "
                                        "FAIL).")] = False,
    duration: Duration = 3.0,
    seed: Seed = None,
) -> None:
    """rcutorture's Reader Pipe for RCU and the reclaimer; exit 0 SUCCESS, 1 FAILURE."""
    from shmmmu.torture import check_options
    from shmmmu.validate import UsageError
    from shmmmu.workers.torture import run_rcu_torture

    with fail_on(UsageError):
        check_options("rcu", readers, writers, duration, seed)
    with running_a_vm():
        res = run_rcu_torture(readers, writers, duration, seed, not no_gp)
    print(res.report())
    if not res.ok:
        raise typer.Exit(1)
