"""The shared Hyper-V checks (machine/hvexits.py) on crafted exits: each field wrong on its own fails the row with the
field, the catalog row and both values, counted under the group whose patch provides the field."""
import pytest

from kvmtests import hvtlfs, uapi
from kvmtests.hvtlfs import status_name
from kvmtests.machine import hvexits, hyperv
from kvmtests.machine.hvexits import SENTINEL32, SENTINEL64, Wakeup, xmm_hex
from kvmtests.machine.hyperv import MXCSR_SEED, RAX_SENTINEL, XMM_SEED, XMM_SENTINEL, Call, HcallOutcome
from kvmtests.machine.kvm import Exit
from kvmtests.verdict import features

pytestmark = pytest.mark.selftest
RDX, R8, INSN = 0x1122334455667788, 0x0123456789ABCDEF, 0x1011F7
XMM_IN = [(0xA0A0A0A000000000 | i, 0xB0B0B0B000000000 | i) for i in range(6)]
XMM_OUT = [(0xC0C0C0C000000000 | i, 0xD0D0D0D000000000 | i) for i in range(6)]
FAST_GET = hvtlfs.control(hvtlfs.HVCALL_GET_VP_REGISTERS, fast=True)
OTHER_GPRS = ("rsi", "rdi", "rbp", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def call(control: int = FAST_GET, bits: int = 64) -> Call:
    """The registers hyperv.hypercall would set, each distinct so that a swap shows."""
    regs = {name: 0x1000 + i for i, name in enumerate(OTHER_GPRS)} | {
        "rbx": hyperv.RBX_SENTINEL, "rsp": 0x20000, "rip": 0x101100, "rflags": hyperv.RFLAGS_SEED}
    if bits == 64:
        regs |= {"rax": RAX_SENTINEL, "rcx": control, "rdx": RDX, "r8": R8}
    else:
        regs |= {"rdx": control >> 32, "rax": control & 0xFFFFFFFF, "rbx": RDX >> 32, "rcx": RDX & 0xFFFFFFFF,
                 "rdi": R8 >> 32, "rsi": R8 & 0xFFFFFFFF, "r8": 0}
    return Call(control, RDX, R8, list(XMM_IN), INSN, regs, bits)


def exited(c: Call, **wrong: object) -> HcallOutcome:
    """A right exit for `c` (P01 captured XMM0-5 where it must), with `wrong` fields replaced."""
    xmm = list(c.xmm) if c.fast else [XMM_SENTINEL] * 6
    return HcallOutcome(**{"call": c, "exited": True, "input": c.control, "params": (c.rdx, c.r8), "xmm": xmm, **wrong})


def resumed(c: Call, status: int, xmm: list | None = None, **wrong: object) -> HcallOutcome:
    """A right answer to `c` with `status`, as KVM's registers (after a userspace completion) and the guest saw it."""
    if c.bits == 32:
        written = {"rax": status & 0xFFFFFFFF, "rdx": status >> 32}
        return HcallOutcome(**{"call": c, "completed": True, **written, "completion": {**c.regs, "rip": INSN + 3, **written},
                               **wrong})
    return HcallOutcome(**{"call": c, "completed": True, "rax": status, "rcx": c.control, "rdx": c.rdx, "r8": c.r8,
                           "rflags": c.regs["rflags"], "xmm_after": list(xmm or c.xmm) + XMM_SEED, "mxcsr": MXCSR_SEED,
                           "completion": {**c.regs, "rip": INSN + 3, "rax": status}, **wrong})


def changed(values: list, i: int, new: object) -> list:
    return values[:i] + [new] + values[i + 1:]


def shown(name: str, value: int) -> str:
    """How a message shows a register: RAX decoded as a status."""
    return status_name(value) if name == "rax" else f"{value:#x}"


def expect_named(check: object, args: tuple, rows: str, field: str, observed: str, expected: str,
                 group: str | None) -> None:
    """`check` fails with the row, the field and both values, under `group` (None: as the row's own failure)."""
    with pytest.raises(AssertionError) as info:
        check(*args)
    text = str(info.value)
    assert text.startswith(f"catalog {rows}: ") and f" {field} {observed}, expected " in text, text
    assert expected in text.split(", expected ", 1)[1], text
    assert getattr(info.value, "group", None) == group, f"counted under {getattr(info.value, 'group', None)}: {text}"


# --- the exit ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,capture", [(call(), True), (call(), None), (call(hvtlfs.HVCALL_GET_VP_REGISTERS), False),
                                       (call(hvtlfs.HVCALL_VTL_CALL), None)])
