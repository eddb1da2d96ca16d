"""End-to-end VSM scenarios: the series' blocks composed the way a VMM of spec 5.1 uses them (one VM per VTL, one
vCPU per (VP, VTL), VTL switching in userspace), through machine/vsm.py. Each test names the catalog rows it
composes; the scenarios have no upstream expectation, so a kernel without a group they need skips naming it.

Expected values come from the spec and the TLFS readings written in machine/vsm.py; none of these scenarios has
run on a kernel carrying the series yet, so a failure there may be the reading as well as the kernel: the
messages say which step of the sequence broke."""
import contextlib
import threading
from collections.abc import Iterator

import pytest

from kvmtests import hvtlfs, uapi
from kvmtests.machine import guest, memfault, vsm
from kvmtests.machine.kvm import Unavailable
from kvmtests.verdict import features

ROUND_TRIPS = 200
WRITTEN = 0x0123456789ABCDEF      # vsm.S vtl0_protect's value
SPIN_MARK = 0x7E57C0DE7E57C0DE    # vsm.S vtl0_spin keeps it in R12 across the preemption
WAKE_VECTOR = 0x40
REP1_SUCCESS = hvtlfs.HV_STATUS_SUCCESS | 1 << 32   # status 0, one rep complete
GUEST_ASSERTS = "guest assertion 1: RSI, 2: RAX, 3: RCX, 4: RSP after a VTL call"


@contextlib.contextmanager
def harness(kvm, series, *groups: str, vps: int = 1) -> Iterator[vsm.Vsm]:
    """The two-VTL harness once every group it composes is present (always state 11, for the inactive VTL); else a
    skip naming every missing group. Its set-up failing is an error of mp_inactive_vtl, not of the scenario; a step
    failing because a group it composes is broken names that group (vsm.StepFailed: a hypercall KVM answered in the
    kernel, state 11 refused), that group's error in a scenario of other groups."""
    absent, unknown = [], {}
    for group in ("mp_inactive_vtl", *groups):
        try:
            if not series.patched(group):
                absent.append(f"{features.GROUPS[group].title} ({features.GROUPS[group].patches})")
        except Unavailable:
            unknown.setdefault(series.detection(group).how, []).append(group)
    reasons = [f"kernel does not carry {'; '.join(absent)}"] if absent else []
    reasons += [f"cannot tell whether the kernel carries {', '.join(g)}: {how}" for how, g in unknown.items()]
    if reasons:
        raise Unavailable(f"{'; '.join(reasons)} (the scenario composes them; no upstream expectation)")
    with series.precondition("mp_inactive_vtl", "catalog 125: VP 0's VTL1 vCPU enters KVM_MP_STATE_HV_INACTIVE_VTL"):
        v = vsm.Vsm(kvm, vps)
    try:
        yield v
    finally:
        v.close()


def expect_sync(uc: guest.Ucall, stage: int, what: str) -> int:
    assert uc.cmd == guest.UCALL_SYNC and uc.args[0] == stage, f"{what}: VTL0 reported {uc}, expected SYNC {stage}"
    return uc.args[1]


@pytest.mark.catalog(80, 81, 85, 125)
def test_vtl_call_and_return_round_trips_without_drift(kvm, series):
    """VTL0 HvCallVtlCall -> exit -> shared registers into VTL1, VTL0 parked in state 11, VTL1 woken -> VTL1
    HvCallVtlReturn -> exit -> back: VTL0 resumes after its VMCALL with VTL1's answer (RSI) and the RAX/RCX VTL1
    left in its control page (85: KVM writes no status), ROUND_TRIPS times; VTL0 checks every round trip."""
    with harness(kvm, series, "vsm_hcalls") as v:
        v.enter("vtl0_calls", rbx=ROUND_TRIPS)
        done = expect_sync(v.run(ROUND_TRIPS + 3), 1, GUEST_ASSERTS)
        assert done == ROUND_TRIPS, f"VTL0 finished after {done} VTL calls, expected {ROUND_TRIPS}"
        assert (v.log.vtl_calls, v.log.vtl_returns) == (ROUND_TRIPS, ROUND_TRIPS), \
            f"catalog 80: {v.log.vtl_calls} VtlCall and {v.log.vtl_returns} VtlReturn exits, expected {ROUND_TRIPS} each"
        entries = v.mem.read_u64(vsm.VTL1_ENTRIES)
        assert entries == ROUND_TRIPS, f"VTL1 counted {entries} entries, expected {ROUND_TRIPS}"
        with v.vtl1_held() as vtl1:
            regs1, state = vtl1.get_regs(), vtl1.get_mp_state_raw()
        assert (regs1.rip, regs1.rsp) == (v.m1.sym("vtl1_return_insn") + 3, vsm.VTL1_STACK), \
            (f"catalog 81/85: VTL1 RIP {regs1.rip:#x} RSP {regs1.rsp:#x} after its last return, expected "
             f"{v.m1.sym('vtl1_return_insn') + 3:#x} (after the VMCALL) and its stack top {vsm.VTL1_STACK:#x}")
        assert state == (uapi.KVM_MP_STATE_HV_INACTIVE_VTL, 0), f"catalog 125: VTL1 reads MP state {state}, not 11"
        assert not v.log.wakes, f"catalog 126: VTL1 woke on its own: {v.log.wakes}"


