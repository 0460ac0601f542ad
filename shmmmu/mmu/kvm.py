"""Kvm: one process's view of `struct kvm` for the MMU: its handles, counters, violations and pending flushes.

Every kernel function of the MMU takes `struct kvm *kvm`; here every part of
the MMU (shmmmu.mmu: roots, tdp_mmu, tdp_map, tdp_zap, tdp_dirty, nx, mmu,
notifier, ioctl) is built over one `Kvm`, made once for this process's
worker slot.  A part copies the handles it uses (`Part`) and keeps nothing
else of its own between calls but what its kernel file keeps; per-operation
state (a fault's `Fault` record, a teardown's list of removed tables, a walk's
iterator) is passed as arguments.  The state a kernel would keep in struct
kvm itself and that several parts change (the flush this process owes, the
counters) is here, in one place.
"""
from __future__ import annotations

import random

from shmmmu import violations
from shmmmu.layout import N_STATS, STAT, Ctl, HostPage, RootRow, TMeta, WState
from shmmmu.memslots import Memslots
from shmmmu.mmu.instruments import site
from shmmmu.rwlock import HELD_READ, HELD_WRITE, LockError
from shmmmu.tdp_iter import TdpIter
from shmmmu.tlb import Tlb, TlbControl
from shmmmu.vm import VM

_U64 = (1 << 64) - 1
_MAX_STATS = frozenset(i for name, i in STAT.items() if name.endswith("_max_ns"))
_C_UNFLUSHED = Ctl.UNFLUSHED
_HOST_ACCESSED, _HOST_DIRTY = HostPage.ACCESSED, HostPage.DIRTY


def _no_delay() -> None:
    """The torture delay when stress asked for none: nothing."""


