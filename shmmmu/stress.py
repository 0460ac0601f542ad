"""Stress: rcutorture-style stress of the whole MMU from a seed, with every checker on, and the bug switches.

N vCPU processes read and write random pages of one shared range (faults,
splits, retries, hardware A/D updates, and now and then a kvm_zap_gfn_range
of their own, as a guest's MTRR write causes) while the supervisor runs host
operations drawn from the seed: zaps of random ranges, host unmaps that
migrate pages, dirty-log enable / harvest / disable (collapsible zaps),
deletion of the hot-plug memslot by fast invalidation and its re-adding,
zap-all, aging (the notifier's clear_flush_young and test_young); the notifier process migrates pages of the hot-plug slot through the
MMU notifier (yielding) meanwhile; the reclaimer ends grace periods.  The
vCPUs use two root roles by default, so two valid roots are walked by every
range operation, and invalidated roots coexist with their successors.
Checkers run all along (in the workers, in debug mode: Reader-Pipe ages,
installs into dead tables, stale translations, frozen entries overwritten,
lockdep assertions) and at the end (guest memory, table reachability and
accounting, the leak equation).  The dirty-log oracle follows dirty_log_test:
a page whose contents changed between two collections must be reported by
one of them or the next.

The same seed, vCPU count and duration give the same operation streams.
`shmmmu stress` is `prepare_stress` (the options checked, the tracepoint
directory made), then `run_stress`, then the report; `--list-bugs` is
`shmmmu.variants.bug_lines()`.
"""
from __future__ import annotations

import os
import random
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu import validate as V
from shmmmu import violations
from shmmmu.variants import check_names
from shmmmu.checks import check_all
from shmmmu.integrity import check_guest_memory, guest_values
from shmmmu.launch import LauncherFactory, LockStuck, WorkerDied
from shmmmu.layout import Ctl, MemslotSpec, VMConfig, Workload, WState
from shmmmu.vm import create_vm

OPS = ["zap-range", "host-unmap", "dirty-log", "zap-all", "memslot", "flush", "age"]


@dataclass
class StressOptions:
    duration: float = 10.0
    vcpus: int = 4
    seed: int = 1
    bits: int = 3                       # 8-entry tables: deep trees from small memory (radix-tree tests' SHIFT=3)
    pages: int = 0                      # guest pages (0: derived from bits)
    backing: int = 2
    lock_mode: str = "shared"
    bugs: list[str] = field(default_factory=list)
    kill_every: float = 0.0
    progress_bound: float = 30.0
    gp_bound: float = 10.0
    name: str = ""
    ops: list[str] = field(default_factory=lambda: list(OPS))
    nx_huge_pages: bool = False         # vCPUs also fetch instructions; the reclaimer runs NX recovery
    nx_recovery_period: float = 0.25    # seconds between NX recovery passes (with nx_huge_pages)
    torture_delay_us: int = 200         # rcutorture-style pauses inside windows (VMConfig.torture_delay_us)
    root_roles: int = 2                 # vCPU i uses root role i % root_roles
    tracepoints: str = ""               # --tracepoints: where workers write their parts (shmmmu.mmu.tracepoints)

    def config(self) -> VMConfig:
        check_names(self.bugs)
        V.seconds(self.duration, "--duration")
        V.seed(self.seed)
        V.choice(self.lock_mode, "--lock-mode", ("shared", "exclusive"))
        if self.kill_every:
            V.seconds(self.kill_every, "--kill-every", lo=0.05)      # 0: no kills
        V.seconds(self.progress_bound, "progress bound")
        V.seconds(self.gp_bound, "grace-period bound")
        if not 1 <= self.vcpus <= 64:
            raise ValueError("--vcpus must be between 1 and 64")
        if not 0 <= self.torture_delay_us <= 1_000_000:
            raise ValueError("--torture-delay-us must be between 0 and 1000000")
        if self.bits not in (3, 9):
            raise ValueError("--bits must be 3 (test tables of 8 entries) or 9 (512)")
        if not 1 <= self.root_roles <= 8:
            raise ValueError("--root-roles must be between 1 and 8")
        pages = self.pages or (2048 if self.bits == 3 else 1 << 14)
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
        name = self.name or f"stress-{os.getpid()}"
        hot = hot_pages(pages)
        # with the NX mitigation the guests fetch instructions too: what the mitigation is about
        wl = Workload(kind="stress", pages=pages + hot, overlap=True, n_vcpus=1, accesses=512, write_fraction=0.5,
                      exec_fraction=0.05 if self.nx_huge_pages else 0.0, zap_every=16,
                      hot_pages=hot, hot_fraction=0.5)
        return VMConfig(name=name, n_vcpus=self.vcpus, n_host=3 if "host-unmap" in self.ops else 2,
                        bits=self.bits, lock_mode=self.lock_mode,
                        memslots=[MemslotSpec(0, pages, self.backing), MemslotSpec(pages, hot, self.backing)],
                        debug=True, bugs=list(self.bugs), root_roles=self.root_roles,
                        seed=self.seed, workload=wl, tlb_entries=256, nx_huge_pages=self.nx_huge_pages,
                        nx_recovery_period_s=self.nx_recovery_period, torture_delay_us=self.torture_delay_us,
                        gp_stall_s=self.gp_bound, tracepoints=self.tracepoints)

    def replay_command(self) -> str:
        cmd = (f"shmmmu stress --seed {self.seed} --vcpus {self.vcpus} --duration {self.duration:g} "
               f"--bits {self.bits} --lock-mode {self.lock_mode}")
        for b in self.bugs:
            cmd += f" --bug {b}"
        if self.kill_every:
            cmd += f" --kill-every {self.kill_every:g}"
        if self.nx_huge_pages:
            cmd += " --nx-huge-pages"
        if self.torture_delay_us != StressOptions.torture_delay_us:
            cmd += f" --torture-delay-us {self.torture_delay_us}"
        if self.root_roles != StressOptions.root_roles:
            cmd += f" --root-roles {self.root_roles}"
        return cmd


