"""Memory-fault exits: attribute enforcement (catalog section C, 35-58), RWX flags and instruction
length (section D, 59-70) and capability 236 (3)."""
import os

import pytest

from kvmtests import uapi
from kvmtests.machine import guest, health, memfault
from kvmtests.machine.memfault import EXEC, PAGE, READ, WRITE, attr_names, expect_done, expect_fault
from kvmtests.machine import host
from kvmtests.machine.kvm import Unavailable
from kvmtests.verdict import features

NR, NW, NX = uapi.KVM_MEMORY_ATTRIBUTE_NR, uapi.KVM_MEMORY_ATTRIBUTE_NW, uapi.KVM_MEMORY_ATTRIBUTE_NX
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PAGE_A = guest.DATA_GPA + 0x10000      # test pages in slot 0, away from everything the builder writes
PAGE_B = PAGE_A + PAGE
PATTERN = 0x0123456789ABCDEF
OFF = 0x120                            # data accesses go to page + OFF
DEVIATION_WRITE_AFTER_READ = (
    "known v1 deviation (spec 43, 49b): after a permitted read of a page whose host mapping is populated, v1 "
    "installs a writable mapping (map_writable is overwritten by __kvm_faultin_pfn) and the write is not "
    "intercepted (confirmed on a 6.12 port)")
DEVIATION_WRITE_AFTER_EXEC = (
    "known v1 deviation (spec 50): after an execute of an NW page v1 does not intercept the write, whether "
    "the host or the guest wrote the code before NW was set (confirmed on a 6.12 port)")
DEVIATION_LEGACY_MMU = (
    "known v1 deviation on the legacy MMU (kvm.tdp_mmu=N; spec section C note, rows 51, 54, 55, 58): catalog {row}: "
    "v1 checks attributes only in the fault path, and the legacy MMU's prefetch (direct_pte_prefetch_many) maps up to "
    "7 neighbouring pages with full access, so after a fault on a neighbour the restricted page is reached without "
    "an exit (confirmed on a 6.12 port)")


def flag(series, kind: str) -> int:
    """memory_fault.flags of an attribute fault: the access kind with P09, nothing without it."""
    return memfault.FLAG_OF[kind] if series.patched("fault_rwx_flags") else 0


def provider(value: int) -> str:
    """The group whose behaviour restricting a page is: upstream's PRIVATE (core), or the series' NR/NW/NX (P12-P16)."""
    return "core" if value == PRIVATE else "rwx_attributes"


def restrict(series, vm, page: int, value: int, row: int | str) -> None:
    """Attributes a row of P09 or P10/P11 relies on: refused, they are their provider's error, not the row's failure."""
    with series.precondition(provider(value), f"KVM_SET_MEMORY_ATTRIBUTES({attr_names(value)}) succeeds"):
        memfault.set_attrs(vm, page, PAGE, value, row)


def expect_denied(series, out: memfault.FaultOutcome, value: int, what: str) -> None:
    """The memory-fault exit a row of P09 or P10/P11 relies on: none at all is the restriction's provider's error."""
    with series.precondition(provider(value), f"{what} makes a memory-fault exit"):
        assert out.fault is not None, str(out)


@pytest.fixture
def prober(vm, series, fault_rule):
    """Section C preconditions: the series' attributes and TDP; a guest ready to access PAGE_A/PAGE_B."""
    series.require("rwx_attributes")
    host.require_tdp()
    p = memfault.build_prober(vm, rule=fault_rule)
    for page in (PAGE_A, PAGE_B):
        vm.write(page + OFF, PATTERN.to_bytes(8, "little"))
        p.place_ret(page)
    return p


def expect_legacy_mmu_deviation(request: pytest.FixtureRequest, row: int) -> None:
    """Rows 51, 54, 55, 58 with TDP on the legacy MMU: a known v1 deviation (strict), nowhere else."""
    if host.tdp_on() and host.tdp_mmu() is False:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason=DEVIATION_LEGACY_MMU.format(row=row)))


