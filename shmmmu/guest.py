"""Guest: a vCPU's accesses as hardware makes them: kicks, TLB and paging-structure caches, walks, A/D, violations.

A vCPU is in guest mode while it accesses memory.  At each access boundary it
looks for a flusher's kick (the IPI arriving: a VM exit, after which the
requests are taken on the way back in, tlb.TlbControl); it hears of a flush
no other way.  On a TLB miss it walks the tables without any lock (the
hardware does), from the deepest paging-structure-cache entry on the path
or else from the root, caching the non-leaf entries it reads; it sets A
(and D on a write) with a compare-exchange on the leaf (the hardware's locked
update: never over an entry that changed), walking again at once if that
fails (an internal re-walk, no exit), and caches the translation.  An entry
that is not present, not writable for a write, or not executable for an
instruction fetch is an EPT violation: the cached mappings of the address
are dropped, the vCPU leaves guest mode and takes the page fault
(shmmmu.mmu.Mmu.page_fault), then retries the access.

The data word of the host page the translation names is where a write lands;
that is what makes a misdirected access visible.  In debug mode a walk that
reads a poisoned (freed) table entry, or starts from a paging-structure entry
whose table was freed since it was cached, is a violation: a table was freed
before the flush that covered it.

A batch of accesses (`run_batch`) runs in C (shmmmu._walker.Processor, with the
C TLB) in production: the loop returns to Python only for what is KVM's (the
fault, a kick, requests or a reload at entry) or a checker's (a violation to
record); it takes the guest-mode steps around a fault itself, in TlbControl's
order.  `run_batch_reference` is the same loop in Python over
`read`/`write`/`fetch` and `hw_walk_reference`; the explorer runs it (every
shared-word access there is a scheduling point), and tests/unit/test_processor.py
holds the C loop to it.
"""
from __future__ import annotations

import numpy as np

from shmmmu import _walker
from shmmmu import spte as S
from shmmmu.layout import STAT, Ctl, HostPage, Request, TlbMode, TMeta
from shmmmu.memslots import DATA_POISON
from shmmmu.mmu import RET_PF_EMULATE, Mmu
from shmmmu.pool import POISON
from shmmmu.tlb import PSC_SLOTS, Tlb
from shmmmu.workloads import EXEC, GFN_MASK, READ, WRITE

_P = S.MMU_PRESENT
_RWX = S.RWX                         # the processor's presence test (C10): bit 11 is KVM's own
_L = S.LARGE
_W = S.WRITABLE
_A = S.ACCESSED
_D = S.DIRTY
_X = S.EXECUTABLE
_PFN_MASK = S.PFN_MASK

_TOUCH, _TOUCH_WRITE = HostPage.TOUCHED, HostPage.TOUCHED | HostPage.WRITTEN
_ST_ACCESSES = STAT["accesses"]
_ST_READS = STAT["reads"]
_ST_WRITES = STAT["writes"]
_ST_HITS = STAT["tlb_hits"]
_ST_MISSES = STAT["tlb_misses"]
_ST_WALKS = STAT["hw_walks"]
_ST_FETCHES = STAT["fetches"]
_ST_PSC_HITS = STAT["psc_hits"]
_ST_REWALKS = STAT["ad_rewalks"]
_ST_KICKS = STAT["kicks"]
# the order of _walker.Processor.take_counters()
_C_COUNTERS = (_ST_ACCESSES, _ST_READS, _ST_WRITES, _ST_HITS, _ST_MISSES, _ST_WALKS, _ST_FETCHES, _ST_PSC_HITS,
               _ST_REWALKS, _ST_KICKS)

# what the C loop returns for, and where it resumes an access (shmmmu/_walker.c)
_R_END, _R_KICK, _R_FAULT, _R_STALE, _R_POISON, _R_CORRUPT, _R_ENTER, _R_RELOAD = range(8)
_PH_NEW, _PH_LOOKUP, _PH_CHECKED, _PH_WALK, _PH_ENTER = range(5)

