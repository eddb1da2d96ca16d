"""The series' tracepoints (catalog section E, 71-79), read through a private tracefs instance that
records only this test's thread."""
import re
import threading
from collections.abc import Iterator

import pytest

from kvmtests import uapi
from kvmtests.machine import memfault, tracefs
from kvmtests.machine.memfault import PAGE, READ, WRITE

NW = uapi.KVM_MEMORY_ATTRIBUTE_NW
SET_NAME = tracefs.SET_ATTRS_EVENT.split("/")[1]
FAULTIN_NAME = tracefs.FAULTIN_EVENT.split("/")[1]
SET_PRINT = re.compile(r"gfn 0x([0-9a-f]+), cnt 0x([0-9a-f]+), attributes 0x([0-9a-f]+)$")
FAULTIN_PRINT = re.compile(r"vcpu (\d+) rip 0x([0-9a-f]+) gfn 0x([0-9a-f]+) access (\w) mem_attrs 0x([0-9a-f]+)$")
PAGE_A = 0x210000
PAGE_B = PAGE_A + PAGE

# (field, C type, offset, size) from the spec (P16, P17; offsets confirmed on a 6.12 port).
SET_FIELDS = [("start", "u64", 8, 8), ("cnt", "u64", 16, 8), ("attributes", "u64", 24, 8)]
FAULTIN_FIELDS = [("vcpu_id", "unsigned int", 8, 4), ("guest_rip", "unsigned long", 16, 8),
                  ("fault_address", "u64", 24, 8), ("write", "bool", 32, 1), ("exec", "bool", 33, 1),
                  ("mem_attrs", "u64", 40, 8)]


def set_events(trace: tracefs.Instance) -> list[tuple[int, int, int]]:
    """kvm_vm_set_mem_attributes records as (start gfn, count, attributes)."""
    out = []
    for text in trace.records(SET_NAME):
        match = SET_PRINT.search(text)
        assert match, f"catalog 72: cannot parse {SET_NAME} record {text!r}"
        out.append(tuple(int(g, 16) for g in match.groups()))
    return out


def faultin_events(trace: tracefs.Instance) -> list[dict]:
    out = []
    for text in trace.records(FAULTIN_NAME):
        match = FAULTIN_PRINT.search(text)
        assert match, f"catalog 77: cannot parse {FAULTIN_NAME} record {text!r}"
        vcpu, rip, addr, access, attrs = match.groups()
        out.append({"vcpu": int(vcpu), "rip": int(rip, 16), "address": int(addr, 16), "access": access,
                    "mem_attrs": int(attrs, 16)})
    return out


@pytest.fixture
def trace(series) -> Iterator[tracefs.Instance]:
    """Both events, in a private instance filtered to this thread; removed after the test."""
    series.require("attr_tracepoints")
    series.require("rwx_attributes")
    with tracefs.Instance([tracefs.SET_ATTRS_EVENT, tracefs.FAULTIN_EVENT], pid=threading.get_native_id()) as inst:
        yield inst


def check_format(event: str, fields: list[tuple[str, str, int, int]], row: int) -> None:
    text = tracefs.event_format(event)
    assert text is not None, f"catalog {row}: tracefs has no events/{event}"
    got = tracefs.format_fields(text)
    for name, ctype, offset, size in fields:
        assert name in got, f"catalog {row}: {event} has no field {name}; fields: {sorted(got)}"
        decl, off, sz = got[name]
        assert (decl.rsplit(" ", 1)[0], off, sz) == (ctype, offset, size), (
            f"catalog {row}: {event} field {name}: {decl!r} at offset {off} size {sz}, "
            f"expected {ctype} at {offset} size {size}")


@pytest.mark.parametrize("event,fields,row", [
    pytest.param(tracefs.SET_ATTRS_EVENT, SET_FIELDS, 71, marks=pytest.mark.catalog(71), id="71-set-attributes"),
    pytest.param(tracefs.FAULTIN_EVENT, FAULTIN_FIELDS, 76, marks=pytest.mark.catalog(76), id="76-faultin")])
