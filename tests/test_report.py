"""The reporting layer without /dev/kvm: summary and KCIDB from a saved run, gating, the pytest plugin."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import kcidb_io
import pytest

import kvmtests

from kvmtests.machine import host, hyperv, tracefs
from kvmtests.verdict import features, junit, report
from kvmtests.verdict.features import Detection

pytestmark = pytest.mark.selftest
GOLDEN = Path(__file__).parent / "golden"
PROJECT = str(Path(kvmtests.__file__).resolve().parent.parent)   # nested runs import this checkout's kvmtests
HOST = {"kernel": "6.12.0-test", "kvm device": "/dev/kvm", "cpu vendor": "AuthenticAMD",
        "vendor module": "kvm_amd", "tdp": "on (kvm_amd.npt=Y)", "environment": "QEMU/TCG (kvmtests qualify)"}


def sample_detections() -> dict[str, Detection]:
    detections = {k: Detection(k, features.ABSENT, f"probe for {k}") for k in features.GROUPS}
    detections["rwx_attributes"] = Detection("rwx_attributes", features.PRESENT, "NW accepted")
    detections["vtl_ipi"] = Detection("vtl_ipi", features.UNKNOWN, "kernel lacks KVM_CAP_HYPERV")
    return detections


def sample_tests() -> list[dict]:
    return [
        {"nodeid": "tests/test_a.py::test_nw[16]", "outcome": "passed", "message": "", "catalog": [16],
         "groups": ["rwx_attributes"], "duration": 0.01},
        {"nodeid": "tests/test_a.py::test_wr", "outcome": "known-deviation", "message": "v1 keeps a writable SPTE",
         "catalog": [43], "groups": ["rwx_attributes"], "duration": 0.02},
        {"nodeid": "tests/test_b.py::test_hc[0x50]", "outcome": "failed", "message": "E catalog 80: RAX 0x2",
         "catalog": [80, 81], "groups": ["hv_exits", "vsm_hcalls"], "duration": 0.5},
        {"nodeid": "tests/test_c.py::test_layout", "outcome": "passed", "message": "", "catalog": [],
         "groups": [], "duration": 0.0},
        {"nodeid": "tests/test_d.py::test_ipi", "outcome": "skipped", "message": "kernel lacks KVM_CAP_HYPERV",
         "catalog": [111], "groups": ["vtl_ipi"], "duration": 0.0},
        {"nodeid": "tests/test_d.py::test_slow_ipi", "outcome": "unexpected-pass", "catalog": [116],
         "message": "unexpected pass: the row behaved as documented, so this known deviation did not reproduce: "
                    "catalog 116", "groups": ["vtl_ipi"], "duration": 0.0},
    ]


def sample_doc(required: list[str] = ()) -> dict:
    return report.build(HOST, sample_detections(), ["partial series: present rwx_attributes"], list(required),
                        sample_tests(), 1)


TITLE = "BUG: kernel NULL pointer dereference in kvm_hv_hypercall"
HC = "tests/test_b.py::test_hc[0x50]"
CRASH_LOG = ["[   12.345678] BUG: kernel NULL pointer dereference, address: 0000000000000008",
             "[   12.345690] #PF: supervisor read access in kernel mode",
             "[   12.345701] RIP: 0010:kvm_hv_hypercall+0x1a2/0x6c0 [kvm]",
             "[   12.345712] Call Trace:",
             "[   12.345730]  kvm_emulate_hypercall+0x3c/0x60 [kvm]",
             "\x1b[0m\x00"]                     # a console's escape sequence and a NUL byte


def crashed_doc() -> dict:
    """The sample run whose hypercall row oopsed the kernel (boot 1), hv_exits' next row blocked by it, vsm_hcalls'
    probe crashing it on boot 2 and a hung task on boot 3, after which the runner gave up."""
    detections = sample_detections() | {"vsm_hcalls": Detection(
        "vsm_hcalls", "crashed", "its detection probe crashed the kernel on an earlier boot: kernel BUG in "
                                 "kvm_hv_vtl_return")}
    crash = {"title": TITLE, "kind": "oops", "boot": 1}
    blocked = {"nodeid": "tests/test_b.py::test_hc[0x51]", "outcome": "blocked", "catalog": [82],
               "groups": ["hv_exits"], "blocked_by": TITLE,
               "message": f"not run: the kernel crashed on the path of hv_exits (in {HC}: {TITLE})"}
    tests = [dict(t, outcome="crashed", message=TITLE, log=CRASH_LOG, crash=crash) if t["nodeid"] == HC else t
             for t in sample_tests()] + [blocked]
    doc = report.build(HOST, detections, ["partial series: present rwx_attributes"], [], tests, 1)
    return doc | {"boots": 3, "incomplete": "the kernel crashed 3 times: more than --max-resumes 2; 1 test did not run",
                  "crashes": [
        dict(crash, during=HC, groups=["hv_exits", "vsm_hcalls"], fatal=True, log=CRASH_LOG),
        {"title": "kernel BUG in kvm_hv_vtl_return", "kind": "oops", "during": "detection of vsm_hcalls",
         "groups": ["vsm_hcalls"], "boot": 2, "fatal": True, "log": ["kernel BUG at arch/x86/kvm/hyperv.c:2911!"]},
        {"title": "INFO: task hung in kvm_vcpu_ioctl", "kind": "hung-task", "during": "between tests", "groups": [],
         "boot": 3, "fatal": True, "log": ["INFO: task python3:812 blocked for more than 120 seconds."]}]}


def test_summary_matches_golden_file():
    assert report.render(sample_doc()) == (GOLDEN / "summary.txt").read_text().rstrip("\n")


def test_crashed_run_summary_matches_golden_file():
    """Crashed and blocked columns, the crashed probe's state, then boots, each crash and why the run ended early."""
    assert report.render(crashed_doc()) == (GOLDEN / "crashed_summary.txt").read_text().rstrip("\n")


