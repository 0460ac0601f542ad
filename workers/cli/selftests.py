"""Selftests: `shmmmu bench nx-huge-pages|memslot-modification|demand-paging|memslot-perf|page-splitting`: more of the kernel's KVM selftests (shmmmu.selftests, shmmmu.page_splitting)."""
from __future__ import annotations

from typing import Annotated, Any

import typer

from shmmmu.workers.cli.bench import bench_app
from shmmmu.workers.cli.common import Timeline, fail_on, running_a_vm

Bug = Annotated[list[str] | None, typer.Option("--bug", help="re-inject a fixed kernel bug (shmmmu stress "
                                               "--list-bugs); repeatable.")]
LockMode = Annotated[str, typer.Option("--lock-mode", help="shared (the series) or exclusive (the baseline).")]
JsonOut = Annotated[bool, typer.Option("--json", help="the run as one JSON object.")]
GupDelay = Annotated[int, typer.Option("--gup-delay-us", help="shmmmu's own: one fault in 8 pauses this long "
                                       "between its prologue (the GUP, which may sleep) and mmu_lock (0: never).")]


@bench_app.command("nx-huge-pages")
def bench_nx_huge_pages(
    period_ms: Annotated[int, typer.Option("-p", help="the NX recovery period in milliseconds "
                                           "(nx_huge_pages_test -p; its .sh passes 100).")] = 100,
    reboot: Annotated[bool, typer.Option("-r", help="also run with NX huge pages disabled "
                                         "(nx_huge_pages_test -r: the process may disable them).")] = False,
    recovery_ratio: Annotated[int, typer.Option("--recovery-ratio", help="nx_huge_pages_recovery_ratio (the .sh "
                                                "sets 1: every split page recovered; 0: none).")] = 1,
    lock_mode: LockMode = "shared",
    bug: Bug = None,
    timeline: Timeline = None,
    json_out: JsonOut = False,
) -> None:
    """nx_huge_pages_test (Linux 6.1, x86_64/nx_huge_pages_test.c and .sh): reads and calls on three huge pages,
    pages_2m and nx_lpage_splits checked after each vcpu_run, then after the NX recovery; exit 1 on a mismatch."""
    from shmmmu.selftests import NxOptions, run_nx_huge_pages

    with fail_on(ValueError):
        opts = NxOptions(period_ms=period_ms, reboot=reboot, recovery_ratio=recovery_ratio, lock_mode=lock_mode,
                         bugs=list(bug or []), timeline=timeline or "")
        opts.validate()
    _finish(lambda sup: run_nx_huge_pages(opts, sup, on_run=None if json_out else _show), json_out)


@bench_app.command("memslot-modification")
def bench_memslot_modification(
    vcpus: Annotated[int, typer.Option("-v", help="vCPU worker processes (the selftest's -v).")] = 1,
    bytes_per_vcpu: Annotated[str, typer.Option("-b", help="memory each vCPU accesses, K/M/G suffixes (the "
                                                "selftest's -b; its default 1G is too big here).")] = "64M",
    delay_us: Annotated[int, typer.Option("-d", help="a delay between each add/delete iteration, in usec (the "
                                          "selftest's -d).")] = 0,
    iterations: Annotated[int, typer.Option("-i", help="iterations of adding and removing a memslot (the "
                                            "selftest's -i, default 10).")] = 10,
    overlap: Annotated[bool, typer.Option("-o", help="overlap the vCPUs' accesses (the selftest's -o).")] = False,
    lock_mode: LockMode = "shared",
    bug: Bug = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the VM's random choices.")] = 1,
    gup_delay_us: GupDelay = 0,
    timeline: Timeline = None,
    json_out: JsonOut = False,
) -> None:
    """memslot_modification_stress_test (Linux 6.1): the vCPUs access their memory while a one-page memslot is
    added and deleted; each deletion zaps every root (kvm_mmu_zap_all_fast).  Exit 1 on a failed check."""
    from shmmmu.run import parse_size
    from shmmmu.selftests import MemslotModOptions, run_memslot_modification

    with fail_on(ValueError):
        opts = MemslotModOptions(vcpus=vcpus, bytes_per_vcpu=parse_size(bytes_per_vcpu), delay_us=delay_us,
                                 iterations=iterations, overlap=overlap, lock_mode=lock_mode,
                                 bugs=list(bug or []), seed=seed, timeline=timeline or "",
                                 gup_delay_us=gup_delay_us)
        opts.validate()
    _finish(lambda sup: [run_memslot_modification(opts, sup)], json_out, each=not json_out)


