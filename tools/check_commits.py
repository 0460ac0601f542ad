#!/usr/bin/env python3
"""Check the kernel commit ids shmmmu cites against docs/reference/commits.md.

    python tools/check_commits.py            # the whole tree
    python tools/check_commits.py PATH ...   # these files, or the files under these folders

Every commit id in the code (shmmmu/, workers/, tools/, setup.py), the tests
(tests/**/*.py) and the docs (README.md, docs/**/*.md) must be 12 lowercase hex
digits and appear in the "Verified" table of docs/reference/commits.md, where
each id is listed with its subject, the release it shipped in and the source
in which it was read beside its subject.  Each offence is printed as
`path:line: word: why`; the exit status is 1 if there is any, 0 if none, 2 if
the list itself cannot be read.

What is scanned, and why (docs/reference/commits.md, "Checking"):

- not docs/reference/commits.md: it is the list, and it also records the
  wrong ids the project once cited;
- not the copies of outside documents in docs/reference (KVM_TDP_MMU.md,
  DESIGN.md, PRIOR_ART.md, EXPLORER.md): they are kept as their authors wrote
  them; internals.md and commits.md say where they are wrong;
- not tests/data: captured perf output, whose hex words are addresses.

How ids are found without false positives:

- a candidate is a word of 7 to 40 lowercase hex digits, not touching a
  letter, digit or underscore (so `0x5a0`, `sha256` digests and identifiers
  are not candidates), with at least one digit and one letter: words of
  digits only are numbers (`800000000000`, an address in a trace), words of
  letters only are English (`deadbeef`, `facade`);
- a candidate that names a commit of shmmmu's own history passes (git
  cat-file finds it: the performance notes cite the project's commits in
  git's short form); without git such words are reported like any other;
- otherwise a 12-digit candidate must be in the verified list, and a
  candidate of another length is a kernel id cited in the wrong form unless
  it is in NOT_COMMITS below;
- NOT_COMMITS is the allow-list of hex words that are not commits at all.
  Keep it small: add a word only with the place it comes from.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "docs" / "reference" / "commits.md"

# Hex words that are not commit ids, with where they come from.
NOT_COMMITS = {
    "abcdef0123": "docs/cli.md: the made-up VM name other-25103-abcdef0123 in sample output",
    "e205bd972b": "docs/cli.md: the random suffix of a VM name in `shmmmu ls` sample output",
    "d50cdc2f1d": "docs/cli.md: the random suffix of a VM name in `shmmmu ls` sample output",
    "97ff39e1": "docs/cli.md: the run token in a torture semaphore's name (sem.shmmmu-torture-lock-24243-97ff39e1)",
    "04016a90": "tests/system/test_trace.py: an instruction address in a Valgrind Lackey trace line",
}

# Files not scanned (relative to the root), with the reason in the docstring above.
EXCLUDED = {
    "docs/reference/commits.md",
    "docs/reference/KVM_TDP_MMU.md",
    "docs/reference/DESIGN.md",
    "docs/reference/PRIOR_ART.md",
    "docs/reference/EXPLORER.md",
}

CANDIDATE = re.compile(r"(?<![0-9A-Za-z_])[0-9a-f]{7,40}(?![0-9A-Za-z_])")
ID12 = re.compile(r"^[0-9a-f]{12}$")
CODE_SUFFIXES = (".py", ".c", ".h")
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "node_modules"}


def in_scope(rel: str) -> bool:
    """Whether a file (path relative to the root, with /) is one the default run checks."""
    if rel in EXCLUDED:
        return False
    top = rel.split("/", 1)[0]
    if rel == "README.md" or (top == "docs" and rel.endswith(".md")):
        return True
    if rel == "setup.py" or (top in ("shmmmu", "workers", "tools") and rel.endswith(CODE_SUFFIXES)):
        return True
    return top == "tests" and rel.endswith(".py") and not rel.startswith("tests/data/")


def read_verified(path: Path) -> set[str]:
    """The ids of the "Verified" table of commits.md; ValueError if there is no such table or a row is bad."""
    text = path.read_text()
    m = re.search(r"^## Verified\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        raise ValueError(f"{path}: no '## Verified' section")
    ids: set[str] = set()
    for n, line in enumerate(m.group(1).splitlines()):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 4 or set(cells[0]) <= {"-", ":", " "} or cells[0] == "id":
            continue
        sha = cells[0].strip("`")
        if not ID12.match(sha):
            raise ValueError(f"{path}: a Verified row whose id is not 12 hex digits: {cells[0]}")
        if not all(cells[1:4]):
            raise ValueError(f"{path}: {sha} lacks its subject, release or source")
        if sha in ids:
            raise ValueError(f"{path}: {sha} is listed twice")
        ids.add(sha)
    if not ids:
        raise ValueError(f"{path}: the Verified table is empty")
    return ids


def tracked_files(root: Path) -> list[str]:
    """Files of the tree (tracked and untracked-but-not-ignored when git is there), relative, with /."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
        return sorted(files)


