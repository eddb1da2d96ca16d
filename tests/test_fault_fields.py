"""The shared memory-fault checks (memfault.run_for_fault, check_fault, expect_fault, expect_done) on crafted exits:
each part wrong alone names itself, the row and both values, under its group."""
import dataclasses
import errno
from pathlib import Path

import pytest

from kvmtests import uapi
from kvmtests.machine import asm, guest, hyperv, memfault
from kvmtests.machine.memfault import EXEC, PAGE, READ, WRITE, Fault, FaultRule, FaultOutcome

pytestmark = pytest.mark.selftest
PAGE_A = 0x210000
INSN = 0x101000                                    # the accessing instruction
HELD = (0x0123456789ABCDEF).to_bytes(8, "little")  # what memory at the access holds
W, PRIVATE = uapi.KVM_MEMORY_EXIT_FLAG_WRITE, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
INTEL, AMD, UPSTREAM = FaultRule(True, exact=True), FaultRule(True), FaultRule(False)


def outcome(fault: Fault, kind: str = WRITE, rule: FaultRule = AMD, gpa: int = PAGE_A + 0x120, **wrong) -> FaultOutcome:
    """A denied access as the spec has it (RIP on the instruction, memory untouched) but for `wrong`."""
    at = gpa if kind == EXEC else INSN
    out = FaultOutcome(kind, gpa, False, None, fault, at, "memory fault", at, (HELD, HELD), None,
                       None if kind == EXEC else 3, rule)
    return dataclasses.replace(out, **wrong)


def good(kind: str = WRITE, insn_len: int = 3) -> Fault:
    return Fault(memfault.FLAG_OF[kind], PAGE_A, PAGE, insn_len)


@pytest.mark.parametrize("rule,kind,insn_len", [(INTEL, WRITE, 3), (INTEL, EXEC, 15), (AMD, READ, 0), (AMD, WRITE, 15),
                                                (UPSTREAM, WRITE, memfault.SENTINEL), (FaultRule(True, shadow=True), WRITE, 0),
                                                (FaultRule(), READ, memfault.SENTINEL)])
def test_a_right_exit_passes(rule, kind, insn_len):
    assert memfault.expect_fault(outcome(good(kind, insn_len), kind, rule), kind, PAGE_A, 36) == good(kind, insn_len)


# (the wrong part, the group it counts under (None: the row's own assertion), what the message says)
WRONG = [
    pytest.param({"fault": Fault(uapi.KVM_MEMORY_EXIT_FLAG_READ, PAGE_A, PAGE, 3)}, "fault_rwx_flags",
                 "flags READ, expected WRITE", id="flags"),
    pytest.param({"fault": Fault(W | PRIVATE, PAGE_A, PAGE, 3)}, "fault_rwx_flags",
                 r"flags WRITE\|PRIVATE, expected WRITE", id="flags-private"),
    pytest.param({"fault": Fault(W, PAGE_A + 0x120, PAGE, 3)}, None,
                 "gpa 0x210120, expected the page-aligned GPA 0x210000", id="gpa"),
    pytest.param({"fault": Fault(W, PAGE_A, 0, 3)}, None, "size 0x0, expected 0x1000", id="size-0"),
    pytest.param({"fault": Fault(W, PAGE_A, 2 * PAGE, 3)}, None, "size 0x2000, expected 0x1000", id="size-2-pages"),
    pytest.param({"fault": Fault(W, PAGE_A, PAGE, 16)}, "fault_insn_len", "insn_len 0x10, expected 0-15",
                 id="insn_len"),
    pytest.param({"fault": Fault(W, PAGE_A, PAGE, memfault.SENTINEL)}, "fault_insn_len", "insn_len 0xa5, expected 0-15",
                 id="insn_len-sentinel"),
    pytest.param({"rip": INSN + 3}, "rwx_attributes", "RIP 0x101003, expected 0x101000, the faulting instruction",
                 id="rip-retired"),
    pytest.param({"memory": (HELD, (0x5A).to_bytes(8, "little"))}, "rwx_attributes",
                 "memory at 0x210120 0x5a, expected 0x123456789abcdef, untouched by the denied write", id="memory"),
]


@pytest.mark.parametrize("wrong,group,message", WRONG)
def test_every_part_fails_the_row_under_its_group(wrong, group, message):
    """A wrong part fails whichever row provokes the exit, naming the row, the part and both values; the flags,
    insn_len and what the denial did are counted under the group that provides them."""
    with pytest.raises(AssertionError, match=r"catalog 45\b.*" + message) as raised:
        memfault.expect_fault(dataclasses.replace(outcome(good()), **wrong), WRITE, PAGE_A, 45)
    assert getattr(raised.value, "group", None) == group


