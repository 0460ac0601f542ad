"""Store: the converted trace: one binary file of uint64 words that vCPUs read in chunks, never whole.

`convert()` streams a text trace (any shmmmu.trace.formats format) into it
once.  Each word is `guest page offset << 2 | kind`: the virtual page of an
access is already mapped to a guest page, page-granular and first-touch (each
new virtual page takes the next free guest page, in the order the trace first
touches it, over all threads).  That keeps the number of distinct pages, which
folding addresses modulo guest memory does not (two pages a modulus apart would
become one, and a 1-vCPU 4 KiB replay would take fewer faults than the program
touched pages), and it keeps neighbours that are touched in order neighbours,
so huge-page backing still sees them together.  Conversion holds one dict entry
per distinct page (the mapping) and one 64 K-word buffer per thread; nothing
grows with the trace's length.

The file: an 8 KiB header of uint64 words, then the parts, one per thread
(threads of perf and kvm traces; one part otherwise), each contiguous.

  header[0] MAGIC   [1] VERSION   [2] parts   [3] distinct pages   [4] page shift   [5] accesses
  header[8:16]      the source format's name (ASCII, NUL-padded)
  header[16 + 3k:]  part k: thread id, first word (from the data start), words
"""
from __future__ import annotations

import os
import stat
import tempfile
import time
from array import array
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np

from shmmmu import outfile
from shmmmu.trace.formats import (FORMATS, READERS, TraceError, detect, read_lackey, read_lackey_blocks,
                                  text_lines)

MAGIC = int.from_bytes(b"SHMMMUTR", "little")
VERSION = 1
HEADER_WORDS = 1024
HEADER_BYTES = HEADER_WORDS * 8
MAX_PARTS = 250                  # one vCPU each, and run allows 250
PAGE_SHIFT = 12
FLUSH_WORDS = 1 << 16
CHUNK = 1 << 16                  # words a vCPU reads at a time
KIND_BITS = 2


@dataclass
class TraceInfo:
    """What the header of a converted trace says."""

    path: str
    format: str
    parts: list[tuple[int, int, int]]       # (thread id, first word, words)
    pages: int                              # distinct guest pages the trace touches
    accesses: int

    @property
    def threaded(self) -> bool:
        """One part per thread, each replayed by its own vCPU (else one part every vCPU replays)."""
        return len(self.parts) > 1

    def to_json(self) -> dict[str, object]:
        """`shmmmu trace convert --json`: what was converted, into which file."""
        return {"output": self.path, "format": self.format, "accesses": self.accesses, "pages": self.pages,
                "threads": [{"tid": t, "accesses": n} for t, _, n in self.parts]}

    def line(self, src: str) -> str:
        """`shmmmu trace convert`'s line: what `src` held, converted into this file."""
        return (f"{src}: {self.format}, {self.accesses} accesses, {self.pages} distinct pages, "
                f"{len(self.parts)} thread{'s' if len(self.parts) != 1 else ''} -> {self.path}")


class _Part:
    __slots__ = ("file", "buf", "count")

    def __init__(self, directory: str):
        self.file = tempfile.TemporaryFile(dir=directory, prefix=".shmmmu-trace-part-")
        self.buf = array("Q")
        self.count = 0

    def flush(self) -> None:
        self.buf.tofile(self.file)
        self.count += len(self.buf)
        del self.buf[:]


