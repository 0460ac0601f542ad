"""Host pages: each host page's accessed/dirty state as KVM reports it, what the guest really did to it, and the check between them.

KVM tells the host about guest accesses only when a leaf changes
(handle_changed_spte: kvm_set_pfn_accessed when an accessed leaf loses A or
goes away, kvm_set_pfn_dirty when a dirty one goes away or changes page).
The host consumes that state when it ages a page (clear_young: is it still in
use?) and when it writes a page back or migrates it (is it dirty?).  A page
the guest wrote that is neither host-dirty nor mapped dirty at that moment
would be written back as clean: data lost on swap-out (KVM_TDP_MMU.md C7).
A page the guest touched that is neither host-accessed nor mapped young is
reclaimed as idle while in use.

`host_ad` (one word per host page, HostPage.ACCESSED/DIRTY) is kept always.
In debug mode the guest also records every access in `touched`
(HostPage.TOUCHED/WRITTEN) as the hardware performs it, and the host checks
`touched` against what KVM told it at each point where it consumes the state:
the MMU notifier's unmap (after the zap and its flush, before migration),
aging (before A is cleared), and the end of a run.  Each consumer then resets
what it consumed.
"""
from __future__ import annotations

import numpy as np

from shmmmu.layout import HostPage
from shmmmu.memslots import Memslots

_U = np.uint64
_T, _WR = _U(HostPage.TOUCHED), _U(HostPage.WRITTEN)
_HA, _HD = _U(HostPage.ACCESSED), _U(HostPage.DIRTY)


def host_pages(slots: Memslots, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """(gfns, host pages) of every GFN of [start, end) that a memslot holds, active or not."""
    hm = slots.region.array("host_map")
    gfns, pages = [], []
    for s in slots.slots():
        lo, hi = max(start, s.base_gfn), min(end, s.end_gfn)
        if lo < hi:
            gfns.append(np.arange(lo, hi, dtype=np.int64))
            slots.host_map.touch(s.host_off + lo - s.base_gfn, hi - lo, False)
            pages.append(hm[s.host_off + lo - s.base_gfn: s.host_off + hi - s.base_gfn].astype(np.int64))
    if not gfns:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(gfns), np.concatenate(pages)


def leaf_pages(leaves: list[tuple[int, int]], bits: int, gfns: np.ndarray) -> np.ndarray:
    """A mask over `gfns`: covered by one of `leaves` ((first gfn, level), a huge leaf covers its span)."""
    mask = np.zeros(gfns.size, dtype=bool)
    for g, level in leaves:
        span = 1 << (bits * (level - 1))
        mask |= (gfns >= g) & (gfns < g + span)
    return mask


def lost(touched: np.ndarray, host_ad: np.ndarray, young: np.ndarray, dirty: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of pages touched but neither host-accessed nor mapped young, and written but neither
    host-dirty nor mapped dirty.  Read `touched` before the mappings and `host_ad`: a concurrent access
    then shows in the later reads, never as a loss."""
    acc = ((touched & _T) != 0) & ((host_ad & _HA) == 0) & ~young
    wr = ((touched & _WR) != 0) & ((host_ad & _HD) == 0) & ~dirty
    return np.flatnonzero(acc), np.flatnonzero(wr)


def clear_bits(words, pages: np.ndarray, mask: int) -> None:
    """Atomically clear `mask` in each page's word (runs of consecutive pages in one call each)."""
    if pages.size == 0:
        return
    p = np.unique(pages)
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    for run in np.split(p, breaks):
        words.and_range(int(run[0]), int(run.size), ~mask & ((1 << 64) - 1))
