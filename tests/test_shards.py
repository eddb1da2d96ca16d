"""`kvmtests qualify --shards` and `--jobs` without a kernel: the plan that splits a cell, the merge that makes it
one result again, the progress board, and whole sharded runs and matrices under the stand-in QEMU of
test_crash_resume (each shard and each cell a child `kvmtests qualify` process, as for real)."""
from __future__ import annotations

import io
import os
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_crash
from test_crash_resume import NODEIDS, RWX_R, RWX_RW, Qualified, Run, check_each_test_once, stand_in
from test_crash_resume import quick, under_qemu  # noqa: F401  (fixtures)
from test_qualify import make_image, run_cli

from kvmtests.runner import initramfs, parallel, qemu, qualify, shards
from kvmtests.verdict import features, matrix, report, stream

pytestmark = pytest.mark.selftest

# Many tests of one file and a few of others: by file, the big file is a shard of its own.
COLLECTED = [f"tests/test_big.py::test_{i}" for i in range(6)] + \
    [f"tests/test_a.py::test_{i}" for i in range(3)] + [f"tests/test_b.py::test_{i}" for i in range(3)]


def loads(plan: dict, weight: dict[str, float]) -> list[float]:
    return [sum(weight[n] for n, s in plan["tests"].items() if s == i) for i in range(1, plan["count"] + 1)]


def test_a_plan_runs_every_test_once_and_keeps_files_together_without_durations() -> None:
    plan = shards.plan(COLLECTED, {}, 2)
    assert sorted(plan["tests"]) == sorted(COLLECTED) and plan["count"] == 2
    big = {plan["tests"][n] for n in COLLECTED[:6]}
    assert len(big) == 1, "one file, one shard"
    assert {plan["tests"][n] for n in COLLECTED[6:]} == {3 - big.pop()}, "the small files fill the other shard"


def test_a_plan_balances_by_earlier_durations_keeping_files_that_fit_whole() -> None:
    """The file with a 10 s test is heavier than a shard's share: its tests are spread; the small files stay whole."""
    known = {n: 1.0 for n in COLLECTED} | {COLLECTED[0]: 10.0}
    plan = shards.plan(COLLECTED, known, 2)
    assert sorted(plan["tests"]) == sorted(COLLECTED)
    for small in ("tests/test_a.py", "tests/test_b.py"):
        assert len({s for n, s in plan["tests"].items() if n.startswith(small)}) == 1
    assert len({plan["tests"][n] for n in COLLECTED[:6]}) == 2
    heavy = plan["tests"][COLLECTED[0]]
    assert not any(plan["tests"][n] == heavy for n in COLLECTED[6:]), "the small files go beside the light tests"
    assert sorted(loads(plan, known)) == [9.0, 12.0]


def test_a_plan_by_durations_keeps_every_file_whole_when_each_fits() -> None:
    known = {n: 1.0 for n in COLLECTED}
    plan = shards.plan(COLLECTED, known, 2)
    assert {plan["tests"][n] for n in COLLECTED[:6]} != {plan["tests"][n] for n in COLLECTED[6:]}
    assert len({plan["tests"][n] for n in COLLECTED[:6]}) == 1


def test_a_test_without_an_earlier_duration_weighs_the_median() -> None:
    known = {n: 2.0 for n in COLLECTED[:-1]}
    plan = shards.plan(COLLECTED, known, 3)
    assert loads(plan, known | {COLLECTED[-1]: 2.0}) == [8.0, 8.0, 8.0]


def test_a_test_the_host_did_not_collect_goes_by_its_file_alike_in_every_shard() -> None:
    plan = shards.plan([], {}, 3)
    nodeid = "tests/test_new.py::test_x"
    assert stream.shard_of(nodeid, plan) == stream.shard_of("tests/test_new.py::test_y", plan) in (1, 2, 3)


def test_durations_come_from_an_earlier_results_file(tmp_path: Path) -> None:
    doc = report.build({}, {}, [], [], [
        {"nodeid": "a::x", "outcome": "passed", "message": "", "catalog": [], "groups": [], "duration": 1.5},
        {"nodeid": "a::y", "outcome": "blocked", "message": "", "catalog": [], "groups": [], "duration": 0.0}], 0)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert shards.durations(tmp_path / "results.json") == {"a::x": 1.5}, "a blocked test never ran: no weight"
    assert shards.durations(tmp_path / "missing.json") == {}


def test_a_file_slow_to_collect_weighs_its_collection() -> None:
    """Equal tests, but test_a took 6 s to collect in the earlier run (a heavy import): it is a shard's load alone."""
    known = {n: 1.0 for n in COLLECTED}
    plan = shards.plan(COLLECTED, known, 2, {"tests/test_a.py": 6.0, "tests/test_big.py": 0.5, "tests/test_b.py": 0.5})
    a = {plan["tests"][n] for n in COLLECTED[6:9]}
    assert len(a) == 1 and not any(plan["tests"][n] in a for n in COLLECTED[9:] + COLLECTED[:6])
    assert shards.plan(COLLECTED, known, 2)["tests"] != plan["tests"], "without the timings test_a goes with test_b"


