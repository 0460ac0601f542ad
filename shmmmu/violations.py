"""Violations: the kinds of invariant breach the checkers report, their record in the region, and each in words.

Any process that sees a breach appends a record (kind, worker, gfn, two
values, and the site that recorded it); the supervisor reads them all and
prints them with the seed and a replay command.  The first MAX_VIOLATIONS are
kept, all are counted.

What the two values mean depends on the checker that recorded them, so the
record also names its site (the function that called `record`, found on the
stack: a violation is rare, the look costs nothing the rest of the time), and
`Violation.sentence()` says what happened in words, from the one table here
(SITES): the tables, entries and actors involved.  The raw fields stay as they
are (`str()`, JSON).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from shmmmu import spte as S
from shmmmu.layout import MAX_VIOLATIONS, Ctl, Held, TableState, ViolationRow as V

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
    "fault-retry-without-cause",      # a fault retried as stale though nothing invalidated since its snapshot
    "huge-page-after-clear",          # a huge leaf left in a range KVM_CLEAR_DIRTY_LOG split (6.12)
    "install-in-zapped-range",        # a fault installed a leaf a kvm_zap_gfn_range was removing (6.12, B9)
    "root-zap-off-caller",            # an invalidated root was zapped by a task that did not ask for it (6.12, B8)
]
KIND = {k: i for i, k in enumerate(KINDS)}

U64 = (1 << 64) - 1
_STATES = TableState.NAMES
_HELD = {Held.NONE: "not held", Held.READ: "for read", Held.WRITE: "for write"}


def spte_words(v: int) -> str:
    """An entry's value in words, whole, without its level: not present, REMOVED, or present with PFN and bits."""
    if v == 0:
        return "0 (not present)"
    if v == S.REMOVED:
        return f"{v:#x} (REMOVED: frozen by a zap)"
    if not v & S.MMU_PRESENT:
        return f"{v:#x} (not present)"
    flags = S.flag_string(v).replace("MT0 ", "").replace(" MT0", "")      # a table link has no memory type
    return f"{v:#x} (present, PFN {S.pfn(v):#x}, {flags})"


@dataclass(frozen=True)
class Facts:
    """What a sentence may use: the record's fields, with the names of workers and entries."""

    kind: str
    worker: int
    gfn: int
    a: int
    b: int
    who: Callable[[int], str]            # worker slot -> name ("vCPU0", "host", "worker 3")
    entries: int                         # entries per table (0: unknown)

    @property
    def w(self) -> str:
        return self.who(self.worker)

    def entry(self, sptep: int) -> str:
        if self.entries:
            t, i = divmod(sptep, self.entries)
            return f"entry t{t}[{i}]"
        return f"entry word {sptep}"


def _state(s: int) -> str:
    return _STATES.get(s, f"in state {s}")


Sentence = Callable[[Facts], str]

