"""Scenarios: small named races for the explorer, each a few actors calling the operations stress uses.

A scenario says what VM to build (8-entry tables, one small memslot), what
to do first with nobody racing (`prologue`: map pages, enable logging), and
which actors then race: vCPUs doing guest accesses (shmmmu.guest.Vcpu: TLB,
hardware walk, page faults), host operations (shmmmu.mmu.Mmu's entry points:
zaps, unmaps, dirty logging, zap-all) and, where tables are freed, the
reclaimer (Rcu.reclaim_pass).  `targets` names the bug switches it is aimed
at; `--bug NAME` alone picks the first scenario that targets NAME.  `mix`
draws a small random mix of the same operations from its seed.

Every scenario ends with the same oracles (shmmmu.explore.explorer): the
violations the debug checkers recorded, the whole-VM invariants
(shmmmu.checks), guest memory, and VM destruction; `oracle` adds its own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu.explore.actors import (accesses, host_ops, kworker, reader_vs_waiting_writer, reclaimer,
                                   readers_around_waiting_writer)
from shmmmu.layout import MemslotSpec
from shmmmu.workloads import EXEC, READ, WRITE, make_value

Context = Any                # shmmmu.explore.explorer.Context (not imported: the explorer imports this module)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    targets: tuple[str, ...]
    build: Callable[[Context], None]                       # adds the racing actors
    prologue: Callable[[Context], None] | None = None      # run alone, before the snapshot
    oracle: Callable[[Context], list[str]] | None = None   # extra end-of-execution checks
    lock_mode: str = "shared"
    memslots: tuple[tuple[int, int, int], ...] = ((0, 64, 1),)
    n_vcpus: int = 1
    n_host: int = 1                                          # host actors (worker slots beside the reclaimer)
    root_roles: int = 1                                      # VMConfig.root_roles
    strategy: str = "dfs"                                    # the strategy --bug NAME uses by default
    depth: int = 3
    step_bound: int = 30000
    nx_huge_pages: bool = False                              # VMConfig.nx_huge_pages (an exec fault maps 4K)
    mmu_seq_start: int = 0                                   # VMConfig.mmu_seq_start
    params: dict = field(default_factory=dict)

    def memslot_specs(self) -> list[MemslotSpec]:
        return [MemslotSpec(*m) for m in self.memslots]


# ---------------------------------------------------------------- the scenarios (the actor bodies: actors.py)


def _fault_fault(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE)]))
    ctx.actor("vCPU1", accesses(ctx, 1, [(2, WRITE)]))


def _fault_zap(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE)]))
    ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 0, 64)]))


def _premap(gfns: list[int], write: bool = True) -> Callable[[Context], None]:
    def pro(ctx: Context) -> None:
        v = ctx.vcpu(0)
        v.enter()
        for g in gfns:
            v.write(g, make_value(g, 0, 1)) if write else v.read(g)
        v.exit()
    return pro


def _walk_zap_reclaim(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(9, WRITE)]))
    ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 0, 64)]))
    ctx.actor("reclaimer", reclaimer(ctx), daemon=True)


def _split_huge(ctx: Context) -> None:
    # vCPU1 uses the huge translation it cached while vCPU0's write fault splits the huge page
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE)]))
    ctx.actor("vCPU1", accesses(ctx, 1, [(2, READ), (3, READ), (2, WRITE)]))


def _split_pro(ctx: Context) -> None:
    _premap([1], write=False)(ctx)
    ctx.host(0).enable_dirty_logging(0)


def _fault_unmap(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE), (1, READ)]))
    ctx.actor("host", host_ops(ctx, [("host_unmap", 0, 8)]))


def _zap_yield(ctx: Context) -> None:
    # vCPU0 caches translations of 1 and 2, waits on the lock with a fault on 20, then uses them again;
    # the host zaps the 4K leaves of 1-3 (a range that covers no whole table, so nothing is torn down)
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, READ), (2, READ), (20, WRITE), (1, READ), (2, READ)]))
    ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 1, 4)]))


def _zap_all_yield(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(700, WRITE)]))
    ctx.actor("host", host_ops(ctx, [("zap_all",)]))


def _dirty_log(ctx: Context) -> None:
    def host() -> None:
        mmu = ctx.host(0)
        mmu.enable_dirty_logging(0)
        ctx.notes["after_enable"] = ctx.guest_values()
        ctx.notes["bitmap"] = mmu.get_dirty_log(0)
    ctx.actor("vCPU0", accesses(ctx, 0, [(3, WRITE), (5, WRITE)]))
    ctx.actor("host", host)


def _dirty_log_oracle(ctx: Context) -> list[str]:
    """dirty_log_test's rule: a page written after logging was enabled is reported by the next collection."""
    before = ctx.notes.get("after_enable")
    if before is None:
        return []
    bitmap = ctx.notes["bitmap"] | ctx.host(0).get_dirty_log(0)
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: before.size].astype(bool)
    changed = ctx.guest_values() != before
    return [f"dirty-log-missed: gfn {int(g):#x} was written after dirty logging was enabled and never reported"
            for g in np.flatnonzero(changed & ~bits)[:4]]