class Converter:
    """The sink the readers feed: maps pages first-touch and spills each thread's words to its own file."""

    def __init__(self, directory: str, page_shift: int = PAGE_SHIFT):
        self.directory = directory
        self.page_shift = page_shift
        self._pages: dict[int, int] = {}           # virtual page -> guest page, as `add` keeps it
        self.parts: dict[int, _Part] = {}
        self._keys: np.ndarray | None = None        # add_block's sorted copy of the mapping (and _vals)
        self._vals: np.ndarray | None = None
        self._dict_behind = False                   # add_block added pages the dict does not have yet

    @property
    def pages(self) -> dict[int, int]:
        """The mapping as a dict (brought up to date with what add_block added)."""
        if self._dict_behind:
            assert self._keys is not None and self._vals is not None
            self._pages = dict(zip(self._keys.tolist(), self._vals.tolist()))
            self._dict_behind = False
        return self._pages

    @property
    def n_pages(self) -> int:
        return self._keys.size if self._dict_behind and self._keys is not None else len(self._pages)

    def add(self, tid: int, vpage: int, kind: int) -> None:
        pages = self.pages
        g = pages.get(vpage)
        if g is None:
            g = pages[vpage] = len(pages)
        part = self.parts.get(tid) or self._part(tid)
        buf = part.buf
        buf.append(g << KIND_BITS | kind)
        if len(buf) >= FLUSH_WORDS:
            part.flush()

    def add_block(self, vpages: np.ndarray, kinds: np.ndarray) -> None:
        """`add` of many accesses of thread 0 at once (the lackey fast path): the same mapping, the same words.
        Pages seen before are looked up in a sorted copy of the mapping (a binary search each, no hashing; a
        large mapping is searched with the block's pages sorted, which keeps the searches in cache); only a
        block's new pages go into the dict, in the order the block first touches them."""
        keys, vals = self._sorted()
        idx = _search(keys, vpages)
        np.minimum(idx, max(keys.size - 1, 0), out=idx)         # (past the end: not found, looked at the last)
        known = keys[idx] == vpages if keys.size else np.zeros(vpages.size, bool)
        g = vals[idx] if keys.size else np.zeros(vpages.size, dtype=np.uint64)
        if not known.all():
            fresh = np.flatnonzero(~known)
            uniq, first, back = np.unique(vpages[fresh], return_index=True, return_inverse=True)
            ids = np.empty(uniq.size, dtype=np.uint64)
            n = self.n_pages
            ids[np.argsort(first, kind="stable")] = np.arange(n, n + uniq.size, dtype=np.uint64)  # first touch
            at = np.searchsorted(keys, uniq)
            self._keys, self._vals = np.insert(keys, at, uniq), np.insert(vals, at, ids)
            self._dict_behind = True
            g[fresh] = ids[back.ravel()]
        part = self.parts.get(0) or self._part(0)
        part.flush()
        words = (g << np.uint64(KIND_BITS)) | kinds.astype(np.uint64)
        words.tofile(part.file)
        part.count += words.size

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """The mapping as (sorted virtual pages, their guest pages), rebuilt when it grew."""
        if self._keys is None or (not self._dict_behind and self._keys.size != len(self._pages)):
            pages = self._pages                     # `add` added pages since: the copy anew
            keys = np.fromiter(pages.keys(), dtype=np.uint64, count=len(pages))
            vals = np.fromiter(pages.values(), dtype=np.uint64, count=len(pages))
            order = np.argsort(keys, kind="stable")
            self._keys, self._vals = keys[order], vals[order]
        return self._keys, self._vals

    def _part(self, tid: int) -> _Part:
        if len(self.parts) >= MAX_PARTS:
            raise TraceError(f"the trace has more than {MAX_PARTS} threads (at most one vCPU each)")
        part = self.parts[tid] = _Part(self.directory)
        return part

    def finish(self, out: str, fmt: str) -> TraceInfo:
        """Write the file (header, then the parts in the order their threads first appear) and close the parts."""
        try:
            if not self.parts:
                raise TraceError("the trace has no accesses")
            header = np.zeros(HEADER_WORDS, dtype=np.uint64)
            parts, first = [], 0
            for tid, p in self.parts.items():
                p.flush()
                parts.append((tid, first, p.count))
                first += p.count
            header[0:6] = [MAGIC, VERSION, len(parts), self.n_pages, self.page_shift, first]
            header[8:16] = np.frombuffer(fmt.encode()[:64].ljust(64, b"\0"), dtype=np.uint64)
            for k, (tid, off, n) in enumerate(parts):
                header[16 + 3 * k:19 + 3 * k] = [tid & ((1 << 64) - 1), off, n]
            with outfile.output(out, "wb") as f:
                f.write(header.tobytes())
                for p in self.parts.values():
                    p.file.seek(0)
                    while block := p.file.read(1 << 20):
                        f.write(block)
            return TraceInfo(out, fmt, parts, self.n_pages, first)
        finally:
            self.close()

    def close(self) -> None:
        for p in self.parts.values():
            p.file.close()


SORTED_SEARCH = 1 << 16         # a mapping of more pages than this is searched with the queries sorted