def target(kind: str, page: int) -> int:
    return page + (memfault.EXEC_OFFSET if kind == EXEC else OFF)


def table_rows() -> list:
    """Section C, access kind x attribute: first access to a freshly restricted page."""
    rows = {(NW, READ): (39,), (NW, WRITE): (35, 36, 56), (NW, EXEC): (40,),
            (NX, READ): (42,), (NX, WRITE): (42,), (NX, EXEC): (41, 56),
            (NW | NX, WRITE): (43, 56), (NW | NX, READ): (43,), (NW | NX, EXEC): (43, 56),
            (NR | NW | NX, READ): (44, 56), (NR | NW | NX, WRITE): (44, 56),
            (NR | NW | NX, EXEC): (44, 56)}
    return [pytest.param(value, kind, nums, marks=pytest.mark.catalog(*nums), id=f"{nums[0]}-{attr_names(value)}-{kind}")
            for (value, kind), nums in rows.items()]


@pytest.mark.parametrize("value,kind,nums", table_rows())
def test_access_table(prober, series, value, kind, nums):
    """Denied exactly when the attribute forbids the access; the exit names that access alone."""
    row = "/".join(map(str, nums))
    memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, value, nums[0])
    out = prober.access(kind, target(kind, PAGE_A), value=0x5A)
    if value & memfault.DENIED_BY[kind]:
        expect_fault(out, kind, PAGE_A, f"{row} ({attr_names(value)}, {kind})", flag(series, kind))
    else:
        expect_done(out, f"{row} ({attr_names(value)}, {kind})")
        if kind == READ:
            assert out.value == PATTERN, f"catalog {row}: read {out.value:#x}, host wrote {PATTERN:#x}"


@pytest.mark.catalog(62)
@pytest.mark.parametrize("value,kind", [(NW, WRITE), (NX, EXEC), (NW | NX, WRITE), (NW | NX, EXEC),
                                        (NR | NW | NX, READ), (NR | NW | NX, WRITE), (NR | NW | NX, EXEC),
                                        (NW, memfault.RMW), (NR | NW | NX, memfault.RMW)],
                         ids=lambda v: attr_names(v) if isinstance(v, int) else v)
def test_exactly_one_access_flag(prober, series, value, kind):
    """P09: exactly one of READ/WRITE/EXEC, WRITE over EXEC over READ; a locked read-modify-write (a read
    and a write) reports WRITE alone. Rows of the P09 group: no upstream expectation."""
    series.require("fault_rwx_flags")
    if kind == memfault.RMW and host.qemu_accel() == "tcg" and os.cpu_count() == 1:
        pytest.skip("needs a CPU that faults a locked read-modify-write as one write: single-threaded QEMU TCG "
                    "(one vCPU) runs xchg as a load, then a store, so the read faults first (with --smp 2 the "
                    "row runs)")
    restrict(series, prober.m.vm, PAGE_A, value, 62)
    out = prober.access(kind, target(kind, PAGE_A), value=0x5A)
    expect_denied(series, out, value, f"catalog 35-44: a {kind} of a {attr_names(value)} page")
    want = uapi.KVM_MEMORY_EXIT_FLAG_WRITE if kind == memfault.RMW else memfault.FLAG_OF[kind]
    expect_fault(out, kind, PAGE_A, f"62 ({attr_names(value)}, {kind})", want)


@pytest.mark.catalog(35, 36, 37, 38)
def test_write_to_nw_page_exit_fields(prober, series):
    """A write to page+0x123: EFAULT, exit 39, WRITE, the page-aligned GPA, size 4096."""
    memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, NW, 35)
    out = prober.access(WRITE, PAGE_A + 0x123, value=1)
    expect_fault(out, WRITE, PAGE_A, "35-37", flag(series, WRITE))   # size is 38 in every fault check