def _manual_clear_pro(ctx: Context) -> None:
    """A page written, logged, harvested and re-protected; logging off and on again with INITIALLY_SET:
    its bit is set again while its leaf is already write-protected (what K3 trips on)."""
    _premap([0, 1, 2, 3])(ctx)
    mmu = ctx.host(0)
    mmu.enable_dirty_logging(0)
    mmu.get_dirty_log(0)
    mmu.disable_dirty_logging(0)


def _manual_clear(ctx: Context) -> None:
    def host() -> None:
        mmu = ctx.host(0)
        mmu.enable_dirty_logging(0, initially_set=True)
        bitmap = mmu.get_dirty_log(0, clear=False)
        mmu.clear_dirty_log(0, 0, bitmap)
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE)]))
    ctx.actor("host", host)


def _destroy_small(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(5, WRITE)]))
    ctx.actor("host", host_ops(ctx, [("zap_all",)]))


def _memslot_fault(ctx: Context) -> None:
    # vCPU0 is on its way into a fault when the hot-plug slot is deleted: its root is invalidated and
    # zapped under the read lock while its fault (read lock too) walks that root
    ctx.actor("vCPU0", accesses(ctx, 0, [(2, WRITE), (3, READ)]))
    ctx.actor("host", host_ops(ctx, [("delete_memslot", 1)]))


def _memslot_unmap(ctx: Context) -> None:
    # the fast zapper of the deleted slot yields; an MMU notifier for the slot's pages runs meanwhile
    ctx.actor("host", host_ops(ctx, [("delete_memslot", 1)]))
    ctx.actor("notifier", host_ops(ctx, [("host_unmap", 32, 48)], host=1))


def _unmap_reload_pro(ctx: Context) -> None:
    """Pages mapped, then the write-lock half of a fast zap: every root invalid, the zap still to come."""
    _premap([1, 9, 12])(ctx)
    ctx.host(0).zap_all_fast_invalidate()


def _unmap_reload(ctx: Context) -> None:
    # the fast zap's read-lock half, an MMU notifier walking the roots (the invalid one too), and vCPU0
    # reloading (it drops the last reference to its old root, whose table is retired: a walk that comes
    # back to it from a yield reads a table retired before its read-side section began, Reader Pipe 2)
    ctx.actor("host", host_ops(ctx, [("zap_all_fast_zap",)]))
    ctx.actor("notifier", host_ops(ctx, [("host_unmap", 0, 16)], host=1))
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, READ)]))


def _zap_zap(ctx: Context) -> None:
    # two range zaps under the read lock (kvm_zap_gfn_range from two threads) walk the same roots,
    # each taking and dropping a reference on every root it visits
    ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 0, 8)]))
    ctx.actor("host1", host_ops(ctx, [("zap_gfn_range_locked", 8, 16)], host=1))


def _aged_pro(ctx: Context) -> None:
    """Pages mapped, then aged (clear_flush_young): their leaves have A clear, which the processor may set."""
    _premap([1, 2, 3])(ctx)
    ctx.host(0).clear_young(0, 8)


