"""Kernel crash reports as 6.1 and 6.12 print them: which kind, whether the kernel goes on, and a title that
stays the same across boots, kernels and builds."""

from __future__ import annotations

import itertools
import re

import pytest

from kvmtests.verdict import crash

pytestmark = pytest.mark.selftest

HARDWARE = "Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.3-debian-1.16.3-2 04/01/2014"
CPU_6_1 = "CPU: 0 PID: 245 Comm: python3 Not tainted 6.1.0-28-amd64 #1  Debian 6.1.119-1"
CPU_6_12 = "CPU: 0 UID: 0 PID: 245 Comm: python3 Not tainted 6.12.9-amd64 #1  Debian 6.12.9-1"
REGS = """\
RSP: 0018:ffffb0a4c0a1bc58 EFLAGS: 00010246
RAX: 0000000000000000 RBX: ffff9d6c41a8a000 RCX: 0000000000000000
RDX: 0000000000000001 RSI: 0000000000000246 RDI: ffff9d6c41a8a000
RBP: ffffb0a4c0a1bcc8 R08: 0000000000000000 R09: 0000000000000000
R13: 0000000000000000 R14: ffff9d6c4a0b0000 R15: 0000000000000000
FS:  00007f3c1d3ff740(0000) GS:ffff9d6cbbc00000(0000) knlGS:0000000000000000
CS:  0010 DS: 0000 ES: 0000 CR0: 0000000080050033"""
IOCTL = """\
 __x64_sys_ioctl+0x90/0xd0
 do_syscall_64+0x82/0x190
 entry_SYSCALL_64_after_hwframe+0x76/0x7e
RIP: 0033:0x7f3c1d4f1a1b
Code: 00 48 89 44 24 18 31 c0 48 8d 44 24 60 c7 04 24 10 00 00 00 48 89 44 24 08 48 8d 44 24 20 48 89 44 24
RSP: 002b:00007ffd8a3b2c40 EFLAGS: 00000246 ORIG_RAX: 0000000000000010
 </TASK>"""
VCPU_RUN = f"""\
 kvm_arch_vcpu_ioctl_run+0xd7a/0x1740 [kvm]
 kvm_vcpu_ioctl+0x294/0x6b0 [kvm]
{IOCTL}"""
PAGE_FAULT_FRAMES = """\
 ? __die+0x23/0x70
 ? page_fault_oops+0x171/0x4e0
 ? exc_page_fault+0x77/0x170
 ? asm_exc_page_fault+0x26/0x30"""
MODULES = "Modules linked in: kvm_amd kvm irqbypass"
END_TRACE = "---[ end trace 0000000000000000 ]---"
TIMER_INTERRUPT = """\
 ? __hrtimer_run_queues+0x112/0x2a0
 ? hrtimer_interrupt+0xfa/0x230
 ? __sysvec_apic_timer_interrupt+0x55/0x100
 ? sysvec_apic_timer_interrupt+0x6c/0x90
 </IRQ>
 <TASK>
 ? asm_sysvec_apic_timer_interrupt+0x1a/0x20"""
TIMER_IRQ = f"""\
 <IRQ>
 ? watchdog_timer_fn+0x1e6/0x270
 ? __pfx_watchdog_timer_fn+0x10/0x10
{TIMER_INTERRUPT}"""

NULL_DEREF = f"""\
BUG: kernel NULL pointer dereference, address: 0000000000000008
#PF: supervisor read access in kernel mode
#PF: error_code(0x0000) - not-present page
PGD 0 P4D 0
Oops: 0000 [#1] PREEMPT SMP NOPTI
{CPU_6_1}
{HARDWARE}
RIP: 0010:kvm_hv_hypercall+0x1d4/0x6a0 [kvm]
Code: 48 8b 43 08 48 85 c0 0f 84 5a 02 00 00 <48> 8b 50 08 48 85 d2 74 0b
{REGS}
Call Trace:
 <TASK>
{PAGE_FAULT_FRAMES}
 ? kvm_hv_hypercall+0x1d4/0x6a0 [kvm]
 svm_invoke_exit_handler+0x10b/0x180 [kvm_amd]
 svm_handle_exit+0xb2/0x1e0 [kvm_amd]
{VCPU_RUN}
{MODULES}
CR2: 0000000000000008
{END_TRACE}"""

