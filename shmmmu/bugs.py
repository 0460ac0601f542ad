"""Bugs: the registry of switches that re-inject a bug the kernel really had, and the typed record a VM is built with.

Each switch names the kernel change it reverts and what goes wrong without it;
`shmmmu stress --list-bugs` prints this table, and `--bug NAME` turns one on in
every process of a VM (the names live in the VM's configuration).  The names
are validated once, into a frozen `Bugs` record with one boolean per switch:
the MMU picks the reverted variant of a function when it is built, so a run
with no switch set tests no switch anywhere on its fast paths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    ref: str           # the K number (KVM_TDP_MMU.md §12), if any
    field: str         # its field in Bugs
    reverts: str       # the kernel change
    effect: str        # what goes wrong, and which checker sees it
    stress_args: tuple[str, ...] = ()     # what `shmmmu stress` needs to give it its contention or geometry
    # the kernel functions it replaces: ("part.function", "the function beside it that replaces it")
    replaces: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Bugs:
    """Which fixes are switched off in this VM; every field False is the fixed kernel."""

    rcu_free_immediately: bool = False          # K7
    zero_removed_children: bool = False         # K6
    fault_zap_flush_late: bool = False          # K5
    fault_plain_store: bool = False             # K4
    cas_over_removed: bool = False              # K8
    no_forward_progress: bool = False           # K1
    advance_after_restart: bool = False         # K9
    yield_with_owed_flush: bool = False         # K11
    dirty_mask_late_clear: bool = False         # K3
    no_notifier_recheck: bool = False
    no_wrprot_on_enable: bool = False
    pages_lock_in_read_fault: bool = False      # K15
    link_after_publish: bool = False            # K18
    zap_all_phys_end: bool = False              # K17
    root_refcount_plain: bool = False
    fault_into_invalid_root: bool = False
    notifier_unsafe_root_walk: bool = False
    unmap_skips_invalid_roots: bool = False
    exclusive_plain_store: bool = False         # K14

    @classmethod
    def from_names(cls, names: list[str]) -> "Bugs":
        """The record for a list of switch names; ValueError names an unknown one."""
        return cls(**{BUGS[n].field: True for n in check_names(names)})

    def names(self) -> list[str]:
        on = {f.name for f in dataclasses.fields(self) if getattr(self, f.name)}
        return [b.name for b in BUGS.values() if b.field in on]

    def any(self) -> bool:
        return any(dataclasses.astuple(self))


BUGS: dict[str, Bug] = {b.name: b for b in [
    Bug("rcu-free-immediately", "K7", "rcu_free_immediately",
        "7cca2d0b7e7d KVM: x86/mmu: Protect TDP MMU page table memory with RCU",
        "disconnected tables are freed without a grace period; a walker still inside reads a freed or "
        "recycled table (Reader Pipe age >= 2, poison read)",
        replaces=(("tdp.free_sp", "free_sp_now"),)),
    Bug("zero-removed-children", "K6", "zero_removed_children",
        "e25f0e0cd51b KVM: x86/mmu: Mark SPTEs in disconnected pages as removed",
        "entries of a disconnected table are cleared to 0 instead of REMOVED; a fault holding a pointer into "
        "it installs into a dead table (install into a retired table, leaked tables)",
        replaces=(("tdp.freeze_removed_entries", "freeze_k6_zero_children"),)),
    Bug("fault-zap-flush-late", "K5", "fault_zap_flush_late",
        "08f07c800e9d KVM: x86/mmu: Flush TLBs after zap in TDP MMU PF handler",
        "the fault path clears a huge leaf to 0 with the atomic setter and only then flushes; in between "
        "another vCPU installs a new translation of the address while a TLB still holds the huge one "
        "(install-before-flush: two live translations of one address). The switch replaces the atomic zap "
        "everywhere, so 5.13's read-lock zaps (zap range, collapsible zaps, the zap of invalidated roots) "
        "also clear before they flush, which no kernel did: they came in 5.13, after the fix",
        replaces=(("tdp.tdp_mmu_zap_spte_atomic", "zap_spte_atomic_k5_flush_late"),)),
    Bug("fault-plain-store", "K4", "fault_plain_store",
        "9a77daacc87d KVM: x86/mmu: Use atomic ops to set SPTEs in TDP MMU map",
        "the fault path installs entries with plain stores under the read lock; racing vCPUs overwrite each "
        "other's tables (leaked tables, lost mappings). The switch replaces the atomic setter everywhere, so "
        "5.13's read-lock zaps and write protection store plainly too, which no kernel did: they came in 5.13, "
        "after the fix",
        replaces=(("tdp.tdp_mmu_set_spte_atomic", "set_spte_atomic_k4_plain_store"),)),
    Bug("cas-over-removed", "K8", "cas_over_removed",
        "the REMOVED check in tdp_mmu_set_spte_atomic (08f07c800e9d)",
        "the atomic setter accepts a frozen entry as its old value and overwrites it (frozen entry "
        "overwritten, leaked tables)",
        replaces=(("tdp.tdp_mmu_set_spte_atomic", "set_spte_atomic_k8_accepts_removed"),)),
    Bug("no-forward-progress", "K1", "no_forward_progress",
        "ed5e484b79e8 KVM: x86/mmu: Ensure forward progress when yielding in TDP MMU iter",
        "a range walk yields again at the same GFN whenever the lock is contended and livelocks "
        "(forward-progress bound exceeded)", ("--lock-mode", "exclusive"),
        replaces=(("tdp.tdp_mmu_iter_cond_resched", "cond_resched_k1_no_progress_check"),)),
    Bug("advance-after-restart", "K9", "advance_after_restart",
        "3a0f64de479c KVM: x86/mmu: Don't advance iterator after restart due to yielding (CVE-2021-47094)",
        "after yielding, the walk restarts and then advances, skipping the root-level entry "
        "at next_last_level_gfn; zap-all leaves mappings behind (mapping outside any memslot, leaked tables)",
        ("--lock-mode", "exclusive"),
        replaces=(("tdp.tdp_mmu_iter_cond_resched", "cond_resched_k9_restart_then_advance"),
                  ("zap.kvm_tdp_mmu_zap_all", "zap_all_k9_root_entries"))),
    Bug("yield-with-owed-flush", "K11", "yield_with_owed_flush",
        "a835429cda91 KVM: x86/mmu: Ensure TLBs are flushed when yielding during GFN range zap",
        "each root's zap_gfn_range starts with no flush owed, so a yield in a later root drops mmu_lock with "
        "an earlier root's zaps unflushed (the flush still comes at the end); faults install where the zapped "
        "translations are still cached (lock-dropped-unflushed, I6; install-before-flush)",
        replaces=(("zap.kvm_tdp_mmu_zap_gfn_range", "zap_gfn_range_k11_flush_not_passed"),
                  ("zap.kvm_tdp_mmu_zap_all", "zap_all_k11_flush_not_passed"))),
    Bug("exclusive-plain-store", "K14", "exclusive_plain_store",
        "ba3a6120a4e7 KVM: x86/mmu: Use atomic XCHG to write TDP MMU SPTEs with volatile bits",
        "the write-lock setter stores over a leaf whose A bit the processor may set meanwhile (an aged leaf), "
        "from the value it read before: the access is lost to the host (host-accessed-lost at the next aging "
        "or unmap)",
        replaces=(("tdp.kvm_tdp_mmu_write_spte", "write_spte_k14_plain_store"),)),
    Bug("dirty-mask-late-clear", "K3", "dirty_mask_late_clear",
        "f1b3b06a058b KVM: x86/mmu: Clear dirtied pages mask bit before early break",
        "clear_dirty_pt_masked cannot stop early once the mask is done and walks the rest of the 64 GFNs "
        "(wasted walk past the mask: a work bound, not a correctness bug)",
        replaces=(("dirty.clear_dirty_pt_masked", "clear_dirty_pt_masked_k3_late_clear"),)),
    Bug("no-notifier-recheck", "", "no_notifier_recheck",
        "mmu_notifier_retry in the fault path (mmu_seq recheck)",
        "a fault that resolved the host page before a host unmap installs the old page afterwards "
        "(write through a stale mapping lands in a poisoned host page)",
        replaces=(("fault.mmu_notifier_retry_hva", "notifier_retry_never"),)),
    Bug("no-wrprot-on-enable", "", "no_wrprot_on_enable",
        "kvm_mmu_slot_remove_write_access when dirty logging is enabled",
        "enabling dirty logging leaves writable mappings; writes through them are never logged "
        "(dirty-log false negative)",
        replaces=(("ioctl.kvm_mmu_slot_remove_write_access", "slot_remove_write_access_skipped"),)),
    Bug("link-after-publish", "K18", "link_after_publish",
        "d25ceb926436 + 61f94478547b (6.2): 5.13's tdp_mmu_pages list, tdp_mmu_link_page after the cmpxchg",
        "a zap of the new entry between the cmpxchg and list_add runs list_del on a table not yet on the "
        "list, and the late list_add puts the freed table there (list_del of an unlisted table; page list "
        "!= reachable tables)",
        replaces=(("map.tdp_mmu_link_sp", "link_sp_k18_page_list"),
                  ("map.tdp_mmu_unlink_sp", "unlink_sp_k18_page_list"))),
    Bug("zap-all-phys-end", "K17", "zap_all_phys_end",
        "524a1e4e381f KVM: x86/mmu: Don't leak non-leaf SPTEs when zapping all SPTEs",
        "zap-all ends at the host's physical limit and skips a root entry that reaches past it; below one "
        "root entry's span (a small VM with 512-entry tables, --bits 9) nothing is zapped and VM destruction "
        "leaks every table (table-leak: the page list is not empty after destroy)", ("--bits", "9"),
        replaces=(("zap.tdp_mmu_zap_root", "zap_root_k17_phys_end"),
                  ("zap.kvm_tdp_mmu_zap_all", "zap_all_k17_phys_end"))),
    Bug("root-refcount-not-atomic", "", "root_refcount_plain",
        "11cccf5c0472 KVM: x86/mmu: Make TDP MMU root refcount atomic (5.13)",
        "5.12's plain root count, incremented and decremented by walkers that now run under the read lock: "
        "a lost update frees a root a vCPU still uses, or leaks one (root-refcount: freed while held, count "
        "!= holders)",
        replaces=(("roots.refcount_inc_not_zero", "refcount_inc_not_zero_plain"),
                  ("roots.refcount_dec_and_test", "refcount_dec_and_test_plain"))),
    Bug("fault-into-invalid-root", "", "fault_into_invalid_root",
        "a955cad84cda KVM: x86/mmu: Retry page fault if root is invalidated by memslot update (5.16)",
        "a vCPU that took its fault before the invalidation installs into its invalid root behind the "
        "zapper, which has already emptied it (install-into-invalid-root: a zapped root holds entries)",
        replaces=(("fault.root_is_obsolete", "root_never_obsolete"),)),
    Bug("notifier-unsafe-root-walk", "", "notifier_unsafe_root_walk",
        "7533377215b6 KVM: x86/mmu: Use yield-safe TDP MMU root iter in MMU notifier unmapping (5.16)",
        "5.13's notifier walks the roots without a reference and yields (may_block); the root's last "
        "reference goes meanwhile and the walk resumes in a freed table (use-after-free, Reader Pipe)",
        replaces=(("zap.kvm_tdp_mmu_unmap_gfn_range", "unmap_gfn_range_unsafe_root_walk"),)),
    Bug("unmap-skips-invalid-roots", "", "unmap_skips_invalid_roots",
        "d62007edf01f KVM: x86/mmu: Zap _all_ roots when unmapping gfn range in TDP MMU (5.18)",
        "the zaps' yield-safe root walk skips invalid roots; an MMU notifier returns while an invalid root "
        "whose zapper yielded still maps the range (mapping-after-unmap). This is 5.16-5.17's notifier "
        "(7533377215b6 without the fix) grafted onto 5.13, whose own notifier walked every root; 5.13's "
        "valid-only walk was in zap range and zap-all, which the switch also reverts",
        replaces=(("zap.kvm_tdp_mmu_zap_gfn_range", "zap_gfn_range_valid_roots_only"),
                  ("zap.kvm_tdp_mmu_zap_all", "zap_all_valid_roots_only"))),
    Bug("pages-lock-in-read-fault", "K15", "pages_lock_in_read_fault",
        "47b0c2e4c220 KVM: x86/mmu: Fix race condition in direct_page_fault (CVE-2022-45869): "
        "make_mmu_pages_available under the read lock",
        "write-lock-only page reclaim runs in the read-locked fault path (lockdep assertion: must be held "
        "for write)",
        replaces=(("fault.kvm_tdp_mmu_page_fault", "page_fault_k15_reclaim_under_read_lock"),)),
]}

assert {b.field for b in BUGS.values()} == {f.name for f in dataclasses.fields(Bugs)}


def check_names(names: list[str]) -> list[str]:
    """Validate bug names; raises ValueError naming the unknown one and the known ones."""
    for n in names:
        if n not in BUGS:
            raise ValueError(f"unknown bug {n!r}; known: {', '.join(BUGS)}")
    return list(names)
