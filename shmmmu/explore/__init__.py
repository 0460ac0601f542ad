"""Explore: a deterministic interleaving explorer for the MMU: the real library code, one actor at a time.

  sched.py      the scheduler: actors as greenlets, every shared word a scheduling point, the wait layer
  strategy.py   random, PCT, iteratively bounded DFS over the conflicting words, and replay
  scenarios.py  the named scenarios and the bug switches each targets
  explorer.py   a scenario's region, executions, oracles, search, shrinking, replay tokens
  render.py     the counterexample as a step table, as SVG swimlanes, as JSON
  recorder.py   a counterexample replayed with its state at every step; the same decisions with the fix
  decisive.py   which steps matter: the accesses a preemption reordered, what read them, the setup
  explain.py    the counterexample explained: its marks, its violation in words, the fix beside it
  html.py       all of it as one self-contained page (the template explain.html)

docs/explore.md shows it at work; docs/reference/EXPLORER.md is its design.
"""

# the default search budget, in executions: it finds every bug switch from its scenario (docs/explore.md).
# Here, not in report.py, so that the command line can show it without importing the explorer.
DEFAULT_EXECUTIONS = 20_000

# the scenarios where the 6.12 profile runs other code than 5.13: a write fault on a write-protected leaf (the fast
# page fault; only dirty logging write-protects), enabling or clearing the log (eager splitting),
# kvm_zap_gfn_range (the write lock, an invalidation, leaves only), the MMU notifier's unmap (leaves only, every
# root), aging (A cleared alone by an atomic AND) and the roots' lifecycle where it races (a memslot update's invalidation and zap, a vCPU's reload); elsewhere
# 6.12's fast path only walks and hands the fault to 5.13's, and its roots are loaded in the prologue and freed by
# the end checks.  The slow set's 10,000-execution runs and tools/bound_table.py run these under both.
PATHS_612 = ("dirty-log", "manual-clear", "split-huge", "split-log", "clear-split", "seq-wrap", "mix",
             "zap-range-fault", "fault-zap", "fault-zap-mapped", "walk-zap-reclaim", "zap-yield", "zap-zap-roots",
             "psc-free", "nx-fault-zap", "cover-zap-range", "cover-dirty-enable", "cover-dirty-get",
             "cover-dirty-clear", "cover-dirty-disable",
             "memslot-roots", "memslot-fault", "memslot-unmap", "unmap-reload", "zap-roots-yield", "fault-unmap",
             "fault-unmap-first-page", "kick-unmap", "age-unmap", "psc-unmap", "cover-unmap", "cover-memslot",
             "cover-memslot-move", "cover-roots", "age-reaccess", "nx-fault-collapse")
