"""The series' tracepoints (catalog section E, 71-79), read through two private tracefs instances that
record only this test's thread: one prints every field's raw value (options/fields), the other the
event's own print format, and each record must agree with the spec in both."""
import re
import threading
from collections.abc import Callable, Iterator

import pytest

from kvmtests import uapi
from kvmtests.machine import host, memfault, tracefs
from kvmtests.machine.kvm import Unavailable
from kvmtests.machine.memfault import EXEC, PAGE, READ, WRITE, attr_names

NR, NW, NX = uapi.KVM_MEMORY_ATTRIBUTE_NR, uapi.KVM_MEMORY_ATTRIBUTE_NW, uapi.KVM_MEMORY_ATTRIBUTE_NX
EVENTS = [tracefs.SET_ATTRS_EVENT, tracefs.FAULTIN_EVENT]
SET_NAME = tracefs.SET_ATTRS_EVENT.split("/")[1]
FAULTIN_NAME = tracefs.FAULTIN_EVENT.split("/")[1]
SET_PRINT = re.compile(r"gfn 0x([0-9a-f]+), cnt 0x([0-9a-f]+), attributes 0x([0-9a-f]+)$")
FAULTIN_PRINT = re.compile(r"vcpu (\d+) rip 0x([0-9a-f]+) gfn 0x([0-9a-f]+) access (\w) mem_attrs 0x([0-9a-f]+)$")
PAGE_A = 0x210000
PAGE_B = PAGE_A + PAGE
OFF = 0x123                                  # data accesses: byte-exact fault_address (catalog 77)
FAR = 0x1_0000_0000                          # set-attributes ranges need no memslot (catalog 31)
HUGE = 0x200000
SLOT_GPA = 0x400000                          # a 2 MiB-aligned memslot the guest maps (identity)

# (field, C type, offset, size) from the spec (P16, P17; offsets confirmed on a 6.12 port).
SET_FIELDS = [("start", "u64", 8, 8), ("cnt", "u64", 16, 8), ("attributes", "u64", 24, 8)]
FAULTIN_FIELDS = [("vcpu_id", "unsigned int", 8, 4), ("guest_rip", "unsigned long", 16, 8),
                  ("fault_address", "u64", 24, 8), ("write", "bool", 32, 1), ("exec", "bool", 33, 1),
                  ("mem_attrs", "u64", 40, 8)]


def set_event(gpa: int, pages: int, value: int) -> dict[str, int]:
    """P17: start = first gfn, cnt = pages of the whole requested range, attributes = the new value."""
    return {"start": gpa >> 12, "cnt": pages, "attributes": value}


def faultin_event(vcpu: int, rip: int, address: int, kind: str, attrs: int) -> dict[str, int]:
    """P16: the faulting vCPU and RIP, fault->addr (the GPA under TDP), write/exec of the access, attributes."""
    return {"vcpu_id": vcpu, "guest_rip": rip, "fault_address": address, "write": int(kind == WRITE),
            "exec": int(kind == EXEC), "mem_attrs": attrs}


class Trace:
    """The same events seen raw (every field) and printed; reading checks that both views agree."""

    def __init__(self, raw: tracefs.Instance, printed: tracefs.Instance):
        self.raw, self.printed = raw, printed

    def clear(self) -> None:
        self.raw.clear()
        self.printed.clear()

    def events(self, name: str, fields: list, pattern: re.Pattern, row: int,
               show: Callable[[dict[str, int]], str]) -> list[dict[str, int]]:
        """Every field of each `name` record read raw, after checking the printed records say the same."""
        got = [{k: e.get(k) for k, *_ in fields} for e in self.raw.field_records(name)]
        shown = [show(e) for e in got]
        printed = self.printed.records(name)
        assert all(pattern.search(p) for p in printed) and printed == shown, (
            f"catalog {row}: {name} printed {printed}, expected {shown} (print format of its fields {got})")
        return got

    def set_events(self) -> list[dict[str, int]]:
        return self.events(SET_NAME, SET_FIELDS, SET_PRINT, 72,
                           lambda e: f"gfn {e['start']:#x}, cnt {e['cnt']:#x}, attributes {e['attributes']:#x}")

    def faultin_events(self) -> list[dict[str, int]]:
        return self.events(FAULTIN_NAME, FAULTIN_FIELDS, FAULTIN_PRINT, 77,
                           lambda e: f"vcpu {e['vcpu_id']} rip {e['guest_rip']:#x} gfn 0x{e['fault_address']:016x} "
                                     f"access {'X' if e['exec'] else 'W' if e['write'] else 'R'} "
                                     f"mem_attrs {e['mem_attrs']:#x}")

@pytest.fixture
def trace(series) -> Iterator[Trace]:
    """Both events in two private instances filtered to this thread; removed after the test."""
    series.require("attr_tracepoints")
    series.require("rwx_attributes")
    if not tracefs.fields_option():
        raise Unavailable("needs tracefs options/fields (Linux 6.3 or later) to read every field of an event")
    tid = threading.get_native_id()
    with tracefs.Instance(EVENTS, pid=tid, fields=True) as raw, tracefs.Instance(EVENTS, pid=tid) as printed:
        yield Trace(raw, printed)