def prepare_stress(opts: StressOptions, tracepoints: str | None = None) -> ExitStack:
    """Check the options (a ValueError carrying the one line to say) and make the directory the workers write
    their tracepoint parts in (opts.tracepoints); leaving the returned stack merges them into `tracepoints`."""
    from shmmmu.mmu.tracepoints import tracepoint_parts
    stack = ExitStack()
    opts.config()
    if tracepoints:
        opts.tracepoints = stack.enter_context(tracepoint_parts(tracepoints))
    return stack


def hot_pages(pages: int) -> int:
    """The hot-plug memslot (slot 1, right after slot 0): an eighth of the main slot, at least 64 pages."""
    return max(64, pages // 8)


def start_line(o: dict[str, Any]) -> str:
    """rcutorture's "--- Start of test" line: every parameter of the run."""
    return (f"--- Start of test: vcpus={o['vcpus']} duration={o['duration']} seed={o['seed']} "
            f"bits={o['bits']} pages={o['pages']} lock_mode={o['lock_mode']} bugs={','.join(o['bugs']) or '-'} "
            f"kill_every={o['kill_every']} nx_huge_pages={o['nx_huge_pages']} "
            f"torture_delay_us={o['torture_delay_us']} root_roles={o['root_roles']} ops={','.join(o['ops'])}")


@dataclass
class StressResult:
    options: dict[str, Any]
    ops: dict[str, int]
    stats: dict[str, int]
    rcu: dict[str, int]
    pipe: list[int]
    problems: list[str]
    kills: int
    duration_s: float
    replay: str
    first_violation_s: float | None = None   # when a checker first fired, from the start (None: never;
                                             # a problem found only by the end checks counts at the end)

    @property
    def ok(self) -> bool:
        return not self.problems

    def violated(self) -> list[str]:
        """The kinds of invariant violated (the text before the first colon of each problem)."""
        return sorted({p.split(":")[0].strip("! ") for p in self.problems})

    def to_json(self) -> dict[str, Any]:
        return {"options": self.options, "ops": self.ops, "stats": self.stats, "rcu": self.rcu,
                "reader_pipe": self.pipe, "problems": self.problems, "violated": self.violated(),
                "kills": self.kills, "duration_s": self.duration_s, "replay": self.replay,
                "first_violation_s": self.first_violation_s,
                "result": "SUCCESS" if self.ok else "FAILURE"}

    def report(self, header: bool = True) -> list[str]:
        """The report's lines; `header=False` leaves out the parameter line already printed at the start."""
        s = self.stats
        lines = [start_line(self.options)] if header else []
        lines.append("ops: " + " ".join(f"{k}={v}" for k, v in self.ops.items()))
        lines.append(f"faults={s['faults']} fixed={s['fixed']} spurious={s['spurious']} retries={s['retries']} "
                     f"emulated={s['emulated']} "
                     f"cas_failures={s['cas_failures']} removed_seen={s['removed_seen']} "
                     f"link_races={s['link_races']} huge_splits={s['huge_splits']}")
        lines.append(f"accesses={s['accesses']} tlb_hits={s['tlb_hits']} hw_walks={s['hw_walks']} "
                     f"flushes={s['flushes']} yields={s['yields']} dirty_marked={s['dirty_marked']} "
                     f"kills={self.kills}")
        lines.append(f"roots: allocated={s['roots_allocated']} freed={s['roots_freed']} loads={s['root_reloads']} "
                     f"fast_zaps={s['fast_zaps']} faults_during_fast_zap={s['faults_during_fast_zap']} "
                     f"stale_root_retries={s['stale_root_retries']} notifier_retries={s['notifier_retries']}")
        gps = self.rcu["grace_periods"]
        lines.append(f"grace periods: {gps} ({gps / max(self.duration_s, 1e-9):.1f}/s), longest "
                     f"{self.rcu['gp_max_ns'] / 1e6:.2f} ms, largest retire backlog {self.rcu['backlog_max']}")
        lines.append(f"lock: waits {s['lock_contended']} total {s['lock_wait_ns'] / 1e6:.1f} ms, longest "
                     f"{s['lock_wait_max_ns'] / 1e6:.1f} ms, needbreak seen {s['needbreak_seen']}; TLB flush: "
                     f"longest wait {s['flush_wait_max_ns'] / 1e6:.1f} ms")
        lines.append("Reader Pipe: " + " ".join(str(x) for x in self.pipe))
        for p in self.problems[:50]:
            lines.append(f"!!! {p}")
        if self.problems:
            lines.append(f"replay: {self.replay}")
        lines.append(f"End of test: {'SUCCESS' if self.ok else 'FAILURE'}: {self.replay}")
        return lines


class _DirtyOracle:
    """dirty_log_test's rule: what changed between two collections is reported by one of them or the next."""

    def __init__(self, vm):
        self.vm = vm
        self.prev_changed: np.ndarray | None = None
        self.prev_bits: np.ndarray | None = None
        self.values = guest_values(vm)

    def collect(self, bitmap: np.ndarray, base_gfn: int) -> list[str]:
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: self.values.size].astype(bool)
        now = guest_values(self.vm)
        changed = now != self.values
        problems = []
        if self.prev_changed is not None:
            missed = self.prev_changed & ~self.prev_bits & ~bits
            for i in np.flatnonzero(missed)[:5]:
                problems.append(f"dirty-log-missed: gfn {base_gfn + int(i):#x} was written and never reported")
        self.prev_changed, self.prev_bits, self.values = changed, bits, now
        return problems