# (kind, the function that records it) -> the sentence.  The function is `file:qualname` of the caller of
# record() (or of Kvm.violation); the order is the record's SITE word: append, never reorder.
SITES: list[tuple[str, str, Sentence]] = [
    ("stale-translation", "guest.py:Vcpu._check_fresh", lambda f:
        f"{f.w} used its TLB's translation of gfn {f.gfn:#x} (from entry value {spte_words(f.a)}) after the entry "
        f"had become {spte_words(f.b)} and every flush since had completed: a zapped translation outlived its "
        f"flush (I5)"),
    ("stale-translation", "guest.py:Vcpu._run_batch_c", lambda f:
        f"{f.w} used its TLB's translation of gfn {f.gfn:#x} (from entry value {spte_words(f.a)}) after the entry "
        f"had become {spte_words(f.b)} and every flush since had completed: a zapped translation outlived its "
        f"flush (I5)"),
    ("write-to-unmapped-host-page", "guest.py:Vcpu.write", lambda f:
        f"{f.w} wrote gfn {f.gfn:#x} into host page {f.a:#x}, which no guest mapping owns any more (it still held "
        f"the poison put there when it was unmapped): the translation used was stale"),
    ("write-to-unmapped-host-page", "guest.py:Vcpu.read", lambda f:
        f"{f.w} read gfn {f.gfn:#x} from host page {f.a:#x} and found the poison of an unmapped page: the "
        f"translation used was stale"),
    ("write-to-unmapped-host-page", "guest.py:Vcpu.fetch", lambda f:
        f"{f.w} fetched gfn {f.gfn:#x} from host page {f.a:#x} and found the poison of an unmapped page: the "
        f"translation used was stale"),
    ("write-to-unmapped-host-page", "guest.py:Vcpu._run_batch_c", lambda f:
        f"{f.w} accessed gfn {f.gfn:#x} in host page {f.a:#x}, which holds the poison of an unmapped page: the "
        f"translation used was stale"),
    ("guest-memory-corrupt", "guest.py:Vcpu.run_batch_reference", lambda f:
        f"{f.w} read gfn {f.gfn:#x} and got {f.a:#x}, a value written for gfn {f.a & 0xFFFFFFFF:#x}: no write to "
        f"gfn {f.gfn:#x} put it there"),
    ("guest-memory-corrupt", "guest.py:Vcpu._run_batch_c", lambda f:
        f"{f.w} read gfn {f.gfn:#x} and got {f.a:#x}, a value written for gfn {f.a & 0xFFFFFFFF:#x}: no write to "
        f"gfn {f.gfn:#x} put it there"),
    ("use-after-free", "debug.py:Debug.arrive", lambda f:
        f"{f.w}'s walk for gfn {f.gfn:#x} stepped into table t{f.a}, whose Reader-Pipe age is {f.b}: the table was "
        f"retired before this RCU read-side section began, or freed (age 0 is live, 1 retired during the "
        f"section)"),
    ("use-after-free", "debug.py:Debug.check_walk_gens", lambda f:
        f"table t{f.a}, which {f.w}'s walk for gfn {f.gfn:#x} stood in, was freed (its generation was {f.b}) "
        f"before the walk's RCU read-side section ended: a grace period ended under a reader"),
    ("install-before-flush", "debug.py:Debug.zap_ledger", lambda f:
        f"{f.w} made {f.entry(f.a)} (gfn {f.gfn:#x}) present again while {f.who(f.b)}'s zap of it had not been "
        f"flushed: two translations of gfn {f.gfn:#x} were live at once, the new one and the old one in the "
        f"vCPUs' TLBs (K5)"),
    ("lock-dropped-unflushed", "debug.py:_unlock.<locals>.checked_unlock", lambda f:
        f"{f.w} dropped mmu_lock while it held changes to the tables not yet flushed from the vCPUs' TLBs (I6)"),
    ("install-into-dead-table", "debug.py:_set_spte_atomic.<locals>.checked_set_spte_atomic", lambda f:
        f"{f.w}'s cmpxchg installed a present entry for gfn {f.gfn:#x} into table t{f.a}, which was already "
        f"{_state(f.b)}, not live: the install landed in a table being torn down (I3)"),
    ("use-after-free", "debug.py:_set_spte_atomic.<locals>.checked_set_spte_atomic", lambda f:
        f"{f.w}'s cmpxchg for gfn {f.gfn:#x} went into table t{f.a}, which was freed (its generation was {f.b} "
        f"when the walk entered it) while {f.w} still held it inside its RCU read-side section"),
    ("frozen-entry-overwritten", "debug.py:_clear_frozen_spte.<locals>.checked_clear_frozen_spte", lambda f:
        f"{f.w} cleared the frozen entry for gfn {f.gfn:#x} and found {spte_words(f.a)} in it instead of REMOVED: "
        f"another writer overwrote an entry the zap owned (I2)"),
    ("table-leak", "debug.py:_free_sp.<locals>.checked_free_sp", lambda f:
        f"{f.w} tore down table t{f.a} while it was {_state(f.b)}, not live: torn down twice, or never linked"),
    ("invariant", "debug.py:_zap_gfn_range.<locals>.checked_zap_gfn_range", lambda f:
        f"{f.w}'s zap of the root level skipped root entry {f.a} (gfn {f.gfn:#x}) and {f.b - 1} more entries of "
        f"its range: a walk of the root level must visit every entry (CVE-2021-47094)"),
    ("use-after-free", "debug.py:_cond_resched.<locals>.checked_cond_resched", lambda f:
        f"{f.w}'s walk yielded mmu_lock and resumed at gfn {f.gfn:#x} in root table t{f.a}, which was freed or "
        f"reused while the lock was dropped (its generation was {f.b}): the walk held no reference on the root"),
    ("table-leak", "ioctl.py:Ioctls.destroy", lambda f:
        f"when the VM was destroyed, {f.a} tables were still counted in tdp_mmu_pages and {f.b} roots still "
        f"listed (kvm_mmu_uninit_tdp_mmu's WARN)"),
    ("lockdep", "kvm.py:Kvm._lockdep", lambda f:
        f"{f.w} held mmu_lock {_HELD.get(f.a, f'in mode {f.a}')} where the code asserts it is held "
        f"{_HELD.get(f.b, f'in mode {f.b}')} (lockdep_assert_held)"),
    ("use-after-free", "kvm.py:Kvm._mark_host_pages", lambda f:
        f"{f.w} marked host pages {f.a:#x}-{f.a + f.b - 1:#x} accessed or dirty, past guest memory: the leaf "
        f"naming them was read from a freed, recycled table"),
    ("host-dirty-lost", "notifier.py:Notifier.check_host_pages", lambda f:
        f"host page {f.a:#x} (gfn {f.gfn:#x}) was written by the guest, but when the MMU notifier "
        f"{'unmapped' if f.b == 1 else 'aged'} it, it was neither dirty on the host nor mapped by a dirty leaf: "
        f"the write was lost to the host (C7)"),
    ("host-accessed-lost", "notifier.py:Notifier.check_host_pages", lambda f:
        f"host page {f.a:#x} (gfn {f.gfn:#x}) was touched by the guest, but when the MMU notifier "
        f"{'unmapped' if f.b == 1 else 'aged'} it, it was neither accessed on the host nor mapped by a young leaf"),
    ("mapping-after-unmap", "notifier.py:Notifier.check_range_unmapped", lambda f:
        f"the MMU notifier of {f.w} returned while root row {f.a} still mapped gfn {f.gfn:#x} with "
        f"{spte_words(f.b)}: the host may reuse a page the guest can still reach"),
    ("table-leak", "nx.py:NxHugePages.untrack_possible_nx_huge_page", lambda f:
        f"{f.w} took table t{f.a} (gfn {f.gfn:#x}) off the NX huge-page list, but it was not on it though it "
        f"was marked listed"),
    ("table-leak", "nx.py:NxHugePages.recover_nx_lpages", lambda f:
        f"the NX recovery of {f.w} found table t{f.a} (gfn {f.gfn:#x}) at the head of the NX list though it is "
        f"not nx_huge_page_disallowed or not live" if f.b == 2 else
        f"the NX recovery of {f.w} zapped table t{f.a} (gfn {f.gfn:#x}) and it stayed at the head of the NX list"),
    ("root-refcount", "roots.py:Roots.check_root_unheld", lambda f:
        f"root row {f.a}'s count reached 0 while {f.who(f.b)} still used it as its root: the count was lower "
        f"than its holders"),
    ("install-into-invalid-root", "roots.py:Roots.check_root_unheld", lambda f:
        f"root table t{f.a}, invalid and already zapped, still holds {f.b} present entries when freed (the "
        f"first for gfn {f.gfn:#x}): an entry was installed into it after its zap passed (a955cad84cda)"),
    ("mask-walk-overrun", "tdp_dirty.py:TdpDirty._clear_dirty_pt_masked", lambda f:
        f"{f.w}'s clear of dirty mask {f.b:#x} at gfn {f.gfn:#x} left the bits {f.a:#x} of leaves it had "
        f"already visited in the mask: the walk cannot stop early (K3)"),
    ("use-after-free", "guest.py:Vcpu.walk_report", lambda f:
        f"{f.w}'s hardware walk for gfn {f.gfn:#x} started from its paging-structure cache, whose entry led to "
        f"table t{f.a}, freed since it was cached (its generation was {f.b}): the table was freed before the "
        f"flush that covered it"),
    ("poison-read", "guest.py:Vcpu.walk_report", lambda f:
        f"{f.w}'s hardware walk for gfn {f.gfn:#x} read {f.entry(f.a)} at level {f.b} and found the poison of a "
        f"freed table: the table was freed before the flush that covered it"),
    ("rcu-dereference", "debug.py:Debug.rcu_dereference", lambda f:
        f"{f.w} read table t{f.a} (gfn {f.gfn:#x}) outside an RCU read-side section, with mmu_lock "
        f"{_HELD.get(f.b, f'in mode {f.b}')} (rcu_dereference)"),
    ("use-after-free", "tdp_map.py:TdpMap.kvm_tdp_mmu_map", lambda f:
        f"{f.w}'s fault on gfn {f.gfn:#x} followed an entry to a table outside the pool: it read garbage from a "
        f"freed or recycled table"),
    ("table-leak", "tdp_map.py:TdpMap.unlink_sp_k18_page_list", lambda f:
        f"{f.w} ran list_del (tdp_mmu_unlink_page) on table t{f.a} (gfn {f.gfn:#x}) while it is not on the "
        f"tdp_mmu_pages list: the table was published before it was listed, and the list_add still to come "
        f"puts a table that is being freed on the list (K18)"),
    ("frozen-entry-overwritten", "tdp_mmu.py:TdpMmu.tdp_mmu_set_spte", lambda f:
        f"{f.w}'s store under the write lock wrote {spte_words(f.b)} for gfn {f.gfn:#x} over a frozen (REMOVED) "
        f"entry that another thread owns (WARN_ON(is_removed_spte(old)), I2)"),
    ("pfn-changed-without-zap", "tdp_mmu.py:TdpMmu.handle_changed_spte", lambda f:
        f"the leaf for gfn {f.gfn:#x} changed from {spte_words(f.a)} to {spte_words(f.b)}, another page, without "
        f"a zap and a flush between (I1)"),
    ("use-after-free", "tdp_mmu.py:TdpMmu.handle_removed_pt", lambda f:
        f"{f.w} found table number {f.a}, past the pool, while tearing tables down: it read a freed, recycled "
        f"table"),
    ("no-forward-progress", "tdp_mmu.py:TdpMmu.freeze_removed_entries", lambda f:
        f"{f.w} waited for entry t{f.a}[{f.b}] (gfn {f.gfn:#x}) to leave REMOVED and it never did: nobody will "
        f"clear it"),
    ("no-forward-progress", "tdp_mmu.py:TdpMmu.cond_resched_k1_no_progress_check", lambda f:
        f"{f.w} yielded mmu_lock at gfn {f.gfn:#x} (level {f.b}) with no progress since its last yield at gfn "
        f"{f.a:#x}: two walkers can hand the lock to each other for ever (K1)"),
    ("table-leak", "pool.py:Pool._take", lambda f:
        f"{f.w} took table t{f.a} off the free stack while it was {_state(f.b)}, not free: a table in use was on "
        f"the free stack"),
    ("table-leak", "pool.py:Pool.free", lambda f:
        f"{f.w} freed table t{f.a} while it was {_state(f.b)}: freed twice, or never retired"),
    ("install-into-dead-table", "pool.py:Pool.free", lambda f:
        f"{f.w} freed table t{f.gfn >> 16} with entry [{f.gfn & 0xFFFF}] still present ({spte_words(f.a)}), "
        f"linked there by {f.who(f.b & 0xFF) if f.b != U64 else 'nobody known'}: an entry was installed into "
        f"the table after its teardown (I3)"),
    ("no-forward-progress", "stress.py:run_stress", lambda f:
        f"{f.w} made no progress for {(f.b - f.a) / 1e9:.1f} s (the stall bound)"),
    ("*", "report.py:_record_oracle_problems", lambda f:
        f"the end-of-execution checks of the explorer found a {f.kind} problem (shmmmu inspect --check says "
        f"which)"),
    ("fault-retry-without-cause", "debug.py:_notifier_retry.<locals>.checked_mmu_notifier_retry_hva", lambda f:
        f"{f.w}'s fault on gfn {f.gfn:#x} was retried as stale, but no invalidation covers it, none completed "
        f"since its snapshot of the sequence ({f.a:#x}, still {f.b:#x}) and its memslot is unchanged: the fault "
        f"will be retried for ever (B10)"),
    ("huge-page-after-clear", "debug.py:_enable_log_masked.<locals>.checked_enable_log_dirty_pt_masked",
        lambda f: f"{f.w}'s KVM_CLEAR_DIRTY_LOG of gfn {f.gfn:#x}..{f.a:#x} (manual protect, INITIALLY_SET) "
        f"left a huge leaf mapping gfn {f.b:#x}: the range it named was not split to 4K "
        f"(dirty_log_page_splitting_test: no huge page after the first CLEAR pass)"),
    ("install-in-zapped-range", "debug.py:Debug.check_zap_ranges", lambda f:
        f"{f.w}'s fault installed a mapping of gfn {f.gfn:#x} "
        + ("while a kvm_zap_gfn_range of " if f.b >> 63 else "after a kvm_zap_gfn_range of ")
        + f"gfn {f.a:#x}..{(f.b & ~(1 << 63)) - 1:#x} "
        + ("was in progress (it had yielded mmu_lock)" if f.b >> 63 else
           "that ended after the fault read the invalidation sequence")
        + ": a fault installed a mapping a zap range had just removed, without retrying (B9)"),
    ("root-zap-off-caller", "roots_612.py:Roots612._zap_invalidated_root", lambda f:
        f"root row {f.a}, invalidated by a memslot update or the VM's destruction, was zapped by {f.who(f.b)}, a "
        f"kworker of the VM's workqueue, not by the task that invalidated it and waits for it: the zap lost that "
        f"task's CPU affinity and priority, and roots zapped this way run on as many CPUs at once (B8, fixed by "
        f"zapping in the caller: 0df9dab891ff)"),
    ("root-refcount", "roots_612.py:Roots612._zap_invalidated_root", lambda f:
        f"root row {f.a} was scheduled to zap but is valid (KVM_BUG_ON(!root->role.invalid))"),
    ("root-refcount", "roots_612.py:Roots612.kvm_tdp_mmu_put_root_612", lambda f:
        f"the last reference to root row {f.a} was put while the root was valid: the TDP MMU's own reference "
        f"is put only after the root is invalidated and zapped (KVM_BUG_ON(!root->role.invalid))"),
    ("root-refcount", "roots_612.py:Roots612._alloc_root_locked", lambda f:
        f"{f.who(f.b)} found valid root row {f.a} listed with a count of 0 (WARN_ON_ONCE in "
        f"kvm_tdp_mmu_alloc_root: a root's last reference goes only once it is invalid)"),
]
_SITE_IDS = {(kind, where): i for i, (kind, where, _) in enumerate(SITES)}
_SKIP = frozenset({"violation", "record", "_violation"})


