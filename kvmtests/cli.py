"""The `kvmtests` command: probe the host, re-render a saved run, qualify a kernel image."""
from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from . import bench
from .runner import kernels, qualify


def _probe(args: argparse.Namespace) -> int:
    from .verdict.probe import probe_tables
    for title, rows, headers in probe_tables():
        print(f"== {title}")
        print(tabulate(rows, headers=headers if any(headers) else (), tablefmt="simple"))
        print()
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from .verdict import report
    try:
        doc = report.load(args.file)
    except (OSError, ValueError, KeyError) as e:
        print(f"kvmtests report: cannot read {args.file}: {e}; pass a file written by --kvmtests-json",
              file=sys.stderr)
        return 2
    print(report.render(doc))
    if args.kcidb:
        with open(args.kcidb, "w") as f:
            json.dump(report.kcidb(doc), f, indent=1)
        print(f"KCIDB data written to {args.kcidb}")
    return 1 if doc["exitstatus"] else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmtests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("probe", help="print the host's identity, capabilities and feature groups").set_defaults(
        func=_probe)
    rp = sub.add_parser("report", help="re-render the summary of a saved run (--kvmtests-json file)")
    rp.add_argument("file")
    rp.add_argument("--kcidb", metavar="OUT", help="also write the run as KernelCI KCIDB JSON")
    rp.set_defaults(func=_report)
    for module in (bench, qualify, kernels):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
