"""Feature-group detection (spec section 2): from behaviour, never from a version or a bare number."""
from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from typing import Callable

from kvmtests import hvtlfs, uapi
from kvmtests.machine import guest, host, hvexits, hyperv, memfault, tracefs
from kvmtests.machine.kvm import Kvm, Unavailable

PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"
CRASHED = "crashed"    # the group's detection probe crashed the kernel on an earlier boot of this run
_crashed: dict[str, str] = {}


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
    deviations: tuple[str, ...] = ()   # what the probe saw that the spec contradicts: group, catalog, observed

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

def deviation(group: str, catalog: str, observed: str, expected: str) -> str:
    """One finding line: the group whose spec the probe's observation contradicts, the catalog rows, both values."""
    return f"{group} ({GROUPS[group].patches}) probe contradicts catalog {catalog}: {observed}; expected {expected}"


def _attributes(kvm: Kvm) -> Detection:
    with kvm.create_vm() as vm:
        ret, err = vm.set_memory_attributes_raw(0x700000000, 0x1000, uapi.KVM_MEMORY_ATTRIBUTE_NW)
    answer = "0" if ret == 0 else uapi.errno_name(err)
    how = f"KVM_SET_MEMORY_ATTRIBUTES(NW) on a default VM: {answer}"
    odd = () if ret == 0 or err in (errno.EINVAL, errno.ENOTTY) else (deviation(
        "rwx_attributes", "16, 31", how, "0 (series), EINVAL or ENOTTY (upstream)"),)
    return Detection("rwx_attributes", PRESENT if ret == 0 else ABSENT, how, deviations=odd)


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


@dataclass(frozen=True)
class FaultWay:
    """One way to make a memory-fault exit, and what the spec says its exit carries (P09, P16)."""

    vm_type: int
    entry: str
    attributes: int
    what: str
    access: int        # the access's flag with P09
    extra: int         # flags set with or without P09 (PRIVATE for the private-page read)
    rows: str          # catalog rows of the flags


NW_WRITE = FaultWay(uapi.KVM_X86_DEFAULT_VM, "write_data", uapi.KVM_MEMORY_ATTRIBUTE_NW, "write to an NW page",
                    uapi.KVM_MEMORY_EXIT_FLAG_WRITE, 0, "36, 56, 60, 62")
PRIVATE_READ = FaultWay(uapi.KVM_X86_SW_PROTECTED_VM, "read_data", uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE,
                        "read of a PRIVATE page without guest_memfd (SW_PROTECTED VM)",
                        uapi.KVM_MEMORY_EXIT_FLAG_READ, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, "59, 62")


@dataclass(frozen=True)
class FaultSeen:
    """The fault probe's exit: flags, byte 56 after a 0xA5 sentinel, how it was made, the ways that failed first."""

    flags: int
    byte56: int
    what: str
    fallback: str = ""
    deviations: tuple[str, ...] = ()

    def how(self, said: str) -> str:
        return f"{self.what}: {said}" + (f" (fallback: {self.fallback})" if self.fallback else "")


def fault_deviations(way: FaultWay, flags: int, gpa: int, size: int, byte56: int,
                     exact: int | None = None) -> tuple[str, ...]:
    """What in the probe's exit contradicts the spec, whichever of P09/P11 the kernel carries; `exact` is the
    probe instruction's length where the CPU reports it (Intel EPT, P10), so P11 must write exactly that."""
    names = uapi.memory_fault_flag_names
    out = []
    if flags not in (way.access | way.extra, way.extra):
        out.append(deviation("fault_rwx_flags", way.rows, f"{way.what}: flags {names(flags)}",
                             f"{names(way.access | way.extra)} (P09) or {names(way.extra)} (upstream)"))
    if gpa != guest.DATA_GPA:
        out.append(deviation("rwx_attributes" if way is NW_WRITE else "fault_rwx_flags", "37",
                             f"{way.what}: gpa {gpa:#x}", f"the page-aligned {guest.DATA_GPA:#x}"))
    if size != 0x1000:
        out.append(deviation("rwx_attributes" if way is NW_WRITE else "fault_rwx_flags", "38",
                             f"{way.what}: size {size:#x}", "0x1000"))
    if byte56 > 15 and byte56 != memfault.SENTINEL:
        out.append(deviation("fault_insn_len", "67", f"{way.what}: insn_len {byte56}",
                             "at most 15 (P11), or the sentinel 0xa5 kept (upstream)"))
    elif exact is not None and byte56 not in (exact, memfault.SENTINEL):
        out.append(deviation("fault_insn_len", "63" if way is NW_WRITE else "65", f"{way.what}: insn_len {byte56}",
                             f"{exact}, the instruction's length on Intel EPT (P10/P11), or the sentinel 0xa5 kept "
                             "(upstream)"))
    return tuple(out)


