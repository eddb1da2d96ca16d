"""Results: the JSON document of a run and the end-of-run summary rendered from it."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from . import features

# The document's version: it changes when a key is removed or changes meaning, so that a reader of one version
# can trust every key it knows. Added keys keep the version, and readers take them with .get (host "command line"
# came after format 1's first files).
FORMAT_VERSION = 1
OUTCOMES = ("passed", "failed", "skipped", "known-deviation", "unexpected-pass", "error", "crashed", "blocked")
CORE = "core"


def outcome_of(when: str, outcome: str, wasxfail: bool) -> str | None:
    """One word per test from pytest's phase reports; None for phases that say nothing new."""
    if wasxfail and outcome == "skipped":
        return "known-deviation"
    if outcome == "failed":
        return "failed" if when == "call" else "error"
    if outcome == "skipped":
        return "skipped"
    if when == "call":
        return "passed"
    return None


def merge(previous: str | None, new: str | None) -> str | None:
    """A test's outcome across phases: the worst wins (a teardown error spoils a pass, a crash spoils anything)."""
    order = {None: -1, "passed": 0, "skipped": 1, "known-deviation": 1, "error": 2, "blocked": 2,
             "unexpected-pass": 3, "failed": 3, "crashed": 4}
    return new if order[new] > order[previous] else previous


def coverage(tests: list[dict]) -> dict[str, list[int]]:
    covered = sorted({n for t in tests for n in t["catalog"]})
    return {"covered": covered, "missing": sorted(features.CATALOG - set(covered))}


def build(host: dict, detections: dict, findings: list[str], required: list[str], tests: list[dict],
          exitstatus: int) -> dict:
    """The run as one JSON-ready document."""
    return {
        "format": FORMAT_VERSION,
        "host": host,
        "features": {k: {"state": d.state, "how": d.how} for k, d in detections.items()},
        "findings": findings,
        "required": sorted(required),
        "tests": sorted(tests, key=lambda t: t["nodeid"]),
        "coverage": coverage(tests),
        "exitstatus": exitstatus,
    }


def required_absent(doc: dict) -> list[str]:
    """One line per required group that the kernel does not carry."""
    return [f"required feature group {g} ({features.GROUPS[g].title}) is {doc['features'][g]['state']}: "
            f"{doc['features'][g]['how']}" for g in doc["required"] if doc["features"][g]["state"] != "present"]


def cell(state: str, counts: Counter | dict) -> str:
    """A group's state and counts in one table cell: absent 3/0/16/0 (+1 xpass +2 err +1 crash +3 blocked when
    there are any)."""
    extra = "".join(f" +{counts[o]} {word}" for o, word in (("unexpected-pass", "xpass"), ("error", "err"),
                                                            ("crashed", "crash"), ("blocked", "blocked"))
                    if counts[o])
    return f"{state} {counts['passed']}/{counts['failed']}/{counts['skipped']}/{counts['known-deviation']}{extra}"


def ranges(numbers: list[int]) -> str:
    """Catalog numbers as the catalog writes them: 59-61, 66."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out) or "none"


def group_counts(doc: dict) -> dict[str, Counter]:
    """Outcomes per feature group (a test counts in each of its groups; one without a group in core)."""
    counts: dict[str, Counter] = {}
    for t in doc["tests"]:
        for g in t["groups"] or [CORE]:
            counts.setdefault(g, Counter())[t["outcome"]] += 1
    return counts


def crash_titles(doc: dict) -> list[str]:
    """Each crash title of a run once: its crash list, then crashed tests (so a run without the list counts too)."""
    titles = [c["title"] for c in doc.get("crashes", [])]
    return list(dict.fromkeys(titles + [t["message"] for t in doc["tests"] if t["outcome"] == "crashed"]))


def crash_line(crash: dict) -> str:
    """One crash of the run, where and in which boot it happened first, since the title alone does not say."""
    where = crash["during"] if crash["during"] == "between tests" else f"during {crash['during']}"
    fatal = ", fatal" if crash["fatal"] else ""
    shard = f"shard {crash['shard']}, " if "shard" in crash else ""
    return f"CRASH {where} ({shard}boot {crash['boot']}, {crash['kind']}{fatal}): {crash['title']}"


def survival(doc: dict) -> list[str]:
    """The kernel's survival of the run: boots beyond one per shard, each crash, and why it ended early if it did."""
    boots, shards = doc.get("boots", 1), doc.get("shards", 1)
    return ([f"shards: {shards}"] if shards > 1 else []) + ([f"boots: {boots}"] if boots > shards else []) + \
        [crash_line(c) for c in doc.get("crashes", [])] + \
        ([f"INCOMPLETE: {doc['incomplete']}"] if doc.get("incomplete") else [])


def render(doc: dict) -> str:
    """The summary table printed after pytest's own output."""
    parts = [tabulate(list(doc["host"].items()), tablefmt="plain")]
    counts = group_counts(doc)
    rows = []
    for key, group in features.GROUPS.items():
        det = doc["features"].get(key, {"state": "-", "how": ""})
        c = counts.get(key, Counter())
        req = " (required)" if key in doc["required"] else ""
        rows.append([key, group.patches, det["state"] + req, *(c[o] for o in OUTCOMES), det["how"]])
    c = counts.get(CORE, Counter())
    rows.append([CORE, "upstream", "-", *(c[o] for o in OUTCOMES), "layouts, lifecycle, exits, probes"])
    parts.append(tabulate(rows, headers=["group", "patches", "detected", "pass", "fail", "skip", "known-dev",
                                         "xpass", "error", "crashed", "blocked", "detected by"], tablefmt="simple"))
    for line in doc["findings"]:
        parts.append(f"finding: {line}")
    lines = survival(doc)
    parts.extend(["\n".join(lines)] if lines else [])
    for line in required_absent(doc):
        parts.append(f"FAILED {line}")
    cov = doc["coverage"]
    parts.append(f"catalog coverage: {len(cov['covered'])}/{len(features.CATALOG)} numbers have a test; "
                 f"without a test: {ranges(cov['missing'])}")
    return "\n\n".join(parts)


