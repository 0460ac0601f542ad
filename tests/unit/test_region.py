"""The shared region: create, attach (here and from another process), header checks, names, modes, cleanup."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import posix_ipc
import pytest

from shmmmu import region as R
from shmmmu.region import Region, RegionError

SHAPES = {"tables": (4, 8), "data": (16,), "empty": (0,)}
CONFIG = {"vcpus": 2, "note": "test"}
SEMS = ["mmu", "pages"]


def seg_path(name: str) -> Path:
    return Path("/dev/shm") / R.segment_name(name).lstrip("/")


def sem_path(name: str, purpose: str) -> Path:
    return Path("/dev/shm") / ("sem." + R.semaphore_name(name, purpose).lstrip("/"))


@pytest.fixture
def region(vm_name: str) -> Iterator[Region]:
    with Region.create(vm_name, SHAPES, CONFIG, SEMS) as r:
        yield r


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- create / attach / unlink


def test_create_layout(region: Region, vm_name: str) -> None:
    assert seg_path(vm_name).exists()
    for p in SEMS:
        assert sem_path(vm_name, p).exists()
    assert region.config == CONFIG
    assert region.creator_pid == os.getpid()
    assert region.size == os.stat(seg_path(vm_name)).st_size
    assert region.array("tables").shape == (4, 8)
    assert region.array("data").shape == (16,)
    assert region.array("empty").shape == (0,)
    for name in SHAPES:
        a = region.array(name)
        assert a.dtype == np.uint64 and not a.any()
        assert region.sections[name].offset % R.SECTION_ALIGN == 0
        assert region.sections[name].offset >= R.HEADER_BYTES
    # sections do not overlap
    spans = sorted((s.offset, s.offset + s.nbytes) for s in region.sections.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert vm_name in R.list_names()
    lines = list(region.layout_lines())
    assert vm_name in lines[0]
    assert sum("semaphore" in line for line in lines) == len(SEMS)


def test_words_and_array_share_memory(region: Region) -> None:
    w = region.words("tables")
    assert w.n == 32
    w.store(9, 77)
    assert int(region.array("tables")[1, 1]) == 77
    region.array("data")[3] = 5
    assert region.words("data").load(3) == 5


def test_attach_in_process(region: Region, vm_name: str) -> None:
    other = Region.attach(vm_name)
    try:
        assert other.owner is False
        assert other.config == CONFIG
        assert other.sections == region.sections
        other.words("data").store(0, 1234)
        assert int(region.array("data")[0]) == 1234
    finally:
        other.close()
    assert seg_path(vm_name).exists()       # closing an attachment does not unlink


def test_attach_readonly(region: Region, vm_name: str) -> None:
    ro = Region.attach(vm_name, readonly=True)
    try:
        region.array("data")[2] = 9
        assert int(ro.array("data")[2]) == 9
        assert not ro.array("data").flags.writeable
        assert ro.words("data").readonly
        with pytest.raises(PermissionError):
            ro.words("data").store(2, 1)
        with pytest.raises(ValueError):
            ro.array("data")[2] = 1
    finally:
        ro.close()


ATTACH_CHILD = """
    import json, sys
    from shmmmu.region import Region
    r = Region.attach(sys.argv[1])
    w = r.words("data")
    seen = w.load(0)
    w.store(1, seen * 2)
    w.fetch_add(2, 5)
    s = r.semaphore("mmu")
    s.release()
    print(json.dumps({"config": r.config, "seen": seen, "pid": r.creator_pid}))
    r.close()
