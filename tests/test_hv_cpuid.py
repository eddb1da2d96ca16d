"""KVM_GET_SUPPORTED_HV_CPUID: the series' new 0x40000003 bits (catalog 9-14) and the exit type (15)."""
import pytest

from kvmtests import hvtlfs, uapi
from kvmtests.machine import hyperv
from kvmtests.machine.kvm import Unavailable

# (catalog number, register, bit, feature group that advertises it, name)
NEW_BITS = [
    (9, "ebx", hvtlfs.HV_ACCESS_VSM, "vsm_hcalls", "HV_ACCESS_VSM"),
    (10, "ebx", hvtlfs.HV_ACCESS_VP_REGISTERS, "hv_exits", "HV_ACCESS_VP_REGISTERS"),
    (11, "ebx", hvtlfs.HV_START_VIRTUAL_PROCESSOR, "hv_exits", "HV_START_VIRTUAL_PROCESSOR"),
    (12, "edx", hvtlfs.HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE, "xmm_output", "HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE"),
]
# Bits KVM advertised before the series (regression guard, catalog 14): named bits only. EBX bit 20
# (extended hypercalls) is older than the series' base but younger than some kernels qualified here, so
# it is checked against the behaviour it announces instead (test_extended_hypercalls_bit_matches_behaviour).
OLD_BITS = [("ebx", hvtlfs.HV_POST_MESSAGES, "HV_POST_MESSAGES"), ("ebx", hvtlfs.HV_SIGNAL_EVENTS, "HV_SIGNAL_EVENTS"),
            ("edx", hvtlfs.HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE, "HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE")]


def vcpu_leaves(vm) -> list[dict]:
    hyperv.require_hyperv(vm.kvm)
    entries, err = vm.create_vcpu(0).supported_hv_cpuid_raw()
    if err:
        raise Unavailable(f"KVM_GET_SUPPORTED_HV_CPUID on a vCPU failed ({uapi.errno_name(err)}): "
                          "kernel lacks KVM_CAP_HYPERV_CPUID")
    return entries


def system_leaves(kvm) -> list[dict]:
    hyperv.require_hyperv(kvm)
    if not kvm.check_extension(uapi.KVM_CAP_SYS_HYPERV_CPUID):
        raise Unavailable("kernel lacks KVM_CAP_SYS_HYPERV_CPUID (/dev/kvm KVM_GET_SUPPORTED_HV_CPUID)")
    entries, err = kvm.supported_hv_cpuid_raw()
    assert not err, f"KVM_GET_SUPPORTED_HV_CPUID on /dev/kvm: {uapi.errno_name(err)} despite the capability"
    return entries


def features_leaf(entries: list[dict]) -> dict:
    leaf = next((e for e in entries if e["function"] == hvtlfs.HYPERV_CPUID_FEATURES), None)
    assert leaf is not None, "KVM_GET_SUPPORTED_HV_CPUID has no leaf 0x40000003"
    return leaf


def check_new_bit(series, leaf: dict, n: int, reg: str, bit: int, group: str, name: str, where: str) -> None:
    expected = series.patched(group)
    seen = bool(leaf[reg] & bit)
    assert seen == expected, (f"catalog {n}: {where} 0x40000003 {reg.upper()} {name} (bit {bit.bit_length() - 1}) "
                              f"is {'set' if seen else 'clear'}, expected {'set' if expected else 'clear'} "
                              f"({group} {'present' if expected else 'absent'})")


@pytest.mark.parametrize("n,reg,bit,group,name", [
    pytest.param(*row, marks=[pytest.mark.catalog(row[0]), pytest.mark.group(row[3])], id=row[4]) for row in NEW_BITS])
def test_vcpu_hv_cpuid_advertises_new_bit(vm, series, n, reg, bit, group, name):
    check_new_bit(series, features_leaf(vcpu_leaves(vm)), n, reg, bit, group, name, "vCPU")


@pytest.mark.parametrize("n,reg,bit,group,name", [
    pytest.param(*row, marks=[pytest.mark.catalog(13), pytest.mark.group(row[3])], id=row[4]) for row in NEW_BITS])
def test_system_hv_cpuid_advertises_new_bit(kvm, series, n, reg, bit, group, name):
    """Catalog 13: the /dev/kvm variant reports the same four bits as the vCPU one (9-12)."""
    check_new_bit(series, features_leaf(system_leaves(kvm)), 13, reg, bit, group, name, "/dev/kvm")


