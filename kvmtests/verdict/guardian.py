"""A host run's guardian: beside each process that runs the kernel's tests (the pytest process under -n 0, each
xdist worker), a small process of its own, so that an oops or a hang in a test's ioctl does not lose the run.

The test process tells it over a pipe which test starts and ends; it reads the kernel log. When a test's process
is left behind by an oops (the oopsed thread exits and the others linger), passes the test's deadline, or dies,
the guardian kills what is left of it and keeps the verdict: under xdist a record from which the controller makes
the test `crashed`; under -n 0 the results document, JUnit file and summary that pytest can no longer write.

    python -m kvmtests.verdict.guardian --pid PID --ready FD [--records DIR] [--json PATH] [--junit PATH]

The pipe carries one JSON list a line: ["session", {"doc", "collected"}] (-n 0: the results so far and how many
tests the run has), ["start", {"nodeid", "catalog", "groups", "timeout"}], ["end", verdict or null], ["bye"]."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmtests.machine import health

from . import crash, junit
from . import report as results

SESSION, START, END, BYE = "session", "start", "end", "bye"
CRASH = "crash"              # the user property that makes a test `crashed`: {"title", "kind", "log"}
RECORDS = "kvmtests_guardian_records"   # the xdist workerinput key: where workers' guardians leave records
IN_PROGRESS = "the run is in progress"
NO_REPORT = "the test process died (no kernel report)"
DEFAULT_TIMEOUT = 60.0       # s: --test-timeout's default, about 25 times the slowest test on the reference host
GRACE = 3.0                  # s a test may take to end after a fatal kernel report of its own before it is killed
KILL_WAIT = 5.0              # s for a killed process to go, or for a guardian to end at the session's end
READY_WAIT = 10.0            # s the test process waits for its guardian to read the kernel log
RECORD_WAIT = 5.0            # s the xdist controller waits for a dead worker's record
TICK = 0.2                   # s between looks at the kernel log, the deadline and the parent
MAX_LINES = crash.MAX_LOG_LINES
# Who a report is about: "PID: N Comm:" (oops, WARNING), "task comm:N blocked" (hung task), "[comm:N]" (lockup).
_PIDS = re.compile(r"\bPID: (\d+) |\btask \S+:(\d+) blocked|\[\S+:(\d+)\]\s*$")
_STACK_ADDRESS = re.compile(r"^\[<[0-9a-f]*>\] ")   # /proc/PID/stack's "[<0>] " before each frame


# --- what the test process and the controller share ------------------------------------------------------------

def crash_of(rep: crash.Report, notes: list[str] | None = None) -> dict:
    """A kernel report (or the guardian's own) as a test's crash, notes after its lines."""
    return {"title": rep.title, "kind": rep.kind, "log": [*rep.lines, *(notes or [])]}


def kernel_crash(lines: list[str]) -> dict | None:
    """A test's own kernel-log lines as its crash: the first fatal report in them, else the first report."""
    reports = crash.scan(lines)
    if not reports:
        return None
    return crash_of(next((r for r in reports if r.fatal), reports[0]))


def crash_fields(found: dict) -> dict:
    """What a crashed test's entry in the results document carries beside its outcome and message."""
    return {"log": found["log"], "crash": {"title": found["title"], "kind": found["kind"], "boot": 1}}


def crash_entry(found: dict, during: str, groups: list[str]) -> dict:
    """One crash in the run's list of crashes."""
    return {"title": found["title"], "kind": found["kind"], "during": during, "groups": groups, "boot": 1,
            "fatal": found["kind"] in crash.FATAL, "log": found["log"]}


def finding(entry: dict) -> str:
    """What a fatal crash means for the rest of the run, said plainly."""
    where = entry["during"] if entry["during"] == "between tests" else f"during {entry['during']}"
    process = entry["kind"] in (crash.HANG, crash.KILLED)
    what = {crash.HANG: "a test hung", crash.KILLED: "a test process died"}.get(entry["kind"],
                                                                              "the host's kernel crashed")
    return (f"{what} {where} ({entry['title']}): {'' if process else 'it is tainted now, and '}every verdict after "
            "it is suspect; run the suite again after a reboot")


def add_crashes(doc: dict, between: list[dict] | None = None) -> dict:
    """The document's crashes listed, and a finding for each fatal one: every verdict after it is suspect."""
    crashes = [crash_entry({**t["crash"], "log": t["log"]}, t["nodeid"], t["groups"])
               for t in doc["tests"] if "crash" in t] + (between or [])
    if crashes:
        doc["crashes"] = crashes
        fatal = dict.fromkeys(finding(c) for c in crashes if c["fatal"])
        doc["findings"] = doc["findings"] + [f for f in fatal if f not in doc["findings"]]
    return doc


def record_path(directory: str, nodeid: str) -> Path:
    """Where a worker's guardian leaves a test's record: named by a hash, since a node id is no file name."""
    return Path(directory) / f"{hashlib.sha256(nodeid.encode()).hexdigest()[:24]}.json"


def write_whole(path: str | Path, text: str) -> None:
    """Write a file whole or not at all, so that a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, doc: dict) -> None:
    """A results document, whole or not at all."""
    write_whole(path, json.dumps(doc, indent=1))


def wait_record(directory: str, nodeid: str, wait: float = RECORD_WAIT) -> dict | None:
    """The guardian's record of a test whose worker died: it may come a moment after the controller hears of it."""
    path = record_path(directory, nodeid)
    end = time.monotonic() + wait
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.1)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the test process's side --------------------------------------------------------------------------------