def _age_unmap(ctx: Context) -> None:
    # the guest touches an aged page (the processor sets A) while the host unmaps it under the write lock
    ctx.actor("vCPU0", accesses(ctx, 0, [(2, READ)]))
    ctx.actor("host", host_ops(ctx, [("host_unmap", 0, 8)]))


def _zap_roots_pro(ctx: Context) -> None:
    """vCPU0's root (role 0) maps 1-3, vCPU1's (role 1) only 3: the second root's walk over [1, 4) makes
    progress over empty entries before it zaps anything."""
    for i, gfns in ((0, [1, 2, 3]), (1, [3])):
        v = ctx.vcpu(i)
        v.enter()
        for g in gfns:
            v.read(g)
        v.exit()


def _zap_roots_yield(ctx: Context) -> None:
    # an MMU notifier (write lock) zaps 4K leaves in both roots (no table torn down: the flush is owed);
    # vCPU0 faults and waits for the lock, so the walk of the second root yields
    ctx.actor("vCPU0", accesses(ctx, 0, [(20, WRITE)]))
    ctx.actor("host", host_ops(ctx, [("host_unmap", 1, 4)]))


def _kick_unmap(ctx: Context) -> None:
    # vCPU0 caches the translation of 1 and uses it again; the host unmaps and migrates the page (MMU
    # notifier): its flush must wait until vCPU0 takes the kick, at an access boundary
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, READ), (1, WRITE)]))
    ctx.actor("host", host_ops(ctx, [("host_unmap", 0, 8)]))


def _psc_free(ctx: Context) -> None:
    # vCPU0's first access caches the non-leaf entries on the path of 1; its second (a TLB miss on 2, in
    # the same 4K table) starts its walk from the cached entry, while the host tears the tables down under
    # the read lock and the reclaimer frees them after a grace period the hardware walk is no part of
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, READ), (2, READ)]))
    ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 0, 8)]))
    ctx.actor("reclaimer", reclaimer(ctx), daemon=True)


def _psc_unmap(ctx: Context) -> None:
    # psc-free's walk beside a teardown under the write lock (an MMU notifier's unmap): the flush the table's
    # teardown does before call_rcu is all that keeps the cached entry from outliving the table
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, READ), (2, READ)]))
    ctx.actor("host", host_ops(ctx, [("host_unmap", 0, 8)]))
    ctx.actor("reclaimer", reclaimer(ctx), daemon=True)


# ---------------------------------------------------------------- the coverage family (--coverage's target)
# Each MMU operation meets a fault and guest accesses on a huge and on a 4K leaf: slot 0 is 2 MiB-backed (a
# huge leaf maps gfn 0-7 after the prologue), slot 1 4 KiB-backed (gfn 33 mapped).  The vCPU writes the huge
# page, faults a new 4K path (gfn 40) and reads the mapped 4K page; the host runs the operation.  The dirty-log
# operations run with logging on for slot 0 (the huge page is split by the write), and their oracle is
# dirty_log_test's: a page written after logging was enabled, or after a harvest, is in the next harvest.

COVER_SLOTS = ((0, 32, 2), (32, 32, 1))
_COVER_ACCESSES = [(2, WRITE), (40, WRITE), (33, READ)]


def _cover_pro(logging: bool = False, initially_set: bool = False, nx: bool = False) -> Callable[[Context], None]:
    def pro(ctx: Context) -> None:
        v = ctx.vcpu(0)
        v.enter()
        v.write(1, make_value(1, 0, 1))
        v.write(33, make_value(33, 0, 1))
        if nx:
            v.fetch(12)                          # an instruction fetch in a huge page: mapped 4K (NX split)
        v.exit()
        if logging:
            mmu = ctx.host(0)
            mmu.enable_dirty_logging(0, initially_set=initially_set)
            ctx.notes["after_enable"] = ctx.guest_values()
    return pro


def _cover(host: Callable[[Context], Callable[[], None]], ops: list[tuple[int, int]] = _COVER_ACCESSES
           ) -> Callable[[Context], None]:
    def build(ctx: Context) -> None:
        ctx.actor("vCPU0", accesses(ctx, 0, ops))
        ctx.actor("host", host(ctx))
    return build


