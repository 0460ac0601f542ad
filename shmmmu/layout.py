"""Layout: the VM's configuration and where every shared word lives in its region, one row type per kind of row.

Every section of the region and every named word is declared here and nowhere
else, so the processes of a VM (vCPUs, reclaimer, supervisor, the inspector,
the torture programs) agree on the layout by importing one module.  Each kind
of row is one class: its words are class attributes (word offsets inside the
row) and `WORDS` is the row's width.  Mechanisms receive the section and the
row type they own; they know nothing of the others.  Hot loops bind the
offsets they use to locals or module constants.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from shmmmu.spte import Geometry
from shmmmu.variants import PROFILE_NAMES, check_names

LINE = 8                       # words per 64-byte cache line: hot words get a line each


def _on_lines(n: int) -> list[int]:
    """Offsets of n words, each on its own cache line."""
    return [k * LINE for k in range(n)]


class Row:
    """A row type: named word offsets in one row of a section, and the row's width."""

    WORDS = 0

    @classmethod
    def fields(cls) -> dict[str, int]:
        """Word name -> offset, in offset order (for the inspector and docs)."""
        out = {k: v for k, v in vars(cls).items() if k.isupper() and k != "WORDS" and isinstance(v, int)}
        return dict(sorted(out.items(), key=lambda kv: kv[1]))


class Columns:
    """Every word of a row type as a column of its section, named in lower case: `tmeta.level.load(table)`
    reads word LEVEL of row `table` (Words.column: the row offset is computed in C, never by hand)."""

    def __init__(self, row: type[Row], words: Any):
        self.row = row
        for name, offset in row.fields().items():
            setattr(self, name.lower(), words.column(row.WORDS, offset))

    def start(self, i: int) -> int:
        """The section's word index of row i's first word (a bulk access to the whole row: Words.touch)."""
        return i * self.row.WORDS


READ, WRITE, EXEC = 0, 1, 2      # a guest access's kind (an EXEC is an instruction fetch): workloads, traces

# ---------------------------------------------------------------- the ctl section: VM-global words

class Ctl(Row):
    """ctl: one row of VM-global words, each on its own cache line."""

    (EPOCH,                 # RCU: the global epoch (rcu.py)
     GP_COUNT,              # grace periods completed
     GP_MAX_NS,             # the longest grace period
     GP_TOTAL_NS,
     RCU_BACKLOG_MAX,       # the largest retire backlog a reclaim pass saw
     NOTIFIER_SEQ,          # mmu_notifier_seq
     NOTIFIER_COUNT,        # mmu_notifier_count: invalidations in progress
     NOTIFIER_START,        # the range of the invalidation in progress (merged)
     NOTIFIER_END,
     UNFLUSHED,             # workers holding changes not yet flushed (the stale-translation checker)
     POOL_TOP,              # height of the free stack of page tables (pool.py)
     PAGE_COUNT,            # tdp_mmu_pages: non-root tables linked (6.2's atomic count)
     LIST_HEAD,             # the 5.13 page list tdp_mmu_pages (table + 1; 0 empty): only with K18
     NX_HEAD,               # possible_nx_huge_pages (lpage_disallowed): head and tail (table + 1), nx_lpage_splits
     NX_TAIL,
     NX_COUNT,
     SLOTS_GEN,             # memslots generation: any slot row changed
     ROOTS_GEN,             # bumped whenever a root is invalidated: a vCPU reloads its root
     FAST_ZAPS,             # kvm_tdp_mmu_zap_invalidated_roots in progress (faults during one are counted)
     ITERATION,             # run control: the iteration vCPUs are asked to run
     STOP,                  # run control: every worker stops
     VIOLATIONS,            # violation records written (violations.py)
     ) = _on_lines(22)
    WORDS = 64 * LINE


# ---------------------------------------------------------------- locks: one block of words per lock

class Lock(Row):
    """A lock block in the locks section: qrwlock's counter, its wait queue, and who holds or sleeps."""

    CNTS = 0                   # qrwlock cnts: writer byte, WAITING bit, readers in units of QR_BIAS
    WAIT = 8                   # the wait-queue mutex: 0 free, 1 held, 2 held with sleepers (own line)
    WAIT_OWNER = 9             # worker + 1 holding the wait queue
    WRITER = 10                # worker + 1 holding the write side
    RSLEEP = 11                # readers sleep on the reader gate
    WSLEEP = 12                # a writer sleeps on the writer gate
    CONTENDED = 13             # slow-path entries (lock_stat's contentions)
    WORDS = 2 * LINE


