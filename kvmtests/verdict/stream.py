"""The guest's side of crash survival under `kvmtests qualify`: every verdict sent to the host as it is reached,
which test or probe is running, the per-test deadline /init watches, and what a resumed boot must not run again.

Each event is one console line, `@@kvmtests@@ EVENT UPTIME PAYLOAD`, written to the serial console and drained
(tcdrain) before the test goes on, so that a kernel that dies next cannot cut it off."""
from __future__ import annotations

import base64
import json
import os
import termios
import zlib
from pathlib import Path

MARK = "@@kvmtests@@"
SESSION, COLLECTED, PROBE_START, PROBE_END, TEST_START, TEST_END = (
    "session", "collected", "probe-start", "probe-end", "test-start", "test-end")
HANG_STACKS, HANG_STACKS_END = "hang-stacks", "hang-stacks-end"
RESUME_ENV = "KVMTESTS_RESUME"             # the resume file a rebooted guest reads
DEADLINE_ENV = "KVMTESTS_DEADLINE_FILE"    # where the running test's deadline (uptime, s) is for /init's watchdog
TEST_TIMEOUT_ENV = "KVMTESTS_TEST_TIMEOUT"
TEXT_BASES = "text-bases"   # /init: where the kernel's and KVM's code landed this boot (KASLR), to name a RIP
# Test-only hooks, read from the kernel command line and never set by default: crash, hang or freeze the guest
# kernel at the named test (node id), to check that the runner survives it.
CRASH_AT, HANG_AT, FREEZE_AT = "kvmtests.crash_at", "kvmtests.hang_at", "kvmtests.freeze_at"
HOOKS = {CRASH_AT: "crash", HANG_AT: "hang", FREEZE_AT: "freeze"}
BLOCKED = "blocked by a crash: "   # a skip with this message is the outcome "blocked"


def mark_words(line: str) -> list[str]:
    """The words of an event line from MARK on (pytest's progress letters may stand before it), else []."""
    at = line.find(MARK)
    return line[at:].split() if at >= 0 else []


def encode(obj: object) -> str:
    """A JSON value as one console word: compressed, base64, no spaces."""
    return base64.b64encode(zlib.compress(json.dumps(obj, separators=(",", ":")).encode())).decode()


def decode(word: str) -> object:
    """The JSON value of an encoded word; ValueError when the console damaged it."""
    try:
        return json.loads(zlib.decompress(base64.b64decode(word, validate=True)))
    except (zlib.error, ValueError) as e:
        raise ValueError(f"damaged record: {e}") from None


def uptime() -> str:
    try:
        return Path("/proc/uptime").read_text().split()[0]
    except OSError:
        return "0"


class Stream:
    """Writes events to the console device; a write that fails is dropped (the host still has the log)."""

    def __init__(self, path: str, test_timeout: float = 0.0, deadline_file: str = ""):
        self.fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        self.test_timeout = test_timeout
        self.deadline_file = deadline_file

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.clear_deadline()

    def event(self, name: str, payload: str = "") -> None:
        """One event line, drained to the wire before the caller goes on."""
        line = f"{MARK} {name} {uptime()} {payload}".rstrip() + "\n"
        try:
            os.write(self.fd, line.encode())
            termios.tcdrain(self.fd)
        except (OSError, termios.error):
            pass

    def set_deadline(self) -> None:
        """Tell /init's watchdog when the test that starts now is overdue (uptime in whole seconds)."""
        if self.deadline_file and self.test_timeout > 0:
            due = int(float(uptime()) + self.test_timeout)
            Path(self.deadline_file).write_text(f"{due}\n")

    def clear_deadline(self) -> None:
        if self.deadline_file:
            Path(self.deadline_file).unlink(missing_ok=True)


def text_bases(word: str) -> dict[str, int]:
    """The payload of /init's TEXT_BASES mark, `_text=ffffffff9a000000,kvm:.text=0xffffffffc0a00000,...`: where
    the kernel's text and each module's code section start this boot; a hidden (zero) address is left out."""
    bases = {}
    for item in word.split(","):
        key, _, value = item.partition("=")
        try:
            address = int(value, 16)
        except ValueError:
            continue
        if key and address:
            bases[key] = address
    return bases


def open_stream(path: str | None) -> Stream | None:
    """The console stream a qualify guest asked for with --kvmtests-stream, else None."""
    if not path:
        return None
    timeout = float(os.environ.get(TEST_TIMEOUT_ENV) or 0)
    return Stream(path, timeout, os.environ.get(DEADLINE_ENV, ""))


def load_resume() -> dict:
    """What earlier boots of this run left: node ids not to run again, and the crashed paths (empty: first boot)."""
    path = os.environ.get(RESUME_ENV)
    if not path or not Path(path).exists():
        return {}
    return json.loads(Path(path).read_text())


def shard_of(nodeid: str, plan: dict) -> int:
    """The shard (1..count) that runs a test: the host's plan names it, else its file's first planned test's
    shard, else the file's name decides; alike in every shard."""
    file = nodeid.split("::")[0]
    return plan["tests"].get(nodeid) or plan["files"].get(file) or zlib.crc32(file.encode()) % plan["count"] + 1


def shard_needs(file: str, plan: dict) -> bool:
    """Whether this shard (plan["index"]) runs any test of a test file, so that the others need not import it; no
    shard imports a file the host's collection found no selected test in (the suite's self-tests), unless the host
    could not collect at all (then the file's name decides)."""
    if not plan["files"]:
        return shard_of(file, plan) == plan["index"]
    return any(shard == plan["index"] for nodeid, shard in plan["tests"].items() if nodeid.split("::")[0] == file)


def cmdline_hook(nodeid: str, cmdline: str | None = None) -> str | None:
    """'crash', 'hang' or 'freeze' when the kernel command line names this test in a test-only hook."""
    if cmdline is None:
        try:
            cmdline = Path("/proc/cmdline").read_text()
        except OSError:
            return None
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if value == nodeid and key in HOOKS:
            return HOOKS[key]
    return None


def force(kind: str) -> None:
    """Carry out a test-only hook: crash the kernel through sysrq, or spin a vCPU in KVM_RUN with no watchdog,
    interruptible (hang: the guest's kernel still schedules) or not (freeze: under Bochs a nested guest spinning
    with RFLAGS.IF=0 stops the whole guest kernel, a Bochs VMX bug; elsewhere it is a hang)."""
    if kind == "crash":
        Path("/proc/sysrq-trigger").write_text("c")
        return
    from kvmtests import uapi
    from kvmtests.machine import guest
    from kvmtests.machine.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        m = guest.build_machine(vm, guest.load_payload("basic"), entry="spin")
        regs = m.vcpu.get_regs()
        if kind == "freeze":
            regs.rflags &= ~guest.RFLAGS_IF
        else:
            regs.rflags |= guest.RFLAGS_IF    # interruptible, so the guest's kernel still schedules (Bochs, spec 5)
        m.vcpu.set_regs(regs)
        uapi.ioctl(m.vcpu.fd, uapi.KVM_RUN)   # never returns: the runner's deadline must catch it
