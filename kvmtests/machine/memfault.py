"""Memory-attribute and memory-fault helpers: on-demand guest accesses and decoded fault exits."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from kvmtests import uapi

from . import guest
from .kvm import Unavailable, Vcpu, Vm

PAGE = 0x1000
READ, WRITE, EXEC = "read", "write", "exec"
KINDS = (READ, WRITE, EXEC)
FLAG_OF = {READ: uapi.KVM_MEMORY_EXIT_FLAG_READ, WRITE: uapi.KVM_MEMORY_EXIT_FLAG_WRITE,
           EXEC: uapi.KVM_MEMORY_EXIT_FLAG_EXEC}
DENIED_BY = {READ: uapi.KVM_MEMORY_ATTRIBUTE_NR, WRITE: uapi.KVM_MEMORY_ATTRIBUTE_NW,
             EXEC: uapi.KVM_MEMORY_ATTRIBUTE_NX}
RMW = "read-modify-write"      # not in KINDS: both a read and a write (flags: WRITE, catalog 62)
ENTRY = {READ: "mem_read", WRITE: "mem_write", EXEC: "mem_exec", RMW: "mem_rmw"}
SYNC_STAGE = {READ: 1, WRITE: 2, EXEC: 3, RMW: 4}
EXEC_OFFSET = 0x800          # where the host puts the `ret` that an execute probe calls
RET = b"\xc3"
SENTINEL = 0xA5
SENTINEL64 = int.from_bytes(bytes([SENTINEL]) * 8, "little")
ACCESS_BYTES = 8             # the widest access of mem.S and insn_len.S, all at the address they are given
CORE = "core"                # the verdict's name for upstream behaviour (a group of no patch)

VALID_PATCHED = frozenset({0x0, 0x2, 0x4, 0x6, 0x7})   # spec P15 table, default VM
VALID_PATCHED_PRIVATE = VALID_PATCHED | {0x8}            # ... VM with private memory
VALID_UPSTREAM = frozenset({0x0})
VALID_UPSTREAM_PRIVATE = frozenset({0x0, 0x8})


def attr_names(value: int) -> str:
    """Decode an attribute value for messages."""
    return uapi.bit_names(value, (("NR", 1), ("NW", 2), ("NX", 4), ("PRIVATE", 8)))


def valid_values(patched: bool, private_vm: bool) -> frozenset[int]:
    """Attribute values KVM_SET_MEMORY_ATTRIBUTES accepts (spec P15 table; upstream: only 0 and PRIVATE)."""
    if patched:
        return VALID_PATCHED_PRIVATE if private_vm else VALID_PATCHED
    return VALID_UPSTREAM_PRIVATE if private_vm else VALID_UPSTREAM


def require_ioctl(vm: Vm) -> None:
    """Skip where the kernel has no KVM_SET_MEMORY_ATTRIBUTES at all."""
    _, err = vm.set_memory_attributes_raw(0x700000000, PAGE, 0)
    if err == errno.ENOTTY:
        raise Unavailable("kernel lacks KVM_SET_MEMORY_ATTRIBUTES (ENOTTY: CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES is off)")


def set_attrs(vm: Vm, gpa: int, size: int, value: int, row: int) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES that the test relies on: anything but 0 fails the test with the row."""
    ret, err = vm.set_memory_attributes_raw(gpa, size, value)
    assert ret == 0, (f"catalog {row}: KVM_SET_MEMORY_ATTRIBUTES(gpa {gpa:#x}, size {size:#x}, {attr_names(value)}) "
                      f"returned {ret}/{uapi.errno_name(err)}, expected 0")


def sw_protected_vm_type(kvm: object) -> int:
    """KVM_X86_SW_PROTECTED_VM, or Unavailable where KVM_CAP_VM_TYPES does not list it."""
    if not kvm.check_extension(uapi.KVM_CAP_VM_TYPES) & (1 << uapi.KVM_X86_SW_PROTECTED_VM):
        raise Unavailable("needs KVM_X86_SW_PROTECTED_VM (CONFIG_KVM_SW_PROTECTED_VM): KVM_CAP_VM_TYPES lacks bit 1")
    return uapi.KVM_X86_SW_PROTECTED_VM


# --- guest accesses ------------------------------------------------------------------------------

