"""What a finished LAVA job gives back, as a kvmtests results document: from its log (lava-run's, or a server's
output.yaml) the results.json the guest printed, or, when the job ended before that (a kernel that crashed or
hung), every verdict its console streamed, titled crashes included; from a results export, the test cases."""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import yaml

from kvmtests.verdict import report
from kvmtests.verdict.stream import mark_words

from . import resume
from .console import RunResult
from .labguest import BEGIN, END, RESULTS, case_nodeid
from .monitor import Monitor

EXPORT_FINDING = ("rebuilt from a LAVA results export, which keeps each test's outcome and duration but not its "
                  "message, catalog numbers or the host: pass the job's log for the whole result")


class NotLava(ValueError):
    """The file is neither a LAVA job log nor a LAVA results export; the message says what to pass."""


def records(text: str) -> list[dict]:
    """The log's records, one YAML flow mapping a line (lava-run's stderr), or each after '- ' (output.yaml)."""
    out = []
    for line in text.splitlines():
        line = line[2:] if line.startswith("- {") else line
        if not line.startswith("{"):
            continue
        try:
            record = yaml.load(line, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError:
            continue
        if isinstance(record, dict) and {"dt", "lvl", "msg"} <= record.keys():
            out.append(record)
    return out


def console(log: list[dict]) -> list[tuple[float, str]]:
    """The guest's console lines with seconds since the job began; LAVA logged each `"` as `\\"`."""
    start = _time(log[0]["dt"]) if log else 0.0
    return [(_time(r["dt"]) - start, r["msg"].replace('\\"', '"')) for r in log
            if r["lvl"] in ("target", "feedback") and isinstance(r["msg"], str)]


def _time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


def printed_results(lines: list[str]) -> dict | None:
    """The results.json between the guest's marks, if it arrived whole (its SHA-256 agrees)."""
    body: list[str] | None = None
    digest = ""
    for line in lines:
        words = mark_words(line)
        name = words[1] if len(words) > 1 else ""
        if name == BEGIN and len(words) > 3:
            body, digest = [], words[3]
        elif name == END and body is not None:
            text = "\n".join(body)
            if hashlib.sha256(text.encode()).hexdigest() == digest:
                return json.loads(text)
            body = None
        elif body is not None:
            body.append(line)
    return None


def job_error(log: list[dict]) -> str:
    """Why LAVA ended the job, if it says so (its job result's error message)."""
    for r in log:
        msg = r["msg"]
        if r["lvl"] == "results" and isinstance(msg, dict) and msg.get("case") == "job" and msg.get("error_msg"):
            return f"LAVA ended the job: {msg['error_msg']}"
    return "the LAVA job ended"


def from_log(log: list[dict]) -> dict:
    """The guest's own results when they arrived whole; else the verdicts its console streamed up to the end."""
    lines = console(log)
    doc = printed_results([text for _, text in lines])
    if doc is not None:
        return doc
    monitor = Monitor(1, 0.0, 0.0, can_nmi=False)
    for at, text in lines:
        monitor.line(text, at)
    end = lines[-1][0] if lines else 0.0
    monitor.finish(False, end)
    if not monitor.started and not monitor.records:
        raise NotLava("the job's log has no kvmtests suite on its console: the guest never started it (see the "
                      "log's boot messages)")
    boot = resume.Boot(monitor, RunResult(None, None, end), None)
    return resume.merge([boot], {"environment": "LAVA (kvmtests lava)"}, [],
                        f"{job_error(log)} before the suite sent its results")


def from_export(cases: list[dict]) -> dict:
    """The kvmtests test cases of a results export (/results/JOB/yaml, or the REST API's tests list)."""
    tests = []
    for case in cases:
        meta = case.get("metadata") or {}
        meta = yaml.safe_load(meta) if isinstance(meta, str) else meta
        outcome = meta.get("set") if meta.get("set") in RESULTS else None
        if outcome is None or str(case.get("suite", meta.get("definition", ""))) == "lava":
            continue
        tests.append({"nodeid": case_nodeid(str(case["name"])), "outcome": outcome, "message": "", "catalog": [],
                      "groups": [], "duration": float(meta.get("measurement") or 0.0)})
    if not tests:
        raise NotLava("the results export has no kvmtests test cases (test sets named after kvmtests outcomes)")
    failed = any(RESULTS[t["outcome"]] == "fail" for t in tests)
    return report.build({"environment": "LAVA (kvmtests lava)"}, {}, [EXPORT_FINDING], [], tests, int(failed))


def load(path: Path) -> dict:
    """A job log or a results export, told apart by their shape; NotLava in one line for anything else."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise NotLava(f"cannot read {path}: {exc.strerror}") from None
    log = records(text)
    if log:
        return from_log(log)
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        data = data["results"]
    if isinstance(data, list) and data and all(isinstance(c, dict) and "name" in c for c in data):
        return from_export(data)
    raise NotLava(f"{path} is neither a LAVA job log (lava-run's output, a server's output.yaml) nor a results "
                  "export (/results/JOB/yaml): pass one of those")

