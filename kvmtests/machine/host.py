"""Who serves /dev/kvm here: CPU vendor and flags, vendor module, TDP, and the environment around the host."""
from __future__ import annotations

import os
from pathlib import Path

VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
TDP_PARAMS = {"kvm_intel": "ept", "kvm_amd": "npt"}
CPU_FLAG = {"kvm_intel": "vmx", "kvm_amd": "svm"}   # what each needs from the CPU; kvm_pvm needs neither


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


def tdp_mmu(sys_module: Path = Path("/sys/module")) -> bool | None:
    """kvm.tdp_mmu: the TDP MMU (default) or the legacy MMU under TDP; None where KVM has no such parameter."""
    value = _read(str(sys_module / "kvm" / "parameters" / "tdp_mmu"))
    return None if value is None else value in ("Y", "1")


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


def module_param(module: str, name: str) -> str | None:
    """/sys/module/<module>/parameters/<name>, or None where the module or the parameter is absent."""
    return _read(f"/sys/module/{module}/parameters/{name}")


def _on(value: str | None) -> bool:
    return value in ("Y", "1")


def tdp_on() -> bool | None:
    """TDP (EPT/NPT) on, off, or None where the vendor module does not say."""
    setting = tdp_setting()
    return None if setting is None else _on(setting[1])


def require_tdp() -> None:
    """Catalog C assumes TDP: under shadow paging a supervisor read of an NR page is not denied."""
    from .kvm import Unavailable      # here, not at the top: host stays importable without the cffi bindings

    state = tdp_on()
    if state is None:
        raise Unavailable(f"needs TDP (EPT/NPT); cannot tell from {vendor_module()}")
    if not state:
        raise Unavailable("needs TDP: kvm_intel.ept / kvm_amd.npt is off (shadow paging checks NR only at CPL 3)")


def intel_ept() -> bool:
    """Intel VMX with EPT: the only hosts where insn_len is the instruction length (P10)."""
    return cpu_vendor() == "GenuineIntel" and _on(module_param("kvm_intel", "ept"))


def intel_ept_ad() -> bool:
    """EPT accessed/dirty flags on: guest paging-structure accesses then count as EPT writes (SDM)."""
    return intel_ept() and _on(module_param("kvm_intel", "eptad"))


def amd_npt() -> bool:
    """AMD (or Hygon) SVM with NPT."""
    return cpu_vendor() in ("AuthenticAMD", "HygonGenuine") and _on(module_param("kvm_amd", "npt"))


def qemu_accel(cmdline: str | None = None) -> str | None:
    """The QEMU accelerator (tcg, kvm) under kvmtests qualify, bochs for its Bochs runs, lava:DEVICE-TYPE in a
    LAVA job kvmtests lava wrote, else None."""
    accel = os.environ.get("KVMTESTS_ACCEL")
    for word in ((_read("/proc/cmdline") if cmdline is None else cmdline) or "").split():
        if word.startswith("kvmtests.accel="):
            accel = word.split("=", 1)[1]
    return accel or None


# What a runner boots every kernel with (Bochs also: a TSC at the emulated rate, no crypto self-tests).
RUNNER_WORDS = ("console=", "printk.time=", "panic=", "kvmtests.", "BOOT_IMAGE=", "initrd=", "tsc_early_khz=",
                "cryptomgr.notests=")


def command_line(cmdline: str | None = None) -> str:
    """The run's command-line variant, so runs of one kernel tell apart: under qualify the words it appended
    (--append, --variant), on a host the KVM module parameters it was booted with; "default" when none."""
    words = (_read("/proc/cmdline") if cmdline is None else cmdline or "").split()
    words = words[: words.index("--")] if "--" in words else words
    if qemu_accel(cmdline):
        chosen = [w for w in words if not w.startswith(RUNNER_WORDS)]
    else:
        chosen = [w for w in words if w.split("=", 1)[0].split(".", 1)[0] in ("kvm", *VENDOR_MODULES) and "." in w]
    return " ".join(chosen) or "default"


def environment() -> str:
    """Bare metal, or under which hypervisor (QEMU TCG/KVM or Bochs, as the qualification runner says)."""
    accel = qemu_accel()
    if accel == "bochs":
        return "Bochs (kvmtests qualify)"
    if accel and accel.startswith("lava:"):
        return f"LAVA device type {accel.removeprefix('lava:')} (kvmtests lava)"
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