class Locks:
    """The locks of a VM (index of a block in the locks section), with their names."""

    MMU = 0                    # kvm->mmu_lock (rwlock)
    PAGES = 1                  # kvm->arch.tdp_mmu_pages_lock
    POOL = 2                   # the table pool's free stack (the page allocator's lock)
    NAMES = ["mmu_lock", "tdp_mmu_pages_lock", "pool_lock"]
    COUNT = 3


class Held:
    """What a worker's held-lock record says (WState.HELD + lock index)."""

    NONE, READ, WRITE = 0, 1, 2


# ---------------------------------------------------------------- per-worker state (wstate section)

class WState(Row):
    """wstate: one row per worker slot (a process of the VM); written by that worker, read by the others."""

    (PID,                      # the process in this slot
     ROLE,                     # Role.*
     STATUS,                   # WorkerStatus.*
     RCU,                      # RCU read side: the epoch it entered in, 0 quiescent
     TLB_MODE,                 # vcpu->mode: TlbMode.* (a flusher's kick turns IN_GUEST into EXITING)
     TLB_REQUESTS,             # vcpu->requests: KVM_REQ_* bits others set, the vCPU clears as it takes them
     HEARTBEAT,                # bumped by a worker loop
     PROGRESS_NS,              # when a vCPU last made progress (monotonic ns)
     ITERATION,                # the iteration a vCPU last finished
     RETIRE_HEAD,              # this worker's retire ring (rcu.py)
     RETIRE_TAIL,
     CACHE_COUNT,              # tables in this worker's memory cache (pool.py)
     ROOT,                     # the root this worker's MMU uses: its roots row + 1 (0: none); holds a reference
     WALK_ROOT,                # the root a yield-safe walk of this worker holds a reference on: row + 1 (0: none)
     ) = [k * 2 for k in range(14)]
    # a vCPU's userfault (demand paging): the page its fault waits on a handler process for, UFFD_REQUESTED |
    # gfn; a handler that takes it sets UFFD_CLAIMED and stores 0 once the page is in (UFFDIO_COPY's wake)
    UFFD, INVALIDATING = 28, 30  # INVALIDATING: inside its own kvm_zap_gfn_range's invalidation (6.12; recovery)
    HELD = 4 * LINE            # HELD + lock index: Held.* of that lock, for this worker
    WORDS = 6 * LINE


class Role:
    """What a worker slot is used for."""

    NONE, VCPU, HOST, RECLAIMER = 0, 1, 2, 3
    NAMES = {NONE: "-", VCPU: "vCPU", HOST: "host", RECLAIMER: "reclaimer"}


class WorkerStatus:
    """A worker's status word (WState.STATUS)."""

    STARTING, READY, DONE, FAILED = 0, 1, 2, 3
    NAMES = {STARTING: "starting", READY: "ready", DONE: "done", FAILED: "failed"}


class TlbMode:
    """vcpu->mode as the TLB protocol needs it: EXITING is IN_GUEST kicked by a flusher (its IPI not yet taken)."""

    OUTSIDE, IN_GUEST, EXITING = 0, 1, 2


class Request:
    """vcpu->requests bits (WState.TLB_REQUESTS): what kvm_make_all_cpus_request asks of a vCPU."""

    TLB_FLUSH = 1              # KVM_REQ_TLB_FLUSH


# ---------------------------------------------------------------- per-table metadata (tmeta section)

class TMeta(Row):
    """tmeta: one row per pool table, what struct kvm_mmu_page holds beside the table itself."""

    (LEVEL,                    # the level of the table's entries (the later convention, asserted)
     GFN,                      # the first GFN the table covers
     STATE,                    # TableState.*
     GEN,                      # bumped at every free: a reader holding a stale reference can tell
     PARENT,                   # debug: the entry that links it (table * entries + index), NIL
     RETIRE_EPOCH,             # the RCU epoch it was retired in
     NX,                       # nx_huge_page_disallowed (5.13: lpage_disallowed)
     PREV, NEXT,               # the 5.13 tdp_mmu_pages links (table + 1; NIL none): only with K18
     NX_PREV, NX_NEXT,         # possible_nx_huge_pages links (table + 1; 0 none)
     OWNER,                    # the worker whose cache holds it (or who allocated it, until linked)
     LINKER,                   # debug: worker | parent generation << 8 of whoever linked it
     NX_LISTED,                # on the NX list (list_empty(&sp->possible_nx_huge_page_link) is false)
     ) = range(14)
    WORDS = 16


