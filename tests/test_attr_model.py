"""A Hypothesis state machine over KVM_SET_MEMORY_ATTRIBUTES: random ranges up to 1 GiB and values
(invalid ones too) against a per-page model, with guest reads, writes and executes on sampled pages
after every step. Without the series it checks that every restricting value is refused and that
nothing changes. Profiles: ci (default, short), long (env KVMTESTS_HYPOTHESIS_PROFILE=long) and qualify
(ci without shrinking: `kvmtests qualify` sets it, so a failing kernel gets its verdict fast); a failure
names the seed to rerun it (env KVMTESTS_HYPOTHESIS_SEED)."""
import errno
import os
import random

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from kvmtests import uapi
from kvmtests.machine import memfault
from kvmtests.machine.kvm import Kvm
from kvmtests.machine.memfault import EXEC, KINDS, PAGE, READ, WRITE, attr_names

PROFILE_ENV, SEED_ENV = "KVMTESTS_HYPOTHESIS_PROFILE", "KVMTESTS_HYPOTHESIS_SEED"
_common = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=8, stateful_step_count=8, **_common)
settings.register_profile("long", max_examples=400, stateful_step_count=40, **_common)
settings.register_profile("qualify", settings.get_profile("ci"), phases=[p for p in Phase if p != Phase.shrink])

SLOT_GPA, SLOT_END = 0x400000, 1 << 30           # test memory: slot 1, identity-mapped by the guest
FIRST_PAGE, END_PAGE = SLOT_GPA // PAGE, SLOT_END // PAGE
MAX_PAGES = (1 << 30) // PAGE                     # ranges up to 1 GiB (they may run past the slot)
HUGE_PAGES = 0x200000 // PAGE
VALUES = st.one_of(st.integers(0, 0xF), st.sampled_from([0x10, 0x20, 1 << 63]), st.integers(0, 2**64 - 1))
PAGES = st.integers(FIRST_PAGE, END_PAGE - 1)


class Expectations:
    """What the spec says for this kernel, fixed before the machine runs."""

    def __init__(self, patched: bool, flags: bool, private_vm: bool):
        self.patched, self.flags, self.private_vm = patched, flags, private_vm
        self.valid = memfault.valid_values(patched, private_vm)


