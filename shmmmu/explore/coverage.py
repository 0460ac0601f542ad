"""Coverage: which pairs of conflicting accesses a search reached, in which orders, and which kernel functions ran.

Two accesses conflict when they touch the same shared word from different
actors and at least one writes.  An execution reaches the pair (A, B) when an
access of A is followed, on that word, by a conflicting access of B with no
write between (a read after the last write, or a write after the reads and
the write before it).  A pair is named by the kernel functions making the two
accesses (the innermost library function, under the MMU function that called
it) and the region section of the word; it is covered in both orders when
some execution reached A before B and some reached B before A.  Where a bug
hides, one order was never tried: `shmmmu explore --coverage` lists them.

The functions that ran are the code objects a profile hook saw called while
the actors ran; the report names the MMU functions (methods of the parts in
shmmmu/mmu, the iterator, RCU, the lock, the TLB protocol) that never did.
Coverage costs a frame walk per access and a profile hook per call: it is on
only when asked for.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_PKG = os.path.dirname(_HERE)
_MMU = os.path.join(_PKG, "mmu")
_QUIET = (os.path.join(_PKG, "wait.py"), os.path.join(_PKG, "atomics.py"))
# modules whose functions are the kernel's (the MMU parts, the iterator, RCU, the lock, the TLB protocol)
_KERNEL_FILES = tuple(os.path.join(_PKG, f) for f in ("tdp_iter.py", "rcu.py", "rwlock.py", "tlb.py", "pool.py",
                                                      "memslots.py", "guest.py"))
_DEBUG = os.path.join(_MMU, "debug.py")
_NOT_KERNEL = tuple(os.path.join(_MMU, f) for f in ("debug.py", "tracepoints.py", "instruments.py", "__init__.py"))


def _kernel_file(path: str) -> bool:
    return (path.startswith(_MMU) and path not in _NOT_KERNEL) or path in _KERNEL_FILES


def access_site(depth: int = 2) -> str:
    """The function making the access: the innermost library function, prefixed by the MMU function that
    called it when the innermost is not itself one (`zap_gfn_range > TdpIter.next`)."""
    f = sys._getframe(depth)
    inner = ""
    while f is not None:
        path = f.f_code.co_filename
        if not path.startswith(_HERE) and path not in _QUIET:
            if not inner:
                inner = f.f_code.co_qualname if not path.startswith(_MMU) else f.f_code.co_name
                if path.startswith(_MMU):
                    # a debug check's own access: named as the check, after the function it checks
                    return f"check:{inner.removeprefix('checked_')}" if path == _DEBUG else inner
            elif path.startswith(_MMU) and path not in _NOT_KERNEL:
                return f"{f.f_code.co_name} > {inner}"
        f = f.f_back
    return inner or "the scenario"


@dataclass
class Coverage:
    """What a search reached, accumulated over its executions."""

    executions: int = 0
    # (section, (site, op), (site, op)) with the two sorted -> the orders seen: "ab" (sorted order), "ba"
    pairs: dict[tuple[str, tuple[str, str], tuple[str, str]], set[str]] = field(default_factory=dict)
    ran: set[CodeType] = field(default_factory=set)
    # this execution's per-word history: (section, word) -> (last write (actor, site), reads since [(actor, site)])
    _words: dict[tuple[str, int], tuple[tuple[int, str] | None, list[tuple[int, str]]]] = field(default_factory=dict)

    def begin(self) -> None:
        self._words.clear()
        self.executions += 1

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.ran.add(frame.f_code)

    def access(self, actor: int, section: str, word: int, write: bool, site: str) -> None:
        key = (section, word)
        last, reads = self._words.get(key, (None, []))
        if write:
            for r_actor, r_site in reads:
                if r_actor != actor:
                    self._pair(section, (r_site, "read"), (site, "write"))
            if last is not None and last[0] != actor:
                self._pair(section, (last[1], "write"), (site, "write"))
            self._words[key] = ((actor, site), [])
        else:
            if last is not None and last[0] != actor:
                self._pair(section, (last[1], "write"), (site, "read"))
            if (actor, site) not in reads:
                reads.append((actor, site))
            self._words[key] = (last, reads)

    def _pair(self, section: str, first: tuple[str, str], second: tuple[str, str]) -> None:
        a, b = sorted((first, second))
        self.pairs.setdefault((section, a, b), set()).add("ab" if (a, b) == (first, second) else "ba")

    # ------------------------------------------------------------------ the report

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (section, a, b), orders in sorted(self.pairs.items()):
            same = a == b
            out.append({"section": section, "first": f"{a[0]} ({a[1]})", "second": f"{b[0]} ({b[1]})",
                        "orders": "both" if same or orders == {"ab", "ba"} else
                        ("first then second" if orders == {"ab"} else "second then first")})
        return out

    def never_ran(self, universe: dict[CodeType, str]) -> list[str]:
        return never_ran(universe, self.ran)

    def summary(self) -> dict[str, int]:
        rows = self.rows()
        both = sum(r["orders"] == "both" for r in rows)
        return {"pairs": len(rows), "both_orders": both, "one_order": len(rows) - both}


# the MMU's other kernel-side objects, by class: the functions of theirs that mirror kernel code
_KERNEL_CLASSES = {"shmmmu.mmu.roots_612": ("Roots612",), "shmmmu.tdp_iter": ("TdpIter",),
                   "shmmmu.rcu": ("Rcu", "RcuReference"), "shmmmu.rwlock": ("RWLock", "RWLockReference"),
                   "shmmmu.tlb": ("TlbControl",)}
# bookkeeping of shmmmu's own in those classes (statistics, crash recovery, the inspector's views)
_NOT_KERNEL_NAMES = {"recover", "stats", "state", "held_by", "backlog", "publish_stats", "publish_stat", "violation",
                     "read", "write", "needbreak", "in_read_section", "snapshot", "bind_fast_paths", "root_row",
                     "nx_list", "young_pages", "present_leaves", "check_range_unmapped", "check_host_pages",
                     "check_root_unheld", "listed_roots", "roots_gen", "reclaim_pass",
                     # error paths and constructor helpers: a correct execution never runs them
                     "_unbalanced", "_unlock_unheld", "_forgiven", "_words_of", "assert_held", "_ring_word",
                     # not called as such: the Mmu binds page_fault to the lock mode's entry, next() writes
                     # _step_down out in place, the MMU's yield drops and retakes the lock itself (tdp_mmu._yield)
                     # rather than through cond_resched_rwlock_*, and grace periods end in the reclaimer's pass
                     "page_fault", "_step_down", "cond_resched_read", "cond_resched_write", "synchronize",
                     # VM destruction runs in the oracles after each execution, not among the actors
                     "destroy", "forget_root", "kvm_mmu_uninit_tdp_mmu", "kvm_mmu_uninit_tdp_mmu_612",
                     "uninit_tdp_mmu_b8_destroy_workqueue",
                     # helpers of variants only (K18's page list, the zap-all variants), and a reader's lookup
                     "account_huge_nx_page", "unaccount_huge_nx_page", "_zap_all_with", "valid_root"}


def never_ran(universe: dict[CodeType, str], ran: set[CodeType]) -> list[str]:
    """The functions of `universe` not in `ran`; a function whose debug check ran in its place (the check
    does the function's work itself: clear_frozen_spte's exchange) counts as run."""
    checked = {c.co_name.removeprefix("checked_") for c in ran if c.co_filename == _DEBUG}
    return sorted(name for code, name in universe.items() if code not in ran and code.co_name not in checked)


def kernel_functions(bugs: list[str], kernel: str = "5.13") -> dict[CodeType, str]:
    """The MMU's functions that mirror kernel code, code object -> "file:Class.function": the methods of the
    MMU parts (shmmmu.mmu.PARTS), the kvm_* functions of Kvm, and the iterator, RCU, lock and TLB-request
    classes; not the variant functions a VM with `bugs` does not run, nor shmmmu's own bookkeeping."""
    import importlib
    import inspect

    from shmmmu.mmu import PARTS
    from shmmmu.mmu.kvm import Kvm
    from shmmmu.variants import VARIANTS, replaced_functions, variants_on

    on = replaced_functions(kernel, bugs)
    replacements = {r for v in VARIANTS.values() for _, r in v.replaces} - set(on.values())
    helping = {h.split(".")[1] for v in variants_on(kernel, bugs) for h in v.helpers}
    replacements |= {h.split(".")[1] for v in VARIANTS.values() for h in v.helpers} - helping
    replaced = {t.split(".")[1] for t in on}
    classes: list[type] = list(PARTS.values()) + [Kvm]
    for mod, names in _KERNEL_CLASSES.items():
        m = importlib.import_module(mod)
        classes += [getattr(m, n) for n in names]
    out: dict[CodeType, str] = {}
    for cls in classes:
        for name, fn in vars(cls).items():
            fn = getattr(fn, "__func__", fn)
            if not inspect.isfunction(fn) or name.startswith("__") or name in _NOT_KERNEL_NAMES:
                continue
            if name in replacements or name in replaced or (cls is Kvm and not name.startswith("kvm_")):
                continue
            out[fn.__code__] = f"{os.path.basename(fn.__code__.co_filename)}:{fn.__qualname__}"
    return out
