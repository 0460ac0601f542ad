"""Formats: the trace readers, one per format, each a streaming loop that hands every access to a sink.

An access is (thread id, virtual page, kind); kind is READ, WRITE or EXEC
(shmmmu.workloads).  A reader never holds more than one line: a trace of any
length streams through.  Every bad line is one `TraceError` naming its line
number: an unknown access kind, an address that is negative or past 64 bits,
binary data (a NUL byte, bytes that are not UTF-8) and endless input such as
/dev/zero (a line longer than MAX_LINE bytes) alike.

  lackey     valgrind --tool=lackey --trace-mem=yes: 'I  ADDR,SIZE', ' L|S|M ADDR,SIZE' (hex, no 0x);
             an access that spans two pages touches both; M is a read and then a write; I is a fetch
  pinatrace  Intel Pin's pinatrace tool: 'IP: R ADDR' / 'IP: W ADDR', '#eof' at the end
  perf       `perf script` of page-fault samples: the software event (perf record -e page-faults -d,
             perf script -F +addr or -F ...,addr,ip: the sample's data address; the default output has
             only the IP and is refused) or the exceptions:page_fault_user /
             page_fault_kernel tracepoints (address=, error_code=: bit 1 a write, bit 4 a fetch)
  kvm        the kernel's kvm:kvm_page_fault tracepoint as trace-cmd report or perf script print it:
             5.13's 'address %lx error_code %x' (and 6.x's 'vcpu %u rip 0x%lx address 0x%lx error_code 0x%llx');
             the address is guest-physical, the error code VMX's EPT-violation exit qualification
             (bit 1 a write, bit 2 a fetch), or SVM's 64-bit #NPF error code (fault_kind)
  plain      ours: 'R ADDR', 'W ADDR' or 'X ADDR' (hex with 0x, or decimal); '#' starts a comment

perf and kvm lines carry the thread (the task's pid in trace-cmd's comm-pid, perf's tid):
each thread becomes a part of the converted trace, and a vCPU.
"""
from __future__ import annotations

import re
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

from shmmmu.layout import EXEC, READ, WRITE

MAX_LINE = 4096                  # longer is not a trace line: binary or endless input (/dev/zero)
DETECT_LINES = 200               # lines read to tell the format
U64_MAX = (1 << 64) - 1
FORMATS = ("lackey", "pinatrace", "perf", "kvm", "plain")
THREADED = ("perf", "kvm")       # formats whose lines name a thread

Sink = Callable[[int, int, int], None]          # add(thread id, virtual page, kind)


class TraceError(ValueError):
    """A trace that cannot be read: one line, with the line number where there is one."""


