"""KVM UAPI through cffi: structs (with the VSM series' additions), constants, ioctl numbers."""
from __future__ import annotations

import errno
import os

import cffi

CDEF = r"""
struct kvm_hyperv_xmm_reg { uint64_t low; uint64_t high; };

struct kvm_hyperv_exit {
    uint32_t type;
    uint32_t pad1;
    union {
        struct { uint32_t msr; uint32_t pad2; uint64_t control; uint64_t evt_page; uint64_t msg_page; } synic;
        struct { uint64_t input; uint64_t result; uint64_t params[2];
                 struct kvm_hyperv_xmm_reg xmm[6]; } hcall;
        struct { uint32_t msr; uint32_t pad2; uint64_t control; uint64_t status;
                 uint64_t send_page; uint64_t recv_page; uint64_t pending_page; } syndbg;
    } u;
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; } io;
        struct { uint32_t exception; uint32_t pad; uint64_t pc; uint64_t dr6; uint64_t dr7; } debug;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint64_t nr; uint64_t args[6]; uint64_t ret; uint64_t flags; } hypercall;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { uint8_t error; uint8_t pad[7]; uint32_t reason; uint32_t index; uint64_t data; } msr;
        struct kvm_hyperv_exit hyperv;
        struct { uint64_t flags; uint64_t gpa; uint64_t size; uint8_t insn_len; } memory_fault;
        char padding[256];
    } x;
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union { char padding[2048]; } s;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};

struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint8_t pad1;
    uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp;
    uint8_t xmm[16][16]; uint32_t mxcsr; uint32_t pad2;
};

struct kvm_xsave { uint32_t region[1024]; };

struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };

struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx; uint32_t padding[3];
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
};

struct kvm_userspace_memory_region2 {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
    uint64_t guest_memfd_offset; uint32_t guest_memfd; uint32_t pad1; uint64_t pad2[14];
};

struct kvm_create_guest_memfd { uint64_t size; uint64_t flags; uint64_t reserved[6]; };

struct kvm_memory_attributes { uint64_t address; uint64_t size; uint64_t attributes; uint64_t flags; };

struct kvm_pre_fault_memory { uint64_t gpa; uint64_t size; uint64_t flags; uint64_t padding[5]; };

struct kvm_mp_state { uint32_t mp_state; };

struct kvm_enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; uint8_t pad[64]; };

struct kvm_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t flags; uint32_t devid; uint8_t pad[12]; };

struct kvm_lapic_state { char regs[1024]; };

struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending; uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct { uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_msr_filter_range { uint32_t flags; uint32_t nmsrs; uint32_t base; uint8_t *bitmap; };
struct kvm_msr_filter { uint32_t flags; struct kvm_msr_filter_range ranges[16]; };

struct kvm_translation {
    uint64_t linear_address; uint64_t physical_address;
    uint8_t valid; uint8_t writeable; uint8_t usermode; uint8_t pad[5];
};

struct hv_send_ipi { uint32_t vector; uint8_t in_vtl; uint8_t reserved[3]; uint64_t cpu_mask; };
struct hv_vpset { uint64_t format; uint64_t valid_bank_mask; uint64_t bank_contents[]; };
struct hv_send_ipi_ex { uint32_t vector; uint8_t in_vtl; uint8_t reserved[3]; struct hv_vpset vp_set; };

int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
int close(int fd);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF, packed=False)
_libc = ffi.dlopen(None)

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


# ioctls on /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
# ioctls on a VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, "struct kvm_userspace_memory_region2")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_X86_SET_MSR_FILTER = _iow(0xC6, "struct kvm_msr_filter")
KVM_SET_MEMORY_ATTRIBUTES = _iow(0xD2, "struct kvm_memory_attributes")
KVM_CREATE_GUEST_MEMFD = _iowr(0xD4, "struct kvm_create_guest_memfd")
KVM_PRE_FAULT_MEMORY = _iowr(0xD5, "struct kvm_pre_fault_memory")   # a vCPU ioctl (v6.11+)
# ioctls on a vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr(0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_NMI = _io(0x9A)
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_SUPPORTED_HV_CPUID = _iowr(0xC1, "struct kvm_cpuid2")

# Struct sizes fixed by the ABI (x86-64), including the series' unchanged-size rule for kvm_run.
ABI_SIZES = {
    "struct kvm_run": 2352,
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_xsave": 4096,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_userspace_memory_region2": 160,
    "struct kvm_create_guest_memfd": 64,
    "struct kvm_memory_attributes": 32,
    "struct kvm_mp_state": 4,
    "struct kvm_enable_cap": 104,
    "struct kvm_msi": 32,
    "struct kvm_lapic_state": 1024,
    "struct kvm_vcpu_events": 64,
    "struct kvm_msr_filter": 392,
    "struct kvm_translation": 24,
    "struct kvm_hyperv_exit": 136,
    "struct hv_send_ipi": 16,
    "struct hv_send_ipi_ex": 24,
    "struct kvm_pre_fault_memory": 64,
}

# Literal ioctl numbers from the spec's table (section 1), to catch a wrong struct definition.
SPEC_IOCTLS = {
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_RUN": 0xAE80,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_GET_SUPPORTED_HV_CPUID": 0xC008AEC1,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
}


def _check_abi() -> None:
    """Refuse to run with a struct whose size disagrees with the ABI or with its ioctl number."""
    for ctype, size in ABI_SIZES.items():
        if ffi.sizeof(ctype) != size:
            raise ImportError(f"kvmtests.uapi: sizeof({ctype}) = {ffi.sizeof(ctype)}, ABI says {size}")
    for name, value in SPEC_IOCTLS.items():
        if globals()[name] != value:
            raise ImportError(f"kvmtests.uapi: {name} = {globals()[name]:#x}, spec says {value:#x}")


_check_abi()

KVM_API_VERSION = 12

# Capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_HYPERV = 44
KVM_CAP_HYPERV_VP_INDEX = 149
KVM_CAP_HYPERV_CPUID = 167
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_SYS_HYPERV_CPUID = 191
KVM_CAP_HYPERV_ENFORCE_CPUID = 199
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_FAULT_EXIT_INSN_LEN = 236  # the series' number; upstream v6.11+ uses 236 for PRE_FAULT_MEMORY
KVM_CAP_PRE_FAULT_MEMORY = 236

# VM types
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1

# Exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37
KVM_EXIT_MEMORY_FAULT = 39

EXIT_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_EXIT_") and isinstance(v, int)}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# Hyper-V exit types
KVM_EXIT_HYPERV_SYNIC = 1
KVM_EXIT_HYPERV_HCALL = 2
KVM_EXIT_HYPERV_SYNDBG = 3

# System events
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4

# MP states (11 is the series')
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10
KVM_MP_STATE_HV_INACTIVE_VTL = 11

# Memory attributes (NR/NW/NX are the series')
KVM_MEMORY_ATTRIBUTE_NR = 1 << 0
KVM_MEMORY_ATTRIBUTE_NW = 1 << 1
KVM_MEMORY_ATTRIBUTE_NX = 1 << 2
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# Memory-fault exit flags (READ/WRITE/EXEC are the series')
KVM_MEMORY_EXIT_FLAG_READ = 1 << 0
KVM_MEMORY_EXIT_FLAG_WRITE = 1 << 1
KVM_MEMORY_EXIT_FLAG_EXEC = 1 << 2
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# Memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# User-space MSR exits
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0

KVM_MAX_CPUID_ENTRIES = 256


_ZERO = ffi.cast("unsigned long", 0)


def ioctl(fd: int, request: int, arg: object = _ZERO) -> tuple[int, int]:
    """One ioctl, never retried: (return value, errno); errno is 0 on success."""
    if not isinstance(arg, ffi.CData):
        arg = ffi.cast("unsigned long", arg)
    ret = _libc.ioctl(fd, request, arg)
    return (ret, ffi.errno if ret < 0 else 0)


PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
MADV_HUGEPAGE = 14
MAP_FAILED = 2**64 - 1


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> tuple[object, int]:
    """libc mmap: (pointer or None, errno)."""
    ptr = _libc.mmap(ffi.NULL, length, prot, flags, fd, offset)
    if int(ffi.cast("uintptr_t", ptr)) == MAP_FAILED:
        return (None, ffi.errno)
    return (ptr, 0)


def munmap(ptr: object, length: int) -> None:
    """libc munmap; a failure here is a bug in the suite."""
    if _libc.munmap(ptr, length) != 0:
        raise OSError(ffi.errno, "munmap")


def madvise(ptr: object, length: int, advice: int) -> int:
    """libc madvise: errno or 0."""
    return ffi.errno if _libc.madvise(ptr, length, advice) != 0 else 0


def bit_names(value: int, names: tuple[tuple[str, int], ...]) -> str:
    """Decode a flags word into NAME|NAME|0xrest for failure messages."""
    known = 0
    words = []
    for name, bit in names:
        known |= bit
        if value & bit:
            words.append(name)
    if value & ~known:
        words.append(hex(value & ~known))
    return "|".join(words) or "0"


def memory_fault_flag_names(flags: int) -> str:
    """Decode memory_fault.flags."""
    return bit_names(flags, (("READ", 1), ("WRITE", 2), ("EXEC", 4), ("PRIVATE", 8)))


def exit_name(reason: int) -> str:
    """KVM_EXIT_* name of an exit reason."""
    return EXIT_NAMES.get(reason, f"exit {reason}")


def errno_name(err: int) -> str:
    """E-name of an errno value (0 for success)."""
    return errno.errorcode.get(err, str(err)) if err else "0"


def page_size() -> int:
    """Host page size."""
    return os.sysconf("SC_PAGE_SIZE")
