"""`kvmtests lava`: the cells of a qualify matrix as LAVA jobs, for the labs that run real Intel and AMD machines
(or LAVA's own QEMU device type), and `kvmtests lava results`: what a finished job gives back, as results.json.

Each job deploys the kernel under test with a ramdisk that holds the suite (the self-contained guest the Bochs
runner boots, whose /init ends in a shell for LAVA's test shell), boots it, and runs one inline test definition
whose step runs the suite and reports every test as a LAVA test case (see labguest)."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from kvmtests.verdict.report import render

from . import initramfs, kernels, labresults, qualify, rootfs
from .console import RunnerError

QEMU_TYPE = "qemu"
PROMPT = "/ # "
DEFINITION = "kvmtests"   # the inline test definition's name: its test cases are in suite 0_kvmtests
JOB_TIMEOUT_MIN = 90
# The job context on LAVA's qemu device type: what `kvmtests qualify` gives QEMU (TCG's max CPU is AMD with SVM).
QEMU_CONTEXT = {"arch": "amd64", "cpu": "max", "memory": 2048, "no_kvm": "True", "extra_options": ["-smp 1"]}


def artifact_names(kernel: str) -> tuple[str, str]:
    """File names of a kernel's image and ramdisk under the artifacts directory."""
    label = re.sub(r"[^A-Za-z0-9._+-]+", "_", Path(kernel).name)
    return f"{label}/bzImage", f"{label}/ramdisk.cpio.gz"


def kernel_args(device_type: str, append: str) -> str:
    """The suite's words on the kernel command line (time stamps, panic reboots, which lab device) and the cell's."""
    words = f"printk.time=1 panic=-1 kvmtests.accel=lava:{device_type} {append}".strip()
    return f"console=ttyS0,115200 {words}" if device_type == QEMU_TYPE else words


def job(name: str, device_type: str, boot_method: str, kernel_url: str, ramdisk_url: str, append: str,
        context: dict, timeout_min: int) -> dict:
    """One cell's LAVA job: deploy, boot to the ramdisk's shell, run the suite as one inline test definition."""
    args = kernel_args(device_type, append)
    if device_type == QEMU_TYPE:
        deploy = {"to": "tmpfs", "images": {
            "kernel": {"url": kernel_url, "image_arg": f'-kernel {{kernel}} -append "{args}"'},
            "ramdisk": {"url": ramdisk_url, "image_arg": "-initrd {ramdisk}", "format": "cpio.newc",
                        "compression": "gz", "overlays": {"lava": True}}}}
        boot = {"method": "qemu", "media": "tmpfs", "prompts": [PROMPT]}
        context = QEMU_CONTEXT | context
    else:
        deploy = {"to": "tftp", "kernel": {"url": kernel_url, "type": "zimage"},
                  "ramdisk": {"url": ramdisk_url, "compression": "gz"}}
        boot = {"method": boot_method, "commands": "ramdisk", "prompts": [PROMPT]}
        context = {"extra_kernel_args": args} | context
    return {
        "job_name": name, "device_type": device_type, "visibility": "public", "priority": "medium",
        "context": context,
        "timeouts": {"job": {"minutes": timeout_min}, "action": {"minutes": 10}, "connection": {"minutes": 5}},
        "actions": [
            {"deploy": deploy | {"timeout": {"minutes": 10}}},
            {"boot": boot | {"timeout": {"minutes": 10}}},
            {"test": {"timeout": {"minutes": max(1, timeout_min - 20)}, "definitions": [{
                "from": "inline", "name": DEFINITION, "path": f"inline/{DEFINITION}.yaml",
                "repository": {"metadata": {"format": "Lava-Test Test Definition 1.0", "name": DEFINITION,
                                            "description": "kvmtests: KVM conformance for the Hyper-V VSM series"},
                               "run": {"steps": [Path(initramfs.LAB_SUITE).name]}}}]}},
        ],
    }


