"""What a resumed boot runs and how a crash is counted: only the kernel's lines are crash reports, and a row
blocked by a crashed path counts under that path's group alone (found on single-bug kernels: a blocked row's
skip reason quoting its crash's title became a second crash, and a blocked scenario moved five groups' counts)."""
import json
from pathlib import Path

import pytest

import kvmtests
from kvmtests.runner.monitor import Monitor

pytestmark = pytest.mark.selftest
PROJECT = str(Path(kvmtests.__file__).resolve().parent.parent)
TITLE = "BUG: kernel NULL pointer dereference in kvm_hv_hypercall"


def test_the_suites_output_quoting_a_title_is_no_crash() -> None:
    monitor = Monitor(2, 0, 0, can_nmi=False)
    monitor.line("@@kvmtests@@ suite-start 3.0", 1.0)
    monitor.line(f"SKIPPED [8] tests/test_hv_ipi.py:113: blocked by a crash: the kernel crashed on the path of "
                 f"vtl_ipi (detection of vtl_ipi: {TITLE})", 2.0)
    monitor.finish(False, 10.0)
    assert monitor.crashes == []
    monitor.line("[   48.100000] BUG: kernel NULL pointer dereference, address: 0000000000000028", 11.0)
    monitor.finish(False, 20.0)
    assert [c.report.title for c in monitor.crashes] == ["BUG: kernel NULL pointer dereference"]


RESUME_CONFTEST = '''
pytest_plugins = ["kvmtests.verdict.plugin"]
from kvmtests.verdict import features, probe

features._probe = lambda g: features.Detection(g, features.ABSENT, f"crafted probe for {g}")
features.advertised_hv_bits = lambda: {}
probe.host_identity = lambda: {"kernel": "6.12.0-crafted", "vendor module": "kvm_amd"}
'''

RESUME_TESTS = '''
import pytest

@pytest.mark.catalog(111, 80)
def test_vtl_ipi_and_hv_exits():
    pass

@pytest.mark.catalog(80)
@pytest.mark.nokvm
def test_hv_exits_only():
    pass

@pytest.mark.catalog(136)
@pytest.mark.nokvm
def test_vtl_ipi_layout_needs_no_kernel():
    pass

@pytest.mark.nokvm
def test_needs_the_crashed_probe(series):
    series.patched("xmm_output")

def test_finished_on_boot_one():
    raise AssertionError("a resumed boot runs no test an earlier boot finished")
'''


def test_a_resumed_boot_blocks_the_crashed_paths_rows_under_that_group_alone(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RESUME_CONFTEST)
    pytester.makepyfile(test_resumed=RESUME_TESTS)
    (pytester.path / "resume.json").write_text(json.dumps({
        "done": ["test_resumed.py::test_finished_on_boot_one"],
        "crashed_groups": {"vtl_ipi": f"the kernel crashed on the path of vtl_ipi (t::x: {TITLE})"},
        "crashed_probes": {"xmm_output": TITLE}}))
    for name, value in (("KVMTESTS_DEV", "/nonexistent-kvm"), ("PYTHONPATH", PROJECT),
                        ("KVMTESTS_RESUME", str(pytester.path / "resume.json"))):
        pytester._monkeypatch.setenv(name, value)
    pytester.runpytest_subprocess("-n", "0", "--kvmtests-stream=/dev/null", "--kvmtests-json", "out.json",
                                  "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")
    doc = json.loads((pytester.path / "out.json").read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
    assert "test_finished_on_boot_one" not in tests
    blocked = tests["test_vtl_ipi_and_hv_exits"]
    assert (blocked["outcome"], blocked["groups"]) == ("blocked", ["vtl_ipi"]), blocked
    assert TITLE in blocked["message"]
    assert tests["test_hv_exits_only"]["outcome"] == "passed"
    assert tests["test_vtl_ipi_layout_needs_no_kernel"]["outcome"] == "passed", "no kernel path: never blocked"
    probe_blocked = tests["test_needs_the_crashed_probe"]
    assert (probe_blocked["outcome"], probe_blocked["groups"]) == ("blocked", ["xmm_output"]), probe_blocked
    assert doc["features"]["xmm_output"]["state"] == "crashed"
