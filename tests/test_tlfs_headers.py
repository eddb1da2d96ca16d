"""Self-check: the TLFS readings of machine/vsm.py and hvtlfs.py against the Hyper-V definitions in the kernel's own
headers (include/hyperv/*.h, or the hyperv-tlfs.h pair of older trees), written independently of this project. KVM
never parses these readings, so nothing else fails on a wrong one. Each reading names the C expressions that give it
in kernel headers; gcc compiles them against the headers (a prelude stands in for the rest of the kernel) and the
program prints their values. A reading the headers lack must cite, beside its definition, the TLFS page it comes from.

The headers: the kernel tree $KVMTESTS_KERNEL_SOURCE names, else the copy `kvmtests kernel fetch
debian-6.12-sw-protected` keeps of the tree it builds; without either both tests skip, naming both."""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from kvmtests import hvtlfs
from kvmtests.machine import vsm
from kvmtests.runner import kbuild, kernels

pytestmark = pytest.mark.selftest

SOURCE_ENV = "KVMTESTS_KERNEL_SOURCE"
BUILT = "debian-6.12-sw-protected"
CITATION = re.compile(r"#.*\bTLFS [a-z][\w./-]*")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
KEY = re.compile(r"\b(?:struct|union)\s+(\w+)|\b([A-Z][A-Z0-9_]+)\b")
# Only the staged headers; an error inside a macro is the expanding line's (a reading whose macro fails is unchecked).
GCC = ("-nostdinc", "-w", "-ftrack-macro-expansion=0")
ERROR = re.compile(r"^(\S+?):(\d+):(?:\d+:)? (?:fatal )?error: (.*)$", re.M)
# What the headers take from the rest of the kernel; every header they include is otherwise empty.
PRELUDE = """\
typedef unsigned char u8, __u8; typedef unsigned short u16, __u16; typedef unsigned int u32, __u32;
typedef unsigned long long u64, __u64; typedef signed char s8, __s8; typedef short s16, __s16;
typedef int s32, __s32; typedef long long s64, __s64; typedef _Bool bool; typedef unsigned long ulong;
#define __packed __attribute__((packed))
#define __aligned(x) __attribute__((aligned(x)))
#define BIT(nr) (1UL << (nr))
#define BIT_ULL(nr) (1ULL << (nr))
#define GENMASK(h, l) ((~0UL << (l)) & (~0UL >> (63 - (h))))
#define GENMASK_ULL(h, l) ((~0ULL << (l)) & (~0ULL >> (63 - (h))))
#define DECLARE_FLEX_ARRAY(type, name) struct { struct { } __empty_##name; type name[]; }
#define PAGE_SIZE 4096UL
#define NSEC_PER_SEC 1000000000L
#define CONFIG_X86 1
#define offsetof(type, member) __builtin_offsetof(type, member)
int printf(const char *, ...);
"""


@dataclass(frozen=True)
class Reading:
    """A value the suite took from the TLFS, and the C expressions that give it in kernel headers (first found wins)."""

    module: ModuleType
    name: str                  # the constant that holds it
    ours: int
    header: tuple[str, ...]    # empty: no kernel header defines it
    part: str = ""             # which use of the constant, when it has several

    @property
    def label(self) -> str:
        return f"{self.module.__name__.rpartition('.')[2]}.{self.name}{self.part}"


@dataclass(frozen=True)
class Found:
    """A reading's value in the headers, with the expression that gave it and the header that defines it."""

    value: int
    expr: str
    header: str


def reading(module: ModuleType, name: str, *header: str, part: str = "", ours: int | None = None) -> Reading:
    """A reading whose value is the constant's own, unless it is only a part of the constant (ours)."""
    return Reading(module, name, getattr(module, name) if ours is None else ours, header, part)


def _both(name: str, part: str, new: str, old: str) -> Reading:
    """A reading include/hyperv (new) and the hyperv-tlfs.h pair (old) spell differently."""
    return reading(vsm, name, new, old, part=part)


