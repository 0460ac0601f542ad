"""Bench: `shmmmu bench dirty-log|access-tracking`: the kernel's perf tests on the emulator (shmmmu.bench, shmmmu.access_tracking)."""
from __future__ import annotations

from typing import Annotated, Any, Callable

import typer

from shmmmu.workers.cli.common import Timeline, fail_on, group, running_a_vm

bench_app = group("bench", "Benchmarks: the kernel's own measurements on the emulator.")

Vcpus = Annotated[int, typer.Option("-v", "--vcpus", help="vCPU worker processes (the selftest's -v).")]
Backing = Annotated[str, typer.Option("-s", "--backing", help="backing source: anonymous, anonymous_thp, "
                                      "anonymous_hugetlb (or 4k, 2m, 1g).")]
Repeat = Annotated[int, typer.Option("--repeat", help="runs per mode; the summary takes their median.")]
Seed = Annotated[int, typer.Option("--seed", help="seed of the VM's random choices.")]
JsonOut = Annotated[bool, typer.Option("--json", help="every run, medians and ratios as one JSON object.")]


@bench_app.command("dirty-log")
def bench_dirty_log(
    vcpus: Vcpus = 1,
    bytes_per_vcpu: Annotated[str, typer.Option("-b", "--bytes", help="guest memory per vCPU, K/M/G suffixes "
                                                "(the selftest's -b; its default 1G is too big for a small "
                                                "machine, so 128M here).")] = "128M",
    iterations: Annotated[int, typer.Option("-i", "--iterations", help="dirty-memory iterations after populating "
                                            "(at least 2, as in the selftest).")] = 2,
    backing: Backing = "anonymous",
    overlap: Annotated[bool, typer.Option("-o", "--overlap", help="every vCPU walks all the memory instead of "
                                          "its own part.")] = False,
    write_percent: Annotated[int | None, typer.Option("-w", "--write-percent", help="each access a write with "
                                                      "this chance in %, else a read (dirty_log_perf_test -w, "
                                                      "Linux 6.2 on; default 100).", show_default=False)] = None,
    write_fraction: Annotated[int, typer.Option("-f", "--write-fraction", help="the older form of -w "
                                                "(dirty_log_perf_test -f, Linux 5.13 to 6.1): write 1 of every "
                                                "N pages, read the rest.")] = 1,
    random_access: Annotated[bool, typer.Option("-a", "--random-access", help="access memory randomly rather "
                                                "than in order (dirty_log_perf_test -a, 6.2 on).")] = False,
    run_while_disabling: Annotated[bool, typer.Option("-e", "--run-vcpus-while-disabling", help="the vCPUs keep dirtying memory while dirty "
                                                      "logging is disabled (dirty_log_perf_test -e, 'e' is for "
                                                      "evil; in 6.1, not in 5.13).")] = False,
    slots: Annotated[int, typer.Option("-x", "--memslots", help="split the memory into this many memslots, "
                                       "each logged on its own (dirty_log_perf_test -x, in 6.1; at most 8 "
                                       "here).")] = 1,
    no_manual_protect: Annotated[bool, typer.Option("-g", "--no-manual-protect", help="no "
                                                    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET clears, no "
                                                    "CLEAR.")] = False,
    lock_mode: Annotated[str, typer.Option("--lock-mode", help="shared (the series), exclusive (the baseline) or "
                                           "both (alternating in one invocation, with ratios); default both, or "
                                           "shared with two kernels.")] = "",
    repeat: Repeat = 1,
    seed: Annotated[int, typer.Option("-r", "--seed", help="the starting random seed (dirty_log_perf_test -r, "
                                      "6.2 on; default 1 as there).")] = 1,
    kernel: Annotated[str, typer.Option("--kernel", help="the kernel profile, or two side by side in one lock "
                                        "mode (5.13,6.12: alternated, with their ratio).")] = "5.13",
    timeline: Timeline = None,
    json_out: JsonOut = False,
) -> None:
    """dirty_log_perf_test: populate, enable dirty logging, dirty / get / clear per iteration, disable.

    Options as in tools/testing/selftests/kvm/dirty_log_perf_test.c, each marked with the kernel version it follows (-i -b -v -o -s -g as in 5.13).

    Prints the selftest's lines per run (times as the kernel prints them), then
    faults/s, retries per fault, lock wait share, the vCPU processes' CPU time and
    TLB flushes; with --lock-mode both the modes alternate and the exclusive/shared
    ratios follow.  docs/performance.md has today's figures, docs/perf/history.md more output.
    Every VM is removed at the end, on errors and on Ctrl-C.
    """
    from shmmmu.bench import BenchOptions, run_bench
    from shmmmu.run import parse_size

    with fail_on(ValueError):
        opts = BenchOptions(vcpus=vcpus, bytes_per_vcpu=parse_size(bytes_per_vcpu), iterations=iterations,
                            backing=backing.lower(), overlap=overlap, write_every=write_fraction,
                            write_percent=-1 if write_percent is None else write_percent, random_access=random_access, slots=slots,
                            run_while_disabling=run_while_disabling,
                            manual_protect=not no_manual_protect, repeat=repeat, seed=seed,
                            lock_mode=lock_mode or ("shared" if "," in kernel else "both"),
                            timeline=timeline or "", kernel=kernel)
        opts.validate()
    if not json_out:
        print(f"Test iterations: {opts.iterations}", flush=True)
    _run_bench(run_bench, opts, json_out)


