"""`kvmtests bench`: the C side builds, the table explains every ratio above target, a tiny run works."""
import subprocess
import sys

import pytest

from kvmtests import bench


@pytest.mark.selftest
def test_c_side_compiles_into_the_cache():
    binary = bench.build_c()
    assert binary.exists() and binary == bench.build_c(), "a second call reuses the cached binary"


@pytest.mark.selftest
@pytest.mark.parametrize("c,raw,layered,expect", [
    (10.0, 10.5, 10.9, ""),
    (10.0, 14.0, 15.0, "floor: a bare cffi call from Python already costs"),
    (10.0, 10.5, 14.0, "the layers add"),
])
def test_note_explains_ratios_above_target(c, raw, layered, expect):
    note = bench._note(c * 1000, raw * 1000, layered * 1000)
    assert note.startswith(expect) if expect else note == ""


def test_tiny_benchmark_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "kvmtests.cli", "bench", "--scale", "0.01", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ops_table, switch_table = out.stdout.split("\n\n")
    assert {line.split()[0] for line in ops_table.splitlines()[2:]} == set(bench.OPS), out.stdout
    rows = {line.split()[0]: line for line in switch_table.splitlines()[2:]}
    assert set(rows) == set(bench.SWITCH_OPS), out.stdout
    assert " - " not in rows["pio_exit"], f"the port-I/O exit is the baseline and runs on any host:\n{out.stdout}"


@pytest.mark.selftest
def test_median_p99_match_the_c_side():
    """ops.c sorts and takes elements n/2 and 99n/100: the Python side reports the same statistics."""
    assert bench.median_p99([float(x) for x in range(100, 0, -1)]) == (51.0, 100.0)
    assert bench.median_p99([5.0]) == (5.0, 5.0)
