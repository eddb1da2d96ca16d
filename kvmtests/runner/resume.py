"""Across the boots of one cell: what a resumed boot must not run again, when to stop booting, and the one
results document of every boot (each verdict reached, each crash, how many boots it took)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmtests.verdict import features, report
from kvmtests.verdict.stream import BLOCKED

from .console import RunResult
from .monitor import Crash, Monitor


@dataclass
class Boot:
    """One boot of the cell: its console monitor, the emulator's end, and the suite's own results if it finished."""

    monitor: Monitor
    run: RunResult
    doc: dict | None


def blocked_message(crash: Crash, group: str) -> str:
    """Why a row of the crashed path is not run again (the skip that becomes the outcome blocked)."""
    return f"the kernel crashed on the path of {group} ({crash.during}: {crash.report.title})"


def resume_state(boots: list[Boot]) -> dict:
    """The resume file: every test a boot finished or crashed in, and the paths (groups, probes) that crashed."""
    done: set[str] = set()
    groups: dict[str, str] = {}
    probes: dict[str, str] = {}
    for boot in boots:
        done.update(boot.monitor.records)
        for c in boot.monitor.fatal:
            if c.nodeid:
                done.add(c.nodeid)
            if c.probe:
                probes.setdefault(c.probe, c.report.title)
            for g in c.groups:
                groups.setdefault(g, blocked_message(c, g))
    return {"done": sorted(done), "crashed_groups": groups, "crashed_probes": probes}


def progressed(boots: list[Boot]) -> bool:
    """Whether the last boot got further than the ones before: a verdict or a culprit none of them had."""
    if len(boots) < 2:
        return True
    before = resume_state(boots[:-1])
    now = resume_state(boots)
    return now["done"] != before["done"] or now["crashed_probes"] != before["crashed_probes"]


def _crashed_entry(c: Crash, prior: dict | None) -> dict:
    prior = prior or {}
    return {"nodeid": c.nodeid, "outcome": "crashed", "message": c.report.title,
            "catalog": prior.get("catalog", c.catalog), "groups": prior.get("groups", c.groups),
            "duration": prior.get("duration", 0.0), "log": c.report.lines,
            "crash": {"title": c.report.title, "kind": c.report.kind, "boot": c.boot}}


def _features(boots: list[Boot], last: dict | None) -> dict[str, dict]:
    """The last finished boot's detections; else what the probes reported as they ran; a crashed probe says so."""
    if last:
        return last["features"]
    out = {g: {"state": features.UNKNOWN, "how": "not detected: the run ended before this group's probe ran"}
           for g in features.GROUPS}
    for boot in boots:
        out.update(boot.monitor.probes)
        for c in boot.monitor.fatal:
            if c.probe:
                out[c.probe] = {"state": features.CRASHED,
                                "how": f"its detection probe crashed the kernel: {c.report.title}"}
    return out


def outside_tests(boots: list[Boot]) -> list[str]:
    """Reports the kernel went on from while no test ran (a WARN at boot, say): findings, once per title."""
    seen: dict[tuple[str, str], list[int]] = {}
    for boot in boots:
        for c in boot.monitor.crashes:
            if not (c.nodeid or c.probe or c.report.fatal):
                seen.setdefault((c.report.title, c.during), []).append(c.boot)
    return [f"the kernel reported {title} {'during boot' if during == 'boot' else during}, with no test running "
            f"(boot {', '.join(map(str, numbers))}): not counted against a test"
            for (title, during), numbers in seen.items()]


def merge(boots: list[Boot], host: dict, required: list[str], incomplete: str) -> dict:
    """One document for the cell: every verdict of every boot, crashed tests as such, the crashes, the boots, and
    why the run ended early (with how many selected tests did not run) if it did."""
    last = next((b.doc for b in reversed(boots) if b.doc), None)
    tests: dict[str, dict] = {}
    for boot in boots:
        tests.update(boot.monitor.records)
        if boot.doc:
            tests.update({t["nodeid"]: t for t in boot.doc["tests"]})
    crashes = [c for boot in boots for c in boot.monitor.crashes if c.nodeid or c.probe or c.report.fatal]
    for c in crashes:
        if c.nodeid:
            tests[c.nodeid] = _crashed_entry(c, tests.get(c.nodeid))
    for t in tests.values():
        if t["outcome"] == "blocked":
            t.setdefault("blocked_by", t["message"].removeprefix(BLOCKED))
    identity = (last or {}).get("host") or next((b.monitor.host for b in boots if b.monitor.host), None) or host
    doc = report.build(identity, {}, (last or {}).get("findings", []) + outside_tests(boots), required,
                       list(tests.values()), (last or {}).get("exitstatus", 1))
    doc["features"] = _features(boots, last)
    if crashes or incomplete or any(t["outcome"] in ("crashed", "blocked") for t in tests.values()):
        doc["exitstatus"] = max(doc["exitstatus"], 1)
    doc["crashes"] = [c.as_dict() for c in crashes]
    doc["boots"] = len(boots)
    doc["collection"] = (last or {}).get("collection", {})
    missing = not_run(boots, tests)
    doc["incomplete"] = f"{incomplete}; {missing} selected tests did not run" if incomplete and missing else incomplete
    return doc


def not_run(boots: list[Boot], tests: dict[str, dict]) -> int:
    """How many collected tests have no verdict among tests (by node id)."""
    collected = next((b.monitor.collected for b in boots if b.monitor.collected is not None), None)
    return sum(1 for nodeid in collected or [] if nodeid not in tests)


BootFn = Callable[[int, "dict | None", float], "tuple[RunResult, Monitor]"]
GUEST_OUTPUTS = ("rc", "results.json", "junit.xml")


def _guest_doc(results: Path) -> dict | None:
    """The suite's own results of the boot that just ended, when it finished (it writes rc last)."""
    if not (results / "rc").exists():
        return None
    try:
        return report.load(results / "results.json")
    except report.NotResults:
        return None


def run_cell(boot: BootFn, results: Path, timeout: float, max_resumes: int,
             shard: dict | None = None) -> tuple[list[Boot], str]:
    """Boot until the suite finishes, resuming after each crash; return the boots and, if the run ended early, why.
    A shard's plan rides in the resume file from the first boot on."""
    boots: list[Boot] = []
    deadline = time.monotonic() + timeout
    while True:
        for name in GUEST_OUTPUTS:
            (results / name).unlink(missing_ok=True)
        state = (resume_state(boots) if boots else {}) | ({"shard": shard} if shard else {})
        run, monitor = boot(len(boots) + 1, state or None, deadline - time.monotonic())
        boots.append(Boot(monitor, run, _guest_doc(results)))
        n = len(boots)
        if boots[-1].doc is not None:
            return boots, ""
        if not monitor.started:
            return boots, "" if n == 1 else f"the kernel did not reach the test runner on boot {n}, after a crash"
        if run.timed_out or deadline - time.monotonic() < 1:
            return boots, f"the run did not finish within --timeout {timeout:g} s"
        if not monitor.fatal:
            return boots, f"the suite ended with no results and no crash report (exit status {monitor.suite_rc})"
        if n > max_resumes:
            return boots, f"the kernel crashed on {n} boots, and --max-resumes {max_resumes} allows no more"
        if not progressed(boots):
            return boots, f"boot {n} crashed before any new verdict ({monitor.fatal[0].report.title})"
