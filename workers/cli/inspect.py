"""Inspect: `shmmmu inspect NAME`: a read-only look at a running VM, once or watched (shmmmu.inspect does the work)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Annotated, Iterator

import typer

from shmmmu.region import RegionError
from shmmmu.workers.cli.common import app, fail, fail_on, print_lines


@app.command("inspect")
def inspect_cmd(
    name: Annotated[str, typer.Argument(help="the VM's name (shmmmu ls lists them).")],
    tree: Annotated[bool, typer.Option("--tree", help="the page tables as coalesced GFN ranges with their "
                                       "flags.")] = False,
    gfn: Annotated[str | None, typer.Option("--gfn", help="the walk for one GFN (decimal or 0x hex), entry by "
                                            "entry.")] = None,
    root: Annotated[int | None, typer.Option("--root", help="with --gfn: walk from this root (its row in the "
                                             "summary); default the first valid root.")] = None,
    check: Annotated[bool, typer.Option("--check", help="check the page-table invariants; exit 1 on a "
                                        "violation.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="the result as one JSON object (per refresh with "
                                           "--watch).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh the summary every second, with rates, until "
                                        "Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="seconds between --watch refreshes.")] = 1.0,
) -> None:
    """Look at a running VM read-only: a summary, its page tables, one GFN's walk, or its invariants.

    The region is mapped read-only and copied with numpy; no lock is taken, so the VM never waits.
    """
    import json

    from shmmmu.inspect import InspectRequest, look
    from shmmmu.validate import UsageError

    req = InspectRequest(name=name, tree=tree, gfn=gfn, root=root, check=check, watch=watch, interval=interval)
    with fail_on(UsageError):
        req.check_options()
    with _reading(name):
        if watch:
            _watch(name, json_out, interval)
            return
        view = look(req)
        if json_out:
            print(json.dumps(view.data))
        else:
            print_lines(view.lines())
        if not view.ok:
            raise typer.Exit(1)


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """A VM that is not there or a bad GFN: one line, exit 2; a region too big to copy: one line, exit 1."""
    try:
        yield
    except (RegionError, ValueError) as e:
        raise fail(str(e))
    except MemoryError:
        raise fail(f"not enough memory to copy the region of VM {name!r}", 1)


def _watch(name: str, json_out: bool, interval: float) -> None:
    """The summary every `interval` seconds: redrawn in place on a terminal, else appended (or JSON lines)."""
    import json

    from shmmmu import inspect as insp

    live = None
    try:
        if not json_out and sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live
            live = Live(console=Console(), auto_refresh=False, transient=False)
            live.start()
        for s in insp.watch(name, interval):
            if json_out:
                print(json.dumps(insp.public(s)), flush=True)
            elif live is not None:
                from rich.text import Text
                live.update(Text("\n".join(insp.summary_lines(s)) + "\n(Ctrl-C to stop)"), refresh=True)
            else:
                print(time.strftime("# %H:%M:%S"))
                print_lines(insp.summary_lines(s) + [""])
                sys.stdout.flush()
        print(f"shmmmu: the VM {name!r} is gone", file=sys.stderr)
    except KeyboardInterrupt:
        return
    except insp.StaleVM as e:
        raise fail(str(e), 1)
    finally:
        if live is not None:
            live.stop()