GET, SET = "hv_input_get_vp_registers", "hv_input_set_vp_registers"
OLD_GET, OLD_SET = "hv_get_vp_registers_input", "hv_set_vp_registers_input"
VSM_READINGS = (
    reading(vsm, "ENTRY_VTL_CALL"), reading(vsm, "ENTRY_INTERRUPT"),
    reading(vsm, "MSG_GPA_INTERCEPT", "HVMSG_GPA_INTERCEPT"),
    reading(vsm, "ACCESS_READ", "HV_INTERCEPT_ACCESS_READ"),
    reading(vsm, "ACCESS_WRITE", "HV_INTERCEPT_ACCESS_WRITE"),
    reading(vsm, "ACCESS_EXECUTE", "HV_INTERCEPT_ACCESS_EXECUTE"),
    reading(vsm, "MAP_READ", "HV_MAP_GPA_READABLE"), reading(vsm, "MAP_WRITE", "HV_MAP_GPA_WRITABLE"),
    reading(vsm, "MAP_KERNEL_EXEC", "HV_MAP_GPA_KERNEL_EXECUTABLE"),
    reading(vsm, "MAP_USER_EXEC", "HV_MAP_GPA_USER_EXECUTABLE"),
    reading(vsm, "HV_X64_REGISTER_RIP", "HV_X64_REGISTER_RIP"),
    reading(vsm, "HV_X64_REGISTER_RFLAGS", "HV_X64_REGISTER_RFLAGS"),
    reading(vsm, "MODIFY_FLAGS"), reading(vsm, "MODIFY_VTL"), reading(vsm, "MODIFY_PAGES"),
    _both("HEADER_VP_INDEX", " (HvGetVpRegisters)", f"offsetof(struct {GET}, vp_index)",
          f"offsetof(struct {OLD_GET}, header.vpindex)"),
    _both("HEADER_VTL", " (HvGetVpRegisters)", f"offsetof(struct {GET}, input_vtl)",
          f"offsetof(struct {OLD_GET}, header.inputvtl)"),
    _both("HEADER_VP_INDEX", " (HvSetVpRegisters)", f"offsetof(struct {SET}, vp_index)",
          f"offsetof(struct {OLD_SET}, header.vpindex)"),
    _both("HEADER_VTL", " (HvSetVpRegisters)", f"offsetof(struct {SET}, input_vtl)",
          f"offsetof(struct {OLD_SET}, header.inputvtl)"),
    # hv_enable_vp_vtl: the input the kernel passes to HVCALL_START_VP too (arch/x86/hyperv/hv_vtl.c).
    reading(vsm, "HEADER_VP_INDEX", "offsetof(struct hv_enable_vp_vtl, vp_index)", part=" (StartVirtualProcessor)"),
    reading(vsm, "HEADER_VTL", "offsetof(struct hv_enable_vp_vtl, target_vtl)", part=" (StartVirtualProcessor)"),
    _both("GET_NAMES", "", f"offsetof(struct {GET}, names)", f"offsetof(struct {OLD_GET}, element)"),
    _both("GET_NAME_SIZE", "", f"sizeof(((struct {GET} *)0)->names[0])",
          f"offsetof(struct {OLD_GET}, element[0].name1) - offsetof(struct {OLD_GET}, element[0].name0)"),
    _both("VALUE_SIZE", "", "sizeof(union hv_register_value)", "sizeof(struct hv_get_vp_registers_output)"),
    _both("SET_PAIRS", "", f"offsetof(struct {SET}, elements)", f"offsetof(struct {OLD_SET}, element)"),
    _both("SET_PAIR_SIZE", "", "sizeof(struct hv_register_assoc)", f"sizeof(((struct {OLD_SET} *)0)->element[0])"),
    _both("SET_PAIR_VALUE", "", "offsetof(struct hv_register_assoc, value)",
          f"offsetof(struct {OLD_SET}, element[0].valuelow) - offsetof(struct {OLD_SET}, element[0])"),
    reading(vsm, "START_CONTEXT", "offsetof(struct hv_enable_vp_vtl, vp_context)"),
    *(reading(vsm, f"CONTEXT_{field.upper()}", f"offsetof(struct hv_init_vp_context, {field})")
      for field in ("rip", "rsp", "rflags", "efer", "cr0", "cr3", "cr4")),
)
# hvtlfs constants carry the kernel's names, but for these.
HVTLFS_SPECIAL = (
    reading(hvtlfs, "GUEST_OS_ID_LINUX", "HV_LINUX_VENDOR_ID", part=" >> 48", ours=hvtlfs.GUEST_OS_ID_LINUX >> 48),
    reading(hvtlfs, "HYPERV_INTERFACE_SIGNATURE"),
    reading(hvtlfs, "HV_INPUT_VTL_USE_TARGET_VTL", "((union hv_input_vtl){ .use_target_vtl = 1 }).as_uint8"),
)
HVTLFS_READINGS = HVTLFS_SPECIAL + tuple(
    reading(hvtlfs, name, name) for name, value in vars(hvtlfs).items()
    if name.isupper() and type(value) is int and name not in {r.name for r in HVTLFS_SPECIAL})
