"""The qualification runner without QEMU or /dev/kvm: command line, initramfs, modules, results, errors."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import lzma
import os
import shlex
import signal
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import pytest

from kvmtests.runner import console, initramfs, qemu, qualify, resume
from kvmtests.runner.console import RunnerError
from kvmtests.runner.monitor import Monitor
from kvmtests.verdict import report

pytestmark = pytest.mark.selftest

RELEASE = "6.99.0-test"


def elf(sections: dict[str, bytes] | None = None, interp: bool = False) -> bytes:
    """A minimal ELF64: program headers (PT_INTERP when interp) and the given sections."""
    sections = sections or {}
    names = b"\0" + b"".join(n.encode() + b"\0" for n in sections) + b".shstrtab\0"
    body = b"".join(sections.values())
    phoff = 64
    phdrs = struct.pack("<IIQQQQQQ", 3 if interp else 1, 0, 0, 0, 0, 0, 0, 0)
    data_off = phoff + len(phdrs)
    shoff = data_off + len(body) + len(names)
    shoff += -shoff % 8
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, phoff, shoff, 0, 64, 56, 1, 64, len(sections) + 2, len(sections) + 1)
    shdr = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    name_off, off = 1, data_off
    for name, content in sections.items():
        shdr.append(struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off, len(content), 0, 0, 1, 0))
        name_off += len(name) + 1
        off += len(content)
    shdr.append(struct.pack("<IIQQQQIIQQ", name_off, 3, 0, 0, off, len(names), 0, 0, 1, 0))
    out = ehdr + phdrs + body + names
    return out + b"\0" * (shoff - len(out)) + b"".join(shdr)


def ko(name: str, depends: str = "") -> bytes:
    """A fake kernel module whose .modinfo names it and its dependencies, as kbuild writes it."""
    return elf({".text": b"\x90" * 8, ".modinfo": f"license=GPL\0depends={depends}\0name={name}\0".encode()})


def make_modules(root: Path, builtin: tuple[str, ...] = ("virtio_pci",)) -> Path:
    """A fake lib/modules/<release>: the qualification set, some compressed, some built in."""
    mods = root / "lib" / "modules" / RELEASE
    files = {
        "kernel/net/9p/9pnet.ko": ko("9pnet"),
        "kernel/net/9p/9pnet_virtio.ko.xz": lzma.compress(ko("9pnet_virtio", "9pnet,virtio_ring")),
        "kernel/fs/netfs/netfs.ko": ko("netfs"),
        "kernel/fs/9p/9p.ko.gz": gzip.compress(ko("9p", "9pnet,netfs")),
        "kernel/fs/overlayfs/overlay.ko": ko("overlay"),
        "kernel/virt/lib/irqbypass.ko": ko("irqbypass"),
        "kernel/arch/x86/kvm/kvm.ko.xz": lzma.compress(ko("kvm", "irqbypass")),
        "kernel/arch/x86/kvm/kvm-amd.ko": ko("kvm_amd", "kvm"),
    }
    for rel, data in files.items():
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(data)
    (mods / "modules.builtin").write_text("".join(f"kernel/drivers/{b}.ko\n" for b in builtin + ("virtio_ring",)))
    return mods


def make_image(root: Path, release: str = RELEASE) -> Path:
    """A fake bzImage with a setup header and a version string, in <root>/boot."""
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x300)
    version = f"{release} (builder@example) #1 SMP".encode()
    head[0x500: 0x500 + len(version)] = version
    image = root / "boot" / f"vmlinuz-{release}"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(bytes(head))
    return image


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """Parse newc archives, one after the other as the kernel reads an initramfs, into
    name -> (mode, data, (rdevmajor, rdevminor))."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos: pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!" and pos == len(data):
            return entries
        if name == "TRAILER!!!":
            continue
        entries[name] = (fields[1], data[pos: pos + filesize], (fields[9], fields[10]))
        pos += filesize
        pos += -pos % 4


def plan(tmp_path: Path) -> initramfs.GuestPlan:
    return initramfs.GuestPlan(project_dir=Path("/src/kvm tests"), command=["/usr/bin/python3", "-m", "pytest", "-x"],
                               env={"HOME": "/root", "KVMTESTS_ACCEL": "tcg"}, results_dir=tmp_path / "res",
                               root_tag="hostroot", results_tag="results")


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(elf())
    return path


