"""Instruments: where the debug checkers and the tracepoints attach, declared at the functions they watch.

A function of an MMU part that a checker, a tracepoint or the timeline watches
carries `@site("debug")`, `@site("trace")`, `@site("timeline")` or several, at
its definition, where a reader of the kernel function looks.  What runs there
lives in shmmmu.mmu.debug (DEBUG), shmmmu.mmu.tracepoints (TRACE) and
shmmmu.trace.timeline (TIMELINE), keyed "part.function"; when an Mmu is built
with debug on, --tracepoints or --timeline, each is installed over that one
instance's function (whatever variant it is), and with all off nothing is
wrapped: the sites cost nothing.  tests check that every site has its wrapper
and every wrapper its site.

A few things watched are not functions of a part: the lock's methods (the I6
check, the timeline's waits and holds), the TLB control's flush and
acknowledgement, and RCU's grace period are methods of objects the Kvm holds,
declared in OBJECT_SITES.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable)

KINDS = ("debug", "trace", "timeline")

# watched methods of objects that are no MMU part: "handle.method" -> kinds (the handle is an attribute of Kvm)
OBJECT_SITES: dict[str, tuple[str, ...]] = {
    "lock.read_unlock": ("debug", "timeline"),  # I6: never drop mmu_lock with changes unflushed; holds end
    "lock.write_unlock": ("debug", "timeline"),
    "lock.read_lock": ("timeline",),            # waits for mmu_lock, holds begin
    "lock.write_lock": ("timeline",),
    "tlbctl.flush_remote_tlbs": ("timeline",),  # the flusher's wait for the vCPUs' acknowledgements
    "tlbctl.process_requests": ("timeline",),   # a vCPU taking a flush request at guest entry
    "rcu.synchronize": ("timeline",),           # a grace period
    "rcu.reclaim_pass": ("timeline",),          # the reclaimer's grace period, then the frees
}


def site(*kinds: str) -> Callable[[F], F]:
    """Mark a function as a place where the instruments of `kinds` attach."""
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown instrument kind {k!r}")

    def mark(fn: F) -> F:
        fn.instrument_site = frozenset(kinds)           # type: ignore[attr-defined]
        return fn
    return mark


def kinds_of(fn: object) -> frozenset[str]:
    """The instrument kinds a function is a site of (none: not a site)."""
    return getattr(getattr(fn, "__func__", fn), "instrument_site", frozenset())


def site_target(mmu: Any, key: str, kind: str) -> Any:
    """The object whose function `key` ("part.function", "kvm.function" or an OBJECT_SITES "handle.method")
    an instrument of `kind` replaces; ValueError if that function is not declared a site of `kind`."""
    owner, name = key.split(".")
    if key in OBJECT_SITES:
        if kind not in OBJECT_SITES[key]:
            raise ValueError(f"{key} is not a {kind} site")
        return getattr(mmu.kvm, owner)
    target = mmu.kvm if owner == "kvm" else getattr(mmu, owner)
    if kind not in kinds_of(getattr(type(target), name, None)):
        raise ValueError(f"{key} is not declared a {kind} site (@site({kind!r}) at its definition)")
    return target
