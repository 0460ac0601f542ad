"""Run: one VM from creation to teardown: workers started, a workload driven in phases, results and checks.

`run_vm(RunOptions, launcher)` is what `shmmmu run` calls, and `shmmmu bench`
too: both drive the same phases (`drive_phases`, dirty_log_perf_test's).  The
worker processes are started by the launcher the caller passes
(shmmmu.launch).  It always unlinks the region and semaphores it created, also
when a worker dies or the user presses Ctrl-C.  `shmmmu run` itself is
`prepare_run(RunRequest)` (its command line checked, a trace converted, the
tracepoint directory made, before any VM exists), then `run_prepared`, then
`RunResult.rows()` printed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


from shmmmu import outfile, violations
from shmmmu.integrity import check_guest_memory, dirty_log_missed, guest_values
from shmmmu.launch import Launcher, LauncherFactory
from shmmmu.layout import MAX_MEMSLOTS, MemslotSpec, TableState, TMeta, VMConfig, Workload
from shmmmu.region import PREFIX
from shmmmu.trace.store import Progress, TraceInfo
from shmmmu.variants import PROFILE_NAMES
from shmmmu.vm import create_vm

BACKINGS = {"4k": 1, "2m": 2, "1g": 3, "anonymous": 1, "anonymous_thp": 2, "anonymous_hugetlb": 3}
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# one validation layer for every command's numbers (shmmmu.validate); the names stay importable from here
from shmmmu.validate import UsageError, parse_size, seconds, seed as _check_seed  # noqa: E402


@dataclass
class RunOptions:
    name: str = "demo"
    free_name: bool = False             # a name in use: take the first free of NAME-2, NAME-3, ... (create_vm)
    vcpus: int = 2
    memory: int = 128 << 20                 # bytes per vCPU
    backing: str = "4k"
    lock_mode: str = "shared"
    overlap: bool = False
    workload: str = "populate"
    trace: TraceInfo | None = None      # a converted trace (converted_trace()): the vCPUs stream its file
    iterations: int = 2
    seed: int = 1
    write_every: int = 1
    bits: int = 9
    debug: bool = False
    bugs: list[str] = field(default_factory=list)
    accesses: int = 0
    manual_protect: bool = False        # dirty-log collections as GET (copy) + CLEAR, logging INITIALLY_SET
    write_percent: int = -1             # the selftest's -w (6.2 on); -1: write_every
    random_access: bool = False         # the selftest's -a (6.2 on)
    slots: int = 1                      # the selftest's -x: the memory split into this many memslots
    run_while_disabling: bool = False   # the selftest's -e: vCPUs keep running while logging is disabled
    tracepoints: str = ""               # where workers write their tracepoint lines (shmmmu.mmu.tracepoints)
    kernel: str = "5.13"                # the kernel profile (shmmmu.variants)
    gup_delay_us: int = 0               # pauses in the fault's prologue (VMConfig.gup_delay_us; bench's own)

    def config(self) -> VMConfig:
        if self.kernel not in PROFILE_NAMES:
            raise UsageError(f"unknown kernel {self.kernel!r}; known: {', '.join(PROFILE_NAMES)}")
        if self.vcpus < 1:
            raise UsageError("--vcpus must be at least 1")
        if self.vcpus > 250:
            raise UsageError("--vcpus must be at most 250")
        if self.iterations < 1:
            raise UsageError("--iterations must be at least 1")
        if self.iterations > 1 << 32:        # the iteration number lives in one shared word, with room
            raise UsageError(f"--iterations must be at most {1 << 32}")
        _check_seed(self.seed)
        if self.backing not in BACKINGS:
            raise UsageError(f"unknown backing {self.backing!r}: use 4k, 2m or 1g")
        if self.lock_mode not in ("shared", "exclusive"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared or exclusive")
        level = BACKINGS[self.backing]
        pages = self.memory // 4096
        total = pages * self.vcpus
        limit = 1 << (self.bits * 4)
        unit = 1 << (self.bits * (level - 1))
        slot_pages = -(-total // unit) * unit
        if not 1 <= self.slots <= MAX_MEMSLOTS:
            raise UsageError(f"memslots (-x) must be 1 to {MAX_MEMSLOTS} (the emulator's memslot table)")
        if slot_pages % (self.slots * unit):
            raise UsageError(f"guest memory ({slot_pages} pages) cannot be evenly divided into {self.slots} "
                             f"memslots of whole {unit}-page backing units")
        if slot_pages > limit // 2 or total > (64 << 30) // 4096:
            raise UsageError(f"{self.vcpus} x {self.memory >> 20} MiB is more guest memory than this emulator maps "
                             f"(at most {min(limit // 2, (64 << 30) // 4096) * 4096 >> 30} GiB)")
        base = limit // 2                    # the selftest puts its slot high in guest-physical space
        base -= base % unit
        if self.workload not in ("populate", "random", "dirty-log", "trace", "access-tracking"):
            raise UsageError(f"unknown workload {self.workload!r}: use populate, random, dirty-log or trace")
        wl = Workload(kind=self.workload, pages=pages, overlap=self.overlap, n_vcpus=self.vcpus,
                      write_every=self.write_every, accesses=self.accesses or pages,
                      write_percent=self.write_percent, random_access=self.random_access)
        per_slot = slot_pages // self.slots
        if self.workload == "trace":
            self._trace_workload(wl)
        return VMConfig(name=self.name, n_vcpus=self.vcpus, bits=self.bits, lock_mode=self.lock_mode,
                        memslots=[MemslotSpec(base + i * per_slot, per_slot, level) for i in range(self.slots)],
                        debug=self.debug, bugs=list(self.bugs),
                        seed=self.seed, workload=wl, tracepoints=self.tracepoints, kernel=self.kernel,
                        gup_delay_us=self.gup_delay_us)

    def _trace_workload(self, wl: Workload) -> None:
        """A trace's fields of the workload: threads on vCPUs of one shared range, or the one part on every
        vCPU; its distinct pages must fit the range a vCPU replays it in."""
        tr = self.trace
        if tr is None:
            raise UsageError("--workload trace needs --trace FILE")
        if tr.threaded:
            if self.vcpus != len(tr.parts):
                raise UsageError(f"the trace has {len(tr.parts)} threads, one vCPU each: give --vcpus "
                                 f"{len(tr.parts)} or leave --vcpus out")
            wl.overlap = True                # the threads shared one address space
        wl.trace_file, wl.trace_threads, wl.trace_pages = tr.path, tr.threaded, tr.pages
        room = wl.pages * self.vcpus if wl.overlap else wl.pages
        if tr.pages > room:
            need = -(-tr.pages * 4096 // (self.vcpus if wl.overlap else 1) // (1 << 20))
            raise UsageError(f"the trace touches {tr.pages} distinct pages ({tr.pages * 4 / 1024:.1f} MiB), more "
                             f"than the {room} guest pages it is replayed in: give --memory {need}M or more")


@dataclass
class RunResult:
    options: dict[str, Any]
    phases: list[tuple[str, float]]
    stats: dict[str, int]
    rcu: dict[str, int]
    tables: dict[str, int]
    problems: list[str]
    violations: list[str]
    wall_s: float
    timed: list[Phase] = field(default_factory=list)     # the phases with their counters (the benchmark's)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.violations

    def rows(self) -> list[tuple[str, str]]:
        """The results table of `shmmmu run` (measure, value): the phases' times, then the counters."""
        s, j = self.stats, self.to_json()
        rows = [(f"{name} time", f"{secs:.6f}s") for name, secs in self.phases]
        tr = self.options.get("trace")
        if tr:
            rows.append(("trace", f"{tr['format']}: {tr['accesses']} accesses, {tr['pages']} distinct pages, "
                                  f"{tr['threads']} thread{'s' if tr['threads'] != 1 else ''}"))
        return rows + [
            ("faults", f"{s['faults']}"),
            ("faults/s (populate)", f"{j['faults_per_s']:.0f}"),
            ("fixed / spurious / retries", f"{s['fixed']} / {s['spurious']} / {s['retries']}"),
            ("CAS failures", f"{s['cas_failures']}"),
            ("tables allocated / in use", f"{s['tables_allocated']} / {self.tables['live']}"),
            ("tables retired / freed at once", f"{s['tables_retired']} / {s['tables_freed']}"),
            ("huge pages split / collapsible zaps", f"{s['huge_splits']} / {s['collapsible_zaps']}"),
            ("grace periods (longest)", f"{self.rcu['grace_periods']} ({self.rcu['gp_max_ns'] / 1e6:.2f} ms)"),
            ("TLB flushes", f"{s['flushes']}"),
            ("lock wait (total)", f"{s['lock_wait_ns'] / 1e6:.1f} ms"),
            ("guest accesses", f"{s['accesses']}"),
        ]

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        populate = next((t for n, t in self.phases if n.startswith("populate")), self.wall_s)
        return {"options": self.options, "phases": [{"name": n, "seconds": t} for n, t in self.phases],
                "faults": s["faults"],
                "faults_per_s": s.get("populate_faults", s["faults"]) / populate if populate else 0.0,
                "stats": s, "rcu": self.rcu, "tables": self.tables, "problems": self.problems,
                "violations": self.violations, "wall_s": self.wall_s,
                "result": "SUCCESS" if self.ok else "FAILURE"}


