"""What every emulator run shares: the console markers /init prints, the one-line runner error, a process
run whose console is logged and which is killed at the boot or overall deadline, and the results
directory sent back over the console where the guest has no shared directory."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import shlex
import subprocess
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmtests.verdict.stream import MARK, mark_words

from .monitor import KILL, NMI, Monitor

# Lines that /init and the suite print to the console: MARK, a name, the guest's uptime, optional words.
SUITE_START = "suite-start"
SUITE_END = "suite-end"
RESULTS_BEGIN = "results-begin"
RESULTS_END = "results-end"
# What the guest may send back; anything else in the archive is ignored.
RESULT_FILES = ("rc", "results.json", "junit.xml")
READ_PAUSE = 0.02   # seconds the console reader lets output gather between reads


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
    """Return the marker name of a console line printed by /init or the suite, else None."""
    words = mark_words(line)
    return words[1] if len(words) >= 2 else None


def console_lines(fd: int, pause: float = READ_PAUSE) -> Iterator[list[str]]:
    """The console's lines as they come, a batch at a time: the reader sleeps between reads, so that it wakes
    some tens of times a second, not at each byte (Bochs writes its serial port a byte at a time, and a reader
    woken for each took the CPU from the emulators of the other shards); the last line may lack its newline."""
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        yield [raw.decode("utf-8", "replace").rstrip("\r") for raw in lines]
        time.sleep(pause)
    if pending:
        yield [pending.decode("utf-8", "replace").rstrip("\r")]


def run_console(
    cmd: Sequence[str],
    log_path: Path,
    timeout: float,
    boot_timeout: float,
    on_line: Callable[[str], None] | None = None,
    monitor: Monitor | None = None,
    nmi: Callable[[subprocess.Popen], None] | None = None,
    log_mode: str = "w",
) -> RunResult:
    """Run an emulator, copy its console (stdout) to log_path, and kill it at the boot or overall deadline,
    or when the monitor says so (a fatal crash report, a hang); nmi asks the emulator for a non-maskable
    interrupt when the monitor wants one."""
    start = time.monotonic()
    marks: dict[str, float] = {}
    tail: deque[str] = deque(maxlen=20)
    lock = threading.Lock()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if nmi else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        with log_path.open(log_mode, encoding="utf-8") as log:
            for lines in console_lines(stdout.fileno()):
                for line in lines:
                    log.write(line + "\n")
                    tail.append(line)
                    name = parse_mark(line)
                    if name is not None:
                        marks.setdefault(name, time.monotonic() - start)
                    if on_line is not None:
                        on_line(line)
                    if monitor is not None:
                        with lock:
                            monitor.line(line, time.monotonic() - start)
                log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = None
    try:
        while proc.poll() is None:
            now = time.monotonic() - start
            if SUITE_START not in marks and now > boot_timeout:
                timed_out = "boot"
            elif now > timeout:
                timed_out = "suite"
            if timed_out:
                proc.kill()
                break
            if monitor is not None:
                with lock:
                    action = monitor.tick(now)
                if action == KILL:
                    proc.kill()
                    break
                if action == NMI and nmi is not None:
                    nmi(proc)
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    finally:   # Ctrl-C or SIGTERM (cli.main) ends the emulator too, never leaves it running
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    reader.join(timeout=5)
    if monitor is not None:
        monitor.finish(timed_out is not None, time.monotonic() - start)
    return RunResult(
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        elapsed=time.monotonic() - start,
        marks=marks,
        tail=list(tail),
    )


def results_to_console(results_dir: Path) -> str:
    """Shell lines for /init: the results directory as a base64 tar.gz between two marks, with its SHA-256.

    Kernel messages are silenced first so that none lands inside the encoded lines; at the end /init
    waits until the serial port's transmit count stops moving, because a power-off drops what the tty
    has not sent yet (the emulated UART sends at its baud rate)."""
    q = shlex.quote(str(results_dir))
    return f"""dmesg -n 1
tar -C {q} -czf /tmp/results.tgz $(cd {q} && ls)
echo "{MARK} {RESULTS_BEGIN} $(cut -d' ' -f1 /proc/uptime) $(sha256sum < /tmp/results.tgz | cut -d' ' -f1)"
base64 /tmp/results.tgz
echo "{MARK} {RESULTS_END} $(cut -d' ' -f1 /proc/uptime)"
sent=; while [ "$sent" != "$(grep '^0:' /proc/tty/driver/serial)" ]; do sent=$(grep '^0:' /proc/tty/driver/serial); sleep 1; done; sleep 1"""


class ResultCollector:
    """Collects the encoded results from console lines (an on_line callback) and unpacks them on the host."""

    def __init__(self) -> None:
        self.digest: str | None = None
        self.lines: list[str] = []
        self.complete = False

    def __call__(self, line: str) -> None:
        """Take one console line: a mark opens or closes the block, lines between are the encoded archive."""
        mark = parse_mark(line)
        if mark == RESULTS_BEGIN:
            words = line.split()
            self.digest, self.lines, self.complete = (words[3] if len(words) > 3 else ""), [], False
        elif mark == RESULTS_END:
            self.complete = self.digest is not None
        elif self.digest is not None and not self.complete:
            self.lines.append(line.strip())

    def unpack(self, results_dir: Path) -> str | None:
        """Write the received result files into results_dir; return why not when the block is missing or damaged."""
        if not self.complete:
            return "the guest sent no results over the console" if self.digest is None else \
                "the results sent over the console were cut off"
        try:
            data = base64.b64decode("".join(self.lines), validate=True)
        except (binascii.Error, ValueError):
            return "the results sent over the console are not valid base64 (a console message interleaved?)"
        if hashlib.sha256(data).hexdigest() != self.digest:
            return "the results sent over the console do not match their checksum (a console message interleaved?)"
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in RESULT_FILES:
                    source = tar.extractfile(member)
                    if source is not None:
                        (results_dir / name).write_bytes(source.read())
        return None
