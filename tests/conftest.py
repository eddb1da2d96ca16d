"""Fixtures shared by the test modules: each test owns its /dev/kvm handle and VMs."""
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

from kvmtests.machine import hyperv, memfault
from kvmtests.machine.kvm import Kvm, Vm
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
                              memfault.intel_ept(), memfault.tdp() is False)


@pytest.fixture
def fault_rule(series: object) -> memfault.FaultRule:
    """The shared insn_len expectation, so a wrong byte 56 fails every row that provokes an exit."""
    return fault_rule_for(series)


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
