"""Detection on crafted observations (no kernel): probes that see a deviation give a finding naming the group, the
catalog number and the observed value; a fallback shows in the summary; moved capability numbers are named."""
import errno
from contextlib import nullcontext

import pytest

from kvmtests import hvtlfs, uapi
from kvmtests.machine import guest, host, hyperv
from kvmtests.verdict import features, report
from kvmtests.verdict.features import Detection

pytestmark = pytest.mark.selftest
READ, WRITE, PRIVATE = (uapi.KVM_MEMORY_EXIT_FLAG_READ, uapi.KVM_MEMORY_EXIT_FLAG_WRITE,
                        uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)


@pytest.mark.parametrize("way,flags,gpa,size,byte56,catalog,observed", [
    (features.NW_WRITE, READ, guest.DATA_GPA, 0x1000, 0, "36, 56, 60, 62", "flags READ"),
    (features.NW_WRITE, WRITE | PRIVATE, guest.DATA_GPA, 0x1000, 0, "36, 56, 60, 62", "flags WRITE|PRIVATE"),
    (features.PRIVATE_READ, PRIVATE | WRITE, guest.DATA_GPA, 0x1000, 0xA5, "59, 62", "flags WRITE|PRIVATE"),
    (features.NW_WRITE, WRITE, guest.DATA_GPA + 0x123, 0x1000, 0, "37", "gpa 0x200123"),
    (features.NW_WRITE, WRITE, guest.DATA_GPA, 0, 0, "38", "size 0x0"),
    (features.PRIVATE_READ, PRIVATE, guest.DATA_GPA, 0x1000, 0x20, "67", "insn_len 32"),
])
def test_fault_probe_deviation_is_a_finding(way, flags, gpa, size, byte56, catalog, observed):
    found = features.fault_deviations(way, flags, gpa, size, byte56)
    assert len(found) == 1 and f"probe contradicts catalog {catalog}: {way.what}: {observed}" in found[0], found


@pytest.mark.parametrize("way,byte56,catalog", [(features.NW_WRITE, 0, "63"), (features.PRIVATE_READ, 2, "65")])
def test_fault_probe_length_off_on_intel_ept_is_a_finding(way, byte56, catalog):
    """Where the CPU reports the length (Intel EPT), P11 writes exactly the probe instruction's 3 bytes."""
    flags = way.access | way.extra
    found = features.fault_deviations(way, flags, guest.DATA_GPA, 0x1000, byte56, exact=3)
    assert len(found) == 1 and f"probe contradicts catalog {catalog}: {way.what}: insn_len {byte56}" in found[0], found
    assert features.fault_deviations(way, flags, guest.DATA_GPA, 0x1000, 3, exact=3) == ()
    assert features.fault_deviations(way, flags, guest.DATA_GPA, 0x1000, 0xA5, exact=3) == ()


@pytest.mark.parametrize("way,flags,byte56", [(features.NW_WRITE, WRITE, 0), (features.NW_WRITE, 0, 0xA5),
                                              (features.PRIVATE_READ, PRIVATE | READ, 15),
                                              (features.PRIVATE_READ, PRIVATE, 0xA5)])
def test_fault_probe_as_specified_is_no_finding(way, flags, byte56):
    assert features.fault_deviations(way, flags, guest.DATA_GPA, 0x1000, byte56) == ()


def fallback_probe(monkeypatch, nw_write: object) -> features.FaultSeen:
    """_fault_probe on a kernel that accepts NW, offers SW_PROTECTED, and gives `nw_write` for the NW write."""
    class FakeKvm:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def check_extension(self, cap):
            return 1 << uapi.KVM_X86_SW_PROTECTED_VM

        def create_vm(self, vm_type=0):
            return nullcontext(type("FakeVm", (), {"set_memory_attributes_raw": lambda *a: (0, 0)})())

    seen = {features.NW_WRITE.what: nw_write,
            features.PRIVATE_READ.what: features.FaultSeen(PRIVATE | READ, 0, features.PRIVATE_READ.what)}
    monkeypatch.setattr(features, "Kvm", FakeKvm)
    monkeypatch.setattr(features, "_attributes", lambda kvm: Detection("rwx_attributes", features.PRESENT, "NW: 0"))
    monkeypatch.setattr(guest, "build_machine", lambda vm, payload, entry: None)
    monkeypatch.setattr(guest, "load_payload", lambda name: None)
    monkeypatch.setattr(features, "_fault_exit", lambda m, way: seen[way.what])
    probe = features._fault_probe.__wrapped__()
    monkeypatch.setattr(features, "_fault_probe", lambda: probe)
    return probe


