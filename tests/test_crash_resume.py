"""Crash survival of `kvmtests qualify` without a kernel: a stand-in emulator plays a guest whose kernel panics,
oopses, locks up, warns, goes silent or freezes (a stand-in Bochs then answers SIGINT as its debugger does) at a
chosen test or probe, and the results, titles and resumes that qualify leaves are checked.

The stand-in is this module run as the emulator: it reads the command line and initramfs qualify built, as the
real guest would (the suite's command and environment from /init, the resume state through KVMTESTS_RESUME,
the test-only hooks from the kernel command line), and prints what /init, the suite's plugin and the kernel
print on the serial console."""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

import test_crash
from kvmtests.runner import bochs, initramfs, monitor, qemu, qualify, rootfs, shards
from kvmtests.verdict import crash, features, report, stream
from kvmtests.verdict.junit import junit
from test_bochs import BASES, KVM_INTEL, SYSTEM_MAP, TEXT, debugger_stop, encoded, module_object, tools
from test_qualify import RELEASE, elf, make_image, read_cpio, run_cli

pytestmark = pytest.mark.selftest

# The guest's selection in run order: node id and catalog numbers (the plugin finds the groups from these).
TESTS = [
    ("tests/test_layout.py::test_struct_sizes", [2]),
    ("tests/test_lifecycle.py::test_create_destroy", [4]),
    ("tests/test_hv_hcalls.py::test_xmm_output[get_vp_registers]", [97]),
    ("tests/test_hv_hcalls.py::test_xmm_output[translate_va]", [98]),
    ("tests/test_mem_attributes.py::test_set_rwx[r]", [16]),
    ("tests/test_mem_attributes.py::test_set_rwx[rw]", [17]),
    ("tests/test_mp_state.py::test_inactive_vtl[set]", [123]),
    ("tests/test_mp_state.py::test_inactive_vtl[get]", [124]),
]
NODEIDS = [nodeid for nodeid, _ in TESTS]
LAYOUT, LIFECYCLE, XMM_GET, XMM_TVA, RWX_R, RWX_RW, MP_SET, MP_GET = NODEIDS
PRESENT = ("xmm_output", "rwx_attributes", "mp_inactive_vtl")
HOST = {"kernel": RELEASE, "cpu vendor": "AuthenticAMD", "environment": "QEMU tcg (kvmtests qualify)"}
WARN_FAILURE = ("kernel health / resource check failed:\nkernel taint grew by 0x200 (W)\n"
                "kernel log: WARNING: CPU: 0 PID: 245 at arch/x86/kvm/hyperv.c:2134 kvm_hv_set_vtl+0x61/0x90 [kvm]")
# What the guest's watchdog prints for an overdue test: the suite's threads as /proc/PID/stack has them, the
# vCPU thread stuck in D state second (the runner titles the hang from it all the same).
HANG_STACKS = """\
task python3 tid 246 state S
  futex_wait_queue+0x60/0x90
  futex_wait+0x185/0x270
  __x64_sys_futex+0x8e/0x1d0
  do_syscall_64+0x82/0x190
  entry_SYSCALL_64_after_hwframe+0x76/0x7e
task python3 tid 245 state D
  kvm_vcpu_block+0x3e/0x80 [kvm]
  kvm_vcpu_halt+0x7e/0x3c0 [kvm]
""" + "".join(f"  {line.strip()}\n" for line in test_crash.VCPU_RUN.splitlines() if "+0x" in line)
# A guest that freezes (no watchdog, no kernel) -> what Bochs's debugger says once interrupted: the suite's vCPU
# spinning in its nested guest (as kvmtests.freeze_at leaves it), or the kernel spinning in kvm_intel or in its own
# code (named from the test's System.map and module), or somewhere nothing names.
STOPS = {
    "freeze": debugger_stop([(0x0008, 0x101348, "jmp .-2  (0x00101348)", True)], [0, 0]),
    "freeze-kvm": debugger_stop([(0x0010, BASES["kvm_intel:.text"] + 0x12, "pause", False)],
                                [BASES["kvm_intel:.text"] + 0x51, 0xFFFFC90000A1BDA8, TEXT + 0x1041]),
    "freeze-kernel": debugger_stop([(0x0010, TEXT + 0x1003, "jmp .-2  (0xffffffff9a001003)", False)], []),
    "freeze-nowhere": debugger_stop([(0x0010, TEXT + 0x3000, "jmp .-2  (0xffffffff9a003000)", False)], []),
}
# A fault's kind -> what the kernel prints; a hang, a silent guest and a test process that dies print nothing
KERNEL = {"panic": test_crash.SYSRQ_PANIC, "oops": test_crash.NULL_DEREF, "oops-panic": test_crash.OOPS_THEN_PANIC,
          "lockup": test_crash.SOFT_LOCKUP, "warn": test_crash.warning(""), "boot-panic": test_crash.INIT_KILLED}