def set_attrs(series, vm, gpa: int, size: int, value: int) -> None:
    """An attribute change the test relies on: rwx_attributes' job (catalog 16-19, 26), not the tracepoint's."""
    with series.precondition("rwx_attributes", f"KVM_SET_MEMORY_ATTRIBUTES({attr_names(value)}) succeeds"):
        memfault.set_attrs(vm, gpa, size, value, 16)


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


# Steps (gpa, pages, value, emits): an event only where the state changes (72, 75), with the whole range.
SET_SITUATIONS = {
    "one-page": [(FAR, 1, NW, True), (FAR, 1, NW, False)],
    "many-pages": [(FAR, 300, NX, True), (FAR, 300, NX, False)],
    "huge-page-aligned": [(FAR + HUGE, 512, NW | NX, True), (FAR + HUGE, 1024, NR | NW | NX, True)],
    "range-that-clears": [(FAR + 2 * PAGE, 3, NW, True), (FAR, 8, 0, True), (FAR, 8, 0, False)],
    "range-that-partly-changes": [(FAR, 4, NX, True), (FAR, 8, NX, True), (FAR + 4 * PAGE, 4, NX, False)],
}


@pytest.mark.parametrize("steps", [pytest.param(steps, marks=pytest.mark.catalog(72, 73, 75), id=name)
                                   for name, steps in SET_SITUATIONS.items()])
def test_set_attributes_event(vm, series, trace, steps):
    """Every field after every step: one event per change (start gfn, the whole range's page count, value),
    none for a call that changes nothing."""
    memfault.require_ioctl(vm)
    for gpa, pages, value, emits in steps:
        trace.clear()
        set_attrs(series, vm, gpa, pages * PAGE, value)
        got, want = trace.set_events(), [set_event(gpa, pages, value)] if emits else []
        row = (75 if value == 0 else 72) if emits else 73
        assert got == want, (f"catalog {row}: KVM_SET_MEMORY_ATTRIBUTES(gpa {gpa:#x}, {pages} pages, "
                             f"{attr_names(value)}): events {got}, expected {want}")


@pytest.mark.catalog(74)
def test_rejected_set_emits_nothing(vm, series, trace):
    for value, row in ((0x1, 20), (0x3, 21), (0x8, 23), (0x10, 25)):
        with series.precondition("rwx_attributes", f"catalog {row}: attributes {value:#x} are rejected with EINVAL"):
            ret, err = vm.set_memory_attributes_raw(PAGE_A, PAGE, value)
            assert ret == -1, f"KVM_SET_MEMORY_ATTRIBUTES({value:#x}) returned {ret}"
    assert trace.set_events() == [], f"catalog 74: rejected ioctls emitted {trace.set_events()}"


@pytest.fixture
def prober(vm, series, trace, fault_rule):
    host.require_tdp()
    p = memfault.build_prober(vm, rule=fault_rule)
    for page in (PAGE_A, PAGE_B):
        p.place_ret(page)
    return p


def target(kind: str, page: int) -> int:
    return page + (memfault.EXEC_OFFSET if kind == EXEC else OFF)


def access(series, p: memfault.Prober, kind: str, gpa: int, attrs: int, vcpu=None) -> None:
    """One guest access whose outcome is rwx_attributes' (catalog 35-44; upstream's for attributes 0): denied
    or completed as specified."""
    denied = bool(attrs & memfault.DENIED_BY[kind])
    with series.precondition("rwx_attributes" if attrs else "core", f"a guest {kind} of a {attr_names(attrs)} "
                             f"page is {'denied' if denied else 'completed'} (catalog 35-44)"):
        out = p.access(kind, gpa, value=1, vcpu=vcpu)
        assert (out.fault is not None) if denied else out.completed, str(out)


def rip_of(p: memfault.Prober, kind: str, gpa: int) -> int:
    """The faulting instruction: the access itself, or for an execute the fetched target."""
    return gpa if kind == EXEC else p.m.sym(memfault.ENTRY[kind])


FAULTIN_SITUATIONS = [(attrs, kind) for attrs in (NW, NX, NW | NX, NR | NW | NX) for kind in (READ, WRITE, EXEC)]


@pytest.mark.parametrize("attrs,kind", [
    pytest.param(attrs, kind, marks=pytest.mark.catalog(77 if attrs & memfault.DENIED_BY[kind] else 78),
                 id=f"{77 if attrs & memfault.DENIED_BY[kind] else 78}-{attr_names(attrs)}-{kind}")
    for attrs, kind in FAULTIN_SITUATIONS])
