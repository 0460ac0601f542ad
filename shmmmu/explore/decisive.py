"""Decisive: which steps of a counterexample matter: the accesses a preemption reordered, what read them, the setup.

For each preemption (actor A switched away at step s for B) the same
schedule is run once more without it and without any later switch (the
*counterfactual*: A goes on).  A pair of conflicting accesses (the same
word, different actors, at least one a write; two fetch-and-ops commute and
do not count, nor do the checkers' own records or the lock words, whose order
is only who enters first) is *reordered* by the preemption when, in the
counterfactual, A's access x comes before the other actor's access y (or y
never comes), while in the failing execution y runs while A is stopped.  The
*decisive* pairs are the reordered ones on the words the failing check read
(the violating actor's last stretch in one kernel function before it recorded
the violation); when none is, the reordered pair nearest the failure.

Marks, one letter each, in every form of the counterexample:

  P  the preemption (the first step of the actor that preempts)
  D  a step of a decisive pair
  T  the write that published a table a decisive step works on (how the other actor reached it)
  R  a step that reads what a D or T step wrote, up to the violation
  !  the violation: the checker recording it
  ≠  (with the fix) the first step where the two executions differ

Setup: the steps before the first one that conflicts with an earlier step of
another actor (before it every actor ran as if alone), unless marked: they
fold into one line.

Steps are named by their place in the execution's log (a position): the
scheduler's step count, which the outputs print, can repeat where an actor
resumes with no scheduling point between (a preempted actor's pending
operation completes at the count its preempter reached).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from shmmmu import spte as S
from shmmmu.explore.explorer import Explorer
from shmmmu.explore.recorder import Recording, record
from shmmmu.explore.sched import Step
from shmmmu.layout import TMeta

# the checkers' own records and the scheduler's words: never part of a pair
NOT_PAIRED = frozenset({"pipe", "zap_pending", "touched", "stats", "violations", "locks", "wstate", "actor-done",
                        "caches", "retire"})
FETCH_OPS = frozenset({"fetch_add", "fetch_or", "fetch_and"})
# where a reordered pair matters most when the check read none of them: the tables, then what describes them
RANK = {"tables": 0, "tmeta": 1, "roots": 2, "data": 3, "host_map": 3, "dirty": 3, "host_ad": 3, "memslots": 4,
        "ctl": 5}
MARKS = {"P": "preemption", "D": "decisive access", "T": "publishes a table the decisive steps use",
         "R": "reads what a marked step wrote", "!": "the violation", "≠": "first difference with the fix"}


def is_hidden(s: Step) -> bool:
    """The checkers' own steps (debug checks, the violation record) and handles being made."""
    f = s.function
    return f.startswith("debug.py:") or f.endswith("__init__") or f.startswith("violations.py:")


def is_write(s: Step) -> bool:
    return s.op != "load" and not (s.op == "touch" and not s.args[1])


def written(s: Step) -> int | None:
    """The value a step left in its word (None: it wrote nothing, or a bulk write)."""
    if s.op == "store":
        return s.args[0]
    if s.op == "cas":
        return s.args[1] if s.result == s.args[0] else None
    if s.op == "xchg":
        return s.args[0]
    if s.op == "fetch_add":
        return (s.before + s.args[0]) & ((1 << 64) - 1)
    if s.op == "fetch_or":
        return s.before | s.args[0]
    if s.op == "fetch_and":
        return s.before & s.args[0]
    return None


def read_value(s: Step) -> int | None:
    """The value a step read from its word (None: a store)."""
    if s.op in ("load",):
        return s.result
    if s.op in ("cas", "xchg"):
        return s.result
    if s.op in FETCH_OPS:
        return s.before
    return None


def words_of(s: Step) -> range:
    """The words a step touches: one, or a bulk access's range."""
    return range(s.word, s.word + s.args[0]) if s.op == "touch" else range(s.word, s.word + 1)