@pytest.mark.catalog(45, 46)
def test_denied_write_is_not_retired_until_attributes_clear(prober, series):
    """Each exit leaves RIP on the write and the page untouched (expect_fault checks both on every exit)."""
    vm = prober.m.vm
    memfault.set_attrs(vm, PAGE_A, PAGE, NW, 45)
    expect_fault(prober.access(WRITE, PAGE_A + OFF, value=0xFEED), WRITE, PAGE_A, 45, flag(series, WRITE))
    expect_fault(prober.resume(WRITE, PAGE_A + OFF), WRITE, PAGE_A, 45, flag(series, WRITE))
    memfault.set_attrs(vm, PAGE_A, PAGE, 0, 46)
    expect_done(prober.resume(WRITE, PAGE_A + OFF), 46)
    assert vm.read(PAGE_A + OFF, 8) == (0xFEED).to_bytes(8, "little"), "catalog 46: the write did not complete"


@pytest.mark.catalog(47)
def test_attributes_apply_to_an_already_mapped_page(prober, series):
    expect_done(prober.access(WRITE, PAGE_A + OFF, value=1), 47)
    memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, NW, 47)
    expect_fault(prober.access(WRITE, PAGE_A + OFF, value=2), WRITE, PAGE_A, 47, flag(series, WRITE))


@pytest.mark.catalog(48)
def test_nx_page_first_mapped_by_a_read_stays_non_executable(prober, series):
    memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, NX, 48)
    expect_done(prober.access(READ, PAGE_A + OFF), 48)
    expect_fault(prober.access(EXEC, target(EXEC, PAGE_A)), EXEC, PAGE_A, 48, flag(series, EXEC))


@pytest.mark.catalog(49)
def test_write_after_read_of_never_populated_nw_page(vm, series, fault_rule):
    """49a: the host never touched the page, so the read maps the zero page read-only."""
    series.require("rwx_attributes")
    host.require_tdp()
    p = memfault.build_prober(vm, rule=fault_rule)
    untouched = guest.DATA_GPA + 0x40000
    memfault.set_attrs(vm, untouched, PAGE, NW, 49)
    out = p.access(READ, untouched + OFF)
    expect_done(out, "49a")
    assert out.value == 0, f"catalog 49a: read {out.value:#x} from a never-written page"
    expect_fault(p.access(WRITE, untouched + OFF, value=1), WRITE, untouched, "49a", flag(series, WRITE))


@pytest.mark.catalog(43, 49)
@pytest.mark.parametrize("value", [NW, NW | NX], ids=["49b-NW", "43-NW|NX"])
def test_write_after_read_of_populated_page(prober, series, known_deviation, value):
    """Documented intent: still a WRITE exit. Known v1 deviation (spec 43, 49b)."""
    deviation = known_deviation(DEVIATION_WRITE_AFTER_READ)
    memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, value, "43/49b")
    expect_done(prober.access(READ, PAGE_A + OFF), "43/49b")
    out = prober.access(WRITE, PAGE_A + OFF, value=1)
    if out.completed:
        deviation.seen(f"catalog 43/49b ({attr_names(value)}): after a permitted read, {out}")
    expect_fault(out, WRITE, PAGE_A, "43/49b", flag(series, WRITE))
    deviation.gone(f"catalog 43/49b ({attr_names(value)}): the write after a permitted read now exits: {out}")


@pytest.mark.catalog(50)
@pytest.mark.parametrize("writer", ["host", "guest"])
def test_write_after_execute_of_nw_page(prober, series, known_deviation, writer):
    """Documented intent: a WRITE exit. Known v1 deviation (spec 50), whoever wrote the code."""
    deviation = known_deviation(DEVIATION_WRITE_AFTER_EXEC)
    ret_at = target(EXEC, PAGE_B)
    if writer == "guest":
        prober.m.vm.write(ret_at, b"\x00")
        expect_done(prober.access(WRITE, ret_at, value=0xC3), 50)
    memfault.set_attrs(prober.m.vm, PAGE_B, PAGE, NW, 50)
    expect_done(prober.access(EXEC, ret_at), 50)
    out = prober.access(WRITE, PAGE_B + OFF, value=1)
    if out.completed:
        deviation.seen(f"catalog 50 (code written by the {writer}): after an execute, {out}")
    expect_fault(out, WRITE, PAGE_B, 50, flag(series, WRITE))
    deviation.gone(f"catalog 50 (code written by the {writer}): the write after an execute now exits: {out}")


