"""`kvmtests qualify`: boot a kernel image in an emulator (QEMU for AMD, Bochs for Intel), run the suite
inside, bring the results back."""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import kvmtests
from kvmtests.machine import host
from kvmtests.verdict import matrix, stream
from kvmtests.verdict.features import parse_required
from kvmtests.verdict.junit import junit
from kvmtests.verdict.report import NotResults, load, render

from . import bochs, console, initramfs, kernels, parallel, qemu, resume, rootfs, shards, symbols
from .console import RunnerError
from .monitor import Monitor

PROJECT_DIR = Path(kvmtests.__file__).resolve().parent.parent
PYTEST_PLUGIN = "kvmtests.verdict.plugin"  # provides --kvmtests-json
# Left out of a guest's pytest, each costing an emulated boot seconds: pytest's collector of unraisable exceptions
# (five garbage collections at exit; Python's own hook still prints one on the console) and Hypothesis' plugin
# (it imports all of Hypothesis for its summary, in a shard with no Hypothesis test too; the model test drives
# Hypothesis itself, with its own profiles).
GUEST_UNPLUGGED = ("-p", "no:unraisableexception", "-p", "no:hypothesispytest")
PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *GUEST_UNPLUGGED, "-p", PYTEST_PLUGIN)
SELECTION = ("-m", "not selftest")   # the guest runs the suite but its self-tests
CHILD = (sys.executable, "-m", "kvmtests.cli")   # a shard's or a cell's own run, with --jobs or --shards
ROOT_TAG = "hostroot"
RESULTS_TAG = "results"
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 124
EXIT_NO_VERDICT = 125
DEFAULT_VARIANT = "default"
OUTPUTS = ("rc", "results.json", "junit.xml", "console.log", "bochs.log")
GUEST_RESULTS = Path("/kvmtests-results")  # where a self-contained guest collects them before sending them
# --boot-timeout defaults: Bochs reads the initramfs through the emulated BIOS and boots at 100 MIPS.
BOOT_TIMEOUT = {"QEMU": 300.0, "Bochs": 900.0}
# --test-timeout defaults, in the guest's seconds: many times the slowest test (the Hypothesis model test: 6 s under
# QEMU TCG on debian-6.12-sw-protected, several times that on a kernel with the series or under Bochs).
TEST_TIMEOUT = {"QEMU": 120.0, "Bochs": 300.0}
# Time the guest's own watchdog gets, past the deadline, to print the overdue test's stacks.
STACKS_GRACE = {"QEMU": 30.0, "Bochs": 120.0}
MAX_RESUMES = 5
CONSOLE = "/dev/console"     # where the guest's suite streams its events
RESUME_FILE = "resume.json"  # in the results directory the guest sees
# test_attr_model's profile for qualify: no shrinking, so a failing kernel gets its verdict (and seed) fast
HYPOTHESIS_PROFILE = ("KVMTESTS_HYPOTHESIS_PROFILE", "qualify")


def kernel_release(image: Path) -> str:
    """Check that image is an x86 bzImage and return the release string from its setup header."""
    try:
        with image.open("rb") as f:
            head = f.read(0x10200)  # the version string may sit up to 0xffff past the header
    except FileNotFoundError:
        raise RunnerError(f"{image} does not exist: give a kernel image path or one of "
                          f"{', '.join(kernels.NAMES)}") from None
    except OSError as exc:
        raise RunnerError(f"cannot read {image}: {exc.strerror}; check the path and its permissions") from None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise RunnerError(f"{image} is not an x86 kernel image (bzImage): pass arch/x86/boot/bzImage "
                          "or /boot/vmlinuz-*")
    offset, = struct.unpack_from("<H", head, 0x20E)
    start = 0x200 + offset
    if offset == 0 or start >= len(head):
        return ""
    version = head[start: head.find(b"\0", start)].decode(errors="replace")
    return version.split(" ", 1)[0]


def modules_dir(image: Path, release: str, given: Path | None) -> Path | None:
    """--modules, else lib/modules/<release> beside the image's boot/ directory; None: drivers built in."""
    if given is not None:
        if not given.is_dir():
            raise RunnerError(f"--modules {given} is not a directory: pass the kernel's lib/modules/<release>")
        return given
    root = image.resolve().parent.parent
    candidates = [root / "lib" / "modules" / release, root / "usr" / "lib" / "modules" / release]
    for candidate in candidates:
        if release and candidate.is_dir():
            return candidate
    return None


def nested_virt(sys_module: Path = Path("/sys/module")) -> bool:
    """True when the host's kvm_intel or kvm_amd offers nested VMX/SVM, which a KVM guest needs here."""
    for module in ("kvm_intel", "kvm_amd"):
        param = sys_module / module / "parameters" / "nested"
        if param.exists() and param.read_text().strip() in ("Y", "y", "1"):
            return True
    return False


