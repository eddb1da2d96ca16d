"""`kvmtests compare`: what a candidate kernel's run changed against a baseline's, to gate a backport.

Runs from different kernels, hosts and suite versions match by test id; catalog rows and feature groups
summarise the same changes."""
from __future__ import annotations

from collections import Counter

from tabulate import tabulate

from . import features
from .report import CORE, OUTCOMES, cell, crash_titles, group_counts, ranges

BAD = ("failed", "error", "crashed")
NOT_RUN = ("skipped", "blocked")
CRASH = ("crashed", "blocked")
# category -> heading; the order is the report's
CATEGORIES = {
    "crashed": "crashed: the candidate's kernel crashed in these tests",
    "blocked": "blocked: not run in the candidate, the kernel crashed on their feature group's path",
    "regression": "regressions: failed in the candidate, not in the base",
    "fixed": "fixed: failed in the base, passes in the candidate",
    "unexpected-pass": "known deviation -> unexpected pass: the catalog's warning item no longer reproduces",
    "started": "started running: skipped in the base",
    "stopped": "stopped running: skipped in the candidate",
    "only-base": "tests only in the base run",
    "only-candidate": "tests only in the candidate run",
}
EXIT_REGRESSION = 1


def identity(doc: dict) -> str:
    """Which run a document is: kernel release, CPU, environment and command-line variant."""
    h = doc["host"]
    return (f"{h.get('kernel', '?')}, {h.get('cpu vendor', '?')} {h.get('vendor module', '?')}, "
            f"{h.get('environment', '?')}, command line {h.get('command line', '-')}")


def _xpass(test: dict) -> bool:
    """An unexpected pass, also as files written before it had its own outcome (failed, "[XPASS(strict)] ...")."""
    return test["outcome"] == "unexpected-pass" or (test["outcome"] == "failed" and "XPASS" in test["message"])


def category(base: dict | None, cand: dict | None) -> str | None:
    """How one test changed; None when it did not in a way the comparison reports."""
    if cand is None:
        return "only-base"
    b, c = base and base["outcome"], cand["outcome"]
    if c in CRASH and b != c:
        return c
    if base is None:
        return "regression" if c in BAD and not _xpass(cand) else "only-candidate"
    if (_xpass(cand) and not _xpass(base)) or (b == "known-deviation" and c == "passed"):
        return "unexpected-pass"
    if c in BAD and b not in BAD:
        return "regression"
    if b in BAD and c not in BAD and c != "skipped":
        return "fixed"
    if b in NOT_RUN and c not in NOT_RUN:
        return "started"
    if b not in NOT_RUN and c == "skipped":
        return "stopped"
    return None


def _why(cat: str, base: dict | None, cand: dict | None) -> str:
    """The message that explains the change: the skip reason that went away or came, or the failure."""
    side = base if cat in ("fixed", "started", "only-base") else cand
    lines = (side or {}).get("message", "").strip().splitlines()
    return lines[0] if lines else ""


def _groups(base: dict, cand: dict) -> list[dict]:
    """Per feature group: detection and outcome counts on both sides, and what changed."""
    bc, cc = group_counts(base), group_counts(cand)
    out = []
    for g in [*features.GROUPS, CORE]:
        b = base["features"].get(g, {"state": "-", "how": ""})
        c = cand["features"].get(g, {"state": "-", "how": ""})
        if b["state"] == features.PRESENT and c["state"] != features.PRESENT:
            change = "lost"
        elif c["state"] == features.PRESENT and b["state"] != features.PRESENT:
            change = "gained"
        elif b["state"] != c["state"]:
            change = "detection changed"
        elif bc.get(g, Counter()) != cc.get(g, Counter()):
            change = "counts changed"
        else:
            change = None
        out.append({"group": g, "change": change,
                    "base": {**b, "counts": {o: bc.get(g, Counter())[o] for o in OUTCOMES}},
                    "candidate": {**c, "counts": {o: cc.get(g, Counter())[o] for o in OUTCOMES}}})
    return out


def compare(base: dict, cand: dict, base_name: str = "base", cand_name: str = "candidate") -> dict:
    """The comparison as one JSON-ready document, ending in its verdict and exit status."""
    btests = {t["nodeid"]: t for t in base["tests"]}
    ctests = {t["nodeid"]: t for t in cand["tests"]}
    tests: dict[str, list[dict]] = {cat: [] for cat in CATEGORIES}
    for nodeid in sorted(btests.keys() | ctests.keys()):
        b, c = btests.get(nodeid), ctests.get(nodeid)
        cat = category(b, c)
        if cat:
            tests[cat].append({"nodeid": nodeid, "catalog": (c or b)["catalog"], "groups": (c or b)["groups"],
                               "base": b["outcome"] if b else None, "candidate": c["outcome"] if c else None,
                               "why": _why(cat, b, c)})
    rows = {cat: sorted({n for t in tests[cat] for n in t["catalog"]})
            for cat in ("crashed", "blocked", "regression", "fixed", "unexpected-pass", "started", "stopped")}
    groups = _groups(base, cand)
    doc = {"base": _side(base, base_name), "candidate": _side(cand, cand_name),
           "tests": tests, "catalog rows": rows, "groups": groups,
           "crashes": _new_vanished(crash_titles(base), crash_titles(cand)),
           "findings": _new_vanished(base.get("findings", []), cand.get("findings", []))}
    bad = tests["crashed"] or tests["blocked"] or doc["crashes"]["new"] or tests["regression"] or _lost(groups)
    doc["exit"] = EXIT_REGRESSION if bad else 0
    doc["verdict"] = verdict(doc)
    return doc


