"""Variants: the one declared table of kernel variants (bug switches, a profile's own functions) and of profiles.

A variant is a named replacement of one or more kernel functions, declared
with the kernel commits it reverts (a bug switch re-creates the code before
the fix) or follows (a profile's version of a function), and the releases
they shipped in.  A kernel profile is a set of variants plus constants.  The
table is applied in one place, once, when an `Mmu` is built
(`shmmmu.mmu.Mmu`, through `replaced_functions`): nothing on a fast path
tests a switch.  `shmmmu stress --list-bugs`, docs/internals.md's "which
kernel" tables and docs/stress.md are generated from or checked against it
(tools/variant_tables.py, tests/unit/test_variants.py), as liburcu declares
its flavours in one `rcu_flavor_struct` table.

Traits say what a checker must know of a VM built with a variant: 5.13's
page list (K18) is checked only where it exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BUG = "bug"              # re-creates a bug a kernel had, in its shape before the fix
KERNEL = "kernel"        # a profile's own version of functions (always on in that profile)
FEATURE = "feature"      # a later kernel's mechanism, turned on by name

DEFAULT_PROFILE = "5.13"


@dataclass(frozen=True)
class Commit:
    """A kernel commit as docs/reference/commits.md lists it (read beside its subject in a public source)."""

    id: str          # 12 hex digits
    subject: str
    version: str     # the release it shipped in


# every commit the table cites; tests/unit/test_variants.py holds each to docs/reference/commits.md
COMMITS: dict[str, Commit] = {c.id: c for c in [
    Commit("7cca2d0b7e7d", "KVM: x86/mmu: Protect TDP MMU page table memory with RCU", "5.12"),
    Commit("e25f0e0cd51b", "KVM: x86/mmu: Mark SPTEs in disconnected pages as removed", "5.12"),
    Commit("08f07c800e9d", "KVM: x86/mmu: Flush TLBs after zap in TDP MMU PF handler", "5.12"),
    Commit("9a77daacc87d", "KVM: x86/mmu: Use atomic ops to set SPTEs in TDP MMU map", "5.12"),
    Commit("ed5e484b79e8", "KVM: x86/mmu: Ensure forward progress when yielding in TDP MMU iter", "5.12"),
    Commit("f1b3b06a058b", "KVM: x86/mmu: Clear dirtied pages mask bit before early break", "5.12"),
    Commit("a835429cda91", "KVM: x86/mmu: Ensure TLBs are flushed when yielding during GFN range zap", "5.12"),
    Commit("11cccf5c0472", "KVM: x86/mmu: Make TDP MMU root refcount atomic", "5.13"),
    Commit("524a1e4e381f", "KVM: x86/mmu: Don't leak non-leaf SPTEs when zapping all SPTEs", "5.14"),
    Commit("3a0f64de479c", "KVM: x86/mmu: Don't advance iterator after restart due to yielding", "5.16"),
    Commit("7533377215b6", "KVM: x86/mmu: Use yield-safe TDP MMU root iter in MMU notifier unmapping", "5.16"),
    Commit("a955cad84cda", "KVM: x86/mmu: Retry page fault if root is invalidated by memslot update", "5.16"),
    Commit("d62007edf01f", "KVM: x86/mmu: Zap _all_ roots when unmapping gfn range in TDP MMU", "5.18"),
    Commit("ba3a6120a4e7", "KVM: x86/mmu: Use atomic XCHG to write TDP MMU SPTEs with volatile bits", "5.18"),
    Commit("47b0c2e4c220", "KVM: x86/mmu: Fix race condition in direct_page_fault", "6.1"),
    Commit("d25ceb926436", "KVM: x86/mmu: Track the number of TDP MMU pages, but not the actual pages", "6.2"),
    Commit("61f94478547b", "KVM: x86/mmu: Set disallowed_nx_huge_page in TDP MMU before setting SPTE", "6.2"),
    Commit("21a36ac6b6c7", "KVM: x86/mmu: Re-check under lock that TDP MMU SP hugepage is disallowed", "6.2"),
    Commit("6e8eb2060cc7", "KVM: x86/mmu: fast_page_fault support for the TDP MMU", "5.14"),
    Commit("a3fe5dbda0a4", "KVM: x86/mmu: Split huge pages mapped by the TDP MMU when dirty logging is enabled",
           "5.18"),
    Commit("cb00a70bd4b7", "KVM: x86/mmu: Split huge pages mapped by the TDP MMU during KVM_CLEAR_DIRTY_LOG", "5.18"),
    Commit("1aa4bb916808", "KVM: x86/mmu: Fix off-by-1 when splitting huge pages during CLEAR", "6.8"),
    Commit("d75c1b7bdedd", "KVM: x86/mmu: Fix an sign-extension bug with mmu_seq that hangs vCPUs", "6.1.50"),
    Commit("6d3085e4d89a", "KVM: x86/mmu: Block all page faults during kvm_zap_gfn_range()", "6.1"),
    Commit("f47e5bbbc92f", "KVM: x86/mmu: Zap only TDP MMU leafs in zap range and mmu_notifier unmap", "5.18"),
    Commit("edbdb43fc96b", "KVM: x86: Preserve TDP MMU roots until they are explicitly invalidated", "6.4"),
    Commit("0df9dab891ff", "KVM: x86/mmu: Stop zapping invalidated TDP MMU roots asynchronously", "6.6"),
    Commit("dab285e4ec73", "KVM: x86/mmu: Alloc TDP MMU roots while holding mmu_lock for read", "6.9"),
    Commit("576a15de8d29", "KVM: x86/mmu: Free TDP MMU roots while holding mmy_lock for read", "6.9"),
]}


@dataclass(frozen=True)
class Variant:
    """One declared replacement of kernel functions."""

    name: str
    kind: str                          # BUG, KERNEL or FEATURE
    profiles: tuple[str, ...]          # the profiles it exists in
    ref: str                           # K number (KVM_TDP_MMU.md §12) or B number (KERNEL_612.md §2); "" if none
    commits: tuple[str, ...]           # the fix it reverts (BUG) or the change it follows; ids in COMMITS
    what: str                          # the change in words: what the commits say, or the mechanism taken away
    effect: str                        # what goes wrong with it on, and which checker sees it
    # ("part.function", "the function beside it that replaces it"), applied when an Mmu is built
    replaces: tuple[tuple[str, str], ...] = ()
    stress_args: tuple[str, ...] = ()  # what `shmmmu stress` needs to give it its contention or geometry
    # (kernel, its stress_args) where a profile needs other arguments than the above (K9's lock mode)
    stress_args_by_kernel: tuple[tuple[str, tuple[str, ...]], ...] = ()
    traits: frozenset[str] = field(default_factory=frozenset)   # what checkers must know of a VM with it on
    # "part.function" of the kernel functions its replacements call that run only with it (coverage's universe)
    helpers: tuple[str, ...] = ()

    def stress_args_of(self, kernel: str) -> tuple[str, ...]:
        """What `shmmmu stress --kernel KERNEL` needs to give this switch its contention or geometry."""
        return dict(self.stress_args_by_kernel).get(kernel, self.stress_args)

    def reverts(self) -> str:
        """The commits and the change, in one line: `ID SUBJECT (VERSION)`, ... then the words."""
        cited = " + ".join(f"{c} {COMMITS[c].subject} ({COMMITS[c].version})" for c in self.commits)
        return f"{cited}: {self.what}" if cited and self.what else cited or self.what


@dataclass(frozen=True)
class Profile:
    """A named kernel: the variants it is made of and its constants."""

    name: str
    release: str                       # what it follows, in words
    variants: tuple[str, ...] = ()     # KERNEL variants always on in it
    constants: tuple[tuple[str, int], ...] = ()


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("5.13", "Linux 5.13 as released, with each known 5.13 bug's later fix (docs/internals.md)"),
    Profile("6.12", "Linux 6.12 (LTS): 5.13 plus the later TDP MMU mechanisms shmmmu expresses "
                    "(docs/internals.md, \"Which kernel: 6.12\")",
            variants=("fast-page-fault", "eager-page-split", "zap-range-leafs", "roots-held-until-invalid",
                      "unmap-leafs", "clear-spte-bits", "zap-collapsible-tables")),
]}
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)

_513 = ("5.13",)
_612 = ("6.12",)
_BOTH = ("5.13", "6.12")

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    # ---- the 6.12 profile's own functions (always on in it)
    Variant("fast-page-fault", KERNEL, _612, "", ("6e8eb2060cc7",),
            "a write fault on a present leaf that is MMU-writable but write-protected (dirty logging) is fixed by "
            "one cmpxchg of W under RCU only, without mmu_lock, before the fault path proper "
            "(fast_page_fault, kvm_tdp_mmu_fast_pf_get_last_sptep)",
            "",
            replaces=(("fault.kvm_tdp_mmu_page_fault", "page_fault_fast_first"),),
            helpers=("fault.fast_page_fault", "fault.kvm_tdp_mmu_fast_pf_get_last_sptep")),
    Variant("eager-page-split", KERNEL, _612, "", ("a3fe5dbda0a4", "cb00a70bd4b7"),
            "enabling dirty logging first splits every huge leaf of the slot into a full table of the next level "
            "under the read lock (tdp_mmu_split_huge_pages_root: the lock and RCU dropped to allocate, one "
            "cmpxchg to link, no TLB flush since the translation is unchanged), then write-protects at 4K; "
            "before either it waits out the faults that saw the slot without the flag (the memslot update's "
            "synchronize_srcu: the fast page fault runs without mmu_lock); with manual protect and "
            "INITIALLY_SET nothing is done at enable, and KVM_CLEAR_DIRTY_LOG splits the range it names "
            "(cb00a70bd4b7, under the write lock) and protects the huge leaves left at its ends",
            "",
            replaces=(("ioctl.kvm_mmu_slot_remove_write_access", "slot_apply_flags_612"),
                      ("ioctl.kvm_arch_mmu_enable_log_dirty_pt_masked", "enable_log_dirty_pt_masked_612")),
            traits=frozenset({"eager-split"}),
            helpers=("dirty.kvm_tdp_mmu_try_split_huge_pages", "dirty.tdp_mmu_split_huge_pages_root",
                     "dirty.tdp_mmu_split_huge_page", "ioctl._split_protect_masked",
                     "ioctl.kvm_mmu_slot_gfn_write_protect")),
    Variant("zap-range-leafs", KERNEL, _612, "", ("6d3085e4d89a",),
            "kvm_zap_gfn_range takes the write lock and zaps inside an invalidation of its range "
            "(kvm_mmu_invalidate_begin, kvm_mmu_invalidate_range_add ... kvm_mmu_invalidate_end), so a fault that "
            "resolved its page before or during the zap retries; it zaps only the leaves, in every valid root "
            "(kvm_tdp_mmu_zap_leafs: the tables stay), then flushes",
            "",
            replaces=(("ioctl.zap_gfn_range_locked", "zap_gfn_range_612"),),
            traits=frozenset({"zap-range-invalidates"}),
            helpers=("zap.kvm_tdp_mmu_zap_leafs", "zap.tdp_mmu_zap_leafs", "ioctl._zap_gfn_range_invalidating")),
    Variant("clear-spte-bits", KERNEL, _612, "", (),
            "aging and KVM_CLEAR_DIRTY_LOG clear their one bit (A; W without PML) with tdp_mmu_clear_spte_bits, an "
            "atomic AND where the processor may set A or D meanwhile, and skip handle_changed_spte (posting "
            "'[PATCH v4 04/13] KVM: x86/mmu: Atomically clear SPTE dirty state in the clear-dirty-log flow', "
            "2023; both callers so in the stored 6.9-6.10 tdp_mmu.c): an A or D the processor sets in the window "
            "stays in the entry; the clear marks the host page dirty (kvm_set_pfn_dirty)",
            "",
            replaces=(("dirty.age_gfn_range", "age_gfn_range_612"),
                      ("dirty.clear_dirty_pt_masked", "clear_dirty_pt_masked_612")),
            helpers=("tdp.tdp_mmu_clear_spte_bits",)),
    Variant("zap-collapsible-tables", KERNEL, _612, "", (),
            "disabling dirty logging zaps, under the read lock, the highest non-leaf entry from 2M up that lies in "
            "the slot and that the slot could now map huge, with one atomic zap (freeze, flush, clear) that tears "
            "its table down; 5.13 zapped the 4K leaves below and left the tables (zap_collapsible_spte_range as "
            "the stored ~6.10 tdp_mmu.c has it; 6.13 recovers huge pages in place instead)",
            "",
            replaces=(("zap.zap_collapsible_spte_range", "zap_collapsible_spte_range_612"),)),
    Variant("roots-held-until-invalid", KERNEL, _612, "", ("edbdb43fc96b", "dab285e4ec73", "576a15de8d29",
                                                           "0df9dab891ff"),
            "a root is listed with a count of 2, the vCPU's reference and the TDP MMU's own, so it outlives its last "
            "vCPU until a memslot update or the VM's destruction invalidates it; vCPUs allocate (by role, again "
            "under tdp_mmu_pages_lock before a new root is listed) and put roots under the read lock; "
            "kvm_tdp_mmu_invalidate_all_roots (write lock) marks each valid root invalid and scheduled to zap, "
            "taking no reference; kvm_tdp_mmu_zap_invalidated_roots (read lock) zaps each scheduled root in 4K, "
            "2M, 1G and root passes and puts the TDP MMU's reference only after the zap, so MMU notifiers reach "
            "the root meanwhile; the last put only unlists the root and frees its empty table "
            "(kvm_tdp_mmu_alloc_root, kvm_tdp_mmu_put_root, tdp_mmu_zap_root, kvm_mmu_uninit_tdp_mmu)",
            "",
            replaces=(("fault.kvm_mmu_load", "kvm_mmu_load_612"), ("fault.kvm_mmu_unload", "kvm_mmu_unload_612"),
                      ("roots.kvm_tdp_mmu_get_vcpu_root", "kvm_tdp_mmu_alloc_root"),
                      ("roots.kvm_tdp_mmu_get_root", "kvm_tdp_mmu_get_root_612"),
                      ("roots.kvm_tdp_mmu_put_root", "kvm_tdp_mmu_put_root_612"),
                      ("roots.kvm_tdp_mmu_invalidate_all_roots", "kvm_tdp_mmu_invalidate_all_roots_612"),
                      ("roots.kvm_tdp_mmu_zap_invalidated_roots", "kvm_tdp_mmu_zap_invalidated_roots_612"),
                      # 5.18 walks the invalidated roots with the common yield-safe iterator (no caller is left)
                      ("roots.next_invalidated_root", "tdp_mmu_next_root"),
                      ("zap.tdp_mmu_zap_root", "tdp_mmu_zap_root_612"),
                      ("roots.kvm_mmu_uninit_tdp_mmu", "kvm_mmu_uninit_tdp_mmu_612")),
            traits=frozenset({"root-held-by-tdp-mmu"}),
            helpers=("roots._alloc_root_locked", "roots._zap_invalidated_root", "zap._zap_root_pass")),
    Variant("unmap-leafs", KERNEL, _612, "", ("f47e5bbbc92f", "d62007edf01f"),
            "the MMU notifier's kvm_tdp_mmu_unmap_gfn_range zaps only the present leaves of the range "
            "(tdp_mmu_zap_leafs, under the write lock, yielding if may_block), in every root, valid or invalid; the "
            "tables stay",
            "",
            replaces=(("zap.kvm_tdp_mmu_unmap_gfn_range", "kvm_tdp_mmu_unmap_gfn_range_612"),),
            helpers=("zap.tdp_mmu_zap_leafs",)),
    Variant("rcu-free-immediately", BUG, _513, "K7", ("7cca2d0b7e7d",), "",
            "disconnected tables are freed without a grace period; a walker still inside reads a freed or "
            "recycled table (Reader Pipe age >= 2, poison read)",
            replaces=(("tdp.free_sp", "free_sp_now"),)),
    Variant("zero-removed-children", BUG, _513, "K6", ("e25f0e0cd51b",), "",
            "entries of a disconnected table are cleared to 0 instead of REMOVED; a fault holding a pointer into "
            "it installs into a dead table (install into a retired table, leaked tables)",
            replaces=(("tdp.freeze_removed_entries", "freeze_k6_zero_children"),)),
    Variant("fault-zap-flush-late", BUG, _513, "K5", ("08f07c800e9d",), "",
            "the fault path clears a huge leaf to 0 with the atomic setter and only then flushes; in between "
            "another vCPU installs a new translation of the address while a TLB still holds the huge one "
            "(install-before-flush: two live translations of one address). The switch replaces the atomic zap "
            "everywhere, so 5.13's read-lock zaps (zap range, collapsible zaps, the zap of invalidated roots) "
            "also clear before they flush, which no kernel did: they came in 5.13, after the fix",
            replaces=(("tdp.tdp_mmu_zap_spte_atomic", "zap_spte_atomic_k5_flush_late"),)),
    Variant("fault-plain-store", BUG, _513, "K4", ("9a77daacc87d",), "",
            "the fault path installs entries with plain stores under the read lock; racing vCPUs overwrite each "
            "other's tables (leaked tables, lost mappings). The switch replaces the atomic setter everywhere, so "
            "5.13's read-lock zaps and write protection store plainly too, which no kernel did: they came in "
            "5.13, after the fix",
            replaces=(("tdp.tdp_mmu_set_spte_atomic", "set_spte_atomic_k4_plain_store"),)),
    Variant("cas-over-removed", BUG, _513, "K8", ("08f07c800e9d",),
            "the REMOVED check in tdp_mmu_set_spte_atomic",
            "the atomic setter accepts a frozen entry as its old value and overwrites it (frozen entry "
            "overwritten, leaked tables)",
            replaces=(("tdp.tdp_mmu_set_spte_atomic", "set_spte_atomic_k8_accepts_removed"),)),
    Variant("no-forward-progress", BUG, _513, "K1", ("ed5e484b79e8",), "",
            "a range walk yields again at the same GFN whenever the lock is contended and livelocks "
            "(forward-progress bound exceeded)",
            replaces=(("tdp.tdp_mmu_iter_cond_resched", "cond_resched_k1_no_progress_check"),),
            stress_args=("--lock-mode", "exclusive")),
    Variant("advance-after-restart", BUG, _BOTH, "K9", ("3a0f64de479c",), "CVE-2021-47094",
            "after yielding, the walk restarts and then advances, skipping the root-level entry "
            "at next_last_level_gfn; zap-all leaves mappings behind (mapping outside any memslot, leaked tables). "
            "Zap-all walks the root entries only, as 5.14's did (0103098fb4f1) and as 6.12's last pass of "
            "tdp_mmu_zap_root does",
            replaces=(("tdp.tdp_mmu_iter_cond_resched", "cond_resched_k9_restart_then_advance"),
                      ("zap.kvm_tdp_mmu_zap_all", "zap_all_k9_root_entries")),
            # 6.12 has no exclusive (pre-series) lock mode: its faults take the read lock
            stress_args=("--lock-mode", "exclusive"), stress_args_by_kernel=(("6.12", ()),)),
    Variant("yield-with-owed-flush", BUG, _513, "K11", ("a835429cda91",), "",
            "each root's zap_gfn_range starts with no flush owed, so a yield in a later root drops mmu_lock with "
            "an earlier root's zaps unflushed (the flush still comes at the end); faults install where the "
            "zapped translations are still cached (lock-dropped-unflushed, I6; install-before-flush)",
            replaces=(("zap.kvm_tdp_mmu_zap_gfn_range", "zap_gfn_range_k11_flush_not_passed"),
                      ("zap.kvm_tdp_mmu_zap_all", "zap_all_k11_flush_not_passed"))),
    Variant("exclusive-plain-store", BUG, _BOTH, "K14", ("ba3a6120a4e7",), "",
            "the write-lock setter stores over a leaf whose A bit the processor may set meanwhile (an aged "
            "leaf), from the value it read before: the access is lost to the host (host-accessed-lost at the "
            "next aging or unmap)",
            replaces=(("tdp.kvm_tdp_mmu_write_spte", "write_spte_k14_plain_store"),)),
    Variant("dirty-mask-late-clear", BUG, _513, "K3", ("f1b3b06a058b",), "",
            "clear_dirty_pt_masked cannot stop early once the mask is done and walks the rest of the 64 GFNs "
            "(wasted walk past the mask: a work bound, not a correctness bug)",
            replaces=(("dirty.clear_dirty_pt_masked", "clear_dirty_pt_masked_k3_late_clear"),)),
    Variant("no-notifier-recheck", BUG, _513, "", (),
            "mmu_notifier_retry in the fault path (mmu_seq recheck)",
            "a fault that resolved the host page before a host unmap installs the old page afterwards "
            "(write through a stale mapping lands in a poisoned host page)",
            replaces=(("fault.mmu_notifier_retry_hva", "notifier_retry_never"),)),
    Variant("no-wrprot-on-enable", BUG, _513, "", (),
            "kvm_mmu_slot_remove_write_access when dirty logging is enabled",
            "enabling dirty logging leaves writable mappings; writes through them are never logged "
            "(dirty-log false negative)",
            replaces=(("ioctl.kvm_mmu_slot_remove_write_access", "slot_remove_write_access_skipped"),)),
    Variant("link-after-publish", BUG, _513, "K18", ("d25ceb926436", "61f94478547b"),
            "5.13's tdp_mmu_pages list, tdp_mmu_link_page after the cmpxchg",
            "a zap of the new entry between the cmpxchg and list_add runs list_del on a table not yet on the "
            "list, and the late list_add puts the freed table there (list_del of an unlisted table; page list "
            "!= reachable tables)",
            replaces=(("map.tdp_mmu_link_sp", "link_sp_k18_page_list"),
                      ("map.tdp_mmu_unlink_sp", "unlink_sp_k18_page_list")),
            traits=frozenset({"page-list"})),
    Variant("zap-all-phys-end", BUG, _513, "K17", ("524a1e4e381f",), "",
            "zap-all ends at the host's physical limit and skips a root entry that reaches past it; below one "
            "root entry's span (a small VM with 512-entry tables, --bits 9) nothing is zapped and VM destruction "
            "leaks every table (table-leak: the page list is not empty after destroy)",
            replaces=(("zap.tdp_mmu_zap_root", "zap_root_k17_phys_end"),
                      ("zap.kvm_tdp_mmu_zap_all", "zap_all_k17_phys_end")),
            stress_args=("--bits", "9")),
    Variant("root-refcount-not-atomic", BUG, _513, "", ("11cccf5c0472",), "",
            "5.12's plain root count, incremented and decremented by walkers that now run under the read lock: "
            "a lost update frees a root a vCPU still uses, or leaks one (root-refcount: freed while held, count "
            "!= holders)",
            replaces=(("roots.refcount_inc_not_zero", "refcount_inc_not_zero_plain"),
                      ("roots.refcount_dec_and_test", "refcount_dec_and_test_plain"))),
    Variant("fault-into-invalid-root", BUG, _BOTH, "", ("a955cad84cda",), "",
            "a vCPU that took its fault before the invalidation installs into its invalid root behind the "
            "zapper, which has already emptied it (install-into-invalid-root: a zapped root holds entries)",
            replaces=(("fault.root_is_obsolete", "root_never_obsolete"),)),
    Variant("notifier-unsafe-root-walk", BUG, _513, "", ("7533377215b6",), "",
            "the MMU notifier's unmap walks the roots without a reference (for_each_tdp_mmu_root: 5.13 as "
            "released; on 6.12, 6.12's walk with the fix reverted) and yields (may_block); the root's last "
            "reference goes meanwhile and the walk resumes in a freed table (use-after-free, Reader Pipe)",
            replaces=(("zap.kvm_tdp_mmu_unmap_gfn_range", "unmap_gfn_range_unsafe_root_walk"),)),
    Variant("unmap-skips-invalid-roots", BUG, _513, "", ("d62007edf01f",), "",
            "the zaps' yield-safe root walk skips invalid roots; an MMU notifier returns while an invalid root "
            "whose zapper yielded still maps the range (mapping-after-unmap). On 5.13 this is 5.16-5.17's "
            "notifier (7533377215b6 without the fix) grafted onto 5.13, whose own notifier walked every root; "
            "5.13's valid-only walk was in zap range and zap-all, which the switch also reverts. On 6.12 it is "
            "6.12's notifier and zap-all with the fix reverted (their walks pass only_valid = true)",
            replaces=(("zap.kvm_tdp_mmu_zap_gfn_range", "zap_gfn_range_valid_roots_only"),
                      ("zap.kvm_tdp_mmu_zap_all", "zap_all_valid_roots_only"))),
    Variant("mmu-seq-int-snapshot", BUG, _612, "B10", ("d75c1b7bdedd",), "",
            "the fault keeps its mmu_invalidate_seq snapshot in an int: once the sequence passes 2^31 the "
            "sign-extended snapshot never equals it, every fault looks stale and is retried for ever (a fault "
            "retried with no invalidation since its snapshot: vCPUs hang)",
            replaces=(("fault.mmu_notifier_retry_hva", "mmu_notifier_retry_hva_b10_int_snapshot"),),
            stress_args=("--mmu-seq-start", str((1 << 31) - 64))),
    Variant("clear-split-off-by-one", BUG, _612, "B5", ("1aa4bb916808",), "",
            "KVM_CLEAR_DIRTY_LOG splits [first, last) of the mask's pages instead of [first, last]: the huge page "
            "holding the last page is left whole and write-protected; a 4K mapping was promised for every page "
            "the clear named (huge-page-after-clear, dirty_log_page_splitting_test's assertion)",
            replaces=(("ioctl.kvm_arch_mmu_enable_log_dirty_pt_masked", "enable_log_dirty_pt_masked_b5_off_by_one"),),
            helpers=("ioctl._split_protect_masked",)),
    Variant("zap-range-faults-not-blocked", BUG, _612, "B9", ("6d3085e4d89a",), "",
            "kvm_zap_gfn_range begins its invalidation with its GFNs where the helpers compare host addresses "
            "(edb298c663fc, 5.15), a range no fault falls in: the sequence still moves at the end, but a fault "
            "that takes mmu_lock while the zap has yielded it installs a leaf the zap is removing, and keeps it "
            "if the zap has passed it (install-in-zapped-range)",
            replaces=(("ioctl.zap_gfn_range_locked", "zap_gfn_range_b9_faults_not_blocked"),)),
    Variant("roots-zapped-by-worker", BUG, _612, "B8", ("0df9dab891ff",), "",
            "each root a memslot update invalidates is zapped on the VM's unbound workqueue, by a kworker, while "
            "the update waits for it (flush_workqueue), as 5.18-6.5 did: the work leaves the task that asked for "
            "it, with its CPU affinity and priority, and several roots are zapped at once on as many CPUs (the "
            "fix's own account: jitter, audio blips on ChromeOS).  The root stays reachable and the reference is "
            "put after the zap, as in the fix, so no mapping or A/D checker fires: the zap of an invalidated root "
            "ran in a task that did not ask for it (root-zap-off-caller)",
            replaces=(("roots.kvm_tdp_mmu_invalidate_all_roots", "invalidate_all_roots_b8_queue_work"),
                      ("roots.kvm_tdp_mmu_zap_invalidated_roots", "zap_invalidated_roots_b8_flush_workqueue"),
                      ("roots.kvm_mmu_uninit_tdp_mmu", "uninit_tdp_mmu_b8_destroy_workqueue")),
            traits=frozenset({"root-zap-worker"}),
            helpers=("roots.flush_workqueue", "roots.tdp_mmu_zap_root_work", "roots.kworker_pass")),
    Variant("pages-lock-in-read-fault", BUG, _513, "K15", ("47b0c2e4c220",),
            "CVE-2022-45869: make_mmu_pages_available under the read lock",
            "write-lock-only page reclaim runs in the read-locked fault path (lockdep assertion: must be held "
            "for write)",
            replaces=(("fault.kvm_tdp_mmu_page_fault", "page_fault_k15_reclaim_under_read_lock"),)),
    Variant("nx-add-after-zap", BUG, _612, "", ("21a36ac6b6c7",), "",
            "a fault that linked an NX-disallowed table puts it on possible_nx_huge_pages without looking at "
            "the flag again (61f94478547b's code): if the collapsible zap of a dirty-log disable zapped the new "
            "entry in between, clearing the flag, the table is listed while RCU frees it (the commit's "
            "use-after-free; check_nx_list: a listed table no root reaches)",
            replaces=(("map.track_nx_after_link", "track_nx_after_link_unchecked"),),
            stress_args=("--nx-huge-pages", "--torture-delay-us", "2000", "--duration", "20")),
    Variant("pages-lock-in-tdp-mmu-fault", BUG, _612, "K15", ("47b0c2e4c220",),
            "CVE-2022-45869 in 6.12's shape: make_mmu_pages_available under the read lock after the fast page "
            "fault, as direct_page_fault ran a TDP MMU fault before the fix",
            "the fault that the fast page fault could not fix runs write-lock-only page reclaim under the read "
            "lock, between is_page_fault_stale and kvm_tdp_mmu_map (lockdep assertion: must be held for write)",
            replaces=(("fault.kvm_tdp_mmu_page_fault", "page_fault_fast_first_k15"),)),
]}

# the old name of the switch table, kept for readers of earlier docs
BUGS = {name: v for name, v in VARIANTS.items() if v.kind == BUG}


def check_profile(profile: str) -> Profile:
    """The profile named `profile`; ValueError names the known ones."""
    p = PROFILES.get(profile)
    if p is None:
        raise ValueError(f"unknown kernel {profile!r}; known: {', '.join(PROFILES)}")
    return p


def bugs_of(profile: str) -> list[str]:
    """The bug switches a profile carries, in the table's order; ValueError names an unknown profile."""
    check_profile(profile)
    return [v.name for v in VARIANTS.values() if v.kind == BUG and profile in v.profiles]


