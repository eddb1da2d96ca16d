"""`kvmtests lava`: the jobs it writes keep to LAVA's own job schema (lava-common's, when installed), the guest's
report round-trips through a LAVA log into the same results, a job that ended in a kernel crash still gives every
verdict the console streamed, and a results export gives each test's outcome; and, where Debian's lava-dispatcher
and the stock 6.12 kernel are at hand, a written job runs under lava-run to the results a qualify run gives."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_crash
import yaml

from kvmtests.runner import initramfs, kernels, labguest, labresults, lava
from kvmtests.verdict import features, report, stream
from kvmtests.verdict.compare import compare

pytestmark = pytest.mark.selftest

SYSTEM_PYTHON = "/usr/bin/python3"   # Debian's, which has lava-common's schemas
ODD = "tests/test_x.py::test_y[a=b c>d%e]"
TESTS = [("tests/test_layout.py::test_struct_sizes", "passed", [2]), (ODD, "failed", [16]),
         ("tests/test_hv_hcalls.py::test_xmm_output[get_vp_registers]", "known-deviation", [97]),
         ("tests/test_mp_state.py::test_inactive_vtl[set]", "skipped", [123])]


def lava_schema(kind: str, doc: dict) -> str:
    """What lava-common's schema says of a job or device dictionary ('' when valid)."""
    check = ("import sys, yaml\nfrom lava_common.schemas import validate\nfrom lava_common.schemas.device import "
             "validate as device\ntry:\n    (validate if sys.argv[1] == 'job' else device)(yaml.safe_load("
             "sys.stdin))\nexcept Exception as e:\n    print(e)\n")
    done = subprocess.run([SYSTEM_PYTHON, "-c", check, kind], input=yaml.safe_dump(doc), capture_output=True,
                          text=True)
    return done.stdout.strip() + done.stderr.strip()


@pytest.fixture(scope="module")
def schema() -> None:
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run([SYSTEM_PYTHON, "-c", "import lava_common.schemas"],
                                                          capture_output=True).returncode:
        pytest.skip("needs Debian's lava-common (apt-get install lava-common) for LAVA's job schema")


def test_a_qemu_job_keeps_to_lavas_schema(schema: None) -> None:
    doc = lava.job("kvmtests 1-k", "qemu", "ipxe", "file:///a/bzImage", "file:///a/ramdisk.cpio.gz",
                   "kvm.tdp_mmu=N", {}, 90)
    assert lava_schema("job", doc) == ""
    image_arg = doc["actions"][0]["deploy"]["images"]["kernel"]["image_arg"]
    assert image_arg.endswith('kvmtests.accel=lava:qemu kvm.tdp_mmu=N"'), "the cell's variant reaches the kernel"
    assert doc["actions"][2]["test"]["definitions"][0]["repository"]["run"]["steps"] == ["kvmtests-suite"]


def test_a_board_job_keeps_to_lavas_schema(schema: None) -> None:
    doc = lava.job("kvmtests 1-k", "x86", "ipxe", "https://lab/a/bzImage", "https://lab/a/ramdisk.cpio.gz",
                   "", {"extra_kernel_args": "console=ttyS1,115200"}, 60)
    assert lava_schema("job", doc) == ""
    assert doc["actions"][0]["deploy"]["to"] == "tftp" and doc["actions"][1]["boot"]["method"] == "ipxe"


def test_the_device_dictionary_keeps_to_lavas_schema(schema: None) -> None:
    assert lava_schema("device", lava.device_dictionary()) == ""


def test_a_node_id_survives_lavas_test_case_ids() -> None:
    name = labguest.case_name(ODD)
    assert not set(name) & set(" =>\t\n") and labguest.case_nodeid(name) == ODD
    assert labguest.case_nodeid(labguest.case_name("a%3Db")) == "a%3Db"


