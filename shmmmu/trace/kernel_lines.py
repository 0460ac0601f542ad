"""Kernel lines: kvm and kvmmmu tracepoint lines of any kernel, as tools and mail print them, read into events.

One reader takes what people have: `trace-cmd report` (libtraceevent's
plugin_kvm prints the page events its own way), `perf script`, the kernel's
trace file (/sys/kernel/tracing/trace, `trace-cmd show`), and any of these
pasted into mail: quoted ("> ", ">>"), wrapped onto following lines (a line
that starts no event, right after one, continues it), or quoted-printable
(a line ending in "=" goes on in the next).  A line that is no event line
(a header, prose, ftrace's stack-trace lines) is passed over; one that cannot
be read (an event of ours in no known format, prose between events) is
counted, the first kept with its number (`skipped`, `first_skipped`).

The events read into fields, in every format a kernel printed them
(include/trace/events/kvm.h's arch/x86/kvm/trace.h and arch/x86/kvm/mmu/mmutrace.h):

  kvm_page_fault            5.x "address %lx error_code %x"; 6.x "vcpu %u rip 0x%lx address 0x%016llx
                            error_code 0x%llx"
  kvm_mmu_spte_requested    "gfn %llx pfn %llx level %d"
  kvm_tdp_mmu_spte_changed  "as id %d gfn %llx level %d old_spte %llx new_spte %llx"
  kvm_mmu_get_page          the kernel's "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s"
                            + " new|existing"; trace-cmd's plugin "new|existing sp gfn %llx %u q%u ...
                            %spae %snxe %swp root %u sync" (and the older plugin's "%u/%u ... %spge")
  kvm_mmu_prepare_zap_page  the same without new/existing (the plugin prints no gfn)
  kvm_mmu_set_spte          "gfn %llx spte %llx (%s%s%s%s) level %d at %llx"
  fast_page_fault           "vcpu %d gva %llx error_code %s sptep %p old %#llx new %llx spurious %d fixed %d"
  kvm_mmu_split_huge_page   "gfn %llx spte %llx level %d errno %d" (6.0 on)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from shmmmu.trace.formats import text_lines

H = r"[0-9a-fA-F]+"
_ROLE_TAIL = (r" q(?P<quadrant>\d)(?P<direct> direct)? (?P<access>[-wux]{3})(?P<invalid> invalid)?"
              r"(?: (?P<pae>!?)pae)?(?: (?P<pge>!?)pge)? (?P<nxe>!?)nxe(?: (?P<wp>!?)wp)?(?: smep)?(?: smap)?(?: smm)?"
              r" root (?P<root_count>\d+) (?P<sync>unsync|sync)")
_PRINTK_SP = (rf"sp gen (?P<gen>{H}) gfn (?P<gfn>{H}) l(?P<level>\d)(?: ?(?P<bytes>\d)-?byte)? q(?P<quadrant>\d)"
              r"(?P<direct> direct)? (?P<access>[-wux]{3})(?P<invalid> invalid)? (?P<nxe>!?)nxe (?P<ad>!?)ad"
              r" root (?P<root_count>\d+) (?P<sync>unsync|sync)")
PATTERNS: dict[str, list[re.Pattern]] = {k: [re.compile(p) for p in v] for k, v in {
    "kvm_page_fault": [rf"address (?:0x)?(?P<address>{H}) error_code (?:0x)?(?P<error_code>{H})",
                       rf"vcpu (?P<vcpu>\d+) rip 0x(?P<rip>{H}) address 0x(?P<address>{H}) "
                       rf"error_code 0x(?P<error_code>{H})"],
    "kvm_mmu_spte_requested": [rf"gfn (?P<gfn>{H}) pfn (?P<pfn>{H}) level (?P<level>\d+)"],
    "kvm_tdp_mmu_spte_changed": [rf"as id (?P<as_id>\d+) gfn (?P<gfn>{H}) level (?P<level>\d+) "
                                 rf"old_spte (?P<old_spte>{H}) new_spte (?P<new_spte>{H})"],
    "kvm_mmu_get_page": [_PRINTK_SP + r" (?P<created>new|existing)",
                         rf"(?P<created>new|existing) sp gfn (?P<gfn>{H}) (?P<level>\d)(?:/\d)?" + _ROLE_TAIL],
    "kvm_mmu_prepare_zap_page": [_PRINTK_SP, r"(?P<level>\d)(?:/\d)?" + _ROLE_TAIL],
    "kvm_mmu_set_spte": [rf"gfn (?P<gfn>{H}) spte (?P<spte>{H}) \((?P<perm>[-rwxu]{{3,4}})\) level (?P<level>\d+) "
                         rf"at (?P<sptep>{H})"],
    "fast_page_fault": [rf"vcpu (?P<vcpu>\d+) gva (?P<gva>{H}) error_code (?P<error_code>\S*) sptep (?P<sptep>\S+) "
                        rf"old (?:0x)?(?P<old_spte>{H}) new (?P<new_spte>{H}) spurious (?P<spurious>\d) "
                        r"fixed (?P<fixed>\d)"],
    "kvm_mmu_split_huge_page": [rf"gfn (?P<gfn>{H}) spte (?P<spte>{H}) level (?P<level>\d+) errno (?P<errno>-?\d+)"],
}.items()}
KNOWN = tuple(PATTERNS)
_HEX_FIELDS = {"address", "error_code", "rip", "gfn", "pfn", "old_spte", "new_spte", "spte", "sptep", "gva", "gen"}
_INT_FIELDS = {"vcpu", "level", "as_id", "root_count", "spurious", "fixed", "errno", "quadrant", "bytes"}

# trace-cmd report / the kernel's trace file: 'COMM-PID [CPU] [FLAGS] TIME: EVENT: REST' (TIME bare microseconds
# when trace-cmd prints a time of a second or less); perf script: 'COMM [PID/]TID [CPU] TIME: [PERIOD] EVENT: REST'
_TRACE_CMD = re.compile(r"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?(?P<ts>\d+(?:\.\d+)?):"
                        r"\s+(?P<event>[\w:-]+):\s*(?P<rest>.*)$")
_PERF = re.compile(r"^\s*(?P<comm>.*?)\s+(?:\d+/)?(?P<tid>\d+)\s+(?:\[(?P<cpu>\d+)\]\s+)?(?:\S+\s+)?(?P<ts>\d+\.\d+):"
                   r"\s+(?:\d+\s+)?(?P<event>[\w:-]+):\s*(?P<rest>.*)$")
_QUOTE = re.compile(r"^(?:[ \t]*>)+ ?")
# lines that are no event and no mistake: trace-cmd's and perf's headers, ftrace's stack traces, elisions
_PASSED = re.compile(r"^\s*(?:$|#|cpus=\d+|CPU \d+ is empty|version = \d|=>|<stack trace>|<user stack trace>|"
                     r"\.\.\.+\s*$|\[\s*\.\.\.\s*\]|<snip>)")
MAX_CONTINUATIONS = 4


@dataclass
class Event:
    """One event line read: where it was, who fired it, when (seconds), and its fields (None: an event this
    reader does not know, e.g. kvm_exit)."""

    lineno: int
    comm: str
    tid: int
    cpu: int | None
    ts: float
    name: str
    fields: dict[str, Any] | None


def event_start(line: str) -> re.Match | None:
    """The parts of a line that starts an event ('COMM-PID [CPU] TIME: EVENT: ...' or perf script's), or None."""
    return _TRACE_CMD.match(line) or _PERF.match(line)


def parse_fields(event: str, text: str) -> dict[str, Any] | None:
    """The fields of a known event's text in any of its kernels' formats, or None if it is in none of them."""
    text = text.strip()
    for p in PATTERNS[event]:
        m = p.fullmatch(text)
        if m:
            out: dict[str, Any] = {}
            for k, v in m.groupdict().items():
                if v is None:
                    continue
                out[k] = int(v, 16) if k in _HEX_FIELDS else int(v) if k in _INT_FIELDS else v
            return out
    return None


class Reader:
    """The events of a text stream, in file order; `skipped` lines could not be read (the first: `first_skipped`,
    as (line number, text))."""

    def __init__(self, f: BinaryIO, name: str):
        self.f, self.name = f, name
        self.skipped = 0
        self.first_skipped: tuple[int, str] | None = None
        self.lines = 0

    def _skip(self, lineno: int, text: str) -> None:
        self.skipped += 1
        if self.first_skipped is None:
            self.first_skipped = (lineno, text.strip()[:120])

    def _logical(self) -> Iterator[tuple[int, str]]:
        """(number of its first line, text) of each line, quoted-printable soft breaks joined, quoting removed."""
        held: tuple[int, str] | None = None
        for lineno, raw in text_lines(self.f, self.name):
            self.lines = lineno
            line = raw.rstrip("\r\n")
            if held is not None:
                lineno, line = held[0], held[1] + line
                held = None
            if line.endswith("=") and not line.endswith("=="):
                held = (lineno, line[:-1])               # a quoted-printable soft line break
                continue
            yield lineno, _QUOTE.sub("", line)
        if held is not None:
            yield held[0], _QUOTE.sub("", held[1])

    def __iter__(self) -> Iterator[Event]:
        pending: tuple[int, re.Match] | None = None
        more: list[tuple[int, str]] = []
        for lineno, line in self._logical():
            m = event_start(line)
            if m is None and pending is not None and line.strip() and not _PASSED.match(line) \
                    and len(more) < MAX_CONTINUATIONS:
                more.append((lineno, line))             # a wrapped event's next line
                continue
            if pending is not None:
                yield from self._finish(pending, more)
                pending, more = None, []
            if m is not None:
                pending = (lineno, m)
            elif not _PASSED.match(line):
                self._skip(lineno, line)
        if pending is not None:
            yield from self._finish(pending, more)

    def _finish(self, pending: tuple[int, re.Match], more: list[tuple[int, str]]) -> Iterator[Event]:
        lineno, m = pending
        name = m["event"].rsplit(":", 1)[-1]                 # perf script's kvmmmu:kvm_mmu_get_page
        ts = float(m["ts"]) if "." in m["ts"] else int(m["ts"]) / 1e6
        cpu = int(m["cpu"]) if m["cpu"] is not None else None
        if name not in PATTERNS:
            yield Event(lineno, m["comm"].strip(), int(m["tid"]), cpu, ts, name, None)
            return                                           # its wrapped lines are its own
        for n in range(len(more), -1, -1):                   # the most continuation lines that make sense
            fields = parse_fields(name, " ".join([m["rest"], *(t.strip() for _, t in more[:n])]))
            if fields is not None:
                for k, t in more[n:]:
                    self._skip(k, t)
                yield Event(lineno, m["comm"].strip(), int(m["tid"]), cpu, ts, name, fields)
                return
        self._skip(lineno, m.group(0))
        for k, t in more:
            self._skip(k, t)
