"""Self-check: every struct layout that the installed kernel headers also define matches the suite's."""
import importlib.util
import os
import shutil

import cffi
import pytest

from kvmtests import uapi
from kvmtests.uapi import ffi

pytestmark = pytest.mark.selftest

# (C expression path, header macro that proves the member exists in the installed headers or None)
MEMBERS = [
    ("kvm_run", "exit_reason", None), ("kvm_run", "immediate_exit", None), ("kvm_run", "if_flag", None),
    ("kvm_run", "cr8", None), ("kvm_run", "apic_base", None),
    ("kvm_run", "io.port", None), ("kvm_run", "io.size", None), ("kvm_run", "io.data_offset", None),
    ("kvm_run", "mmio.phys_addr", None), ("kvm_run", "mmio.data", None), ("kvm_run", "mmio.len", None),
    ("kvm_run", "mmio.is_write", None), ("kvm_run", "internal.suberror", None),
    ("kvm_run", "internal.data", None), ("kvm_run", "system_event.type", None),
    ("kvm_run", "system_event.ndata", None), ("kvm_run", "system_event.data", None),
    ("kvm_run", "msr.error", "KVM_EXIT_X86_RDMSR"), ("kvm_run", "msr.reason", "KVM_EXIT_X86_RDMSR"),
    ("kvm_run", "msr.index", "KVM_EXIT_X86_RDMSR"), ("kvm_run", "msr.data", "KVM_EXIT_X86_RDMSR"),
    ("kvm_run", "hyperv.type", None), ("kvm_run", "hyperv.u.hcall.input", None),
    ("kvm_run", "hyperv.u.hcall.result", None), ("kvm_run", "hyperv.u.hcall.params", None),
    ("kvm_run", "memory_fault.flags", "KVM_EXIT_MEMORY_FAULT"),
    ("kvm_run", "memory_fault.gpa", "KVM_EXIT_MEMORY_FAULT"),
    ("kvm_run", "memory_fault.size", "KVM_EXIT_MEMORY_FAULT"),
    ("kvm_run", "kvm_valid_regs", None), ("kvm_run", "kvm_dirty_regs", None), ("kvm_run", "s", None),
    ("kvm_regs", "rip", None), ("kvm_regs", "rflags", None), ("kvm_regs", "r15", None),
    ("kvm_sregs", "cs", None), ("kvm_sregs", "tr", None), ("kvm_sregs", "gdt", None), ("kvm_sregs", "cr0", None),
    ("kvm_sregs", "efer", None), ("kvm_sregs", "interrupt_bitmap", None),
    ("kvm_segment", "selector", None), ("kvm_segment", "unusable", None),
    ("kvm_fpu", "fcw", None), ("kvm_fpu", "last_ip", None), ("kvm_fpu", "xmm", None), ("kvm_fpu", "mxcsr", None),
    ("kvm_msrs", "entries", None), ("kvm_msr_entry", "data", None),
    ("kvm_cpuid2", "entries", None), ("kvm_cpuid_entry2", "edx", None), ("kvm_cpuid_entry2", "padding", None),
    ("kvm_userspace_memory_region", "userspace_addr", None),
    ("kvm_userspace_memory_region2", "guest_memfd", "KVM_SET_USER_MEMORY_REGION2"),
    ("kvm_userspace_memory_region2", "pad2", "KVM_SET_USER_MEMORY_REGION2"),
    ("kvm_memory_attributes", "attributes", "KVM_SET_MEMORY_ATTRIBUTES"),
    ("kvm_memory_attributes", "flags", "KVM_SET_MEMORY_ATTRIBUTES"),
    ("kvm_create_guest_memfd", "reserved", "KVM_CREATE_GUEST_MEMFD"),
    ("kvm_enable_cap", "args", None), ("kvm_enable_cap", "pad", None),
    ("kvm_msi", "data", None), ("kvm_msi", "devid", None),
    ("kvm_vcpu_events", "nmi", None), ("kvm_vcpu_events", "sipi_vector", None),
    ("kvm_vcpu_events", "exception_payload", None),
    ("kvm_msr_filter", "ranges", "KVM_X86_SET_MSR_FILTER"),
    ("kvm_msr_filter_range", "bitmap", "KVM_X86_SET_MSR_FILTER"),
    ("kvm_translation", "valid", None),
]
STRUCTS = sorted({s for s, _, _ in MEMBERS} | {"kvm_mp_state", "kvm_lapic_state", "kvm_xsave"})
_GATE = {s: g for s, _, g in MEMBERS if g and s != "kvm_run"}


