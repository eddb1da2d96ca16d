"""pytest plugin: catalog markers, skips from missing preconditions, kernel health, gating, summary.

Attribution: a row that relies on another feature group's behaviour (Series.precondition, or a check that names the
group providing what it checks: memfault.FieldMismatch and its kin) and does not get it is that group's error. In the
JSON the test's outcome is "error", its "precondition" is the providing group, and its "groups" are the providing
group followed by the row's own groups (core for a row without one): the summary counts the error under the providing
group, where the bug is, and as an error, never a failure, under each of the row's own groups, which got no verdict.
A check that names the row's own group fails the row, counted under that group alone."""
from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path
from collections.abc import Generator, Iterator

import pytest

from kvmtests.machine import health, memfault
from kvmtests.machine.kvm import Kvm, Unavailable, dev_kvm_path

from . import features, guardian, probe, stream
from . import report as results

REQUIRE_ENV = "KVMTESTS_REQUIRE"
_results = pytest.StashKey[dict]()
_device_skip = pytest.StashKey[str]()
_doc = pytest.StashKey[dict]()
_stream = pytest.StashKey["stream.Stream | None"]()
_resume = pytest.StashKey[dict]()
BLOCKED = stream.BLOCKED


XPASS_STRICT = "[XPASS(strict)]"   # how pytest words a strict expected failure that passed


class BlockedByCrash(pytest.skip.Exception):
    """A row not run because its path crashed the kernel earlier in the run: the outcome blocked, in that group."""

    def __init__(self, group: str, message: str):
        super().__init__(message, _use_item_location=True)
        self.group = group


class PreconditionFailed(Exception):
    """A set-up step relied on a feature group's behaviour and did not get it: an error of that group and the row's."""

    def __init__(self, group: str, what: str, detail: str):
        super().__init__(f"precondition from {group} failed: {what}: {detail}")
        self.group = group


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmtests")
    group.addoption("--require", default=os.environ.get(REQUIRE_ENV, ""), metavar="GROUPS",
                    help=f"feature groups the kernel must carry: '{features.SERIES}' or any of "
                         f"{', '.join(features.GROUPS)} (comma separated; env {REQUIRE_ENV})")
    group.addoption("--cap-number", action="append", default=[os.environ.get(features.CAP_NUMBERS_ENV, "")],
                    metavar="NAME=N", help="a capability number a port of the series had to move, e.g. "
                    f"fault_exit_insn_len=240 (repeatable; env {features.CAP_NUMBERS_ENV})")
    group.addoption("--kvmtests-json", default=None, metavar="PATH", help="write the run's results as JSON")
    group.addoption("--no-kvmtests-summary", action="store_true",
                    help="do not print the summary table (kvmtests qualify prints it on the host)")
    group.addoption("--kvmtests-stream", default=None, metavar="DEVICE",
                    help="kvmtests qualify's guest: send each verdict and what is running to the host over this "
                         "console device as it happens, run the feature detection first, and resume after the "
                         f"tests an earlier boot finished (env {stream.RESUME_ENV})")
    group.addoption("--shuffle", type=int, default=None, metavar="SEED",
                    help="run the tests in a random order drawn from SEED (the same in every xdist worker)")
    group.addoption("--test-timeout", type=float, default=os.environ.get(stream.TEST_TIMEOUT_ENV), metavar="SECONDS",
                    help="on a host: a test still running after SECONDS has its kernel stacks read and its process "
                         "killed, and is crashed (kind hang); default "
                         f"{guardian.DEFAULT_TIMEOUT:g}, some 25 times the slowest test (2.3 s, -m slow's thousand "
                         "VM cycles; 0.7 s without -m slow); tests marked slow only when given; 0: off "
                         f"(env {stream.TEST_TIMEOUT_ENV})")


def pytest_configure(config: pytest.Config) -> None:
    for line in ["catalog(*numbers): catalog assertions (vsm-v1-uapi.md section 4) the test checks",
                 "group(key): count the test under this feature group only",
                 "nokvm: the test needs no /dev/kvm",
                 "selftest: checks kvmtests itself (runner, plugin, report, header agreement), not the kernel; "
                 "needs no /dev/kvm, and qualify leaves it out of the guest",
                 "slow: endurance test, opt-in with -m slow"]:
        config.addinivalue_line("markers", line)
    try:
        config.stash[_results] = {"required": features.parse_required(config.getoption("require")),
                                  "cap_numbers": features.parse_cap_numbers(config.getoption("cap_number"))}
    except ValueError as e:
        raise pytest.UsageError(str(e))
    if not _is_worker(config):
        config.stash[_stream] = stream.open_stream(config.getoption("kvmtests_stream"))
        config.stash[_resume] = stream.load_resume() if config.stash[_stream] else {}
        features.crashed_probes(config.stash[_resume].get("crashed_probes", {}))
    if not config.getoption("kvmtests_stream"):     # in a qualify guest, the host's runner sees the crashes
        config.pluginmanager.register(guardian.HostGuard(config, _tests, lambda: _document(config, 0)),
                                      "kvmtests-guardian")