def _side(doc: dict, name: str) -> dict:
    """A run's file, identity, and why it ended early (empty when it completed)."""
    return {"file": name, "run": identity(doc), "incomplete": doc.get("incomplete", "")}


def _new_vanished(base: list[str], cand: list[str]) -> dict[str, list[str]]:
    return {"new": [x for x in cand if x not in base], "vanished": [x for x in base if x not in cand]}


def _lost(groups: list[dict]) -> list[str]:
    return [g["group"] for g in groups if g["change"] == "lost"]


def _first(items: list[str]) -> str:
    """The first three of a verdict's list, and how many more, so that the verdict stays one line."""
    return "; ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _crash_verdict(doc: dict) -> list[str]:
    """The verdict's first part: the candidate's new crash titles and the tests that crashed or did not run."""
    t = doc["tests"]
    titles = list(dict.fromkeys([x["why"] for x in t["crashed"]] + doc["crashes"]["new"]))
    if not titles and not t["blocked"]:
        return []
    counts = ([f"{len(t['crashed'])} test{'s' if len(t['crashed']) > 1 else ''} crashed"] if t["crashed"] else []) \
        + ([f"{len(t['blocked'])} blocked"] if t["blocked"] else [])
    return ["kernel crashed" + (f" ({_first(titles)})" if titles else " as in the base")
            + (f": {', '.join(counts)}" if counts else "")]


def verdict(doc: dict) -> str:
    """One line: regression or not, and the counts behind it; a crash first, as the most severe."""
    t, lost = doc["tests"], _lost(doc["groups"])
    if doc["exit"]:
        named = [f"{x['nodeid']} ({x['base'] or 'not in base'} -> {x['candidate']}"
                 + (f", catalog {ranges(x['catalog'])})" if x["catalog"] else ")") for x in t["regression"]]
        parts = _crash_verdict(doc) + \
            ([f"{len(t['regression'])} regressed: " + _first(named)] if named else []) + \
            ([f"groups no longer present: {', '.join(lost)}"] if lost else [])
        return f"compare: REGRESSION: {'; '.join(parts)}"
    started = doc["catalog rows"]["started"]
    return (f"compare: no regression: {len(t['fixed'])} fixed, {len(t['started'])} started running"
            + (f" (catalog {ranges(started)})" if started else "")
            + f", {len(t['stopped'])} stopped running, {len(t['unexpected-pass'])} unexpected passes")


def _cell(side: dict) -> str:
    return cell(side["state"], side["counts"])


def render(doc: dict) -> str:
    """The comparison for people: changed tests by category, catalog rows, groups, findings, verdict last."""
    parts = ["\n".join([f"{side + ':':<10} {doc[side]['run']}  ({doc[side]['file']})" for side in ("base", "candidate")]
                       + [f"{side} run INCOMPLETE: {doc[side]['incomplete']}" for side in ("base", "candidate")
                          if doc[side]["incomplete"]])]
    for cat, heading in CATEGORIES.items():
        items = doc["tests"][cat]
        if not items:
            continue
        lines = [f"{heading} ({len(items)})"]
        for t in items:
            row = f"catalog {ranges(t['catalog'])}" if t["catalog"] else "no catalog row"
            move = f"{t['base'] or '-'} -> {t['candidate'] or '-'}"
            lines.append(f"  {t['nodeid']}  [{row}]  {move}" + (f": {t['why']}" if t["why"] else ""))
        parts.append("\n".join(lines))
    rows = doc["catalog rows"]
    crashed = [(cat, label) for cat, label in (("crashed", "that crashed the kernel"),
                                               ("blocked", "blocked by a crash")) if rows[cat]]
    parts.append("\n".join(f"catalog rows {label}: {ranges(rows[cat])}" for cat, label in (
        *crashed, ("regression", "that regressed"), ("fixed", "fixed"), ("unexpected-pass", "with an unexpected pass"),
        ("started", "that start running"), ("stopped", "that stop running"))))
    changed = [g for g in doc["groups"] if g["change"]]
    if changed:
        table = [[g["group"], g["change"], _cell(g["base"]), _cell(g["candidate"]),
                  g["candidate"]["how"] if g["change"] in ("lost", "gained", "detection changed") else ""]
                 for g in changed]
        parts.append(tabulate(table, headers=["group", "change", "base", "candidate", "candidate detected by"],
                              tablefmt="simple") + "\n(state, then pass/fail/skip/known-deviation counts, + unexpected "
                                                    "passes, errors, crashed and blocked tests)")
    else:
        parts.append("feature groups: no change in detection or counts")
    findings = [f"{kind} {what}: {f}" for what, key in (("crash", "crashes"), ("finding", "findings"))
                for kind in ("new", "vanished") for f in doc[key][kind]]
    parts.extend(["\n".join(findings)] if findings else [])
    parts.append(doc["verdict"])
    return "\n\n".join(parts)