@pytest.mark.parametrize("phases,expected", [
    (["passed", "crashed"], "crashed"),
    (["failed", "crashed"], "crashed"),
    (["crashed", "error"], "crashed"),
    (["blocked", "passed"], "blocked"),
    (["error", "blocked"], "error"),
    (["blocked", "failed"], "failed"),
])
def test_a_crash_outranks_every_outcome(phases, expected):
    merged = None
    for outcome in phases:
        merged = report.merge(merged, outcome)
    assert merged == expected


def test_cell_counts_crashes_and_blocked_tests_only_when_there_are_any():
    assert report.cell("present", {o: 0 for o in report.OUTCOMES}) == "present 0/0/0/0"
    counts = {o: 0 for o in report.OUTCOMES} | {"passed": 2, "error": 1, "crashed": 1, "blocked": 3}
    assert report.cell("present", counts) == "present 2/0/0/0 +1 err +1 crash +3 blocked"


def test_coverage_lists_numbers_without_a_test():
    cov = sample_doc()["coverage"]
    assert cov["covered"] == [16, 43, 80, 81, 111, 116]
    assert len(cov["missing"]) == 138 - 6 and 1 in cov["missing"]


def test_gating_names_each_absent_required_group():
    doc = sample_doc(required=sorted(features.GROUPS))
    lines = report.required_absent(doc)
    assert len(lines) == len(features.GROUPS) - 1, "every group but the present one"
    assert any(line.startswith("required feature group vtl_ipi") for line in lines)
    assert "FAILED required feature group hv_exits" in report.render(doc)


def test_kcidb_export_validates_against_the_schema():
    data = report.kcidb(sample_doc())
    kcidb_io.schema.LATEST.validate(data)
    statuses = {t["misc"]["nodeid"]: t["status"] for t in data["tests"]}
    assert statuses["tests/test_a.py::test_nw[16]"] == "PASS"
    assert statuses["tests/test_b.py::test_hc[0x50]"] == "FAIL"
    assert statuses["tests/test_d.py::test_ipi"] == "SKIP"
    assert statuses["tests/test_d.py::test_slow_ipi"] == "FAIL", "a strict expected failure that passed fails the run"
    assert report.kcidb_path("tests/test_b.py::test_hc[0x50]") == "kvmtests.test_b.test_hc.0x50"


