"""The table pool: initial free stack, per-worker caches (topup/alloc/unalloc), freeing with poison, recovery."""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import pytest

from shmmmu.layout import Ctl, NIL, ROOT_TABLE, TMeta, TableState, VMConfig
from shmmmu.pool import POISON, Pool, PoolExhausted
from shmmmu.region import Region
from shmmmu.torture import torture_config
from shmmmu.vm import create_region

N_TABLES = 48


def make(vm_name: str, debug: bool) -> Region:
    return create_region(torture_config(vm_name, 3, debug=debug, n_tables=N_TABLES))


@pytest.fixture(params=[False, True], ids=["plain", "debug"])
def region(vm_name: str, request: pytest.FixtureRequest) -> Iterator[Region]:
    with make(vm_name, request.param) as r:
        yield r


def pool_of(region: Region, worker: int) -> Pool:
    return Pool(region, worker, VMConfig.from_json(region.config))


def test_init_all_free(region: Region) -> None:
    p = pool_of(region, 0)
    p.init_all_free()
    assert p.free_count() == N_TABLES - 1
    tmeta = region.array("tmeta")
    # table 0 is never handed out (roots are pool tables a vCPU allocates): it is on no stack
    assert (tmeta[:, TMeta.STATE] == TableState.FREE).all() and (tmeta[:, TMeta.PARENT] == NIL).all()
    assert sorted(int(x) for x in region.array("pool")[:N_TABLES - 1]) == list(range(1, N_TABLES))
    assert (region.array("tables")[ROOT_TABLE] == 0).all()
    fill = POISON if p.debug else 0
    assert (region.array("tables")[1:] == fill).all()


def test_topup_alloc_unalloc(region: Region) -> None:
    p = pool_of(region, 1)
    p.init_all_free()
    p.topup()
    cap = p.capacity
    assert p.count == cap and p.free_count() == N_TABLES - 1 - cap
    cached = [int(x) for x in region.array("caches")[1, :cap]]
    tmeta = region.array("tmeta")
    assert all(tmeta[t, TMeta.STATE] == TableState.CACHED and tmeta[t, TMeta.OWNER] == 1 for t in cached)
    assert (region.array("tables")[cached] == 0).all()          # poison cleared when cached
    p.topup()                                                    # at or above the minimum: no-op
    assert p.count == cap and p.refills == 1
    t = p.alloc(2, 1024)
    assert t == cached[-1] and p.count == cap - 1
    assert tmeta[t, TMeta.STATE] == TableState.LIVE and tmeta[t, TMeta.LEVEL] == 2 and tmeta[t, TMeta.GFN] == 1024
    assert (region.array("tables")[t] == 0).all()
    p.unalloc(t)
    assert p.count == cap and tmeta[t, TMeta.STATE] == TableState.CACHED
    assert p.alloc(1, 0) == t


def test_alloc_from_an_empty_cache_raises(region: Region) -> None:
    p = pool_of(region, 0)
    p.init_all_free()
    with pytest.raises(PoolExhausted, match="topup"):
        p.alloc(1, 0)


def test_free_clears_or_poisons_and_bumps_the_generation(region: Region) -> None:
    p = pool_of(region, 0)
    p.init_all_free()
    p.topup()
    ts = [p.alloc(1, 0) for _ in range(3)]
    tables = region.array("tables")
    tables[ts] = 0x1234
    gens = [int(region.array("tmeta")[t, TMeta.GEN]) for t in ts]
    before = p.free_count()
    p.free(ts)
    assert p.free_count() == before + 3
    assert (tables[ts] == (POISON if p.debug else 0)).all()
    tmeta = region.array("tmeta")
    assert [int(tmeta[t, TMeta.GEN]) for t in ts] == [g + 1 for g in gens]
    assert all(tmeta[t, TMeta.STATE] == TableState.FREE for t in ts)
    p.free([])                                                   # nothing: no-op
    assert p.free_count() == before + 3


def test_topup_waits_then_raises_when_the_pool_is_empty(region: Region) -> None:
    p, q = pool_of(region, 0), pool_of(region, 1)
    p.init_all_free()
    region.words("ctl").store(Ctl.POOL_TOP, 0)                     # nothing free
    waits = []
    with pytest.raises(PoolExhausted, match="out of page tables"):
        q.topup(wait=0.05, on_wait=lambda: waits.append(1))
    assert waits


def test_topup_takes_what_reclamation_frees_meanwhile(region: Region) -> None:
    p, q = pool_of(region, 0), pool_of(region, 1)
    p.init_all_free()
    p.topup()
    ts = [p.alloc(1, 0) for _ in range(p.capacity)]
    region.words("ctl").store(Ctl.POOL_TOP, 0)
    freed = []

    def on_wait() -> None:                                       # the "reclaimer" frees while we wait
        if not freed:
            freed.extend(ts)
            p.free(ts)

    q.topup(wait=2.0, on_wait=on_wait)
    assert q.count == q.capacity and sorted(int(x) for x in region.array("caches")[1, :q.count]) == sorted(ts)


def test_recover_returns_a_dead_workers_cache(region: Region) -> None:
    p, sup = pool_of(region, 1), pool_of(region, 2)
    p.init_all_free()
    p.topup()
    free_before = p.free_count()
    assert sup.recover(1) == p.capacity
    assert sup.free_count() == free_before + p.capacity
    assert sup.recover(1) == 0


def test_concurrent_topup_alloc_free_never_hands_a_table_out_twice(vm_name: str) -> None:
    with make(vm_name, True) as region:
        pools = [pool_of(region, k) for k in range(3)]
        pools[0].init_all_free()
        owner = np.full(N_TABLES, -1)
        errors: list[str] = []
        lock = threading.Lock()

        def body(p: Pool) -> None:
            try:
                for _ in range(300):
                    p.topup(wait=5.0)
                    t = p.alloc(1, 0)
                    with lock:
                        if owner[t] != -1:
                            errors.append(f"table {t} handed to {p.worker} while {owner[t]} holds it")
                        owner[t] = p.worker
                    with lock:
                        owner[t] = -1
                    p.free([t])
            except Exception as e:          # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=body, args=(p,)) for p in pools]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        total = pools[0].free_count() + sum(p.count for p in pools)
        assert total == N_TABLES - 1