def pytest_unconfigure(config: pytest.Config) -> None:
    out = config.stash.get(_stream, None)
    if out is not None:
        out.close()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A shard does not import the test files it runs no test of (the guest's collection is slow under Bochs)."""
    shard = config.stash.get(_resume, {}).get("shard")
    if not shard or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    try:
        file = collection_path.relative_to(config.rootpath).as_posix()
    except ValueError:
        return None
    return True if not stream.shard_needs(file, shard) else None


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport,
                                                                          pytest.CollectReport]:
    """Time each test file's collection (its imports, mostly): a later qualify balances its shards with it."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _collection[collector.nodeid] = round(time.perf_counter() - start, 3)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    if "slow" not in config.getoption("markexpr"):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
    seed = config.getoption("shuffle")
    if seed is not None:
        random.Random(seed).shuffle(items)
    for item in items:
        numbers = sorted({n for m in item.iter_markers("catalog") for n in m.args})
        bad = [n for n in numbers if n not in features.CATALOG]
        if bad:
            raise pytest.UsageError(f"{item.nodeid}: catalog numbers {bad} are not in the catalog (1-138)")
        pinned = [m.args[0] for m in item.iter_markers("group")]
        item.user_properties.append(("catalog", numbers))
        item.user_properties.append(("groups", pinned or features.groups_of(numbers)))
    _resume_items(config, items)
    try:
        Kvm().close()
    except Unavailable as e:
        config.stash[_device_skip] = str(e)


def _resume_items(config: pytest.Config, items: list) -> None:
    """A shard keeps its own tests; a resumed boot leaves out what earlier boots finished and blocks the rows on a
    path that crashed the kernel."""
    resume = config.stash.get(_resume, {})
    shard = resume.get("shard")
    if shard:
        mine = {item.nodeid for item in items if stream.shard_of(item.nodeid, shard) == shard["index"]}
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in mine])
        items[:] = [item for item in items if item.nodeid in mine]
    done = set(resume.get("done", []))
    if done:
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = [item for item in items if item.nodeid not in done]
    crashed = resume.get("crashed_groups", {})
    for item in filter(_needs_kvm, items):
        hit = [g for g in dict(item.user_properties)["groups"] if g in crashed]
        if hit:
            item.user_properties.append(("blocked", (hit[0], f"{BLOCKED}{crashed[hit[0]]}")))


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a qualify guest: name the run and its tests to the host, then detect every group, each probe announced,
    so that a probe that crashes the kernel is named and the tests after it know."""
    out = session.config.stash.get(_stream, None)
    if out is None:
        return
    out.event(stream.SESSION, stream.encode({"host": probe.host_identity()}))
    out.event(stream.COLLECTED, stream.encode([item.nodeid for item in session.items]))
    for group in features.GROUPS:
        out.event(stream.PROBE_START, group)
        out.set_deadline()
        det = features.detect(group)
        out.clear_deadline()
        out.event(stream.PROBE_END, stream.encode({"group": group, "state": det.state, "how": det.how}))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """In a qualify guest: announce the test, arm /init's deadline, send the verdict as soon as it is reached."""
    out = item.config.stash.get(_stream, None)
    if out is None:
        return (yield)
    props = dict(item.user_properties)
    out.event(stream.TEST_START, stream.encode({"nodeid": item.nodeid, "catalog": props["catalog"],
                                                "groups": props["groups"]}))
    out.set_deadline()
    hook = stream.cmdline_hook(item.nodeid)
    if hook:
        stream.force(hook)
    try:
        return (yield)
    finally:
        out.clear_deadline()
        if item.nodeid in _tests:
            out.event(stream.TEST_END, stream.encode(_tests[item.nodeid]))


def _needs_kvm(item: pytest.Item) -> bool:
    return item.get_closest_marker("nokvm") is None and item.get_closest_marker("selftest") is None


def _kvm_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "kvm" in target:
            out.add(f"fd {fd} -> {target}")
    return out