def test_kcidb_export_of_a_crashed_run_validates_against_the_schema():
    doc = crashed_doc()
    data = report.kcidb(doc)
    kcidb_io.schema.LATEST.validate(data)
    tests = {t["misc"]["nodeid"]: t for t in data["tests"]}
    crashed, blocked = tests[HC], tests["tests/test_b.py::test_hc[0x51]"]
    assert crashed["status"] == "FAIL" and crashed["log_excerpt"].startswith(TITLE + "\n" + CRASH_LOG[0])
    assert "\0" not in crashed["log_excerpt"] and crashed["misc"]["crash"]["kind"] == "oops"
    assert (blocked["status"], blocked["comment"]) == ("MISS", f"not run: the kernel crashed on the path of hv_exits "
                                                                f"(in {HC}: {TITLE})")
    assert "log_excerpt" not in blocked and blocked["misc"]["blocked_by"] == TITLE
    assert data["checkouts"][0]["misc"]["boots"] == 3
    next(t for t in doc["tests"] if t["nodeid"] == HC)["log"] = ["x" * 99] * 1000
    long = report.kcidb(doc)
    kcidb_io.schema.LATEST.validate(long)
    assert len(next(t for t in long["tests"] if t["misc"]["nodeid"] == HC)["log_excerpt"]) == report.KCIDB_EXCERPT


def test_junit_of_a_crashed_run_parses_with_counts_that_match():
    root = ET.fromstring(junit.junit(crashed_doc()))
    suite = root.find("testsuite")
    cases = {f"{c.get('classname')}::{c.get('name')}": c for c in suite.iter("testcase")}
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": "7", "failures": "2", "errors": "0", "skipped": "3"}, "crash and xpass fail; skip, known, blocked"
    assert len(cases) == 7 and sum(len(c) for c in cases.values()) == 5, "a pass has no child"
    crash = cases["tests.test_b::test_hc[0x50]"].find("failure")
    assert (crash.get("type"), crash.get("message")) == ("crashed", TITLE)
    assert crash.text.splitlines()[0] == CRASH_LOG[0] and crash.text.endswith("#x1B[0m#x00"), "XML 1.0 can't hold those"
    blocked = cases["tests.test_b::test_hc[0x51]"].find("skipped")
    assert blocked.get("type") == "blocked" and blocked.get("message").startswith("not run: the kernel crashed")
    assert cases["tests.test_d::test_slow_ipi"].find("failure").get("type") == "unexpected-pass"
    assert cases["tests.test_a::test_wr"].find("skipped").get("type") == "pytest.xfail"
    props = [(p.get("name"), p.get("value")) for p in suite.iter("property")]
    assert ("boots", "3") in props and ("kernel", "6.12.0-test") in props
    assert [v for n, v in props if n == "crash"][2] == "CRASH between tests (boot 3, hung-task, fatal): INFO: task " \
                                                        "hung in kvm_vcpu_ioctl"
    assert props[-1] == ("incomplete", crashed_doc()["incomplete"])


@pytest.mark.parametrize("nodeid", ["tests/test_a.py::test_nw[16]", "tests/sub/test_x.py::TestC::test_y[a/b::c.py]",
                                    "test_gated.py::test_row"])
def test_junit_names_a_test_as_pytests_junitxml_does(nodeid):
    from _pytest.junitxml import mangle_test_address
    names = mangle_test_address(nodeid)
    assert junit.names(nodeid) == (".".join(names[:-1]), names[-1])


def test_report_command_rerenders_a_saved_run(tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(sample_doc()))
    out = subprocess.run([sys.executable, "-m", "kvmtests.cli", "report", str(saved), "--kcidb",
                          str(tmp_path / "k.json"), "--junit", str(tmp_path / "j.xml")], capture_output=True, text=True)
    assert out.returncode == 1, "the saved run failed, so does its re-rendering"
    assert (GOLDEN / "summary.txt").read_text().rstrip("\n") in out.stdout
    kcidb_io.schema.LATEST.validate(json.loads((tmp_path / "k.json").read_text()))
    assert ET.parse(tmp_path / "j.xml").getroot().find("testsuite").get("failures") == "2", "failed and xpass"


