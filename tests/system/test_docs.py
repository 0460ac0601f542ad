"""The documentation agrees with the code: the "which kernel" table of docs/internals.md names every bug switch and
the commit each one reverts, every kernel commit id the tree cites is in docs/reference/commits.md's verified list
(tools/check_commits.py), and every captured output (tools/capture_docs.py) has the shape the code prints."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shmmmu.variants import BUGS

ROOT = Path(__file__).resolve().parents[2]


def _which_kernel() -> str:
    text = (ROOT / "docs" / "internals.md").read_text()
    start = text.index("## Which kernel")
    return text[start: text.index("\n## ", start + 1)]


def test_the_which_kernel_table_names_every_switch_and_its_commit() -> None:
    table = _which_kernel()
    for b in BUGS.values():
        for sha in re.findall(r"\b[0-9a-f]{12}\b", b.reverts()):
            assert sha in table, f"{b.name} reverts {sha}, which the table does not name"
        if re.search(r"\b[0-9a-f]{12}\b", b.reverts()):
            assert f"`{b.name}`" in table, f"the switch {b.name} is not in the table"


def test_the_per_profile_tables_are_generated_from_the_variant_table() -> None:
    """docs/internals.md's per-profile tables are tools/variant_tables.py's output, and the check fails on a
    table edited by hand."""
    tool = [sys.executable, str(ROOT / "tools" / "variant_tables.py")]
    r = subprocess.run([*tool, "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("mmu-seq-int-snapshot", "fast-page-fault", "eager-page-split"):
        assert f"`{name}`" in (ROOT / "docs" / "internals.md").read_text()


def test_the_variant_table_check_fails_on_a_hand_edit(tmp_path: Path) -> None:
    doc = tmp_path / "internals.md"
    doc.write_text((ROOT / "docs" / "internals.md").read_text().replace("`mmu-seq-int-snapshot` | B10", "`x` | B10"))
    tool = [sys.executable, str(ROOT / "tools" / "variant_tables.py")]
    r = subprocess.run([*tool, "--check", str(doc)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "differ" in r.stdout
    r = subprocess.run([*tool, "--check", str(tmp_path / "none.md")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_the_table_covers_every_area_the_issue_names() -> None:
    table = _which_kernel().lower()
    for area in ("fault path", "teardown", "iterator restart", "zap range", "zap all", "collapsible zaps",
                 "write protection", "mmu notifier", "memslot deletion", "nx huge pages", "tlb flushes",
                 "page accounting", "roots"):
        assert area in table, area


# ---------------------------------------------------------------- cited commit ids (docs/reference/commits.md)

COMMITS_TOOL = ROOT / "tools" / "check_commits.py"


def _check_commits(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMMITS_TOOL), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
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
# ----------------------------------------------------------------------------- captured outputs (issue 21)

CAPTURE_TOOL = ROOT / "tools" / "capture_docs.py"
CONVERTED = ["README.md", "docs/cli.md", "docs/trace.md", "docs/stress.md", "docs/locks.md", "docs/campaign.md"]
FENCE = re.compile(r"^(```+|~~~+)")


# the tool's sessions started by this test run are named under this root, so the leak checks below count only
# them (another capture run on the machine has its own)
DOC_ROOT = f"shmmmu_doc{os.getpid()}t"


def _tool(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """tools/capture_docs.py as a user runs it, with this Python (whose bin directory holds the shmmmu it runs)."""
    return subprocess.run([sys.executable, str(CAPTURE_TOOL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, SHMMMU_DOC_PREFIX=DOC_ROOT))


def _tool_objects() -> set[str]:
    """What this run's tool sessions (prefix DOC_ROOT) hold in /dev/shm and the temporary directory."""
    import tempfile
    found = {f"/dev/shm/{e}" for e in os.listdir("/dev/shm") if e.startswith((DOC_ROOT, "sem." + DOC_ROOT))}
    tmp = tempfile.gettempdir()
    return found | {os.path.join(tmp, e) for e in os.listdir(tmp) if e.startswith(DOC_ROOT)}