# --- the stand-in guest (runs in the emulator's process) -----------------------------------------------------------

def qemu_media(argv: list[str]) -> tuple[bytes, str]:
    """The initramfs and the kernel command line from QEMU's arguments."""
    return gzip.decompress(Path(argv[argv.index("-initrd") + 1]).read_bytes()), argv[argv.index("-append") + 1]


def bochs_media(argv: list[str]) -> tuple[bytes, str]:
    """The initramfs and the kernel command line from the CD image the bochsrc names (the test's make_iso puts
    the initramfs itself there, and isolinux.cfg beside it)."""
    iso = Path(re.search(r"type=cdrom, path=([^,]+),", Path(argv[argv.index("-f") + 1]).read_text())[1])
    return iso.read_bytes(), re.search(r"APPEND (.*)", iso.with_name("isolinux.cfg").read_text())[1]


def suite_line(init: str) -> tuple[dict[str, str], list[str]]:
    """The suite's environment and pytest command, from the line of /init that starts it."""
    words = shlex.split(next(line for line in init.splitlines() if line.startswith("env -i ")))
    env = dict(w.split("=", 1) for w in itertools.takewhile(lambda w: "=" in w, words[2:]))
    return env, shlex.split(words[words.index("-c") + 1].split(" && exec ", 1)[1])


def option(command: list[str], name: str) -> str:
    """The value of a --name=value option of the suite's command."""
    return next(w.split("=", 1)[1] for w in command if w.startswith(f"{name}="))


def stand_in_probe(group: str) -> features.Detection:
    """The guest's detection without a KVM: the three groups the tests use are there."""
    return features.Detection(group, features.PRESENT if group in PRESENT else features.ABSENT, "stand-in guest")