assert _walker.ASSUMED == dict({
    "WRITABLE": S.WRITABLE, "EXECUTABLE": S.EXECUTABLE, "LARGE": S.LARGE, "ACCESSED": S.ACCESSED,
    "DIRTY": S.DIRTY, "MMU_PRESENT": S.MMU_PRESENT, "RWX": S.RWX, "PFN_MASK": S.PFN_MASK,
    "DATA_POISON": DATA_POISON, "TOUCHED": HostPage.TOUCHED, "WRITTEN": HostPage.WRITTEN, "GFN_MASK": GFN_MASK,
    "READ": READ, "WRITE": WRITE, "EXEC": EXEC, "N_COUNTERS": len(_C_COUNTERS), "TABLE_POISON": POISON,
    "PSC_SLOTS": PSC_SLOTS, "TMETA_WORDS": TMeta.WORDS, "TMETA_GEN": TMeta.GEN, "OUTSIDE": TlbMode.OUTSIDE,
    "IN_GUEST": TlbMode.IN_GUEST, "EXITING": TlbMode.EXITING, "REQ_TLB_FLUSH": Request.TLB_FLUSH}), \
    "_walker.c is out of date"


class GuestFault(RuntimeError):
    """An access could not complete (no memslot, or faults never made progress)."""


class Vcpu:
    """A vCPU's guest side on top of one process's Mmu."""

    PROGRESS_BOUND_S = 60.0          # an access that cannot complete for this long is a liveness failure

    def __init__(self, vm, index: int, processor: str | None = None):
        """`processor`: "c" (the C loop and TLB) or "python" (the reference); by default C, except under
        the explorer, whose scheduling points are the Python loop's shared-word accesses."""
        if processor is None:
            processor = "python" if vm.waits.deterministic else "c"
        if processor not in ("c", "python"):
            raise ValueError(f"processor must be 'c' or 'python', not {processor!r}")
        self.index = index
        c = vm.config
        self.tlb = _walker.Tlb(c.bits, c.tlb_entries) if processor == "c" else Tlb(c.bits, c.tlb_entries)
        self.mmu = Mmu(vm, index, self.tlb)
        self.tlbctl = self.mmu.tlbctl
        self.waits = vm.waits
        self.tables = self.mmu.tables
        self.tmeta_np = vm.region.array("tmeta")     # the debug checks' read of a table's generation (no step)
        self.data = self.mmu.slots.data
        self.touched = self.mmu.touched
        self.E = self.mmu.E
        self.bits = self.mmu.bits
        self.root_level = self.mmu.root_level
        self.st = self.mmu.st
        self.debug = c.debug
        # translation sources, for the stale-translation check (debug): (level, gfn>>shift) -> (sptep, spte)
        # (the C TLB keeps them in its entries)
        self.sources: dict[tuple[int, int], tuple[int, int]] = {}
        self.proc: _walker.Processor | None = None
        self._batch: tuple[list[int], list[int]] = ([], [])
        self._kinds = np.zeros(0, dtype=np.int8)
        self._storm_start = 0.0          # when this access's RETRY storm began (ept_violation)
        # a test seam (tests/unit/test_processor.py; the C Processor's ad_race_every): every Nth A/D update another
        # processor's locked update of the leaf lands before this walk's compare-exchange; 0: never
        self.ad_race_every = 0
        self._ad_race_count = 0
        self._mmu_publish_stats = self.mmu.publish_stats
        # a TLB miss's walk: (sptep, spte, level) of the leaf after its A/D update, or None
        self._walk_leaf = self.hw_walk_reference
        if processor == "c":
            r = vm.region
            self.proc = _walker.Processor(self.tlb, r.array("tables").reshape(-1), r.array("data").reshape(-1),
                                          r.array("touched").reshape(-1), r.array("ctl").reshape(-1),
                                          r.array("wstate").reshape(-1), self.tmeta_np.reshape(-1),
                                          self.root_level, self.bits, bool(self.debug), Ctl.UNFLUSHED,
                                          Ctl.ROOTS_GEN, self.tlbctl.mode_word, self.tlbctl.req_word,
                                          self.walk_report)
            self._walk_leaf = self._walk_c
            self.run_batch = self._run_batch_c
            self.load_batch = self._load_batch_c
            # the C loop's counters reach the Mmu's before each publication, whoever publishes
            self.mmu.publish_stats = self.publish_stats
        else:
            self.run_batch = self.run_batch_reference

    def release(self) -> None:
        """Let go of the C processor's views of the region, so it can be unmapped."""
        if self.proc is not None:
            self.proc.release()

    def enter(self) -> None:
        if self.tlbctl.enter_guest():
            self.reload_root()

    def exit(self) -> None:
        self.tlbctl.exit_guest()

    def reload_root(self) -> None:
        """KVM_REQ_MMU_RELOAD (or no root yet): leave guest mode, unload and load the root, come back in."""
        tlbctl = self.tlbctl
        while True:
            tlbctl.exit_guest()
            self.mmu.kvm_mmu_reload()
            if not tlbctl.enter_guest():
                return

    def translate(self, gfn: int, write: bool, exec_: bool = False) -> int:
        """The host page of gfn for this access, faulting as needed (call in guest mode); -1 if no memslot."""
        st = self.st
        if self.tlbctl.kicked():
            st[_ST_KICKS] += 1
            self.take_kick()
        e = self.tlb.lookup(gfn)
        if e is not None and (e[1] or not write) and (e[3] or not exec_):
            st[_ST_HITS] += 1
            if self.debug:
                self._check_fresh(gfn, e[2], write)
            return e[0]
        st[_ST_MISSES] += 1
        tries = 0
        while True:
            hpfn = self._hw_walk(gfn, write, exec_)
            if hpfn >= 0:
                return hpfn
            tries += 1
            if self.ept_violation(gfn, write, exec_, tries) == RET_PF_EMULATE:
                return -1                   # no memslot: an emulated (MMIO) access, nothing to touch

    def take_kick(self) -> None:
        """A flusher's kick arrived at an access boundary: the VM exit (its IPI taken: the flusher's wait for
        this vCPU ends), then the entry takes the requests (and a reload, if one was asked)."""
        self.tlbctl.exit_guest()
        if self.tlbctl.enter_guest():
            self.reload_root()

    def ept_violation(self, gfn: int, write: bool, exec_: bool, tries: int) -> int:
        """Drop gfn's cached mappings, leave guest mode, take the fault, come back in (reloading the root if
        asked); the RET_PF_* value.

        An EPT violation invalidates the translations and paging-structure entries that
        would translate its address (Intel SDM, "Operations that invalidate cached
        mappings"): the walk after the fault starts from what the fault left, not from
        the cached entry that led to the violation.  `tries` counts this access's faults:
        past 8 a RETRY storm (an entry frozen across a slow flush) lets the freezer run,
        as preemption would on a real host, and past the progress bound the access gives up."""
        self.tlb.invalidate(gfn)
        tlbctl = self.tlbctl
        tlbctl.exit_guest()
        try:
            r = self.mmu.page_fault(gfn, write, exec_)
            if tries >= 8:
                self.retry_storm(gfn, tries)
        finally:
            if tlbctl.enter_guest():
                self.reload_root()
        return r

    def retry_storm(self, gfn: int, tries: int) -> None:
        """The 8th and later fault of one access, outside guest mode: let whoever holds the entry frozen run,
        as preemption would on a real host; GuestFault past the progress bound."""
        waits = self.waits
        if tries == 8:
            self._storm_start = waits.now()
        waits.yield_cpu() if tries < 64 else waits.pause(0.0001)
        if tries % 256 == 0 and waits.now() - self._storm_start > self.PROGRESS_BOUND_S:
            raise GuestFault(f"vCPU {self.index}: gfn {gfn:#x} still faults after {tries} tries "
                             f"in {self.PROGRESS_BOUND_S:.0f}s")

    def _hw_walk(self, gfn: int, write: bool, exec_: bool = False) -> int:
        """The hardware page walk (C: Processor.walk; Python: hw_walk_reference, the explorer's, each load
        and cmpxchg a scheduling point): the host page, caching the translation, or -1 for an EPT violation."""
        found = self._walk_leaf(gfn, write, exec_)
        if found is None:
            return -1
        return self._use_leaf(gfn, *found)

    def _walk_c(self, gfn: int, write: bool, exec_: bool = False) -> tuple[int, int, int] | None:
        """hw_walk_reference in C, with the C caches and counters (Processor.walk)."""
        return self.proc.walk(gfn, write, exec_, self.mmu.root)

    def hw_walk_reference(self, gfn: int, write: bool, exec_: bool = False) -> tuple[int, int, int] | None:
        """The walk in Python, step for step: (sptep, spte, level) of the leaf after its A/D update, or None
        for an EPT violation.  Tests hold _walker's Processor.walk to it.

        It starts at the deepest paging-structure-cache entry on gfn's path (else the root) and
        caches every non-leaf entry it reads.  A lost A/D compare-exchange walks again at once,
        inside the processor (no exit: the kernel never hears of it), counted in ad_rewalks.
        Debug: a cached entry whose table was freed since (its generation moved) is a use after
        free, a poisoned entry read is a read of a freed table: both mean a table was freed
        before the flush that covered it."""
        st, tlb, tables, E, bits, debug = self.st, self.tlb, self.tables, self.E, self.bits, self.debug
        st[_ST_WALKS] += 1
        while True:
            cached = tlb.psc_lookup(gfn)
            if cached is None:
                table, level = self.mmu.root, self.root_level
            else:
                table, level, gen = cached
                st[_ST_PSC_HITS] += 1
                if debug and self._table_gen(table) != gen:
                    self.walk_report("use-after-free", gfn, table, gen)
            while True:
                sptep = table * E + ((gfn >> (bits * (level - 1))) & (E - 1))
                spte = tables.load(sptep)
                if not spte & _RWX:
                    if debug and spte == POISON:
                        self.walk_report("poison-read", gfn, sptep, level)
                    return None
                if level == 1 or spte & _L:
                    break
                table = (spte & _PFN_MASK) >> S.PFN_SHIFT
                tlb.psc_insert(level, gfn, table, self._table_gen(table) if debug else 0)
                level -= 1
            if write and not spte & _W:
                return None
            if exec_ and not spte & _X:
                return None                 # an instruction fetch from a non-executable leaf (NX huge page)
            want = spte | _A | (_D if write else 0)
            if want != spte:
                if self.ad_race_every:
                    self._ad_race_count += 1
                    if self._ad_race_count % self.ad_race_every == 0:
                        tables.fetch_or(sptep, _A | (_D if spte & _W else 0))
                # the hardware's locked A/D update: only over the entry it read
                if tables.cas(sptep, spte, want) != spte:
                    st[_ST_REWALKS] += 1
                    continue
                spte = want
            return sptep, spte, level

    def walk_report(self, kind: str, gfn: int, a: int, b: int) -> None:
        """Debug: what a hardware walk saw of a freed table, recorded (both processors report here)."""
        if kind == "use-after-free":        # (gfn, the table a cached entry led to, its generation when cached)
            self.mmu.violation("use-after-free", gfn, a, b)
        else:                               # (gfn, the poisoned entry read, its level)
            self.mmu.violation("poison-read", gfn, a, b)

    def _table_gen(self, table: int) -> int:
        """Debug: a table's generation (bumped at every free), read as the checker's, not as a step; 0 for a
        number past the pool (read from garbage: the next step's load says what it is)."""
        return int(self.tmeta_np[table, TMeta.GEN]) if table < len(self.tmeta_np) else 0

    def _use_leaf(self, gfn: int, sptep: int, spte: int, level: int) -> int:
        """Cache the translation the walk found and return gfn's host page."""
        base = (spte & _PFN_MASK) >> S.PFN_SHIFT
        shift = self.bits * (level - 1)
        # a translation cached with D clear does not take a write: the write walks again to set D,
        # as the processor does (the D-bit assist)
        self.tlb.insert(gfn, level, base, bool(spte & _W) and bool(spte & _D), bool(spte & _X))
        if self.debug:
            self.sources[(level, gfn >> shift)] = (sptep, spte)
        return base + (gfn & ((1 << shift) - 1))

    def _check_fresh(self, gfn: int, level: int, write: bool) -> None:
        """Debug, on a TLB hit: if the source entry no longer grants this access, a flush must be in progress.

        In progress means: a change whose flush has not returned (the region's unflushed
        count: every changer holds it from before its change until its flush returns).
        Otherwise the change was flushed, or never was, and this vCPU uses a stale
        translation: kvm_flush_remote_tlbs returned while this vCPU could still use it.
        """
        src = self.sources.get((level, gfn >> (self.bits * (level - 1))))
        if src is None:
            return
        sptep, cached = src
        now = self.tables.load(sptep)
        if now == cached or (now & _P and (now & _PFN_MASK) == (cached & _PFN_MASK)
                             and (now & _W or not write)):
            return
        if split_still_maps(self.tables, self.E, self.bits, now, cached, level, gfn, write):
            return
        if self.mmu.ctl.load(Ctl.UNFLUSHED):
            return
        self.mmu.violation("stale-translation", gfn, cached, now)

    # ---- guest memory

    def write(self, gfn: int, value: int) -> None:
        hpfn = self.translate(gfn, True)
        if hpfn < 0:
            return
        self.st[_ST_ACCESSES] += 1
        self.st[_ST_WRITES] += 1
        if self.debug:
            self.touched.fetch_or(hpfn, _TOUCH_WRITE)          # what the host must hear of (hostpage.py)
            old = self.data.xchg(hpfn, value)
            if old == DATA_POISON:
                self.mmu.violation("write-to-unmapped-host-page", gfn, hpfn, value)
        else:
            self.data.store(hpfn, value)

    def read(self, gfn: int) -> int:
        hpfn = self.translate(gfn, False)
        if hpfn < 0:
            return 0
        self.st[_ST_ACCESSES] += 1
        self.st[_ST_READS] += 1
        if self.debug:
            self.touched.fetch_or(hpfn, _TOUCH)
        v = self.data.load(hpfn)
        if self.debug and v == DATA_POISON:
            self.mmu.violation("write-to-unmapped-host-page", gfn, hpfn, v)
        return v

    def fetch(self, gfn: int) -> int:
        """An instruction fetch: a read that needs X on the leaf (an exec fault if it is missing)."""
        hpfn = self.translate(gfn, False, True)
        if hpfn < 0:
            return 0
        self.st[_ST_ACCESSES] += 1
        self.st[_ST_FETCHES] += 1
        if self.debug:
            self.touched.fetch_or(hpfn, _TOUCH)
        v = self.data.load(hpfn)
        if self.debug and v == DATA_POISON:
            self.mmu.violation("write-to-unmapped-host-page", gfn, hpfn, v)
        return v

    # ---- a batch of accesses

    def load_batch(self, gfns: np.ndarray, kinds: np.ndarray) -> None:
        """The accesses the next run_batch calls index into: GFNs (int64) and READ/WRITE/EXEC (int8)."""
        self._batch = (gfns.tolist(), kinds.tolist())

    def _load_batch_c(self, gfns: np.ndarray, kinds: np.ndarray) -> None:
        self._kinds = np.ascontiguousarray(kinds, dtype=np.int8)
        self.proc.batch(np.ascontiguousarray(gfns, dtype=np.int64), self._kinds)

    def run_batch(self, start: int, end: int, vbase: int) -> None:
        """Accesses [start, end) of the loaded batch, in guest mode (the caller entered it): a write stores
        vbase | (gfn & GFN_MASK) (workloads.make_value), a read or fetch checks the value names its GFN.
        Bound when the Vcpu is built: the C loop, or run_batch_reference."""
        raise NotImplementedError

    def run_batch_reference(self, start: int, end: int, vbase: int) -> None:
        """run_batch in Python, access by access (what the C loop is tested against)."""
        gl, kl = self._batch
        for i in range(start, end):
            g, kind = gl[i], kl[i]
            if kind == WRITE:
                self.write(g, vbase | (g & GFN_MASK))
            else:
                v = self.fetch(g) if kind == EXEC else self.read(g)
                if v and (v & GFN_MASK) != (g & GFN_MASK) and v >> 63:
                    self.mmu.violation("guest-memory-corrupt", g, v, 0)

    def _run_batch_c(self, start: int, end: int, vbase: int) -> None:
        """run_batch in C (shmmmu/_walker.c): back here for a fault, a kick, requests or a reload at entry, a
        violation, the end."""
        run = self.proc.run
        tlbctl, mmu = self.tlbctl, self.mmu
        page_fault = mmu.page_fault               # chosen when the Mmu was built (entry point, wrappers)
        i, phase = start, _PH_NEW
        at, tries = -1, 0
        while True:
            r, i, a, b, c = run(i, end, vbase, mmu.root, phase, tlbctl.roots_gen)
            if r == _R_FAULT:
                # ept_violation's steps, with the guest-mode ones in C: the loop dropped gfn's cached
                # mappings and left guest mode before returning, and re-enters (PH_ENTER) before it walks again
                if i != at:
                    at, tries = i, 0
                tries += 1
                try:
                    ret = page_fault(a, b != 0, c != 0)
                    if tries >= 8:
                        self.retry_storm(a, tries)
                except BaseException:
                    if tlbctl.enter_guest():
                        self.reload_root()
                    raise
                if ret == RET_PF_EMULATE:
                    if tlbctl.enter_guest():
                        self.reload_root()
                    i += 1                          # an emulated (MMIO) access: nothing to touch
                    phase = _PH_NEW
                else:
                    phase = _PH_ENTER
            elif r == _R_END:
                return
            elif r == _R_KICK:
                # the kick's VM exit was taken in C (take_kick's first step): the entry, then this access
                if tlbctl.enter_guest():
                    self.reload_root()
                phase = _PH_LOOKUP
            elif r == _R_ENTER:
                # the entry after a fault found requests (vCPU outside guest mode again): the whole entry here
                if tlbctl.enter_guest():
                    self.reload_root()
                phase = _PH_WALK
            elif r == _R_RELOAD:
                self.reload_root()
                phase = _PH_WALK
            elif r == _R_STALE:
                mmu.violation("stale-translation", a, b, c)
                phase = _PH_CHECKED
            else:
                if r == _R_POISON:
                    mmu.violation("write-to-unmapped-host-page", a, b, c)
                    # a read of poison is also a value naming another GFN (the reference's read returns it)
                    if self._kinds[i] != WRITE and (c & GFN_MASK) != (a & GFN_MASK):
                        mmu.violation("guest-memory-corrupt", a, c, 0)
                else:
                    mmu.violation("guest-memory-corrupt", a, b, 0)
                i += 1
                phase = _PH_NEW

    def publish_stats(self) -> None:
        """Mmu.publish_stats with the C loop's counters folded in first."""
        self.sync_counters()
        self._mmu_publish_stats()

    def sync_counters(self) -> None:
        """Fold the C loop's counters into the Mmu's (st) now (no-op for the reference)."""
        if self.proc is not None:
            st = self.st
            for k, v in zip(_C_COUNTERS, self.proc.take_counters()):
                st[k] += v


def split_still_maps(tables, E: int, bits: int, now: int, cached: int, level: int, gfn: int, write: bool) -> bool:
    """A huge leaf split in place (6.12's eager split: no flush, the translation is unchanged) left a non-leaf
    where the cached leaf was; below it, gfn's leaf maps the same host page (_walker.c has the same test)."""
    want = ((cached & _PFN_MASK) >> S.PFN_SHIFT) + (gfn & ((1 << (bits * (level - 1))) - 1))
    spte = now
    while level > 1 and spte & _P and not spte & _L:
        level -= 1
        spte = tables.load(((spte & _PFN_MASK) >> S.PFN_SHIFT) * E + ((gfn >> (bits * (level - 1))) & (E - 1)))
    if not spte & _P or (level > 1 and not spte & _L) or spte == now:
        return False
    got = ((spte & _PFN_MASK) >> S.PFN_SHIFT) + (gfn & ((1 << (bits * (level - 1))) - 1))
    return got == want and bool(spte & _W or not write)
