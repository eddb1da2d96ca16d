"""The Bochs side of the qualification runner without Bochs: its configuration, the self-contained guest's
files and /init, the results sent back over the console, and the command line's error paths."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from kvmtests.machine import host
from kvmtests.runner import bochs, console, initramfs, qualify, rootfs
from kvmtests.runner.console import RunnerError
from kvmtests.runner.monitor import Monitor
from kvmtests.verdict import report

from test_qualify import elf, make_image, make_modules, one_error_line, read_cpio, run_cli

pytestmark = pytest.mark.selftest


def tools(tmp_path: Path) -> bochs.BochsTools:
    return bochs.BochsTools("bochs-bin", "xorriso", {name: tmp_path / name for name in bochs.FILES})


def test_bochsrc_is_headless_with_the_console_on_stdout(tmp_path: Path) -> None:
    cfg = bochs.MachineConfig(iso=tmp_path / "boot.iso", log=tmp_path / "bochs.log", mem_mb=2048, cpus=1)
    rc = bochs.bochsrc(cfg, tools(tmp_path)).splitlines()
    assert f"ata0-master: type=cdrom, path={tmp_path / 'boot.iso'}, status=inserted" in rc
    assert "memory: guest=2048, host=2048" in rc and "boot: cdrom" in rc
    assert f"cpu: model={bochs.CPU_MODEL}, count=1, ips={bochs.IPS}, ignore_bad_msrs=1" in rc
    assert "com1: enabled=1, mode=file, dev=/dev/stdout" in rc
    assert f"log: {tmp_path / 'bochs.log'}" in rc, "Bochs's messages must not interleave with the console"
    assert 'display_library: rfb, options="timeout=0"' in rc, "the VNC display must not wait for a client"
    assert any(line.startswith("sound:") and "waveoutdrv=dummy" in line for line in rc)
    assert f"romimage: file={tmp_path / 'bios'}" in rc
    assert bochs.bochs_command(Path("/t/rc"), Path("/t/dbg"), "b") == ["b", "-q", "-f", "/t/rc", "-rc", "/t/dbg"]
    assert bochs.DEBUGGER_SCRIPT.startswith("continue\n")


def test_kernel_params_match_the_emulated_clock() -> None:
    assert bochs.kernel_params(100_000_000) == "tsc_early_khz=100000 cryptomgr.notests=1"
    cfg = bochs.isolinux_config("console=ttyS0 x=1")
    assert "APPEND console=ttyS0 x=1" in cfg and "KERNEL /vmlinuz" in cfg and "INITRD /initrd" in cfg


@pytest.mark.parametrize("size, mb", [("2G", 2048), ("1536M", 1536), ("512", 512), ("1g", 1024)])
def test_memory_mb(size: str, mb: int) -> None:
    assert bochs.memory_mb(size) == mb


def test_memory_mb_rejects_junk() -> None:
    with pytest.raises(RunnerError, match="give megabytes or gigabytes"):
        bochs.memory_mb("lots")


def test_find_tools_names_the_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RunnerError, match=r"^bochs-bin not found: install bochs \(scripts/install.sh\)$"):
        bochs.find_tools()
    for name in ("bochs-bin", "xorriso"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setattr(bochs, "FILES", {"bios": (tmp_path / "nope", "bochsbios")})
    with pytest.raises(RunnerError, match=r"nope not found: install bochsbios"):
        bochs.find_tools()


# --- the self-contained guest ------------------------------------------------------------------

def test_requirement_names_drop_extras_and_foreign_markers() -> None:
    reqs = ["cffi>=1.15", "pytest-xdist[psutil] >=3", "attrs ; python_version >= '3.8'",
            "colorama ; sys_platform == 'win32'", "pytest ; extra == 'testing'", "exceptiongroup (>=1)"]
    assert rootfs.requirement_names(reqs) == ["cffi", "pytest-xdist", "attrs", "exceptiongroup"]


def test_collect_brings_python_binutils_libraries_and_the_project() -> None:
    files = {f.path: f for f in rootfs.collect(qualify.PROJECT_DIR)}
    assert str(Path(sys.executable)).lstrip("/") in files
    for tool in ("as", "ld", "objcopy", "nm"):
        assert any(p.endswith(f"bin/{tool}") and files[p].executable for p in files), tool
    assert any(Path(p).name.startswith("libc.so") for p in files) and any("ld-linux" in p for p in files)
    project = str(qualify.PROJECT_DIR).lstrip("/")
    assert f"{project}/kvmtests/runner/bochs.py" in files and f"{project}/pyproject.toml" in files
    assert not any(p.startswith(f"{project}/.git") for p in files)
    assert any("/site-packages/_pytest/" in p for p in files) and any("/site-packages/cffi/" in p for p in files)
    assert not any("/site-packages/IPython/" in p for p in files), "only the suite's dependencies"
    assert not any("/idlelib/" in p or p.endswith(".opt-1.pyc") for p in files)
    if shutil.which("gcc"):   # kvmtests bench compiles its C program in the guest too
        assert "usr/include/linux/kvm.h" in files and any(p.endswith("/cc1") for p in files)
        assert any(p.endswith("/crti.o") for p in files) and any(p.endswith("/libc_nonshared.a") for p in files)


def test_missing_dependency_is_one_line() -> None:
    with pytest.raises(RunnerError, match="needs the Python package no-such-dist-kvmtests, which is not installed"):
        rootfs.distributions(["no-such-dist-kvmtests"])


def self_contained_plan(tmp_path: Path, files: tuple[rootfs.HostFile, ...]) -> initramfs.GuestPlan:
    return initramfs.GuestPlan(project_dir=Path("/src/kvmtests"), command=["/py", "-m", "pytest"],
                               env={"HOME": "/root", "KVMTESTS_ACCEL": "bochs"}, results_dir=Path("/kvmtests-results"),
                               root_tag="", results_tag="", host_files=files)


def test_self_contained_initramfs_keeps_mtimes_and_parents(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    mtime = int(source.stat().st_mtime)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf())
    plan = self_contained_plan(tmp_path, (rootfs.HostFile("usr/lib/py/mod.py", source, False),))
    out = tmp_path / "initramfs.cpio"
    mods = make_modules(tmp_path)
    assert initramfs.build(out, busybox, mods, plan) == ["kvm_intel"]
    data = out.read_bytes()
    assert data.startswith(b"070701"), "uncompressed: the emulated CPU inflates slowly"
    entries = read_cpio(data)
    names = list(entries)
    assert names.index("usr") < names.index("usr/lib") < names.index("usr/lib/py") < names.index("usr/lib/py/mod.py")
    assert entries["usr/lib/py/mod.py"][1] == b"x = 1\n"
    header = data[data.index(b"usr/lib/py/mod.py\0") - 110:]
    assert int(header[6 + 8 * 5: 14 + 8 * 5], 16) == mtime
    assert entries["modules/base.list"][1] == b"", "no 9p, virtio or overlay under Bochs"
    init = entries["init"][1].decode()
    assert "9p" not in init and "chroot" not in init and "load base" not in init
    assert "results-begin" in init and "base64 /tmp/results.tgz" in init and "dmesg -n 1" in init
    assert "KVMTESTS_ACCEL=bochs" in init and "cd /src/kvmtests && exec /py -m pytest" in init


# --- results over the console ------------------------------------------------------------------

def encoded(files: dict[str, bytes]) -> tuple[str, list[str]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    text = base64.b64encode(raw).decode()
    return hashlib.sha256(raw).hexdigest(), [text[i: i + 76] for i in range(0, len(text), 76)]


def feed(lines: list[str]) -> console.ResultCollector:
    collector = console.ResultCollector()
    for line in lines:
        collector(line)
    return collector


def test_results_come_back_over_the_console(tmp_path: Path) -> None:
    digest, body = encoded({"rc": b"0\n", "junit.xml": b"<testsuites/>", "../evil": b"x", "other": b"y"})
    collector = feed(["[ 1.0] boot", "@@kvmtests@@ suite-end 5.0 rc=0", f"@@kvmtests@@ results-begin 5.1 {digest}",
                      *body, "@@kvmtests@@ results-end 5.2", "[ 6.0] reboot: Power down"])
    assert collector.unpack(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml", "rc"]
    assert (tmp_path / "rc").read_text() == "0\n"


@pytest.mark.parametrize("damage, reason", [
    (lambda d, b: [f"@@kvmtests@@ results-begin 1 {d}", *b], "cut off"),
    (lambda d, b: [f"@@kvmtests@@ results-begin 1 {'0' * 64}", *b, "@@kvmtests@@ results-end 2"], "checksum"),
    (lambda d, b: [f"@@kvmtests@@ results-begin 1 {d}", b[0], "[ 9.9] kvm: a message", *b[1:],
                   "@@kvmtests@@ results-end 2"], "not valid base64"),
    (lambda d, b: ["@@kvmtests@@ suite-end 5.0 rc=0"], "sent no results"),
])
def test_damaged_results_say_why(tmp_path: Path, damage, reason: str) -> None:
    digest, body = encoded({"rc": b"0\n", "results.json": b"{}" * 200})
    assert reason in (feed(damage(digest, body)).unpack(tmp_path) or "")
    assert not (tmp_path / "rc").exists()


# --- qualify --cpu -------------------------------------------------------------------------------

def test_qemu_cpu_reads_vendor_names() -> None:
    assert qualify.qemu_cpu(None, "tcg") == "max" and qualify.qemu_cpu("amd", "tcg") == "max"
    assert qualify.qemu_cpu(None, "kvm") == "host" and qualify.qemu_cpu("EPYC", "tcg") == "EPYC"


def test_environment_names_bochs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMTESTS_ACCEL", "bochs")
    monkeypatch.setattr(host, "_read", lambda path: "console=ttyS0" if path == "/proc/cmdline" else None)
    assert host.environment() == "Bochs (kvmtests qualify)"
    assert "kvmtests.accel=bochs tsc_early_khz=" in qualify.kernel_cmdline("bochs", bochs.kernel_params())


def test_cli_missing_bochs(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    make_modules(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--cpu", "intel"]) == qualify.EXIT_BAD_INPUT
    assert one_error_line(capsys) == "qualify: bochs-bin not found: install bochs (scripts/install.sh)"


def test_cli_accel_with_bochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--cpu", "intel", "--accel", "tcg"]) == 2
    assert "--cpu intel runs under Bochs: leave --accel out" in one_error_line(capsys)


def test_report_names_the_emulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = console.RunResult(returncode=1, timed_out=None, elapsed=9.0, marks={}, tail=["[ 1.0] Kernel panic"])
    assert qualify.no_suite(tmp_path, run, 300, 3600, "Bochs") == qualify.EXIT_NO_VERDICT
    assert "(Bochs exit status 1 after 9 s)" in capsys.readouterr().out


def test_run_console_stops_at_the_panic_line(tmp_path: Path) -> None:
    """Bochs reboots a panicked kernel rather than exit: the monitor ends the run at the panic's last line."""
    script = "import time\nprint('Kernel panic - not syncing: x', flush=True)\n" \
             "print('---[ end Kernel panic - not syncing: x ]---', flush=True)\ntime.sleep(60)"
    monitor = Monitor(1, 0, 0, can_nmi=False)
    run = console.run_console([sys.executable, "-c", script], tmp_path / "log", 60, 60, monitor=monitor)
    assert run.timed_out is None and run.elapsed < 20
    assert run.tail[-1].startswith("---[ end Kernel panic")
    assert [(c.report.kind, c.report.title, c.during) for c in monitor.crashes] == [
        ("panic", "kernel panic: x", "boot")]


