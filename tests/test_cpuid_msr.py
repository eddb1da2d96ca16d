"""CPUID leaves 0x40000000 and up reach the guest as set; MSR exits to userspace are completed by the test."""
import pytest

from kvmtests import uapi
from kvmtests.machine import guest

HV_RANGE_LEAVES = [
    {"function": 0x40000000, "eax": 0x40000010, "ebx": 0x74736574, "ecx": 0x6d766b2d, "edx": 0x73747365},
    {"function": 0x40000001, "eax": 0x31237648, "ebx": 0x1, "ecx": 0x2, "edx": 0x3},
    {"function": 0x40000003, "eax": 0xAAAA5555, "ebx": 0x00010000, "ecx": 0xF0F0F0F0, "edx": 0x00008010},
    {"function": 0x40000010, "eax": 0xDEADBEEF, "ebx": 0xCAFEF00D, "ecx": 0x12345678, "edx": 0x9ABCDEF0},
]
TSC_MSR = 0x10
UNKNOWN_MSR = 0xC0011FF7


@pytest.mark.parametrize("leaf", HV_RANGE_LEAVES, ids=lambda e: hex(e["function"]))
def test_hypervisor_cpuid_leaf_round_trips_into_the_guest(vm, leaf):
    base = [e for e in vm.kvm.supported_cpuid() if not 0x40000000 <= e["function"] <= 0x400000FF]
    m = guest.build_machine(vm, guest.load_payload("basic"), entry="cpuid_leaf", cpuid=base + HV_RANGE_LEAVES)
    m.mem.write_u64(guest.UCALL_ARGS[3], leaf["function"])
    seen = [m.run_until(guest.UCALL_SYNC).args[1] for _ in range(4)]
    want = [leaf[r] for r in ("eax", "ebx", "ecx", "edx")]
    assert seen == want, f"CPUID {leaf['function']:#x}: guest saw {[hex(v) for v in seen]}, set {[hex(v) for v in want]}"
    got = next(e for e in m.vcpu.get_cpuid() if e["function"] == leaf["function"])
    assert [got[r] for r in ("eax", "ebx", "ecx", "edx")] == want, "KVM_GET_CPUID2 must return what was set"


def _msr_machine(vm, msr: int) -> guest.Machine:
    if not vm.kvm.check_extension(uapi.KVM_CAP_X86_USER_SPACE_MSR):
        pytest.skip("kernel lacks KVM_CAP_X86_USER_SPACE_MSR")
    m = guest.build_machine(vm, guest.load_payload("basic"), entry="msr_access")
    m.mem.write_u64(guest.UCALL_ARGS[3], msr)
    return m


def _expect_msr_exit(m: guest.Machine, reason: int, kind: int, msr: int) -> object:
    ex = m.vcpu.run()
    assert ex.ret == 0 and ex.reason == reason, f"expected {uapi.exit_name(reason)}, got {m.describe()}"
    exit_msr = m.vcpu.run_struct.x.msr
    assert (exit_msr.index, exit_msr.reason) == (msr, kind), m.describe()
    return exit_msr


def test_filtered_msr_exits_and_userspace_completes_it(vm):
    """KVM_MSR_EXIT_REASON_FILTER: a deny-by-default filter sends rdmsr/wrmsr of the TSC to userspace."""
    vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_FILTER)
    vm.set_msr_filter(0, [(uapi.KVM_MSR_FILTER_READ | uapi.KVM_MSR_FILTER_WRITE, TSC_MSR, 1, b"\0")])
    m = _msr_machine(vm, TSC_MSR)
    _expect_msr_exit(m, uapi.KVM_EXIT_X86_RDMSR, uapi.KVM_MSR_EXIT_REASON_FILTER, TSC_MSR).data = 0x1122334455667788
    assert m.run_until(guest.UCALL_SYNC).args[1] == 0x1122334455667788, "guest must read the value userspace gave"
    wr = _expect_msr_exit(m, uapi.KVM_EXIT_X86_WRMSR, uapi.KVM_MSR_EXIT_REASON_FILTER, TSC_MSR)
    assert wr.data == 0x12345678CAFEF00D, f"wrmsr data {wr.data:#x}"
    m.run_until(guest.UCALL_SYNC)
    m.run_until(guest.UCALL_DONE)


def test_unknown_msr_error_from_userspace_injects_gp(vm):
    """KVM_MSR_EXIT_REASON_UNKNOWN: userspace answers error=1 and the guest takes #GP at the rdmsr."""
    if open("/sys/module/kvm/parameters/ignore_msrs").read().strip() == "Y":
        pytest.skip("kvm.ignore_msrs=Y: unknown MSRs are ignored in the kernel and never exit")
    vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_UNKNOWN)
    m = _msr_machine(vm, UNKNOWN_MSR)
    _expect_msr_exit(m, uapi.KVM_EXIT_X86_RDMSR, uapi.KVM_MSR_EXIT_REASON_UNKNOWN, UNKNOWN_MSR).error = 1
    uc = m.run_until(guest.UCALL_EXCEPTION)
    assert uc.args[0] == 13 and uc.args[2] == m.sym("msr_rdmsr"), str(uc)