@pytest.mark.parametrize("wrong,message", [
    ({"rip": INSN}, "RIP 0x101000, expected 0x210800"),
    ({"memory": (HELD, bytes(8))}, "memory at 0x210800 0x0, expected 0x123456789abcdef, untouched by the denied exec")],
    ids=["rip-on-the-call", "memory"])
def test_an_execute_faults_on_its_target(wrong, message):
    """An execute's faulting instruction is the one it fetches: RIP on the target, not on the call."""
    out = outcome(good(EXEC), EXEC, gpa=PAGE_A + memfault.EXEC_OFFSET)
    assert memfault.expect_fault(out, EXEC, PAGE_A, 41) == good(EXEC)
    with pytest.raises(memfault.FieldMismatch, match="catalog 41: .*" + message):
        memfault.expect_fault(dataclasses.replace(out, **wrong), EXEC, PAGE_A, 41)


@pytest.mark.parametrize("wrong,message", [({"rip": INSN + 3}, "RIP 0x101003, expected 0x101000"),
                                           ({"memory": (HELD, bytes(8))}, "memory at 0x210120 0x0")],
                         ids=["rip", "memory"])
def test_a_private_exit_is_upstream_s_own(wrong, message):
    """Where a private/shared mismatch denied the access, its RIP and untouched memory are upstream's (core)."""
    private = Fault(PRIVATE | W, PAGE_A, PAGE, memfault.SENTINEL)
    with pytest.raises(memfault.FieldMismatch, match="catalog 60: .*" + message) as raised:
        memfault.expect_fault(outcome(private, rule=UPSTREAM, **wrong), WRITE, PAGE_A, 60, PRIVATE | W)
    assert raised.value.group == memfault.CORE


@pytest.mark.parametrize("rule,insn_len,expected", [(INTEL, 6, "expected 0x3"), (UPSTREAM, 0, "expected 0xa5"),
                                                    (FaultRule(True, shadow=True), 3, "expected 0x0")])
def test_insn_len_follows_the_rule(rule, insn_len, expected):
    """Intel EPT: the instruction's length (63); without P11 the sentinel survives (66 U:); shadow paging: 0 (70)."""
    with pytest.raises(AssertionError, match=f"insn_len {insn_len:#x}, {expected}"):
        memfault.expect_fault(outcome(good(WRITE, insn_len), WRITE, rule), WRITE, PAGE_A, 36)


def test_page_walk_exit_is_bounded_not_exact():
    """An exit on a page-table page (54/55) is not the instruction's own access: only the 15-byte bound applies."""
    walk = Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE, 0x8000, PAGE, 15)
    assert memfault.expect_fault(outcome(walk, READ, INTEL), WRITE, 0x8000, 55) == walk


def done(kind: str, value: int | None = None, after: bytes = HELD, written: int | None = None) -> FaultOutcome:
    """A completed access of `kind` that found HELD at its address and left `after`."""
    return FaultOutcome(kind, PAGE_A + 0x120, True, value, None, INSN + 3, "ucall SYNC", INSN, (HELD, after), written, 3,
                        AMD)


def test_a_right_completion_passes():
    memfault.expect_done(done(READ, int.from_bytes(HELD, "little")), 39)
    memfault.expect_done(done(WRITE, after=(5).to_bytes(8, "little"), written=5), 42)
    memfault.expect_done(done(EXEC), 40)


@pytest.mark.parametrize("out,message", [
    (done(READ, 0), "value read 0x0, expected 0x123456789abcdef, what memory at 0x210120 holds"),
    (done(WRITE, written=5), "memory at 0x210120 0x123456789abcdef, expected 0x5, the value the write stored")],
    ids=["read", "write"])
def test_a_wrong_completion_fails_under_the_attributes(out, message):
    """What a permitted access reads or leaves is P16's "allowed -> continues": rwx_attributes."""
    with pytest.raises(memfault.FieldMismatch, match="catalog 42: .*" + message) as raised:
        memfault.expect_done(out, 42)
    assert raised.value.group == "rwx_attributes"


def test_an_access_that_did_not_complete_fails_the_row():
    with pytest.raises(AssertionError, match="catalog 46: expected the write to complete; guest write of 0x210120: "
                                             "memory fault flags WRITE"):
        memfault.expect_done(outcome(good()), 46)


# --- the run: sentinels, and -1/EFAULT/exit 39 together --------------------------------------------------

def machine(vcpu: object, vm: object = None, payload: asm.Payload | None = None) -> guest.Machine:
    return guest.Machine(vm, payload, None, vcpus=[vcpu])


EXIT_39 = uapi.KVM_EXIT_MEMORY_FAULT
FIELDS = {"flags": W, "gpa": PAGE_A, "size": PAGE, "insn_len": 3}


