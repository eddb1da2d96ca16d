"""Bochs for a qualification run on an Intel CPU (VMX with EPT), which QEMU's TCG does not emulate.

Bochs has no direct kernel boot, virtio or 9p: the kernel and a self-contained initramfs boot from an
ISOLINUX CD image, and the serial port is the console (and the way results come back)."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kvmtests.machine.tools import ToolMissing, require

from .console import RunnerError

BOCHS_BINARY = "bochs-bin"   # Debian's `bochs` is a wrapper that adds -q
# The model boots Debian's kernels without a WARN (Skylake-X and newer print an XSAVE-size one) and has
# VMX with EPT (A/D bits), VPID and unrestricted guest.
CPU_MODEL = "corei7_haswell_4770"
IPS = 100_000_000  # emulated instructions per second; the guest's TSC must tick at this rate
# Host files Bochs boots with, and the Debian package of each.
FILES = {
    "bios": (Path("/usr/share/bochs/BIOS-bochs-latest"), "bochsbios"),
    "vgabios": (Path("/usr/share/vgabios/vgabios.bin"), "vgabios"),
    "isolinux": (Path("/usr/lib/ISOLINUX/isolinux.bin"), "isolinux"),
    "ldlinux": (Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"), "syslinux-common"),
}
# The debugger build stops before the first instruction; its script continues. A guest that powers off ends
# Bochs there (a fatal exit); only a SIGINT (interrupt) stops the simulation and reaches the commands after
# `continue`: they print where each CPU is, whether it runs a nested guest, CPU 0's registers and stack, and quit.
STACK_WORDS = 24
KERNEL_SPACE = 0xFFFF_8000_0000_0000


@dataclass(frozen=True)
class BochsTools:
    """Where the emulator, its firmware and the CD-image tools are on this host."""

    bochs: str
    xorriso: str
    files: dict[str, Path]


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides the bochsrc."""

    iso: Path
    log: Path   # Bochs's own messages, apart from the console so they cannot land inside its lines
    mem_mb: int
    cpus: int
    model: str = CPU_MODEL
    ips: int = IPS


def find_tools() -> BochsTools:
    """Locate Bochs, its BIOS images and the ISO tools, so a missing package fails before anything is built."""
    try:
        bochs = require(BOCHS_BINARY, "bochs")
        xorriso = require("xorriso", "xorriso")
    except ToolMissing as e:
        raise RunnerError(str(e)) from None
    for path, package in FILES.values():
        if not path.is_file():
            raise RunnerError(f"{path} not found: install {package} (scripts/install.sh)")
    return BochsTools(bochs, xorriso, {name: path for name, (path, _) in FILES.items()})


def memory_mb(size: str) -> int:
    """Turn --mem (2G, 2048M, 2048) into megabytes, which is what bochsrc takes."""
    match = re.fullmatch(r"(\d+)([MG]?)B?", size.strip().upper())
    if not match:
        raise RunnerError(f"--mem {size} is not a size: give megabytes or gigabytes, e.g. 2G or 2048M")
    return int(match[1]) * (1024 if match[2] == "G" else 1)


def kernel_params(ips: int = IPS) -> str:
    """What a kernel needs under Bochs: a TSC that ticks at the emulated rate, no crypto self-tests (40 % of init)."""
    return f"tsc_early_khz={ips // 1000} cryptomgr.notests=1"


def isolinux_config(append: str) -> str:
    """Boot the one entry at once, with the bootloader's messages on the serial port too."""
    return f"SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n" \
           f"  INITRD /initrd\n  APPEND {append}\n"