@dataclass
class Fault:
    """The memory_fault part of kvm_run after a KVM_EXIT_MEMORY_FAULT."""

    flags: int
    gpa: int
    size: int
    insn_len: int

    @classmethod
    def of(cls, run: object) -> "Fault":
        """The fields as KVM left them, read through uapi's struct (insn_len is kvm_run byte 56, catalog 1)."""
        mf = run.x.memory_fault
        return cls(mf.flags, mf.gpa, mf.size, mf.insn_len)

    def __str__(self) -> str:
        return (f"memory fault flags {uapi.memory_fault_flag_names(self.flags)} gpa {self.gpa:#x} "
                f"size {self.size:#x} insn_len {self.insn_len}")


class FieldMismatch(AssertionError):
    """A part of an exit that a group provides is wrong (P09 flags, P11 insn_len, what a denial or a permitted access
    did): the verdict counts it under that feature group, not under the row that happened to provoke the exit."""

    what = "memory-fault exit field"    # what the row relied on, in the message of an error of another group's row

    def __init__(self, group: str, message: str):
        super().__init__(message)
        self.group = group


@dataclass(frozen=True)
class FaultRule:
    """What memory_fault.insn_len must hold on the kernel under test (catalog 63-70; 66 U: the sentinel survives)."""

    reported: bool | None = None   # P11 writes byte 56 (True), leaves it (False), cannot tell (None)
    exact: bool = False            # the CPU reports the instruction length: Intel VMX with EPT (P10)
    shadow: bool = False           # TDP off: the shadow #PF path passes no length (70)

    def insn_lens(self, length: int | None) -> frozenset[int]:
        """Values byte 56 may hold after an exit; `length` is the faulting instruction's own data access, if it is one."""
        if self.reported is None:
            return frozenset(range(16)) | {SENTINEL}
        if not self.reported:
            return frozenset({SENTINEL})
        if self.shadow:
            return frozenset({0})
        if self.exact and length is not None:
            return frozenset({length})
        return frozenset(range(16))      # 67: at most 15; AMD decode-assist byte count (68), exec faults (69)

    def __str__(self) -> str:
        if self.reported is None:
            return "P11 not detected: 0-15 or the sentinel"
        if not self.reported:
            return f"without P11 the sentinel {SENTINEL:#x} survives (66 U:)"
        return ("shadow paging: 0 (70)" if self.shadow else
                "Intel EPT: the instruction length (63)" if self.exact else "at most 15 (67/68)")


@dataclass
class FaultOutcome:
    """What one guest access did: completed (with the value read), a memory-fault exit, or else; where RIP stopped
    and what the accessed bytes held before and after the run."""

    kind: str
    gpa: int
    completed: bool
    value: int | None
    fault: Fault | None
    rip: int
    described: str
    insn_rip: int                           # the accessing instruction; an execute's is gpa itself
    memory: tuple[bytes, bytes]             # ACCESS_BYTES at gpa before and after the run
    written: int | None = None              # what a completed write leaves there (None: a read, an execute, unstated)
    insn_length: int | None = None          # length of a data-access instruction (None for an execute)
    rule: FaultRule = FaultRule()
    vm: Vm | None = field(default=None, repr=False)   # to say how the page is backed, in messages only

    def __str__(self) -> str:
        what = "completed" if self.completed else str(self.fault) if self.fault else self.described
        memory = f", {backing(self.vm, self.gpa)}" if self.vm is not None else ""
        return f"guest {self.kind} of {self.gpa:#x}: {what} (RIP {self.rip:#x}{memory})"


def arm(vcpu: Vcpu) -> None:
    """Sentinels in exit_reason and every memory_fault field, so a field KVM did not write cannot pass as stale data."""
    # Only before a run that completes no earlier exit through these bytes (an MMIO read's data and a hypercall's
    # result share them). Bytes 57-63, the padding after insn_len, are no field: the spec (P11 table) fixes nothing
    # there, so they are neither filled nor read.
    run = vcpu.run_struct
    run.exit_reason = 0xFFFFFFFF
    mf = run.x.memory_fault
    mf.flags = mf.gpa = mf.size = SENTINEL64
    mf.insn_len = SENTINEL