@pytest.mark.catalog(51)
def test_nw_page_inside_a_huge_page(prober, series, request):
    expect_legacy_mmu_deviation(request, 51)
    vm = prober.m.vm
    region = vm.add_region(1, 0x400000, 0x200000, thp=True)
    region.buf[:] = b"\x11" * region.size
    if not memfault.thp_backed(region):
        pytest.skip("needs transparent huge pages: the 2 MiB slot is not THP-backed (transparent_hugepage=never?)")
    neighbour, restricted = 0x400000 + 2 * PAGE, 0x400000 + PAGE
    expect_done(prober.access(WRITE, neighbour, value=1), 51)
    memfault.set_attrs(vm, restricted, PAGE, NW, 51)
    expect_done(prober.access(WRITE, neighbour + 8, value=2), 51)
    expect_fault(prober.access(WRITE, restricted, value=3), WRITE, restricted, 51, flag(series, WRITE))


@pytest.mark.catalog(52)
def test_attributes_set_before_the_memslot_exists(prober, series):
    vm = prober.m.vm
    memfault.set_attrs(vm, 0x800000, PAGE, NW, 52)
    vm.add_region(1, 0x800000, 0x200000)
    expect_fault(prober.access(WRITE, 0x800000 + OFF, value=1), WRITE, 0x800000, 52, flag(series, WRITE))
    expect_done(prober.access(WRITE, 0x800000 + PAGE, value=1), 52)


@pytest.mark.catalog(53)
def test_clearing_a_range_lifts_every_restriction(prober):
    vm = prober.m.vm
    pages = [PAGE_A + i * PAGE for i in range(4)]
    for page, value in zip(pages, (NW, NX, NW | NX, NR | NW | NX)):
        prober.place_ret(page)
        memfault.set_attrs(vm, page, PAGE, value, 53)
    memfault.set_attrs(vm, PAGE_A, 4 * PAGE, 0, 53)
    for page in pages:
        for kind in (WRITE, EXEC, READ):
            expect_done(prober.access(kind, target(kind, page), value=7), f"53 ({kind} of {page:#x})")


@pytest.mark.catalog(54)
def test_page_walk_through_no_access_page_table(prober, series, request):
    """Reading: the walk only reads the PTE (A bits preset), so READ (the spec's expectation) where the
    CPU reports it as a read: Intel EPT without A/D. With EPT A/D every guest paging-structure access is
    an EPT write (Intel SDM), and AMD NPT reports guest page-table accesses as user writes (NPF error
    code W|U|guest-page-table, as kvm-unit-tests svm_npt npt_rw_pfwalk expects on hardware; KVM's own
    nested walker does the same): there the exit says WRITE."""
    if host.intel_ept():
        kind = WRITE if host.intel_ept_ad() else READ
    elif host.amd_npt():
        kind = WRITE
    else:
        pytest.skip(f"needs Intel EPT or AMD NPT to know how the walk's access is reported (vendor module "
                    f"{host.vendor_module()}, CPU {host.cpu_vendor()})")
    expect_legacy_mmu_deviation(request, 54)
    m = prober.m
    gva = PAGE_A
    pt_page = m.pte_gpa(gva) & ~(PAGE - 1)
    m.set_pte_flags(gva, set_bits=guest.PTE_A)
    m.mem.write_u64(guest.PD_GPA + 8 * (gva >> 21), m.mem.read_u64(guest.PD_GPA + 8 * (gva >> 21)) | guest.PTE_A)
    memfault.set_attrs(m.vm, pt_page, PAGE, NR | NW | NX, 54)
    expect_fault(prober.access(READ, gva + OFF), kind, pt_page, "54 (gpa = the page-table page)", flag(series, kind))


