"""TLB: each vCPU's private translation cache, and remote flushes with vCPU modes and acknowledgements.

A vCPU is *in guest mode* while it performs guest accesses (TLB lookups and,
on a miss, the hardware walk of the tables), and *outside* while it handles a
fault, waits on a lock, or idles (the kernel's vcpu->mode).  A flush bumps the
flush generation and waits only for vCPUs that are in guest mode and have not
acknowledged it.  A vCPU publishes "in guest mode" before it reads the
generation (then flushes and acknowledges), so none can slip past; it checks
the generation before every access, as a request is checked on VM entry after
a kick.  Waiting for vCPUs outside guest mode would deadlock (one may wait on
the lock the flusher holds); not waiting for those inside would leave stale
translations, or a hardware walk standing in a table about to be freed.

Translations are tagged by the root they were made from: a vCPU uses only
those of its current root, and loading a root flushes the vCPU's own
translations (kvm_mmu_load's tlb_flush_current), so the model keeps one
context per vCPU.  A reload request (kvm_reload_remote_mmus) moves the roots
generation and then kicks like a flush: a vCPU that acknowledges it in guest
mode sees the new generation in the same check and reloads before its next
access; one outside guest mode sees it on entry.
"""
from __future__ import annotations

from shmmmu.layout import Ctl, TlbMode, WState

TLB_OUTSIDE, TLB_IN_GUEST = TlbMode.OUTSIDE, TlbMode.IN_GUEST


class FlushStuck(RuntimeError):
    """A vCPU in guest mode never acknowledged a flush (it died, or the protocol is broken)."""


class Tlb:
    """A vCPU's private translations: per level, (gfn >> shift) -> (host pfn of the page, writable, executable).

    The reference of shmmmu._walker.Tlb (the C TLB production vCPUs use): the same
    lookup order, the same full-flush when `capacity` inserts were made.
    """

    def __init__(self, bits: int, capacity: int):
        self.bits = bits
        self.capacity = capacity
        self.maps: list[dict[int, tuple[int, bool, bool]]] = [{}, {}, {}, {}]   # index level-1
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
            self.flush_local()
        self.maps[level - 1][gfn >> (self.bits * (level - 1))] = (pfn_base, writable, executable)
        self.size += 1

    def invalidate(self, gfn: int) -> None:
        for level in (1, 2, 3):
            self.maps[level - 1].pop(gfn >> (self.bits * (level - 1)), None)

    def flush_local(self) -> None:
        for m in self.maps:
            m.clear()
        self.size = 0
        self.flushes += 1

    def snapshot(self) -> dict[tuple[int, int], tuple[int, bool, bool]]:
        """{(level, gfn >> shift): (pfn_base, writable, executable)}: what the C TLB's snapshot() gives."""
        return {(level, key): e for level, m in enumerate(self.maps, 1) for key, e in m.items()}


class TlbControl:
    """The shared side: one process's handle on the flush generation and the vCPU modes."""

    def __init__(self, vm, worker: int, tlb: Tlb | None = None):
        self.waits = vm.waits
        self.ctl = vm.region.words("ctl")
        self.ws = vm.region.words("wstate")
        self.n_vcpus = vm.config.n_vcpus
        self.worker = worker
        self.tlb = tlb
        self.wstate = vm.region.columns("wstate", WState)
        self.mode_word = self.wstate.tlb_mode.word(worker)
        self.ack_word = self.wstate.tlb_ack.word(worker)
        self.acked = self.ws.load(self.ack_word)
        self.roots_gen = -1          # the reload requests answered by the vCPU's root (Mmu.kvm_mmu_load sets it)
        self.flushes = 0
        self.wait_ns = 0
        self.wait_max_ns = 0

    # ---- the vCPU side
    def enter_guest(self) -> bool:
        """Publish IN_GUEST_MODE, then honour any flush requested before it (vcpu_enter_guest); True if a
        root reload was requested (the caller leaves guest mode and reloads)."""
        self.ws.store(self.mode_word, TLB_IN_GUEST)
        self.check_request()
        # on entry the roots generation is read whatever the flush generation says: this vCPU's own
        # flushes (issued outside guest mode) acknowledge a kick without looking at it
        return self.ctl.load(Ctl.ROOTS_GEN) != self.roots_gen

    def exit_guest(self) -> None:
        self.ws.store(self.mode_word, TLB_OUTSIDE)

    def check_request(self) -> bool:
        """KVM_REQ_TLB_FLUSH: flush the private TLB if the generation moved, and acknowledge; True if a
        KVM_REQ_MMU_RELOAD came with it (the roots generation moved past the vCPU's root)."""
        g = self.ctl.load(Ctl.FLUSH_GEN)
        if g != self.acked:
            if self.tlb is not None:
                self.tlb.flush_local()
            self.acked = g
            self.ws.store(self.ack_word, g)
            return self.ctl.load(Ctl.ROOTS_GEN) != self.roots_gen
        return False

    def flush_current(self) -> None:
        """tlb_flush_current(): this vCPU's own translations, after it loaded a root."""
        if self.tlb is not None:
            self.tlb.flush_local()

    # ---- the flusher side
    def flush_remote_tlbs(self, timeout: float = 30.0) -> None:
        """kvm_flush_remote_tlbs(): returns once no vCPU can use a translation made before the call."""
        waits = self.waits
        t0 = waits.now_ns()
        gen = self.ctl.fetch_add(Ctl.FLUSH_GEN, 1) + 1
        if self.tlb is not None:                       # our own TLB, if we are a vCPU
            self.tlb.flush_local()
            self.acked = gen
            self.ws.store(self.ack_word, gen)
        mode, ack = self.wstate.tlb_mode, self.wstate.tlb_ack
        for k in range(self.n_vcpus):
            if k == self.worker:
                continue
            spins = 0
            while mode.load(k) == TLB_IN_GUEST and ack.load(k) < gen:
                spins += 1
                if spins > 64:
                    waits.yield_cpu()
                else:
                    waits.relax()
                if spins & 0xFFF == 0 and waits.now_ns() - t0 > timeout * 1e9:
                    raise FlushStuck(f"vCPU {k} (pid {self.wstate.pid.load(k)}) has not acknowledged "
                                     f"TLB flush {gen} after {timeout:.0f}s in guest mode")
        self.flushes += 1
        dt = waits.now_ns() - t0
        self.wait_ns += dt
        if dt > self.wait_max_ns:
            self.wait_max_ns = dt

    def recover(self, dead: int) -> None:
        """A dead vCPU is outside guest mode for good."""
        self.wstate.tlb_mode.store(dead, TLB_OUTSIDE)
