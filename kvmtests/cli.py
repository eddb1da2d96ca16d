"""The `kvmtests` command: probe the host, re-render or compare saved runs, qualify kernel images."""
from __future__ import annotations

import argparse
import signal
import sys

from tabulate import tabulate

from . import bench
from .runner import kernels, lava, qualify


def _probe(args: argparse.Namespace) -> int:
    from .verdict.probe import probe_tables
    for title, rows, headers in probe_tables():
        print(f"== {title}")
        print(tabulate(rows, headers=headers if any(headers) else (), tablefmt="simple"))
        print()
    return 0


def _report(args: argparse.Namespace) -> int:
    """One file: its summary (and KCIDB, JUnit); several: the matrix. Exit 1 when any run failed."""
    import json

    from .verdict import junit, matrix, report
    try:
        docs = [report.load(f) for f in args.files]
    except report.NotResults as e:
        print(f"kvmtests report: {e}", file=sys.stderr)
        return 2
    if (args.kcidb or args.junit) and len(docs) > 1:
        print("kvmtests report: --kcidb and --junit export one run: pass one file with them", file=sys.stderr)
        return 2
    if len(docs) == 1 and not args.markdown:
        print(report.render(docs[0]))
    else:
        print(matrix.render(docs, markdown=args.markdown))
    if args.kcidb:
        with open(args.kcidb, "w") as f:
            json.dump(report.kcidb(docs[0]), f, indent=1)
        print(f"KCIDB data written to {args.kcidb}")
    if args.junit:
        with open(args.junit, "w") as f:
            f.write(junit.junit(docs[0]))
        print(f"JUnit XML written to {args.junit}")
    return 1 if any(d["exitstatus"] for d in docs) else 0


def _compare(args: argparse.Namespace) -> int:
    """Exit 1 on a crash, a regression or a lost feature group, 2 on bad input (one line), else 0."""
    import json

    from .verdict import compare, report
    try:
        base, cand = report.peek(args.base), report.peek(args.candidate)
        if base["format"] != cand["format"]:
            raise report.NotResults(f"{args.base} is results format {base['format']} and {args.candidate} format "
                                    f"{cand['format']}: compare runs written by kvmtests versions of one format")
        base, cand = report.check_format(base, args.base), report.check_format(cand, args.candidate)
    except report.NotResults as e:
        print(f"kvmtests compare: {e}", file=sys.stderr)
        return 2
    doc = compare.compare(base, cand, args.base, args.candidate)
    print(json.dumps(doc, indent=1) if args.json else compare.render(doc))
    return doc["exit"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmtests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("probe", help="print the host's identity, capabilities and feature groups").set_defaults(
        func=_probe)
    rp = sub.add_parser("report", help="re-render the summary of a saved run (--kvmtests-json file); with several "
                                       "runs, the matrix: feature groups as rows, runs as columns")
    rp.add_argument("files", nargs="+", metavar="FILE")
    rp.add_argument("--markdown", action="store_true", help="the matrix as a Markdown table (the README's)")
    rp.add_argument("--kcidb", metavar="OUT", help="also write the run as KernelCI KCIDB JSON (one file)")
    rp.add_argument("--junit", metavar="OUT", help="also write the run as JUnit XML (one file; crashes and blocked "
                                                   "tests included)")
    rp.set_defaults(func=_report)
    cp = sub.add_parser("compare", help="what changed from a baseline run to a candidate: per test, catalog row and "
                                        "feature group; exit 1 on a crash, a regression or a lost group",
                        description="Compare two saved runs (--kvmtests-json or qualify's results.json) by test id. "
                                    "Exit 1 when the candidate's kernel crashed where the base's did not (a test "
                                    "crashed or was blocked by a crash, or a new crash title), a test fails in the "
                                    "candidate but not in the base, or a feature group present in the base is not in "
                                    "the candidate; 2 on bad input; else 0.")
    cp.add_argument("base", metavar="BASE.json")
    cp.add_argument("candidate", metavar="CANDIDATE.json")
    cp.add_argument("--json", action="store_true", help="the comparison as JSON (the verdict in its 'verdict' key)")
    cp.set_defaults(func=_compare)
    for module in (bench, qualify, lava, kernels):
        module.register(sub)
    return p


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so an emulator that qualify started is killed, not orphaned."""
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lava"] and argv[1:2] != [] and argv[1] not in (*lava.SUBCOMMANDS, "-h", "--help"):
        argv = ["lava", "jobs", *argv[1:]]    # `kvmtests lava --kernel ...` writes jobs
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
