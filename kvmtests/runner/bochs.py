"""Bochs for a qualification run on an Intel CPU (VMX with EPT), which QEMU's TCG does not emulate.

Bochs has no direct kernel boot, virtio or 9p: the kernel and a self-contained initramfs boot from an
ISOLINUX CD image, and the serial port is the console (and the way results come back)."""

from __future__ import annotations

import re
import subprocess
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
# The debugger build stops before the first instruction; its script continues (and quits at the end).
DEBUGGER_SCRIPT = "continue\nquit\n"


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


def bochs_command(config: Path, script: Path, binary: str = BOCHS_BINARY) -> list[str]:
    """The Bochs argv: no start menu, the given configuration, the debugger script that lets it run."""
    return [binary, "-q", "-f", str(config), "-rc", str(script)]
