"""A thread that works in passes until stopped, waiting between passes when idle: the shape of the delivery
sender and the MLflow tracker; and how background work gives way to what someone waits for."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class PollingThread:
    """Subclasses implement :meth:`run_pass`; the thread waits ``poll_interval`` seconds after a pass that left
    nothing due, or less when :meth:`wake` is called. An error in a pass is logged by its type only (messages of
    database and network errors can carry patient data or credentials) and the next pass tries again. With
    ``count`` above 1, that many threads make passes side by side (their passes must claim work atomically)."""

    def __init__(self, name: str, poll_interval: float, count: int = 1) -> None:
        self.name = name
        self.poll_interval = poll_interval
        self.count = count
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def run_pass(self) -> bool:
        """Do one pass of work; True when more may be due at once."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._stopping.clear()
        for number in range(self.count):
            name = self.name if self.count == 1 else f"{self.name}-{number}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the passes in hand, then stop."""
        self._stopping.set()
        self._wakeup.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def wake(self) -> None:
        """Start the next pass now rather than at the next poll."""
        self._wakeup.set()

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.run_pass()
            except Exception as error:
                log.warning(
                    "%s pass failed (%s); retrying after %.1f s", self.name, type(error).__name__, self.poll_interval
                )
                busy = False
            if not busy and self._wakeup.wait(self.poll_interval):
                self._wakeup.clear()


class GiveWay:
    """Deference with a bound: :meth:`defers` says to wait while the other work is busy, but never longer than
    ``max_seconds`` at a stretch, so that work that gives way is not starved by a node that is never idle."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self._since: float | None = None

    def defers(self, busy: bool) -> bool:
        if not busy:
            self._since = None
            return False
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since < self.max_seconds:
            return True
        self._since = now  # this once, and then give way again
        return False


class Foreground:
    """The requests someone waits for (``POST /predict``): background work gives way while one is served and for
    ``quiet_seconds`` after the last, so that back-to-back requests each find the cores free."""

    def __init__(self, quiet_seconds: float = 0.05) -> None:
        self.quiet_seconds = quiet_seconds
        self._lock = threading.Lock()
        self._serving = 0
        self._last_end = float("-inf")

    @contextmanager
    def serving(self) -> Iterator[None]:
        with self._lock:
            self._serving += 1
        try:
            yield
        finally:
            with self._lock:
                self._serving -= 1
                self._last_end = time.monotonic()

    def busy(self) -> bool:
        with self._lock:
            return self._serving > 0 or time.monotonic() - self._last_end < self.quiet_seconds