@functools.cache
def _fault_probe() -> FaultSeen | str:
    """One memory-fault exit, or why none could be made; a way that failed first is kept and, if the spec
    says it must exit, reported as a deviation."""
    failed: list[str] = []
    deviations: list[str] = []
    with Kvm() as kvm:
        ways = []
        if _attributes(kvm).present:
            ways.append(NW_WRITE)
        if kvm.check_extension(uapi.KVM_CAP_VM_TYPES) & (1 << uapi.KVM_X86_SW_PROTECTED_VM):
            ways.append(PRIVATE_READ)
        for way in ways:                                # the second is tried when the first makes no exit
            with kvm.create_vm(way.vm_type) as vm:
                m = guest.build_machine(vm, guest.load_payload("probe"), entry=way.entry)
                vm.set_memory_attributes_raw(guest.DATA_GPA, 0x1000, way.attributes)   # a refusal shows as no fault exit
                got = _fault_exit(m, way)
            if isinstance(got, FaultSeen):
                return FaultSeen(got.flags, got.byte56, got.what, "; ".join(failed),
                                 tuple(deviations) + got.deviations)
            failed.append(got)
            if way is NW_WRITE:                         # P15 accepted NW, so P16 must deny the write
                deviations.append(deviation("rwx_attributes", "35", got, "KVM_RUN -1/EFAULT with exit 39"))
    return "; ".join(failed) or ("no memory-fault exit can be made: RWX attributes absent and no "
                                 "KVM_X86_SW_PROTECTED_VM (CONFIG_KVM_SW_PROTECTED_VM)")


def _fault_exit(m: guest.Machine, way: FaultWay) -> FaultSeen | str:
    """The way's exit with sentinels in its fields, if KVM_RUN gave -1, EFAULT and exit 39 together (catalog 35)."""
    fault = memfault.run_for_fault(m)
    if fault is None:
        return f"{way.what} gave {m.describe()}, not a memory-fault exit (KVM_RUN -1/EFAULT, exit 39)"
    exact = m.payload.length(f"{way.entry}_insn", f"{way.entry}_end") if host.intel_ept() else None
    return FaultSeen(fault.flags, fault.insn_len, way.what,
                     deviations=fault_deviations(way, fault.flags, fault.gpa, fault.size, fault.insn_len, exact))


def _fault_flags(kvm: Kvm) -> Detection:
    probe = _fault_probe()
    if isinstance(probe, str):
        return Detection("fault_rwx_flags", UNKNOWN, probe)
    has_access = bool(probe.flags & 0x7)
    return Detection("fault_rwx_flags", PRESENT if has_access else ABSENT,
                     probe.how(f"flags {uapi.memory_fault_flag_names(probe.flags)}"), deviations=probe.deviations)


def _fault_insn_len(kvm: Kvm) -> Detection:
    probe = _fault_probe()
    if isinstance(probe, str):
        return Detection("fault_insn_len", UNKNOWN, probe)
    kept = probe.byte56 == memfault.SENTINEL
    return Detection("fault_insn_len", ABSENT if kept else PRESENT,
                     probe.how(f"kvm_run byte 56 sentinel 0xa5 {'kept' if kept else f'now {probe.byte56}'}"),
                     deviations=probe.deviations)


