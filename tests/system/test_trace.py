"""Traces in and tracepoints out, through the real CLI: every format read from a real sample, replays that take one
fault per distinct page, bad traces refused in one line, and the kernel's tracepoint lines checked against the
kernel's own format strings (quoted below) and read back by `trace summary`.

The samples (tests/data/README.md says how each was made): lackey and perf output made with the real tools here
(valgrind 3.19, perf 6.1); pinatrace written with pinatrace.cpp's format from the lackey sample's addresses;
the kvm and kvmmmu samples written from the kernel's TP_printk formats.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shmmmu.region import PREFIX

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CMD = [sys.executable, "-m", "shmmmu.workers.cli"]

# ---------------------------------------------------------------- the kernel's formats, quoted

# arch/x86/kvm/trace.h (5.13): TRACE_EVENT(kvm_page_fault, ... TP_printk("address %lx error_code %x", ...))
KVM_PAGE_FAULT = "address %lx error_code %x"
# arch/x86/kvm/mmu/mmutrace.h (5.13)
KVM_MMU_SPTE_REQUESTED = "gfn %llx pfn %llx level %d"
KVM_TDP_MMU_SPTE_CHANGED = "as id %d gfn %llx level %d old_spte %llx new_spte %llx"
# KVM_MMU_PAGE_PRINTK(): trace_seq_printf(p, "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s" " %snxe %sad root %u %s%c",
#   mmu_valid_gen, gfn, role.level, role.gpte_is_8_bytes ? 8 : 4, role.quadrant, role.direct ? " direct" : "",
#   access_str[role.access], role.invalid ? " invalid" : "", role.nxe ? "" : "!", role.ad_disabled ? "!" : "",
#   root_count, unsync ? "unsync" : "sync", 0)     -- the %c of 0 ends the string
KVM_MMU_PAGE_PRINTK = "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s"
ACCESS_STR = ["---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux"]
# TP_printk("%s %s", KVM_MMU_PAGE_PRINTK(), __entry->created ? "new" : "existing")
PRINTK = {"kvm_page_fault": KVM_PAGE_FAULT, "kvm_mmu_spte_requested": KVM_MMU_SPTE_REQUESTED,
          "kvm_tdp_mmu_spte_changed": KVM_TDP_MMU_SPTE_CHANGED, "kvm_mmu_get_page": KVM_MMU_PAGE_PRINTK + " %s",
          "kvm_mmu_prepare_zap_page": KVM_MMU_PAGE_PRINTK}     # kvm_mmu_page_class: TP_printk("%s", ...)
# what trace-cmd report prints instead for the two page events: libtraceevent's plugins/plugin_kvm.c,
# kvm_mmu_get_page_handler: "%s " (new/existing), "sp gfn %llx ", then kvm_mmu_print_role:
# "%u q%u%s %s%s %spae %snxe %swp%s%s%s" (level, quadrant, direct, access, invalid, pae, nxe, wp, smep, smap, smm),
# tep_print_num_field(" root %u "), "%s%c" (unsync/sync, 0)
PLUGIN_ROLE = "%u q%u%s %s%s %spae %snxe %swp%s%s%s root %u %s"
REPORT = {**PRINTK, "kvm_mmu_get_page": "%s sp gfn %llx " + PLUGIN_ROLE, "kvm_mmu_prepare_zap_page": PLUGIN_ROLE}

# what each %s of a format may print, in order
_ROLE_STRINGS = [r"(?: direct)?", "(?:" + "|".join(re.escape(a) for a in ACCESS_STR) + ")", r"(?: invalid)?",
                 "!?", "!?", "!?", "(?: smep)?", "(?: smap)?", "(?: smm)?", "(?:unsync|sync)"]
STRINGS = {"kvm_mmu_get_page": ["(?:new|existing)", *_ROLE_STRINGS], "kvm_mmu_prepare_zap_page": _ROLE_STRINGS}


def printk_regex(fmt: str, strings: list[str]) -> re.Pattern:
    """A printk format as a regex: %llx/%lx/%x hex without 0x, %d signed, %u unsigned, %s from `strings`."""
    it = iter(strings)
    out, i = [], 0
    for m in re.finditer(r"%(ll|l)?([xdus])", fmt):
        out.append(re.escape(fmt[i:m.start()]))
        out.append({"x": "[0-9a-f]+", "d": "-?[0-9]+", "u": "[0-9]+"}.get(m[2]) or next(it))
        i = m.end()
    out.append(re.escape(fmt[i:]))
    return re.compile("^" + "".join(out) + "$")


# trace-cmd report (libtraceevent's tep_print_event): "%16s-%-5d [%03d] %5lu.%06lu: %s: ", the event's name spaced
# out to 20 columns ("Space out the event names evenly"), then its text
LINE = re.compile(r"^(?P<comm>[ -~]{16,})-(?P<pid>\d+) *\[(?P<cpu>\d{3})\] +(?P<ts>\d+\.\d{6}): "
                  r"(?P<event>\w+): (?P<pad> *)(?P<text>\S.*)$")


def check_lines(path: Path, text: str | None = None) -> dict[str, int]:
    """The whole of a --tracepoints file: `cpus=N`, then every event line in trace-cmd report's layout and its
    event's text in what trace-cmd prints for it."""
    regex = {e: printk_regex(f, STRINGS.get(e, [])) for e, f in REPORT.items()}
    counts: dict[str, int] = {}
    last = 0.0
    lines = (text if text is not None else path.read_text()).splitlines()
    assert re.fullmatch(r"cpus=\d+", lines[0]), lines[0]
    for line in lines[1:]:
        m = LINE.match(line)
        assert m, f"not a trace-cmd report line: {line!r}"
        assert len(m["comm"]) == 16 or not m["comm"].startswith(" "), line
        assert len(m["pad"]) == max(0, 20 - len(m["event"])), f"the name is not spaced out to 20: {line!r}"
        assert m["event"] in regex, line
        assert regex[m["event"]].match(m["text"]), f"{m['event']} does not match {REPORT[m['event']]!r}: {line!r}"
        assert int(m["cpu"]) < int(lines[0].split("=")[1])
        assert float(m["ts"]) >= last, "the parts are merged by timestamp"
        last = float(m["ts"])
        counts[m["event"]] = counts.get(m["event"], 0) + 1
    return counts


