"""Hyper-V vCPU builder and hypercall driver (guest side in guestasm/hcall*.S)."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from kvmtests import hvtlfs, uapi

from . import guest
from .kvm import Kvm, Unavailable, Vm

XMM_IN_GPA = guest.UCALL_GPA + 0x800
XMM_OUT_GPA = guest.UCALL_GPA + 0x880
INPUT_GPA = guest.DATA_GPA          # slow hypercalls' input page
RAX_SENTINEL = 0x5A5A5A5A5A5A5A5A
RBX_SENTINEL = 0x3C3C3C3C3C3C3C3C   # non-zero, so that a VMMCALL tail (add %ebx,%ecx) would show in RCX
LAPIC_SVR, LAPIC_SVR_ENABLE = 0xF0, 1 << 8
LAPIC_IRR = 0x200

Xmm = tuple[int, int]  # (low 64 bits, high 64 bits)


class KnownDeviation(AssertionError):
    """Exactly the v1 behaviour of a warning item (88, 116): strict xfail on it alone, other failures stay failures."""


def code_group(code: int) -> str:
    """The feature group (features.GROUPS) whose patch makes `code` exit: P18's VSM codes or P06-P08's."""
    return "vsm_hcalls" if code in hvtlfs.VSM_CODES else "hv_exits"


def require_hyperv(kvm: Kvm) -> None:
    """Hyper-V emulation is a precondition of every hypercall test."""
    if not kvm.check_extension(uapi.KVM_CAP_HYPERV):
        raise Unavailable("kernel lacks KVM_CAP_HYPERV (Hyper-V emulation, CONFIG_KVM_HYPERV)")


def host_uses_vmmcall() -> bool:
    """AMD hosts take VMMCALL natively; Intel ones VMCALL."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return "AuthenticAMD" in line or "HygonGenuine" in line
    return False


@dataclass
class CpuidBits:
    """Switches for the 0x40000003 feature bits; None keeps what KVM_GET_SUPPORTED_HV_CPUID said."""

    ebx_set: int = 0
    ebx_clear: int = 0
    edx_set: int = 0
    edx_clear: int = 0


@dataclass
class HvMachine:
    """A Machine whose vCPU(s) carry Hyper-V CPUID, the guest OS ID and optionally ENFORCE_CPUID."""

    machine: guest.Machine
    vmmcall: bool
    cpuid: list[dict] = field(default_factory=list)

    @property
    def vcpu(self) -> object:
        return self.machine.vcpu

    def entry(self, what: str = "hcall") -> str:
        return f"{what}_{'vmmcall' if self.vmmcall else 'vmcall'}"

    @property
    def insn(self) -> int:
        """Guest address of the hypercall instruction."""
        return self.machine.sym(self.entry("hcall") + "_insn")

    @property
    def after(self) -> int:
        """Guest address of the instruction after it."""
        return self.machine.sym(self.entry("hcall") + "_after")


def hv_cpuid(kvm: Kvm, vcpu: object, bits: CpuidBits, *, signature: bool = True) -> list[dict]:
    """Base CPUID plus KVM's supported Hyper-V leaves, with the requested 0x40000003 bits switched."""
    hv, err = vcpu.supported_hv_cpuid()
    if err:
        raise Unavailable(f"KVM_GET_SUPPORTED_HV_CPUID failed on the vCPU ({uapi.errno_name(err)})")
    base = [e for e in kvm.supported_cpuid() if not 0x40000000 <= e["function"] <= 0x400000FF]
    out = []
    for e in hv:
        e = dict(e)
        if e["function"] == hvtlfs.HYPERV_CPUID_FEATURES:
            e["ebx"] = (e["ebx"] | bits.ebx_set) & ~bits.ebx_clear
            e["edx"] = (e["edx"] | bits.edx_set) & ~bits.edx_clear
        if e["function"] == hvtlfs.HYPERV_CPUID_INTERFACE and not signature:
            e["eax"] = 0
        out.append(e)
    return base + out


