"""Torture programs: the parent that starts a lock or RCU torture run, and the worker processes it starts.

`run_lock_torture` and `run_rcu_torture` create a torture region
(shmmmu.torture.torture_config), start their workers as `python -m
shmmmu.workers.torture worker lock|rcu|hold ...`, let them run for the duration,
stop and join them, and return the result shmmmu.torture reports.  The
`shmmmu torture lock|rcu` command (workers/cli/torture.py) calls them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import IO, Callable

from shmmmu.layout import (PIPE_LEN, Ctl, Locks, Role, TMeta, TortureCtl as TC, TortureStat as TR, VMConfig,
                           WState)
from shmmmu.region import Region
from shmmmu.rwlock import RWLock
from shmmmu.spawn import python_module_command, worker_env
from shmmmu.torture import (PTR_TABLE_BITS, PTR_TABLE_MASK, LockTortureResult, RcuTortureResult, census,
                            new_seed, tag, torture_config, torture_rng)

START_TIMEOUT = 60.0     # seconds for every worker to attach (2 cores, 9 interpreters importing numpy)
STOP_TIMEOUT = 15.0      # seconds for every worker to finish after the stop flag
MINUS_ONE = (1 << 64) - 1


# ====================================================================== the parent


class _Run:
    """The parent's side of one torture run: the region, the worker processes, start and stop."""

    def __init__(self, program: str, n_workers: int, config: VMConfig):
        self.program = program
        self.config = config
        from shmmmu.vm import create_region
        self.region = create_region(config)
        self.procs: list[tuple[int, subprocess.Popen, IO[str]]] = []
        self.reported: set[int] = set()        # workers whose early exit is already an error
        self.ctl = self.region.words("tables")     # row ROOT_TABLE is the control block
        self.stats = self.region.words("stats")
        self.nstats = self.region.array("stats").shape[1]
        self.ws = self.region.words("wstate")
        self.errors: list[str] = []
        self.parent = config.host_worker
        self.region.columns("wstate", WState).pid.store(self.parent, os.getpid())
        self.t_go = 0.0
        self.t_stop = 0.0

    def stat(self, worker: int, idx: int) -> int:
        return self.stats.load(worker * self.nstats + idx)

    def spawn(self, worker: int, args: list[str]) -> None:
        err = tempfile.TemporaryFile(mode="w+")
        cmd = python_module_command("shmmmu.workers.torture", "worker", self.program, f"--region={self.config.name}",
                                    "--worker", str(worker), *args)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=worker_env())
        self.procs.append((worker, p, err))

    def start(self) -> None:
        """Wait until every worker has attached, then open the start barrier."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.ctl.load(TC.READY) < len(self.procs):
            if self._check_exits(early=True):
                break
            if time.monotonic() > deadline:
                self.errors.append(f"workers did not attach within {START_TIMEOUT:.0f}s")
                break
            time.sleep(0.005)
        self.t_go = time.monotonic()
        self.ctl.store(TC.GO, 1)

    def run_for(self, duration: float, on_dead: Callable[[int], None] | None = None) -> None:
        """Let the workers run; a worker that dies early is a failure, and its holds are recovered."""
        end = self.t_go + duration
        while time.monotonic() < end and not self.errors:
            if self._check_exits(early=True, on_dead=on_dead):
                break
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        self.t_stop = time.monotonic()
        self.ctl.store(TC.STOP, 1)

    def _check_exits(self, early: bool, on_dead: Callable[[int], None] | None = None) -> bool:
        found = False
        for k, p, err in self.procs:
            rc = p.poll()
            if rc is not None and early and k not in self.reported:
                self.reported.add(k)
                self.errors.append(f"worker {k} (pid {p.pid}) exited early with {_rc_text(rc)}{_tail(err)}")
                if on_dead is not None:
                    on_dead(k)
                found = True
        return found

    def join(self, on_dead: Callable[[int], None] | None = None) -> None:
        """Wait for every worker to finish; kill (and recover) those that do not."""
        deadline = time.monotonic() + STOP_TIMEOUT
        for k, p, err in self.procs:
            try:
                rc = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
                self.errors.append(f"worker {k} (pid {p.pid}) did not stop within {STOP_TIMEOUT:.0f}s "
                                   f"(killed){_tail(err)}")
                if on_dead is not None:
                    on_dead(k)
                continue
            if k in self.reported:
                continue
            if rc != 0:
                self.errors.append(f"worker {k} (pid {p.pid}) exited with {_rc_text(rc)}{_tail(err)}")
                if on_dead is not None:
                    on_dead(k)
            elif not self.stat(k, TR.DONE):
                self.errors.append(f"worker {k} (pid {p.pid}) exited without finishing")

    def close(self) -> None:
        for _, p, err in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
        self.procs = []
        self.region.close()
        self.region.unlink()


def _rc_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def _tail(err: IO[str]) -> str:
    try:
        err.seek(0)
        text = err.read().strip()
    except (OSError, ValueError):
        return ""
    if not text:
        return ""
    return ": " + " | ".join(text.splitlines()[-3:])


def _region_name(program: str) -> str:
    return f"torture-{program}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run_lock_torture(nreaders: int = 2, nwriters: int = 2, duration: float = 2.0, seed: int | None = None,
                     busted: bool = False) -> LockTortureResult:
    """Run lock torture: `nreaders` + `nwriters` processes on one MMU RWLock for `duration` seconds."""
    if nwriters < 1 or nreaders < 0:
        raise ValueError("lock torture needs at least one writer")
    seed = new_seed() if seed is None else seed
    n = nreaders + nwriters
    config = torture_config(_region_name("lock"), n, seed=seed)
    res = LockTortureResult(seed=seed, nreaders=nreaders, nwriters=nwriters, duration=duration, busted=busted)
    run = _Run("lock", n, config)
    try:
        lock = RWLock(run.region, Locks.MMU, run.parent)

        def on_dead(k: int) -> None:
            for line in lock.recover(k):
                run.errors.append(f"recovered: {line}")

        common = ["--seed", str(seed), *(["--busted"] if busted else [])]
        for k in range(n):
            run.spawn(k, ["--role", "writer" if k < nwriters else "reader", *common])
        run.start()
        run.run_for(duration, on_dead)
        run.join(on_dead)
        res.elapsed = max(1e-9, run.t_stop - run.t_go)
        for k in range(n):
            ops = run.stat(k, TR.OPS)
            if k < nwriters:
                res.write_counts.append(ops)
                res.write_fails += run.stat(k, TR.FAIL)
            else:
                res.read_counts.append(ops)
                res.read_fails += run.stat(k, TR.FAIL)
            res.longest_wait_ns = max(res.longest_wait_ns, run.stat(k, TR.WAIT_MAX_NS))
            res.contended += run.stat(k, TR.CONTENDED)
            res.needbreak_seen += run.stat(k, TR.NEEDBREAK)
            res.yields += run.stat(k, TR.YIELDS)
            res.long_holds += run.stat(k, TR.LONG_HOLDS)
        res.max_readers = run.ctl.load(TC.READERS_MAX)
        st = lock.state()
        if not busted and (st["readers"] or st["write_locked"] or st["writer_waiting"] or st["queue"]):
            run.errors.append(f"the lock is not free after the run: {st}")
        res.errors = run.errors
    finally:
        run.close()
    return res


def run_rcu_torture(nreaders: int = 2, nwriters: int = 1, duration: float = 2.0, seed: int | None = None,
                    grace_period: bool = True, n_tables: int = 0) -> RcuTortureResult:
    """Run RCU torture: `nreaders` + `nwriters` processes and a reclaimer for `duration` seconds."""
    if nwriters < 1 or nreaders < 1:
        raise ValueError("RCU torture needs at least one reader and one writer")
    seed = new_seed() if seed is None else seed
    n = nreaders + nwriters
    config = torture_config(_region_name("rcu"), n, debug=True, n_tables=n_tables, seed=seed)
    res = RcuTortureResult(seed=seed, nreaders=nreaders, nwriters=nwriters, duration=duration,
                           grace_period=grace_period)
    run = _Run("rcu", n, config)
    try:
        from shmmmu.pool import Pool
        from shmmmu.rcu import Rcu
        config = config.derived()
        pool = Pool(run.region, run.parent, config)
        pool.init_all_free()
        rcu = Rcu(run.region, run.parent)
        # the first current table, allocated by the parent
        pool.topup()
        first = pool.alloc(1, 0)
        run.region.array("tables")[first, :] = tag(0)
        run.ctl.store(TC.CURRENT, first)
        res.allocated = 1

        def on_dead(k: int) -> None:
            for line in rcu.recover(k):
                run.errors.append(f"recovered: {line}")

        common = ["--seed", str(seed), *([] if grace_period else ["--no-gp"])]
        for k in range(n):
            run.spawn(k, ["--role", "writer" if k < nwriters else "reader", *common])
        reclaimer = config.reclaimer_worker
        run.spawn(reclaimer, ["--role", "reclaimer", "--nworkers", str(n), *common])
        run.start()
        run.run_for(duration, on_dead)
        run.join(on_dead)
        res.elapsed = max(1e-9, run.t_stop - run.t_go)
        pipe = run.region.array("pipe")
        for k in range(n):
            if k < nwriters:
                res.update_counts.append(run.stat(k, TR.OPS))
                res.allocated += run.stat(k, TR.ALLOCATED)
                res.alloc_fails += run.stat(k, TR.ALLOC_FAIL)
            else:
                res.read_counts.append(run.stat(k, TR.OPS))
                res.poison_reads += run.stat(k, TR.POISON)
                res.stale_reads += run.stat(k, TR.STALE)
        res.pipe = [int(x) for x in pipe.sum(axis=0)]
        res.freed = run.stat(reclaimer, TR.FREED)
        st = rcu.stats()
        res.grace_periods, res.gp_max_ns = st["grace_periods"], st["gp_max_ns"]
        res.backlog_max, res.pending = st["backlog_max"], st["backlog"]
        res.reachable = 1
        res.census, res.census_ok = census(run.region, config, pool, res.pending)
        res.errors = run.errors
    finally:
        run.close()
    return res


# ====================================================================== the workers


class _Worker:
    def __init__(self, program: str, region_name: str, worker: int, seed: int, role: int):
        self.region = Region.attach(region_name)
        from shmmmu.vm import VM
        self.vm = VM(self.region)
        self.vm.register(worker, role)
        self.config = VMConfig.from_json(self.region.config)
        self.k = worker
        self.rng = torture_rng(seed, program, worker)
        self.ctl = self.region.words("tables")
        self.st = self.region.words("stats")
        self.row = worker * self.region.array("stats").shape[1]
        self.parent = os.getppid()
        self.polls = 0

    def put(self, idx: int, value: int) -> None:
        self.st.store(self.row + idx, value)

    def add(self, idx: int, delta: int = 1) -> None:
        self.st.fetch_add(self.row + idx, delta)

    def wait_go(self) -> None:
        self.ctl.fetch_add(TC.READY, 1)
        while not self.ctl.load(TC.GO):
            if os.getppid() != self.parent:
                raise SystemExit("torture worker: the parent died before the start")
            time.sleep(0.001)

    def stopped(self) -> bool:
        """The stop flag is up, or the parent died (then nobody would ever raise it)."""
        self.polls += 1
        if self.polls & 255 == 0 and os.getppid() != self.parent:
            return True
        return self.ctl.load(TC.STOP) != 0

    def finish(self) -> None:
        self.put(TR.DONE, 1)
        self.vm.close()


def _spin_us(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def _cas_max(w, idx: int, value: int) -> None:
    while True:
        cur = w.load(idx)
        if value <= cur or w.cas(idx, cur, value) == cur:
            return


def lock_worker(region_name: str, worker: int, seed: int, role: str, busted: bool = False) -> None:
    """One locktorture thread: `role` is writer or reader."""
    me = _Worker("lock", region_name, worker, seed, Role.VCPU)
    lock = RWLock(me.region, Locks.MMU, worker, busted=busted)
    rng, ctl = me.rng, me.ctl
    writer = role == "writer"
    ops = fails = wait_max = long_holds = max_readers = 0

    def check() -> int:
        """Who else is inside?  Writers: nobody; readers: no writer."""
        if writer:
            return int(ctl.load(TC.WRITERS_IN) != 1 or ctl.load(TC.READERS_IN) != 0)
        return int(ctl.load(TC.WRITERS_IN) != 0)

    def enter() -> int:
        nonlocal max_readers
        if writer:
            return int(ctl.fetch_add(TC.WRITERS_IN, 1) != 0) + check()
        n = ctl.fetch_add(TC.READERS_IN, 1) + 1
        if n > max_readers:
            max_readers = n
            _cas_max(ctl, TC.READERS_MAX, n)
        return check()

    def leave() -> None:
        ctl.fetch_add(TC.WRITERS_IN if writer else TC.READERS_IN, MINUS_ONE)

    lock_fn, unlock_fn = (lock.write_lock, lock.write_unlock) if writer else (lock.read_lock, lock.read_unlock)
    resched = lock.cond_resched_write if writer else lock.cond_resched_read
    # odds and lengths: writers hold briefly and rarely long; readers hold longer so that they overlap
    p_long = 1 / 100 if writer else 1 / 40
    short_us = 20 if writer else 60
    me.wait_go()
    while not me.stopped():
        t0 = time.monotonic_ns()
        lock_fn()
        dt = time.monotonic_ns() - t0
        if dt > wait_max:
            wait_max = dt
        fails += enter()
        if rng.random() < p_long:
            # a long hold: a range operation that yields when someone waits (cond_resched_*)
            long_holds += 1
            for _ in range(rng.randint(2, 6)):
                time.sleep(0.0005)
                fails += check()
                leave()                   # resched may drop the lock: we are not inside meanwhile
                resched()
                fails += enter()
        else:
            _spin_us(rng.random() * short_us)
        fails += check()
        leave()
        unlock_fn()
        ops += 1
        me.put(TR.OPS, ops)
        if fails:
            me.put(TR.FAIL, fails)
        if rng.random() < 0.5:
            os.sched_yield()
    me.put(TR.WAIT_MAX_NS, wait_max)
    me.put(TR.CONTENDED, lock.stats.contended)
    me.put(TR.NEEDBREAK, lock.stats.needbreak_seen)
    me.put(TR.YIELDS, lock.stats.yields)
    me.put(TR.LONG_HOLDS, long_holds)
    me.put(TR.MAX_READERS, max_readers)
    me.finish()


def rcu_worker(region_name: str, worker: int, seed: int, role: str, grace_period: bool = True,
               nworkers: int = 0) -> None:
    """One rcutorture thread: `role` is writer, reader or reclaimer."""
    from shmmmu.pool import POISON, PoolExhausted, Pool
    from shmmmu.rcu import Rcu, pipe_age
    me = _Worker("rcu", region_name, worker, seed, Role.RECLAIMER if role == "reclaimer" else Role.VCPU)
    config = me.config
    rcu = Rcu(me.region, worker)
    pool = Pool(me.region, worker, config)
    rng, ctl = me.rng, me.ctl
    tables = me.region.array("tables")
    tmeta = me.region.columns("tmeta", TMeta)
    gctl = me.region.words("ctl")
    my_rcu = me.region.columns("wstate", WState).rcu
    me.wait_go()
    if role == "writer":
        ops = fails = 0
        while not me.stopped():
            try:
                pool.topup(wait=2.0)
            except PoolExhausted:
                fails += 1
                me.put(TR.ALLOC_FAIL, fails)
                continue
            t = pool.alloc(1, 0)
            ops += 1
            seq = (worker << 32) | ops
            tables[t, :] = tag(seq)                          # ours alone until published
            old = ctl.xchg(TC.CURRENT, (seq << PTR_TABLE_BITS) | t)
            rcu.call_rcu(old & PTR_TABLE_MASK)
            me.put(TR.OPS, ops)
            me.put(TR.ALLOCATED, ops)
            r = rng.random()
            if r < 0.3:
                time.sleep(0.0002)
            elif r < 0.8:
                os.sched_yield()
    elif role == "reader":
        ops = poison = stale = 0
        pw = me.region.words("pipe")
        prow = worker * PIPE_LEN
        while not me.stopped():
            rcu.read_lock()
            my_epoch = my_rcu.load(worker)
            ptr = ctl.load(TC.CURRENT)
            t, seq = ptr & PTR_TABLE_MASK, ptr >> PTR_TABLE_BITS
            r = rng.random()
            if r < 0.002:
                time.sleep(0.002)                            # rcutorture's rare long reader delay
            elif r < 0.05:
                os.sched_yield()                             # ... and a preemption now and then
            row = tables[t]
            want = tag(seq)
            if not (row == want).all():
                if (row == POISON).any():
                    poison += 1
                    me.put(TR.POISON, poison)
                else:
                    stale += 1
                    me.put(TR.STALE, stale)
            age = pipe_age(tmeta.state.load(t), tmeta.retire_epoch.load(t), my_epoch, gctl.load(Ctl.EPOCH))
            rcu.read_unlock()
            b = prow + min(age, PIPE_LEN - 1)
            pw.store(b, pw.load(b) + 1)
            ops += 1
            me.put(TR.OPS, ops)
    else:   # reclaimer
        freed = timeouts = 0

        def free(batch: list[int]) -> None:
            nonlocal freed
            pool.free(batch)
            freed += len(batch)
            me.put(TR.FREED, freed)

        def one_pass() -> int:
            nonlocal timeouts
            before = gctl.load(Ctl.GP_COUNT)
            n = rcu.reclaim_pass(free, timeout=1.0, wait_for_gp=grace_period)
            if n == 0 and rcu.backlog() and gctl.load(Ctl.GP_COUNT) == before:
                timeouts += 1
                me.put(TR.GP_TIMEOUTS, timeouts)
            return n

        while not me.stopped():
            if one_pass() == 0:
                time.sleep(0.0002)
        # drain: the workers are finishing their last sections
        deadline = time.monotonic() + 3.0
        while rcu.backlog() and time.monotonic() < deadline:
            if one_pass() == 0:
                time.sleep(0.001)
    me.finish()


def hold_worker(region_name: str, worker: int, what: str) -> None:
    """Take something and keep it until killed (for the SIGKILL tests): write, read, or rcu."""
    me = _Worker("hold", region_name, worker, 0, Role.HOST)
    if what == "rcu":
        from shmmmu.rcu import Rcu
        held = Rcu(me.region, worker)
        held.read_lock()
    else:
        lock = RWLock(me.region, Locks.MMU, worker)
        (lock.write_lock if what == "write" else lock.read_lock)()
    me.ctl.fetch_add(TC.HOLDING, 1)
    while os.getppid() == me.parent:          # until killed, or orphaned (then just go)
        time.sleep(0.2)


# ====================================================================== command line


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m shmmmu.workers.torture worker")
    p.add_argument("program", choices=["lock", "rcu", "hold"])
    p.add_argument("--region", required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--role", default="reader")
    p.add_argument("--busted", action="store_true")
    p.add_argument("--no-gp", action="store_true")
    p.add_argument("--nworkers", type=int, default=0)
    a = p.parse_args(argv)
    if a.program == "lock":
        lock_worker(a.region, a.worker, a.seed, a.role, a.busted)
    elif a.program == "rcu":
        rcu_worker(a.region, a.worker, a.seed, a.role, not a.no_gp, a.nworkers)
    else:
        hold_worker(a.region, a.worker, a.role)
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] != ["worker"]:
        sys.exit("usage: python -m shmmmu.workers.torture worker lock|rcu|hold ... (started by shmmmu torture)")
    sys.exit(_worker_main(argv[1:]))
