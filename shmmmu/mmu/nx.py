"""NX huge pages: the list of tables split for the iTLB multihit mitigation, and their recovery (mmu.c).

With `kvm.nx_huge_pages`, an instruction fetch is mapped with 4 KiB pages even
where the host could map a huge one; a table linked for such a fault is marked
nx_huge_page_disallowed before it is published and goes on the NX list
(possible_nx_huge_pages, 5.13's lpage_disallowed_mmu_pages) after, under the
page-list lock, as 6.2 does (61f94478547b); it comes off when it is torn down.
With the link-after-publish variant (K18) the 5.13 form is used:
account_huge_nx_page inside tdp_mmu_link_page.  The recovery thread
(kvm_recover_nx_lpages, run by the reclaimer process) zaps a share of the list
every period, so later faults that are not fetches can map huge again.
"""
from __future__ import annotations

from typing import Any

from shmmmu.layout import STAT, Ctl, TableState
from shmmmu.mmu.kvm import Kvm, Part

_U64 = (1 << 64) - 1


class NxHugePages(Part):
    """account/unaccount_huge_nx_page and kvm_recover_nx_lpages."""

    __slots__ = ("zap",)
    zap: Any                        # the tdp_zap part: recovery zaps one table's span

    def __init__(self, kvm: Kvm):
        super().__init__(kvm)

    def track_possible_nx_huge_page(self, table: int) -> None:
        """track_possible_nx_huge_page() (6.2): list_add_tail on possible_nx_huge_pages, nx_lpage_splits++.

        With tdp_mmu_pages_lock held (shared) or the write lock.  A table already on
        the list is left where it is.
        """
        tmeta, ctl = self.tmeta, self.ctl
        if tmeta.nx_listed.load(table):
            return
        tail = ctl.load(Ctl.NX_TAIL)
        tmeta.nx_next.store(table, 0)
        tmeta.nx_prev.store(table, tail)
        if tail:
            tmeta.nx_next.store(tail - 1, table + 1)
        else:
            ctl.store(Ctl.NX_HEAD, table + 1)
        ctl.store(Ctl.NX_TAIL, table + 1)
        tmeta.nx_listed.store(table, 1)
        ctl.fetch_add(Ctl.NX_COUNT, 1)

    def untrack_possible_nx_huge_page(self, table: int) -> None:
        """untrack_possible_nx_huge_page() (6.2): list_del_init if on the list, nx_lpage_splits--."""
        tmeta, ctl = self.tmeta, self.ctl
        if not tmeta.nx_listed.load(table):
            return
        prev, nxt = tmeta.nx_prev.load(table), tmeta.nx_next.load(table)
        if prev:
            tmeta.nx_next.store(prev - 1, nxt)
        elif ctl.load(Ctl.NX_HEAD) == table + 1:
            ctl.store(Ctl.NX_HEAD, nxt)
        else:
            self.kvm.violation("table-leak", tmeta.gfn.load(table), table, 1)   # not on the NX list it claims
        if nxt:
            tmeta.nx_prev.store(nxt - 1, prev)
        elif ctl.load(Ctl.NX_TAIL) == table + 1:
            ctl.store(Ctl.NX_TAIL, prev)
        tmeta.nx_prev.store(table, 0)
        tmeta.nx_next.store(table, 0)
        tmeta.nx_listed.store(table, 0)
        ctl.fetch_add(Ctl.NX_COUNT, _U64)

    def account_huge_nx_page(self, table: int) -> None:
        """5.13's account_huge_nx_page() (variant link-after-publish): sp->lpage_disallowed set and the table
        listed in one step."""
        if self.tmeta.nx.load(table):
            return
        self.tmeta.nx.store(table, 1)
        self.track_possible_nx_huge_page(table)

    def unaccount_huge_nx_page(self, table: int) -> None:
        """5.13's unaccount_huge_nx_page() (variant link-after-publish): off the list, lpage_disallowed cleared."""
        self.untrack_possible_nx_huge_page(table)
        self.tmeta.nx.store(table, 0)

    def nx_list(self) -> list[int]:
        """The tables on the NX list, oldest first (lpage_disallowed_mmu_pages; a read for tests and tools)."""
        out, cur = [], self.ctl.load(Ctl.NX_HEAD)
        limit = self.tables_np.shape[0]
        nx_next = self.tmeta.nx_next
        while cur and len(out) <= limit:
            out.append(cur - 1)
            cur = nx_next.load(cur - 1)
        return out

    def recover_nx_lpages(self, ratio: int | None = None) -> int:
        """kvm_recover_nx_lpages() (5.12): zap ceil(nx_lpage_splits / ratio) tables from the head of the NX list.

        Under the write lock, as in 5.12 (the list is only changed under the write
        lock or the page-list lock, which faults take inside the read lock).  Each
        table is zapped as kvm_tdp_mmu_zap_sp() does, without yielding; the returned
        flush is accumulated (048f49809c52) and done before the lock is dropped for a
        waiter (cond_resched_rwlock_write) and at the end.  Zapping the parent entry
        tears the table down, which takes it off the list; a later fault that is not
        an instruction fetch can then map a huge page there.
        Returns how many tables were zapped.
        """
        ratio = self.config.nx_recovery_ratio if ratio is None else ratio
        kvm, tmeta, ctl = self.kvm, self.tmeta, self.ctl
        zapped = 0
        self.lock.write_lock()
        try:
            to_zap = -(-ctl.load(Ctl.NX_COUNT) // ratio) if ratio > 0 else 0
            flush = False
            while to_zap:
                head = ctl.load(Ctl.NX_HEAD)
                if not head:
                    break
                sp = head - 1
                if not tmeta.nx.load(sp) or tmeta.state.load(sp) != TableState.LIVE:
                    # WARN_ON_ONCE(!sp->lpage_disallowed): the list names a table it does not hold
                    kvm.violation("table-leak", tmeta.gfn.load(sp), sp, 2)
                    break
                flush |= self.zap.kvm_tdp_mmu_zap_sp(sp)
                if ctl.load(Ctl.NX_HEAD) == head:
                    kvm.violation("table-leak", tmeta.gfn.load(sp), sp, 3)    # its zap did not tear it down
                    break
                zapped += 1
                to_zap -= 1
                if to_zap and self.lock.needbreak():
                    if flush or kvm.holds_unflushed:
                        kvm.kvm_flush_remote_tlbs()
                    flush = False
                    self.lock.write_unlock()
                    self.lock.reacquire(False)            # cond_resched_rwlock_write()
                    self.lock.stats.yields += 1
                    self.st[STAT["yields"]] += 1
            if flush or kvm.holds_unflushed:
                kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        self.st[STAT["nx_recovered"]] += zapped
        self.st[STAT["nx_recovery_passes"]] += 1
        return zapped
