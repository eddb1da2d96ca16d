"""Feature-group detection (spec section 2): from behaviour, never from a version or a bare number."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

from kvmtests import hvtlfs, uapi
from kvmtests.machine import guest, hyperv, tracefs
from kvmtests.machine.kvm import Kvm, Unavailable

PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    patches: str
    catalog: frozenset[int]


def _nums(*parts: object) -> frozenset[int]:
    out: set[int] = set()
    for p in parts:
        out.update(p if isinstance(p, range) else [p])
    return frozenset(out)


GROUPS = {g.key: g for g in [
    Group("xmm_output", "XMM output for fast hypercalls", "P01", _nums(12, range(97, 111))),
    Group("vtl_ipi", "VTL-aware PV IPIs", "P03-P04", _nums(range(111, 123), range(136, 139))),
    Group("mp_inactive_vtl", "MP state HV_INACTIVE_VTL", "P05", _nums(range(123, 136))),
    Group("hv_exits", "Get/SetVpRegisters, TranslateVirtualAddress, StartVP, GetVpIndexFromApicId exits",
          "P06-P08", _nums(10, 11, range(80, 97))),
    Group("fault_rwx_flags", "RWX flags on memory-fault exits", "P09", _nums(range(59, 63))),
    Group("fault_insn_len", "instruction length on memory-fault exits", "P10-P11", _nums(1, 3, range(63, 71))),
    Group("rwx_attributes", "RWX memory attributes and their enforcement", "P12-P16",
          _nums(5, 6, 7, 8, range(16, 59))),
    Group("attr_tracepoints", "attribute tracepoints", "P16-P17", _nums(range(71, 80))),
    Group("vsm_hcalls", "VSM hypercall exits and the VSM CPUID gate", "P18", _nums(9, 13, 14, 15, range(80, 95))),
]}
SERIES = "series"
CATALOG = frozenset(range(1, 139))


@dataclass(frozen=True)
class Detection:
    group: str
    state: str
    how: str
    partial: str = ""    # present, but this part of the group's patches is missing (a partial backport)

    @property
    def present(self) -> bool:
        return self.state == PRESENT


def groups_of(numbers: list[int]) -> list[str]:
    """Groups whose catalog rows include any of `numbers`."""
    return [g.key for g in GROUPS.values() if g.catalog.intersection(numbers)]


def parse_required(spec: str | None) -> set[str]:
    """Groups named by --require / KVMTESTS_REQUIRE ('series' means all of them)."""
    out: set[str] = set()
    for word in (spec or "").replace(",", " ").split():
        if word == SERIES:
            out.update(GROUPS)
        elif word in GROUPS:
            out.add(word)
        else:
            raise ValueError(f"unknown feature group {word!r}; known: {SERIES}, {', '.join(GROUPS)}")
    return out


# --- probes ------------------------------------------------------------------------------------

def _attributes(kvm: Kvm) -> Detection:
    with kvm.create_vm() as vm:
        ret, err = vm.set_memory_attributes(0x700000000, 0x1000, uapi.KVM_MEMORY_ATTRIBUTE_NW)
    how = f"KVM_SET_MEMORY_ATTRIBUTES(NW) on a default VM: {'0' if ret == 0 else uapi.errno_name(err)}"
    return Detection("rwx_attributes", PRESENT if ret == 0 else ABSENT, how)


def _tracepoints(kvm: Kvm) -> Detection:
    root = tracefs.root()
    if root is None:
        return Detection("attr_tracepoints", UNKNOWN, "tracefs is not mounted")
    names = [tracefs.SET_ATTRS_EVENT, tracefs.FAULTIN_EVENT]
    found = [n for n in names if tracefs.series_event(n)]
    how = f"tracefs events with the series' fields: {', '.join(found) or 'neither'}"
    if tracefs.SET_ATTRS_EVENT not in found and os.path.isdir(os.path.join(root, "events", tracefs.SET_ATTRS_EVENT)):
        how += f" ({tracefs.SET_ATTRS_EVENT} exists with another layout: upstream's event of that name, not P17's)"
    missing = [n for n in names if n not in found]
    partial = f"no {', '.join(missing)} with the series' fields" if found and missing else ""
    return Detection("attr_tracepoints", PRESENT if found else ABSENT, how, partial)


@functools.cache
def _fault_probe() -> tuple[int, int, str] | str:
    """One memory-fault exit: (flags, byte 56 after a 0xA5 sentinel, how) or why none could be made."""
    failed = []
    with Kvm() as kvm:
        ways = []
        if _attributes(kvm).present:
            ways.append((uapi.KVM_X86_DEFAULT_VM, "write_data", uapi.KVM_MEMORY_ATTRIBUTE_NW, "write to an NW page"))
        if kvm.check_extension(uapi.KVM_CAP_VM_TYPES) & (1 << uapi.KVM_X86_SW_PROTECTED_VM):
            ways.append((uapi.KVM_X86_SW_PROTECTED_VM, "read_data", uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE,
                         "read of a PRIVATE page without guest_memfd (SW_PROTECTED VM)"))
        for vm_type, entry, attributes, what in ways:   # the second is tried when the first makes no exit
            with kvm.create_vm(vm_type) as vm:          # (e.g. P15 without P16)
                m = guest.build(vm, guest.load_payload("probe"), entry=entry)
                vm.set_memory_attributes(guest.DATA_GPA, 0x1000, attributes)
                got = _fault_exit(m, what)
            if not isinstance(got, str):
                return got
            failed.append(got)
    return "; ".join(failed) or ("no memory-fault exit can be made: RWX attributes absent and no "
                                 "KVM_X86_SW_PROTECTED_VM (CONFIG_KVM_SW_PROTECTED_VM)")


def _fault_exit(m: guest.Machine, what: str) -> tuple[int, int, str] | str:
    m.vcpu.set_run_bytes(56, b"\xa5")
    ex = m.vcpu.run(5.0)
    if ex.reason != uapi.KVM_EXIT_MEMORY_FAULT:
        return f"{what} gave {m.describe()}, not a memory-fault exit"
    return (m.vcpu.run_struct.x.memory_fault.flags, m.vcpu.run_bytes(56, 1)[0], what)


def _fault_flags(kvm: Kvm) -> Detection:
    probe = _fault_probe()
    if isinstance(probe, str):
        return Detection("fault_rwx_flags", UNKNOWN, probe)
    flags, _, what = probe
    has_access = bool(flags & 0x7)
    return Detection("fault_rwx_flags", PRESENT if has_access else ABSENT,
                     f"{what}: flags {uapi.memory_fault_flag_names(flags)}")


def _fault_insn_len(kvm: Kvm) -> Detection:
    probe = _fault_probe()
    if isinstance(probe, str):
        return Detection("fault_insn_len", UNKNOWN, probe)
    _, byte56, what = probe
    return Detection("fault_insn_len", ABSENT if byte56 == 0xA5 else PRESENT,
                     f"{what}: kvm_run byte 56 sentinel 0xa5 {'kept' if byte56 == 0xA5 else f'now {byte56}'}")


def _hv_probe(key: str, bits: hyperv.CpuidBits, control: int, rdx: int, r8: int, xmm: list | None,
              judge: Callable[[hyperv.Outcome], bool], what: str) -> Callable[[Kvm], Detection]:
    def probe(kvm: Kvm) -> Detection:
        with kvm.create_vm() as vm:
            hvm = hyperv.build(vm, bits)
            out = hyperv.hypercall(hvm, control, rdx, r8, xmm=xmm)
        if not out.exited and not out.completed:
            return Detection(key, UNKNOWN, f"{what}: {out}")
        return Detection(key, PRESENT if judge(out) else ABSENT, f"{what}: {out}")
    return probe


# Every code P06-P08 make exit, with its patch: one group, so a backport of some of them is named.
HV_EXIT_CODES = ([(c, "P06") for c in hvtlfs.VP_REGISTER_CODES] + [(hvtlfs.HVCALL_TRANSLATE_VIRTUAL_ADDRESS, "P07")]
                 + [(c, "P08") for c in hvtlfs.START_VP_CODES])


def _hv_exits(kvm: Kvm) -> Detection:
    results = []
    for code, patch in HV_EXIT_CODES:
        with kvm.create_vm() as vm:
            results.append((f"{code:#06x} ({patch})", hyperv.hypercall(hyperv.build(vm), code, 0, 0)))
    return hv_exits_verdict(results)


def hv_exits_verdict(results: list[tuple[str, hyperv.Outcome]]) -> Detection:
    """Present when any P06-P08 code exits; the codes that do not are the partial backport's gap."""
    def said(pairs: list[tuple[str, hyperv.Outcome]]) -> str:
        by_outcome: dict[str, list[str]] = {}
        for what, out in pairs:
            by_outcome.setdefault(str(out), []).append(what)
        return "; ".join(f"slow {', '.join(whats)}: {outcome}" for outcome, whats in by_outcome.items())

    unclear = [(what, out) for what, out in results if not out.exited and not out.completed]
    if unclear:
        return Detection("hv_exits", UNKNOWN, said(unclear))
    exited = [what for what, out in results if out.exited]
    stayed = [(what, out) for what, out in results if not out.exited]
    if not exited:
        return Detection("hv_exits", ABSENT, said(stayed))
    how, gap = f"slow {', '.join(exited)} exit to userspace", said(stayed)
    return Detection("hv_exits", PRESENT, f"{how}; {gap}" if gap else how, gap)