@bench_app.command("access-tracking")
def bench_access_tracking(
    vcpus: Vcpus = 1,
    bytes_per_vcpu: Annotated[str, typer.Option("-b", "--bytes", help="guest memory per vCPU, K/M/G suffixes "
                                                "(the selftest's -b; its default 1G is too big for a small "
                                                "machine).")] = "128M",
    backing: Backing = "anonymous",
    overlap: Annotated[bool, typer.Option("-o", "--overlap", help="every vCPU accesses all the "
                                          "memory.")] = False,
    lock_mode: Annotated[str, typer.Option("--lock-mode", help="shared, exclusive or both (alternating, "
                                           "ratios).")] = "both",
    repeat: Repeat = 1,
    seed: Seed = 1,
    json_out: JsonOut = False,
) -> None:
    """access_tracking_perf_test: populate, write, read, mark idle, write, mark idle, read.

    Marking idle is one clear_young per page (page_idle's MMU-notifier call; 5.13 ages
    under the write lock, no flush).  After each marking no page may read young, and after
    the next pass exactly the pages whose translations the processor walked again must
    (all of a vCPU's when its leaves overflow its TLB): the check the selftest cannot make.  Prints the
    selftest's lines per run; with --lock-mode both the exclusive/shared ratios follow.
    """
    from shmmmu.access_tracking import AccessTrackingOptions, run_access_tracking
    from shmmmu.run import parse_size

    with fail_on(ValueError):
        opts = AccessTrackingOptions(vcpus=vcpus, bytes_per_vcpu=parse_size(bytes_per_vcpu), backing=backing.lower(),
                                     overlap=overlap, lock_mode=lock_mode, repeat=repeat, seed=seed)
        opts.validate()
    _run_bench(run_access_tracking, opts, json_out)


def _run_bench(run: Callable[..., Any], opts: Any, json_out: bool) -> None:
    """A bench's runs, each printed as it ends, then the summary (or everything as one JSON object);
    exit 1 if a run failed its checks."""
    import json

    from shmmmu.workers.supervisor import Supervisor

    def show(r: Any) -> None:
        if not json_out:
            print("\n".join(r.lines(opts.repeat)) + "\n", flush=True)

    with running_a_vm():
        result = run(opts, Supervisor, on_run=show)
    if json_out:
        print(json.dumps(result.to_json()))
    elif len(result.runs) > 1:
        print("\n".join(result.summary_lines()))
    if not result.ok:
        raise typer.Exit(1)
