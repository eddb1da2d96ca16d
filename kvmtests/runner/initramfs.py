"""Build the guest's initramfs (newc cpio) in Python: static busybox, the image's modules, /init, and for a
self-contained guest (no 9p) the host files the suite runs with."""

from __future__ import annotations

import gzip
import lzma
import os
import shlex
import struct
import subprocess
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmtests.verdict.stream import HANG_STACKS, HANG_STACKS_END, TEXT_BASES

from .console import MARK, SUITE_END, SUITE_START, RunnerError, results_to_console
from .rootfs import HostFile

BUSYBOX = Path("/bin/busybox")
# Module groups /init loads: "base" always, then the one matching the CPU vendor.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "base": ("virtio_pci", "9pnet_virtio", "9p", "overlay"),
    "amd": ("kvm_amd",),
    "intel": ("kvm_intel",),
}
REQUIRED_GROUP = "base"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
DEADLINE_FILE = "/run/kvmtests-deadline"   # inside the suite's root: the running test's deadline (uptime, s)
STACK_ADDRESSES = r"s/^\[<[0-9a-f]*>\] /  /"   # /proc/PID/stack's "[<0>] " before each frame, as a console stack
SYMBOLIZED_MODULES = ("kvm", "kvm_intel", "kvm_amd")   # whose code sections /init reports, to name a RIP in them


@dataclass(frozen=True)
class GuestPlan:
    """What /init runs once the overlay root is up."""

    project_dir: Path
    command: Sequence[str]
    env: Mapping[str, str]
    results_dir: Path
    root_tag: str
    results_tag: str
    host_files: Sequence[HostFile] = ()  # non-empty: a self-contained guest, results come back on the console
    lab: str = ""   # a LAVA guest: /init ends in a shell; this reporting command runs after the suite (kvmtests-suite)

    @property
    def self_contained(self) -> bool:
        """True when the guest has no 9p shares: the root is the initramfs itself."""
        return bool(self.host_files)


def module_name(filename: str) -> str:
    """Normalise a module file name to the kernel's module name (dashes become underscores)."""
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.replace("-", "_")


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Map every loadable module under modules_dir to its file."""
    index: dict[str, Path] = {}
    for root, _dirs, files in os.walk(modules_dir):
        for name in files:
            if name.endswith(MODULE_SUFFIXES):
                index.setdefault(module_name(name), Path(root) / name)
    return index


def builtin_modules(modules_dir: Path) -> set[str]:
    """Names the kernel has built in, from modules.builtin, so they are not looked for as files."""
    path = modules_dir / "modules.builtin"
    if not path.exists():
        return set()
    return {module_name(Path(line.strip()).name) for line in path.read_text().splitlines() if line.strip()}


def read_module(path: Path) -> bytes:
    """Return a module's ELF bytes, decompressed on the host because busybox insmod may not."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        try:
            done = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
        except FileNotFoundError:
            raise RunnerError(f"{path} is zstd-compressed: install zstd (scripts/install.sh)") from None
        except subprocess.CalledProcessError as exc:
            raise RunnerError(f"cannot decompress {path}: {exc.stderr.decode(errors='replace').strip()}") from None
        return done.stdout
    return data