XMM_PATTERN = [(0x1111111111111111 * (i + 1), 0x0101010101010101 * (i + 0x10)) for i in range(6)]
VSM = hyperv.CpuidBits(ebx_set=hvtlfs.HV_ACCESS_VSM)


# XMM-fast codes that the series makes exit (P06, P07, P18): P01's capture is observable only through one of them.
XMM_PROBE_CODES = (hvtlfs.HVCALL_GET_VP_REGISTERS, hvtlfs.HVCALL_TRANSLATE_VIRTUAL_ADDRESS,
                   hvtlfs.HVCALL_MODIFY_VTL_PROTECTION_MASK)


def _xmm_output(kvm: Kvm) -> Detection:
    """P01 shows only through a fast exit of P06/P07/P18: with none, EDX bit 15 advertised means unknown, not absent."""
    seen = []
    for code in XMM_PROBE_CODES:
        with kvm.create_vm() as vm:
            out = hyperv.hypercall(hyperv.build(vm), hvtlfs.control(code, fast=True), 0, 0, xmm=XMM_PATTERN)
        what = f"fast {code:#06x} with XMM0-5 loaded"
        if out.exited:
            captured = out.xmm == XMM_PATTERN
            return Detection("xmm_output", PRESENT if captured else ABSENT,
                             f"{what}: {out}, hcall.xmm {'captured' if captured else 'not written'}")
        if not out.completed:
            return Detection("xmm_output", UNKNOWN, f"{what}: {out}")
        seen.append(f"{code:#06x}")
    how = f"no fast XMM-fast code of the series exits ({', '.join(seen)} complete in the kernel)"
    if advertised_hv_bits().get("HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE"):
        return Detection("xmm_output", UNKNOWN, f"{how}, yet 0x40000003 EDX bit 15 (XMM output) is advertised: "
                                                "P01 without P06/P07/P18 cannot be observed")
    return Detection("xmm_output", ABSENT, f"{how} and 0x40000003 EDX bit 15 (XMM output) is not advertised")


