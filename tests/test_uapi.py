"""The suite's own UAPI: the series' layouts (catalog 1, 2, 136-138), ABI sizes and ioctl numbers."""
import pytest

from kvmtests import hvtlfs, uapi
from kvmtests.uapi import ffi

pytestmark = pytest.mark.nokvm


def run_offset(*path: str | int) -> int:
    return ffi.offsetof("struct kvm_run", "x", *path)


@pytest.mark.catalog(1)
@pytest.mark.parametrize("field,offset,size", [("flags", 32, 8), ("gpa", 40, 8), ("size", 48, 8),
                                               ("insn_len", 56, 1)])
def test_memory_fault_layout(field, offset, size):
    assert run_offset("memory_fault", field) == offset, f"catalog 1: kvm_run offset of memory_fault.{field}"
    fields = dict(ffi.typeof(ffi.new("struct kvm_run *").x.memory_fault).fields)
    assert ffi.sizeof(fields[field].type) == size


@pytest.mark.catalog(2)
@pytest.mark.parametrize("path,offset", [(("input",), 40), (("result",), 48), (("params", 0), 56),
                                         (("params", 1), 64)]
                         + [(("xmm", i, "low"), 72 + 16 * i) for i in range(6)]
                         + [(("xmm", i, "high"), 80 + 16 * i) for i in range(6)],
                         ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_hcall_layout(path, offset):
    assert run_offset("hyperv", "u", "hcall", *path) == offset, f"catalog 2: kvm_run offset of hcall.{path}"


@pytest.mark.catalog(2)
def test_hyperv_exit_grows_inside_the_run_union():
    assert ffi.sizeof("struct kvm_hyperv_exit") == 136
    assert ffi.offsetof("struct kvm_run", "kvm_valid_regs") == 288, "fields after the exit union must not move"


@pytest.mark.catalog(136)
@pytest.mark.parametrize("field,offset,size", [("vector", 0, 4), ("in_vtl", 4, 1), ("reserved", 5, 3),
                                               ("cpu_mask", 8, 8)])
def test_hv_send_ipi_layout(field, offset, size):
    assert ffi.offsetof("struct hv_send_ipi", field) == offset
    assert dict(ffi.typeof("struct hv_send_ipi").fields)[field].type.cname in (
        {4: "uint32_t", 1: "uint8_t", 3: "uint8_t[3]", 8: "uint64_t"}[size],)
    assert ffi.sizeof("struct hv_send_ipi") == 16


@pytest.mark.catalog(137)
@pytest.mark.parametrize("path,offset", [(("vector",), 0), (("in_vtl",), 4), (("vp_set", "format"), 8),
                                         (("vp_set", "valid_bank_mask"), 16), (("vp_set", "bank_contents"), 24)],
                         ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v))
def test_hv_send_ipi_ex_layout(path, offset):
    assert ffi.offsetof("struct hv_send_ipi_ex", *path) == offset


@pytest.mark.catalog(138)
def test_hv_input_vtl_bits():
    """use_target_vtl is bit 4 of the in_vtl byte and target_vtl bits 0-3: fast RDX bit 36 and bits 32-35."""
    assert hvtlfs.HV_INPUT_VTL_USE_TARGET_VTL == 1 << 4
    ipi = ffi.new("struct hv_send_ipi *", {"vector": 0x30, "in_vtl": hvtlfs.HV_INPUT_VTL_USE_TARGET_VTL | 2})
    rdx = int.from_bytes(ffi.buffer(ipi)[0:8], "little")
    assert rdx == 0x30 | (1 << 36) | (2 << 32)


def test_ioctl_numbers_match_the_spec_table():
    for name, value in uapi.SPEC_IOCTLS.items():
        assert getattr(uapi, name) == value, f"{name}: {getattr(uapi, name):#x} != spec {value:#x}"


@pytest.mark.parametrize("ctype", sorted(uapi.ABI_SIZES))
def test_struct_size_matches_the_abi(ctype):
    assert ffi.sizeof(ctype) == uapi.ABI_SIZES[ctype]