def hcall_deviations(group: str, rows: str, what: str, out: hyperv.HcallOutcome, control: int, params: tuple[int, int],
                     upstream_status: int) -> tuple[str, ...]:
    """An exit must pass the rows' whole-exit check (hvexits: 81, 82, 100, 111); a call kept in the kernel must
    answer as upstream does (80: status 2, 111: status 3)."""
    if out.exited:
        return tuple(deviation(w.group, rows if w.group == group else str(w.entry), f"{what}: {w.field} {w.observed}",
                               w.expected) for w in hvexits.exit_fields(out, hyperv.Call(control, *params), None))
    if out.completed and out.rax != upstream_status:
        return (deviation(group, rows, f"{what}: {out}",
                          f"an exit (series) or RAX {hvtlfs.status_name(upstream_status)} (upstream)"),)
    return ()


def _hv_probe(key: str, bits: hyperv.CpuidBits, control: int, rdx: int, r8: int, rows: str, upstream_status: int,
              what: str) -> Callable[[Kvm], Detection]:
    """Present when the hypercall exits to userspace; what else it does against the spec is a deviation."""
    def probe(kvm: Kvm) -> Detection:
        with kvm.create_vm() as vm:
            hvm = hyperv.build_hv_machine(vm, bits)
            out = hyperv.hypercall(hvm, control, rdx, r8)
        if not out.exited and not out.completed:
            return Detection(key, UNKNOWN, f"{what}: {out}")
        return Detection(key, PRESENT if out.exited else ABSENT, f"{what}: {out}",
                         deviations=hcall_deviations(key, rows, what, out, control, (rdx, r8), upstream_status))
    return probe


# Every code P06-P08 make exit, with its patch: one group, so a backport of some of them is named.
HV_EXIT_CODES = ([(c, "P06") for c in hvtlfs.VP_REGISTER_CODES] + [(hvtlfs.HVCALL_TRANSLATE_VIRTUAL_ADDRESS, "P07")]
                 + [(c, "P08") for c in hvtlfs.START_VP_CODES])


def _hv_exits(kvm: Kvm) -> Detection:
    results = []
    for code, patch in HV_EXIT_CODES:
        with kvm.create_vm() as vm:
            results.append((f"{code:#06x} ({patch})", hyperv.hypercall(hyperv.build_hv_machine(vm), code, 0, 0)))
    det = hv_exits_verdict(results)
    odd = [d for (what, out), (code, _) in zip(results, HV_EXIT_CODES)
           for d in hcall_deviations("hv_exits", "80, 81", f"slow {what}", out, code, (0, 0),
                                     hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE)]
    return Detection(det.group, det.state, det.how, det.partial, tuple(odd))


def hv_exits_verdict(results: list[tuple[str, hyperv.HcallOutcome]]) -> Detection:
    """Present when any P06-P08 code exits; the codes that do not are the partial backport's gap."""
    def said(pairs: list[tuple[str, hyperv.HcallOutcome]]) -> str:
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
            out = hyperv.hypercall(hyperv.build_hv_machine(vm), hvtlfs.control(code, fast=True), 0, 0, xmm=XMM_PATTERN)
        what = f"fast {code:#06x} with XMM0-5 loaded"
        fallback = f" (fallback: fast {', '.join(seen)} stayed in the kernel)" if seen else ""
        if out.exited:
            return xmm_verdict(f"{what}: {out}", out.xmm, fallback)
        if not out.completed:
            return Detection("xmm_output", UNKNOWN, f"{what}: {out}{fallback}")
        seen.append(f"{code:#06x}")
    how = f"no fast XMM-fast code of the series exits ({', '.join(seen)} complete in the kernel)"
    if advertised_hv_bits().get("HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE"):
        return Detection("xmm_output", UNKNOWN, f"{how}, yet 0x40000003 EDX bit 15 (XMM output) is advertised: "
                                                "P01 without P06/P07/P18 cannot be observed")
    return Detection("xmm_output", ABSENT, f"{how} and 0x40000003 EDX bit 15 (XMM output) is not advertised")