class Client:
    """The test process's end of the pipe to its guardian."""

    def __init__(self, *args: str):
        ready, done = os.pipe()
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, "--pid", str(os.getpid()),
                                      "--ready", str(done), *args], stdin=subprocess.PIPE, env=env,
                                     pass_fds=(done,), start_new_session=True)
        os.close(done)
        try:
            if not select.select([ready], [], [], READY_WAIT)[0] or not os.read(ready, 1):
                print(f"kvmtests: the guardian (pid {self.proc.pid}) did not start; a crash may lose this "
                      "process's verdicts", file=sys.stderr)
        finally:
            os.close(ready)

    def tell(self, *message: object) -> None:
        """One message, one line, flushed: the guardian must know before the test goes on."""
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass     # the guardian is gone (it said why): the run goes on unguarded

    def close(self) -> None:
        """End the guardian at the session's end, so that it does not take the end for a death."""
        self.tell(BYE)
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(KILL_WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def deadline(item: pytest.Item) -> float:
    """The test's deadline in s (0: none): self-tests and debugging have none, slow tests only when asked for."""
    config = item.config
    if item.get_closest_marker("selftest") or config.getoption("usepdb") or config.getoption("trace"):
        return 0.0
    asked = config.getoption("test_timeout")
    if asked is not None:
        return max(asked, 0.0)
    return 0.0 if item.get_closest_marker("slow") else DEFAULT_TIMEOUT


def _path(option: str | None) -> list[str]:
    return [os.path.abspath(os.path.expanduser(os.path.expandvars(option)))] if option else []


class HostGuard:
    """The plugin's part on a host: a guardian for each process that runs the kernel's tests, told each test."""

    def __init__(self, config: pytest.Config, verdicts: dict[str, dict], document: Callable[[], dict]):
        self.config, self.verdicts, self.document = config, verdicts, document
        self.client: Client | None = None
        self.records: str | None = None       # the controller's directory for its workers' guardians
        self.whole_run = not hasattr(config, "workerinput")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> None:
        if self.client is None and item.get_closest_marker("selftest") is None:
            self.client = self._start(len(item.session.items))
        if self.client is not None:
            props = dict(item.user_properties)
            self.client.tell(START, {"nodeid": item.nodeid, "catalog": props.get("catalog", []),
                                     "groups": props.get("groups", []), "timeout": deadline(item)})

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        if self.client is not None:
            self.client.tell(END, self.verdicts.get(nodeid) if self.whole_run else None)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _start(self, collected: int) -> Client:
        if not self.whole_run:
            return Client("--records", self.config.workerinput[RECORDS])
        doc = {**self.document(), "incomplete": IN_PROGRESS}
        paths = _path(self.config.getoption("kvmtests_json"))
        if paths:
            write_json(paths[0], doc)
        junit_path = _path(self.config.getoption("xmlpath", None))
        client = Client(*(["--json", *paths] if paths else []), *(["--junit", *junit_path] if junit_path else []))
        client.tell(SESSION, {"doc": doc, "collected": collected})
        return client

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: object) -> None:
        if self.records is None:
            self.records = tempfile.mkdtemp(prefix="kvmtests-guardian-")
        node.workerinput[RECORDS] = self.records

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport) -> None:
        record = (wait_record(self.records, crashitem) if self.records else None) or \
            crash_of(crash.Report(crash.KILLED, NO_REPORT, []))
        earlier = self.verdicts.get(crashitem, {})
        report.when = "call"        # a failure of the test, not of its set-up
        report.location = (report.location[0], None, crashitem.partition("::")[2] or crashitem)
        report.longrepr = "\n".join([f"{report.longrepr}: {record['title']}", *record["log"]])
        report.user_properties = [("catalog", record.get("catalog", earlier.get("catalog", []))),
                                  ("groups", record.get("groups", earlier.get("groups", []))),
                                  (CRASH, {k: record[k] for k in ("title", "kind", "log")})]

    def pytest_unconfigure(self) -> None:
        if self.records is not None:
            shutil.rmtree(self.records, ignore_errors=True)