READINGS = VSM_READINGS + HVTLFS_READINGS


def headers_root() -> Path:
    """The tree (or the kept copy) to check against; a skip naming both ways to get one when there is none."""
    named = os.environ.get(SOURCE_ENV)
    if named:
        if not kbuild.hyperv_headers(Path(named)):
            pytest.fail(f"{SOURCE_ENV}={named} has none of {', '.join(kbuild.HYPERV_HEADERS)}")
        return Path(named)
    kept = kernels.cache_dir() / "kernels" / BUILT / kbuild.HYPERV_HEADERS_DIR
    if not kbuild.hyperv_headers(kept):
        pytest.skip(f"no kernel Hyper-V headers to check the TLFS readings against: set {SOURCE_ENV} to a kernel "
                    f"tree, or run `kvmtests kernel fetch {BUILT}`, which keeps them in {kept} (a kernel it built "
                    "before it kept them must be deleted first)")
    return kept


def include_name(header: Path) -> str:
    """How C code includes a header: its path after the tree's include directory."""
    return str(header).rpartition("include/")[2]


def header_sets(root: Path) -> list[list[Path]]:
    """include/hyperv's headers (the kernel's own in later trees), then the hyperv-tlfs.h pair: both define the same
    names, so each set compiles alone."""
    headers = kbuild.hyperv_headers(root)
    new = [h for h in headers if include_name(h).startswith("hyperv/")]
    return [s for s in (new, [h for h in headers if h not in new]) if s]


def stage(root: Path, headers: list[Path], work: Path) -> Path:
    """An include directory holding just these headers, and an empty file for everything else they include."""
    inc = work / "include"
    for header in headers:
        (inc / include_name(header)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / header, inc / include_name(header))
    for header in headers:
        for quote, name in INCLUDE.findall((root / header).read_text()):
            beside = (inc / include_name(header)).parent / name
            if not (inc / name).exists() and not (quote == '"' and beside.exists()):
                (inc / name).parent.mkdir(parents=True, exist_ok=True)
                (inc / name).touch()
    return inc


def program(headers: list[Path], exprs: list[str]) -> tuple[str, dict[int, str]]:
    """A C program printing each expression's value, and the source line of each expression."""
    lines = PRELUDE.splitlines() + [f"#include <{include_name(h)}>" for h in headers]
    at = {}
    for i, expr in enumerate(exprs):
        lines.append(f"unsigned long long value{i}(void) {{ return (unsigned long long)({expr}); }}")
        at[len(lines)] = expr
    lines += ["int main(void)", "{"] + [f'\tprintf("%llu\\n", value{i}());' for i in range(len(exprs))]
    return "\n".join(lines + ["\treturn 0;", "}", ""]), at


def evaluate(root: Path, headers: list[Path], exprs: list[str], work: Path) -> dict[str, int]:
    """The value of each expression that compiles against these headers (gcc's errors say which do not)."""
    inc = stage(root, headers, work)
    while True:
        source, at = program(headers, exprs)
        (work / "values.c").write_text(source)
        done = subprocess.run(["gcc", *GCC, "-I", inc.name, "-o", "values", "values.c"], cwd=work, capture_output=True,
                              text=True)
        if done.returncode == 0:
            out = subprocess.run([str(work / "values")], capture_output=True, text=True, check=True).stdout
            return dict(zip(exprs, map(int, out.split())))
        errors = ERROR.findall(done.stderr)
        other = [e for e in errors if e[0] != "values.c" or int(e[1]) not in at]
        if other or not errors:
            first = " ".join(other[0]) if other else done.stderr.strip()
            raise AssertionError(f"{', '.join(map(str, headers))} do not compile with the test's prelude: {first}")
        failed = {at[int(line)] for _, line, _ in errors}
        exprs = [e for e in exprs if e not in failed]


