"""The 6.12 profile (--kernel 6.12): eager page splitting, the lockless fast page fault, its zap range, B10, B5, B9,
and 5.13's switches that are 6.12 bugs too.

Each mechanism is shown doing what 6.12 does (through a VM and its vCPU), side by side with 5.13 where they
differ, and each is raced: the dirty_log_test of tests/system/test_dirty_log.py with real vCPU processes, and the
explorer's scenarios under the profile.  The switch B10 (mmu-seq-int-snapshot) is caught by its checker in
the explorer and in stress, and the fixed code with the same sequence is not.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from shmmmu import checks, violations
from shmmmu import spte as S
from shmmmu.explore.explorer import Explorer, Token
from shmmmu.explore.report import ExploreOptions, run_explore, run_replay
from shmmmu.explore.scenarios import SCENARIOS
from shmmmu.explore.split import split_search
from shmmmu.guest import Vcpu
from shmmmu.layout import STAT, Ctl, HostPage, MemslotSpec, VMConfig
from shmmmu.mmu import Mmu
from shmmmu.snapshot import walk_tables
from shmmmu.variants import bugs_of
from shmmmu.vm import create_vm

CLI = [sys.executable, "-m", "shmmmu.workers.cli"]


def _leaves(vm, start: int, end: int) -> dict[int, int]:
    """gfn -> level of every leaf mapping [start, end) in any root."""
    w = walk_tables(vm)
    hit = (w.leaf_gfn >= start) & (w.leaf_gfn < end)
    return dict(zip(w.leaf_gfn[hit].tolist(), w.leaf_level[hit].tolist()))


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_enabling_dirty_logging_splits_huge_pages_eagerly_in_612_only(vm_name: str, kernel: str) -> None:
    """6.12 (a3fe5dbda0a4): enabling logging replaces every huge leaf by 4K leaves of the same host pages, without
    a fault; 5.13 write-protects the huge leaves and leaves the split to the write faults."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 2)], debug=True, kernel=kernel)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        for g in (1, 9, 17):
            v.write(g, 0x100 + g)
        v.exit()                                 # out of guest mode: the host's flushes need no acknowledgement
        before = _leaves(vm, 0, 64)
        assert sorted(before.values()) == [2, 2, 2]
        host.enable_dirty_logging(0)
        v.enter()
        after = _leaves(vm, 0, 64)
        if kernel == "6.12":
            assert set(after.values()) == {1} and len(after) == 24           # 3 huge pages of 8
            assert host.st[STAT["huge_splits"]] == 3
        else:
            assert after == before
        for g in (1, 9, 17):                                              # the same host pages, every value kept
            assert v.read(g) == 0x100 + g
        v.exit()
        v.publish_stats()
        host.publish_stats()
        assert checks.check_all(vm) == []


def test_the_fast_page_fault_fixes_a_write_protected_leaf_without_the_lock(vm_name: str) -> None:
    """6.12 (6e8eb2060cc7): a write to a 4K leaf that dirty logging write-protected is fixed by one cmpxchg on the
    fast path (no mmu_lock taken) and logged; 5.13 takes the read lock for the same fault."""
    counts = {}
    for kernel in ("5.13", "6.12"):
        cfg = VMConfig(name=f"{vm_name}-{kernel.replace('.', '')}", n_vcpus=1, bits=3,
                       memslots=[MemslotSpec(0, 64, 1)], debug=True, kernel=kernel)
        with create_vm(cfg) as vm:
            v = Vcpu(vm, 0)
            host = Mmu(vm, cfg.host_worker)
            v.enter()
            v.write(3, 7)
            v.exit()
            host.enable_dirty_logging(0)
            v.enter()
            reads = v.mmu.lock.read_acquired
            v.write(3, 8)
            counts[kernel] = (v.mmu.st[STAT["fast_pf_fixed"]], v.mmu.lock.read_acquired - reads)
            v.exit()
            bitmap = host.get_dirty_log(0)
            assert int(bitmap[0]) >> 3 & 1, kernel                       # logged either way
            v.publish_stats()
            host.publish_stats()
            assert checks.check_all(vm) == []
    assert counts["6.12"] == (1, 0) and counts["5.13"] == (0, 1), counts