def run_for_fault(m: guest.Machine, vcpu: Vcpu | None = None, timeout: float = 5.0) -> Fault | None:
    """One armed KVM_RUN: the fields of a memory-fault exit (-1, EFAULT and exit 39 together, catalog 35), else None."""
    vcpu = vcpu or m.vcpu
    arm(vcpu)
    ex = vcpu.run(timeout)
    if ex.ret == -1 and ex.errno == errno.EFAULT and ex.reason == uapi.KVM_EXIT_MEMORY_FAULT:
        return Fault.of(vcpu.run_struct)
    return None


def run_access(m: guest.Machine, kind: str, gpa: int, insn: str, end: str, stage: int, rule: FaultRule,
               vcpu: Vcpu | None = None, written: int | None = None) -> FaultOutcome:
    """One armed KVM_RUN through the access to `gpa` at label `insn` (to `end`), which reports SYNC(stage) once done:
    everything the shared checks compare."""
    vcpu = vcpu or m.vcpu
    before = m.vm.read(gpa, ACCESS_BYTES)
    fault = run_for_fault(m, vcpu)
    uc = m.ucall(vcpu)
    done = uc is not None and uc.cmd == guest.UCALL_SYNC and uc.args[0] == stage
    at, length = (gpa, None) if kind == EXEC else (m.sym(insn), m.payload.length(insn, end))
    return FaultOutcome(kind, gpa, done, uc.args[1] if done else None, fault, vcpu.get_regs().rip, m.describe(vcpu), at,
                        (before, m.vm.read(gpa, ACCESS_BYTES)), written, length, rule, m.vm)


class Prober:
    """A guest (payload mem.S) that does one read, write or execute per request, on any vCPU."""

    def __init__(self, machine: guest.Machine, rule: FaultRule = FaultRule()):
        self.m, self.rule = machine, rule

    def access(self, kind: str, gpa: int, value: int = 0, vcpu: Vcpu | None = None) -> FaultOutcome:
        """Point the vCPU at the access and run it once; a fault leaves RIP on the access."""
        vcpu = vcpu or self.m.vcpu
        regs = vcpu.get_regs()
        regs.rip, regs.rbx, regs.rax = self.m.sym(ENTRY[kind]), gpa, value
        regs.rsp = guest.STACK_TOP - vcpu.id * guest.STACK_SIZE
        vcpu.set_regs(regs)
        return self.resume(kind, gpa, vcpu)

    def resume(self, kind: str, gpa: int, vcpu: Vcpu | None = None) -> FaultOutcome:
        """Re-enter the vCPU where it stopped (e.g. after a fault) and decode what happened; a write stores RAX."""
        vcpu = vcpu or self.m.vcpu
        written = vcpu.get_regs().rax if kind in (WRITE, RMW) else None
        return run_access(self.m, kind, gpa, ENTRY[kind], f"{ENTRY[kind]}_end", SYNC_STAGE[kind], self.rule, vcpu,
                          written)

    def place_ret(self, page: int) -> int:
        """Put a `ret` in the page from the host; the execute target."""
        self.m.vm.write(page + EXEC_OFFSET, RET)
        return page + EXEC_OFFSET


def build_prober(vm: Vm, vcpus: int = 1, rule: FaultRule = FaultRule()) -> Prober:
    """A machine running the mem.S payload with the standard layout."""
    return Prober(guest.build_machine(vm, guest.load_payload("mem"), vcpus=vcpus), rule)


# Which group a wrong part of an exit is counted under (the plugin makes it an error of that group when the row
# belongs to another): flags, P09's fault_rwx_flags; insn_len, P11's fault_insn_len; gpa and size, the row's own
# assertion; RIP on the faulting instruction and memory untouched after a denial, the group that denied the access
# (denial_group); what a permitted access reads or leaves, P16's "allowed -> continues" (catalog 39, 42, 46, 53),
# rwx_attributes.

def denial_group(flags: int) -> str:
    """The group whose denial an exit with these flags reports: it provides the RIP and the untouched memory."""
    # Spec P16: a denial "produces the standard memory-fault exit ... The instruction is not retired" (catalog 45,
    # [P16]): rwx_attributes. A private/shared mismatch exit is upstream's own, on which the spec says no more: core.
    return CORE if flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE else "rwx_attributes"