def xmm_verdict(what: str, xmm: list[hyperv.Xmm], fallback: str = "") -> Detection:
    """Present when hcall.xmm holds XMM0-5; some of them but not all contradicts both P01 and upstream (97)."""
    wrong = [i for i in range(6) if tuple(xmm[i]) != XMM_PATTERN[i]]
    if not wrong:
        return Detection("xmm_output", PRESENT, f"{what}, hcall.xmm captured{fallback}")
    if len(wrong) == 6:
        return Detection("xmm_output", ABSENT, f"{what}, hcall.xmm not written{fallback}")
    seen = ", ".join(f"xmm[{i}] {xmm[i][0]:#x}/{xmm[i][1]:#x}" for i in wrong)
    return Detection("xmm_output", PRESENT, f"{what}, hcall.xmm captured but for {seen}{fallback}",
                     deviations=(deviation("xmm_output", "97", f"{what}: {seen}",
                                           "hcall.xmm[0-5] = guest XMM0-5 (P01), or none written (upstream)"),))


def _mp_state(kvm: Kvm) -> Detection:
    with kvm.create_vm() as vm:
        hvm = hyperv.build_hv_machine(vm, VSM)
        ret, err = hvm.vcpu.set_mp_state_raw(uapi.KVM_MP_STATE_HV_INACTIVE_VTL)
        state, _ = hvm.vcpu.get_mp_state_raw()
    return mp_state_verdict(ret, err, state)


def mp_state_verdict(ret: int, err: int, state: int) -> Detection:
    """Present when state 11 is accepted; then KVM_GET_MP_STATE reads 11, else only EINVAL is upstream (125)."""
    how = f"KVM_SET_MP_STATE(11) on a VSM vCPU: {'0' if ret == 0 else uapi.errno_name(err)}"
    odd: tuple[str, ...] = ()
    if ret == 0 and state != uapi.KVM_MP_STATE_HV_INACTIVE_VTL:
        how += f", then KVM_GET_MP_STATE read {state}"
        odd = (deviation("mp_inactive_vtl", "125", how, "KVM_GET_MP_STATE reads 11"),)
    elif ret != 0 and err != errno.EINVAL:
        odd = (deviation("mp_inactive_vtl", "125", how, "0 (series) or EINVAL (upstream)"),)
    return Detection("mp_inactive_vtl", PRESENT if ret == 0 else ABSENT, how, deviations=odd)


PROBES: dict[str, Callable[[Kvm], Detection]] = {
    "rwx_attributes": _attributes,
    "attr_tracepoints": _tracepoints,
    "fault_rwx_flags": _fault_flags,
    "fault_insn_len": _fault_insn_len,
    "hv_exits": _hv_exits,
    "vsm_hcalls": _hv_probe("vsm_hcalls", hyperv.CpuidBits(), hvtlfs.HVCALL_VTL_CALL, 0, 0, "80, 81",
                            hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE, "slow VtlCall (0x11)"),
    "xmm_output": _xmm_output,
    "vtl_ipi": _hv_probe("vtl_ipi", VSM, hvtlfs.control(hvtlfs.HVCALL_SEND_IPI, fast=True),
                         0x30 | (1 << 36), 1, "111", hvtlfs.HV_STATUS_INVALID_HYPERCALL_INPUT,
                         "VSM vCPU, fast SendSyntheticClusterIpi with use_target_vtl"),
    "mp_inactive_vtl": _mp_state,
}


def crashed_probes(titles: dict[str, str]) -> None:
    """Groups whose probe crashed the kernel on an earlier boot (group -> crash title): never probed again."""
    _crashed.clear()
    _crashed.update(titles)


def detect(group: str) -> Detection:
    """Detect one group on the KVM under test, unless its probe crashed the kernel before."""
    if group in _crashed:
        return Detection(group, CRASHED, f"its detection probe crashed the kernel on an earlier boot: {_crashed[group]}")
    return _probe(group)


@functools.cache
def _probe(group: str) -> Detection:
    """Run one group's probe (cached per process)."""
    try:
        with Kvm() as kvm:
            return PROBES[group](kvm)
    except Unavailable as e:
        return Detection(group, UNKNOWN, str(e))


def detect_all() -> dict[str, Detection]:
    return {key: detect(key) for key in GROUPS}


# --- capability numbers a port had to move ---------------------------------------------------------------

CAP_NUMBERS_ENV = "KVMTESTS_CAP_NUMBERS"
# The series' capabilities by the name --cap-number takes: (the series' number, the group it announces).
SERIES_CAPS = {"fault_exit_insn_len": (uapi.KVM_CAP_FAULT_EXIT_INSN_LEN, "fault_insn_len")}