def test_detection_fallback_shows_in_the_summary(monkeypatch):
    """NW accepted but the write did not exit: the private-page read detects P09/P11, the summary says so and
    names the failed probe as a catalog 35 finding."""
    failed = "write to an NW page gave exit KVM_EXIT_IO port 0xe9, not a memory-fault exit"
    fallback_probe(monkeypatch, failed)
    monkeypatch.setattr(features, "advertised_hv_bits", lambda: {})
    detections = {k: Detection(k, features.ABSENT, "") for k in features.GROUPS}
    detections |= {"fault_rwx_flags": features._fault_flags(None), "fault_insn_len": features._fault_insn_len(None)}
    assert detections["fault_rwx_flags"].how == f"{features.PRIVATE_READ.what}: flags READ|PRIVATE (fallback: {failed})"
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: False)
    doc = report.build({"kernel": "crafted"}, detections, features.findings(detections, {}), [], [], 0)
    text = report.render(doc)
    assert f"(fallback: {failed})" in text
    assert text.count("finding: rwx_attributes (P12-P16) probe contradicts catalog 35: " + failed) == 1


def test_no_fallback_without_a_failed_probe(monkeypatch):
    probe = fallback_probe(monkeypatch, features.FaultSeen(WRITE, 0, features.NW_WRITE.what))
    assert (probe.what, probe.fallback, probe.deviations) == (features.NW_WRITE.what, "", ())
    assert "fallback" not in features._fault_flags(None).how


@pytest.mark.parametrize("ret,err,shown", [(0, 0, "KVM_RUN returned 0"), (-1, errno.EINTR, "KVM_RUN returned -1 (EINTR)")],
                         ids=["ret-0", "eintr"])
def test_fault_probe_exit_needs_minus_one_efault(monkeypatch, crafted_vcpu, ret, err, shown):
    """Exit 39 with another return is no memory-fault exit (35): the finding shows what KVM_RUN gave and the triple."""
    monkeypatch.setattr(host, "intel_ept", lambda: False)
    fields = {"flags": WRITE, "gpa": guest.DATA_GPA, "size": 0x1000, "insn_len": 0}

    def exit_of(ret: int, err: int, reason: int) -> features.FaultSeen | str:
        vcpu = crafted_vcpu(ret, err, reason, **fields)
        return features._fault_exit(guest.Machine(None, None, None, vcpus=[vcpu]), features.NW_WRITE)
    assert exit_of(-1, errno.EFAULT, uapi.KVM_EXIT_MEMORY_FAULT) == features.FaultSeen(WRITE, 0, features.NW_WRITE.what)
    probe = fallback_probe(monkeypatch, exit_of(ret, err, uapi.KVM_EXIT_MEMORY_FAULT))
    assert probe.deviations == (
        f"rwx_attributes (P12-P16) probe contradicts catalog 35: write to an NW page gave {shown}, KVM_EXIT_MEMORY_FAULT: "
        "flags WRITE gpa 0x200000 size 0x1000 insn_len(byte 56) 0 at RIP 0x101000, not a memory-fault exit (KVM_RUN "
        "-1/EFAULT, exit 39); expected KVM_RUN -1/EFAULT with exit 39",)


EXIT = hyperv.HcallOutcome(exited=True, input=hvtlfs.HVCALL_VTL_CALL, params=(0, 0))


