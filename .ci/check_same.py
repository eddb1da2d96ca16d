"""CI: two runs of one kernel and selection (a LAVA job's, taken back with `kvmtests lava results`, and
qualify's) give every test the same outcome, and compare finds nothing to report."""
import sys

from kvmtests.verdict import compare, report


def differences(base_path: str, cand_path: str) -> list[str]:
    """Each test whose outcome differs, each test only one run has, and each change compare reports."""
    base, cand = report.load(base_path), report.load(cand_path)
    b = {t["nodeid"]: t["outcome"] for t in base["tests"]}
    c = {t["nodeid"]: t["outcome"] for t in cand["tests"]}
    lines = [f"{n}: {b.get(n, 'not run')} -> {c.get(n, 'not run')}" for n in sorted(b.keys() | c.keys())
             if b.get(n) != c.get(n)]
    doc = compare.compare(base, cand)
    lines += [f"compare: {cat}: {t['nodeid']}" for cat, items in doc["tests"].items() for t in items]
    return lines or ([] if b else ["the base run has no tests"])


if __name__ == "__main__":
    found = differences(sys.argv[1], sys.argv[2])
    for line in found:
        print(f"same run: {line}")
    print("same run: " + ("FAILED" if found else f"every test's outcome identical ({sys.argv[1]}, {sys.argv[2]})"))
    sys.exit(1 if found else 0)