def table_counts(vm) -> dict[str, int]:
    st = vm.region.array("tmeta")[:, TMeta.STATE]
    return {"total": int(st.size), **{name: int((st == s).sum()) for s, name in TableState.NAMES.items()}}


PHASE_LABELS = {"populate": "populate", "enable": "enable dirty logging", "dirty": "iteration {k}",
                "get": "get dirty log {k}", "clear": "clear dirty log {k}", "disable": "disable dirty logging"}


@dataclass
class Phase:
    """One timed phase of a run, with the workers' counters summed right after it.

    kind: populate | enable | dirty | get | clear | disable.  `iteration` is the
    iteration published to the vCPUs (1 populates; the selftest's "Iteration N"
    is iteration N + 1 here); 0 for enable and disable.
    """
    kind: str
    iteration: int
    ns: int
    stats: dict[str, int]                 # cumulative, right after the phase
    delta: dict[str, int] = field(default_factory=dict)     # their change over the phase

    @property
    def seconds(self) -> float:
        return self.ns / 1e9

    @property
    def label(self) -> str:
        return PHASE_LABELS.get(self.kind, "{kind} {k}").format(k=self.iteration, kind=self.kind)   # (selftests')


@dataclass
class PhaseLog:
    base: dict[str, int] = field(default_factory=dict)      # the counters before the first phase
    phases: list[Phase] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, iteration: int, ns: int, stats: dict[str, int]) -> None:
        before = self.phases[-1].stats if self.phases else self.base
        delta = {k: v - before.get(k, 0) for k, v in stats.items()}
        self.phases.append(Phase(kind, iteration, ns, stats, delta))


