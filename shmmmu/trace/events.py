"""Events: the kvm and kvmmmu tracepoints the emulator fires, as Linux 5.13 defines them and trace-cmd prints them.

Each event has the fields of its TP_STRUCT__entry (arch/x86/kvm/trace.h and
arch/x86/kvm/mmu/mmutrace.h of 5.13), laid out as the compiler lays out the
kernel's struct (after the common fields every event has), the format file
/sys/kernel/tracing/events/SYSTEM/NAME/format shows for it (the `print fmt`
as the kernel stringifies its TP_printk), and what `trace-cmd report` prints
of one record:

  kvm_page_fault            "address %lx error_code %x"                 (the print fmt)
  kvm_mmu_spte_requested    "gfn %llx pfn %llx level %d"
  kvm_tdp_mmu_spte_changed  "as id %d gfn %llx level %d old_spte %llx new_spte %llx"
  kvm_mmu_get_page          libtraceevent's plugin_kvm (its print fmt is a statement expression
  kvm_mmu_prepare_zap_page  libtraceevent cannot parse): "new sp gfn %llx " then the role, "root %u", sync

The role the plugin prints ("%u q%u%s %s%s %spae %snxe %swp%s%s%s") reads
5.13's union kvm_mmu_page_role with the plugin's older names: bit 4, 5.13's
gpte_is_8_bytes, is its "pae".  The kernel's own printk of these two events
(what /sys/kernel/tracing/trace shows) is `printk_text()`.

Records travel between the emulator's workers and the writers as
(event name, field values in the struct's order).
"""
from __future__ import annotations

from dataclasses import dataclass

# the common fields, as every 5.13 format file lists them first
COMMON = (("unsigned short", "common_type", 2, 0), ("unsigned char", "common_flags", 1, 0),
          ("unsigned char", "common_preempt_count", 1, 0), ("int", "common_pid", 4, 1))
COMMON_SIZE = 8

# KVM_MMU_PAGE_PRINTK() of 5.13 (role.nxe: renamed efer_nx in 5.14), as the kernel stringifies it into the format
_MMU_PAGE_PRINTK = (
    '({ const char *saved_ptr = trace_seq_buffer_ptr(p); static const char *access_str[] = { "---", "--x", '
    '"w--", "w-x", "-u-", "-ux", "wu-", "wux" }; union kvm_mmu_page_role role; role.word = REC->role; '
    'trace_seq_printf(p, "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s" " %snxe %sad root %u %s%c", '
    'REC->mmu_valid_gen, REC->gfn, role.level, role.gpte_is_8_bytes ? 8 : 4, role.quadrant, '
    'role.direct ? " direct" : "", access_str[role.access], role.invalid ? " invalid" : "", '
    'role.nxe ? "" : "!", role.ad_disabled ? "!" : "", REC->root_count, REC->unsync ? "unsync" : "sync", 0); '
    'saved_ptr; })')
_MMU_PAGE_FIELDS = (("__u8", "mmu_valid_gen", 1, 0), ("__u64", "gfn", 8, 0), ("__u32", "role", 4, 0),
                    ("__u32", "root_count", 4, 0), ("bool", "unsync", 1, 0))


@dataclass(frozen=True)
class Event:
    """One tracepoint: its system, its fields (C type, name, size, signed) after the common ones, its print fmt."""

    system: str
    name: str
    fields: tuple[tuple[str, str, int, int], ...]
    print_fmt: str

    def layout(self) -> list[tuple[str, str, int, int, int]]:
        """(C type, name, offset, size, signed) of every field, common ones first, aligned as the compiler does."""
        out = []
        off = 0
        for ctype, name, size, signed in COMMON + self.fields:
            off = (off + size - 1) // size * size
            out.append((ctype, name, off, size, signed))
            off += size
        return out

    @property
    def size(self) -> int:
        """sizeof the kernel's struct trace_event_raw_NAME: the last field's end, rounded to the widest field."""
        lay = self.layout()
        end = lay[-1][2] + lay[-1][3]
        align = max(s for _, _, _, s, _ in lay)
        return (end + align - 1) // align * align

    def format_file(self, event_id: int) -> str:
        """The event's format file as the kernel shows it under events/SYSTEM/NAME/format."""
        rows = [f"\tfield:{t} {n};\toffset:{o};\tsize:{s};\tsigned:{g};" for t, n, o, s, g in self.layout()]
        return (f"name: {self.name}\nID: {event_id}\nformat:\n" + "\n".join(rows[:4]) + "\n\n"
                + "\n".join(rows[4:]) + f"\n\nprint fmt: {self.print_fmt}\n")


EVENTS: dict[str, Event] = {e.name: e for e in (
    Event("kvm", "kvm_page_fault", (("unsigned long", "fault_address", 8, 0), ("unsigned int", "error_code", 4, 0)),
          '"address %lx error_code %x", REC->fault_address, REC->error_code'),
    Event("kvmmmu", "kvm_mmu_spte_requested", (("u64", "gfn", 8, 0), ("u64", "pfn", 8, 0), ("u8", "level", 1, 0)),
          '"gfn %llx pfn %llx level %d", REC->gfn, REC->pfn, REC->level'),
    Event("kvmmmu", "kvm_tdp_mmu_spte_changed",
          (("u64", "gfn", 8, 0), ("u64", "old_spte", 8, 0), ("u64", "new_spte", 8, 0), ("u8", "level", 1, 0),
           ("u8", "as_id", 1, 0)),
          '"as id %d gfn %llx level %d old_spte %llx new_spte %llx", REC->as_id, REC->gfn, REC->level, '
          'REC->old_spte, REC->new_spte'),
    Event("kvmmmu", "kvm_mmu_get_page", _MMU_PAGE_FIELDS + (("bool", "created", 1, 0),),
          f'"%s %s", {_MMU_PAGE_PRINTK}, REC->created ? "new" : "existing"'),
    Event("kvmmmu", "kvm_mmu_prepare_zap_page", _MMU_PAGE_FIELDS, f'"%s", {_MMU_PAGE_PRINTK}'),
)}