def test_a_right_exit_passes(c, capture):
    hvexits.expect_exit(exited(c), 97, capture)


@pytest.mark.parametrize("c,group", [(call(), "hv_exits"), (call(hvtlfs.HVCALL_VTL_CALL), "vsm_hcalls"),
                                     (call(hvtlfs.control(hvtlfs.HVCALL_SEND_IPI, fast=True)), "vtl_ipi")])
def test_exit_input_and_params_count_under_the_codes_group(c, group):
    """The exit itself belongs to the patch that makes the code exit (hyperv.code_group)."""
    expect_named(hvexits.expect_exit, (exited(c, input=c.control | 1 << 27), 84, True), "84/81", "hcall.input",
                 f"{c.control | 1 << 27:#x}", f"{c.control:#x}", group)
    expect_named(hvexits.expect_exit, (exited(c, params=(0, R8)), 84, True), "84/82", "hcall.params",
                 f"0x0 {R8:#x}", f"{RDX:#x} {R8:#x}", group)
    expect_named(hvexits.expect_exit, (exited(c, params=(RDX, 0)), 84, True), "84/82", "hcall.params",
                 f"{RDX:#x} 0x0", f"{RDX:#x} {R8:#x}", group)


@pytest.mark.parametrize("i", range(6))
def test_each_captured_xmm_register_counts_under_p01(i):
    """Fast exit of an XMM-fast code with P01: hcall.xmm[i] is the guest's XMMi; off by one register fails every row."""
    shifted = changed(XMM_IN, i, XMM_IN[(i + 1) % 6])
    expect_named(hvexits.expect_exit, (exited(call(), xmm=shifted), 84, True), "84/97", f"hcall.xmm[{i}]",
                 xmm_hex(shifted[i]), xmm_hex(XMM_IN[i]), "xmm_output")


@pytest.mark.parametrize("c,capture,written,expected", [
    (call(hvtlfs.HVCALL_GET_VP_REGISTERS), True, XMM_IN[2], xmm_hex(XMM_SENTINEL)),   # slow: unwritten (100)
    (call(), False, XMM_IN[2], xmm_hex(XMM_SENTINEL)),                                # P01 absent: unwritten
    (call(), None, (0, 0), f"{xmm_hex(XMM_SENTINEL)} (the sentinel: unwritten without P01) or {xmm_hex(XMM_IN[2])}"),
])
def test_xmm_area_follows_p01_and_the_fast_bit(c, capture, written, expected):
    rows = "84/97" if c.fast else "84/100"
    expect_named(hvexits.expect_exit, (exited(c, xmm=changed([XMM_SENTINEL] * 6, 2, written)), 84, capture), rows,
                 "hcall.xmm[2]", xmm_hex(written), expected, "xmm_output")


def test_fast_exit_of_a_code_read_without_xmm_is_unchecked_with_p01():
    """Catalog 110: undefined there (its own row reports a leak); without P01 nothing may be written."""
    garbage = [(0xDEAD, 0xBEEF)] * 6
    c = call(hvtlfs.control(hvtlfs.HVCALL_VTL_CALL, fast=True))
    hvexits.expect_exit(exited(c, xmm=garbage), 110, True)
    expect_named(hvexits.expect_exit, (exited(c, xmm=garbage), 110, False), "110/97", "hcall.xmm[0]",
                 xmm_hex(garbage[0]), xmm_hex(XMM_SENTINEL), "xmm_output")


def test_no_exit_fails_the_row_itself():
    with pytest.raises(AssertionError, match="catalog 84: control 0x10050: expected KVM_EXIT_HYPERV/HCALL, got no "):
        hvexits.expect_exit(resumed(call(), 2), 84, True)