def vcpu_schedstat(pids: list[int]) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) summed over processes, from /proc/PID/schedstat.

    What a process does not spend in either it spends asleep (a lock's semaphore, an
    idle poll).  (0, 0) where the kernel does not provide the file.
    """
    cpu = wait = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                run_ns, wait_ns = f.read().split()[:2]
            cpu += int(run_ns)
            wait += int(wait_ns)
        except (OSError, ValueError):
            continue
    return cpu, wait


def drive_phases(vm, sup: Launcher, opts: RunOptions,
                 progress: Callable[[str, int, int], None] | None = None) -> PhaseLog:
    """The phases of dirty_log_perf_test on started workers: populate, enable dirty logging, iterations
    (dirty memory, get dirty log, clear dirty log with manual protect), disable dirty logging.

    Iteration 1 populates.  With `workload == "dirty-log"`, dirty logging is enabled
    before iteration 2 and every later iteration is followed by a collection: with
    `opts.manual_protect` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + INITIALLY_SET, as the
    selftest uses it) a GET that only copies and a CLEAR over the whole slot, else a
    GET that clears.  Between phases, outside the timed windows, the dirty-log oracle
    checks that every page whose contents changed was reported.
    """
    log = PhaseLog()
    mmu = sup.mmu
    vcpu_pids = [sup.procs[i].pid for i in range(vm.config.n_vcpus) if i in sup.procs]

    def snapshot() -> dict[str, int]:
        st = sup.stats()
        st["vcpu_cpu_ns"], st["vcpu_runq_ns"] = vcpu_schedstat(vcpu_pids)
        return st

    log.base = snapshot()
    clock = time.perf_counter_ns
    tick = (lambda: progress("faults", sup.stats()["faults"], 0)) if progress else None
    logging = opts.workload == "dirty-log"
    n_iter = opts.iterations
    slots = range(len(vm.config.memslots))
    before: list = []
    for k in range(1, n_iter + 1):
        if logging and k == 2:
            t0 = clock()
            for s in slots:
                mmu.enable_dirty_logging(s, initially_set=opts.manual_protect)
            log.add("enable", 0, clock() - t0, snapshot())
            before = [guest_values(vm, s) for s in slots]
        t0 = clock()
        sup.run_iteration(k, on_wait=tick)
        log.add("populate" if k == 1 else "dirty", k, clock() - t0, snapshot())
        if progress:
            progress("iteration", k, n_iter)
        if logging and k >= 2:
            t0 = clock()
            bitmaps = [mmu.get_dirty_log(s, clear=not opts.manual_protect) for s in slots]
            log.add("get", k, clock() - t0, snapshot())
            if opts.manual_protect:
                t0 = clock()
                for s in slots:
                    mmu.clear_dirty_log(s, 0, bitmaps[s])
                log.add("clear", k, clock() - t0, snapshot())
            for s in slots:
                after = guest_values(vm, s)
                missed = dirty_log_missed(before[s], after, bitmaps[s], mmu.slots.read(s).base_gfn)
                for g in missed[:10]:
                    log.problems.append(f"dirty-log-missed: gfn {g:#x} changed in iteration {k} but was not "
                                        f"reported")
                before[s] = after
    if logging and n_iter >= 2:
        if opts.run_while_disabling:                 # -e: the vCPUs dirty memory on while logging goes
            sup.start_iteration(n_iter + 1)
        t0 = clock()
        for s in slots:
            mmu.disable_dirty_logging(s)
        log.add("disable", 0, clock() - t0, snapshot())
        if opts.run_while_disabling:
            sup.wait_iteration(n_iter + 1, on_wait=tick)
    return log


def run_vm(opts: RunOptions, launcher: LauncherFactory, progress: Callable[[str, int, int], None] | None = None,
           keep: Callable[[Launcher], None] | None = None, drive: Callable[..., PhaseLog] | None = None) -> RunResult:
    """Create the VM, start its processes with `launcher`, run the workload, check, tear down.

    `keep(launcher)` is called before stopping (`shmmmu run --keep` waits there).  `drive(vm, launcher, opts,
    progress)` runs the workload (default drive_phases: dirty_log_perf_test's phases; the selftest benches
    pass their own)."""
    config = opts.config()
    t_start = time.monotonic()
    with create_vm(config, free_name=opts.free_name) as vm:
        opts.name = vm.name
        sup = launcher(vm)
        try:
            sup.start()
            log = (drive or drive_phases)(vm, sup, opts, progress)
            if keep is not None:
                sup.stats()          # publish the supervisor's own counters first, for `shmmmu inspect`
                keep(sup)
            sup.stop()
            sup.drain()
            stats = sup.stats()
            rcu = vm.rcu.stats()
            problems = log.problems + check_guest_memory(vm)
            tables = table_counts(vm)
            left = sup.mmu.destroy()
            if left:
                problems.append(f"table-leak: {left} tables still on the page list after the VM was destroyed "
                                f"(kvm_mmu_uninit_tdp_mmu's WARN)")
            who = violations.worker_names(vm.config)
            found = [v.explained(who, vm.config.geometry.entries) for v in violations.read_all(vm.region)]
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()
    stats["populate_faults"] = log.phases[0].stats["faults"] if log.phases else 0
    options = {k: v for k, v in vars(opts).items() if k not in ("trace", "tracepoints", "free_name")}
    if opts.trace is not None:
        options["trace"] = {"format": opts.trace.format, "accesses": opts.trace.accesses,
                            "pages": opts.trace.pages, "threads": len(opts.trace.parts)}
    return RunResult(options=options,
                     phases=[(p.label, p.seconds) for p in log.phases], stats=stats,
                     rcu=rcu, tables=tables, problems=problems, violations=found,
                     wall_s=time.monotonic() - t_start, timed=log.phases)


@contextmanager
def converted_trace(path: str, fmt: str | None = None,
                    progress: Callable[[Progress], None] | None = None) -> Iterator[TraceInfo]:
    """The trace at `path` converted (shmmmu.trace.store) into a temporary file for the run, removed after it,
    also on an error or Ctrl-C; a file converted already (`shmmmu trace convert`) is used as it is.
    `progress` is told how far the conversion has come (shmmmu.trace.store.convert_stream)."""
    from shmmmu.trace.store import convert, is_converted, read_info
    if is_converted(path):
        yield read_info(path)
        return
    d = tempfile.mkdtemp(prefix=f"{PREFIX}trace-")
    try:
        yield convert(path, os.path.join(d, "trace.bin"), fmt, progress=progress)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- `shmmmu run`: its command line, prepared, run

@dataclass
class RunRequest:
    """`shmmmu run`'s command line as given: the size as text, what was left out as None."""
    name: str | None = None             # None: demo, or the first free of demo-2, demo-3, ...
    vcpus: int | None = None            # None: 2, or one per thread of a threaded trace
    memory: str = "256M"
    backing: str = "2m"
    lock_mode: str = "shared"
    overlap: bool = False
    workload: str = "dirty-log"
    trace: str | None = None
    trace_format: str | None = None
    tracepoints: str | None = None
    timeline: str | None = None         # --timeline FILE.json (shmmmu.trace.timeline)
    iterations: int = 3
    seed: int = 1
    debug: bool = False
    stall_timeout: float = 30.0
    kernel: str = "5.13"


