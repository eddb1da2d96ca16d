"""Assemble the QEMU command line for a qualification run and run QEMU under a hard timeout."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
# Lines that /init prints to the console: MARK, a name, the guest's uptime, optional words.
MARK = "@@kvmtests@@"
SUITE_START = "suite-start"
SUITE_END = "suite-end"


class RunnerError(Exception):
    """A bad input or a missing host tool: reported as one line that says what to do."""


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-9p."""

    tag: str
    path: Path
    readonly: bool


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides the QEMU command line."""

    kernel: Path
    initrd: Path
    append: str
    accel: str
    cpu: str
    mem: str
    smp: int
    shares: tuple[Share, ...]


@dataclass
class RunResult:
    """What a QEMU run left behind: exit status, timing marks and the console's last lines."""

    returncode: int | None
    timed_out: str | None
    elapsed: float
    marks: dict[str, float] = field(default_factory=dict)
    tail: list[str] = field(default_factory=list)


def find_qemu() -> str:
    """Locate the QEMU binary so a missing install fails before anything is built."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise RunnerError(f"{QEMU_BINARY} not found: install qemu-system-x86 (scripts/install.sh)")
    return path


def qemu_command(cfg: MachineConfig, binary: str = QEMU_BINARY) -> list[str]:
    """Build the QEMU argv: no display, console on stdout, no reboot, one 9p device per share."""
    cmd = [
        binary,
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display", "none",
        "-monitor", "none",
        "-serial", "stdio",
        "-machine", f"q35,accel={cfg.accel}",
        "-cpu", cfg.cpu,
        "-smp", str(cfg.smp),
        "-m", cfg.mem,
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", cfg.append,
    ]
    for share in cfg.shares:
        fsdev = f"local,id={share.tag},path={share.path},security_model=none,multidevs=remap"
        if share.readonly:
            fsdev += ",readonly=on"
        cmd += ["-fsdev", fsdev, "-device", f"virtio-9p-pci,fsdev={share.tag},mount_tag={share.tag}"]
    return cmd


def parse_mark(line: str) -> str | None:
    """Return the marker name of a console line printed by /init, else None."""
    words = line.split()
    if len(words) >= 2 and words[0] == MARK:
        return words[1]
    return None


def run_qemu(
    cmd: Sequence[str],
    log_path: Path,
    timeout: float,
    boot_timeout: float,
    on_line: Callable[[str], None] | None = None,
) -> RunResult:
    """Run QEMU, copy its console to log_path, and kill it at the boot or overall deadline."""
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
