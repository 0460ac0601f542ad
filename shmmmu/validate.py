"""Validate: the one check of every number and choice a user gives (finite, in bounds, known), one sentence each.

Every command's options pass through these before anything is created, so a
non-finite value (`inf`, `nan`, `1e400`), a negative count or seed, an unknown
mode or a value past a bound is `shmmmu: error: ...` and exit 2, never an
OverflowError from deep inside, a hang or a run that reports a bug it caused.
"""
from __future__ import annotations

import math
from typing import Iterable

SEED_MAX = (1 << 63) - 1          # numpy's and the header's 64-bit words
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UsageError(ValueError):
    """A user mistake in the options: one line, exit status 2."""


def number(value: float, option: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    """A finite number within [lo, hi] ((lo, hi] with `lo_open`)."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{option} must be a number, not {value!r}") from None
    if not math.isfinite(v):
        raise UsageError(f"{option} must be a finite number, not {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise UsageError(f"{option} must be {'more than' if lo_open else 'at least'} {lo:g}" +
                         (f" and at most {hi:g}" if hi is not None else "") + f", not {value!r}")
    if hi is not None and v > hi:
        raise UsageError(f"{option} must be at most {hi:g}, not {value!r}")
    return v


def seconds(value: float, option: str, lo: float = 0.0, hi: float = 7 * 86400.0) -> float:
    """A duration: finite, more than `lo` (at least `lo` when `lo` > 0), at most a week by default."""
    return number(value, option, lo=lo, hi=hi, lo_open=lo == 0.0)


def count(value: int, option: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be a whole number, not {value!r}")
    if not lo <= value <= hi:
        raise UsageError(f"{option} must be between {lo} and {hi}, not {value}")
    return value


def seed(value: int, option: str = "--seed") -> int:
    """A seed: 0 .. 2^63-1 (numpy's generators and the region's words take no negative one)."""
    return count(value, option, 0, SEED_MAX)


def choice(value: str, option: str, choices: Iterable[str]) -> str:
    known = list(choices)
    if value not in known:
        raise UsageError(f"unknown {option.lstrip('-').replace('-', ' ')} {value!r}: use {', '.join(known[:-1])}"
                         f"{' or ' if len(known) > 1 else ''}{known[-1]}")
    return value


def parse_size(text: str, option: str = "size") -> int:
    """'1G', '256M', '4096' -> bytes (the selftests' -b suffixes); finite and at least one 4 KiB page."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text else ""
    num, unit = t, ""
    if t and t[-1] in "KMGT":
        num, unit = t[:-1], t[-1]
    try:
        value = float(num) * UNITS[unit]
    except (ValueError, KeyError, OverflowError):
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix") from None
    if not math.isfinite(value) or value >= 1 << 62:
        raise UsageError(f"bad size {text!r}: not a finite size this emulator can map")
    if value < 4096:
        raise UsageError(f"size {text!r} is less than one 4 KiB page")
    return int(value)