@pytest.mark.catalog(16, 35, 36, 37, 38, 45, 46, 62, 63, 67, 68, 70, 80, 82, 84, 125)
def test_protection_intercept_and_write_retired_exactly_once(kvm, series, fault_rule):
    """VTL1 asks (HvModifyVtlProtectionMask exit) to make a VTL0 page not writable -> NW on the VTL0 VM -> VTL0
    writes -> memory-fault exit with WRITE -> intercept message to VTL1, woken from state 11 -> VTL1 lifts the
    protection (a second 0x0C exit, attributes 0) -> VTL0's write retires exactly once, with VTL0's RAX."""
    with harness(kvm, series, "vsm_hcalls", "rwx_attributes", "fault_rwx_flags") as v:
        page = vsm.PROTECTED_PAGE
        v.enter("vtl0_protect", rbx=page)
        value = expect_sync(v.run(5), 2, "after the protected write")   # call, fault, write: 3 KVM_RUNs
        assert value == WRITTEN, f"catalog 46: VTL0 read {value:#x} back from the page, expected its write {WRITTEN:#x}"
        nw = uapi.KVM_MEMORY_ATTRIBUTE_NW
        assert v.log.protections == [(page, nw), (page, 0)], \
            f"VTL1's protection requests reached the VTL0 VM as {v.log.protections}, expected NW then 0 on {page:#x}"
        assert len(v.log.faults) == 1, f"catalog 45/46: {len(v.log.faults)} memory-fault exits, expected exactly one"
        fault, rip = v.log.faults[0]
        # the harness leaves byte 56 alone: without P11 there is no sentinel to check, any byte goes
        length = v.m0.payload.length("vtl0_protected_write", "vtl0_protected_write_end")
        lens = fault_rule.insn_lens(length) if fault_rule.reported else frozenset(range(256))
        memfault.check_fault(fault, "36-38/62", "VTL0's protected write", uapi.KVM_MEMORY_EXIT_FLAG_WRITE, page,
                             lens, fault_rule)
        assert rip == v.m0.sym("vtl0_protected_write"), \
            f"catalog 45: VTL0 RIP {rip:#x} at the fault, expected the write at {v.m0.sym('vtl0_protected_write'):#x}"
        retired = v.mem.read_u64(vsm.WRITES_DONE)
        assert retired == 1, f"catalog 46: the write retired {retired} times, expected exactly once"
        intercepts = v.mem.read_u64(vsm.VTL1_INTERCEPTS)
        assert intercepts == 1, f"VTL1 handled {intercepts} intercept messages, expected one"
        told = (v.mem.read_u64(vsm.MSG_GPA), v.mem.read_u64(vsm.MSG_ACCESS))
        assert told == (page, vsm.ACCESS_WRITE), f"VTL1 was told of access {told[1]} to {told[0]:#x}, expected a write"
        status = v.mem.read_u64(vsm.VTL1_STATUS)
        assert status == REP1_SUCCESS, \
            f"catalog 84: VTL1's HvModifyVtlProtectionMask returned RAX {status:#x}, expected the result {REP1_SUCCESS:#x}"


@pytest.mark.catalog(125, 126, 127, 130, 133)
def test_interrupt_for_vtl1_preempts_running_vtl0(kvm, series):
    """An MSI for VTL1 sent from another thread while VTL0 spins: VTL1's KVM_RUN in state 11 ends with WAKEUP
    although its RFLAGS.IF is 0 (TLFS 12.12.2.1), the harness preempts VTL0 and enters VTL1 for the interrupt,
    VTL1 takes it (IF = 1) and returns; VTL0 resumes with its registers intact and sees VTL1's flag."""
    with harness(kvm, series, "vsm_hcalls") as v:
        v.enter("vtl0_spin")
        sent: list[tuple[int, int]] = []
        sender = threading.Timer(0.2, lambda: sent.append(v.signal_vtl1_raw(WAKE_VECTOR)))
        sender.start()
        try:
            mark = expect_sync(v.run(4), 3, "after the preemption")   # preempted, switched, resumed
        finally:
            sender.cancel()
            sender.join(5.0)
        assert not sender.is_alive(), "the KVM_SIGNAL_MSI sender thread did not finish within 5 s"
        assert sent and sent[0][0] > 0, f"KVM_SIGNAL_MSI to VTL1's APIC 0 was not delivered: {sent}"
        assert mark == SPIN_MARK, f"VTL0's R12 is {mark:#x} after the preemption, expected {SPIN_MARK:#x}"
        assert len(v.log.wakes) == 1, f"catalog 130: {len(v.log.wakes)} WAKEUP exits of VTL1, expected one"
        wake = v.log.wakes[0]
        assert wake.mp_state == uapi.KVM_MP_STATE_HV_INACTIVE_VTL, \
            f"catalog 127: VTL1's MP state after WAKEUP is {wake.mp_state}, expected 11"
        taken = v.m1.irq_count(WAKE_VECTOR)
        assert taken == 1, f"catalog 133: VTL1 took vector {WAKE_VECTOR:#x} {taken} times, expected once"
        entries = v.mem.read_u64(vsm.VTL1_INTERRUPTS)
        assert entries == 1, f"VTL1 was entered {entries} times for an interrupt, expected once"
        assert (v.log.vtl_calls, v.log.vtl_returns) == (0, 1), \
            f"{v.log.vtl_calls} VTL calls and {v.log.vtl_returns} returns, expected only VTL1's return"


