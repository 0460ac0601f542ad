"""The documentation agrees with the code: the "which kernel" table of docs/internals.md names every bug switch and
the commit each one reverts, and every kernel commit id the tree cites is in docs/reference/commits.md's verified list
(tools/check_commits.py)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from shmmmu.bugs import BUGS

ROOT = Path(__file__).resolve().parent.parent


def _which_kernel() -> str:
    text = (ROOT / "docs" / "internals.md").read_text()
    start = text.index("## Which kernel")
    return text[start: text.index("\n## ", start + 1)]


def test_the_which_kernel_table_names_every_switch_and_its_commit() -> None:
    table = _which_kernel()
    for b in BUGS.values():
        for sha in re.findall(r"\b[0-9a-f]{12}\b", b.reverts):
            assert sha in table, f"{b.name} reverts {sha}, which the table does not name"
        if re.search(r"\b[0-9a-f]{12}\b", b.reverts):
            assert f"`{b.name}`" in table, f"the switch {b.name} is not in the table"


def test_the_table_covers_every_area_the_issue_names() -> None:
    table = _which_kernel().lower()
    for area in ("fault path", "teardown", "iterator restart", "zap range", "zap all", "collapsible zaps",
                 "write protection", "mmu notifier", "memslot deletion", "nx huge pages", "tlb flushes",
                 "page accounting", "roots"):
        assert area in table, area


# ---------------------------------------------------------------- cited commit ids (docs/reference/commits.md)

TOOL = ROOT / "tools" / "check_commits.py"


def _check_commits(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_every_cited_commit_id_is_in_the_verified_list() -> None:
    r = _check_commits()
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_commits_fails_on_an_unlisted_id(tmp_path: Path) -> None:
    unlisted = "f" * 6 + "0" * 6                # built here, so this file cites no unlisted id itself
    listed = "9a77daacc87d"                   # in the verified list
    assert unlisted not in (ROOT / "docs" / "reference" / "commits.md").read_text()
    doc = tmp_path / "docs" / "note.md"
    doc.parent.mkdir()
    doc.write_text(f"# A note\n\nThe map path went atomic in {listed}.\nSomething was fixed by {unlisted}.\n"
                   f"A short form: {unlisted[:9]}; a number 800000000000; a word deadbeefcafe.\n")
    r = _check_commits(doc)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith(f"{doc}:4: {unlisted}: not in the verified list"), lines[0]
    assert lines[1].startswith(f"{doc}:5: {unlisted[:9]}: 9 hex digits"), lines[1]
    # a folder is taken as a tree: its docs are checked, the copies of outside documents are not
    copy = tmp_path / "docs" / "reference" / "KVM_TDP_MMU.md"
    copy.parent.mkdir()
    copy.write_text(f"cites {unlisted}\n")
    r = _check_commits(tmp_path)
    assert r.returncode == 1 and str(doc) in r.stdout and str(copy) not in r.stdout, r.stdout
    doc.write_text(f"Only {listed}.\n")
    assert _check_commits(tmp_path).returncode == 0


def test_check_commits_refuses_a_list_row_without_its_source(tmp_path: Path) -> None:
    bad = tmp_path / "commits.md"
    bad.write_text("## Verified\n\n| id | subject | shipped in | read beside its subject in |\n|---|---|---|---|\n"
                   "| `9a77daacc87d` | KVM: x86/mmu: Use atomic ops to set SPTEs in TDP MMU map | 5.12 |  |\n")
    r = _check_commits("--list", bad)
    assert r.returncode == 2 and "lacks its subject, release or source" in r.stderr