class TableState:
    """Where a pool table is (TMeta.STATE)."""

    FREE, CACHED, LIVE, RETIRED = 0, 1, 2, 3
    NAMES = {FREE: "free", CACHED: "cached", LIVE: "live", RETIRED: "retired"}


NIL = (1 << 64) - 1            # "no table" in link words
ROOT_TABLE = 0                 # table 0 is never handed out: the torture programs' control row, "no table"


class RootRow(Row):
    """roots: one row per root of the VM (kvm->arch.tdp_mmu_roots), in any order; TABLE 0 marks a free row."""
    TABLE, ROLE, COUNT, INVALID, ZAPPED, SCHEDULED = range(6)
    # COUNT: tdp_mmu_root_count; INVALID: role.invalid; ZAPPED (debug): its invalidating zap is done; SCHEDULED:
    # 6.12's tdp_mmu_scheduled_root_to_zap, set by the invalidation until its zap takes it (B8: 1 queued, 2 running)
    WORDS = 8


MAX_ROOTS = 16

# ---------------------------------------------------------------- memslots

class MemslotRow(Row):
    """memslots: one row per slot (struct kvm_memory_slot's fields)."""

    BASE_GFN, NPAGES, BACKING_LEVEL, FLAGS, HOST_OFF, DIRTY_OFF, DATA_OFF, GEN = range(8)
    WORDS = 16


class MemslotFlags:
    ACTIVE = 1                 # the slot exists (deleting it clears this)
    LOG_DIRTY = 2              # KVM_MEM_LOG_DIRTY_PAGES
    INITIALLY_SET = 4          # logging enabled with manual protect + KVM_DIRTY_LOG_INITIALLY_SET (this period)


MAX_MEMSLOTS = 8


class HostPage:
    """host_ad: the host page's own accessed/dirty state, as KVM updates it (kvm_set_pfn_accessed/dirty);
    touched (debug): what the guest did to the page since the host last consumed that state."""

    ACCESSED, DIRTY = 1, 2          # host_ad bits
    TOUCHED, WRITTEN = 1, 2         # touched bits: any access, a write

# ---------------------------------------------------------------- statistics: one row per worker, written by that worker alone

STAT_NAMES = [
    "accesses", "reads", "writes", "tlb_hits", "tlb_misses", "hw_walks",
    "faults", "fixed", "spurious", "retries", "cas_failures", "removed_seen",
    "tables_allocated", "tables_linked", "tables_retired", "tables_freed", "link_races",
    "mapped_4k", "mapped_2m", "mapped_1g", "zapped_leaves", "huge_splits",
    "yields", "flushes", "flush_wait_ns", "lock_wait_ns", "lock_contended", "read_acquired",
    "write_acquired", "needbreak_seen", "notifier_retries",
    "dirty_marked", "wrprot_leaves", "collapsible_zaps", "nx_recovered",
    "pool_refills", "fetches", "nx_recovery_passes",
    "lock_wait_max_ns", "flush_wait_max_ns",          # maxima: summed over workers as max, not +
    "emulated",                                       # faults outside any memslot (MMIO, deleted slot)
    "roots_allocated", "roots_freed", "root_reloads",  # kvm_tdp_mmu_get_vcpu_root / put_root / kvm_mmu_load
    "fast_pf_fixed",                                  # 6.12: write faults fixed by fast_page_fault
    "fast_zaps", "faults_during_fast_zap",            # kvm_mmu_zap_all_fast, and faults fixed while one zapped
    "stale_root_retries",                             # faults retried because their root was invalid
    "aged_young",                                     # leaves clear_young found young
    "psc_hits",                                       # hardware walks started from a paging-structure cache entry
    "ad_rewalks",                                     # walks the processor redid after losing its A/D cmpxchg
    "kicks",                                          # VM exits on a flusher's kick (its IPI) at an access boundary
    "userfaults",                                     # faults that waited for a demand-paging handler
    "uffd_copies", "uffd_eexist",                     # a handler's UFFDIO_COPYs, and pages already in
]
N_STATS = 56
assert len(STAT_NAMES) <= N_STATS
STAT = {n: i for i, n in enumerate(STAT_NAMES)}

