"""VTL-aware PV IPIs: SendSyntheticClusterIpi (0x0B) and ...Ex (0x15) with in_vtl (catalog 111-122).

vCPU 0 sends, VP 1 (vCPU 1, never run) is the target; delivery is read from vCPU 1's LAPIC IRR. Every exit,
completion and in-kernel answer is checked whole by the shared helpers (machine/hvexits.py)."""
import struct
from dataclasses import dataclass

import pytest

from kvmtests import hvtlfs
from kvmtests.hvtlfs import status_name
from kvmtests.machine import hyperv
from kvmtests.machine.hvexits import expect_completion, expect_exit, expect_status
from kvmtests.machine.hyperv import CpuidBits

VECTOR, BAD_VECTOR = 0x30, 0x05
TARGET = 1
USE_VTL = hvtlfs.HV_INPUT_VTL_USE_TARGET_VTL
VSM, NON_VSM = CpuidBits(ebx_set=hvtlfs.HV_ACCESS_VSM), CpuidBits(ebx_clear=hvtlfs.HV_ACCESS_VSM)
VARIANTS = ["fast-0x0b", "slow-0x0b", "fast-0x15", "slow-0x15"]
UNTOUCHED_XMM = [(0, 0)] * 6


@dataclass
class Ipi:
    """One IPI hypercall: control word, RDX, R8, guest XMM0-5, and the slow input (at hyperv.INPUT_GPA)."""

    control: int
    rdx: int
    r8: int
    xmm: list
    slow_input: bytes = b""


def ipi(variant: str, in_vtl: int, vector: int = VECTOR, **ctl: int) -> Ipi:
    """Target VP 1 with `vector`; 0x15 uses a sparse VP set with one bank (var-header size 1)."""
    fast, ex = variant.startswith("fast"), variant.endswith("0x15")
    if not ex:
        code = hvtlfs.control(hvtlfs.HVCALL_SEND_IPI, fast=fast, **ctl)
        if fast:
            return Ipi(code, vector | in_vtl << 32, 1 << TARGET, UNTOUCHED_XMM)
        # struct hv_send_ipi (catalog 136): vector, in_vtl, reserved[3], cpu_mask
        return Ipi(code, hyperv.INPUT_GPA, 0, UNTOUCHED_XMM, struct.pack("<IB3xQ", vector, in_vtl, 1 << TARGET))
    code = hvtlfs.control(hvtlfs.HVCALL_SEND_IPI_EX, fast=fast, **{"varhead": 1, **ctl})
    if fast:
        # fast Ex: RDX = vector | in_vtl << 32, R8 = format, XMM0 = (valid_bank_mask, bank 0)
        xmm = [(1, 1 << TARGET)] + UNTOUCHED_XMM[1:]
        return Ipi(code, vector | in_vtl << 32, hvtlfs.HV_GENERIC_SET_SPARSE_4K, xmm)
    # struct hv_send_ipi_ex (catalog 137): vector, in_vtl, reserved[3], format, valid_bank_mask, bank_contents[]
    body = struct.pack("<IB3xQQQ", vector, in_vtl, hvtlfs.HV_GENERIC_SET_SPARSE_4K, 1, 1 << TARGET)
    return Ipi(code, hyperv.INPUT_GPA, 0, UNTOUCHED_XMM, body)


def send(vm, cpuid: CpuidBits, req: Ipi) -> tuple[hyperv.HvMachine, hyperv.HcallOutcome]:
    hvm = hyperv.build_hv_machine(vm, cpuid, vcpus=2)
    if req.slow_input:
        hvm.machine.mem.write(hyperv.INPUT_GPA, req.slow_input)
    return hvm, hyperv.hypercall(hvm, req.control, req.rdx, req.r8, xmm=req.xmm)


def delivered(hvm: hyperv.HvMachine) -> bool:
    return hyperv.irr_pending(hvm.machine.vcpus[TARGET], VECTOR)