class Guest:
    """One boot of the guest: /init, the suite with its plugin's events, and a kernel that fails where planned."""

    def __init__(self, config: Path, argv: list[str]):
        self.faults = json.loads(config.read_text())
        fd = os.open(config.with_name("boots"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, b"x")   # one byte a boot, appended at once: shards boot stand-ins side by side
        self.boot = os.lseek(fd, 0, os.SEEK_CUR)
        os.close(fd)
        self.bochs = "-f" in argv
        initrd, self.cmdline = bochs_media(argv) if self.bochs else qemu_media(argv)
        files = {name: data for name, (mode, data, _) in read_cpio(initrd).items() if stat.S_ISREG(mode)}
        env, command = suite_line(files["init"].decode())
        # QEMU shares the results directory at its host path; Bochs's guest has only its initramfs.
        self.root = config.with_name(f"guest-root-{self.boot}") if self.bochs else Path("/")
        for name, data in files.items():
            if name.startswith(str(qualify.GUEST_RESULTS).lstrip("/")):
                self.path(name).parent.mkdir(parents=True, exist_ok=True)
                self.path(name).write_bytes(data)
        resume = self.path(env[stream.RESUME_ENV])
        self.resume = json.loads(resume.read_text()) if resume.exists() else {}
        self.results = self.path(option(command, "--kvmtests-json")).parent
        self.test_timeout = float(env[stream.TEST_TIMEOUT_ENV])
        self.uptime = 0.5
        self.file = ""

    def path(self, guest_path: str) -> Path:
        """Where a path of the guest's is on the host."""
        return self.root / guest_path.lstrip("/")

    def write(self, text: str) -> None:
        """Console output at once: the runner may kill the emulator at any moment."""
        sys.stdout.write(text)
        sys.stdout.flush()

    def event(self, name: str, payload: str = "") -> None:
        """A line of /init's or of the plugin's: mark, name, uptime, payload."""
        self.uptime += 0.01
        self.write(f"{stream.MARK} {name} {self.uptime:.2f} {payload}".rstrip() + "\n")

    def kernel(self, text: str) -> None:
        """Kernel lines with printk time stamps."""
        for line in text.splitlines():
            self.uptime += 0.000113
            self.write(f"[{self.uptime:12.6f}] {line}\n")

    def fault(self, at: str) -> str | None:
        """What goes wrong at a test, a probe or the boot: a planned fault, or a test-only hook of the command line."""
        for fault in self.faults:
            if fault["at"] == at and fault.get("boot", self.boot) == self.boot:
                return fault["kind"]
        hook = stream.cmdline_hook(at, self.cmdline)
        return {"crash": "panic", "hang": "hang", "freeze": "freeze"}[hook] if hook else None

    def run(self) -> NoReturn:
        """Boot, run what earlier boots left, as the plugin does in a resumed guest, and end as /init does."""
        self.kernel(f"Linux version {RELEASE} (builder@example) #1 SMP PREEMPT_DYNAMIC\nRun /init as init process")
        self.event(stream.TEXT_BASES, ",".join(f"{k}={v:#x}" for k, v in BASES.items()))
        kind = self.fault("boot")
        if kind:
            self.crash(kind)
        self.event("suite-start")
        shard = self.resume.get("shard")
        todo = [(nodeid, catalog) for nodeid, catalog in TESTS if nodeid not in self.resume.get("done", [])
                and (not shard or stream.shard_of(nodeid, shard) == shard["index"])]
        self.event(stream.SESSION, stream.encode({"host": HOST}))
        self.event(stream.COLLECTED, stream.encode([nodeid for nodeid, _ in todo]))
        features.crashed_probes(self.resume.get("crashed_probes", {}))
        features._probe = stand_in_probe      # the real probes need a KVM; detect() itself runs as in the guest
        detections = {group: self.probe(group) for group in features.GROUPS}
        entries = [self.test(nodeid, catalog) for nodeid, catalog in todo]
        rc = int(any(e["outcome"] == "failed" for e in entries))
        self.finish(rc, report.build(HOST, detections, [], [], entries, rc))

    def probe(self, group: str) -> features.Detection:
        """One group's detection, announced before and reported after, as the plugin runs it first."""
        self.event(stream.PROBE_START, group)
        kind = self.fault(f"probe:{group}")
        if kind:
            self.crash(kind)
        det = features.detect(group)
        self.event(stream.PROBE_END, stream.encode({"group": group, "state": det.state, "how": det.how}))
        return det

    def test(self, nodeid: str, catalog: list[int]) -> dict:
        """One test as the plugin reports it: blocked on a crashed path, failed by a WARN, else passed."""
        groups = features.groups_of(catalog)
        self.event(stream.TEST_START, stream.encode({"nodeid": nodeid, "catalog": catalog, "groups": groups}))
        path = nodeid.split("::")[0]
        if path != self.file:
            self.file = path
            self.write(f"{path} ")     # pytest's progress line: events and the kernel's lines go on after it
        crashed = self.resume.get("crashed_groups", {})
        hit = [g for g in groups if g in crashed]
        outcome, message = ("blocked", f"{stream.BLOCKED}{crashed[hit[0]]}") if hit else ("passed", "")
        kind = self.fault(nodeid)
        if kind:
            self.crash(kind)
            outcome, message = "failed", WARN_FAILURE
        self.write({"passed": ".", "failed": "F", "blocked": "s"}[outcome])
        entry = {"nodeid": nodeid, "outcome": outcome, "message": message, "catalog": catalog, "groups": groups,
                 "duration": 0.01}
        self.event(stream.TEST_END, stream.encode(entry))
        return entry

    def crash(self, kind: str) -> None:
        """The kernel fails; only after a WARN does the suite go on."""
        self.kernel(KERNEL.get(kind, ""))
        if kind in ("panic", "oops-panic", "boot-panic"):
            self.reboot()
        elif kind in ("oops", "segfault"):
            self.finish(137 if kind == "oops" else 139, None)   # the test's process is gone: pytest wrote no results
        elif kind.startswith("freeze") and self.bochs:
            self.frozen(kind)
        elif kind.startswith(("hang", "freeze")):       # elsewhere a freeze is a hang: the kernel still schedules
            time.sleep(self.test_timeout + 0.2)
            self.event(stream.HANG_STACKS)
            self.write(HANG_STACKS)
            self.event(stream.HANG_STACKS_END)
            self.silence()
        elif kind == "nmi":
            self.await_nmi()
            self.kernel(test_crash.NMI_PANIC)
            self.reboot()
        elif kind != "warn":
            self.silence()

    def frozen(self, kind: str) -> NoReturn:
        """The whole guest stops (no watchdog, no kernel) until the runner interrupts Bochs: its debugger says where
        the CPU was and quits."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        if signal.sigtimedwait({signal.SIGINT}, 60) is None:
            sys.exit(3)
        self.write(STOPS[kind])
        sys.exit(0)

    def reboot(self) -> NoReturn:
        """panic=-1 reboots at once: QEMU (-no-reboot) exits, Bochs starts the machine again."""
        if not self.bochs:
            sys.exit(0)
        self.write("Booting from CD-Rom...\nISOLINUX 6.04\n")
        self.silence()

    def silence(self) -> NoReturn:
        """A guest that prints nothing more, until the runner stops it."""
        time.sleep(60)
        sys.exit(0)

    def await_nmi(self) -> None:
        """Wait for the runner's NMI (QEMU's monitor command on stdin)."""
        seen = b""
        while b"nmi\n" not in seen:
            chunk = os.read(0, 64)
            if not chunk:
                self.silence()
            seen += chunk

    def finish(self, rc: int, doc: dict | None) -> NoReturn:
        """pytest's results if it lived to write them, then /init's end: the mark, rc, and under Bochs the
        results directory over the console."""
        self.results.mkdir(parents=True, exist_ok=True)
        if doc is not None:
            (self.results / "results.json").write_text(json.dumps(doc))
            (self.results / "junit.xml").write_text(junit(doc))
        self.event("suite-end", f"rc={rc}")
        (self.results / "rc").write_text(f"{rc}\n")
        if self.bochs:
            digest, body = encoded({p.name: p.read_bytes() for p in self.results.iterdir()})
            self.event("results-begin", digest)
            self.write("".join(f"{line}\n" for line in body))
            self.event("results-end")
        sys.exit(1 if self.bochs else 0)


# --- qualify with the stand-in ---------------------------------------------------------------------------------

@dataclass
class Qualified:
    """What one `kvmtests qualify` left: its exit code, what it printed, its results and how long it took."""

    code: int
    out: str
    results: Path
    elapsed: float

    @property
    def doc(self) -> dict:
        return report.load(self.results / "results.json")

    def outcomes(self) -> dict[str, str]:
        return {t["nodeid"]: t["outcome"] for t in self.doc["tests"]}

    def test(self, nodeid: str) -> dict:
        return next(t for t in self.doc["tests"] if t["nodeid"] == nodeid)


def stand_in(tmp_path: Path, name: str, faults: list[dict]) -> Path:
    """The stand-in emulator, an executable that plays the guest with these faults."""
    config = tmp_path / "faults.json"
    config.write_text(json.dumps(faults))
    fake = tmp_path / name
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    f"import pathlib, test_crash_resume\n"
                    f"test_crash_resume.Guest(pathlib.Path({str(config)!r}), sys.argv[1:]).run()\n")
    fake.chmod(0o755)
    return fake


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Waits of a second or two (long enough for a stand-in on a busy machine), a busybox never run, and the host
    collecting the stand-in's tests."""
    monkeypatch.setattr(shards, "collect", lambda command, cwd, bytecode=None: list(NODEIDS))
    monkeypatch.setattr(monitor, "TRAILER", 1.0)
    monkeypatch.setattr(monitor, "AFTER_NMI", 2.0)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf())
    monkeypatch.setattr(initramfs, "BUSYBOX", busybox)