def the_doc() -> dict:
    tests = [{"nodeid": n, "outcome": o, "message": f"why {o}\nmore", "catalog": c, "groups": features.groups_of(c),
              "duration": 0.5} for n, o, c in TESTS]
    return report.build({"kernel": "6.12", "environment": "LAVA device type qemu (kvmtests lava)"}, {}, [], [],
                        tests, 1)


def as_log(console: list[str]) -> str:
    """Console lines as lava-run logs them: a YAML flow mapping a line, `"` escaped, with LAVA's own records."""
    records = [{"dt": "2026-12-06T05:59:16.000000", "lvl": "info", "msg": "lava-dispatcher, installed at version"}]
    records += [{"dt": f"2026-12-06T06:00:{i // 100:02d}.{i % 100:02d}0000", "lvl": "target",
                 "msg": line.replace('"', '\\"')} for i, line in enumerate(console)]
    records.append({"dt": "2026-12-06T06:01:00.000000", "lvl": "results",
                    "msg": {"case": "job", "definition": "lava", "result": "fail",
                            "error_msg": "lava-test-shell timed out after 600 seconds"}})
    return "".join(yaml.safe_dump(r, default_flow_style=True, default_style='"', width=10**6) for r in records)


def test_the_printed_results_come_back_whole(tmp_path: Path) -> None:
    doc = the_doc()
    (tmp_path / "job.log").write_text(as_log(["+ kvmtests-suite", *labguest.block(doc), "+ set +x"]))
    assert labresults.load(tmp_path / "job.log") == doc
    server = tmp_path / "output.yaml"   # a server's copy: the same records, each after "- "
    server.write_text("".join(f"- {line}\n" for line in (tmp_path / "job.log").read_text().splitlines()))
    assert labresults.load(server) == doc


def test_a_damaged_block_is_not_taken(tmp_path: Path) -> None:
    lines = labguest.block(the_doc())
    lines[5] += " "
    assert labresults.printed_results(lines) is None


def events(crash_at: str) -> list[str]:
    """The console of a guest whose kernel panics at crash_at: the suite's events up to there, then the panic."""
    def event(name: str, payload: str) -> str:
        return f"{stream.MARK} {name} 1.0 {payload}"
    out = ["@@kvmtests@@ suite-start 6.60", event(stream.SESSION, stream.encode({"host": {"kernel": "6.12"}})),
           event(stream.COLLECTED, stream.encode([n for n, _, _ in TESTS]))]
    for nodeid, outcome, catalog in TESTS:
        info = {"nodeid": nodeid, "catalog": catalog, "groups": features.groups_of(catalog)}
        out.append(event(stream.TEST_START, stream.encode(info)))
        if nodeid == crash_at:
            return out + [f"[   12.{i:06d}] {line}" for i, line in enumerate(test_crash.SYSRQ_PANIC.splitlines())]
        out.append(event(stream.TEST_END, stream.encode(info | {"outcome": outcome, "message": "", "duration": 1})))
    return out


def test_a_job_that_ended_in_a_kernel_crash_keeps_every_streamed_verdict(tmp_path: Path) -> None:
    _, _, title = test_crash.REPORTS["sysrq panic"]
    (tmp_path / "job.log").write_text(as_log(events(ODD)))
    doc = labresults.load(tmp_path / "job.log")
    got = {t["nodeid"]: t["outcome"] for t in doc["tests"]}
    assert got == {TESTS[0][0]: "passed", ODD: "crashed"}
    assert doc["crashes"][0]["title"] == title and doc["exitstatus"] == 1
    assert doc["incomplete"] == ("LAVA ended the job: lava-test-shell timed out after 600 seconds before the suite "
                                 "sent its results; 2 selected tests did not run")


