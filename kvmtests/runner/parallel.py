"""Qualify runs side by side: each a `kvmtests qualify` child process with its own results directory and log,
at most N at once, and one progress line each (redrawn on a terminal, printed when it changes otherwise) read
from the status file every run keeps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .monitor import Monitor

STATUS = "status.json"   # in every qualify results directory: what the run is doing, and its counts so far
LOG = "qualify.log"      # a child's own output, in its results directory
POLL = 1.0


@dataclass
class Child:
    """One qualify run to start: its label on the progress board, its command, where it writes."""

    label: str
    argv: list[str]
    results: Path
    proc: subprocess.Popen | None = None
    rc: int | None = None
    started: float = 0.0
    ended: float = 0.0

    def state(self, status: dict) -> str:
        """waiting, the state its status file gives while it runs, or done."""
        if self.proc is None:
            return "waiting"
        return "done" if self.rc is not None else status.get("state", "starting")

    def line(self, now: float, status: dict) -> str:
        """The child's progress line: waiting, or its state and counts from its status file, or how it ended."""
        state = self.state(status)
        if state == "waiting":
            return f"{self.label}: waiting"
        took = (self.ended or now) - self.started
        if state == "done":
            return f"{self.label}: done in {took:.0f} s, {describe(status)} (exit {self.rc})"
        return f"{self.label}: {state} {took:.0f} s, {describe(status)}"


def describe(status: dict) -> str:
    """Counts as a person reads them: 120/229 tests, 3 failed, 1 crashed."""
    done, total = status.get("done", 0), status.get("total")
    counts = status.get("counts", {})
    words = [f"{done}/{total if total is not None else '?'} tests"]
    words += [f"{counts[k]} {k}" for k in ("failed", "error", "crashed", "blocked") if counts.get(k)]
    return ", ".join(words)


def read_status(results: Path) -> dict:
    """A run's status file (empty while it has none; a half-written one reads as empty too)."""
    try:
        return json.loads((results / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(results: Path, status: dict) -> None:
    """Replace the status file at once, so a reader never sees half of it."""
    tmp = results / f".{STATUS}.{os.getpid()}"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, results / STATUS)


def combine(statuses: Sequence[dict]) -> dict:
    """The status of runs that make one cell (its shards): counts added, the least advanced state."""
    order = ("starting", "building", "booting", "running", "finished")
    states = [s.get("state", "starting") for s in statuses]
    counts: dict[str, int] = {}
    for s in statuses:
        for k, v in s.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    totals = [s.get("total") for s in statuses]
    return {"state": min(states, key=lambda s: order.index(s) if s in order else 0),
            "done": sum(s.get("done", 0) for s in statuses),
            "total": sum(totals) if all(t is not None for t in totals) else None, "counts": counts}


class Progress:
    """What one run keeps in its status file while it builds, boots and runs: read from its boots' monitors."""

    def __init__(self, results: Path):
        self.results, self.monitors, self.state = results, [], "building"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, monitor: Monitor) -> None:
        """A boot begins: its monitor's records count from now on."""
        self.monitors.append(monitor)
        self.state = "booting"

    def status(self) -> dict:
        records: dict[str, dict] = {}
        for m in list(self.monitors):
            records.update(m.records.copy())   # the console reader adds to it meanwhile
        collected = next((m.collected for m in self.monitors if m.collected is not None), None)
        state = "running" if self.monitors and self.monitors[-1].started else self.state
        counts: dict[str, int] = {}
        for r in records.values():
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        return {"state": state, "boot": len(self.monitors), "done": len(records),
                "total": None if collected is None else len(collected), "counts": counts}

    def _loop(self) -> None:
        while not self._stop.wait(POLL):
            write_status(self.results, self.status())

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.state = "finished"
        write_status(self.results, self.status() | {"state": "finished"})


class Board:
    """Progress lines, one per child: redrawn in place on a terminal; elsewhere a line when a child changes state."""

    def __init__(self, out: TextIO, interactive: bool):
        self.out, self.interactive, self.drawn = out, interactive, 0
        self.shown: dict[str, str] = {}   # label -> the state its last printed line had (not on a terminal)

    def show(self, children: Sequence[Child], now: float) -> None:
        statuses = [read_status(c.results) if c.proc is not None else {} for c in children]
        if self.interactive:
            lines = [c.line(now, status) for c, status in zip(children, statuses)]
            self.out.write(f"\x1b[{self.drawn}F" * bool(self.drawn) + "".join(f"\x1b[2K{l}\n" for l in lines))
            self.drawn = len(lines)
        else:
            for c, status in zip(children, statuses):
                if self.shown.get(c.label) != c.state(status):
                    self.shown[c.label] = c.state(status)
                    self.out.write(c.line(now, status) + "\n")
        self.out.flush()


def run(children: Sequence[Child], limit: int, board: Board | None, own_results: Path | None = None) -> None:
    """Run the children, at most limit at once, until all have ended; keep the board and (for a cell split in
    shards) this run's own status file up to date. Leaving early (Ctrl-C, SIGTERM) stops every child first."""
    try:
        while any(c.rc is None for c in children):
            now = time.monotonic()
            for c in children:
                if c.proc is not None and c.rc is None and c.proc.poll() is not None:
                    c.rc, c.ended = c.proc.returncode, now
            running = sum(1 for c in children if c.proc is not None and c.rc is None)
            for c in children:
                if c.proc is None and running < limit:
                    c.proc, c.started = _start(c), now
                    running += 1
            if board is not None:
                board.show(children, now)
            if own_results is not None:
                write_status(own_results, combine([read_status(c.results) for c in children]))
            if any(c.rc is None for c in children):
                time.sleep(POLL)
        if board is not None:
            board.show(children, time.monotonic())
    finally:
        stop(children)


def _start(child: Child) -> subprocess.Popen:
    child.results.mkdir(parents=True, exist_ok=True)
    (child.results / STATUS).unlink(missing_ok=True)
    with (child.results / LOG).open("w") as log:
        return subprocess.Popen(child.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop(children: Sequence[Child], grace: float = 20.0) -> None:
    """SIGTERM every child still running (each stops its emulators and children), SIGKILL what outlives grace."""
    alive = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for c in alive:
        os.killpg(c.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in alive:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait(timeout=5)
        c.rc = c.proc.returncode if c.rc is None else c.rc


def interactive(out: TextIO = sys.stdout) -> bool:
    """Redraw in place only on a terminal that understands it."""
    return out.isatty() and os.environ.get("TERM", "dumb") != "dumb"
