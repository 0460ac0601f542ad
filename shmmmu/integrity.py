"""Integrity: guest-memory checks in the manner of the kernel's dirty_log_test, on whole arrays at once.

Every value a vCPU writes names its GFN (shmmmu.workloads.make_value), so a
page holding another GFN's value, or a host page that no mapping owns but that
lost its poison, shows a write that went astray.  The dirty-log oracle checks
that every page whose contents changed since the last collection was reported.
"""
from __future__ import annotations

import numpy as np

from shmmmu.memslots import DATA_POISON, Memslots, bank_size
from shmmmu.workloads import GFN_MASK

_MARK = np.uint64(1 << 63)


def guest_values(vm, slot_id: int = 0) -> np.ndarray:
    """The current contents of every page of a slot, through the host map (a snapshot)."""
    s = Memslots(vm).read(slot_id)
    hm = vm.region.array("host_map")[s.host_off: s.host_off + s.npages].astype(np.intp)
    return vm.region.array("data")[hm].copy()


def check_guest_memory(vm) -> list[str]:
    """Each page holds 0 or a value naming itself; each host page no GFN maps still holds poison."""
    problems = []
    ms = Memslots(vm)
    data = vm.region.array("data")
    for s in ms.slots():
        hm = vm.region.array("host_map")[s.host_off: s.host_off + s.npages].astype(np.intp)
        vals = data[hm]
        gfns = np.arange(s.base_gfn, s.end_gfn, dtype=np.uint64)
        written = (vals & _MARK) != 0
        bad = written & ((vals & np.uint64(GFN_MASK)) != (gfns & np.uint64(GFN_MASK)))
        bad |= ~written & (vals != 0)
        for i in np.flatnonzero(bad)[:10]:
            problems.append(f"guest-memory-corrupt: gfn {int(gfns[i]):#x} holds {int(vals[i]):#x}")
        owned = np.zeros(2 * bank_size(s, ms.bits), dtype=bool)
        owned[hm - s.data_off] = True
        unowned = np.flatnonzero(~owned)
        stray = unowned[data[s.data_off + unowned] != np.uint64(DATA_POISON)]
        for i in stray[:10]:
            problems.append(f"write-to-unmapped-host-page: host page {int(s.data_off + i):#x} of slot {s.id} "
                            f"holds {int(data[s.data_off + i]):#x}")
    return problems


def dirty_log_missed(before: np.ndarray, after: np.ndarray, bitmap: np.ndarray, base_gfn: int) -> list[int]:
    """GFNs whose contents changed between two collections but whose dirty bit was not reported."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: before.size].astype(bool)
    changed = before != after
    return [base_gfn + int(i) for i in np.flatnonzero(changed & ~bits)]