def check_names(names: list[str], profile: str = DEFAULT_PROFILE) -> list[str]:
    """Validate switch names for a profile; ValueError names the unknown one and the known ones."""
    check_profile(profile)
    for n in names:
        v = VARIANTS.get(n)
        if v is None or v.kind == KERNEL:
            raise ValueError(f"unknown bug {n!r}; known: {', '.join(bugs_of(profile))}")
        if profile not in v.profiles:
            raise ValueError(f"{n} exists only in kernel {', '.join(v.profiles)}, not in {profile}")
    return list(names)


def variants_on(profile: str, names: list[str]) -> list[Variant]:
    """The variants a VM of `profile` with switches `names` is built with: the profile's own, then the switches."""
    p = check_profile(profile)
    return [VARIANTS[n] for n in p.variants] + [VARIANTS[n] for n in check_names(names, profile)]


def replaced_functions(profile: str, names: list[str]) -> dict[str, str]:
    """"part.function" -> the function that replaces it, for a profile and the switches `names` turn on.

    A switch may replace a function its profile already replaced (the bug is in that kernel's version); two
    switches replacing one function cannot be on together (ValueError)."""
    out: dict[str, str] = {}
    by: dict[str, str] = {}
    p = check_profile(profile)
    for v in variants_on(profile, names):
        for target, replacement in v.replaces:
            if target in out and by[target] not in p.variants:
                raise ValueError(f"{by[target]} and {v.name} both replace {target}: turn on one of them")
            out[target], by[target] = replacement, v.name
    return out


def traits(profile: str, names: list[str]) -> frozenset[str]:
    """What the checkers must know of a VM built with these variants."""
    out: frozenset[str] = frozenset()
    for v in variants_on(profile, names):
        out |= v.traits
    return out


def bug_lines(profile: str = DEFAULT_PROFILE) -> list[str]:
    """`shmmmu stress --list-bugs`: every bug switch of a profile, the fix it reverts and what goes wrong."""
    return [f"{v.name}{' (' + v.ref + ')' if v.ref else ''}  [kernel {', '.join(v.profiles)}]\n"
            f"    reverts: {v.reverts()}\n    effect:  {v.effect}"
            for v in (VARIANTS[n] for n in bugs_of(profile))]