# --- QEMU command line and run loop -------------------------------------------------------------

def test_qemu_command_shares_root_readonly_and_results_writable(tmp_path: Path) -> None:
    cfg = qemu.MachineConfig(kernel=Path("/k"), initrd=Path("/i"), append="console=ttyS0 panic=-1", accel="tcg",
                             cpu="max", mem="2G", smp=1,
                             shares=(qemu.Share("hostroot", Path("/"), True), qemu.Share("results", tmp_path, False)))
    cmd = qemu.qemu_command(cfg, "qemu")
    assert cmd[0] == "qemu"
    for flag in ("-no-reboot", "-nodefaults"):
        assert flag in cmd
    pairs = dict(zip(cmd[1::2], cmd[2::2])) | dict(zip(cmd[2::2], cmd[3::2]))
    assert pairs["-kernel"] == "/k" and pairs["-initrd"] == "/i" and pairs["-append"] == "console=ttyS0 panic=-1"
    assert pairs["-cpu"] == "max" and pairs["-smp"] == "1" and pairs["-m"] == "2G"
    assert "accel=tcg" in pairs["-machine"]
    assert pairs["-chardev"] == "stdio,id=console,mux=on,signal=off", "console on stdout, the monitor on stdin"
    assert pairs["-serial"] == "chardev:console" and pairs["-mon"] == "chardev=console,mode=readline"
    fsdevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-fsdev"]
    assert fsdevs[0] == "local,id=hostroot,path=/,security_model=none,multidevs=remap,readonly=on"
    assert fsdevs[1] == f"local,id=results,path={tmp_path},security_model=none,multidevs=remap"
    assert "virtio-9p-pci,fsdev=results,mount_tag=results" in cmd


def test_parse_mark() -> None:
    """The marker counts anywhere in a line: pytest's progress letters may stand before an event."""
    assert console.parse_mark("@@kvmtests@@ suite-start 3.10 ") == "suite-start"
    assert console.parse_mark("[    1.0] @@kvmtests@@ suite-start") == "suite-start"
    assert console.parse_mark("tests/test_layout.py ..@@kvmtests@@ test-start 4.2 eJwD") == "test-start"
    assert console.parse_mark("[    1.0] kvmtests: insmod kvm failed") is None
    assert console.parse_mark("@@kvmtests@@") is None
    assert console.parse_mark("") is None


def fake_qemu(script: str) -> list[str]:
    return [sys.executable, "-c", "import sys, time\n" + script]


def test_run_console_records_marks_log_and_lines(tmp_path: Path) -> None:
    seen: list[str] = []
    log = tmp_path / "console.log"
    run = console.run_console(fake_qemu("print('boot\\r'); print('@@kvmtests@@ suite-start 1.0'); "
                                  "print('@@kvmtests@@ suite-end 2.0 rc=0'); sys.exit(3)"),
                        log, timeout=30, boot_timeout=30, on_line=seen.append)
    assert run.returncode == 3 and run.timed_out is None
    assert set(run.marks) == {"suite-start", "suite-end"}
    assert log.read_text().splitlines()[0] == "boot"
    assert seen == run.tail == log.read_text().splitlines()


def test_the_console_reader_wakes_per_batch_not_per_byte() -> None:
    """Bochs writes its serial port a byte at a time: 640 bytes written one by one come as a few batches of lines, and a
    last line without its newline is kept."""
    writer = subprocess.Popen(fake_qemu("for c in ''.join(f'line {i:02d}\\r\\n' for i in range(60)) + 'tail':\n"
                                        "    sys.stdout.write(c); sys.stdout.flush(); time.sleep(0.00005)"),
                              stdout=subprocess.PIPE)
    assert writer.stdout is not None
    batches = list(console.console_lines(writer.stdout.fileno(), pause=0.05))
    writer.wait()
    assert [line for batch in batches for line in batch] == [f"line {i:02d}" for i in range(60)] + ["tail"]
    assert len(batches) < 60, "one wakeup per batch of lines, not per line or byte"


