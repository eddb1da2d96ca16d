"""KVM_GET/SET_MP_STATE: the standard x86 states, and state 11 refused without the VSM bit (catalog 123)."""
import errno

import pytest

from kvmtests import uapi

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
    ret, err = vm.create_irqchip()
    assert ret == 0, f"KVM_CREATE_IRQCHIP: {uapi.errno_name(err)}"
    return vm.create_vcpu(0)


@pytest.mark.parametrize("state,reads", WITH_IRQCHIP, ids=lambda s: state_name(s) if isinstance(s, int) else s)
def test_standard_state_round_trips_with_in_kernel_lapic(irqchip_vcpu, state, reads):
    assert irqchip_vcpu.set_mp_state(state) == (0, 0), f"KVM_SET_MP_STATE({state_name(state)})"
    got, err = irqchip_vcpu.get_mp_state()
    assert (got, err) == (reads, 0), f"after {state_name(state)}: KVM_GET_MP_STATE read {state_name(got)}"


@pytest.mark.parametrize("state", NON_X86, ids=state_name)
def test_non_x86_states_are_einval(irqchip_vcpu, state):
    assert irqchip_vcpu.set_mp_state(state) == (-1, errno.EINVAL)


def test_only_runnable_without_in_kernel_lapic(vm):
    vcpu = vm.create_vcpu(0)
    assert vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE) == (0, 0)
    assert vcpu.set_mp_state(uapi.KVM_MP_STATE_HALTED) == (-1, errno.EINVAL), "HALTED needs an in-kernel LAPIC"


@pytest.mark.catalog(123)
@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
def test_inactive_vtl_refused_without_hyperv_cpuid(vm, irqchip):
    """Same on both kernels: state 11 needs the VSM bit in Hyper-V CPUID, which this vCPU lacks."""
    if irqchip:
        assert vm.create_irqchip()[0] == 0
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(vm.kvm.supported_cpuid())
    ret, err = vcpu.set_mp_state(uapi.KVM_MP_STATE_HV_INACTIVE_VTL)
    assert (ret, err) == (-1, errno.EINVAL), f"catalog 123: KVM_SET_MP_STATE(11) gave {ret}/{uapi.errno_name(err)}, expected EINVAL"
    assert vcpu.get_mp_state() == (uapi.KVM_MP_STATE_RUNNABLE, 0), "a refused state must not change the vCPU"
