"""The kernel matrix: several saved runs side by side, feature groups as rows, so a lab's runs read as one table."""
from __future__ import annotations

from collections import Counter

from tabulate import tabulate

from . import features
from .report import CORE, cell, crash_titles, group_counts, required_absent

IDENTITY = (("kernel", "kernel"), ("cpu", "cpu vendor"), ("environment", "environment"),
            ("command line", "command line"))
LEGEND = ("cells: detected state, then pass/fail/skip/known-deviation counts (+ unexpected passes, errors, crashed "
          "and blocked tests); total: the run's exit status, whether its kernel crashed, its boots if more than one "
          "per shard")


def _counts(doc: dict) -> tuple[dict[str, Counter], Counter]:
    return group_counts(doc), Counter(t["outcome"] for t in doc["tests"])


def total(doc: dict) -> str:
    """A run's total cell state: its exit status, and whether its kernel crashed and had to boot again."""
    boots, shards = doc.get("boots", 1), doc.get("shards", 1)
    return f"exit {doc['exitstatus']}" + (", crashed" if crash_titles(doc) else "") + \
        (f", {boots} boots" + (f" over {shards} shards" if shards > 1 else "") if boots > shards else "")


def column(doc: dict) -> list[str]:
    """A run's header lines: kernel release, CPU (vendor and KVM module), environment, command-line variant."""
    h = doc["host"]
    cpu = f"{h.get('cpu vendor', '?')} {h.get('vendor module', '?')}"
    return [h.get("kernel", "?"), cpu, h.get("environment", "?").removesuffix(" (kvmtests qualify)"),
            h.get("command line", "-")]


def rows(docs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers (one per run, numbered) and one row per feature group, core and total."""
    headers = ["run\n" + "\n".join(label for label, _ in IDENTITY)] + \
              [f"#{i}\n" + "\n".join(column(d)) for i, d in enumerate(docs, 1)]
    counted = [_counts(d) for d in docs]
    body = []
    for g in features.GROUPS:
        body.append([g] + [cell(d["features"].get(g, {"state": "-"})["state"], per.get(g, Counter()))
                           for d, (per, _) in zip(docs, counted)])
    body.append([CORE] + [cell("-", per.get(CORE, Counter())) for per, _ in counted])
    body.append(["total"] + [cell(total(d), outcomes) for d, (_, outcomes) in zip(docs, counted)])
    return headers, body


def notes(docs: list[dict]) -> list[str]:
    """Crashes, runs that ended early, findings and failed gates below the table, each with the runs it appeared in."""
    seen: dict[str, list[int]] = {}
    for i, d in enumerate(docs, 1):
        for title in crash_titles(d):
            seen.setdefault(f"CRASH: {title}", []).append(i)
        if d.get("incomplete"):
            seen.setdefault(f"INCOMPLETE: {d['incomplete']}", []).append(i)
        for line in d.get("findings", []):
            seen.setdefault(f"finding: {line}", []).append(i)
        for line in required_absent(d):
            seen.setdefault(f"FAILED {line}", []).append(i)
    return [f"{' '.join(f'#{i}' for i in runs)}: {text}" for text, runs in seen.items()]


def render(docs: list[dict], markdown: bool = False) -> str:
    """The matrix as text (or a Markdown table for the README), findings below."""
    headers, body = rows(docs)
    if markdown:
        headers = [h.replace("\n", "<br>") for h in headers]
    table = tabulate(body, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True)
    below = [f"- {line}" if markdown else line for line in notes(docs)]
    return "\n\n".join([table, LEGEND] + (["\n".join(below)] if below else []))
