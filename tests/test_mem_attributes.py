"""KVM_SET_MEMORY_ATTRIBUTES: capability reporting (catalog 4-8) and validation (section B, 16-34),
the P15 value table 0x0-0xF x VM type with both expectations."""
import errno

import pytest

from kvmtests import uapi
from kvmtests.machine import memfault
from kvmtests.machine.memfault import PAGE, attr_names

GPA = 0x200000
NO_SLOT_GPA = 0x700000000
DEFAULT, SW_PROTECTED = "default", "sw_protected"

# Catalog row of each value on a default VM (section B); 0xB, 0xD, 0xE join row 24's list.
DEFAULT_ROW = {0x0: 26, 0x1: 20, 0x2: 16, 0x3: 21, 0x4: 17, 0x5: 22, 0x6: 18, 0x7: 19, 0x8: 23,
               **{v: 24 for v in range(0x9, 0x10)}, 0x10: 25, 0x20: 25, 1 << 63: 25}


def _rows() -> list:
    rows = [pytest.param(DEFAULT, v, marks=pytest.mark.catalog(row), id=f"{row}-default-{v:#x}")
            for v, row in DEFAULT_ROW.items()]
    rows += [pytest.param(SW_PROTECTED, v, marks=pytest.mark.catalog(32), id=f"32-sw_protected-{v:#x}")
             for v in [*range(0x10), 0x10]]
    return rows


@pytest.fixture
def make_vm(kvm):
    """A VM of the given kind on a kernel that implements KVM_SET_MEMORY_ATTRIBUTES."""
    vms = []

    def make(kind: str = DEFAULT):
        vm_type = memfault.sw_protected_vm_type(kvm) if kind == SW_PROTECTED else uapi.KVM_X86_DEFAULT_VM
        vms.append(kvm.create_vm(vm_type))
        memfault.require_ioctl(vms[-1])
        return vms[-1]
    yield make
    for vm in vms:
        vm.close()


def expect(vm, gpa: int, size: int, attributes: int, want: int, row: int, flags: int = 0) -> None:
    """want: 0 for success, else the errno."""
    ret, err = vm.set_memory_attributes_raw(gpa, size, attributes, flags)
    got = 0 if ret == 0 else err
    assert got == want, (
        f"catalog {row}: KVM_SET_MEMORY_ATTRIBUTES(gpa {gpa:#x}, size {size:#x}, attributes {attributes:#x} "
        f"({attr_names(attributes)}), flags {flags:#x}) returned {ret}/{uapi.errno_name(err)}, "
        f"expected {uapi.errno_name(want) if want else 0}")


@pytest.mark.parametrize("kind,value", _rows())
def test_attribute_value_table(make_vm, series, kind, value):
    """Spec P15 table: which values a VM accepts on an aligned 4 KiB page."""
    vm = make_vm(kind)
    valid = memfault.valid_values(series.patched("rwx_attributes"), kind == SW_PROTECTED)
    row = 32 if kind == SW_PROTECTED else DEFAULT_ROW[value]
    expect(vm, GPA, PAGE, value, 0 if value in valid else errno.EINVAL, row)


@pytest.mark.catalog(4)
def test_memory_fault_info_capability(kvm, vm):
    """Precondition of every memory-fault test: KVM_CAP_MEMORY_FAULT_INFO (232) reads 1.

    Upstream x86 reports it since KVM_EXIT_MEMORY_FAULT exists (the release that brought
    KVM_SET_MEMORY_ATTRIBUTES). A kernel with neither the capability nor the attributes ioctl predates
    both, and the row has no expectation there."""
    got = (kvm.check_extension(uapi.KVM_CAP_MEMORY_FAULT_INFO), vm.check_extension(uapi.KVM_CAP_MEMORY_FAULT_INFO))
    if got == (0, 0) and vm.set_memory_attributes_raw(GPA, PAGE, 0)[1] == errno.ENOTTY:
        pytest.skip("kernel predates KVM_EXIT_MEMORY_FAULT: no KVM_CAP_MEMORY_FAULT_INFO, no KVM_SET_MEMORY_ATTRIBUTES")
    assert got == (1, 1), f"catalog 4: KVM_CHECK_EXTENSION(232) on /dev/kvm, VM fd = {got}, expected (1, 1)"