def _ops(*ops: tuple) -> Callable[[Context], Callable[[], None]]:
    return lambda ctx: host_ops(ctx, list(ops))


def _harvest(clear: bool) -> Callable[[Context], Callable[[], None]]:
    """GET_DIRTY_LOG (and with clear=False, CLEAR_DIRTY_LOG of what it returned: manual protect)."""
    def host(ctx: Context) -> Callable[[], None]:
        def run() -> None:
            mmu = ctx.host(0)
            bitmap = mmu.get_dirty_log(0, clear=clear)
            if not clear:
                mmu.clear_dirty_log(0, 0, bitmap)
            ctx.notes["bitmap"] = bitmap
        return run
    return host


def _enable(ctx: Context) -> Callable[[], None]:
    def run() -> None:
        mmu = ctx.host(0)
        mmu.enable_dirty_logging(0)
        ctx.notes["after_enable"] = ctx.guest_values()
        ctx.notes["bitmap"] = mmu.get_dirty_log(0)
    return run


def _cover_scenarios() -> list[Scenario]:
    def sc(op: str, what: str, host, **kw) -> Scenario:
        build = _cover(host, kw.pop("accesses", _COVER_ACCESSES))
        return Scenario(f"cover-{op}", f"coverage: {what} beside a fault and accesses on huge and 4K leaves", (),
                        build, prologue=kw.pop("prologue", _cover_pro()), memslots=COVER_SLOTS, **kw)
    return [
        sc("zap-range", "kvm_zap_gfn_range over both slots (read lock), then a remote flush",
           _ops(("zap_gfn_range_locked", 0, 64), ("flush_remote_tlbs",))),
        sc("zap-all", "zap-all (write lock)", _ops(("zap_all",))),
        sc("unmap", "an MMU notifier unmapping both slots' pages", _ops(("host_unmap", 0, 48))),
        sc("memslot", "deleting the 4K slot (fast invalidation) and adding it back", _ops(("delete_memslot", 1),
                                                                                       ("add_memslot", 1))),
        sc("memslot-move", "moving the 4K slot away and back (KVM_MR_MOVE: fast invalidation, a new base)",
           _ops(("move_memslot", 1, 64), ("move_memslot", 1, 32))),
        sc("roots", "every root invalidated and zapped (kvm_mmu_zap_all_fast): the vCPU reloads its root",
           _ops(("kvm_mmu_zap_all_fast",))),
        sc("dirty-enable", "enabling dirty logging on the huge slot, then a harvest", _enable,
           oracle=_dirty_log_oracle),
        sc("dirty-get", "a harvest (GET_DIRTY_LOG) with logging on", _harvest(True),
           prologue=_cover_pro(logging=True), oracle=_dirty_log_oracle),
        sc("dirty-clear", "a manual-protect harvest: GET then CLEAR_DIRTY_LOG", _harvest(False),
           prologue=_cover_pro(logging=True, initially_set=True), oracle=_dirty_log_oracle),
        sc("dirty-disable", "disabling dirty logging (the collapsible zap)", _ops(("disable_dirty_logging", 0)),
           prologue=_cover_pro(logging=True)),
        sc("age", "aging: clear_flush_young and test_young over both slots", _ops(("clear_young", 0, 48),
                                                                                  ("test_young", 0, 48))),
        sc("nx-recover", "NX huge page recovery zapping the split huge page's table",
           _ops(("recover_nx_lpages", 1)), prologue=_cover_pro(nx=True), nx_huge_pages=True,
           accesses=[(2, WRITE), (20, EXEC), (33, READ)]),
    ]


MIX_OPS = ["zap_gfn_range_locked", "host_unmap", "zap_all", "flush_remote_tlbs", "dirty-log", "memslot"]


