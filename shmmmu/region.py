"""Region: one named POSIX shared-memory segment per VM, with a versioned header, numpy views and named semaphores.

The segment starts with a fixed header (magic, layout version, total size,
creator pid, state) followed by a JSON document naming every section (offset,
shape) and the VM's configuration, so any process -- a worker, the inspector,
another shmmmu version -- can attach, check compatibility and refuse with one
clear sentence.  Named semaphores derive from the VM name and are listed in the
header so `unlink` (and `shmmmu rm`) removes every object a VM created.

One `Region` object owns the mmap and every view made of it; `close()` drops
the views before unmapping (numpy views on an mmap otherwise keep it exported).

/dev/shm is writable by every local user, so an entry under our prefix may be
anything: every look goes through `look()` (lstat, never follows a link) and
every open through `open_entry()` (O_NOFOLLOW|O_NONBLOCK, regular files of this
user only), so a directory, link, FIFO, socket or another user's file is
reported, never opened in a way that can block or fail with a traceback.  A
header is validated against the file's size before anything is mapped or
allocated from it.  A creator records the inode of every object it made and its
teardown unlinks only those (`Region.unlink`), so removing a VM by name and
re-using the name never lets the old teardown destroy the new VM.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import posix_ipc

from shmmmu.atomics import Words
from shmmmu.shm import (NAME_RE, PREFIX, PREFIX_ERROR, PURPOSE_RE, SEM_SEP, SHM_DIR, NameInUse, RegionError, look,
                        open_entry, segment_file, segment_name, semaphore_file, semaphore_name, shm_space,
                        unlink_entry, validate_name)

# a region's names and errors are shmmmu.shm's; they are imported from here too
__all__ = ["Region", "RegionError", "NameInUse", "Section", "PREFIX", "PREFIX_ERROR", "NAME_RE", "SEM_SEP",
           "SHM_DIR", "segment_name", "semaphore_name", "validate_name", "look", "open_entry", "unlink_all",
           "list_names", "plan_sections", "process_start", "MAGIC", "LAYOUT_VERSION", "HEADER_BYTES"]

MAGIC = int.from_bytes(b"SHMMMU\x00\x01", "little")
LAYOUT_VERSION = 1
HEADER_BYTES = 64 * 1024
SECTION_ALIGN = 4096

# header words; H_PID_START: the creator's start time (clock ticks since boot, /proc/PID/stat field 22), so a
# reused or forged pid is not taken for the creator
H_MAGIC, H_VERSION, H_JSON_LEN, H_SIZE, H_PID, H_CREATED_NS, H_STATE, H_PID_START = range(8)
H_JSON_OFFSET = 64
STATE_CREATING, STATE_READY = 0, 1


def _human(n: int) -> str:
    return f"{-(-n // 1024)} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _no_room(size: int, what: str) -> RegionError:
    free, total = shm_space()
    need_mib = -(-(total - free + size) // (1 << 20))
    return RegionError(f"{SHM_DIR} has {_human(free)} free of {_human(total)} and {what} needs {_human(size)}: "
                       f"{SHM_DIR} must be at least {need_mib} MiB (docker run --shm-size={need_mib}m, "
                       f"or mount -o remount,size={need_mib}m {SHM_DIR})")


def _create_error(e: OSError, what: str, size: int = 0) -> RegionError:
    """One sentence for a failed create in /dev/shm (read-only, not writable, out of space or inodes)."""
    if e.errno == errno.ENOSPC:
        free, _ = shm_space()
        if size and free < size:
            return _no_room(size, what)
        return RegionError(f"{SHM_DIR} is out of space or inodes: cannot create {what} (shmmmu ls lists VMs; "
                           f"shmmmu rm --stale removes abandoned ones)")
    if e.errno == errno.EROFS:
        return RegionError(f"cannot create {what}: {SHM_DIR} is mounted read-only")
    if e.errno in (errno.EACCES, errno.EPERM):
        return RegionError(f"cannot create {what}: {SHM_DIR} is not writable by this user")
    return RegionError(f"cannot create {what}: {e.strerror or e}")


def _sem_oserror(e: Exception) -> OSError:
    """posix_ipc reports sem_open's failures as classes and strerror text, not errno: map them back."""
    if isinstance(e, OSError):
        return e
    text = str(e).lower()
    code = (errno.EACCES if isinstance(e, posix_ipc.PermissionsError) else errno.ENOSPC if "space" in text
            else errno.EROFS if "read-only" in text else errno.EIO)
    return OSError(code, str(e))