def test_cli_runs_fake_bochs_and_unpacks_results(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole --cpu intel flow with a stand-in Bochs that plays the guest: the results come back on the console."""
    make_modules(tmp_path)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf())
    results = tmp_path / "out"
    doc = report.build({"kernel": "6.99.0-test"}, {}, [], [], [], 0)
    digest, body = encoded({"rc": b"0\n", "junit.xml": b"<testsuites/>", "results.json": json.dumps(doc).encode()})
    fake = tmp_path / "bochs-bin"
    fake.write_text(f"""#!{sys.executable}
import sys, pathlib
rc = pathlib.Path(sys.argv[sys.argv.index("-f") + 1]).read_text()
assert "boot: cdrom" in rc and pathlib.Path(sys.argv[sys.argv.index("-rc") + 1]).read_text().startswith("continue")
print("ISOLINUX 6.04")
print("@@kvmtests@@ suite-start 1.0")
print("1 passed")
print("@@kvmtests@@ suite-end 2.0 rc=0")
print("@@kvmtests@@ results-begin 2.1 {digest}")
print({chr(10).join(body)!r})
print("@@kvmtests@@ results-end 2.2")
sys.exit(1)
""")
    fake.chmod(0o755)
    monkeypatch.setattr(bochs, "find_tools", lambda: bochs.BochsTools(str(fake), "xorriso", tools(tmp_path).files))
    monkeypatch.setattr(bochs, "make_iso", lambda out, *rest: out.write_bytes(b"iso"))
    monkeypatch.setattr(rootfs, "collect", lambda project: [])
    monkeypatch.setattr(initramfs, "BUSYBOX", busybox)
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--cpu", "intel", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 passed" in out and "under Bochs, corei7_haswell_4770 at 100 MIPS, 1 vCPU, 2048 MB" in out
    assert "(Bochs start until the suite started)" in out
    assert (results / "rc").read_text() == "0\n" and (results / "junit.xml").read_text() == "<testsuites/>"
    assert report.load(results / "results.json")["boots"] == 1
    assert "results-begin" in (results / "console.log").read_text()
