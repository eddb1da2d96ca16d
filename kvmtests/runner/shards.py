"""One cell's suite over several emulators at once: which shard runs which test, how many shards the machine
holds, and the one result of them all (every test once, one host, one answer per feature group)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kvmtests.verdict import features, report

from . import rootfs

# Host memory one emulator needs beyond the guest's own: QEMU's or Bochs's process, the console reader.
EMULATOR_OVERHEAD_MB = 512
# What a test and a test file cost a guest beyond a test's own duration, in the guest's seconds (measured under
# Bochs on debian-6.12-sw-protected: 27 s of streamed events over 416 tests; 23 s of imports over 14 files).
TEST_COST = 0.07
FILE_COST = 1.6


def default_count(jobs: int, guest_mb: int, cores: int | None = None, available_mb: int | None = None) -> int:
    """Shards per cell: a core each (an emulator runs one vCPU on one host thread), the cores shared among the
    --jobs cells, and no more guests than the available memory holds."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    available_mb = available_mb if available_mb is not None else _available_mb()
    by_memory = available_mb // ((guest_mb + EMULATOR_OVERHEAD_MB) * max(jobs, 1))
    return max(1, min(cores // max(jobs, 1), by_memory))


def _available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def collect(command: Sequence[str], cwd: Path, bytecode: Path | None = None) -> list[str] | None:
    """The node ids the guest will collect, collected on the host from the same tree and arguments (None when
    the host cannot collect them: then each file's shard is decided by its name); the bytecode of what it imports
    goes under bytecode when given (a pycache prefix), else nowhere."""
    env = rootfs.pycache_env(bytecode) if bytecode else os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        return None
    return [line for line in done.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def durations(path: Path) -> dict[str, float]:
    """Each test's duration in an earlier results.json of the suite (empty when there is none or it is damaged)."""
    try:
        doc = report.load(path)
    except (report.NotResults, OSError):
        return {}
    return {t["nodeid"]: float(t.get("duration") or 0.0) for t in doc["tests"] if t["outcome"] != "blocked"}


def collection(path: Path) -> dict[str, float]:
    """Each test file's collection seconds in an earlier results.json (empty when it has none)."""
    try:
        return {f: float(s) for f, s in report.load(path).get("collection", {}).items()}
    except (report.NotResults, OSError, AttributeError, TypeError, ValueError):
        return {}


def plan(nodeids: Sequence[str], known: dict[str, float], count: int,
         collected: dict[str, float] | None = None) -> dict:
    """Assign every test a shard, heaviest first onto the lightest shard, whole files where they fit (a shard
    imports only the files it runs tests of, and the guest's imports are slow): a file weighs its tests'
    earlier durations when they are at hand (a test without one the median), each with the per-test cost of the
    guest's events, plus the cost of collecting it (the earlier run's, else FILE_COST); else its test count. A
    file heavier than a shard's share is split into its tests."""
    by_file: dict[str, list[str]] = {}
    for n in nodeids:
        by_file.setdefault(n.split("::")[0], []).append(n)
    typical = statistics.median(known.values()) if known else 1.0
    cost = {n: known.get(n, typical) + TEST_COST if known else 1.0 for n in nodeids}
    imports = {f: (collected or {}).get(f, FILE_COST) if known else 0.0 for f in by_file}
    weights = {f: sum(cost[n] for n in ns) + imports[f] for f, ns in by_file.items()}
    share = sum(weights.values()) / count
    units = {}
    for f, ns in by_file.items():
        units.update({f: ns} if weights[f] <= share else {n: [n] for n in ns})
        if weights[f] > share:
            weights.update({n: cost[n] + imports[f] / len(ns) for n in ns})
    loads = [0.0] * count
    tests: dict[str, int] = {}
    for unit in sorted(units, key=lambda u: (-weights[u], u)):
        shard = loads.index(min(loads))
        loads[shard] += weights[unit]
        tests.update({n: shard + 1 for n in units[unit]})
    files = {f: tests[ns[0]] for f, ns in by_file.items()}   # a test only the guest collects goes with its file
    return {"count": count, "tests": tests, "files": files}


def merge(docs: list[dict]) -> dict:
    """One document of every shard's: the tests (each once), one host identity and feature detection (a shard
    that saw otherwise is a finding and fails the run), the crashes with their shard, the boots of all."""
    findings: list[str] = []
    tests: dict[str, dict] = {}
    for i, doc in enumerate(docs, 1):
        for t in doc["tests"]:
            if t["nodeid"] in tests:
                findings.append(f"{t['nodeid']} ran in two shards; shard {i}'s verdict is kept")
            tests[t["nodeid"]] = t
    first = docs[0]
    for i, doc in enumerate(docs[1:], 2):
        differs = sorted(k for k in first["host"].keys() | doc["host"].keys()
                         if first["host"].get(k) != doc["host"].get(k))
        if differs:
            findings.append(f"shard {i} reports another host than shard 1 ({', '.join(differs)} differ)")
    detected = _features(docs, findings)
    disagree = bool(findings)
    for finding in dict.fromkeys(f for doc in docs for f in doc["findings"]):
        where = [i for i, doc in enumerate(docs, 1) if finding in doc["findings"]]
        findings.append(finding if len(where) == len(docs) else f"shard {', '.join(map(str, where))}: {finding}")
    merged = report.build(first["host"], {}, findings, first["required"], list(tests.values()),
                          max(d["exitstatus"] for d in docs))
    merged["features"] = detected
    if disagree:
        merged["exitstatus"] = max(merged["exitstatus"], 1)
    merged["crashes"] = [c | {"shard": i} for i, doc in enumerate(docs, 1) for c in doc.get("crashes", [])]
    merged["boots"] = sum(d.get("boots", 1) for d in docs)
    merged["shards"] = len(docs)
    merged["collection"] = {f: max(d.get("collection", {}).get(f, 0.0) for d in docs)
                            for f in sorted({f for d in docs for f in d.get("collection", {})})}
    merged["incomplete"] = "; ".join(f"shard {i}: {d['incomplete']}" for i, d in enumerate(docs, 1)
                                     if d.get("incomplete"))
    return merged


def _features(docs: list[dict], findings: list[str]) -> dict[str, dict]:
    """Every group's detection, which must be the same in every shard: the kernel and command line are."""
    out = {}
    for group in features.GROUPS:
        seen = [d["features"].get(group, {"state": features.UNKNOWN, "how": "not detected"}) for d in docs]
        if all(s["state"] == seen[0]["state"] for s in seen):
            out[group] = seen[0]
            continue
        answers = "; ".join(f"shard {i}: {s['state']} ({s['how']})" for i, s in enumerate(seen, 1))
        findings.append(f"feature detection differs between shards for {group}: {answers}")
        out[group] = {"state": features.UNKNOWN, "how": f"the shards disagree: {answers}"}
    return out


def write_plan(path: Path, shard_plan: dict, index: int) -> None:
    """The plan one shard's runner reads (--shard-plan): the whole assignment and which shard it is."""
    path.write_text(json.dumps(shard_plan | {"index": index}))


def read_plan(path: Path) -> dict:
    """The plan a shard's runner was handed, checked enough that a bad file is one line, not a traceback."""
    try:
        got = json.loads(path.read_text())
        if not (isinstance(got["tests"], dict) and isinstance(got["files"], dict)
                and 1 <= int(got["index"]) <= int(got["count"])):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a shard plan written by kvmtests qualify") from None
    return got

