"""Endurance (opt-in with -m slow): many VM cycles leave nothing behind; repeated shuffled runs agree."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmtests.machine import guest
from kvmtests.machine.kvm import Kvm

pytestmark = pytest.mark.slow
CYCLES = 1000
RSS_SLACK_KB = 2048  # allocator and cffi caches settle in steps; a per-cycle leak of even 3 bytes exceeds this
REPEATS = 10


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def one_cycle(payload) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        m = guest.build_machine(vm, payload, entry="pio")
        m.vcpu.run()


def test_thousand_vm_cycles_leave_fds_rss_and_threads_unchanged():
    payload = guest.load_payload("basic")
    for _ in range(20):
        one_cycle(payload)
    fds, threads, rss = sorted(os.listdir("/proc/self/fd")), threading.active_count(), rss_kb()
    for _ in range(CYCLES):
        one_cycle(payload)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert rss_kb() - rss <= RSS_SLACK_KB, f"RSS grew by {rss_kb() - rss} KiB over {CYCLES} VM cycles"


def test_default_suite_repeats_with_identical_outcomes(tmp_path):
    """Ten runs under xdist, each in another random order: no test's outcome may differ."""
    root = Path(__file__).parent.parent
    runs = []
    for seed in range(REPEATS):
        out = tmp_path / f"run{seed}.json"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "auto", "--shuffle", str(seed),
                        f"--kvmtests-json={out}", "-p", "no:cacheprovider"], cwd=root, capture_output=True, timeout=600)
        runs.append({t["nodeid"]: t["outcome"] for t in json.loads(out.read_text())["tests"]})
    for seed, run in enumerate(runs[1:], 1):
        differing = {k: (runs[0].get(k), run.get(k)) for k in set(run) | set(runs[0]) if run.get(k) != runs[0].get(k)}
        assert not differing, f"run {seed} differs from run 0: {differing}"
