"""CI: a qualification with a crash forced at one test against the clean run of the same kernel.

Every other test keeps its verdict, the culprit is crashed with a title naming sysrq, the run took one boot more
than it has shards, and the comparison names the culprit alone."""
import sys

from kvmtests.verdict import compare, report


def check(clean_path: str, crashed_path: str, culprit: str) -> list[str]:
    """What the crashed run got wrong, one line each."""
    clean, crashed = report.load(clean_path), report.load(crashed_path)
    problems = []
    got = {t["nodeid"]: t for t in crashed["tests"]}
    if len(crashed["tests"]) != len(clean["tests"]):
        problems.append(f"{len(crashed['tests'])} verdicts, the clean run has {len(clean['tests'])}")
    test = got.get(culprit)
    if test is None or test["outcome"] != "crashed" or "sysrq" not in test["message"]:
        problems.append(f"{culprit}: {test and (test['outcome'], test['message'])}, expected crashed with a sysrq title")
    boots = crashed.get("shards", 1) + 1   # one boot per shard, and one more for the crashed shard
    if crashed.get("boots") != boots:
        problems.append(f"{crashed.get('boots')} boots, expected {boots}")
    doc = compare.compare(clean, crashed)
    changed = {t["nodeid"] for items in doc["tests"].values() for t in items}
    if changed != {culprit}:
        problems.append(f"compare changed {sorted(changed)}, expected only the culprit")
    return problems


if __name__ == "__main__":
    found = check(*sys.argv[1:4])
    for line in found:
        print(f"crash run: {line}")
    print("crash run: " + ("FAILED" if found else f"every verdict kept, {sys.argv[3]} crashed, one more boot"))
    sys.exit(1 if found else 0)
