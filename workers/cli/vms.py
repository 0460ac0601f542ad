"""VMs: `shmmmu ls` and `shmmmu rm`: the VMs in /dev/shm listed, and removed (shmmmu.inspect does the work)."""
from __future__ import annotations

import sys
from typing import Annotated

import typer

from shmmmu.workers.cli.common import app, fail_on, print_lines


@app.command("ls")
def ls_cmd(
    json_out: Annotated[bool, typer.Option("--json", help="the list as one JSON array.")] = False,
) -> None:
    """List the VMs in /dev/shm: name, creator pid, alive or stale, size, vCPUs, lock mode."""
    import json

    from shmmmu.inspect import list_vms, vm_list_lines

    vms = list_vms()
    if json_out:
        print(json.dumps([v.to_json() for v in vms]))
    else:
        print_lines(vm_list_lines(vms))


@app.command("rm")
def rm_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="VM names to remove.")] = None,
    stale: Annotated[bool, typer.Option("--stale", help="remove every VM whose processes are gone.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="remove every VM (a live one needs --force).")] = False,
    force: Annotated[bool, typer.Option("--force", help="also unlink a live VM (its processes keep running, "
                                        "unnamed).")] = False,
) -> None:
    """Unlink the segment and semaphores of VMs whose processes are gone."""
    from shmmmu.inspect import remove_vms
    from shmmmu.validate import UsageError

    with fail_on(UsageError):
        remove_vms(list(names or []), stale=stale, all_=all_, force=force, say=print, warn=_warn)


def _warn(text: str) -> None:
    print(f"shmmmu: {text}", file=sys.stderr)
