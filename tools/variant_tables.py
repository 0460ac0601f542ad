"""Variant tables: docs/internals.md's per-profile "which kernel" tables, generated from shmmmu.variants.

    .venv/bin/python tools/variant_tables.py [--write | --check] [FILE]

Prints, for every kernel profile, the table of its own functions (the
profile's variants) and of its bug switches, each with the commits it follows
or reverts as docs/reference/commits.md lists them.  With --write the tables
replace what stands between `<!-- variant-tables -->` and
`<!-- end variant-tables -->` in FILE (default docs/internals.md); with
--check the command exits 1 if FILE's tables are not what the table gives
(tests/system/test_docs.py runs it), 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shmmmu.variants import BUG, COMMITS, KERNEL, PROFILES, VARIANTS, Variant  # noqa: E402

BEGIN = "<!-- variant-tables -->"
END = "<!-- end variant-tables -->"


def _commits(v: Variant) -> str:
    return ", ".join(f"{c} ({COMMITS[c].version})" for c in v.commits) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def tables() -> str:
    """Every profile's tables, in markdown."""
    out: list[str] = []
    for p in PROFILES.values():
        out.append(f"#### Kernel {p.name}: {p.release}")
        out.append("")
        own = [VARIANTS[n] for n in p.variants]
        if own:
            out.append("| its own functions | follows | what changes from 5.13 | replaces |")
            out.append("|---|---|---|---|")
            for v in own:
                repl = ", ".join(f"`{t}`" for t, _ in v.replaces) or "(called by the above)"
                out.append(f"| `{v.name}` | {_commits(v)} | {_cell(v.what)} | {repl} |")
            out.append("")
        bugs = [v for v in VARIANTS.values() if v.kind == BUG and p.name in v.profiles]
        out.append("| bug switch | ref | the fix it reverts | what goes wrong, and which checker sees it |")
        out.append("|---|---|---|---|")
        for v in bugs:
            fix = _commits(v) if v.commits else _cell(v.what)
            out.append(f"| `{v.name}` | {v.ref or '-'} | {fix} | {_cell(v.effect)} |")
        out.append("")
    assert all(v.kind in (BUG, KERNEL) or v.profiles for v in VARIANTS.values())
    return "\n".join(out).rstrip() + "\n"


def replaced(text: str, new: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{new}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default=str(ROOT / "docs" / "internals.md"))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    new = tables()
    if not (a.write or a.check):
        print(new, end="")
        return 0
    path = Path(a.file)
    try:
        text = path.read_text()
        out = replaced(text, new)
    except (OSError, ValueError) as e:
        print(f"variant_tables.py: error: {path}: {e}", file=sys.stderr)
        return 2
    if a.check:
        if out != text:
            print(f"{path}: the variant tables differ from shmmmu.variants (run tools/variant_tables.py --write)")
            return 1
        return 0
    path.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