def _mix(ctx: Context) -> None:
    rng = random.Random(f"mix:{ctx.scenario.params.get('seed', 0)}")
    for v in range(2):
        ops = [(rng.randrange(24), rng.choice([READ, WRITE, WRITE])) for _ in range(rng.randint(1, 3))]
        ctx.actor(f"vCPU{v}", accesses(ctx, v, ops))
    hops: list[tuple] = []
    for _ in range(rng.randint(1, 2)):
        op = rng.choice(MIX_OPS)
        a = rng.randrange(24)
        b = min(64, a + rng.choice([1, 8, 16]))
        if op in ("zap_gfn_range_locked", "host_unmap"):
            hops.append((op, a, b))
        elif op == "dirty-log":
            hops += [("enable_dirty_logging", 0), ("get_dirty_log", 0), ("disable_dirty_logging", 0)]
        elif op == "memslot":
            hops += [("delete_memslot", 0), ("add_memslot", 0)]
        else:
            hops.append((op,))
    ctx.actor("host", host_ops(ctx, hops))
    if rng.random() < 0.5:
        ctx.actor("reclaimer", reclaimer(ctx), daemon=True)


def _seq_wrap_pro(ctx: Context) -> None:
    """The sequence one below 2^31 (VMConfig.mmu_seq_start); one unmap takes it there."""
    ctx.host(0).host_unmap(40, 48)


def _seq_wrap(ctx: Context) -> None:
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE), (2, READ)]))
    ctx.actor("host", host_ops(ctx, [("host_unmap", 48, 56)]))


def _split_log_pro(ctx: Context) -> None:
    _premap([1, 9, 17], write=True)(ctx)


def _split_log(ctx: Context) -> None:
    # enabling dirty logging splits the huge leaves (6.12: eagerly, under the read lock) and write-protects;
    # vCPU0 writes through what it cached and faults (6.12: the fast path fixes the write-protected leaf);
    # the harvest re-protects
    def host() -> None:
        mmu = ctx.host(0)
        mmu.enable_dirty_logging(0)
        ctx.notes["after_enable"] = ctx.guest_values()
        ctx.notes["bitmap"] = mmu.get_dirty_log(0)
    ctx.actor("vCPU0", accesses(ctx, 0, [(1, WRITE), (2, WRITE), (10, WRITE)]))
    ctx.actor("host", host)


def _clear_split_pro(ctx: Context) -> None:
    """Huge leaves over gfn 0-7 and 8-15 (2 MiB-backed slot), logging enabled with manual protect and
    INITIALLY_SET (6.12: nothing split or protected yet)."""
    _premap([1, 9])(ctx)
    ctx.host(0).enable_dirty_logging(0, initially_set=True)


def _clear_split(ctx: Context) -> None:
    # CLEAR_DIRTY_LOG names pages 2..8, across both huge pages (6.12 splits both: the last page named is the
    # first of the second); vCPU0 writes into each
    def host() -> None:
        bitmap = np.zeros(1, dtype=np.uint64)
        bitmap[0] = sum(1 << g for g in range(2, 9))
        ctx.host(0).clear_dirty_log(0, 0, bitmap)
    ctx.actor("vCPU0", accesses(ctx, 0, [(3, WRITE), (9, WRITE)]))
    ctx.actor("host", host)


def _memslot_roots_pro(ctx: Context) -> None:
    """Both vCPUs on one root (one role): vCPU0 maps 1 and 33-34 of the hot-plug slot, vCPU1 maps 3."""
    for i, gfns in ((0, [1, 33, 34]), (1, [3])):
        v = ctx.vcpu(i)
        v.enter()
        for g in gfns:
            v.write(g, make_value(g, i, 1))
        v.exit()


