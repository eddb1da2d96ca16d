"""QEMU for a qualification run: the command line (direct kernel boot, 9p shares, serial console)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmtests.machine.tools import ToolMissing, require

from .console import RunnerError

QEMU_BINARY = "qemu-system-x86_64"


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


def find_qemu() -> str:
    """Locate the QEMU binary so a missing install fails before anything is built."""
    try:
        return require(QEMU_BINARY, "qemu-system-x86")
    except ToolMissing as e:
        raise RunnerError(str(e)) from None


def qemu_command(cfg: MachineConfig, binary: str = QEMU_BINARY) -> list[str]:
    """Build the QEMU argv: no display, console on stdout (its monitor multiplexed on stdin, for nmi), no
    reboot, one 9p device per share."""
    cmd = [
        binary,
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display", "none",
        "-chardev", "stdio,id=console,mux=on,signal=off",
        "-serial", "chardev:console",
        "-mon", "chardev=console,mode=readline",
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


# The stdio multiplexer's escape (Ctrl-A c) switches between the serial console and the monitor.
MUX_SWITCH = b"\x01c"


def nmi(proc: subprocess.Popen) -> None:
    """Inject a non-maskable interrupt through the monitor: with unknown_nmi_panic set, the guest kernel panics
    and prints the stack it interrupted, even when that CPU spins with interrupts off."""
    if proc.stdin is None:
        return
    try:
        proc.stdin.write(MUX_SWITCH + b"nmi\n" + MUX_SWITCH)
        proc.stdin.flush()
    except OSError:
        pass