def harvest(mmu, manual: bool) -> np.ndarray:
    """One collection: KVM_GET_DIRTY_LOG, or with manual protect GET (copy) then CLEAR (re-protect)."""
    if manual:
        bitmap = mmu.get_dirty_log(0, clear=False)
        mmu.clear_dirty_log(0, 0, bitmap)
        return bitmap
    return mmu.get_dirty_log(0)


def run_stress(opts: StressOptions, launcher: LauncherFactory,
               log: Callable[[str], None] | None = None) -> StressResult:
    """The stress run: a VM whose processes `launcher` starts, the host operations from the seed, every checker."""
    config = opts.config()
    rng = random.Random(opts.seed)
    ops = {k: 0 for k in OPS}
    kills = 0
    problems: list[str] = []
    pages = config.memslots[0].npages
    hot = config.memslots[1].npages
    t_begin = time.monotonic()
    if log:
        log(start_line({**vars(opts), "pages": pages}))
    with create_vm(config) as vm:
        sup = launcher(vm)
        try:
            sup.start()
            sup.lock_bound = opts.progress_bound
            mmu = sup.mmu
            progress_ns = vm.region.columns("wstate", WState).progress_ns
            vm.region.words("ctl").store(Ctl.ITERATION, 1)     # a stress iteration runs until Ctl.STOP
            logging = False
            manual = False
            stuck = False
            oracle: _DirtyOracle | None = None
            t_end = time.monotonic() + opts.duration
            next_kill = time.monotonic() + opts.kill_every if opts.kill_every else None
            last_report = time.monotonic()
            while time.monotonic() < t_end:
                try:
                    sup.check()
                    op = rng.choice(opts.ops)
                    ops[op] += 1
                    a = rng.randrange(pages)
                    b = min(pages, a + rng.choice([1, 8, 64, 512, pages]))
                    if op == "zap-range":
                        mmu.zap_gfn_range_locked(a, min(a + (b - a) * 2, pages + hot))
                    elif op == "host-unmap":
                        mmu.host_unmap(a, b)              # slot 0 (the notifier process migrates slot 1)
                    elif op == "zap-all":
                        mmu.zap_all()
                    elif op == "flush":
                        mmu.flush_remote_tlbs()
                    elif op == "age":
                        # clear_flush_young, then test_young: half of them on the hot-plug slot, which the
                        # notifier process keeps unmapping under the write lock
                        lo = rng.randrange(pages, pages + hot) if rng.random() < 0.5 else rng.randrange(pages + hot)
                        hi = min(pages + hot, lo + rng.choice([8, 64, 512, pages]))
                        mmu.clear_young(lo, hi)
                        mmu.test_young(lo, hi)
                    elif op == "memslot":
                        mmu.delete_memslot(1)             # fast invalidation of every root
                        time.sleep(0.002)
                        mmu.add_memslot(1)
                    elif op == "dirty-log":
                        if not logging:
                            manual = rng.random() < 0.5       # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + INITIALLY_SET
                            mmu.enable_dirty_logging(0, initially_set=manual)
                            oracle = _DirtyOracle(vm)
                            logging = True
                        else:
                            problems += oracle.collect(harvest(mmu, manual), 0)
                            if rng.random() < 0.25:
                                mmu.disable_dirty_logging(0)
                                logging = False
                                oracle = None
                except LockStuck as e:
                    problems.append(str(e))
                    stuck = True
                    break
                except WorkerDied as e:
                    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                    problems.append(f"worker-crashed: {lines[0]}")
                    if len(lines) > 1:
                        problems.append(f"worker-crashed: its last words: {lines[-1]}")
                    stuck = True
                    break
                time.sleep(rng.random() * 0.002)
                now = time.monotonic()
                # forward progress: every vCPU advanced within the bound
                for i in range(opts.vcpus):
                    last = progress_ns.load(i)
                    if last and now * 1e9 - last > opts.progress_bound * 1e9:
                        violations.record(vm.region, "no-forward-progress", i, 0, last, int(now * 1e9))
                if next_kill is not None and now >= next_kill:
                    victim = rng.randrange(opts.vcpus)
                    p = sup.procs.pop(victim)            # no longer one of the workers the run needs
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
                    for line in sup.recover(victim):
                        if log:
                            log(f"recovered: {line}")
                    sup.restart(victim)
                    kills += 1
                    next_kill = now + opts.kill_every
                if log and now - last_report >= 5:
                    st = sup.stats()
                    log(f"{now - t_begin:6.1f}s faults={st['faults']} retries={st['retries']} "
                        f"violations={violations.count(vm.region)}")
                    last_report = now
            if logging and not stuck:
                problems += oracle.collect(harvest(mmu, manual), 0)
                mmu.disable_dirty_logging(0)
            sup.stop()
            sup.drain()
            stats = sup.stats()
            rcu = vm.rcu.stats()
            pipe = [int(x) for x in vm.region.array("pipe").sum(axis=0)]
            if any(pipe[2:]):
                problems.append(f"use-after-free: Reader Pipe has {sum(pipe[2:])} reads past bucket 1")
            recorded = violations.read_all(vm.region)
            who = violations.worker_names(vm.config)
            problems += [f"{v.kind}: worker {v.worker} gfn {v.gfn:#x} ({v.a:#x}, {v.b:#x}): "
                         f"{v.sentence(who, vm.config.geometry.entries)}" for v in recorded]
            first_violation = (min(v.time_ns for v in recorded) / 1e9 - t_begin) if recorded else None
            problems += check_guest_memory(vm)
            crashed = any(p.startswith("worker-crashed") for p in problems)
            problems += [str(p) for p in check_all(vm, stats=kills == 0 and not crashed)]
            if not stuck:
                left = mmu.destroy()
                if left:
                    problems.append(f"table-leak: {left} tables still on the page list after the VM was "
                                    f"destroyed (kvm_mmu_uninit_tdp_mmu's WARN)")
        except BaseException:
            sup.kill_all()
            raise
        finally:
            sup.cleanup_logs()
    elapsed = time.monotonic() - t_begin
    options = {k: v for k, v in vars(opts).items() if k != "tracepoints"}     # (a temporary directory)
    return StressResult(options={**options, "pages": pages}, ops=ops, stats=stats, rcu=rcu, pipe=pipe,
                        problems=problems, kills=kills, duration_s=elapsed,
                        first_violation_s=first_violation if first_violation is not None
                        else (elapsed if problems else None),
                        replay=opts.replay_command())
