"""The shared memory-fault check (memfault.expect_fault / check_fault) on crafted exits: every field, every row."""
import pytest

from kvmtests import uapi
from kvmtests.machine import hyperv, memfault
from kvmtests.machine.memfault import EXEC, PAGE, READ, WRITE, Fault, FaultRule, Outcome

pytestmark = pytest.mark.selftest
PAGE_A = 0x210000
INTEL, AMD, UPSTREAM = FaultRule(True, exact=True), FaultRule(True), FaultRule(False)


def outcome(fault: Fault, kind: str = WRITE, rule: FaultRule = AMD, gpa: int = PAGE_A + 0x120) -> Outcome:
    return Outcome(kind, gpa, False, None, fault, 0x101000, "memory fault", None if kind == EXEC else 3, rule)


def good(kind: str = WRITE, insn_len: int = 3) -> Fault:
    return Fault(memfault.FLAG_OF[kind], PAGE_A, PAGE, insn_len)


@pytest.mark.parametrize("rule,kind,insn_len", [(INTEL, WRITE, 3), (INTEL, EXEC, 15), (AMD, READ, 0), (AMD, WRITE, 15),
                                                (UPSTREAM, WRITE, memfault.SENTINEL), (FaultRule(True, shadow=True), WRITE, 0),
                                                (FaultRule(), READ, memfault.SENTINEL)])
def test_a_right_exit_passes(rule, kind, insn_len):
    assert memfault.expect_fault(outcome(good(kind, insn_len), kind, rule), kind, PAGE_A, 36) == good(kind, insn_len)


@pytest.mark.parametrize("wrong,field", [
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_READ, PAGE_A, PAGE, 3), "flags READ, expected WRITE"),
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE | uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_A, PAGE, 3), "flags WRITE|PRIVATE"),
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE, PAGE_A + 0x120, PAGE, 3), "gpa 0x210120, expected the page-aligned GPA 0x210000"),
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE, PAGE_A, 0, 3), "size 0x0, expected 0x1000"),
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE, PAGE_A, 2 * PAGE, 3), "size 0x2000, expected 0x1000"),
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE, PAGE_A, PAGE, 16), "insn_len 0x10, expected 0-15"),
    (Fault(uapi.KVM_MEMORY_EXIT_FLAG_WRITE, PAGE_A, PAGE, memfault.SENTINEL), "insn_len 0xa5, expected 0-15"),
])
def test_every_field_fails_the_row(wrong, field):
    """A wrong field fails whichever row provokes the exit, naming the row, the field and both values."""
    with pytest.raises(AssertionError, match=r"catalog 45.*" + field.replace("|", r"\|")):
        memfault.expect_fault(outcome(wrong), WRITE, PAGE_A, 45)


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


def test_prober_outcomes_carry_the_rule(monkeypatch):
    """What the prober returns is checked against the rule it was built with: a size-0 exit fails any row."""
    class FakeMachine:
        payload = {"mem_write": 0x1000, "mem_write_end": 0x1003}

        class vm:
            @staticmethod
            def region_for(gpa):
                raise KeyError(gpa)

        class vcpu:
            id = 0

            @staticmethod
            def get_regs():
                return type("Regs", (), {"rip": 0x101000})()

        def ucall(self, vcpu):
            return None

        def describe(self, vcpu):
            return "memory fault"

    machine = FakeMachine()
    machine.payload = type("P", (dict,), {"length": lambda self, a, b: self[b] - self[a]})(FakeMachine.payload)
    monkeypatch.setattr(memfault, "run_for_fault", lambda m, vcpu: (False, Fault(2, PAGE_A, 0, 3)))
    out = memfault.Prober(machine, INTEL).resume(WRITE, PAGE_A + 0x120)
    assert (out.rule, out.insn_length) == (INTEL, 3)
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