def test_list_bugs_names_each_profile_and_bad_kernels_are_one_line() -> None:
    r = subprocess.run([*CLI, "stress", "--kernel", "6.12", "--list-bugs"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "mmu-seq-int-snapshot (B10)  [kernel 6.12]" in r.stdout
    assert "d75c1b7bdedd" in r.stdout
    r5 = subprocess.run([*CLI, "stress", "--list-bugs"], capture_output=True, text=True, timeout=120)
    assert "mmu-seq-int-snapshot" not in r5.stdout and "link-after-publish" in r5.stdout
    # 5.13's switches whose fix's site 6.12 has in the same shape are switches of both profiles, and say so in
    # both listings; K15 has its own 6.12 switch in 6.12's shape (docs/internals.md, "5.13's switches on 6.12")
    both = {"advance-after-restart", "exclusive-plain-store", "fault-into-invalid-root"}
    assert set(bugs_of("6.12")) == both | {"mmu-seq-int-snapshot", "clear-split-off-by-one",
                                           "zap-range-faults-not-blocked", "pages-lock-in-tdp-mmu-fault",
                                           "roots-zapped-by-worker", "nx-add-after-zap"}
    assert both <= set(bugs_of("5.13")) and "pages-lock-in-tdp-mmu-fault" not in bugs_of("5.13")
    for out in (r.stdout, r5.stdout):
        assert "advance-after-restart (K9)  [kernel 5.13, 6.12]" in out and "3a0f64de479c" in out
    assert "pages-lock-in-tdp-mmu-fault (K15)  [kernel 6.12]" in r.stdout and "47b0c2e4c220" in r.stdout
    assert "pages-lock-in-read-fault" not in r.stdout and "link-after-publish" not in r.stdout
    assert "zap-all-phys-end" not in r.stdout
    assert "roots-zapped-by-worker (B8)  [kernel 6.12]" in r.stdout and "0df9dab891ff" in r.stdout
    assert "zap-range-faults-not-blocked (B9)  [kernel 6.12]" in r.stdout and "6d3085e4d89a" in r.stdout
    assert "clear-split-off-by-one (B5)  [kernel 6.12]" in r.stdout and "1aa4bb916808" in r.stdout
    for args in (["stress", "--kernel", "9.9", "-d", "1"], ["explore", "--kernel", "9.9", "--scenario", "fault-fault"],
                 ["stress", "--kernel", "5.13", "--bug", "mmu-seq-int-snapshot", "-d", "1"]):
        r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)


def test_b10_is_found_by_the_explorer_with_a_token_that_carries_the_kernel() -> None:
    rep = run_explore(ExploreOptions(bugs=["mmu-seq-int-snapshot"]))          # the switch picks 6.12
    assert rep.found is not None and rep.found.finding.kind == "violation"
    assert "fault-retry-without-cause" in str(rep.found.finding)
    assert Token.decode(rep.token).kernel == "6.12"
    again = run_replay(rep.token)
    assert again.same and "kernel 6.12" in again.lines()[0]


def test_the_fixed_612_code_passes_the_wrapping_sequence_exhaustively() -> None:
    """The same scenario (the sequence crossing 2^31) without the switch: no finding in every schedule of up to
    two preemptions (and the token of a 5.13 search has no kernel field: older tokens still decode)."""
    with Explorer(SCENARIOS["seq-wrap"], [], kernel="6.12") as ex:
        sr = split_search(ex, 2, 20000)
    assert sr.first is None and sr.exhausted and sr.bound_done == 2, sr


@pytest.mark.parametrize("scenario", ["split-log", "clear-split", "manual-clear", "dirty-log", "split-huge",
                                      "fault-zap", "fault-unmap", "zap-range-fault", "age-reaccess"])
def test_the_612_profile_is_clean_in_every_schedule_of_its_scenarios(scenario: str) -> None:
    with Explorer(SCENARIOS[scenario], [], kernel="6.12") as ex:
        sr = split_search(ex, 2, 20000)
    assert sr.first is None, sr.first.finding
    assert sr.exhausted and sr.bound_done == 2


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["memslot-fault", "memslot-unmap", "age-unmap", "zap-all-yield-shared",
                                      "fault-fault"])
def test_the_scenarios_of_513s_switches_are_clean_on_612_in_every_schedule(scenario: str) -> None:
    """The scenarios that find 5.13's switches on 6.12 (fault-into-invalid-root, unmap-skips-invalid-roots, K14, K9,
    and K15's 6.12 shape) find nothing in the fixed 6.12 code, in every schedule of up to two preemptions: their
    checkers fire on the reverted fix only.  (unmap-reload, notifier-unsafe-root-walk's, is exhausted too but
    takes minutes: docs/explore.md.)"""
    with Explorer(SCENARIOS[scenario], [], kernel="6.12") as ex:
        sr = split_search(ex, 2, 20000)
    assert sr.first is None, sr.first.finding
    assert sr.exhausted and sr.bound_done == 2