PAGE_FAULT = f"""\
BUG: unable to handle page fault for address: ffffc90000a4b000
#PF: supervisor write access in kernel mode
#PF: error_code(0x0002) - not-present page
PGD 100000067 P4D 100000067 PUD 1001e4067 PMD 104b3c067 PTE 0
Oops: Oops: 0002 [#1] PREEMPT SMP NOPTI
{CPU_6_12}
{HARDWARE}
RIP: 0010:kvm_vm_ioctl_set_mem_attributes.constprop.0+0x15e/0x2a0 [kvm]
Code: 89 c7 e8 8e 1c ff ff 85 c0 0f 85 a6 00 00 00 <48> 89 1c 24 48 8b 44 24
{REGS}
Call Trace:
 <TASK>
{PAGE_FAULT_FRAMES}
 ? kvm_vm_ioctl_set_mem_attributes.constprop.0+0x15e/0x2a0 [kvm]
 kvm_vm_ioctl+0x7d8/0x1020 [kvm]
{IOCTL}
{MODULES}
CR2: ffffc90000a4b000
{END_TRACE}"""

GPF = f"""\
Oops: general protection fault, probably for non-canonical address 0xdead000000000122: 0000 [#1] PREEMPT SMP NOPTI
{CPU_6_12}
{HARDWARE}
RIP: 0010:kvm_hv_flush_tlb+0x29b/0x5d0 [kvm]
Code: 48 8b 55 00 48 8b 45 08 48 89 42 08 48 89 10 48 b8 00 01 00 00 00 00 ad de <48> 89 45 00
{REGS}
Call Trace:
 <TASK>
 ? die_addr+0x3c/0x60
 ? exc_general_protection+0x1c1/0x410
 ? asm_exc_general_protection+0x26/0x30
 ? kvm_hv_flush_tlb+0x29b/0x5d0 [kvm]
 kvm_hv_hypercall+0x2f1/0x6a0 [kvm]
 svm_invoke_exit_handler+0x10b/0x180 [kvm_amd]
{VCPU_RUN}
{MODULES}
{END_TRACE}"""

KERNEL_BUG = f"""\
------------[ cut here ]------------
kernel BUG at arch/x86/kvm/mmu/mmu.c:2594!
invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
{CPU_6_1}
{HARDWARE}
RIP: 0010:__kvm_mmu_prepare_zap_page+0x5d2/0x6a0 [kvm]
Code: 0f 0b 48 8b 43 28 48 8b 53 20 48 89 42 08 48 89 10 <0f> 0b 0f 0b
{REGS}
Call Trace:
 <TASK>
 ? die+0x36/0x90
 ? do_trap+0xda/0x100
 ? __kvm_mmu_prepare_zap_page+0x5d2/0x6a0 [kvm]
 ? do_error_trap+0x6a/0x90
 ? exc_invalid_op+0x50/0x70
 ? asm_exc_invalid_op+0x1a/0x20
 kvm_mmu_zap_all+0x8c/0x110 [kvm]
 kvm_arch_flush_shadow_all+0x12/0x20 [kvm]
 kvm_destroy_vm+0x159/0x2a0 [kvm]
 kvm_vm_release+0x22/0x30 [kvm]
 __fput+0xff/0x2a0
 task_work_run+0x59/0x90
 do_exit+0x350/0xb00
 </TASK>
{MODULES}
{END_TRACE}"""


