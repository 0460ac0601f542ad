"""Check: `inspect --check` of a VM that may be running -- violations only in a view that held still, the rest in flight.

The invariants (shmmmu.checks) hold at a quiet point.  A copy of a running VM
is not one: it can be torn between two tables, and a checker compares things
the VM updates in separate steps (the page count and the tables below the
roots, a root's count and the workers recorded as holding it, a walk's own
reference, the counters each worker publishes now and then and the leaves).
One pass over a running `stress` VM reported two to four such differences
every time (6 of 6 tries), none of them real.  Two passes that found the same
problems were no better (6 of 10), nor two passes that copied the very same
state (6 of 10): on a loaded machine every process of the VM can stand still
for tens of milliseconds behind a lock holder the kernel descheduled,
half-way through an operation.

So a pass that finds anything is followed by more, until the view is
consistent: two consecutive passes copy the very same state (every section
equal, nothing moved, not even a heartbeat), and that state is a quiet point
(Snapshot.busy: no lock held, no RCU reader, no walk, no vCPU inside an
iteration, not stopping) or has stayed the same for SETTLE_S (a VM frozen on purpose:
`explore --keep` at its failing step, a stopped process).  Its problems are
violations.  A VM still moving after MAX_S showed its problems only live: they
are reported as in flight, apart, and counted in no violation.  A clean first
pass needs no second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from shmmmu import checks, violations
from shmmmu.layout import Ctl
from shmmmu.snapshot import Snapshot, take_snapshot

SETTLE_S = 1.0          # a state unchanged this long, even mid-operation, is taken as it is
MAX_S = 1.5             # a VM that never settled by then is running: its differences are in flight
SHOWN_RECORDS = 8       # the recorded violations --check says in words (inspect NAME lists 20)
PAUSE_S = 0.1           # between passes (each copies the VM: no need to hammer it)


@dataclass
class CheckResult:
    """What `inspect --check` found: violations (in a consistent view), differences seen only in flight."""

    name: str
    violations: list[str]
    in_flight: list[str]
    passes: int
    settled: bool                        # the last passes were a consistent view
    busy: str                            # what the last pass showed the VM in the middle of ('' : nothing)
    snap: Snapshot                       # the last pass's
    seen: dict[str, int] = field(default_factory=dict)     # each problem: in how many passes

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict:
        return {"vm": self.name, "ok": self.ok, "violations": self.violations, "in_flight": self.in_flight,
                "passes": self.passes, "settled": self.settled, "busy": self.busy,
                "changed_while_reading": self.snap.changed}


def run_checks(snap: Snapshot) -> list[str]:
    """`shmmmu inspect --check`: every invariant checker of shmmmu.checks on this snapshot, one sentence each,
    and the violations the VM recorded while running."""
    found = [str(p) for p in checks.check_all(snap)]
    nv = snap.word(Ctl.VIOLATIONS)
    if nv:
        found.append(f"the VM recorded {nv} violations while running (shmmmu inspect {snap.name} lists them)")
        who = violations.worker_names(snap.config)
        for row in snap.violations[:min(nv, SHOWN_RECORDS)]:
            v = violations.from_row([int(x) for x in row])
            found.append(f"recorded: {str(v).removeprefix('!!! ')}: {v.sentence(who, snap.geometry.entries)}")
    return found


def check_vm(name: str, settle_s: float = SETTLE_S, max_s: float = MAX_S) -> CheckResult:
    """Check the VM `name` (shmmmu.inspect.run_checks) pass after pass until the view is consistent, or
    until `max_s`: then what it showed is in flight."""
    seen: dict[str, int] = {}
    t0 = time.monotonic()
    prev: Snapshot | None = None
    still_since = 0.0                     # when the state last changed
    passes = 0
    while True:
        snap = take_snapshot(name)
        passes += 1
        found = list(dict.fromkeys(run_checks(snap)))
        for p in found:
            seen[p] = seen.get(p, 0) + 1
        if passes == 1 and not found:
            return CheckResult(name, [], [], 1, False, snap.busy(), snap, seen)
        busy = snap.busy()
        if prev is not None and snap.same_state(prev):
            if not busy or snap.taken_mono - still_since >= settle_s:
                return CheckResult(name, found, [p for p in seen if p not in set(found)], passes, True, busy,
                                   snap, seen)
        else:
            still_since = snap.taken_mono
        prev = snap
        if time.monotonic() - t0 >= max_s:
            return CheckResult(name, [], list(seen), passes, False, busy, snap, seen)
        time.sleep(PAUSE_S)