def test_the_formats_are_the_kernels() -> None:
    from shmmmu.trace.events import EVENTS, PLUGIN
    from shmmmu.trace.events import PRINTK as OURS
    assert OURS == PRINTK
    assert {e: PLUGIN.get(e, PRINTK[e]) for e in PRINTK} == REPORT
    for e, ev in EVENTS.items():              # each format file's print fmt carries the kernel's printk
        if e in ("kvm_mmu_get_page", "kvm_mmu_prepare_zap_page"):
            assert '"sp gen %u gfn %llx l%u %u-byte q%u%s %s%s" " %snxe %sad root %u %s%c"' in ev.print_fmt
        else:
            assert ev.print_fmt.startswith(f'"{PRINTK[e]}", REC->')


# ---------------------------------------------------------------- helpers

def shmmmu(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture
def tmpenv(tmp_path: Path) -> dict:
    """TMPDIR of the runs: the tests see every temporary file a run leaves there."""
    d = tmp_path / "tmp"
    d.mkdir()
    return {**os.environ, "TMPDIR": str(d)}


def no_leftovers(env: dict) -> None:
    assert os.listdir(env["TMPDIR"]) == [], "a run left its converted trace or tracepoint parts"


def one_line_error(p: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("shmmmu: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ---------------------------------------------------------------- independent readers of the samples

def lackey_accesses(path: Path) -> list[tuple[int, int]]:
    """(page, kind) of a lackey trace: I fetch, L read, S write, M read then write; a page-spanning access both."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("==") or not line.strip():
            continue
        k, rest = line.split()
        addr, size = rest.split(",")
        a, n = int(addr, 16), int(size)
        pages = range(a >> 12, ((a + n - 1) >> 12) + 1)
        for kind in {"I": [2], "L": [0], "S": [1], "M": [0, 1]}[k]:
            out += [(p, kind) for p in pages]
    return out


def expected(sample: str) -> tuple[str, list[tuple[int, int, int]]]:
    """(format, [(thread, page, kind)]) of a sample, read here without shmmmu's readers."""
    path = DATA / sample
    text = path.read_text().splitlines()
    if sample.startswith("lackey"):
        return "lackey", [(0, p, k) for p, k in lackey_accesses(path)]
    if sample.startswith("pinatrace"):
        return "pinatrace", [(0, int(l.split()[2], 16) >> 12, 1 if l.split()[1] == "W" else 0)
                             for l in text if l and not l.startswith("#")]
    if sample == "perf-page-faults.txt":          # comm tid time: event: addr ip (no access kind: reads)
        return "perf", [(int(l.split()[1]), int(l.split()[4], 16) >> 12, 0) for l in text]
    if sample == "perf-page-faults-addr.txt":     # comm tid time: period event: addr sym (dso) ip sym (dso)
        return "perf", [(int(l.split()[1]), int(l.split("page-faults:")[1].split()[0], 16) >> 12, 0) for l in text]
    if sample == "perf-page-fault-user.txt":      # ... exceptions:page_fault_user: address= ip= error_code=
        out = []
        for l in text:
            kv = dict(f.split("=") for f in l.split() if "=" in f)
            err = int(kv["error_code"], 16)
            out.append((int(l.split()[1]), int(kv["address"], 16) >> 12, 2 if err & 0x10 else 1 if err & 2 else 0))
        return "perf", out
    if sample.startswith("kvm-page-fault"):
        out = []
        for l in text:
            if "kvm_page_fault:" not in l:
                continue
            tid = int(l.split("[")[0].rsplit("-", 1)[1]) if "trace-cmd" in sample else int(l.split()[2])
            addr, err = int(l.split("address ")[1].split()[0], 16), int(l.split("error_code ")[1], 16)
            out.append((tid, addr >> 12, 1 if err & 2 else 2 if err & 4 else 0))
        return "kvm", out
    assert sample == "plain.txt"
    return "plain", [(0, int(l.split()[1], 0) >> 12, "RWX".index(l.split()[0].upper()))
                     for l in text if l.strip() and not l.startswith("#")]


SAMPLES = ["lackey-true.txt", "pinatrace.out", "perf-page-faults.txt", "perf-page-faults-addr.txt",
           "perf-page-fault-user.txt",
           "kvm-page-fault.trace-cmd.txt", "kvm-page-fault.perf.txt", "plain.txt"]


@pytest.mark.parametrize("sample", SAMPLES)
def test_every_format_detected_and_converted(sample: str, tmp_path: Path) -> None:
    fmt, acc = expected(sample)
    out = tmp_path / "t.bin"
    p = shmmmu("trace", "convert", str(DATA / sample), "-o", str(out), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    threads = list(dict.fromkeys(t for t, _, _ in acc))
    assert d["format"] == fmt
    assert d["accesses"] == len(acc)
    assert d["pages"] == len({pg for _, pg, _ in acc})
    assert [t["tid"] for t in d["threads"]] == threads
    assert [t["accesses"] for t in d["threads"]] == [sum(1 for t, _, _ in acc if t == u) for u in threads]
    # the words: first-touch guest pages (in order of first touch over all threads) and the kinds, per thread
    import numpy as np
    from shmmmu.trace.store import HEADER_BYTES
    words = np.fromfile(out, dtype=np.uint64, offset=HEADER_BYTES)
    first: dict[int, int] = {}
    for _, pg, _ in acc:
        first.setdefault(pg, len(first))
    want = [first[pg] << 2 | k for u in threads for t, pg, k in acc if t == u]
    assert words.tolist() == want
    # forced, the same; forced to another format, a one-line error naming the line
    p = shmmmu("trace", "convert", str(DATA / sample), "-o", str(out), "--json", "--trace-format", fmt)
    assert p.returncode == 0 and json.loads(p.stdout)["accesses"] == len(acc)
    other = "lackey" if fmt != "lackey" else "plain"
    p = shmmmu("trace", "convert", str(DATA / sample), "-o", str(out), "--trace-format", other)
    one_line_error(p, "line ")


def test_perf_samples_without_their_data_address_are_refused(tmp_path: Path) -> None:
    """perf script's default output of a page-faults sample shows only the IP: no address to replay."""
    one_line_error(shmmmu("trace", "convert", str(DATA / "perf-page-faults-no-addr.txt"), "-o",
                          str(tmp_path / "o.bin")), "line 1: a page-faults sample without its data address",
                   "perf script -F +addr")


def test_kvm_page_fault_of_later_kernels(tmp_path: Path) -> None:
    """6.x prints kvm_page_fault as 'vcpu %u rip 0x%lx address 0x%lx error_code 0x%llx': read alike."""
    t = tmp_path / "kvm6.txt"
    t.write_text("".join(f" CPU {v}/KVM-{900 + v}   [00{v}] d..1. 77.{i:06d}: kvm_page_fault: vcpu {v} rip "
                         f"0xffffffff81000{i:03x} address 0x{(0x10 + i) << 12:x} "
                         f"error_code 0x{0x182 if i % 2 else 0x181:x}\n"
                         for i in range(6) for v in (0, 1)))
    p = shmmmu("trace", "convert", str(t), "-o", str(tmp_path / "o.bin"), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["format"] == "kvm" and d["accesses"] == 12 and d["pages"] == 6
    assert d["threads"] == [{"tid": 900, "accesses": 6}, {"tid": 901, "accesses": 6}]


# ---------------------------------------------------------------- replays

def run_json(p: subprocess.CompletedProcess[str]) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_replay_takes_one_fault_per_distinct_page(tmpenv: dict, vm_name: str) -> None:
    pages = len({p for p, _ in lackey_accesses(DATA / "lackey-true.txt")})
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(DATA / "lackey-true.txt"), "--vcpus", "1",
                        "--backing", "4k", "--memory", "1M", "--iterations", "2", "--json", env=tmpenv))
    assert d["faults"] == d["stats"]["fixed"] == pages
    assert d["stats"]["accesses"] == 2 * len(lackey_accesses(DATA / "lackey-true.txt"))
    assert d["options"]["trace"] == {"format": "lackey", "accesses": d["stats"]["accesses"] // 2, "pages": pages,
                                     "threads": 1}
    no_leftovers(tmpenv)


def test_threads_become_vcpus_of_one_shared_range(tmpenv: dict, vm_name: str) -> None:
    _, acc = expected("kvm-page-fault.trace-cmd.txt")
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(DATA / "kvm-page-fault.trace-cmd.txt"),
                        "--backing", "4k", "--memory", "1M", "--iterations", "1", "--json", env=tmpenv))
    assert d["options"]["vcpus"] == 2
    assert d["stats"]["fixed"] == len({pg for _, pg, _ in acc})
    assert d["stats"]["accesses"] == len(acc)
    one_line_error(shmmmu("run", "--name", vm_name, "--trace", str(DATA / "kvm-page-fault.trace-cmd.txt"),
                          "--vcpus", "3", env=tmpenv), "2 threads", "--vcpus 2")
    no_leftovers(tmpenv)


def test_a_trace_without_threads_replays_on_every_vcpu(tmpenv: dict, vm_name: str, tmp_path: Path) -> None:
    pages = len({pg for _, pg, _ in expected("pinatrace.out")[1]})
    conv = tmp_path / "pin.bin"
    assert shmmmu("trace", "convert", str(DATA / "pinatrace.out"), "-o", str(conv)).returncode == 0
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(conv), "--vcpus", "3", "--backing", "4k",
                        "--memory", "1M", "--iterations", "1", "--json", env=tmpenv))
    assert d["faults"] == d["stats"]["fixed"] == 3 * pages             # a range each
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(conv), "--vcpus", "3", "--backing", "4k",
                        "--memory", "1M", "--iterations", "1", "-o", "--json", env=tmpenv))
    assert d["stats"]["fixed"] == pages                                # one shared range
    assert conv.exists()                                               # a converted trace is the user's: kept
    no_leftovers(tmpenv)


