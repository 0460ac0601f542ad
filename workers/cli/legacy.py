"""Legacy: the commands not yet moved into a module of their own (typer.Option defaults, their orchestration inline).

Each later commit moves a group of them out, into a module that parses its
options, calls the library once and prints; this module then goes.
"""
from __future__ import annotations

import sys

import typer

from shmmmu.region import PREFIX, RegionError
from shmmmu.workers.cli.common import ConversionProgress, app, fail, group, print_lines


# ---------------------------------------------------------------- inspect, ls, rm

@app.command("inspect")
def inspect_cmd(
    name: str = typer.Argument(..., help="the VM's name (shmmmu ls lists them)."),
    tree: bool = typer.Option(False, "--tree", help="the page tables as coalesced GFN ranges with their flags."),
    gfn: str = typer.Option(None, "--gfn", help="the walk for one GFN (decimal or 0x hex), entry by entry."),
    root: int = typer.Option(None, "--root", help="with --gfn: walk from this root (its row in the summary); "
                                                 "default the first valid root."),
    check: bool = typer.Option(False, "--check", help="check the page-table invariants; exit 1 on a violation."),
    json_out: bool = typer.Option(False, "--json", help="the result as one JSON object (per refresh with --watch)."),
    watch: bool = typer.Option(False, "--watch", help="refresh the summary every second, with rates, until Ctrl-C."),
    interval: float = typer.Option(1.0, "--interval", help="seconds between --watch refreshes."),
) -> None:
    """Look at a running VM read-only: a summary, its page tables, one GFN's walk, or its invariants.

    The region is mapped read-only and copied with numpy; no lock is taken, so the VM never waits.
    """
    import json

    from shmmmu import inspect as insp

    chosen = [o for o, on in (("--tree", tree), ("--gfn", gfn is not None), ("--check", check),
                              ("--watch", watch)) if on]
    if len(chosen) > 1:
        raise fail(f"use one of {' / '.join(chosen)} at a time")
    from shmmmu import validate as V
    try:
        V.seconds(interval, "--interval", hi=3600.0)
    except V.UsageError as e:
        raise fail(str(e))
    if root is not None and gfn is None:
        raise fail("--root goes with --gfn")
    try:
        g = insp.parse_gfn(gfn) if gfn is not None else None
        if watch:
            _inspect_watch(name, json_out, interval)
            return
        if check:
            res = insp.check_vm(name)          # a running VM: passes until two agree (shmmmu/inspect/check.py)
            if json_out:
                print(json.dumps(res.to_json()))
            else:
                print_lines(insp.check_lines(res))
            if not res.ok:
                raise typer.Exit(1)
            return
        snap = insp.take_snapshot(name)
        if g is not None:
            w = insp.gfn_walk(snap, g, root)
            if json_out:
                print(json.dumps(w))
            else:
                print_lines(insp.gfn_lines(w))
        elif tree:
            t = insp.tree(snap)
            if json_out:
                print(json.dumps(t.to_json()))
            else:
                print_lines(insp.tree_lines(t))
        else:
            s = insp.summary(snap)
            if json_out:
                print(json.dumps(insp.public(s)))
            else:
                print_lines(insp.summary_lines(s))
    except RegionError as e:
        raise fail(str(e))
    except ValueError as e:
        raise fail(str(e))
    except MemoryError:
        raise fail(f"not enough memory to copy the region of VM {name!r}", 1)


