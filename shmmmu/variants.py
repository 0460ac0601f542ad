"""Variants: the one table of kernel profiles and the switches each profile carries (grows into the whole table)."""
from __future__ import annotations

from shmmmu.bugs import BUGS

DEFAULT_PROFILE = "5.13"
PROFILE_NAMES: tuple[str, ...] = ("5.13",)


def bugs_of(profile: str) -> list[str]:
    """The bug switches a profile carries, in the table's order; ValueError names an unknown profile."""
    if profile not in PROFILE_NAMES:
        raise ValueError(f"unknown kernel profile {profile!r} (known: {', '.join(PROFILE_NAMES)})")
    return list(BUGS)