_watch = pytest.StashKey[tuple[health.Watch, set[str]]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> object:
    blocked = dict(item.user_properties).get("blocked")
    if blocked:
        raise BlockedByCrash(*blocked)
    if _needs_kvm(item):
        item.stash[_watch] = (health.Watch(), _kvm_fds())
        reason = item.config.stash.get(_device_skip, None)
        if reason:
            raise pytest.skip.Exception(reason, _use_item_location=True)
    return (yield from _skip_unavailable())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    return (yield from _skip_unavailable())


def _skip_unavailable() -> Generator[None, object, object]:
    """A missing precondition (Unavailable) is a skip at the test's location, not a failure to format."""
    try:
        return (yield)
    except Unavailable as e:
        raise pytest.skip.Exception(str(e), _use_item_location=True) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> object:
    """After the test's own fixtures are gone: no new taint, no WARN/BUG, no KVM fd left open."""
    result = yield
    watch, fds = item.stash.get(_watch, (None, set()))
    if watch is None:
        return result
    problems = watch.problems()
    watch.close()
    leaked = sorted(_kvm_fds() - fds)
    if leaked:
        problems.append(f"test leaked KVM file descriptors: {', '.join(leaked)}")
    if problems:
        found = guardian.kernel_crash(watch.lines)
        if found:       # a kernel report, not just a failed check: the test is crashed, titled from the report
            item.user_properties.append((guardian.CRASH, found))
        raise AssertionError("kernel health / resource check failed:\n" + "\n".join(problems))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    rep = yield
    reason = item.config.stash.get(_device_skip, None)
    if reason and rep.skipped and isinstance(rep.longrepr, tuple) and rep.longrepr[2] == f"Skipped: {reason}":
        rep.longrepr = (dev_kvm_path(), 0, rep.longrepr[2])  # one line for the whole run, not one per test
    failed = call.excinfo.value if call.excinfo is not None else None
    if isinstance(failed, BlockedByCrash):     # counted under the crashed group alone, not each group of its rows
        rep.user_properties = [p for p in rep.user_properties if p[0] != "groups"] + [("groups", [failed.group])]
        if isinstance(rep.longrepr, tuple):    # worded as a skip's, not as the exception class's
            rep.longrepr = (*rep.longrepr[:2], f"Skipped: {failed.msg}")
    own = _own_groups(rep)
    if isinstance(failed, memfault.FieldMismatch) and failed.group not in own:
        failed = PreconditionFailed(failed.group, failed.what, str(failed))
    if isinstance(failed, (PreconditionFailed, memfault.FieldMismatch)):
        rep.outcome = "failed"      # also inside an expected failure: not the ⚠ itself
        if hasattr(rep, "wasxfail"):
            del rep.wasxfail
        if isinstance(failed, PreconditionFailed):
            rep.longrepr = str(failed)
            blame = [("groups", [failed.group, *(g for g in own if g != failed.group)]), ("blame", failed.group),
                     ("precondition", failed.group)]
        else:
            blame = [("groups", [failed.group]), ("blame", failed.group)]
        rep.user_properties = [p for p in rep.user_properties if p[0] != "groups"] + blame
    return rep


def _own_groups(rep: pytest.TestReport) -> list[str]:
    """The groups a row counts under by its markers: core for a row without one, as the summary counts it."""
    return dict(rep.user_properties).get("groups") or [results.CORE]


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    """A failed precondition is an error (of the group that provides it, and of the row's), not a failure of the row."""
    if report.failed and dict(report.user_properties).get("precondition"):
        return "error", "E", "ERROR"
    return None


_tests: dict[str, dict] = {}
_collection: dict[str, float] = {}   # seconds each test file took to collect


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Fold each phase report into one outcome per test (in the controller under xdist)."""
    props = dict(report.user_properties)
    entry = _tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": None, "message": "",
                                           "catalog": props.get("catalog", []),
                                           "groups": props.get("groups", []), "duration": 0.0})
    if report.failed and props.get("blame"):     # counted under the group whose behaviour was wrong
        entry["groups"] = props["groups"]
    if report.failed and props.get("precondition"):
        new = "error"
        entry["precondition"] = props["precondition"]
    elif report.skipped and _message(report).startswith(BLOCKED):
        new = "blocked"
        entry["groups"] = props["groups"]       # the crashed group's alone (BlockedByCrash)
    elif report.failed and str(report.longrepr).startswith(XPASS_STRICT):
        new = "unexpected-pass"
    else:
        new = results.outcome_of(report.when, report.outcome, hasattr(report, "wasxfail"))
    if report.failed and props.get(guardian.CRASH):    # a kernel report in the test, or its process died
        new = "crashed"
    merged = results.merge(entry["outcome"], new)
    if merged != entry["outcome"]:
        entry["outcome"] = merged
        entry["message"] = _message(report)
        if merged == "crashed":
            entry.update(guardian.crash_fields(props[guardian.CRASH]))
    entry["duration"] = round(entry["duration"] + report.duration, 4)


def _message(rep: pytest.TestReport) -> str:
    crashed = dict(rep.user_properties).get(guardian.CRASH)
    if rep.failed and crashed:
        return crashed["title"]
    if rep.outcome == "skipped" and isinstance(rep.longrepr, tuple):
        return rep.longrepr[2].removeprefix("Skipped: ")
    if hasattr(rep, "wasxfail"):
        return rep.wasxfail
    if rep.failed and isinstance(rep.longrepr, str) and rep.longrepr.startswith(XPASS_STRICT):
        return ("unexpected pass: the row behaved as documented, so this known deviation did not reproduce: "
                + rep.longrepr.removeprefix(XPASS_STRICT).strip())
    if rep.failed and isinstance(rep.longrepr, str):     # a failed precondition's one line
        return rep.longrepr
    if rep.failed:
        text = rep.longreprtext.strip().splitlines()
        errors = [line for line in text if line.startswith("E ")]
        return "\n".join(errors[:12]) or (text[-1] if text else "")
    return ""


def _document(config: pytest.Config, exitstatus: int) -> dict:
    """The results as far as the run got: the whole run at its end, or what a guardian starts from (-n 0)."""
    tests = [t for t in _tests.values() if t["outcome"]]
    detections = features.detect_all()
    required = config.stash[_results]["required"]
    doc = results.build(probe.host_identity(), detections,
                        features.findings(detections, config.stash[_results]["cap_numbers"]), sorted(required), tests,
                        exitstatus)
    doc["collection"] = dict(sorted(_collection.items()))
    return guardian.add_crashes(doc)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _is_worker(config):
        return
    doc = _document(config, int(exitstatus))
    if results.required_absent(doc) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        doc["exitstatus"] = int(session.exitstatus)
    config.stash[_doc] = doc
    path = config.getoption("kvmtests_json")
    if path:
        guardian.write_json(path, doc)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: pytest.Config) -> Generator[None]:
    """The summary after pytest's own, short test summary included: the table is what a person reads last."""
    try:
        return (yield)
    finally:
        doc = config.stash.get(_doc, None)
        if doc is not None and not config.getoption("no_kvmtests_summary"):
            terminalreporter.section("kvmtests summary")
            terminalreporter.line(results.render(doc))


class Series:
    """Which expectation a test checks: the series' (patched) or upstream's, per feature group."""

    def __init__(self, required: set[str]):
        self.required = required

    def detection(self, group: str) -> features.Detection:
        return features.detect(group)

    def patched(self, group: str) -> bool:
        """True: check the patched expectation; False: the upstream one. Unknown skips. A required group
        always runs its patched expectation: the gate is one line per absent group in the summary."""
        det = features.detect(group)
        if det.state == features.CRASHED:
            raise BlockedByCrash(group, f"{BLOCKED}{det.how}")
        if det.state == features.PRESENT or group in self.required:
            return True
        if det.state == features.UNKNOWN:
            raise Unavailable(f"cannot tell whether the kernel carries {group}: {det.how}")
        return False

    def require(self, group: str) -> None:
        """For rows with no upstream expectation (U: -): skip unless the group is present."""
        if not self.patched(group):
            raise Unavailable(f"kernel does not carry {features.GROUPS[group].title} "
                              f"({features.GROUPS[group].patches}); the row has no upstream expectation")

    @contextlib.contextmanager
    def precondition(self, group: str, what: str) -> Iterator[None]:
        """Set-up that relies on `group`'s behaviour: an assertion failing inside is `group`'s error naming `what`
        (in the row's own groups an error too, never a failure), so the row's group is not blamed for a bug of
        another (see the module docstring)."""
        if group not in features.GROUPS and group != results.CORE:
            raise ValueError(f"precondition of unknown group {group!r}")
        try:
            yield
        except AssertionError as e:
            raise PreconditionFailed(group, what, str(e).splitlines()[0] if str(e) else "assertion failed") from None


@pytest.fixture(scope="session")
def series(request: pytest.FixtureRequest) -> Series:
    return Series(request.config.stash[_results]["required"])


@pytest.fixture(scope="session")
def cap_numbers(request: pytest.FixtureRequest) -> dict[str, int]:
    """Capability numbers the user named for a port of the series (--cap-number)."""
    return request.config.stash[_results]["cap_numbers"]