def conflict(x: Step, y: Step, open_words: frozenset = frozenset()) -> bool:
    """Two accesses of different actors to a common word, one of them writing, that do not commute; the
    checkers' records and the scheduler's words only where the failing check read them (`open_words`)."""
    if x.section != y.section or x.actor == y.actor:
        return False
    common = set(words_of(x)) & set(words_of(y))
    if not common:
        return False
    if x.section in NOT_PAIRED and not any((x.section, w) in open_words for w in common):
        return False
    if not (is_write(x) or is_write(y)):
        return False
    return not (x.op in FETCH_OPS and y.op in FETCH_OPS)


@dataclass
class Pair:
    """Two conflicting accesses whose order a preemption changed: `later` ran while `first`'s actor was stopped;
    `first` ran after it, or never (`first_pos` None: only the counterfactual has it).  Positions are in the
    failing execution's log."""

    preemption: int                 # the position of the preempting actor's first step
    first: Step                     # the preempted actor's access (from the counterfactual)
    first_pos: int | None           # its position in the failing execution
    later_pos: int                  # the other actor's access
    later: Step


@dataclass
class Marks:
    """The marked steps of one execution: log position -> letter, with a note saying why."""

    mark: dict[int, str] = field(default_factory=dict)
    note: dict[int, str] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    next_ops: dict[int, list[Step]] = field(default_factory=dict)     # preemption -> A's next steps (counterfactual)
    fold: tuple[int, int] | None = None                                 # (first, last) position folded as setup
    sources: list[tuple[int, int]] = field(default_factory=list)        # no pair: (writer, the check's read)

    def put(self, pos: int, letter: str, note: str) -> None:
        order = "!DTPR≠"
        old = self.mark.get(pos)
        if old is None or order.index(letter) < order.index(old):
            self.mark[pos] = letter
        if note and note not in self.note.get(pos, ""):
            self.note[pos] = (self.note[pos] + "; " if pos in self.note else "") + note


def _keys(log: list[Step]) -> list[tuple]:
    """Each step's identity across executions: actor, function, operation, word, and its occurrence."""
    counts: dict = {}
    out = []
    for s in log:
        sig = (s.actor, s.function, s.op, s.section, s.word)
        n = counts[sig] = counts.get(sig, 0) + 1
        out.append(sig + (n,))
    return out


def violation_stretch(log: list[Step]) -> tuple[list[int], list[int]]:
    """The positions recording the violation, and those of the violating actor's stretch in one function just
    before them (what the failing check read: the debug checkers' own reads too)."""
    rec = [i for i, s in enumerate(log) if s.function.startswith("violations.py:record")]
    if not rec:
        return [], []
    first = rec[0]
    actor = log[first].actor
    recorded = [i for i in range(first, len(log)) if log[i].actor == actor
                and log[i].function.startswith("violations.py:")]
    stretch: list[int] = []
    fn = None
    for i in range(first - 1, -1, -1):
        s = log[i]
        if s.actor != actor:
            continue
        if fn is None:
            fn = s.function
        if s.function != fn:
            break
        stretch.append(i)
    return recorded, stretch[::-1]


def _counterfactual(explorer: Explorer, rec: Recording, at: tuple[int, int]) -> list[Step]:
    keep = [w for w in rec.result.switches if (w[0], w[1]) < at]
    return record(explorer, keep).log


