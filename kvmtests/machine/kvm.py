"""KVM objects: /dev/kvm, VMs, memory regions and vCPUs.

One convention for every wrapper: `name()` raises KvmError naming the ioctl and the errno; `name_raw()`
returns the call as is, `(ret, errno)`.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from kvmtests import uapi
from kvmtests.uapi import _libc, ffi, ioctl

from .watchdog import watcher

DEV_KVM_ENV = "KVMTESTS_DEV"


class Unavailable(Exception):
    """A precondition of a test is missing on this host; the message says which."""


class KvmError(OSError):
    """An ioctl that the suite relies on (not the one under test) failed."""


def _check(what: str, result: tuple[int, int]) -> int:
    ret, err = result
    if ret < 0:
        raise KvmError(err, f"{what}: {uapi.errno_name(err)} ({os.strerror(err)})")
    return ret


def dev_kvm_path() -> str:
    """The KVM device under test: $KVMTESTS_DEV or /dev/kvm."""
    return os.environ.get(DEV_KVM_ENV, "/dev/kvm")


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str | None = None):
        self.path = path or dev_kvm_path()
        self._mmap_size: int | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Unavailable(f"{self.path} does not exist: load kvm_intel or kvm_amd (or set {DEV_KVM_ENV})")
        except PermissionError:
            raise Unavailable(f"no permission to open {self.path}: run as root or join the kvm group")
        except OSError as e:
            raise Unavailable(f"cannot open {self.path}: {e.strerror}")
        ret, err = ioctl(self.fd, uapi.KVM_GET_API_VERSION)
        if ret != uapi.KVM_API_VERSION:
            os.close(self.fd)
            raise Unavailable(f"{self.path} is not a KVM device (KVM_GET_API_VERSION: {ret}, {uapi.errno_name(err)})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm; a failing call reads as 0 (capability absent)."""
        return _check_extension(self.fd, cap)

    def create_vm_raw(self, vm_type: int = 0) -> tuple[int, int]:
        """KVM_CREATE_VM as is."""
        return ioctl(self.fd, uapi.KVM_CREATE_VM, vm_type)

    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> "Vm":
        fd = _check(f"KVM_CREATE_VM(type {vm_type})", self.create_vm_raw(vm_type))
        return Vm(self, fd, vm_type)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE, asked once: it is fixed for the module's lifetime, and every vCPU needs it."""
        if self._mmap_size is None:
            self._mmap_size = _check("KVM_GET_VCPU_MMAP_SIZE", ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE))
        return self._mmap_size

    def supported_cpuid(self) -> list[dict]:
        return _get_cpuid2(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")[0]

    def supported_hv_cpuid_raw(self) -> tuple[list[dict], int]:
        """KVM_GET_SUPPORTED_HV_CPUID on /dev/kvm: (entries, errno)."""
        return _get_cpuid2(self.fd, uapi.KVM_GET_SUPPORTED_HV_CPUID, None)

    def supported_hv_cpuid(self) -> list[dict]:
        return _get_cpuid2(self.fd, uapi.KVM_GET_SUPPORTED_HV_CPUID, "KVM_GET_SUPPORTED_HV_CPUID on /dev/kvm")[0]


CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def _check_extension(fd: int, cap: int) -> int:
    ret, _ = ioctl(fd, uapi.KVM_CHECK_EXTENSION, cap)
    return max(ret, 0)


def _get_cpuid2(fd: int, request: int, what: str | None) -> tuple[list[dict], int]:
    buf = ffi.cast("struct kvm_cpuid2 *", ffi.new("char[]", 8 + 40 * uapi.KVM_MAX_CPUID_ENTRIES))
    buf.nent = uapi.KVM_MAX_CPUID_ENTRIES
    ret, err = ioctl(fd, request, buf)
    if ret < 0:
        if what:
            _check(what, (ret, err))
        return ([], err)
    return ([{k: getattr(buf.entries[i], k) for k in CPUID_FIELDS} for i in range(buf.nent)], 0)


HUGE_PAGE = 0x200000


def _align_huge(ptr: object, size: int) -> object:
    """Trim a mapping of size + 2 MiB to `size` bytes starting on a 2 MiB boundary (THP needs it)."""
    base = int(ffi.cast("uintptr_t", ptr))
    aligned = (base + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    if aligned > base:
        uapi.munmap(ptr, aligned - base)
    uapi.munmap(ffi.cast("void *", aligned + size), base + HUGE_PAGE - aligned)
    return ffi.cast("void *", aligned)


class MemRegion:
    """Anonymous host memory behind one memslot (2 MiB aligned and THP-advised with `thp`)."""

    def __init__(self, vm: "Vm", slot: int, gpa: int, size: int, flags: int = 0, thp: bool = False):
        self.vm, self.slot, self.gpa, self.size, self.flags = vm, slot, gpa, size, flags
        mflags = uapi.MAP_PRIVATE | uapi.MAP_ANONYMOUS | uapi.MAP_NORESERVE
        slack = HUGE_PAGE if thp else 0
        ptr, err = uapi.mmap(size + slack, uapi.PROT_READ | uapi.PROT_WRITE, mflags)
        if ptr is None:
            raise KvmError(err, f"mmap of {size:#x} bytes for slot {slot}")
        if thp:
            ptr = _align_huge(ptr, size)
            uapi.madvise(ptr, size, uapi.MADV_HUGEPAGE)
        self.ptr = ptr
        self.hva = int(ffi.cast("uintptr_t", ptr))
        self.buf = ffi.buffer(ffi.cast("char *", ptr), size)

    def unmap(self) -> None:
        if self.ptr is not None:
            uapi.munmap(self.ptr, self.size)
            self.ptr = None

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self.buf[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa
        return self.buf[off:off + length]

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & (2**64 - 1)).to_bytes(8, "little"))


class Vm:
    """A KVM VM fd with its memory regions and vCPUs; closing it releases all of them."""

    def __init__(self, kvm: Kvm, fd: int, vm_type: int):
        self.kvm, self.fd, self.type = kvm, fd, vm_type
        self.regions: list[MemRegion] = []
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for region in self.regions:
            region.unmap()
        self.regions.clear()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd; a failing call reads as 0."""
        return _check_extension(self.fd, cap)

    def set_user_memory_region_raw(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> tuple[int, int]:
        region = ffi.new(_REGION, (slot, flags, gpa, size, hva))   # field order of the struct
        ret = _libc.ioctl(self.fd, _KVM_SET_USER_MEMORY_REGION, region)
        return (ret, ffi.errno if ret < 0 else 0)

    def set_user_memory_region2_raw(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                                    guest_memfd: int = 0, guest_memfd_offset: int = 0) -> tuple[int, int]:
        region = ffi.new("struct kvm_userspace_memory_region2 *",
                         {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size,
                          "userspace_addr": hva, "guest_memfd": guest_memfd,
                          "guest_memfd_offset": guest_memfd_offset})
        return ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION2, region)

    def create_guest_memfd_raw(self, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_CREATE_GUEST_MEMFD: (fd, errno); the caller closes the fd."""
        return ioctl(self.fd, uapi.KVM_CREATE_GUEST_MEMFD,
                     ffi.new("struct kvm_create_guest_memfd *", {"size": size, "flags": flags}))

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: the fd, which the caller closes."""
        return _check(f"KVM_CREATE_GUEST_MEMFD(size {size:#x}, flags {flags:#x})",
                      self.create_guest_memfd_raw(size, flags))

    def add_region(self, slot: int, gpa: int, size: int, flags: int = 0, thp: bool = False) -> MemRegion:
        region = MemRegion(self, slot, gpa, size, flags, thp)
        self.regions.append(region)
        _check(f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, size {size:#x})",
               self.set_user_memory_region_raw(slot, gpa, size, region.hva, flags))
        return region

    def remove_region(self, region: MemRegion) -> None:
        _check(f"deleting slot {region.slot}", self.set_user_memory_region_raw(region.slot, region.gpa, 0, 0, 0))
        region.unmap()
        self.regions.remove(region)

    def region_for(self, gpa: int, length: int = 1) -> MemRegion:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise KeyError(f"no memory region holds GPA {gpa:#x}+{length:#x}")

    def write(self, gpa: int, data: bytes) -> None:
        self.region_for(gpa, len(data)).write(gpa, data)

    def read(self, gpa: int, length: int) -> bytes:
        return self.region_for(gpa, length).read(gpa, length)

    def set_tss_addr(self, gpa: int = 0xFFFBD000) -> None:
        _check("KVM_SET_TSS_ADDR", ioctl(self.fd, uapi.KVM_SET_TSS_ADDR, gpa))

    def create_irqchip_raw(self) -> tuple[int, int]:
        """KVM_CREATE_IRQCHIP as is."""
        return ioctl(self.fd, uapi.KVM_CREATE_IRQCHIP)

    def create_irqchip(self) -> None:
        _check("KVM_CREATE_IRQCHIP", self.create_irqchip_raw())

    def set_memory_attributes_raw(self, gpa: int, size: int, attributes: int, flags: int = 0) -> tuple[int, int]:
        """KVM_SET_MEMORY_ATTRIBUTES as is."""
        attrs = ffi.new(_ATTRS, (gpa, size, attributes, flags))   # field order of the struct
        ret = _libc.ioctl(self.fd, _KVM_SET_MEMORY_ATTRIBUTES, attrs)
        return (ret, ffi.errno if ret < 0 else 0)

    def set_memory_attributes(self, gpa: int, size: int, attributes: int, flags: int = 0) -> None:
        _check(f"KVM_SET_MEMORY_ATTRIBUTES(gpa {gpa:#x}, size {size:#x}, attributes {attributes:#x})",
               self.set_memory_attributes_raw(gpa, size, attributes, flags))

    def signal_msi_raw(self, address: int, data: int, flags: int = 0) -> tuple[int, int]:
        """KVM_SIGNAL_MSI as is (a positive ret: the MSI was delivered; 0: the guest blocked it)."""
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32,
                                           "data": data, "flags": flags})
        return ioctl(self.fd, uapi.KVM_SIGNAL_MSI, msi)

    def signal_msi(self, address: int, data: int, flags: int = 0) -> int:
        return _check(f"KVM_SIGNAL_MSI(address {address:#x}, data {data:#x})",
                      self.signal_msi_raw(address, data, flags))

    def enable_cap_raw(self, cap: int, *args: int) -> tuple[int, int]:
        """KVM_ENABLE_CAP on the VM fd as is."""
        return ioctl(self.fd, uapi.KVM_ENABLE_CAP, _enable_cap(cap, args))

    def enable_cap(self, cap: int, *args: int) -> None:
        _check(f"KVM_ENABLE_CAP({cap}) on the VM", self.enable_cap_raw(cap, *args))

    def set_msr_filter_raw(self, flags: int, ranges: Iterable[tuple[int, int, int, bytes]]) -> tuple[int, int]:
        """KVM_X86_SET_MSR_FILTER with (flags, base, nmsrs, bitmap) ranges, as is."""
        filt = ffi.new("struct kvm_msr_filter *", {"flags": flags})
        keep = []
        for i, (rflags, base, nmsrs, bitmap) in enumerate(ranges):
            bits = ffi.new("uint8_t[]", bitmap)
            keep.append(bits)
            filt.ranges[i] = {"flags": rflags, "nmsrs": nmsrs, "base": base, "bitmap": bits}
        return ioctl(self.fd, uapi.KVM_X86_SET_MSR_FILTER, filt)

    def set_msr_filter(self, flags: int, ranges: Iterable[tuple[int, int, int, bytes]]) -> None:
        _check("KVM_X86_SET_MSR_FILTER", self.set_msr_filter_raw(flags, ranges))

    def create_vcpu_raw(self, vcpu_id: int) -> tuple[int, int]:
        return ioctl(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id)

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        fd = _check(f"KVM_CREATE_VCPU({vcpu_id})", self.create_vcpu_raw(vcpu_id))
        vcpu = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu


def _enable_cap(cap: int, args: Iterable[int]) -> object:
    ec = ffi.new("struct kvm_enable_cap *", {"cap": cap})
    for i, a in enumerate(args):
        ec.args[i] = a
    return ec


@dataclass(slots=True)
class Exit:
    """What one KVM_RUN returned, decoded enough to name it in a message."""

    ret: int
    errno: int
    reason: int
    timed_out: bool = False

    @property
    def name(self) -> str:
        if self.timed_out:
            return "watchdog timeout"
        return uapi.exit_name(self.reason)


_KVM_RUN, _NO_ARG = uapi.KVM_RUN, ffi.cast("unsigned long", 0)
# Vcpu.run's inlined watcher.arm/disarm
_armed, _next_token = watcher.armed, watcher.next_token
_monotonic, _get_ident = time.monotonic, threading.get_ident
_KVM_SET_USER_MEMORY_REGION, _REGION = (uapi.KVM_SET_USER_MEMORY_REGION,
                                        ffi.typeof("struct kvm_userspace_memory_region *"))
_KVM_SET_MEMORY_ATTRIBUTES, _ATTRS = (uapi.KVM_SET_MEMORY_ATTRIBUTES,
                                      ffi.typeof("struct kvm_memory_attributes *"))
_KVM_GET_REGS, _KVM_SET_REGS, _REGS = uapi.KVM_GET_REGS, uapi.KVM_SET_REGS, ffi.typeof("struct kvm_regs *")
_PTR_TYPES = {name: ffi.typeof(name + " *") for name in (
    "struct kvm_regs", "struct kvm_sregs", "struct kvm_fpu", "struct kvm_xsave", "struct kvm_lapic_state",
    "struct kvm_vcpu_events")}


class Vcpu:
    """A vCPU fd with its mmap'd kvm_run."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int):
        self.vm, self.fd, self.id = vm, fd, vcpu_id
        self.mmap_size = vm.kvm.vcpu_mmap_size()
        ptr, err = uapi.mmap(self.mmap_size, uapi.PROT_READ | uapi.PROT_WRITE, uapi.MAP_SHARED, fd)
        if ptr is None:
            os.close(fd)
            raise KvmError(err, "mmap of kvm_run")
        self._map = ptr
        self.run_struct = ffi.cast("struct kvm_run *", ptr)
        self.last_exit: Exit | None = None

    def close(self) -> None:
        if self._map is not None:
            uapi.munmap(self._map, self.mmap_size)
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def run_bytes(self, offset: int, length: int) -> bytes:
        return ffi.buffer(ffi.cast("char *", self._map) + offset, length)[:]

    def set_run_bytes(self, offset: int, data: bytes) -> None:
        ffi.buffer(ffi.cast("char *", self._map) + offset, len(data))[:] = data

    def complete_exit(self, timeout: float = 5.0) -> Exit:
        """KVM_RUN with immediate_exit: KVM finishes the last userspace exit (RIP past the instruction) without
        entering the guest (api.rst), and answers EINTR."""
        self.run_struct.immediate_exit = 1
        try:
            return self.run(timeout)
        finally:
            self.run_struct.immediate_exit = 0

    def run(self, timeout: float = 5.0) -> Exit:
        """One KVM_RUN bounded by the watchdog; a timeout shows as Exit.timed_out. watcher.arm/disarm and
        uapi.ioctl are inlined (a method call each costs as much as the work): this is the hot path."""
        if watcher.thread is None:   # started by the first run, not by the first vCPU: tests count threads and maps
            watcher.start()
        run = self.run_struct
        _armed[token := _next_token()] = [_monotonic() + timeout, run, _get_ident()]
        ret = _libc.ioctl(self.fd, _KVM_RUN, _NO_ARG)
        err = ffi.errno if ret < 0 else 0
        if _armed.pop(token, None) is None:
            watcher.wait_kicked()
            run.immediate_exit = 0
            ex = Exit(ret, err, run.exit_reason, err == errno.EINTR)
        else:
            ex = Exit(ret, err, run.exit_reason)
        self.last_exit = ex
        return ex

    def _get(self, request: int, ctype: str, what: str) -> object:
        obj = ffi.new(_PTR_TYPES[ctype])
        _check(what, ioctl(self.fd, request, obj))
        return obj

    def get_regs(self) -> object:
        regs = ffi.new(_REGS)   # _get inlined: register access is on every exit path
        if _libc.ioctl(self.fd, _KVM_GET_REGS, regs) < 0:
            _check("KVM_GET_REGS", (-1, ffi.errno))
        return regs

    def set_regs(self, regs: object) -> None:
        if _libc.ioctl(self.fd, _KVM_SET_REGS, regs) < 0:
            _check("KVM_SET_REGS", (-1, ffi.errno))

    def get_sregs(self) -> object:
        return self._get(uapi.KVM_GET_SREGS, "struct kvm_sregs", "KVM_GET_SREGS")

    def set_sregs(self, sregs: object) -> None:
        _check("KVM_SET_SREGS", ioctl(self.fd, uapi.KVM_SET_SREGS, sregs))

    def get_fpu(self) -> object:
        return self._get(uapi.KVM_GET_FPU, "struct kvm_fpu", "KVM_GET_FPU")

    def set_fpu(self, fpu: object) -> None:
        _check("KVM_SET_FPU", ioctl(self.fd, uapi.KVM_SET_FPU, fpu))

    def get_xsave(self) -> object:
        return self._get(uapi.KVM_GET_XSAVE, "struct kvm_xsave", "KVM_GET_XSAVE")

    def set_xsave(self, xsave: object) -> None:
        _check("KVM_SET_XSAVE", ioctl(self.fd, uapi.KVM_SET_XSAVE, xsave))

    def get_lapic(self) -> bytes:
        return bytes(ffi.buffer(self._get(uapi.KVM_GET_LAPIC, "struct kvm_lapic_state", "KVM_GET_LAPIC")))

    def set_lapic(self, regs: bytes) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(state, regs, len(regs))
        _check("KVM_SET_LAPIC", ioctl(self.fd, uapi.KVM_SET_LAPIC, state))

    def get_events(self) -> object:
        return self._get(uapi.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS")

    def set_events(self, events: object) -> None:
        _check("KVM_SET_VCPU_EVENTS", ioctl(self.fd, uapi.KVM_SET_VCPU_EVENTS, events))

    def nmi_raw(self) -> tuple[int, int]:
        """KVM_NMI as is."""
        return ioctl(self.fd, uapi.KVM_NMI)

    def nmi(self) -> None:
        _check("KVM_NMI", self.nmi_raw())

    def get_mp_state_raw(self) -> tuple[int, int]:
        """KVM_GET_MP_STATE: (state or -1, errno)."""
        st = ffi.new("struct kvm_mp_state *")
        ret, err = ioctl(self.fd, uapi.KVM_GET_MP_STATE, st)
        return (st.mp_state if ret == 0 else -1, err)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: the state."""
        state, err = self.get_mp_state_raw()
        if state < 0:
            _check("KVM_GET_MP_STATE", (-1, err))
        return state

    def set_mp_state_raw(self, state: int) -> tuple[int, int]:
        """KVM_SET_MP_STATE as is."""
        return ioctl(self.fd, uapi.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def set_mp_state(self, state: int) -> None:
        _check(f"KVM_SET_MP_STATE({state})", self.set_mp_state_raw(state))

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; only the MSRs KVM returned are in the result."""
        indices = list(indices)
        msrs = ffi.cast("struct kvm_msrs *", ffi.new("char[]", 8 + 16 * len(indices)))
        msrs.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        n = _check("KVM_GET_MSRS", ioctl(self.fd, uapi.KVM_GET_MSRS, msrs))
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS: how many MSRs KVM accepted (it stops at the first refused one)."""
        buf = ffi.new("char[]", 8 + 16 * len(values))
        msrs = ffi.cast("struct kvm_msrs *", buf)
        msrs.nmsrs = len(values)
        for i, (idx, data) in enumerate(values.items()):
            msrs.entries[i].index, msrs.entries[i].data = idx, data
        return _check("KVM_SET_MSRS", ioctl(self.fd, uapi.KVM_SET_MSRS, msrs))

    def set_cpuid_raw(self, entries: list[dict]) -> tuple[int, int]:
        buf = ffi.new("char[]", 8 + 40 * len(entries))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            for k in CPUID_FIELDS:
                setattr(cpuid.entries[i], k, e.get(k, 0))
        return ioctl(self.fd, uapi.KVM_SET_CPUID2, cpuid)

    def set_cpuid(self, entries: list[dict]) -> None:
        _check("KVM_SET_CPUID2", self.set_cpuid_raw(entries))

    def get_cpuid(self) -> list[dict]:
        return _get_cpuid2(self.fd, uapi.KVM_GET_CPUID2, "KVM_GET_CPUID2")[0]

    def supported_hv_cpuid_raw(self) -> tuple[list[dict], int]:
        """KVM_GET_SUPPORTED_HV_CPUID on the vCPU fd: (entries, errno)."""
        return _get_cpuid2(self.fd, uapi.KVM_GET_SUPPORTED_HV_CPUID, None)

    def supported_hv_cpuid(self) -> list[dict]:
        return _get_cpuid2(self.fd, uapi.KVM_GET_SUPPORTED_HV_CPUID, f"KVM_GET_SUPPORTED_HV_CPUID on vCPU {self.id}")[0]

    def enable_cap_raw(self, cap: int, *args: int) -> tuple[int, int]:
        """KVM_ENABLE_CAP on the vCPU fd as is."""
        return ioctl(self.fd, uapi.KVM_ENABLE_CAP, _enable_cap(cap, args))

    def enable_cap(self, cap: int, *args: int) -> None:
        _check(f"KVM_ENABLE_CAP({cap}) on vCPU {self.id}", self.enable_cap_raw(cap, *args))