class AttributeMachine(RuleBasedStateMachine):
    """Model: the successful KVM_SET_MEMORY_ATTRIBUTES calls (last one wins), the guest-written data,
    and the pages where a write after a permitted read/fetch of an NW page is a known v1 deviation."""

    expect: Expectations
    vm_type: int

    def __init__(self) -> None:
        super().__init__()
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm(self.vm_type)
        self.prober = memfault.build_prober(self.vm)
        self.vm.add_region(1, SLOT_GPA, SLOT_END - SLOT_GPA)
        self.sets: list[tuple[int, int, int]] = []
        self.data: dict[int, int] = {}
        self.exposed: set[int] = set()
        self.counter = 0

    def teardown(self) -> None:
        self.vm.close()
        self.kvm.close()

    def value(self, page: int) -> int:
        for start, end, value in reversed(self.sets):
            if start <= page < end:
                return value
        return 0

    @rule(start=PAGES, npages=st.integers(1, MAX_PAGES), value=VALUES, data=st.data())
    def set_attributes(self, start: int, npages: int, value: int, data: st.DataObject) -> None:
        ret, err = self.vm.set_memory_attributes(start * PAGE, npages * PAGE, value)
        want = 0 if value in self.expect.valid else errno.EINVAL
        row = "16-19" if want == 0 else "20-25"
        assert (0 if ret == 0 else err) == want, (
            f"catalog {row}/32: KVM_SET_MEMORY_ATTRIBUTES({start * PAGE:#x}, {npages * PAGE:#x}, {value:#x} "
            f"= {attr_names(value)}) returned {ret}/{uapi.errno_name(err)}, expected {uapi.errno_name(want) or 0}")
        end = start + npages
        if ret == 0:
            self.exposed = {p for p in self.exposed if not (start <= p < end and self.value(p) != value)}
            self.sets.append((start, end, value))
        for page in {start, min(end, END_PAGE) - 1, data.draw(PAGES, label="random page")}:
            self.check(page, data.draw(st.sampled_from(KINDS), label=f"access to page {page:#x}"))

    @rule(page=PAGES, kind=st.sampled_from(KINDS))
    def access(self, page: int, kind: str) -> None:
        self.check(page, kind)

    @precondition(lambda self: bool(self.sets))
    @rule(data=st.data())
    def access_last_range(self, data: st.DataObject) -> None:
        start, end, _ = self.sets[-1]
        page = data.draw(st.integers(start, min(end, END_PAGE) - 1), label="page of the last range")
        self.check(page, data.draw(st.sampled_from(KINDS), label="access"))

    def check(self, page: int, kind: str) -> None:
        """One guest access to `page`, compared with the model."""
        gpa, value = page * PAGE, self.value(page)
        self.counter += 1
        if kind == EXEC:
            addr = self.prober.place_ret(gpa)
        else:
            addr = gpa
        out = self.prober.access(kind, addr, value=self.counter)
        private = self.expect.private_vm and value == uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        denied = private or bool(value & memfault.DENIED_BY[kind])
        what = f"{out} with attributes {attr_names(value)}"
        if kind == WRITE and denied and page in self.exposed:
            if out.completed:   # catalog 43/49b/50: known v1 deviation, checked strictly in test_fault_exit
                self.data[page] = self.counter
                return
        if denied:
            flags = (memfault.FLAG_OF[kind] if self.expect.flags else 0) | (uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)
            memfault.expect_fault(out, kind, gpa, "35/41/44" if not private else "59-61", flags)
            return
        memfault.expect_done(out, f"39/40/42/53 ({what})")
        if kind == READ:
            assert out.value == self.data.get(page, 0), f"catalog 39/42: {what}: read {out.value:#x}, expected {self.data.get(page, 0):#x}"
        elif kind == WRITE:
            self.data[page] = self.counter
        if value & uapi.KVM_MEMORY_ATTRIBUTE_NW and kind != WRITE:
            region = page - page % HUGE_PAGES
            self.exposed.update(p for p in range(region, region + HUGE_PAGES) if self.value(p) == value)


def run_seeded(machine: type) -> None:
    """Run the machine under the selected profile; a failure names the seed that reproduces it."""
    profile = os.environ.get(PROFILE_ENV, "ci")
    chosen = int(os.environ.get(SEED_ENV) or random.SystemRandom().getrandbits(32))
    try:
        run_state_machine_as_test(seed(chosen)(machine), settings=settings.get_profile(profile))
    except Exception as e:
        e.add_note(f"reproduce with {SEED_ENV}={chosen} {PROFILE_ENV}={profile}")
        raise


@pytest.mark.parametrize("kind", [
    pytest.param("default", marks=pytest.mark.catalog(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 35, 39, 40, 41, 42, 44,
                                                      47, 53), id="default-vm"),
    pytest.param("sw_protected", marks=pytest.mark.catalog(32, 59, 60, 61), id="sw-protected-vm")])
def test_attribute_state_machine(kvm, series, kind):
    vm_type = memfault.sw_protected_vm_type(kvm) if kind == "sw_protected" else uapi.KVM_X86_DEFAULT_VM
    with kvm.create_vm(vm_type) as vm:
        memfault.require_ioctl(vm)
    patched = series.patched("rwx_attributes")
    if patched:
        memfault.require_tdp()
    faults = patched or kind == "sw_protected"
    flags = series.patched("fault_rwx_flags") if faults else False
    machine = type("AttributeMachineRun", (AttributeMachine,),
                   {"expect": Expectations(patched, flags, kind == "sw_protected"), "vm_type": vm_type})
    run_seeded(machine)