# the signals that end a process and that its handler may turn into an exception (workers/signals.py)
_HELD = frozenset(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                                                "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGXCPU", "SIGXFSZ", "SIGPWR",
                                                "SIGIO") if hasattr(signal, n))


def _hold_signals() -> set[int]:
    """Block the terminating signals (a creation in progress); returns the mask to restore."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)


def _release_signals(old: set[int]) -> None:
    """Restore the mask: a signal that came meanwhile is handled now (and may raise right here)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


def process_start(pid: int) -> int:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22); 0 if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_ = f.read()
        return int(stat_[stat_.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class Section:
    name: str
    offset: int          # bytes from the start of the segment
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 8


def plan_sections(shapes: dict[str, tuple[int, ...]]) -> tuple[list[Section], int]:
    """Lay sections out after the header, each aligned to a page; returns them and the total size."""
    out, off = [], HEADER_BYTES
    for name, shape in shapes.items():
        shape = tuple(int(x) for x in shape)
        if any(x < 0 for x in shape):
            raise RegionError(f"section {name} has a negative size")
        sec = Section(name, off, shape)
        out.append(sec)
        off += -(-max(sec.nbytes, 8) // SECTION_ALIGN) * SECTION_ALIGN
    return out, off


def _read_header(name: str, head: mmap.mmap, size: int) -> dict[str, Any]:
    """The header's document, every field checked for type and every section against the file's size:
    a header that parses but lies is refused here, before a view or a copy is made from it."""
    h = np.frombuffer(head, dtype=np.uint64, count=8, offset=0).copy()
    seg = f"{SHM_DIR}/{PREFIX}{name}"
    if int(h[H_MAGIC]) != MAGIC:
        raise RegionError(f"{seg} is not a shmmmu region (bad magic)")
    if int(h[H_VERSION]) != LAYOUT_VERSION:
        raise RegionError(f"the VM {name!r} has region layout version {int(h[H_VERSION])}, "
                          f"this shmmmu reads version {LAYOUT_VERSION}")

    def damaged(why: str) -> RegionError:
        return RegionError(f"the region of VM {name!r} has a damaged header: {why}")

    n = int(h[H_JSON_LEN])
    if int(h[H_SIZE]) != size:
        raise damaged(f"it records {int(h[H_SIZE])} bytes but the segment has {size}")
    if not 0 < n <= HEADER_BYTES - H_JSON_OFFSET:
        raise damaged("its configuration length is out of range")
    try:
        doc = json.loads(bytes(head[H_JSON_OFFSET:H_JSON_OFFSET + n]))
    except (ValueError, RecursionError):
        raise damaged("its configuration is not JSON") from None
    if not isinstance(doc, dict) or not {"config", "sections", "semaphores"} <= doc.keys():
        raise damaged("its configuration lacks config, sections or semaphores")
    if not isinstance(doc["config"], dict):
        raise damaged("config is not an object")
    if not isinstance(doc["sections"], list) or not isinstance(doc["semaphores"], list):
        raise damaged("sections and semaphores must be lists")
    seen: set[str] = set()
    for s in doc["sections"]:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
            raise damaged("a section has no name")
        sname, off, shape = s["name"], s.get("offset"), s.get("shape")
        if sname in seen:
            raise damaged(f"section {sname!r} appears twice")
        seen.add(sname)
        if type(off) is not int or off < HEADER_BYTES or off % 8:
            raise damaged(f"section {sname!r} has offset {off!r}")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
                or any(type(x) is not int or x < 0 for x in shape)):
            raise damaged(f"section {sname!r} has shape {shape!r}")
        nbytes = 8
        for x in shape:
            nbytes *= x
        if off + nbytes > size:
            raise damaged(f"section {sname!r} ({nbytes} bytes at {off:#x}) runs past the segment's "
                          f"{size} bytes")
    if any(not isinstance(p, str) or not PURPOSE_RE.fullmatch(p) for p in doc["semaphores"]):
        raise damaged("a semaphore name is not valid")
    return doc


class Region:
    """A mapped VM region.  Use `Region.create(...)` / `Region.attach(...)`, or as a context manager."""

    def __init__(self, name: str, mm: mmap.mmap, doc: dict[str, Any], readonly: bool, owner: bool,
                 made: dict[str, tuple[int, int]] | None = None):
        self.name = name
        self.readonly = readonly
        self.owner = owner                   # created it: unlinks on context exit
        self.made: dict[str, tuple[int, int]] = dict(made or {})   # /dev/shm file -> (dev, inode) we created
        self._mm: mmap.mmap | None = mm
        self.doc = doc
        self.config: dict[str, Any] = doc["config"]
        self.sections = {s["name"]: Section(s["name"], s["offset"], tuple(s["shape"]))
                         for s in doc["sections"]}
        self.semaphore_purposes: list[str] = list(doc["semaphores"])
        self._arrays: dict[str, np.ndarray] = {}
        self._words: dict[str, Words] = {}
        self._columns: dict[tuple[str, type], Any] = {}
        # the interleaving explorer wraps every section's words in scheduling points (shmmmu.explore)
        self.word_wrapper: Callable[[str, Words], Any] | None = None
        self._sems: dict[str, posix_ipc.Semaphore] = {}
        self._header = np.frombuffer(mm, dtype=np.uint64, count=8, offset=0)

    # ---- creation and attachment

    @classmethod
    def create(cls, name: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any],
               semaphores: list[str] = (), replace: bool = False) -> "Region":
        """Create the segment (mode 0600) and its semaphores; fails if the name exists unless `replace`.

        The whole size is reserved up front (posix_fallocate) once the cleanup is armed, so a /dev/shm
        too small for the region is one sentence here, not a SIGBUS at the first touch of a missing page.
        """
        seg = segment_file(name)
        sections, size = plan_sections(shapes)
        doc = {"layout_version": LAYOUT_VERSION, "config": config,
               "sections": [{"name": s.name, "offset": s.offset, "shape": list(s.shape)} for s in sections],
               "semaphores": list(semaphores)}
        blob = json.dumps(doc).encode()
        if len(blob) > HEADER_BYTES - H_JSON_OFFSET:
            raise RegionError("the region's configuration does not fit its header")
        for p in semaphores:
            if not PURPOSE_RE.fullmatch(p):
                raise RegionError(f"invalid semaphore purpose {p!r}")
        if replace:
            unlink_all(name)
        made: dict[str, tuple[int, int]] = {}
        mm = None
        # no handler runs between creating an object and recording it (it would leak): a signal that arrives
        # during the creation is handled once the region is whole, where the cleanup below still reaches
        held = _hold_signals()
        try:
            try:
                fd = os.open(os.path.join(SHM_DIR, seg), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                e = look(seg)
                why = "" if e.mine else f" ({e.why_not()})"
                raise NameInUse(f"a VM named {name!r} already exists{why}"
                                + (f" (shmmmu rm {name} removes a stale one)" if not why else "")) from None
            except OSError as e:
                raise _create_error(e, f"the region of VM {name!r}", size) from None
            try:
                st = os.fstat(fd)
                made[seg] = (st.st_dev, st.st_ino)
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise _no_room(size, f"the region of VM {name!r}") from None
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise _create_error(e, f"the region of VM {name!r}", size) from None
                    os.ftruncate(fd, size)          # a file system without fallocate: sized, not reserved
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            for purpose in semaphores:
                sem = semaphore_file(name, purpose)
                old = look(sem)
                if old.exists:
                    # a leftover of an earlier VM of this name (the segment was free, so none runs): ours
                    # goes; anything else stops us before we touch it
                    if not old.mine or not unlink_entry(sem, old.ident):
                        raise RegionError(f"cannot create VM {name!r}: {SHM_DIR}/{sem} already exists and "
                                          f"{old.why_not() or 'cannot be removed'}; choose another name")
                try:
                    s = posix_ipc.Semaphore(semaphore_name(name, purpose), posix_ipc.O_CREX, mode=0o600,
                                            initial_value=0)
                except posix_ipc.ExistentialError:
                    raise RegionError(f"cannot create VM {name!r}: {SHM_DIR}/{sem} was created by someone "
                                      f"else meanwhile; choose another name") from None
                except (posix_ipc.Error, OSError) as e:
                    raise _create_error(_sem_oserror(e), f"the semaphore {sem}") from None
                s.close()
                e2 = look(sem)
                if e2.exists:
                    made[sem] = e2.ident
            header = np.frombuffer(mm, dtype=np.uint64, count=8, offset=0)
            mm[H_JSON_OFFSET:H_JSON_OFFSET + len(blob)] = blob
            header[H_VERSION] = LAYOUT_VERSION
            header[H_JSON_LEN] = len(blob)
            header[H_SIZE] = size
            header[H_PID] = os.getpid()
            header[H_PID_START] = process_start(os.getpid())
            header[H_CREATED_NS] = time.time_ns()
            header[H_STATE] = STATE_READY
            header[H_MAGIC] = MAGIC            # last: a half-made region never looks like ours
            del header
            _release_signals(held)
        except BaseException:
            if mm is not None:
                mm.close()
            for file, ident in made.items():
                unlink_entry(file, ident)
            _release_signals(held)
            raise
        return cls(name, mm, doc, readonly=False, owner=True, made=made)

    @classmethod
    def attach(cls, name: str, readonly: bool = False) -> "Region":
        """Map an existing region; refuses a missing segment, a foreign one, another layout version, or a
        header whose sections do not fit the file (checked before anything is mapped beyond the header)."""
        seg = segment_file(name)
        if not look(seg).exists:
            raise RegionError(f"no VM named {name!r} is running (shmmmu ls lists them)")
        fd, st = open_entry(seg, writable=not readonly)
        try:
            size = st.st_size
            if size < HEADER_BYTES:
                raise RegionError(f"{SHM_DIR}/{seg} is not a shmmmu region (too small)")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            head = mmap.mmap(fd, HEADER_BYTES, prot=mmap.PROT_READ)
            try:
                doc = _read_header(name, head, size)
            finally:
                head.close()
            mm = mmap.mmap(fd, size, prot=prot)
        finally:
            os.close(fd)
        return cls(name, mm, doc, readonly=readonly, owner=False)

    # ---- views

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            raise RegionError(f"the region of VM {self.name!r} is closed")
        return self._mm

    def array(self, section: str) -> np.ndarray:
        """A numpy uint64 view of a section (read-only if the region is)."""
        a = self._arrays.get(section)
        if a is None:
            s = self.sections[section]
            count = s.nbytes // 8
            a = np.frombuffer(self.mm, dtype=np.uint64, count=count, offset=s.offset).reshape(s.shape)
            self._arrays[section] = a
        return a

    def words(self, section: str) -> Words:
        """An atomic `Words` view of a section, flat."""
        w = self._words.get(section)
        if w is None:
            w = Words(self.array(section).reshape(-1))
            if self.word_wrapper is not None:
                w = self.word_wrapper(section, w)
            self._words[section] = w
        return w

    def columns(self, section: str, row: type) -> Any:
        """The words of a section's rows, one Column per field of `row` (shmmmu.layout.Columns)."""
        c = self._columns.get((section, row))
        if c is None:                        # views only: one per section and row type
            from shmmmu.layout import Columns
            c = self._columns[(section, row)] = Columns(row, self.words(section))
        return c

    def wrap_words(self, wrapper: Callable[[str, Words], Any]) -> None:
        """From now on every `words()` view of this mapping is `wrapper(section, words)` (the explorer's points)."""
        self.word_wrapper = wrapper
        self._words.clear()
        self._columns.clear()

    def semaphore(self, purpose: str) -> posix_ipc.Semaphore:
        s = self._sems.get(purpose)
        if s is None:
            if purpose not in self.semaphore_purposes:
                raise KeyError(f"region {self.name} has no semaphore {purpose!r}")
            e = look(semaphore_file(self.name, purpose))
            if not e.mine:                   # sem_open of a FIFO would block; another user's is not ours
                raise RegionError(f"the VM {self.name!r} lost its semaphore {purpose!r}"
                                  + (f": {SHM_DIR}/{e.file}: {e.why_not()}" if e.exists else ""))
            try:
                s = posix_ipc.Semaphore(semaphore_name(self.name, purpose))
            except posix_ipc.Error:
                raise RegionError(f"the VM {self.name!r} lost its semaphore {purpose!r}") from None
            self._sems[purpose] = s
        return s

    @property
    def creator_pid(self) -> int:
        return int(self._header[H_PID])

    @property
    def creator_start(self) -> int:
        """The creator's start time in clock ticks since boot (0: a region made before it was recorded)."""
        return int(self._header[H_PID_START])

    @property
    def created_ns(self) -> int:
        return int(self._header[H_CREATED_NS])

    @property
    def size(self) -> int:
        return int(self._header[H_SIZE])

    def layout_lines(self) -> Iterator[str]:
        yield f"region /dev/shm/{PREFIX}{self.name}: {self.size} bytes, layout version {LAYOUT_VERSION}"
        for s in self.sections.values():
            yield f"  {s.name:14s} offset {s.offset:#12x}  shape {s.shape}  {s.nbytes} bytes"
        for p in self.semaphore_purposes:
            yield f"  semaphore {semaphore_name(self.name, p)}"

    # ---- teardown

    def close(self) -> None:
        for s in self._sems.values():
            try:
                s.close()
            except posix_ipc.Error:
                pass
        self._sems.clear()
        self._words.clear()
        self._columns.clear()
        self._arrays.clear()
        self._header = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass          # a caller still holds a view; the mapping goes with it
            self._mm = None

    def unlink(self) -> None:
        """Unlink what this region's creator made -- the very objects (by inode), not whatever now has
        their names, so a VM created under the same name after `shmmmu rm --force` survives our teardown.
        An attachment that did not create the region unlinks by name."""
        if self.made:
            for file, ident in self.made.items():
                unlink_entry(file, ident)
            return
        unlink_all(self.name, self.semaphore_purposes)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()


def unlink_all(name: str, purposes: list[str] | None = None) -> list[str]:
    """Unlink a VM's segment and semaphores (those listed in its header, or given); returns what went.

    Only regular files of this user go: a directory, link or another user's entry under the name stays."""
    gone = []
    if purposes is None:
        purposes = []
        try:
            r = Region.attach(name, readonly=True)
            purposes = r.semaphore_purposes
            r.close()
        except RegionError:
            pass
        # also catch semaphores of a half-made region whose header was never written
        prefix = "sem." + PREFIX + name + SEM_SEP
        try:
            for f in os.listdir(SHM_DIR):
                if f.startswith(prefix) and f[len(prefix):] not in purposes:
                    purposes.append(f[len(prefix):])
        except OSError:
            pass
    for p in purposes:
        if PURPOSE_RE.fullmatch(p) and unlink_entry(semaphore_file(name, p)):
            gone.append(semaphore_name(name, p))
    if unlink_entry(segment_file(name)):
        gone.append(segment_name(name))
    return gone


def list_names() -> list[str]:
    """Names of the VM segments present in /dev/shm (whatever kind of entry each is: see `look`)."""
    try:
        files = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(f[len(PREFIX):] for f in files if f.startswith(PREFIX) and NAME_RE.fullmatch(f[len(PREFIX):]))
