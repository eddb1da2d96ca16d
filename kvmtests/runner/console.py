"""What every emulator run shares: the console markers /init prints, the one-line runner error, and a
process run whose console is logged and which is killed at the boot or overall deadline."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Lines that /init prints to the console: MARK, a name, the guest's uptime, optional words.
MARK = "@@kvmtests@@"
SUITE_START = "suite-start"
SUITE_END = "suite-end"


class RunnerError(Exception):
    """A bad input or a missing host tool: reported as one line that says what to do."""


@dataclass
class RunResult:
    """What an emulator run left behind: exit status, timing marks and the console's last lines."""

    returncode: int | None
    timed_out: str | None
    elapsed: float
    marks: dict[str, float] = field(default_factory=dict)
    tail: list[str] = field(default_factory=list)


def parse_mark(line: str) -> str | None:
    """Return the marker name of a console line printed by /init, else None."""
    words = line.split()
    if len(words) >= 2 and words[0] == MARK:
        return words[1]
    return None


def run_console(
    cmd: Sequence[str],
    log_path: Path,
    timeout: float,
    boot_timeout: float,
    on_line: Callable[[str], None] | None = None,
) -> RunResult:
    """Run an emulator, copy its console (stdout) to log_path, and kill it at the boot or overall deadline."""
    start = time.monotonic()
    marks: dict[str, float] = {}
    tail: deque[str] = deque(maxlen=20)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        with log_path.open("w", encoding="utf-8") as log:
            for raw in stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                tail.append(line)
                name = parse_mark(line)
                if name is not None:
                    marks.setdefault(name, time.monotonic() - start)
                if on_line is not None:
                    on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = None
    while proc.poll() is None:
        now = time.monotonic() - start
        if SUITE_START not in marks and now > boot_timeout:
            timed_out = "boot"
        elif now > timeout:
            timed_out = "suite"
        if timed_out:
            proc.kill()
            break
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()
    reader.join(timeout=5)
    return RunResult(
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        elapsed=time.monotonic() - start,
        marks=marks,
        tail=list(tail),
    )
