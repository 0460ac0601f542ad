"""The TDP MMU in one process against a sequential reference model, step by step.

A `Model` says, from first principles (KVM_TDP_MMU.md §7-§10), what every
operation must leave behind: which GFNs are mapped, at which level, writable
or not, on which host page (it tracks the host's migrations itself), what
guest memory holds, and which GFNs the dirty log must report.  A `Driver`
applies the same operation to a VM (faults and guest accesses through a vCPU,
everything else through the host worker's Mmu) and, after every step,
compares the tables with the model and runs the invariant checkers of
shmmmu.checks.  Sequences come from seeds (`random_ops`), run on a shared-mode
and an exclusive-mode VM in lockstep, which must also end with identical
tables; a Hypothesis state machine drives the same operations with shrinking.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import new_vm_name
from shmmmu import checks
from shmmmu import spte as S
from shmmmu.guest import Vcpu
from shmmmu.layout import MemslotSpec, VMConfig, memslot_areas
from shmmmu.memslots import DATA_POISON
from shmmmu.pool import Pool
from shmmmu.rcu import Rcu
from shmmmu.mmu import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS, Mmu
from shmmmu.vm import create_vm
from shmmmu import violations


# ---------------------------------------------------------------- configurations


def slot_specs(bits: int, backing: int) -> list[MemslotSpec]:
    """Small memory: slot 0 with the backing under test, a 4K slot with an odd size, and (bits=3) a 1G slot."""
    if bits == 3:
        return [MemslotSpec(8, 72, backing), MemslotSpec(200, 30, 1), MemslotSpec(1024, 160, 3)]
    return [MemslotSpec(512, 1536, backing), MemslotSpec(4096, 300, 1)]


def make_config(bits: int, backing: int, lock_mode: str, tag: str = "model") -> VMConfig:
    return VMConfig(name=new_vm_name(tag), n_vcpus=1, bits=bits, memslots=slot_specs(bits, backing),
                    lock_mode=lock_mode, debug=True)


# ---------------------------------------------------------------- the reference model


@dataclass
class Mapping:
    level: int
    base: int            # first GFN of the leaf
    writable: bool


@dataclass
class Model:
    """What the tables, the host and guest memory must look like, derived sequentially."""

    config: VMConfig
    active: list[bool] = field(default_factory=list)
    logging: list[bool] = field(default_factory=list)
    bank: list[dict[int, int]] = field(default_factory=list)       # per slot: backing block -> bank 0/1
    mapped: dict[int, Mapping] = field(default_factory=dict)        # per 4K GFN
    mem: dict[int, int] = field(default_factory=dict)
    dirty: list[set[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = self.config.derived()
        self.g = self.config.geometry
        self.slots = self.config.memslots
        self.areas = memslot_areas(self.config)
        n = len(self.slots)
        self.active = [True] * n
        self.logging = [False] * n
        self.bank = [dict() for _ in range(n)]
        self.dirty = [set() for _ in range(n)]

    # -- slots and host pages
    def slot_of(self, gfn: int, active_only: bool = True) -> int | None:
        for k, m in enumerate(self.slots):
            if m.base_gfn <= gfn < m.base_gfn + m.npages:
                return k if self.active[k] or not active_only else None
        return None

    def block(self, k: int) -> int:
        return self.g.pages(self.slots[k].backing_level)

    def bank_size(self, k: int) -> int:
        b = self.block(k)
        return -(-self.slots[k].npages // b) * b

    def host_page(self, gfn: int) -> int:
        k = self.slot_of(gfn, active_only=False)
        assert k is not None
        m = self.slots[k]
        rel = gfn - m.base_gfn
        return self.areas[k][2] + self.bank[k].get(rel // self.block(k), 0) * self.bank_size(k) + rel

    def level_for(self, k: int, gfn: int) -> int:
        """kvm_mmu_hugepage_adjust: 4K while logging, else the largest page the backing, alignment and slot allow."""
        if self.logging[k]:
            return 1
        m = self.slots[k]
        top = 1
        for level in range(2, min(m.backing_level, 3) + 1):
            if m.base_gfn % self.g.pages(level) == 0:
                top = level
        for level in range(top, 1, -1):
            n = self.g.pages(level)
            start = gfn & ~(n - 1)
            if start >= m.base_gfn and start + n <= m.base_gfn + m.npages:
                return level
        return 1

    # -- mappings
    def unmap(self, gfn: int) -> None:
        """Remove the whole leaf mapping gfn, if any."""
        mp = self.mapped.get(gfn)
        if mp is None:
            return
        for x in range(mp.base, mp.base + self.g.pages(mp.level)):
            self.mapped.pop(x, None)

    def unmap_range(self, start: int, end: int) -> None:
        for gfn in [x for x in self.mapped if start <= x < end]:
            self.unmap(gfn)

    def fault(self, gfn: int, write: bool) -> int:
        """The return value a fault must give, and its effect."""
        k = self.slot_of(gfn)
        if k is None:
            return RET_PF_EMULATE
        level = self.level_for(k, gfn)
        base = self.g.round(gfn, level)
        mp = self.mapped.get(gfn)
        if mp is not None and mp.level == level and mp.writable:
            return RET_PF_SPURIOUS
        if mp is not None and mp.level > level:
            self.unmap(gfn)                                # split: the huge leaf goes, then a small one
        for x in range(base, base + self.g.pages(level)):
            self.unmap(x)                                  # a huge leaf replaces the small ones below it
        for x in range(base, base + self.g.pages(level)):
            self.mapped[x] = Mapping(level, base, True)
        if level == 1 and self.logging[k]:
            self.dirty[k].add(gfn)                         # W went 0 -> 1 on a 4K leaf of a logging slot
        return RET_PF_FIXED

    def guest_access(self, gfn: int, write: bool) -> None:
        mp = self.mapped.get(gfn)
        if mp is None or (write and not mp.writable):
            self.fault(gfn, write)

    def host_unmap(self, start: int, end: int) -> None:
        """The host migrates every backing page that [start, end) touches; no mapping of a moved page survives."""
        moved: list[int] = []
        for k, m in enumerate(self.slots):
            lo, hi = max(start, m.base_gfn), min(end, m.base_gfn + m.npages)
            if lo >= hi:
                continue
            b = self.block(k)
            for blk in range((lo - m.base_gfn) // b, (hi - 1 - m.base_gfn) // b + 1):
                self.bank[k][blk] = 1 - self.bank[k].get(blk, 0)
                moved += range(m.base_gfn + blk * b, min(m.base_gfn + (blk + 1) * b, m.base_gfn + m.npages))
        self.unmap_range(start, end)
        for x in moved:
            self.unmap(x)

    def wrprot(self, gfn: int, only_4k: bool) -> None:
        mp = self.mapped.get(gfn)
        if mp is not None and (mp.level == 1 or not only_4k):
            for x in range(mp.base, mp.base + self.g.pages(mp.level)):
                self.mapped[x].writable = False

    def enable_logging(self, k: int) -> None:
        self.logging[k] = True
        self.dirty[k] = set()
        m = self.slots[k]
        for x in range(m.base_gfn, m.base_gfn + m.npages):
            self.wrprot(x, only_4k=False)

    def disable_logging(self, k: int) -> None:
        self.logging[k] = False
        m = self.slots[k]
        for x in range(m.base_gfn, m.base_gfn + m.npages):
            mp = self.mapped.get(x)
            if mp is not None and mp.level == 1 and self.level_for(k, x) >= 2:
                self.unmap(x)                              # collapsible: these may now be one huge page

    def dirty_words(self, k: int) -> np.ndarray:
        m = self.slots[k]
        out = np.zeros(-(-m.npages // 64), dtype=np.uint64)
        for x in self.dirty[k]:
            rel = x - m.base_gfn
            out[rel // 64] |= np.uint64(1 << (rel % 64))
        return out

    def harvest(self, k: int, gfns: set[int]) -> None:
        """Re-protect harvested GFNs: their 4K leaves lose W, so the next write faults and logs again."""
        self.dirty[k] -= gfns
        for x in gfns:
            self.wrprot(x, only_4k=True)


# ---------------------------------------------------------------- driving a VM


class Driver:
    """One VM: a vCPU (worker 0) and the host (its own worker slot), in one process."""

    def __init__(self, config: VMConfig):
        self.vm = create_vm(config)
        c = self.vm.config
        self.config = c
        self.vcpu = Vcpu(self.vm, 0)
        self.host = Mmu(self.vm, c.host_worker)
        r = c.reclaimer_worker
        self.rcu = Rcu(self.vm.region, r)
        self.reclaim_pool = Pool(self.vm.region, r, c)
        self.data = self.vm.region.array("data")

    def close(self) -> None:
        self.vcpu = self.host = self.rcu = self.reclaim_pool = None      # drop views before unmapping
        self.data = None
        self.vm.__exit__(None, None, None)

    def guest(self, gfn: int, write: bool, value: int = 0) -> int | None:
        v = self.vcpu
        v.enter()
        try:
            if write:
                v.write(gfn, value)
                return None
            return v.read(gfn)
        finally:
            v.exit()

    def reclaim(self) -> int:
        return self.rcu.reclaim_pass(self.reclaim_pool.free)

    def publish(self) -> None:
        self.vcpu.mmu.publish_stats()
        self.host.publish_stats()


def apply(op: tuple, model: Model, drivers: list[Driver]) -> None:
    """Apply one operation to the model and to every driver, checking what each operation returns."""
    name = op[0]
    if name == "fault":
        _, gfn, write = op
        want = model.fault(gfn, write)
        for d in drivers:
            d.vcpu.mmu.kvm_mmu_reload()          # the guest entry before the EPT violation (a root to fault in)
            got = d.vcpu.mmu.page_fault(gfn, write)
            assert got == want, f"{op}: fault returned {got}, the model says {want}"
    elif name == "gwrite":
        _, gfn, value = op
        model.guest_access(gfn, True)
        model.mem[gfn] = value
        for d in drivers:
            d.guest(gfn, True, value)
    elif name == "gread":
        _, gfn = op
        model.guest_access(gfn, False)
        for d in drivers:
            got = d.guest(gfn, False)
            assert got == model.mem.get(gfn, 0), f"{op}: guest read {got:#x}, last written {model.mem.get(gfn, 0):#x}"
    elif name == "gbad":                       # outside every active slot: emulated (MMIO), touches nothing
        _, gfn, value = op
        for d in drivers:
            d.guest(gfn, True, value)
            assert d.guest(gfn, False) == 0, f"{op}: an emulated read returned data"
    elif name == "zap":
        _, s, e = op
        model.unmap_range(s, e)
        for d in drivers:
            d.host.zap_gfn_range_locked(s, e)
    elif name == "zap_all":
        model.mapped.clear()
        for d in drivers:
            d.host.zap_all()
    elif name == "unmap":
        _, s, e = op
        model.host_unmap(s, e)
        for d in drivers:
            d.host.host_unmap(s, e)
    elif name == "delete":
        _, k = op
        model.mapped.clear()             # kvm_mmu_zap_all_fast: every root invalidated and zapped (5.13)
        model.active[k] = False
        for d in drivers:
            d.host.delete_memslot(k)
    elif name == "add":
        _, k = op
        model.active[k] = True
        model.logging[k] = False
        for d in drivers:
            d.host.add_memslot(k)
    elif name == "log_on":
        _, k = op
        model.enable_logging(k)
        for d in drivers:
            d.host.enable_dirty_logging(k)
    elif name == "log_off":
        _, k = op
        model.disable_logging(k)
        for d in drivers:
            d.host.disable_dirty_logging(k)
    elif name == "get_log":
        _, k, clear = op
        want = model.dirty_words(k)
        if clear:
            model.harvest(k, set(model.dirty[k]))
        for d in drivers:
            got = d.host.get_dirty_log(k, clear=clear)
            assert np.array_equal(got, want), f"{op}: dirty log {got}, the model says {want}"
    elif name == "clear_log":
        _, k, first, words = op
        m = model.slots[k]
        asked = {m.base_gfn + first + 64 * i + b for i, w in enumerate(words) for b in range(64) if w >> b & 1}
        hit = asked & model.dirty[k]
        model.harvest(k, hit)
        for d in drivers:
            got = d.host.clear_dirty_log(k, first, np.array(words, dtype=np.uint64))
            assert got == len(hit), f"{op}: cleared {got} bits, the model says {len(hit)}"
    elif name == "reclaim":
        for d in drivers:
            d.reclaim()
            assert checks.retired_count(d.vm) == 0, "a reclaim pass with no reader left tables retired"
    else:
        raise ValueError(op)


def verify(model: Model, d: Driver) -> None:
    """After a step: the tables say exactly what the model says, guest memory too, and every invariant holds."""
    d.publish()
    snap = checks.snapshot(d.vm)
    problems = checks.check_all(snap)
    assert not problems, "\n".join(map(str, problems))
    leaves = checks.leaves_by_gfn(snap)
    assert set(leaves) == set(model.mapped), (
        f"mapped only in the tables: {sorted(set(leaves) - set(model.mapped))[:10]}, "
        f"only in the model: {sorted(set(model.mapped) - set(leaves))[:10]}")
    for gfn, mp in model.mapped.items():
        leaf = leaves[gfn]
        assert leaf.level == mp.level, f"gfn {gfn:#x}: level {leaf.level}, the model says {mp.level}"
        assert leaf.pfn == model.host_page(gfn), f"gfn {gfn:#x}: host page {leaf.pfn:#x}, want {model.host_page(gfn):#x}"
        assert bool(leaf.flags & S.WRITABLE) == mp.writable, f"gfn {gfn:#x}: W {leaf.flags & S.WRITABLE}, model {mp.writable}"
    # the host's own page table and guest memory
    for k, m in enumerate(model.slots):
        hm = snap.host_map[model.areas[k][0]: model.areas[k][0] + m.npages].astype(np.int64)
        want = np.array([model.host_page(x) for x in range(m.base_gfn, m.base_gfn + m.npages)])
        assert np.array_equal(hm, want), f"slot {k}: host map differs from the host's migrations"
        vals = d.data[want]
        exp = np.array([model.mem.get(x, 0) for x in range(m.base_gfn, m.base_gfn + m.npages)], dtype=np.uint64)
        assert np.array_equal(vals, exp), f"slot {k}: guest memory differs at {np.flatnonzero(vals != exp)[:8]}"
        assert not (vals == np.uint64(DATA_POISON)).any()
    vs = violations.read_all(d.vm.region)
    assert not vs, "\n".join(map(str, vs))


# ---------------------------------------------------------------- operation streams


def random_gfn(model: Model, rng: random.Random) -> int:
    """Mostly GFNs inside a slot (deleted ones included), sometimes anywhere the root maps."""
    if rng.random() < 0.05:
        return rng.randrange(min(model.g.max_gfn, 1 << 14))
    m = rng.choice(model.slots)
    return m.base_gfn + rng.randrange(m.npages)


def random_range(model: Model, rng: random.Random) -> tuple[int, int]:
    s = random_gfn(model, rng)
    n = rng.choice([1, 2, 7, model.g.entries, model.g.entries * 3, model.g.pages(3) + 5])
    return s, s + n


OP_WEIGHTS = {"fault": 22, "guest": 26, "zap": 8, "unmap": 6, "zap_all": 1, "slot": 1, "log_on": 5,
              "get_log": 8, "clear_log": 4, "log_off": 4, "reclaim": 5}


def random_op(model: Model, rng: random.Random, step: int) -> tuple:
    n = len(model.slots)
    active = [k for k in range(n) if model.active[k]]
    logging = [k for k in active if model.logging[k]]
    quiet = [k for k in active if not model.logging[k]]
    kinds = [k for k in OP_WEIGHTS if k not in (("get_log", "clear_log", "log_off") if not logging else ())
             and not (k == "log_on" and not quiet)]
    kind = rng.choices(kinds, [OP_WEIGHTS[k] for k in kinds])[0]
    if kind == "fault":
        return ("fault", random_gfn(model, rng), rng.random() < 0.5)
    if kind == "guest":
        gfn = random_gfn(model, rng)
        if model.slot_of(gfn) is None:
            return ("gbad", gfn, step)
        if rng.random() < 0.6:
            return ("gwrite", gfn, (step << 20) | gfn)
        return ("gread", gfn)
    if kind in ("zap", "unmap"):
        return (kind, *random_range(model, rng))
    if kind == "zap_all":
        return ("zap_all",)
    if kind == "slot":
        inactive = [k for k in range(n) if not model.active[k]]
        if inactive and (rng.random() < 0.9 or not active):
            return ("add", rng.choice(inactive))
        return ("delete", rng.choice(active))
    if kind == "log_on":
        return ("log_on", rng.choice(quiet))
    if kind == "get_log":
        return ("get_log", rng.choice(logging), rng.random() < 0.8)
    if kind == "clear_log":
        k = rng.choice(logging)
        nwords = -(-model.slots[k].npages // 64)
        first_word = rng.randrange(nwords)
        words = [rng.getrandbits(64) for _ in range(rng.randrange(1, nwords - first_word + 1))]
        return ("clear_log", k, 64 * first_word, words)
    if kind == "log_off":
        return ("log_off", rng.choice(logging))
    return ("reclaim",)


def run_sequence(bits: int, backing: int, seed: int, steps: int) -> None:
    """One seeded stream on a shared and an exclusive VM in lockstep; both must match the model and each other."""
    rng = random.Random(seed)
    base = make_config(bits, backing, "shared")
    model = Model(base)
    drivers = []
    try:
        for mode in ("shared", "exclusive"):
            drivers.append(Driver(VMConfig.from_json({**base.to_json(), "lock_mode": mode,
                                                      "name": new_vm_name(f"m{mode[0]}")})))
        for step in range(steps):
            op = random_op(model, rng, step)
            try:
                apply(op, model, drivers)
                for d in drivers:
                    verify(model, d)
                a, b = (checks.leaves_by_gfn(d.vm) for d in drivers)
                assert a == b, "shared and exclusive mode tables differ"
            except AssertionError as e:
                raise AssertionError(f"bits={bits} backing={backing} seed={seed} step {step} op {op}: {e}") from None
    finally:
        for d in drivers:
            d.close()


@pytest.mark.parametrize("bits", [3, 9])
@pytest.mark.parametrize("backing", [1, 2])
def test_model_random_sequences(bits: int, backing: int) -> None:
    for seed in range(6):
        run_sequence(bits, backing, seed=1000 * bits + 10 * backing + seed, steps=300)


# ---------------------------------------------------------------- regressions found by the model


def test_two_memslots_create(vm_name: str) -> None:
    """init_memslots set up only one slot (a `del` inside its loop raised on the second)."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 16, 1), MemslotSpec(64, 8, 1)])
    with create_vm(cfg) as vm:
        assert [s.base_gfn for s in Mmu(vm, vm.config.host_worker).slots.slots()] == [0, 64]