def test_guest_memory_must_hold_the_distinct_pages(tmpenv: dict, tmp_path: Path) -> None:
    t = tmp_path / "wide.txt"
    t.write_text("".join(f"W {i * 4096:#x}\n" for i in range(300)))
    one_line_error(shmmmu("run", "--trace", str(t), "--vcpus", "1", "--memory", "1M", env=tmpenv),
                   "300 distinct pages", "--memory 2M")
    no_leftovers(tmpenv)


# ---------------------------------------------------------------- bad traces: one line, exit 2, nothing left

BAD = [
    ("unknown-kind.txt", b"R 0x1000\nW 0x2000\nQ 0x3000\n", "line 3: unknown access kind 'Q'"),
    ("lackey-kind.txt", b"==1== Lackey\nI  04016a90,3\n Z 04016a90,3\n", "line 3: expected 'I|L|S|M ADDR,SIZE'"),
    ("past-64.txt", b"R 0x1000\nR 0x10000000000000000\n", "line 2: address '0x10000000000000000' is past 64 bits"),
    ("lackey-past-64.txt", b"I  ffffffffffffffff,4\n", "line 1: access ffffffffffffffff,4 ends past 64 bits"),
    ("negative.txt", b"W -0x10\n", "line 1: negative address '-0x10'"),
    ("pin-negative.txt", b"0x4011: R 0x7ff0\n0x4012: W -0x8\n", "line 2: negative address '-0x8'"),
    ("garbage-nul.bin", bytes(range(256)) * 8, "line 1: binary data (a NUL byte)"),
    ("garbage-utf8.bin", b"R 0x1000\n" + bytes(range(128, 256)) * 4 + b"\n", "line 2: binary data (not UTF-8 text)"),
    ("long-line.txt", b"R 0x1000\n" + b"7" * 100000, "line 2: longer than 4096 bytes"),
    ("empty.txt", b"\n# nothing\n", "no accesses"),
    ("unknown-format.txt", b"hello world, this is not a trace\n", "cannot tell the trace's format"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_traces_one_line_with_the_line_number(name: str, content: bytes, message: str, tmpenv: dict,
                                                  tmp_path: Path) -> None:
    t = tmp_path / name
    t.write_bytes(content)
    one_line_error(shmmmu("run", "--trace", str(t), "--vcpus", "1", env=tmpenv, timeout=60), message)
    one_line_error(shmmmu("trace", "convert", str(t), "-o", str(tmp_path / "o.bin"), env=tmpenv), message)
    assert not (tmp_path / "o.bin").exists()
    no_leftovers(tmpenv)


def test_endless_input_and_missing_files(tmpenv: dict, tmp_path: Path) -> None:
    one_line_error(shmmmu("run", "--trace", "/dev/zero", "--vcpus", "1", env=tmpenv, timeout=60),
                   "/dev/zero: line 1: binary data")
    one_line_error(shmmmu("run", "--trace", str(tmp_path / "nope"), env=tmpenv), "cannot read trace", "nope")
    one_line_error(shmmmu("run", "--trace", str(DATA / "plain.txt"), "--trace-format", "bogus", env=tmpenv),
                   "unknown trace format 'bogus'")
    one_line_error(shmmmu("run", "-w", "trace", env=tmpenv), "--workload trace needs --trace FILE")
    no_leftovers(tmpenv)


def test_where_the_converted_trace_cannot_go(tmp_path: Path) -> None:
    one_line_error(shmmmu("trace", "convert", str(DATA / "plain.txt"), "-o", str(tmp_path / "no" / "o.bin")),
                   "cannot write", "No such file or directory")
    only_exits = tmp_path / "exits.txt"
    only_exits.write_text("cpus=1\n  CPU 0/KVM-1 [000] 1.000000: kvm_exit: reason EPT_VIOLATION\n")
    one_line_error(shmmmu("trace", "convert", str(only_exits), "-o", str(tmp_path / "o.bin"), "--trace-format",
                          "kvm"), "exits.txt: the trace has no accesses")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for a private tmpfs")
def test_a_full_disk_during_conversion(tmp_path: Path) -> None:
    """The converted file on a 64 KiB tmpfs (a private mount namespace): one line, nothing left on it."""
    t = tmp_path / "wide.txt"
    t.write_text("".join(f"R {i * 4096:#x}\n" for i in range(20000)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && {sys.executable} -m shmmmu.workers.cli trace convert {t} "
              f"-o {mnt}/o.bin; rc=$?; ls -A {mnt} >&2; exit $rc")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [f"shmmmu: error: cannot convert {t} into {mnt}/o.bin: "
                                             f"No space left on device"]


# ---------------------------------------------------------------- conversion progress

PROGRESS = re.compile(r"converting (?P<name>\S+): (?P<done>[\d.]+) of (?P<total>[\d.]+) MiB \((?P<pct>\d+)%\), "
                      r"[\d,]+ lines/s, ETA \d+ s *$")
FINAL = re.compile(r"converted (?P<name>\S+): (?P<total>[\d.]+) MiB, (?P<lines>[\d,]+) lines in [\d.]+ s "
                   r"\([\d,]+ lines/s\) *\n$")


def big_plain_trace(path: Path, lines: int = 400_000) -> Path:
    path.write_text("".join(f"R {(i * 4099) % 50000 * 4096:#x}\n" for i in range(lines)))
    return path


def test_conversion_shows_its_progress_in_place_then_one_line(tmp_path: Path, tmpenv: dict, vm_name: str) -> None:
    """A long conversion said nothing for minutes (issue 21, item 6): `trace convert` and `run --trace` show
    bytes done of the total, lines/s and an ETA on stderr, each update over the last (\\r), then one final line.
    On a terminal it starts after about a second; SHMMMU_PROGRESS=1 shows it always (here: stderr is a pipe),
    and without it a pipe gets none."""
    big = big_plain_trace(tmp_path / "big.txt")
    size_mib = big.stat().st_size / (1 << 20)
    forced = {**tmpenv, "SHMMMU_PROGRESS": "1"}
    for args in (["trace", "convert", str(big), "-o", str(tmp_path / "o.bin")],
                 ["run", "--name", vm_name, "--trace", str(big), "--vcpus", "1", "--backing", "4k", "--memory",
                  "256M", "--iterations", "1", "--json"]):
        p = subprocess.run([*CMD, *args], capture_output=True, timeout=180, cwd=ROOT, env=forced)   # \r kept
        err = p.stderr.decode()
        assert p.returncode == 0, err[-2000:]
        shown = err.split("\r")
        assert shown[0] == "", err[:200]                          # each update starts at the line's start
        updates, final = shown[1:-1], shown[-1]
        assert len(updates) >= 2, err
        pcts = []
        for u in updates:
            m = PROGRESS.match(u)
            assert m and m["name"] == str(big) and abs(float(m["total"]) - size_mib) < 0.1, repr(u)
            pcts.append(int(m["pct"]))
        assert pcts == sorted(pcts) and "\n" not in "".join(updates)
        m = FINAL.match(final)
        assert m and m["lines"].replace(",", "") == "400000", repr(final)
        quiet = shmmmu(*args, env=tmpenv)
        assert quiet.returncode == 0 and "convert" not in quiet.stderr, quiet.stderr[-500:]
    no_leftovers(tmpenv)


# ---------------------------------------------------------------- tracepoints out

def test_tracepoints_of_a_run_match_the_kernels_formats(tmpenv: dict, vm_name: str, tmp_path: Path) -> None:
    _, acc = expected("plain.txt")
    out = tmp_path / "run.trace"
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(DATA / "plain.txt"), "--vcpus", "2",
                        "--backing", "4k", "--memory", "1M", "--iterations", "1", "--json",
                        "--tracepoints", str(out), env=tmpenv))
    counts = check_lines(out)
    first: dict[int, int] = {}
    for _, pg, k in acc:
        first.setdefault(pg, k)                  # a page faults once, with the kind of its first access
    pages = len(first)
    assert d["stats"]["fixed"] == 2 * pages
    assert counts["kvm_page_fault"] == d["faults"]            # retried faults too: each is an EPT violation
    assert counts["kvm_mmu_spte_requested"] >= d["stats"]["fixed"]
    assert counts["kvm_mmu_get_page"] >= 4 and counts["kvm_mmu_prepare_zap_page"] >= 3    # tables; destroy zaps
    p = shmmmu("trace", "summary", str(out), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["events"] == counts
    assert s["leaves_installed_by_level"] == {"1": 2 * pages} == s["leaves_removed_by_level"]
    if d["faults"] == d["stats"]["fixed"]:                                # no retried fault
        want = {name: 2 * sum(1 for k in first.values() if k == kind)
                for kind, name in enumerate(("read", "write", "fetch"))}
        assert s["page_faults"] == {k: v for k, v in want.items() if v}
    assert s["tasks"] == 3                                                # two vCPUs and the supervisor
    assert [f for f in os.listdir(tmp_path) if f.startswith(f".{PREFIX}tracepoints")] == []
    no_leftovers(tmpenv)


def test_tracepoints_of_stress(tmp_path: Path) -> None:
    """Every event of the kernel's set appears, each line in its printk format, and a removed table's entries are
    frozen to REMOVED_SPTE.  What a run of a given length does depends on the machine's speed (beside two CPU
    hogs and another suite, 1.5 s once did no such teardown), so a run short of it is run again twice as long:
    the formats are checked on every run, the presence on the last."""
    removed = re.compile(r"kvm_tdp_mmu_spte_changed: +as id 0 gfn [0-9a-f]+ level 1 old_spte 0 new_spte 5a0$", re.M)
    for duration in (1.5, 3, 6, 12):
        out = tmp_path / f"stress-{duration}.trace"
        p = shmmmu("stress", "--duration", str(duration), "--vcpus", "2", "--seed", "3", "--json", "--tracepoints",
                   str(out))
        assert p.returncode == 0, p.stderr[-3000:]
        counts = check_lines(out)
        text = out.read_text()
        if set(counts) == set(PRINTK) and removed.search(text):
            break
    assert set(counts) == set(PRINTK), (duration, sorted(set(PRINTK) - set(counts)))
    # shared mode: handle_removed_tdp_mmu_page exchanges every entry of a removed table to REMOVED_SPTE (0x5a0)
    assert removed.search(text), duration
    p = shmmmu("trace", "summary", str(out))
    assert p.returncode == 0 and "kvm_mmu_prepare_zap_page" in p.stdout


def test_tracepoints_of_explores_counterexample(tmp_path: Path) -> None:
    """K18's counterexample replayed with tracepoints: the fault links the tables, the host's zap tears them
    down (prepare_zap, every entry frozen to REMOVED_SPTE), in the order the schedule ran (step timestamps)."""
    out = tmp_path / "k18.trace"
    p = shmmmu("explore", "--bug", "link-after-publish", "--json", "--tracepoints", str(out))
    assert p.returncode == 1, p.stderr[-2000:]
    assert json.loads(p.stdout)["result"] == "FAILURE"
    counts = check_lines(out)
    assert counts["kvm_page_fault"] >= 1 and counts["kvm_mmu_prepare_zap_page"] >= 1
    text = out.read_text()
    assert "CPU 0/KVM-" in text and re.search(r"^ +shmmmu-\d+ ", text, re.M)
    assert text.index("kvm_mmu_get_page") < text.index("kvm_mmu_prepare_zap_page")
    s = json.loads(shmmmu("trace", "summary", str(out), "--json").stdout)
    assert s["events"] == counts and s["tasks"] == 2


needs_trace_cmd = pytest.mark.skipif(shutil.which("trace-cmd") is None,
                                     reason="trace-cmd is not installed (apt-get install trace-cmd)")


def trace_cmd_report(dat: Path) -> str:
    p = subprocess.run(["trace-cmd", "report", "-i", str(dat)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@needs_trace_cmd
def test_trace_dat_is_what_the_text_file_says(tmp_path: Path) -> None:
    """The explorer's replay is deterministic (step timestamps): its --tracepoints FILE.txt and FILE.dat, the
    second printed by the real `trace-cmd report`, are the same lines but for the process ids."""
    texts = []
    for name in ("k18.txt", "k18.dat"):
        out = tmp_path / name
        p = shmmmu("explore", "--bug", "link-after-publish", "--json", "--tracepoints", str(out))
        assert p.returncode == 1, p.stderr[-2000:]
        texts.append(out.read_text() if name.endswith(".txt") else trace_cmd_report(out))
    assert texts[1].startswith("cpus=")
    assert check_lines(Path("-"), texts[1]) == check_lines(Path("-"), texts[0])

    def no_pids(text: str) -> str:
        return re.sub(r"-\d+( *\[)", lambda m: "-PID" + " " * (len(m[0]) - 4 - len(m[1])) + m[1], text)
    assert no_pids(texts[1]) == no_pids(texts[0])
    assert len(texts[0].splitlines()) >= 15


@needs_trace_cmd
def test_trace_dat_of_a_run(tmpenv: dict, vm_name: str, tmp_path: Path) -> None:
    """`run --tracepoints run.dat`: trace-cmd reads the file back, every line in trace-cmd's own layout, one
    kvm_page_fault per fault the run took; `trace summary run.dat` reads it through trace-cmd."""
    out = tmp_path / "run.dat"
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(DATA / "plain.txt"), "--vcpus", "2",
                        "--backing", "4k", "--memory", "1M", "--iterations", "1", "--json",
                        "--tracepoints", str(out), env=tmpenv))
    assert out.read_bytes()[:10] == b"\x17\x08\x44tracing"
    text = trace_cmd_report(out)
    counts = check_lines(Path("-"), text)
    assert counts["kvm_page_fault"] == d["faults"]
    (tmp_path / "run.txt").write_text(text)
    via_dat = json.loads(shmmmu("trace", "summary", str(out), "--json").stdout)
    via_txt = json.loads(shmmmu("trace", "summary", str(tmp_path / "run.txt"), "--json").stdout)
    assert via_dat == via_txt and via_dat["events"] == counts
    no_leftovers(tmpenv)


def test_trace_dat_without_trace_cmd_is_refused_before_the_run(tmp_path: Path, vm_name: str) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}       # python, no trace-cmd
    one_line_error(shmmmu("run", "--name", vm_name, *"--vcpus 1 --memory 1M --iterations 1".split(),
                          "--tracepoints", str(tmp_path / "r.dat"), env=env),
                   "needs trace-cmd", "apt-get install trace-cmd")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- real kernels' lines, as people posted them

REAL = sorted((DATA / "real-kernels").glob("*.txt"))
EVENT_NAMES = ("kvm_page_fault", "kvm_mmu_spte_requested", "kvm_tdp_mmu_spte_changed", "kvm_mmu_get_page",
               "kvm_mmu_prepare_zap_page", "kvm_mmu_set_spte", "fast_page_fault", "kvm_mmu_split_huge_page")


def test_summary_reads_every_real_kernels_lines() -> None:
    """No refusal, and each event counted as often as its name appears in the file (a mail wraps a line's text,
    never the event's name: counted here by a regex over the raw text, independent of the reader).  The
    library's call for each file, the command for one (and in the test below)."""
    from shmmmu.trace.summary import summarize
    assert len(REAL) >= 5 and (DATA / "real-kernels" / "README.md").read_text().count("https://lore.kernel.org/") \
        >= len(REAL)
    for path in REAL:
        raw = path.read_text()
        want = {e: n for e in EVENT_NAMES if (n := len(re.findall(rf"(?<![\w:]){e}:", raw)))}
        assert dict(summarize(str(path)).events) == want, path
    p = shmmmu("trace", "summary", str(REAL[0]), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["events"], p.stderr


def test_summary_of_real_kernels_reads_their_fields() -> None:
    """The fields each format carries, read from the real lines: SVM's 64-bit #NPF error code (bit 2 the user
    bit: reads), fast_page_fault's spurious faults, the older plugin's existing pages, a 2M leaf replacing a
    4K table, a root torn down."""
    from shmmmu.trace.summary import summarize

    def summary(name: str) -> dict:
        return json.loads(json.dumps(summarize(str(DATA / "real-kernels" / name)).to_json()))
    assert summary("kvm-2023-roth-snp-npf.txt")["page_faults"] == {"read": 4}
    assert summary("kvm-2024-lefebvre-spurious-wrapped.txt")["fast_page_faults"] == {"spurious": 2}
    assert summary("kvm-2019-kiszka-trace-cmd-quoted.txt")["pages_found_by_level"] == {"1": 2}
    s = summary("kvm-2022-annapurve-private-mem-wrapped.txt")
    assert s["leaves_installed_by_level"] == {"2": 1} and s["entries_frozen_by_level"] == {"1": 5}
    assert s["set_spte_by_level"] == {"2": 1} and s["lines_skipped"] == 1
    s = summary("kvm-2023-krause-cr0wp-trace.txt")
    assert s["pages_zapped_by_level"] == {"1": 2, "2": 1, "3": 1}
    assert s["first_skipped"] == {"line": 4, "text": "That's the initialization of L2's CR0 in secondary_startup_64() and"}
    text = shmmmu("trace", "summary", str(DATA / "real-kernels" / "kvm-2023-krause-cr0wp-trace.txt")).stdout
    assert "lines skipped (not in a known format)  4, the first: line 4:" in text


def test_summary_reads_6x_frozen_entries_and_split_huge_page(tmp_path: Path) -> None:
    """6.10 on: a non-present SPTE is SHADOW_NONPRESENT_VALUE (bit 63) and a frozen one FROZEN_SPTE
    (SHADOW_NONPRESENT_VALUE | 0x5a0); kvm_mmu_split_huge_page (6.0 on) in its TP_printk format."""
    f = tmp_path / "6x.txt"
    nonpresent = 1 << 63
    leaf, frozen = nonpresent | 0x100200b77, nonpresent | 0x5a0
    f.write_text(f"  CPU 0/KVM-7  [001] .....  5.000001: kvm_tdp_mmu_spte_changed: as id 0 gfn 200 level 1 "
                 f"old_spte {leaf:x} new_spte {frozen:x}\n"
                 f"  CPU 0/KVM-7  [001] .....  5.000002: kvm_tdp_mmu_spte_changed: as id 0 gfn 200 level 1 "
                 f"old_spte {frozen:x} new_spte {nonpresent:x}\n"
                 f"  CPU 0/KVM-7  [001] .....  5.000003: kvm_mmu_split_huge_page: gfn 400 spte {0x100400bf7:x} level 2 "
                 "errno 0\n")
    s = json.loads(shmmmu("trace", "summary", str(f), "--json").stdout)
    assert s["entries_frozen_by_level"] == {"1": 1} and s["leaves_removed_by_level"] == {"1": 1}
    assert s["split_huge_page_by_level"] == {"2": 1} and s["split_huge_page_errors"] == 0


def test_a_signal_during_conversion_leaves_nothing(tmp_path: Path, tmpenv: dict) -> None:
    import signal
    import time
    big = tmp_path / "big.txt"
    with big.open("w") as f:
        for k in range(40):
            f.write("".join(f"R {(i * 4099 + k) % 100000 * 4096:#x}\n" for i in range(100_000)))
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([*CMD, "run", "--trace", str(big), "--vcpus", "1"], cwd=ROOT, env=tmpenv,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.listdir(tmpenv["TMPDIR"]) and time.monotonic() < deadline:
            time.sleep(0.05)                     # converting: its temporary directory exists
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "Traceback" not in err, err
        no_leftovers(tmpenv)


def test_tracepoints_cost_nothing_when_off(vm_name: str) -> None:
    """Without --tracepoints no function of the Mmu is wrapped: the fault path is the class's own."""
    from shmmmu.layout import MemslotSpec, VMConfig
    from shmmmu.mmu import Mmu
    from shmmmu.mmu.instruments import kinds_of
    from shmmmu.mmu.mmu import MmuFault
    from shmmmu.mmu.tracepoints import TRACE
    from shmmmu.vm import create_vm
    with create_vm(VMConfig(name=vm_name, n_vcpus=1, memslots=[MemslotSpec(0, 512, 1)])) as vm:
        m = Mmu(vm, 0)
        assert m.tracepoints is None
        assert m.page_fault.__func__ is MmuFault.kvm_tdp_mmu_page_fault
        for key in TRACE:                       # every tracepoint's site is the class's own function
            owner, f = key.split(".")
            target = m.kvm if owner == "kvm" else getattr(m, owner)
            if key != "fault.page_fault":       # the entry point is chosen at build: checked above
                assert getattr(target, f).__func__ is getattr(type(target), f), key
                assert "trace" in kinds_of(getattr(type(target), f)), key


@pytest.mark.parametrize("sample", ["kvmmmu.trace-cmd.txt", "kvmmmu.perf.txt"])
def test_summary_reads_the_kernels_output(sample: str) -> None:
    p = shmmmu("trace", "summary", str(DATA / sample), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["events"] == {"kvm_mmu_get_page": 4, "kvm_page_fault": 2, "kvm_mmu_spte_requested": 2,
                           "kvm_tdp_mmu_spte_changed": 10, "kvm_mmu_prepare_zap_page": 2}
    assert s["huge_pages_split_by_level"] == {"2": 1}
    assert s["pages_zapped_by_level"] == {"1": 1, "2": 1}
    assert s["page_faults"] == {"read": 1, "write": 1}
    assert s["most_changed_gfns"][0] == ["40200", 5]
    text = shmmmu("trace", "summary", str(DATA / sample)).stdout
    assert "huge pages split by level       L2:1" in text


def test_summary_refuses_what_is_not_a_tracepoint_file(tmp_path: Path) -> None:
    one_line_error(shmmmu("trace", "summary", str(DATA / "plain.txt")), "no kvm or kvmmmu tracepoint events")
    one_line_error(shmmmu("trace", "summary", "/dev/zero", timeout=60), "binary data")
    bad = tmp_path / "bad.txt"
    bad.write_text("  CPU 0/KVM-1  [000]  1.000000: kvm_tdp_mmu_spte_changed: as id 0 gfn zz\n")
    one_line_error(shmmmu("trace", "summary", str(bad)), "no kvm or kvmmmu tracepoint events",
                   "1 line not in a known format, the first: line 1:")
    bad.write_text(bad.read_text() + "  CPU 0/KVM-1  [000]  1.000001: kvm_page_fault: address 1000 error_code 182\n")
    p = shmmmu("trace", "summary", str(bad), "--json")                 # one readable line: read, the other counted
    assert p.returncode == 0 and json.loads(p.stdout)["lines_skipped"] == 1


# ---------------------------------------------------------------- trace record, and a real program's million accesses

def test_record_without_valgrind_says_how_to_install_it(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}          # nothing on PATH: no valgrind
    one_line_error(shmmmu("trace", "record", "-o", str(tmp_path / "t"), "--", "true", env=env),
                   "valgrind is not installed", "apt-get install valgrind")
    one_line_error(shmmmu("trace", "record", "-o", str(tmp_path / "t")), "needs a command")


needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")


@needs_valgrind
def test_record_then_replay_a_million_accesses(tmp_path: Path, tmpenv: dict, vm_name: str) -> None:
    """`sort` of 300 lines under lackey: about 1.24 M accesses, replayed on one vCPU with 4 KiB backing: the faults
    are the distinct pages, counted here from the trace text."""
    words = tmp_path / "in.txt"
    words.write_text("".join(f"{(i * 7919) % 300:05d} line\n" for i in range(300)))
    trace = tmp_path / "sort.lackey"
    p = shmmmu("trace", "record", "-o", str(trace), "--", "sort", str(words), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Lackey" in trace.open().readline() + trace.open().read(300)
    n, pages = 0, set()
    with trace.open() as f:
        for line in f:
            if line.startswith("=="):
                continue
            k, rest = line.split()
            a, s = rest.split(",")
            lo, hi = int(a, 16) >> 12, (int(a, 16) + int(s) - 1) >> 12
            n += (2 if k == "M" else 1) * (hi - lo + 1)
            pages.update(range(lo, hi + 1))
    assert n >= 1_000_000
    d = run_json(shmmmu("run", "--name", vm_name, "--trace", str(trace), "--vcpus", "1", "--backing", "4k",
                        "--memory", "8M", "--iterations", "1", "--json", env=tmpenv, timeout=600))
    assert d["stats"]["accesses"] == n
    assert d["faults"] == d["stats"]["fixed"] == len(pages)
    no_leftovers(tmpenv)


@needs_valgrind
def test_record_reports_the_commands_signal_death_as_a_shell_does(tmp_path: Path) -> None:
    """`trace record -- sh -c 'kill -9 $$'` exited 247 (the negative status of Popen, modulo 256): a command
    a signal N ended is 128 + N, as a shell reports it, and the trace is kept (issue 21, item 10)."""
    out = tmp_path / "killed.lackey"
    p = shmmmu("trace", "record", "-o", str(out), "--", "sh", "-c", "kill -9 $$", timeout=300)
    assert p.returncode == 128 + 9, (p.returncode, p.stderr[-2000:])
    assert "killed by SIGKILL" in p.stderr and "Traceback" not in p.stderr
    assert out.stat().st_size > 0
    p = shmmmu("trace", "record", "-o", str(out), "--", "sh", "-c", "exit 3", timeout=300)
    assert p.returncode == 3 and "exited with status 3" in p.stderr, p.stderr[-2000:]


# ---------------------------------------------------------------- the lackey fast path is the line reader, faster

def _lackey_both_ways(data: bytes, block: int) -> tuple[object, object]:
    """(what read_lackey line by line gives, what the block path gives): the words and pages, or the error."""
    import io
    import tempfile
    import numpy as np
    from shmmmu.trace import formats as F
    from shmmmu.trace.store import Converter

    def result(run) -> object:
        with tempfile.TemporaryDirectory() as d:
            c = Converter(d)
            try:
                run(c)
            except F.TraceError as e:
                c.close()
                return str(e)
            out = {}
            for tid, p in c.parts.items():
                p.flush()
                p.file.seek(0)
                out[tid] = np.frombuffer(p.file.read(), dtype=np.uint64).tolist()
            c.close()
            return out, dict(c.pages)

    saved = F.BLOCK
    F.BLOCK = block
    try:
        ref = result(lambda c: F.read_lackey(F.text_lines(io.BytesIO(data), "t"), c.add, "t", 12))
        fast = result(lambda c: F.read_lackey_blocks(io.BytesIO(data), c.add, c.add_block, "t", 12, 0))
    finally:
        F.BLOCK = saved
    return ref, fast


def test_lackey_fast_path_equals_the_line_reader_on_the_real_sample() -> None:
    data = (DATA / "lackey-true.txt").read_bytes()
    for block in (1 << 20, 4096, 97):
        ref, fast = _lackey_both_ways(data, block)
        assert isinstance(ref, tuple) and ref == fast


def _line() -> "object":
    from hypothesis import strategies as st
    addr = st.one_of(st.integers(0, 1 << 40), st.integers(0, 64).map(lambda k: (1 << 64) - k),
                     st.integers(1, 1 << 20).map(lambda p: p * 4096 - 3))
    good = st.builds(lambda k, a, z: f"{k}{a:08x},{z}".encode(), st.sampled_from(["I  ", " L ", " S ", " M "]),
                     addr, st.integers(0, 5000))
    bad = st.sampled_from([b" Z 0400,4", b"I  zz,4", b"", b"   ", b"I  -10,4", b"I  " + b"f" * 17 + b",1",
                           b"==1== " + b"x" * 5000, b"I  0400,4\r", b" L 0400,4 extra", b"\x00", b"\xff\xfe",
                           b"I  0400,\xc3\xa9", b"L" * 4200, b"==12== Lackey", b"I  12\rL,4"])
    return st.one_of(good, good, good, bad)


def test_lackey_fast_path_equals_the_line_reader_on_any_text() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.lists(_line(), max_size=40), st.booleans(), st.sampled_from([16, 61, 200, 4096, 1 << 20]))
    def check(lines: list[bytes], final_newline: bool, block: int) -> None:
        data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
        ref, fast = _lackey_both_ways(data, block)
        assert ref == fast
    check()


def test_lackey_fast_path_with_many_pages_equals_the_line_reader() -> None:
    """A mapping past SORTED_SEARCH pages is searched with the block's pages sorted, and new pages are inserted
    into it block after block: the same words and mapping as the line reader, in every block size (the limit
    lowered so a small text crosses it many times)."""
    import random
    from shmmmu.trace import store
    rnd = random.Random(5)
    lines = [f"{rnd.choice(['I  ', ' L ', ' S ', ' M '])}{rnd.randrange(1 << 36) * 4096 + rnd.randrange(4096):x},"
             f"{rnd.choice([1, 4, 8, 16])}" for _ in range(3000)]
    lines += [rnd.choice(lines) for _ in range(3000)]             # pages seen before, mixed in
    data = ("\n".join(lines) + "\n").encode()
    saved = store.SORTED_SEARCH
    store.SORTED_SEARCH = 8
    try:
        for block in (4096, 1 << 16, 1 << 20):
            ref, fast = _lackey_both_ways(data, block)
            assert isinstance(ref, tuple) and ref == fast and len(ref[1]) > 3000
    finally:
        store.SORTED_SEARCH = saved