@pytest.mark.parametrize("out,finding", [
    (EXIT, None),
    (hyperv.HcallOutcome(completed=True, rax=hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE), None),
    (hyperv.HcallOutcome(exited=True, input=0x12, params=(0, 0)), "input 0x12"),
    (hyperv.HcallOutcome(completed=True, rax=hyperv.RAX_SENTINEL), "RAX unchanged"),
    (hyperv.HcallOutcome(completed=True, rax=0), "RAX 0x0 (SUCCESS)"),
])
def test_hypercall_probe_deviation_is_a_finding(out, finding):
    found = features.hcall_deviations("vsm_hcalls", "80, 81", "slow VtlCall (0x11)", out, hvtlfs.HVCALL_VTL_CALL,
                                      (0, 0), hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE)
    if finding is None:
        assert found == ()
    else:
        assert len(found) == 1 and found[0].startswith("vsm_hcalls (P18) probe contradicts catalog 80, 81: ") \
            and finding in found[0], found


def test_ipi_ignoring_use_target_vtl_is_a_finding():
    """The IPI delivered in the kernel (RAX 0) is neither the series' exit nor upstream's status 3 (catalog 111)."""
    found = features.hcall_deviations("vtl_ipi", "111", "fast 0x0b", hyperv.HcallOutcome(completed=True, rax=0),
                                      0x1000B, (0x30 | 1 << 36, 1), hvtlfs.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert found and "catalog 111" in found[0] and "RAX 0x0 (SUCCESS)" in found[0]


def test_xmm_output_missing_a_register_is_a_finding():
    xmm = list(features.XMM_PATTERN[:5]) + [(0, 0)]
    det = features.xmm_verdict("fast 0x0050", xmm)
    assert det.state == features.PRESENT and len(det.deviations) == 1
    assert "catalog 97: fast 0x0050: xmm[5] 0x0/0x0" in det.deviations[0]
    assert features.xmm_verdict("fast 0x0050", list(features.XMM_PATTERN)).deviations == ()
    assert features.xmm_verdict("fast 0x0050", [(0, 0)] * 6).state == features.ABSENT


@pytest.mark.parametrize("ret,err,state,finding", [(0, 0, 11, False), (-1, errno.EINVAL, 0, False),
                                                   (0, 0, 0, True), (-1, errno.EPERM, 0, True)])
def test_mp_state_probe(ret, err, state, finding):
    det = features.mp_state_verdict(ret, err, state)
    assert bool(det.deviations) == finding and all("catalog 125" in d for d in det.deviations)


def test_findings_list_each_deviation_once(monkeypatch):
    monkeypatch.setattr(features, "advertised_hv_bits", lambda: {})
    line = features.deviation("fault_rwx_flags", "36", "write to an NW page: flags READ", "WRITE")
    detections = {k: Detection(k, features.PRESENT, "") for k in features.GROUPS}
    detections["fault_rwx_flags"] = Detection("fault_rwx_flags", features.PRESENT, "", deviations=(line,))
    detections["fault_insn_len"] = Detection("fault_insn_len", features.PRESENT, "", deviations=(line,))
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: False)
    assert features.findings(detections, {}) == [line]


# --- capability numbers a port moved (catalog 1, 3) ----------------------------------------------------

def test_cap_numbers_parse():
    assert features.parse_cap_numbers(["", "fault_exit_insn_len=240"]) == {"fault_exit_insn_len": 240}
    assert features.parse_cap_numbers("fault_exit_insn_len=0xf0") == {"fault_exit_insn_len": 240}
    for bad in ("insn_len=240", "fault_exit_insn_len=many"):
        with pytest.raises(ValueError):
            features.parse_cap_numbers(bad)


def test_present_group_without_a_checkable_number_is_a_finding(monkeypatch):
    monkeypatch.setattr(features, "advertised_hv_bits", lambda: {})
    detections = {k: Detection(k, features.PRESENT, "") for k in features.GROUPS}
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: True)
    found = features.findings(detections, {})
    assert len(found) == 1 and found[0].startswith("fault_insn_len (P10-P11) is present, but its capability cannot be "
                                                   "checked: the kernel implements KVM_PRE_FAULT_MEMORY")
    assert 'KVMTESTS_CAP_NUMBERS="fault_exit_insn_len=N"' in found[0] and "--cap-number fault_exit_insn_len=N" in found[0]
    assert features.findings(detections, {"fault_exit_insn_len": 240}) == []
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: False)
    assert features.findings(detections, {}) == [], "before v6.11 236 is the series' own number"