Run = Callable[..., Qualified]


def qualified(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> Qualified:
    """`kvmtests qualify` of a fake image with these arguments, timed."""
    results = tmp_path / "out"
    start = time.monotonic()
    code = run_cli(["--kernel", str(make_image(tmp_path)), "--results", str(results), "--timeout", "60", *argv])
    return Qualified(code, capsys.readouterr().out, results, time.monotonic() - start)


@pytest.fixture
def under_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quick: None) -> Run:
    """qualify under the stand-in QEMU: faults, then more qualify arguments."""
    def run(faults: list[dict], *argv: str) -> Qualified:
        monkeypatch.setattr(qemu, "find_qemu", lambda: str(stand_in(tmp_path, "qemu", faults)))
        return qualified(tmp_path, capsys, ["--accel", "tcg", *argv])
    return run


@pytest.fixture
def initrds() -> list[bytes]:
    """The initramfs of each boot under the stand-in Bochs."""
    return []


@pytest.fixture
def under_bochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quick: None,
                initrds: list[bytes]) -> Run:
    """qualify --cpu intel under the stand-in Bochs, whose CD image is the initramfs itself."""
    def make_iso(out: Path, _kernel: Path, initrd: Path, append: str, _tools: bochs.BochsTools) -> None:
        initrds.append(initrd.read_bytes())
        out.with_name("isolinux.cfg").write_text(bochs.isolinux_config(append))
        shutil.copy(initrd, out)

    def run(faults: list[dict], *argv: str) -> Qualified:
        fake = stand_in(tmp_path, "bochs-bin", faults)
        monkeypatch.setattr(bochs, "find_tools", lambda: bochs.BochsTools(str(fake), "xorriso", tools(tmp_path).files))
        return qualified(tmp_path, capsys, ["--cpu", "intel", *argv])

    monkeypatch.setattr(bochs, "make_iso", make_iso)
    monkeypatch.setattr(rootfs, "collect", lambda project: [rootfs.HostFile("etc/kvmtests", Path(__file__), False)])
    monkeypatch.setattr(rootfs, "bytecode", lambda project, out: [])
    return run