@bench_app.command("demand-paging")
def bench_demand_paging(
    vcpus: Annotated[int, typer.Option("-v", help="vCPU worker processes (the selftest's -v).")] = 1,
    bytes_per_vcpu: Annotated[str, typer.Option("-b", help="memory each vCPU touches, K/M/G suffixes (the "
                                                "selftest's -b; its default 1G is too big here).")] = "64M",
    uffd_mode: Annotated[str, typer.Option("-u", help="MISSING: faults served by userfaultfd handler processes "
                                           "(the selftest's -u; MINOR is not modelled); left out: no uffd.")] = "",
    single_uffd: Annotated[bool, typer.Option("-a", help="one uffd for all guest memory instead of one per "
                                              "vCPU (the selftest's -a; implied by -o).")] = False,
    delay_us: Annotated[int, typer.Option("-d", help="the handler's delay in usec before each copy (the "
                                          "selftest's -d).")] = 0,
    readers: Annotated[int, typer.Option("-r", help="reader processes per uffd (the selftest's -r, 6.5).")] = 1,
    overlap: Annotated[bool, typer.Option("-o", help="overlap the vCPUs' memory (the selftest's -o).")] = False,
    lock_mode: LockMode = "shared",
    bug: Bug = None,
    timeline: Timeline = None,
    json_out: JsonOut = False,
) -> None:
    """demand_paging_test (Linux 6.5, demand_paging_test.c and lib/userfaultfd_util.c): each vCPU touches its
    memory once; with -u MISSING every first touch waits in the fault for a handler's UFFDIO_COPY.  Exit 1 when
    a page is not copied in exactly once, a fault goes unserved, or a check of the run fails."""
    from shmmmu.run import parse_size
    from shmmmu.selftests import DemandOptions, run_demand_paging

    with fail_on(ValueError):
        opts = DemandOptions(vcpus=vcpus, bytes_per_vcpu=parse_size(bytes_per_vcpu), uffd_mode=uffd_mode,
                             single_uffd=single_uffd, delay_us=delay_us, readers=readers, overlap=overlap,
                             lock_mode=lock_mode, bugs=list(bug or []), timeline=timeline or "")
        opts.validate()
    _finish(lambda sup: [run_demand_paging(opts, sup)], json_out, each=not json_out)


@bench_app.command("memslot-perf")
def bench_memslot_perf(
    slots: Annotated[int, typer.Option("-s", help="the memslot count cap, slot 0 included (the selftest's -s; "
                                       "here at most 9: 8 test memslots, the emulator's table).")] = 9,
    first: Annotated[int, typer.Option("-f", help="the first test to run: 0 map, 1 unmap, 2 unmap chunked, "
                                       "3 move active area, 4 move inactive area, 5 RW.")] = 0,
    last: Annotated[int, typer.Option("-e", help="the last test to run (the selftest's -e).")] = 5,
    seconds: Annotated[int, typer.Option("-l", help="each test's length in seconds (the selftest's -l).")] = 5,
    iterations: Annotated[int, typer.Option("-i", help="each test's length as a count of iterations instead "
                                            "(not in the selftest; reproducible runs).")] = 0,
    runs: Annotated[int, typer.Option("-r", help="runs per test, the best reported (the selftest's -r).")] = 1,
    verify: Annotated[bool, typer.Option("-d", help="check the guest's values before each unmap (the "
                                         "selftest's -d, map_unmap_verify).")] = False,
    scale: Annotated[int, typer.Option("--scale", help="the selftest's areas divided by this (16: 2, 8 and "
                                       "32 MiB for map, unmap and the rest).")] = 16,
    lock_mode: LockMode = "shared",
    bug: Bug = None,
    gup_delay_us: GupDelay = 0,
    json_out: JsonOut = False,
) -> None:
    """memslot_perf_test (Linux 5.13): one vCPU maps, and the host unmaps (MADV_DONTNEED), moves
    (KVM_MR_MOVE) or reads back the test area spread over the memslots.  Exit 1 on a failed check."""
    from shmmmu.memslot_perf import MemslotPerfOptions, run_memslot_perf

    with fail_on(ValueError):
        opts = MemslotPerfOptions(slots=slots, first=first, last=last, seconds=seconds, iterations=iterations,
                                  runs=runs, verify=verify, scale=scale, lock_mode=lock_mode, bugs=list(bug or []),
                                  gup_delay_us=gup_delay_us)
        opts.validate()
    _finish(lambda sup: run_memslot_perf(opts, sup, on_test=None if json_out else _show), json_out)


def _show(r: Any) -> None:
    print("\n".join(r.report()) + "\n", flush=True)


def _finish(run: Any, json_out: bool, each: bool = False) -> None:
    """Run (its VMs removed on errors and Ctrl-C), print, exit 1 if any assertion failed."""
    import json

    from shmmmu.workers.supervisor import Supervisor

    with running_a_vm():
        results = run(Supervisor)
    if json_out:
        print(json.dumps([r.to_json() for r in results] if len(results) > 1 else results[0].to_json()))
    elif each:
        for r in results:
            _show(r)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@bench_app.command("page-splitting")
def bench_page_splitting(
    kernel: Annotated[str, typer.Option("--kernel", help="the kernel profile: eager splitting is 6.12's.")] = "6.12",
    vcpu_bytes: Annotated[str, typer.Option("-b", help="each vCPU's memory (K, M, G suffixes; the selftest's "
                                            "default is 1G).")] = "1G",
    backing: Annotated[str, typer.Option("-s", help="the backing: 4k, 2m or 1g.")] = "2m",
    vcpus: Annotated[int, typer.Option("-v", help="vCPUs (the selftest runs 2).")] = 2,
) -> None:
    """dirty_log_page_splitting_test (6.12): page counts after each step, without and with manual protect, and
    the selftest's assertions; exit 1 if one fails."""
    import os

    from shmmmu.page_splitting import run_page_splitting
    from shmmmu.validate import parse_size

    with fail_on(ValueError), running_a_vm():
        runs = run_page_splitting(kernel, backing.lower(), parse_size(vcpu_bytes), vcpus, f"split-{os.getpid()}")
    failed = [f for r in runs for f in r.failures]
    for f in failed:
        typer.echo(f"Assertion failed: {f}")
    typer.echo("FAILURE" if failed else "SUCCESS: every assertion of dirty_log_page_splitting_test held")
    if failed:
        raise typer.Exit(1)