def _inspect_watch(name: str, json_out: bool, interval: float) -> None:
    import json
    import time

    from shmmmu import inspect as insp

    prev = None
    live = None
    try:
        if not json_out and sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live
            live = Live(console=Console(), auto_refresh=False, transient=False)
            live.start()
        while True:
            t0 = time.monotonic()
            try:
                snap = insp.take_snapshot(name)
            except RegionError:
                if prev is None:
                    raise
                print(f"shmmmu: the VM {name!r} is gone", file=sys.stderr)
                return
            s = insp.summary(snap, previous=prev)
            if not s["alive"]:                 # nobody will move it again: stop rather than refresh forever
                raise fail(f"the VM {name!r} is stale: its supervisor (pid {snap.creator_pid}) is gone; "
                            f"stopped watching (shmmmu rm {name} removes it)", 1)
            if json_out:
                print(json.dumps(insp.public(s)), flush=True)
            elif live is not None:
                from rich.text import Text
                live.update(Text("\n".join(insp.summary_lines(s)) + "\n(Ctrl-C to stop)"), refresh=True)
            else:
                print(time.strftime("# %H:%M:%S"))
                print_lines(insp.summary_lines(s) + [""])
                sys.stdout.flush()
            prev = s
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)


@app.command("ls")
def ls_cmd(
    json_out: bool = typer.Option(False, "--json", help="the list as one JSON array."),
) -> None:
    """List the VMs in /dev/shm: name, creator pid, alive or stale, size, vCPUs, lock mode."""
    import json

    from shmmmu.inspect import list_vms

    vms = list_vms()
    if json_out:
        print(json.dumps([v.to_json() for v in vms]))
        return
    if not vms:
        print("no VMs in /dev/shm")
        return
    rows = [("NAME", "PID", "STATE", "REGION", "MEMORY", "VCPUS", "LOCK MODE", "NOTE")]
    for v in vms:
        rows.append((v.name, str(v.creator_pid or "-"), v.state, _fmt_bytes(v.size or None),
                     _fmt_bytes(v.memory_bytes), str(v.vcpus) if v.vcpus is not None else "-", v.lock_mode or "-",
                     v.note))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)) + ("  " + r[-1] if r[-1] else ""))


@app.command("rm")
def rm_cmd(
    names: list[str] = typer.Argument(None, help="VM names to remove."),
    stale: bool = typer.Option(False, "--stale", help="remove every VM whose processes are gone."),
    all_: bool = typer.Option(False, "--all", help="remove every VM (a live one needs --force)."),
    force: bool = typer.Option(False, "--force", help="also unlink a live VM (its processes keep running, unnamed)."),
) -> None:
    """Unlink the segment and semaphores of VMs whose processes are gone."""
    from shmmmu.inspect import describe_vm, list_vms, remove_vm
    from shmmmu.inspect.vms import remove_log_dir, stale_log_dirs
    from shmmmu.region import validate_name

    names = list(names or [])
    if sum([bool(names), stale, all_]) != 1:
        raise fail("name the VMs to remove, or give --stale or --all")
    if names:
        entries = []
        for n in names:
            validate_name(n)
            e = describe_vm(n)
            if e is None:
                raise fail(f"no VM named {n!r} is in /dev/shm (shmmmu ls lists them)")
            entries.append(e)
    else:
        entries = list_vms()
    # another user's VM, or an entry that is not a regular file: never ours to open or unlink
    if names and any(not e.removable for e in entries):
        e = next(e for e in entries if not e.removable)
        raise fail(f"cannot remove {e.name} ({e.state}): {e.note}")
    for e in [e for e in entries if not e.removable]:
        print(f"shmmmu: note: skipping {e.name} ({e.state}): {e.note}", file=sys.stderr)
    entries = [e for e in entries if e.removable]
    # a name given explicitly goes unless a running process is known to use it; --stale and --all also
    # spare an unreadable segment young enough to be still in the making
    live = [e for e in entries if (e.known_live if names else e.live)]
    if stale:
        entries = [e for e in entries if not e.live]
    elif live and not force:
        which = ", ".join(f"{e.name}" + (f" (pid {e.creator_pid})" if e.creator_pid else "") for e in live)
        raise fail(f"{'these VMs are' if len(live) > 1 else 'the VM'} {which} "
                    f"{'are' if len(live) > 1 else 'is'} live: stop {'them' if len(live) > 1 else 'it'} with "
                    f"Ctrl-C, or add --force to unlink anyway")
    logs = stale_log_dirs() if (stale or all_) else []
    for d in logs:                             # a supervisor killed by SIGKILL could not remove its own
        if remove_log_dir(d):
            print(f"removed log directory {d}")
    if not entries:
        if not logs:
            print("nothing to remove")
        return
    for e in entries:
        if e.state in ("half-made", "foreign", "damaged", "other-version"):
            print(f"shmmmu: warning: /dev/shm/{PREFIX}{e.name} is {e.state} ({e.note}); removing it anyway",
                  file=sys.stderr)
        if e in live:
            print(f"shmmmu: warning: the VM {e.name} is live"
                  + (f" (pid {e.creator_pid})" if e.creator_pid else "")
                  + ": its processes keep running on the unlinked region", file=sys.stderr)
        gone = remove_vm(e.name)
        print(f"removed {e.name} ({e.state}): {len(gone)} object{'' if len(gone) == 1 else 's'}")