# --- checks ------------------------------------------------------------------------------------------------------

def check_each_test_once(run: Qualified, nodeids: list[str] = NODEIDS) -> None:
    """Every boot's verdicts merged: each of these tests exactly once, no other."""
    got = [t["nodeid"] for t in run.doc["tests"]]
    assert sorted(got) == sorted(nodeids) and len(set(got)) == len(got)


def check_junit(run: Qualified, failures: int, skipped: int) -> ET.Element:
    """The run's JUnit file parses and counts every test, crashes among the failures, blocked ones as skipped."""
    suite = ET.parse(run.results / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped"), suite.get("errors")) == (
        str(len(run.doc["tests"])), str(failures), str(skipped), "0")
    return suite


def check_crash(run: Qualified, culprit: str, kind: str, title: str, boot: int = 1) -> None:
    """The culprit is crashed with the report's title, kind and lines, and is the run's crash of that boot."""
    test = run.test(culprit)
    assert (test["outcome"], test["message"], test["crash"]) == ("crashed", title, {"title": title, "kind": kind,
                                                                                    "boot": boot})
    found = next(c for c in run.doc["crashes"] if c["during"] == culprit)
    assert (found["title"], found["kind"], found["boot"], found["fatal"]) == (title, kind, boot, kind in crash.FATAL)
    assert found["groups"] == test["groups"] and found["log"] == test["log"]
    assert f"CRASH during {culprit} (boot {boot}, {kind}{', fatal' * (kind in crash.FATAL)}): {title}" in run.out


def check_resumed(run: Qualified, culprit: str, kind: str, title: str, blocked: list[str], group: str) -> None:
    """One crash, one more boot: the culprit crashed, the rest of its group blocked, every other test passed."""
    assert run.code == 1 and (run.results / "rc").read_text() == "1\n"
    check_each_test_once(run)
    check_crash(run, culprit, kind, title)
    assert run.outcomes() == {n: "crashed" if n == culprit else "blocked" if n in blocked else "passed"
                              for n in NODEIDS}
    for nodeid in blocked:
        assert run.test(nodeid)["blocked_by"] == f"the kernel crashed on the path of {group} ({culprit}: {title})"
    doc = run.doc
    assert (doc["boots"], doc["incomplete"], len(doc["crashes"])) == (2, "", 1)
    suite = check_junit(run, failures=1, skipped=len(blocked))
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["boots"] == "2"
    assert "\nboots: 2\n" in run.out and f"qualify: 2 boots; crashed: {culprit}: {title}" in run.out
    assert "qualify: boot 2: resuming after a crash," in run.out and f"; {title} ({culprit})\n" in run.out
    assert (run.results / "console.log").read_text().count("Linux version") == 2, "both boots' consoles"


# --- QEMU ----------------------------------------------------------------------------------------------------------

def test_a_run_without_a_crash_is_one_boot(under_qemu: Run) -> None:
    """The stand-in's baseline: every test passed, the guest's own JUnit file, no resume state."""
    run = under_qemu([])
    assert run.code == 0 and set(run.outcomes().values()) == {"passed"}
    check_each_test_once(run)
    assert (run.doc["boots"], run.doc["crashes"], run.doc["incomplete"]) == (1, [], "")
    check_junit(run, failures=0, skipped=0)
    assert json.loads((run.results / qualify.RESUME_FILE).read_text()) == {"shard": qualify.whole_plan(NODEIDS)}, \
        "the one boot's resume file holds the host's plan alone"
    assert "boots" not in run.out and "CRASH" not in run.out


