"""Records: what the MMU's parts pass each other: struct kvm_page_fault and the RET_PF_* values.

The bottom of the mmu package: it imports nothing of it, so every part may
import it and none needs another part's module for a type.
"""
from __future__ import annotations

from typing import Any

# page-fault return values (the 5.12-5.18 enum)
RET_PF_RETRY, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = range(5)
RET_NAMES = {RET_PF_RETRY: "RETRY", RET_PF_EMULATE: "EMULATE", RET_PF_INVALID: "INVALID",
             RET_PF_FIXED: "FIXED", RET_PF_SPURIOUS: "SPURIOUS"}


class Fault:
    """struct kvm_page_fault: one EPT violation and what the fault path learns about it."""

    __slots__ = ("gfn", "write", "exec", "slot", "pfn", "mmu_seq", "max_level", "req_level", "goal_level",
                 "huge_page_disallowed")

    slot: Any                     # the memslot (shmmmu.memslots.Slot), None outside every slot
    pfn: int                      # the host page backing gfn (the GUP)
    mmu_seq: int                  # mmu_notifier_seq before the GUP
    max_level: int                # what the memslot and its backing allow
    req_level: int                # the level before the NX clamp (for NX accounting)
    goal_level: int               # the level the leaf is installed at

    def __init__(self, gfn: int, write: bool, exec_: bool):
        # the rest is filled in by kvm_faultin_pfn and kvm_mmu_hugepage_adjust before anything reads it
        self.gfn = gfn
        self.write = write
        self.exec = exec_
        self.huge_page_disallowed = False