def _ours(struct: str, member: str) -> int:
    path = member.split(".")
    if struct == "kvm_run" and path[0] not in dict(ffi.typeof("struct kvm_run").fields):
        path = ["x", *path]
    return ffi.offsetof(f"struct {struct}", *path)


def _gated(expr: str, gate: str | None) -> str:
    return f"#ifdef {gate}\n  {expr},\n#else\n  -1,\n#endif" if gate else f"  {expr},"


# Series-only values (or ones the series reuses) that no upstream header may be compared with.
SERIES_ONLY = {"KVM_CAP_FAULT_EXIT_INSN_LEN", "KVM_MP_STATE_HV_INACTIVE_VTL", "KVM_MEMORY_ATTRIBUTE_NR",
               "KVM_MEMORY_ATTRIBUTE_NW", "KVM_MEMORY_ATTRIBUTE_NX", "KVM_MEMORY_EXIT_FLAG_READ",
               "KVM_MEMORY_EXIT_FLAG_WRITE", "KVM_MEMORY_EXIT_FLAG_EXEC"}
CONSTANTS = sorted(n for n, v in vars(uapi).items() if n.startswith("KVM_") and isinstance(v, int)
                   and not isinstance(v, bool) and n not in SERIES_ONLY)


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    """Offsets and sizes as the installed <linux/kvm.h> sees them, compiled through cffi's API mode."""
    if shutil.which("gcc") is None or not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("needs gcc and the kernel UAPI headers (linux-libc-dev)")
    exprs = [_gated(f"(long)offsetof(struct {s}, {m})", g) for s, m, g in MEMBERS]
    exprs += [_gated(f"(long)sizeof(struct {s})", _GATE.get(s)) for s in STRUCTS]
    exprs += [_gated(f"(long)({n})", n) for n in CONSTANTS]
    api = cffi.FFI()
    api.cdef(f"extern const long layout[{len(exprs)}];")
    api.set_source("_kvmtests_headers", "#include <stddef.h>\n#include <linux/kvm.h>\n"
                   f"const long layout[{len(exprs)}] = {{\n" + "\n".join(exprs) + "\n};")
    tmp = tmp_path_factory.mktemp("headers")
    so = api.compile(tmpdir=str(tmp), verbose=False)
    spec = importlib.util.spec_from_file_location("_kvmtests_headers", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    values = list(mod.lib.layout)
    names = [f"{s}.{m}" for s, m, _ in MEMBERS] + [f"sizeof {s}" for s in STRUCTS] + CONSTANTS
    return dict(zip(names, values))


@pytest.mark.parametrize("struct,member", [(s, m) for s, m, _ in MEMBERS], ids=lambda v: v)
def test_member_offset_matches_installed_headers(headers, struct, member):
    theirs = headers[f"{struct}.{member}"]
    if theirs < 0:
        pytest.skip(f"installed headers predate struct {struct} member {member}")
    assert _ours(struct, member) == theirs, f"offsetof(struct {struct}, {member})"


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_size_matches_installed_headers(headers, struct):
    theirs = headers[f"sizeof {struct}"]
    if theirs < 0:
        pytest.skip(f"installed headers predate struct {struct}")
    assert ffi.sizeof(f"struct {struct}") == theirs, f"sizeof(struct {struct})"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_installed_headers(headers, name):
    theirs = headers[name]
    if theirs == -1 and getattr(uapi, name) != -1:
        pytest.skip(f"installed headers do not define {name}")
    assert getattr(uapi, name) == theirs, f"{name}: suite {getattr(uapi, name):#x}, <linux/kvm.h> {theirs:#x}"
