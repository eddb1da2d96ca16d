"""Bounded KVM_RUN: one watcher thread per process kicks vCPUs that overstay their deadline."""
from __future__ import annotations

import itertools
import signal
import threading
import time
from typing import Any

KICK_SIGNAL = signal.SIGUSR1
TICK = 0.05  # how often the watcher looks at deadlines


def _ignore(signum: int, frame: object) -> None:
    """A handler (not SIG_IGN) so that the signal interrupts KVM_RUN with EINTR."""


def install_kick_handler() -> None:
    """Install the kick handler; must run on the main thread before any vCPU runs."""
    if signal.getsignal(KICK_SIGNAL) is not _ignore:
        signal.signal(KICK_SIGNAL, _ignore)
        signal.siginterrupt(KICK_SIGNAL, True)


if threading.current_thread() is threading.main_thread():
    install_kick_handler()


# An armed deadline is a list, not an object, under a token from `next_token`: building it is the cost every
# KVM_RUN pays, so Vcpu.run inlines arm() (`armed[token] = [deadline, run, thread]`) and disarm() (pop the
# token; None means the watcher took it, then wait_kicked()).
DEADLINE, RUN, THREAD = range(3)


def kick(run: Any, thread: int) -> None:
    """Make the KVM_RUN of `run` on `thread` return EINTR: now if it is in the kernel, else at its next entry."""
    run.immediate_exit = 1
    signal.pthread_kill(thread, KICK_SIGNAL)


class Watcher:
    """Polls armed deadlines every TICK, so arming a KVM_RUN costs a dict insert, not a thread or a wake-up.

    Whoever pops a deadline from `armed` owns it (dict.pop is atomic): disarm() on the normal path, the watcher
    when it expires. So the common path takes no lock; the lock only makes a disarm that lost the race wait
    until the kick is complete."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed: dict[int, list] = {}
        self.next_token = itertools.count().__next__
        self.thread: threading.Thread | None = None

    def arm(self, run: Any, timeout: float) -> int:
        """Watch one KVM_RUN on this thread; `run` is its struct kvm_run (immediate_exit is set on expiry)."""
        self.start()
        token = self.next_token()
        self.armed[token] = [_monotonic() + timeout, run, _get_ident()]
        return token

    def disarm(self, token: int) -> bool:
        """Forget a deadline; True if it had fired (then its kick is complete when this returns)."""
        if self.armed.pop(token, None) is not None:
            return False
        self.wait_kicked()
        return True

    def wait_kicked(self) -> None:
        """A disarm that lost the race waits here until the watcher's kick is complete (it kicks under the lock)."""
        with self.lock:
            pass

    def start(self) -> None:
        """Start the watcher thread once; whoever inlines arm() calls this first."""
        if self.thread is None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self.thread is not None:
                return
            if signal.getsignal(KICK_SIGNAL) is not _ignore:
                raise RuntimeError("kvmtests.watchdog: kick handler not installed (import kvmtests on the main thread)")
            self.thread = threading.Thread(target=self._loop, name="kvmtests-watchdog", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(TICK)
            now = _monotonic()
            with self.lock:
                for token, armed in list(self.armed.items()):
                    if armed[DEADLINE] <= now and self.armed.pop(token, None) is not None:
                        kick(armed[RUN], armed[THREAD])


_monotonic, _get_ident = time.monotonic, threading.get_ident
watcher = Watcher()