def defined_in(expr: str, root: Path, headers: list[Path]) -> str:
    """The header that defines what the expression names first (its struct or union, else its constant)."""
    key = KEY.search(expr)
    pattern = (rf"\b(?:struct|union)\s+{key[1]}\s*{{" if key[1] else rf"#\s*define\s+{key[2]}\b|^\s*{key[2]}\s*[=,\n]")
    found = [h for h in headers if re.search(pattern, (root / h).read_text(), re.M)]
    return str(found[0]) if found else f"one of {', '.join(map(str, headers))}"


def lookup(root: Path, readings: tuple[Reading, ...], work: Path) -> dict[Reading, Found]:
    """Each reading the headers give, from the first of its expressions that compiles (include/hyperv first)."""
    exprs = sorted({e for r in readings for e in r.header})
    sets = header_sets(root)
    values = [evaluate(root, headers, exprs, work / f"set{i}") for i, headers in enumerate(sets)]
    found = {}
    for r in readings:
        hits = [(e, i) for e in r.header for i in range(len(sets)) if e in values[i]]
        if hits:
            expr, i = hits[0]
            found[r] = Found(values[i][expr], expr, defined_in(expr, root, sets[i]))
    return found


def mismatches(found: dict[Reading, Found]) -> list[str]:
    """One line per reading the headers contradict: the suite's value, the header's value and the header."""
    return [f"{r.label}: kvmtests {r.ours:#x}, {f.header} {f.value:#x} ({f.expr})"
            for r, f in found.items() if r.ours != f.value]


def unchecked(readings: tuple[Reading, ...], found: dict[Reading, Found]) -> list[tuple[Reading, str]]:
    """The readings the headers do not give, each with why."""
    return [(r, "not in these headers: " + ", ".join(r.header) if r.header else "no kernel header defines it")
            for r in readings if r not in found]


def definition(r: Reading) -> tuple[str, str]:
    """Where a reading's constant is assigned (module:line) and that line."""
    lines, start = inspect.getsourcelines(r.module)
    for number, line in enumerate(lines, start or 1):
        names = re.match(r"([A-Z_][A-Z0-9_]*(?:\s*,\s*[A-Z_][A-Z0-9_]*)*)\s*=[^=]", line)
        if names and r.name in re.split(r"\s*,\s*", names[1]):
            return f"{Path(r.module.__file__).name}:{number}", line.strip()
    raise AssertionError(f"{r.label}: no assignment of {r.name} in {r.module.__file__}")


@pytest.fixture(scope="module")
def kernel_headers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Reading, Found]]:
    root = headers_root()
    if shutil.which("gcc") is None:
        pytest.skip("checking the TLFS readings against the kernel's headers needs gcc")
    return root, lookup(root, READINGS, tmp_path_factory.mktemp("tlfs"))


def test_tlfs_readings_match_the_kernel_headers(kernel_headers: tuple[Path, dict[Reading, Found]],
                                                record_property: pytest.RecordProperty) -> None:
    root, found = kernel_headers
    missing = [f"{r.label}: {why}; {definition(r)[1]}" for r, why in unchecked(READINGS, found)]
    print(f"{len(found)} of {len(READINGS)} TLFS readings checked against {root}; not checked:", *missing, sep="\n")
    record_property("unchecked", missing)
    wrong = mismatches(found)
    assert not wrong, f"TLFS readings {root}'s Hyper-V headers contradict:\n" + "\n".join(wrong)