def parse_cap_numbers(spec: str | list[str] | None) -> dict[str, int]:
    """--cap-number / KVMTESTS_CAP_NUMBERS ('name=N', comma separated or repeated): numbers a port of the series chose."""
    words = spec if isinstance(spec, list) else [spec or ""]
    out: dict[str, int] = {}
    for item in (w for word in words for w in word.replace(",", " ").split()):
        name, _, number = item.partition("=")
        if name not in SERIES_CAPS:
            raise ValueError(f"unknown capability {name!r} in {item!r}; known: {', '.join(SERIES_CAPS)}")
        try:
            out[name] = int(number, 0)
        except ValueError:
            raise ValueError(f"{item!r}: the capability number must be an integer, e.g. {name}=240") from None
    return out


def cap_option(name: str) -> str:
    """How a user names a port's number for `name`, in words for messages."""
    return f'--cap-number {name}=N (env {CAP_NUMBERS_ENV}="{name}=N")'


@functools.cache
def pre_fault_memory_implemented() -> bool | None:
    """KVM_PRE_FAULT_MEMORY (v6.11, which took capability 236) reads its struct: a NULL argument gets EFAULT,
    where a kernel without the ioctl answers ENOTTY or EINVAL (x86's default for an unknown vCPU ioctl).
    None without a KVM device to ask."""
    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            _, err = uapi.ioctl(vm.create_vcpu(0).fd, uapi.KVM_PRE_FAULT_MEMORY, 0)
    except Unavailable:
        return None
    return err not in (errno.ENOTTY, errno.EINVAL)


@dataclass(frozen=True)
class CapNumber:
    """The number a series capability has on the kernel under test (None: cannot be told), and why."""

    number: int | None
    why: str


def cap_number(name: str, named: dict[str, int], pre_fault: bool | None) -> CapNumber:
    """The user's number for a port, else the series' own where nothing upstream took it (236 before v6.11)."""
    series_number = SERIES_CAPS[name][0]
    if name in named:
        return CapNumber(named[name], f"{named[name]}, named for this port with {cap_option(name)}")
    if pre_fault is False:
        return CapNumber(series_number, f"{series_number}, the series' number (the kernel has no KVM_PRE_FAULT_MEMORY, "
                                        f"which took {series_number} in v6.11)")
    return CapNumber(None, f"cannot be checked: the kernel implements KVM_PRE_FAULT_MEMORY, so {series_number} is "
                           f"KVM_CAP_PRE_FAULT_MEMORY, and a port of the series numbers KVM_CAP_FAULT_EXIT_INSN_LEN "
                           f"otherwise: name that number with {cap_option(name)}")


def findings(detections: dict[str, Detection], cap_numbers: dict[str, int]) -> list[str]:
    """Everything the summary reports besides the table: partial backports, probes that saw a deviation, a
    present group whose capability number cannot be checked."""
    out = partial_backport(detections)
    out += list(dict.fromkeys(d for det in detections.values() for d in det.deviations))
    for name, (_, group) in SERIES_CAPS.items():
        det = detections.get(group)
        if det is not None and det.present and name not in cap_numbers:
            pre_fault = pre_fault_memory_implemented()
            if pre_fault:
                out.append(f"{group} ({GROUPS[group].patches}) is present, but its capability "
                           f"{cap_number(name, cap_numbers, pre_fault).why}")
    return out


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
                entries, err = vm.create_vcpu(0).supported_hv_cpuid_raw()
    except Unavailable:
        return {}
    leaf = next((e for e in entries if e["function"] == hvtlfs.HYPERV_CPUID_FEATURES), None)
    if err or leaf is None:
        return {}
    return {"HV_ACCESS_VSM": bool(leaf["ebx"] & hvtlfs.HV_ACCESS_VSM),
            "HV_ACCESS_VP_REGISTERS": bool(leaf["ebx"] & hvtlfs.HV_ACCESS_VP_REGISTERS),
            "HV_START_VIRTUAL_PROCESSOR": bool(leaf["ebx"] & hvtlfs.HV_START_VIRTUAL_PROCESSOR),
            "HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE": bool(leaf["edx"] & hvtlfs.HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE)}