def _memslot_roots(ctx: Context) -> None:
    # the hot-plug slot is deleted: the root is invalidated and zapped (6.12: zapped, then the TDP MMU's reference
    # put, under the read lock) while both vCPUs, kicked by the reload request, put it and race to allocate its
    # successor (6.12: under the read lock, the second finding the first's under tdp_mmu_pages_lock).  B8 queues
    # the zap for a kworker instead.
    from shmmmu.variants import traits
    ctx.actor("host", host_ops(ctx, [("delete_memslot", 1)]))
    ctx.actor("vCPU0", accesses(ctx, 0, [(2, READ)]))
    ctx.actor("vCPU1", accesses(ctx, 1, [(4, READ)]))
    if "root-zap-worker" in traits(ctx.config.kernel, list(ctx.config.bugs)):
        ctx.actor("kworker", kworker(ctx, 1), daemon=True)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("fault-fault", "two vCPUs fault neighbouring pages on a fresh tree: both link the same new tables",
             ("fault-plain-store", "pages-lock-in-read-fault", "pages-lock-in-tdp-mmu-fault"), _fault_fault, n_vcpus=2),
    Scenario("fault-zap", "a fault builds a fresh path while the host zaps the range under the read lock "
             "(5.13's kvm_zap_gfn_range)", ("link-after-publish", "zero-removed-children", "cas-over-removed",
                                            "rcu-free-immediately"), _fault_zap),
    Scenario("fault-zap-mapped", "a fault on a mapped path while the host zaps it: the walker is inside the "
             "tables being torn down", ("zero-removed-children", "cas-over-removed", "rcu-free-immediately"),
             _fault_zap, prologue=_premap([2, 10])),
    Scenario("walk-zap-reclaim", "a walk, a zap and the reclaimer ending grace periods: tables freed while "
             "a reader may still hold them", ("rcu-free-immediately",), _walk_zap_reclaim,
             prologue=_premap([2, 10])),
    Scenario("split-huge", "a write fault splits a huge page (dirty logging) while another vCPU uses its cached "
             "huge translation", ("fault-zap-flush-late",), _split_huge, prologue=_split_pro,
             memslots=((0, 64, 2),), n_vcpus=2),
    Scenario("fault-unmap", "a fault resolves its host page while the host migrates it (MMU notifier)",
             ("no-notifier-recheck",), _fault_unmap),
    Scenario("zap-yield", "an exclusive zap yields to a faulting vCPU that keeps using translations it cached",
             ("no-forward-progress",), _zap_yield, prologue=_premap(list(range(16))), lock_mode="exclusive"),
    Scenario("zap-all-yield-shared", "zap-all-yield with its fault under the read lock, 6.12's only mode",
             ("advance-after-restart",), _zap_all_yield, prologue=_premap([1, 600, 900]), memslots=((0, 1024, 1),)),
    Scenario("zap-all-yield", "zap-all of two root entries yields to a faulting vCPU",
             ("advance-after-restart",), _zap_all_yield, prologue=_premap([1, 600, 900]),
             memslots=((0, 1024, 1),), lock_mode="exclusive"),
    Scenario("dirty-log", "writes race with enabling dirty logging and the first harvest",
             ("no-wrprot-on-enable",), _dirty_log, prologue=_premap([3, 5]), oracle=_dirty_log_oracle),
    Scenario("manual-clear", "CLEAR_DIRTY_LOG of a mask naming a leaf already write-protected",
             ("dirty-mask-late-clear",), _manual_clear, prologue=_manual_clear_pro),
    Scenario("destroy-small", "zap-all and VM destruction of a VM smaller than one root entry's span",
             ("zap-all-phys-end",), _destroy_small, prologue=_premap([1, 40])),
    Scenario("memslot-fault", "a vCPU faults while the hot-plug slot is deleted: its root is invalidated "
             "and zapped under the read lock beside the fault (5.13's fast invalidation)",
             ("fault-into-invalid-root",), _memslot_fault, prologue=_premap([1, 40]),
             memslots=((0, 32, 1), (32, 32, 1))),
    Scenario("memslot-unmap", "an MMU notifier for the slot's pages while the slot's deletion zaps the "
             "invalidated roots (and yields)", ("unmap-skips-invalid-roots",), _memslot_unmap,
             prologue=_premap([33, 40, 44]), memslots=((0, 32, 1), (32, 32, 1)), n_host=2),
    Scenario("unmap-reload", "an MMU notifier walks the roots while a vCPU reloads after a memslot deletion "
             "and drops the last reference to its old root", ("notifier-unsafe-root-walk",), _unmap_reload,
             prologue=_unmap_reload_pro, memslots=((0, 32, 1), (32, 32, 1)), n_host=2),
    Scenario("zap-zap-roots", "two read-lock range zaps take and drop references on the same roots",
             ("root-refcount-not-atomic",), _zap_zap, prologue=_premap([1, 9]), n_host=2),
    Scenario("age-unmap", "the guest touches an aged page while the host unmaps it: the processor sets A "
             "beside the write-lock zap", ("exclusive-plain-store",), _age_unmap, prologue=_aged_pro),
    Scenario("zap-roots-yield", "an MMU notifier zaps two roots and yields in the second to a faulting vCPU",
             ("yield-with-owed-flush",), _zap_roots_yield, prologue=_zap_roots_pro, n_vcpus=2,
             root_roles=2),
    Scenario("seq-wrap", "a fault while the invalidation sequence passes 2^31 (a VM that has seen that many "
             "invalidations)", ("mmu-seq-int-snapshot",), _seq_wrap, prologue=_seq_wrap_pro,
             mmu_seq_start=(1 << 31) - 1),
    Scenario("split-log", "enabling dirty logging on huge-backed memory while a vCPU writes through its cached "
             "translations, then a harvest (6.12: eager split and the fast page fault)", (), _split_log,
             prologue=_split_log_pro, memslots=((0, 64, 2),), oracle=_dirty_log_oracle),
    Scenario("clear-split", "KVM_CLEAR_DIRTY_LOG across two huge pages with manual protect and INITIALLY_SET while "
             "a vCPU writes into both (6.12: split at CLEAR)", ("clear-split-off-by-one",), _clear_split,
             prologue=_clear_split_pro, memslots=((0, 64, 2),)),
    Scenario("zap-range-fault", "a vCPU faults gfn 1 while kvm_zap_gfn_range zaps 2 and 3 and may yield to it (6.12: "
             "in an invalidation of the range, so the fault retries)", ("zap-range-faults-not-blocked",), _fault_zap,
             prologue=_premap([2, 3])),
    Scenario("memslot-roots", "the hot-plug slot is deleted while both vCPUs reload: their root invalidated and "
             "zapped, the TDP MMU's reference put after the zap (6.12) or the zap queued for a kworker (B8), a new "
             "root allocated by whichever vCPU comes first", ("roots-zapped-by-worker",), _memslot_roots,
             prologue=_memslot_roots_pro, memslots=((0, 32, 1), (32, 32, 1)), n_vcpus=2, n_host=2),
    Scenario("mix", "a small random mix of vCPU accesses and host operations drawn from --mix-seed", (), _mix,
             n_vcpus=2, memslots=((0, 64, 2),)),
    Scenario("kick-unmap", "a vCPU uses its cached translation again while the host unmaps the page: the "
             "notifier's flush returns only after the vCPU took its kick", (), _kick_unmap,
             prologue=_premap([1, 2])),
    Scenario("psc-free", "a vCPU's walk starts from a paging-structure-cache entry while the host tears the "
             "tables down and the reclaimer frees them", (), _psc_free, prologue=_premap([1, 2])),
    Scenario("psc-unmap", "psc-free with the tables torn down under the write lock (an MMU notifier's unmap): "
             "only the teardown's flush before call_rcu keeps the cached entry from outliving the table", (),
             _psc_unmap, prologue=_premap([1, 2])),
    *_cover_scenarios(),
]}


