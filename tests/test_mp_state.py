"""KVM_GET/SET_MP_STATE: the standard x86 states, and KVM_MP_STATE_HV_INACTIVE_VTL (catalog 123-135).

Every WAKEUP exit is checked whole by the shared helper (machine/hvexits.py): the exit, system_event.ndata/data
unwritten, state 11 kept with RIP/RFLAGS unchanged, the waking vector pending and none in service."""
import errno
import struct
import threading
import time

import pytest

from kvmtests import hvtlfs, uapi
from kvmtests.machine import guest, hvexits, hyperv

NON_X86 = [uapi.KVM_MP_STATE_STOPPED, uapi.KVM_MP_STATE_CHECK_STOP, uapi.KVM_MP_STATE_OPERATING,
           uapi.KVM_MP_STATE_LOAD, uapi.KVM_MP_STATE_SUSPENDED]
# (state set, state KVM_GET_MP_STATE reports): SIPI_RECEIVED becomes INIT_RECEIVED with a pending SIPI,
# which KVM_GET_MP_STATE processes (kvm_apic_accept_events) before it answers, so the vCPU reads RUNNABLE.
WITH_IRQCHIP = [(uapi.KVM_MP_STATE_RUNNABLE, uapi.KVM_MP_STATE_RUNNABLE),
                (uapi.KVM_MP_STATE_UNINITIALIZED, uapi.KVM_MP_STATE_UNINITIALIZED),
                (uapi.KVM_MP_STATE_INIT_RECEIVED, uapi.KVM_MP_STATE_INIT_RECEIVED),
                (uapi.KVM_MP_STATE_HALTED, uapi.KVM_MP_STATE_HALTED),
                (uapi.KVM_MP_STATE_SIPI_RECEIVED, uapi.KVM_MP_STATE_RUNNABLE),
                (uapi.KVM_MP_STATE_AP_RESET_HOLD, uapi.KVM_MP_STATE_AP_RESET_HOLD)]


def state_name(state: int) -> str:
    names = {v: k for k, v in vars(uapi).items() if k.startswith("KVM_MP_STATE_")}
    return names.get(state, str(state))


@pytest.fixture
def irqchip_vcpu(vm):
    vm.create_irqchip()
    return vm.create_vcpu(0)


@pytest.mark.parametrize("state,reads", WITH_IRQCHIP, ids=lambda s: state_name(s) if isinstance(s, int) else s)
def test_standard_state_round_trips_with_in_kernel_lapic(irqchip_vcpu, state, reads):
    assert irqchip_vcpu.set_mp_state_raw(state) == (0, 0), f"KVM_SET_MP_STATE({state_name(state)})"
    got, err = irqchip_vcpu.get_mp_state_raw()
    assert (got, err) == (reads, 0), f"after {state_name(state)}: KVM_GET_MP_STATE read {state_name(got)}"


@pytest.mark.parametrize("state", NON_X86, ids=state_name)
def test_non_x86_states_are_einval(irqchip_vcpu, state):
    assert irqchip_vcpu.set_mp_state_raw(state) == (-1, errno.EINVAL)