def test_a_results_export_gives_each_tests_outcome(tmp_path: Path) -> None:
    cases = [{"name": "validate", "suite": "lava", "result": "pass", "metadata": {"case": "validate"}}]
    cases += [{"name": labguest.case_name(n), "suite": "0_kvmtests", "result": labguest.RESULTS[o],
               "metadata": {"case": labguest.case_name(n), "set": o, "measurement": 0.5}} for n, o, _ in TESTS]
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(cases))
    doc = labresults.load(tmp_path / "export.yaml")
    assert {t["nodeid"]: t["outcome"] for t in doc["tests"]} == {n: o for n, o, _ in TESTS}
    assert doc["findings"] == [labresults.EXPORT_FINDING] and doc["exitstatus"] == 1
    (tmp_path / "api.json").write_text(json.dumps({"count": 1, "results": [
        c | {"metadata": yaml.safe_dump(c["metadata"])} for c in cases]}))
    assert labresults.load(tmp_path / "api.json")["tests"] == doc["tests"]


def test_anything_else_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("a: b\n")
    with pytest.raises(labresults.NotLava, match="is neither a LAVA job log"):
        labresults.load(tmp_path / "x.yaml")


def test_the_guest_script_reports_after_the_suite_with_the_console_quiet() -> None:
    plan = initramfs.GuestPlan(project_dir=Path("/src"), command=["/py", "-m", "pytest"], env={},
                               results_dir=Path("/kvmtests-results"), root_tag="", results_tag="",
                               host_files=(), lab="cd /src && /py -m kvmtests.runner.labguest /kvmtests-results")
    script = initramfs.lab_suite_script(plan)
    assert script.index("suite-end") < script.index("dmesg -n 1") < script.index("labguest") < script.index(
        "dmesg -n $level") and script.rstrip().endswith("exit 0")


# --- for real: lava-run on this machine -------------------------------------------------------------------------

SELECTION = ["tests/test_lifecycle.py", "tests/test_hv_cpuid.py"]


@pytest.mark.slow
def test_a_written_job_runs_under_lava_run_to_the_qualify_verdicts(tmp_path: Path) -> None:
    """`kvmtests lava` writes the job, lava-run (no server) runs it on QEMU, `kvmtests lava results` takes the log
    back, and compare finds no change from a qualify run of the same kernel and selection (two emulated boots:
    opt-in with -m slow; .ci/run does the same with the whole suite)."""
    if shutil.which("lava-run") is None:
        pytest.skip("needs Debian's lava-dispatcher (apt-get install lava-dispatcher) for lava-run")
    if os.geteuid() != 0:
        pytest.skip("lava-run runs as root")
    if not (kernels.cache_dir() / "kernels" / "debian-6.12" / kernels.DONE).exists():
        pytest.skip("needs the debian-6.12 kernel in the cache: kvmtests kernel fetch debian-6.12")
    cli = [sys.executable, "-m", "kvmtests.cli"]
    out = tmp_path / "lava"
    subprocess.run([*cli, "lava", "--kernel", "debian-6.12", "--out", str(out), "--", *SELECTION], check=True,
                   timeout=600)
    (job,) = (out / "jobs").glob("*.yaml")
    with (tmp_path / "job.log").open("w") as log:
        ran = subprocess.run(["lava-run", "--job-id", f"kvmtests-{os.getpid()}", "--output-dir", str(tmp_path / "o"),
                              "--device", str(out / "devices" / "qemu.yaml"), str(job)], stderr=log, timeout=1800)
    assert ran.returncode == 0, f"lava-run failed: see {tmp_path / 'job.log'}"
    subprocess.run([*cli, "lava", "results", str(tmp_path / "job.log"), "-o", str(tmp_path / "lava.json")],
                   timeout=120)
    subprocess.run([*cli, "qualify", "--kernel", "debian-6.12", "--shards", "1", "--results",
                    str(tmp_path / "qualify"), "--", *SELECTION], timeout=1800)
    lab, plain = report.load(tmp_path / "lava.json"), report.load(tmp_path / "qualify" / "results.json")
    assert len(lab["tests"]) == len(plain["tests"]) > 0
    assert not any(compare(plain, lab)["tests"].values()), "the lab run and the qualify run differ"
