"""Self-tests of the guardian: a test whose process an oops leaves behind or kills, or that hangs, is crashed with
the kernel's report, and the run keeps every other verdict. Kernel-independent: the kernel log is a file."""
import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import test_crash
from kvmtests.machine import health
from kvmtests.verdict import crash, guardian

pytestmark = pytest.mark.selftest
PROJECT = str(Path(__file__).resolve().parents[1])
OOPS, _, TITLE = test_crash.REPORTS["NULL pointer dereference"]
RIP = "RIP: 0010:kvm_hv_hypercall+0x1d4/0x6a0 [kvm]"
WARN = test_crash.warning("")

# The inner run: what test_c does is $SELFTEST_ACTION: block after an oops (the oops left its process
# behind), kill itself after one (the oops killed it), hang with no report, or warn and go on.
INNER = f'''
import os, signal, time

OOPS = {OOPS!r}
WARN = {WARN!r}


def kernel_says(text):
    with open(os.environ["KVMTESTS_KMSG"], "a") as log:
        for seq, line in enumerate(text.replace("PID: 245 ", f"PID: {{os.getpid()}} ").splitlines()):
            log.write(f"{{4 if line.startswith('WARN') else 1}},{{seq}},{{time.monotonic_ns() // 1000}},-;{{line}}\\n")


def test_a_passes():
    pass


def test_b_fails():
    assert 1 == 2


def test_c_crashes():
    action = os.environ["SELFTEST_ACTION"]
    if action in ("block", "kill"):
        kernel_says(OOPS)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "warn":
        kernel_says(WARN)
    else:
        time.sleep(30)


def test_d_passes():
    pass
'''
# Stand in for /dev/kvm so that test_c is a test that needs it (the kernel-health check runs around it); the
# others need none, so that under xdist they do not see test_c's kernel log.
CONFTEST = '''
pytest_plugins = ["kvmtests.verdict.plugin"]


class FakeKvm:
    def close(self):
        pass


def pytest_configure(config):
    config.pluginmanager.get_plugin("kvmtests.verdict.plugin").Kvm = FakeKvm


def pytest_collection_modifyitems(items):
    for item in items:
        if item.name != "test_c_crashes":
            item.add_marker("nokvm")
'''
C = "test_inner.py::test_c_crashes"