def warning(message: str) -> str:
    """A WARN in 6.12, with the message WARN() prints before it (none for WARN_ON)."""
    return f"""\
------------[ cut here ]------------
{message}WARNING: CPU: 0 PID: 245 at arch/x86/kvm/hyperv.c:2134 kvm_hv_set_vtl+0x61/0x90 [kvm]
{MODULES}
{CPU_6_12}
{HARDWARE}
RIP: 0010:kvm_hv_set_vtl+0x61/0x90 [kvm]
Code: 5b 5d c3 cc cc cc cc 48 c7 c7 e8 54 9a c0 e8 5c 1b 5f d7 <0f> 0b eb e5
{REGS}
Call Trace:
 <TASK>
 ? __warn+0x81/0x130
 ? kvm_hv_set_vtl+0x61/0x90 [kvm]
 ? report_bug+0x171/0x1a0
 ? handle_bug+0x58/0x90
 ? exc_invalid_op+0x17/0x70
 ? asm_exc_invalid_op+0x1a/0x20
 ? kvm_hv_set_vtl+0x61/0x90 [kvm]
 kvm_hv_hypercall+0x3b4/0x6a0 [kvm]
{VCPU_RUN}
{END_TRACE}"""


SOFT_LOCKUP = f"""\
watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [python3:245]
{MODULES}
{CPU_6_12}
{HARDWARE}
RIP: 0010:native_queued_spin_lock_slowpath+0x6f/0x2e0
Code: 00 00 f0 0f ba 2b 08 0f 92 c2 8b 03 0f b6 d2 c1 e2 08 30 e4 09 d0 a9 00 01 ff ff 75 47 85 c0 74 0e <8b> 03
{REGS}
Call Trace:
{TIMER_IRQ}
 ? native_queued_spin_lock_slowpath+0x6f/0x2e0
 _raw_spin_lock+0x29/0x30
 kvm_zap_gfn_range+0x5b/0x2f0 [kvm]
 kvm_vm_ioctl_set_mem_attributes.constprop.0+0x1a2/0x2a0 [kvm]
 kvm_vm_ioctl+0x7d8/0x1020 [kvm]
{VCPU_RUN}"""

HUNG_TASK = f"""\
INFO: task python3:245 blocked for more than 120 seconds.
      Not tainted 6.1.0-28-amd64 #1 Debian 6.1.119-1
"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.
task:python3         state:D stack:0     pid:245   ppid:1      flags:0x00004002
Call Trace:
 <TASK>
 __schedule+0x34d/0x9e0
 schedule+0x5a/0xd0
 schedule_preempt_disabled+0x11/0x20
 __mutex_lock.constprop.0+0x399/0x700
 kvm_vcpu_ioctl_set_mpstate+0x2e/0x120 [kvm]
 kvm_arch_vcpu_ioctl+0x6d4/0x1230 [kvm]
 kvm_vcpu_ioctl+0x3a5/0x6b0 [kvm]
{IOCTL}"""

RCU_STALL = f"""\
rcu: INFO: rcu_preempt self-detected stall on CPU
rcu: \t0-....: (21000 ticks this GP) idle=c04c/1/0x4000000000000000 softirq=1234/1234 fqs=5234
rcu: \t(t=21001 jiffies g=4617 q=1234 ncpus=1)
{CPU_6_12}
{HARDWARE}
RIP: 0010:kvm_hv_send_ipi+0x15c/0x5d0 [kvm]
Code: 8b 44 24 10 48 83 c4 18 5b 5d 41 5c 41 5d 41 5e 41 5f c3 cc 48 8b 7c 24 08 <e8> 00 00 00 00
{REGS}
Call Trace:
 <IRQ>
 ? rcu_dump_cpu_stacks+0xed/0x170
 ? rcu_sched_clock_irq+0x4f1/0xba0
 ? update_process_times+0x74/0xb0
 ? tick_nohz_handler+0x8f/0x140
{TIMER_INTERRUPT}
 ? kvm_hv_send_ipi+0x15c/0x5d0 [kvm]
 kvm_hv_hypercall+0x2f1/0x6a0 [kvm]
 svm_invoke_exit_handler+0x10b/0x180 [kvm_amd]
{VCPU_RUN}"""

