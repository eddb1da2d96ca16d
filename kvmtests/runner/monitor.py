"""One boot's console, followed as it happens: the suite's events (what runs, each verdict), the kernel's
crash reports attributed to the test or probe that was running, and the per-test deadline.

It tells the console loop when to act: kill the emulator once a fatal report is complete (the kernel is
tainted, or gone; the run resumes on a fresh boot), or ask an emulator that can for a non-maskable interrupt
when a test is overdue and the guest's own watchdog gave no stacks (a CPU spinning with interrupts off). QEMU's
guest kernel answers it with a panic and the stack it interrupted; Bochs's debugger stops the guest, says where
it was and quits, and the emulator's answer (a function named from the text bases /init reported, or a nested
guest) titles the hang."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kvmtests.verdict import crash, stream
from kvmtests.verdict.stream import mark_words, text_bases

KILL, NMI = "kill", "nmi"
QUIET = 3.0          # s without a kernel line that closes a report that has no end marker
TRAILER = 2.0        # s of console kept after a fatal report before the emulator is stopped
AFTER_NMI = 30.0     # s to wait for the kernel's answer to a non-maskable interrupt
JUST_ENDED = 5.0     # s after a test's end within which a report is still that test's (its teardown's)
ANSWER_LINES = 400   # console lines kept after the NMI for an emulator's answer

# An emulator's answer to the NMI: from its console lines after it and the text bases of the boot, where the guest
# was (what the hang's title names: a function or a nested guest; None: not known) and the lines for its log.
Answer = Callable[[list[str], Mapping[str, int]], "tuple[str | None, list[str]]"]


@dataclass
class Crash:
    """A crash report and what it happened in."""

    report: crash.Report
    during: str                 # a node id, "detection of GROUP", "boot" or "between tests"
    boot: int
    nodeid: str | None = None   # the test it is counted against
    probe: str | None = None    # the group whose detection probe was running
    groups: list[str] = field(default_factory=list)
    catalog: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"title": self.report.title, "kind": self.report.kind, "during": self.during,
                "groups": self.groups, "boot": self.boot, "fatal": self.report.fatal, "log": self.report.lines}


@dataclass
class Running:
    """The test or probe the guest announced last, and when (host seconds since the boot began)."""

    nodeid: str | None
    probe: str | None
    info: dict
    since: float


class Monitor:
    """Reads one boot's console lines (line) and the clock (tick); holds what the suite reported."""

    def __init__(self, boot: int, test_timeout: float, grace: float, can_nmi: bool, answer: Answer | None = None):
        self.boot, self.test_timeout, self.grace, self.can_nmi = boot, test_timeout, grace, can_nmi
        self.answer = answer
        self.answer_lines: list[str] = []
        self.bases: dict[str, int] = {}
        self.scanner = crash.Scanner()
        self.started = False
        self.suite_rc: int | None = None
        self.host: dict | None = None
        self.collected: list[str] | None = None
        self.probes: dict[str, dict] = {}
        self.records: dict[str, dict] = {}
        self.crashes: list[Crash] = []
        self.running: Running | None = None
        self.last_ended: tuple[dict, float] | None = None
        self.stacks: list[str] | None = None
        self.last_line = 0.0
        self.kill_at: float | None = None
        self.nmi_at: float | None = None
        self.clock: list[tuple[float, float]] = []    # (host time, guest uptime) of the first and the last event

    # --- console lines ---------------------------------------------------------------------------------------

    def line(self, text: str, now: float) -> None:
        """Take one console line at host time now."""
        self.last_line = now
        if self.nmi_at is not None and self.answer is not None and len(self.answer_lines) < ANSWER_LINES:
            self.answer_lines.append(text)
        words = mark_words(text)
        if words:
            self._event(words[1:], now)
            return
        if self.stacks is not None:
            self.stacks.append(text)
            return
        if not crash.is_kernel_line(text):     # pytest's own lines may quote a title (a blocked row's skip reason)
            return
        for report in self.scanner.feed(text):
            self._report(report, now)
        if "---[ end Kernel panic" in text:
            self.kill_at = now      # the kernel is gone (and Bochs would reboot it)

    def _event(self, words: list[str], now: float) -> None:
        name, uptime, payload = (words + ["", "", ""])[:3]
        try:
            self.clock[1:] = [(now, float(uptime))]     # the first event stays first, the latest replaces the last
        except ValueError:
            pass
        try:
            if name == "suite-start":
                self.started = True
            elif name == "suite-end":
                self._suite_end(payload, now)
            elif name == stream.SESSION:
                self.host = stream.decode(payload)["host"]
            elif name == stream.COLLECTED:
                self.collected = stream.decode(payload)
            elif name == stream.TEXT_BASES:
                self.bases = text_bases(payload)
            elif name == stream.PROBE_START:
                self.running = Running(None, payload, {}, now)
            elif name == stream.PROBE_END:
                det = stream.decode(payload)
                self.probes[det["group"]] = {"state": det["state"], "how": det["how"]}
                self.running = None
            elif name == stream.TEST_START:
                info = stream.decode(payload)
                self.running = Running(info["nodeid"], None, info, now)
            elif name == stream.TEST_END:
                entry = stream.decode(payload)
                self.records[entry["nodeid"]] = entry
                self.last_ended, self.running = (entry, now), None
            elif name == stream.HANG_STACKS:
                self.stacks = []
            elif name == stream.HANG_STACKS_END and self.stacks is not None:
                self._hang(self.stacks, now)
                self.stacks = None
        except (ValueError, KeyError, TypeError):
            pass    # a record the console damaged: its test has no verdict yet, and a resumed boot runs it again

    def _suite_end(self, payload: str, now: float) -> None:
        """The suite's process ended: in the middle of a test, it died (or was killed by an oops)."""
        rc = payload.removeprefix("rc=")
        self.suite_rc = int(rc) if rc.isdigit() else None
        if self.running is not None and not self._fatal_for_running():
            what = f"exit status {self.suite_rc}" if self.suite_rc is not None else "no exit status"
            self._report(crash.Report(crash.KILLED, f"the test process died ({what}) with no kernel report",
                                      [f"the suite's process ended ({what}) while this ran"]), now)
        self.running = None

    def _fatal_for_running(self) -> bool:
        running = self.running
        return running is not None and any(
            c.report.fatal and (c.nodeid, c.probe) == (running.nodeid, running.probe) for c in self.crashes)

    def _report(self, report: crash.Report, now: float) -> None:
        """Count a complete report against what was running, and stop the boot after a fatal one."""
        if self.nmi_at is not None and report.kind == crash.PANIC:   # the kernel's answer to our NMI
            report = crash.hang_report(report.lines, now - self._since(), self._where())
        self.crashes.append(self._attribute(report))
        if report.fatal and self.kill_at is None:
            self.kill_at = now + TRAILER

    def _attribute(self, report: crash.Report) -> Crash:
        running, ended = self.running, self.last_ended
        if running is not None and running.probe:
            return Crash(report, f"detection of {running.probe}", self.boot, probe=running.probe,
                         groups=[running.probe])
        if running is not None:
            return Crash(report, running.nodeid, self.boot, nodeid=running.nodeid,
                         groups=list(running.info.get("groups", [])), catalog=list(running.info.get("catalog", [])))
        if not self.started:
            return Crash(report, "boot", self.boot)
        if ended is not None and self.last_line - ended[1] <= JUST_ENDED:
            entry = ended[0]
            return Crash(report, entry["nodeid"], self.boot, nodeid=entry["nodeid"], groups=list(entry["groups"]),
                         catalog=list(entry["catalog"]))
        return Crash(report, "between tests", self.boot)

    def _hang(self, stacks: list[str], now: float) -> None:
        """The guest's watchdog printed the overdue test's stacks: a hang titled from them."""
        if self.running is not None:
            self._report(crash.hang_report(stacks, now - self.running.since, self._where()), now)

    def _stopped(self, now: float) -> None:
        """The emulator answered the NMI by stopping the guest (or did not answer): a hang titled from where it was."""
        running = self.running
        if running is None or self._fatal_for_running():
            return
        where, log = self.answer(self.answer_lines, self.bases) if self.answer is not None else (None, [])
        self._report(crash.hang_report([], now - running.since, self._where(), where, log), now)

    def _since(self) -> float:
        return self.running.since if self.running is not None else self.last_line

    def _where(self) -> str:
        running = self.running
        if running is None:
            return "the suite"
        return running.nodeid or f"the detection of {running.probe}"

    # --- the clock -------------------------------------------------------------------------------------------

    def tick(self, now: float) -> str | None:
        """What the console loop must do now: KILL, NMI or nothing."""
        if self.scanner.open is not None and now - self.last_line > QUIET:
            for report in self.scanner.flush():
                self._report(report, now)
        if self.kill_at is not None:
            return KILL if now >= self.kill_at else None
        running = self.running
        if running is None or self.test_timeout <= 0 or \
                now - running.since <= self.test_timeout * self.slowness() + self.grace:
            return None
        if self.can_nmi and self.nmi_at is None:
            self.nmi_at = now
            return NMI
        if self.nmi_at is None or now - self.nmi_at > AFTER_NMI:
            self._stopped(now)
            return KILL
        return None

    def finish(self, timed_out: bool, now: float) -> None:
        """The emulator is gone: close an open report; a test still running was cut off with the boot."""
        for report in self.scanner.flush():
            self._report(report, now)
        if self.nmi_at is not None and self.answer is not None:
            self._stopped(now)
        if self.running is not None and not self._fatal_for_running() and not timed_out:
            self._report(crash.Report(crash.KILLED, "the guest stopped with no kernel report",
                                      ["the emulator ended while this ran"]), now)

    def slowness(self) -> float:
        """Host seconds per guest second so far (at least 1): the guest's deadline runs on the guest's clock, which
        an emulator that counts instructions (Bochs) slows down when the host is busy."""
        if len(self.clock) < 2 or self.clock[1][1] - self.clock[0][1] < 1:
            return 1.0
        (host0, guest0), (host1, guest1) = self.clock
        return max(1.0, (host1 - host0) / (guest1 - guest0))

    @property
    def fatal(self) -> list[Crash]:
        return [c for c in self.crashes if c.report.fatal]