def test_event_format(series, event, fields, row):
    """U: the series' event is absent. Upstream reused P17's name in 2025 for its own event (fields
    start, end, attr), so an event of that name without the series' fields is not P17's."""
    if series.patched("attr_tracepoints"):
        check_format(event, fields, row)
    else:
        text = tracefs.event_format(event)
        got = sorted(tracefs.format_fields(text)) if text is not None else None
        assert not tracefs.series_event(event), (
            f"catalog {row}: events/{event} exists with the series' fields {got} on a kernel detected without "
            f"P16/P17 ({series.detection('attr_tracepoints').how}): a partial backport?")


@pytest.mark.catalog(72, 73, 75)
def test_set_attributes_event_per_change(vm, trace):
    """One event per state change, with start gfn, page count and value; none for a no-op repeat."""
    memfault.require_ioctl(vm)
    memfault.set_attrs(vm, PAGE_A, 3 * PAGE, NW, 72)
    got = set_events(trace)
    assert got == [(PAGE_A >> 12, 3, NW)], f"catalog 72: events {got}, expected [({PAGE_A >> 12:#x}, 3, {NW:#x})]"
    trace.clear()
    memfault.set_attrs(vm, PAGE_A, 3 * PAGE, NW, 73)
    assert set_events(trace) == [], f"catalog 73: a no-op repeat emitted {set_events(trace)}"
    memfault.set_attrs(vm, PAGE_A, 3 * PAGE, 0, 75)
    got = set_events(trace)
    assert got == [(PAGE_A >> 12, 3, 0)], f"catalog 75: events {got}, expected [({PAGE_A >> 12:#x}, 3, 0)]"


@pytest.mark.catalog(74)
def test_rejected_set_emits_nothing(vm, trace):
    for value in (0x1, 0x8, 0x10):
        ret, err = vm.set_memory_attributes(PAGE_A, PAGE, value)
        assert ret == -1, f"catalog 74: attributes {value:#x} accepted (precondition: the spec says EINVAL)"
    assert set_events(trace) == [], f"catalog 74: rejected ioctls emitted {set_events(trace)}"


@pytest.fixture
def prober(vm, trace):
    p = memfault.build_prober(vm)
    memfault.set_attrs(vm, PAGE_A, PAGE, NW, 77)
    trace.clear()
    return p


@pytest.mark.catalog(77)
def test_denied_write_event(prober, trace):
    """write = 1, exec = 0, mem_attrs NW, the byte-exact GPA (label `gfn`), RIP of the write."""
    out = prober.access(WRITE, PAGE_A + 0x123, value=1)
    assert out.fault is not None, f"catalog 77: precondition: the write must fault; {out}"
    got = faultin_events(trace)
    want = {"vcpu": 0, "rip": prober.m.sym("mem_write"), "address": PAGE_A + 0x123, "access": "W", "mem_attrs": NW}
    assert got and all(e == want for e in got), f"catalog 77: events {got}, expected only {want}"


@pytest.mark.catalog(78)
def test_permitted_read_event(prober, trace):
    out = prober.access(READ, PAGE_A + 0x40)
    assert out.completed, f"catalog 78: precondition: the read of an NW page must complete; {out}"
    got = faultin_events(trace)
    want = {"vcpu": 0, "rip": prober.m.sym("mem_read"), "address": PAGE_A + 0x40, "access": "R", "mem_attrs": NW}
    assert want in got, f"catalog 78: events {got}, expected one {want}"


@pytest.mark.catalog(79)
def test_pages_without_attributes_emit_nothing(prober, trace):
    for kind in (READ, WRITE):
        out = prober.access(kind, PAGE_B + 0x40, value=1)
        assert out.completed, f"catalog 79: precondition: {out}"
    got = faultin_events(trace)
    assert got == [], f"catalog 79: accesses to attribute-0 pages emitted {got}"
