"""TLB: each vCPU's private translations and paging-structure caches, and remote flushes by request and kick.

A vCPU is *in guest mode* while it accesses memory (TLB lookups and, on a
miss, the hardware walk of the tables), and *outside* while it handles a
fault, waits on a lock, or idles (the kernel's vcpu->mode).  It learns of a
remote flush only as hardware does, from kvm_make_all_cpus_request: the
flusher sets KVM_REQ_TLB_FLUSH in every other vCPU's request word, then
kicks each one that is not outside guest mode (kvm_vcpu_exiting_guest_mode:
IN_GUEST becomes EXITING, and an IPI is sent); kvm_flush_remote_tlbs waits
until every kicked vCPU has taken its IPI (smp_call_function_many with
wait: the handler ran), which it does at its next access boundary: a VM
exit, vcpu->mode OUTSIDE.  The vCPU then takes its requests on the way back
in (vcpu_enter_guest: flush the TLB and the paging-structure caches, then
vcpu->mode = IN_GUEST, then look at the requests again and go back out if
one came meanwhile).  Between two boundaries a vCPU keeps using what it has
cached, so a flusher that did not wait would return while a vCPU still
translates through what the flush was meant to remove.  Waiting for vCPUs
outside guest mode would deadlock (one may wait on the lock the flusher
holds), and they take the request before they use their caches again.

Translations and paging-structure entries are tagged by the root they were
made from: a vCPU uses only those of its current root, and loading a root
flushes the vCPU's own caches (kvm_mmu_load's tlb_flush_current), so the model
keeps one context per vCPU.  A reload request (kvm_reload_remote_mmus) moves
the roots generation and then requests and kicks like a flush: every guest
entry compares the roots generation, so the kicked vCPU reloads before its
next access.
"""
from __future__ import annotations

from shmmmu.layout import Ctl, Request, TlbMode, WState

TLB_OUTSIDE, TLB_IN_GUEST, TLB_EXITING = TlbMode.OUTSIDE, TlbMode.IN_GUEST, TlbMode.EXITING
REQ_TLB_FLUSH = Request.TLB_FLUSH
_U64 = (1 << 64) - 1

# Paging-structure caches: entries at levels 2, 3, 4, 5 (the PDE, PDPTE, PML4E and PML5E caches), each
# direct-mapped (slot = the entry's GFN prefix modulo the size).  Recent Intel cores have a few dozen
# PDE-cache entries and a handful above; direct mapping makes eviction a function of the key alone, so
# the C caches (shmmmu/_walker.c) and these keep the same entries without sharing a replacement order.
PSC_SLOTS = (32, 8, 4, 4)


class FlushStuck(RuntimeError):
    """A vCPU in guest mode never took a flusher's kick (it died, or the protocol is broken)."""