def choose_accel(requested: str, dev_kvm: Path = Path("/dev/kvm"),
                 sys_module: Path = Path("/sys/module")) -> str:
    """Resolve --accel: auto takes KVM only when the guest can itself run KVM (nested), else TCG."""
    if requested == "kvm" and not os.access(dev_kvm, os.R_OK | os.W_OK):
        raise RunnerError(f"--accel kvm needs a usable {dev_kvm}: use --accel tcg")
    if requested == "auto":
        return "kvm" if os.access(dev_kvm, os.R_OK | os.W_OK) and nested_virt(sys_module) else "tcg"
    return requested


def suite_command(results: Path, pytest_args: Sequence[str], require: str = "") -> list[str]:
    """The pytest command run in the guest (one vCPU: serial), writing JUnit and JSON to results.

    The host prints the summary from the JSON, so the guest does not; the suite's self-tests stay out
    (they check kvmtests, not the kernel, and the host already runs them); PYTEST-ARGS come after
    these defaults and add to them (a later -m replaces the default one)."""
    cmd = [*PYTEST, "-n", "0", "--no-kvmtests-summary", f"--kvmtests-json={results / 'results.json'}",
           f"--kvmtests-stream={CONSOLE}", f"--junitxml={results / 'junit.xml'}", *SELECTION]
    return cmd + ([f"--require={require}"] if require else []) + list(pytest_args)


def collect_command(pytest_args: Sequence[str]) -> list[str]:
    """The same selection as suite_command's, collected on the host to plan the shards."""
    return [*PYTEST, *SELECTION, *pytest_args, "--collect-only", "-q"]


def guest_env(accel: str, host_env: Mapping[str, str], results: Path, test_timeout: float) -> dict[str, str]:
    """The suite's environment: HOME, PATH and KVMTESTS_* from the host, plus the accelerator, the per-test
    deadline and where a resumed boot finds what earlier boots did; the Hypothesis profile is the qualify one
    unless the host names another."""
    name, profile = HYPOTHESIS_PROFILE
    env = {name: profile} | {k: v for k, v in host_env.items() if k in ("HOME", "PATH") or k.startswith("KVMTESTS_")}
    env.update({"KVMTESTS_ACCEL": accel, "TERM": "dumb", stream.RESUME_ENV: str(results / RESUME_FILE),
                stream.TEST_TIMEOUT_ENV: f"{test_timeout:g}", stream.DEADLINE_ENV: initramfs.DEADLINE_FILE})
    return env


def kernel_cmdline(accel: str, extra: str = "") -> str:
    """Console on the serial port at the 16550's fastest rate (Bochs keeps to the rate: at the kernel's default 9600
    baud the suite's events and results took minutes to send), time stamps on the kernel's lines (they tell them
    from the suite's), a panic ends the run, the suite can tell which emulator it runs in; then --append
    (kvmtests.accel= names QEMU's accelerator, or bochs)."""
    return f"console=ttyS0,115200 printk.time=1 panic=-1 kvmtests.accel={accel} {extra}".strip()


def qemu_cpu(cpu: str | None, accel: str) -> str:
    """The QEMU -cpu model: a model name as given; amd (or none) is the host's under KVM, else TCG's max (AMD)."""
    if cpu not in (None, "amd"):
        return cpu
    if accel == "kvm" and cpu == "amd" and host.cpu_vendor() != "AuthenticAMD":
        raise RunnerError("--cpu amd needs an AMD host for --accel kvm: use --accel tcg (QEMU's max CPU is AMD)")
    return "host" if accel == "kvm" else "max"


def resolve_kernel(spec: str) -> tuple[Path, Path | None]:
    """--kernel is a path, or a stock kernel name that is fetched (and brings its modules) first."""
    if not Path(spec).exists() and spec in kernels.NAMES:
        kernel = kernels.fetch(spec)
        return kernel.image, kernel.modules
    return Path(spec), None


def pytest_args(remainder: Sequence[str]) -> list[str]:
    """The arguments after `--`, which argparse's REMAINDER keeps the separator of."""
    return list(remainder[1:] if remainder[:1] == ["--"] else remainder)