def own_commits(words: set[str]) -> set[str]:
    """The words that name a commit of this repository (git cat-file), if git can tell."""
    if not words:
        return set()
    order = sorted(words)
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "cat-file", "--batch-check"],
                             input="".join(f"{w}^{{commit}}\n" for w in order),
                             capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {w for w, line in zip(order, out) if line.split()[1:2] == ["commit"]}


def scan(paths: list[Path], verified: set[str]) -> tuple[list[str], int]:
    """Offence lines, and how many citations were looked at."""
    found: list[tuple[str, int, str]] = []
    offences = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            offences.append(f"{path}: unreadable: {e}")
            continue
        shown = os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)
        for n, line in enumerate(text.splitlines(), 1):
            for w in dict.fromkeys(m.group(0) for m in CANDIDATE.finditer(line)):
                if re.search(r"[0-9]", w) and re.search(r"[a-f]", w):
                    found.append((shown, n, w))
    odd = {w for _, _, w in found if w not in verified and w not in NOT_COMMITS}
    ours = own_commits(odd)
    for shown, n, w in found:
        if w in verified or w in NOT_COMMITS or w in ours:
            continue
        if len(w) == 12:
            offences.append(f"{shown}:{n}: {w}: not in the verified list of docs/reference/commits.md "
                            "(read the id beside its subject in a source and add a row, or cite the subject only)")
        else:
            offences.append(f"{shown}:{n}: {w}: {len(w)} hex digits: a kernel commit id is cited with 12 digits "
                            "and must be in docs/reference/commits.md (not a commit of this repository either; "
                            "if it is no commit at all, add it to NOT_COMMITS in tools/check_commits.py)")
    return offences, len(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="files or folders to check (default: the whole tree)")
    ap.add_argument("--list", type=Path, default=LIST, help="the commits list (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        verified = read_verified(args.list)
    except (OSError, ValueError) as e:
        print(f"check_commits: {e}", file=sys.stderr)
        return 2
    if args.paths:
        files: list[Path] = []
        for p in args.paths:
            if p.is_dir():
                # a folder of this tree keeps the tree's scope; any other folder is taken as a tree root
                base = p.resolve()
                for rel in tracked_files(base):
                    under = base / rel
                    if under.is_relative_to(ROOT):
                        rel = os.path.relpath(under, ROOT).replace(os.sep, "/")
                    if in_scope(rel):
                        files.append(under)
            else:
                files.append(p)
    else:
        files = [ROOT / rel for rel in tracked_files(ROOT) if in_scope(rel)]
    offences, cited = scan(files, verified)
    for line in offences:
        print(line)
    if offences:
        print(f"check_commits: {len(offences)} offence(s) in {len(files)} files", file=sys.stderr)
        return 1
    print(f"check_commits: {len(files)} files, {cited} hex citations, every kernel id verified "
          f"({len(verified)} in the list)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