def device_dictionary() -> dict:
    """A QEMU device for lava-run on this machine: what lava-server renders from its qemu.jinja2 for QEMU_CONTEXT
    (TCG, `-cpu max`, 2 GB, one vCPU), without the network (the ramdisk needs none)."""
    return {
        "constants": {"posix": {"lava_test_sh_cmd": "/bin/sh", "lava_test_results_dir": "/lava-%s",
                                "lava_test_shell_file": "~/.bashrc"},
                      "shutdown-message": "The system is going down for reboot NOW",
                      "kernel-start-message": "Linux version [0-9]", "default-shell-prompt": "lava-test: # ",
                      "spawn_maxread": "4092", "failure_retry": 1, "boot_retry": None},
        "parameters": {"pass": None},
        "available_architectures": ["amd64", "x86_64"],
        "actions": {
            "deploy": {"connections": {"serial": None},
                       "methods": {"image": {"parameters": {"guest": {"size": 512, "interface": "ide",
                                                                      "driveid": "lavatest"}}}}},
            "boot": {"connections": {"serial": None}, "methods": {"minimal": None, "qemu": {"parameters": {
                "command": "qemu-system-x86_64",
                "boot_options": {"root": "/dev/ram0", "console": "ttyS0,115200", "boot_order": "c"},
                "options": ["-nographic", "-nic none", "-m 2048", "-monitor none", "-no-reboot"],
                "extra": ["-cpu max", "-smp 1"]}}}}},
        "timeouts": {"actions": {"apply-overlay-image": {"minutes": 5}, "lava-test-shell": {"minutes": 90},
                                 "auto-login-action": {"minutes": 10}, "boot-qemu-image": {"minutes": 10}},
                     "connections": {"auto-login-action": {"minutes": 10}, "lava-test-shell": {"minutes": 90}}},
    }