@pytest.mark.parametrize("faults, argv, report_name", [
    pytest.param([], ["--append", f"{stream.CRASH_AT}={RWX_R}"], "sysrq panic", id="panic"),
    pytest.param([{"at": RWX_R, "kind": "oops"}], [], "NULL pointer dereference", id="oops"),
    pytest.param([{"at": RWX_R, "kind": "oops-panic"}], [], "panic after an oops", id="oops-panic"),
    pytest.param([{"at": RWX_R, "kind": "lockup"}], [], "soft lockup in a spinlock", id="lockup"),
])
def test_a_crash_costs_one_boot_and_blocks_its_group(under_qemu: Run, faults: list[dict], argv: list[str],
                                                     report_name: str) -> None:
    """The test that crashed the kernel is crashed, the rest of its group blocked, and the run resumes after it."""
    text, kind, title = test_crash.REPORTS[report_name]
    run = under_qemu(faults, *argv)
    check_resumed(run, RWX_R, kind, title, [RWX_RW], "rwx_attributes")
    assert run.test(RWX_R)["log"] == crash.scan(text.splitlines())[0].lines, "the whole report, no time stamps"
    assert json.loads((run.results / qualify.RESUME_FILE).read_text())["done"] == sorted(NODEIDS[:5])


def test_a_test_process_that_dies_without_a_kernel_report_is_crashed(under_qemu: Run) -> None:
    """The suite's process ends in the middle of a test with no kernel report: that test is crashed all the same."""
    title = "the test process died (exit status 139) with no kernel report"
    run = under_qemu([{"at": MP_SET, "kind": "segfault"}])
    check_resumed(run, MP_SET, crash.KILLED, title, [MP_GET], "mp_inactive_vtl")


def test_a_warning_lets_the_run_go_on(under_qemu: Run) -> None:
    """A WARN taints the kernel but ends nothing: one boot, the test crashed with the warning, the rest passed."""
    _, kind, title = test_crash.REPORTS["WARN_ON"]
    run = under_qemu([{"at": RWX_R, "kind": "warn"}])
    assert run.code == 1
    check_each_test_once(run)
    check_crash(run, RWX_R, kind, title)
    assert run.outcomes() == {n: "crashed" if n == RWX_R else "passed" for n in NODEIDS}
    assert (run.doc["boots"], len(run.doc["crashes"])) == (1, 1) and "boots" not in run.out
    check_junit(run, failures=1, skipped=0)


@pytest.mark.parametrize("hook", [stream.HANG_AT, stream.FREEZE_AT])
def test_a_hang_ends_at_the_test_deadline_with_the_guests_stacks(under_qemu: Run, hook: str) -> None:
    """The guest's watchdog prints the overdue test's stacks; the stuck task's titles the hang; the run resumes.
    Under QEMU the freeze hook is a hang too: its guest kernel still schedules."""
    timeout = 1.0
    run = under_qemu([], "--test-timeout", f"{timeout:g}", "--append", f"{hook}={MP_SET}")
    check_resumed(run, MP_SET, crash.HANG, "hang in kvm_vcpu_block", [MP_GET], "mp_inactive_vtl")
    log = run.test(MP_SET)["log"]
    assert log[0].startswith("no progress for ") and log[1] == "task python3 tid 245 state D"
    assert run.elapsed < timeout + 10, "one boot more and the deadline, not the host's deadline and grace"


@pytest.mark.parametrize("kind, title", [
    ("silent", "hang with no kernel stack"),
    ("nmi", "hang in svm_vcpu_run"),
], ids=["silent", "nmi"])
def test_a_silent_hang_ends_at_the_hosts_deadline(under_qemu: Run, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                  title: str) -> None:
    """No stacks from the guest: past the deadline and grace the host sends an NMI; a kernel that answers it
    titles the hang from the stack it interrupted, one that does not is ended after AFTER_NMI."""
    monkeypatch.setattr(qualify, "STACKS_GRACE", {"QEMU": 0.5, "Bochs": 0.5})
    run = under_qemu([{"at": XMM_GET, "kind": kind}], "--test-timeout", "1")
    assert re.fullmatch(title, run.test(XMM_GET)["message"])
    check_resumed(run, XMM_GET, crash.HANG, run.test(XMM_GET)["message"], [XMM_TVA], "xmm_output")
    assert run.elapsed < 1 + 0.5 + monitor.AFTER_NMI + 10