def text_lines(f: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a binary stream, with the checks every format shares."""
    readline = f.readline
    lineno = 0
    while True:
        raw = readline(MAX_LINE + 1)
        if not raw:
            return
        lineno += 1
        if b"\0" in raw:
            raise TraceError(f"{name}: line {lineno}: binary data (a NUL byte): not a text trace")
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            raise TraceError(f"{name}: line {lineno}: longer than {MAX_LINE} bytes: not a trace "
                             f"(binary or endless input?)")
        try:
            yield lineno, raw.decode()
        except UnicodeDecodeError:
            raise TraceError(f"{name}: line {lineno}: binary data (not UTF-8 text): not a text trace") from None


def _address(tok: str, base: int, name: str, lineno: int) -> int:
    try:
        a = int(tok, base)
    except ValueError:
        raise TraceError(f"{name}: line {lineno}: bad address {tok!r}") from None
    if a < 0:
        raise TraceError(f"{name}: line {lineno}: negative address {tok!r}")
    if a > U64_MAX:
        raise TraceError(f"{name}: line {lineno}: address {tok!r} is past 64 bits")
    return a


# ---------------------------------------------------------------- the readers

_LACKEY_KINDS = {"I": (EXEC,), "L": (READ,), "S": (WRITE,), "M": (READ, WRITE)}


def read_lackey(lines: Iterable[tuple[int, str]], add: Sink, name: str, shift: int) -> None:
    for lineno, line in lines:
        if line.startswith("==") or not line.strip():
            continue                              # valgrind's own messages (==PID== ...)
        parts = line.split()
        kinds = _LACKEY_KINDS.get(parts[0]) if len(parts) == 2 else None
        if kinds is None:
            raise TraceError(f"{name}: line {lineno}: expected 'I|L|S|M ADDR,SIZE' (lackey), got {line.strip()!r}")
        a, _, s = parts[1].partition(",")
        addr = _address(a, 16, name, lineno)
        try:
            size = int(s) if s else 1
        except ValueError:
            raise TraceError(f"{name}: line {lineno}: bad size {s!r}") from None
        if size < 0:
            raise TraceError(f"{name}: line {lineno}: bad size {s!r}")
        size = max(size, 1)                       # a 0-byte access still names its page
        last = addr + size - 1
        if last > U64_MAX:
            raise TraceError(f"{name}: line {lineno}: access {a},{s} ends past 64 bits")
        first, last = addr >> shift, last >> shift
        for kind in kinds:
            add(0, first, kind)
            if last != first:                     # an access spanning a page boundary touches both pages
                for page in range(first + 1, last + 1):
                    add(0, page, kind)


# the fast path of a lackey trace: a block of complete lines at a time, parsed by one regex and numpy; any block
# with a line it does not take as it is (a message, a bad line, an access past 64 bits or over two pages)
# goes through read_lackey line by line instead, which gives the same accesses or the error with its line number
BLOCK = 1 << 19
_LACKEY_BLOCK = re.compile(r"^([I ][ LSM]) ([0-9a-fA-F]{1,16}),(\d{1,9})$", re.M)     # kinds checked after
_MESSAGE = re.compile(r"^==.{0,%d}$" % (MAX_LINE // 4 - 3), re.M)    # a message line surely short enough
_BLOCK_KINDS = {"I ": (EXEC, -1), " L": (READ, -1), " S": (WRITE, -1), " M": (READ, WRITE)}


def text_blocks(f: BinaryIO, name: str, lineno: int) -> Iterator[tuple[int, str]]:
    """(lines before it, text) of blocks of whole lines, about BLOCK bytes each.  Every error text_lines
    would raise is raised here for the same line and after the same lines were yielded, except a line
    longer than MAX_LINE inside a block, which the caller finds (`numbered`)."""
    nl = b"\n"
    rest = b""
    while True:
        data = f.read(BLOCK)
        buf = rest + data
        cut = buf.rfind(nl) + 1 if data else len(buf)
        block, rest = buf[:cut], buf[cut:]
        if block:
            try:
                if b"\0" in block:
                    raise ValueError
                text = block.decode()
            except (ValueError, UnicodeDecodeError):
                yield from _up_to_bad_line(block, lineno, name)
                raise AssertionError("unreachable: _up_to_bad_line raises")
            yield lineno, text
            lineno += block.count(nl)
        head = rest[:MAX_LINE + 1]                 # what text_lines' readline of the partial line would see
        if b"\0" in head:
            raise TraceError(f"{name}: line {lineno + 1}: binary data (a NUL byte): not a text trace")
        if len(rest) > MAX_LINE:
            raise TraceError(f"{name}: line {lineno + 1}: longer than {MAX_LINE} bytes: not a trace "
                             f"(binary or endless input?)")
        if not data:
            return


def _up_to_bad_line(block: bytes, lineno: int, name: str) -> Iterator[tuple[int, str]]:
    """The lines of a block before its first bad one (a NUL byte or bytes that are not UTF-8), then that
    line's error as text_lines gives it (a long line's first MAX_LINE + 1 bytes decide)."""
    nl = b"\n"
    nul = block.find(b"\0")
    try:
        block.decode()
        bad = nul
    except UnicodeDecodeError as e:
        bad = e.start if nul < 0 else min(nul, e.start)
    start = block.rfind(nl, 0, bad) + 1
    if start:
        yield lineno, block[:start].decode()
    line_no = lineno + block.count(nl, 0, start) + 1
    end = block.find(nl, start)
    line = block[start:] if end < 0 else block[start:end + 1]
    if b"\0" in line[:MAX_LINE + 1]:
        raise TraceError(f"{name}: line {line_no}: binary data (a NUL byte): not a text trace")
    if len(line) > MAX_LINE and not line[:MAX_LINE + 1].endswith(nl):
        raise TraceError(f"{name}: line {line_no}: longer than {MAX_LINE} bytes: not a trace "
                         f"(binary or endless input?)")
    raise TraceError(f"{name}: line {line_no}: binary data (not UTF-8 text): not a text trace")


def numbered(text: str, before: int, name: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a block's text, with text_lines' check of the length."""
    parts = text.split("\n")
    last = parts.pop()                        # "" after a final newline
    lines = [p + "\n" for p in parts] + ([last] if last else [])
    for i, line in enumerate(lines, before + 1):
        if len(line) * 4 > MAX_LINE:          # (only a line this long can have more than MAX_LINE bytes)
            raw = line.encode()[:MAX_LINE + 1]
            if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                raise TraceError(f"{name}: line {i}: longer than {MAX_LINE} bytes: not a trace "
                                 f"(binary or endless input?)")
        yield i, line