def test_b5_is_caught_at_clear_and_the_fixed_split_leaves_only_4k() -> None:
    rep = run_explore(ExploreOptions(bugs=["clear-split-off-by-one"]))
    assert rep.found is not None and "huge-page-after-clear" in str(rep.found.finding)
    assert run_replay(rep.token).same


def test_stress_catches_b10_and_the_fixed_code_passes_with_the_same_sequence() -> None:
    base = [*CLI, "stress", "--kernel", "6.12", "-d", "3", "-v", "2", "--seed", "1", "--mmu-seq-start",
            str((1 << 31) - 64)]
    bad = subprocess.run([*base, "--bug", "mmu-seq-int-snapshot"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "fault-retry-without-cause" in bad.stdout, bad.stdout[-2000:]
    assert "--kernel 6.12 --mmu-seq-start" in bad.stdout                     # the replay line carries both
    good = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout[-2000:]


def test_bench_page_splitting_passes_the_selftests_assertions_on_612_and_refuses_513() -> None:
    """`shmmmu bench page-splitting` (dirty_log_page_splitting_test): on 6.12 every huge page is split at enable
    (and, with manual protect, at the first CLEAR) and comes back after logging is disabled; 5.13 has no eager
    splitting and says so in one line."""
    r = subprocess.run([*CLI, "bench", "page-splitting", "-b", "8M", "-s", "2m"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Page stats after enabling dirty logging: 4K: 4096 2M: 0 1G: 0 huge: 0" in r.stdout
    assert "Page stats after clearing dirty log pass: 4K: 4096 2M: 0 1G: 0 huge: 0" in r.stdout
    assert r.stdout.count("Page stats after repopulating memory: 4K: 0 2M: 8 1G: 0 huge: 8") == 2
    old = subprocess.run([*CLI, "bench", "page-splitting", "--kernel", "5.13"], capture_output=True, text=True,
                         timeout=120)
    assert old.returncode == 2 and old.stderr.count("\n") == 1 and "no eager page splitting" in old.stderr


def test_bench_dirty_log_runs_both_kernels_side_by_side_with_their_ratio() -> None:
    """`bench dirty-log --kernel 5.13,6.12 --lock-mode shared`: the profiles alternate in one invocation, the
    summary has a column each and their ratio; both kernels with both lock modes is refused in one line."""
    r = subprocess.run([*CLI, "bench", "dirty-log", "--kernel", "5.13,6.12", "-v", "1", "-b", "8M", "-s", "2m"],
                       capture_output=True, text=True, timeout=600)           # two kernels: shared mode
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "Kernel: 5.13" in r.stdout and "Kernel: 6.12" in r.stdout
    head = [ln for ln in r.stdout.splitlines() if "5.13/6.12" in ln]
    assert head and "5.13" in head[0] and "6.12" in head[0]
    bad = subprocess.run([*CLI, "bench", "dirty-log", "--kernel", "5.13,6.12", "--lock-mode", "both", "-b", "8M"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "one lock mode" in bad.stderr


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_zap_range_is_612s_under_the_write_lock_inside_an_invalidation(vm_name: str, kernel: str) -> None:
    """6.12's kvm_zap_gfn_range (6d3085e4d89a): the write lock, an invalidation of the range around the zap (the
    sequence moves once, nothing is left in progress), only the leaves zapped (the tables stay linked); 5.13's
    zaps under the read lock with no invalidation and tears the covered tables down."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True, kernel=kernel)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        v.enter()
        for g in range(16):
            v.write(g, 0x200 + g)
        v.exit()
        ctl = vm.region.words("ctl")
        seq, writes, reads = ctl.load(Ctl.NOTIFIER_SEQ), host.lock.write_acquired, host.lock.read_acquired
        tables = int(vm.region.array("ctl")[Ctl.PAGE_COUNT])
        host.zap_gfn_range_locked(0, 8)
        assert _leaves(vm, 0, 16) == {g: 1 for g in range(8, 16)}
        if kernel == "6.12":
            assert ctl.load(Ctl.NOTIFIER_SEQ) == seq + 1 and ctl.load(Ctl.NOTIFIER_COUNT) == 0
            assert (host.lock.write_acquired - writes, host.lock.read_acquired - reads) == (1, 0)
            assert int(vm.region.array("ctl")[Ctl.PAGE_COUNT]) == tables           # leaves only
        else:
            assert ctl.load(Ctl.NOTIFIER_SEQ) == seq
            assert (host.lock.write_acquired - writes, host.lock.read_acquired - reads) == (0, 1)
            assert int(vm.region.array("ctl")[Ctl.PAGE_COUNT]) == tables - 1       # gfn 0-7's table went
        v.enter()
        for g in range(16):
            assert v.read(g) == 0x200 + g
        v.exit()
        v.publish_stats()
        host.publish_stats()
        assert checks.check_all(vm) == []


def test_b9_is_found_by_dfs_within_its_shrunk_preemptions_and_the_fix_runs_its_decisions_clean() -> None:
    """zap-range-faults-not-blocked: the fault that takes mmu_lock while the zap has yielded it installs behind the
    zap; the checker names the zap in progress.  DFS finds it again with the preemptions the counterexample was
    shrunk to, and the same decisions without the switch end cleanly (--with-fix)."""
    rep = run_explore(ExploreOptions(bugs=["zap-range-faults-not-blocked"]))
    assert rep.found is not None and "install-in-zapped-range" in str(rep.found.finding)
    text = "\n".join(rep.lines())
    assert "while a kvm_zap_gfn_range of gfn 0x0..0x3f was in progress" in text
    assert "a fault installed a mapping a zap range had just removed, without retrying (B9)" in text
    assert Token.decode(rep.token).kernel == "6.12"
    shrunk = rep.found.preemptions
    again = run_explore(ExploreOptions(bugs=["zap-range-faults-not-blocked"], strategy="dfs", preemptions=shrunk))
    assert again.found is not None and "install-in-zapped-range" in str(again.found.finding)
    fix = subprocess.run([*CLI, "explore", "--replay", rep.token, "--with-fix"], capture_output=True, text=True,
                         timeout=300)
    assert fix.returncode == 0 and "no finding with the fix" in fix.stdout, fix.stdout[-2000:]


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_disabling_dirty_logging_zaps_collapsible_tables_in_612_and_leaves_in_513(vm_name: str, kernel: str) -> None:
    """zap_collapsible_spte_range: 6.12 zaps the non-leaf above the 4K leaves of each range the slot may map huge
    again, and its table goes with it; 5.13 zaps the 4K leaves and leaves the tables for the next fault."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 2)], debug=True, kernel=kernel)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        host.enable_dirty_logging(0)
        v.enter()
        for g in (1, 9, 17):
            v.write(g, 0x100 + g)                # 4K leaves while logging, each in its own 2M range
        v.exit()
        w = walk_tables(vm)
        assert len(_leaves(vm, 0, 64)) == 3 and int((w.t_level == 1).sum()) == 3
        host.disable_dirty_logging(0)
        w = walk_tables(vm)
        assert _leaves(vm, 0, 64) == {}
        assert int((w.t_level == 1).sum()) == (0 if kernel == "6.12" else 3)
        assert host.st[STAT["collapsible_zaps"]] == 3            # tables on 6.12, leaves on 5.13
        v.enter()
        v.write(2, 0x102)                        # the huge page is back at the next fault
        v.exit()
        assert _leaves(vm, 0, 64) == {0: 2}
        host.publish_stats()
        v.publish_stats()
        assert checks.check_all(vm) == []


def test_nx_add_after_zap_is_found_and_the_fix_rechecks_the_flag() -> None:
    """nx-add-after-zap (reverts 21a36ac6b6c7): disabling dirty logging zaps, under the read lock, the
    NX-disallowed table an instruction fetch has just linked, before the fetch puts it on the NX list; the late add
    lists a table on its way to RCU (check_nx_list).  DFS finds it again with the preemptions it was shrunk to, the
    same decisions with the fix (the flag looked at again under tdp_mmu_pages_lock) end cleanly, and the scenario's
    fixed code is clean in every schedule of up to two preemptions under both profiles."""
    rep = run_explore(ExploreOptions(bugs=["nx-add-after-zap"]))
    assert rep.found is not None and "the NX list holds tables no entry reaches" in str(rep.found.finding)
    assert Token.decode(rep.token).kernel == "6.12"
    again = run_explore(ExploreOptions(bugs=["nx-add-after-zap"], strategy="dfs", preemptions=rep.found.preemptions))
    assert again.found is not None and "table-leak" in str(again.found.finding)
    fix = subprocess.run([*CLI, "explore", "--replay", rep.token, "--with-fix"], capture_output=True, text=True,
                         timeout=300)
    assert fix.returncode == 0 and "no finding with the fix" in fix.stdout, fix.stdout[-2000:]
    for kernel in ("5.13", "6.12"):
        with Explorer(SCENARIOS["nx-fault-collapse"], [], kernel=kernel) as ex:
            sr = split_search(ex, 2, 20000)
        assert sr.first is None and sr.exhausted and sr.bound_done == 2, (kernel, sr)


def test_the_b9_checker_is_not_installed_on_513() -> None:
    """5.13's zap range legitimately lets faults race it (no invalidation): its VMs carry no zap-range check, and
    the scenario of B9 is clean there in every schedule of up to two preemptions."""
    with Explorer(SCENARIOS["zap-range-fault"], [], kernel="5.13") as ex:
        sr = split_search(ex, 2, 20000)
    assert sr.first is None and sr.exhausted and sr.bound_done == 2, sr


def test_recovery_ends_the_invalidation_of_a_worker_that_died_inside_its_zap_range(vm_name: str) -> None:
    """A vCPU killed inside 6.12's kvm_zap_gfn_range (stress --kill-every: a guest's zap runs in its thread) left the
    invalidation begun: the crash recovery ends it, or every fault on the range would retry for ever."""
    from shmmmu.recovery import repair_after_crash
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True, kernel="6.12")
    with create_vm(cfg) as vm:
        dead, host = Mmu(vm, 0), Mmu(vm, cfg.host_worker)
        ctl = vm.region.words("ctl")
        seq = ctl.load(Ctl.NOTIFIER_SEQ)
        # where the kill came: the invalidation begun and recorded, the zap under way (the lock it held is
        # released by the supervisor's lock recovery before the repair)
        dead.lock.write_lock()
        dead.notifier.kvm_inc_notifier_count(0, 8)
        dead.wstate.invalidating.store(0, 1)
        dead.debug_state.zap_range_begun(0, 8)
        dead.lock.write_unlock()
        done = repair_after_crash(host, 0)
        assert any("ended the invalidation" in line for line in done), done
        assert ctl.load(Ctl.NOTIFIER_COUNT) == 0 and ctl.load(Ctl.NOTIFIER_SEQ) == seq + 1
        assert dead.wstate.invalidating.load(0) == 0
        v = Vcpu(vm, 0)                               # the restarted vCPU: its fault on the range installs
        v.enter()
        v.write(3, 9)
        assert v.read(3) == 9
        v.exit()
        v.publish_stats()
        host.publish_stats()
        assert checks.check_all(vm) == []


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_the_harvest_and_aging_clear_one_bit_and_612s_harvest_marks_the_host_page_dirty(vm_name: str,
                                                                                        kernel: str) -> None:
    """6.12's clear_dirty_pt_masked and age_gfn_range clear their one bit with tdp_mmu_clear_spte_bits (an atomic
    AND where the processor may still set A or D) and skip handle_changed_spte; the harvest marks the host page
    dirty itself (kvm_set_pfn_dirty). 5.13 sets the whole entry, and its host page hears of D only when D goes."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=True, kernel=kernel)
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        host.enable_dirty_logging(0)
        v.enter()
        v.write(1, 0x51)                      # a writable leaf with A and D, logged
        v.read(2)                             # a read-only leaf with A
        v.exit()
        hm = vm.region.array("host_map")
        host_ad = vm.region.array("host_ad")
        before = {g: s for g, _, s in host.present_leaves(0, 8)}
        assert host_ad[int(hm[1])] & HostPage.DIRTY == 0
        assert host.get_dirty_log(0)[0] & 0b10                  # gfn 1 harvested, and write-protected again
        after = {g: s for g, _, s in host.present_leaves(0, 8)}
        assert after[1] == before[1] & ~S.WRITABLE               # W alone went: A and D stay in the entry
        assert bool(host_ad[int(hm[1])] & HostPage.DIRTY) == (kernel == "6.12")
        assert host.clear_young(0, 8) is True
        aged = {g: s for g, _, s in host.present_leaves(0, 8)}
        assert aged == {g: s & ~S.ACCESSED for g, s in after.items()}
        assert not violations.read_all(vm.region)


def test_b8_is_found_at_once_and_the_same_decisions_with_the_fix_end_cleanly() -> None:
    """roots-zapped-by-worker (B8, 0df9dab891ff's body): the invalidated roots of a memslot deletion are zapped by
    a kworker of the VM's workqueue while the deletion waits; the checker names where the work ran.  No schedule is
    needed to see it (0 preemptions); the token replays it, and the same decisions without the switch (the deletion
    zaps its roots itself) end cleanly."""
    rep = run_explore(ExploreOptions(bugs=["roots-zapped-by-worker"]))
    assert rep.found is not None and "root-zap-off-caller" in str(rep.found.finding)
    assert rep.found.preemptions == 0
    text = "\n".join(rep.lines())
    assert "was zapped by kworker, a kworker of the VM's workqueue" in text
    assert Token.decode(rep.token).kernel == "6.12"
    assert run_replay(rep.token).same
    fix = subprocess.run([*CLI, "explore", "--replay", rep.token, "--with-fix"], capture_output=True, text=True,
                         timeout=300)
    assert fix.returncode == 0 and "no finding with the fix" in fix.stdout, fix.stdout[-2000:]


def test_the_612_root_lifecycle_is_clean_in_a_memslot_deletion_racing_a_notifier_and_a_reload() -> None:
    """memslot-roots without the switch: the deletion zaps both roots under the read lock and puts the TDP MMU's
    references after the zaps while the notifier unmaps the slot and vCPU0 reloads (the slow set runs 10,000)."""
    rep = run_explore(ExploreOptions(scenario="memslot-roots", strategy="pct", executions=80, time_limit=0,
                                     kernel="6.12"))
    assert rep.found is None, rep.lines()[:40]
    assert rep.search.executions == 80


@pytest.mark.parametrize("bugs", [[], ["roots-zapped-by-worker"]])
def test_memslot_deletion_with_vcpu_processes_zaps_in_the_caller_or_in_the_kworker_with_b8(vm_name: str,
                                                                                      bugs: list[str]) -> None:
    """Real vCPU processes fault into both slots while the host deletes the hot-plug slot three times: once a
    deletion returns no root maps the slot, and the invalidated roots are freed once their vCPUs reloaded.  6.12
    zaps them in the deleting task; with B8 the reclaimer process (the kworker) zaps them while the deletion
    waits, and the checker says so (a count of deletions, not a time: the vCPUs hold roots first)."""
    from conftest import wait_until
    from shmmmu import violations
    from shmmmu.layout import TMeta, Workload, WState
    from shmmmu.snapshot import snapshot
    from shmmmu.workers.supervisor import Supervisor
    wl = Workload(kind="stress", pages=320, overlap=True, n_vcpus=1, accesses=512, write_fraction=0.5)
    cfg = VMConfig(name=vm_name, n_vcpus=2, bits=3, memslots=[MemslotSpec(0, 256, 1), MemslotSpec(256, 64, 1)],
                   debug=True, workload=wl, root_roles=2, kernel="6.12", bugs=bugs)
    with create_vm(cfg) as vm:
        sup = Supervisor(vm)
        try:
            sup.start()
            vm.region.words("ctl").store(Ctl.ITERATION, 1)
            held = vm.region.columns("wstate", WState).root
            gen = vm.region.columns("tmeta", TMeta).gen
            for _ in range(3):
                wait_until(lambda: sup.check() or all(held.load(i) for i in range(2)), "the vCPUs holding roots")
                old = {(r["table"], gen.load(r["table"])) for r in snapshot(vm).root_rows()}
                sup.mmu.delete_memslot(1)
                assert old and _leaves(vm, 256, 320) == {}
                wait_until(lambda: sup.check() or not any(gen.load(t) == g for t, g in old),
                           "the invalidated roots being freed")
                sup.mmu.add_memslot(1)
            sup.stop()
            sup.drain()
            assert sup.stats()["fast_zaps"] == 3                 # (the host's counters published)
            offcaller = [v for v in violations.read_all(vm.region) if v.kind == "root-zap-off-caller"]
            if bugs:
                assert offcaller and {v.worker for v in offcaller} == {cfg.reclaimer_worker}
                assert {v.kind for v in violations.read_all(vm.region)} == {"root-zap-off-caller"}
            else:
                assert violations.read_all(vm.region) == []
            assert [str(p) for p in checks.check_all(vm)] == []      # no state checker sees B8's shape
            assert sup.mmu.destroy() == 0
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()