def _mp_state(kvm: Kvm) -> Detection:
    with kvm.create_vm() as vm:
        hvm = hyperv.build(vm, VSM)
        ret, err = hvm.vcpu.set_mp_state(uapi.KVM_MP_STATE_HV_INACTIVE_VTL)
    how = f"KVM_SET_MP_STATE(11) on a VSM vCPU: {'0' if ret == 0 else uapi.errno_name(err)}"
    return Detection("mp_inactive_vtl", PRESENT if ret == 0 else ABSENT, how)


PROBES: dict[str, Callable[[Kvm], Detection]] = {
    "rwx_attributes": _attributes,
    "attr_tracepoints": _tracepoints,
    "fault_rwx_flags": _fault_flags,
    "fault_insn_len": _fault_insn_len,
    "hv_exits": _hv_exits,
    "vsm_hcalls": _hv_probe("vsm_hcalls", hyperv.CpuidBits(), hvtlfs.HVCALL_VTL_CALL, 0, 0, None,
                            lambda o: o.exited, "slow VtlCall (0x11)"),
    "xmm_output": _xmm_output,
    "vtl_ipi": _hv_probe("vtl_ipi", VSM, hvtlfs.control(hvtlfs.HVCALL_SEND_IPI, fast=True),
                         0x30 | (1 << 36), 1, None, lambda o: o.exited,
                         "VSM vCPU, fast SendSyntheticClusterIpi with use_target_vtl"),
    "mp_inactive_vtl": _mp_state,
}


