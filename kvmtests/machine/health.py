"""Kernel health around a test: new taint bits and WARN/BUG/oops lines in the kernel log."""
from __future__ import annotations

import os
import re

TAINT_PATH = "/proc/sys/kernel/tainted"
KMSG_PATH = "/dev/kmsg"
BAD_LINE = re.compile(r"WARNING:|BUG:|Oops|general protection fault|kernel BUG|Call Trace:|RIP: |UBSAN:|KASAN:")
TAINT_NAMES = {0: "P", 1: "F", 2: "S", 3: "R", 4: "M", 5: "B", 6: "U", 7: "D", 8: "A", 9: "W (warning)",
               10: "C", 11: "I", 12: "O", 13: "E", 14: "L (soft lockup)", 15: "K", 16: "X", 17: "T", 18: "N"}


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
        try:
            self.fd = os.open(KMSG_PATH, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _new_lines(self) -> list[str]:
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
            text = rec.decode(errors="replace")
            lines.append(text.split(";", 1)[-1].rstrip("\n"))
        return lines

    def problems(self) -> list[str]:
        """Descriptions of new taint bits and quoted bad kernel-log lines."""
        out = []
        new = taint() & ~self.taint
        if new:
            bits = [TAINT_NAMES.get(b, str(b)) for b in range(32) if new >> b & 1]
            out.append(f"kernel taint grew by {new:#x} ({', '.join(bits)})")
        bad = [line for line in self._new_lines() if BAD_LINE.search(line)]
        out.extend(f"kernel log: {line}" for line in bad[:20])
        return out