@pytest.mark.parametrize("script, timeout, boot_timeout, phase", [
    ("print('booting', flush=True); time.sleep(60)", 60, 0.4, "boot"),
    ("print('@@kvmtests@@ suite-start 1.0', flush=True); time.sleep(60)", 0.8, 60, "suite"),
])
def test_run_console_kills_at_deadline(tmp_path: Path, script: str, timeout: float, boot_timeout: float,
                                    phase: str) -> None:
    run = console.run_console(fake_qemu(script), tmp_path / "log", timeout=timeout, boot_timeout=boot_timeout)
    assert run.timed_out == phase and run.returncode is None
    assert run.elapsed < 20


def test_find_qemu_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RunnerError, match=r"install qemu-system-x86 \(scripts/install.sh\)"):
        qemu.find_qemu()


# --- modules and initramfs ------------------------------------------------------------------------

def test_modinfo_reads_depends() -> None:
    assert initramfs.modinfo(ko("kvm_amd", "kvm,ccp"))["depends"] == "kvm,ccp"
    with pytest.raises(ValueError):
        initramfs.modinfo(b"not an elf")


def test_module_index_normalises_names(tmp_path: Path) -> None:
    mods = make_modules(tmp_path)
    index = initramfs.module_index(mods)
    assert index["kvm_amd"].name == "kvm-amd.ko"
    assert index["9pnet_virtio"].name == "9pnet_virtio.ko.xz"
    assert "virtio_pci" in initramfs.builtin_modules(mods)


def test_collect_modules_orders_dependencies_first(tmp_path: Path) -> None:
    groups, data, absent = initramfs.collect_modules(make_modules(tmp_path))
    base = groups["base"]
    assert set(base) == {"9pnet", "9pnet_virtio", "netfs", "9p", "overlay"}
    assert base.index("9pnet") < base.index("9pnet_virtio") < base.index("9p")
    assert base.index("netfs") < base.index("9p")
    assert groups["amd"] == ["irqbypass", "kvm", "kvm_amd"]
    assert groups["intel"] == [] and absent == ["kvm_intel"]
    assert all(blob.startswith(b"\x7fELF") for blob in data.values())  # decompressed on the host


def test_collect_modules_skips_modules_already_in_base(tmp_path: Path) -> None:
    mods = make_modules(tmp_path)
    (mods / "kernel/fs/overlayfs/overlay.ko").write_bytes(ko("overlay", "kvm"))
    groups, _, _ = initramfs.collect_modules(mods)
    assert groups["base"][-3:] == ["irqbypass", "kvm", "overlay"]
    assert groups["amd"] == ["kvm_amd"]


def test_missing_dependency_is_one_clear_error(tmp_path: Path) -> None:
    mods = make_modules(tmp_path)
    (mods / "kernel/fs/overlayfs/overlay.ko").write_bytes(ko("overlay", "nosuchmod"))
    with pytest.raises(RunnerError, match="module overlay needs nosuchmod"):
        initramfs.collect_modules(mods)


def test_missing_base_module_is_one_clear_error(tmp_path: Path) -> None:
    mods = make_modules(tmp_path, builtin=())
    with pytest.raises(RunnerError, match="has no virtio_pci and the kernel does not build it in"):
        initramfs.collect_modules(mods)


def test_non_module_file_is_reported(tmp_path: Path) -> None:
    mods = make_modules(tmp_path)
    (mods / "kernel/fs/overlayfs/overlay.ko").write_bytes(b"garbage")
    with pytest.raises(RunnerError, match="is not a kernel module"):
        initramfs.collect_modules(mods)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd tool (scripts/apt-packages.txt)")
def test_read_module_zstd(tmp_path: Path) -> None:
    path = tmp_path / "kvm.ko.zst"
    path.write_bytes(subprocess.run(["zstd", "-c"], input=ko("kvm"), capture_output=True, check=True).stdout)
    assert initramfs.read_module(path) == ko("kvm")


def test_find_busybox_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(initramfs, "BUSYBOX", tmp_path / "none")
    with pytest.raises(RunnerError, match=r"not found: install busybox-static"):
        initramfs.find_busybox()
    dynamic = tmp_path / "dyn"
    dynamic.write_bytes(elf(interp=True))
    with pytest.raises(RunnerError, match="not statically linked: install busybox-static"):
        initramfs.find_busybox(dynamic)


