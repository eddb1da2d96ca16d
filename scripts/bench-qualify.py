#!/usr/bin/env python3
"""Time `kvmtests qualify` from command to verdict, as a person runs it to fill the README's figures: one cell
under Bochs whole (--shards 1) and split (the default shards, balanced by the whole run's durations), and a
3-cell AMD matrix one cell at a time and two at once (--shards 1 in both, so only --jobs differs). Each pair
must give every test the same outcome. Needs the kernels cached (kvmtests kernel fetch NAME) and a quiet machine.

Usage: scripts/bench-qualify.py [--out DIR] [--skip-intel] [--skip-matrix]"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

from kvmtests.runner import shards
from kvmtests.verdict import report

INTEL_KERNEL = "debian-6.12-sw-protected"
MATRIX = ("debian-6.12", "debian-6.1", "debian-6.12-sw-protected")


def timed(argv: list[str], log: Path) -> tuple[float, int]:
    """Wall seconds and exit status of one kvmtests command, its output kept in log."""
    start = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "kvmtests.cli", *argv], stdout=out,
                            stderr=subprocess.STDOUT).returncode
    return time.monotonic() - start, rc


def outcomes(path: Path) -> dict[str, str]:
    """Every test's outcome in one results file."""
    return {t["nodeid"]: t["outcome"] for t in report.load(path)["tests"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("kvmtests-bench-qualify"))
    p.add_argument("--skip-intel", action="store_true")
    p.add_argument("--skip-matrix", action="store_true")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.skip_intel:
        whole, split = out / "intel-whole", out / "intel-split"
        k = shards.default_count(1, 2048)
        t1, rc1 = timed(["qualify", "--kernel", INTEL_KERNEL, "--cpu", "intel", "--shards", "1", "--results",
                         str(whole)], out / "intel-whole.log")
        t2, rc2 = timed(["qualify", "--kernel", INTEL_KERNEL, "--cpu", "intel", "--durations",
                         str(whole / "results.json"), "--results", str(split)], out / "intel-split.log")
        same = outcomes(whole / "results.json") == outcomes(split / "results.json")
        rows += [[f"{INTEL_KERNEL} --cpu intel", "--shards 1", f"{t1:.0f}", rc1, ""],
                 [f"{INTEL_KERNEL} --cpu intel", f"default ({k} shards)", f"{t2:.0f}", rc2,
                  f"{t1 / t2:.2f}x, outcomes {'identical' if same else 'DIFFER'}"]]
    if not args.skip_matrix:
        cells = [w for k in MATRIX for w in ("--kernel", k)]
        results = {}
        for jobs in ("1", "2"):
            where = out / f"matrix-jobs{jobs}"
            took, rc = timed(["qualify", *cells, "--shards", "1", "--jobs", jobs, "--results", str(where)],
                             out / f"matrix-jobs{jobs}.log")
            text = (out / f"matrix-jobs{jobs}.log").read_text()
            results[jobs] = (took, rc, text[text.find("== kvmtests matrix"):].replace(str(where), "DIR"),
                             {f.parent.name: outcomes(f) for f in where.glob("*/results.json")})
        same = results["1"][2] == results["2"][2] and results["1"][3] == results["2"][3]
        rows += [["3-cell AMD matrix", "--jobs 1 --shards 1", f"{results['1'][0]:.0f}", results["1"][1], ""],
                 ["3-cell AMD matrix", "--jobs 2 --shards 1", f"{results['2'][0]:.0f}", results["2"][1],
                  f"{results['1'][0] / results['2'][0]:.2f}x, matrix and outcomes "
                  f"{'identical' if same else 'DIFFER'}"]]
    print(tabulate(rows, headers=["run", "options", "seconds", "exit", "speed-up"], tablefmt="github"))
    (out / "figures.json").write_text(json.dumps(rows))
    return 0 if all("DIFFER" not in r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