def no_suite(results: Path, run: console.RunResult, boot_timeout: float, timeout: float, emulator: str = "QEMU") -> int:
    """The suite never ran, or ended with no verdict and no crash: one line that says why, and the console's end."""
    log = results / "console.log"
    start = run.marks.get(console.SUITE_START)
    if run.timed_out == "boot":
        line, code = f"kernel did not reach the test runner within {boot_timeout:g} s", EXIT_TIMEOUT
    elif run.timed_out == "suite":
        line, code = f"the suite did not finish within {timeout:g} s", EXIT_TIMEOUT
    elif "init-failed" in run.marks:
        failed = next(t for t in reversed(run.tail) if console.parse_mark(t) == "init-failed")
        line, code = f"the guest's /init failed: {failed.split(None, 3)[-1]}", EXIT_NO_VERDICT
    elif start is not None:
        line, code = (f"the guest stopped before the suite finished ({emulator} exit status {run.returncode})",
                      EXIT_NO_VERDICT)
    else:
        line, code = (f"kernel did not reach the test runner ({emulator} exit status {run.returncode} after "
                      f"{run.elapsed:.0f} s)", EXIT_NO_VERDICT)
    print(f"qualify: {line}; console log: {log}")
    print("\n".join(f"  | {t}" for t in run.tail or ["(the console printed nothing)"]))
    return code


@dataclass(frozen=True)
class Cell:
    """One cell's kernel, command line, results directory and deadlines, as either emulator boots it."""

    image: Path
    release: str
    modules: Path | None
    append: str
    results: Path
    boot_timeout: float
    busybox: Path
    test_timeout: float
    grace: float
    progress: parallel.Progress