def _fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, the line above it, the first line inside) of every fenced block."""
    lines = path.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != m.group(1):
                j += 1
            out.append((i + 1, lines[i - 1] if i else "", lines[i + 1] if i + 1 < len(lines) else ""))
            i = j + 1
        else:
            i += 1
    return out


def test_the_tool_lists_every_owned_block_and_every_block_of_commands_is_owned_or_says_why_not() -> None:
    res = _tool("--list", *CONVERTED)
    assert res.returncode == 0, res.stderr
    listed = {doc: int(m) for doc, m in re.findall(r"^(\S+): (\d+) blocks$", res.stdout, re.M)}
    for doc in CONVERTED:
        blocks = _fenced_blocks(ROOT / doc)
        owned = [b for b in blocks if b[1].startswith("<!-- capture")]
        assert owned, f"{doc} has no owned block"
        assert listed.get(doc) == len(owned), (doc, listed.get(doc), len(owned), res.stdout)
        for line, above, first in blocks:
            if first.startswith("$ "):
                assert above.startswith(("<!-- capture", "<!-- not captured:")), \
                    f"{doc}:{line}: a block of commands that is neither captured nor marked `not captured: WHY`"
    # the stale captures issue 21 names are owned now: cli.md's default run and inspect summary, the README's stress
    for doc, cmd in (("docs/cli.md", '$ /usr/bin/time -f "real %es" shmmmu run --name docdefault'),
                     ("docs/cli.md", "$ shmmmu inspect docvm"),
                     ("README.md", "$ shmmmu stress --duration 4 --vcpus 3 --bug rcu-free-immediately --seed 2")):
        above = [a for _, a, first in _fenced_blocks(ROOT / doc) if first == cmd]
        assert above and above[0].startswith("<!-- capture"), (doc, cmd)
    assert "nx_lock" not in (ROOT / "docs" / "cli.md").read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    doc = tmp_path / "bad.md"
    doc.write_text("<!-- capture kep=\"1\" -->\n```\n$ true\n```\n")
    res = _tool("--check", str(doc))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown marker option 'kep=1'" in res.stderr, res
    doc.write_text("<!-- capture -->\n```\n$ true\n")
    res = _tool(str(doc))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "never closed" in res.stderr, res
    res = _tool("--check", str(tmp_path / "missing.md"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cannot read" in res.stderr, res


def test_check_passes_on_the_same_shape_and_fails_on_a_changed_one(tmp_path: Path) -> None:
    """One cheap block, regenerated, then edited: a number changed passes --check; a word changed or a line
    missing fails it with a diff of the shapes."""
    before = _tool_objects()
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n\n<!-- capture -->\n```\n$ shmmmu run --name docsmall -b 8M -i 2\n```\n")
    res = _tool(str(doc))
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert "│ faults " in text and "\nSUCCESS\n" in text, text
    assert _tool("--check", str(doc)).returncode == 0

    faults = re.search(r"│ faults +│ +(\d+) │", text)
    assert faults, text
    doc.write_text(text.replace(faults.group(0), faults.group(0).replace(faults.group(1),
                                                                        str(int(faults.group(1)) + 7))))
    res = _tool("--check", str(doc))
    assert res.returncode == 0, res.stdout + res.stderr

    doc.write_text(text.replace("\nSUCCESS\n", "\nFAILURE\n"))
    res = _tool("--check", str(doc))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "-FAILURE" in res.stdout and "+SUCCESS" in res.stdout and "1 differ" in res.stdout, res.stdout

    doc.write_text(re.sub(r"\n│ CAS failures .*", "", text))
    res = _tool("--check", str(doc))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "+│ CAS failures │ <n> │" in res.stdout, res.stdout
    assert _tool_objects() <= before, "the tool left objects of its session behind"


@pytest.mark.slow
@pytest.mark.skipif(any(shutil.which(p) is None for p in ("jq", "valgrind", "/usr/bin/time")),
                    reason="the captured commands use jq, valgrind and /usr/bin/time")
def test_every_captured_block_of_the_converted_docs_has_the_shape_the_code_prints() -> None:
    """`tools/capture_docs.py --check` on README.md, docs/cli.md, docs/trace.md, docs/stress.md,
    docs/locks.md and docs/campaign.md: every owned block rerun, its output's shape compared.  2-3 minutes
    on the 2-core development machine (Intel Xeon, 2 CPUs) without campaign.md: 125 s at a load average of
    3-5, 173 s at about 6; campaign.md's three campaigns add 102 s at a load average of about 6."""
    before = _tool_objects()
    res = _tool("--check", *CONVERTED, timeout=1800)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr
    assert _tool_objects() <= before, "the tool left objects of its session behind"