def check_fault(fault: Fault | None, row: int | str, what: str, flags: int, page: int,
                insn_lens: frozenset[int], rule: FaultRule | str = "") -> Fault:
    """Every field of a memory-fault exit against the spec (P09 flags, P16 gpa and size, P11 insn_len)."""
    assert fault is not None, f"catalog {row}: expected a memory-fault exit (KVM_RUN -1/EFAULT, exit 39); {what}"
    if fault.flags != flags:
        raise FieldMismatch("fault_rwx_flags", f"catalog {row}: {what}: flags "
                            f"{uapi.memory_fault_flag_names(fault.flags)}, expected {uapi.memory_fault_flag_names(flags)}")
    assert fault.gpa == page and page % PAGE == 0, \
        f"catalog {row}: {what}: gpa {fault.gpa:#x}, expected the page-aligned GPA {page:#x} (P16)"
    assert fault.size == PAGE, f"catalog {row}/38: {what}: size {fault.size:#x}, expected {PAGE:#x} (one page, P16)"
    if fault.insn_len not in insn_lens:
        raise FieldMismatch("fault_insn_len", f"catalog {row}/67: {what}: insn_len {fault.insn_len:#x}, expected "
                            f"{_values(insn_lens)} ({rule})")
    return fault


def _values(values: frozenset[int]) -> str:
    low = sorted(values)
    return f"{low[0]}-{low[-1]}" if len(low) > 2 and low == list(range(low[0], low[-1] + 1)) else \
        " or ".join(f"{v:#x}" for v in low)


def _u64(data: bytes) -> int:
    return int.from_bytes(data, "little")


def expect_fault(out: FaultOutcome, kind: str, page: int, row: int | str, flags: int | None = None) -> Fault:
    """The access must have ended in a memory-fault exit on `page` with the flag of its kind and every field right,
    RIP still on the instruction and memory as it was."""
    flags = FLAG_OF[kind] if flags is None else flags
    own = page == out.gpa - out.gpa % PAGE          # the instruction's own data page, not a page-table page (54/55)
    fault = check_fault(out.fault, row, str(out), flags, page, out.rule.insn_lens(out.insn_length if own else None),
                        out.rule)
    # Unchecked on purpose, as the spec fixes no value: insn_len within 0-15 (67) where the CPU does not report the
    # length (68, 69) or the exit names a page-table page (54, 55); the entry such a walk would have updated (54 and
    # 55 fix gpa and flags only); registers other than RIP; kvm_run bytes 57-63 (see arm).
    if out.rip != out.insn_rip:
        raise FieldMismatch(denial_group(flags), f"catalog {row}: {out}: RIP {out.rip:#x}, expected {out.insn_rip:#x}, "
                                                 f"the faulting instruction (a denied access is not retired)")
    before, after = out.memory
    if after != before:
        raise FieldMismatch(denial_group(flags), f"catalog {row}: {out}: memory at {out.gpa:#x} {_u64(after):#x}, "
                                                 f"expected {_u64(before):#x}, untouched by the denied {kind}")
    return fault


def expect_done(out: FaultOutcome, row: int | str) -> None:
    """The access must have completed with its effect: a read returns what memory holds, a write leaves its value."""
    assert out.completed, f"catalog {row}: expected the {out.kind} to complete; {out}"
    after = _u64(out.memory[1])
    # Unchecked on purpose: what an execute leaves (it stores nothing, and its `ret` returns no value the spec names),
    # and a store whose value the row does not state (`written` None: insn_len.S's, of varying width, expect a fault).
    if out.kind == READ and out.value != after:
        raise FieldMismatch("rwx_attributes", f"catalog {row}: {out}: value read {out.value:#x}, expected {after:#x}, "
                                              f"what memory at {out.gpa:#x} holds")
    if out.written is not None and after != out.written:
        raise FieldMismatch("rwx_attributes", f"catalog {row}: {out}: memory at {out.gpa:#x} {after:#x}, expected "
                                              f"{out.written:#x}, the value the {out.kind} stored")


def backing(vm: Vm, gpa: int) -> str:
    """How the host backs the guest page at `gpa`, in words: a huge page over a restricted 4 KiB page is one cause."""
    try:
        region = vm.region_for(gpa)
    except KeyError:
        return f"no memslot at {gpa:#x}"
    return "memory THP-backed" if thp_backed(region) else "memory in 4 KiB pages (no THP)"


def thp_backed(region: object) -> bool:
    """Whether the host mapping holding the region (smaps: the VMA around its start) has transparent huge pages."""
    with open(f"/proc/{os.getpid()}/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= region.hva < end
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) > 0
    return False