def for_bug(bug: str) -> Scenario:
    """The first scenario that targets `bug`."""
    for s in SCENARIOS.values():
        if bug in s.targets:
            return s
    raise ValueError(f"no scenario targets {bug!r}")


# ---- scenarios for mutants (helper 9)
# Races the mutation catalogue (tools/mutants) needed and no scenario above reached, each appended to SCENARIOS:
# the first page of an invalidation, a huge fault beside enabling dirty logging, a re-access after aging,
# NX tracking beside a zap and beside another fault, and a reader that comes back while a writer waits.

def _barged_oracle(ctx: Context) -> list[str]:
    return (["lock-unfair: a reader took mmu_lock past a writer waiting for the readers to drain"]
            if ctx.notes.get("barged") else [])


def _premap_then_log(ctx: Context) -> None:
    _premap([9])(ctx)                                   # a huge leaf over gfns 8-15
    ctx.host(0).enable_dirty_logging(0)                 # write-protected, and no longer allowed huge


def _premap_read_then_log(ctx: Context) -> None:
    _premap([40], write=False)(ctx)                     # a huge leaf over gfns 40-47, and the tables above it
    ctx.host(0).enable_dirty_logging(0)                 # 4K only while logging (6.12 splits the huge leaf)


def _logging_oracle(ctx: Context) -> list[str]:
    from shmmmu.checks import check_logging_slots
    return [str(p) for p in check_logging_slots(ctx.explorer.vm)] + _dirty_log_oracle(ctx)


