"""Fixtures shared by the test modules: each test owns its /dev/kvm handle and VMs."""
from collections.abc import Iterator

import pytest

from kvmtests.machine.kvm import Kvm, Vm


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as v:
        yield v