def test_readings_the_headers_lack_cite_the_tlfs(kernel_headers: tuple[Path, dict[Reading, Found]]) -> None:
    root, found = kernel_headers
    uncited = []
    for r, why in unchecked(READINGS, found):
        where, line = definition(r)
        if not CITATION.search(line):
            uncited.append(f"{r.label} ({where}): {why}, and no TLFS page is cited beside it")
    assert not uncited, f"readings {root}'s Hyper-V headers lack:\n" + "\n".join(uncited)


def test_lookup_prefers_include_hyperv_and_says_where(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    new, old = tmp_path / "include/hyperv/hvgdk_mini.h", tmp_path / "arch/x86/include/asm/hyperv-tlfs.h"
    new.parent.mkdir(parents=True)
    old.parent.mkdir(parents=True)
    new.write_text("#include <linux/bits.h>\n#include \"hvgdk.h\"\n#define HV_ACCESS_VSM BIT(16)\n"
                   "#define HVCALL_VTL_RETURN 0x0013\nstruct hv_input_get_vp_registers { u64 partition_id; "
                   "u32 vp_index; u8 input_vtl; u8 rsvd_z8; u16 rsvd_z16; u32 names[]; } __packed;\n")
    old.write_text("#include <linux/types.h>\n#define HVCALL_VTL_RETURN 0x0012\nstruct hv_get_vp_registers_input "
                   "{ struct { u64 partitionid; u32 vpindex; u8 inputvtl; u8 padding[3]; } header; } __packed;\n")
    readings = (reading(hvtlfs, "HV_ACCESS_VSM", "HV_ACCESS_VSM"),
                reading(hvtlfs, "HVCALL_VTL_RETURN", "HVCALL_VTL_RETURN"),
                _both("HEADER_VP_INDEX", " (HvGetVpRegisters)", f"offsetof(struct {GET}, vp_index)",
                      f"offsetof(struct {OLD_GET}, header.vpindex)"),
                reading(vsm, "HEADER_VTL", f"offsetof(struct {OLD_GET}, header.inputvtl)"),
                reading(hvtlfs, "HVCALL_VTL_CALL", "HVCALL_VTL_CALL"), reading(vsm, "ENTRY_VTL_CALL"))
    found = lookup(tmp_path, readings, tmp_path / "work")
    assert {r.label: (f.value, f.header) for r, f in found.items()} == {
        "hvtlfs.HV_ACCESS_VSM": (1 << 16, "include/hyperv/hvgdk_mini.h"),
        "hvtlfs.HVCALL_VTL_RETURN": (0x13, "include/hyperv/hvgdk_mini.h"),
        "vsm.HEADER_VP_INDEX (HvGetVpRegisters)": (8, "include/hyperv/hvgdk_mini.h"),
        "vsm.HEADER_VTL": (12, "arch/x86/include/asm/hyperv-tlfs.h")}
    assert mismatches(found) == [
        "hvtlfs.HVCALL_VTL_RETURN: kvmtests 0x12, include/hyperv/hvgdk_mini.h 0x13 (HVCALL_VTL_RETURN)"]
    assert [(r.label, why) for r, why in unchecked(readings, found)] == [
        ("hvtlfs.HVCALL_VTL_CALL", "not in these headers: HVCALL_VTL_CALL"),
        ("vsm.ENTRY_VTL_CALL", "no kernel header defines it")]


def test_headers_root_skips_or_fails_naming_the_way(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    monkeypatch.setenv("KVMTESTS_CACHE", str(tmp_path))
    kept = tmp_path / "kernels" / BUILT / kbuild.HYPERV_HEADERS_DIR
    with pytest.raises(pytest.skip.Exception, match=re.escape(f"set {SOURCE_ENV} to a kernel tree, or run `kvmtests "
                                                              f"kernel fetch {BUILT}`, which keeps them in {kept}")):
        headers_root()
    (kept / "include/asm-generic").mkdir(parents=True)
    (kept / "include/asm-generic/hyperv-tlfs.h").touch()
    assert headers_root() == kept
    monkeypatch.setenv(SOURCE_ENV, str(tmp_path / "empty"))
    with pytest.raises(pytest.fail.Exception, match=f"{SOURCE_ENV}=.*/empty has none of include/hyperv/"):
        headers_root()