def build_ramdisk(out: Path, kernel: str, args: argparse.Namespace) -> None:
    """The suite's self-contained ramdisk for one kernel (its KVM modules), gzip'ed for the lab to download."""
    image, fetched = qualify.resolve_kernel(kernel)
    modules = qualify.modules_dir(image, qualify.kernel_release(image), args.modules or fetched)
    results = qualify.GUEST_RESULTS
    test_timeout = qualify.TEST_TIMEOUT["QEMU"] if args.test_timeout is None else args.test_timeout
    plan = initramfs.GuestPlan(
        project_dir=qualify.PROJECT_DIR,
        command=qualify.suite_command(results, qualify.pytest_args(args.pytest_args), args.require),
        env=qualify.guest_env(f"lava:{args.device_type}", os.environ, results, test_timeout),
        results_dir=results, root_tag="", results_tag="", host_files=tuple(rootfs.collect(qualify.PROJECT_DIR)),
        lab=f"cd {shlex.quote(str(qualify.PROJECT_DIR))} && {sys.executable} -m kvmtests.runner.labguest {results}")
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix("")
    initramfs.build(raw, initramfs.find_busybox(), modules, plan)
    with raw.open("rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    shutil.copyfile(image, out.with_name("bzImage"))


def write_jobs(args: argparse.Namespace) -> int:
    """Every cell's job, the artifacts they name, a device dictionary for lava-run here; one line per file."""
    out = Path(args.out).resolve()
    base = (args.artifact_url or (out / "artifacts").as_uri()).rstrip("/")
    try:
        context = dict(kv.split("=", 1) for kv in args.context)
    except ValueError:
        print("kvmtests lava: --context takes KEY=VALUE", file=sys.stderr)
        return qualify.EXIT_BAD_INPUT
    todo = qualify.cells(args)
    try:
        for kernel in dict.fromkeys(k for k, _ in todo):
            image_name, ramdisk_name = artifact_names(kernel)
            print(f"kvmtests lava: building the ramdisk of {kernel}", flush=True)
            build_ramdisk(out / "artifacts" / ramdisk_name, kernel, args)
    except RunnerError as exc:
        print(f"kvmtests lava: {exc}", file=sys.stderr)
        return qualify.EXIT_BAD_INPUT
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    for index, (kernel, variant) in enumerate(todo, 1):
        image_name, ramdisk_name = artifact_names(kernel)
        name = qualify.cell_dir(Path(), index, kernel, variant).name
        doc = job(f"kvmtests {name}", args.device_type, args.boot_method, f"{base}/{image_name}",
                  f"{base}/{ramdisk_name}", qualify.command_line(args.append, variant), context, args.job_timeout)
        path = out / "jobs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
        print(f"kvmtests lava: job {path}")
    device = out / "devices" / f"{QEMU_TYPE}.yaml"
    device.parent.mkdir(parents=True, exist_ok=True)
    device.write_text(yaml.safe_dump(device_dictionary(), sort_keys=False))
    print(f"kvmtests lava: artifacts under {out / 'artifacts'} (the jobs fetch them from {base}/)")
    if args.device_type == QEMU_TYPE:
        print(f"kvmtests lava: to run a job here: lava-run --job-id 1 --output-dir OUT --device {device} JOB.yaml "
              "2> job.log; then: kvmtests lava results job.log")
    return 0


def take_results(args: argparse.Namespace) -> int:
    """Write the job's results.json and print its summary; exit as `kvmtests report` does."""
    try:
        doc = labresults.load(Path(args.file))
    except labresults.NotLava as exc:
        print(f"kvmtests lava results: {exc}", file=sys.stderr)
        return qualify.EXIT_BAD_INPUT
    Path(args.output).write_text(json.dumps(doc, indent=1))
    print(render(doc))
    print(f"kvmtests lava results: {len(doc['tests'])} tests written to {args.output}")
    return 1 if doc["exitstatus"] else 0


SUBCOMMANDS = ("jobs", "results")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `lava jobs` (the default) and `lava results` to the kvmtests command line."""
    p = subparsers.add_parser("lava", help="write the qualify matrix as LAVA jobs, or read a finished job's results",
                              description="kvmtests lava [jobs] --kernel ... writes one LAVA job per matrix cell; "
                                          "kvmtests lava results LOG turns a finished job into results.json.")
    sub = p.add_subparsers(dest="lava_command", required=True)
    j = sub.add_parser("jobs", help="one LAVA job per cell (every --kernel with every --variant), the artifacts "
                                    "they deploy (kernel, ramdisk with the suite) and a QEMU device dictionary")
    j.add_argument("--kernel", required=True, action="append", metavar="IMAGE",
                   help=f"kernel image, or a name fetched or built first: {', '.join(kernels.NAMES)}; repeat it")
    j.add_argument("--modules", type=Path, metavar="DIR", help="the kernel's lib/modules/<release>")
    j.add_argument("--variant", action="append", metavar="ARGS", help="a kernel command-line variant per cell")
    j.add_argument("--append", default="", metavar="ARGS", help="kernel command line for every cell")
    j.add_argument("--require", default="", metavar="GROUPS", help="gating, as qualify --require")
    j.add_argument("--test-timeout", type=float, metavar="SECONDS", help="per-test deadline in the guest")
    j.add_argument("--device-type", default=QEMU_TYPE, metavar="TYPE",
                   help="the lab's device type: qemu (default) or an x86 board type, e.g. x86 or a lab's own")
    j.add_argument("--boot-method", default="ipxe", metavar="METHOD",
                   help="boot method of a board device type (default ipxe; grub for GRUB boards)")
    j.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                   help="job context, e.g. cpu=host no_kvm=False for a qemu device with KVM (repeat it)")
    j.add_argument("--artifact-url", metavar="URL",
                   help="where the lab downloads the artifacts: the base URL that serves OUT/artifacts "
                        "(default file:// of OUT/artifacts, for lava-run on this machine)")
    j.add_argument("--out", default="kvmtests-lava", metavar="OUT",
                   help="directory for jobs/, artifacts/ and devices/ (default kvmtests-lava)")
    j.add_argument("--job-timeout", type=int, default=JOB_TIMEOUT_MIN, metavar="MINUTES",
                   help=f"the job's timeout (default {JOB_TIMEOUT_MIN}); the test action gets 20 minutes less")
    j.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST-ARGS",
                   help="more arguments for pytest in the guest, as with qualify")
    j.set_defaults(func=write_jobs)
    r = sub.add_parser("results", help="a finished job's log (lava-run's, or a server's output.yaml) or results "
                                       "export (/results/JOB/yaml) as a kvmtests results.json")
    r.add_argument("file", metavar="LOG|EXPORT")
    r.add_argument("-o", "--output", default="results.json", metavar="FILE",
                   help="where the results go (default results.json)")
    r.set_defaults(func=take_results)
