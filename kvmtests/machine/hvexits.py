"""Whole-exit checks shared by every Hyper-V row: a hypercall's KVM_EXIT_HYPERV/HCALL, what the guest resumes with
after the call is answered (by userspace or in the kernel), and the WAKEUP exit of KVM_MP_STATE_HV_INACTIVE_VTL.
A row that provokes one of them gets every field checked, not only the one it is about. The checks take what the
driver observed (hyperv.HcallOutcome, Wakeup), so crafted observations test them without a kernel.

Expected values: spec section 2 (P01, P04, P05) and catalog 81, 82, 97, 100, 126, 127, 134; for the registers, the
TLFS's volatile registers (a hypercall changes RAX, or EDX:EAX, and the registers of its fast output only; rep calls
may change RCX, which KVM never does) with P01's completion (RAX or EDX:EAX, RIP + 3, and XMM0-5 for a successful
fast 0x50/0x52: nothing else).

Which group a wrong field is counted under (the group whose patch provides the behaviour):
- the exit's hcall.input and hcall.params, and after a userspace completion RIP, RFLAGS and every GPR: the code's
  group (hyperv.code_group: hv_exits P06-P08, vsm_hcalls P18, vtl_ipi P04);
- hcall.xmm (captured, or left unwritten) and XMM0-15 and MXCSR after a userspace completion: xmm_output (P01);
- an in-kernel answer's RAX, GPRs, XMM registers and MXCSR: the row's own group (nothing exited, so no exit patch
  is involved, and the kernel's fast-call XMM input path predates the series);
- the WAKEUP exit, the vCPU's state, RIP, RFLAGS and its LAPIC: mp_inactive_vtl (P05).

Left unchecked on purpose, where the spec fixes no value:
- hcall.result and pad1 at the exit: P01 lays them out, but only userspace writes result (for the completion);
- hcall.xmm of a fast exit whose code KVM reads no XMM for, once P01 is there: undefined (catalog 110, its own row);
- kvm_run.if_flag and ready_for_interrupt_injection on WAKEUP: api.rst defines if_flag only without an in-kernel
  LAPIC and ready_for_interrupt_injection only after request_interrupt_window, and every state-11 row has the
  in-kernel LAPIC (for its MSI, NMI or timer) and requests no window.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmtests import hvtlfs, uapi

from . import guest, hyperv, memfault
from .exits import describe
from .hyperv import RAX_SENTINEL, XMM_SEED, XMM_SENTINEL, Call, HcallOutcome, Xmm
from .kvm import Vcpu

SENTINEL32, SENTINEL64 = 0xA5A5A5A5, 0x5AA55AA55AA55AA5   # system_event before a state-11 run
XMM_OUTPUT, MP_STATE = "xmm_output", "mp_inactive_vtl"


@dataclass(frozen=True)
class Wrong:
    """One field against the spec: the group it counts under (None: the row's own), the catalog entry that fixes it
    when that is not the row, the field, and both values."""

    group: str | None
    entry: int | None
    field: str
    observed: str
    expected: str

    def message(self, n: int, what: str) -> str:
        rows = n if self.entry in (None, n) else f"{n}/{self.entry}"
        return f"catalog {rows}: {what}: {self.field} {self.observed}, expected {self.expected}"


class FieldMismatch(memfault.FieldMismatch):
    """A wrong Hyper-V exit or completion field: the plugin counts memfault's FieldMismatch under its group."""

    what = "Hyper-V exit or completion field"


def fail_first(wrong: list[Wrong], n: int, what: str) -> None:
    """The first wrong field fails the row: under its group, or as the row's own failure."""
    if not wrong:
        return
    first = wrong[0]
    if first.group is None:
        raise AssertionError(first.message(n, what))
    raise FieldMismatch(first.group, first.message(n, what))


def xmm_hex(reg: Xmm) -> str:
    """An XMM register as one 128-bit hex number (high half first)."""
    return f"{reg[1]:016x}{reg[0]:016x}"


def status_text(value: int) -> str:
    return "unchanged (sentinel)" if value == RAX_SENTINEL else hvtlfs.status_name(value)


def _reg_text(name: str, value: int) -> str:
    """A register for a message: RAX decoded as a hypercall status."""
    return status_text(value) if name == "rax" else f"{value:#x}"


# --- the exit ----------------------------------------------------------------------------------------------------

def exit_fields(out: HcallOutcome, call: Call, capture: bool | None) -> list[Wrong]:
    """Every checked field of a KVM_EXIT_HYPERV/HCALL against the call that made it; `capture`: P01 is there (True),
    is not (False), cannot be told (None)."""
    group = hyperv.code_group(call.code)
    wrong = []
    if out.input != call.control:
        wrong.append(Wrong(group, 81, "hcall.input", f"{out.input:#x}",
                           f"the guest's whole control word {call.control:#x}"))
    if out.params != (call.rdx, call.r8):
        wrong.append(Wrong(group, 82, "hcall.params", f"{out.params[0]:#x} {out.params[1]:#x}",
                           f"the guest's input and output parameters {call.rdx:#x} {call.r8:#x}"))
    return wrong + _xmm_capture(out.xmm, call, capture)


def _xmm_capture(xmm: list[Xmm], call: Call, capture: bool | None) -> list[Wrong]:
    """hcall.xmm: the guest's XMM0-5 on a fast exit of an XMM-fast code with P01 (97); the sentinel on a slow exit
    (100) or without P01; with P01, undefined on a fast exit of any other code (110), so unchecked there."""
    if call.fast and capture is not False and call.code not in hvtlfs.XMM_FAST_CODES:
        return []
    wrong = []
    for i, reg in enumerate(xmm):
        allowed = {}
        if not call.fast or capture is not True:
            allowed[XMM_SENTINEL] = "the sentinel: " + ("a slow exit leaves hcall.xmm unwritten (P01)" if not call.fast
                                                        else "unwritten without P01")
        if call.fast and capture is not False:
            allowed[call.xmm[i]] = f"the guest's XMM{i} (P01)"
        if reg not in allowed:
            wrong.append(Wrong(XMM_OUTPUT, 97 if call.fast else 100, f"hcall.xmm[{i}]", xmm_hex(reg),
                               " or ".join(f"{xmm_hex(v)} ({why})" for v, why in allowed.items())))
    return wrong


def expect_exit(out: HcallOutcome, n: int, capture: bool | None) -> None:
    """The call exited to userspace as KVM_EXIT_HYPERV/HCALL, every field as the spec says (catalog row n)."""
    call = out.call
    assert out.exited, f"catalog {n}: control {call.control:#x}: expected KVM_EXIT_HYPERV/HCALL, got {out}"
    fail_first(exit_fields(out, call, capture), n, f"exit for control {call.control:#x}")


# --- the answer: completion by userspace, or in the kernel --------------------------------------------------------

def _written(call: Call, status: int) -> dict[str, int]:
    """The registers a hypercall's answer writes: RAX, or EDX:EAX in a 32-bit guest (spec section 1)."""
    return {"rax": status} if call.bits == 64 else {"rax": status & 0xFFFFFFFF, "rdx": status >> 32}


def _kvm_regs(regs: dict[str, int], call: Call, status: int, group: str) -> list[Wrong]:
    """KVM_GET_REGS right after a userspace completion: RIP past the VMCALL, the status written, nothing else."""
    written = _written(call, status)
    want = {**call.regs, "rip": call.insn + 3, **written}
    why = dict.fromkeys(written, "") | {"rip": f" (the VMCALL at {call.insn:#x} + 3)"}
    return [Wrong(group, None, f"{name.upper()} after completion (KVM_GET_REGS)", _reg_text(name, regs[name]),
                  _reg_text(name, want[name]) + why.get(name, " (unchanged: only the status and RIP are written)"))
            for name in hyperv.REG_NAMES if regs[name] != want[name]]


def resumed_fields(out: HcallOutcome, status: int, xmm: list[Xmm], group: str | None,
                   xmm_group: str | None) -> list[Wrong]:
    """What the guest reports after the call: RAX (EDX:EAX) = status, RCX, RDX, R8 and RFLAGS as it issued them
    (RCX intact also shows RIP advanced by exactly 3, hcall.S), XMM0-5 = xmm, XMM6-15 and MXCSR as seeded.

    A wrong XMM register or MXCSR counts under xmm_group: P01's (xmm_output) after userspace completed an exit,
    which is where P01 writes XMM output; the row's own after an answer in the kernel, whose fast-call XMM input
    path predates the series."""
    call = out.call
    if not out.completed:
        return [Wrong(group, None, "the guest", str(out), "to resume after the hypercall")]
    written = _written(call, status)
    issued = {"rcx": call.control, "rdx": call.rdx, "r8": call.r8, "rflags": call.regs["rflags"]}
    want = written | issued if call.bits == 64 else written
    why = dict.fromkeys(written, "") | {
        "rcx": " (unchanged: KVM never writes RCX, so another value means RIP did not advance by exactly 3)"}
    wrong = [Wrong(group, None, f"guest {name.upper()}", _reg_text(name, getattr(out, name)),
                   _reg_text(name, value) + why.get(name, " (unchanged)"))
             for name, value in want.items() if getattr(out, name) != value]
    if call.bits == 32:
        return wrong
    wrong += [Wrong(xmm_group, None, f"guest XMM{i}", xmm_hex(got), xmm_hex(reg) + ("" if i < 6 else " (unchanged)"))
              for i, (got, reg) in enumerate(zip(out.xmm_after, list(xmm) + XMM_SEED)) if got != reg]
    if out.mxcsr != hyperv.MXCSR_SEED:
        wrong.append(Wrong(xmm_group, None, "guest MXCSR", f"{out.mxcsr:#x}", f"{hyperv.MXCSR_SEED:#x} (unchanged)"))
    return wrong


def expect_completion(out: HcallOutcome, n: int, status: int, xmm: list[Xmm] | None = None) -> None:
    """After userspace completed the exit: RIP past the VMCALL, RAX (EDX:EAX) = status (RAX_SENTINEL: not written),
    XMM0-5 = xmm (default: unchanged) and every other register as the guest issued the call, in KVM's registers and
    as the guest saw them."""
    call = out.call
    assert out.completion is not None, f"catalog {n}: completing the exit of control {call.control:#x} failed: {out}"
    group = hyperv.code_group(call.code)
    fail_first(_kvm_regs(out.completion, call, status, group) + resumed_fields(out, status, xmm or call.xmm, group, XMM_OUTPUT),
               n, f"completion of control {call.control:#x}")


def expect_status(out: HcallOutcome, n: int, status: int) -> None:
    """No exit: the kernel answered `status` in RAX (RAX_SENTINEL: none written) and the guest resumed right after
    the call with nothing else changed."""
    call = out.call
    assert out.completed, f"catalog {n}: control {call.control:#x}: expected no exit and RAX {status_text(status)}, " \
                          f"got {out}"
    fail_first(resumed_fields(out, status, call.xmm, None, None), n, f"control {call.control:#x}, no exit")


# --- the WAKEUP exit of state 11 ----------------------------------------------------------------------------------

@dataclass
class Wakeup:
    """One KVM_RUN of a vCPU in state 11 (sentinels in exit_reason and system_event) and what it left behind."""

    ret: int
    reason: int
    type: int
    ndata: int
    data: list[int]
    described: str
    before: tuple[int, int]        # RIP, RFLAGS before the run
    after: tuple[int, int]
    mp_state: int
    irr: frozenset[int]
    isr: frozenset[int]


def observe_wakeup(vcpu: Vcpu, timeout: float = 5.0) -> Wakeup:
    """Run a vCPU in state 11 once, with sentinels in everything the WAKEUP exit could write."""
    run = vcpu.run_struct
    run.exit_reason = hyperv.EXIT_REASON_SENTINEL
    event = run.x.system_event
    event.type = event.ndata = SENTINEL32
    for i in range(16):
        event.data[i] = SENTINEL64
    before = vcpu.get_regs()
    ex = vcpu.run(timeout)
    after, lapic = vcpu.get_regs(), vcpu.get_lapic()
    return Wakeup(ex.ret, run.exit_reason, event.type, event.ndata, [event.data[i] for i in range(16)],
                  describe(vcpu), (before.rip, before.rflags), (after.rip, after.rflags), vcpu.get_mp_state_raw()[0],
                  hyperv.lapic_vectors(lapic, hyperv.LAPIC_IRR), hyperv.lapic_vectors(lapic, hyperv.LAPIC_ISR))


def _vectors(vectors: frozenset[int]) -> str:
    return ", ".join(f"{v:#x}" for v in sorted(vectors)) or "none"


def wakeup_fields(w: Wakeup, pending: int | None) -> list[Wrong]:
    """The WAKEUP exit (126), system_event.ndata/data unwritten (134), state 11 kept with RIP/RFLAGS unchanged and
    exactly the waking vector pending (127: nothing else in these VMs raises one), none in service (P05: the
    interrupt is not delivered)."""
    want_irr = frozenset() if pending is None else frozenset({pending})
    exit_checks = [
        ("KVM_RUN", 126, w.ret == 0, f"{w.ret} ({w.described})", "0"),
        ("exit_reason", 126, w.reason == uapi.KVM_EXIT_SYSTEM_EVENT, f"{w.reason} ({uapi.exit_name(w.reason)})",
         f"{uapi.KVM_EXIT_SYSTEM_EVENT} (KVM_EXIT_SYSTEM_EVENT)"),
        ("system_event.type", 126, w.type == uapi.KVM_SYSTEM_EVENT_WAKEUP, f"{w.type:#x}",
         f"{uapi.KVM_SYSTEM_EVENT_WAKEUP} (WAKEUP)"),
        ("system_event.ndata", 134, w.ndata == SENTINEL32, f"{w.ndata:#x}",
         f"the sentinel {SENTINEL32:#x} (unwritten)"),
    ] + [(f"system_event.data[{i}]", 134, d == SENTINEL64, f"{d:#x}", f"the sentinel {SENTINEL64:#x} (unwritten)")
         for i, d in enumerate(w.data)]
    state_checks = [
        ("KVM_GET_MP_STATE", 127, w.mp_state == uapi.KVM_MP_STATE_HV_INACTIVE_VTL, str(w.mp_state),
         f"{uapi.KVM_MP_STATE_HV_INACTIVE_VTL} (HV_INACTIVE_VTL, kept)"),
        ("RIP", 127, w.after[0] == w.before[0], f"{w.after[0]:#x}", f"{w.before[0]:#x} (unchanged)"),
        ("RFLAGS", 127, w.after[1] == w.before[1], f"{w.after[1]:#x}", f"{w.before[1]:#x} (unchanged)"),
        ("LAPIC IRR", 127, w.irr == want_irr, _vectors(w.irr), f"{_vectors(want_irr)} (the waking interrupt pending)"),
        ("LAPIC ISR", None, not w.isr, _vectors(w.isr), "none (the interrupt is not delivered, P05)"),
    ]
    return [Wrong(MP_STATE, entry, name, seen, want)
            for name, entry, ok, seen, want in exit_checks + state_checks if not ok]


def expect_wakeup(w: Wakeup, n: int, why: str, pending: int | None) -> None:
    """The whole WAKEUP exit of state 11; the message says RFLAGS.IF, which P05 must ignore (TLFS 12.12.2.1)."""
    fail_first(wakeup_fields(w, pending), n, f"{why}, RFLAGS.IF = {int(bool(w.before[1] & guest.RFLAGS_IF))}")