def test_initramfs_contents(tmp_path: Path, busybox: Path) -> None:
    out = tmp_path / "initrd.cpio.gz"
    absent = initramfs.build(out, busybox, make_modules(tmp_path), plan(tmp_path))
    assert absent == ["kvm_intel"]
    entries = read_cpio(gzip.decompress(out.read_bytes()))
    mode, _, rdev = entries["dev/console"]
    assert mode == 0o20600 and rdev == (5, 1)
    assert entries["bin/busybox"][0] == 0o100755 and entries["bin/busybox"][1] == busybox.read_bytes()
    assert entries["init"][0] == 0o100755
    assert entries["modules/base.list"][1].decode().split() == initramfs.collect_modules(tmp_path / "lib/modules" /
                                                                                         RELEASE)[0]["base"]
    assert entries["modules/amd.list"][1] == b"irqbypass\nkvm\nkvm_amd\n"
    assert entries["modules/9pnet_virtio.ko"][1] == ko("9pnet_virtio", "9pnet,virtio_ring")


def test_initramfs_for_a_kernel_with_drivers_built_in(tmp_path: Path, busybox: Path) -> None:
    out = tmp_path / "initrd.cpio.gz"
    assert initramfs.build(out, busybox, None, plan(tmp_path)) == []
    entries = read_cpio(gzip.decompress(out.read_bytes()))
    assert {n: entries[f"modules/{n}.list"][1] for n in initramfs.MODULE_GROUPS} == dict.fromkeys(
        initramfs.MODULE_GROUPS, b"")
    assert not [n for n in entries if n.endswith(".ko")]


def test_init_passes_module_parameters_from_the_kernel_command_line(tmp_path: Path) -> None:
    """kvm_amd.npt=0 on the command line reaches `insmod kvm_amd.ko`, as modprobe would pass it."""
    script = initramfs.init_script(plan(tmp_path))
    params = next(line for line in script.splitlines() if line.startswith("params()"))
    assert "insmod /modules/$m.ko $(params $m)" in script
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 kvm_amd.npt=0 kvm.tdp_mmu=N kvm_amd.nested=1 kvm_amdx.y=2\n")
    shell = params.replace("/proc/cmdline", str(cmdline)) + '\nfor m in kvm_amd kvm 9p; do echo "$m:" $(params $m); done'
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["kvm_amd: npt=0 nested=1", "kvm: tdp_mmu=N", "9p:"]


def test_init_script_runs_suite_in_overlay_and_powers_off(tmp_path: Path) -> None:
    script = initramfs.init_script(plan(tmp_path))
    assert script.startswith("#!/bin/busybox sh\n")
    res = tmp_path / "res"
    assert "hostroot /lower" in script and "lowerdir=/lower,upperdir=/rw/upper" in script
    assert f"results /newroot{res}" in script
    assert "mount -t tracefs tracefs /newroot/sys/kernel/tracing" in script
    lines = script.splitlines()
    run = shlex.split(next(line for line in lines if line.startswith("env -i")))
    assert run == ["env", "-i", "HOME=/root", "KVMTESTS_ACCEL=tcg", "chroot", "/newroot", "/bin/sh", "-c",
                   "cd '/src/kvm tests' && exec /usr/bin/python3 -m pytest -x", "&"], "beside its watchdog"
    assert f"/newroot{initramfs.DEADLINE_FILE}" in script, "the watchdog reads the deadline inside the suite's root"
    order = [next(i for i, l in enumerate(lines) if l.startswith(p))
             for p in ("load base", "mark suite-start", "env -i", "wait $suite", "mark suite-end", "echo $rc >",
                       "poweroff -f")]
    assert order == sorted(order)
    assert "ro,cache=loose" in script