def expect_vtl_exit(hvm: hyperv.HvMachine, out: hyperv.HcallOutcome, n: int, xmm_capture: bool | None) -> None:
    """An exit for userspace to route, carrying the unchanged control word and parameters; nothing delivered."""
    expect_exit(out, n, xmm_capture)
    assert not delivered(hvm), f"catalog {n}: vector {VECTOR:#x} reached VP {TARGET} although the IPI went to userspace"


def expect_in_kernel(hvm: hyperv.HvMachine, out: hyperv.HcallOutcome, n: int) -> None:
    expect_status(out, n, hvtlfs.HV_STATUS_SUCCESS)
    assert delivered(hvm), f"catalog {n}: RAX 0 but vector {VECTOR:#x} is not pending in VP {TARGET}'s IRR"


def expect_rejected(hvm: hyperv.HvMachine, out: hyperv.HcallOutcome, n: int) -> None:
    expect_status(out, n, hvtlfs.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert not delivered(hvm), f"catalog {n}: rejected IPI still left vector {VECTOR:#x} pending in VP {TARGET}"


EXIT, IN_KERNEL, REJECTED = "exit", "in-kernel", "rejected"


def expect(outcome: str, hvm: hyperv.HvMachine, out: hyperv.HcallOutcome, n: int, xmm_capture: bool | None) -> None:
    """The row's expected routing: an exit for userspace, delivery in the kernel, or status 3 and no delivery."""
    if outcome == EXIT:
        expect_vtl_exit(hvm, out, n, xmm_capture)
    elif outcome == IN_KERNEL:
        expect_in_kernel(hvm, out, n)
    else:
        expect_rejected(hvm, out, n)


def row(n: int, variant: str, in_vtl: int, patched: str, upstream: str, vector: int = VECTOR):
    return pytest.param(n, variant, in_vtl, vector, patched, upstream, marks=pytest.mark.catalog(n),
                        id=f"{n}-{variant}{'-bad-vector' if vector != VECTOR else ''}")


# A VSM vCPU sends; with the series (P04) use_target_vtl routes the IPI to userspace, upstream the fast forms
# reject RDX bits 32-39 as reserved while the slow 0x0B and both 0x15 forms ignore in_vtl and deliver.
ROUTING = [
    row(111, "fast-0x0b", USE_VTL, EXIT, REJECTED),
    row(112, "fast-0x0b", 0x0F, IN_KERNEL, REJECTED),   # a target VTL without the use bit: no exit
    row(115, "slow-0x0b", USE_VTL, EXIT, IN_KERNEL),
    row(118, "slow-0x15", USE_VTL, EXIT, IN_KERNEL),
    *[row(120, v, USE_VTL, EXIT, REJECTED, vector=BAD_VECTOR) for v in VARIANTS],  # the exit precedes the vector check
]


@pytest.mark.parametrize("n,variant,in_vtl,vector,patched,upstream", ROUTING)
def test_vsm_vcpu_ipi_routing(vm, series, xmm_capture, n, variant, in_vtl, vector, patched, upstream):
    hvm, out = send(vm, VSM, ipi(variant, in_vtl, vector=vector))
    expect(patched if series.patched("vtl_ipi") else upstream, hvm, out, n, xmm_capture)


@pytest.mark.catalog(113)
@pytest.mark.parametrize("bit", [40, 63])
def test_fast_ipi_reserved_rdx_bits_are_rejected(vm, bit):
    """Same on both kernels: with VSM only bits 32-39 (in_vtl) became valid; 40-63 stay reserved."""
    req = ipi("fast-0x0b", 0)
    req.rdx |= 1 << bit
    expect_rejected(*send(vm, VSM, req), 113)


@pytest.mark.catalog(114)
def test_fast_ipi_in_vtl_without_vsm_is_rejected(vm):
    """Same on both kernels: without the VSM bit RDX bits 32-63 are all reserved."""
    expect_rejected(*send(vm, NON_VSM, ipi("fast-0x0b", USE_VTL)), 114)


SLOW_IPI_WITHOUT_VSM_REASON = ("catalog 116 (known v1 deviation, reviewed as a bug [RS04]): a non-VSM vCPU's slow "
                               "SendSyntheticClusterIpi with use_target_vtl exits to userspace with input 0xB; "
                               "intended: in-kernel handling or status 3")


@pytest.mark.catalog(116)
def test_slow_ipi_use_target_vtl_without_vsm_stays_in_kernel(vm, series, xmm_capture, known_deviation):
    """Intent: without VSM the bit is ignored (handled as before) or rejected (status 3), never an exit."""
    patched = series.patched("vtl_ipi")
    deviation = known_deviation(SLOW_IPI_WITHOUT_VSM_REASON)
    hvm, out = send(vm, NON_VSM, ipi("slow-0x0b", USE_VTL))
    if patched and out.exited:
        expect_vtl_exit(hvm, out, 116, xmm_capture)   # v1's exit exactly, every field right
        deviation.seen(f"catalog 116: non-VSM vCPU: {out}; expected in-kernel handling (RAX 0) or "
                       f"RAX {status_name(hvtlfs.HV_STATUS_INVALID_HYPERCALL_INPUT)}")
    if patched and out.completed and out.rax == hvtlfs.HV_STATUS_INVALID_HYPERCALL_INPUT:
        expect_rejected(hvm, out, 116)
    else:
        expect_in_kernel(hvm, out, 116)
    if patched:
        deviation.gone(f"catalog 116: a non-VSM vCPU's slow SendSyntheticClusterIpi with use_target_vtl now stays "
                       f"in the kernel: {out}")


@pytest.mark.catalog(117)
def test_fast_ipi_ex_with_use_target_vtl_exits_with_xmm(vm, series, xmm_capture):
    """The exit comes with P04; hcall.xmm carries the guest's XMM0 only with P01 as well."""
    hvm, out = send(vm, VSM, ipi("fast-0x15", USE_VTL))
    if not series.patched("vtl_ipi"):
        expect_in_kernel(hvm, out, 117)
        return
    expect_vtl_exit(hvm, out, 117, xmm_capture)
    series.require("xmm_output")
    assert out.xmm[0][0] == 1, f"catalog 117: hcall.xmm[0].low {out.xmm[0][0]:#x}, expected valid_bank_mask 1 from XMM0"


@pytest.mark.catalog(119)
@pytest.mark.parametrize("variant", ["fast-0x15", "slow-0x15"])
def test_ipi_ex_use_target_vtl_without_vsm_is_ignored(vm, variant):
    """Same on both kernels: without the VSM bit 0x15 ignores in_vtl and delivers the IPI."""
    expect_in_kernel(*send(vm, NON_VSM, ipi(variant, USE_VTL)), 119)


@pytest.mark.catalog(121)
@pytest.mark.parametrize("variant,ctl", [("fast-0x0b", {"varhead": 1}), ("fast-0x0b", {"rep_count": 1}),
                                         ("fast-0x15", {"rep_count": 1})],
                         ids=["0x0b-varhead", "0x0b-rep", "0x15-rep"])
def test_dispatcher_checks_precede_the_vtl_exit(vm, variant, ctl):
    """Same on both kernels: 0x0B takes no variable header and neither code is a rep call: status 3 first."""
    expect_rejected(*send(vm, VSM, ipi(variant, USE_VTL, **ctl)), 121)


@pytest.mark.catalog(122)
def test_vtl_ipi_completion(vm, series, xmm_capture):
    series.require("vtl_ipi")
    hvm, out = send(vm, VSM, ipi("fast-0x0b", USE_VTL))
    expect_vtl_exit(hvm, out, 122, xmm_capture)
    expect_completion(hyperv.complete(hvm, hvtlfs.HV_STATUS_SUCCESS), 122, hvtlfs.HV_STATUS_SUCCESS)