def make_iso(out: Path, kernel: Path, initrd: Path, append: str, tools: BochsTools) -> None:
    """Write a bootable ISOLINUX CD image holding the kernel, the initramfs and the command line."""
    cfg = out.with_name("isolinux.cfg")
    cfg.write_text(isolinux_config(append))
    cmd = [tools.xorriso, "-as", "mkisofs", "-quiet", "-o", str(out), "-b", "isolinux/isolinux.bin",
           "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", "-graft-points",
           f"isolinux/isolinux.bin={tools.files['isolinux']}", f"isolinux/ldlinux.c32={tools.files['ldlinux']}",
           f"isolinux/isolinux.cfg={cfg}", f"vmlinuz={kernel}", f"initrd={initrd}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RunnerError(f"xorriso could not write the boot CD image {out}: {last}")


def bochsrc(cfg: MachineConfig, tools: BochsTools) -> str:
    """The emulated PC: headless (VNC display that never waits), serial console on stdout, ACPI off ends Bochs."""
    return "\n".join([
        f"memory: guest={cfg.mem_mb}, host={cfg.mem_mb}",
        f"romimage: file={tools.files['bios']}",
        f"vgaromimage: file={tools.files['vgabios']}",
        f"cpu: model={cfg.model}, count={cfg.cpus}, ips={cfg.ips}, ignore_bad_msrs=1",
        "clock: sync=none, time0=local",
        "pci: enabled=1, chipset=i440fx",
        f"ata0-master: type=cdrom, path={cfg.iso}, status=inserted",
        "boot: cdrom",
        "com1: enabled=1, mode=file, dev=/dev/stdout",
        'display_library: rfb, options="timeout=0"',
        # The sound mixer thread aborts (glibc buffer-overflow check) without a sound card: dummy drivers.
        "sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy",
        "speaker: enabled=0",
        f"log: {cfg.log}",
        "panic: action=fatal",
        # Errors are mostly MSRs the model advertises without emulating (APERF/MPERF, read on every tick).
        "error: action=ignore",
        "info: action=ignore",
        "debug: action=ignore",
        "",
    ])


def debugger_script(cpus: int) -> str:
    """The debugger's commands: run; once interrupted, say where the CPUs are, then quit."""
    shows = "".join(f'show "cpu{n}.VMX.in_vmx_guest"\n' for n in range(cpus))
    return f"continue\nr\n{shows}print-stack {STACK_WORDS}\nquit\n"


def interrupt(proc: subprocess.Popen) -> None:
    """Bochs's answer to the monitor's NMI: SIGINT stops the simulation and runs the debugger script's rest."""
    try:
        proc.send_signal(signal.SIGINT)
    except OSError:
        pass


# What the debugger prints when it stops: per CPU the next instruction, `(0) [0x00000010a3c5] 0010:ffffffff81c3b2a5
# (unk. ctxt): jmp .-2 (0x...) ; ebfe` (with `.[TICKS]` after the CPU at quit); `in_vmx_guest = true` per
# `show`; print-stack's ` | STACK 0xffffc90000a1bd40 [0xffffffff:0x81234567] (<unknown>)`.
_AT = re.compile(r"^\((\d+)\)(?:\.\[\d+\])? \[0x[0-9a-f]+\] ([0-9a-f]{4}):([0-9a-f]+) \([^)]*\): (.*?)\s*; [0-9a-f]+$")
_SHOW = re.compile(r"^show param name: <cpu(\d+)\.VMX\.in_vmx_guest>$")
_STACK = re.compile(r"^ \| STACK 0x[0-9a-f]+ \[0x([0-9a-f]{8}):0x([0-9a-f]{8})\]")
NESTED = "a nested guest (KVM_RUN never returned)"


@dataclass
class CpuStop:
    """Where the debugger found one CPU: the next instruction, and whether it was in VMX non-root (None: not said)."""

    cpu: int
    cs: int
    rip: int
    instruction: str
    nested: bool | None = None


def parse_stop(lines: list[str]) -> tuple[list[CpuStop], list[int]]:
    """The CPUs where the debugger stopped (its first report of each) and CPU 0's stack words."""
    cpus: dict[int, CpuStop] = {}
    stack: list[int] = []
    showing: int | None = None
    for line in lines:
        at, show, word = _AT.match(line), _SHOW.match(line), _STACK.match(line)
        if at and int(at[1]) not in cpus:
            cpus[int(at[1])] = CpuStop(int(at[1]), int(at[2], 16), int(at[3], 16), at[4])
        elif show:
            showing = int(show[1])
        elif showing is not None and line.startswith("in_vmx_guest = "):
            if showing in cpus:
                cpus[showing].nested = line.split("= ", 1)[1].strip() == "true"
            showing = None
        elif word:
            stack.append(int(word[1] + word[2], 16))
    return list(cpus.values()), stack


Namer = Callable[[int, Mapping[str, int]], "tuple[str, str] | None"]


def stop_report(lines: list[str], bases: Mapping[str, int], name: Namer) -> tuple[str | None, list[str]]:
    """Where the interrupted guest was, for a hang's title (a function, NESTED, or None: not known) and its log.

    name(address, bases) gives a kernel address's function and its frame text (`vmx_vcpu_run+0x1d/0x30
    [kvm_intel]`). A CPU in VMX non-root ran a nested guest that never gave the CPU back to the kernel; else the
    first CPU whose RIP is a named kernel function; the log keeps the addresses and CPU 0's stack, named."""
    # the first line may follow what the guest printed without a newline (pytest's progress)
    lines = [line[line.index("Next at t="):] if "Next at t=" in line else line for line in lines]
    cpus, stack = parse_stop(lines)
    log = ["the guest did not answer; Bochs's debugger stopped it (SIGINT):" if cpus else
           "Bochs did not say where the guest was (no debugger stop in its output)"]
    where = NESTED if any(stop.nested for stop in cpus) else None
    for stop in cpus:
        kernel = stop.rip >= KERNEL_SPACE and not stop.nested
        named = name(stop.rip, bases) if kernel else None
        what = ("in a nested guest (VMX non-root)" if stop.nested else
                f"in {named[1]}" if named else "in the kernel" if kernel else "outside the kernel")
        log.append(f"CPU {stop.cpu} at {stop.cs:04x}:{stop.rip:016x} {what}: {stop.instruction}")
        if where is None and named:
            where = named[0]
    if cpus and not cpus[0].nested:     # a nested guest's stack is not the kernel's
        frames = [name(word, bases) for word in stack if word >= KERNEL_SPACE]
        log += [f"  ? {frame[1]}" for frame in frames if frame]
    return where, log + ["Bochs's debugger:", *lines]


def bochs_command(config: Path, script: Path, binary: str = BOCHS_BINARY) -> list[str]:
    """The Bochs argv: no start menu, the given configuration, the debugger script that lets it run."""
    return [binary, "-q", "-f", str(config), "-rc", str(script)]