def test_mmu_uses_its_own_worker_slot(vm_name: str) -> None:
    """An Mmu for the host worker on a VM attached as another worker takes the host's lock record, RCU slot
    and memory cache, not the attachment's (they used to be the vCPU's: two caches over one slot)."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)])
    with create_vm(cfg, worker=0) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, vm.config.host_worker)
        assert host.pool.worker == host.rcu.worker == host.lock.worker == vm.config.host_worker
        assert v.mmu.pool.worker == 0
        host.page_fault(3, True)
        v.enter()
        v.write(5, 1)
        v.exit()
        v.mmu.publish_stats()
        host.publish_stats()
        assert checks.check_all(vm) == []


def test_host_unmap_moves_whole_backing_pages(vm_name: str) -> None:
    """Migrating part of a 2M-backed range moves the whole host page: a 4K leaf elsewhere in it must be zapped.

    Before the fix host_unmap zapped only [start, end) but migrated whole backing
    pages, leaving gfn 13 mapped to a poisoned host page.
    """
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(8, 72, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, vm.config.host_worker)
        host.enable_dirty_logging(0)                 # 4K mappings inside a 2M host page
        v.enter()
        v.write(9, 1)
        v.write(13, 2)
        v.exit()
        host.host_unmap(9, 10)
        assert checks.check_leaf_pfns(vm) == []
        v.enter()
        assert v.read(13) == 2
        v.exit()


def test_enabling_dirty_logging_starts_with_an_empty_bitmap(vm_name: str) -> None:
    """Bits from an earlier logging period are not reported again (KVM allocates a zeroed bitmap)."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, vm.config.host_worker)
        host.enable_dirty_logging(0)
        v.enter()
        v.write(3, 1)
        v.exit()
        host.disable_dirty_logging(0)
        host.enable_dirty_logging(0)
        assert int(host.get_dirty_log(0)[0]) == 0


