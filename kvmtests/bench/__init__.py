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
from kvmtests.machine import asm, guest
from kvmtests.machine.kvm import Kvm, Unavailable, Vm
from kvmtests.machine.tools import ToolMissing, require
from kvmtests.machine.watchdog import watcher
from kvmtests.uapi import _libc, ffi

SOURCE = Path(__file__).parent / "ops.c"
TARGET_RATIO = 1.1
OPS = {"vm": 200, "vcpu": 200, "memslot": 2000, "run": 5000, "regs": 20000, "attrs": 20000}
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


def write_image(m: guest.Machine, path: Path) -> None:
    """The guest as ops.c loads it: memory size, regs, sregs, CPUID, memory."""
    cpuid = m.vcpu.get_cpuid()
    entries = ffi.new("struct kvm_cpuid_entry2[]", len(cpuid))
    for i, e in enumerate(cpuid):
        for k, v in e.items():
            setattr(entries[i], k, v)
    with open(path, "wb") as f:
        f.write(m.mem.size.to_bytes(8, "little"))
        f.write(ffi.buffer(m.vcpu.get_regs()))
        f.write(ffi.buffer(m.vcpu.get_sregs()))
        f.write(len(cpuid).to_bytes(4, "little"))
        f.write(ffi.buffer(entries))
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


def _c(binary: Path, op: str, n: int, image: Path) -> float:
    out = subprocess.run([str(binary), op, str(n), str(image)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench C side, {op}: {out.stderr.strip()}")
    return float(out.stdout)


def _layered(kvm: Kvm, vm: Vm, m: guest.Machine) -> dict[str, Callable[[], object]]:
    """Each operation through the suite's objects, as tests use them."""
    vcpu, hva = m.vcpu, m.mem.hva
    return {
        "vm": lambda: kvm.create_vm().close(),
        "memslot": lambda: (vm.set_user_memory_region_raw(1, 1 << 30, 2 << 20, hva),
                            vm.set_user_memory_region_raw(1, 1 << 30, 0, hva)),
        "run": vcpu.run,
        "regs": lambda: vcpu.set_regs(vcpu.get_regs()),
        "attrs": lambda: vm.set_memory_attributes(ATTR_GPA, 0x1000, 0),
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
        m = guest.build(vm, guest.load_payload("basic"), entry="pio_loop")
        write_image(m, image)
        fns = (_raw(kvm, vm, m), _layered(kvm, vm, m))
        for _ in range(repeats):
            c.append(_c(binary, op, n, image))
            if op == "vcpu":
                raw.append(_vcpu_batch(kvm, n, True))
                layered.append(_vcpu_batch(kvm, n, False))
            else:
                raw.append(_timed(fns[0][op], n, m.vcpu.run_struct))
                layered.append(_timed(fns[1][op], n, m.vcpu.run_struct))
    return statistics.median(c), statistics.median(raw), statistics.median(layered)


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
                has_attrs = vm.set_memory_attributes(ATTR_GPA, 0x1000, 0)[0] == 0
            for op, n in OPS.items():
                if op == "attrs" and not has_attrs:
                    rows.append([op, "-", "-", "-", "-", "-", "kernel lacks KVM_SET_MEMORY_ATTRIBUTES"])
                    continue
                c, raw, layered = measure(kvm, binary, op, max(1, int(n * args.scale)), args.repeats, image)
                rows.append([op, f"{c / 1000:.2f}", f"{raw / 1000:.2f}", f"{layered / 1000:.2f}",
                             f"{layered / c:.2f}", f"{layered / raw:.2f}", _note(c, raw, layered)])
    finally:
        shutil.rmtree(image.parent)
    print(tabulate(rows, headers=["operation", "C µs", "bare cffi µs", "kvmtests µs", "kvmtests/C",
                                  "kvmtests/cffi", "note"], tablefmt="simple"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time the Python layers against the same ioctls in C")
    p.add_argument("--repeats", type=int, default=5, help="batches per operation (the median is reported)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the iterations per batch")
    p.set_defaults(func=run_bench)
