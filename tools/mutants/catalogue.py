"""Mutants: plausible protocol bugs in the kernel's shape, none of them a bug switch, to measure the checkers.

Each mutant is a few textual changes to one file of a scratch copy of shmmmu:
each `old` must occur exactly once in `path` and is replaced by its `new`.
`area` is the mechanism it breaks; `why` says what a kernel developer could
have written and what should then go wrong.  A mutant that no search and no
stress run kills needs a scenario or a checker, or an entry in SURVIVORS
saying why no execution can observe it.  tools/mutants/run.py applies them;
tests/test_mutants.py holds the catalogue to its rules.
"""
from __future__ import annotations

from dataclasses import dataclass

AREAS = ("fault", "setters", "teardown", "roots", "notifier", "memslots", "dirty-log", "aging", "nx", "rwlock",
         "rcu", "pool", "tlb")


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str                               # one of AREAS
    path: str                               # relative to the checkout: shmmmu/... or workers/...
    edits: tuple[tuple[str, str], ...]      # (old, new): old occurs exactly once in the file
    why: str


MUTANTS: list[Mutant] = [
    Mutant("zap-range-outside-rcu", "rcu", "shmmmu/mmu/tdp_zap.py",
           (("""        kvm.lockdep_assert_held(shared)
        self.rcu.read_lock()
        try:
            bits = self.bits""", """        kvm.lockdep_assert_held(shared)
        try:
            bits = self.bits"""),
            ("""                    break
        finally:
            self.rcu.read_unlock()
        return flush

    def kvm_tdp_mmu_zap_gfn_range(""",
             """                    break
        finally:
            pass
        return flush

    def kvm_tdp_mmu_zap_gfn_range(""")),
           "zap_gfn_range walks without rcu_read_lock, as before 7cca2d0b7e7d: under the read lock another "
           "zapper's teardown may free a table this walk stands in (the walk's rcu_dereference is unprotected)"),
    Mutant("clear-dirty-log-read-lock", "dirty-log", "shmmmu/mmu/ioctl.py",
           (("""        cleared = 0
        self.lock.write_lock()""", """        cleared = 0
        self.lock.read_lock()"""),
            ("""                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.write_unlock()
        return cleared""", """                self.kvm.kvm_flush_remote_tlbs()
        finally:
            self.lock.read_unlock()
        return cleared""")),
           "KVM_CLEAR_DIRTY_LOG takes mmu_lock for read, as 24ae4cfaaaa2 did for enabling: clear_dirty_pt_masked "
           "stores plainly and walks the roots without references, which needs the write lock"),
]

# mutants that no execution can observe, each with the reason (empty: every mutant must be killed)
SURVIVORS: dict[str, str] = {}