class Kvm:
    """The handles every MMU part uses, made for worker slot `worker` of `vm`.

    `tlb` is given by vCPUs: their own TLB is flushed with every remote flush
    they issue.  The supervisor and other host processes pass none.
    """

    def __init__(self, vm: VM, worker: int, tlb: Tlb | None = None):
        self.vm = vm
        self.worker = worker
        c = self.config = vm.config
        self.region = vm.region
        self.waits = vm.waits
        g = self.geometry = c.geometry
        self.bits = c.bits
        self.E = g.entries
        self.root_level = g.root_level
        self.max_gfn = g.max_gfn
        self.pages = [0] + [g.pages(level) for level in range(1, self.root_level + 1)]
        # 1 << (shadow_phys_bits - 12): the host's physical address width, modelled as the
        # smallest that holds every memslot (5.13's zap-all ended there: K17)
        slots_end = max((m.base_gfn + m.npages for m in c.memslots), default=1)
        self.phys_max_gfn = 1 << max(0, (slots_end - 1).bit_length())
        r = vm.region
        self.host_ad = r.words("host_ad")
        self.n_host_pages = r.array("host_ad").size
        self.host_ad_np = r.array("host_ad")
        self.touched = r.words("touched")          # debug: what the guest did (shmmmu.hostpage)
        self.touched_np = r.array("touched")
        self.tables = r.words("tables")
        self.tables_np = r.array("tables")
        self.tm = r.words("tmeta")
        self.tmeta = r.columns("tmeta", TMeta)     # each field of struct kvm_mmu_page, by table
        self.root_rows = r.columns("roots", RootRow)     # each field of a root, by row
        self.ws = r.words("wstate")
        self.wstate = r.columns("wstate", WState)  # each field of a worker's row, by worker
        self.ctl = r.words("ctl")
        # the lock, RCU slot and memory cache are this worker's, even when `vm` is attached as
        # another worker (one process may drive a vCPU and the host: each needs its own slot)
        h = vm if vm.worker == worker else VM(vm.region, worker, waits=vm.waits, config=vm.config)
        self.lock = h.mmu_lock
        self.pages_lock = h.pages_lock
        self.rcu = h.rcu
        self.pool = h.pool
        self.slots = Memslots(vm)
        self.tlbctl = TlbControl(vm, worker, tlb)
        self.stats_row = r.words("stats")
        self.st = [0] * N_STATS              # this process's own counters
        # what earlier processes of this worker slot counted (a vCPU that stress --kill-every killed, the
        # explorer's prologue): the row carries on from it, so no total ever goes backwards
        # (read as plain memory: under the explorer this is no step of the kernel's)
        self.st_carried = [int(x) for x in vm.region.array("stats")[worker][:N_STATS]]
        self.debug = c.debug
        self.nx = c.nx_huge_pages
        # the VM's design: the series (faults and range operations under the read lock, tables
        # freed after a grace period) or the pre-series baseline (the write lock for everything)
        self.parallel = c.lock_mode == "shared"
        self._torture_delay_s = c.torture_delay_us / 1e6
        self._torture_rng = random.Random(c.seed * 1000 + worker)
        self.torture_delay = self._torture_delay if self._torture_delay_s else _no_delay
        # the window before a write-lock store over a leaf the processor may still mark: every pass pauses
        # (such stores are rare: an aged leaf, or one not yet dirty)
        self.torture_delay_volatile = self._torture_pause if self._torture_delay_s else _no_delay
        self._gup_delay_s = c.gup_delay_us / 1e6
        self.holds_unflushed = False     # this process made changes no flush has covered yet

    # ------------------------------------------------------------------ bookkeeping

    def violation(self, kind: str, gfn: int = 0, a: int = 0, b: int = 0) -> None:
        violations.record(self.region, kind, self.worker, gfn, a, b)

    @site("trace", "timeline")
    def publish_stats(self) -> None:
        """This process's counters, on top of what its slot carried, into its row of the region (read by the
        supervisor and inspector): sums, and the larger of the two for a maximum."""
        st, row, base, carried = self.st, self.stats_row, self.worker * N_STATS, self.st_carried
        ls = self.lock.stats
        st[STAT["lock_wait_ns"]] = ls.wait_ns
        st[STAT["lock_contended"]] = ls.contended
        st[STAT["read_acquired"]] = self.lock.read_acquired
        st[STAT["write_acquired"]] = self.lock.write_acquired
        st[STAT["needbreak_seen"]] = ls.needbreak_seen
        st[STAT["flushes"]] = self.tlbctl.flushes
        st[STAT["flush_wait_ns"]] = self.tlbctl.wait_ns
        st[STAT["flush_wait_max_ns"]] = self.tlbctl.wait_max_ns
        st[STAT["lock_wait_max_ns"]] = ls.wait_max_ns
        st[STAT["pool_refills"]] = self.pool.refills
        for i, v in enumerate(st):
            row.store(base + i, (max(v, carried[i]) if i in _MAX_STATS else v + carried[i]) & _U64)

    def publish_stat(self, i: int) -> None:
        """One counter into the row now (publish_stats' sum), for a rare event that must not be lost with a
        process killed before its next publish_stats: a root's allocation (stress checks freed <= allocated)."""
        self.stats_row.store(self.worker * N_STATS + i, (self.st[i] + self.st_carried[i]) & _U64)

    def lockdep_assert_held_read(self) -> None:
        if self.lock.mode != HELD_READ:
            self._lockdep(HELD_READ)

    def lockdep_assert_held_write(self) -> None:
        if self.lock.mode != HELD_WRITE:
            self._lockdep(HELD_WRITE)

    def lockdep_assert_held(self, shared: bool) -> None:
        """The held-lock assertion of a function that takes `shared`: read if shared, else write."""
        if self.lock.mode != (HELD_READ if shared else HELD_WRITE):
            self._lockdep(HELD_READ if shared else HELD_WRITE)

    def _lockdep(self, want: int) -> None:
        self.violation("lockdep", 0, self.lock.mode, want)
        self.lock.assert_held(want)
        raise LockError(f"{self.lock.name} held in the wrong mode")      # assert_held raised already

    def mmu_lock(self, shared: bool) -> None:
        """read_lock or write_lock(&kvm->mmu_lock), as `shared` says."""
        self.lock.read_lock() if shared else self.lock.write_lock()

    def mmu_unlock(self, shared: bool) -> None:
        self.lock.read_unlock() if shared else self.lock.write_unlock()

    # ------------------------------------------------------------------ the host page (C7)

    def kvm_set_pfn_accessed(self, pfn: int, npages: int = 1) -> None:
        """kvm_set_pfn_accessed(): the host page (a huge leaf's whole folio) was referenced."""
        self._mark_host_pages(pfn, npages, _HOST_ACCESSED)

    def kvm_set_pfn_dirty(self, pfn: int, npages: int = 1) -> None:
        """kvm_set_pfn_dirty(): the host page (a huge leaf's whole folio) holds data the guest wrote."""
        self._mark_host_pages(pfn, npages, _HOST_DIRTY)

    def _mark_host_pages(self, pfn: int, npages: int, bit: int) -> None:
        if pfn + npages > self.n_host_pages:
            # a leaf naming host pages past guest memory was read from a freed, recycled table (a correct
            # MMU never gets here; the kernel would touch a stranger's struct page): recorded, not followed
            self.violation("use-after-free", 0, pfn, npages)
        elif npages == 1:
            self.host_ad.fetch_or(pfn, bit)
        else:
            self.host_ad.or_range(pfn, npages, bit)

    # ------------------------------------------------------------------ flushing

    def mark_unflushed(self) -> None:
        """A change that can leave a vCPU translation stale is now pending a flush (the region counts holders)."""
        if not self.holds_unflushed:
            self.holds_unflushed = True
            self.ctl.fetch_add(_C_UNFLUSHED, 1)

    def unmark_unflushed(self) -> None:
        """The change marked did not happen (a lost compare-exchange): nothing is owed after all."""
        if self.holds_unflushed:
            self.holds_unflushed = False
            self.ctl.fetch_add(_C_UNFLUSHED, _U64)

    @site("debug", "timeline")
    def kvm_flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs(): returns once no vCPU can use a translation made before; settles our changes."""
        self.tlbctl.flush_remote_tlbs()
        if self.holds_unflushed:
            self.holds_unflushed = False
            self.ctl.fetch_add(_C_UNFLUSHED, _U64)

    def _torture_pause(self) -> None:
        self.waits.pause(self._torture_delay_s)

    def _torture_delay(self) -> None:
        """rcu_read_delay() of rcutorture: sometimes sleep between two steps another thread may overtake.

        Stress runs (VMConfig.torture_delay_us) call it between steps whose order is
        the point of a fix, in the fixed and in the re-injected order alike, so a clean
        run takes the same pauses as a bug run; the pause turns a window a few
        instructions wide into one a racing zap reliably lands in.
        """
        if self._torture_rng.random() < 1 / 8:
            self.waits.pause(self._torture_delay_s)

    def gup_delay(self) -> None:
        """One fault prologue in 8 sleeps VMConfig.gup_delay_us, as hva_to_pfn's GUP may."""
        if self._torture_rng.random() < 1 / 8:
            self.waits.pause(self._gup_delay_s)

    # ------------------------------------------------------------------ walks

    @site("debug")
    def new_iter(self, root: int, min_level: int, start: int) -> TdpIter:
        """A TDP iterator over the tables from `root` (the debug checkers hand out their checked form)."""
        return TdpIter(self.tables, self.geometry, root, self.root_level, min_level, start)


class Part:
    """One kernel file's functions over one Kvm: the handles they use, copied once (a handle reached
    through `self.kvm` would cost the fault path a lookup per use), and the Kvm for its shared state.

    The Mmu front (shmmmu.mmu) makes the parts and then hands each the siblings whose functions it calls,
    as the kernel's files call each other's functions: by name, with nothing inherited."""

    __slots__ = ("kvm", "worker", "config", "region", "waits", "geometry", "bits", "E", "root_level", "max_gfn",
                 "pages", "tables", "tables_np", "tm", "tmeta", "root_rows", "ws", "wstate", "ctl", "lock",
                 "pages_lock", "rcu", "pool", "slots", "tlbctl", "st", "debug", "nx", "parallel", "__dict__")

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        for name in Part.__slots__:
            if name not in ("kvm", "__dict__"):
                setattr(self, name, getattr(kvm, name))
