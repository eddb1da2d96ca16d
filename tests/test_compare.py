"""Comparing and tabulating saved runs, on crafted JSON: `kvmtests compare`, the matrix, qualify's cells."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmtests.machine import host
from kvmtests.runner import qualify
from kvmtests.verdict import compare, features, matrix, report
from kvmtests.verdict.features import Detection

pytestmark = pytest.mark.selftest
GOLDEN = Path(__file__).parent / "golden"
SW_SKIP = "needs KVM_X86_SW_PROTECTED_VM (CONFIG_KVM_SW_PROTECTED_VM): KVM_CAP_VM_TYPES lacks bit 1"


def host_of(kernel: str, command_line: str = "default") -> dict:
    return {"kernel": kernel, "kvm device": "/dev/kvm", "cpu vendor": "AuthenticAMD", "vendor module": "kvm_amd",
            "tdp": "on (kvm_amd.npt=Y, kvm.tdp_mmu=Y)", "environment": "QEMU/TCG (kvmtests qualify)",
            "command line": command_line}


def test(nodeid: str, outcome: str, catalog: list[int], groups: list[str], message: str = "") -> dict:
    return {"nodeid": nodeid, "outcome": outcome, "message": message, "catalog": catalog, "groups": groups,
            "duration": 0.01}


test.__test__ = False  # a builder, not a test


def run(kernel: str, tests: list[dict], states: dict[str, str] | None = None, findings: list[str] = (),
        command_line: str = "default") -> dict:
    detections = {k: Detection(k, (states or {}).get(k, features.ABSENT), f"probe for {k}") for k in features.GROUPS}
    exitstatus = int(any(t["outcome"] in ("failed", "error") for t in tests))
    return report.build(host_of(kernel, command_line), detections, list(findings), [], [dict(t) for t in tests],
                        exitstatus)


STOCK = [
    test("tests/test_mem_attributes.py::test_supported_attributes_on_sw_protected_vm", "skipped", [7],
         ["rwx_attributes"], SW_SKIP),
    test("tests/test_mem_attributes.py::test_attribute_value_table[32-sw_protected-0x8]", "skipped", [32],
         ["rwx_attributes"], SW_SKIP),
    *(test(f"tests/test_fault_exit.py::test_private_page_access_flags[{n}-{a}]", "skipped", [n],
           ["fault_rwx_flags"], SW_SKIP) for n, a in ((59, "read"), (60, "write"), (61, "exec"))),
    test("tests/test_fault_exit.py::test_insn_len_byte_overwrites_sentinel[66-private-read-sw-protected-vm]",
         "skipped", [66], ["fault_insn_len"], SW_SKIP),
    test("tests/test_mem_attributes.py::test_nw_rejected_on_default_vm", "passed", [16], ["rwx_attributes"]),
    test("tests/test_hv_hcalls.py::test_vtl_call_completes_in_kernel", "passed", [9], ["vsm_hcalls"]),
    test("tests/test_lifecycle.py::test_vm_create", "passed", [], []),
]
UNKNOWN_FAULTS = {"fault_rwx_flags": features.UNKNOWN, "fault_insn_len": features.UNKNOWN}


def stock() -> dict:
    return run("6.12.95+deb12-amd64", STOCK, UNKNOWN_FAULTS)


def sw_protected() -> dict:
    """The same suite on the CONFIG_KVM_SW_PROTECTED_VM build: the private-memory rows run."""
    return run("6.12.95", [dict(t, outcome="passed", message="") if t["outcome"] == "skipped" else t for t in STOCK])


TITLE = "BUG: kernel NULL pointer dereference in kvm_hv_hypercall"
VTL_CALL = "tests/test_hv_hcalls.py::test_vtl_call_completes_in_kernel"
NW = "tests/test_mem_attributes.py::test_nw_rejected_on_default_vm"


def crash(title: str, during: str, boot: int = 1) -> dict:
    return {"title": title, "kind": "oops", "during": during, "groups": ["vsm_hcalls"], "boot": boot, "fatal": True,
            "log": [f"[    3.141592] {title}"]}


def crashed() -> dict:
    """The stock run whose VTL call oopsed the kernel, the NW row after it blocked; resumed on a second boot."""
    doc = stock()
    for t in doc["tests"]:
        if t["nodeid"] == VTL_CALL:
            t.update(outcome="crashed", message=TITLE, log=crash(TITLE, VTL_CALL)["log"],
                     crash={"title": TITLE, "kind": "oops", "boot": 1})
        elif t["nodeid"] == NW:
            t.update(outcome="blocked", blocked_by=TITLE,
                     message=f"not run: the kernel crashed on the path of vsm_hcalls (in {VTL_CALL}: {TITLE})")
    return doc | {"exitstatus": 1, "boots": 2, "crashes": [crash(TITLE, VTL_CALL)]}


def test_a_crashed_candidate_against_a_clean_base_exits_1_with_the_crash_first():
    doc = compare.compare(stock(), crashed(), "stock.json", "crashed.json")
    assert doc["exit"] == 1
    assert doc["verdict"] == f"compare: REGRESSION: kernel crashed ({TITLE}): 1 test crashed, 1 blocked"
    assert (doc["catalog rows"]["crashed"], doc["catalog rows"]["blocked"]) == ([9], [16])
    assert doc["crashes"] == {"new": [TITLE], "vanished": []}
    assert compare.render(doc) == (GOLDEN / "compare_crashed.txt").read_text().rstrip("\n")


def test_a_crash_gone_from_the_candidate_is_fixed_and_its_blocked_rows_start_running():
    doc = compare.compare(crashed(), stock())
    assert doc["exit"] == 0 and doc["crashes"] == {"new": [], "vanished": [TITLE]}
    assert [t["nodeid"] for t in doc["tests"]["fixed"]] == [VTL_CALL]
    assert [(t["nodeid"], t["base"]) for t in doc["tests"]["started"]] == [(NW, "blocked")]
    assert f"vanished crash: {TITLE}" in compare.render(doc)


def test_a_new_crash_between_tests_alone_exits_1_and_one_in_both_runs_does_not():
    title = "INFO: task hung in kvm_vcpu_ioctl"
    cand = stock() | {"crashes": [crash(title, "between tests")]}
    doc = compare.compare(stock(), cand)
    assert doc["exit"] == 1 and doc["verdict"] == f"compare: REGRESSION: kernel crashed ({title})"
    assert f"new crash: {title}" in compare.render(doc)
    assert compare.compare(cand, cand)["exit"] == 0


def test_an_incomplete_run_says_why_under_its_identity():
    doc = compare.compare(stock(), crashed() | {"incomplete": "the kernel crashed 2 times: more than --max-resumes 1"})
    assert doc["candidate"]["incomplete"] and not doc["base"]["incomplete"]
    assert compare.render(doc).splitlines()[2] == ("candidate run INCOMPLETE: the kernel crashed 2 times: more than "
                                                   "--max-resumes 1")


def test_rows_that_start_running_are_listed_and_exit_0():
    doc = compare.compare(stock(), sw_protected(), "stock.json", "sw.json")
    assert doc["exit"] == 0
    assert doc["catalog rows"]["started"] == [7, 32, 59, 60, 61, 66]
    started = doc["tests"]["started"]
    assert len(started) == 6 and all(t["why"] == SW_SKIP and t["candidate"] == "passed" for t in started)
    assert [g["change"] for g in doc["groups"] if g["group"] == "fault_rwx_flags"] == ["detection changed"]
    text = compare.render(doc)
    assert "catalog rows that start running: 7, 32, 59-61, 66" in text
    assert text.splitlines()[-1] == doc["verdict"] == (
        "compare: no regression: 0 fixed, 6 started running (catalog 7, 32, 59-61, 66), 0 stopped running, "
        "0 unexpected passes")


def test_one_row_passed_to_failed_exits_1_naming_it():
    cand = stock()
    nw = next(t for t in cand["tests"] if t["catalog"] == [16])
    nw.update(outcome="failed", message="E catalog 16: NW accepted, expected EINVAL")
    doc = compare.compare(stock(), cand)
    assert doc["exit"] == 1
    assert doc["verdict"] == ("compare: REGRESSION: 1 regressed: tests/test_mem_attributes.py::"
                              "test_nw_rejected_on_default_vm (passed -> failed, catalog 16)")
    assert doc["catalog rows"]["regression"] == [16]
    assert doc["tests"]["regression"][0]["why"] == "E catalog 16: NW accepted, expected EINVAL"


def test_every_kind_of_change_matches_golden_file():
    base = run("6.12.0-base", [
        test("tests/t.py::test_reg", "passed", [16], ["rwx_attributes"]),
        test("tests/t.py::test_fix", "failed", [80], ["hv_exits"], "E catalog 80: RAX 0x2\nE more"),
        test("tests/t.py::test_dev", "known-deviation", [43], ["rwx_attributes"], "v1 keeps a writable SPTE"),
        test("tests/t.py::test_stop", "passed", [111], ["vtl_ipi"]),
        test("tests/t.py::test_gone", "passed", [1], ["fault_insn_len"]),
        test("tests/t.py::test_same", "skipped", [2], [], "same reason"),
    ], {"rwx_attributes": features.PRESENT, "hv_exits": features.PRESENT}, ["partial series: old"])
    cand = run("6.12.1-cand", [
        test("tests/t.py::test_reg", "error", [16], ["rwx_attributes"], "E taint grew"),
        test("tests/t.py::test_fix", "passed", [80], ["hv_exits"]),
        test("tests/t.py::test_dev", "unexpected-pass", [43], ["rwx_attributes"], "unexpected pass: v1 keeps a writable SPTE"),
        test("tests/t.py::test_stop", "skipped", [111], ["vtl_ipi"], "kernel lacks KVM_CAP_HYPERV"),
        test("tests/t.py::test_new", "passed", [], []),
        test("tests/t.py::test_new_fail", "failed", [5], ["rwx_attributes"], "E catalog 5: boom"),
        test("tests/t.py::test_same", "skipped", [2], [], "same reason"),
    ], {"hv_exits": features.PRESENT}, ["partial series: new"], command_line="kvm.tdp_mmu=N")
    doc = compare.compare(base, cand, "base.json", "cand.json")
    assert {cat: [t["nodeid"].split("::")[1] for t in items] for cat, items in doc["tests"].items()} == {
        "crashed": [], "blocked": [],
        "regression": ["test_new_fail", "test_reg"], "fixed": ["test_fix"], "unexpected-pass": ["test_dev"],
        "started": [], "stopped": ["test_stop"], "only-base": ["test_gone"], "only-candidate": ["test_new"]}
    assert [g["group"] for g in doc["groups"] if g["change"] == "lost"] == ["rwx_attributes"]
    assert doc["findings"] == {"new": ["partial series: new"], "vanished": ["partial series: old"]}
    assert compare.render(doc) == (GOLDEN / "compare.txt").read_text().rstrip("\n")


@pytest.mark.parametrize("base,cand,expected", [
    ("known-deviation", "unexpected-pass", "unexpected-pass"),
    ("known-deviation", "passed", "unexpected-pass"),
    ("skipped", "unexpected-pass", "unexpected-pass"),
    ("unexpected-pass", "unexpected-pass", None),
    ("known-deviation", "known-deviation", None),
    ("unexpected-pass", "known-deviation", None),
    ("skipped", "failed", "regression"),
    ("error", "skipped", "stopped"),
    ("passed", "crashed", "crashed"),
    ("failed", "crashed", "crashed"),
    (None, "crashed", "crashed"),
    ("crashed", "crashed", None),
    ("crashed", "passed", "fixed"),
    ("crashed", "skipped", "stopped"),
    ("passed", "blocked", "blocked"),
    (None, "blocked", "blocked"),
    ("blocked", "blocked", None),
    ("blocked", "passed", "started"),
    ("blocked", "skipped", None),
    ("blocked", "failed", "regression"),
])
def test_one_test_change(base, cand, expected):
    assert compare.category(base and test("t", base, [1], []), test("t", cand, [1], [])) == expected


def test_an_unexpected_pass_in_a_file_from_before_its_own_outcome():
    old = test("t", "failed", [43], [], "[XPASS(strict)] v1 keeps a writable SPTE")
    assert compare.category(test("t", "known-deviation", [43], []), old) == "unexpected-pass"


def test_a_lost_group_alone_exits_1():
    cand = stock()
    cand["features"]["vsm_hcalls"]["state"] = features.ABSENT
    base = stock()
    base["features"]["vsm_hcalls"]["state"] = features.PRESENT
    doc = compare.compare(base, cand)
    assert doc["exit"] == 1 and doc["verdict"] == "compare: REGRESSION: groups no longer present: vsm_hcalls"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtests.cli", *argv], capture_output=True, text=True)


def write(path: Path, doc: dict) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_command_text_and_json(tmp_path):
    base, cand = write(tmp_path / "a.json", stock()), write(tmp_path / "b.json", sw_protected())
    out = cli("compare", base, cand)
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith("compare: no regression")
    out = cli("compare", "--json", base, cand)
    assert out.returncode == 0 and json.loads(out.stdout)["catalog rows"]["started"] == [7, 32, 59, 60, 61, 66]
    out = cli("compare", "--json", base, write(tmp_path / "c.json", crashed()))
    doc = json.loads(out.stdout)
    assert out.returncode == doc["exit"] == 1 and doc["tests"]["crashed"][0]["why"] == TITLE
    assert next(g for g in doc["groups"] if g["group"] == "vsm_hcalls")["candidate"]["counts"]["crashed"] == 1


@pytest.mark.parametrize("setup,expected", [
    (lambda d: None, "missing.json does not exist: pass a file written by --kvmtests-json or kvmtests qualify"),
    (lambda d: (d / "missing.json").write_text("[1, 2]"), "missing.json is not a kvmtests result"),
    (lambda d: (d / "missing.json").write_text("\x00\xff garbage"), "missing.json is not a kvmtests result"),
    (lambda d: (d / "missing.json").write_text(json.dumps(dict(stock(), tests=[{"nodeid": "x"}]))),
     "missing.json is an incomplete kvmtests result (format 1)"),
    (lambda d: (d / "missing.json").write_text(json.dumps(dict(stock(), format=2))),
     "missing.json format 2: compare runs written by kvmtests versions of one format"),
])
def test_compare_bad_input_is_one_line_exit_2(tmp_path, setup, expected):
    setup(tmp_path)
    out = cli("compare", write(tmp_path / "a.json", stock()), str(tmp_path / "missing.json"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and expected in out.stderr and "Traceback" not in out.stderr


def test_two_runs_of_another_format_say_which_kvmtests_reads(tmp_path):
    old = dict(stock(), format=0)
    out = cli("compare", write(tmp_path / "a.json", old), write(tmp_path / "b.json", old))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"is results format 0, this kvmtests reads format {report.FORMAT_VERSION}" in out.stderr


def matrix_runs() -> list[dict]:
    failing = [dict(t, outcome="failed", message="E catalog 16") if t["catalog"] == [16] else t for t in STOCK]
    return [stock(), run("6.12.95", sw_protected()["tests"], findings=["partial series: present vsm_hcalls"]),
            run("6.12.95+deb12-amd64", failing, UNKNOWN_FAULTS, ["partial series: present vsm_hcalls"],
                command_line="kvm.tdp_mmu=N")]


def test_matrix_matches_golden_file():
    assert matrix.render(matrix_runs()) == (GOLDEN / "matrix.txt").read_text().rstrip("\n")


def test_matrix_counts_crashes_and_boots_and_names_each_crash_below():
    why = "the kernel crashed 2 times: more than --max-resumes 1; 3 tests did not run"
    text = matrix.render([stock(), crashed() | {"incomplete": why}])
    lines = text.splitlines()
    assert next(x for x in lines if x.startswith("vsm_hcalls")).endswith("absent 0/0/0/0 +1 crash")
    assert next(x for x in lines if x.startswith("total")).endswith("exit 1, crashed, 2 boots 1/0/6/0 +1 crash +1 blocked")
    assert lines[-2:] == [f"#2: CRASH: {TITLE}", f"#2: INCOMPLETE: {why}"]


def test_matrix_markdown_is_one_table_with_findings_as_a_list():
    lines = matrix.render(matrix_runs(), markdown=True).splitlines()
    assert lines[0].startswith("| run<br>kernel<br>cpu<br>environment<br>command line ")
    assert lines[1].startswith("|--") and len([x for x in lines if x.startswith("|")]) == 2 + len(features.GROUPS) + 2
    assert lines[-1] == "- #2 #3: finding: partial series: present vsm_hcalls"


def test_report_command_with_several_files_prints_the_matrix(tmp_path):
    files = [write(tmp_path / f"{i}.json", doc) for i, doc in enumerate(matrix_runs())]
    out = cli("report", *files)
    assert out.returncode == 1, "run #3 failed"
    assert out.stdout.rstrip("\n") == (GOLDEN / "matrix.txt").read_text().rstrip("\n")
    assert cli("report", *files[:2]).returncode == 0
    out = cli("report", "--kcidb", str(tmp_path / "k.json"), *files)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "pass one file" in out.stderr


@pytest.mark.parametrize("cmdline,expected", [
    ("console=ttyS0 panic=-1 kvmtests.accel=tcg kvm.tdp_mmu=N mitigations=off", "kvm.tdp_mmu=N mitigations=off"),
    ("console=ttyS0 printk.time=1 panic=-1 kvmtests.accel=tcg kvmtests.crash_at=t.py::x", "default"),
    ("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro kvm_amd.npt=0 kvm.tdp_mmu=N kvmfoo=1 -- kvm.x=1", "kvm_amd.npt=0 kvm.tdp_mmu=N"),
    ("root=/dev/sda1 quiet", "default"),
])
def test_command_line_names_the_variant(monkeypatch, cmdline, expected):
    monkeypatch.delenv("KVMTESTS_ACCEL", raising=False)
    assert host.command_line(cmdline) == expected


def qualify_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvmtests")
    qualify.register(parser.add_subparsers())
    return parser.parse_args(["qualify", "--shards", "1", *argv])   # the stand-in emulators run whole cells


def test_cells_are_every_kernel_with_every_variant_in_order(tmp_path):
    args = qualify_args("--kernel", "debian-6.12", "--kernel", "/k/bzImage", "--variant", "default",
                        "--variant", "kvm.tdp_mmu=N", "--variant", "default")
    assert qualify.cells(args) == [("debian-6.12", "default"), ("debian-6.12", "kvm.tdp_mmu=N"),
                                   ("/k/bzImage", "default"), ("/k/bzImage", "kvm.tdp_mmu=N")]
    assert qualify.cell_dir(tmp_path, 2, "debian-6.12", "kvm.tdp_mmu=N kvm_amd.npt=0") == \
        tmp_path / "2-debian-6.12-kvm.tdp_mmu=N_kvm_amd.npt=0"
    assert qualify.command_line("mitigations=off", "kvm.tdp_mmu=N") == "mitigations=off kvm.tdp_mmu=N"
    assert qualify.command_line("", "default") == ""


def test_qualify_runs_each_cell_keeps_its_results_and_ends_in_the_matrix(tmp_path, monkeypatch, capsys):
    """Four cells: the second fails its suite, the third never boots; all kept, the matrix, the first failure's exit."""
    calls = []

    def one(args, kernel, append, results_dir):
        calls.append((kernel, append, results_dir))
        if len(calls) == 3:
            return qualify.EXIT_TIMEOUT
        results_dir.mkdir(parents=True)
        doc = matrix_runs()[2] if len(calls) == 2 else matrix_runs()[0]
        (results_dir / "results.json").write_text(json.dumps(doc))
        return doc["exitstatus"]

    monkeypatch.setattr(qualify, "qualify_one", one)
    args = qualify_args("--kernel", "debian-6.12", "--kernel", "debian-6.1", "--variant", "default",
                        "--variant", "kvm.tdp_mmu=N", "--append", "mitigations=off", "--results", str(tmp_path))
    assert qualify.qualify(args) == 1
    assert [(k, a, d.name) for k, a, d in calls] == [
        ("debian-6.12", "mitigations=off", "1-debian-6.12"),
        ("debian-6.12", "mitigations=off kvm.tdp_mmu=N", "2-debian-6.12-kvm.tdp_mmu=N"),
        ("debian-6.1", "mitigations=off", "3-debian-6.1"),
        ("debian-6.1", "mitigations=off kvm.tdp_mmu=N", "4-debian-6.1-kvm.tdp_mmu=N")]
    out = capsys.readouterr().out.splitlines()
    assert "qualify: cell #2 of 4: debian-6.12, command line kvm.tdp_mmu=N; results in " \
           f"{tmp_path / '2-debian-6.12-kvm.tdp_mmu=N'}" in out
    assert "== kvmtests matrix (4 cells)" in out and sum(line.count("exit ") for line in out if
                                                          line.startswith("total")) == 3
    assert f"qualify: #3 debian-6.1, command line default: no results (exit 124); see " \
           f"{tmp_path / '3-debian-6.1' / 'console.log'}" in out
    assert out[-1] == ("qualify: 4 cells, failed: #2 debian-6.12, command line kvm.tdp_mmu=N (exit 1); "
                       "#3 debian-6.1, command line default (exit 124)")


def test_qualify_with_one_cell_keeps_its_old_results_directory(monkeypatch):
    seen = []
    monkeypatch.setattr(qualify, "qualify_one", lambda args, kernel, append, results_dir: seen.append(
        (kernel, append, results_dir)) or 0)
    assert qualify.qualify(qualify_args("--kernel", "debian-6.12", "--append", "kvm_amd.npt=0")) == 0
    assert seen == [("debian-6.12", "kvm_amd.npt=0", None)]
