"""The C hardware walker agrees with the Python reference walk, entry for entry, A/D updates included."""
from __future__ import annotations

import random

import numpy as np
import pytest

from shmmmu.guest import Vcpu
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.vm import create_vm


@pytest.mark.parametrize("bits,backing", [(3, 1), (3, 2), (3, 3), (9, 1), (9, 2)])
def test_c_walk_matches_the_reference(vm_name: str, bits: int, backing: int) -> None:
    npages = 2048 if bits == 3 else 1 << 12
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=bits, memslots=[MemslotSpec(0, npages, backing)])
    with create_vm(cfg) as vm:
        vm.register(0, 1)
        v = Vcpu(vm, 0)
        rng = random.Random(bits * 10 + backing)
        for g in rng.sample(range(npages), npages // 3):
            v.mmu.page_fault(g, rng.random() < 0.5)
        tables = vm.region.array("tables")
        # clear A/D here and there, write-protect some leaves, so the walks have updates to make
        flat = tables.reshape(-1)
        flat[(flat & np.uint64(1 << 11)) != 0] &= ~np.uint64(0x300 if backing == 1 else 0x200)
        for g in range(0, npages, 7):
            for write in (False, True):
                for ex in (False, True):
                    before = tables.copy()
                    ref = v.hw_walk_reference(g, write, ex)
                    after_ref = tables.copy()
                    tables[:] = before
                    got = v._hw_walk(g, write, ex)
                    assert (tables == after_ref).all(), (g, write, ex)    # same A/D update
                    if ref is None:
                        assert got == -1
                    else:
                        sptep, spte, level = ref
                        base = (spte >> 12) & ((1 << 40) - 1)
                        assert got == base + (g & ((1 << (bits * (level - 1))) - 1))
        v.release()
        del v


def test_walk_refuses_a_pointer_outside_the_pool(vm_name: str) -> None:
    """Garbage read from a freed table is not followed: a non-leaf entry naming a table past the pool is an EPT
    violation, from the root and again from the paging-structure-cache entry the first walk made."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 512, 1)])
    with create_vm(cfg) as vm:
        tables = vm.region.array("tables")
        tables[0, 0] = np.uint64((10_000_000 << 12) | 0x907)       # a non-leaf to a table that does not exist
        v = Vcpu(vm, 0, processor="c")
        try:
            assert v.proc.walk(0, False, False, 0) is None
            assert v.tlb.psc_lookup(0) == (10_000_000, 3, 0)
            assert v.proc.walk(0, False, False, 0) is None
        finally:
            v.release()