@pytest.mark.parametrize("field,message", [("flags", r"flags READ\|EXEC\|0xa5a5a5a5a5a5a5a0, expected WRITE"),
                                           ("gpa", "gpa 0xa5a5a5a5a5a5a5a5, expected the page-aligned GPA 0x210000"),
                                           ("size", "size 0xa5a5a5a5a5a5a5a5, expected 0x1000"),
                                           ("insn_len", "insn_len 0xa5, expected 0-15")],
                         ids=["flags", "gpa", "size", "insn_len"])
def test_a_field_the_kernel_did_not_write_reads_as_the_sentinel(crafted_vcpu, field, message):
    """run_for_fault arms every field, so one left over from an earlier exit cannot pass for this exit's."""
    vcpu = crafted_vcpu(-1, errno.EFAULT, EXIT_39, **{k: v for k, v in FIELDS.items() if k != field})
    setattr(vcpu.run_struct.x.memory_fault, field, FIELDS[field])       # right, but stale
    fault = memfault.run_for_fault(machine(vcpu))
    with pytest.raises(AssertionError, match="catalog 36.*" + message):
        memfault.expect_fault(outcome(fault), WRITE, PAGE_A, 36)


def test_the_padding_after_insn_len_is_left_alone(crafted_vcpu):
    """Bytes 57-63 are no field the spec fixes (P11 table): neither filled nor read."""
    vcpu = crafted_vcpu(-1, errno.EFAULT, EXIT_39, **FIELDS)
    memfault.arm(vcpu)
    assert bytes(uapi.ffi.buffer(vcpu.run_struct))[57:64] == bytes(7)
    assert memfault.run_for_fault(machine(vcpu)) == Fault(W, PAGE_A, PAGE, 3)


@pytest.mark.parametrize("ret,err,reason", [(0, 0, EXIT_39), (-1, errno.EINTR, EXIT_39), (-1, errno.EFAULT, None),
                                            (-1, errno.EFAULT, uapi.KVM_EXIT_MMIO)],
                         ids=["ret-0", "eintr", "exit_reason-unwritten", "exit-mmio"])
def test_a_memory_fault_exit_needs_minus_one_efault_and_exit_39(crafted_vcpu, ret, err, reason):
    """Catalog 35: all three together; anything else is no memory-fault exit, whatever the fields hold."""
    assert memfault.run_for_fault(machine(crafted_vcpu(ret, err, reason, **FIELDS))) is None


def test_prober_outcomes_carry_what_the_checks_compare(monkeypatch, crafted_vcpu):
    """The prober records the rule, the instruction, what the write stores (RAX) and the memory before and after."""
    class FakeVm:
        def __init__(self) -> None:
            self.reads = [HELD, (0x5A).to_bytes(8, "little")]     # before the run, after it

        def read(self, gpa: int, length: int) -> bytes:
            return self.reads.pop(0)

        def region_for(self, gpa: int) -> None:
            raise KeyError(gpa)

    payload = asm.Payload("mem", 0x100000, b"", {"mem_write": INSN, "mem_write_end": INSN + 3}, Path("/nonexistent"))
    monkeypatch.setattr(memfault, "run_for_fault", lambda m, vcpu: Fault(W, PAGE_A, 0, 3))
    out = memfault.Prober(machine(crafted_vcpu(0, 0, None), FakeVm(), payload), INTEL).resume(WRITE, PAGE_A + 0x120)
    assert (out.rule, out.insn_length, out.insn_rip, out.written) == (INTEL, 3, INSN, 0x5A)
    assert out.memory == (HELD, (0x5A).to_bytes(8, "little"))
    with pytest.raises(AssertionError, match="catalog 58/38: .*size 0x0, expected 0x1000"):
        memfault.expect_fault(out, WRITE, PAGE_A, 58)


def test_known_deviation_seen_and_gone(known_deviation, marker_recorder):
    """Seen: strict xfail on v1's text alone. Gone: the unexpected pass says what the kernel does now."""
    request = marker_recorder
    deviation = type(known_deviation("x"))(request, "catalog 116 (known v1 deviation): exits to userspace")
    with pytest.raises(hyperv.KnownDeviation, match="exit KVM_EXIT_HYPERV"):
        deviation.seen("catalog 116: exit KVM_EXIT_HYPERV/HCALL input 0xb")
    (mark,) = request.markers
    assert mark.kwargs["raises"] is hyperv.KnownDeviation and mark.kwargs["reason"].startswith("catalog 116 (known")
    request.markers.clear()
    deviation.gone("catalog 116: now stays in the kernel: no exit, RAX 0x0 (SUCCESS)")
    (mark,) = request.markers
    assert mark.kwargs["strict"] and mark.kwargs["reason"].startswith("catalog 116: now stays in the kernel: no exit, RAX 0x0")
    assert "exits to userspace" not in mark.kwargs["reason"]
