"""The VMs in /dev/shm: what `shmmmu ls` lists and `shmmmu rm` removes, whatever state each is in."""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import posix_ipc

from shmmmu.region import (H_MAGIC, H_PID, H_VERSION, LAYOUT_VERSION, MAGIC, NAME_RE, PREFIX, SEM_SEP, Region,
                           RegionError, list_names, segment_name, unlink_all)


def pid_alive(pid: int) -> bool:
    """Is a process with this pid running (a zombie, killed but not yet reaped, is not)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        state = stat[stat.rindex(b")") + 2:][:1]
        return state not in (b"Z", b"X")
    except (OSError, ValueError):
        return True




HALF_MADE_GRACE_S = 10.0     # a segment without a readable header younger than this may be being created


@dataclass
class VmEntry:
    """One VM name found in /dev/shm, as `shmmmu ls` shows it."""

    name: str
    state: str                  # alive, stale, half-made, foreign, other-version, damaged, semaphores-only
    creator_pid: int = 0
    size: int = 0
    vcpus: int | None = None
    lock_mode: str | None = None
    memory_bytes: int | None = None
    age_s: float | None = None
    note: str = ""
    semaphores: int = 0

    @property
    def live(self) -> bool:
        """Might processes be using it?  (alive, or unreadable and too young to call abandoned)."""
        if self.state == "alive":
            return True
        if self.state in ("half-made", "foreign", "damaged", "other-version"):
            if self.creator_pid:
                return pid_alive(self.creator_pid)
            return self.age_s is not None and self.age_s < HALF_MADE_GRACE_S
        return False

    @property
    def known_live(self) -> bool:
        """Is a process known to be using it (its header names a creator that runs)?"""
        if self.state == "alive":
            return True
        return self.state in ("other-version", "damaged") and bool(self.creator_pid) and pid_alive(self.creator_pid)

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["live"] = self.live
        return d


def _raw_header(name: str) -> tuple[int, int, int, int] | None:
    """(magic, version, pid, size) read straight from a segment's first words, or None."""
    try:
        shm = posix_ipc.SharedMemory(segment_name(name), read_only=True)
    except (posix_ipc.Error, RegionError):
        return None
    try:
        size = shm.size
        if size < 64:
            return (0, 0, 0, size)
        mm = mmap.mmap(shm.fd, 64, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    finally:
        shm.close_fd()
    try:
        h = np.frombuffer(mm, dtype=np.uint64, count=8).copy()
    finally:
        mm.close()
    return int(h[H_MAGIC]), int(h[H_VERSION]), int(h[H_PID]), size


def _semaphore_names() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        files = os.listdir("/dev/shm")
    except OSError:
        return out
    head = "sem." + PREFIX
    for f in files:
        if f.startswith(head) and SEM_SEP in f[len(head):]:
            vm = f[len(head):].split(SEM_SEP, 1)[0]
            if NAME_RE.match(vm):
                out[vm] = out.get(vm, 0) + 1
    return out


def _age(name: str) -> float | None:
    try:
        return max(0.0, time.time() - os.stat(f"/dev/shm/{PREFIX}{name}").st_ctime)
    except OSError:
        return None


def describe_vm(name: str, sems: dict[str, int] | None = None) -> VmEntry | None:
    """What /dev/shm holds under one VM name (None: nothing at all)."""
    sems = _semaphore_names() if sems is None else sems
    if name not in list_names():
        if sems.get(name):
            return VmEntry(name, "semaphores-only", semaphores=sems[name],
                           note="semaphores without a segment (a teardown was cut short)")
        return None
    e = VmEntry(name, "alive", semaphores=sems.get(name, 0), age_s=_age(name))
    try:
        region = Region.attach(name, readonly=True)
    except RegionError as err:
        raw = _raw_header(name)
        e.note = str(err)
        if raw is None:
            e.state = "damaged"
        else:
            magic, version, pid, size = raw
            e.size = size
            if magic != MAGIC:
                e.state = "half-made" if e.age_s is not None and e.age_s < HALF_MADE_GRACE_S else "foreign"
                if e.state == "foreign" and magic == 0:
                    e.state = "half-made"
            else:
                e.creator_pid = pid
                e.state = "other-version" if version != LAYOUT_VERSION else "damaged"
        return e
    try:
        e.creator_pid = region.creator_pid
        e.size = region.size
        cfg = region.config
        e.vcpus = cfg.get("n_vcpus") if isinstance(cfg, dict) else None
        e.lock_mode = cfg.get("lock_mode") if isinstance(cfg, dict) else None
        try:
            e.memory_bytes = sum(int(m["npages"]) for m in cfg.get("memslots", [])) * 4096
        except (TypeError, KeyError, ValueError, AttributeError):
            e.memory_bytes = None
        e.age_s = max(0.0, (time.time_ns() - region.created_ns) / 1e9)
    finally:
        region.close()
    e.state = "alive" if pid_alive(e.creator_pid) else "stale"
    return e


def list_vms() -> list[VmEntry]:
    """Every VM name in /dev/shm: segments (readable or not) and semaphores left without one."""
    sems = _semaphore_names()
    names = sorted(set(list_names()) | set(sems))
    return [e for e in (describe_vm(n, sems) for n in names) if e is not None]


def remove_vm(name: str) -> list[str]:
    """Unlink a VM's segment and every semaphore named after it; returns what went."""
    return unlink_all(name)

