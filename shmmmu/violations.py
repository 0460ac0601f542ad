"""Violations: the kinds of invariant breach the checkers report, and their record in the region.

Any process that sees a breach appends a record (kind, worker, gfn, two
values); the supervisor reads them all and prints them with the seed and a
replay command.  The first MAX_VIOLATIONS are kept, all are counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from shmmmu.layout import MAX_VIOLATIONS, Ctl, ViolationRow as V

KINDS = [
    "unknown",
    "pfn-changed-without-zap",        # I1: present leaf -> present leaf with another pfn
    "frozen-entry-overwritten",       # I2: someone else wrote a REMOVED slot
    "install-into-dead-table",        # I3: a CAS landed in a retired or freed table
    "use-after-free",                 # Reader Pipe age >= 2, or a read of a freed table
    "poison-read",                    # a walker read a poisoned (freed) table entry
    "stale-translation",              # I5: a zapped translation used after its zap completed unflushed
    "guest-memory-corrupt",           # a page holds a value no write put there
    "write-to-unmapped-host-page",    # a write landed in a host page no guest mapping owns (poison broken)
    "dirty-log-missed",               # I4: a written page not reported dirty
    "lockdep",                        # a lock held in the wrong mode
    "no-forward-progress",            # a vCPU or a walk made no progress within the bound
    "grace-period-stall",             # a grace period longer than the bound
    "table-leak",                     # accounting does not add up
    "invariant",                      # a page-table invariant of DESIGN.md §7
    "mask-walk-overrun",              # K3: walked past the dirty mask
    "mapping-outside-memslot",        # a leaf for a GFN no memslot holds
    "flush-stuck",                    # a vCPU never acknowledged a flush
    "worker-crashed",                 # a worker raised
    "root-refcount",                  # a root's reference count is not the number of its holders
    "install-into-invalid-root",      # an entry installed into an invalid root after its zap passed
    "mapping-after-unmap",            # an MMU notifier returned while a root still mapped its range
    "host-dirty-lost",                # a page the guest wrote was neither host-dirty nor mapped dirty (C7)
    "host-accessed-lost",             # a page the guest touched was neither host-accessed nor mapped young
    "install-before-flush",           # an entry installed where a zap's flush had not completed (K5)
    "lock-dropped-unflushed",         # mmu_lock dropped with changes not yet flushed (I6, K11)
    "rcu-dereference",                # a page table read outside an RCU read-side section (rcu_dereference)
]
KIND = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class Violation:
    kind: str
    worker: int
    gfn: int
    a: int
    b: int
    time_ns: int

    def __str__(self) -> str:
        return f"!!! {self.kind}: worker {self.worker} gfn {self.gfn:#x} ({self.a:#x}, {self.b:#x})"


def record(region, kind: str, worker: int, gfn: int = 0, a: int = 0, b: int = 0) -> None:
    ctl = region.words("ctl")
    v = region.words("violations")
    n = ctl.fetch_add(Ctl.VIOLATIONS, 1)
    if n < MAX_VIOLATIONS:
        base = n * V.WORDS
        v.store(base + V.WORKER, worker)
        v.store(base + V.GFN, gfn & ((1 << 64) - 1))
        v.store(base + V.A, a & ((1 << 64) - 1))
        v.store(base + V.B, b & ((1 << 64) - 1))
        v.store(base + V.TIME_NS, time.monotonic_ns())
        v.store(base + V.KIND, KIND.get(kind, 0) + 1)     # last: 0 means "being written"


def count(region) -> int:
    return region.words("ctl").load(Ctl.VIOLATIONS)


def read_all(region) -> list[Violation]:
    n = min(count(region), MAX_VIOLATIONS)
    arr = region.array("violations")
    out = []
    for k in range(n):
        row = [int(x) for x in arr[k]]
        kind = KINDS[row[V.KIND] - 1] if 0 < row[V.KIND] <= len(KINDS) else "unknown"
        out.append(Violation(kind, row[V.WORKER], row[V.GFN], row[V.A], row[V.B], row[V.TIME_NS]))
    return out