def qualify_one(args: argparse.Namespace, kernel: str, append: str, results_dir: Path | None) -> int:
    """One cell: validate the inputs, build the initramfs, boot the kernel (again after each crash) and report;
    every input error is one line."""
    under_bochs = args.cpu == "intel"
    emulator = "Bochs" if under_bochs else "QEMU"
    boot_timeout = min(args.boot_timeout or BOOT_TIMEOUT[emulator], args.timeout)
    test_timeout = TEST_TIMEOUT[emulator] if args.test_timeout is None else args.test_timeout
    try:
        if under_bochs and args.accel != "auto":
            raise RunnerError("--accel picks QEMU's accelerator, but --cpu intel runs under Bochs: leave --accel out")
        image, fetched_modules = resolve_kernel(kernel)
        release = kernel_release(image)
        modules = modules_dir(image, release, args.modules or fetched_modules)
        if modules is None:
            needed = "KVM is" if under_bochs else "virtio-pci, 9p, overlayfs and KVM are"
            print(f"qualify: note: no lib/modules/{release or '<release>'} beside {image}: assuming {needed} "
                  "built in (else pass --modules DIR)", flush=True)
        tool = bochs.find_tools() if under_bochs else qemu.find_qemu()   # missing tools fail before any work
        busybox = initramfs.find_busybox()
        results = Path(results_dir or args.results or Path("kvmtests-results") / (release or image.name)).resolve()
        results.mkdir(parents=True, exist_ok=True)
        shard = _shard_plan(args.shard_plan)
        count = 1 if shard else shards_per_cell(args)
        with tempfile.TemporaryDirectory(prefix="kvmtests-qualify-") as tmpdir:
            tmp = Path(tmpdir)
            nodeids = None if shard else host_collection(args, tmp / "bytecode" if under_bochs else None)
            base = args.initramfs or (tmp / "initramfs.cpio" if under_bochs else None)
            if under_bochs and not args.initramfs:
                _initramfs(base, busybox, modules, bochs_plan(args, test_timeout, tmp / "bytecode"))
            if count > 1:
                return qualify_sharded(args, image, modules, append, results, count, emulator, nodeids, base)
            shard = shard or whole_plan(nodeids)
            for name in OUTPUTS:
                (results / name).unlink(missing_ok=True)
            with parallel.Progress(results) as progress:
                cell = Cell(image, release, modules, append, results, boot_timeout, busybox, test_timeout,
                            STACKS_GRACE[emulator], progress)
                boot = _boot_bochs(args, cell, tmp, tool, base) if under_bochs else _boot_qemu(args, cell, tmp, tool)
                boots, why = resume.run_cell(boot, results, args.timeout, args.max_resumes, shard)
    except RunnerError as exc:
        print(f"qualify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"qualify: {exc.filename or ''}: {exc.strerror}; check the path and its permissions", file=sys.stderr)
        return EXIT_BAD_INPUT
    first = boots[0]
    if not first.monitor.started or (len(boots) == 1 and first.doc is None and not first.monitor.records
                                     and not first.monitor.crashes):
        return no_suite(results, first.run, boot_timeout, args.timeout, emulator)
    return report_cell(results, boots, why, args, release, emulator)


def shards_per_cell(args: argparse.Namespace) -> int:
    """--shards, else the default for the cores and memory at hand with --jobs cells sharing them."""
    return args.shards or shards.default_count(args.jobs, bochs.memory_mb(args.mem))


def host_collection(args: argparse.Namespace, bytecode: Path | None) -> list[str] | None:
    """The guest's selection, collected on the host from the same tree (None when the host cannot): it plans the
    shards and which test files a guest imports; given a bytecode directory, the collection leaves the test
    modules there as pytest rewrites them, for a self-contained guest (one collection, not two)."""
    return shards.collect(collect_command(pytest_args(args.pytest_args)), PROJECT_DIR, bytecode)


def whole_plan(nodeids: list[str] | None) -> dict | None:
    """An unsharded cell's plan: one shard runs every test and imports only the files the host found one in."""
    return shards.plan(nodeids, {}, 1) | {"index": 1} if nodeids else None


def _shard_plan(path: Path | None) -> dict | None:
    """The plan a shard's runner is handed (--shard-plan), or None for a whole cell."""
    if path is None:
        return None
    try:
        return shards.read_plan(path)
    except ValueError as exc:
        raise RunnerError(f"--shard-plan: {exc}") from None


def child_argv(args: argparse.Namespace, kernel: Path | str, modules: Path | None, append: str, results: Path,
               extra: Sequence[str]) -> list[str]:
    """The `kvmtests qualify` command of one shard or one cell run as a child: this run's options, its kernel
    (already fetched), command line and results directory."""
    argv = [*CHILD, "qualify", "--kernel", str(kernel), "--append", append,
            "--results", str(results), "--accel", args.accel, "--mem", args.mem, "--smp", str(args.smp),
            "--timeout", f"{args.timeout:g}", "--max-resumes", str(args.max_resumes)]
    for option, value in (("--modules", modules), ("--cpu", args.cpu), ("--test-timeout", args.test_timeout),
                          ("--boot-timeout", args.boot_timeout), ("--durations", args.durations)):
        if value is not None:
            argv += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    if args.require:
        argv += ["--require", args.require]
    return argv + list(extra) + ["--", *pytest_args(args.pytest_args)]


def qualify_sharded(args: argparse.Namespace, image: Path, modules: Path | None, append: str, results: Path,
                    count: int, emulator: str, nodeids: list[str] | None, initrd: Path | None) -> int:
    """One cell over count emulators at once: plan who runs what (by an earlier run's durations, else by file),
    run a qualify child per shard (under Bochs all boot the one initramfs built here: the plan rides in each
    boot's resume archive), merge what they bring back into the cell's one result."""
    earlier = args.durations or results / "results.json"
    known = shards.durations(earlier)
    for name in OUTPUTS:
        (results / name).unlink(missing_ok=True)
    if nodeids is not None:
        count = max(1, min(count, len(nodeids)))
    plan = shards.plan(nodeids or [], known, count, shards.collection(earlier))
    balance = "by an earlier run's durations" if known and nodeids else "by file" if nodeids else \
        "by file name (the host could not collect the tests)"
    print(f"qualify: {count} shards under {emulator}, {len(nodeids) if nodeids else 'the'} tests balanced {balance}",
          flush=True)
    children = []
    for i in range(1, count + 1):
        where = results / f"shard-{i}"
        where.mkdir(parents=True, exist_ok=True)
        shards.write_plan(where / "plan.json", plan, i)
        extra = ["--shards", "1", "--shard-plan", str(where / "plan.json")] + (["--initramfs", str(initrd)] if initrd
                                                                               else [])
        children.append(parallel.Child(f"shard {i}/{count}", child_argv(args, image, modules, append, where, extra),
                                       where))
    parallel.run(children, count, parallel.Board(sys.stdout, parallel.interactive()), results)
    docs, missing = [], []
    for child in children:
        try:
            docs.append(load(child.results / "results.json"))
        except NotResults:
            missing.append(f"{child.label} ended without results (exit {child.rc}; see {child.results / parallel.LOG})")
    if not docs:
        print(f"qualify: no shard brought results back; {'; '.join(missing)}")
        print("\n".join(f"  | {t}" for t in _tail(children[0].results / parallel.LOG)))
        return next((c.rc for c in children if c.rc), EXIT_NO_VERDICT)
    doc = shards.merge(docs)
    if missing:
        doc["incomplete"] = "; ".join(filter(None, [doc["incomplete"], *missing]))
        doc["exitstatus"] = max(doc["exitstatus"], 1)
    code = doc["exitstatus"] if not missing else EXIT_NO_VERDICT
    (results / "results.json").write_text(json.dumps(doc, indent=1))
    (results / "junit.xml").write_text(junit(doc))
    (results / "rc").write_text(f"{code}\n")
    print(render(doc))
    for child in children:
        print(f"qualify: {child.label}: exit {child.rc}, {child.ended - child.started:.0f} s; log: "
              f"{child.results / parallel.LOG}; console log: {child.results / 'console.log'}")
    for label, name in (("JUnit XML", "junit.xml"), ("JSON", "results.json")):
        print(f"qualify: {label}: {results / name}")
    return code


def _tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ["(no log)"]


def report_cell(results: Path, boots: list[resume.Boot], why: str, args: argparse.Namespace, release: str,
                emulator: str) -> int:
    """Merge every boot into results.json (and JUnit when the guest's own cannot be whole), print the summary,
    the boots and their phase times, and where the outputs are; return the exit code."""
    doc = resume.merge(boots, {"kernel": release, "environment": f"{emulator} (kvmtests qualify)"},
                       sorted(parse_required(args.require)), why)
    code = doc["exitstatus"] if not why else EXIT_TIMEOUT if boots[-1].run.timed_out == "suite" else EXIT_NO_VERDICT
    (results / "results.json").write_text(json.dumps(doc, indent=1))
    if len(boots) > 1 or doc["crashes"] or boots[-1].doc is None:
        (results / "junit.xml").write_text(junit(doc))
    (results / "rc").write_text(f"{code}\n")
    print(render(doc))
    for n, boot in enumerate(boots, 1):
        start, end = boot.run.marks.get(console.SUITE_START), boot.run.marks.get(console.SUITE_END)
        ended = "; ".join(f"{c.report.title} ({c.during})" for c in boot.monitor.fatal) or (
            "the suite finished" if boot.doc else "the emulator stopped")
        phases = f"boot {start:.1f} s ({emulator} start until the suite started)" if start is not None else "no suite"
        if start is not None:
            phases += f", suite {(end if end is not None else boot.run.elapsed) - start:.1f} s"
        print(f"qualify: boot {n}: {phases}; {ended}" if len(boots) > 1 else f"qualify: {phases}")
    for label, name in (("console log", "console.log"), ("JUnit XML", "junit.xml"), ("JSON", "results.json")):
        print(f"qualify: {label}: {results / name}")
    crashed = [t for t in doc["tests"] if t["outcome"] == "crashed"]
    if crashed or why:
        print(f"qualify: {len(boots)} boot{'s' * (len(boots) > 1)}; " + "; ".join(
            [f"crashed: {t['nodeid']}: {t['message']}" for t in crashed] + ([f"INCOMPLETE: {doc['incomplete']}"]
                                                                          if why else [])))
    return code


def _initramfs(out: Path, busybox: Path, modules: Path | None, plan: initramfs.GuestPlan) -> None:
    """Build the initramfs, noting the vendor modules the guest will not have."""
    for absent in initramfs.build(out, busybox, modules, plan):
        print(f"qualify: note: {modules} has no {absent}; the guest will not load it")


def _boot_qemu(args: argparse.Namespace, cell: Cell, tmp: Path, binary: str) -> resume.BootFn:
    """Boot under QEMU with the host's root shared over 9p (tmpfs overlay) and the results directory writable;
    a resumed boot reads what earlier ones did from the results directory."""
    accel = choose_accel(args.accel)
    cpu = qemu_cpu(args.cpu, accel)
    plan = initramfs.GuestPlan(
        project_dir=PROJECT_DIR, command=suite_command(cell.results, pytest_args(args.pytest_args), args.require),
        env=guest_env(accel, os.environ, cell.results, cell.test_timeout), results_dir=cell.results,
        root_tag=ROOT_TAG, results_tag=RESULTS_TAG)
    initrd = tmp / "initramfs.cpio.gz"
    _initramfs(initrd, cell.busybox, cell.modules, plan)
    cfg = qemu.MachineConfig(
        kernel=cell.image, initrd=initrd, append=kernel_cmdline(accel, cell.append), accel=accel, cpu=cpu,
        mem=args.mem, smp=args.smp,
        shares=(qemu.Share(ROOT_TAG, Path("/"), True), qemu.Share(RESULTS_TAG, cell.results, False)))

    def boot(n: int, state: dict | None, left: float) -> tuple[console.RunResult, Monitor]:
        _write_resume(cell.results / RESUME_FILE, state)
        _announce(n, cell, f"QEMU {accel}, -cpu {cfg.cpu}, {cfg.smp} vCPU, {cfg.mem}")
        monitor = Monitor(n, cell.test_timeout, cell.grace, can_nmi=True)
        cell.progress.add(monitor)
        return console.run_console(qemu.qemu_command(cfg, binary), cell.results / "console.log", left,
                                   min(cell.boot_timeout, left), suite_echo(), monitor, qemu.nmi,
                                   "w" if n == 1 else "a"), monitor

    return boot


def _announce(n: int, cell: Cell, machine: str) -> None:
    """One line per boot: which one, the kernel, the emulated machine, the modules."""
    print(f"qualify: {'booting' if n == 1 else f'boot {n}: resuming after a crash,'} {cell.image} ({cell.release}) "
          f"under {machine}; {f'modules from {cell.modules}' if cell.modules else 'no modules'}", flush=True)


def _write_resume(path: Path, state: dict | None) -> None:
    """The resume file a rebooted guest reads; none on the first boot."""
    if state is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(state))


