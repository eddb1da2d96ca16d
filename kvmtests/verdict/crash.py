"""Kernel crash reports in a console or kernel log: which kind, whether the kernel goes on, and a stable title.

The title follows syzkaller's style (kind, then the first function of the stack that is not the report's own
machinery), with addresses, offsets and module names stripped, so the same bug on two kernels or two boots
reads the same: "BUG: kernel NULL pointer dereference in kvm_hv_hypercall"."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

PANIC, OOPS, WARNING, LOCKUP, HUNG_TASK, RCU_STALL, HANG, KILLED = (
    "panic", "oops", "warning", "lockup", "hung-task", "rcu-stall", "hang", "killed")
# Kinds after which the test that was running cannot finish: the boot ends and the run resumes after it.
FATAL = frozenset({PANIC, OOPS, LOCKUP, HUNG_TASK, RCU_STALL, HANG, KILLED})
MAX_LOG_LINES = 120
# oops_end()'s panic comes after the report's end marker and a summary of the registers (about 12 lines).
_OOPS_END_PANIC = re.compile(r"Kernel panic - not syncing: Fatal exception")
OOPS_SUMMARY_LINES = 30

# A printk time stamp (and caller id) opens a kernel line; the first line of a report may also follow what the
# suite printed without a newline (pytest's progress), which is dropped with it.
_PREFIX = re.compile(r"^(.*?(?=\[\s*\d+\.\d{6}\]))?\s*\[\s*\d+\.\d+\](\[\s*[TC]\d+\])?\s?")
_FRAME = re.compile(r"^\s*(\?\s+)?([A-Za-z_][A-Za-z0-9_.$]*)\+0x[0-9a-f]+/0x[0-9a-f]+(\s+\[[^\]]+\])?\s*$")
_RIP = re.compile(r"^RIP: [0-9a-f]{4}:([A-Za-z_][A-Za-z0-9_.$]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
_WARN_AT = re.compile(r"^WARNING: CPU: \d+ PID: \d+ at \S+ ([A-Za-z_][A-Za-z0-9_.$]*)\+0x")
_IN_FUNC = re.compile(r" in ([A-Za-z_][A-Za-z0-9_.$]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
_SUFFIX = re.compile(r"\.(cold|constprop|isra|part|llvm|lto_priv)(\.\d+)*$")

# The first line of a report: pattern, kind, the title's head (None: the line itself, cleaned).
_STARTS: list[tuple[re.Pattern[str], str, str | None]] = [
    (re.compile(r"Kernel panic - not syncing: (.*)"), PANIC, None),
    (re.compile(r"BUG: kernel NULL pointer dereference"), OOPS, "BUG: kernel NULL pointer dereference"),
    (re.compile(r"BUG: unable to handle (page fault|kernel paging request)"), OOPS, "BUG: unable to handle page fault"),
    (re.compile(r"general protection fault"), OOPS, "general protection fault"),
    (re.compile(r"kernel BUG at "), OOPS, "kernel BUG"),
    (re.compile(r"BUG: KASAN: ([\w-]+)"), OOPS, None),
    (re.compile(r"Oops: (?!Oops)([\w ]+?)(:| \[#)"), OOPS, None),
    (re.compile(r"BUG: soft lockup"), LOCKUP, "BUG: soft lockup"),
    (re.compile(r"Watchdog detected hard LOCKUP"), LOCKUP, "BUG: hard lockup"),
    (re.compile(r"INFO: task \S+ blocked for more than"), HUNG_TASK, "INFO: task hung"),
    (re.compile(r"rcu: INFO: \w+ (self-)?detected stall"), RCU_STALL, "INFO: rcu detected stall"),
    (re.compile(r"WARNING: CPU: \d+ PID: \d+ at"), WARNING, "WARNING"),
    (re.compile(r"BUG: (sleeping function called from invalid context|scheduling while atomic|"
                r"using smp_processor_id\(\) in preemptible|workqueue lockup|[\w ]+ still has locks held)"),
     WARNING, None),
    (re.compile(r"UBSAN: ([\w-]+)"), WARNING, None),
    (re.compile(r"Out of memory: Killed process \d+ \((\S+)\)"), KILLED, None),
]
# The report's own machinery, scheduling and locking: never the function a title names.
_SKIP = frozenset("""
panic vpanic nmi_panic dump_stack dump_stack_lvl show_stack show_trace_log_lvl show_regs __show_regs
__warn warn_slowpath_fmt report_bug handle_bug die __die die_addr oops_end page_fault_oops
kernelmode_fixup_or_oops __bad_area_nosemaphore bad_area_nosemaphore do_user_addr_fault exc_page_fault
exc_invalid_op exc_general_protection do_error_trap do_trap do_int3 exc_int3 __schedule schedule
schedule_timeout schedule_preempt_disabled schedule_hrtimeout_range schedule_hrtimeout_range_clock io_schedule
do_nanosleep hrtimer_nanosleep common_nsleep common_nsleep_timens __mutex_lock mutex_lock mutex_lock_killable
mutex_lock_interruptible __mutex_lock_slowpath __mutex_lock_killable_slowpath __mutex_lock_interruptible_slowpath
rwsem_down_read_slowpath rwsem_down_write_slowpath down_read down_write down_read_killable down_write_killable
wait_for_completion wait_for_completion_killable wait_for_completion_state __wait_for_common wait_for_common
queued_spin_lock_slowpath native_queued_spin_lock_slowpath _raw_spin_lock _raw_spin_lock_irqsave
_raw_spin_lock_irq do_raw_spin_lock __cond_resched preempt_schedule_common __x86_return_thunk srso_return_thunk
srso_alias_return_thunk entry_SYSCALL_64_after_hwframe do_syscall_64 x64_sys_call ret_from_fork
ret_from_fork_asm kthread xfer_to_guest_mode_handle_work memcpy memset memmove __memcpy __memset __memmove strlen strcmp strncmp
rcu_dump_cpu_stacks print_cpu_stall check_cpu_stall rcu_pending rcu_sched_clock_irq
""".split())
_SKIP_PREFIXES = ("asm_exc_", "asm_sysvec_", "sysvec_", "__sysvec_", "kasan_", "__kasan_", "print_", "printk",
                  "vprintk", "_printk", "nmi_", "__nmi_", "arch_trigger_", "watchdog_")


@dataclass
class Report:
    """One crash report: its kind, title, whether the running test can still finish, and its lines."""

    kind: str
    title: str
    lines: list[str] = field(default_factory=list)

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL


_STAMP = re.compile(r"\[\s*\d+\.\d{6}\]")


def is_kernel_line(line: str) -> bool:
    """Whether a console line is the kernel's (printk's time stamp), not the suite's output quoting a title."""
    return _STAMP.search(line) is not None