def _search(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """np.searchsorted(keys, queries); with many keys, the queries searched in sorted order (binary searches of
    ascending queries touch the same few cache lines one after another) and the results put back."""
    if keys.size <= SORTED_SEARCH:
        return np.searchsorted(keys, queries)
    order = np.argsort(queries, kind="stable")
    idx = np.empty(queries.size, dtype=np.intp)
    idx[order] = np.searchsorted(keys, queries[order])
    return idx


def is_converted(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and int.from_bytes(head, "little") == MAGIC


def read_info(path: str) -> TraceInfo:
    """The header of a converted trace, checked against the file's size."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype=np.uint64, count=HEADER_WORDS)
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    if header.size < HEADER_WORDS or int(header[0]) != MAGIC:
        raise TraceError(f"{path}: not a converted shmmmu trace")
    if int(header[1]) != VERSION:
        raise TraceError(f"{path}: converted trace version {int(header[1])}, this shmmmu reads {VERSION}")
    n = int(header[2])
    if not 1 <= n <= MAX_PARTS:
        raise TraceError(f"{path}: damaged converted trace ({n} parts)")
    parts = [tuple(int(x) for x in header[16 + 3 * k:19 + 3 * k]) for k in range(n)]
    total = int(header[5])
    if sum(p[2] for p in parts) != total or HEADER_BYTES + 8 * total != size:
        raise TraceError(f"{path}: damaged converted trace (its header does not match its size)")
    fmt = header[8:16].tobytes().rstrip(b"\0").decode(errors="replace")
    return TraceInfo(path, fmt, parts, int(header[3]), total)


def read_chunk(path: str, part: int, index: int, chunk: int = CHUNK) -> np.ndarray:
    """Words [index * chunk, (index + 1) * chunk) of a part (fewer at its end, none past it)."""
    first, count = (int(x) for x in np.fromfile(path, dtype=np.uint64, count=2, offset=(17 + 3 * part) * 8))
    lo = index * chunk
    if lo >= count:
        return np.empty(0, dtype=np.uint64)
    return np.fromfile(path, dtype=np.uint64, count=min(chunk, count - lo), offset=HEADER_BYTES + 8 * (first + lo))


@dataclass
class Progress:
    """How far a conversion has come: bytes of the source read (of `total`; 0: unknown, a pipe), lines, seconds."""

    name: str
    done: int
    total: int
    lines: int
    seconds: float
    final: bool = False                  # the conversion is complete: the last report

    def line(self) -> str:
        """The report in words: bytes done of the total, lines/s, ETA (or, when final, what it took)."""
        rate = self.lines / self.seconds if self.seconds > 0 else 0.0
        mib = self.done / (1 << 20)
        if self.final:
            return (f"converted {self.name}: {mib:.1f} MiB, {self.lines:,} lines in {self.seconds:.1f} s "
                    f"({rate:,.0f} lines/s)")
        if not self.total:
            return f"converting {self.name}: {mib:.1f} MiB, {rate:,.0f} lines/s"
        left = self.seconds * (self.total - self.done) / self.done if self.done else 0.0
        return (f"converting {self.name}: {mib:.1f} of {self.total / (1 << 20):.1f} MiB "
                f"({100 * self.done // self.total}%), {rate:,.0f} lines/s, ETA {left:.0f} s")


PROGRESS_BYTES = 1 << 20         # a report per MiB of the source read


class _Counted:
    """The source stream as the readers take it (readline, read), bytes and lines counted: `progress` is
    told every PROGRESS_BYTES."""

    def __init__(self, f: BinaryIO, name: str, total: int, progress: Callable[[Progress], None]):
        self.f, self.name, self.total, self.progress = f, name, total, progress
        self.done = self.lines = 0
        self.next = PROGRESS_BYTES
        self.t0 = time.monotonic()

    def readline(self, size: int = -1) -> bytes:
        raw = self.f.readline(size)
        self.done += len(raw)
        self.lines += bool(raw)
        if self.done >= self.next:
            self.tell()
        return raw

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.done += len(data)
        self.lines += data.count(b"\n")
        if self.done >= self.next:
            self.tell()
        return data

    def tell(self, final: bool = False) -> None:
        self.next = self.done + PROGRESS_BYTES
        self.progress(Progress(self.name, self.done, self.total, self.lines, time.monotonic() - self.t0, final))


def convert_stream(f: BinaryIO, name: str, out: str, fmt: str | None = None, page_shift: int = PAGE_SHIFT,
                   progress: Callable[[Progress], None] | None = None) -> TraceInfo:
    """Convert a text trace from a binary stream; `fmt` forces a format (None: detected); `progress` is told
    how far it has come every MiB of the source, and once more at the end (`Progress.final`)."""
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}: use {', '.join(FORMATS)}")
    outfile.check(out)
    counted = None
    if progress is not None:
        try:
            st = os.fstat(f.fileno())
            total = st.st_size if stat.S_ISREG(st.st_mode) else 0
        except (OSError, AttributeError, ValueError):
            total = 0
        f = counted = _Counted(f, name, total, progress)    # type: ignore[assignment]
    lines = text_lines(f, name)
    seen: list[tuple[int, str]] = []
    if fmt is None:
        fmt, seen = detect(lines, name)
    conv = Converter(outfile.scratch_dir(out), page_shift)
    try:
        if fmt == "lackey":
            # the lines detection read, then the rest a block at a time (read_lackey's semantics, faster)
            read_lackey(seen, conv.add, name, page_shift)
            read_lackey_blocks(f, conv.add, conv.add_block, name, page_shift, seen[-1][0] if seen else 0)
        else:
            READERS[fmt](_chain(seen, lines), conv.add, name, page_shift)
        if not conv.parts:
            raise TraceError(f"{name}: the trace has no accesses")
        info = conv.finish(out, fmt)
        if counted is not None:
            counted.tell(final=True)
        return info
    except OSError as e:                                      # a read error, a full disk
        raise TraceError(f"cannot convert {name} into {out}: {e.strerror}") from None
    finally:
        conv.close()


def _chain(seen: list[tuple[int, str]], rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    yield from seen
    yield from rest


def convert_new(path: str, out: str, fmt: str | None = None,
                progress: Callable[[Progress], None] | None = None) -> TraceInfo:
    """`shmmmu trace convert`: `convert`, but a trace converted already is refused (nothing to convert)."""
    if is_converted(path):
        raise TraceError(f"{path} is converted already")
    return convert(path, out, fmt, progress=progress)


def convert(path: str, out: str, fmt: str | None = None,
            progress: Callable[[Progress], None] | None = None) -> TraceInfo:
    """Convert the trace file at `path` into `out`; a converted trace is only checked (and reused as it is).
    `progress`: see convert_stream (every command that converts shows it the same way)."""
    if is_converted(path):
        return read_info(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    with f:
        return convert_stream(f, path, out, fmt, progress=progress)