@pytest.mark.catalog(5)
def test_supported_attributes_on_dev_kvm(kvm, series):
    got = kvm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    want = {0xF} if series.patched("rwx_attributes") else {0x0, 0x8}
    assert got in want, f"catalog 5: KVM_CHECK_EXTENSION(233) on /dev/kvm = {got:#x}, expected one of {sorted(want)}"


@pytest.mark.catalog(6)
def test_supported_attributes_on_default_vm(vm, series):
    got = vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    want = 0x7 if series.patched("rwx_attributes") else 0x0
    assert got == want, f"catalog 6: KVM_CHECK_EXTENSION(233) on a default VM = {got:#x}, expected {want:#x}"


@pytest.mark.catalog(7)
def test_supported_attributes_on_sw_protected_vm(kvm, series):
    with kvm.create_vm(memfault.sw_protected_vm_type(kvm)) as vm:
        got = vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    want = 0xF if series.patched("rwx_attributes") else 0x8
    assert got == want, f"catalog 7: KVM_CHECK_EXTENSION(233) on a SW_PROTECTED VM = {got:#x}, expected {want:#x}"


@pytest.mark.catalog(8)
@pytest.mark.group("vsm_hcalls")
def test_ioctl_exists_with_hyperv(kvm, vm, series):
    """P18 makes KVM_HYPERV select KVM_GENERIC_MEMORY_ATTRIBUTES; upstream may lack the ioctl (U: may be ENOTTY)."""
    if not kvm.check_extension(uapi.KVM_CAP_HYPERV):
        pytest.skip("kernel lacks KVM_CAP_HYPERV (CONFIG_KVM_HYPERV): the row is about Hyper-V builds")
    series.require("vsm_hcalls")
    ret, err = vm.set_memory_attributes_raw(GPA, PAGE, 0)
    assert err != errno.ENOTTY, f"catalog 8: KVM_SET_MEMORY_ATTRIBUTES returned {ret}/ENOTTY on a Hyper-V build with P18"


@pytest.mark.catalog(27)
def test_nonzero_flags_is_einval(make_vm):
    expect(make_vm(), GPA, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_NW, errno.EINVAL, 27, flags=1)


@pytest.mark.catalog(28)
def test_zero_size_is_einval(make_vm):
    expect(make_vm(), GPA, 0, uapi.KVM_MEMORY_ATTRIBUTE_NW, errno.EINVAL, 28)


@pytest.mark.catalog(29)
@pytest.mark.parametrize("gpa,size", [(GPA + 0x800, PAGE), (GPA, PAGE + 0x800)], ids=["address", "size"])
def test_unaligned_range_is_einval(make_vm, gpa, size):
    expect(make_vm(), gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_NW, errno.EINVAL, 29)


@pytest.mark.catalog(30)
def test_wrapping_range_is_einval(make_vm):
    expect(make_vm(), 2**64 - PAGE, 2 * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_NW, errno.EINVAL, 30)


@pytest.mark.catalog(26)
def test_zero_on_a_larger_range_without_attributes_succeeds(make_vm):
    expect(make_vm(), GPA, 4 * PAGE, 0, 0, 26)


@pytest.mark.catalog(31)
def test_range_without_memslot_accepts_nw(make_vm, series):
    want = 0 if series.patched("rwx_attributes") else errno.EINVAL
    expect(make_vm(), NO_SLOT_GPA, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_NW, want, 31)


@pytest.mark.catalog(33)
def test_private_converts_directly_to_nw_and_back(make_vm, series):
    series.require("rwx_attributes")
    vm = make_vm(SW_PROTECTED)
    for value in (uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, uapi.KVM_MEMORY_ATTRIBUTE_NW, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE):
        expect(vm, GPA, PAGE, value, 0, 33)


@pytest.mark.catalog(34)
def test_setting_the_value_a_range_already_has_succeeds(make_vm, series):
    value = uapi.KVM_MEMORY_ATTRIBUTE_NW if series.patched("rwx_attributes") else 0
    vm = make_vm()
    expect(vm, GPA, 2 * PAGE, value, 0, 34)
    expect(vm, GPA, 2 * PAGE, value, 0, 34)