def build(vm: Vm, bits: CpuidBits | None = None, *, enforce_cpuid: bool = False, irqchip: bool = True,
          guest_os_id: int = hvtlfs.GUEST_OS_ID_LINUX, mode: int = 64, vcpus: int = 1) -> HvMachine:
    """A Hyper-V guest running the hypercall payload (spec section 1 prerequisites)."""
    require_hyperv(vm.kvm)
    if irqchip:
        ret, err = vm.create_irqchip()
        if ret < 0:
            raise Unavailable(f"KVM_CREATE_IRQCHIP failed ({uapi.errno_name(err)})")
    payload = guest.load_payload("hcall" if mode == 64 else "hcall32", bits=mode)
    vmmcall = host_uses_vmmcall()
    machine = guest.build(vm, payload, entry=f"hcall_{'vmmcall' if vmmcall else 'vmcall'}", bits=mode,
                          vcpus=vcpus)
    hvm = HvMachine(machine, vmmcall)
    for vcpu in machine.vcpus:
        hvm.cpuid = hv_cpuid(vm.kvm, vcpu, bits or CpuidBits())
        vcpu.set_cpuid(hvm.cpuid)
        if enforce_cpuid:
            ret, err = vcpu.enable_cap(uapi.KVM_CAP_HYPERV_ENFORCE_CPUID, 1)
            if ret < 0:
                raise Unavailable(f"kernel lacks KVM_CAP_HYPERV_ENFORCE_CPUID ({uapi.errno_name(err)})")
        if irqchip:
            enable_lapic(vcpu)
    if guest_os_id:
        machine.vcpu.set_msrs({hvtlfs.HV_X64_MSR_GUEST_OS_ID: guest_os_id})
    return hvm


def enable_lapic(vcpu: object) -> None:
    """Software-enable the in-kernel LAPIC (SVR bit 8) so that fixed interrupts are accepted."""
    regs = bytearray(vcpu.get_lapic())
    svr = struct.unpack_from("<I", regs, LAPIC_SVR)[0] | LAPIC_SVR_ENABLE | 0xFF
    struct.pack_into("<I", regs, LAPIC_SVR, svr)
    vcpu.set_lapic(bytes(regs))


@dataclass
class Outcome:
    """What a hypercall did: exited to userspace, completed in the guest, or raised an exception."""

    exited: bool = False
    input: int = 0
    result: int = 0
    params: tuple[int, int] = (0, 0)
    xmm: list[Xmm] = field(default_factory=list)
    completed: bool = False
    rax: int = 0
    edx: int = 0
    rcx: int = 0
    xmm_after: list[Xmm] = field(default_factory=list)
    exception: int | None = None
    rip: int = 0
    completion: tuple[int, int, int] | None = None  # (RIP, RAX, RDX) right after a userspace completion
    detail: str = ""

    def __str__(self) -> str:
        if self.exited:
            return (f"exit KVM_EXIT_HYPERV/HCALL input {self.input:#x} params {self.params[0]:#x} "
                    f"{self.params[1]:#x}")
        if self.completed:
            rax = "unchanged (sentinel)" if self.rax == RAX_SENTINEL else hvtlfs.status_name(self.rax)
            return f"no exit, the guest resumed after the hypercall with RAX {rax}"
        if self.exception is not None:
            return f"guest exception {guest.EXCEPTION_NAMES.get(self.exception, self.exception)} at {self.rip:#x}"
        return self.detail


def _xmm_bytes(values: list[Xmm]) -> bytes:
    return b"".join(struct.pack("<QQ", lo, hi) for lo, hi in values)


def _read_xmm(mem: object, gpa: int) -> list[Xmm]:
    raw = mem.read(gpa, 96)
    return [struct.unpack_from("<QQ", raw, 16 * i) for i in range(6)]


