"""Layout: the VM's configuration and where every shared word lives in its region.

Every section of the region and every named word index is declared here and
nowhere else, so the processes of a VM (vCPUs, reclaimer, supervisor, the
inspector) agree on the layout by importing one module.  Mechanisms receive the
section and word indices they own; they know nothing of the others.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shmmmu.spte import Geometry

LINE = 8                       # words per 64-byte cache line: hot words get a line each

# ---- the ctl section: global words, each on its own cache line
CTL_WORDS = 64 * LINE
(C_EPOCH, C_GP_COUNT, C_GP_MAX_NS, C_GP_TOTAL_NS, C_NOTIFIER_SEQ, C_NOTIFIER_COUNT, C_NOTIFIER_START,
 C_NOTIFIER_END, C_FLUSH_GEN, C_POOL_TOP, C_LIST_HEAD, C_LIST_COUNT, C_NX_HEAD, C_NX_COUNT, C_PHASE,
 C_ITERATION, C_STOP, C_FLUSH_DONE, C_SLOTS_GEN, C_HOST_LOCK_OWNER, C_RCU_BACKLOG_MAX, C_OP_SEQ,
 C_FAILED, C_PAUSE, C_UNFLUSHED, C_VIOLATIONS, C_NX_TAIL) = [k * LINE for k in range(27)]

# ---- locks: each lock owns a block of LOCK_WORDS words and a few semaphores
LOCK_WORDS = 2 * LINE
MMU_LOCK, PAGES_LOCK, POOL_LOCK, NX_LOCK = range(4)
N_LOCKS = 4
LOCK_NAMES = ["mmu_lock", "tdp_mmu_pages_lock", "pool_lock", "nx_lock"]

# ---- per-worker state row (wstate section), one row per process slot
WSTATE_WORDS = 6 * LINE
(W_PID, W_ROLE, W_RCU, W_TLB_MODE, W_TLB_ACK, W_HEARTBEAT, W_RETIRE_HEAD, W_RETIRE_TAIL,
 W_CACHE_COUNT, W_STATUS, W_CMD, W_ACK_PHASE, W_ITERATION, W_PROGRESS_NS, W_WAIT_SINCE_NS) = [
    k * 2 for k in range(15)]
assert 30 < 4 * LINE
W_HELD = 4 * LINE              # W_HELD + lock: 0 free, 1 read, 2 write held by this worker
ROLE_VCPU, ROLE_HOST, ROLE_RECLAIMER = 1, 2, 3
TLB_OUTSIDE, TLB_IN_GUEST = 0, 1

# ---- per-table metadata (tmeta section)
TMETA_WORDS = 16
(T_LEVEL, T_GFN, T_STATE, T_GEN, T_PARENT, T_RETIRE_EPOCH, T_RETIRE_GP, T_NX, T_PREV, T_NEXT,
 T_NX_PREV, T_NX_NEXT, T_OWNER, T_RETIRE_FLUSH, T_LINKER) = range(15)
# T_NX: on the NX list (lpage_disallowed); T_NX_PREV/T_NX_NEXT: its links (table + 1, 0 for none), with the
# list's ends in C_NX_HEAD/C_NX_TAIL, under the page-list lock; T_LINKER (debug): who linked the table
TS_FREE, TS_CACHED, TS_LIVE, TS_RETIRED = 0, 1, 2, 3
TABLE_STATE_NAMES = {TS_FREE: "free", TS_CACHED: "cached", TS_LIVE: "live", TS_RETIRED: "retired"}
NIL = (1 << 64) - 1            # "no table" in link words
ROOT_TABLE = 0

# ---- memslots
MAX_MEMSLOTS = 8
MS_WORDS = 16
(MS_BASE_GFN, MS_NPAGES, MS_BACKING_LEVEL, MS_FLAGS, MS_HOST_OFF, MS_DIRTY_OFF, MS_DATA_OFF,
 MS_GEN) = range(8)
MSF_ACTIVE, MSF_LOG_DIRTY = 1, 2

# ---- statistics: one row per worker, written by that worker alone
STAT_NAMES = [
    "accesses", "reads", "writes", "tlb_hits", "tlb_misses", "hw_walks",
    "faults", "fixed", "spurious", "retries", "cas_failures", "removed_seen",
    "tables_allocated", "tables_linked", "tables_retired", "tables_freed", "link_races",
    "mapped_4k", "mapped_2m", "mapped_1g", "zapped_leaves", "huge_splits",
    "yields", "flushes", "flush_wait_ns", "lock_wait_ns", "lock_contended", "read_acquired",
    "write_acquired", "needbreak_seen", "gp_completed", "gp_wait_ns", "notifier_retries",
    "memslot_retries", "dirty_marked", "wrprot_leaves", "collapsible_zaps", "nx_recovered",
    "pool_refills", "topups", "fault_ns", "fetches", "nx_recovery_passes",
    "lock_wait_max_ns", "flush_wait_max_ns",          # maxima: summed over workers as max, not +
    "emulated",                                       # faults outside any memslot (MMIO, deleted slot)
]
assert len(STAT_NAMES) <= 48
STAT = {n: i for i, n in enumerate(STAT_NAMES)}
N_STATS = 48

# ---- violations found by checkers while running (shmmmu.violations names the kinds)
MAX_VIOLATIONS = 256
V_WORDS = 8
V_KIND, V_WORKER, V_GFN, V_A, V_B, V_TIME_NS = range(6)

# ---- the Reader-Pipe histogram of table ages seen by walkers (rcutorture's, A.1)
PIPE_LEN = 11


@dataclass
class MemslotSpec:
    base_gfn: int
    npages: int
    backing_level: int = 1       # 1: 4 KiB anonymous, 2: 2 MiB THP, 3: 1 GiB hugetlb


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
    bugs: list[str] = field(default_factory=list)
    debug: bool = False                  # poison freed tables, check table reads (Reader Pipe)
    tlb_entries: int = 4096
    cache_capacity: int = 40             # per-vCPU memory cache (KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
    cache_min: int = 5                   # topped up to this before the lock (PT64_ROOT_MAX_LEVEL)
    retire_ring: int = 0                 # 0: derived
    nx_huge_pages: bool = False          # kvm.nx_huge_pages: exec faults map 4 KiB, tables go on the NX list
    nx_recovery_ratio: int = 60          # kvm.nx_huge_pages_recovery_ratio: zap 1/ratio of the list per pass
    nx_recovery_period_s: float = 1.0    # seconds between passes (the kernel's 60 s scaled down); 0: none
    seed: int = 0
    # rcutorture's read-side delays: at the points where a half-done step can be overtaken
    # (tdp_mmu.Mmu.torture_delay), some passes sleep this long to widen the window; 0: never
    torture_delay_us: int = 0
    workload: dict[str, Any] = field(default_factory=dict)   # what the vCPUs run (shmmmu.workloads)

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
        if c.n_tables == 0:
            # leaf tables for 4 KiB mappings of all memory, their parents, and headroom for
            # tables that are retired but not yet freed, and for vCPU caches
            leaf = sum(-(-m.npages // g.entries) + 1 for m in c.memslots)
            upper, n = 0, leaf
            for _ in range(c.geometry.root_level - 1):
                n = -(-n // g.entries) + 1
                upper += n
            c.n_tables = leaf + upper + 64 + c.n_workers * c.cache_capacity + leaf // 4
        if c.retire_ring == 0:
            c.retire_ring = max(256, c.n_tables)
        return c

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "VMConfig":
        d = dict(d)
        d["memslots"] = [MemslotSpec(**m) for m in d.get("memslots", [])]
        return cls(**d)


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
        "ctl": (CTL_WORDS,),
        "locks": (N_LOCKS, LOCK_WORDS),
        "wstate": (c.n_workers, WSTATE_WORDS),
        "stats": (c.n_workers, N_STATS),
        "pipe": (c.n_workers, PIPE_LEN),
        "tables": (c.n_tables, g.entries),
        "tmeta": (c.n_tables, TMETA_WORDS),
        "pool": (c.n_tables,),
        "caches": (c.n_workers, c.cache_capacity),
        "retire": (c.n_workers, c.retire_ring),
        "memslots": (MAX_MEMSLOTS, MS_WORDS),
        "host_map": (max(1, c.guest_pages),),
        "dirty": (max(1, n_dirty),),
        "data": (max(1, n_data),),
        "violations": (MAX_VIOLATIONS, V_WORDS),
    }


def semaphore_purposes(config: VMConfig) -> list[str]:
    """Named semaphores: per lock a wait-queue mutex, a reader gate and a writer gate; run control."""
    out = []
    for name in LOCK_NAMES:
        out += [f"{name}.q", f"{name}.r", f"{name}.w"]
    out += ["control"]
    return out
