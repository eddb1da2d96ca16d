"""Kernel health around a test: new taint bits and WARN/BUG/oops lines in the kernel log."""
from __future__ import annotations

import os
import re

TAINT_PATH = "/proc/sys/kernel/tainted"
KMSG_ENV = "KVMTESTS_KMSG"   # another kernel log to read (self-tests feed one from a file)
RECORD = re.compile(r"^\d+,\d+,\d+,[^;]*;")   # /dev/kmsg's "priority,sequence,microseconds,flags;" before a line
BAD_LINE = re.compile(r"WARNING:|BUG:|Oops|general protection fault|kernel BUG|Call Trace:|RIP: |UBSAN:|KASAN:")
TAINT_NAMES = {0: "P", 1: "F", 2: "S", 3: "R", 4: "M", 5: "B", 6: "U", 7: "D", 8: "A", 9: "W (warning)",
               10: "C", 11: "I", 12: "O", 13: "E", 14: "L (soft lockup)", 15: "K", 16: "X", 17: "T", 18: "N"}


def kmsg_path() -> str:
    """The kernel log to read: $KVMTESTS_KMSG or /dev/kmsg."""
    return os.environ.get(KMSG_ENV) or "/dev/kmsg"


def taint() -> int:
    try:
        with open(TAINT_PATH) as f:
            return int(f.read().strip() or 0)
    except OSError:
        return 0


class Watch:
    """Remembers the taint value and the kernel log position; `problems()` tells what appeared since."""

    def __init__(self) -> None:
        self.taint = taint()
        self.fd = -1
        self.error = ""          # why the kernel log cannot be read, when it cannot
        self.lines: list[str] = []   # the kernel-log lines the last problems() read
        try:
            self.fd = os.open(kmsg_path(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            self.error = f"cannot read {kmsg_path()}: {e.strerror}"
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def new_lines(self) -> list[str]:
        """The log lines written since the last read: one /dev/kmsg record a read, or a file's lines."""
        lines = []
        while self.fd >= 0:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError:
                continue  # EPIPE: records were overwritten; keep reading from the next one
            if not rec:
                break
            lines += [RECORD.sub("", text) for text in rec.decode(errors="replace").splitlines()
                      if not text.startswith(" ")]     # a record's " KEY=value" lines are not log text
        return lines

    def problems(self) -> list[str]:
        """Descriptions of new taint bits and quoted bad kernel-log lines."""
        out = []
        new = taint() & ~self.taint
        if new:
            bits = [TAINT_NAMES.get(b, str(b)) for b in range(32) if new >> b & 1]
            out.append(f"kernel taint grew by {new:#x} ({', '.join(bits)})")
        self.lines = self.new_lines()
        bad = [line for line in self.lines if BAD_LINE.search(line)]
        out.extend(f"kernel log: {line}" for line in bad[:20])
        return out