class PreparedRun:
    """A run made ready: its options checked, its trace converted, its tracepoint directory made.  Leaving it
    (`with`) removes the converted trace and merges the tracepoint parts, however the run ended."""

    def __init__(self, options: RunOptions, stack: ExitStack):
        self.options = options
        self.asked_name = options.name
        self._stack = stack

    def __enter__(self) -> PreparedRun:
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)


def prepare_run(req: RunRequest, progress: Callable[[Progress], None] | None = None) -> PreparedRun:
    """Check `req` and make ready what its run needs, before any VM exists, in the order a user wants to hear
    of a mistake: an unwritable --tracepoints file and a bad size before a long trace conversion, the rest
    after it.  Raises a ValueError (UsageError, OutputError, TraceError) carrying the one line to say, and
    then leaves nothing behind.  `progress` is told how far the conversion has come."""
    from shmmmu.mmu.tracepoints import tracepoint_parts
    stack = ExitStack()
    try:
        for out in (req.tracepoints, req.timeline):
            if out:
                outfile.check(out)
        info, workload = None, req.workload
        if workload == "trace" or req.trace:
            if not req.trace:
                raise UsageError("--workload trace needs --trace FILE")
            workload = "trace"
            parse_size(req.memory)
            info = stack.enter_context(converted_trace(req.trace, req.trace_format, progress=progress))
        vcpus = req.vcpus
        if vcpus is None:
            vcpus = len(info.parts) if info is not None and info.threaded else 2
        opts = RunOptions(name=req.name or "demo", free_name=req.name is None, vcpus=vcpus,
                          memory=parse_size(req.memory), backing=req.backing.lower(), lock_mode=req.lock_mode,
                          overlap=req.overlap, workload=workload, trace=info, iterations=req.iterations,
                          seed=req.seed, debug=req.debug, kernel=req.kernel)
        opts.config()
        seconds(req.stall_timeout, "--stall-timeout")
        if req.tracepoints or req.timeline:
            opts.tracepoints = stack.enter_context(tracepoint_parts(req.tracepoints or None, req.timeline or None))
    except BaseException:
        stack.close()
        raise
    return PreparedRun(opts, stack)


def run_prepared(prepared: PreparedRun, launcher: LauncherFactory,
                 progress: Callable[[str, int, int], None] | None = None,
                 keep: Callable[[Launcher], None] | None = None,
                 renamed: Callable[[str, str], None] | None = None) -> RunResult:
    """`run_vm` of a prepared run; `renamed(asked, name)` is told, before any process starts, that the name
    asked for was taken and the VM got the next free one."""
    def launch(vm) -> Launcher:
        if renamed is not None and vm.name != prepared.asked_name:
            renamed(prepared.asked_name, vm.name)
        return launcher(vm)
    return run_vm(prepared.options, launch, progress=progress, keep=keep)


def keep_until_interrupted(sup: Launcher, period: float = 0.2) -> KeyboardInterrupt:
    """`run --keep`: watch the kept VM's processes (one that dies ends the wait as its error) until an
    interrupt, which is returned, not raised: the run goes on to stop, check and report."""
    try:
        while True:
            sup.check()
            time.sleep(period)
    except KeyboardInterrupt as e:
        return e