SYSRQ_PANIC = f"""\
sysrq: Trigger a crash
Kernel panic - not syncing: sysrq triggered crash
{CPU_6_12}
{HARDWARE}
Call Trace:
 <TASK>
 dump_stack_lvl+0x5d/0x80
 panic+0x118/0x2f8
 sysrq_handle_crash+0x1a/0x20
 __handle_sysrq.cold+0xa5/0x115
 write_sysrq_trigger+0x65/0x80
 proc_reg_write+0x5b/0xa0
 vfs_write+0xf6/0x460
 ksys_write+0x6d/0xf0
 do_syscall_64+0x82/0x190
 entry_SYSCALL_64_after_hwframe+0x76/0x7e
RIP: 0033:0x7f3c1d4f1240
Code: 40 00 48 8b 15 c1 9b 0d 00 f7 d8 64 89 02 48 c7 c0 ff ff ff ff eb b7 0f 1f 00 80 3d a1 23 0e 00 00 74 17
RSP: 002b:00007ffd8a3b2c48 EFLAGS: 00000202 ORIG_RAX: 0000000000000001
 </TASK>
Kernel Offset: 0x1c000000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)
---[ end Kernel panic - not syncing: sysrq triggered crash ]---"""

# An oops in interrupt context: oops_end() closes the report, then panics (no stack of its own).
OOPS_THEN_PANIC = f"""\
{NULL_DEREF}
RIP: 0010:kvm_hv_hypercall+0x1d4/0x6a0 [kvm]
Code: 48 8b 43 08 48 85 c0 0f 84 5a 02 00 00 <48> 8b 50 08 48 85 d2 74 0b
{REGS}
Kernel panic - not syncing: Fatal exception in interrupt
Kernel Offset: 0x1c000000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)
---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---"""

# What the kernel says to the runner's NMI while a vCPU spins (/init sets unknown_nmi_panic).
NMI_PANIC = f"""\
Uhhuh. NMI received for unknown reason 30 on CPU 0.
Kernel panic - not syncing: NMI: Not continuing
{CPU_6_12}
{HARDWARE}
Call Trace:
 <NMI>
 dump_stack_lvl+0x5d/0x80
 panic+0x118/0x2f8
 nmi_panic+0x37/0x40
 unknown_nmi_error.cold+0x5c/0x78
 default_do_nmi+0xc2/0x120
 exc_nmi+0x132/0x1a0
 end_repeat_nmi+0xf/0x53
RIP: 0010:svm_vcpu_enter_exit+0x8d/0x150 [kvm_amd]
Code: 44 00 00 48 8b 44 24 08 48 8b 7c 24 10 e8 8a 28 00 00 0f 1f 44 00 00 <48> 83 c4 18 5b 5d c3 cc
{REGS}
 ? svm_vcpu_enter_exit+0x8d/0x150 [kvm_amd]
 </NMI>
 <TASK>
 svm_vcpu_run+0x1f6/0x8b0 [kvm_amd]
{VCPU_RUN}
Kernel Offset: 0x1c000000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)
---[ end Kernel panic - not syncing: NMI: Not continuing ]---"""

INIT_KILLED = f"""\
Run /init as init process
Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100
CPU: 0 UID: 0 PID: 1 Comm: init Not tainted 6.12.9-amd64 #1  Debian 6.12.9-1
{HARDWARE}
Call Trace:
 <TASK>
 dump_stack_lvl+0x5d/0x80
 panic+0x118/0x2f8
 do_exit.cold+0x15/0x15
 do_group_exit+0x30/0x80
 __x64_sys_exit_group+0x18/0x20
 x64_sys_call+0x14fa/0x1500
 do_syscall_64+0x82/0x190
 entry_SYSCALL_64_after_hwframe+0x76/0x7e
 </TASK>
Kernel Offset: 0x1c000000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)
---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100 ]---"""

