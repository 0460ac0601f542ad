"""6.12's root lifecycle and MMU-notifier unmap, side by side with 5.13's, through a VM and its vCPUs.

The reference-count rules of 6.12 (edbdb43fc96b, dab285e4ec73, 576a15de8d29, 0df9dab891ff): a root starts with
two references, the vCPU's and the TDP MMU's own, and outlives its last vCPU; vCPUs allocate and put roots under
the read lock; invalidation takes no reference and the zap of an invalidated root puts the TDP MMU's only after
the root is empty; the last put of a valid root is a bug.  The notifier's unmap zaps only leaves, in every root
(f47e5bbbc92f).  The whole-VM check of the counts (checks.check_roots) is shown to know the TDP MMU's reference.
"""
from __future__ import annotations

import pytest

from shmmmu import checks, violations
from shmmmu.guest import Vcpu
from shmmmu.layout import STAT, Ctl, MemslotSpec, RootRow, VMConfig
from shmmmu.mmu import Mmu
from shmmmu.snapshot import walk_tables
from shmmmu.vm import create_vm


def _vm(name: str, kernel: str, roles: int = 1):
    cfg = VMConfig(name=name, n_vcpus=2, bits=3, memslots=[MemslotSpec(0, 32, 1), MemslotSpec(32, 32, 1)],
                   debug=True, kernel=kernel, root_roles=roles)
    return cfg, create_vm(cfg)


def _row(vm, row: int) -> dict:
    r = vm.region.columns("roots", RootRow)
    return {"table": r.table.load(row), "count": r.count.load(row), "invalid": r.invalid.load(row),
            "scheduled": r.scheduled.load(row), "zapped": r.zapped.load(row)}


def _write(v: Vcpu, gfns: list[int]) -> None:
    v.enter()
    for g in gfns:
        v.write(g, 0x300 + g)
    v.exit()


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_a_root_outlives_its_last_vcpu_only_in_612(vm_name: str, kernel: str) -> None:
    """6.12: the count starts at 2 and the root stays listed (and mapped) once its vCPU put it; a second vCPU of
    the role takes the same root back.  5.13: the count starts at 1 and the vCPU's put frees the root."""
    cfg, ctx = _vm(vm_name, kernel)
    with ctx as vm:
        v0, v1 = Vcpu(vm, 0), Vcpu(vm, 1)
        _write(v0, [1, 2])
        row, table = v0.mmu.root_row, v0.mmu.root
        assert _row(vm, row)["count"] == (2 if kernel == "6.12" else 1)
        v0.mmu.kvm_mmu_unload()
        if kernel == "6.12":
            assert _row(vm, row) == {"table": table, "count": 1, "invalid": 0, "scheduled": 0, "zapped": 0}
            _write(v1, [3])
            assert v1.mmu.root_row == row and _row(vm, row)["count"] == 2       # the same root, its leaves kept
            assert v1.read(1) == 0x301
        else:
            assert _row(vm, row)["table"] == 0 and v0.mmu.st[STAT["roots_freed"]] == 1
        for v in (v0, v1):
            v.publish_stats()
        assert checks.check_all(vm) == []


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_vcpus_load_and_put_roots_under_the_read_lock_in_612(vm_name: str, kernel: str) -> None:
    cfg, ctx = _vm(vm_name, kernel)
    with ctx as vm:
        v0 = Vcpu(vm, 0)
        lock = v0.mmu.lock
        writes, reads = lock.write_acquired, lock.read_acquired
        v0.mmu.kvm_mmu_load()
        v0.mmu.kvm_mmu_unload()
        taken = (lock.write_acquired - writes, lock.read_acquired - reads)
        assert taken == ((0, 2) if kernel == "6.12" else (2, 0))