@pytest.mark.parametrize("nx", [False, True])
def test_fault_leaf_template_is_make_spte(vm_name: str, nx: bool) -> None:
    """The fault path ORs the page into a per-level template; that must be exactly spte.make_leaf."""
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=9, memslots=[MemslotSpec(0, 512, 1)], nx_huge_pages=nx)
    with create_vm(cfg) as vm:
        mmu = Mmu(vm, vm.config.host_worker)
        for level in (1, 2, 3):
            for pfn in (0, 1, 512, 0x12345 << 9, (1 << 40) - 512):
                pfn &= ~((1 << (9 * (level - 1))) - 1)
                want = S.make_leaf(pfn, level, writable=True, exec_ok=not (nx and level > 1))
                assert mmu.map.leaf_template[level] | (pfn << S.PFN_SHIFT) == want


# ---------------------------------------------------------------- the same operations as a state machine


class _MmuStateMachine(RuleBasedStateMachine):
    """Hypothesis drives the operations; on failure it shrinks to a short sequence."""

    bits = 3
    backing = 2

    def __init__(self) -> None:
        super().__init__()
        base = make_config(self.bits, self.backing, "shared", "hyp")
        self.model = Model(base)
        self.drivers = [Driver(VMConfig.from_json({**base.to_json(), "lock_mode": mode,
                                                   "name": new_vm_name(f"h{mode[0]}")}))
                        for mode in ("shared", "exclusive")]
        self.step = 0

    def teardown(self) -> None:
        for d in self.drivers:
            d.close()

    def _gfn(self, data) -> int:
        m = data.draw(st.sampled_from(self.model.slots))
        return m.base_gfn + data.draw(st.integers(0, m.npages - 1))

    def _do(self, op: tuple) -> None:
        self.step += 1
        apply(op, self.model, self.drivers)

    @rule(data=st.data(), write=st.booleans())
    def fault(self, data, write: bool) -> None:
        self._do(("fault", self._gfn(data), write))

    @rule(data=st.data(), write=st.booleans())
    def guest(self, data, write: bool) -> None:
        gfn = self._gfn(data)
        if self.model.slot_of(gfn) is None:
            self._do(("gbad", gfn, self.step))
        elif write:
            self._do(("gwrite", gfn, (self.step << 20) | gfn))
        else:
            self._do(("gread", gfn))

    @rule(data=st.data(), n=st.sampled_from([1, 3, 8, 70]), unmap=st.booleans())
    def zap(self, data, n: int, unmap: bool) -> None:
        s = self._gfn(data)
        self._do(("unmap" if unmap else "zap", s, s + n))

    @rule(k=st.integers(0, 2))
    def toggle_slot(self, k: int) -> None:
        self._do(("delete", k) if self.model.active[k] else ("add", k))

    @rule(k=st.integers(0, 2))
    def toggle_logging(self, k: int) -> None:
        if self.model.active[k]:
            self._do(("log_off", k) if self.model.logging[k] else ("log_on", k))

    @rule(k=st.integers(0, 2), clear=st.booleans())
    def get_log(self, k: int, clear: bool) -> None:
        if self.model.active[k] and self.model.logging[k]:
            self._do(("get_log", k, clear))

    @rule()
    def reclaim(self) -> None:
        self._do(("reclaim",))

    @invariant()
    def agrees(self) -> None:
        for d in self.drivers:
            verify(self.model, d)
        a, b = (checks.leaves_by_gfn(d.vm) for d in self.drivers)
        assert a == b, "shared and exclusive mode tables differ"


