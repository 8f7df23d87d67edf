"""Worker threads that run queued jobs in the node's process.

A handler is a function registered by job kind (as pynetdicom registers handlers by event). It raises to say
the attempt failed; the queue then retries it or marks it failed, and the worker moves on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from dicom_node.jobs import ClaimedJob, JobQueue

log = logging.getLogger(__name__)

JobHandler = Callable[[ClaimedJob], None]


class WorkerPool:
    def __init__(self, queue: JobQueue, handlers: Mapping[str, JobHandler], count: int, poll_interval: float) -> None:
        self.queue = queue
        self.handlers = dict(handlers)
        self.count = count
        self.poll_interval = poll_interval
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if not self.handlers:
            log.warning("no job handlers are registered: received instances stay queued")
            return
        self._stopping.clear()
        for number in range(self.count):
            thread = threading.Thread(target=self._work, name=f"worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs in hand, then stop."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def run_once(self) -> bool:
        """Claim and run one job; return False when none was due."""
        job = self.queue.claim(self.handlers.keys())
        if job is None:
            return False
        try:
            self.handlers[job.kind](job)
        except Exception as error:
            state = self.queue.fail(job.id, f"{type(error).__name__}: {error}")
            log.warning(
                "job %d (%s) attempt %d failed, now %s: %s", job.id, job.kind, job.attempt, state, type(error).__name__
            )
        else:
            self.queue.complete(job.id)
        return True

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self.run_once():
                    self._stopping.wait(self.poll_interval)
            except Exception:
                log.exception("worker error; retrying after %.1f s", self.poll_interval)
                self._stopping.wait(self.poll_interval)