@functools.cache
def detect(group: str) -> Detection:
    """Detect one group on the KVM under test (cached per process)."""
    try:
        with Kvm() as kvm:
            return PROBES[group](kvm)
    except Unavailable as e:
        return Detection(group, UNKNOWN, str(e))


def detect_all() -> dict[str, Detection]:
    return {key: detect(key) for key in GROUPS}


# Which groups' behaviour each advertised KVM_GET_SUPPORTED_HV_CPUID bit announces (api.rst 10.1-10.4).
BIT_ANNOUNCES = {
    "HV_ACCESS_VSM": ("vsm_hcalls", "mp_inactive_vtl", "vtl_ipi"),
    "HV_ACCESS_VP_REGISTERS": ("hv_exits",),
    "HV_START_VIRTUAL_PROCESSOR": ("hv_exits",),
    "HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE": ("xmm_output",),
}


def partial_backport(detections: dict[str, Detection]) -> list[str]:
    """Findings that only a partial backport explains, in words."""
    findings = []
    states = {k: d.state for k, d in detections.items()}
    known = [k for k, s in states.items() if s != UNKNOWN]
    present = [k for k in known if states[k] == PRESENT]
    if present and len(present) < len(known):
        findings.append(f"partial series: present {', '.join(present)}; absent "
                        f"{', '.join(k for k in known if states[k] == ABSENT)}")
    for key, det in detections.items():
        if det.state == PRESENT and det.partial:
            findings.append(f"{key} ({GROUPS[key].patches}) only in part: {det.partial}")
    for bit, advertised in advertised_hv_bits().items():
        for group in BIT_ANNOUNCES[bit]:
            if advertised and states.get(group) == ABSENT:
                findings.append(f"{bit} advertised in KVM_GET_SUPPORTED_HV_CPUID, but {group} is absent: "
                                f"{detections[group].how}")
            if not advertised and states.get(group) == PRESENT:
                findings.append(f"{group} is present, but KVM_GET_SUPPORTED_HV_CPUID does not advertise {bit}")
    return findings


@functools.cache
def advertised_hv_bits() -> dict[str, bool]:
    """The series' bits in KVM_GET_SUPPORTED_HV_CPUID (vCPU variant), empty without Hyper-V."""
    try:
        with Kvm() as kvm:
            if not kvm.check_extension(uapi.KVM_CAP_HYPERV):
                return {}
            with kvm.create_vm() as vm:
                entries, err = vm.create_vcpu(0).supported_hv_cpuid()
    except Unavailable:
        return {}
    leaf = next((e for e in entries if e["function"] == hvtlfs.HYPERV_CPUID_FEATURES), None)
    if err or leaf is None:
        return {}
    return {"HV_ACCESS_VSM": bool(leaf["ebx"] & hvtlfs.HV_ACCESS_VSM),
            "HV_ACCESS_VP_REGISTERS": bool(leaf["ebx"] & hvtlfs.HV_ACCESS_VP_REGISTERS),
            "HV_START_VIRTUAL_PROCESSOR": bool(leaf["ebx"] & hvtlfs.HV_START_VIRTUAL_PROCESSOR),
            "HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE": bool(leaf["edx"] & hvtlfs.HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE)}