@pytest.mark.catalog(14)
@pytest.mark.parametrize("variant", ["vcpu", "system"])
def test_previously_advertised_bits_unchanged(kvm, vm, variant):
    """Same on both kernels: the series adds bits and must not drop the ones KVM already advertised."""
    entries = vcpu_leaves(vm) if variant == "vcpu" else system_leaves(kvm)
    iface = next((e for e in entries if e["function"] == hvtlfs.HYPERV_CPUID_INTERFACE), None)
    assert iface and iface["eax"] == hvtlfs.HYPERV_INTERFACE_SIGNATURE, \
        f"catalog 14: leaf 0x40000001 EAX is {iface and hex(iface['eax'])}, expected 'Hv#1' (0x31237648)"
    leaf = features_leaf(entries)
    missing = [name for reg, bit, name in OLD_BITS if not leaf[reg] & bit]
    assert not missing, (f"catalog 14: {variant} 0x40000003 (EBX {leaf['ebx']:#x}, EDX {leaf['edx']:#x}) lost "
                         f"previously advertised {', '.join(missing)}")


@pytest.mark.catalog(14)
@pytest.mark.parametrize("variant", ["vcpu", "system"])
def test_extended_hypercalls_bit_matches_behaviour(kvm, vm, variant):
    """EBX bit 20 is advertised exactly when KVM routes extended hypercalls (slow 0x8001) to userspace.

    The spec lists bit 20 among the bits the series must keep (its v6.10 base has it); kernels that
    predate extended-hypercall support answer 0x8001 in the kernel with status 2 and must not
    advertise the bit. Tying the bit to the behaviour checks both kinds of kernel without a version."""
    entries = vcpu_leaves(vm) if variant == "vcpu" else system_leaves(kvm)
    advertised = bool(features_leaf(entries)["ebx"] & hvtlfs.HV_ENABLE_EXTENDED_HYPERCALLS)
    with kvm.create_vm() as probe_vm:
        out = hyperv.hypercall(hyperv.build_hv_machine(probe_vm), hvtlfs.HV_EXT_CALL_QUERY_CAPABILITIES, 0x1000, 0x2000)
    assert out.exited or out.completed, f"catalog 14: slow HvExtCallQueryCapabilities (0x8001): {out}"
    if out.completed:
        assert out.rax == hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE, (
            f"catalog 14: 0x8001 completed in the kernel with {hvtlfs.status_name(out.rax)}, expected an exit "
            "to userspace or INVALID_HYPERCALL_CODE")
    assert advertised == out.exited, (
        f"catalog 14: {variant} 0x40000003 EBX HV_ENABLE_EXTENDED_HYPERCALLS (bit 20) is "
        f"{'set' if advertised else 'clear'}, but 0x8001 {'exits to userspace' if out.exited else 'does not exit'}")


# Every code the series makes exit, fast where KVM reads XMM input for it (P01's XMM exits included).
EXIT_CODES = [(code, code in hvtlfs.XMM_FAST_CODES) for code in hvtlfs.EXITING_CODES]


@pytest.mark.parametrize("code,fast", [
    pytest.param(code, fast, marks=[pytest.mark.catalog(15), pytest.mark.group(hyperv.code_group(code))],
                 id=f"{code:#06x}{'-fast' if fast else ''}") for code, fast in EXIT_CODES])
def test_new_exits_use_the_hcall_type(vm, series, code, fast):
    """The series adds no exit type: its exits are KVM_EXIT_HYPERV with type KVM_EXIT_HYPERV_HCALL (2)."""
    series.require(hyperv.code_group(code))
    hvm = hyperv.build_hv_machine(vm)
    hyperv.hypercall(hvm, hvtlfs.control(code, fast=fast), 0x1000, 0x2000)
    run = hvm.vcpu.run_struct
    observed = (hvm.vcpu.last_exit.ret, run.exit_reason, run.x.hyperv.type if run.exit_reason == uapi.KVM_EXIT_HYPERV
                else None)
    assert observed == (0, uapi.KVM_EXIT_HYPERV, uapi.KVM_EXIT_HYPERV_HCALL), \
        f"catalog 15: code {code:#x} gave {hvm.machine.describe()}, expected KVM_EXIT_HYPERV type 2 (HCALL)"
