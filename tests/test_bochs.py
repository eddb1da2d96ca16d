"""The Bochs side of the qualification runner without Bochs: its configuration, the self-contained guest's
files and /init, the results sent back over the console, the command line's error paths, and what its debugger
says when interrupted, with the RIP named from a System.map or a module's symbols."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import lzma
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import pytest

from kvmtests.machine import asm, host, payloads
from kvmtests.runner import bochs, console, initramfs, qualify, rootfs, shards, symbols
from kvmtests.runner.console import RunnerError
from kvmtests.runner.monitor import Monitor
from kvmtests.verdict import report, stream

from test_qualify import RELEASE, elf, make_image, make_modules, one_error_line, read_cpio, run_cli

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
    script = bochs.debugger_script(2).splitlines()
    assert script[0] == "continue" and script[-1] == "quit", "run, and end Bochs after a stop"
    assert 'show "cpu1.VMX.in_vmx_guest"' in script and "r" in script and "print-stack 24" in script


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


def test_bytecode_is_the_guests_own_compiled_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules compiled, and test modules rewritten as pytest does by the host's collection, under __pycache__
    beside their sources, valid for the sources' mtime and size (which the initramfs keeps); nothing is written
    into the project itself."""
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "mod.py").write_text("X = 1\n")
    (project / "tests" / "test_x.py").write_text("from pkg.mod import X\n\ndef test_x():\n    assert X == 1\n")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")   # as on a host that keeps its checkout clean
    nodeids = shards.collect([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"],
                             project, tmp_path / "out")
    assert nodeids == ["tests/test_x.py::test_x"]
    files = {f.path: f.source for f in rootfs.bytecode(project, tmp_path / "out")}
    root, tag = str(project).lstrip("/"), sys.implementation.cache_tag
    assert f"{root}/pkg/__pycache__/mod.{tag}.pyc" in files
    rewritten = [p for p in files if p.startswith(f"{root}/tests/__pycache__/test_x.{tag}-pytest-")]
    assert rewritten, "the test module as pytest's assertion rewriting leaves it"
    source = project / "pkg" / "mod.py"
    header = files[f"{root}/pkg/__pycache__/mod.{tag}.pyc"].read_bytes()[:16]
    assert struct.unpack("<4sIII", header)[1:] == (0, int(source.stat().st_mtime), source.stat().st_size)
    assert not list(project.rglob("__pycache__"))


def test_the_guest_finds_every_payload_assembled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The initramfs carries each payload the suite loads at the cache path the guest reads: the guest, with the
    same cache, never starts the assembler."""
    monkeypatch.setenv(asm.CACHE_ENV, str(tmp_path / "cache"))
    files = {f.path for f in rootfs.payloads()}
    assert files and all(f.startswith(str(tmp_path / "cache" / "asm").lstrip("/")) for f in files)
    monkeypatch.setattr(asm, "_build", lambda *a: pytest.fail("assembled again"))
    for payload in payloads.assemble_all():
        assert {str(payload.cached / n).lstrip("/") for n in ("payload.bin", "symbols.json")} <= files


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
    assert qualify.kernel_cmdline("bochs").startswith("console=ttyS0,115200 "), "Bochs's UART keeps to the baud rate"


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
    script = "import time\nprint('[   66.123456] Kernel panic - not syncing: x', flush=True)\n" \
             "print('[   66.234567] ---[ end Kernel panic - not syncing: x ]---', flush=True)\ntime.sleep(60)"
    monitor = Monitor(1, 0, 0, can_nmi=False)
    run = console.run_console([sys.executable, "-c", script], tmp_path / "log", 60, 60, monitor=monitor)
    assert run.timed_out is None and run.elapsed < 20
    assert "---[ end Kernel panic" in run.tail[-1]
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
    monkeypatch.setattr(rootfs, "bytecode", lambda project, out: [])
    monkeypatch.setattr(initramfs, "BUSYBOX", busybox)
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--cpu", "intel", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 passed" in out and "under Bochs, corei7_haswell_4770 at 100 MIPS, 1 vCPU, 2048 MB" in out
    assert "(Bochs start until the suite started)" in out
    assert (results / "rc").read_text() == "0\n" and (results / "junit.xml").read_text() == "<testsuites/>"
    assert report.load(results / "results.json")["boots"] == 1
    assert "results-begin" in (results / "console.log").read_text()


# --- naming where the guest was --------------------------------------------------------------------

def module_object(name: str, depends: str, sections: dict[str, list[tuple[str, int, int]]]) -> bytes:
    """A kernel module as kbuild leaves it, cut down: .modinfo, code sections, and a symbol table naming functions
    (name, offset in their section, size; size 0: an assembler label) beside a section and a file symbol."""
    names = list(sections)
    strtab = b"\0"
    symtab = [bytes(24), struct.pack("<IBBHQQ", 0, 3, 0, 1, 0, 0)]   # the null symbol, a section symbol
    strtab += f"{name}.c\0".encode()
    symtab.append(struct.pack("<IBBHQQ", 1, 4, 0, 0xFFF1, 0, 0))    # STT_FILE, SHN_ABS
    for index, section in enumerate(names, 1):
        for symbol, offset, size in sections[section]:
            symtab.append(struct.pack("<IBBHQQ", len(strtab), 0x12 if size else 0x10, 0, index, offset, size))
            strtab += symbol.encode() + b"\0"
    code = {s: bytes(max([o + z for _, o, z in sections[s]] + [16])) for s in names}
    content = [*code.values(), f"license=GPL\0depends={depends}\0name={name}\0".encode(), b"".join(symtab), strtab]
    # (name, type, link, info, entsize) per section after the null one; .shstrtab last
    headers = [(s, 1, 0, 0, 0) for s in names] + [(".modinfo", 1, 0, 0, 0), (".symtab", 2, len(names) + 3, 3, 24),
                                                 (".strtab", 3, 0, 0, 0), (".shstrtab", 3, 0, 0, 0)]
    shstrtab = b"\0" + b"".join(h[0].encode() + b"\0" for h in headers)
    content.append(shstrtab)
    out = bytearray(64)
    offsets = []
    for blob in content:
        out += bytes(-len(out) % 8)
        offsets.append(len(out))
        out += blob
    out += bytes(-len(out) % 8)
    shoff = len(out)
    out += bytes(64)
    name_at = 1
    for (section, kind, link, info, entsize), offset, blob in zip(headers, offsets, content):
        out += struct.pack("<IIQQQQIIQQ", name_at, kind, 0, 0, offset, len(blob), link, info, 8, entsize)
        name_at += len(section) + 1
    out[:64] = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers) + 1, len(headers))
    return bytes(out)


KVM_INTEL = {".init.text": [("vmx_init", 0x0, 0x100)],
             ".text": [("__pfx_vmx_vcpu_run", 0x0, 0x10), ("vmx_vcpu_run", 0x10, 0x40),
                       ("handle_ept_violation.cold", 0x50, 0x20)],
             ".noinstr.text": [("__vmx_vcpu_run", 0x0, 0x80), ("vmx_vmexit", 0x60, 0)]}
SYSTEM_MAP = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t native_safe_halt
ffffffff81001040 T default_idle
ffffffff81002000 T _etext
ffffffff82000000 D linux_banner
"""
TEXT, KVM_TEXT, KVM_NOINSTR = 0xFFFFFFFF9A000000, 0xFFFFFFFFC0A00000, 0xFFFFFFFFC0B00000
# kvm_intel's .text where kvm's freed .init.text was (as on a real boot): that section names nothing
BASES = {"_text": TEXT, "kvm_intel:.init.text": KVM_TEXT, "kvm_intel:.text": KVM_TEXT,
         "kvm_intel:.noinstr.text": KVM_NOINSTR}


def test_module_symbols_by_section() -> None:
    tables = symbols.module_symbols(module_object("kvm_intel", "kvm", KVM_INTEL))
    assert set(tables) == {".init.text", ".text", ".noinstr.text"}, "no section, file or data symbols"
    assert tables[".text"].find(0x10) == ("vmx_vcpu_run", 0, 0x40)
    assert tables[".text"].find(0x4F) == ("vmx_vcpu_run", 0x3F, 0x40)
    assert tables[".text"].find(0x70) is None, "past the last function's end"
    assert tables[".noinstr.text"].find(0x62) == ("vmx_vmexit", 2, 0x20), "a label runs until the function's end"
    with pytest.raises(ValueError):
        symbols.module_symbols(b"not an elf")


def test_symbolizer_names_kernel_and_module_addresses_where_this_boot_put_them(tmp_path: Path) -> None:
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    ko = tmp_path / "kvm-intel.ko.xz"
    ko.write_bytes(lzma.compress(module_object("kvm_intel", "kvm", KVM_INTEL)))
    names = symbols.Symbolizer(tmp_path / "System.map", {"kvm_intel": ko})
    assert names.name(TEXT + 0x1003, BASES) == ("native_safe_halt", "native_safe_halt+0x3/0x40")
    assert names.name(TEXT + 0x1041, BASES) == ("default_idle", "default_idle+0x1/0xfc0")
    assert names.name(KVM_TEXT + 0x12, BASES) == ("vmx_vcpu_run", "vmx_vcpu_run+0x2/0x40 [kvm_intel]")
    assert names.name(KVM_TEXT + 0x51, BASES) == ("handle_ept_violation",
                                                  "handle_ept_violation.cold+0x1/0x20 [kvm_intel]")
    assert names.name(KVM_NOINSTR + 0x8, BASES) == ("__vmx_vcpu_run", "__vmx_vcpu_run+0x8/0x80 [kvm_intel]")
    assert names.name(TEXT + 0x2000, BASES) is None, "past _etext"
    assert names.name(TEXT - 1, BASES) is None and names.name(0x1000, BASES) is None
    assert names.name(TEXT + 0x1003, {}) is None, "no bases: KASLR put the kernel anywhere"


def test_debians_placeholder_system_map_names_nothing(tmp_path: Path) -> None:
    placeholder = tmp_path / "System.map-6.12.95+deb12-amd64"
    placeholder.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    assert symbols.system_map(placeholder) is None
    assert symbols.Symbolizer(placeholder, {}).name(TEXT + 0x1003, BASES) is None
    assert symbols.Symbolizer(None, {"kvm": tmp_path / "missing.ko"}).name(KVM_TEXT, BASES) is None


def test_find_system_map(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    assert symbols.find_system_map(image, RELEASE) is None
    (tmp_path / "boot" / f"System.map-{RELEASE}").write_text(SYSTEM_MAP)
    assert symbols.find_system_map(image, RELEASE) == tmp_path / "boot" / f"System.map-{RELEASE}"
    tree = tmp_path / "linux"
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(b"")
    (tree / "System.map").write_text(SYSTEM_MAP)
    assert symbols.find_system_map(tree / "arch" / "x86" / "boot" / "bzImage", RELEASE) == tree / "System.map"


def test_text_bases_from_inits_mark() -> None:
    word = "_text=ffffffff9a000000,kvm:.text=0xffffffffc0a00000,kvm:.init.text=0x0000000000000000,junk,x=zz"
    assert stream.text_bases(word) == {"_text": TEXT, "kvm:.text": KVM_TEXT}
    assert stream.text_bases("_text=") == {}


def debugger_stop(cpus: list[tuple[int, int, str, bool]], stack: list[int]) -> str:
    """What Bochs's debugger prints when a SIGINT stops it and its script (bochs.debugger_script) runs on to quit,
    in the format of a real run's: each CPU's next instruction (cs, rip, instruction, in a nested guest), CPU 0's
    registers, each CPU's in_vmx_guest, CPU 0's stack words, and each CPU's next instruction again at quit."""
    at = [f"[0x00000e301348] {cs:04x}:{rip:016x} (unk. ctxt): {insn:<25} ; ebfe" for cs, rip, insn, _ in cpus]
    rip = cpus[0][1]
    regs = "".join(f"{r}: 00000000_00000000\n" for r in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi",
                                                        "r8 ", "r9 ", "r10", "r11", "r12", "r13", "r14", "r15"))
    shows = "".join(f"show param name: <cpu{n}.VMX.in_vmx_guest>\nin_vmx_guest = {str(cpu[3]).lower()}\n"
                    for n, cpu in enumerate(cpus))
    words = "".join(f" | STACK 0x{0xFFFFC90000A1BD40 + 8 * i:016x} [0x{w >> 32:08x}:0x{w & 0xFFFFFFFF:08x}] "
                    "(<unknown>)\n" for i, w in enumerate(stack))
    return ("Next at t=21797050314\n" + "".join(f"({n}) {line}\n" for n, line in enumerate(at)) +
            f"CPU0:\n{regs}rip: {rip >> 32:08x}_{rip & 0xFFFFFFFF:08x}\n"
            "eflags 0x00000002: id vip vif ac vm rf nt IOPL=0 of df if tf sf zf af pf cf\n"
            f"{shows}Stack address size 8\n{words}" +
            "".join(f"({n}).[21797050314] {line}\n" for n, line in enumerate(at)))


def test_stop_report_names_the_nested_guest_first_and_keeps_the_addresses(tmp_path: Path) -> None:
    """Two CPUs: one in a kernel function, one in a nested guest. The nested guest is what never returned; each
    CPU's address stays in the log, and a stack that is the nested guest's is not named."""
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    names = symbols.Symbolizer(tmp_path / "System.map", {})
    halted = (0x10, TEXT + 0x1003, "hlt", False)
    both = debugger_stop([halted, (0x8, 0x101348, "jmp .-2  (0x00101348)", True)], [TEXT + 0x1041, 0x1234])
    kernel = debugger_stop([halted], [])
    where, log = bochs.stop_report(("tests/test_x.py ." + both).splitlines(), BASES, names.name)
    assert where == bochs.NESTED
    assert log[1:4] == ["CPU 0 at 0010:ffffffff9a001003 in native_safe_halt+0x3/0x40: hlt",
                        "CPU 1 at 0008:0000000000101348 in a nested guest (VMX non-root): jmp .-2  (0x00101348)",
                        "  ? default_idle+0x1/0xfc0"]
    assert log[4:6] == ["Bochs's debugger:", "Next at t=21797050314"], "without pytest's progress before it"
    where, log = bochs.stop_report(kernel.splitlines(), BASES, names.name)
    assert where == "native_safe_halt"
    where, log = bochs.stop_report(kernel.splitlines(), {}, names.name)
    assert where is None and log[1] == "CPU 0 at 0010:ffffffff9a001003 in the kernel: hlt", "no bases: no name"


def test_a_bochs_that_says_nothing_leaves_the_hang_unnamed() -> None:
    """Past the deadline the monitor asks for the stop; Bochs ends without a debugger report: the title says no
    stack came, the log says Bochs did not say where."""
    monitor = Monitor(1, 1, 0, can_nmi=True, answer=lambda lines, bases: bochs.stop_report(lines, bases,
                                                                                            lambda a, b: None))
    monitor.line(f"{stream.MARK} {stream.TEST_START} 1.0 "
                 f"{stream.encode({'nodeid': 't::x', 'catalog': [], 'groups': []})}", 0.0)
    assert monitor.tick(0.5) is None and monitor.tick(1.5) == "nmi" and monitor.tick(2.0) is None
    monitor.line("Bochs is exiting", 2.1)
    monitor.finish(False, 2.2)
    [found] = monitor.crashes
    assert (found.report.title, found.nodeid) == ("hang with no kernel stack", "t::x")
    assert found.report.lines[1:] == ["Bochs did not say where the guest was (no debugger stop in its output)",
                                      "Bochs's debugger:", "Bochs is exiting"]