_HEX_LUT = np.full(256, -1, dtype=np.int16)
for _c in b"0123456789":
    _HEX_LUT[_c] = _c - 48
for _c in b"abcdef":
    _HEX_LUT[_c] = _c - 87
for _c in b"ABCDEF":
    _HEX_LUT[_c] = _c - 55
_DEC_LUT = np.where((np.arange(256) >= 48) & (np.arange(256) <= 57), np.arange(256) - 48, -1).astype(np.int16)
_I, _L, _S, _M, _SP, _NL, _COMMA = (ord(c) for c in "ILSM \n,")


def lackey_block_arrays(text: str, shift: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(virtual pages, kinds) of a block of lackey lines, parsed with numpy over the bytes, in trace order, as
    read_lackey gives them; None when any line is not a plain access 'I  ADDR,SIZE' / ' L|S|M ADDR,SIZE' of
    1-16 hex digits and 1-9 decimal ones within one page or two (a message, a bad line, the end of the
    trace without a newline, an access past 64 bits): the caller reads that block the slower ways."""
    if not text.endswith("\n"):
        return None
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    b = np.frombuffer(raw, dtype=np.uint8)
    nl = np.flatnonzero(b == _NL)
    commas = np.flatnonzero(b == _COMMA)
    n = nl.size
    if n == 0 or commas.size != n:
        return None
    starts = np.empty(n, dtype=np.int64)
    starts[0], starts[1:] = 0, nl[:-1] + 1
    alen = commas - starts - 3                            # address digits (a comma in the right line: 1..16)
    slen = nl - commas - 1                                # size digits: 1..9
    if alen.min() < 1 or alen.max() > 16 or slen.min() < 1 or slen.max() > 9:
        return None
    c0, c1, c2 = b[starts], b[starts + 1], b[starts + 2]
    instr = (c0 == _I) & (c1 == _SP)
    data = (c0 == _SP) & ((c1 == _L) | (c1 == _S) | (c1 == _M))
    if not ((instr | data) & (c2 == _SP)).all():
        return None
    wide = int(alen.max())
    addr = np.zeros(n, dtype=np.uint64)
    for k in range(16 - wide, 16):                        # right-aligned: digit k of 16 ends at the comma
        d = _HEX_LUT[b[np.maximum(commas - 16 + k, 0)]]
        if k >= 16 - int(alen.min()):                     # every line has this digit
            if d.min() < 0:
                return None
        else:
            d = np.where(k >= 16 - alen, d, 0)
            if d.min() < 0:
                return None
        addr = (addr << np.uint64(4)) | d.astype(np.uint64)
    size = np.zeros(n, dtype=np.int64)
    for k in range(9 - int(slen.max()), 9):
        d = _DEC_LUT[b[nl - 9 + k]]
        if k < 9 - int(slen.min()):
            d = np.where(k >= 9 - slen, d, 0)
        if d.min() < 0:
            return None
        size = size * 10 + d
    extra = (np.maximum(size, 1) - 1).astype(np.uint64)  # a 0-byte access still names its page
    if (addr > np.uint64(U64_MAX) - extra).any():
        return None                                       # ends past 64 bits: the line reader's error
    first = addr >> np.uint64(shift)
    last = (addr + extra) >> np.uint64(shift)
    span = last - first
    if int(span.max()) > 1:
        return None
    k = np.full((n, 2), -1, dtype=np.int8)
    k[instr, 0] = EXEC
    k[c1 == _L, 0] = READ
    k[c1 == _S, 0] = WRITE
    mod = data & (c1 == _M)
    k[mod, 0], k[mod, 1] = READ, WRITE                   # M: a read, then a write
    pages = np.stack([first, last, first, last], axis=1).ravel()
    kinds = np.repeat(k, 2, axis=1).ravel()
    two = span == 1
    keep = np.stack([np.ones(n, bool), two, mod, mod & two], axis=1).ravel()
    return pages[keep], kinds[keep]


def read_lackey_blocks(f: BinaryIO, add: Sink, add_block: Callable[[np.ndarray, np.ndarray], None], name: str,
                       shift: int, lineno: int) -> None:
    """The rest of a lackey trace from `f` (`lineno` lines read before): whole blocks through `add_block`
    (virtual pages, kinds), in trace order; a block the regex does not cover wholly through read_lackey."""
    for before, text in text_blocks(f, name, lineno):
        fast = lackey_block_arrays(text, shift)
        if fast is not None:
            add_block(*fast)
            continue
        m = _LACKEY_BLOCK.findall(text)
        lines = text.count("\n") + (not text.endswith("\n")) - len(_MESSAGE.findall(text))
        known = _BLOCK_KINDS.get
        if len(m) == lines and m and all(known(c) for c, _, _ in m):
            a = np.array([int(a, 16) for _, a, _ in m], dtype=np.uint64)
            z = np.maximum(np.array([int(z) for _, _, z in m], dtype=np.uint64), np.uint64(1))
            if int(a.max()) + int(z.max()) <= U64_MAX + 1 or all(x + y <= U64_MAX + 1 for x, y in
                                                                  zip(a.tolist(), z.tolist())):
                first = a >> np.uint64(shift)
                last = (a + z - np.uint64(1)) >> np.uint64(shift)
                span = last - first
                if int(span.max()) <= 1:
                    k = np.array([_BLOCK_KINDS[c] for c, _, _ in m], dtype=np.int8)
                    pages = np.stack([first, last, first, last], axis=1).ravel()
                    kinds = np.repeat(k, 2, axis=1).ravel()
                    two = span == 1
                    m2 = k[:, 1] >= 0                     # M: a second access, the write
                    keep = np.stack([np.ones(len(m), bool), two, m2, m2 & two], axis=1).ravel()
                    add_block(pages[keep], kinds[keep])
                    continue
        read_lackey(numbered(text, before, name), add, name, shift)


def read_pinatrace(lines: Iterable[tuple[int, str]], add: Sink, name: str, shift: int) -> None:
    for lineno, line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue                              # '#eof'
        parts = s.split()
        if len(parts) != 3 or not parts[0].endswith(":") or parts[1] not in ("R", "W"):
            raise TraceError(f"{name}: line {lineno}: expected 'IP: R ADDR' or 'IP: W ADDR' (pinatrace), got {s!r}")
        add(0, _address(parts[2], 16, name, lineno) >> shift, WRITE if parts[1] == "W" else READ)


# perf script: 'COMM [PID/]TID [CPU] TIME: [PERIOD] EVENT: REST' (the CPU column only when recorded per CPU);
# trace-cmd report: 'COMM-PID [CPU] [FLAGS] TIME: EVENT: REST'
_PERF = re.compile(r"^\s*(?P<comm>.*?)\s+(?:\d+/)?(?P<tid>\d+)\s+(?:\[\d+\]\s+)?(?:\S+\s+)?(?P<ts>\d+\.\d+):"
                   r"\s+(?:\d+\s+)?(?P<event>[\w:-]+):\s*(?P<rest>.*)$")
_TRACE_CMD = re.compile(r"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+\[\d+\]\s+(?:\S+\s+)?(?P<ts>\d+\.\d+):"
                        r"\s+(?P<event>[\w:-]+):\s*(?P<rest>.*)$")
_PERF_SW_FAULTS = ("page-faults", "faults", "minor-faults", "major-faults")
_PERF_TP_FAULTS = ("exceptions:page_fault_user", "exceptions:page_fault_kernel",
                   "page_fault_user", "page_fault_kernel")
_KV = re.compile(r"(\w+)=(\S+)")
_HEX = re.compile(r"^(?:0x)?[0-9a-fA-F]+$")


def event_line(line: str) -> re.Match | None:
    """The parts of one event line of `trace-cmd report` or `perf script`, or None."""
    return _TRACE_CMD.match(line) or _PERF.match(line)


def read_perf(lines: Iterable[tuple[int, str]], add: Sink, name: str, shift: int) -> None:
    for lineno, line in lines:
        m = _PERF.match(line)
        if m is None:
            if line.strip() and not line.lstrip().startswith("#"):
                raise TraceError(f"{name}: line {lineno}: not a `perf script` sample line: {line.strip()[:80]!r}")
            continue
        event, rest, tid = m["event"], m["rest"], int(m["tid"])
        if event in _PERF_TP_FAULTS:
            kv = dict(_KV.findall(rest))
            if "address" not in kv:
                raise TraceError(f"{name}: line {lineno}: {event} without address=")
            try:
                err = int(kv.get("error_code", "0"), 16)
            except ValueError:
                raise TraceError(f"{name}: line {lineno}: bad error_code {kv['error_code']!r}") from None
            kind = EXEC if err & 0x10 else WRITE if err & 0x2 else READ       # X86_PF_INSTR, X86_PF_WRITE
            add(tid, _address(kv["address"], 16, name, lineno) >> shift, kind)
        elif event in _PERF_SW_FAULTS:
            # -F +addr prints the data address before the IP's "sym (dso)"; -F ...,addr,ip prints both bare;
            # the default prints only the IP with its symbol: that is no data address
            tok = rest.split()
            hexes = [t for t in tok if _HEX.match(t)]
            if not hexes or (len(hexes) == 1 and any(t.startswith("(") for t in tok)):
                raise TraceError(f"{name}: line {lineno}: a {event} sample without its data address "
                                 f"(record with perf record -d, print with perf script -F +addr)")
            add(tid, _address(hexes[0], 16, name, lineno) >> shift, READ)  # a software sample has no kind
        # other events in the same file (a perf record of several) are not accesses


_KVM_PF = re.compile(r"address (?:0x)?(?P<addr>-?[0-9a-fA-F]+)\s+error_code (?:0x)?(?P<err>[0-9a-fA-F]+)")


def fault_kind(err: int) -> str:
    """read, write or fetch of kvm_page_fault's error code: VMX's EPT-violation exit qualification (bit 1 a
    write, bit 2 a fetch), or SVM's #NPF error code when bits 32-63 say so (6.x records it whole and the CPU sets
    bit 32 or 33 in every one; there bit 1 is a write and bit 4 a fetch)."""
    if err >> 32:
        return "write" if err & 0x2 else "fetch" if err & 0x10 else "read"
    return "write" if err & 0x2 else "fetch" if err & 0x4 else "read"


def read_kvm(lines: Iterable[tuple[int, str]], add: Sink, name: str, shift: int) -> None:
    for lineno, line in lines:
        if "kvm_page_fault:" not in line:
            continue                              # trace-cmd's header, other events
        m = event_line(line)
        f = _KVM_PF.search(line)
        if m is None or f is None:
            raise TraceError(f"{name}: line {lineno}: a kvm_page_fault line not in the kernel's format "
                             f"('address %lx error_code %x'): {line.strip()[:100]!r}")
        kind = {"read": READ, "write": WRITE, "fetch": EXEC}[fault_kind(int(f["err"], 16))]
        add(int(m["tid"]), _address(f["addr"], 16, name, lineno) >> shift, kind)


_PLAIN_KINDS = {"R": READ, "W": WRITE, "X": EXEC}


def read_plain(lines: Iterable[tuple[int, str]], add: Sink, name: str, shift: int) -> None:
    for lineno, line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if len(parts) != 2:
            raise TraceError(f"{name}: line {lineno}: expected 'R ADDR', 'W ADDR' or 'X ADDR', got {s[:80]!r}")
        kind = _PLAIN_KINDS.get(parts[0].upper())
        if kind is None:
            raise TraceError(f"{name}: line {lineno}: unknown access kind {parts[0][:20]!r} (R, W or X)")
        add(0, _address(parts[1], 0, name, lineno) >> shift, kind)


READERS = {"lackey": read_lackey, "pinatrace": read_pinatrace, "perf": read_perf, "kvm": read_kvm,
           "plain": read_plain}

# ---------------------------------------------------------------- detection

_LACKEY_LINE = re.compile(r"^(?:I {2}| [LSM] )[0-9a-fA-F]+,\d+\s*$")
_PIN_LINE = re.compile(r"^0x[0-9a-fA-F]+: [RW] 0x[0-9a-fA-F]+\s*$")
# 'KIND ADDR': plain even with a kind or address it rejects (its reader then names the line and what is wrong)
_PLAIN_LINE = re.compile(r"^\s*\w+\s+-?(?:0[xX][0-9a-fA-F]+|\d+)\s*$")


def classify(line: str) -> str | None:
    """The format one line belongs to, or None if it does not tell."""
    if re.match(r"^==\d+==", line) or _LACKEY_LINE.match(line):
        return "lackey"
    if "kvm_page_fault:" in line:
        return "kvm"
    if _PIN_LINE.match(line):
        return "pinatrace"
    m = _PERF.match(line)
    if m and (m["event"] in _PERF_SW_FAULTS or m["event"] in _PERF_TP_FAULTS):
        return "perf"
    if _PLAIN_LINE.match(line):
        return "plain"
    return None


def detect(lines: Iterator[tuple[int, str]], name: str) -> tuple[str, list[tuple[int, str]]]:
    """The format of a trace from its first lines; returns it with the lines read (to be read again)."""
    seen: list[tuple[int, str]] = []
    for lineno, line in lines:
        seen.append((lineno, line))
        fmt = classify(line)
        if fmt is not None:
            return fmt, seen
        if len(seen) >= DETECT_LINES:
            break
    if not any(line.strip() and not line.lstrip().startswith("#") for _, line in seen):
        raise TraceError(f"{name}: the trace has no accesses")
    raise TraceError(f"{name}: cannot tell the trace's format from its first {len(seen)} lines "
                     f"(use --trace-format {'|'.join(FORMATS)})")
