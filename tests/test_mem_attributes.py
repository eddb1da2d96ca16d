"""KVM_SET_MEMORY_ATTRIBUTES validation (catalog section B): rows whose answer is the same with and
without the series run wherever the ioctl exists."""
import errno

import pytest

from kvmtests import uapi

PAGE = 0x1000
GPA = 0x200000


@pytest.fixture
def attrs_vm(vm):
    """A default VM on a kernel that implements KVM_SET_MEMORY_ATTRIBUTES."""
    ret, err = vm.set_memory_attributes(GPA, PAGE, 0)
    if err == errno.ENOTTY:
        pytest.skip("kernel lacks KVM_SET_MEMORY_ATTRIBUTES (ENOTTY: CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES is off)")
    return vm


def einval(vm, gpa: int, size: int, attributes: int, flags: int = 0, row: int = 0) -> None:
    ret, err = vm.set_memory_attributes(gpa, size, attributes, flags)
    assert (ret, err) == (-1, errno.EINVAL), (
        f"catalog {row}: KVM_SET_MEMORY_ATTRIBUTES(gpa {gpa:#x}, size {size:#x}, attributes {attributes:#x}, "
        f"flags {flags:#x}) returned {ret}/{uapi.errno_name(err)}, expected EINVAL")


@pytest.mark.parametrize("row,value", [
    pytest.param(20, 0x1, marks=pytest.mark.catalog(20), id="20-NR-alone"),
    pytest.param(21, 0x3, marks=pytest.mark.catalog(21), id="21-NR|NW"),
    pytest.param(22, 0x5, marks=pytest.mark.catalog(22), id="22-NR|NX"),
    pytest.param(23, 0x8, marks=pytest.mark.catalog(23), id="23-PRIVATE-on-default-VM"),
    *[pytest.param(24, v, marks=pytest.mark.catalog(24), id=f"24-{v:#x}") for v in (0x9, 0xA, 0xC, 0xF)],
    *[pytest.param(25, v, marks=pytest.mark.catalog(25), id=f"25-{v:#x}") for v in (0x10, 0x20, 1 << 63)],
])
def test_invalid_value_is_einval(attrs_vm, row, value):
    einval(attrs_vm, GPA, PAGE, value, row=row)


@pytest.mark.catalog(26)
def test_zero_on_a_range_without_attributes_succeeds(attrs_vm):
    assert attrs_vm.set_memory_attributes(GPA, 4 * PAGE, 0) == (0, 0)


@pytest.mark.catalog(27)
def test_nonzero_flags_is_einval(attrs_vm):
    einval(attrs_vm, GPA, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_NW, flags=1, row=27)


@pytest.mark.catalog(28)
def test_zero_size_is_einval(attrs_vm):
    einval(attrs_vm, GPA, 0, uapi.KVM_MEMORY_ATTRIBUTE_NW, row=28)


@pytest.mark.catalog(29)
@pytest.mark.parametrize("gpa,size", [(GPA + 0x800, PAGE), (GPA, PAGE + 0x800)], ids=["address", "size"])
def test_unaligned_range_is_einval(attrs_vm, gpa, size):
    einval(attrs_vm, gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_NW, row=29)


@pytest.mark.catalog(30)
def test_wrapping_range_is_einval(attrs_vm):
    einval(attrs_vm, 2**64 - PAGE, 2 * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_NW, row=30)
