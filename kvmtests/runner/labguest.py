"""In a LAVA guest, after the suite: the whole results.json on the console between two marks (with its SHA-256,
for `kvmtests lava results` to take back), then every test as a LAVA test case, in a test set per outcome.

LAVA's test-case ids end at whitespace, `=` and `>`, which parametrized node ids may hold: those (and `%`) are
percent-encoded, and case_nodeid undoes it."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from kvmtests.verdict.stream import MARK, uptime

BEGIN, END = "lab-results-begin", "lab-results-end"
# kvmtests outcome -> LAVA result (pass, fail, skip, unknown), as KCIDB and JUnit map them
RESULTS = {"passed": "pass", "failed": "fail", "unexpected-pass": "fail", "error": "fail", "crashed": "fail",
           "skipped": "skip", "known-deviation": "skip", "blocked": "skip"}
ESCAPES = {"%": "%25", " ": "%20", "=": "%3D", ">": "%3E", "\t": "%09", "\n": "%0A"}


def case_name(nodeid: str) -> str:
    """The LAVA test-case id of a node id."""
    return "".join(ESCAPES.get(c, c) for c in nodeid)


def case_nodeid(name: str) -> str:
    """The node id of a LAVA test-case id case_name wrote."""
    for char, code in reversed(ESCAPES.items()):
        name = name.replace(code, char)
    return name


def block(doc: dict) -> list[str]:
    """The results as console lines: ASCII JSON without blank lines (LAVA's log drops them), between the marks."""
    text = json.dumps(doc, indent=1, ensure_ascii=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return [f"{MARK} {BEGIN} {uptime()} {digest}", *text.splitlines(), f"{MARK} {END} {uptime()}"]


def report(results: Path) -> int:
    """Print the block and call lava-test-set and lava-test-case (LAVA's own helpers) for every test."""
    try:
        doc = json.loads((results / "results.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"kvmtests: the suite left no results ({exc}); the host rebuilds them from the console's events")
        return 0
    print("\n".join(block(doc)), flush=True)
    for outcome in RESULTS:
        tests = [t for t in doc["tests"] if t["outcome"] == outcome]
        if not tests:
            continue
        subprocess.run(["lava-test-set", "start", outcome], check=False)
        for t in tests:
            catalog = ", ".join(map(str, t["catalog"])) or "-"
            first = (t.get("message") or "").splitlines()[:1]
            print(f"kvmtests: {t['nodeid']} [catalog {catalog}] {outcome}" + "".join(f": {m}" for m in first),
                  flush=True)
            subprocess.run(["lava-test-case", case_name(t["nodeid"]), "--result", RESULTS[outcome],
                            "--measurement", f"{t.get('duration', 0.0):.3f}", "--units", "seconds"], check=False)
        subprocess.run(["lava-test-set", "stop"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(report(Path(sys.argv[1])))
