"""A saved run as JUnit XML: pytest's own file covers one boot, this one the whole run (crashes, resumes, blocked
rows) for CI systems that read only JUnit."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter

from .report import crash_line

# outcome -> (the testcase's child element, its type attribute); a pass has none
ELEMENTS = {"failed": ("failure", None), "unexpected-pass": ("failure", "unexpected-pass"),
            "crashed": ("failure", "crashed"), "error": ("error", None), "skipped": ("skipped", "pytest.skip"),
            "known-deviation": ("skipped", "pytest.xfail"), "blocked": ("skipped", "blocked")}
COUNTS = {"failure": "failures", "error": "errors", "skipped": "skipped"}
# what XML 1.0 cannot carry (a console log's escape sequences): written as #x1B, as pytest's junitxml does
ILLEGAL = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """Text that XML 1.0 can carry, so that a console line never makes the file unreadable."""
    return ILLEGAL.sub(lambda m: f"#x{ord(m.group()):02X}", text)


def names(nodeid: str) -> tuple[str, str]:
    """classname and name as pytest's junitxml splits a node id, so both files name a test alike."""
    path, bracket, params = nodeid.partition("[")
    parts = path.split("::")
    parts[0] = parts[0].replace("/", ".").removesuffix(".py")
    return ".".join(parts[:-1]), parts[-1] + bracket + params


def testcase(test: dict) -> ET.Element:
    """One test; its failure, error or skip carries the first line of its message and the whole as text."""
    classname, name = names(test["nodeid"])
    case = ET.Element("testcase", classname=classname, name=name, time=f"{test.get('duration', 0.0):.3f}")
    if test["outcome"] in ELEMENTS:
        tag, kind = ELEMENTS[test["outcome"]]
        lines = test["message"].splitlines()
        child = ET.SubElement(case, tag, message=xml_text(lines[0] if lines else ""),
                              **({"type": kind} if kind else {}))
        child.text = xml_text("\n".join(test.get("log", [])) if test["outcome"] == "crashed" else test["message"])
    return case


def properties(doc: dict) -> list[tuple[str, str]]:
    """The host, the boots and crashes, and why the run ended early: what no testcase of a JUnit file can say."""
    incomplete = [("incomplete", doc["incomplete"])] if doc.get("incomplete") else []
    return [*doc["host"].items(), ("boots", str(doc.get("boots", 1))), ("shards", str(doc.get("shards", 1))),
            *(("crash", crash_line(c)) for c in doc.get("crashes", [])), *incomplete]


def junit(doc: dict) -> str:
    """The run as one JUnit testsuite with pytest's counts: failures include crashes, skipped the blocked tests."""
    kinds = Counter(ELEMENTS[t["outcome"]][0] for t in doc["tests"] if t["outcome"] in ELEMENTS)
    suite = ET.Element("testsuite", name="kvmtests", tests=str(len(doc["tests"])),
                       **{attr: str(kinds[tag]) for tag, attr in COUNTS.items()},
                       time=f"{sum(t.get('duration', 0.0) for t in doc['tests']):.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in properties(doc):
        ET.SubElement(props, "property", name=xml_text(name), value=xml_text(str(value)))
    suite.extend(testcase(t) for t in doc["tests"])
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
