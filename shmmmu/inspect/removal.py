"""Removal: `shmmmu rm`: which VMs a request names, what refuses it, and the removal, told line by line.

Every refusal (no VM of that name, another user's or a non-file entry named
explicitly, a live VM without --force) comes before anything is removed.  A
name given explicitly goes unless a running process is known to use it;
--stale and --all also spare an unreadable segment young enough to be still
in the making, and remove the log directories of supervisors that are gone.
"""
from __future__ import annotations

from typing import Callable

from shmmmu.inspect.vms import VmEntry, describe_vm, list_vms, remove_log_dir, remove_vm, stale_log_dirs
from shmmmu.region import PREFIX, validate_name
from shmmmu.validate import UsageError


def _named(names: list[str]) -> list[VmEntry]:
    entries = []
    for n in names:
        validate_name(n)
        e = describe_vm(n)
        if e is None:
            raise UsageError(f"no VM named {n!r} is in /dev/shm (shmmmu ls lists them)")
        entries.append(e)
    # another user's VM, or an entry that is not a regular file: never ours to open or unlink
    if any(not e.removable for e in entries):
        e = next(e for e in entries if not e.removable)
        raise UsageError(f"cannot remove {e.name} ({e.state}): {e.note}")
    return entries


def remove_vms(names: list[str], stale: bool, all_: bool, force: bool, say: Callable[[str], None],
               warn: Callable[[str], None]) -> None:
    """Remove the VMs named, or every stale one (--stale), or every one (--all; a live one needs --force).
    `say` is told each removal (stdout), `warn` each note and warning (stderr).  UsageError: a refusal,
    nothing removed; RegionError: a name that is no VM name."""
    if sum([bool(names), stale, all_]) != 1:
        raise UsageError("name the VMs to remove, or give --stale or --all")
    entries = _named(names) if names else list_vms()
    for e in [e for e in entries if not e.removable]:
        warn(f"note: skipping {e.name} ({e.state}): {e.note}")
    entries = [e for e in entries if e.removable]
    live = [e for e in entries if (e.known_live if names else e.live)]
    if stale:
        entries = [e for e in entries if not e.live]
    elif live and not force:
        which = ", ".join(f"{e.name}" + (f" (pid {e.creator_pid})" if e.creator_pid else "") for e in live)
        raise UsageError(f"{'these VMs are' if len(live) > 1 else 'the VM'} {which} "
                         f"{'are' if len(live) > 1 else 'is'} live: stop {'them' if len(live) > 1 else 'it'} with "
                         f"Ctrl-C, or add --force to unlink anyway")
    logs = stale_log_dirs() if (stale or all_) else []
    for d in logs:                             # a supervisor killed by SIGKILL could not remove its own
        if remove_log_dir(d):
            say(f"removed log directory {d}")
    if not entries:
        if not logs:
            say("nothing to remove")
        return
    for e in entries:
        if e.state in ("half-made", "foreign", "damaged", "other-version"):
            warn(f"warning: /dev/shm/{PREFIX}{e.name} is {e.state} ({e.note}); removing it anyway")
        if e in live:
            warn(f"warning: the VM {e.name} is live" + (f" (pid {e.creator_pid})" if e.creator_pid else "")
                 + ": its processes keep running on the unlinked region")
        gone = remove_vm(e.name)
        say(f"removed {e.name} ({e.state}): {len(gone)} object{'' if len(gone) == 1 else 's'}")