class Tlb:
    """A vCPU's private caches: translations, per level (gfn >> shift) -> (host pfn of the page, writable,
    executable), and paging-structure caches, per level (gfn >> shift) -> (the table the non-leaf entry
    points to, that table's generation when cached: debug only, 0 otherwise).

    The reference of shmmmu._walker.Tlb (the C caches production vCPUs use): the same
    lookup order, the same full TLB flush when `capacity` inserts were made (the
    paging-structure caches are not part of it), the same direct-mapped slots.
    """

    def __init__(self, bits: int, capacity: int):
        self.bits = bits
        self.capacity = capacity
        self.maps: list[dict[int, tuple[int, bool, bool]]] = [{}, {}, {}, {}]   # index level-1
        self.psc: list[list[tuple[int, int, int] | None]] = [[None] * n for n in PSC_SLOTS]   # index level-2
        self.size = 0
        self.flushes = 0

    def lookup(self, gfn: int) -> tuple[int, bool, int, bool] | None:
        """(host pfn of gfn, writable, level, executable) or None."""
        e = self.maps[0].get(gfn)
        if e is not None:
            return e[0], e[1], 1, e[2]
        bits = self.bits
        for level in (2, 3):
            m = self.maps[level - 1]
            if m:
                e = m.get(gfn >> (bits * (level - 1)))
                if e is not None:
                    return e[0] + (gfn & ((1 << (bits * (level - 1))) - 1)), e[1], level, e[2]
        return None

    def insert(self, gfn: int, level: int, pfn_base: int, writable: bool, executable: bool = True) -> None:
        if self.size >= self.capacity:
            self._drop_translations()
        self.maps[level - 1][gfn >> (self.bits * (level - 1))] = (pfn_base, writable, executable)
        self.size += 1

    def psc_lookup(self, gfn: int) -> tuple[int, int, int] | None:
        """The deepest cached non-leaf entry on gfn's path: (the table it points to, that table's level, its
        generation when cached), or None (the walk starts at the root)."""
        bits = self.bits
        for i, slots in enumerate(self.psc):
            key = gfn >> (bits * (i + 1))
            e = slots[key & (len(slots) - 1)]
            if e is not None and e[0] == key:
                return e[1], i + 1, e[2]
        return None

    def psc_insert(self, level: int, gfn: int, table: int, gen: int) -> None:
        """Cache the non-leaf entry at `level` on gfn's path, which points to `table`."""
        slots = self.psc[level - 2]
        key = gfn >> (self.bits * (level - 1))
        slots[key & (len(slots) - 1)] = (key, table, gen)

    def invalidate(self, gfn: int) -> None:
        """What an EPT violation drops: every translation and paging-structure entry that would translate gfn."""
        bits = self.bits
        for level in (1, 2, 3):
            self.maps[level - 1].pop(gfn >> (bits * (level - 1)), None)
        for i, slots in enumerate(self.psc):
            key = gfn >> (bits * (i + 1))
            e = slots[key & (len(slots) - 1)]
            if e is not None and e[0] == key:
                slots[key & (len(slots) - 1)] = None

    def _drop_translations(self) -> None:
        for m in self.maps:
            m.clear()
        self.size = 0
        self.flushes += 1

    def flush_local(self) -> None:
        """A flush of this vCPU's caches: translations and paging-structure entries alike."""
        self._drop_translations()
        self.psc = [[None] * n for n in PSC_SLOTS]

    def snapshot(self) -> dict[tuple[int, int], tuple[int, bool, bool]]:
        """{(level, gfn >> shift): (pfn_base, writable, executable)}: what the C TLB's snapshot() gives."""
        return {(level, key): e for level, m in enumerate(self.maps, 1) for key, e in m.items()}

    def psc_snapshot(self) -> dict[tuple[int, int], tuple[int, int]]:
        """{(level, gfn >> shift): (table, generation)} of every paging-structure entry: the C psc_snapshot()."""
        return {(i + 2, e[0]): (e[1], e[2]) for i, slots in enumerate(self.psc) for e in slots if e is not None}