def test_watchdog_prints_the_overdue_suite_stacks_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/init's watchdog, run by a real shell: a deadline in the past gives one block of the suite's task stacks."""
    deadline = tmp_path / "deadline"
    deadline.write_text("0\n")
    monkeypatch.setattr(initramfs, "DEADLINE_FILE", str(deadline))
    suite = initramfs.GuestPlan(project_dir=tmp_path, command=[shutil.which("sleep") or "sleep", "3"], env={},
                                results_dir=tmp_path, root_tag="", results_tag="")
    mark = next(line for line in initramfs.init_script(suite).splitlines() if line.startswith("mark()"))
    out = subprocess.run(["sh", "-c", f"{mark}\n{initramfs._suite(suite, '')}"], capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    marks = [console.parse_mark(line) for line in out]
    assert [m for m in marks if m] == ["suite-start", "hang-stacks", "hang-stacks-end", "suite-end"]
    task = out[marks.index("hang-stacks") + 1]
    assert task.startswith("task sleep tid ") and task.split()[-2:] == ["state", "S"]
    assert out[-1].endswith(" rc=0") and not deadline.exists()
    assert all(line.startswith("  ") for line in out[marks.index("hang-stacks") + 2: marks.index("hang-stacks-end")])


# --- qualify inputs -------------------------------------------------------------------------------

def test_kernel_release_from_setup_header(tmp_path: Path) -> None:
    assert qualify.kernel_release(make_image(tmp_path)) == RELEASE


def test_modules_dir_found_beside_image(tmp_path: Path) -> None:
    mods = make_modules(tmp_path)
    assert qualify.modules_dir(make_image(tmp_path), RELEASE, None) == mods
    assert qualify.modules_dir(make_image(tmp_path, "7.0"), "7.0", None) is None, "drivers built in"
    with pytest.raises(RunnerError, match="is not a directory"):
        qualify.modules_dir(make_image(tmp_path), RELEASE, tmp_path / "nowhere")


def test_choose_accel(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    sysmod = tmp_path / "sys"
    assert qualify.choose_accel("auto", dev, sysmod) == "tcg"  # e.g. kvm_pvm: no nested parameter
    (sysmod / "kvm_amd" / "parameters").mkdir(parents=True)
    (sysmod / "kvm_amd" / "parameters" / "nested").write_text("1\n")
    assert qualify.choose_accel("auto", dev, sysmod) == "kvm"
    assert qualify.choose_accel("auto", tmp_path / "nokvm", sysmod) == "tcg"
    assert qualify.choose_accel("tcg", dev, sysmod) == "tcg"
    with pytest.raises(RunnerError, match="use --accel tcg"):
        qualify.choose_accel("kvm", tmp_path / "nokvm", sysmod)


def test_suite_command_and_env(tmp_path: Path) -> None:
    cmd = qualify.suite_command(tmp_path, qualify.pytest_args(["--", "-k", "x"]))
    assert cmd[:3] == [sys.executable, "-m", "pytest"]
    assert "-p" in cmd and "no:cacheprovider" in cmd
    assert f"--junitxml={tmp_path / 'junit.xml'}" in cmd and cmd[-2:] == ["-k", "x"]
    assert f"--kvmtests-json={tmp_path / 'results.json'}" in cmd and "--no-kvmtests-summary" in cmd
    assert "--kvmtests-stream=/dev/console" in cmd, "each verdict reaches the host as it happens"
    assert qualify.suite_command(tmp_path, [])[-2:] == ["-m", "not selftest"], "self-tests need no guest"
    env = qualify.guest_env("tcg", {"HOME": "/h", "PATH": "/p", "KVMTESTS_GATE": "all", "SECRET": "x"}, tmp_path, 300)
    assert env == {"HOME": "/h", "PATH": "/p", "KVMTESTS_GATE": "all", "KVMTESTS_ACCEL": "tcg", "TERM": "dumb",
                   "KVMTESTS_HYPOTHESIS_PROFILE": "qualify", "KVMTESTS_RESUME": str(tmp_path / "resume.json"),
                   "KVMTESTS_TEST_TIMEOUT": "300", "KVMTESTS_DEADLINE_FILE": initramfs.DEADLINE_FILE}
    long = qualify.guest_env("tcg", {"KVMTESTS_HYPOTHESIS_PROFILE": "long"}, tmp_path, 0.5)
    assert long["KVMTESTS_HYPOTHESIS_PROFILE"] == "long" and long["KVMTESTS_TEST_TIMEOUT"] == "0.5"
    assert "kvmtests.accel=tcg" in qualify.kernel_cmdline("tcg") and "panic=-1" in qualify.kernel_cmdline("tcg")
    assert qualify.kernel_cmdline("tcg", "kvm.tdp_mmu=N").endswith("kvmtests.accel=tcg kvm.tdp_mmu=N")


def parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvmtests")
    qualify.register(parser.add_subparsers())
    return parser.parse_args(["qualify", "--shards", "1", *argv])   # the stand-in emulators run whole cells


@pytest.mark.parametrize("argv,require,extra", [
    (["--", "--require", "series"], "", ["--require", "series"]),     # the README's gating example
    (["--require", "series"], "series", []),
    (["--require", "rwx_attributes,hv_exits", "--", "-k", "fault", "-x"], "rwx_attributes,hv_exits", ["-k", "fault", "-x"]),
])
def test_arguments_after_the_separator_add_to_the_defaults(tmp_path: Path, argv: list[str], require: str,
                                                           extra: list[str]) -> None:
    """Self-tests stay out whatever follows `--`; `--require` is a qualify option passed to the guest's pytest."""
    args = parsed(["--kernel", "k", *argv])
    assert args.require == require
    cmd = qualify.suite_command(tmp_path, qualify.pytest_args(args.pytest_args), args.require)
    marker = cmd.index("not selftest") - 1
    assert cmd[marker] == "-m" and "-m" not in cmd[marker + 1:], "the default -m 'not selftest' is the last -m"
    assert cmd[marker + 2:] == ([f"--require={require}"] if require else []) + extra