def strip_prefix(line: str) -> str:
    """A kernel line without its printk time stamp (and caller id, and any text before them) or trailing
    carriage return."""
    return _PREFIX.sub("", line.rstrip("\r\n"))


def function_name(symbol: str) -> str:
    """A symbol as a title names it: without compiler suffixes (.cold, .constprop.0, .isra.0)."""
    return _SUFFIX.sub("", symbol)


def _meaningful(name: str) -> bool:
    return name not in _SKIP and not name.startswith(_SKIP_PREFIXES)


def stack_function(lines: list[str]) -> str | None:
    """The first reliable frame of the task's stack that is not the report's machinery, scheduling or locking.

    Frames inside <IRQ> and <NMI> sections are the report's own delivery (a watchdog timer, a sysrq
    interrupt), so the interrupted task's frames after them count."""
    nested = 0
    for line in map(strip_prefix, lines):
        text = line.strip()
        if text in ("<IRQ>", "<NMI>", "<SOFTIRQ>"):
            nested += 1
        elif text in ("</IRQ>", "</NMI>", "</SOFTIRQ>"):
            nested = max(0, nested - 1)
        elif not nested:
            frame = _FRAME.match(line)
            if frame and not frame[1]:
                name = function_name(frame[2])
                if _meaningful(name):
                    return name
    return None


def rip_function(lines: list[str]) -> str | None:
    """The function the report's first RIP line names (None for a user-mode RIP or none at all)."""
    for line in map(strip_prefix, lines):
        match = _RIP.match(line)
        if match:
            name = function_name(match[1])
            return name if _meaningful(name) else None
    return None


def _head(line: str) -> tuple[str, str] | None:
    """(kind, title head) when line opens a report."""
    for pattern, kind, head in _STARTS:
        match = pattern.search(line)
        if match:
            if head is not None:
                return kind, head
            if kind == PANIC:
                return kind, f"kernel panic: {match[1].strip()}"
            if kind == KILLED:
                return kind, f"out of memory: {match[1]} killed"
            return kind, match[0].strip(" :[#")
    return None


