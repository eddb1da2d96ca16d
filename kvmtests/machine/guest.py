"""Guest machine builder: memory, page tables, GDT/TSS/IDT, registers, payload, ucalls."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmtests import uapi

from . import asm
from .kvm import Vcpu, Vm

PAGE = 0x1000

# Guest-physical layout (identity-mapped in long mode).
GDT_GPA = 0x1000
IDT_GPA = 0x2000
TSS_GPA = 0x3000
PML4_GPA = 0x4000
PDPT_GPA = 0x5000
PD_GPA = 0x6000
PD_HIGH_GPA = 0x7000          # maps the xAPIC page at 0xFEE00000
PT_GPA = 0x8000               # page tables for the low memory, one per 2 MiB
UCALL_GPA = 0xF000
STACK_TOP = 0x20000           # CPL0 stack of vCPU 0; vCPU n uses STACK_TOP - n * STACK_SIZE
STACK_SIZE = 0x2000
USER_STACK_TOP = 0x30000
CODE_GPA = 0x100000
DATA_GPA = 0x200000           # first page free for tests
MEM_SIZE = 0x400000
APIC_BASE_GVA = 0xFEE00000
MMIO_GPA = 0xC0000000         # unbacked: the 3-4 GiB range PD_HIGH_GPA maps, where guest accesses exit as MMIO
RO_GPA = 0x800000             # past MEM_SIZE: where tests add a read-only slot (basic.S ro_write)
INSN_TARGET = DATA_GPA + 0x200   # insn_len.S: what every row reads or writes
PIO_PORT = 0x3F8              # basic.S and basic32.S: the port of their PIO rows

UCALL_PORT = 0xE9
KERNEL_CS, KERNEL_DS, CODE32_CS, DATA32_DS, USER_CS, USER_DS, TSS_SEL = 0x08, 0x10, 0x18, 0x20, 0x2B, 0x33, 0x38

UCALL_SYNC, UCALL_ASSERT, UCALL_DONE, UCALL_EXCEPTION = 1, 2, 3, 4
UCALL_NAMES = {1: "SYNC", 2: "ASSERT", 3: "DONE", 4: "EXCEPTION"}
# The ucall area at UCALL_GPA: the command (u64), then its arguments (u64 each), the RIP an exception report
# resumes at, and the interrupt counts (u32 a vector).
UCALL_ARGS_OFF = 8
UCALL_ARGS = [UCALL_GPA + UCALL_ARGS_OFF + 8 * i for i in range(4)]   # UCALL_ARG0-3 in the payloads
UCALL_RESUME_OFF = 64
UCALL_IRQ_COUNTS_OFF = 0x100

EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                   10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
                   19: "#XM", 20: "#VE", 21: "#CP"}
UD_VECTOR = 6

PTE_P, PTE_RW, PTE_US, PTE_PS, PTE_PCD, PTE_A = 1 << 0, 1 << 1, 1 << 2, 1 << 7, 1 << 4, 1 << 5
PTE_NX = 1 << 63

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 18
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
RFLAGS_FIXED, RFLAGS_IF = 0x2, 0x200


def layout_defines() -> dict[str, int]:
    """The layout constants payloads see as symbols (--defsym): the one table of the guest addresses, ports,
    selectors and ucall slots that both the harness and the payloads (common*.inc, basic*.S, insn_len.S) use."""
    return {"UCALL_GPA": UCALL_GPA, "UCALL_PORT": UCALL_PORT, "USER_CS": USER_CS, "USER_DS": USER_DS,
            "USER_STACK_TOP": USER_STACK_TOP, "APIC_BASE_GVA": APIC_BASE_GVA, "DATA_GPA": DATA_GPA,
            "CODE_GPA": CODE_GPA, "STACK_TOP": STACK_TOP,
            "UCALL_SYNC": UCALL_SYNC, "UCALL_ASSERT": UCALL_ASSERT, "UCALL_DONE": UCALL_DONE,
            "UCALL_EXCEPTION": UCALL_EXCEPTION,
            **{f"UCALL_ARG{i}": gpa for i, gpa in enumerate(UCALL_ARGS)},
            "UCALL_RESUME": UCALL_GPA + UCALL_RESUME_OFF, "UCALL_IRQ_COUNTS": UCALL_GPA + UCALL_IRQ_COUNTS_OFF,
            "MMIO_GPA": MMIO_GPA, "RO_GPA": RO_GPA, "INSN_TARGET": INSN_TARGET, "PIO_PORT": PIO_PORT}


def load_payload(name: str, bits: int = 64, defines: dict[str, int] | None = None) -> asm.Payload:
    """Assemble guestasm/<name>.S for the standard layout, with `defines` on top of layout_defines()."""
    return asm.assemble(name, bits=bits, base=CODE_GPA, defines={**layout_defines(), **(defines or {})})


@dataclass
class Ucall:
    """A guest report: SYNC(stage, value), ASSERT(code, observed, expected), DONE, EXCEPTION(vector, error, rip)."""

    cmd: int
    args: tuple[int, ...]

    def __str__(self) -> str:
        if self.cmd == UCALL_EXCEPTION:
            vec, err, rip = self.args[:3]
            return f"guest exception {EXCEPTION_NAMES.get(vec, vec)} error code {err:#x} at RIP {rip:#x}"
        if self.cmd == UCALL_ASSERT:
            code, observed, expected = self.args[:3]
            return f"guest assertion {code} failed: observed {observed:#x}, expected {expected:#x}"
        return f"ucall {UCALL_NAMES.get(self.cmd, self.cmd)}{self.args[:2]}"


class UnexpectedExit(AssertionError):
    """The vCPU stopped for a reason the test did not expect."""


def _segment(sel: int, *, code: bool, long: bool = True, dpl: int = 0, db: bool = False) -> dict:
    return {"base": 0, "limit": 0xFFFFFFFF, "selector": sel, "type": 0xB if code else 0x3, "present": 1,
            "dpl": dpl, "db": int(db), "s": 1, "l": int(long and code), "g": 1, "avl": 0, "unusable": 0}


def _gdt_entry(access: int, flags: int) -> bytes:
    return struct.pack("<Q", 0xFFFF | (access << 40) | (0xF << 48) | (flags << 52))


def _gdt(tss_base: int) -> bytes:
    tss_limit = 0x67
    tss_low = (tss_limit | ((tss_base & 0xFFFFFF) << 16) | (0x89 << 40) | (((tss_base >> 24) & 0xFF) << 56))
    return b"".join([
        bytes(8),
        _gdt_entry(0x9B, 0xA),   # 0x08 64-bit code
        _gdt_entry(0x93, 0xC),   # 0x10 data
        _gdt_entry(0x9B, 0xC),   # 0x18 32-bit code
        _gdt_entry(0x93, 0xC),   # 0x20 32-bit data
        _gdt_entry(0xFB, 0xA),   # 0x28 user 64-bit code
        _gdt_entry(0xF3, 0xC),   # 0x30 user data
        struct.pack("<QQ", tss_low, tss_base >> 32),  # 0x38 TSS
    ])


def _idt64(stubs: int) -> bytes:
    out = bytearray()
    for vec in range(256):
        off = stubs + 16 * vec
        out += struct.pack("<HHBBHIi", off & 0xFFFF, KERNEL_CS, 0, 0x8E, (off >> 16) & 0xFFFF, off >> 32, 0)
    return bytes(out)


def _idt32(stubs: int) -> bytes:
    out = bytearray()
    for vec in range(32):
        off = stubs + 16 * vec
        out += struct.pack("<HHBBH", off & 0xFFFF, CODE32_CS, 0, 0x8E, off >> 16)
    return bytes(out)


@dataclass
class Machine:
    """A VM with guest memory laid out, a payload loaded and vCPUs ready to run it."""

    vm: Vm
    payload: asm.Payload
    mem: object
    bits: int = 64
    vcpus: list[Vcpu] = field(default_factory=list)

    @property
    def vcpu(self) -> Vcpu:
        return self.vcpus[0]

    def sym(self, label: str) -> int:
        return self.payload[label]

    # page tables -------------------------------------------------------------------------------
    def pte_gpa(self, gva: int) -> int:
        """GPA of the 4 KiB PTE that maps an identity-mapped low GVA."""
        return PT_GPA + (gva // 0x200000) * PAGE + ((gva >> 12) & 0x1FF) * 8

    def set_pte_flags(self, gva: int, set_bits: int = 0, clear_bits: int = 0) -> None:
        addr = self.pte_gpa(gva)
        self.mem.write_u64(addr, (self.mem.read_u64(addr) | set_bits) & ~clear_bits)

    # ucall -------------------------------------------------------------------------------------
    def ucall(self, vcpu: Vcpu | None = None) -> Ucall | None:
        """The ucall that `vcpu`'s last exit carried, if it was one."""
        vcpu = vcpu or self.vcpu
        ex = vcpu.last_exit
        io = vcpu.run_struct.x.io
        if ex is None or ex.ret != 0 or ex.reason != uapi.KVM_EXIT_IO or io.port != UCALL_PORT:
            return None
        raw = self.mem.read(UCALL_GPA, 64)
        words = struct.unpack("<8Q", raw)
        return Ucall(words[0], words[1:])

    def set_resume(self, rip: int) -> None:
        """After an exception report, continue the guest at `rip`."""
        self.mem.write_u64(UCALL_GPA + UCALL_RESUME_OFF, rip)

    def irq_count(self, vector: int) -> int:
        return int.from_bytes(self.mem.read(UCALL_GPA + UCALL_IRQ_COUNTS_OFF + 4 * vector, 4), "little")

    def describe(self, vcpu: Vcpu | None = None) -> str:
        """One line naming the last exit of `vcpu`, with RIP, for failure messages."""
        from .exits import describe
        vcpu = vcpu or self.vcpu
        uc = self.ucall(vcpu)
        return str(uc) if uc else describe(vcpu)

    def run_to_ucall(self, vcpu: Vcpu | None = None, timeout: float = 5.0) -> Ucall:
        """Run until the next ucall; anything else (incl. a guest ASSERT) fails with the exit decoded."""
        vcpu = vcpu or self.vcpu
        vcpu.run(timeout)
        uc = self.ucall(vcpu)
        if uc is None:
            raise UnexpectedExit(f"expected a ucall, got {self.describe(vcpu)}")
        if uc.cmd == UCALL_ASSERT:
            raise AssertionError(str(uc))
        return uc

    def run_until(self, cmd: int, vcpu: Vcpu | None = None, timeout: float = 5.0) -> Ucall:
        """Run until a ucall of kind `cmd`; anything else fails with it decoded."""
        uc = self.run_to_ucall(vcpu, timeout)
        if uc.cmd != cmd:
            raise UnexpectedExit(f"expected ucall {UCALL_NAMES[cmd]}, got {uc}")
        return uc

    # vCPUs -------------------------------------------------------------------------------------
    def add_vcpu(self, entry: str = "_start", vcpu_id: int | None = None,
                 cpuid: list[dict] | None = None) -> Vcpu:
        """A vCPU in the payload's mode, at `entry`, with its own stack."""
        vcpu_id = len(self.vcpus) if vcpu_id is None else vcpu_id
        vcpu = self.vm.create_vcpu(vcpu_id)
        self.vcpus.append(vcpu)
        entries = cpuid if cpuid is not None else self.vm.kvm.supported_cpuid()
        vcpu.set_cpuid(entries)
        xsave = any(e["function"] == 1 and e["ecx"] & (1 << 26) for e in entries)
        sregs = vcpu.get_sregs()
        if self.bits == 64:
            code, data = _segment(KERNEL_CS, code=True), _segment(KERNEL_DS, code=False)
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if xsave else 0)
            sregs.efer = EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE
            sregs.cr3 = PML4_GPA
            sregs.idt.base, sregs.idt.limit = IDT_GPA, 256 * 16 - 1
        else:
            code = _segment(CODE32_CS, code=True, long=False, db=True)
            data = _segment(DATA32_DS, code=False, long=False, db=True)
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
            sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
            sregs.efer = 0
            sregs.idt.base, sregs.idt.limit = IDT_GPA, 32 * 8 - 1
        sregs.cs = code
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, data)
        sregs.tr = {"base": TSS_GPA, "limit": 0x67, "selector": TSS_SEL, "type": 0xB, "present": 1,
                    "dpl": 0, "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0}
        sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 8 * 9 - 1
        vcpu.set_sregs(sregs)
        regs = uapi.ffi.new("struct kvm_regs *")
        regs.rip = self.sym(entry)
        regs.rsp = STACK_TOP - vcpu_id * STACK_SIZE
        regs.rflags = RFLAGS_FIXED
        vcpu.set_regs(regs)
        return vcpu


def build_machine(vm: Vm, payload: asm.Payload, *, entry: str = "_start", bits: int = 64,
                  mem_size: int = MEM_SIZE, cpuid: list[dict] | None = None, vcpus: int = 1) -> Machine:
    """Lay out guest memory in slot 0, load `payload`, and create `vcpus` vCPUs at `entry`."""
    vm.set_tss_addr()
    mem = vm.add_region(0, 0, mem_size)
    machine = Machine(vm, payload, mem, bits)
    mem.write(GDT_GPA, _gdt(TSS_GPA))
    mem.write(TSS_GPA + 4, struct.pack("<Q", STACK_TOP))   # rsp0 for CPL3 -> CPL0 transitions
    stubs = payload["exc_stubs"]
    mem.write(IDT_GPA, _idt64(stubs) if bits == 64 else _idt32(stubs))
    if bits == 64:
        _page_tables(mem, mem_size)
    mem.write(CODE_GPA, payload.code)
    for _ in range(vcpus):
        machine.add_vcpu(entry, cpuid=cpuid)
    return machine


def _page_tables(mem: object, mem_size: int) -> None:
    """Identity map: 4 KiB pages over guest memory, 2 MiB pages for the rest of the first GiB and for
    3-4 GiB (MMIO, xAPIC); every page user-accessible so that CPL3 payloads work."""
    flags = PTE_P | PTE_RW | PTE_US
    mem.write_u64(PML4_GPA, PDPT_GPA | flags)
    mem.write_u64(PDPT_GPA, PD_GPA | flags)
    mem.write_u64(PDPT_GPA + 3 * 8, PD_HIGH_GPA | flags)
    n_pts = (mem_size + 0x1FFFFF) // 0x200000
    if PT_GPA + n_pts * PAGE > UCALL_GPA:
        raise ValueError(f"guest memory of {mem_size:#x} bytes needs more page tables than the layout holds")
    for i in range(n_pts):
        pt = PT_GPA + i * PAGE
        mem.write_u64(PD_GPA + i * 8, pt | flags)
        mem.write(pt, b"".join(struct.pack("<Q", ((i * 512 + j) * PAGE) | flags) for j in range(512)))
    mem.write(PD_GPA + n_pts * 8, b"".join(struct.pack("<Q", (i * 0x200000) | flags | PTE_PS)
                                           for i in range(n_pts, 512)))
    mem.write(PD_HIGH_GPA, b"".join(struct.pack("<Q", (MMIO_GPA + i * 0x200000) | flags | PTE_PS | PTE_PCD)
                                    for i in range(512)))
