"""Fixtures shared by the test modules: each test owns its /dev/kvm handle and VMs."""
from collections.abc import Iterator

import pytest

from kvmtests.machine import memfault
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
