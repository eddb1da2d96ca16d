"""Bounded KVM_RUN: kick a vCPU out of the kernel when it overstays."""
from __future__ import annotations

import signal
import threading
from typing import Any

KICK_SIGNAL = signal.SIGUSR1
KICK_INTERVAL = 0.05


def _ignore(signum: int, frame: object) -> None:
    """A handler (not SIG_IGN) so that the signal interrupts KVM_RUN with EINTR."""


def install_kick_handler() -> None:
    """Install the kick handler; must run on the main thread before any vCPU runs."""
    if signal.getsignal(KICK_SIGNAL) is not _ignore:
        signal.signal(KICK_SIGNAL, _ignore)
        signal.siginterrupt(KICK_SIGNAL, True)


if threading.current_thread() is threading.main_thread():
    install_kick_handler()


class Watchdog:
    """Context manager: after `timeout` s, set immediate_exit and signal the running thread until it leaves."""

    def __init__(self, vcpu: Any, timeout: float):
        if signal.getsignal(KICK_SIGNAL) is not _ignore:
            raise RuntimeError("kvmtests.watchdog: kick handler not installed (import kvmtests on the main thread)")
        self.vcpu, self.timeout = vcpu, timeout
        self.fired = False
        self._done = threading.Event()
        self._target = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-vcpu{vcpu.id}", daemon=True)

    def _watch(self) -> None:
        if self._done.wait(self.timeout):
            return
        self.fired = True
        self.vcpu.run_struct.immediate_exit = 1
        while not self._done.is_set():
            signal.pthread_kill(self._target, KICK_SIGNAL)
            self._done.wait(KICK_INTERVAL)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
