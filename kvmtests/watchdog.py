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
    __slots__ = ("deadline", "vcpu", "thread", "fired")

    def __init__(self, deadline: float, vcpu: Any, thread: int):
        self.deadline, self.vcpu, self.thread, self.fired = deadline, vcpu, thread, False


class _Watcher:
    """Polls armed deadlines every TICK: arming costs a dict insert, not a thread or a wake-up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed: dict[int, _Armed] = {}
        self.tokens = itertools.count()
        self.thread: threading.Thread | None = None

    def arm(self, vcpu: Any, timeout: float) -> int:
        token = next(self.tokens)
        with self.lock:
            self.armed[token] = _Armed(time.monotonic() + timeout, vcpu, threading.get_ident())
            if self.thread is None:
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
                late = [a for a in self.armed.values() if a.deadline <= now]
                for a in late:
                    a.fired = True
                    a.vcpu.run_struct.immediate_exit = 1
                    signal.pthread_kill(a.thread, KICK_SIGNAL)


_watcher = _Watcher()


class Watchdog:
    """Context manager around one KVM_RUN: after `timeout` s, set immediate_exit and signal the thread."""

    def __init__(self, vcpu: Any, timeout: float):
        if signal.getsignal(KICK_SIGNAL) is not _ignore:
            raise RuntimeError("kvmtests.watchdog: kick handler not installed (import kvmtests on the main thread)")
        self.vcpu, self.timeout = vcpu, timeout
        self.fired = False

    def __enter__(self) -> "Watchdog":
        self._token = _watcher.arm(self.vcpu, self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fired = _watcher.disarm(self._token)
