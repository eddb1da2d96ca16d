"""Host identity and capability table (`kvmtests probe`, and the summary's header)."""
from __future__ import annotations

import os
import platform

from kvmtests import uapi
from kvmtests.machine import host
from kvmtests.machine.kvm import Kvm, Unavailable

from . import features

# (capability, number, shown in the summary's header)
CAPS = [
    ("KVM_CAP_HYPERV", uapi.KVM_CAP_HYPERV, True),
    ("KVM_CAP_SYS_HYPERV_CPUID", uapi.KVM_CAP_SYS_HYPERV_CPUID, False),
    ("KVM_CAP_HYPERV_ENFORCE_CPUID", uapi.KVM_CAP_HYPERV_ENFORCE_CPUID, True),
    ("KVM_CAP_X86_USER_SPACE_MSR", uapi.KVM_CAP_X86_USER_SPACE_MSR, False),
    ("KVM_CAP_SIGNAL_MSI", uapi.KVM_CAP_SIGNAL_MSI, False),
    ("KVM_CAP_MEMORY_FAULT_INFO", uapi.KVM_CAP_MEMORY_FAULT_INFO, True),
    ("KVM_CAP_MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES, True),
    ("KVM_CAP_GUEST_MEMFD", uapi.KVM_CAP_GUEST_MEMFD, False),
    ("KVM_CAP_VM_TYPES", uapi.KVM_CAP_VM_TYPES, True),
    ("236 (series: FAULT_EXIT_INSN_LEN; v6.11+: PRE_FAULT_MEMORY)", 236, False),
]


def capability_line() -> str:
    """The capabilities a reader of the summary needs first, as KVM_CHECK_EXTENSION on /dev/kvm says."""
    try:
        with Kvm() as kvm:
            return " ".join(f"{name.removeprefix('KVM_CAP_')}={kvm.check_extension(cap):#x}" for name, cap, brief in CAPS if brief)
    except Unavailable as e:
        return str(e)


def host_identity() -> dict[str, str]:
    return {
        "kernel": platform.release(),
        "kvm device": os.environ.get("KVMTESTS_DEV", "/dev/kvm"),
        "cpu vendor": host.cpu_vendor(),
        "vendor module": host.vendor_module(),
        "tdp": host.tdp(),
        "environment": host.environment(),
        "command line": host.command_line(),
        "capabilities": capability_line(),
    }


def capabilities() -> list[tuple[str, int, str, str]]:
    """(name, number, value on /dev/kvm, value on a default VM fd)."""
    rows = []
    with Kvm() as kvm, kvm.create_vm() as vm:
        for name, cap, _brief in CAPS:
            rows.append((name, cap, hex(kvm.check_extension(cap)), hex(vm.check_extension(cap))))
    return rows


def probe_tables() -> list[tuple[str, list[list[str]], list[str]]]:
    """The probe output as (title, rows, headers) tables."""
    tables: list[tuple[str, list[list[str]], list[str]]] = [
        ("host", [[k, v] for k, v in host_identity().items()], ["", ""])]
    try:
        tables.append(("capabilities", [list(map(str, r)) for r in capabilities()],
                       ["capability", "number", "/dev/kvm", "default VM"]))
    except Unavailable as e:
        tables.append(("capabilities", [[str(e)]], ["unavailable"]))
        return tables
    detections = features.detect_all()
    tables.append(("feature groups (spec section 2)",
                   [[g.key, g.patches, detections[g.key].state, detections[g.key].how]
                    for g in features.GROUPS.values()], ["group", "patches", "state", "detected by"]))
    bits = features.advertised_hv_bits()
    if bits:
        tables.append(("KVM_GET_SUPPORTED_HV_CPUID (vCPU)", [[k, "set" if v else "clear"] for k, v in bits.items()],
                       ["bit", "value"]))
    found = features.findings(detections, features.parse_cap_numbers(os.environ.get(features.CAP_NUMBERS_ENV)))
    if found:
        tables.append(("findings", [[f] for f in found], ["finding"]))
    return tables