def bochs_plan(args: argparse.Namespace, test_timeout: float, bytecode: Path) -> initramfs.GuestPlan:
    """What a Bochs guest holds: everything the suite runs with, its bytecode compiled here (into bytecode, beside
    the test modules the host collection left there) and its payloads assembled here, the suite's command and
    environment."""
    return initramfs.GuestPlan(
        project_dir=PROJECT_DIR, command=suite_command(GUEST_RESULTS, pytest_args(args.pytest_args), args.require),
        env=guest_env("bochs", os.environ, GUEST_RESULTS, test_timeout), results_dir=GUEST_RESULTS,
        root_tag="", results_tag="",
        host_files=(*rootfs.collect(PROJECT_DIR), *rootfs.bytecode(PROJECT_DIR, bytecode), *rootfs.payloads()))


def _boot_bochs(args: argparse.Namespace, cell: Cell, tmp: Path, tools: bochs.BochsTools, base: Path) -> resume.BootFn:
    """Boot under Bochs (Intel VMX with EPT) from a CD image of the kernel and the initramfs base (bochs_plan's);
    the results come back over the serial console, and a resumed boot's state rides in a second cpio archive
    appended to the initramfs."""
    mem = bochs.memory_mb(args.mem)
    initrd, iso = tmp / "boot.cpio", tmp / "boot.iso"
    append = kernel_cmdline("bochs", f"{bochs.kernel_params()} {cell.append}")
    cfg = bochs.MachineConfig(iso=iso, log=cell.results / "bochs.log", mem_mb=mem, cpus=args.smp)
    (tmp / "bochsrc").write_text(bochs.bochsrc(cfg, tools))
    (tmp / "debugger.rc").write_text(bochs.debugger_script(cfg.cpus))
    namer = symbolizer(cell)

    def boot(n: int, state: dict | None, left: float) -> tuple[console.RunResult, Monitor]:
        extra = b"" if state is None else initramfs.cpio_archive(
            {str(GUEST_RESULTS / RESUME_FILE).lstrip("/"): json.dumps(state).encode()},
            [str(GUEST_RESULTS).lstrip("/")], set())
        initrd.write_bytes(base.read_bytes() + extra)
        bochs.make_iso(iso, cell.image, initrd, append, tools)
        _announce(n, cell, f"Bochs, {cfg.model} at {cfg.ips // 1_000_000} MIPS, {cfg.cpus} vCPU, {cfg.mem_mb} MB, "
                           f"initramfs {initrd.stat().st_size >> 20} MB")
        collector = console.ResultCollector()
        echo = suite_echo()

        def on_line(line: str) -> None:
            echo(line)
            collector(line)

        monitor = Monitor(n, cell.test_timeout, cell.grace, can_nmi=True,
                          answer=lambda lines, bases: bochs.stop_report(lines, bases, namer.name))
        cell.progress.add(monitor)
        run = console.run_console(bochs.bochs_command(tmp / "bochsrc", tmp / "debugger.rc", tools.bochs),
                                  cell.results / "console.log", left, min(cell.boot_timeout, left), on_line,
                                  monitor, bochs.interrupt, "w" if n == 1 else "a")
        problem = collector.unpack(cell.results)
        if problem and console.SUITE_END in run.marks and not monitor.fatal:
            print(f"qualify: {problem}")
        return run, monitor

    return boot