def test_a_crash_in_a_probe_blocks_its_group(under_qemu: Run) -> None:
    """A detection probe that crashes the kernel: its group is crashed and never probed again, its rows blocked."""
    _, kind, title = test_crash.REPORTS["NULL pointer dereference"]
    run = under_qemu([{"at": "probe:xmm_output", "kind": "oops", "boot": 1}])
    assert run.code == 1
    check_each_test_once(run)
    blocked = [XMM_GET, XMM_TVA]
    assert run.outcomes() == {n: "blocked" if n in blocked else "passed" for n in NODEIDS}
    for nodeid in blocked:
        assert run.test(nodeid)["blocked_by"] == (f"the kernel crashed on the path of xmm_output "
                                                  f"(detection of xmm_output: {title})")
    assert run.doc["features"]["xmm_output"] == {
        "state": features.CRASHED, "how": f"its detection probe crashed the kernel on an earlier boot: {title}"}
    assert [(c["during"], c["kind"], c["title"], c["groups"]) for c in run.doc["crashes"]] == [
        ("detection of xmm_output", kind, title, ["xmm_output"])]
    assert run.doc["boots"] == 2 and f"CRASH during detection of xmm_output (boot 1, {kind}, fatal): {title}" in run.out
    assert json.loads((run.results / qualify.RESUME_FILE).read_text()) == {
        "done": [], "crashed_groups": {"xmm_output": run.test(XMM_GET)["blocked_by"]},
        "crashed_probes": {"xmm_output": title}, "shard": qualify.whole_plan(NODEIDS)}
    check_junit(run, failures=0, skipped=2)


def test_more_crashes_than_max_resumes_end_the_run_incomplete(under_qemu: Run) -> None:
    """A crash on every boot: after --max-resumes the cell ends with what it has, and says what did not run."""
    panic, oops = test_crash.REPORTS["sysrq panic"][2], test_crash.REPORTS["NULL pointer dereference"][2]
    run = under_qemu([{"at": XMM_GET, "kind": "panic", "boot": 1}, {"at": RWX_R, "kind": "oops", "boot": 2}],
                     "--max-resumes", "1")
    assert run.code == qualify.EXIT_NO_VERDICT and (run.results / "rc").read_text() == f"{qualify.EXIT_NO_VERDICT}\n"
    why = "the kernel crashed on 2 boots, and --max-resumes 1 allows no more; 3 selected tests did not run"
    assert (run.doc["boots"], run.doc["incomplete"]) == (2, why)
    check_each_test_once(run, NODEIDS[:5])
    assert run.outcomes() == {LAYOUT: "passed", LIFECYCLE: "passed", XMM_GET: "crashed", XMM_TVA: "blocked",
                              RWX_R: "crashed"}
    check_crash(run, XMM_GET, crash.PANIC, panic)
    check_crash(run, RWX_R, crash.OOPS, oops, boot=2)
    assert f"INCOMPLETE: {why}" in run.out
    assert f"qualify: 2 boots; crashed: {XMM_GET}: {panic}; crashed: {RWX_R}: {oops}; INCOMPLETE: {why}" in run.out
    suite = check_junit(run, failures=2, skipped=1)
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["incomplete"] == why


def test_a_resumed_boot_that_never_reaches_the_suite_ends_the_run(under_qemu: Run) -> None:
    """The kernel dies on its way to the suite after a crash: the cell ends incomplete, with both crashes."""
    run = under_qemu([{"at": XMM_GET, "kind": "panic", "boot": 1}, {"at": "boot", "kind": "boot-panic", "boot": 2}])
    assert run.code == qualify.EXIT_NO_VERDICT
    why = "the kernel did not reach the test runner on boot 2, after a crash; 5 selected tests did not run"
    assert (run.doc["boots"], run.doc["incomplete"]) == (2, why)
    check_each_test_once(run, NODEIDS[:3])
    _, kind, title = test_crash.REPORTS["init killed"]
    assert [(c["during"], c["boot"], c["kind"], c["title"]) for c in run.doc["crashes"]][1:] == [
        ("boot", 2, kind, title)]
    assert f"CRASH during boot (boot 2, {kind}, fatal): {title}" in run.out and f"INCOMPLETE: {why}" in run.out
    assert "qualify: boot 2: no suite;" in run.out


