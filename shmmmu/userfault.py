"""Userfault: demand paging as userfaultfd does it: a page not yet in stops the vCPU's fault until a handler process copies it in.

demand_paging_test (tools/testing/selftests/kvm/demand_paging_test.c and
lib/userfaultfd_util.c, Linux 6.5, where -r added readers per uffd) registers
the guest memory with a userfaultfd in MISSING mode before the vCPUs run.
Each first touch of a page makes KVM's fault (hva_to_pfn -> get_user_pages)
enter handle_userfault, which queues a message on the uffd and puts the
vCPU thread to sleep; a reader thread of the uffd reads it, waits the
test's -d delay, and UFFDIO_COPY fills the page from guest_data_prototype
(0xAB bytes) and wakes the sleeper.  A second reader of the same fault gets
EEXIST, which the 6.5 handler takes as done.

Here the host page table (the memslot's host map) holds MISSING on a page not
yet in; the faulting vCPU posts UFFD_REQUESTED | gfn in its own wstate word
(WState.UFFD: one outstanding fault per vCPU, as one thread sleeps in one
fault) and waits; a handler process (workers/uffd.py) that serves the vCPU's
uffd claims the word with a CAS, copies, clears MISSING and stores 0.
"""
from __future__ import annotations

import time

import numpy as np

from shmmmu.layout import STAT, Ctl, WState

MISSING = 1 << 62                # in a host map entry: the page is not in yet (a userfaultfd MISSING range)
UFFD_REQUESTED = 1 << 62         # WState.UFFD: a vCPU waits for this gfn (low bits)
UFFD_CLAIMED = 1 << 61           # ... and a handler has taken it
GFN_BITS = (1 << 52) - 1
PROTOTYPE = 0xABABABABABABABAB   # guest_data_prototype: memset(0xAB) (one word stands for the page)
_W = WState.WORDS


def register_missing(vm, slot_index: int) -> int:
    """UFFDIO_REGISTER_MODE_MISSING over a whole memslot before the vCPUs run: every page of it goes out (its
    contents poisoned, so a read of a page never copied in is caught). Returns the pages registered."""
    from shmmmu.memslots import DATA_POISON, Memslots
    slot = Memslots(vm).read(slot_index)
    hm, data = vm.region.array("host_map"), vm.region.array("data")
    pages = hm[slot.host_off: slot.host_off + slot.npages]
    data[pages.astype(np.int64)] = DATA_POISON
    pages |= np.uint64(MISSING)
    return slot.npages


def uffd_of(config, vcpu: int) -> int:
    """The uffd a vCPU's faults go to: one for all (-a, or -o) or one per vCPU's region."""
    return 0 if config.uffds == 1 else vcpu


def handle_userfault(kvm, slot, gfn: int) -> int:
    """handle_userfault() for the fault of this vCPU on gfn: post the request, sleep until a handler's copy
    wakes it (a stop of the VM ends the wait: the handler may be gone), and return the page now in."""
    ws, me, ctl = kvm.region.words("wstate"), kvm.worker * _W + WState.UFFD, kvm.ctl
    ws.store(me, UFFD_REQUESTED | gfn)
    kvm.st[STAT["userfaults"]] += 1
    spins = 0
    while ws.load(me):
        spins += 1
        if spins > 64:
            if ctl.load(Ctl.STOP):
                raise RuntimeError(f"the VM stopped while gfn {gfn:#x} waited for its userfault handler")
            time.sleep(0.00005)
    return kvm.slots.gfn_to_pfn(slot, gfn)


class Handler:
    """One reader of one uffd: the vCPUs whose faults go to that uffd, the copies it made."""

    def __init__(self, vm, worker: int, st: list[int]):
        c = vm.config
        k = worker - c.uffd_workers.start
        self.uffd = k // c.uffd_readers
        self.vcpus = [v for v in range(c.n_vcpus) if uffd_of(c, v) == self.uffd]
        self.delay_s = c.uffd_delay_us / 1e6
        self.ws = vm.region.words("wstate")
        self.host_map = vm.region.words("host_map")
        self.data = vm.region.words("data")
        from shmmmu.memslots import Memslots
        self.slots = Memslots(vm)
        self.st = st

    def serve(self) -> int:
        """One look at every vCPU of this uffd (the reader's poll and read): serve each fault claimed here."""
        n = 0
        for v in self.vcpus:
            i = v * _W + WState.UFFD
            req = self.ws.load(i)
            if req & UFFD_REQUESTED and not req & UFFD_CLAIMED and self.ws.cas(i, req, req | UFFD_CLAIMED) == req:
                self.copy(req & GFN_BITS)
                self.ws.store(i, 0)                   # the copy's wake-up of the sleeping fault
                n += 1
        return n

    def copy(self, gfn: int) -> None:
        """UFFDIO_COPY of guest_data_prototype into the page, after the test's delay; EEXIST if already in."""
        if self.delay_s:
            time.sleep(self.delay_s)
        slot = self.slots.lookup(gfn)
        e = slot.host_off + gfn - slot.base_gfn
        page = self.host_map.load(e)
        if not page & MISSING:
            self.st[STAT["uffd_eexist"]] += 1         # another reader's copy of the same page came first
            return
        self.data.store(page & ~MISSING, PROTOTYPE)   # the contents first, then the mapping
        if self.host_map.cas(e, page, page & ~MISSING) == page:
            self.st[STAT["uffd_copies"]] += 1
        else:
            self.st[STAT["uffd_eexist"]] += 1
