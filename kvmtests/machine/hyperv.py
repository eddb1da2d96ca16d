"""Hyper-V vCPU builder and hypercall driver (guest side in guestasm/hcall*.S)."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from kvmtests import hvtlfs, uapi

from . import asm, guest
from .kvm import Kvm, Unavailable, Vm

REGS_IN_GPA = guest.UCALL_GPA + 0x800    # hcall.S: the FXSAVE image the guest restores before the call
REGS_OUT_GPA = guest.UCALL_GPA + 0xA00   # hcall.S: its FXSAVE image after the call, then RDX, R8, RFLAGS
FXSAVE_SIZE, FX_FCW, FX_MXCSR, FX_XMM = 512, 0, 24, 160   # SDM: FXSAVE image layout
FCW_DEFAULT = 0x37F
REPORT_RDX, REPORT_R8, REPORT_RFLAGS = FXSAVE_SIZE, FXSAVE_SIZE + 8, FXSAVE_SIZE + 16   # REGS_OUT after the image
REPORT_SIZE = REPORT_RFLAGS + 8
# What hcall*.S get as --defsym on top of guest.layout_defines(): the one definition of their report areas.
HCALL_DEFINES = {"REGS_IN": REGS_IN_GPA, "REGS_OUT": REGS_OUT_GPA, "REPORT_RDX": REPORT_RDX, "REPORT_R8": REPORT_R8,
                 "REPORT_RFLAGS": REPORT_RFLAGS}
INPUT_GPA = guest.DATA_GPA          # slow hypercalls' input page
RAX_SENTINEL = 0x5A5A5A5A5A5A5A5A
RBX_SENTINEL = 0x3C3C3C3C3C3C3C3C   # non-zero, so that a VMMCALL tail (add %ebx,%ecx) would show in RCX
RFLAGS_SEED = 0x8D7                 # CF PF AF ZF SF OF and the fixed bit 1; IF clear: no flag is the reset value
MXCSR_SEED = 0x7F80                 # all exceptions masked, round toward zero: not the reset value 0x1F80
EXIT_REASON_SENTINEL = 0xFFFFFFFF
# kvm_run offset and size of struct kvm_hyperv_exit (P01 layout), from uapi's definitions
HYPERV_EXIT = (uapi.ffi.offsetof("struct kvm_run", "x"), uapi.ffi.sizeof("struct kvm_hyperv_exit"))
SENTINEL = 0xA5                     # fills HYPERV_EXIT before every run
LAPIC_SVR, LAPIC_SVR_ENABLE = 0xF0, 1 << 8
LAPIC_ISR, LAPIC_IRR = 0x100, 0x200
# KVM_GET_REGS fields: a hypercall's completion writes RAX and RIP (32-bit: EDX too) and leaves the rest alone
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
             "r15", "rip", "rflags")

Xmm = tuple[int, int]  # (low 64 bits, high 64 bits)
XMM_SENTINEL = (int.from_bytes(bytes([SENTINEL]) * 8, "little"),) * 2
XMM_DEFAULT = [(0x4D4D4D4D00000000 | i, 0x3D3D3D3D00000000 | i) for i in range(6)]   # XMM0-5 unless a row says
XMM_SEED = [(0x5E5E5E5E00000000 | i, 0x6E6E6E6E00000000 | i) for i in range(6, 16)]  # XMM6-15: no call touches them


class KnownDeviation(AssertionError):
    """Exactly the v1 behaviour of a warning item (88, 116): strict xfail on it alone, other failures stay failures."""


def code_group(code: int) -> str:
    """The feature group (features.GROUPS) whose patch makes `code` exit: P18's VSM codes, P04's IPIs or P06-P08's."""
    if code in hvtlfs.VSM_CODES:
        return "vsm_hcalls"
    return "vtl_ipi" if code in (hvtlfs.HVCALL_SEND_IPI, hvtlfs.HVCALL_SEND_IPI_EX) else "hv_exits"


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
class Call:
    """One hypercall as the guest issued it: what its exit must carry and what its completion must leave alone."""

    control: int
    rdx: int = 0                   # input parameter (32-bit: EBX:ECX)
    r8: int = 0                    # output parameter (32-bit: EDI:ESI)
    xmm: list[Xmm] = field(default_factory=lambda: list(XMM_DEFAULT))   # XMM0-5 the guest loaded
    insn: int = 0                  # guest address of the VMCALL/VMMCALL
    regs: dict[str, int] = field(default_factory=dict)   # REG_NAMES as the host set them for the call
    bits: int = 64

    @property
    def code(self) -> int:
        return self.control & 0xFFFF

    @property
    def fast(self) -> bool:
        return bool(self.control & hvtlfs.HV_HYPERCALL_FAST_BIT)