def title(kind: str, head: str, lines: list[str]) -> str:
    """The report's title: its head, then the function it happened in when the report names one."""
    first = strip_prefix(lines[0]) if lines else ""
    where = None
    if kind == WARNING:
        at = _WARN_AT.match(first) or _IN_FUNC.search(first)
        where = function_name(at[1]) if at else None
    elif kind == OOPS and _IN_FUNC.search(first):
        where = function_name(_IN_FUNC.search(first)[1])
    if where is None and kind in (OOPS, WARNING, LOCKUP, RCU_STALL):
        where = rip_function(lines)
    if where is None and kind != KILLED:
        where = stack_function(lines)
    return f"{head} in {where}" if where else head


class Scanner:
    """Reads kernel lines one at a time and hands back each crash report once it is complete."""

    def __init__(self) -> None:
        self.open: list | None = None    # [kind, title head, lines, kind once it ended in a panic]
        self.last: Report | None = None  # the report completed last, and how many lines came since
        self.since_last = 0

    def feed(self, line: str) -> list[Report]:
        """Take one line; return the reports it completes (a new report's first line completes an open one)."""
        text = strip_prefix(line)
        self.since_last += 1
        last = self.last
        if self.open is None and last is not None and last.kind == OOPS and self.since_last <= OOPS_SUMMARY_LINES \
                and _OOPS_END_PANIC.search(text):
            last.kind = PANIC             # the oops (already handed back) took the kernel down: one report still
            last.lines.append(text)
            return []
        done: list[Report] = []
        head = None if text.startswith("---[ end") else _head(text)
        if head and self.open:
            if head[0] == PANIC and self.open[0] != PANIC:
                self.open[3] = PANIC      # a panic that ends an oops or a WARN: one report, and the kernel is gone
                head = None
            elif not (self.open[0] == OOPS and head[0] == OOPS and len(self.open[2]) < 8):
                done += self.flush()      # the Oops line under a BUG line is the same report
        if self.open is None:
            if head is None:
                return done
            self.open = [head[0], head[1], [], head[0]]
        kind, _, lines, _ = self.open
        if len(lines) < MAX_LOG_LINES:
            lines.append(text)
        if text.startswith("---[ end") or (text.strip() == "</TASK>" and kind in (LOCKUP, HUNG_TASK, RCU_STALL)):
            done += self.flush()
        return done

    def flush(self) -> list[Report]:
        """Close the open report (the console went quiet, or the boot ended) and return it."""
        if self.open is None:
            return []
        kind, head, lines, ended = self.open
        self.open = None
        self.last, self.since_last = Report(ended, title(kind, head, lines), lines), 0
        return [self.last]


def scan(lines: list[str]) -> list[Report]:
    """Every crash report in a whole log."""
    scanner = Scanner()
    reports = [r for line in lines for r in scanner.feed(line)]
    return reports + scanner.flush()


def stuck_first(stacks: list[str]) -> list[str]:
    """Tasks' stacks (each after a "task COMM tid N state S" line) with those most likely stuck first:
    uninterruptible (D), then running (R), the given order kept within each."""
    tasks: list[list[str]] = []
    for text in stacks:
        if text.startswith("task ") or not tasks:
            tasks.append([])
        tasks[-1].append(text)
    order = {"D": 0, "R": 1}
    tasks.sort(key=lambda t: order.get(t[0].split()[-1], 2) if t[0].startswith("task ") else 3)
    return [line for task in tasks for line in task]


def hang_report(stacks: list[str], silent_for: float, where: str, stopped_in: str | None = None,
                stop: list[str] | None = None) -> Report:
    """A hang the kernel did not report itself: titled from the stacks the guest or the emulator gave (the most
    stuck task's first), else from where the emulator found the guest when it stopped it (stopped_in: a function,
    or "a nested guest ..."), whose account (stop) goes to the log."""
    stacks = stuck_first(stacks)
    function = stack_function(stacks) or rip_function(stacks) or stopped_in
    detail = f"no progress for {silent_for:.0f} s in {where}" + ("" if stacks else "; no kernel stack came")
    return Report(HANG, f"hang in {function}" if function else "hang with no kernel stack",
                  [detail, *stacks, *(stop or [])][:MAX_LOG_LINES + 1])