def test_qualify_hypothesis_profile_stops_at_the_first_failure() -> None:
    """The guest's profile exists in the model test and skips shrinking (it doubled a failing kernel's run)."""
    import test_attr_model  # noqa: F401  registers the profiles
    name, profile = qualify.HYPOTHESIS_PROFILE
    assert name == test_attr_model.PROFILE_ENV
    got, ci = hypothesis.settings.get_profile(profile), hypothesis.settings.get_profile("ci")
    assert hypothesis.Phase.shrink not in got.phases and hypothesis.Phase.generate in got.phases
    assert (got.max_examples, got.stateful_step_count) == (ci.max_examples, ci.stateful_step_count)


def test_cli_unknown_required_group_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--kernel", str(tmp_path / "nope"), "--require", "serie"]) == qualify.EXIT_BAD_INPUT
    assert one_error_line(capsys).startswith("qualify: --require: unknown feature group 'serie'")


# --- results --------------------------------------------------------------------------------------

def run_result(marks: dict[str, float], timed_out: str | None = None, rc: int | None = 0) -> console.RunResult:
    return console.RunResult(returncode=rc, timed_out=timed_out, elapsed=9.0, marks=marks,
                          tail=[f"line {i}" for i in range(20)])


def test_report_cell_returns_suite_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One boot that finished: the suite's exit status, its phase times, and its own JUnit file kept."""
    (tmp_path / "junit.xml").write_text("<testsuites/>")
    doc = report.build({"kernel": RELEASE}, {}, [], [], [{"nodeid": "t.py::a", "outcome": "failed", "message": "E x",
                                                          "catalog": [], "groups": [], "duration": 0.1}], 1)
    boot = resume.Boot(Monitor(1, 300, 30, True), run_result({"suite-start": 4.0, "suite-end": 10.5}), doc)
    code = qualify.report_cell(tmp_path, [boot], "", argparse.Namespace(require=""), RELEASE, "QEMU")
    out = capsys.readouterr().out
    assert code == 1 and (tmp_path / "rc").read_text() == "1\n"
    assert "qualify: boot 4.0 s (QEMU start until the suite started), suite 6.5 s" in out
    assert f"JUnit XML: {tmp_path / 'junit.xml'}" in out and f"JSON: {tmp_path / 'results.json'}" in out
    assert (tmp_path / "junit.xml").read_text() == "<testsuites/>", "one whole boot: the guest's own JUnit stays"
    assert report.load(tmp_path / "results.json")["tests"] == doc["tests"]
    assert "boots" not in out and "CRASH" not in out and "INCOMPLETE" not in out


