"""`kvmtests bench`: the C side builds, the table explains every ratio above target, the spread statistics and
the rounds' stopping rule hold on made-up timings, a tiny run works. Speed is measured by the bench, never asserted."""
import itertools
import math
import subprocess
import sys

import pytest

from kvmtests import bench
from kvmtests.bench import placement, stats


@pytest.mark.selftest
def test_c_side_compiles_into_the_cache():
    binary = bench.build_c()
    assert binary.exists() and binary == bench.build_c(), "a second call reuses the cached binary"


@pytest.mark.selftest
@pytest.mark.parametrize("to_c,to_cffi,expect", [
    (1.09, 1.04, ""),
    (1.50, 1.05, "floor: a bare cffi call from Python already costs 4.29 µs more than C"),
    (1.40, 1.30, "the layers add 3.23 µs over bare cffi"),
])
def test_note_explains_ratios_above_target(to_c, to_cffi, expect):
    """From C's 10 µs and the paired ratios: bare cffi at 10 x 1.50 / 1.05 = 14.29 µs, the layers 15 - 14.29."""
    note = bench._note(10_000.0, to_c, to_cffi)
    assert note.startswith(expect) if expect else note == ""


def test_tiny_benchmark_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "kvmtests.cli", "bench", "--scale", "0.01", "--budget", "0.2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ops_table, switch_table, load = out.stdout.split("\n\n")
    assert load.startswith("load average"), out.stdout
    assert {line.split()[0] for line in ops_table.splitlines()[2:]} == set(bench.OPS), out.stdout
    rows = {line.split()[0]: line for line in switch_table.splitlines()[2:]}
    assert set(rows) == set(bench.SWITCH_OPS), out.stdout
    assert " - " not in rows["pio_exit"], f"the port-I/O exit is the baseline and runs on any host:\n{out.stdout}"


@pytest.mark.selftest
def test_median_p99_match_the_c_side():
    """ops.c sorts and takes elements n/2 and 99n/100: the Python side reports the same statistics."""
    assert bench.median_p99([float(x) for x in range(100, 0, -1)]) == (51.0, 100.0)
    assert bench.median_p99([5.0]) == (5.0, 5.0)


@pytest.mark.selftest
@pytest.mark.parametrize("n,bounds", [(5, None), (7, None), (8, (0, 7)), (10, (0, 9)), (16, (2, 13)), (30, (7, 22))])
def test_median_bounds_are_the_binomial_order_statistics(n, bounds):
    """Too few values give no 99% interval; otherwise the widest tail the binomial allows is cut on each side."""
    assert stats.median_bounds(n) == bounds
    if bounds:
        below = sum(math.comb(n, k) for k in range(bounds[0] + 1)) / 2 ** n
        assert below <= (1 - stats.CONFIDENCE) / 2 < below + math.comb(n, bounds[0] + 1) / 2 ** n


@pytest.mark.selftest
def test_estimate_spread_is_root_two_times_the_wider_half_or_the_drift_or_the_floor():
    values = [1.0, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.30]
    est = stats.estimate(values)
    assert (est.low, est.median, est.high) == (1.0, 1.045, 1.30)
    assert est.drift == pytest.approx(0.05), "halves' medians 1.02 and 1.07"
    assert est.spread == pytest.approx(math.sqrt(2) * 0.255)
    assert str(est) == "1.045 ±0.361"
    assert not est.tight(0.015) and est.tight(0.5)
    drifting = stats.estimate([1.0] * 10 + [1.1] * 10)
    assert drifting.spread == pytest.approx(0.1), "a level that changed halfway is wider than the interval says"
    steady = stats.estimate([2.0] * 12)
    assert steady.spread == pytest.approx(2.0 * stats.REPRODUCIBILITY), "no run claims better than the floor"
    assert steady.tight(stats.REPRODUCIBILITY * 1.001)
    few = stats.estimate([1.0, 2.0, 3.0])
    assert few.spread is None and not few.tight(10.0) and str(few) == "2.000 ±?"


def _sides(*figures):
    """Made-up sides: each returns its figures in turn (cycling), and every call is logged in order."""
    log, streams = [], [itertools.cycle(f) for f in figures]

    def side(i):
        def call():
            log.append(i)
            return [next(streams[i])]
        return call
    return [side(i) for i in range(len(figures))], log


@pytest.mark.selftest
def test_rounds_stop_as_soon_as_every_ratio_is_tight():
    sides, log = _sides([10.0], [20.0], [21.0])
    r = bench.measure_rounds(sides, budget=60.0, min_rounds=10, min_seconds=0.0)
    assert r.tight and len(r.ratios[0]) == 10, "constant timings are tight at the fewest rounds"
    assert r.ratio(0).median == 2.1 and r.ratio(1).median == pytest.approx(1.05)
    assert r.median(1) == 20.0
    assert log[:3] == [0, 1, 2], "one unrecorded warm-up batch of each side first"
    assert log[3:9] == [0, 1, 2, 2, 1, 0], "forward, then reverse order"


@pytest.mark.selftest
def test_rounds_that_never_settle_are_reported_not_tight():
    sides, _ = _sides([10.0], [10.0, 20.0, 10.0], [10.0, 10.0, 20.0, 20.0])
    r = bench.measure_rounds(sides, budget=60.0, min_rounds=10, max_rounds=40, min_seconds=0.0)
    assert not r.tight and len(r.ratios[0]) == 40
    sides, _ = _sides([10.0], [10.0, 20.0, 10.0], [10.0, 10.0, 20.0, 20.0])
    assert not bench.measure_rounds(sides, budget=0.0, min_rounds=10).tight, "the budget ends it too"


@pytest.mark.selftest
@pytest.mark.parametrize("idle,cpu", [({0: 0.9, 1: 1.0}, 0), ({0: 0.5, 1: 1.0}, 0), ({0: 0.2, 1: 0.9}, 1),
                                      ({2: 0.1, 3: 0.05}, 2), ({1: 0.3, 2: 0.4, 3: 0.35}, 2)])
def test_the_first_cpu_is_chosen_unless_busy(idle, cpu):
    """Run after run on the same CPU (memslot costs differ by CPU), but not on one an emulator keeps busy."""
    assert placement.choose_cpu(idle) == cpu
