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
from pathlib import Path
from typing import Callable

from tabulate import tabulate

from kvmtests import uapi
from kvmtests.machine import asm, guest, vsm
from kvmtests.machine.kvm import Kvm, Unavailable, Vcpu, Vm
from kvmtests.machine.tools import ToolMissing, require
from kvmtests.machine.watchdog import watcher
from kvmtests.uapi import _libc, ffi

SOURCE = Path(__file__).parent / "ops.c"
TARGET_RATIO = 1.1
OPS = {"vm": 200, "vcpu": 200, "memslot": 2000, "run": 5000, "regs": 20000, "attrs": 20000}
# Round trips timed one by one (median and p99): a plain port-I/O exit, and the VTL switches of machine/vsm.py.
SWITCH_OPS = {"pio_exit": 5000, "vtl_call": 1000, "protect": 500}
SWITCH_ENTRY = {"vtl_call": ("vtl0_call_loop", 1), "protect": ("vtl0_protect_loop", 2)}   # entry, VTL0 steps
CHUNKS = 10  # raw and layered batches alternate in this many chunks, so kernel drift hits both alike
ATTR_GPA = 0x200000


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


def _timed(fn: Callable[[], object], n: int, run: object) -> float:
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
    return elapsed / n


def _paired(raw: Callable[[], object], layered: Callable[[], object], n: int, run: object) -> tuple[float, float]:
    """Mean ns per call of each, their batches interleaved in CHUNKS, in ABBA order: VM and memslot costs drift in
    the kernel, and a batch pays for deferred work (RCU, SRCU) that the batch before it left."""
    chunk = max(1, n // CHUNKS)
    raw_ns = layered_ns = 0.0
    for i in range(CHUNKS):
        first, second = (raw, layered) if i % 2 == 0 else (layered, raw)
        a, b = _timed(first, chunk, run), _timed(second, chunk, run)
        raw_ns += a if i % 2 == 0 else b
        layered_ns += b if i % 2 == 0 else a
    return raw_ns / CHUNKS, layered_ns / CHUNKS


def _c(binary: Path, op: str, n: int, image: Path) -> list[float]:
    """The C side's answer: ns per operation, or median and p99 for the one-by-one ops."""
    out = subprocess.run([str(binary), op, str(n), str(image)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench C side, {op}: {out.stderr.strip()}")
    return [float(x) for x in out.stdout.split()]


def _layered(kvm: Kvm, vm: Vm, m: guest.Machine) -> dict[str, Callable[[], object]]:
    """Each operation through the suite's objects, as tests use them."""
    vcpu, hva = m.vcpu, m.mem.hva
    return {
        "vm": lambda: kvm.create_vm().close(),
        "memslot": lambda: (vm.set_user_memory_region_raw(1, 1 << 30, 2 << 20, hva),
                            vm.set_user_memory_region_raw(1, 1 << 30, 0, hva)),
        "run": vcpu.run,
        "regs": lambda: vcpu.set_regs(vcpu.get_regs()),
        "attrs": lambda: vm.set_memory_attributes_raw(ATTR_GPA, 0x1000, 0),
    }


def _raw(kvm: Kvm, vm: Vm, m: guest.Machine) -> dict[str, Callable[[], object]]:
    """Each operation as bare cffi calls: the floor any Python caller pays."""
    zero, vcpu_fd, kvm_fd, vm_fd = ffi.cast("unsigned long", 0), m.vcpu.fd, kvm.fd, vm.fd
    add = ffi.new("struct kvm_userspace_memory_region *", {"slot": 1, "guest_phys_addr": 1 << 30,
                                                           "memory_size": 2 << 20, "userspace_addr": m.mem.hva})
    remove = ffi.new("struct kvm_userspace_memory_region *", {"slot": 1, "guest_phys_addr": 1 << 30,
                                                              "userspace_addr": m.mem.hva})
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


def _vcpu_batch(kvm: Kvm, n: int, raw: bool) -> float:
    """vCPU creation needs fresh ids: one VM per batch, the same as ops.c."""
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


def measure(kvm: Kvm, binary: Path, op: str, n: int, repeats: int, image: Path) -> tuple[float, float, float]:
    """Median ns per operation: (C, bare cffi, kvmtests objects)."""
    c, raw, layered = [], [], []
    with kvm.create_vm() as vm:
        m = guest.build_machine(vm, guest.load_payload("basic"), entry="pio_loop")
        write_image(m, image)
        fns = (_raw(kvm, vm, m), _layered(kvm, vm, m))
        for _ in range(repeats):
            c.append(_c(binary, op, n, image)[0])
            if op == "vcpu":
                raw.append(_vcpu_batch(kvm, n, True))
                layered.append(_vcpu_batch(kvm, n, False))
            else:
                pair = _paired(fns[0][op], fns[1][op], n, m.vcpu.run_struct)
                raw.append(pair[0])
                layered.append(pair[1])
    return statistics.median(c), statistics.median(raw), statistics.median(layered)


def _one_by_one(fn: Callable[[], object], n: int) -> list[float]:
    """ns of each of n calls, after n/10 + 1 unrecorded ones (as ops.c)."""
    for _ in range(n // CHUNKS + 1):
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


def measure_switch(kvm: Kvm, binary: Path, op: str, n: int, image: Path) -> tuple[list[float], list[float]]:
    """(C median, p99), (kvmtests median, p99) in ns of one round trip: a port-I/O exit, or a VTL switch sequence
    through machine/vsm.py (which raises Unavailable or HarnessError where the kernel cannot run it)."""
    if op == "pio_exit":
        with kvm.create_vm() as vm:
            m = guest.build_machine(vm, guest.load_payload("basic"), entry="pio_loop")
            write_image(m, image)
            return _c(binary, "pio", n, image), list(median_p99(_one_by_one(m.vcpu.run, n)))
    entry, steps = SWITCH_ENTRY[op]
    with vsm.build_vsm(kvm) as v:
        v.enter(entry, rbx=vsm.PROTECTED_PAGE)
        with v.vtl1_held() as vtl1:
            write_image(v.m0, image, (v.vtl0, vtl1))
        ours = median_p99(_one_by_one(lambda: [_vsm_step(v) for _ in range(steps)], n))
    return _c(binary, op, n, image), list(ours)


def _switch_rows(kvm: Kvm, binary: Path, args: argparse.Namespace, image: Path) -> list[list[str]]:
    rows, pio = [], None
    for op, n in SWITCH_OPS.items():
        try:
            (c_med, c_p99), (med, p99) = measure_switch(kvm, binary, op, max(10, int(n * args.scale)), image)
        except (Unavailable, vsm.HarnessError) as e:
            rows.append([op, "-", "-", "-", "-", "-", "-", f"cannot run here: {e}"])
            continue
        pio = pio or (c_med, med)
        rows.append([op, f"{c_med / 1000:.2f}", f"{c_p99 / 1000:.2f}", f"{med / 1000:.2f}", f"{p99 / 1000:.2f}",
                     f"{med / c_med:.2f}", f"{med / pio[1]:.1f} / {c_med / pio[0]:.1f}", ""])
    return rows


def _note(c: float, raw: float, layered: float) -> str:
    if layered / c <= TARGET_RATIO:
        return ""
    if layered / raw <= TARGET_RATIO:
        return (f"floor: a bare cffi call from Python already costs {(raw - c) / 1000:.2f} µs more than C "
                f"(interpreter + per-process kernel cost); the layers add {(layered - raw) / 1000:.2f} µs")
    return f"the layers add {(layered - raw) / 1000:.2f} µs over bare cffi"


def run_bench(args: argparse.Namespace) -> int:
    try:
        binary = build_c()
        kvm = Kvm()
    except Unavailable as e:
        print(f"kvmtests bench: {e}", file=sys.stderr)
        return 2
    rows = []
    image = Path(tempfile.mkdtemp(prefix="kvmtests-bench-")) / "guest.img"
    try:
        with kvm:
            with kvm.create_vm() as vm:
                has_attrs = vm.set_memory_attributes_raw(ATTR_GPA, 0x1000, 0)[0] == 0
            for op, n in OPS.items():
                if op == "attrs" and not has_attrs:
                    rows.append([op, "-", "-", "-", "-", "-", "kernel lacks KVM_SET_MEMORY_ATTRIBUTES"])
                    continue
                c, raw, layered = measure(kvm, binary, op, max(1, int(n * args.scale)), args.repeats, image)
                rows.append([op, f"{c / 1000:.2f}", f"{raw / 1000:.2f}", f"{layered / 1000:.2f}",
                             f"{layered / c:.2f}", f"{layered / raw:.2f}", _note(c, raw, layered)])
            switch_rows = _switch_rows(kvm, binary, args, image)
    finally:
        shutil.rmtree(image.parent)
    print(tabulate(rows, headers=["operation", "C µs", "bare cffi µs", "kvmtests µs", "kvmtests/C",
                                  "kvmtests/cffi", "note"], tablefmt="simple"))
    print()
    print(tabulate(switch_rows, headers=["round trip", "C median µs", "C p99 µs", "kvmtests median µs",
                                         "kvmtests p99 µs", "kvmtests/C", "x port-I/O exit (kvmtests / C)", "note"],
                   tablefmt="simple"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time the Python layers against the same ioctls in C")
    p.add_argument("--repeats", type=int, default=5, help="batches per operation (the median is reported)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the iterations per batch")
    p.set_defaults(func=run_bench)