def reordered(explorer: Explorer, rec: Recording, open_words: frozenset = frozenset()
              ) -> tuple[list[Pair], dict[int, list[Step]]]:
    """Every pair a preemption of `rec` reordered (one per step of the other actor), and each preempted actor's
    next steps had it gone on (from the counterfactual), by the preemption's position.  The checkers' own steps
    count only on `open_words` (the words the failing check read)."""
    log = rec.log
    fail_keys = _keys(log)
    fail_pos = {k: i for i, k in enumerate(fail_keys)}
    pairs: list[Pair] = []
    nexts: dict[int, list[Step]] = {}

    def seen(t: Step) -> bool:
        return not is_hidden(t) or any((t.section, w) in open_words for w in words_of(t))
    for step, k, b in rec.result.switches:
        # the preempting actor's first step: numbered `step` if it resumes a pending operation, later if it starts
        start = next((i for i, s in enumerate(log) if s.index >= step and s.actor == b), None)
        if not start or not log[start].preempted:
            continue                 # not a preemption (the running actor waited or ended): nothing reordered
        a = log[start - 1].actor
        cf = _counterfactual(explorer, rec, (step, k))
        cf_keys = _keys(cf)
        cf_pos = {key: i for i, key in enumerate(cf_keys)}
        # A's steps from the one it was stopped before (the counterfactual is the same up to there)
        xs = [i for i in range(start, len(cf)) if cf[i].actor == a]
        nexts[start] = [cf[i] for i in xs if not is_hidden(cf[i])][:8]
        by_word: dict[tuple[str, int], list[int]] = {}
        for i in xs:
            for w in words_of(cf[i]):
                by_word.setdefault((cf[i].section, w), []).append(i)
        resume = next((i for i in range(start, len(log)) if log[i].actor == a), len(log))
        for yi in range(start, resume):
            y = log[yi]
            if not seen(y):
                continue
            y_cf = cf_pos.get(fail_keys[yi])
            for xi in sorted({xi for w in words_of(y) for xi in by_word.get((y.section, w), ())}):
                x = cf[xi]
                if not seen(x) or not conflict(x, y, open_words) or (y_cf is not None and xi > y_cf):
                    continue
                pairs.append(Pair(start, x, fail_pos.get(cf_keys[xi]), yi, y))
                break
    return pairs, nexts


def _words(log: list[Step], positions: list[int]) -> set[tuple[str, int]]:
    return {(log[i].section, w) for i in positions for w in words_of(log[i])}


def decisive(explorer: Explorer, rec: Recording, describe) -> Marks:
    """The marks of a failing execution (see the module's docstring); `describe` (render.Describer) names steps
    and words."""
    name = describe.step
    log = rec.log
    actors = rec.actors
    m = Marks()
    recorded, stretch = violation_stretch(log)
    for i in recorded:
        m.put(i, "!", "")
    checked = frozenset(_words(log, stretch))
    pairs, m.next_ops = reordered(explorer, rec, checked)
    for pos, ops in m.next_ops.items():
        a = log[pos - 1].actor
        m.put(pos, "P", f"{actors[log[pos].actor]} preempts {actors[a]}"
                        + (f"; {actors[a]} would have gone on with {_next_words(ops, name)}" if ops else ""))
    m.pairs = choose_pairs(log, pairs, stretch)
    for p in m.pairs:
        fa, la = actors[p.first.actor], actors[p.later.actor]
        verb = "writes" if is_write(p.later) else "reads"
        when = (f"{fa} runs it after, at step {log[p.first_pos].index}" if p.first_pos is not None
                else f"{fa} never runs it: it is still stopped")
        m.put(p.later_pos, "D", f"{verb} {describe.word(p.later.section, p.later.word)} before {fa}'s "
                                f"{name(p.first)}, which comes first without the preemption at step "
                                f"{log[p.preemption].index} ({when})")
        if p.first_pos is not None:
            m.put(p.first_pos, "D", f"comes after {la}'s step {p.later.index}: the order the preemption changed")
    if not pairs:
        # no preemption reordered anything: the default order fails; what the check read from another actor
        for i in stretch:
            src = _source(log, i)
            if src is not None and log[src].actor != log[i].actor:
                m.sources.append((src, i))
                m.put(src, "D", f"wrote what {actors[log[i].actor]}'s check reads at step {log[i].index}")
                m.put(i, "D", f"reads what {actors[log[src].actor]} wrote at step {log[src].index}")
    _publishers(log, m, actors, rec.entries)
    _readers(log, m)
    m.fold = fold(log, m)
    return m


def choose_pairs(log: list[Step], pairs: list[Pair], stretch: list[int]) -> list[Pair]:
    """The decisive pairs: those whose later access is the failing check's own read; else those on a word the
    check read (the latest of each word); else the reordered pair nearest the failure on the data the oracles
    judge, page tables first."""
    chosen = [p for p in pairs if p.later_pos in set(stretch)]
    if not chosen:
        words = _words(log, stretch)
        latest: dict[tuple[str, int], Pair] = {}
        for p in pairs:
            key = (p.later.section, p.later.word)
            if key in words and (key not in latest or p.later_pos > latest[key].later_pos):
                latest[key] = p
        chosen = sorted(latest.values(), key=lambda p: p.later_pos)
    if not chosen and pairs:
        best = min(RANK.get(p.later.section, len(RANK)) for p in pairs)
        near = [p for p in pairs if RANK.get(p.later.section, len(RANK)) == best]
        last = max(p.later_pos for p in near)
        chosen = [p for p in near if p.later_pos == last]
    return chosen[:4]