def modinfo(elf: bytes) -> dict[str, str]:
    """Read the .modinfo section of a module (what depmod reads) into a dict."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF object")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[stroff + name: elf.index(b"\0", stroff + name)] == b".modinfo":
            fields = elf[offset: offset + size].split(b"\0")
            return dict(f.decode(errors="replace").partition("=")[::2] for f in fields if b"=" in f)
    return {}


def resolve(roots: Iterable[str], index: Mapping[str, Path], builtin: Collection[str],
            loaded: Collection[str]) -> tuple[list[str], dict[str, bytes], list[str]]:
    """Order roots and their not yet loaded dependencies for insmod; return (order, module bytes, missing roots)."""
    order: list[str] = []
    found: dict[str, bytes] = {}
    missing: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        if name in loaded or name in found or name in builtin:
            return
        path = index.get(name)
        if path is None:
            if needed_by is not None:
                raise RunnerError(f"module {needed_by} needs {name}, which is neither a file nor built in: "
                                  "pass the modules directory that belongs to this kernel (--modules)")
            missing.append(name)
            return
        data = read_module(path)
        found[name] = data
        try:
            deps = modinfo(data).get("depends", "")
        except (ValueError, struct.error, IndexError):
            raise RunnerError(f"{path} is not a kernel module: pass the kernel's own modules directory") from None
        for dep in filter(None, deps.split(",")):
            visit(module_name(dep), name)
        order.append(name)

    for root in roots:
        visit(root, None)
    return order, found, missing


def collect_modules(modules_dir: Path, shares: bool = True) -> tuple[dict[str, list[str]], dict[str, bytes], list[str]]:
    """Resolve every module group (the 9p base only for a guest with shares); return load lists per group,
    module bytes, and absent optional modules."""
    index = module_index(modules_dir)
    builtin = builtin_modules(modules_dir)
    base_order, modules, missing = resolve(MODULE_GROUPS[REQUIRED_GROUP] if shares else (), index, builtin, ())
    if missing:
        raise RunnerError(f"{modules_dir} has no {', '.join(missing)} and the kernel does not build "
                          f"{'it' if len(missing) == 1 else 'them'} in: the guest needs virtio-pci, 9p and "
                          "overlayfs; pass the kernel's modules directory with --modules")
    groups = {REQUIRED_GROUP: base_order}
    absent: list[str] = []
    for group, roots in MODULE_GROUPS.items():
        if group == REQUIRED_GROUP:
            continue
        order, found, missing = resolve(roots, index, builtin, base_order)
        groups[group] = order
        modules.update(found)
        absent += missing
    return groups, modules, absent


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (needed: the guest has no libc)."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox(path: Path | None = None) -> Path:
    """Check the static busybox the initramfs is built around."""
    path = path or BUSYBOX
    if not path.is_file() or not os.access(path, os.R_OK):
        raise RunnerError(f"{path} not found: install busybox-static (scripts/install.sh)")
    if not is_static_elf(path):
        raise RunnerError(f"{path} is not statically linked: install busybox-static (scripts/install.sh)")
    return path


def init_script(plan: GuestPlan) -> str:
    """Write /init: load modules, mount what the suite needs, run it, bring the results back, power off."""
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mark() {{ echo "{MARK} $1 $(cut -d' ' -f1 /proc/uptime) $2"; }}
die() {{ echo "{MARK} init-failed 0 $*"; sync; poweroff -f; echo o > /proc/sysrq-trigger; sleep 5; }}
params() {{ for w in $(cat /proc/cmdline); do case "$w" in "$1".*=*) echo "${{w#"$1".}}" ;; esac; done; }}
load() {{ for m in $(cat /modules/$1.list); do insmod /modules/$m.ko $(params $m) || echo "kvmtests: insmod $m failed"; done; }}
mark init
echo 1 > /proc/sys/kernel/unknown_nmi_panic
{"" if plan.self_contained else "load base"}
case "$(grep -m1 vendor_id /proc/cpuinfo)" in
  *AuthenticAMD*|*HygonGenuine*) load amd ;;
  *GenuineIntel*) load intel ;;
esac
{_text_bases()}
{_lab_root(plan) if plan.lab else _local_root(plan) if plan.self_contained else _shared_root(plan)}
poweroff -f
echo o > /proc/sysrq-trigger
sleep 5
"""


def _text_bases() -> str:
    """Shell lines printing one mark with where this boot put the kernel's text (_text) and the code sections of
    KVM's modules (KASLR moves them each boot): the host names an emulator's RIP from them."""
    modules = " ".join(SYMBOLIZED_MODULES)
    return f"""b="_text=$(grep -m1 ' _text$' /proc/kallsyms | cut -d' ' -f1)"
for m in {modules}; do for s in /sys/module/$m/sections/.*text*; do [ -r "$s" ] && b="$b,$m:${{s##*/}}=$(cat "$s")"; done; done
mark {TEXT_BASES} "$b\""""


