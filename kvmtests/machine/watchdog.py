"""Bounded KVM_RUN: one watcher thread per process kicks vCPUs that overstay their deadline."""
from __future__ import annotations

import itertools
import signal
import threading
import time
from typing import Any

KICK_SIGNAL = signal.SIGUSR1
TICK = 0.05  # how often the watcher looks at deadlines, and how often it re-kicks


def _ignore(signum: int, frame: object) -> None:
    """A handler (not SIG_IGN) so that the signal interrupts KVM_RUN with EINTR."""


def install_kick_handler() -> None:
    """Install the kick handler; must run on the main thread before any vCPU runs."""
    if signal.getsignal(KICK_SIGNAL) is not _ignore:
        signal.signal(KICK_SIGNAL, _ignore)
        signal.siginterrupt(KICK_SIGNAL, True)


if threading.current_thread() is threading.main_thread():
    install_kick_handler()


class _Armed:
    __slots__ = ("deadline", "run", "thread", "fired")

    def __init__(self, deadline: float, run: Any, thread: int):
        self.deadline, self.run, self.thread, self.fired = deadline, run, thread, False


class Watcher:
    """Polls armed deadlines every TICK, so arming a KVM_RUN costs a dict insert, not a thread or a wake-up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed: dict[int, _Armed] = {}
        self.tokens = itertools.count()
        self.thread: threading.Thread | None = None

    def arm(self, run: Any, timeout: float) -> int:
        """Watch one KVM_RUN on this thread; `run` is its struct kvm_run (immediate_exit is set on expiry)."""
        token = next(self.tokens)
        armed = _Armed(time.monotonic() + timeout, run, threading.get_ident())
        with self.lock:
            self.armed[token] = armed
            if self.thread is None:
                if signal.getsignal(KICK_SIGNAL) is not _ignore:
                    raise RuntimeError("kvmtests.watchdog: kick handler not installed (import kvmtests on the "
                                       "main thread)")
                self.thread = threading.Thread(target=self._loop, name="kvmtests-watchdog", daemon=True)
                self.thread.start()
        return token

    def disarm(self, token: int) -> bool:
        """Forget a deadline; True if it had fired."""
        with self.lock:
            return self.armed.pop(token).fired

    def _loop(self) -> None:
        while True:
            time.sleep(TICK)
            now = time.monotonic()
            with self.lock:
                for a in self.armed.values():
                    if a.deadline <= now:
                        a.fired = True
                        a.run.immediate_exit = 1
                        signal.pthread_kill(a.thread, KICK_SIGNAL)


watcher = Watcher()