def test_report_command_on_a_bad_file_says_what_to_do(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = subprocess.run([sys.executable, "-m", "kvmtests.cli", "report", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--kvmtests-json" in out.stderr and "Traceback" not in out.stderr


PLUGIN_TEST = '''
import pytest

@pytest.mark.catalog(16)
def test_needs_kvm():
    pass

@pytest.mark.nokvm
@pytest.mark.catalog(1)
def test_layout():
    pass
'''


@pytest.mark.parametrize("workers", ["0", "2"])
def test_plugin_without_kvm_device_gates_and_summarises(pytester, workers):
    """No /dev/kvm: one skip reason; --require series fails with one line per group; JSON written."""
    pytester.makepyfile(test_sample=PLUGIN_TEST)
    pytester.makeconftest("pytest_plugins = ['kvmtests.verdict.plugin']")
    env_dev = "/nonexistent-kvm"
    pytester._monkeypatch.setenv("KVMTESTS_DEV", env_dev)
    pytester._monkeypatch.setenv("PYTHONPATH", PROJECT)
    result = pytester.runpytest_subprocess("-n", workers, "-rs", "--require", "series",
                                           "--kvmtests-json", "out.json", "-p", "no:cacheprovider",
                                           "-p", "no:hypothesispytest", "-p", "no:benchmark")
    assert result.ret == 1
    text = result.stdout.str()
    assert text.count(f"{env_dev} does not exist") >= 1
    assert sum(1 for line in text.splitlines() if line.startswith("FAILED required feature group")) == \
        len(features.GROUPS)
    doc = json.loads((pytester.path / "out.json").read_text())
    outcomes = {t["nodeid"].split("::")[1]: t["outcome"] for t in doc["tests"]}
    assert outcomes == {"test_needs_kvm": "skipped", "test_layout": "passed"}
    assert doc["coverage"]["covered"] == [1, 16]


def test_partial_backport_is_named(monkeypatch):
    """Some groups present and others absent, or a CPUID bit advertised without its behaviour."""
    detections = {k: Detection(k, features.ABSENT, f"probe for {k}") for k in features.GROUPS}
    detections["hv_exits"] = Detection("hv_exits", features.PRESENT, "0x50 exits")
    detections["vtl_ipi"] = Detection("vtl_ipi", features.UNKNOWN, "kernel lacks KVM_CAP_HYPERV")
    monkeypatch.setattr(features, "advertised_hv_bits", lambda: {
        "HV_ACCESS_VSM": True, "HV_ACCESS_VP_REGISTERS": False, "HV_START_VIRTUAL_PROCESSOR": True,
        "HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE": False})
    findings = features.partial_backport(detections)
    assert findings[0].startswith("partial series: present hv_exits; absent xmm_output, mp_inactive_vtl")
    assert "HV_ACCESS_VSM advertised in KVM_GET_SUPPORTED_HV_CPUID, but mp_inactive_vtl is absent: " \
           "probe for mp_inactive_vtl" in findings
    assert not any("vtl_ipi is absent" in f for f in findings), "an undetectable group is no finding"
    assert "hv_exits is present, but KVM_GET_SUPPORTED_HV_CPUID does not advertise HV_ACCESS_VP_REGISTERS" in findings
    assert not any("HV_START_VIRTUAL_PROCESSOR" in f for f in findings), "advertised and present agree"


def test_hv_exits_backported_in_part_is_named(monkeypatch):
    """P06 without P07/P08: present (its rows run, the missing codes' rows fail) and named as a partial backport."""
    monkeypatch.setattr(features, "advertised_hv_bits", lambda: {})
    exit_, status2 = hyperv.HcallOutcome(exited=True, input=0x50), hyperv.HcallOutcome(completed=True, rax=2)
    codes = [f"{code:#06x} ({patch})" for code, patch in features.HV_EXIT_CODES]
    both = features.hv_exits_verdict(list(zip(codes, [exit_, exit_, status2, status2, status2])))
    assert both.state == features.PRESENT
    assert both.partial == f"slow 0x0052 (P07), 0x0099 (P08), 0x009a (P08): {status2}"
    detections = {k: Detection(k, features.ABSENT, "") for k in features.GROUPS} | {"hv_exits": both}
    assert f"hv_exits (P06-P08) only in part: {both.partial}" in features.partial_backport(detections)
    assert features.hv_exits_verdict([(c, exit_) for c in codes]) == Detection(
        "hv_exits", features.PRESENT, "slow " + ", ".join(codes) + " exit to userspace")
    assert features.hv_exits_verdict([(c, status2) for c in codes]).state == features.ABSENT
    assert features.hv_exits_verdict([(codes[0], exit_), (codes[1], hyperv.HcallOutcome(exception=6))]).state == \
        features.UNKNOWN, "a guest exception says nothing about the patch"


def test_one_tracepoint_of_two_is_a_partial_backport(monkeypatch, tmp_path):
    monkeypatch.setattr(tracefs, "root", lambda: str(tmp_path))
    monkeypatch.setattr(tracefs, "series_event", lambda name: name == tracefs.FAULTIN_EVENT)
    det = features._tracepoints(None)
    assert det.state == features.PRESENT and det.partial == f"no {tracefs.SET_ATTRS_EVENT} with the series' fields"
    monkeypatch.setattr(tracefs, "series_event", lambda name: False)
    assert features._tracepoints(None) == Detection("attr_tracepoints", features.ABSENT,
                                                    "tracefs events with the series' fields: neither")


def test_whole_series_or_nothing_is_no_finding(monkeypatch):
    monkeypatch.setattr(features, "advertised_hv_bits", lambda: {})
    for state in (features.PRESENT, features.ABSENT):
        assert features.partial_backport({k: Detection(k, state, "") for k in features.GROUPS}) == []


@pytest.mark.parametrize("present,flags,serving", [
    (["kvm_intel", "kvm_amd"], {"svm", "npt"}, ["kvm_amd"]),       # both built in, AMD CPU
    (["kvm_intel", "kvm_amd"], {"vmx", "ept"}, ["kvm_intel"]),     # both built in, Intel CPU
    (["kvm_pvm"], set(), ["kvm_pvm"]),                             # needs neither VMX nor SVM
    (["kvm_intel"], set(), []),                                    # loaded, but the CPU offers no VMX
])
def test_host_identity_names_the_serving_vendor_module(tmp_path, present, flags, serving):
    for module in present:
        (tmp_path / module / "parameters").mkdir(parents=True)
    assert host.vendor_modules(tmp_path, flags) == serving


CRAFTED_CONFTEST = '''
pytest_plugins = ["kvmtests.verdict.plugin"]
from kvmtests.verdict import features, probe

_STATES = {k: features.PRESENT for k in features.GROUPS} | {"%s": features.ABSENT}
features.detect = lambda g: features.Detection(g, _STATES[g], f"crafted probe for {g}")
features.detect_all = lambda: {g: features.detect(g) for g in features.GROUPS}
features.advertised_hv_bits = lambda: {}
probe.host_identity = lambda: {"kernel": "6.12.0-crafted", "vendor module": "kvm_amd"}
'''
GATED_CONFTEST = CRAFTED_CONFTEST % "vtl_ipi"

# A kernel whose PV IPIs ignore use_target_vtl (vtl_ipi detected absent), observed values crafted.
GATED_TESTS = '''
import pytest
from kvmtests.machine import hyperv

pytestmark = pytest.mark.nokvm

@pytest.mark.catalog(112)
def test_row_that_behaves_as_specified(series):
    if series.patched("vtl_ipi"):
        assert "exit" == "exit", "catalog 112"
    else:
        assert "upstream" == "exit", "catalog 112: upstream expectation checked on a required group"

@pytest.mark.catalog(113)
def test_row_that_is_broken(series):
    series.require("vtl_ipi")
    assert 0 == 1, "catalog 113: IPI delivered to VTL 0, expected VTL 1"

@pytest.mark.catalog(116)
def test_fixed_known_deviation(series, request):
    if series.patched("vtl_ipi"):
        request.applymarker(pytest.mark.xfail(strict=True, raises=hyperv.KnownDeviation, reason="catalog 116 (known v1 deviation)"))
    # the kernel now keeps the call in the kernel: the documented intent holds, nothing raised

@pytest.mark.catalog(74)
def test_row_with_a_failed_precondition(series):
    series.require("attr_tracepoints")
    with series.precondition("rwx_attributes", "catalog 20: attributes 0x1 (NR alone) are rejected"):
        assert False, "attributes 0x1 accepted"
    assert False, "catalog 74: never reached"

@pytest.mark.catalog(50)
def test_precondition_inside_a_known_deviation(series, request):
    request.applymarker(pytest.mark.xfail(strict=True, reason="catalog 50 (known v1 deviation)"))
    with series.precondition("core", "a write to an attribute-0 page completes"):
        assert False, "write gave a triple fault"
'''


def run_gated(pytester, *args: str, workers: str = "0", tests: str = GATED_TESTS, conftest: str = GATED_CONFTEST,
              **modules: str):
    """The crafted kernel's rows (and other test modules, by name) through the plugin in a nested pytest: (its
    output, tests by name)."""
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_gated=tests, **modules)
    pytester._monkeypatch.setenv("KVMTESTS_DEV", "/nonexistent-kvm")
    pytester._monkeypatch.setenv("PYTHONPATH", PROJECT)
    result = pytester.runpytest_subprocess("-n", workers, "-rA", "--kvmtests-json", "out.json", "-p", "no:cacheprovider",
                                           "-p", "no:hypothesispytest", "-p", "no:benchmark", *args)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"].split("::")[1]: t for t in doc["tests"]}


@pytest.mark.parametrize("workers", ["0", "2"])
def test_gating_keeps_each_rows_own_verdict(pytester, workers):
    """--require series on a kernel with one group broken: each row its own outcome, plus one gate line."""
    result, tests = run_gated(pytester, "--require", "series", workers=workers)
    assert result.ret == 1
    outcomes = {name: t["outcome"] for name, t in tests.items()}
    assert outcomes == {"test_row_that_behaves_as_specified": "passed", "test_row_that_is_broken": "failed",
                        "test_fixed_known_deviation": "unexpected-pass",
                        "test_row_with_a_failed_precondition": "error",
                        "test_precondition_inside_a_known_deviation": "error"}
    assert "IPI delivered to VTL 0" in tests["test_row_that_is_broken"]["message"]
    assert tests["test_fixed_known_deviation"]["message"].startswith("unexpected pass: ")
    text = result.stdout.str()
    gate = [line for line in text.splitlines() if line.startswith("FAILED required feature group")]
    assert gate == ["FAILED required feature group vtl_ipi (VTL-aware PV IPIs) is absent: crafted probe for vtl_ipi"]
    summary = text[text.index("kvmtests summary"):].split("\n", 1)[1].split("\n=====", 1)[0].rstrip("\n")
    assert summary == (GOLDEN / "gated_summary.txt").read_text().rstrip("\n")


def test_failed_precondition_is_an_error_of_the_providing_group(pytester):
    result, tests = run_gated(pytester)
    row = tests["test_row_with_a_failed_precondition"]
    assert (row["outcome"], row["groups"], row["precondition"]) == (
        "error", ["rwx_attributes", "attr_tracepoints"], "rwx_attributes"), "an error of attr_tracepoints, no failure"
    assert row["message"] == ("precondition from rwx_attributes failed: catalog 20: attributes 0x1 (NR alone) are "
                              "rejected: attributes 0x1 accepted")
    inside = tests["test_precondition_inside_a_known_deviation"]
    assert (inside["outcome"], inside["groups"]) == ("error", ["core", "rwx_attributes"]), \
        "a broken set-up is no known deviation"
    text = result.stdout.str()
    assert "ERROR test_gated.py::test_row_with_a_failed_precondition" in text
    assert "precondition from rwx_attributes failed: catalog 20: attributes 0x1" in text
    assert "FAILED required" not in text, "nothing required, no gate"


# Memory-fault exits whose P09 flags or P11 insn_len are wrong, seen by rows of several groups.
FIELD_TESTS = '''
import pytest
from kvmtests import uapi
from kvmtests.machine import memfault

pytestmark = pytest.mark.nokvm
W = uapi.KVM_MEMORY_EXIT_FLAG_WRITE
RULE = memfault.FaultRule(reported=True, exact=True)   # Intel EPT with P11: byte 56 is the length


@pytest.mark.catalog(36)
def test_attribute_row_sees_a_wrong_insn_len():
    memfault.check_fault(memfault.Fault(W, 0x1000, 0x1000, 0), 36, "3-byte write to an NW page", W, 0x1000,
                         RULE.insn_lens(3), RULE)

@pytest.mark.catalog(36)
def test_attribute_row_sees_wrong_flags():
    memfault.check_fault(memfault.Fault(uapi.KVM_MEMORY_EXIT_FLAG_EXEC, 0x1000, 0x1000, 3), 36, "write to an NW page",
                         W, 0x1000, RULE.insn_lens(3), RULE)

@pytest.mark.catalog(36)
def test_attribute_row_sees_a_wrong_size():
    memfault.check_fault(memfault.Fault(W, 0x1000, 0, 3), 36, "write to an NW page", W, 0x1000, RULE.insn_lens(3), RULE)

@pytest.mark.catalog(63)
def test_insn_len_row_sees_a_wrong_insn_len():
    memfault.check_fault(memfault.Fault(W, 0x1000, 0x1000, 0), 63, "3-byte write", W, 0x1000, RULE.insn_lens(3), RULE)

@pytest.mark.catalog(62)
def test_flags_row_sees_wrong_flags():
    memfault.check_fault(memfault.Fault(uapi.KVM_MEMORY_EXIT_FLAG_READ, 0x1000, 0x1000, 3), 62, "write", W, 0x1000,
                         RULE.insn_lens(3), RULE)
'''


def test_a_wrong_exit_field_counts_under_the_group_that_provides_it(pytester):
    """A wrong insn_len (P11) or flags (P09) in a row of another group is that group's error (and an error, not a
    failure, of the row's group); in a row of the providing group it is a failure counted there alone."""
    result, tests = run_gated(pytester, tests=FIELD_TESTS)
    got = {name: (t["outcome"], t["groups"]) for name, t in tests.items()}
    assert got == {
        "test_attribute_row_sees_a_wrong_insn_len": ("error", ["fault_insn_len", "rwx_attributes"]),
        "test_attribute_row_sees_wrong_flags": ("error", ["fault_rwx_flags", "rwx_attributes"]),
        "test_attribute_row_sees_a_wrong_size": ("failed", ["rwx_attributes"]),
        "test_insn_len_row_sees_a_wrong_insn_len": ("failed", ["fault_insn_len"]),
        "test_flags_row_sees_wrong_flags": ("failed", ["fault_rwx_flags"]),
    }
    assert tests["test_attribute_row_sees_a_wrong_insn_len"]["message"] == (
        "precondition from fault_insn_len failed: memory-fault exit field: catalog 36/67: 3-byte write to an NW "
        "page: insn_len 0x0, expected 0x3 (Intel EPT: the instruction length (63))")
    assert "flags EXEC, expected WRITE" in tests["test_attribute_row_sees_wrong_flags"]["message"]
    assert "insn_len 0x0, expected 0x3" in tests["test_insn_len_row_sees_a_wrong_insn_len"]["message"]
    assert result.ret == 1


def test_without_gating_an_absent_group_checks_upstream(pytester):
    result, tests = run_gated(pytester)
    assert tests["test_row_that_behaves_as_specified"]["outcome"] == "failed", "upstream expectation checked"
    assert tests["test_row_that_is_broken"]["outcome"] == "skipped"
    assert tests["test_fixed_known_deviation"]["outcome"] == "passed", "no known deviation upstream"


# The single-bug kernel: the whole series but P18, whose codes KVM answers in the kernel with status 2
# (VtlCall and VtlReturn no longer exit); hyperv's driver answers so without a VM.
VSM_BROKEN_CONFTEST = CRAFTED_CONFTEST % "vsm_hcalls" + '''
import pytest
from kvmtests import hvtlfs
from kvmtests.machine import hyperv


def hypercall(hvm, control, rdx=0, r8=0, *, xmm=None, **_):
    """P18's codes answered in the kernel (RAX 2), every other code exiting as the series says."""
    call = hyperv.Call(control, rdx, r8, list(xmm or hyperv.XMM_DEFAULT))
    if call.code in hvtlfs.VSM_CODES:
        return hyperv.HcallOutcome(call, completed=True, rax=hvtlfs.HV_STATUS_INVALID_HYPERCALL_CODE)
    return hyperv.HcallOutcome(call, exited=True, input=control, params=(rdx, r8),
                               xmm=list(call.xmm) if call.fast else [hyperv.XMM_SENTINEL] * 6)


hyperv.build_hv_machine = lambda vm, *args, **kwargs: None
hyperv.hypercall = hypercall


@pytest.fixture
def vm():
    return None


@pytest.fixture
def xmm_capture():
    return True         # xmm_output present (tests/conftest.py)


def pytest_collection_modifyitems(items):
    for item in items:  # the crafted driver needs no /dev/kvm
        item.add_marker(pytest.mark.nokvm)
'''

# The VSM scenarios' steps on that kernel: the control page machine/vsm.py reads when a step ends, and its checks.
VSM_STEPS = '''
import pytest
from kvmtests import hvtlfs
from kvmtests.machine import vsm


class ControlPage(dict):
    """VTL-shared memory as the harness reads it, without a VM: u64 values by GPA, zero where unwritten."""

    def read_u64(self, gpa):
        return self.get(gpa, 0)

    def write_u64(self, gpa, value):
        self[gpa] = value


@pytest.mark.catalog(125, 126, 127, 130, 133)
def test_interrupt_for_vtl1_preempts_running_vtl0(series):
    """VTL1, woken by the MSI, took it and returned: KVM answered its HvCallVtlReturn, and VTL1 ran on without an exit
    until its step ended."""
    series.require("vsm_hcalls")
    vsm.answered_in_kernel(ControlPage({vsm.NOTED[1]: hvtlfs.HVCALL_VTL_RETURN}), 1)


@pytest.mark.catalog(80, 81, 85, 125)
def test_vtl_call_and_return_round_trips_without_drift(series):
    """KVM answered VTL0's HvCallVtlCall: VTL0 went on to its guest assertion."""
    series.require("vsm_hcalls")
    vsm.answered_in_kernel(ControlPage({vsm.NOTED[0]: hvtlfs.HVCALL_VTL_CALL}), 0)


@pytest.mark.catalog(80, 84)
def test_start_virtual_processor_for_a_second_vp(series):
    """VTL0's HvCallStartVirtualProcessor exits (P08): served, nothing is left noted."""
    series.require("hv_exits")
    page = ControlPage({vsm.NOTED[0]: hvtlfs.HVCALL_START_VP})
    vsm.served(page, 0, hvtlfs.HVCALL_START_VP)
    vsm.answered_in_kernel(page, 0)
'''
HV_HCALLS = Path(__file__).with_name("test_hv_hcalls.py")


def test_a_row_relying_on_a_required_absent_group_is_that_groups_error(pytester):
    """--require series on a kernel whose VtlCall/VtlReturn never exit: catalog 110 (its own row, run on crafted
    hypercalls) and the MSI-wake scenario's step are errors of vsm_hcalls naming what they relied on, and errors, not
    failures, of xmm_output and mp_inactive_vtl; the round trip, which checks catalog 80 itself, fails under vsm_hcalls
    alone."""
    result, tests = run_gated(pytester, "--require", "series", "-k", "leaks_nothing or test_gated",
                              conftest=VSM_BROKEN_CONFTEST, tests=VSM_STEPS, test_hv_hcalls=HV_HCALLS.read_text())
    got = {name: (t["outcome"], t["groups"], t.get("precondition")) for name, t in tests.items()}
    assert got == {
        "test_fast_exit_outside_the_xmm_fast_list_leaks_nothing": ("error", ["vsm_hcalls", "xmm_output"], "vsm_hcalls"),
        "test_interrupt_for_vtl1_preempts_running_vtl0": ("error", ["vsm_hcalls", "mp_inactive_vtl"], "vsm_hcalls"),
        "test_vtl_call_and_return_round_trips_without_drift": ("failed", ["vsm_hcalls"], None),
        "test_start_virtual_processor_for_a_second_vp": ("passed", ["hv_exits", "vsm_hcalls"], None),
    }
    assert tests["test_fast_exit_outside_the_xmm_fast_list_leaks_nothing"]["message"] == (
        "precondition from vsm_hcalls failed: catalog 80: fast hypercall 0x0011 exits to userspace: no exit, the guest "
        "resumed after the hypercall with RAX 0x2 (INVALID_HYPERCALL_CODE)")
    assert tests["test_interrupt_for_vtl1_preempts_running_vtl0"]["message"] == (
        "precondition from vsm_hcalls failed: VSM harness step: catalog 80: VTL1's hypercall 0x12 never reached the "
        "VMM: KVM answered it in the kernel")
    counts = report.group_counts(json.loads((pytester.path / "out.json").read_text()))
    assert {g: dict(counts[g]) for g in ("xmm_output", "mp_inactive_vtl", "vsm_hcalls")} == {
        "xmm_output": {"error": 1}, "mp_inactive_vtl": {"error": 1},
        "vsm_hcalls": {"error": 2, "failed": 1, "passed": 1}}
    assert "FAILED required feature group vsm_hcalls" in result.stdout.str()