"""


def test_attach_from_another_process(region: Region, vm_name: str) -> None:
    region.words("data").store(0, 21)
    res = run_child(ATTACH_CHILD, vm_name)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == {"config": CONFIG, "seen": 21, "pid": os.getpid()}
    assert region.words("data").load(1) == 42
    assert region.words("data").load(2) == 5
    region.semaphore("mmu").acquire(5)          # the child's release is visible here


def test_attach_missing_fails(vm_name: str) -> None:
    with pytest.raises(RegionError, match="no VM named"):
        Region.attach(vm_name)


def test_attach_missing_from_another_process_is_one_clear_error(vm_name: str) -> None:
    res = run_child("""
        import sys
        from shmmmu.region import Region, RegionError
        try:
            Region.attach(sys.argv[1])
        except RegionError as e:
            print(e)
    """, vm_name)
    assert res.returncode == 0, res.stderr
    assert vm_name in res.stdout and "no VM named" in res.stdout


def test_double_create_fails(region: Region, vm_name: str) -> None:
    region.array("data")[0] = 3
    with pytest.raises(RegionError, match="already exists"):
        Region.create(vm_name, SHAPES, CONFIG, SEMS)
    assert int(region.array("data")[0]) == 3     # the first one is untouched
    assert seg_path(vm_name).exists()


def test_create_replace(vm_name: str) -> None:
    first = Region.create(vm_name, SHAPES, {"gen": 1}, SEMS + ["old-only"])
    try:
        first.array("data")[0] = 11
        second = Region.create(vm_name, {"data": (4,)}, {"gen": 2}, SEMS, replace=True)
        try:
            assert not sem_path(vm_name, "old-only").exists()   # the old VM's semaphores went too
            fresh = Region.attach(vm_name)
            try:
                assert fresh.config == {"gen": 2}
                assert fresh.array("data").shape == (4,)
                assert int(fresh.array("data")[0]) == 0
            finally:
                fresh.close()
            assert int(first.array("data")[0]) == 11   # old mapping stays, detached from the name
        finally:
            second.close()
            second.unlink()
    finally:
        first.close()
        R.unlink_all(vm_name, SEMS + ["old-only"])


def test_context_manager_unlinks_on_exception(vm_name: str) -> None:
    with pytest.raises(ZeroDivisionError):
        with Region.create(vm_name, SHAPES, CONFIG, SEMS) as r:
            assert seg_path(vm_name).exists()
            r.array("data")[0] = 1
            1 / 0
    assert not seg_path(vm_name).exists()
    for p in SEMS:
        assert not sem_path(vm_name, p).exists()
    with pytest.raises(RegionError):
        Region.attach(vm_name)


def test_attached_context_manager_does_not_unlink(region: Region, vm_name: str) -> None:
    with Region.attach(vm_name) as other:
        assert other.config == CONFIG
    assert seg_path(vm_name).exists()


def test_close_then_use(vm_name: str) -> None:
    r = Region.create(vm_name, SHAPES, CONFIG)
    try:
        r.close()
        r.close()                                   # twice is fine
        with pytest.raises(RegionError, match="closed"):
            r.array("data")
    finally:
        r.unlink()


def test_close_with_a_view_still_held(vm_name: str) -> None:
    with Region.create(vm_name, SHAPES, CONFIG) as r:
        view = r.array("data")
        r.close()                                   # must not raise although `view` pins the mapping
        view[0] = 1
        assert int(view[0]) == 1


def test_unlink_all_reports_and_removes(vm_name: str) -> None:
    r = Region.create(vm_name, SHAPES, CONFIG, SEMS)
    r.close()
    try:
        gone = R.unlink_all(vm_name)                # purposes read from the header
        assert set(gone) == {R.segment_name(vm_name)} | {R.semaphore_name(vm_name, p) for p in SEMS}
        assert vm_name not in R.list_names()
        assert R.unlink_all(vm_name) == []
    finally:
        R.unlink_all(vm_name, SEMS)


def test_unlink_all_catches_semaphores_without_a_segment(vm_name: str) -> None:
    s = posix_ipc.Semaphore(R.semaphore_name(vm_name, "orphan"), posix_ipc.O_CREX, mode=0o600)
    s.close()
    try:
        assert R.unlink_all(vm_name) == [R.semaphore_name(vm_name, "orphan")]
        assert not sem_path(vm_name, "orphan").exists()
    finally:
        R.unlink_all(vm_name, ["orphan"])


def test_unlink_all_spares_a_vm_whose_name_extends_this_one(vm_name: str) -> None:
    longer = vm_name + "-b"
    with Region.create(longer, SHAPES, CONFIG, SEMS):
        s = posix_ipc.Semaphore(R.semaphore_name(vm_name, "orphan"), posix_ipc.O_CREX, mode=0o600)
        s.close()
        try:
            R.unlink_all(vm_name)
            for p in SEMS:
                assert sem_path(longer, p).exists()
            assert seg_path(longer).exists()
            assert not sem_path(vm_name, "orphan").exists()
        finally:
            R.unlink_all(vm_name, ["orphan"])


def test_semaphore_lookup(region: Region) -> None:
    s = region.semaphore("pages")
    assert region.semaphore("pages") is s
    s.release()
    s.acquire(0)
    with pytest.raises(KeyError):
        region.semaphore("nope")


# ---------------------------------------------------------------- header validation


def _poke_header(r: Region, word: int, value: int) -> None:
    hdr = np.frombuffer(r.mm, dtype=np.uint64, count=8)
    hdr[word] = value
    del hdr


def test_corrupt_magic(region: Region, vm_name: str) -> None:
    _poke_header(region, R.H_MAGIC, 0x1234)
    with pytest.raises(RegionError, match="not a shmmmu region.*bad magic"):
        Region.attach(vm_name)
    with pytest.raises(RegionError, match="bad magic"):
        Region.attach(vm_name, readonly=True)


def test_other_layout_version(region: Region, vm_name: str) -> None:
    _poke_header(region, R.H_VERSION, R.LAYOUT_VERSION + 6)
    with pytest.raises(RegionError) as e:
        Region.attach(vm_name)
    msg = str(e.value)
    assert f"layout version {R.LAYOUT_VERSION + 6}" in msg
    assert f"reads version {R.LAYOUT_VERSION}" in msg
    assert vm_name in msg


@pytest.mark.parametrize("word, value", [(R.H_SIZE, 12345), (R.H_JSON_LEN, 0), (R.H_JSON_LEN, 1 << 40),
                                         (R.H_JSON_LEN, 3)])
def test_damaged_header(region: Region, vm_name: str, word: int, value: int) -> None:
    _poke_header(region, word, value)
    with pytest.raises(RegionError, match="damaged header"):
        Region.attach(vm_name)


def test_header_json_of_the_wrong_shape(region: Region, vm_name: str) -> None:
    blob = b"[1, 2, 3]"
    region.mm[R.H_JSON_OFFSET:R.H_JSON_OFFSET + len(blob)] = blob
    _poke_header(region, R.H_JSON_LEN, len(blob))
    with pytest.raises(RegionError, match="damaged header"):
        Region.attach(vm_name)


@pytest.mark.parametrize("size", [1, 4096, R.HEADER_BYTES - 8])
def test_too_small_foreign_segment(vm_name: str, size: int) -> None:
    shm = posix_ipc.SharedMemory(R.segment_name(vm_name), posix_ipc.O_CREX, mode=0o600, size=size)
    shm.close_fd()
    try:
        with pytest.raises(RegionError, match="not a shmmmu region.*too small"):
            Region.attach(vm_name)
    finally:
        posix_ipc.unlink_shared_memory(R.segment_name(vm_name))


def test_foreign_segment_of_header_size(vm_name: str) -> None:
    shm = posix_ipc.SharedMemory(R.segment_name(vm_name), posix_ipc.O_CREX, mode=0o600, size=R.HEADER_BYTES)
    shm.close_fd()
    try:
        with pytest.raises(RegionError, match="bad magic"):
            Region.attach(vm_name)
    finally:
        posix_ipc.unlink_shared_memory(R.segment_name(vm_name))


# ---------------------------------------------------------------- names and modes


BAD_NAMES = ["", "a/b", "/abs", "x" * 65, "has space", "dot.ted", "..", "ünï", "tab\t", None, 7]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names(bad: object) -> None:
    with pytest.raises(RegionError, match="invalid VM name"):
        Region.create(bad, SHAPES, CONFIG)  # type: ignore[arg-type]
    with pytest.raises(RegionError, match="invalid VM name"):
        Region.attach(bad)  # type: ignore[arg-type]


def test_longest_name_is_fine() -> None:
    name = f"n{os.getpid()}-".ljust(64, "z")
    with Region.create(name, SHAPES, CONFIG, SEMS) as r:
        assert r.name == name
        assert seg_path(name).exists()


def test_modes_are_0600_whatever_the_umask(vm_name: str) -> None:
    old = os.umask(0)
    try:
        with Region.create(vm_name, SHAPES, CONFIG, SEMS):
            assert os.stat(seg_path(vm_name)).st_mode & 0o777 == 0o600
            for p in SEMS:
                assert os.stat(sem_path(vm_name, p)).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_config_too_large_for_header(vm_name: str) -> None:
    with pytest.raises(RegionError, match="does not fit"):
        Region.create(vm_name, SHAPES, {"blob": "x" * R.HEADER_BYTES})
    assert not seg_path(vm_name).exists()


def test_negative_section_size(vm_name: str) -> None:
    with pytest.raises(RegionError, match="negative"):
        Region.create(vm_name, {"bad": (-1,)}, CONFIG)
    assert not seg_path(vm_name).exists()