# --- the guardian process -----------------------------------------------------------------------------------

@dataclass
class Running:
    """The test the test process announced last, its kernel-log lines and threads, and a fatal report of its own."""

    info: dict
    since: float
    tids: set[int]
    lines: list[str] = field(default_factory=list)
    report: crash.Report | None = None
    reported_at: float = 0.0


def report_pids(lines: list[str]) -> set[int]:
    """The tasks (thread ids) a kernel report names."""
    return {int(n) for line in lines for match in _PIDS.finditer(line) for n in match.groups() if n}


def threads(pid: int) -> set[int]:
    """A process's thread ids: the tasks a kernel report about its test may name."""
    try:
        return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def thread_states(pid: int) -> list[tuple[int, str, str]]:
    """(tid, comm, state) of each thread of a process, state as /proc/PID/stat's letter (D: stuck in the kernel)."""
    out = []
    for tid in sorted(threads(pid)):
        stat = _read(f"/proc/{pid}/task/{tid}/stat").rsplit(")", 1)
        if len(stat) == 2 and stat[1].split():
            out.append((tid, _read(f"/proc/{pid}/task/{tid}/comm").strip(), stat[1].split()[0]))
    return out


def task_stacks(pid: int) -> list[str]:
    """A process's threads' kernel stacks, its main thread first, as the qualify guest's watchdog prints them
    (crash.hang_report puts the stuck ones first)."""
    lines = []
    for tid, comm, state in sorted(thread_states(pid), key=lambda t: t[0] != pid):
        lines.append(f"task {comm} tid {tid} state {state}")
        lines += [_STACK_ADDRESS.sub("  ", line) for line in _read(f"/proc/{pid}/task/{tid}/stack").splitlines()]
    return lines