@dataclass
class HvMachine:
    """A Machine whose vCPU(s) carry Hyper-V CPUID, the guest OS ID and optionally ENFORCE_CPUID."""

    machine: guest.Machine
    vmmcall: bool
    cpuid: list[dict] = field(default_factory=list)
    call: Call | None = None       # the last hypercall issued

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
    hv, err = vcpu.supported_hv_cpuid_raw()
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


def hcall_payload(mode: int = 64) -> asm.Payload:
    """The hypercall payload for a 64-bit or a 32-bit guest."""
    return guest.load_payload("hcall" if mode == 64 else "hcall32", bits=mode, defines=HCALL_DEFINES)


def build_hv_machine(vm: Vm, bits: CpuidBits | None = None, *, enforce_cpuid: bool = False,
                     irqchip: bool = True, guest_os_id: int = hvtlfs.GUEST_OS_ID_LINUX, mode: int = 64,
                     vcpus: int = 1) -> HvMachine:
    """A Hyper-V guest running the hypercall payload (spec section 1 prerequisites)."""
    require_hyperv(vm.kvm)
    if irqchip:
        ret, err = vm.create_irqchip_raw()
        if ret < 0:
            raise Unavailable(f"KVM_CREATE_IRQCHIP failed ({uapi.errno_name(err)})")
    payload = hcall_payload(mode)
    vmmcall = host_uses_vmmcall()
    machine = guest.build_machine(vm, payload, entry=f"hcall_{'vmmcall' if vmmcall else 'vmcall'}", bits=mode,
                                  vcpus=vcpus)
    hvm = HvMachine(machine, vmmcall)
    for vcpu in machine.vcpus:
        hvm.cpuid = hv_cpuid(vm.kvm, vcpu, bits or CpuidBits())
        vcpu.set_cpuid(hvm.cpuid)
        if enforce_cpuid:
            ret, err = vcpu.enable_cap_raw(uapi.KVM_CAP_HYPERV_ENFORCE_CPUID, 1)
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
class HcallOutcome:
    """What a hypercall did: exited to userspace, completed in the guest, or raised an exception."""

    call: Call | None = None
    exited: bool = False
    input: int = 0
    result: int = 0
    params: tuple[int, int] = (0, 0)
    xmm: list[Xmm] = field(default_factory=lambda: [XMM_SENTINEL] * 6)   # as pre-filled until KVM writes it
    completed: bool = False
    rax: int = 0                   # what the guest reports after the call (32-bit: RAX and RDX only)
    rcx: int = 0
    rdx: int = 0
    r8: int = 0
    rflags: int = 0
    xmm_after: list[Xmm] = field(default_factory=list)   # XMM0-15
    mxcsr: int = 0
    exception: int | None = None
    rip: int = 0
    completion: dict[str, int] | None = None   # REG_NAMES from KVM_GET_REGS right after a userspace completion
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


def _fxsave_image(xmm: list[Xmm]) -> bytes:
    """What the guest's FXRSTOR loads: the x87 defaults, MXCSR_SEED and XMM0-15."""
    image = bytearray(FXSAVE_SIZE)
    struct.pack_into("<H", image, FX_FCW, FCW_DEFAULT)
    struct.pack_into("<I", image, FX_MXCSR, MXCSR_SEED)
    for i, (lo, hi) in enumerate(xmm):
        struct.pack_into("<QQ", image, FX_XMM + 16 * i, lo, hi)
    return bytes(image)


def _resumed(m: guest.Machine, call: Call, uc: guest.Ucall) -> HcallOutcome:
    """The registers the guest reported after the call (hcall.S: RAX, RCX in the ucall, the rest in REGS_OUT)."""
    if m.bits == 32:
        return HcallOutcome(call, completed=True, rax=uc.args[1], rdx=m.run_until(guest.UCALL_SYNC).args[1])
    raw = m.mem.read(REGS_OUT_GPA, REPORT_SIZE)
    rdx, r8, rflags = struct.unpack_from("<QQQ", raw, FXSAVE_SIZE)
    return HcallOutcome(call, completed=True, rax=uc.args[1], rcx=uc.args[2], rdx=rdx, r8=r8, rflags=rflags,
                        xmm_after=[struct.unpack_from("<QQ", raw, FX_XMM + 16 * i) for i in range(16)],
                        mxcsr=struct.unpack_from("<I", raw, FX_MXCSR)[0])