# the TP_printk format strings the kernel prints these events with (tests compare every line with them)
PRINTK = {
    "kvm_page_fault": "address %lx error_code %x",
    "kvm_mmu_spte_requested": "gfn %llx pfn %llx level %d",
    "kvm_tdp_mmu_spte_changed": "as id %d gfn %llx level %d old_spte %llx new_spte %llx",
    "kvm_mmu_get_page": "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s %s",
    "kvm_mmu_prepare_zap_page": "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s",
}
# what libtraceevent's plugin_kvm prints for the two page events (kvm_mmu_get_page_handler, kvm_mmu_print_role)
PLUGIN = {
    "kvm_mmu_get_page": "%s sp gfn %llx %u q%u%s %s%s %spae %snxe %swp%s%s%s root %u %s",
    "kvm_mmu_prepare_zap_page": "%u q%u%s %s%s %spae %snxe %swp%s%s%s root %u %s",
}
ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")

# union kvm_mmu_page_role of 5.13: the bits a TDP MMU page's role has
ROLE_GPTE_IS_8_BYTES = 1 << 4
ROLE_DIRECT = 1 << 7
ROLE_ACC_ALL = 7 << 8
ROLE_INVALID = 1 << 11


def tdp_role(level: int) -> int:
    """The role word of a TDP MMU page at `level`: direct, 8-byte gptes, quadrant 0, all access, nxe, cr0_wp and
    ad_disabled clear (the emulator's TDP root role)."""
    return level | ROLE_GPTE_IS_8_BYTES | ROLE_DIRECT | ROLE_ACC_ALL


def _plugin_role(role: int) -> str:
    """plugin_kvm's kvm_mmu_print_role() up to " root": level, quadrant, direct, access, invalid, pae, nxe, wp..."""
    def bit(n: int) -> int:
        return role >> n & 1
    return (f"{role & 0xf} q{role >> 5 & 3}{' direct' if bit(7) else ''} {ACCESS_STR[role >> 8 & 7]}"
            f"{' invalid' if bit(11) else ''} {'' if bit(4) else '!'}pae {'' if bit(12) else '!'}nxe "
            f"{'' if bit(13) else '!'}wp{' smep' if bit(14) else ''}{' smap' if bit(15) else ''}"
            f"{' smm' if role >> 24 & 0xff else ''}")


def report_text(event: str, v: tuple[int, ...]) -> str:
    """What `trace-cmd report` prints after the event's name for a record with field values `v`."""
    if event == "kvm_page_fault":
        return f"address {v[0]:x} error_code {v[1]:x}"
    if event == "kvm_mmu_spte_requested":
        return f"gfn {v[0]:x} pfn {v[1]:x} level {v[2]}"
    if event == "kvm_tdp_mmu_spte_changed":
        return f"as id {v[4]} gfn {v[0]:x} level {v[3]} old_spte {v[1]:x} new_spte {v[2]:x}"
    tail = f"{_plugin_role(v[2])} root {v[3]} {'unsync' if v[4] else 'sync'}"
    if event == "kvm_mmu_get_page":
        return f"{'new' if v[5] else 'existing'} sp gfn {v[1]:x} {tail}"
    return tail


def printk_text(event: str, v: tuple[int, ...]) -> str:
    """What the kernel's own TP_printk makes of the record (the text /sys/kernel/tracing/trace shows)."""
    if event not in ("kvm_mmu_get_page", "kvm_mmu_prepare_zap_page"):
        return report_text(event, v)
    role = v[2]
    text = (f"sp gen {v[0]} gfn {v[1]:x} l{role & 0xf} {8 if role & ROLE_GPTE_IS_8_BYTES else 4}-byte "
            f"q{role >> 5 & 3}{' direct' if role & ROLE_DIRECT else ''} {ACCESS_STR[role >> 8 & 7]}"
            f"{' invalid' if role & ROLE_INVALID else ''} {'' if role >> 12 & 1 else '!'}nxe "
            f"{'!' if role >> 16 & 1 else ''}ad root {v[3]} {'unsync' if v[4] else 'sync'}")
    return text + (" new" if v[5] else " existing") if event == "kvm_mmu_get_page" else text


def report_time(ns: int) -> str:
    """A timestamp as trace-cmd report prints it (libtraceevent's "%6.1000d": microseconds, rounded; a time of
    a second or less as a bare count of microseconds)."""
    us = (ns + 500) // 1000
    return f"{us // 1000000:5d}.{us % 1000000:06d}" if us > 1000000 else f"{us:12d}"


def report_line(comm: str, pid: int, cpu: int, ns: int, event: str, text: str) -> str:
    """One event line of `trace-cmd report`: "%16s-%-5d [%03d] TIME: NAME: " with the name spaced out to 20
    columns (libtraceevent's "Space out the event names evenly"), then the event's text."""
    return f"{comm:>16}-{pid:<5} [{cpu:03d}] {report_time(ns)}: {event}: {' ' * (20 - len(event))}{text}\n"
