"""The variant table: its commits are the verified ones, its names are checked, --list-bugs and the docs follow it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shmmmu.layout import ConfigError, VMConfig
from shmmmu.variants import (BUG, COMMITS, DEFAULT_PROFILE, PROFILES, VARIANTS, bug_lines, bugs_of, check_names,
                             replaced_functions, traits)

ROOT = Path(__file__).resolve().parents[2]


def _verified() -> dict[str, tuple[str, str]]:
    """docs/reference/commits.md's Verified table: id -> (subject, shipped in)."""
    text = (ROOT / "docs" / "reference" / "commits.md").read_text()
    table = text[text.index("## Verified"): text.index("## Not verified")]
    out = {}
    for m in re.finditer(r"^\| `([0-9a-f]{12})` \| (.*?) \| (.*?) \|", table, re.M):
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_every_commit_of_the_table_is_in_the_verified_list_with_its_subject_and_release() -> None:
    verified = _verified()
    assert len(verified) > 30
    for c in COMMITS.values():
        assert c.id in verified, f"{c.id} is not in docs/reference/commits.md"
        subject, shipped = verified[c.id]
        assert subject.startswith(c.subject), (c.id, subject, c.subject)
        assert shipped.split()[0] == c.version, (c.id, shipped, c.version)


def test_every_variant_cites_known_commits_and_replaces_real_functions() -> None:
    from shmmmu.mmu import PARTS
    for v in VARIANTS.values():
        assert set(v.commits) <= set(COMMITS), v.name
        assert v.commits or v.what, f"{v.name} says neither the commit nor the change"
        assert v.replaces, f"{v.name} replaces nothing"
        assert set(v.profiles) <= set(PROFILES), v.name
        for target, replacement in v.replaces:
            part, fn = target.split(".")
            assert hasattr(PARTS[part], fn) and callable(getattr(PARTS[part], replacement)), (v.name, target)


def test_names_are_checked_against_the_profile() -> None:
    assert check_names(["link-after-publish"]) == ["link-after-publish"]
    with pytest.raises(ValueError, match="unknown bug 'no-such'"):
        check_names(["no-such"])
    with pytest.raises(ValueError, match="unknown kernel '4.19'"):
        bugs_of("4.19")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        VMConfig.from_json(VMConfig(kernel="4.19").to_json())


def test_stress_arguments_follow_the_kernel() -> None:
    """K9's matrix entry runs the exclusive baseline on 5.13 and the read-lock fault path on 6.12, which has no
    exclusive mode; a switch with no override gives every kernel its stress_args."""
    k9 = VARIANTS["advance-after-restart"]
    assert k9.stress_args_of("5.13") == ("--lock-mode", "exclusive") and k9.stress_args_of("6.12") == ()
    k17 = VARIANTS["zap-all-phys-end"]
    assert k17.stress_args_of("5.13") == k17.stress_args == ("--bits", "9")
    for v in VARIANTS.values():
        assert {k for k, _ in v.stress_args_by_kernel} <= set(v.profiles), v.name


def test_traits_follow_the_switches() -> None:
    assert traits(DEFAULT_PROFILE, []) == frozenset()
    assert "page-list" in traits(DEFAULT_PROFILE, ["link-after-publish"])
    assert replaced_functions(DEFAULT_PROFILE, []) == {}


def test_list_bugs_prints_every_switch_of_the_table() -> None:
    p = subprocess.run([sys.executable, "-m", "shmmmu.workers.cli", "stress", "--list-bugs"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "\n".join(bug_lines()).strip()
    for name in bugs_of(DEFAULT_PROFILE):
        v = VARIANTS[name]
        assert v.kind == BUG
        assert re.search(rf"^{re.escape(name)}\b", p.stdout, re.M), name
        for c in v.commits:
            assert c in p.stdout