class TlbControl:
    """The shared side: one process's handle on the vCPUs' modes and request words."""

    def __init__(self, vm, worker: int, tlb: Tlb | None = None):
        self.waits = vm.waits
        self.ctl = vm.region.words("ctl")
        self.ws = vm.region.words("wstate")
        self.n_vcpus = vm.config.n_vcpus
        self.worker = worker
        self.tlb = tlb
        self.wstate = vm.region.columns("wstate", WState)
        self.mode_word = self.wstate.tlb_mode.word(worker)
        self.req_word = self.wstate.tlb_requests.word(worker)
        self.roots_gen = -1          # the reload requests answered by the vCPU's root (Mmu.kvm_mmu_load sets it)
        self.flushes = 0
        self.wait_ns = 0
        self.wait_max_ns = 0

    # ---- the vCPU side
    def enter_guest(self) -> bool:
        """vcpu_enter_guest: take the pending requests, publish IN_GUEST_MODE, and look again (a request that
        came meanwhile cancels the entry: OUTSIDE, and round again); True if a root reload was requested
        (the caller leaves guest mode and reloads)."""
        ws, req, mode = self.ws, self.req_word, self.mode_word
        while True:
            if ws.load(req):
                self.process_requests()
            ws.store(mode, TLB_IN_GUEST)
            if not ws.load(req):                # kvm_vcpu_exit_request
                break
            ws.store(mode, TLB_OUTSIDE)
        # on entry the roots generation is read whatever the requests said: this vCPU's own flushes
        # (issued outside guest mode) request nothing of it
        return self.ctl.load(Ctl.ROOTS_GEN) != self.roots_gen

    def exit_guest(self) -> None:
        """The VM exit: vcpu->mode OUTSIDE (a kick's IPI, if one was sent, is taken here)."""
        self.ws.store(self.mode_word, TLB_OUTSIDE)

    def kicked(self) -> bool:
        """At an access boundary in guest mode: has a flusher's kick (its IPI) arrived?"""
        return self.ws.load(self.mode_word) == TLB_EXITING

    def process_requests(self) -> None:
        """kvm_check_request(KVM_REQ_TLB_FLUSH): clear the bit; if it was set, flush the TLB and the
        paging-structure caches (kvm_vcpu_flush_tlb_all)."""
        if self.ws.fetch_and(self.req_word, _U64 ^ REQ_TLB_FLUSH) & REQ_TLB_FLUSH and self.tlb is not None:
            self.tlb.flush_local()

    def flush_current(self) -> None:
        """tlb_flush_current(): this vCPU's own caches, after it loaded a root."""
        if self.tlb is not None:
            self.tlb.flush_local()

    # ---- the flusher side
    def make_all_cpus_request(self) -> list[int]:
        """kvm_make_all_cpus_request(kvm, KVM_REQ_TLB_FLUSH) up to its IPIs: the request set for every other
        vCPU, and a kick for each one not outside guest mode; the vCPUs kicked (to wait for)."""
        mode, requests = self.wstate.tlb_mode, self.wstate.tlb_requests
        kicked = []
        for k in range(self.n_vcpus):
            if k == self.worker:
                continue
            requests.fetch_or(k, REQ_TLB_FLUSH)
            # kvm_vcpu_exiting_guest_mode; with KVM_REQUEST_WAIT an EXITING vCPU is waited for too
            if mode.cas(k, TLB_IN_GUEST, TLB_EXITING) != TLB_OUTSIDE:
                kicked.append(k)
        return kicked

    def flush_remote_tlbs(self, timeout: float = 30.0) -> None:
        """kvm_flush_remote_tlbs(): returns once no vCPU can use a translation or a paging-structure entry
        made before the call: every vCPU kicked has left guest mode, and takes the request before it enters."""
        waits = self.waits
        t0 = waits.now_ns()
        if self.tlb is not None:                       # our own caches, if we are a vCPU (outside guest mode)
            self.tlb.flush_local()
        mode = self.wstate.tlb_mode
        for k in self.make_all_cpus_request():
            spins = 0
            while mode.load(k) == TLB_EXITING:         # the IPI not taken yet
                spins += 1
                if spins > 64:
                    waits.yield_cpu()
                else:
                    waits.relax()
                if spins & 0xFFF == 0 and waits.now_ns() - t0 > timeout * 1e9:
                    raise FlushStuck(f"vCPU {k} (pid {self.wstate.pid.load(k)}) has not taken the kick of a "
                                     f"TLB flush after {timeout:.0f}s")
        self.flushes += 1
        dt = waits.now_ns() - t0
        self.wait_ns += dt
        if dt > self.wait_max_ns:
            self.wait_max_ns = dt

    def recover(self, dead: int) -> None:
        """A dead vCPU is outside guest mode for good."""
        self.wstate.tlb_mode.store(dead, TLB_OUTSIDE)