def kill(pid: int) -> str:
    """SIGKILL the test process (the guardian's parent): '' once it is gone, else the D-state threads that hold it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return ""
    end = time.monotonic() + KILL_WAIT
    while os.getppid() == pid and time.monotonic() < end:
        time.sleep(0.05)
    if os.getppid() != pid:
        return ""
    stuck = [f"{comm} (tid {tid})" for tid, comm, state in thread_states(pid) if state == "D"]
    return (f"process {pid} did not die on SIGKILL: {', '.join(stuck) or 'a thread'} stuck in the kernel (D state); "
            "it stays until the host reboots, and its run cannot end")


def say(text: str) -> None:
    """Tell the terminal, if there still is one."""
    try:
        with open(1, "w", closefd=False) as out:
            out.write(text + "\n")
    except OSError:
        pass


class Guardian:
    """Follows one test process: the tests it announces, the kernel log, each test's deadline, and its life."""

    def __init__(self, pid: int, records: str | None, json_path: str | None, junit_path: str | None):
        self.pid, self.records, self.json_path, self.junit_path = pid, records, json_path, junit_path
        self.watch = health.Watch()
        if self.watch.error:
            print(f"kvmtests guardian: {self.watch.error}; a test's crash is seen only when its process dies or "
                  "passes its deadline", file=sys.stderr)
        self.scanner = crash.Scanner()
        self.session: dict | None = None        # -n 0: the results so far and how many tests the run has
        self.verdicts: dict[str, dict] = {}     # -n 0: each test's verdict since the session message
        self.running: Running | None = None
        self.idle_report: crash.Report | None = None   # a fatal report while no test ran
        self.pending = b""

    def run(self) -> None:
        """Follow the test process until its session ends, or until it is gone (killed, if it must be)."""
        while True:
            if select.select([0], [], [], TICK)[0]:
                chunk = os.read(0, 1 << 16)
                if not chunk:
                    return self.died()
                *lines, self.pending = (self.pending + chunk).split(b"\n")
                if any(self.message(json.loads(line)) for line in lines):
                    return
            elif os.getppid() != self.pid:
                return self.died()
            self.read_log()
            if self.overdue():
                return

    def message(self, message: list) -> bool:
        """Take one message from the test process; True at the end of its session."""
        kind, *payload = message
        if kind == SESSION:
            self.session = payload[0]
        elif kind == START:      # the log read after this is the test's: it may have begun before the guardian looked
            self.running, self.idle_report = Running(payload[0], time.monotonic(), threads(self.pid)), None
        elif kind == END:
            if payload[0]:
                self.verdicts[payload[0]["nodeid"]] = payload[0]
            self.running = None
        return kind == BYE

    def read_log(self) -> None:
        """Scan the kernel log's new lines; those that come while a test runs are the test's log."""
        running = self.running
        for line in self.watch.new_lines():
            if running is not None:
                running.lines.append(line)
            for rep in self.scanner.feed(line):
                self.reported(rep)
        if running is not None:
            del running.lines[:-MAX_LINES]
            running.tids |= threads(self.pid)

    def reported(self, rep: crash.Report) -> None:
        """A fatal report is the running test's if it names one of its process's threads, or no task at all."""
        running = self.running
        if not rep.fatal:
            return
        if running is None:
            self.idle_report = rep
        elif running.report is None:
            pids = report_pids(rep.lines)
            if not pids or pids & (running.tids | {self.pid}):
                running.report, running.reported_at = rep, time.monotonic()

    def overdue(self) -> bool:
        """Kill the test process when its test did not end after its own fatal report, or ran past its deadline."""
        running, now = self.running, time.monotonic()
        if running is None:
            return False
        if running.report is not None and now - running.reported_at >= GRACE:
            self.stop(running.report, f"the test did not end {GRACE:g} s after the kernel's report")
            return True
        timeout = running.info.get("timeout") or 0
        if 0 < timeout <= now - running.since:
            self.stop(crash.hang_report(task_stacks(self.pid), now - running.since, running.info["nodeid"]),
                      f"the test ran past its {timeout:g} s deadline (--test-timeout)")
            return True
        return False

    def stop(self, rep: crash.Report, why: str) -> None:
        """Keep the test's crash, then kill its process; say so when the kernel holds it."""
        note = f"kvmtests guardian: {why}: killed process {self.pid}"
        self.keep(rep, [note])
        stuck = kill(self.pid)
        if stuck:
            print(f"kvmtests guardian: {stuck}", file=sys.stderr)
            self.keep(rep, [note, stuck], stuck=True)

    def died(self) -> None:
        """The test process is gone: its test (or, under -n 0, the time between tests) crashed."""
        self.read_log()
        for rep in self.scanner.flush():
            self.reported(rep)
        running = self.running
        if running is None and self.session is None:
            return          # an xdist worker between tests: no test to give it to
        found = running.report if running is not None else self.idle_report
        if found is None:
            found = crash.Report(crash.KILLED, NO_REPORT, running.lines if running is not None else [])
        when = "while the test ran" if running is not None else "between tests"
        self.keep(found, [f"kvmtests guardian: the test process (pid {self.pid}) ended {when}"])

    def keep(self, rep: crash.Report, notes: list[str], stuck: bool = False) -> None:
        """Leave the crash where the run's verdicts are made: a record for the controller, or the results."""
        found = crash_of(rep, notes)
        if self.records and self.running is not None:
            write_json(record_path(self.records, self.running.info["nodeid"]), {**self.running.info, **found})
        if self.session is not None:
            self.finish(found, stuck)

    def finish(self, found: dict, stuck: bool) -> None:
        """-n 0: write what the run reached, as pytest would have at its end, and say on the terminal why it ended."""
        running, doc = self.running, dict(self.session["doc"])
        tests = {t["nodeid"]: t for t in doc["tests"]} | self.verdicts
        between = []
        if running is not None:
            info = running.info
            where = f"in {info['nodeid']}"
            tests[info["nodeid"]] = {"nodeid": info["nodeid"], "outcome": "crashed", "message": found["title"],
                                     "catalog": info["catalog"], "groups": info["groups"],
                                     "duration": round(time.monotonic() - running.since, 4), **crash_fields(found)}
        else:
            where = "between tests"
            between.append(crash_entry(found, where, []))
        doc.update(tests=sorted(tests.values(), key=lambda t: t["nodeid"]), exitstatus=1,
                   coverage=results.coverage(list(tests.values())))
        add_crashes(doc, between)
        missing = self.session["collected"] - len(tests)
        tainted = found["kind"] not in (crash.HANG, crash.KILLED) or bool(health.taint() & ~self.watch.taint)
        doc["incomplete"] = (f"the test process {'is stuck in the kernel' if stuck else 'died'} {where} "
                             f"({found['title']}); {missing} test{'' if missing == 1 else 's'} did not run; "
                             + ("the kernel is tainted: " if tainted else "") + "run the suite again after a reboot")
        written = []
        if self.json_path:
            write_json(self.json_path, doc)
            written.append(self.json_path)
        if self.junit_path:
            write_whole(self.junit_path, junit.junit(doc))
            written.append(self.junit_path)
        say("\n\n=== kvmtests summary, by the guardian of the test process ===\n" + results.render(doc)
            + f"\n\nkvmtests: CRASHED {where}: {found['title']}; "
            + (f"results in {', '.join(written)}" if written else "no results file was asked for"))


def main(argv: list[str] | None = None) -> None:
    """The guardian process: started by the plugin (HostGuard), never by hand."""
    parser = argparse.ArgumentParser(prog="python -m kvmtests.verdict.guardian",
                                     description="the guardian of one test process (started by the kvmtests plugin)")
    parser.add_argument("--pid", type=int, required=True, help="the test process (this one's parent)")
    parser.add_argument("--ready", type=int, required=True, help="a pipe to close once the kernel log is open")
    parser.add_argument("--records", help="xdist: the directory for the controller's records")
    parser.add_argument("--json", help="-n 0: the results document to write if the process dies")
    parser.add_argument("--junit", help="-n 0: the JUnit file to write if the process dies")
    args = parser.parse_args(argv)
    guardian = Guardian(args.pid, args.records, args.json, args.junit)
    os.write(args.ready, b"\n")
    os.close(args.ready)
    guardian.run()


if __name__ == "__main__":
    main()