def symbolizer(cell: Cell) -> symbols.Symbolizer:
    """What names a RIP in this cell's kernel: its System.map (if there is a real one) and KVM's module files."""
    index = initramfs.module_index(cell.modules) if cell.modules else {}
    return symbols.Symbolizer(symbols.find_system_map(cell.image, cell.release),
                              {name: index[name] for name in initramfs.SYMBOLIZED_MODULES if name in index})


def cells(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(kernel, variant) per cell: every --kernel with every --variant, in the order given."""
    return list(dict.fromkeys((k, v) for k in args.kernel for v in args.variant or [DEFAULT_VARIANT]))


def cell_dir(root: Path, index: int, kernel: str, variant: str) -> Path:
    """A cell's own results directory, numbered like its matrix column: 2-debian-6.12-kvm.tdp_mmu=N."""
    words = [str(index), Path(kernel).name] + ([] if variant == DEFAULT_VARIANT else [variant])
    return root / re.sub(r"[^A-Za-z0-9._=+-]+", "_", "-".join(words))


def qualify(args: argparse.Namespace) -> int:
    """Run the cells one after the other; several end in the matrix. Exit: the first failing cell's status."""
    try:
        parse_required(args.require)
    except ValueError as exc:
        print(f"qualify: --require: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    todo = cells(args)
    if len(todo) == 1:
        kernel, variant = todo[0]
        return qualify_one(args, kernel, command_line(args.append, variant), None)
    root = Path(args.results or "kvmtests-results")
    if args.jobs > 1:
        return end_matrix(qualify_cells(args, todo, root))
    done = []
    for index, (kernel, variant) in enumerate(todo, 1):
        results = cell_dir(root, index, kernel, variant)
        print(f"qualify: cell #{index} of {len(todo)}: {kernel}, command line {variant}; results in {results}",
              flush=True)
        (results / "results.json").unlink(missing_ok=True)
        done.append((index, kernel, variant, results, qualify_one(args, kernel, command_line(args.append, variant),
                                                                  results)))
    return end_matrix(done)


def qualify_cells(args: argparse.Namespace, todo: list[tuple[str, str]], root: Path) -> list[
        tuple[int, str, str, Path, int]]:
    """Up to --jobs cells at once, each a child run (kernels fetched or built first, one at a time), one progress
    line each while they run, then every cell's summary in matrix order."""
    try:
        resolved = {kernel: resolve_kernel(kernel) for kernel in dict.fromkeys(k for k, _ in todo)}
    except RunnerError as exc:
        print(f"qualify: {exc}", file=sys.stderr)
        return [(i, k, v, cell_dir(root, i, k, v), EXIT_BAD_INPUT) for i, (k, v) in enumerate(todo, 1)]
    count = shards_per_cell(args)
    children = []
    for index, (kernel, variant) in enumerate(todo, 1):
        results = cell_dir(root, index, kernel, variant).resolve()
        (results / "results.json").unlink(missing_ok=True)
        image, modules = resolved[kernel]
        children.append(parallel.Child(f"#{index} {kernel}, command line {variant}", child_argv(
            args, image, args.modules or modules, command_line(args.append, variant), results,
            ["--shards", str(count)]), results))
    print(f"qualify: {len(todo)} cells, up to {args.jobs} at once, {count} shard{'s' * (count > 1)} each; "
          f"each cell's output in its results directory ({parallel.LOG})", flush=True)
    parallel.run(children, args.jobs, parallel.Board(sys.stdout, parallel.interactive()))
    for index, child in enumerate(children, 1):
        print(f"\n== cell #{index} of {len(children)}: {child.label.split(' ', 1)[1]}; results in {child.results}")
        try:
            print(render(load(child.results / "results.json")))
        except NotResults:
            print("\n".join(f"  | {t}" for t in _tail(child.results / parallel.LOG)))
    return [(i, k, v, c.results, c.rc if c.rc is not None else EXIT_NO_VERDICT)
            for (i, (k, v)), c in zip(enumerate(todo, 1), children)]


def command_line(append: str, variant: str) -> str:
    """--append for every cell, then the cell's --variant."""
    return " ".join(w for w in (append, "" if variant == DEFAULT_VARIANT else variant) if w)


def end_matrix(done: list[tuple[int, str, str, Path, int]]) -> int:
    """Print the cells' matrix, the cells without results, and one closing line; return the first failure."""
    docs, missing = [], []
    for index, kernel, variant, results, rc in done:
        try:
            docs.append(load(results / "results.json"))
        except NotResults:
            missing.append(f"qualify: #{index} {kernel}, command line {variant}: no results (exit {rc}); "
                           f"see {results / 'console.log'}")
    print(f"\n== kvmtests matrix ({len(done)} cells)")
    if docs:
        print(matrix.render(docs))
    for line in missing:
        print(line)
    failed = [(i, k, v, rc) for i, k, v, _, rc in done if rc]
    print(f"qualify: {len(done)} cells, " + ("all passed" if not failed else "failed: " + "; ".join(
        f"#{i} {k}, command line {v} (exit {rc})" for i, k, v, rc in failed)))
    return failed[0][3] if failed else 0


def suite_echo() -> Callable[[str], None]:
    """Show the suite's own console output live, without the kernel's boot messages or the suite's events (pytest's
    progress, printed without a newline, stands before the next event on its line)."""
    state = {"on": False}

    def echo(line: str) -> None:
        mark = console.parse_mark(line)
        if mark in (console.SUITE_START, console.SUITE_END):
            state["on"] = mark == console.SUITE_START
        elif state["on"] and stream.MARK in line:
            print(line.split(stream.MARK, 1)[0], end="", flush=True)
        elif state["on"]:
            print(line, flush=True)

    return echo


def _positive(text: str) -> int:
    """A count of at least 1, else argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `qualify` to the kvmtests command line."""
    p = subparsers.add_parser(
        "qualify", help="boot a kernel image under QEMU (AMD) or Bochs (Intel) and run the suite inside it",
        description="Boot IMAGE under QEMU with the host's root file system shared read-only (tmpfs overlay), "
                    "or with --cpu intel under Bochs from a self-contained initramfs, load kvm_amd/kvm_intel "
                    "inside, run the suite and bring results back. Exit code: the "
                    f"suite's; {EXIT_BAD_INPUT} bad input; {EXIT_TIMEOUT} timeout; {EXIT_NO_VERDICT} the guest "
                    "ended without a verdict. Several --kernel or --variant: one cell each in turn, each with "
                    "its results directory, then the matrix of them all; exit code: the first failing cell's.")
    p.add_argument("--kernel", required=True, action="append", metavar="IMAGE",
                   help="kernel image (bzImage), or a kernel name (fetched or built first): "
                        f"{', '.join(kernels.NAMES)}; repeat it for a matrix")
    p.add_argument("--modules", type=Path, metavar="DIR",
                   help="the kernel's lib/modules/<release> (default: found beside the image)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto: KVM when the host offers nested VMX/SVM, else TCG")
    p.add_argument("--cpu", metavar="VENDOR|MODEL",
                   help="intel: Bochs with VMX and EPT; amd (default): QEMU (host with KVM, max with TCG); any "
                        "other name is a QEMU CPU model")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="more kernel command line, e.g. 'kvm.tdp_mmu=N', 'kvm_amd.npt=0' or 'kvm_intel.ept=0' (module parameters "
                        "reach KVM built in or loaded as a module alike)")
    p.add_argument("--variant", action="append", metavar="ARGS",
                   help="a kernel command-line variant, one matrix cell per kernel: e.g. 'kvm.tdp_mmu=N'; "
                        f"'{DEFAULT_VARIANT}' is none; repeat it (default: {DEFAULT_VARIANT} only)")
    p.add_argument("--mem", default="2G", metavar="SIZE", help="guest memory (default 2G)")
    p.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default 1: TCG guests oopsed with 2)")
    p.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="hard limit for the whole run (default 3600)")
    p.add_argument("--test-timeout", type=float, metavar="SECONDS",
                   help="per-test deadline: a test running longer is a hang; the guest prints its kernel stacks, "
                        "the test is crashed and the run resumes on a fresh boot (default "
                        f"{TEST_TIMEOUT['QEMU']:g}, {TEST_TIMEOUT['Bochs']:g} under Bochs; 0: off)")
    p.add_argument("--max-resumes", type=int, default=MAX_RESUMES, metavar="N",
                   help="boots after a crash before the cell ends with the verdicts it has "
                        f"(default {MAX_RESUMES})")
    p.add_argument("--boot-timeout", type=float, metavar="SECONDS",
                   help=f"limit until the suite starts (default {BOOT_TIMEOUT['QEMU']:g}, "
                        f"{BOOT_TIMEOUT['Bochs']:g} under Bochs)")
    p.add_argument("--results", metavar="DIR",
                   help="where rc, junit.xml, results.json and console.log go (default kvmtests-results/<release>); "
                        "with several cells, the directory of one numbered directory per cell (default kvmtests-results)")
    p.add_argument("--require", default="", metavar="GROUPS",
                   help="gating, as pytest --require: 'series' or feature groups (comma separated) the kernel must "
                        "carry; an absent one is one failure line")
    p.add_argument("--shards", type=_positive, metavar="K",
                   help="split each cell's tests over K emulators of the same kernel run at once, balanced by an "
                        "earlier run's durations (--durations) or by file, merged into one result (default: the "
                        "host's cores shared by --jobs, as far as its memory holds the guests; 1 on one core)")
    p.add_argument("--jobs", type=_positive, default=1, metavar="N",
                   help="run up to N matrix cells at once, each its own child run with a log in its results "
                        "directory and one progress line here (default 1)")
    p.add_argument("--durations", type=Path, metavar="RESULTS.json",
                   help="an earlier run's results.json whose test durations balance the shards (default: the "
                        "cell's results.json from its last run, when there is one)")
    p.add_argument("--shard-plan", type=Path, help=argparse.SUPPRESS)   # a shard's run, started by its cell's
    p.add_argument("--initramfs", type=Path, help=argparse.SUPPRESS)    # a Bochs shard's, built by its cell's run
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST-ARGS",
                   help="more arguments for pytest inside the guest, added to the defaults (the whole suite but "
                        "its self-tests, -m 'not selftest')")
    p.set_defaults(func=qualify)