def test_probe_finding_names_the_field_and_its_group():
    """features' hypercall probes use the same check: a slow exit that wrote hcall.xmm is a P01 finding (100)."""
    out = HcallOutcome(exited=True, input=hvtlfs.HVCALL_VTL_CALL, xmm=[XMM_SENTINEL] * 5 + [(0, 0)])
    found = features.hcall_deviations("vsm_hcalls", "80, 81", "slow VtlCall (0x11)", out, hvtlfs.HVCALL_VTL_CALL,
                                      (0, 0), hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE)
    assert found == (features.deviation("xmm_output", "100", f"slow VtlCall (0x11): hcall.xmm[5] {xmm_hex((0, 0))}",
                                        f"{xmm_hex(XMM_SENTINEL)} (the sentinel: a slow exit leaves hcall.xmm "
                                        "unwritten (P01))"),), found


# --- the completion ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,status,xmm", [(call(), 0, XMM_OUT), (call(), 5, None), (call(hvtlfs.HVCALL_VTL_CALL),
                                                                                    RAX_SENTINEL, None),
                                          (call(hvtlfs.HVCALL_MODIFY_VTL_PROTECTION_MASK, bits=32), 0x100000005, None)])
def test_a_right_completion_passes(c, status, xmm):
    hvexits.expect_completion(resumed(c, status, xmm), 84, status, xmm)


@pytest.mark.parametrize("name", hyperv.REG_NAMES)
def test_each_register_kvm_holds_after_completion(name):
    """KVM_GET_REGS after the completion: RIP + 3, RAX the status, every other register as the guest issued it."""
    c = call()
    out = resumed(c, 5)
    good = out.completion[name]
    out.completion = {**out.completion, name: good ^ 0x100}
    expect_named(hvexits.expect_completion, (out, 84, 5), "84", f"{name.upper()} after completion (KVM_GET_REGS)",
                 shown(name, good ^ 0x100), shown(name, good), "hv_exits")


def test_32bit_completion_writes_edx_eax():
    c = call(hvtlfs.HVCALL_MODIFY_VTL_PROTECTION_MASK, bits=32)
    out = resumed(c, 0x100000005)
    out.completion = {**out.completion, "rdx": 0}
    expect_named(hvexits.expect_completion, (out, 86, 0x100000005), "86", "RDX after completion (KVM_GET_REGS)",
                 "0x0", "0x1", "vsm_hcalls")
    expect_named(hvexits.expect_completion, (resumed(c, 0x100000005, rdx=0), 86, 0x100000005), "86", "guest RDX",
                 "0x0", "0x1", "vsm_hcalls")


GUEST_GPRS = ["rax", "rcx", "rdx", "r8", "rflags"]


@pytest.mark.parametrize("name", GUEST_GPRS)
def test_each_guest_register_after_completion(name):
    """What the guest saw after resuming: the status in RAX, RCX/RDX/R8/RFLAGS as issued (a cleared R8 fails)."""
    c = call()
    good = getattr(resumed(c, 5), name)
    expect_named(hvexits.expect_completion, (resumed(c, 5, **{name: good ^ 0x100}), 84, 5), "84",
                 f"guest {name.upper()}", shown(name, good ^ 0x100), shown(name, good), "hv_exits")


@pytest.mark.parametrize("i", range(16))
def test_each_guest_xmm_register_after_completion(i):
    """XMM0-5: written back or unchanged as the row says; XMM6-15: never touched (P01 writes six registers)."""
    c = call()
    want = (XMM_OUT + XMM_SEED)[i]
    after = changed(XMM_OUT + XMM_SEED, i, (want[0], ~want[1] & (2**64 - 1)))
    expect_named(hvexits.expect_completion, (resumed(c, 0, XMM_OUT, xmm_after=after), 101, 0, XMM_OUT), "101",
                 f"guest XMM{i}", xmm_hex(after[i]), xmm_hex(want), "xmm_output")


def test_guest_mxcsr_after_completion():
    expect_named(hvexits.expect_completion, (resumed(call(), 0, XMM_OUT, mxcsr=0x1F80), 101, 0, XMM_OUT), "101",
                 "guest MXCSR", "0x1f80", f"{MXCSR_SEED:#x}", "xmm_output")


def test_failed_completion_fails_the_row_itself():
    with pytest.raises(AssertionError, match="catalog 84: completing the exit of control 0x10050 failed"):
        hvexits.expect_completion(HcallOutcome(call(), detail="KVM_RUN -1 (EFAULT)"), 84, 5)