# ---------------------------------------------------------------- violations found by checkers while running

class ViolationRow(Row):
    """violations: one record per violation (violations.py names the kinds)."""

    KIND, WORKER, GFN, A, B, TIME_NS, SITE = range(7)     # SITE: violations.SITES index + 1 (0: unknown)
    WORDS = 8


MAX_VIOLATIONS = 256

# the Reader-Pipe histogram of table ages seen by walkers (rcutorture's, PRIOR_ART A.1)
PIPE_LEN = 11

# ---------------------------------------------------------------- the torture programs' words

class TortureCtl(Row):
    """The torture control block: row ROOT_TABLE of the tables section of a torture region (no MMU runs there)."""

    (READY,                    # workers attached and waiting
     GO,                       # start barrier
     STOP,
     WRITERS_IN,               # lock torture: writers inside the critical section
     READERS_IN,               # lock torture: readers inside
     READERS_MAX,              # the most readers inside at once
     CURRENT,                  # RCU torture: the current pointer (update << PTR_TABLE_BITS | table)
     HOLDING,                  # hold programs: how many hold what they were told to
     ) = _on_lines(8)
    WORDS = 8 * LINE


class TortureStat(Row):
    """A torture worker's counters: its row of the stats section of a torture region."""

    (OPS, FAIL, WAIT_MAX_NS, WAIT_NS, CONTENDED, NEEDBREAK, YIELDS, MAX_READERS, LONG_HOLDS, POISON, STALE,
     ALLOCATED, FREED, ALLOC_FAIL, DONE, FAIL_WRITER, FAIL_READER, GP_TIMEOUTS) = range(18)
    WORDS = N_STATS


# ---------------------------------------------------------------- configuration

@dataclass
class MemslotSpec:
    base_gfn: int
    npages: int
    backing_level: int = 1       # 1: 4 KiB anonymous, 2: 2 MiB THP, 3: 1 GiB hugetlb


@dataclass
class Workload:
    """What the vCPUs of a VM run (shmmmu.workloads reads it).

    kind: populate | random | dirty-log | trace | stress | access-tracking | nx-huge-pages | memslot-perf.
    """

    kind: str = "populate"
    pages: int = 0               # guest pages per vCPU (the selftest's -b)
    overlap: bool = False        # all vCPUs share one range (-o) instead of a range each
    n_vcpus: int = 1             # vCPUs sharing the range (for the range arithmetic)
    write_every: int = 1         # write 1 page of every N, read the rest (the selftest's -f, 5.13-6.1)
    write_percent: int = -1      # populate, dirty-log: each access a write with this chance in % (the
                                 # selftest's -w, 6.2 on); -1: write_every decides
    random_access: bool = False  # populate, dirty-log: each access to a page drawn at random (-a, 6.2 on)
    accesses: int = 0            # accesses per iteration (random, stress; 0: one per page)
    write_fraction: float = 0.5  # share of writes (random, stress)
    exec_fraction: float = 0.0   # share of instruction fetches (random, stress)
    populate_first: bool = False  # random: iteration 1 writes every page once (dirty_log_test's first pass)
    hot_pages: int = 0           # stress: the last hot_pages of the range get hot_fraction of the accesses
    hot_fraction: float = 0.0
    zap_every: int = 0           # stress: one chunk of accesses in N ends with a kvm_zap_gfn_range of its own
                                 # (a guest MTRR write zaps from the vCPU's thread); 0: never
    # trace: a converted trace file (shmmmu.trace.store) the vCPUs stream; never the accesses themselves,
    # which would not fit the header
    trace_file: str = ""
    trace_threads: bool = False  # one part per thread, thread i on vCPU i (else every vCPU replays part 0)
    trace_pages: int = 0         # distinct guest pages the trace touches

    memslot_test: int = 0        # memslot-perf: the test (shmmmu.workloads.MEMSLOT_PERF_TESTS)
    move_area: int = 0           # memslot-perf's move tests: the move area's first page, from the range's start

    KINDS = ("populate", "random", "dirty-log", "trace", "stress", "access-tracking", "nx-huge-pages",
             "memslot-perf")