def _special_mounts(root: str) -> str:
    """Shell lines mounting the pseudo file systems the suite uses under root."""
    return f"""mkdir -p {root}/dev/pts {root}/dev/shm {root}/run {root}/tmp
mount -t devpts devpts {root}/dev/pts
mount -t tmpfs tmpfs {root}/dev/shm
mount -t tmpfs tmpfs {root}/run
mount -t tracefs tracefs {root}/sys/kernel/tracing
mount -t debugfs debugfs {root}/sys/kernel/debug"""


def _suite(plan: GuestPlan, chroot: str) -> str:
    """Shell lines running the suite between the start and end marks, leaving its exit status in $rc.

    Beside it a watchdog: once the running test is past its deadline (the suite writes it to DEADLINE_FILE),
    it prints the kernel stacks of the suite's tasks between two marks, for the host to title the hang."""
    q = shlex.quote
    env = " ".join(q(f"{k}={v}") for k, v in plan.env.items())
    inner = f"cd {q(str(plan.project_dir))} && exec {shlex.join(plan.command)}"
    deadline = q(chroot + DEADLINE_FILE)
    return f"""mark {SUITE_START}
env -i {env} {f"chroot {chroot} " if chroot else ""}/bin/sh -c {q(inner)} &
suite=$!
( while kill -0 $suite 2>/dev/null; do
    sleep 2
    due=$(cat {deadline} 2>/dev/null) || continue
    [ "$(cut -d. -f1 /proc/uptime)" -gt "$due" ] || continue
    rm -f {deadline}
    mark {HANG_STACKS}
    for t in /proc/$suite/task/*; do
      echo "task $(cat $t/comm) tid ${{t##*/}} state $(cut -d' ' -f3 $t/stat)"
      sed {q(STACK_ADDRESSES)} $t/stack
    done
    mark {HANG_STACKS_END}
  done ) &
watchdog=$!
wait $suite
rc=$?
kill $watchdog 2>/dev/null
mark {SUITE_END} "rc=$rc\""""


def _shared_root(plan: GuestPlan) -> str:
    """Stack a tmpfs overlay on the 9p host root, run the suite in it, results to the 9p results share."""
    new = "/newroot"
    results = shlex.quote(new + str(plan.results_dir))
    return f"""mkdir -p /lower /rw {new}
mount -t 9p -o {NINEP_OPTS},ro,cache=loose {plan.root_tag} /lower || die "cannot mount the host root over 9p: the kernel needs virtio-pci, 9p (9pnet_virtio) and overlayfs, built in or from --modules"
mount -t tmpfs -o mode=755 rw /rw && mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay {new} || die "cannot mount the overlay root"
mount -t proc proc {new}/proc
mount -t sysfs sysfs {new}/sys
mount -t devtmpfs devtmpfs {new}/dev
{_special_mounts(new)}
mkdir -p {results}
mount -t 9p -o {NINEP_OPTS} {plan.results_tag} {results} || die "cannot mount the results directory over 9p"
{_suite(plan, new)}
echo $rc > {results}/rc
sync
umount {results}"""


def _local_root(plan: GuestPlan) -> str:
    """Run the suite in the initramfs itself, then send the results directory over the console."""
    results = shlex.quote(str(plan.results_dir))
    return f"""{_special_mounts("")}
chmod 1777 /tmp
mkdir -p {results}
{_suite(plan, "")}
echo $rc > {results}/rc
{results_to_console(plan.results_dir)}"""


LAB_SUITE = "bin/kvmtests-suite"      # in a LAVA guest: the test definition's one step
LAB_READY = "kvmtests: ready for the lab's test shell"   # /init's last line before the shell


def _lab_root(plan: GuestPlan) -> str:
    """Prepare the suite's file systems, then leave the console to the lab's test shell (LAVA logs in at its
    prompt, adds its overlay's helpers to PATH and runs kvmtests-suite)."""
    return f"""{_special_mounts("")}
chmod 1777 /tmp
mkdir -p {shlex.quote(str(plan.results_dir))}
echo "{LAB_READY}"
export HOME=/root PS1='/ # '
exec setsid cttyhack /bin/sh -i"""