def test_invalidation_takes_no_reference_and_the_zap_puts_the_tdp_mmus_after_emptying_the_root(vm_name: str) -> None:
    """6.12: kvm_tdp_mmu_invalidate_all_roots marks the root invalid and scheduled, its count unchanged (the TDP
    MMU's reference is gifted to the zap); the zap of invalidated roots empties it and puts that reference, so the
    root, still held by its vCPU, stays listed with a count of 1 until the vCPU reloads, whose put frees it."""
    cfg, ctx = _vm(vm_name, "6.12")
    with ctx as vm:
        v0 = Vcpu(vm, 0)
        host = Mmu(vm, cfg.host_worker)
        _write(v0, [1, 9, 33])
        row, table = v0.mmu.root_row, v0.mmu.root
        tables = int(vm.region.array("ctl")[Ctl.PAGE_COUNT])
        assert tables > 0
        host.zap_all_fast_invalidate()
        assert _row(vm, row) == {"table": table, "count": 2, "invalid": 1, "scheduled": 1, "zapped": 0}
        host.zap_all_fast_zap()
        assert _row(vm, row) == {"table": table, "count": 1, "invalid": 1, "scheduled": 0, "zapped": 1}
        assert int(vm.region.array("ctl")[Ctl.PAGE_COUNT]) == 0               # every table below it torn down
        assert int((vm.region.array("tables")[table] != 0).sum()) == 0
        freed = v0.mmu.st[STAT["roots_freed"]]
        v0.enter()                                      # the reload request: the old root put, a new one loaded
        assert v0.read(1) == 0x301
        v0.exit()
        assert _row(vm, row)["table"] in (0, v0.mmu.root) and v0.mmu.root != table
        assert v0.mmu.st[STAT["roots_freed"]] == freed + 1
        v0.publish_stats()
        host.publish_stats()
        assert checks.check_all(vm) == []
        assert host.destroy() == 0                      # kvm_mmu_uninit_tdp_mmu puts the new root's own reference


def test_the_last_put_of_a_valid_root_is_a_bug_and_check_roots_counts_the_tdp_mmus_reference(vm_name: str) -> None:
    """KVM_BUG_ON(!root->role.invalid) at the last put: a valid root's count reaching 0 is recorded; and the
    whole-VM check wants each 6.12 root held once more than its holders until its invalidation's zap is done."""
    cfg, ctx = _vm(vm_name, "6.12")
    with ctx as vm:
        v0 = Vcpu(vm, 0)
        _write(v0, [1])
        row = v0.mmu.root_row
        assert checks.check_roots(vm) == []
        count = vm.region.columns("roots", RootRow).count
        count.store(row, 1)                            # the TDP MMU's reference lost
        assert [p.kind for p in checks.check_roots(vm)] == ["root-refcount"]
        v0.mmu.kvm_mmu_unload()                        # ... so the vCPU's put is the last, on a valid root
        kinds = [(v.kind, v.where) for v in violations.read_all(vm.region)]
        assert ("root-refcount", "roots_612.py:Roots612.kvm_tdp_mmu_put_root_612") in kinds


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_the_notifier_unmaps_leaves_only_and_reaches_an_invalid_root_in_612(vm_name: str, kernel: str) -> None:
    """An MMU notifier over a whole 4K table's range, while vCPU1's root is invalid and not yet zapped: every
    root, the invalid one too, loses the range's leaves; 6.12 keeps the tables (leaf zaps, f47e5bbbc92f), 5.13
    tears down the table the range covers whole."""
    cfg, ctx = _vm(vm_name, kernel, roles=2)
    with ctx as vm:
        v0, v1 = Vcpu(vm, 0), Vcpu(vm, 1)
        host = Mmu(vm, cfg.host_worker)
        _write(v0, list(range(8, 16)))
        _write(v1, list(range(8, 16)))
        host.lock.write_lock()
        host.roots.kvm_tdp_mmu_invalidate_all_roots()  # both roots invalid, their zap not run
        host.lock.write_unlock()
        before = int(vm.region.array("ctl")[Ctl.PAGE_COUNT])
        host.host_unmap(8, 16, migrate=False)
        w = walk_tables(vm)
        assert not ((w.leaf_gfn >= 8) & (w.leaf_gfn < 16)).any()
        after = int(vm.region.array("ctl")[Ctl.PAGE_COUNT])
        assert after == before if kernel == "6.12" else after == before - 2      # one 4K table per root
        host.zap_all_fast_zap()
        assert violations.read_all(vm.region) == []
