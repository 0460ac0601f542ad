"""Atomics: the typed face of the C helper, sequentially consistent 64-bit operations on shared words.

Every cross-process read or write of a word another process may change at the
same time goes through a `Words` view (DESIGN.md §3-4).  `Words(buffer)` wraps
any C-contiguous buffer of uint64 words (a numpy view of the region, an mmap);
a read-only buffer gives a view whose writing methods raise PermissionError.
Indices are checked in C: a bad index raises IndexError, never touches memory.

Hot code binds the methods it needs to locals (``cas = words.cas``): a call
then costs one METH_FASTCALL dispatch (about 0.02 µs here, docs/atomics.md).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from shmmmu._atomics import Words, cpu_relax

__all__ = ["Words", "cpu_relax", "WordsLike", "words_of"]

MASK64 = (1 << 64) - 1


class WordsLike(Protocol):
    """What the library expects of a word view (the C type implements it)."""

    n: int
    readonly: bool

    def load(self, i: int) -> int: ...
    def store(self, i: int, value: int) -> None: ...
    def cas(self, i: int, expected: int, new: int) -> int: ...
    def xchg(self, i: int, value: int) -> int: ...
    def fetch_add(self, i: int, delta: int) -> int: ...
    def fetch_or(self, i: int, mask: int) -> int: ...
    def fetch_and(self, i: int, mask: int) -> int: ...
    def load_range(self, start: int, n: int, out: np.ndarray) -> None: ...
    def fill_range(self, start: int, n: int, value: int) -> None: ...
    def xchg_range(self, start: int, n: int, value: int, out: np.ndarray) -> None: ...
    def and_range(self, start: int, n: int, mask: int) -> int: ...
    def or_range(self, start: int, n: int, mask: int) -> int: ...
    def clear_where(self, start: int, n: int, test_mask: int, test_value: int,
                    clear_mask: int, out: np.ndarray) -> int: ...
    def wait_while(self, i: int, value: int, spins: int) -> int: ...
    def touch(self, start: int, n: int, write: bool) -> None: ...


def words_of(array: np.ndarray) -> Words:
    """A `Words` view of a C-contiguous uint64 numpy array (read-only if the array is)."""
    if array.dtype != np.uint64 or not array.flags.c_contiguous:
        raise ValueError("atomic words need a C-contiguous uint64 array")
    return Words(array)


def to_signed(value: int) -> int:
    """Read a uint64 word as a two's-complement signed value."""
    return value - (1 << 64) if value >> 63 else value
