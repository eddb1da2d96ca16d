"""Host identity and capability table (`kvmtests probe`, and the summary's header)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from . import features, uapi
from .kvm import Kvm, Unavailable

VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
TDP_PARAMS = {"kvm_intel": "ept", "kvm_amd": "npt"}
CPU_FLAG = {"kvm_intel": "vmx", "kvm_amd": "svm"}   # what each needs from the CPU; kvm_pvm needs neither

CAPS = [
    ("KVM_CAP_HYPERV", uapi.KVM_CAP_HYPERV),
    ("KVM_CAP_SYS_HYPERV_CPUID", uapi.KVM_CAP_SYS_HYPERV_CPUID),
    ("KVM_CAP_HYPERV_ENFORCE_CPUID", uapi.KVM_CAP_HYPERV_ENFORCE_CPUID),
    ("KVM_CAP_X86_USER_SPACE_MSR", uapi.KVM_CAP_X86_USER_SPACE_MSR),
    ("KVM_CAP_SIGNAL_MSI", uapi.KVM_CAP_SIGNAL_MSI),
    ("KVM_CAP_MEMORY_FAULT_INFO", uapi.KVM_CAP_MEMORY_FAULT_INFO),
    ("KVM_CAP_MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES),
    ("KVM_CAP_GUEST_MEMFD", uapi.KVM_CAP_GUEST_MEMFD),
    ("KVM_CAP_VM_TYPES", uapi.KVM_CAP_VM_TYPES),
    ("236 (series: FAULT_EXIT_INSN_LEN; v6.11+: PRE_FAULT_MEMORY)", 236),
]


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def vendor_modules(sys_module: Path = Path("/sys/module"), flags: set[str] | None = None) -> list[str]:
    """The vendor modules that can be serving /dev/kvm: loaded or built in, and backed by the CPU (a kernel
    with kvm_intel and kvm_amd both built in shows both in /sys/module, and both have parameters)."""
    flags = cpu_flags() if flags is None else flags
    present = [m for m in VENDOR_MODULES if (sys_module / m).is_dir()]
    return [m for m in present if m not in CPU_FLAG or CPU_FLAG[m] in flags]


def vendor_module() -> str:
    return ", ".join(vendor_modules()) or "none loaded"


def tdp_setting() -> tuple[str, str] | None:
    """The serving vendor module's ept/npt parameter and its value, or None where it has none."""
    for module in vendor_modules():
        if module in TDP_PARAMS:
            value = _read(f"/sys/module/{module}/parameters/{TDP_PARAMS[module]}")
            if value is not None:
                return f"{module}.{TDP_PARAMS[module]}", value
    return None


def tdp() -> str:
    """TDP (EPT/NPT) as the vendor module reports it."""
    setting = tdp_setting()
    if setting is None:
        return f"unknown ({vendor_module()} has no ept/npt parameter)"
    name, value = setting
    on = value in ("Y", "1")
    mmu = _read("/sys/module/kvm/parameters/tdp_mmu")
    mmu_note = f", kvm.tdp_mmu={mmu}" if on and mmu is not None else ""
    return f"{'on' if on else 'off'} ({name}={value}{mmu_note})"


def qemu_accel() -> str | None:
    """The QEMU accelerator (tcg, kvm) under kvmtests qualify, else None."""
    accel = os.environ.get("KVMTESTS_ACCEL")
    for word in (_read("/proc/cmdline") or "").split():
        if word.startswith("kvmtests.accel="):
            accel = word.split("=", 1)[1]
    return accel or None


def environment() -> str:
    """Bare metal, or under which hypervisor (QEMU TCG/KVM as the qualification runner says)."""
    accel = qemu_accel()
    if accel:
        return f"QEMU/{accel.upper()} (kvmtests qualify)"
    cpuinfo = _read("/proc/cpuinfo") or ""
    if " hypervisor" not in cpuinfo:
        return "bare metal"
    vendor = _read("/sys/class/dmi/id/sys_vendor")
    return f"virtual machine ({vendor})" if vendor else "virtual machine"


def cpu_flags() -> set[str]:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_vendor() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return "unknown"


SUMMARY_CAPS = [("HYPERV", uapi.KVM_CAP_HYPERV), ("HYPERV_ENFORCE_CPUID", uapi.KVM_CAP_HYPERV_ENFORCE_CPUID),
                ("MEMORY_FAULT_INFO", uapi.KVM_CAP_MEMORY_FAULT_INFO),
                ("MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES), ("VM_TYPES", uapi.KVM_CAP_VM_TYPES)]


def capability_line() -> str:
    """The capabilities a reader of the summary needs first, as KVM_CHECK_EXTENSION on /dev/kvm says."""
    try:
        with Kvm() as kvm:
            return " ".join(f"{name}={kvm.check_extension(cap):#x}" for name, cap in SUMMARY_CAPS)
    except Unavailable as e:
        return str(e)


def host_identity() -> dict[str, str]:
    return {
        "kernel": platform.release(),
        "kvm device": os.environ.get("KVMTESTS_DEV", "/dev/kvm"),
        "cpu vendor": cpu_vendor(),
        "vendor module": vendor_module(),
        "tdp": tdp(),
        "environment": environment(),
        "capabilities": capability_line(),
    }


def capabilities() -> list[tuple[str, int, str, str]]:
    """(name, number, value on /dev/kvm, value on a default VM fd)."""
    rows = []
    with Kvm() as kvm, kvm.create_vm() as vm:
        for name, cap in CAPS:
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
    findings = features.partial_backport(detections)
    if findings:
        tables.append(("partial backport", [[f] for f in findings], ["finding"]))
    return tables