KASAN = f"""\
==================================================================
BUG: KASAN: slab-use-after-free in kvm_hv_vcpu_flush_tlb+0x1c4/0x2a0 [kvm]
Read of size 8 at addr ffff888104c5e2a8 by task python3/245

{CPU_6_1}
{HARDWARE}
Call Trace:
 <TASK>
 dump_stack_lvl+0x73/0xb0
 print_report+0xcf/0x630
 kasan_report+0xc1/0xf0
 kvm_hv_vcpu_flush_tlb+0x1c4/0x2a0 [kvm]
 vcpu_enter_guest+0x18d5/0x3ad0 [kvm]
{VCPU_RUN}

Allocated by task 245:
 kasan_save_stack+0x33/0x60
 kasan_save_track+0x14/0x30
 __kasan_kmalloc+0xaa/0xb0
 kvm_hv_vcpu_init+0x6e/0x3c0 [kvm]

Freed by task 245:
 kasan_save_stack+0x33/0x60
 kfree+0x114/0x330
 kvm_hv_vcpu_uninit+0x35/0x60 [kvm]
=================================================================="""

# name -> (report text, kind, title)
REPORTS = {
    "NULL pointer dereference": (NULL_DEREF, crash.OOPS, "BUG: kernel NULL pointer dereference in kvm_hv_hypercall"),
    "page fault": (PAGE_FAULT, crash.OOPS, "BUG: unable to handle page fault in kvm_vm_ioctl_set_mem_attributes"),
    "general protection fault": (GPF, crash.OOPS, "general protection fault in kvm_hv_flush_tlb"),
    "kernel BUG at": (KERNEL_BUG, crash.OOPS, "kernel BUG in __kvm_mmu_prepare_zap_page"),
    "WARN_ON": (warning(""), crash.WARNING, "WARNING in kvm_hv_set_vtl"),
    "WARN with a message": (warning("kvm: VTL 3 is not supported\n"), crash.WARNING, "WARNING in kvm_hv_set_vtl"),
    "soft lockup in a spinlock": (SOFT_LOCKUP, crash.LOCKUP, "BUG: soft lockup in kvm_zap_gfn_range"),
    "hung task on a mutex": (HUNG_TASK, crash.HUNG_TASK, "INFO: task hung in kvm_vcpu_ioctl_set_mpstate"),
    "RCU stall": (RCU_STALL, crash.RCU_STALL, "INFO: rcu detected stall in kvm_hv_send_ipi"),
    "sysrq panic": (SYSRQ_PANIC, crash.PANIC, "kernel panic: sysrq triggered crash in sysrq_handle_crash"),
    "panic after an oops": (OOPS_THEN_PANIC, crash.PANIC, "BUG: kernel NULL pointer dereference in kvm_hv_hypercall"),
    "NMI panic": (NMI_PANIC, crash.PANIC, "kernel panic: NMI: Not continuing in svm_vcpu_run"),
    "init killed": (INIT_KILLED, crash.PANIC, "kernel panic: Attempted to kill init! exitcode=0x00000100 in do_exit"),
    "KASAN": (KASAN, crash.OOPS, "BUG: KASAN: slab-use-after-free in kvm_hv_vcpu_flush_tlb"),
}


def console(text: str, start: float = 12.345678, step: float = 0.000113, caller: bool = False) -> list[str]:
    """The report as console lines: each with the printk time stamp (and the caller id of PRINTK_CALLER)."""
    return [f"[{start + i * step:12.6f}]{'[  T245]' if caller else ''} {line}"
            for i, line in enumerate(text.splitlines())]


def rebuilt(text: str, seed: int) -> str:
    """The same bug on another boot or build: other addresses, offsets, PIDs and register values, KVM built in."""
    digits = itertools.count(seed)

    def other(match: re.Match[str]) -> str:
        return "".join("0123456789abcdef"[(int(c, 16) + next(digits)) % 16] for c in match[0])

    text = re.sub(r"(?<=\+0x)[0-9a-f]+|(?<=/0x)[0-9a-f]+|\b[0-9a-f]{16}\b", other, text)
    return re.sub(r" \[kvm(_amd)?\]$", "", re.sub(r"\b245\b", str(1000 + seed), text), flags=re.M)