# --- the in-kernel answer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GUEST_GPRS)
def test_in_kernel_answer_registers_are_the_rows_own(name):
    """No exit: a wrong register is the row's failure (no exit patch took part)."""
    c = call(hvtlfs.HVCALL_GET_VP_REGISTERS)
    good = getattr(resumed(c, 2), name)
    expect_named(hvexits.expect_status, (resumed(c, 2, **{name: good ^ 0x100}), 80, 2), "80", f"guest {name.upper()}",
                 shown(name, good ^ 0x100), shown(name, good), None)


def test_in_kernel_answer_xmm_fails_the_row_itself():
    """The kernel's own fast-call XMM input path predates P01: a clobbered XMM there is the row's failure."""
    c = call(hvtlfs.HVCALL_GET_VP_REGISTERS)
    after = changed(XMM_IN + XMM_SEED, 9, (0, 0))
    expect_named(hvexits.expect_status, (resumed(c, 2, xmm_after=after), 80, 2), "80", "guest XMM9", xmm_hex((0, 0)),
                 xmm_hex(XMM_SEED[3]), None)
    expect_named(hvexits.expect_status, (resumed(c, 2, mxcsr=0), 80, 2), "80", "guest MXCSR", "0x0",
                 f"{MXCSR_SEED:#x}", None)


def test_an_exit_where_none_was_expected_fails_the_row():
    with pytest.raises(AssertionError, match=r"catalog 80: control 0x50: expected no exit and RAX 0x2 "):
        hvexits.expect_status(exited(call(hvtlfs.HVCALL_GET_VP_REGISTERS)), 80, 2)


# --- the WAKEUP exit ---------------------------------------------------------------------------------------------

def wakeup(**wrong: object) -> Wakeup:
    """A right WAKEUP exit of a vCPU in state 11 with an MSI (vector 0x30) pending, `wrong` fields replaced."""
    right = dict(ret=0, reason=uapi.KVM_EXIT_SYSTEM_EVENT, type=uapi.KVM_SYSTEM_EVENT_WAKEUP,
                 ndata=SENTINEL32, data=[SENTINEL64] * 16, described="KVM_RUN returned 0", before=(0x101000, 0x2),
                 after=(0x101000, 0x2), mp_state=uapi.KVM_MP_STATE_HV_INACTIVE_VTL, irr=frozenset({0x30}),
                 isr=frozenset())
    return Wakeup(**(right | wrong))


def test_a_right_wakeup_passes():
    hvexits.expect_wakeup(wakeup(), 127, "state 11, MSI pending", 0x30)
    hvexits.expect_wakeup(wakeup(irr=frozenset()), 131, "state 11, NMI pending", None)


@pytest.mark.parametrize("wrong,rows,field,observed,expected", [
    ({"ret": -1, "described": "watchdog timeout"}, "127/126", "KVM_RUN", "-1 (watchdog timeout)", "0"),
    ({"reason": uapi.KVM_EXIT_IO}, "127/126", "exit_reason", "2 (KVM_EXIT_IO)", "24 (KVM_EXIT_SYSTEM_EVENT)"),
    ({"type": 1}, "127/126", "system_event.type", "0x1", "4 (WAKEUP)"),
    ({"ndata": 0}, "127/134", "system_event.ndata", "0x0", f"{SENTINEL32:#x}"),
    ({"data": changed([SENTINEL64] * 16, 15, 0)}, "127/134", "system_event.data[15]", "0x0", f"{SENTINEL64:#x}"),
    ({"mp_state": 0}, "127", "KVM_GET_MP_STATE", "0", "11"),
    ({"after": (0x101003, 0x2)}, "127", "RIP", "0x101003", "0x101000"),
    ({"after": (0x101000, 0x202)}, "127", "RFLAGS", "0x202", "0x2"),
    ({"irr": frozenset()}, "127", "LAPIC IRR", "none", "0x30"),
    ({"irr": frozenset({0x30, 0xEF})}, "127", "LAPIC IRR", "0x30, 0xef", "0x30"),
    ({"isr": frozenset({0x30})}, "127", "LAPIC ISR", "0x30", "none"),
], ids=["ret", "reason", "type", "ndata", "data", "state", "rip", "rflags", "irr-empty", "irr-extra", "isr"])
def test_each_wakeup_field_counts_under_p05(wrong, rows, field, observed, expected):
    expect_named(hvexits.expect_wakeup, (wakeup(**wrong), 127, "state 11, MSI pending", 0x30), rows, field, observed,
                 expected, "mp_inactive_vtl")