@pytest.mark.catalog(55)
def test_accessed_bit_update_in_nw_page_table(prober, series, request):
    expect_legacy_mmu_deviation(request, 55)
    m = prober.m
    gva = PAGE_A
    pt_page = m.pte_gpa(gva) & ~(PAGE - 1)
    m.set_pte_flags(gva, clear_bits=guest.PTE_A)
    memfault.set_attrs(m.vm, pt_page, PAGE, NW, 55)
    expect_fault(prober.access(READ, gva + OFF), WRITE, pt_page, "55 (A-bit update)", flag(series, WRITE))


@pytest.mark.catalog(57)
def test_faulting_restricted_pages_leaves_the_kernel_healthy(prober):
    watch = health.Watch()
    try:
        for value in (NW, NX, NW | NX, NR | NW | NX):
            memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, value, 57)
            for kind in (READ, WRITE, EXEC):
                prober.access(kind, target(kind, PAGE_A), value=1)
        memfault.set_attrs(prober.m.vm, PAGE_A, PAGE, 0, 57)
        problems = watch.problems()
    finally:
        watch.close()
    assert not problems, "catalog 57: " + "; ".join(problems)


@pytest.mark.catalog(58)
def test_fault_on_one_vcpu_leaves_another_alone(vm, series, request, fault_rule):
    series.require("rwx_attributes")
    host.require_tdp()
    expect_legacy_mmu_deviation(request, 58)
    p = memfault.build_prober(vm, vcpus=2, rule=fault_rule)
    vcpu0, vcpu1 = p.m.vcpus
    memfault.set_attrs(vm, PAGE_A, PAGE, NW, 58)
    expect_fault(p.access(WRITE, PAGE_A + OFF, 1, vcpu0), WRITE, PAGE_A, 58, flag(series, WRITE))
    expect_done(p.access(WRITE, PAGE_B + OFF, 2, vcpu1), "58 (vCPU 1)")
    expect_fault(p.resume(WRITE, PAGE_A + OFF, vcpu0), WRITE, PAGE_A, 58, flag(series, WRITE))


# --- section D: flags of private/shared mismatch exits (SW_PROTECTED VM) --------------------------------

@pytest.mark.parametrize("kind,row", [pytest.param(READ, 59, marks=pytest.mark.catalog(59), id="59-read"),
                                      pytest.param(WRITE, 60, marks=pytest.mark.catalog(60), id="60-write"),
                                      pytest.param(EXEC, 61, marks=pytest.mark.catalog(61), id="61-exec")])
def test_private_page_access_flags(kvm, series, fault_rule, kind, row):
    """A PRIVATE page in a memslot without guest_memfd: PRIVATE plus the access kind (P09), PRIVATE alone upstream."""
    with kvm.create_vm(memfault.sw_protected_vm_type(kvm)) as vm:
        p = memfault.build_prober(vm, rule=fault_rule)
        p.place_ret(PAGE_A)
        restrict(series, vm, PAGE_A, PRIVATE, row)
        out = p.access(kind, target(kind, PAGE_A), value=1)
        expect_denied(series, out, PRIVATE, f"a {kind} of a PRIVATE page without guest_memfd")
        expect_fault(out, kind, PAGE_A, row, PRIVATE | flag(series, kind))


# --- section D: instruction length -------------------------------------------------------------------

INSN_PAGE = guest.DATA_GPA
INSN_TARGET = guest.INSN_TARGET       # where every row of insn_len.S reads or writes (in INSN_PAGE)


def insn_rows() -> list:
    """Every length 1-15, reads and writes: 63 and 64 are the catalog's own rows, the rest extend them."""
    own = {"w3": 63, "w2": 64, "w6": 64}
    return [pytest.param(f"{k}{n}", marks=pytest.mark.catalog(*([own[f"{k}{n}"]] if f"{k}{n}" in own else [63, 64])),
                         id=f"{own.get(f'{k}{n}', 'ext')}-{'read' if k == 'r' else 'write'}-{n}-bytes")
            for k in "rw" for n in range(1, 16)]


