"""Basic exits to userspace, exact to the byte: port I/O, MMIO, HLT, read-only memslots, guest exceptions."""
import pytest

from kvmtests import uapi
from kvmtests.machine import guest
from kvmtests.uapi import ffi

PIO_PORT, MMIO_GPA, RO_GPA = guest.PIO_PORT, guest.MMIO_GPA, guest.RO_GPA   # basic*.S get them as --defsym


@pytest.fixture
def basic(vm):
    def at(entry: str, **kw) -> guest.Machine:
        return guest.build_machine(vm, guest.load_payload("basic"), entry=entry, **kw)
    return at


def expect_exit(m: guest.Machine, reason: int) -> object:
    ex = m.vcpu.run()
    assert ex.ret == 0 and ex.reason == reason, f"expected {uapi.exit_name(reason)}, got {m.describe()}"
    return m.vcpu.run_struct


def io_data(m: guest.Machine) -> memoryview:
    io = m.vcpu.run_struct.x.io
    return ffi.buffer(ffi.cast("char *", m.vcpu.run_struct) + io.data_offset, io.size * io.count)


def test_pio_out_and_in_exits_are_exact(basic):
    m = basic("pio")
    for size, value in ((1, 0x78), (2, 0x5678), (4, 0x12345678)):
        run = expect_exit(m, uapi.KVM_EXIT_IO)
        io = run.x.io
        assert (io.direction, io.port, io.size, io.count) == (uapi.KVM_EXIT_IO_OUT, PIO_PORT, size, 1)
        assert int.from_bytes(io_data(m)[:], "little") == value, f"out of {size} bytes"
    for stage, size, value in ((1, 1, 0xA5), (2, 2, 0xBEEF), (3, 4, 0xDEADBEEF)):
        run = expect_exit(m, uapi.KVM_EXIT_IO)
        io = run.x.io
        assert (io.direction, io.port, io.size, io.count) == (uapi.KVM_EXIT_IO_IN, PIO_PORT, size, 1)
        io_data(m)[:] = value.to_bytes(size, "little")
        uc = m.run_until(guest.UCALL_SYNC)
        assert uc.args[0] == stage
        assert uc.args[1] & ((1 << (8 * size)) - 1) == value, f"in of {size} bytes: guest read {uc.args[1]:#x}"
    m.run_until(guest.UCALL_DONE)


def test_mmio_exits_are_exact(basic):
    m = basic("mmio")
    value = 0x1122334455667788
    for off, size in ((0, 1), (8, 2), (16, 4), (24, 8)):
        mmio = expect_exit(m, uapi.KVM_EXIT_MMIO).x.mmio
        assert (mmio.phys_addr, mmio.len, mmio.is_write) == (MMIO_GPA + off, size, 1)
        assert bytes(mmio.data[0:size]) == value.to_bytes(8, "little")[:size]
    mmio = expect_exit(m, uapi.KVM_EXIT_MMIO).x.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write) == (MMIO_GPA + 32, 8, 0)
    mmio.data[0:8] = list((0xCAFEF00DDEADBEEF).to_bytes(8, "little"))
    uc = m.run_until(guest.UCALL_SYNC)
    assert uc.args[1] == 0xCAFEF00DDEADBEEF, "the guest must read what userspace completed the MMIO read with"


def test_hlt_without_irqchip_exits(basic):
    m = basic("halt")
    expect_exit(m, uapi.KVM_EXIT_HLT)
    assert m.vcpu.get_regs().rip == m.sym("after_hlt"), "RIP must point past HLT"
    m.run_until(guest.UCALL_DONE)


def test_write_to_readonly_memslot_exits_as_mmio(vm, basic):
    m = basic("ro_write")
    ro = vm.add_region(1, RO_GPA, 0x1000, flags=uapi.KVM_MEM_READONLY)
    ro.write_u64(RO_GPA, 0x0123456789ABCDEF)
    uc = m.run_until(guest.UCALL_SYNC)
    assert uc.args[1] == 0x0123456789ABCDEF, "reads of a read-only slot come from memory"
    mmio = expect_exit(m, uapi.KVM_EXIT_MMIO).x.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write) == (RO_GPA + 8, 8, 1)
    assert int.from_bytes(bytes(mmio.data[0:8]), "little") == 0xABCDEF
    assert ro.read_u64(RO_GPA + 8) == 0, "the read-only slot must not be written"
    m.run_until(guest.UCALL_DONE)


@pytest.mark.parametrize("entry,cpl", [("ud", 0), ("user_ud", 3)])
def test_ud_is_reported_by_the_guest_handler(basic, entry, cpl):
    m = basic(entry)
    uc = m.run_until(guest.UCALL_EXCEPTION)
    assert uc.args[0] == guest.UD_VECTOR and uc.args[2] == m.sym("ud"), str(uc)
    m.set_resume(m.sym("ud_resume"))
    m.run_until(guest.UCALL_DONE)
    assert m.vcpu.get_sregs().cs.dpl == cpl


def test_32bit_protected_mode_guest_runs(vm):
    """The 32-bit builder: flat segments, CPL0, stack at STACK_TOP, port I/O and ucalls work."""
    m = guest.build_machine(vm, guest.load_payload("basic32", bits=32), bits=32)
    io = expect_exit(m, uapi.KVM_EXIT_IO).x.io
    assert (io.direction, io.port, io.size) == (uapi.KVM_EXIT_IO_OUT, PIO_PORT, 4)
    assert int.from_bytes(io_data(m)[:], "little") == 0xA1B2C3D4
    assert m.run_until(guest.UCALL_SYNC).args[1] == guest.STACK_TOP
    m.run_until(guest.UCALL_DONE)
    sregs = m.vcpu.get_sregs()
    assert (sregs.cs.db, sregs.cs.l, sregs.efer & guest.EFER_LMA) == (1, 0, 0), "must be 32-bit protected mode"


def test_32bit_ud_is_reported_by_the_guest_handler(vm):
    m = guest.build_machine(vm, guest.load_payload("basic32", bits=32), entry="ud", bits=32)
    uc = m.run_until(guest.UCALL_EXCEPTION)
    assert uc.args[0] == guest.UD_VECTOR and uc.args[2] == m.sym("ud"), str(uc)
    m.set_resume(m.sym("ud_resume"))
    m.run_until(guest.UCALL_DONE)
