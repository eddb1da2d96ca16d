"""Fixtures shared by the test modules: each test owns its /dev/kvm handle and VMs."""
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

from kvmtests import uapi
from kvmtests.machine import host, hyperv, memfault
from kvmtests.machine.kvm import Exit, Kvm, Vm
from kvmtests.verdict import features


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as v:
        yield v


def fault_rule_for(series: object) -> memfault.FaultRule:
    """What insn_len every memory-fault exit must carry: P11 as detected, the CPU's reporting, the paging mode."""
    state = series.detection("fault_insn_len").state
    return memfault.FaultRule(None if state == features.UNKNOWN else state == features.PRESENT,
                              host.intel_ept(), host.tdp_on() is False)


@pytest.fixture
def fault_rule(series: object) -> memfault.FaultRule:
    """The shared insn_len expectation, so a wrong byte 56 fails every row that provokes an exit."""
    return fault_rule_for(series)


@pytest.fixture
def xmm_capture(series: object) -> bool | None:
    """What hcall.xmm of a fast exit must hold (hvexits): XMM0-5 where P01 is detected or required, the sentinel
    where it is absent, either where detection cannot tell; so every row with a fast exit checks it."""
    state = series.detection("xmm_output").state
    if state == features.PRESENT or "xmm_output" in series.required:
        return True
    return False if state == features.ABSENT else None


class Deviation:
    """A catalog warning row: a strict xfail when v1's behaviour is seen; when it is not, a strict unexpected
    pass whose message says what the kernel does now, not the old deviation's text."""

    def __init__(self, request: pytest.FixtureRequest, reason: str):
        self.request, self.reason = request, reason

    def seen(self, observed: str) -> NoReturn:
        """v1's deviation, exactly: the row is a known deviation; any other failure stays a failure."""
        self.request.applymarker(pytest.mark.xfail(strict=True, raises=hyperv.KnownDeviation, reason=self.reason))
        raise hyperv.KnownDeviation(observed)

    def gone(self, now: str) -> None:
        """The row met the documented intent: an unexpected pass that names what the kernel now does."""
        self.request.applymarker(pytest.mark.xfail(
            strict=True, reason=f"{now} (the known v1 deviation is gone: update the catalog's warning item)"))


@pytest.fixture
def known_deviation(request: pytest.FixtureRequest) -> Callable[[str], Deviation]:
    """Make a Deviation for this row from its warning text."""
    return lambda reason: Deviation(request, reason)


class MarkerRecorder:
    """Stands in for pytest's request: records the markers a row applies to itself."""

    def __init__(self) -> None:
        self.markers: list = []

    def applymarker(self, marker: object) -> None:
        self.markers.append(marker)


@pytest.fixture
def marker_recorder() -> MarkerRecorder:
    """For self-tests of the helpers that mark a row as a known deviation."""
    return MarkerRecorder()


class CraftedVcpu:
    """A vCPU whose KVM_RUN returns ret/errno and writes exit_reason (unless None) and the memory_fault fields given."""

    id = 0

    def __init__(self, ret: int, err: int, reason: int | None, **fields: int):
        self.run_struct = uapi.ffi.new("struct kvm_run *")
        self.ret, self.err, self.reason, self.fields = ret, err, reason, fields
        self.last_exit: Exit | None = None
        self.regs = uapi.ffi.new("struct kvm_regs *", {"rip": 0x101000, "rax": 0x5A})

    def run(self, timeout: float) -> Exit:
        if self.reason is not None:
            self.run_struct.exit_reason = self.reason
        for name, value in self.fields.items():
            setattr(self.run_struct.x.memory_fault, name, value)
        self.last_exit = Exit(self.ret, self.err, self.run_struct.exit_reason)
        return self.last_exit

    def get_regs(self) -> object:
        return self.regs


@pytest.fixture
def crafted_vcpu() -> type[CraftedVcpu]:
    """For self-tests of the helpers that run a vCPU and read its exit (memfault.run_for_fault and its users)."""
    return CraftedVcpu