def test_wakeup_message_says_rflags_if():
    """P05 must ignore RFLAGS.IF (TLFS 12.12.2.1): every WAKEUP failure says which IF the row had."""
    with pytest.raises(AssertionError, match=r"catalog 126: state 11, MSI pending, RFLAGS\.IF = 1: system_event\.type"):
        hvexits.expect_wakeup(wakeup(type=0, before=(0x101000, 0x202), after=(0x101000, 0x202)), 126,
                              "state 11, MSI pending", 0x30)


# --- sentinels before every run ----------------------------------------------------------------------------------

class FakeVcpu:
    """A vCPU whose KVM_RUN first records whether the fields the row reads held their sentinels, then writes `exit`."""

    def __init__(self, exit: dict[str, object]):
        self.run_struct = uapi.ffi.new("struct kvm_run *")
        self.exit, self.saw, self.last_exit = exit, {}, None

    def set_run_bytes(self, offset: int, data: bytes) -> None:
        uapi.ffi.buffer(uapi.ffi.cast("char *", self.run_struct) + offset, len(data))[:] = data

    def run(self, timeout: float) -> object:
        run = self.run_struct
        self.saw = {"exit_reason": run.exit_reason, "hyperv": bytes(uapi.ffi.buffer(
            uapi.ffi.cast("char *", run) + hyperv.HYPERV_EXIT[0], hyperv.HYPERV_EXIT[1])),
            "system_event": (run.x.system_event.type, run.x.system_event.ndata, list(run.x.system_event.data))}
        for path, value in self.exit.items():
            *parents, name = path.split(".")
            target = run
            for part in parents:
                target = getattr(target, part)
            setattr(target, name, value)
        self.last_exit = Exit(0, 0, run.exit_reason)
        return self.last_exit

    def get_regs(self) -> object:
        return uapi.ffi.new("struct kvm_regs *", {"rip": 0x101000, "rflags": 0x2})

    def get_lapic(self) -> bytes:
        return bytes(1024)

    def get_mp_state_raw(self) -> tuple[int, int]:
        return (uapi.KVM_MP_STATE_HV_INACTIVE_VTL, 0)


def test_hypercall_run_starts_from_sentinels():
    """A kernel that leaves hcall.params unwritten fails on the sentinel, not on a stale value that happens to match."""
    vcpu = FakeVcpu({"exit_reason": uapi.KVM_EXIT_HYPERV, "x.hyperv.type": uapi.KVM_EXIT_HYPERV_HCALL,
                     "x.hyperv.u.hcall.input": hvtlfs.HVCALL_GET_VP_REGISTERS})
    machine = type("M", (), {"vcpu": vcpu, "ucall": lambda self: None, "describe": lambda self: "crafted"})()
    hvm = hyperv.HvMachine(machine, False, call=call(hvtlfs.HVCALL_GET_VP_REGISTERS))
    out = hyperv._observe(hvm, 1.0)
    assert vcpu.saw["exit_reason"] == hyperv.EXIT_REASON_SENTINEL
    assert vcpu.saw["hyperv"] == bytes([hyperv.SENTINEL]) * hyperv.HYPERV_EXIT[1]
    sentinel = int.from_bytes(bytes([hyperv.SENTINEL]) * 8, "little")
    expect_named(hvexits.expect_exit, (out, 82, None), "82", "hcall.params", f"{sentinel:#x} {sentinel:#x}",
                 f"{RDX:#x} {R8:#x}", "hv_exits")


def test_wakeup_run_starts_from_sentinels():
    """observe_wakeup fills exit_reason and the whole system_event first; a kernel writing ndata = 0 is caught."""
    vcpu = FakeVcpu({"exit_reason": uapi.KVM_EXIT_SYSTEM_EVENT, "x.system_event.type": uapi.KVM_SYSTEM_EVENT_WAKEUP,
                     "x.system_event.ndata": 0})
    w = hvexits.observe_wakeup(vcpu)
    assert vcpu.saw["exit_reason"] == hyperv.EXIT_REASON_SENTINEL
    assert vcpu.saw["system_event"] == (SENTINEL32, SENTINEL32, [SENTINEL64] * 16)
    expect_named(hvexits.expect_wakeup, (w, 134, "state 11, MSI pending", None), "134", "system_event.ndata", "0x0",
                 f"{SENTINEL32:#x}", "mp_inactive_vtl")
