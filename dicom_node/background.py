"""A thread that works in passes until stopped, waiting between passes when idle: the shape of the delivery
sender and the MLflow tracker."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PollingThread:
    """Subclasses implement :meth:`run_pass`; the thread waits ``poll_interval`` seconds after a pass that left
    nothing due, or less when :meth:`wake` is called. An error in a pass is logged by its type only (messages of
    database and network errors can carry patient data or credentials) and the next pass tries again."""

    def __init__(self, name: str, poll_interval: float) -> None:
        self.name = name
        self.poll_interval = poll_interval
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_pass(self) -> bool:
        """Do one pass of work; True when more may be due at once."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the pass in hand, then stop."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

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
            if not busy:
                self._wakeup.wait(self.poll_interval)
                self._wakeup.clear()
