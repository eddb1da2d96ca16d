"""`kvmtests bench`: the Python layers against a C program doing the same ioctls, side by side."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tabulate import tabulate

from kvmtests import uapi
from kvmtests.machine import asm, guest, vsm
from kvmtests.machine.kvm import Kvm, Unavailable, Vcpu, Vm
from kvmtests.machine.tools import ToolMissing, require
from kvmtests.machine.watchdog import watcher
from kvmtests.uapi import _libc, ffi

from .placement import pin
from .stats import REPRODUCIBILITY, Estimate, estimate

SOURCE = Path(__file__).parent / "ops.c"
TARGET_RATIO = 1.1
# Operations per batch, a few ms each: a round is one batch of every side, and a row's figures are medians over
# rounds, so an outlier (a memslot deletion's SRCU grace period waiting for a busy core) spoils one batch, not a row.
OPS = {"vm": 10, "vcpu": 20, "memslot": 10, "run": 400, "regs": 400, "attrs": 400}
# Round trips timed one by one (median and p99): a plain port-I/O exit, and the VTL switches of machine/vsm.py.
SWITCH_OPS = {"pio_exit": 400, "vtl_call": 100, "protect": 50}
SWITCH_ENTRY = {"vtl_call": ("vtl0_call_loop", 1), "protect": ("vtl0_protect_loop", 2)}   # entry, VTL0 steps
MIN_ROUNDS = 10    # the fewest rounds a row reports (the 99% interval of a median needs 8)
MAX_ROUNDS = 100_000  # the budget ends a row long before; this bounds sides that take no time
TOLERANCE = REPRODUCIBILITY  # a row is tight when every ratio's spread is down to the floor, 1.5% of it
MIN_SECONDS = 3.0  # the shortest a row runs, so that a passing burst of load cannot fill a whole row
BUDGET = 20.0      # seconds per row before it is reported as not tight
NOT_TIGHT = "not tight: the budget ran out before every spread was within 1.5%"
ATTR_GPA = 0x200000
MEMSLOT = (1, 1 << 30, 2 << 20)   # slot, GPA, size: ops.c SLOT_ID, SLOT_GPA, SLOT_SIZE


def build_c() -> Path:
    """Compile ops.c into the cache (keyed by its content) and return the binary."""
    try:
        require("gcc", "gcc")
    except ToolMissing as e:
        raise Unavailable(str(e)) from None
    key = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = asm.cache_dir().parent / "bench" / f"ops-{key}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-o", str(tmp), str(SOURCE)], check=True)
        os.replace(tmp, out)
    return out


def _write_vcpu(f: object, vcpu: Vcpu) -> None:
    cpuid = vcpu.get_cpuid()
    entries = ffi.new("struct kvm_cpuid_entry2[]", len(cpuid))
    for i, e in enumerate(cpuid):
        for k, v in e.items():
            setattr(entries[i], k, v)
    f.write(ffi.buffer(vcpu.get_regs()))
    f.write(ffi.buffer(vcpu.get_sregs()))
    f.write(len(cpuid).to_bytes(4, "little"))
    f.write(ffi.buffer(entries))


def write_image(m: guest.Machine, path: Path, vcpus: tuple[Vcpu, ...] = ()) -> None:
    """The guest as ops.c loads it: memory size, regs, sregs and CPUID of each vCPU (default: the first), memory."""
    with open(path, "wb") as f:
        f.write(m.mem.size.to_bytes(8, "little"))
        for vcpu in vcpus or (m.vcpu,):
            _write_vcpu(f, vcpu)
        f.write(m.mem.buf[:])


BATCH_LIMIT = 120.0  # seconds; a batch that takes longer is a hung KVM_RUN, kicked by the watchdog


def _timed(fn: Callable[[], object], n: int, run: object) -> list[float]:
    """Mean ns per call over n calls; one watchdog deadline bounds the whole batch (bare KVM_RUNs included)."""
    token = watcher.arm(run, BATCH_LIMIT)
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter_ns() - start
    finally:
        if watcher.disarm(token):
            raise RuntimeError(f"bench: a batch of {n} calls did not finish within {BATCH_LIMIT:g} s")
    return [elapsed / n]


class Server:
    """ops.c serving batches in its own copy of the guest, so that C batches interleave with the Python side's."""

    def __init__(self, binary: Path, image: Path):
        self.proc = subprocess.Popen([str(binary), "serve", str(image)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def batch(self, op: str, n: int) -> list[float]:
        """ns per operation, or median and p99 for pio."""
        self.proc.stdin.write(f"{op} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench C side, {op}: {self.proc.stderr.read().strip()}")
        return [float(x) for x in line.split()]

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(BATCH_LIMIT)
        self.proc.stdout.close()
        self.proc.stderr.close()


def _c(binary: Path, op: str, n: int, image: Path) -> list[float]:
    """A VTL switch sequence's median and p99 in ns, from one run of ops.c (it sets up its own two VMs)."""
    out = subprocess.run([str(binary), op, str(n), str(image)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench C side, {op}: {out.stderr.strip()}")
    return [float(x) for x in out.stdout.split()]


@dataclass
class Rounds:
    """Every side's figures per round ([side][round]); ratios[i] is the last side's first figure over side i's."""

    figures: list[list[list[float]]]
    ratios: list[list[float]]
    tight: bool

    def median(self, side: int, figure: int = 0) -> float:
        return statistics.median(r[figure] for r in self.figures[side])

    def ratio(self, side: int) -> Estimate:
        return estimate(self.ratios[side])


def measure_rounds(sides: Sequence[Callable[[], list[float]]], budget: float, min_rounds: int = MIN_ROUNDS,
                   max_rounds: int = MAX_ROUNDS, min_seconds: float = MIN_SECONDS) -> Rounds:
    """One batch of every side per round, in forward then reverse order (drift and the deferred work a batch
    leaves, RCU and SRCU callbacks, fall on every side alike), after one unrecorded batch each; rounds go on for
    min_rounds and min_seconds, then until every ratio's spread is within TOLERANCE, or the budget or max_rounds
    runs out (not tight)."""
    for side in sides:
        side()
    figures: list[list[list[float]]] = [[] for _ in sides]
    ratios: list[list[float]] = [[] for _ in sides[1:]]
    start, check_at = time.monotonic(), min_rounds
    for n in range(1, max_rounds + 1):
        for i in (range(len(sides)) if n % 2 else range(len(sides) - 1, -1, -1)):
            figures[i].append(sides[i]())
        for i, r in enumerate(ratios):
            r.append(figures[-1][-1][0] / figures[i][-1][0])
        elapsed = time.monotonic() - start
        if n >= min_rounds and elapsed > budget:
            break
        if n >= check_at and elapsed >= min_seconds:
            if _tight(ratios):
                break
            check_at = n + 1 + n // 20   # every check sorts all rounds: check again after 5% more
    return Rounds(figures, ratios, len(ratios[0]) >= min_rounds and _tight(ratios))


def _tight(ratios: list[list[float]]) -> bool:
    return all(estimate(r).tight(TOLERANCE) for r in ratios)


def _layered(kvm: Kvm, vm: Vm, m: guest.Machine, slot_hva: int) -> dict[str, Callable[[], object]]:
    """Each operation through the suite's objects, as tests use them."""
    vcpu, (slot, gpa, size) = m.vcpu, MEMSLOT
    return {
        "vm": lambda: kvm.create_vm().close(),
        "memslot": lambda: (vm.set_user_memory_region_raw(slot, gpa, size, slot_hva),
                            vm.set_user_memory_region_raw(slot, gpa, 0, slot_hva)),
        "run": vcpu.run,
        "regs": lambda: vcpu.set_regs(vcpu.get_regs()),
        "attrs": lambda: vm.set_memory_attributes_raw(ATTR_GPA, 0x1000, 0),
    }


def _raw(kvm: Kvm, vm: Vm, m: guest.Machine, slot_hva: int) -> dict[str, Callable[[], object]]:
    """Each operation as bare cffi calls: the floor any Python caller pays."""
    zero, vcpu_fd, kvm_fd, vm_fd = ffi.cast("unsigned long", 0), m.vcpu.fd, kvm.fd, vm.fd
    slot, gpa, size = MEMSLOT
    add = ffi.new("struct kvm_userspace_memory_region *", {"slot": slot, "guest_phys_addr": gpa,
                                                           "memory_size": size, "userspace_addr": slot_hva})
    remove = ffi.new("struct kvm_userspace_memory_region *", {"slot": slot, "guest_phys_addr": gpa,
                                                              "userspace_addr": slot_hva})
    regs = ffi.new("struct kvm_regs *")
    attrs = ffi.new("struct kvm_memory_attributes *", {"address": ATTR_GPA, "size": 0x1000})
    return {
        "vm": lambda: os.close(_libc.ioctl(kvm_fd, uapi.KVM_CREATE_VM, zero)),
        "memslot": lambda: (_libc.ioctl(vm_fd, uapi.KVM_SET_USER_MEMORY_REGION, add),
                            _libc.ioctl(vm_fd, uapi.KVM_SET_USER_MEMORY_REGION, remove)),
        "run": lambda: _libc.ioctl(vcpu_fd, uapi.KVM_RUN, zero),
        "regs": lambda: (_libc.ioctl(vcpu_fd, uapi.KVM_GET_REGS, regs), _libc.ioctl(vcpu_fd, uapi.KVM_SET_REGS, regs)),
        "attrs": lambda: _libc.ioctl(vm_fd, uapi.KVM_SET_MEMORY_ATTRIBUTES, attrs),
    }


def _vcpu_batch(kvm: Kvm, n: int, raw: bool) -> list[float]:
    """vCPU creation needs fresh ids: one VM per batch, made and closed outside the timing, as ops.c."""
    size = kvm.vcpu_mmap_size()
    with kvm.create_vm() as vm:
        ids = iter(range(n))
        if not raw:
            return _timed(lambda: vm.create_vcpu(next(ids)).close(), n, ffi.new("struct kvm_run *"))

        def create() -> None:
            fd = _libc.ioctl(vm.fd, uapi.KVM_CREATE_VCPU, ffi.cast("unsigned long", next(ids)))
            ptr, _ = uapi.mmap(size, uapi.PROT_READ | uapi.PROT_WRITE, uapi.MAP_SHARED, fd)
            uapi.munmap(ptr, size)
            os.close(fd)
        return _timed(create, n, ffi.new("struct kvm_run *"))


def _slot_memory() -> tuple[object, int]:
    """The memslot batch's own 2 MiB, mapped as ops.c maps it and never touched: no side aliases guest memory."""
    ptr, err = uapi.mmap(MEMSLOT[2], uapi.PROT_READ | uapi.PROT_WRITE,
                         uapi.MAP_PRIVATE | uapi.MAP_ANONYMOUS | uapi.MAP_NORESERVE)
    if ptr is None:
        raise OSError(err, "bench: mmap of the memslot batch's memory")
    return ptr, int(ffi.cast("uintptr_t", ptr))


def measure(kvm: Kvm, binary: Path, op: str, n: int, budget: float, image: Path) -> Rounds:
    """Rounds of (C, bare cffi, kvmtests objects) batches of n operations, each side in its own copy of one guest."""
    with kvm.create_vm() as vm:
        m = guest.build_machine(vm, guest.load_payload("basic"), entry="pio_loop")
        write_image(m, image)
        ptr, slot_hva = _slot_memory()
        try:
            fns = (_raw(kvm, vm, m, slot_hva), _layered(kvm, vm, m, slot_hva))
            with Server(binary, image) as c:
                if op == "vcpu":
                    sides = (lambda: c.batch(op, n), lambda: _vcpu_batch(kvm, n, True),
                             lambda: _vcpu_batch(kvm, n, False))
                else:
                    sides = (lambda: c.batch(op, n), lambda: _timed(fns[0][op], n, m.vcpu.run_struct),
                             lambda: _timed(fns[1][op], n, m.vcpu.run_struct))
                return measure_rounds(sides, budget)
        finally:
            uapi.munmap(ptr, MEMSLOT[2])


def _one_by_one(fn: Callable[[], object], n: int) -> list[float]:
    """ns of each of n calls, after n/10 + 1 unrecorded ones (as ops.c)."""
    for _ in range(n // 10 + 1):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return times


def median_p99(times: list[float]) -> tuple[float, float]:
    """The same order statistics as ops.c: element n/2 and element 99n/100 of the sorted times."""
    ordered = sorted(times)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) * 99 // 100, len(ordered) - 1)]


def _vsm_step(v: vsm.Vsm) -> None:
    uc = v.step()
    if uc is not None:
        raise RuntimeError(f"bench: VTL0 left its loop with {uc}")


def measure_switch(kvm: Kvm, binary: Path, op: str, n: int, budget: float, image: Path) -> Rounds:
    """Rounds of (C, kvmtests) batches of n round trips, each round trip timed alone (median, p99): a port-I/O
    exit, or a VTL switch sequence through machine/vsm.py (which raises Unavailable or HarnessError where the
    kernel cannot run it)."""
    if op == "pio_exit":
        with kvm.create_vm() as vm:
            m = guest.build_machine(vm, guest.load_payload("basic"), entry="pio_loop")
            write_image(m, image)
            with Server(binary, image) as c:
                return measure_rounds((lambda: c.batch("pio", n),
                                       lambda: list(median_p99(_one_by_one(m.vcpu.run, n)))), budget)
    entry, steps = SWITCH_ENTRY[op]
    with vsm.build_vsm(kvm) as v:
        v.enter(entry, rbx=vsm.PROTECTED_PAGE)
        with v.vtl1_held() as vtl1:
            write_image(v.m0, image, (v.vtl0, vtl1))
        ours = lambda: list(median_p99(_one_by_one(lambda: [_vsm_step(v) for _ in range(steps)], n)))
        return measure_rounds((lambda: _c(binary, op, n, image), ours), budget)


def _note(c: float, to_c: float, to_cffi: float) -> str:
    """Why kvmtests/C is above target, in µs worked out from C's median and the paired ratios (under load the
    sides' own medians can come from different rounds, and then disagree with the ratios)."""
    if to_c <= TARGET_RATIO:
        return ""
    raw = c * to_c / to_cffi
    if to_cffi <= TARGET_RATIO:
        return (f"floor: a bare cffi call from Python already costs {(raw - c) / 1000:.2f} µs more than C "
                f"(interpreter + per-process kernel cost); the layers add {(c * to_c - raw) / 1000:.2f} µs")
    return f"the layers add {(c * to_c - raw) / 1000:.2f} µs over bare cffi"


def _op_row(op: str, cpu: str, r: Rounds) -> list[object]:
    to_c, to_cffi = r.ratio(0), r.ratio(1)
    note = "; ".join(x for x in ("" if r.tight else NOT_TIGHT, _note(r.median(0), to_c.median, to_cffi.median)) if x)
    return [op, f"{r.median(0) / 1000:.2f}", f"{r.median(1) / 1000:.2f}", f"{r.median(2) / 1000:.2f}", str(to_c),
            str(to_cffi), len(r.ratios[0]), cpu, note]


def _op_rows(kvm: Kvm, binary: Path, args: argparse.Namespace, image: Path) -> list[list[object]]:
    with kvm.create_vm() as vm:
        has_attrs = vm.set_memory_attributes_raw(ATTR_GPA, 0x1000, 0)[0] == 0
    rows: list[list[object]] = []
    for op, n in OPS.items():
        if op == "attrs" and not has_attrs:
            rows.append([op, "-", "-", "-", "-", "-", "-", "-", "kernel lacks KVM_SET_MEMORY_ATTRIBUTES"])
            continue
        cpu = pin(args.cpu, args.allowed)
        rows.append(_op_row(op, cpu, measure(kvm, binary, op, max(1, int(n * args.scale)), args.budget, image)))
    return rows


def _switch_rows(kvm: Kvm, binary: Path, args: argparse.Namespace, image: Path) -> list[list[object]]:
    rows: list[list[object]] = []
    pio = None
    for op, n in SWITCH_OPS.items():
        cpu = pin(args.cpu, args.allowed)
        try:
            r = measure_switch(kvm, binary, op, max(10, int(n * args.scale)), args.budget, image)
        except (Unavailable, vsm.HarnessError) as e:
            rows.append([op, "-", "-", "-", "-", "-", "-", "-", "-", f"cannot run here: {e}"])
            continue
        c_med, med = r.median(0), r.median(1)
        pio = pio or (c_med, med)
        rows.append([op, f"{c_med / 1000:.2f}", f"{r.median(0, 1) / 1000:.2f}", f"{med / 1000:.2f}",
                     f"{r.median(1, 1) / 1000:.2f}", str(r.ratio(0)), f"{med / pio[1]:.1f} / {c_med / pio[0]:.1f}",
                     len(r.ratios[0]), cpu, "" if r.tight else NOT_TIGHT])
    return rows


def run_bench(args: argparse.Namespace) -> int:
    try:
        binary = build_c()
        kvm = Kvm()
    except Unavailable as e:
        print(f"kvmtests bench: {e}", file=sys.stderr)
        return 2
    image = Path(tempfile.mkdtemp(prefix="kvmtests-bench-")) / "guest.img"
    args.allowed = os.sched_getaffinity(0)
    try:
        with kvm:
            rows = _op_rows(kvm, binary, args, image)
            switch_rows = _switch_rows(kvm, binary, args, image)
    finally:
        shutil.rmtree(image.parent)
        os.sched_setaffinity(0, args.allowed)
    print(tabulate(rows, headers=["operation", "C µs", "bare cffi µs", "kvmtests µs", "kvmtests/C",
                                  "kvmtests/cffi", "rounds", "cpu", "note"], tablefmt="simple"))
    print()
    print(tabulate(switch_rows, headers=["round trip", "C median µs", "C p99 µs", "kvmtests median µs",
                                         "kvmtests p99 µs", "kvmtests/C", "x port-I/O exit (kvmtests / C)", "rounds",
                                         "cpu", "note"], tablefmt="simple"))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time the Python layers against the same ioctls in C")
    p.add_argument("--budget", type=float, default=BUDGET,
                   help="seconds per row to bring every ratio's spread within 1.5%% (else: not tight)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the operations per batch")
    p.add_argument("--cpu", type=int, help="the CPU every side runs on (default: the quietest over 0.5 s)")
    p.set_defaults(func=run_bench)