def test_only_runnable_without_in_kernel_lapic(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
    assert vcpu.set_mp_state_raw(uapi.KVM_MP_STATE_HALTED) == (-1, errno.EINVAL), "HALTED needs an in-kernel LAPIC"


@pytest.mark.catalog(123)
@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
def test_inactive_vtl_refused_without_hyperv_cpuid(vm, irqchip):
    """Same on both kernels: state 11 needs the VSM bit in Hyper-V CPUID, which this vCPU lacks."""
    if irqchip:
        vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(vm.kvm.supported_cpuid())
    ret, err = vcpu.set_mp_state_raw(uapi.KVM_MP_STATE_HV_INACTIVE_VTL)
    assert (ret, err) == (-1, errno.EINVAL), f"catalog 123: KVM_SET_MP_STATE(11) gave {ret}/{uapi.errno_name(err)}, expected EINVAL"
    got = vcpu.get_mp_state_raw()
    assert got == (uapi.KVM_MP_STATE_RUNNABLE, 0), \
        f"catalog 123: after the refused KVM_SET_MP_STATE(11) the vCPU reads {state_name(got[0])}, expected RUNNABLE"


# --- KVM_MP_STATE_HV_INACTIVE_VTL (P05) ------------------------------------------------------------------

INACTIVE_VTL = uapi.KVM_MP_STATE_HV_INACTIVE_VTL
VSM = hyperv.CpuidBits(ebx_set=hvtlfs.HV_ACCESS_VSM)
MSI_VECTOR, TIMER_VECTOR = 0x30, 0x31
MSI_ADDRESS = 0xFEE00000                      # fixed delivery, physical destination APIC ID 0
APIC_LVTT, APIC_TMICT, APIC_TMCCT, APIC_TDCR = 0x320, 0x380, 0x390, 0x3E0
TDCR_DIVIDE_BY_1 = 0xB
TIMER_COUNT = 50_000_000                      # 50 ms at KVM's default 1 ns APIC bus cycle


def send_msi(vm, vector: int = MSI_VECTOR) -> None:
    ret, err = vm.signal_msi_raw(MSI_ADDRESS, vector)
    assert ret > 0, f"KVM_SIGNAL_MSI(vector {vector:#x} to APIC 0) not delivered: {ret}, {uapi.errno_name(err)}"


def set_state(vcpu, state: int, n: int) -> None:
    ret, err = vcpu.set_mp_state_raw(state)
    assert (ret, err) == (0, 0), f"catalog {n}: KVM_SET_MP_STATE({state_name(state)}): {uapi.errno_name(err)}"


IF_ROWS = pytest.mark.parametrize("rflags_if", [0, 1], ids=["IF=0", "IF=1"])   # P05 ignores IF; both must wake


def inactive_vtl(vm, series, n: int, rflags_if: int) -> hyperv.HvMachine:
    """A VSM vCPU with RFLAGS.IF as given put into state 11; the rows using it have no upstream expectation."""
    series.require("mp_inactive_vtl")
    hvm = hyperv.build_hv_machine(vm, VSM)
    regs = hvm.vcpu.get_regs()
    regs.rflags = regs.rflags & ~guest.RFLAGS_IF | (guest.RFLAGS_IF if rflags_if else 0)
    hvm.vcpu.set_regs(regs)
    set_state(hvm.vcpu, INACTIVE_VTL, n)
    return hvm


def expect_wakeup(hvm: hyperv.HvMachine, n: int, why: str, pending: int | None = MSI_VECTOR) -> None:
    """KVM_RUN returns the whole WAKEUP exit, with `pending` (None: no vector) the only vector in the IRR."""
    hvexits.expect_wakeup(hvexits.observe_wakeup(hvm.vcpu), n, why, pending)


def woken_by_msi(vm, series, n: int, rflags_if: int) -> hyperv.HvMachine:
    """State 11 with an MSI pending, after its WAKEUP exit: where rows 126, 127, 128, 133 and 134 start."""
    hvm = inactive_vtl(vm, series, n, rflags_if)
    send_msi(vm)
    expect_wakeup(hvm, n, "state 11, MSI pending")
    return hvm


@pytest.mark.catalog(124)
def test_inactive_vtl_refused_without_the_vsm_bit(vm):
    """Same on both kernels: a Hyper-V vCPU whose 0x40000003 EBX lacks bit 16 cannot enter state 11."""
    hvm = hyperv.build_hv_machine(vm, hyperv.CpuidBits(ebx_clear=hvtlfs.HV_ACCESS_VSM))
    ret, err = hvm.vcpu.set_mp_state_raw(INACTIVE_VTL)
    assert (ret, err) == (-1, errno.EINVAL), f"catalog 124: KVM_SET_MP_STATE(11) gave {ret}/{uapi.errno_name(err)}"


@pytest.mark.catalog(125)
def test_inactive_vtl_accepted_with_the_vsm_bit(vm, series):
    hvm = hyperv.build_hv_machine(vm, VSM)
    ret, err = hvm.vcpu.set_mp_state_raw(INACTIVE_VTL)
    if not series.patched("mp_inactive_vtl"):
        assert (ret, err) == (-1, errno.EINVAL), \
            f"catalog 125: unpatched KVM_SET_MP_STATE(11) gave {ret}/{uapi.errno_name(err)}, expected EINVAL"
        return
    assert (ret, err) == (0, 0), f"catalog 125: KVM_SET_MP_STATE(11) on a VSM vCPU: {uapi.errno_name(err)}"
    got = hvm.vcpu.get_mp_state_raw()
    assert got == (INACTIVE_VTL, 0), f"catalog 125: KVM_GET_MP_STATE read {state_name(got[0])}, expected 11"


@pytest.mark.catalog(126)
@IF_ROWS
def test_pending_msi_wakes_inactive_vtl_whatever_if_says(vm, series, rflags_if):
    """TLFS 12.12.2.1: an inactive VTL's wake-up ignores RFLAGS.IF, so an MSI already pending exits at once (IF = 1:
    a plain halt rule; IF = 0: P05's own)."""
    woken_by_msi(vm, series, 126, rflags_if)


@pytest.mark.catalog(127)
@IF_ROWS
def test_wakeup_keeps_state_registers_and_the_pending_vector(vm, series, rflags_if):
    """After the exit KVM_GET_MP_STATE still reads 11, RIP/RFLAGS are unchanged and the MSI's vector is still pending
    in the IRR (and not in service): expect_wakeup reads all of it after every WAKEUP exit."""
    woken_by_msi(vm, series, 127, rflags_if)


@pytest.mark.catalog(128)
@IF_ROWS
def test_reentering_inactive_vtl_wakes_again(vm, series, rflags_if):
    hvm = woken_by_msi(vm, series, 128, rflags_if)
    expect_wakeup(hvm, 128, "second KVM_RUN without changing the state")


@pytest.mark.catalog(129)
def test_halted_with_if0_keeps_blocking_on_a_pending_msi(vm):
    """Control case, same on both kernels: a HALTED vCPU with IF = 0 does not wake for a pending interrupt, so
    only the watchdog's signal (EINTR) ends KVM_RUN."""
    hvm = hyperv.build_hv_machine(vm, VSM)
    set_state(hvm.vcpu, uapi.KVM_MP_STATE_HALTED, 129)
    send_msi(vm)
    ex = hvm.vcpu.run(1.0)
    assert ex.timed_out and ex.errno == errno.EINTR, \
        f"catalog 129: HALTED with IF = 0 and an MSI pending returned: {hvm.machine.describe()}"
    got = hvm.vcpu.get_mp_state_raw()
    assert got == (uapi.KVM_MP_STATE_HALTED, 0), f"catalog 129: state {state_name(got[0])} after the signal"


@pytest.mark.catalog(130)
@IF_ROWS
def test_inactive_vtl_blocks_until_an_msi_from_another_thread(vm, series, rflags_if):
    hvm = inactive_vtl(vm, series, 130, rflags_if)
    sent = threading.Event()
    result: list[tuple[int, int]] = []

    def sender() -> None:
        time.sleep(0.5)   # give the vCPU time to block; the assertion below is on order, not on time
        sent.set()
        result.append(vm.signal_msi_raw(MSI_ADDRESS, MSI_VECTOR))

    thread = threading.Thread(target=sender, name="msi-sender")
    thread.start()
    try:
        expect_wakeup(hvm, 130, "state 11, MSI sent from another thread")
        assert sent.is_set(), (f"catalog 130: RFLAGS.IF = {rflags_if}: KVM_RUN returned before the MSI was sent: "
                               "state 11 did not block")
    finally:
        thread.join(5.0)
    assert not thread.is_alive(), "catalog 130: the KVM_SIGNAL_MSI sender thread did not finish within 5 s"
    assert result and result[0][0] > 0, f"catalog 130: KVM_SIGNAL_MSI from the sender thread: {result}"


@pytest.mark.catalog(131)
@IF_ROWS
def test_pending_nmi_wakes_inactive_vtl(vm, series, rflags_if):
    hvm = inactive_vtl(vm, series, 131, rflags_if)
    assert hvm.vcpu.nmi_raw() == (0, 0), f"catalog 131: RFLAGS.IF = {rflags_if}: KVM_NMI failed"
    expect_wakeup(hvm, 131, "state 11, NMI pending", None)


@pytest.mark.catalog(132)
@IF_ROWS
def test_expiring_lapic_timer_wakes_inactive_vtl(vm, series, rflags_if):
    hvm = inactive_vtl(vm, series, 132, rflags_if)
    regs = bytearray(hvm.vcpu.get_lapic())
    for reg, value in ((APIC_LVTT, TIMER_VECTOR), (APIC_TDCR, TDCR_DIVIDE_BY_1), (APIC_TMICT, TIMER_COUNT),
                       (APIC_TMCCT, TIMER_COUNT)):   # one-shot, unmasked; KVM_SET_LAPIC restarts from TMCCT
        struct.pack_into("<I", regs, reg, value)
    hvm.vcpu.set_lapic(bytes(regs))
    expect_wakeup(hvm, 132, "state 11, one-shot LAPIC timer of 50 ms", TIMER_VECTOR)


@pytest.mark.catalog(133)
@IF_ROWS
def test_runnable_with_if1_takes_the_pending_interrupt(vm, series, rflags_if):
    """Whatever IF was in state 11, RUNNABLE with IF = 1 delivers the vector that woke it."""
    hvm = woken_by_msi(vm, series, 133, rflags_if)
    set_state(hvm.vcpu, uapi.KVM_MP_STATE_RUNNABLE, 133)
    regs = hvm.vcpu.get_regs()
    regs.rip, regs.rflags = hvm.machine.sym("_start"), regs.rflags | guest.RFLAGS_IF
    hvm.vcpu.set_regs(regs)
    hvm.machine.run_until(guest.UCALL_DONE)
    assert hvm.machine.irq_count(MSI_VECTOR) == 1, \
        (f"catalog 133: RFLAGS.IF = {rflags_if} in state 11, then RUNNABLE with IF = 1: the guest's handler counted "
         f"vector {MSI_VECTOR:#x} {hvm.machine.irq_count(MSI_VECTOR)} times, expected 1")


@pytest.mark.catalog(134)
@IF_ROWS
def test_wakeup_exit_leaves_system_event_data_unwritten(vm, series, rflags_if):
    """Observed v1 behaviour the patch does not promise: userspace must not read ndata/data[] on WAKEUP. The
    sentinels observe_wakeup puts in system_event before every state-11 run survive (checked on every WAKEUP)."""
    woken_by_msi(vm, series, 134, rflags_if)


@pytest.mark.catalog(135)
def test_clearing_the_vsm_bit_withdraws_inactive_vtl(vm, series):
    """api.rst: the guest CPUID's VSM bit is what makes state 11 available; a new KVM_SET_CPUID2 before the first
    KVM_RUN without it makes KVM_SET_MP_STATE(11) fail again."""
    patched = series.patched("mp_inactive_vtl")
    hvm = hyperv.build_hv_machine(vm, VSM)
    first = hvm.vcpu.set_mp_state_raw(INACTIVE_VTL)
    assert first == ((0, 0) if patched else (-1, errno.EINVAL)), \
        f"catalog 135: with the VSM bit KVM_SET_MP_STATE(11) gave {first[0]}/{uapi.errno_name(first[1])}"
    set_state(hvm.vcpu, uapi.KVM_MP_STATE_RUNNABLE, 135)
    hvm.vcpu.set_cpuid(hyperv.hv_cpuid(vm.kvm, hvm.vcpu, hyperv.CpuidBits(ebx_clear=hvtlfs.HV_ACCESS_VSM)))
    ret, err = hvm.vcpu.set_mp_state_raw(INACTIVE_VTL)
    assert (ret, err) == (-1, errno.EINVAL), \
        f"catalog 135: after clearing the VSM bit KVM_SET_MP_STATE(11) gave {ret}/{uapi.errno_name(err)}, expected EINVAL"