def site_of(kind: str, frame=None) -> int:
    """The SITES index + 1 of the function recording `kind` (0: not in the table)."""
    f = frame or sys._getframe(1)
    while f is not None and f.f_code.co_name in _SKIP:
        f = f.f_back
    if f is None:
        return 0
    where = f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_qualname}"
    i = _SITE_IDS.get((kind, where), _SITE_IDS.get(("*", where)))
    return 0 if i is None else i + 1


def default_names(worker: int) -> str:
    return f"worker {worker}"


def worker_names(config) -> Callable[[int], str]:
    """A VM's worker slots by what runs in them (layout.VMConfig): its vCPUs, the host, the reclaimer, the
    MMU-notifier process of a stress run."""
    def who(w: int) -> str:
        if w < config.n_vcpus:
            return f"vCPU{w}"
        if w == config.host_worker:
            return "the host"
        if w == config.reclaimer_worker:
            return "the reclaimer"
        if w == config.notifier_worker and w < config.n_workers:
            return "the MMU-notifier process"
        return f"worker {w}"
    return who


@dataclass(frozen=True)
class Violation:
    kind: str
    worker: int
    gfn: int
    a: int
    b: int
    time_ns: int
    site: int = 0

    def __str__(self) -> str:
        return f"!!! {self.kind}: worker {self.worker} gfn {self.gfn:#x} ({self.a:#x}, {self.b:#x})"

    @property
    def where(self) -> str:
        """The function that recorded it (empty: unknown)."""
        return SITES[self.site - 1][1] if 0 < self.site <= len(SITES) else ""

    def sentence(self, who: Callable[[int], str] = default_names, entries: int = 0) -> str:
        """What happened, in words: the tables, entries and actors involved (`who` names a worker slot)."""
        if 0 < self.site <= len(SITES) and SITES[self.site - 1][0] in (self.kind, "*"):
            return SITES[self.site - 1][2](Facts(self.kind, self.worker, self.gfn, self.a, self.b, who, entries))
        what = _KIND_WORDS.get(self.kind, self.kind)
        return (f"{who(self.worker)} recorded {self.kind} ({what}) for gfn {self.gfn:#x} with the values "
                f"{self.a:#x} and {self.b:#x}")

    def explained(self, who: Callable[[int], str] = default_names, entries: int = 0) -> str:
        """The raw record, then what it means: `!!! kind: worker W gfn G (A, B): sentence`."""
        return f"{self}: {self.sentence(who, entries)}"

    def to_json(self, who: Callable[[int], str] = default_names, entries: int = 0) -> dict:
        return {"kind": self.kind, "worker": self.worker, "gfn": self.gfn, "a": self.a, "b": self.b,
                "site": self.where, "sentence": self.sentence(who, entries)}


