"""Shm: the names of a VM's objects in /dev/shm, and the one safe way to look at, open and remove such an entry.

A VM named NAME is the segment PREFIX + NAME and the semaphores
sem.PREFIX + NAME + "." + PURPOSE; PREFIX is `shmmmu-`, or SHMMMU_PREFIX (a
session's own, so that two sessions never see each other's objects).

/dev/shm is writable by every local user, so an entry under our prefix may be
anything: every look goes through `look()` (lstat, never follows a link) and
every open through `open_entry()` (O_NOFOLLOW|O_NONBLOCK, regular files of this
user only), so a directory, link, FIFO, socket or another user's file is
reported, never opened in a way that can block or fail with a traceback.
"""
from __future__ import annotations

import os
import pwd
import re
import stat
from dataclasses import dataclass

DEFAULT_PREFIX = "shmmmu-"
PREFIX_RE = re.compile(r"shmmmu(_[A-Za-z0-9]{1,32})?-\Z")


def _prefix_from_environment() -> tuple[str, str]:
    """SHMMMU_PREFIX: the start of every /dev/shm object and log directory name (default shmmmu-).

    A prefix of its own keeps two sessions apart: a test run sets one, and its
    leak checks, `shmmmu ls` and `shmmmu rm --stale` then see only its objects.
    Returns (prefix, error); an invalid value is refused at the first name made.
    """
    p = os.environ.get("SHMMMU_PREFIX", DEFAULT_PREFIX)
    if PREFIX_RE.fullmatch(p):
        return p, ""
    return DEFAULT_PREFIX, (f"invalid SHMMMU_PREFIX {p!r}: use 'shmmmu-' or 'shmmmu_NAME-' (NAME: 1-32 letters or "
                            f"digits, e.g. shmmmu_ci1-)")


PREFIX, PREFIX_ERROR = _prefix_from_environment()
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")     # used with fullmatch: no trailing newline
PURPOSE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
SHM_DIR = "/dev/shm"                                 # where glibc's shm_open and sem_open put objects


class RegionError(Exception):
    """A region could not be created or attached; the message is one sentence for the user."""


class NameInUse(RegionError):
    """The segment of that name exists (its O_EXCL creation failed): the name is taken."""


def validate_name(name: str) -> str:
    if PREFIX_ERROR:
        raise RegionError(PREFIX_ERROR)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RegionError(f"invalid VM name {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def segment_name(name: str) -> str:
    return "/" + PREFIX + validate_name(name)


SEM_SEP = "."        # not allowed in VM names: VM "a" can never claim a semaphore of VM "a-b"


def semaphore_name(name: str, purpose: str) -> str:
    return "/" + PREFIX + validate_name(name) + SEM_SEP + purpose


def segment_file(name: str) -> str:
    """The segment's entry in /dev/shm (what shm_open names it)."""
    return PREFIX + validate_name(name)


def semaphore_file(name: str, purpose: str) -> str:
    """A semaphore's entry in /dev/shm (sem_open prefixes 'sem.')."""
    return "sem." + PREFIX + validate_name(name) + SEM_SEP + purpose


# ---- one safe way to look at /dev/shm entries

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO",
         stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


@dataclass(frozen=True)
class Entry:
    """What an lstat of one /dev/shm entry says (never follows a link, never opens)."""

    file: str
    kind: str               # file, directory, symbolic link, FIFO, socket, ... ; "missing"
    uid: int = -1
    size: int = 0
    ident: tuple[int, int] = (0, 0)     # (st_dev, st_ino): which object, whatever its name
    ctime: float = 0.0

    @property
    def exists(self) -> bool:
        return self.kind != "missing"

    @property
    def mine(self) -> bool:
        """A regular file of this user: the only kind of entry shmmmu opens or unlinks."""
        return self.kind == "file" and self.uid == os.geteuid()

    def why_not(self) -> str:
        """Why this entry is not one of ours to open, in words ('' if it is)."""
        if self.kind == "missing":
            return "it does not exist"
        if self.kind != "file":
            return f"it is a {self.kind}, not a shared-memory object shmmmu made"
        if self.uid != os.geteuid():
            return f"it belongs to user {user_name(self.uid)}"
        return ""


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def look(file: str) -> Entry:
    """lstat one /dev/shm entry by its file name."""
    try:
        st = os.lstat(os.path.join(SHM_DIR, file))
    except OSError:
        return Entry(file, "missing")
    return Entry(file, KINDS.get(stat.S_IFMT(st.st_mode), "special file"), st.st_uid, st.st_size,
                 (st.st_dev, st.st_ino), st.st_ctime)


def open_entry(file: str, writable: bool = False) -> tuple[int, os.stat_result]:
    """Open a /dev/shm entry that must be a regular file of this user: never follows a link, never blocks
    (O_NONBLOCK: a FIFO would otherwise wait for a writer); raises RegionError saying what it is instead."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(SHM_DIR, file), flags)
    except FileNotFoundError:
        raise RegionError(f"{SHM_DIR}/{file} does not exist") from None
    except OSError as e:
        e2 = look(file)
        why = e2.why_not() or (e.strerror or str(e)).lower()
        raise RegionError(f"cannot open {SHM_DIR}/{file}: {why}") from None
    st = os.fstat(fd)
    entry = Entry(file, KINDS.get(stat.S_IFMT(st.st_mode), "special file"), st.st_uid)
    if not entry.mine:
        os.close(fd)
        raise RegionError(f"cannot open {SHM_DIR}/{file}: {entry.why_not()}")
    return fd, st


def unlink_entry(file: str, ident: tuple[int, int] | None = None) -> bool:
    """Unlink one /dev/shm entry if it is a regular file of this user (and, given `ident`, that very object)."""
    e = look(file)
    if not e.mine or (ident is not None and e.ident != ident):
        return False
    try:
        os.unlink(os.path.join(SHM_DIR, file))
    except OSError:
        return False
    return True


def shm_space() -> tuple[int, int]:
    """(free bytes, total bytes) of the file system under /dev/shm, (0, 0) if unknown."""
    try:
        v = os.statvfs(SHM_DIR)
    except OSError:
        return 0, 0
    return v.f_bavail * v.f_frsize, v.f_blocks * v.f_frsize