@pytest.mark.catalog(80, 84, 97, 98, 101, 108)
def test_vp_registers_with_xmm_output_through_the_exits(kvm, series):
    """In a VTL call, VTL1 reads VTL0's RIP (fast HvGetVpRegisters, value back in XMM1 by XMM output, result with
    a rep count) and moves it (fast HvSetVpRegisters): VTL0 resumes at the new RIP, not after its VMCALL."""
    with harness(kvm, series, "vsm_hcalls", "hv_exits", "xmm_output") as v:
        v.enter("vtl0_regs")
        expect_sync(v.run(3), 5, "VTL0 was not moved to vtl0_redirected by HvSetVpRegisters (SYNC 4 means it was not)")
        got = v.mem.read_u64(vsm.VTL1_GOT_RIP)
        assert got == v.m0.sym("vtl0_regs_after"), \
            (f"catalog 101/108: VTL1 read VTL0's RIP as {got:#x} from XMM1, expected {v.m0.sym('vtl0_regs_after'):#x} "
             "(after the VtlCall)")
        statuses = (v.mem.read_u64(vsm.VTL1_STATUS), v.mem.read_u64(vsm.VTL1_STATUS2))
        assert statuses == (REP1_SUCCESS, REP1_SUCCESS), \
            f"catalog 84: Get/SetVpRegisters returned RAX {statuses[0]:#x}/{statuses[1]:#x}, expected {REP1_SUCCESS:#x}"
        served = {code & 0xFFFF: xmm for vtl, code, xmm in v.log.hcalls if vtl == 1}
        assert sorted(served) == [hvtlfs.HVCALL_GET_VP_REGISTERS, hvtlfs.HVCALL_SET_VP_REGISTERS], \
            f"VTL1's served hypercalls: {[hex(c) for c in served]}, expected 0x50 and 0x51"
        name = served[hvtlfs.HVCALL_GET_VP_REGISTERS][0][0] & 0xFFFFFFFF
        assert name == vsm.HV_X64_REGISTER_RIP, f"catalog 97: fast 0x50 exit: xmm[0] name {name:#x}, expected RIP"
        value = served[hvtlfs.HVCALL_SET_VP_REGISTERS][1][0]
        assert value == v.m0.sym("vtl0_redirected"), f"catalog 98: fast 0x51 exit: xmm[1] {value:#x}, not XMM1"


@pytest.mark.catalog(80, 84)
def test_start_virtual_processor_for_a_second_vp(kvm, series):
    """VP 0's VTL0 starts VP 1 with HvCallStartVirtualProcessor (exit): the harness gives VP 1's vCPU the initial
    context and runs it on its own thread; VP 0 sees status 0 and VP 1's mark, VP 1 ran on the given stack."""
    with harness(kvm, series, "vsm_hcalls", "hv_exits", vps=2) as v:
        ap = v.m0.vcpus[1]
        v.enter("vtl0_start_vp")
        status = expect_sync(v.run(3), 6, "after StartVirtualProcessor")   # the exit, then the spin
        assert status == hvtlfs.HV_STATUS_SUCCESS, f"catalog 84: VP 0 got RAX {hvtlfs.status_name(status)}, expected 0"
        assert set(v.log.started) == {1}, f"started VPs {sorted(v.log.started)}, expected VP 1"
        first = v.log.started[1].result(timeout=vsm.STEP * 2)
        io = ap.run_struct.x.io
        assert (first.ret, first.reason, io.port) == (0, uapi.KVM_EXIT_IO, vsm.VP1_PORT), \
            f"VP 1's first exit: {v.m0.describe(ap)}, expected its port {vsm.VP1_PORT:#x}"
        rsp = v.mem.read_u64(vsm.VP1_RSP)
        assert rsp == vsm.VP1_STACK, f"VP 1 ran on RSP {rsp:#x}, expected the initial context's {vsm.VP1_STACK:#x}"