# the kinds in words, for a record of no known site
_KIND_WORDS = {
    "pfn-changed-without-zap": "a present leaf replaced by one for another page without a zap",
    "frozen-entry-overwritten": "an entry frozen by a zap was overwritten",
    "install-into-dead-table": "an entry installed into a retired or freed table",
    "use-after-free": "a table used after it was freed",
    "stale-translation": "a translation used after its zap and flush",
    "guest-memory-corrupt": "a page holds a value no write put there",
    "write-to-unmapped-host-page": "an access to a host page no mapping owns",
    "table-leak": "the tables' accounting does not add up",
    "no-forward-progress": "no progress within the bound",
    "lockdep": "a lock held in the wrong mode",
}


def record(region, kind: str, worker: int, gfn: int = 0, a: int = 0, b: int = 0) -> None:
    ctl = region.words("ctl")
    v = region.words("violations")
    n = ctl.fetch_add(Ctl.VIOLATIONS, 1)
    if n < MAX_VIOLATIONS:
        base = n * V.WORDS
        v.store(base + V.WORKER, worker)
        v.store(base + V.GFN, gfn & U64)
        v.store(base + V.A, a & U64)
        v.store(base + V.B, b & U64)
        v.store(base + V.TIME_NS, time.monotonic_ns())
        v.store(base + V.SITE, site_of(kind, sys._getframe(1)))
        v.store(base + V.KIND, KIND.get(kind, 0) + 1)     # last: 0 means "being written"


def count(region) -> int:
    return region.words("ctl").load(Ctl.VIOLATIONS)


def from_row(row: list[int]) -> Violation:
    """A record of the violations section (one row of words) as a Violation."""
    kind = KINDS[row[V.KIND] - 1] if 0 < row[V.KIND] <= len(KINDS) else "unknown"
    return Violation(kind, row[V.WORKER], row[V.GFN], row[V.A], row[V.B], row[V.TIME_NS], row[V.SITE])


def read_all(region) -> list[Violation]:
    n = min(count(region), MAX_VIOLATIONS)
    arr = region.array("violations")
    return [from_row([int(x) for x in arr[k]]) for k in range(n)]