def _observe(hvm: HvMachine, timeout: float) -> HcallOutcome:
    """One KVM_RUN with sentinels in exit_reason and the whole hyperv exit, decoded."""
    m, vcpu, call = hvm.machine, hvm.machine.vcpu, hvm.call
    vcpu.run_struct.exit_reason = EXIT_REASON_SENTINEL
    offset, size = HYPERV_EXIT
    vcpu.set_run_bytes(offset, bytes([SENTINEL]) * size)
    ex = vcpu.run(timeout)
    if ex.ret == 0 and ex.reason == uapi.KVM_EXIT_HYPERV and vcpu.run_struct.x.hyperv.type == uapi.KVM_EXIT_HYPERV_HCALL:
        h = vcpu.run_struct.x.hyperv.u.hcall
        return HcallOutcome(call, exited=True, input=h.input, result=h.result, params=(h.params[0], h.params[1]),
                            xmm=[(h.xmm[i].low, h.xmm[i].high) for i in range(6)])
    uc = m.ucall()
    if uc and uc.cmd == guest.UCALL_SYNC and uc.args[0] == 1:
        return _resumed(m, call, uc)
    if uc and uc.cmd == guest.UCALL_EXCEPTION:
        return HcallOutcome(call, exception=uc.args[0], rip=uc.args[2])
    return HcallOutcome(call, detail=m.describe())


def hypercall(hvm: HvMachine, control: int, rdx: int = 0, r8: int = 0, *, xmm: list[Xmm] | None = None,
              rax: int = RAX_SENTINEL, entry: str = "hcall", timeout: float = 5.0) -> HcallOutcome:
    """Issue one hypercall from the guest (64-bit: RCX/RDX/R8 and XMM0-5, with XMM6-15, MXCSR and RFLAGS seeded so
    that a completion touching them shows; 32-bit: EDX:EAX, EBX:ECX, EDI:ESI, no XMM)."""
    m = hvm.machine
    xmm = list(xmm or XMM_DEFAULT)
    m.mem.write(REGS_IN_GPA, _fxsave_image(xmm + XMM_SEED))
    m.mem.write(REGS_OUT_GPA, bytes(REPORT_SIZE))
    regs = m.vcpu.get_regs()
    regs.rip = m.sym(hvm.entry(entry))
    regs.rsp = guest.STACK_TOP
    regs.rflags = RFLAGS_SEED
    if m.bits == 64:
        regs.rcx, regs.rdx, regs.r8, regs.rax, regs.rbx = control, rdx, r8, rax, RBX_SENTINEL
    else:
        regs.rdx, regs.rax = control >> 32, control & 0xFFFFFFFF
        regs.rbx, regs.rcx = rdx >> 32, rdx & 0xFFFFFFFF
        regs.rdi, regs.rsi = r8 >> 32, r8 & 0xFFFFFFFF
    m.vcpu.set_regs(regs)
    hvm.call = Call(control, rdx, r8, xmm, hvm.insn, _snapshot(regs), m.bits)
    return _observe(hvm, timeout)


def _snapshot(regs: object) -> dict[str, int]:
    return {name: getattr(regs, name) for name in REG_NAMES}


def complete(hvm: HvMachine, result: int, *, xmm: list[Xmm] | None = None, input: int | None = None,
             timeout: float = 5.0) -> HcallOutcome:
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
        return HcallOutcome(hvm.call,
                            detail=f"KVM_RUN with immediate_exit to complete the hypercall: {hvm.machine.describe()}")
    regs = _snapshot(vcpu.get_regs())
    out = _observe(hvm, timeout)
    out.completion = regs
    return out


def resume_after_exception(hvm: HvMachine, timeout: float = 5.0) -> HcallOutcome:
    """After a reported guest exception at the hypercall, continue after it: the guest stores XMM0-5 and
    reports RAX, so an injected #UD can be checked for what it left unwritten."""
    hvm.machine.set_resume(hvm.after)
    return _observe(hvm, timeout)


def lapic_vectors(regs: bytes, base: int) -> frozenset[int]:
    """The vectors set in a 256-bit LAPIC register (ISR 0x100, IRR 0x200) of a KVM_GET_LAPIC image."""
    words = [struct.unpack_from("<I", regs, base + 0x10 * i)[0] for i in range(8)]
    return frozenset(32 * i + bit for i, word in enumerate(words) for bit in range(32) if word >> bit & 1)


def irr_pending(vcpu: object, vector: int) -> bool:
    """Is `vector` pending in the in-kernel LAPIC's IRR (KVM_GET_LAPIC)?"""
    return vector in lapic_vectors(vcpu.get_lapic(), LAPIC_IRR)