class NotResults(ValueError):
    """A file that is missing, unreadable, not a kvmtests result, or of another format version: one line."""


def peek(path: str | Path) -> dict:
    """A saved run of any format version; NotResults says in one line why the file is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NotResults(f"{path} does not exist: pass a file written by --kvmtests-json or kvmtests qualify") from None
    except OSError as e:
        raise NotResults(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), int) or not isinstance(doc.get("tests"), list):
        raise NotResults(f"{path} is not a kvmtests result: pass a file written by --kvmtests-json or kvmtests qualify")
    return doc


TEST_KEYS = {"nodeid", "outcome", "message", "catalog", "groups"}


def check_format(doc: dict, path: str | Path) -> dict:
    """The document if it is a whole run of FORMAT_VERSION; NotResults in one line otherwise."""
    if doc["format"] != FORMAT_VERSION:
        raise NotResults(f"{path} is results format {doc['format']}, this kvmtests reads format {FORMAT_VERSION}: "
                         "use the kvmtests version that wrote it, or run the suite again")
    whole = (isinstance(doc.get("host"), dict) and isinstance(doc.get("features"), dict)
             and isinstance(doc.get("exitstatus"), int)
             and all(isinstance(t, dict) and TEST_KEYS <= t.keys() for t in doc["tests"]))
    if not whole:
        raise NotResults(f"{path} is an incomplete kvmtests result (format {FORMAT_VERSION}): pass the file as "
                         "--kvmtests-json or kvmtests qualify wrote it")
    return doc


def load(path: str | Path) -> dict:
    """A saved run this kvmtests reads (format FORMAT_VERSION)."""
    return check_format(peek(path), path)


def render_file(path: str | Path) -> str:
    """Re-render the summary of a saved run."""
    return render(load(path))


KCIDB_ORIGIN = "kvmtests"
KCIDB_STATUS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP",
                "known-deviation": "FAIL", "unexpected-pass": "FAIL", "crashed": "FAIL", "blocked": "MISS"}
KCIDB_EXCERPT = 16384   # schema 5.3's maxLength of a test's log_excerpt


def kcidb_path(nodeid: str) -> str:
    """A KCIDB test path (dot-separated [A-Za-z0-9_-] words) from a pytest node id."""
    words = re.split(r"::|/|\[|\]|\.py", nodeid)
    clean = [re.sub(r"[^A-Za-z0-9_-]+", "_", w).strip("_") for w in words]
    return ".".join([KCIDB_ORIGIN] + [w for w in clean if w and w != "tests"])


def kcidb_crash(test: dict) -> dict:
    """A crashed test's title and console lines as log_excerpt (the schema forbids NUL and caps the length)."""
    if test["outcome"] != "crashed":
        return {}
    text = "\n".join([test["message"], *test.get("log", [])]).replace("\0", "")
    return {"log_excerpt": text[:KCIDB_EXCERPT]}


def kcidb(doc: dict) -> dict:
    """The run as KernelCI KCIDB I/O data: one checkout and build for the kernel, one test per item."""
    kernel = doc["host"].get("kernel", "unknown")
    run_id = hashlib.sha256(json.dumps(doc["host"], sort_keys=True).encode()).hexdigest()[:16]
    checkout_id = f"{KCIDB_ORIGIN}:{run_id}"
    build_id = f"{KCIDB_ORIGIN}:{run_id}-build"
    tests = []
    for t in doc["tests"]:
        known = t["outcome"] == "known-deviation"
        tests.append({
            "id": f"{KCIDB_ORIGIN}:{run_id}-{hashlib.sha256(t['nodeid'].encode()).hexdigest()[:16]}",
            "build_id": build_id, "origin": KCIDB_ORIGIN, "path": kcidb_path(t["nodeid"]),
            "status": KCIDB_STATUS[t["outcome"]], "duration": t.get("duration", 0.0),
            "comment": ("known deviation (catalog warning item): " if known else "") + t["message"][:1000],
            "environment": {"comment": ", ".join(f"{k}: {v}" for k, v in doc["host"].items())},
            "misc": {"nodeid": t["nodeid"], "catalog": t["catalog"], "groups": t["groups"],
                     "known_deviation": known,
                     **{k: t[k] for k in ("crash", "blocked_by", "precondition") if k in t}},
            **kcidb_crash(t),
        })
    return {
        "version": {"major": 5, "minor": 3},
        "checkouts": [{"id": checkout_id, "origin": KCIDB_ORIGIN, "comment": f"kernel {kernel}", "valid": True,
                       "misc": {"features": doc["features"], "findings": doc["findings"],
                                "crashes": doc.get("crashes", []), "boots": doc.get("boots", 1),
                                "incomplete": doc.get("incomplete", "")}}],
        "builds": [{"id": build_id, "checkout_id": checkout_id, "origin": KCIDB_ORIGIN,
                    "architecture": "x86_64", "config_name": kernel, "status": "PASS"}],
        "tests": tests,
    }
