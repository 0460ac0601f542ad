"""View: what `shmmmu inspect NAME` shows, chosen from its options: one look (summary, tree, walk, check) or a watch.

`InspectRequest.check()` refuses options that do not go together before the
VM is touched; `look()` takes one snapshot (or, for --check, passes until
two agree) and returns what to print as JSON and as lines; `watch()` yields
a summary with rates every interval until the VM is gone or stale.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from shmmmu import validate as V
from shmmmu.inspect.check import check_vm
from shmmmu.inspect.gfn import gfn_walk, parse_gfn
from shmmmu.inspect.render import check_lines, gfn_lines, summary_lines, tree_lines
from shmmmu.inspect.summary import public, summary
from shmmmu.inspect.tree import tree
from shmmmu.region import RegionError
from shmmmu.snapshot import take_snapshot


class StaleVM(RuntimeError):
    """The watched VM's supervisor is gone: nobody will move it again (exit status 1)."""


@dataclass
class InspectRequest:
    """`shmmmu inspect`'s command line as given."""
    name: str
    tree: bool = False
    gfn: str | None = None
    root: int | None = None
    check: bool = False
    watch: bool = False
    interval: float = 1.0

    def check_options(self) -> None:
        """One view at a time, a sane --interval, --root only with --gfn (UsageError: the one line to say)."""
        chosen = [o for o, on in (("--tree", self.tree), ("--gfn", self.gfn is not None), ("--check", self.check),
                                  ("--watch", self.watch)) if on]
        if len(chosen) > 1:
            raise V.UsageError(f"use one of {' / '.join(chosen)} at a time")
        V.seconds(self.interval, "--interval", hi=3600.0)
        if self.root is not None and self.gfn is None:
            raise V.UsageError("--root goes with --gfn")


@dataclass
class View:
    """One look at a VM: `data` is what --json prints, `lines()` the text, `ok` False for a violated invariant."""
    data: Any
    lines: Callable[[], list[str]]
    ok: bool = True


def look(req: InspectRequest) -> View:
    """The summary, or --tree, --gfn's walk or --check's verdict, of VM `req.name` (not --watch: `watch`).
    A bad GFN is a ValueError; a VM that is not there (or not readable) a RegionError."""
    g = parse_gfn(req.gfn) if req.gfn is not None else None
    if req.check:
        res = check_vm(req.name)             # a running VM: passes until two agree (shmmmu/inspect/check.py)
        return View(res.to_json(), lambda: check_lines(res), res.ok)
    snap = take_snapshot(req.name)
    if g is not None:
        w = gfn_walk(snap, g, req.root)
        return View(w, lambda: gfn_lines(w))
    if req.tree:
        t = tree(snap)
        return View(t.to_json(), lambda: tree_lines(t))
    s = summary(snap)
    return View(public(s), lambda: summary_lines(s))


def watch(name: str, interval: float) -> Iterator[dict[str, Any]]:
    """The summary of VM `name`, with rates, every `interval` seconds.  Ends when the VM is gone (a VM not
    there at the first look is that look's RegionError); raises StaleVM when its supervisor is gone."""
    prev = None
    while True:
        t0 = time.monotonic()
        try:
            snap = take_snapshot(name)
        except RegionError:
            if prev is None:
                raise
            return
        s = summary(snap, previous=prev)
        if not s["alive"]:                   # nobody will move it again: stop rather than refresh forever
            raise StaleVM(f"the VM {name!r} is stale: its supervisor (pid {snap.creator_pid}) is gone; "
                          f"stopped watching (shmmmu rm {name} removes it)")
        yield s
        prev = s
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