# --- Bochs ---------------------------------------------------------------------------------------------------------

def test_bochs_resumes_with_the_state_in_the_initramfs(under_bochs: Run, initrds: list[bytes]) -> None:
    """Bochs reboots a panicked kernel: qualify stops it at the panic's end, and the next boot's initramfs carries
    the resume state the guest reads (its results come back over the console)."""
    _, kind, title = test_crash.REPORTS["sysrq panic"]
    run = under_bochs([], "--append", f"{stream.CRASH_AT}={RWX_R}")
    check_resumed(run, RWX_R, kind, title, [RWX_RW], "rwx_attributes")
    assert len(initrds) == 2
    resume_file = str(qualify.GUEST_RESULTS / qualify.RESUME_FILE).lstrip("/")
    assert json.loads(read_cpio(initrds[0])[resume_file][1]) == {"shard": qualify.whole_plan(NODEIDS)}
    state = json.loads(read_cpio(initrds[1])[resume_file][1])
    assert state["done"] == sorted(NODEIDS[:5]) and set(state["crashed_groups"]) == {"rwx_attributes"}
    assert "results-begin" in (run.results / "console.log").read_text()


@pytest.mark.parametrize("kind, title, where", [
    ("freeze", f"hang in {bochs.NESTED}",
     "CPU 0 at 0008:0000000000101348 in a nested guest (VMX non-root): jmp .-2  (0x00101348)"),
    ("freeze-kvm", "hang in vmx_vcpu_run",
     "CPU 0 at 0010:ffffffffc0a00012 in vmx_vcpu_run+0x2/0x40 [kvm_intel]: pause"),
    ("freeze-kernel", "hang in native_safe_halt",
     "CPU 0 at 0010:ffffffff9a001003 in native_safe_halt+0x3/0x40: jmp .-2  (0xffffffff9a001003)"),
    ("freeze-nowhere", "hang with no kernel stack",
     "CPU 0 at 0010:ffffffff9a003000 in the kernel: jmp .-2  (0xffffffff9a003000)"),
], ids=["nested", "module", "kernel", "unnamed"])
def test_bochs_says_where_a_frozen_guest_was(under_bochs: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             kind: str, title: str, where: str) -> None:
    """A guest whose kernel cannot even print its stacks (under Bochs, the freeze hook's vCPU spinning in its nested
    guest with interrupts off stops it all): past the deadline the runner interrupts Bochs, whose debugger says where
    the CPU was, and quits. The hang is titled from that: the nested guest, or the function the RIP is in (the
    kernel's System.map, the module's symbols, moved to the bases /init reported), no numbers; the log keeps them."""
    monkeypatch.setattr(qualify, "STACKS_GRACE", {"QEMU": 0.5, "Bochs": 0.5})
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / f"System.map-{RELEASE}").write_text(SYSTEM_MAP)
    kvm = tmp_path / "lib" / "modules" / RELEASE / "kernel" / "arch" / "x86" / "kvm"
    kvm.mkdir(parents=True)
    (kvm / "kvm.ko").write_bytes(module_object("kvm", "", {".text": [("kvm_vcpu_ioctl", 0, 0x100)]}))
    (kvm / "kvm-intel.ko.xz").write_bytes(lzma.compress(module_object("kvm_intel", "kvm", KVM_INTEL)))
    hook = ["--append", f"{stream.FREEZE_AT}={XMM_GET}"] if kind == "freeze" else []
    run = under_bochs([] if hook else [{"at": XMM_GET, "kind": kind}], "--test-timeout", "1", *hook)
    check_resumed(run, XMM_GET, crash.HANG, title, [XMM_TVA], "xmm_output")
    log = run.test(XMM_GET)["log"]
    assert re.fullmatch(r"no progress for \d+ s in .*; no kernel stack came", log[0])
    assert log[1:3] == ["the guest did not answer; Bochs's debugger stopped it (SIGINT):", where]
    frames = ["  ? handle_ept_violation.cold+0x1/0x20 [kvm_intel]", "  ? default_idle+0x1/0xfc0"]
    assert log[3:5] == (frames if kind == "freeze-kvm" else ["Bochs's debugger:", "Next at t=21797050314"])
    assert f"in_vmx_guest = {str(kind == 'freeze').lower()}" in log and log[-1].startswith("(0).[21797050314] ")