def _next_words(ops: list[Step], name) -> str:
    """What a stopped actor would have done next: the functions it enters up to its first access to shared data."""
    fns: list[str] = []
    for s in ops:
        if s.section not in NOT_PAIRED:
            return ", ".join(fns + [name(s)])
        k = name(s).split(":")[0]
        if k not in fns:
            fns.append(k)
    return ", ".join(fns) if fns else name(ops[0])


def _source(log: list[Step], i: int) -> int | None:
    """The position of the last step before position `i` that wrote its word (reads-from)."""
    s = log[i]
    for j in range(i - 1, -1, -1):
        t = log[j]
        if t.section == s.section and s.word in words_of(t) and (written(t) is not None or t.op == "touch"):
            return j
    return None


def _table_of(s: Step, entries: int) -> int | None:
    if s.section == "tables":
        return s.word // entries
    if s.section == "tmeta":
        return s.word // TMeta.WORDS
    return None


def _publishers(log: list[Step], m: Marks, actors: list[str], entries: int) -> None:
    """For each table the decisive steps work on: the cmpxchg or store that made it reachable (a non-leaf entry
    pointing to it), if another actor made it."""
    users: dict[tuple[int, int], list[int]] = {}          # (publishing position, table) -> decisive positions
    for i in sorted(p for p, c in m.mark.items() if c == "D"):
        t = _table_of(log[i], entries)
        if t is None:
            continue
        link = S.make_nonleaf(t)
        for j in range(i - 1, -1, -1):
            u = log[j]
            if u.section == "tables" and written(u) == link:
                if u.actor != log[i].actor:
                    users.setdefault((j, t), []).append(i)
                break
    for (j, t), uses in users.items():
        u = log[j]
        who = sorted({actors[log[x].actor] for x in uses})
        m.put(j, "T", f"publishes t{t} (the link in t{u.word // entries}[{u.word % entries}]), the table "
                      f"{' and '.join(who)} works on at step{'s' if len(uses) > 1 else ''} "
                      f"{', '.join(str(log[x].index) for x in uses)}")


def _readers(log: list[Step], m: Marks) -> None:
    """Steps of another actor that read what a D or T step wrote (its value still in the word), up to the
    violation."""
    sources = {p for p, c in m.mark.items() if c in "DT"}
    last: dict[tuple[str, int], int] = {}
    for i, s in enumerate(log):
        key = (s.section, s.word)
        src = last.get(key)
        if src is not None and read_value(s) is not None and s.actor != log[src].actor and not is_hidden(s):
            m.put(i, "R", f"reads what step {log[src].index} wrote")
        if written(s) is not None or s.op == "touch":
            for w in words_of(s):
                if i in sources:
                    last[(s.section, w)] = i
                else:
                    last.pop((s.section, w), None)


def setup_end(log: list[Step]) -> int:
    """The position of the first step that conflicts with an earlier step of another actor (0: none does)."""
    seen: dict[tuple[str, int], dict[int, bool]] = {}       # word -> actor -> it wrote the word
    for i, s in enumerate(log):
        w = is_write(s)
        for word in words_of(s):
            for actor, wrote in seen.get((s.section, word), {}).items():
                if actor != s.actor and (w or wrote):
                    return i
        for word in words_of(s):
            by = seen.setdefault((s.section, word), {})
            by[s.actor] = by.get(s.actor, False) or w
    return 0


MIN_FOLD = 8


def fold(log: list[Step], m: Marks) -> tuple[int, int] | None:
    """The setup folded into one line: positions 0 to the last before the setup ends or the first marked step
    (None: fewer than MIN_FOLD steps, or no step meets another actor's: then the whole execution matters)."""
    end = setup_end(log)
    if m.mark:
        end = min(end, min(m.mark)) if end else 0
    if end < MIN_FOLD:
        return None
    return 0, end - 1