def test_the_guest_times_each_files_collection_and_shards_merge_them(tmp_path: Path) -> None:
    for name, pause in (("test_a", 0.3), ("test_b", 0.0)):
        (tmp_path / f"{name}.py").write_text(f"import time\ntime.sleep({pause})\ndef test_one(): pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmtests.verdict.plugin", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), f"--kvmtests-json={tmp_path / 'out.json'}", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    timed = shards.collection(tmp_path / "out.json")
    assert sorted(timed) == ["test_a.py", "test_b.py"] and timed["test_a.py"] >= 0.3 > timed["test_b.py"]
    merged = shards.merge([shard_doc(["a::x"], collection={"a": 1.0, "b": 2.0}),
                           shard_doc(["a::y"], collection={"a": 3.0})])
    assert merged["collection"] == {"a": 3.0, "b": 2.0}, "a file two shards collected: the slower"
    assert shards.collection(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("cores, available_mb, jobs, expected", [
    (2, 24000, 1, 2), (2, 24000, 2, 1), (1, 24000, 1, 1), (8, 24000, 2, 4), (8, 5000, 1, 1), (8, 0, 1, 1)])
def test_the_default_shard_count_shares_the_cores_within_the_memory(cores: int, available_mb: int, jobs: int,
                                                                     expected: int) -> None:
    assert shards.default_count(jobs, 2048, cores, available_mb) == expected


def shard_doc(tests: list[str], states: dict[str, str] | None = None, **extra: object) -> dict:
    doc = report.build({"kernel": "6.12", "environment": "QEMU"}, {}, [], [], [
        {"nodeid": n, "outcome": "passed", "message": "", "catalog": [], "groups": [], "duration": 0.1}
        for n in tests], 0)
    doc["features"] = {g: {"state": (states or {}).get(g, features.ABSENT), "how": "probe"} for g in features.GROUPS}
    return doc | {"crashes": [], "boots": 1, "incomplete": ""} | extra


def test_merged_shards_are_one_result_with_every_test_once() -> None:
    crash = {"title": "BUG", "kind": "oops", "during": "a::y", "groups": [], "boot": 1, "fatal": True, "log": []}
    doc = shards.merge([shard_doc(["a::x"]), shard_doc(["a::y"], crashes=[crash], boots=2)])
    assert [t["nodeid"] for t in doc["tests"]] == ["a::x", "a::y"]
    assert (doc["boots"], doc["shards"], doc["findings"], doc["exitstatus"]) == (3, 2, [], 0)
    assert doc["crashes"] == [crash | {"shard": 2}]
    assert report.survival(doc)[:2] == ["shards: 2", "boots: 3"]
    assert report.crash_line(doc["crashes"][0]).startswith("CRASH during a::y (shard 2, boot 1, oops, fatal)")


def test_shards_that_detect_a_group_differently_are_a_finding_not_a_pick() -> None:
    doc = shards.merge([shard_doc(["a::x"], {"hv_exits": features.PRESENT}), shard_doc(["a::y"])])
    assert doc["features"]["hv_exits"]["state"] == features.UNKNOWN
    assert doc["findings"] == ["feature detection differs between shards for hv_exits: shard 1: present (probe); "
                               "shard 2: absent (probe)"]
    assert doc["exitstatus"] == 1


def test_a_finding_of_some_shards_only_names_them() -> None:
    doc = shards.merge([shard_doc(["a::x"], findings=["WARN at boot"]), shard_doc(["a::y"])])
    assert doc["findings"] == ["shard 1: WARN at boot"]


# --- progress --------------------------------------------------------------------------------------------------

def test_the_board_prints_a_line_per_change_where_it_cannot_redraw(tmp_path: Path) -> None:
    out = io.StringIO()
    board = parallel.Board(out, interactive=False)
    child = parallel.Child("#1 k", [], tmp_path)
    board.show([child], 0.0)
    board.show([child], 1.0)
    assert out.getvalue() == "#1 k: waiting\n", "no line without a change"
    child.proc, child.started = subprocess.Popen(["true"]), 1.0
    child.proc.wait()
    parallel.write_status(tmp_path, {"state": "running", "done": 3, "total": 9, "counts": {"failed": 1}})
    board.show([child], 5.0)
    child.rc, child.ended = 0, 9.0
    board.show([child], 9.0)
    assert out.getvalue().splitlines()[1:] == ["#1 k: running 4 s, 3/9 tests, 1 failed",
                                               "#1 k: done in 8 s, 3/9 tests, 1 failed (exit 0)"]


def test_the_board_redraws_its_lines_in_place_on_a_terminal(tmp_path: Path) -> None:
    out = io.StringIO()
    board = parallel.Board(out, interactive=True)
    children = [parallel.Child("a", [], tmp_path), parallel.Child("b", [], tmp_path)]
    board.show(children, 0.0)
    board.show(children, 1.0)
    assert out.getvalue() == "\x1b[2Ka: waiting\n\x1b[2Kb: waiting\n\x1b[2F\x1b[2Ka: waiting\n\x1b[2Kb: waiting\n"


def test_runs_start_at_most_limit_at_once_and_all_end(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    script = f"import time; open({str(log)!r}, 'a').write('s'); time.sleep(0.5); open({str(log)!r}, 'a').write('e')"
    children = [parallel.Child(str(i), [sys.executable, "-c", script], tmp_path / str(i)) for i in range(3)]
    parallel.run(children, 2, None)
    assert [c.rc for c in children] == [0, 0, 0]
    assert log.read_text().startswith("ss") and "sss" not in log.read_text(), "two at once, never three"


def test_leaving_early_stops_every_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    children = [parallel.Child(str(i), [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / str(i))
                for i in range(2)]

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(parallel.Board, "show", interrupt)
    with pytest.raises(KeyboardInterrupt):
        parallel.run(children, 2, parallel.Board(io.StringIO(), False))
    assert all(c.proc is not None and c.proc.poll() is not None for c in children)


def test_a_cell_split_in_shards_reports_their_combined_progress() -> None:
    status = parallel.combine([{"state": "running", "done": 2, "total": 4, "counts": {"passed": 2}},
                               {"state": "booting", "done": 0, "total": None, "counts": {}}])
    assert status == {"state": "booting", "done": 2, "total": None, "counts": {"passed": 2}}


# --- whole runs under the stand-in QEMU ---------------------------------------------------------------------------

DRIVER = """import pathlib, sys
sys.path.insert(0, {tests!r})
from kvmtests import cli
from kvmtests.runner import initramfs, monitor, qemu
initramfs.BUSYBOX = pathlib.Path({busybox!r})
monitor.TRAILER, monitor.AFTER_NMI = 1.0, 2.0
qemu.find_qemu = lambda: {fake!r}
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def sharded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            under_qemu: Run) -> Run:
    """qualify under the stand-in QEMU with children that use it too, the host collecting the stand-in's tests."""
    def run(faults: list[dict], *argv: str) -> Qualified:
        fake = stand_in(tmp_path, "qemu", faults)
        driver = DRIVER.format(tests=str(Path(__file__).parent), busybox=str(initramfs.BUSYBOX), fake=str(fake))
        monkeypatch.setattr(qualify, "CHILD", (sys.executable, "-c", driver))
        monkeypatch.setattr(shards, "collect", lambda command, cwd, bytecode=None: list(NODEIDS))
        return under_qemu(faults, *argv)
    return run


def test_a_sharded_cell_gives_the_same_verdicts_as_a_whole_one(sharded: Run, tmp_path: Path) -> None:
    whole = sharded([], "--shards", "1")
    whole_doc = whole.doc
    split = sharded([], "--shards", "3")
    assert split.code == whole.code == 0
    check_each_test_once(split)
    doc = split.doc
    assert {t["nodeid"]: t["outcome"] for t in doc["tests"]} == {t["nodeid"]: t["outcome"]
                                                                   for t in whole_doc["tests"]}
    assert (doc["shards"], doc["boots"], doc["features"]) == (3, 3, whole_doc["features"])
    assert "qualify: 3 shards under QEMU, 8 tests balanced by an earlier run's durations" in split.out
    for i in (1, 2, 3):
        shard_tests = report.load(split.results / f"shard-{i}" / "results.json")["tests"]
        assert shard_tests and len(shard_tests) < len(NODEIDS)
    assert (split.results / "junit.xml").exists() and (split.results / "rc").read_text() == "0\n"


def test_a_crash_in_one_shard_costs_that_shard_one_boot(sharded: Run) -> None:
    _, kind, title = test_crash.REPORTS["sysrq panic"]
    run = sharded([], "--shards", "2", "--append", f"{stream.CRASH_AT}={RWX_R}")
    assert run.code == 1
    check_each_test_once(run)
    assert run.outcomes() == {n: "crashed" if n == RWX_R else "blocked" if n == RWX_RW else "passed"
                              for n in NODEIDS}
    doc = run.doc
    (crash,) = doc["crashes"]
    assert (crash["title"], crash["boot"], doc["boots"], doc["shards"]) == (title, 1, 3, 2)
    assert f"CRASH during {RWX_R} (shard {crash['shard']}, boot 1, {kind}, fatal): {title}" in run.out
    assert matrix.total(doc) == "exit 1, crashed, 3 boots over 2 shards"


def test_a_matrix_with_jobs_gives_the_matrix_of_one_cell_at_a_time(sharded: Run, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path)
    cells = ["--kernel", str(image), "--variant", "default", "--variant", "kvm.tdp_mmu=N", "--accel", "tcg"]
    sharded([])   # the stand-in and the children's driver in place
    runs = {}
    for jobs in ("1", "2"):
        start = time.monotonic()
        code = run_cli([*cells, "--results", str(tmp_path / f"jobs{jobs}"), "--jobs", jobs])
        out = capsys.readouterr().out
        runs[jobs] = (code, out[out.index("== kvmtests matrix"):], time.monotonic() - start)
    assert runs["1"][0] == runs["2"][0] == 0
    assert runs["1"][1].replace("jobs1", "jobsN") == runs["2"][1].replace("jobs2", "jobsN")
    assert "#1 " + str(image) + ", command line default: done in" in out
    second = qualify.cell_dir(tmp_path / "jobs2", 2, str(image), "kvm.tdp_mmu=N")
    assert f"== cell #2 of 2: {image}, command line kvm.tdp_mmu=N; results in {second}" in out
    assert (second / parallel.LOG).exists() and not (tmp_path / "jobs1" / second.name / parallel.LOG).exists()


def test_a_bad_shard_plan_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "find_qemu", lambda: "/bin/true")
    (tmp_path / "plan.json").write_text("{}")
    assert run_cli(["--kernel", str(make_image(tmp_path)), "--shard-plan", str(tmp_path / "plan.json"),
                    "--results", str(tmp_path / "out")]) == qualify.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qualify: --shard-plan: {tmp_path / 'plan.json'} is not a shard plan written by kvmtests qualify"]


def test_a_test_only_the_guest_collects_goes_with_its_file() -> None:
    plan = shards.plan(COLLECTED, {}, 2)
    big = plan["tests"][COLLECTED[0]]
    assert stream.shard_of("tests/test_big.py::test_new[guest-only]", plan) == big
    assert [stream.shard_needs("tests/test_big.py", plan | {"index": i}) for i in (1, 2)] == [big == 1, big == 2]
    unplanned = [stream.shard_needs("tests/test_selftests.py", plan | {"index": i}) for i in (1, 2)]
    assert unplanned == [False, False], "a file with no selected test on the host (its self-tests): no shard imports it"
    blind = shards.plan([], {}, 2)
    unplanned = [stream.shard_needs("tests/test_unknown.py", blind | {"index": i}) for i in (1, 2)]
    assert sorted(unplanned) == [False, True], "the host could not collect: exactly one shard imports each file"


def guest_imports(tmp_path: Path, plan: dict) -> set[str]:
    """The test files a guest's plugin imports with this plan in its resume file (test_a, test_b and test_self,
    whose tests are all self-tests, outside the guest's selection)."""
    for name in ("test_a", "test_b", "test_self"):
        mark = "import pytest\npytestmark = pytest.mark.selftest\n" if name == "test_self" else ""
        (tmp_path / f"{name}.py").write_text(f"{mark}open({str(tmp_path / name)!r} + '.imported', 'w')\n"
                                             "def test_one(): pass\ndef test_two(): pass\n")
    (tmp_path / "resume.json").write_text(json.dumps({"shard": plan}))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmtests.verdict.plugin", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "--kvmtests-stream=/dev/null", "--rootdir", str(tmp_path),
                           "-m", "not selftest", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {stream.RESUME_ENV: str(tmp_path / "resume.json")})
    assert done.returncode == 0, done.stdout + done.stderr
    return {f.name.split(".")[0] for f in tmp_path.glob("*.imported")}


SELECTED = ["test_a.py::test_one", "test_a.py::test_two", "test_b.py::test_one", "test_b.py::test_two"]


def test_a_shard_imports_only_the_files_it_runs_tests_of(tmp_path: Path) -> None:
    """The guest's plugin with a shard plan in its resume file: the other shard's files are never imported, nor a
    file the host found no selected test in."""
    plan = shards.plan(SELECTED, {}, 2)
    assert guest_imports(tmp_path, plan | {"index": plan["tests"]["test_b.py::test_one"]}) == {"test_b"}


def test_a_whole_cell_imports_only_the_files_it_runs_tests_of(tmp_path: Path) -> None:
    """An unsharded cell's guest gets the host's plan too: its self-test files are never imported."""
    assert guest_imports(tmp_path, qualify.whole_plan(SELECTED)) == {"test_a", "test_b"}
    assert qualify.whole_plan(None) is None, "the host could not collect: the guest imports every file"