def test_faultin_event_of_each_access(prober, series, trace, attrs, kind):
    """The first access to a freshly restricted page, allowed or denied: every event it emits names vCPU 0,
    the faulting RIP, the byte-exact GPA (for a fetch: the target's page; the spec fixes the byte for data
    accesses), write/exec of the access and the page's attributes."""
    set_attrs(series, prober.m.vm, PAGE_A, PAGE, attrs)
    trace.clear()
    gpa = target(kind, PAGE_A)
    access(series, prober, kind, gpa, attrs)
    got = trace.faultin_events()
    want = faultin_event(0, rip_of(prober, kind, gpa), gpa, kind, attrs)
    if kind == EXEC:
        got = [e | {"fault_address": gpa} if e["fault_address"] >> 12 == gpa >> 12 else e for e in got]
    row = 77 if attrs & memfault.DENIED_BY[kind] else 78
    assert got and all(e == want for e in got), f"catalog {row}: events {got}, expected only {want}"


@pytest.mark.catalog(77, 79)
def test_faultin_events_across_a_huge_page_aligned_range(prober, series, trace):
    """NW on a whole 2 MiB-aligned memslot: a write to its first, a middle and its last page each emits its
    own event; after the range is cleared, writes there emit nothing."""
    vm = prober.m.vm
    vm.add_region(1, SLOT_GPA, HUGE)
    set_attrs(series, vm, SLOT_GPA, HUGE, NW)
    for page in (SLOT_GPA, SLOT_GPA + HUGE // 2, SLOT_GPA + HUGE - PAGE):
        trace.clear()
        access(series, prober, WRITE, page + OFF, NW)
        got, want = trace.faultin_events(), faultin_event(0, rip_of(prober, WRITE, 0), page + OFF, WRITE, NW)
        assert got and all(e == want for e in got), f"catalog 77: write to {page + OFF:#x}: events {got}, expected only {want}"
    set_attrs(series, vm, SLOT_GPA, HUGE, 0)
    trace.clear()
    for page in (SLOT_GPA, SLOT_GPA + HUGE - PAGE):
        access(series, prober, WRITE, page + OFF, 0)
    assert trace.faultin_events() == [], f"catalog 79: writes after clearing emitted {trace.faultin_events()}"


@pytest.mark.catalog(77)
def test_faultin_event_names_the_vcpu(vm, series, trace, fault_rule):
    """Two vCPUs, each denied a write on its own NW page: each event carries the faulting vCPU's id."""
    host.require_tdp()
    p = memfault.build_prober(vm, vcpus=2, rule=fault_rule)
    set_attrs(series, vm, PAGE_A, 2 * PAGE, NW)
    for vcpu, page in zip(p.m.vcpus[::-1], (PAGE_A, PAGE_B)):
        trace.clear()
        access(series, p, WRITE, page + OFF, NW, vcpu)
        got, want = trace.faultin_events(), faultin_event(vcpu.id, rip_of(p, WRITE, 0), page + OFF, WRITE, NW)
        assert got and all(e == want for e in got), f"catalog 77: vCPU {vcpu.id}: events {got}, expected only {want}"


@pytest.mark.catalog(79)
def test_pages_without_attributes_emit_nothing(prober, series, trace):
    for kind in (READ, WRITE, EXEC):
        access(series, prober, kind, target(kind, PAGE_B), 0)
    got = trace.faultin_events()
    assert got == [], f"catalog 79: accesses to attribute-0 pages emitted {got}"


# --- the two views on crafted records (no kernel needed) ----------------------------------------------

def crafted(lines: list[str]) -> tracefs.Instance:
    """An instance whose trace file holds `lines`."""
    inst = object.__new__(tracefs.Instance)
    inst.lines = lambda: iter(lines)
    return inst


def line(payload: str) -> str:
    return f"          python-4242    [001] .....   554.547990: {payload}"


@pytest.mark.selftest
def test_every_field_is_read_and_the_print_format_must_agree():
    raw = [line(f"{SET_NAME}: start=0x100000 (1048576) cnt=0x12c (300) attributes=0x4 (4)")]
    good = Trace(crafted(raw), crafted([line(f"{SET_NAME}: gfn 0x100000, cnt 0x12c, attributes 0x4")]))
    assert good.set_events() == [set_event(FAR, 300, NX)]
    logs_end = Trace(crafted(raw), crafted([line(f"{SET_NAME}: gfn 0x100000, cnt 0x10012c, attributes 0x4")]))
    with pytest.raises(AssertionError, match="catalog 72: .* printed"):
        logs_end.set_events()
    rip, gpa = 0x210800, 0x210800
    exec_raw = [line(f"{FAULTIN_NAME}: vcpu_id=0x1 (1) guest_rip=0x{rip:x} ({rip}) fault_address=0x{gpa:x} ({gpa}) "
                     f"write=(1) exec=(1) mem_attrs=0x4 (4)")]
    printed = [line(f"{FAULTIN_NAME}: vcpu 1 rip 0x{rip:x} gfn 0x{gpa:016x} access X mem_attrs 0x4")]
    got = Trace(crafted(exec_raw), crafted(printed)).faultin_events()
    assert got == [faultin_event(1, rip, gpa, EXEC, NX) | {"write": 1}], "the print format hides write; fields do not"
    assert got != [faultin_event(1, rip, gpa, EXEC, NX)]