@pytest.mark.parametrize("name", REPORTS)
def test_report_title_and_kind(name: str) -> None:
    """The kind decides whether the boot goes on; the title names the bug as syzkaller would."""
    text, kind, title = REPORTS[name]
    reports = crash.scan(console(text))
    assert [(r.kind, r.title) for r in reports] == [(kind, title)]
    assert reports[0].fatal == (kind != crash.WARNING)
    assert not reports[0].lines[0].startswith("["), "time stamps are stripped"


@pytest.mark.parametrize("name", REPORTS)
def test_title_is_the_same_on_another_boot_and_build(name: str) -> None:
    """Addresses, offsets, time stamps, PIDs and module names differ between boots and builds, titles do not."""
    text, _, title = REPORTS[name]
    other = rebuilt(text, 7)
    assert other != text
    assert [r.title for r in crash.scan(console(other, start=4711.000001, step=0.0071, caller=True))] == [title]


def test_scanner_hands_each_report_back_once_it_is_complete() -> None:
    """An oops ends at its end marker, a lockup at its task's stack end; lines between reports are no report."""
    scanner = crash.Scanner()
    lines = console(f"kvm: emulating exchange as write\n{NULL_DEREF}\nkvm: kvm [245]: vcpu0 disabled perfctr\n"
                    f"{SOFT_LOCKUP}")
    done = [(i, r.title) for i, line in enumerate(lines) for r in scanner.feed(line)]
    end, lockup_end = lines.index(next(x for x in lines if "---[ end trace" in x)), len(lines) - 1
    assert done == [(end, REPORTS["NULL pointer dereference"][2]),
                    (lockup_end, REPORTS["soft lockup in a spinlock"][2])]
    assert scanner.flush() == []


@pytest.mark.parametrize("name, opening", [("NULL pointer dereference", "BUG: kernel NULL"),
                                           ("WARN_ON", "WARNING: CPU"), ("sysrq panic", "Kernel panic")])
def test_a_report_may_follow_the_suites_output_on_its_first_line(name: str, opening: str) -> None:
    """pytest prints a test's file name and progress without a newline, and the kernel's first line follows it."""
    text, kind, title = REPORTS[name]
    lines = console(text)
    at = next(i for i, line in enumerate(lines) if opening in line)
    first = crash.strip_prefix(lines[at])
    lines[at] = "tests/test_hv_hcalls.py .." + lines[at]
    reports = crash.scan(lines)
    assert [(r.kind, r.title) for r in reports] == [(kind, title)]
    assert reports[0].lines[0] == first


def test_only_a_panic_right_after_an_oops_ends_it() -> None:
    """oops_end()'s panic follows the report's register summary; one long after it is a report of its own."""
    panic = "Kernel panic - not syncing: Fatal exception\n---[ end Kernel panic - not syncing: Fatal exception ]---"
    later = console(f"{NULL_DEREF}\n" + "kvm: a message\n" * crash.OOPS_SUMMARY_LINES + panic)
    assert [(r.kind, r.title) for r in crash.scan(later)] == [
        (crash.OOPS, REPORTS["NULL pointer dereference"][2]), (crash.PANIC, "kernel panic: Fatal exception")]


def test_an_open_report_closes_at_flush() -> None:
    """A KASAN report has no end marker: the console's silence (or the boot's end) closes it."""
    scanner = crash.Scanner()
    assert [r for line in console(KASAN) for r in scanner.feed(line)] == []
    assert [r.title for r in scanner.flush()] == [REPORTS["KASAN"][2]]


def test_a_hang_is_titled_from_the_stacks_it_has() -> None:
    """A hang has no report of the kernel's: the watchdog's stacks name it, and without any it says so."""
    stacks = ["task python3 tid 245 state D", "  kvm_vcpu_block+0x3e/0x80 [kvm]", "  kvm_vcpu_halt+0x7e/0x3c0 [kvm]"]
    assert crash.hang_report(stacks, 31.2, "t.py::a").title == "hang in kvm_vcpu_block"
    silent = crash.hang_report([], 31.2, "t.py::a")
    assert silent.title == "hang with no kernel stack" and silent.fatal, "no number in a title: the same on every run"
    assert silent.lines == ["no progress for 31 s in t.py::a; no kernel stack came"]