@dataclass
class VMConfig:
    """Everything fixed when a VM is created; stored as JSON in the region header."""

    name: str = "vm"
    n_vcpus: int = 2
    n_host: int = 2                      # host-side slots: supervisor, reclaimer (more for stress)
    bits: int = 9                        # 9: 512-entry tables; 3: 8-entry test mode
    n_tables: int = 0                    # 0: derived from the memory size
    memslots: list[MemslotSpec] = field(default_factory=list)
    lock_mode: str = "shared"            # "shared" (the series) or "exclusive" (the baseline)
    kernel: str = "5.13"                 # the kernel profile (shmmmu.variants.PROFILES)
    # the invalidation sequence's first value (mmu_notifier_seq / 6.x mmu_invalidate_seq): a VM that has seen
    # that many invalidations already (B10 shows near 2^31)
    mmu_seq_start: int = 0
    bugs: list[str] = field(default_factory=list)
    debug: bool = False                  # the debug checkers (shmmmu.mmu.debug), poisoned freed tables
    tlb_entries: int = 4096
    cache_capacity: int = 40             # per-vCPU memory cache (KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
    cache_min: int = 5                   # topped up to this before the lock (PT64_ROOT_MAX_LEVEL)
    retire_ring: int = 0                 # 0: derived
    nx_huge_pages: bool = False          # kvm.nx_huge_pages: exec faults map 4 KiB, tables go on the NX list
    nx_recovery_ratio: int = 60          # kvm.nx_huge_pages_recovery_ratio: zap 1/ratio of the list per pass
    nx_recovery_period_s: float = 1.0    # seconds between passes (the kernel's 60 s scaled down); 0: none
    gp_stall_s: float = 10.0             # a grace period longer than this is reported (the RCU stall warning)
    root_roles: int = 1                  # distinct root roles: vCPU i uses role i % root_roles (1: one shared root)
    seed: int = 0
    # sleeps that widen windows (0: never): rcutorture's (Kvm.torture_delay), a GUP's (Kvm.gup_delay)
    torture_delay_us: int = 0
    gup_delay_us: int = 0
    # --tracepoints: the directory where each worker's Mmu writes its part of the kernel's tracepoint
    # lines (shmmmu.mmu.tracepoints); "" installs nothing
    tracepoints: str = ""
    # demand paging (demand_paging_test -u MISSING): handler processes serve the faults on pages not yet in
    # (shmmmu.userfault); uffds userfaultfds (1, or one per vCPU), each read by uffd_readers processes
    uffds: int = 0
    uffd_readers: int = 1
    uffd_delay_us: int = 0
    workload: Workload = field(default_factory=Workload)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.bits)

    @property
    def n_workers(self) -> int:
        return self.n_vcpus + self.n_host

    @property
    def host_worker(self) -> int:
        return self.n_vcpus

    @property
    def reclaimer_worker(self) -> int:
        return self.n_vcpus + 1

    @property
    def notifier_worker(self) -> int:
        """The host mm's MMU-notifier process of stress (workers/notifier.py), when n_host >= 3."""
        return self.n_vcpus + 2

    @property
    def uffd_workers(self) -> range:
        """The slots of the demand-paging handler processes (workers/uffd.py), after the reclaimer."""
        return range(self.n_vcpus + 2, self.n_vcpus + 2 + self.uffds * self.uffd_readers)

    @property
    def guest_pages(self) -> int:
        return sum(m.npages for m in self.memslots)

    def derived(self) -> "VMConfig":
        """Fill the sizes left at 0 from the memory size."""
        c = dataclasses.replace(self, memslots=[dataclasses.replace(m) for m in self.memslots])
        g = c.geometry
        end = max((m.base_gfn + m.npages for m in c.memslots), default=0)
        if end > g.max_gfn:
            raise ValueError(f"memory up to GFN {end:#x} does not fit the {g.root_level}-level tables of "
                             f"{g.entries} entries (at most {g.max_gfn} pages)")
        for m in c.memslots:
            if not 1 <= m.backing_level <= 3 or m.npages <= 0 or m.base_gfn < 0:
                raise ValueError(f"bad memslot {m}")
        if c.n_vcpus < 1:
            raise ValueError("a VM needs at least one vCPU")
        if c.lock_mode not in ("shared", "exclusive"):
            raise ValueError(f"lock mode must be shared or exclusive, not {c.lock_mode!r}")
        if not 1 <= c.root_roles <= MAX_ROOTS // 2:
            raise ValueError(f"root_roles must be between 1 and {MAX_ROOTS // 2}")
        if c.n_tables == 0:
            # leaf tables for 4 KiB mappings of all memory, their parents, and headroom for
            # tables that are retired but not yet freed, for vCPU caches, and for the roots
            # (a root being zapped after an invalidation coexists with its successor)
            leaf = sum(-(-m.npages // g.entries) + 1 for m in c.memslots)
            upper, n = 0, leaf
            for _ in range(c.geometry.root_level - 1):
                n = -(-n // g.entries) + 1
                upper += n
            c.n_tables = 2 * (leaf + upper) + 64 + c.n_workers * c.cache_capacity + leaf // 4 + MAX_ROOTS
        if c.retire_ring == 0:
            c.retire_ring = max(256, c.n_tables)
        return c

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "VMConfig":
        """The configuration a header stores, every field checked for its type and range (ConfigError):
        a header that lies in one of them is refused where the region is attached, not later where the
        field is used (`"bugs": [5, "nope"]` was a TypeError in the inspector's summary)."""
        d = _fields(cls, d, "config", _CONFIG_LIMITS)
        slots = d.get("memslots", [])
        if not isinstance(slots, list) or len(slots) > MAX_MEMSLOTS:
            raise ConfigError(f"config field memslots must be a list of at most {MAX_MEMSLOTS}, not {_show(slots)}")
        d["memslots"] = [MemslotSpec(**_fields(MemslotSpec, m, f"memslots[{i}]", _MEMSLOT_LIMITS))
                         for i, m in enumerate(slots)]
        d["workload"] = Workload(**_fields(Workload, d.get("workload", {}), "workload", _WORKLOAD_LIMITS))
        return cls(**d)


class ConfigError(ValueError):
    """A stored configuration with a field of the wrong type or out of its range: a damaged header."""


_BIG = (1 << 63) - 1             # the region's words; also what numpy takes without an OverflowError
# numbers: (lowest, highest); a field not listed takes 0 .. _BIG (an int) or 0 .. 1e9 (a float)
_CONFIG_LIMITS: dict[str, tuple[float, float]] = {
    "n_vcpus": (1, 256), "n_host": (1, 16), "bits": (2, 9), "n_tables": (0, 1 << 40), "tlb_entries": (1, 1 << 24),
    "cache_capacity": (1, 1 << 16), "cache_min": (0, 1 << 16), "retire_ring": (0, 1 << 40),
    "nx_recovery_ratio": (0, 1 << 31), "root_roles": (1, MAX_ROOTS // 2), "torture_delay_us": (0, 1 << 32),
    "gup_delay_us": (0, 1 << 32), "uffds": (0, 256), "uffd_readers": (1, 14), "uffd_delay_us": (0, 1 << 32)}
_MEMSLOT_LIMITS: dict[str, tuple[float, float]] = {"base_gfn": (0, 1 << 52), "npages": (1, 1 << 52),
                                                   "backing_level": (1, 3)}
_WORKLOAD_LIMITS: dict[str, tuple[float, float]] = {
    "pages": (0, 1 << 52), "n_vcpus": (0, 256), "write_every": (0, 1 << 32), "write_percent": (-1, 100),
    "write_fraction": (0, 1),
    "exec_fraction": (0, 1), "hot_fraction": (0, 1), "hot_pages": (0, 1 << 52), "trace_pages": (0, 1 << 52),
    "memslot_test": (0, 5), "move_area": (0, 1 << 52)}
# strings with a fixed set of values
_CHOICES = {("config", "lock_mode"): ("shared", "exclusive"), ("workload", "kind"): Workload.KINDS,
            ("config", "kernel"): PROFILE_NAMES}


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields(cls: type, d: Any, where: str, limits: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """A JSON object's fields for dataclass `cls`, each of the type its default has and within `limits`."""

    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object, not {_show(d)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(d)
    for k, v in d.items():
        f = known.get(k)
        if f is None:
            raise ConfigError(f"{where} has an unknown field {_show(k)}")
        if k in ("memslots", "workload") and cls is VMConfig:
            continue                                     # checked field by field by from_json
        kind = str(f.type)                              # the annotation's text (postponed annotations)
        what = f"{where} field {k}"
        if kind == "bool":
            if type(v) is not bool:
                raise ConfigError(f"{what} must be true or false, not {_show(v)}")
        elif kind in ("int", "float"):
            if kind == "int" and type(v) is not int:
                raise ConfigError(f"{what} must be a whole number, not {_show(v)}")
            if type(v) not in (int, float) or not math.isfinite(v):
                raise ConfigError(f"{what} must be a finite number, not {_show(v)}")
            lo, hi = limits.get(k, (0, _BIG if kind == "int" else 1e9))
            if not lo <= v <= hi:
                raise ConfigError(f"{what} must be between {lo:g} and {hi:g}, not {_show(v)}")
        elif kind == "str":
            if type(v) is not str or len(v) > 4096:
                raise ConfigError(f"{what} must be a string, not {_show(v)}")
            choices = _CHOICES.get((where, k))
            if choices is not None and v not in choices:
                raise ConfigError(f"{what} must be one of {', '.join(choices)}, not {_show(v)}")
        elif kind == "list[str]":                       # bugs: the switches' names
            if not isinstance(v, list) or any(type(b) is not str for b in v):
                raise ConfigError(f"{what} must be a list of bug switch names, not {_show(v)}")
            try:
                check_names(v, d.get("kernel", "5.13") if isinstance(d.get("kernel"), str) else "5.13")
            except ValueError as e:
                raise ConfigError(f"{what}: {e}") from None
        else:                                           # a field this check does not know: a new one
            raise ConfigError(f"{where} field {k} has a type ({kind}) this shmmmu cannot check")
    return out


def memslot_areas(config: VMConfig) -> list[tuple[int, int, int]]:
    """(host_map offset, dirty-bitmap word offset, data offset) of each memslot.

    Each slot's guest memory has two banks of host pages (data), so a host-side
    unmap can migrate a range to fresh pages and poison the old ones; each bank
    is aligned to the slot's backing page size so huge mappings stay aligned.
    """
    out, host, dirty, data = [], 0, 0, 0
    g = config.geometry
    for m in config.memslots:
        align = g.pages(m.backing_level)
        data = -(-data // align) * align
        out.append((host, dirty, data))
        host += m.npages
        dirty += -(-m.npages // 64)
        data += 2 * (-(-m.npages // align) * align)
    return out


def section_shapes(config: VMConfig) -> dict[str, tuple[int, ...]]:
    c = config
    areas = memslot_areas(c)
    g = c.geometry
    n_dirty = sum(-(-m.npages // 64) for m in c.memslots)
    n_data = 0
    if c.memslots:
        last, m = areas[-1], c.memslots[-1]
        align = g.pages(m.backing_level)
        n_data = last[2] + 2 * (-(-m.npages // align) * align)
    return {
        "ctl": (Ctl.WORDS,),
        "locks": (Locks.COUNT, Lock.WORDS),
        "wstate": (c.n_workers, WState.WORDS),
        "stats": (c.n_workers, N_STATS),
        "pipe": (c.n_workers, PIPE_LEN),
        "tables": (c.n_tables, g.entries),
        "tmeta": (c.n_tables, TMeta.WORDS),
        "pool": (c.n_tables,),
        "caches": (c.n_workers, c.cache_capacity),
        "retire": (c.n_workers, c.retire_ring),
        "memslots": (MAX_MEMSLOTS, MemslotRow.WORDS),
        "roots": (MAX_ROOTS, RootRow.WORDS),
        "host_map": (max(1, c.guest_pages),),
        "dirty": (max(1, n_dirty),),
        "data": (max(1, n_data),),
        "host_ad": (max(1, n_data),),
        # debug: what the guest did to each host page; the entries whose zap awaits its flush, then B9's zap ranges
        "touched": (max(1, n_data) if c.debug else 1,),
        "zap_pending": (c.n_tables * g.entries + 9 * LINE if c.debug else 1,),
        "violations": (MAX_VIOLATIONS, ViolationRow.WORDS),
    }


def semaphore_purposes(config: VMConfig) -> list[str]:
    """Named semaphores: per lock a wait-queue mutex, a reader gate and a writer gate."""
    out = []
    for name in Locks.NAMES:
        out += [f"{name}.q", f"{name}.r", f"{name}.w"]
    return out