SCENARIOS.update({s.name: s for s in [
    Scenario("fault-unmap-first-page", "a fault on the first page of an MMU-notifier invalidation in progress",
             (), lambda ctx: (ctx.actor("vCPU0", accesses(ctx, 0, [(8, WRITE), (8, READ)])),
                              ctx.actor("host", host_ops(ctx, [("host_unmap", 8, 16)])))),
    Scenario("dirty-enable-huge-fault", "a fault maps a huge page while the host enables dirty logging on its slot",
             (), lambda ctx: (ctx.actor("vCPU0", accesses(ctx, 0, [(9, WRITE), (10, WRITE)])),
                              ctx.actor("host", _enable(ctx))), oracle=_logging_oracle, memslots=((0, 64, 2),)),
    Scenario("dirty-split-reread", "a vCPU reads a huge page write-protected for dirty logging, writes it (its "
             "own fault splits the page and flushes) and reads the next page of it", (),
             lambda ctx: ctx.actor("vCPU0", accesses(ctx, 0, [(10, READ), (9, WRITE), (10, READ)])),
             prologue=_premap_then_log, memslots=((0, 64, 2),)),
    Scenario("age-reaccess", "the guest reads a page before and after the host ages it (clear_flush_young)", (),
             lambda ctx: (ctx.actor("vCPU0", accesses(ctx, 0, [(2, READ), (2, READ)])),
                          ctx.actor("host", host_ops(ctx, [("clear_young", 0, 8)]))), prologue=_premap([1, 2, 3])),
    Scenario("nx-fault-zap", "an instruction fetch links an NX-disallowed table while the host zaps its range "
             "under the read lock", (),
             lambda ctx: (ctx.actor("vCPU0", accesses(ctx, 0, [(20, EXEC)])),
                          ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 16, 24)]))),
             prologue=_premap([40], write=False), memslots=((0, 64, 2),), nx_huge_pages=True),
    Scenario("nx-fault-collapse", "an instruction fetch links an NX-disallowed table while disabling dirty logging "
             "zaps the collapsible tables under the read lock", ("nx-add-after-zap",),
             lambda ctx: (ctx.actor("vCPU0", accesses(ctx, 0, [(20, EXEC)])),
                          ctx.actor("host", host_ops(ctx, [("disable_dirty_logging", 0)]))),
             prologue=_premap_read_then_log, memslots=((0, 64, 2),), nx_huge_pages=True),
    Scenario("nx-fault-fault", "two instruction fetches link NX-disallowed tables at once (the NX list under "
             "tdp_mmu_pages_lock)", (),
             lambda ctx: (ctx.actor("vCPU0", accesses(ctx, 0, [(4, EXEC)])),
                          ctx.actor("vCPU1", accesses(ctx, 1, [(20, EXEC)]))),
             prologue=_premap([40], write=False), memslots=((0, 64, 2),), nx_huge_pages=True, n_vcpus=2),
    Scenario("reader-vs-waiting-writer", "a reader takes mmu_lock again and again while a writer waits for it "
             "(qrwlock fairness)", (), reader_vs_waiting_writer, oracle=_barged_oracle, n_host=2),
    Scenario("readers-around-writer", "a reader leaves mmu_lock while a writer waits for the readers to drain "
             "and another arrives as the writer takes it", (), readers_around_waiting_writer, n_host=3),
]})