def insn_access(vm, name: str, kind: str, rule: memfault.FaultRule) -> memfault.FaultOutcome:
    """One run of insn_len.S's row `name` (its instruction between `name`_insn and `name`_end) on INSN_TARGET."""
    m = guest.build_machine(vm, guest.load_payload("insn_len"), entry=name)
    return memfault.run_access(m, kind, INSN_TARGET, f"{name}_insn", f"{name}_end", 1, rule)


def insn_fault(vm, name: str, series, rule: memfault.FaultRule, row: str) -> tuple[int, memfault.Fault]:
    """Run one labelled instruction of insn_len.S against a restricted page: (its length, the fault, every field checked)."""
    kind = READ if name.startswith("r") else WRITE
    value = NR | NW | NX if kind == READ else NW
    restrict(series, vm, INSN_PAGE, value, 63)
    out = insn_access(vm, name, kind, rule)
    expect_denied(series, out, value, f"catalog 35/44: {name} on a restricted page")
    return out.insn_length, expect_fault(out, kind, INSN_PAGE, f"{row} ({name}, {out.insn_length}-byte {kind})",
                                         flag(series, kind))


def require_insn_len(series) -> None:
    series.require("rwx_attributes")
    series.require("fault_insn_len")


@pytest.mark.parametrize("name", insn_rows())
def test_insn_len_is_the_instruction_length(vm, series, fault_rule, name):
    require_insn_len(series)
    if not host.intel_ept():
        pytest.skip("needs Intel VMX with EPT: only VM_EXIT_INSTRUCTION_LEN gives the length (P10)")
    length, fault = insn_fault(vm, name, series, fault_rule, "63/64")
    assert length == int(name[1:]), f"payload bug: {name} is {length} bytes"
    assert fault.insn_len == length, f"catalog 63/64: {name}: {fault}, expected insn_len {length}"


@pytest.mark.catalog(67, 68, 69)
def test_insn_len_never_exceeds_15(vm, series, kvm, fault_rule):
    """67/69 on every host with P11; 68 (AMD decode-assist byte count) is the same bound."""
    require_insn_len(series)
    host.require_tdp()
    seen = []
    for name in ("r1", "r7", "r15", "w1", "w9", "w15"):
        with kvm.create_vm() as own:
            seen.append((name, insn_fault(own, name, series, fault_rule, "67")[1]))
    p = memfault.build_prober(vm, rule=fault_rule)
    p.place_ret(PAGE_A)
    restrict(series, vm, PAGE_A, NX, 69)
    out = p.access(EXEC, target(EXEC, PAGE_A))
    expect_denied(series, out, NX, "catalog 41: an execute on an NX page")
    seen.append(("execute", expect_fault(out, EXEC, PAGE_A, 69, flag(series, EXEC))))
    bad = [f"{name}: {fault}" for name, fault in seen if fault.insn_len > 15]
    assert not bad, f"catalog 67/68/69: insn_len above 15: {'; '.join(bad)}"


@pytest.mark.catalog(70)
def test_shadow_paging_reports_no_insn_len(vm, series, fault_rule):
    require_insn_len(series)
    if host.tdp_on() is not False:
        pytest.skip("needs TDP disabled (kvm_intel.ept=0 or kvm_amd.npt=0): the row is about the shadow #PF path")
    p = memfault.build_prober(vm, rule=fault_rule)
    p.place_ret(PAGE_A)
    restrict(series, vm, PAGE_A, NW | NX, 70)
    for kind in (WRITE, EXEC):
        out = p.access(kind, target(kind, PAGE_A), value=1)
        expect_denied(series, out, NW | NX, f"catalog 43: a {kind} of an NW|NX page under shadow paging")
        fault = expect_fault(out, kind, PAGE_A, 70, flag(series, kind))
        assert fault.insn_len == 0, f"catalog 70: {kind}: {fault}, expected insn_len 0 (shadow #PF passes no length)"