def lingering(kmsg: Path) -> list[int]:
    """Processes of the inner run still alive: they alone were started with its kernel log in the environment."""
    mark = f"{health.KMSG_ENV}={kmsg}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: str, action: str,
              *args: str) -> tuple[int, dict, str]:
    """The inner run to its end and its guardians' (exit status, results document, all it printed)."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=INNER)
    kmsg = pytester.path / "kmsg"
    kmsg.write_text("")
    monkeypatch.setenv("PYTHONPATH", PROJECT)
    monkeypatch.setenv(health.KMSG_ENV, str(kmsg))
    monkeypatch.setenv("KVMTESTS_DEV", "/nonexistent-kvm")
    monkeypatch.setenv("SELFTEST_ACTION", action)
    result = pytester.runpytest_subprocess("-n", workers, "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                           "-p", "no:benchmark", "--kvmtests-json", "out.json",
                                           "--junitxml", "junit.xml", *args, timeout=60)
    end = time.monotonic() + 10
    while lingering(kmsg) and time.monotonic() < end:     # under -n 0 the guardian writes after pytest died
        time.sleep(0.1)
    assert not lingering(kmsg), "the inner run left processes behind"
    doc = json.loads((pytester.path / "out.json").read_text())
    return result.ret, doc, (pytester.path / "stdout").read_text() + (pytester.path / "stderr").read_text()


def outcomes(doc: dict) -> dict[str, str]:
    return {t["nodeid"].split("::")[1]: t["outcome"] for t in doc["tests"]}


def junit_cases(pytester: pytest.Pytester) -> dict[str, ET.Element]:
    root = ET.parse(pytester.path / "junit.xml").getroot()
    return {case.get("name"): case for case in root.iter("testcase")}


def check_oops(test: dict) -> None:
    assert test["outcome"] == "crashed" and test["message"] == TITLE
    assert test["crash"] == {"title": TITLE, "kind": crash.OOPS, "boot": 1}
    assert RIP in test["log"] and test["log"][0].startswith("BUG: kernel NULL pointer dereference")


@pytest.mark.parametrize("action", ["block", "kill"])
def test_an_oops_under_n0_keeps_the_verdicts_reached(pytester, monkeypatch, action):
    """-n 0: the oops leaves pytest behind (the guardian kills it) or kills it; the guardian writes the run."""
    ret, doc, printed = run_inner(pytester, monkeypatch, "0", action)
    assert ret == -9
    assert outcomes(doc) == {"test_a_passes": "passed", "test_b_fails": "failed", "test_c_crashes": "crashed"}
    check_oops(next(t for t in doc["tests"] if t["nodeid"] == C))
    assert doc["incomplete"] == (f"the test process died in {C} ({TITLE}); 1 test did not run; "
                                 "the kernel is tainted: run the suite again after a reboot")
    assert [(c["during"], c["title"], c["fatal"]) for c in doc["crashes"]] == [(C, TITLE, True)]
    assert doc["exitstatus"] != 0
    cases = junit_cases(pytester)
    assert set(cases) == {"test_a_passes", "test_b_fails", "test_c_crashes"}
    failure = cases["test_c_crashes"].find("failure")
    assert failure.get("type") == "crashed" and failure.get("message") == TITLE and RIP in failure.text
    assert f"INCOMPLETE: the test process died in {C}" in printed
    assert f"kvmtests: CRASHED in {C}: {TITLE}" in printed


@pytest.mark.parametrize("action", ["block", "kill"])
def test_an_oops_under_xdist_crashes_one_test_and_the_run_goes_on(pytester, monkeypatch, action):
    """-n 2: the dead worker's test is crashed from its guardian's record; a new worker runs the rest."""
    ret, doc, printed = run_inner(pytester, monkeypatch, "2", action)
    assert ret == 1
    assert outcomes(doc) == {"test_a_passes": "passed", "test_b_fails": "failed", "test_c_crashes": "crashed",
                             "test_d_passes": "passed"}
    check_oops(next(t for t in doc["tests"] if t["nodeid"] == C))
    assert not doc.get("incomplete")
    assert [(c["during"], c["title"], c["fatal"]) for c in doc["crashes"]] == [(C, TITLE, True)]
    assert f"the host's kernel crashed during {C} ({TITLE}): it is tainted now, and every verdict after it is " \
           "suspect; run the suite again after a reboot" in doc["findings"]
    assert TITLE in junit_cases(pytester)["test_c_crashes"].find("failure").get("message")
    assert "replacing crashed worker" in printed


def test_a_test_past_its_deadline_is_a_hang_titled_from_its_stacks(pytester, monkeypatch):
    ret, doc, _ = run_inner(pytester, monkeypatch, "0", "hang", "--test-timeout", "2")
    assert ret == -9
    test = next(t for t in doc["tests"] if t["nodeid"] == C)
    assert test["outcome"] == "crashed" and test["crash"]["kind"] == crash.HANG
    assert test["message"].startswith("hang")
    assert any(line.startswith("task ") for line in test["log"]), "the test process's threads and kernel stacks"
    assert "the test ran past its 2 s deadline (--test-timeout)" in test["log"][-1]
    assert doc["incomplete"].startswith(f"the test process died in {C} (hang")


def test_a_warning_crashes_its_test_and_the_run_goes_on(pytester, monkeypatch):
    """A WARNING is no business of the guardian: the kernel-health check fails the test, crashed with its title."""
    ret, doc, _ = run_inner(pytester, monkeypatch, "0", "warn")
    assert ret == 1
    assert outcomes(doc) == {"test_a_passes": "passed", "test_b_fails": "failed", "test_c_crashes": "crashed",
                             "test_d_passes": "passed"}
    test = next(t for t in doc["tests"] if t["nodeid"] == C)
    assert test["message"] == "WARNING in kvm_hv_set_vtl" and test["crash"]["kind"] == crash.WARNING
    assert "RIP: 0010:kvm_hv_set_vtl+0x61/0x90 [kvm]" in test["log"]
    assert [(c["during"], c["fatal"]) for c in doc["crashes"]] == [(C, False)]
    assert not doc.get("incomplete") and not any("kernel crashed" in f for f in doc["findings"])


def test_a_report_names_the_tasks_it_is_about():
    assert guardian.report_pids(OOPS.splitlines()) == {245}
    assert guardian.report_pids(["INFO: task qemu-kvm:77 blocked for more than 120 seconds."]) == {77}
    assert guardian.report_pids(["BUG: soft lockup - CPU#3 stuck for 26s! [kworker/3:1:5150]"]) == {5150}


def test_an_unreadable_kernel_log_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(health.KMSG_ENV, str(tmp_path / "missing"))
    watch = health.Watch()
    assert watch.error == f"cannot read {tmp_path / 'missing'}: No such file or directory"
    assert watch.problems() == [] and watch.lines == []
    guardian.Client().close()
    err = capfd.readouterr().err
    assert err.startswith(f"kvmtests guardian: {watch.error}; ") and err.count("\n") == 1
