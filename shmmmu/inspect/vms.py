"""The VMs in /dev/shm: what `shmmmu ls` lists and `shmmmu rm` removes, whatever state each is in.

Every entry is looked at with `region.look` (lstat) before anything opens it:
a directory, link, FIFO or socket under our prefix is listed as `not-ours`
and never opened or removed; another user's segment is listed as
`other-user` (live as far as we can tell: we cannot read its header) and
never removed.  A creator is alive only if its pid runs *and* started when
the header says it did, so a reused or forged pid does not keep a stale VM
alive.  A supervisor killed with SIGKILL leaves its log directory
(/tmp/shmmmu-NAME-XXXXXXXX, with an `owner` file naming it); `stale_log_dirs`
finds those whose owner is gone, for `shmmmu rm --stale`.
"""
from __future__ import annotations

import mmap
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmmmu.layout import ConfigError, VMConfig
from shmmmu.region import (H_MAGIC, H_PID, H_PID_START, H_VERSION, LAYOUT_VERSION, MAGIC, NAME_RE, PREFIX,
                           SEM_SEP, SHM_DIR, Region, RegionError, list_names, look, open_entry, process_start,
                           unlink_all)


def pid_alive(pid: int) -> bool:
    """Is a process with this pid running (a zombie, killed but not yet reaped, is not)?"""
    return process_state(pid) in ("running", "stopped")