@pytest.mark.catalog(65)
def test_private_mismatch_exit_carries_insn_len(kvm, series):
    """Patched: the private-mismatch read exit carries the reading instruction's length; upstream (U:)
    leaves kvm_run byte 56 untouched, so the sentinel run_for_fault writes there survives."""
    if not host.intel_ept():
        pytest.skip("needs Intel VMX with EPT: only VM_EXIT_INSTRUCTION_LEN gives the length (P10)")
    rule = memfault.FaultRule(series.patched("fault_insn_len"), exact=True)
    with kvm.create_vm(memfault.sw_protected_vm_type(kvm)) as vm:
        restrict(series, vm, INSN_PAGE, PRIVATE, 65)
        out = insn_access(vm, "r3", READ, rule)
        expect_denied(series, out, PRIVATE, "a read of a PRIVATE page without guest_memfd")
        expect_fault(out, READ, INSN_PAGE, "65 (private read by mov (%rbx),%rax)", PRIVATE | flag(series, READ))


SENTINEL_ROWS = [pytest.param("nw-write", marks=pytest.mark.catalog(66), id="66-nw-write-default-vm"),
                 pytest.param("private-read", marks=pytest.mark.catalog(66), id="66-private-read-sw-protected-vm")]


@pytest.mark.parametrize("source", SENTINEL_ROWS)
def test_insn_len_byte_overwrites_sentinel(kvm, series, source):
    """kvm_run byte 56 pre-filled with 0xA5 (memfault.arm, before every run): P11 writes the length (0 on AMD
    without decode assists); upstream leaves it."""
    if source == "nw-write":
        series.require("rwx_attributes")
        vm_type, name, kind, value = uapi.KVM_X86_DEFAULT_VM, "w3", WRITE, NW
    else:
        vm_type, name, kind, value = memfault.sw_protected_vm_type(kvm), "r3", READ, PRIVATE
    with kvm.create_vm(vm_type) as vm:
        restrict(series, vm, INSN_PAGE, value, 66)
        rule = memfault.FaultRule(series.patched("fault_insn_len"), host.intel_ept(), host.tdp_on() is False)
        out = insn_access(vm, name, kind, rule)
        expect_denied(series, out, value, "catalog 35: a write to an NW page" if source == "nw-write" else
                      "a read of a PRIVATE page without guest_memfd")
        flags = (PRIVATE if value == PRIVATE else 0) | flag(series, kind)
        expect_fault(out, kind, INSN_PAGE, f"66 ({source})", flags)


@pytest.mark.catalog(1, 3)
def test_insn_len_capability(kvm, vm, series, cap_numbers):
    """P11's KVM_CAP_FAULT_EXIT_INSN_LEN reads 1 on /dev/kvm and a VM fd wherever byte 56 carries the length. The
    series numbers it 236, which v6.11 gave to KVM_CAP_PRE_FAULT_MEMORY (tdp_enabled): a port names its own."""
    cap = features.cap_number("fault_exit_insn_len", cap_numbers, features.pre_fault_memory_implemented())
    if series.patched("fault_insn_len"):
        if cap.number is None:
            raise Unavailable(f"catalog 3: KVM_CAP_FAULT_EXIT_INSN_LEN {cap.why}")
        got = (kvm.check_extension(cap.number), vm.check_extension(cap.number))
        assert got == (1, 1), (f"catalog 1/3: KVM_CHECK_EXTENSION({cap.number}) on /dev/kvm, VM fd = {got}, expected "
                               f"(1, 1): memory-fault exits carry insn_len (P11), so KVM_CAP_FAULT_EXIT_INSN_LEN "
                               f"({cap.why}) must say so")
    elif "fault_exit_insn_len" in cap_numbers:
        raise Unavailable(f"catalog 3: the kernel lacks P11, so capability {cap.number} named for a port has no "
                          "expectation")
    else:
        got = (kvm.check_extension(236), vm.check_extension(236))
        want = {0, 1} if features.pre_fault_memory_implemented() else {0}   # KVM_CAP_PRE_FAULT_MEMORY: tdp_enabled
        assert got[0] == got[1] and got[0] in want, \
            f"catalog 3: KVM_CHECK_EXTENSION(236) on /dev/kvm, VM fd = {got}, expected {sorted(want)} on both ({cap.why})"