def _observe(hvm: HvMachine, timeout: float) -> Outcome:
    m, vcpu = hvm.machine, hvm.machine.vcpu
    ex = vcpu.run(timeout)
    if ex.ret == 0 and ex.reason == uapi.KVM_EXIT_HYPERV and vcpu.run_struct.x.hyperv.type == uapi.KVM_EXIT_HYPERV_HCALL:
        h = vcpu.run_struct.x.hyperv.u.hcall
        return Outcome(exited=True, input=h.input, result=h.result, params=(h.params[0], h.params[1]),
                       xmm=[(h.xmm[i].low, h.xmm[i].high) for i in range(6)])
    uc = m.ucall()
    if uc and uc.cmd == guest.UCALL_SYNC and uc.args[0] == 1:
        out = Outcome(completed=True, rax=uc.args[1], rcx=uc.args[2], xmm_after=_read_xmm(m.mem, XMM_OUT_GPA))
        if m.bits == 32:
            out.edx = m.run_until(guest.UCALL_SYNC).args[1]
        return out
    if uc and uc.cmd == guest.UCALL_EXCEPTION:
        return Outcome(exception=uc.args[0], rip=uc.args[2])
    return Outcome(detail=m.describe())


def hypercall(hvm: HvMachine, control: int, rdx: int = 0, r8: int = 0, *, xmm: list[Xmm] | None = None,
              rax: int = RAX_SENTINEL, entry: str = "hcall", timeout: float = 5.0) -> Outcome:
    """Issue one hypercall from the guest (64-bit: RCX/RDX/R8; 32-bit: EDX:EAX, EBX:ECX, EDI:ESI)."""
    m = hvm.machine
    m.mem.write(XMM_IN_GPA, _xmm_bytes(xmm or [(0, 0)] * 6))
    m.mem.write(XMM_OUT_GPA, bytes(96))
    regs = m.vcpu.get_regs()
    regs.rip = m.sym(hvm.entry(entry))
    regs.rsp = guest.STACK_TOP
    if m.bits == 64:
        regs.rcx, regs.rdx, regs.r8, regs.rax, regs.rbx = control, rdx, r8, rax, RBX_SENTINEL
    else:
        regs.rdx, regs.rax = control >> 32, control & 0xFFFFFFFF
        regs.rbx, regs.rcx = rdx >> 32, rdx & 0xFFFFFFFF
        regs.rdi, regs.rsi = r8 >> 32, r8 & 0xFFFFFFFF
    m.vcpu.set_regs(regs)
    return _observe(hvm, timeout)


def complete(hvm: HvMachine, result: int, *, xmm: list[Xmm] | None = None, input: int | None = None,
             timeout: float = 5.0) -> Outcome:
    """Finish a userspace hypercall exit: write hcall.result (and xmm/input), let KVM complete it without
    entering the guest (immediate_exit, api.rst) to read RIP/RAX/RDX, then resume and observe."""
    vcpu = hvm.vcpu
    h = vcpu.run_struct.x.hyperv.u.hcall
    h.result = result
    if input is not None:
        h.input = input
    for i, (lo, hi) in enumerate(xmm or []):
        h.xmm[i].low, h.xmm[i].high = lo, hi
    ex = vcpu.complete_exit(timeout)
    if not (ex.ret < 0 and ex.errno == errno.EINTR):
        return Outcome(detail=f"KVM_RUN with immediate_exit to complete the hypercall: {hvm.machine.describe()}")
    regs = vcpu.get_regs()
    out = _observe(hvm, timeout)
    out.completion = (regs.rip, regs.rax, regs.rdx)
    return out


def resume_after_exception(hvm: HvMachine, timeout: float = 5.0) -> Outcome:
    """After a reported guest exception at the hypercall, continue after it: the guest stores XMM0-5 and
    reports RAX, so an injected #UD can be checked for what it left unwritten."""
    hvm.machine.set_resume(hvm.after)
    return _observe(hvm, timeout)


def irr_pending(vcpu: object, vector: int) -> bool:
    """Is `vector` pending in the in-kernel LAPIC's IRR (KVM_GET_LAPIC)?"""
    regs = vcpu.get_lapic()
    word = struct.unpack_from("<I", regs, LAPIC_IRR + 0x10 * (vector // 32))[0]
    return bool(word >> (vector % 32) & 1)
