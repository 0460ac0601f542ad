"""Region: one named POSIX shared-memory segment per VM, with a versioned header, numpy views and named semaphores.

The segment starts with a fixed header (magic, layout version, total size,
creator pid, state) followed by a JSON document naming every section (offset,
shape) and the VM's configuration, so any process -- a worker, the inspector,
another shmmmu version -- can attach, check compatibility and refuse with one
clear sentence.  Named semaphores derive from the VM name and are listed in the
header so `unlink` (and `shmmmu rm`) removes every object a VM created.

One `Region` object owns the mmap and every view made of it; `close()` drops
the views before unmapping (numpy views on an mmap otherwise keep it exported).
"""
from __future__ import annotations

import json
import mmap
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import posix_ipc

from shmmmu.atomics import Words

MAGIC = int.from_bytes(b"SHMMMU\x00\x01", "little")
LAYOUT_VERSION = 1
PREFIX = "shmmmu-"
HEADER_BYTES = 64 * 1024
SECTION_ALIGN = 4096
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# header words
H_MAGIC, H_VERSION, H_JSON_LEN, H_SIZE, H_PID, H_CREATED_NS, H_STATE = range(7)
H_JSON_OFFSET = 64
STATE_CREATING, STATE_READY = 0, 1


class RegionError(Exception):
    """A region could not be created or attached; the message is one sentence for the user."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegionError(f"invalid VM name {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def segment_name(name: str) -> str:
    return "/" + PREFIX + validate_name(name)


SEM_SEP = "."        # not allowed in VM names: VM "a" can never claim a semaphore of VM "a-b"


def semaphore_name(name: str, purpose: str) -> str:
    return "/" + PREFIX + validate_name(name) + SEM_SEP + purpose


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


class Region:
    """A mapped VM region.  Use `Region.create(...)` / `Region.attach(...)`, or as a context manager."""

    def __init__(self, name: str, mm: mmap.mmap, doc: dict[str, Any], readonly: bool, owner: bool):
        self.name = name
        self.readonly = readonly
        self.owner = owner                   # created it: unlinks on context exit
        self._mm: mmap.mmap | None = mm
        self.doc = doc
        self.config: dict[str, Any] = doc["config"]
        self.sections = {s["name"]: Section(s["name"], s["offset"], tuple(s["shape"]))
                         for s in doc["sections"]}
        self.semaphore_purposes: list[str] = list(doc["semaphores"])
        self._arrays: dict[str, np.ndarray] = {}
        self._words: dict[str, Words] = {}
        # the interleaving explorer wraps every section's words in scheduling points (shmmmu.explore)
        self.word_wrapper: Callable[[str, Words], Any] | None = None
        self._sems: dict[str, posix_ipc.Semaphore] = {}
        self._header = np.frombuffer(mm, dtype=np.uint64, count=8, offset=0)

    # ---- creation and attachment

    @classmethod
    def create(cls, name: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any],
               semaphores: list[str] = (), replace: bool = False) -> "Region":
        """Create the segment (mode 0600) and its semaphores; fails if the name exists unless `replace`."""
        seg = segment_name(name)
        sections, size = plan_sections(shapes)
        doc = {"layout_version": LAYOUT_VERSION, "config": config,
               "sections": [{"name": s.name, "offset": s.offset, "shape": list(s.shape)} for s in sections],
               "semaphores": list(semaphores)}
        blob = json.dumps(doc).encode()
        if len(blob) > HEADER_BYTES - H_JSON_OFFSET:
            raise RegionError("the region's configuration does not fit its header")
        if replace:
            unlink_all(name)
        try:
            shm = posix_ipc.SharedMemory(seg, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            raise RegionError(f"a VM named {name!r} already exists (shmmmu rm {name} removes a stale one)") from None
        try:
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        try:
            created: list[str] = []
            for purpose in semaphores:
                try:
                    s = posix_ipc.Semaphore(semaphore_name(name, purpose), posix_ipc.O_CREX, mode=0o600,
                                            initial_value=0)
                except posix_ipc.ExistentialError:
                    posix_ipc.unlink_semaphore(semaphore_name(name, purpose))
                    s = posix_ipc.Semaphore(semaphore_name(name, purpose), posix_ipc.O_CREX, mode=0o600,
                                            initial_value=0)
                created.append(purpose)
                s.close()
            header = np.frombuffer(mm, dtype=np.uint64, count=8, offset=0)
            mm[H_JSON_OFFSET:H_JSON_OFFSET + len(blob)] = blob
            header[H_VERSION] = LAYOUT_VERSION
            header[H_JSON_LEN] = len(blob)
            header[H_SIZE] = size
            header[H_PID] = os.getpid()
            header[H_CREATED_NS] = time.time_ns()
            header[H_STATE] = STATE_READY
            header[H_MAGIC] = MAGIC            # last: a half-made region never looks like ours
            del header
        except BaseException:
            mm.close()
            unlink_all(name)
            raise
        return cls(name, mm, doc, readonly=False, owner=True)

    @classmethod
    def attach(cls, name: str, readonly: bool = False) -> "Region":
        """Map an existing region; refuses a missing segment, a foreign one or another layout version."""
        seg = segment_name(name)
        try:
            shm = posix_ipc.SharedMemory(seg, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise RegionError(f"no VM named {name!r} is running (shmmmu ls lists them)") from None
        except posix_ipc.PermissionsError:
            raise RegionError(f"no permission to open the VM {name!r}") from None
        try:
            size = shm.size
            if size < HEADER_BYTES:
                raise RegionError(f"/dev/shm{seg} is not a shmmmu region (too small)")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(shm.fd, size, prot=prot)
        finally:
            shm.close_fd()
        header = np.frombuffer(mm, dtype=np.uint64, count=8, offset=0)
        try:
            if int(header[H_MAGIC]) != MAGIC:
                raise RegionError(f"/dev/shm{seg} is not a shmmmu region (bad magic)")
            if int(header[H_VERSION]) != LAYOUT_VERSION:
                raise RegionError(f"the VM {name!r} has region layout version {int(header[H_VERSION])}, "
                                  f"this shmmmu reads version {LAYOUT_VERSION}")
            n = int(header[H_JSON_LEN])
            if int(header[H_SIZE]) != size or not 0 < n <= HEADER_BYTES - H_JSON_OFFSET:
                raise RegionError(f"the region of VM {name!r} has a damaged header")
            try:
                doc = json.loads(bytes(mm[H_JSON_OFFSET:H_JSON_OFFSET + n]))
            except ValueError:
                raise RegionError(f"the region of VM {name!r} has a damaged header") from None
            if not isinstance(doc, dict) or not {"config", "sections", "semaphores"} <= doc.keys():
                raise RegionError(f"the region of VM {name!r} has a damaged header")
        except RegionError:
            del header
            mm.close()
            raise
        del header
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

    def wrap_words(self, wrapper: Callable[[str, Words], Any]) -> None:
        """From now on every `words()` view of this mapping is `wrapper(section, words)` (the explorer's points)."""
        self.word_wrapper = wrapper
        self._words.clear()

    def semaphore(self, purpose: str) -> posix_ipc.Semaphore:
        s = self._sems.get(purpose)
        if s is None:
            if purpose not in self.semaphore_purposes:
                raise KeyError(f"region {self.name} has no semaphore {purpose!r}")
            try:
                s = posix_ipc.Semaphore(semaphore_name(self.name, purpose))
            except posix_ipc.ExistentialError:
                raise RegionError(f"the VM {self.name!r} lost its semaphore {purpose!r}") from None
            self._sems[purpose] = s
        return s

    @property
    def creator_pid(self) -> int:
        return int(self._header[H_PID])

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
        self._arrays.clear()
        self._header = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass          # a caller still holds a view; the mapping goes with it
            self._mm = None

    def unlink(self) -> None:
        unlink_all(self.name, self.semaphore_purposes)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()


def unlink_all(name: str, purposes: list[str] | None = None) -> list[str]:
    """Unlink a VM's segment and semaphores (those listed in its header, or given); returns what went."""
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
            for f in os.listdir("/dev/shm"):
                if f.startswith(prefix) and f[len(prefix):] not in purposes:
                    purposes.append(f[len(prefix):])
        except OSError:
            pass
    for p in purposes:
        try:
            posix_ipc.unlink_semaphore(semaphore_name(name, p))
            gone.append(semaphore_name(name, p))
        except posix_ipc.ExistentialError:
            pass
    try:
        posix_ipc.unlink_shared_memory(segment_name(name))
        gone.append(segment_name(name))
    except posix_ipc.ExistentialError:
        pass
    return gone


def list_names() -> list[str]:
    """Names of the VM segments present in /dev/shm."""
    try:
        files = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(f[len(PREFIX):] for f in files if f.startswith(PREFIX) and NAME_RE.match(f[len(PREFIX):]))