TestMmuStateMachine = _MmuStateMachine.TestCase
TestMmuStateMachine.settings = settings(max_examples=25, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


def _leaf_writable(mmu: Mmu, start: int, end: int) -> dict[int, tuple[int, bool]]:
    """Present leaves of [start, end): first GFN -> (level, writable)."""
    from shmmmu.tdp_iter import for_each_leaf
    return {it.gfn: (it.level, bool(it.old_spte & S.WRITABLE)) for it in for_each_leaf(mmu.new_iter(mmu.valid_root(), 1, start), end)}


@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
def test_initially_set_protects_only_huge_leaves_at_enable(vm_name: str, lock_mode: str) -> None:
    """5.12 kvm_mmu_slot_apply_flags(): with KVM_DIRTY_LOG_INITIALLY_SET, enabling logging write-protects
    leaves of 2M and up only; 4K pages stay writable (reported dirty already) until CLEAR_DIRTY_LOG.

    Before the fix every 4K leaf was protected at enable as well, so the selftest's
    first dirty iteration faulted on every page instead of on none.
    """
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, lock_mode=lock_mode,
                   memslots=[MemslotSpec(0, 64, 1), MemslotSpec(64, 64, 2)])
    with create_vm(cfg) as vm:
        v = Vcpu(vm, 0)
        host = Mmu(vm, vm.config.host_worker)
        v.enter()
        for g in range(128):
            v.write(g, 1)
        v.exit()
        before = _leaf_writable(host, 0, 128)
        assert {lv for lv, _ in before.values()} == {1, 2} and all(w for _, w in before.values())
        assert host.enable_dirty_logging(0, initially_set=True) == 0          # 64 4K leaves: none protected
        assert host.enable_dirty_logging(1, initially_set=True) == 8          # 8 2M leaves (bits=3): protected
        after = _leaf_writable(host, 0, 128)
        assert all(w for g, (lv, w) in after.items() if g < 64)
        assert not any(w for g, (lv, w) in after.items() if g >= 64)
        bitmap = host.get_dirty_log(0, clear=False)
        assert int(bitmap[0]) == (1 << 64) - 1                                # every page reported
        assert host.clear_dirty_log(0, 0, bitmap) == 64
        assert not any(w for g, (lv, w) in _leaf_writable(host, 0, 64).items())
        from shmmmu.layout import STAT
        faults = v.mmu.st[STAT["faults"]]
        v.enter()
        v.write(5, 2)                                                         # protected now: faults, logs
        v.exit()
        assert v.mmu.st[STAT["faults"]] == faults + 1
        assert int(host.get_dirty_log(0, clear=False)[0]) == 1 << 5
        host.disable_dirty_logging(0)
        host.disable_dirty_logging(1)
        v.mmu.publish_stats()
        host.publish_stats()
        assert checks.check_all(vm) == []
