"""VM and vCPU lifecycle: creation, errors, and every fd and mapping released."""
import errno
import os


from kvmtests import uapi
from kvmtests.machine import guest
from kvmtests.machine.kvm import Kvm


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_api_version(kvm):
    assert uapi.ioctl(kvm.fd, uapi.KVM_GET_API_VERSION) == (12, 0)


def test_vm_with_vcpus_releases_every_fd_and_mapping():
    before_fds, before_maps = open_fds(), mappings()
    for _ in range(3):
        with Kvm() as kvm, kvm.create_vm() as vm:
            guest.build_machine(vm, guest.load_payload("basic"), vcpus=2)
            assert len(vm.vcpus) == 2
    assert open_fds() == before_fds
    assert mappings() == before_maps


def test_unknown_vm_type_is_einval(kvm):
    ret, err = kvm.create_vm_raw(0x7F)
    assert (ret, err) == (-1, errno.EINVAL), f"KVM_CREATE_VM(0x7f): {ret}, {uapi.errno_name(err)}"


def test_duplicate_vcpu_id_is_eexist(vm):
    vm.create_vcpu(0)
    ret, err = vm.create_vcpu_raw(0)
    assert (ret, err) == (-1, errno.EEXIST), f"second KVM_CREATE_VCPU(0): {ret}, {uapi.errno_name(err)}"


def test_vcpu_mmap_size_holds_kvm_run(kvm):
    assert kvm.vcpu_mmap_size() >= uapi.ffi.sizeof("struct kvm_run")


def test_memslot_delete_and_readd(vm):
    region = vm.add_region(1, 0x1000000, 0x200000)
    vm.remove_region(region)
    vm.add_region(1, 0x1000000, 0x200000)


def test_overlapping_memslot_is_eexist(vm):
    vm.add_region(1, 0x1000000, 0x200000)
    region = vm.regions[0]
    ret, err = vm.set_user_memory_region_raw(2, 0x1100000, 0x200000, region.hva)
    assert (ret, err) == (-1, errno.EEXIST), f"overlapping slot: {ret}, {uapi.errno_name(err)}"


def test_watchdog_bounds_a_guest_that_never_exits(vm):
    """A guest spinning in `jmp .` must come back as a timeout outcome naming RIP, never a hang.

    It spins with RFLAGS.IF = 1, which changes nothing for the host's kick (the guest has no interrupt
    source): Bochs (qualify --cpu intel) never interrupts an L2 running with IF = 0, so there a spin with
    interrupts off could not be kicked out at all (spec section 5)."""
    m = guest.build_machine(vm, guest.load_payload("basic"), entry="spin")
    regs = m.vcpu.get_regs()
    regs.rflags |= guest.RFLAGS_IF
    m.vcpu.set_regs(regs)
    ex = m.vcpu.run(timeout=0.5)
    assert ex.timed_out, f"expected a watchdog timeout, got {m.describe()}"
    assert ex.errno == errno.EINTR
    text = m.describe()
    assert f"RIP {m.sym('spin'):#x}" in text and "watchdog timeout" in text, text
    ex = m.vcpu.run(timeout=0.2)
    assert ex.timed_out, "a second bounded run after a timeout must behave the same"


def test_vcpu_state_round_trips(vm):
    """The state accessors the tests rely on: what is set is what KVM_GET_* returns."""
    m = guest.build_machine(vm, guest.load_payload("basic"))
    vcpu = m.vcpu
    fpu = vcpu.get_fpu()
    fpu.xmm[3][0:16] = list(range(16))
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    assert bytes(vcpu.get_fpu().xmm[3][0:16]) == bytes(range(16)), "KVM_SET_FPU/KVM_GET_FPU xmm3"
    xsave = vcpu.get_xsave()
    vcpu.set_xsave(xsave)
    assert bytes(uapi.ffi.buffer(vcpu.get_xsave()))[:512] == bytes(uapi.ffi.buffer(xsave))[:512], "legacy area"
    events = vcpu.get_events()
    events.nmi.masked = 1
    vcpu.set_events(events)
    assert vcpu.get_events().nmi.masked == 1, "KVM_SET_VCPU_EVENTS nmi.masked"
    sysenter_cs = 0x174
    assert vcpu.set_msrs({sysenter_cs: 0x1234}) == 1
    assert vcpu.get_msrs([sysenter_cs]) == {sysenter_cs: 0x1234}, "KVM_SET_MSRS/KVM_GET_MSRS IA32_SYSENTER_CS"
