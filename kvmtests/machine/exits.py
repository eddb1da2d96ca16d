"""Exit decoding into words for failure messages."""
from __future__ import annotations

from kvmtests import uapi

from .kvm import Vcpu


def _io(run: object) -> str:
    io = run.x.io
    direction = "out" if io.direction == uapi.KVM_EXIT_IO_OUT else "in"
    return f"port {io.port:#x} {direction} size {io.size} count {io.count}"


def _mmio(run: object) -> str:
    m = run.x.mmio
    data = bytes(m.data[0:m.len]).hex()
    return f"{'write' if m.is_write else 'read'} gpa {m.phys_addr:#x} len {m.len} data {data}"


def _internal(run: object) -> str:
    i = run.x.internal
    sub = {1: "emulation failure", 2: "simultaneous exceptions", 3: "event delivery",
           4: "unexpected exit reason"}.get(i.suberror, f"suberror {i.suberror}")
    data = ", ".join(hex(i.data[k]) for k in range(min(i.ndata, 16)))
    return f"{sub} [{data}]"


def _memory_fault(run: object) -> str:
    mf = run.x.memory_fault
    return (f"flags {uapi.memory_fault_flag_names(mf.flags)} gpa {mf.gpa:#x} size {mf.size:#x} "
            f"insn_len(byte 56) {mf.insn_len}")


def _hyperv(run: object) -> str:
    hv = run.x.hyperv
    if hv.type == uapi.KVM_EXIT_HYPERV_HCALL:
        h = hv.u.hcall
        return f"HCALL input {h.input:#x} params {h.params[0]:#x} {h.params[1]:#x}"
    return f"type {hv.type}"


def _system_event(run: object) -> str:
    se = run.x.system_event
    name = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP"}.get(se.type, str(se.type))
    return f"type {name} ndata {se.ndata}"


def _msr(run: object) -> str:
    m = run.x.msr
    return f"index {m.index:#x} reason {m.reason} data {m.data:#x}"


_DETAIL = {
    uapi.KVM_EXIT_IO: _io,
    uapi.KVM_EXIT_MMIO: _mmio,
    uapi.KVM_EXIT_INTERNAL_ERROR: _internal,
    uapi.KVM_EXIT_MEMORY_FAULT: _memory_fault,
    uapi.KVM_EXIT_HYPERV: _hyperv,
    uapi.KVM_EXIT_SYSTEM_EVENT: _system_event,
    uapi.KVM_EXIT_X86_RDMSR: _msr,
    uapi.KVM_EXIT_X86_WRMSR: _msr,
}


def describe(vcpu: Vcpu) -> str:
    """Name the vCPU's last exit with its details and the guest RIP."""
    ex = vcpu.last_exit
    if ex is None:
        return "vCPU has not run"
    try:
        rip = f" at RIP {vcpu.get_regs().rip:#x}"
    except OSError:
        rip = ""
    if ex.timed_out:
        return f"watchdog timeout: KVM_RUN did not return{rip}"
    head = f"KVM_RUN returned {ex.ret}"
    if ex.ret < 0:
        head += f" ({uapi.errno_name(ex.errno)})"
    run = vcpu.run_struct
    detail = _DETAIL.get(ex.reason)
    return f"{head}, {uapi.exit_name(ex.reason)}{': ' + detail(run) if detail else ''}{rip}"