@pytest.mark.parametrize("marks, timed_out, expected, code", [
    ({}, "boot", "kernel did not reach the test runner within 300 s", qualify.EXIT_TIMEOUT),
    ({"suite-start": 3.0}, "suite", "the suite did not finish within 3600 s", qualify.EXIT_TIMEOUT),
    ({}, None, "kernel did not reach the test runner (QEMU exit status 0 after 9 s)", qualify.EXIT_NO_VERDICT),
    ({"suite-start": 3.0}, None, "the guest stopped before the suite finished", qualify.EXIT_NO_VERDICT),
])
def test_no_suite_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str], marks: dict[str, float],
                               timed_out: str | None, expected: str, code: int) -> None:
    assert qualify.no_suite(tmp_path, run_result(marks, timed_out), 300, 3600) == code
    out = capsys.readouterr().out.splitlines()
    failure = [line for line in out if line.startswith("qualify: ") and "boot" not in line.split()[1]]
    assert len(failure) == 1 and expected in failure[0] and str(tmp_path / "console.log") in failure[0]
    assert out[-1] == "  | line 19" and len([line for line in out if line.startswith("  | ")]) == 20


def test_no_suite_empty_console(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = console.RunResult(returncode=None, timed_out="boot", elapsed=300.0)
    assert qualify.no_suite(tmp_path, run, 300, 3600) == qualify.EXIT_TIMEOUT
    assert capsys.readouterr().out.splitlines()[-1] == "  | (the console printed nothing)"


def test_no_suite_init_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_result({"init-failed": 2.0})
    run.tail.append("@@kvmtests@@ init-failed 0 cannot mount the host root over 9p")
    assert qualify.no_suite(tmp_path, run, 300, 3600) == qualify.EXIT_NO_VERDICT
    assert "the guest's /init failed: cannot mount the host root over 9p" in capsys.readouterr().out


# --- the command line's error paths: one line each, no traceback ----------------------------------

def run_cli(argv: list[str]) -> int:
    args = parsed(argv)
    return args.func(args)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_cli_missing_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--kernel", str(tmp_path / "nope")]) == qualify.EXIT_BAD_INPUT
    assert "does not exist: give a kernel image path or one of debian-6.12" in one_error_line(capsys)


def test_cli_not_a_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_text("hello")
    assert run_cli(["--kernel", str(junk)]) == qualify.EXIT_BAD_INPUT
    assert "is not an x86 kernel image" in one_error_line(capsys)


def test_cli_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--kernel", str(tmp_path)]) == qualify.EXIT_BAD_INPUT
    assert f"cannot read {tmp_path}" in one_error_line(capsys)


def test_cli_missing_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    make_modules(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_cli(["--kernel", str(make_image(tmp_path))]) == qualify.EXIT_BAD_INPUT
    assert one_error_line(capsys).endswith("install qemu-system-x86 (scripts/install.sh)")


def test_cli_missing_busybox(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    make_modules(tmp_path)
    monkeypatch.setattr(qemu, "find_qemu", lambda: "/usr/bin/true")
    monkeypatch.setattr(initramfs, "BUSYBOX", tmp_path / "busybox")
    assert run_cli(["--kernel", str(make_image(tmp_path))]) == qualify.EXIT_BAD_INPUT
    assert one_error_line(capsys).endswith("install busybox-static (scripts/install.sh)")


def test_cli_unwritable_results(tmp_path: Path, busybox: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_modules(tmp_path)
    monkeypatch.setattr(qemu, "find_qemu", lambda: "/usr/bin/true")
    monkeypatch.setattr(initramfs, "BUSYBOX", busybox)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--results", str(blocker / "res")]) == 2
    assert one_error_line(capsys).endswith("check the path and its permissions")


def test_sigterm_ends_the_emulator_too(tmp_path: Path, busybox: Path) -> None:
    """A qualify stopped by SIGTERM (CI's time limit, a user's kill) leaves no emulator running."""
    make_modules(tmp_path)
    pid_file = tmp_path / "emulator.pid"
    fake = tmp_path / "qemu"
    fake.write_text(f"#!{sys.executable}\nimport os, pathlib, time\n"
                    f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\ntime.sleep(60)\n")
    fake.chmod(0o755)
    driver = (f"import pathlib, sys\nfrom kvmtests import cli\nfrom kvmtests.runner import initramfs, qemu\n"
              f"initramfs.BUSYBOX = pathlib.Path({str(busybox)!r})\nqemu.find_qemu = lambda: {str(fake)!r}\n"
              f"sys.exit(cli.main(['qualify', '--kernel', {str(make_image(tmp_path))!r}, '--accel', 'tcg', "
              f"'--shards', '1', '--results', {str(tmp_path / 'out')!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    emulator = None
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "qualify never started the emulator"
            time.sleep(0.05)
        emulator = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        orphaned = True
        try:
            os.kill(emulator, 0)
        except ProcessLookupError:
            orphaned = False
        assert not orphaned, f"the emulator (pid {emulator}) still runs after qualify ended on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if emulator is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(emulator, signal.SIGKILL)


def test_suite_echo_shows_pytests_progress_but_no_events(capsys: pytest.CaptureFixture[str]) -> None:
    """The live output is the suite's: its progress as pytest wrote it (glued to the event lines), not the kernel's or
    the events."""
    echo = qualify.suite_echo()
    for line in ["[    1.2] Run /init as init process", "@@kvmtests@@ suite-start 1.0", "collected 2 items", "",
                 "@@kvmtests@@ test-start 1.1 eJwD", "tests/test_a.py .@@kvmtests@@ test-end 1.2 eJwD",
                 "@@kvmtests@@ test-start 1.3 eJwD", "F@@kvmtests@@ test-end 1.4 eJwD", "   [100%]",
                 "== 1 failed, 1 passed ==", "@@kvmtests@@ suite-end 2.0 rc=1", "[    3.0] reboot: Power down"]:
        echo(line)
    assert capsys.readouterr().out.splitlines() == ["collected 2 items", "", "tests/test_a.py .F   [100%]",
                                                    "== 1 failed, 1 passed =="]


def test_cli_runs_fake_qemu_and_collects_results(tmp_path: Path, busybox: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole flow with a stand-in QEMU that plays the guest: writes rc and junit.xml into the share."""
    make_modules(tmp_path)
    results = tmp_path / "out"
    fake = tmp_path / "qemu"
    fake.write_text(f"""#!{sys.executable}
import gzip, json, sys, pathlib
from kvmtests.verdict import report
args = sys.argv
initrd = gzip.decompress(pathlib.Path(args[args.index("-initrd") + 1]).read_bytes())
assert b"--kvmtests-stream=/dev/console" in initrd and b"KVMTESTS_RESUME=" in initrd
print("@@kvmtests@@ suite-start 1.0")
print("1 passed")
test = {{"nodeid": "t.py::a", "outcome": "passed", "message": "", "catalog": [], "groups": [], "duration": 0.1}}
doc = report.build({{"kernel": "{RELEASE}"}}, {{}}, [], [], [test], 0)
pathlib.Path({str(results)!r}, "results.json").write_text(json.dumps(doc))
pathlib.Path({str(results)!r}, "junit.xml").write_text("<testsuites/>")
pathlib.Path({str(results)!r}, "rc").write_text("0")
print("@@kvmtests@@ suite-end 2.0 rc=0")
""")
    fake.chmod(0o755)
    monkeypatch.setattr(qemu, "find_qemu", lambda: str(fake))
    monkeypatch.setattr(initramfs, "BUSYBOX", busybox)
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--results", str(results), "--accel", "tcg",
                    "--", "-k", "x"]) == 0
    out = capsys.readouterr().out
    assert "1 passed" in out and "under QEMU tcg, -cpu max, 1 vCPU, 2G" in out
    assert f"console log: {results / 'console.log'}" in out
    assert "suite-start" in (results / "console.log").read_text()
    assert [t["nodeid"] for t in report.load(results / "results.json")["tests"]] == ["t.py::a"]
    assert (results / "junit.xml").read_text() == "<testsuites/>" and (results / "rc").read_text() == "0\n"
    built_in = make_image(tmp_path / "monolithic", "7.0")
    assert run_cli(["--kernel", str(built_in), "--results", str(results), "--accel", "tcg"]) == 0
    out = capsys.readouterr().out
    assert "no lib/modules/7.0 beside" in out and "assuming virtio-pci, 9p, overlayfs and KVM are built in" in out
    assert "2G; no modules" in out