def lab_suite_script(plan: GuestPlan) -> str:
    """kvmtests-suite: the suite as /init runs it elsewhere (marks, deadline watchdog, rc), then the report of
    every test to the lab, with the kernel's console messages held back meanwhile (none may land in the results
    block); it exits 0, the verdicts being the test cases, so the lab's shell goes on."""
    results = shlex.quote(str(plan.results_dir))
    return f"""#!/bin/sh
mark() {{ echo "{MARK} $1 $(cut -d' ' -f1 /proc/uptime) $2"; }}
{_suite(plan, "")}
echo $rc > {results}/rc
level=$(cut -f1 /proc/sys/kernel/printk)
dmesg -n 1
{plan.lab}
dmesg -n $level
exit 0
"""


def cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0,
               mtime: int = 0) -> bytes:
    """One newc cpio record, padded to 4 bytes as the kernel's unpacker expects."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def parent_dirs(paths: Iterable[str]) -> list[str]:
    """Every directory above the given archive paths, parents first: the kernel's unpacker does not create them."""
    dirs = {str(parent) for p in paths for parent in Path(p).parents if str(parent) != "."}
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def cpio_archive(files: Mapping[str, bytes], dirs: Iterable[str], executables: set[str],
                 host_files: Sequence[HostFile] = ()) -> bytes:
    """A newc archive with /dev/console (so /init has a console), the dirs, the files and the host files.

    Host files keep their modification time: precompiled .pyc files name their source's, and a mismatch
    makes the guest's Python recompile everything (15 s instead of 1 s of imports under Bochs)."""
    records: list[tuple[str, int, bytes, tuple[int, int], int]] = [
        ("dev", 0o40755, b"", (0, 0), 0), ("dev/console", 0o20600, b"", (5, 1), 0)]
    dirs = list(dict.fromkeys([*dirs, *(d for d in parent_dirs(h.path for h in host_files) if d != "dev")]))
    records += [(d, 0o40755, b"", (0, 0), 0) for d in dirs]
    records += [(n, 0o100755 if n in executables else 0o100644, d, (0, 0), 0) for n, d in files.items()]
    records += [(h.path, 0o100755 if h.executable else 0o100644, h.source.read_bytes(), (0, 0),
                 int(h.source.stat().st_mtime)) for h in host_files]
    # Each record gets its own inode number: the kernel's unpacker links records that share one.
    body = b"".join(cpio_entry(n, mode, data, rdev, ino, mtime)
                    for ino, (n, mode, data, rdev, mtime) in enumerate(records, 1))
    return body + cpio_entry("TRAILER!!!", 0)


def build(out: Path, busybox: Path, modules_dir: Path | None, plan: GuestPlan) -> list[str]:
    """Write the initramfs to out; return the optional modules that were not found (e.g. kvm_intel).

    Without a modules directory the kernel must have its drivers built in: every load list is empty. A
    self-contained one is left uncompressed: the emulated CPU would take longer to inflate it than the
    emulated BIOS takes to read it."""
    if modules_dir is None:
        groups, modules, absent = {group: [] for group in MODULE_GROUPS}, {}, []
    else:
        groups, modules, absent = collect_modules(modules_dir, shares=not plan.self_contained)
    files = {"bin/busybox": find_busybox(busybox).read_bytes(), "init": init_script(plan).encode()}
    if plan.lab:
        files[LAB_SUITE] = lab_suite_script(plan).encode()
    files.update({f"modules/{g}.list": "".join(m + "\n" for m in order).encode() for g, order in groups.items()})
    files.update({f"modules/{name}.ko": data for name, data in modules.items()})
    dirs = ["bin", "proc", "sys", "modules"]
    archive = cpio_archive(files, dirs, {"bin/busybox", "init", LAB_SUITE}, plan.host_files)
    out.write_bytes(archive if plan.self_contained else gzip.compress(archive, compresslevel=1))
    return absent