# ---------------------------------------------------------------- trace

trace_app = group("trace", "Real traces in (record, convert) and the kernel's tracepoint lines summarized "
                            "(docs/trace.md).")


@trace_app.command("record", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def trace_record(
    cmd: list[str] = typer.Argument(None, help="the command to trace, after --."),
    out: str = typer.Option("trace.lackey", "--output", "-o", help="the trace file to write."),
) -> None:
    """Run CMD under valgrind's lackey tool (--trace-mem=yes) and write its memory trace; exit with CMD's status."""
    import signal

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.record import record
    try:
        rc = record(list(cmd or []), out)
    except TraceError as e:
        raise fail(str(e))
    status = ""
    if rc > 128 and rc - 128 in {sg.value for sg in signal.Signals}:
        status = f" (it was killed by {signal.Signals(rc - 128).name})"
    elif rc:
        status = f" (it exited with status {rc})"
    print(f"shmmmu: trace of {' '.join(cmd)}{status} in {out} (replay: shmmmu run --trace {out} --vcpus 1 "
          f"--backing 4k)", file=sys.stderr)
    raise typer.Exit(rc)


@trace_app.command("convert")
def trace_convert(
    src: str = typer.Argument(..., help="a trace in any format `run --trace` reads."),
    out: str = typer.Option(..., "--output", "-o", help="the converted file (replay it with run --trace)."),
    trace_format: str = typer.Option(None, "--trace-format", help="lackey, pinatrace, perf, kvm or plain "
                                     "(default: detected)."),
    json_out: bool = typer.Option(False, "--json", help="what was converted, as one JSON object."),
) -> None:
    """Convert a trace once into the binary form vCPUs stream (first-touch page mapping, a part per thread)."""
    import json

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.store import convert, is_converted
    try:
        if is_converted(src):
            raise TraceError(f"{src} is converted already")
        shown = ConversionProgress()
        try:
            info = convert(src, out, trace_format, progress=shown)
        finally:
            shown.end()
    except TraceError as e:
        raise fail(str(e))
    d = {"output": out, "format": info.format, "accesses": info.accesses, "pages": info.pages,
         "threads": [{"tid": t, "accesses": n} for t, _, n in info.parts]}
    if json_out:
        print(json.dumps(d))
    else:
        print(f"{src}: {info.format}, {info.accesses} accesses, {info.pages} distinct pages, "
              f"{len(info.parts)} thread{'s' if len(info.parts) != 1 else ''} -> {out}")


@trace_app.command("summary")
def trace_summary(
    path: str = typer.Argument(..., help="a --tracepoints file, or `trace-cmd report` / `perf script` output."),
    json_out: bool = typer.Option(False, "--json", help="the summary as one JSON object."),
) -> None:
    """Summarize kvm/kvmmmu tracepoint lines: events by kind, levels, splits, zaps, changes per GFN."""
    import json

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.summary import report, summarize
    try:
        s = summarize(path)
    except TraceError as e:
        raise fail(str(e))
    if json_out:
        print(json.dumps(s.to_json()))
    else:
        print("\n".join(report(s, path)))

# ---------------------------------------------------------------- end of trace