def process_state(pid: int) -> str:
    """running, stopped (SIGSTOP or a tracer: it will not make progress) or gone (no such process, a zombie)."""
    if not 0 < pid < 1 << 22:                 # PID_MAX_LIMIT
        return "gone"
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        state = stat[stat.rindex(b")") + 2:][:1]
    except (OSError, ValueError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except (PermissionError, OverflowError):
            pass
        return "running"                        # no /proc: trust kill(0)
    if state in (b"Z", b"X", b"x"):
        return "gone"
    if state in (b"T", b"t"):
        return "stopped"
    return "running"


def _boot_time() -> float:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def creator_alive(pid: int, start_ticks: int, created_ns: int = 0) -> bool:
    """Is the process that created a region still running: the pid runs and is the same process?

    The header records the creator's start time; a region from before that was recorded is
    checked against its creation time (a process that started after the region cannot have made it)."""
    if not pid_alive(pid):
        return False
    now_start = process_start(pid)
    if not now_start:
        return True                            # no /proc to ask: the pid is all we have
    if start_ticks:
        return now_start == start_ticks
    if created_ns:
        started = _boot_time() + now_start / os.sysconf("SC_CLK_TCK")
        return started <= created_ns / 1e9 + 1.0
    return True


HALF_MADE_GRACE_S = 10.0     # a segment without a readable header younger than this may be being created


@dataclass
class VmEntry:
    """One VM name found in /dev/shm, as `shmmmu ls` shows it."""

    name: str
    # alive, stale, half-made, foreign, other-version, damaged, semaphores-only,
    # other-user (another user's: unreadable, never removed), not-ours (not a regular file: never opened)
    state: str
    creator_pid: int = 0
    size: int = 0
    vcpus: int | None = None
    lock_mode: str | None = None
    kernel: str | None = None           # the kernel profile the VM follows
    memory_bytes: int | None = None
    age_s: float | None = None
    note: str = ""
    semaphores: int = 0
    creator_start: int = 0

    @property
    def live(self) -> bool:
        """Might processes be using it?  (alive, or unreadable and too young to call abandoned)."""
        if self.state in ("alive", "other-user"):
            return True
        if self.state in ("half-made", "foreign", "damaged", "other-version"):
            if self.creator_pid:
                return creator_alive(self.creator_pid, self.creator_start)
            return self.age_s is not None and self.age_s < HALF_MADE_GRACE_S
        return False

    @property
    def known_live(self) -> bool:
        """Is a process known to be using it (its header names a creator that runs)?"""
        if self.state == "alive":
            return True
        return (self.state in ("other-version", "damaged") and bool(self.creator_pid)
                and creator_alive(self.creator_pid, self.creator_start))

    @property
    def removable(self) -> bool:
        """Ours to unlink at all: not another user's entry, not something that is not a regular file."""
        return self.state not in ("other-user", "not-ours")

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["live"] = self.live
        return d


def _raw_header(name: str) -> tuple[int, int, int, int, int] | None:
    """(magic, version, pid, pid start, size) read straight from a segment's first words, or None."""
    try:
        fd, st = open_entry(PREFIX + name)
    except RegionError:
        return None
    try:
        size = st.st_size
        if size < 64:
            return (0, 0, 0, 0, size)
        mm = mmap.mmap(fd, 64, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    try:
        h = np.frombuffer(mm, dtype=np.uint64, count=8).copy()
    finally:
        mm.close()
    return int(h[H_MAGIC]), int(h[H_VERSION]), int(h[H_PID]), int(h[H_PID_START]), size


def _semaphore_names() -> dict[str, int]:
    """VM name -> how many of our semaphores (regular files of this user) carry it."""
    out: dict[str, int] = {}
    try:
        files = os.listdir(SHM_DIR)
    except OSError:
        return out
    head = "sem." + PREFIX
    for f in files:
        if f.startswith(head) and SEM_SEP in f[len(head):]:
            vm = f[len(head):].split(SEM_SEP, 1)[0]
            if NAME_RE.fullmatch(vm) and look(f).mine:
                out[vm] = out.get(vm, 0) + 1
    return out


def describe_vm(name: str, sems: dict[str, int] | None = None) -> VmEntry | None:
    """What /dev/shm holds under one VM name (None: nothing at all)."""
    sems = _semaphore_names() if sems is None else sems
    seg = look(PREFIX + name)
    if not seg.exists:
        if sems.get(name):
            return VmEntry(name, "semaphores-only", semaphores=sems[name],
                           note="semaphores without a segment (a teardown was cut short)")
        return None
    age = max(0.0, time.time() - seg.ctime)
    if seg.kind != "file":
        return VmEntry(name, "not-ours", age_s=age, semaphores=sems.get(name, 0),
                       note=f"{SHM_DIR}/{seg.file} is a {seg.kind}, not made by shmmmu: left alone")
    if not seg.mine:
        return VmEntry(name, "other-user", size=seg.size, age_s=age,
                       note=f"another user's VM: {seg.why_not()}; not yours to read or remove")
    e = VmEntry(name, "alive", semaphores=sems.get(name, 0), age_s=age)
    try:
        region = Region.attach(name, readonly=True)
    except RegionError as err:
        raw = _raw_header(name)
        e.note = str(err)
        if raw is None:
            e.state = "damaged"
        else:
            magic, version, pid, start, size = raw
            e.size = size
            if magic != MAGIC:
                e.state = "half-made" if e.age_s is not None and e.age_s < HALF_MADE_GRACE_S else "foreign"
                if e.state == "foreign" and magic == 0:
                    e.state = "half-made"
            else:
                e.creator_pid, e.creator_start = pid, start
                e.state = "other-version" if version != LAYOUT_VERSION else "damaged"
        return e
    try:
        e.creator_pid = region.creator_pid
        e.creator_start = region.creator_start
        e.size = region.size
        cfg = region.config
        try:
            VMConfig.from_json(cfg)                        # a field of the wrong type or range: damaged
        except ConfigError as err:
            e.state, e.note = "damaged", f"the region of VM {name!r} has a damaged header: {err}"
            return e
        n = cfg.get("n_vcpus")
        e.vcpus = n if type(n) is int else None
        mode = cfg.get("lock_mode")
        e.lock_mode = mode if isinstance(mode, str) else None
        kernel = cfg.get("kernel", "5.13")
        e.kernel = kernel if isinstance(kernel, str) else None
        try:
            e.memory_bytes = sum(int(m["npages"]) for m in cfg.get("memslots", [])) * 4096
        except (TypeError, KeyError, ValueError, AttributeError):
            e.memory_bytes = None
        e.age_s = max(0.0, (time.time_ns() - region.created_ns) / 1e9)
        created = region.created_ns
    finally:
        region.close()
    e.state = "alive" if creator_alive(e.creator_pid, e.creator_start, created) else "stale"
    return e


def list_vms() -> list[VmEntry]:
    """Every VM name in /dev/shm: segments (readable or not) and semaphores left without one."""
    sems = _semaphore_names()
    names = sorted(set(list_names()) | set(sems))
    return [e for e in (describe_vm(n, sems) for n in names) if e is not None]


def remove_vm(name: str) -> list[str]:
    """Unlink a VM's segment and every semaphore named after it; returns what went."""
    return unlink_all(name)


# ---- the supervisors' log directories

LOG_DIR_RE = re.compile(re.escape(PREFIX) + r"([A-Za-z0-9_-]{1,64})-[a-z0-9_]{8}\Z")    # tempfile.mkdtemp's
OWNER_FILE = "owner"          # "PID START_TICKS": the supervisor that made the directory


def log_dir_owner(path: str) -> tuple[int, int] | None:
    """(pid, start ticks) from a log directory's owner file, or None (no such file, not ours, unreadable)."""
    try:
        fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_uid == os.geteuid()):
            return None
        pid, start = os.read(fd, 64).split()[:2]
        return int(pid), int(start)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def stale_log_dirs() -> list[str]:
    """Our supervisors' log directories whose supervisor is gone (killed before it could remove them)."""
    tmp = tempfile.gettempdir()
    out = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return out
    for d in sorted(names):
        if not LOG_DIR_RE.fullmatch(d):
            continue
        path = os.path.join(tmp, d)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_mode & 0o170000 != 0o040000 or st.st_uid != os.geteuid():
            continue                          # a link or another user's: not ours
        owner = log_dir_owner(path)
        if owner is not None and not creator_alive(*owner):
            out.append(path)
    return out


def remove_log_dir(path: str) -> bool:
    """Remove a log directory: its regular files (never following a link), then the directory."""
    try:
        for f in os.listdir(path):
            p = os.path.join(path, f)
            if os.lstat(p).st_mode & 0o170000 == 0o100000:
                os.unlink(p)
        os.rmdir(path)
    except OSError:
        return False
    return True