class FakeSeries:
    """A kernel whose fault_insn_len group is present or absent, for the capability row's self-test."""

    def __init__(self, present: bool):
        self.present = present

    def patched(self, group: str) -> bool:
        return self.present


class FakeFd:
    """/dev/kvm or a VM fd that answers KVM_CHECK_EXTENSION from a table."""

    def __init__(self, caps: dict[int, int]):
        self.caps = caps

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)


@pytest.mark.selftest
@pytest.mark.parametrize("caps,passes", [({240: 1, 236: 1}, True), ({236: 1}, False), ({240: 0, 236: 1}, False)])
def test_insn_len_capability_checks_the_named_number(monkeypatch, caps, passes):
    """A port numbering the capability 240 on a kernel with KVM_PRE_FAULT_MEMORY: advertised passes, not
    advertised fails catalog 3 (236 reading 1 is PRE_FAULT_MEMORY and proves nothing)."""
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: True)
    fds = (FakeFd(caps), FakeFd(caps))
    if passes:
        test_insn_len_capability(*fds, FakeSeries(True), {"fault_exit_insn_len": 240})
    else:
        with pytest.raises(AssertionError, match=r"catalog 1/3: KVM_CHECK_EXTENSION\(240\) on /dev/kvm, VM fd = "
                                                 r"\(0, 0\), expected \(1, 1\)"):
            test_insn_len_capability(*fds, FakeSeries(True), {"fault_exit_insn_len": 240})


@pytest.mark.selftest
def test_insn_len_capability_unnamed_on_a_pre_fault_kernel_skips_with_the_option(monkeypatch):
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: True)
    with pytest.raises(Unavailable, match="name that number with --cap-number fault_exit_insn_len=N"):
        test_insn_len_capability(FakeFd({236: 1}), FakeFd({236: 1}), FakeSeries(True), {})
    monkeypatch.setattr(features, "pre_fault_memory_implemented", lambda: False)
    with pytest.raises(AssertionError, match=r"KVM_CHECK_EXTENSION\(236\) on /dev/kvm, VM fd = \(0, 0\)"):
        test_insn_len_capability(FakeFd({}), FakeFd({}), FakeSeries(True), {})
    test_insn_len_capability(FakeFd({236: 1}), FakeFd({236: 1}), FakeSeries(True), {})


@pytest.mark.selftest
@pytest.mark.parametrize("tdp,mmu,deviation", [(True, False, True), (True, True, False), (False, False, False),
                                               (True, None, False), (None, False, False)],
                         ids=["tdp-legacy-mmu", "tdp-mmu", "shadow-paging", "no-tdp_mmu-parameter", "tdp-unknown"])
def test_legacy_mmu_rows_are_known_deviations_only_there(monkeypatch, marker_recorder, tdp, mmu, deviation):
    """Rows 51/54/55/58 turn into strict expected failures with TDP on the legacy MMU, and only there."""
    monkeypatch.setattr(host, "tdp_on", lambda: tdp)
    monkeypatch.setattr(host, "tdp_mmu", lambda: mmu)
    request = marker_recorder
    expect_legacy_mmu_deviation(request, 54)
    if not deviation:
        assert request.markers == []
        return
    (mark,) = request.markers
    assert mark.name == "xfail" and mark.kwargs["strict"] and mark.kwargs["raises"] is AssertionError
    assert "catalog 54" in mark.kwargs["reason"] and "direct_pte_prefetch_many" in mark.kwargs["reason"]


@pytest.mark.selftest
def test_tdp_mmu_parameter_is_read_from_sysfs(tmp_path):
    assert host.tdp_mmu(tmp_path) is None, "no kvm module parameters: cannot tell"
    (tmp_path / "kvm" / "parameters").mkdir(parents=True)
    for value, want in (("N", False), ("Y", True)):
        (tmp_path / "kvm" / "parameters" / "tdp_mmu").write_text(value + "\n")
        assert host.tdp_mmu(tmp_path) is want
