"""The documentation agrees with the code: the "which kernel" table of docs/internals.md names every bug switch and
the commit each one reverts."""
from __future__ import annotations

import re
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
