"""Worker threads that run queued jobs in the node's process.

A handler is a function registered by job kind (as pynetdicom registers handlers by event). It takes a batch
of claimed jobs of its kind (up to ``batch_size``, so that a model runs on several images at once) and returns
the jobs whose attempt failed, with the error; raising fails the whole batch. The queue retries a failed job
or marks it failed, and the worker moves on. While a request that someone waits for is served (``POST /predict``,
:class:`dicom_node.background.Foreground`), the workers claim nothing: the request has the cores.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from sqlalchemy.exc import OperationalError

from dicom_node.background import Foreground, GiveWay
from dicom_node.jobs import ClaimedJob, JobMustWait, JobQueue, PermanentJobError

log = logging.getLogger(__name__)

MAX_GIVE_WAY_S = 10.0  # under requests back to back, workers still claim a job every 10 s
_GIVE_WAY_POLL_S = 0.01

JobHandler = Callable[[list[ClaimedJob]], Mapping[int, Exception]]


class WorkerPool:
    def __init__(
        self,
        queue: JobQueue,
        handlers: Mapping[str, JobHandler],
        count: int,
        poll_interval: float,
        batch_size: int = 1,
        foreground: Foreground | None = None,
    ) -> None:
        """``foreground``: the requests that the workers give way to, for at most :data:`MAX_GIVE_WAY_S` at a
        stretch, after which they claim one job, not a batch, so that a request shares the cores with one job at
        most; the request's own job runs in its thread (:meth:`run_now`)."""
        self.queue = queue
        self.foreground = foreground
        self.handlers = dict(handlers)
        self.count = count
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
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
        self._wakeup.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def wake(self) -> None:
        """Look for due jobs now rather than at the next poll (a job was queued)."""
        self._wakeup.set()

    def run_once(self, batch_size: int | None = None) -> bool:
        """Claim and run one batch of jobs (of ``batch_size``, by default the pool's); return False when none was
        due."""
        jobs = self.queue.claim_batch(self.handlers.keys(), batch_size or self.batch_size)
        if not jobs:
            return False
        self._run(jobs)
        return True

    def run_now(self, job_id: int) -> bool:
        """Claim and run the job ``job_id`` in the caller's thread (a request that waits for it); False when it
        was not pending (a worker took it first, or it finished)."""
        job = self.queue.claim_job(job_id)
        if job is None:
            return False
        self._run([job])
        self.wake()  # for the jobs it queued
        return True

    def _run(self, jobs: list[ClaimedJob]) -> None:
        try:
            failures = self.handlers[jobs[0].kind](jobs)
        except Exception as error:
            failures = {job.id: error for job in jobs}
        for job in jobs:
            self._finish_when_possible(job, failures.get(job.id))

    def _finish_when_possible(self, job: ClaimedJob, error: Exception | None) -> None:
        """Record the outcome of ``job``; while the index is unavailable (busy, or its server away), try again
        every poll interval, so that the job is not left running until the next start. A node stopping meanwhile
        leaves it running, and the next start resumes it."""
        while True:
            try:
                self._finish(job, error)
                return
            except OperationalError:
                log.error("job %d could not be marked finished (index unavailable); trying again", job.id)
                if self._stopping.wait(self.poll_interval):
                    return
            except Exception as unexpected:
                log.error("job %d could not be marked finished (%s)", job.id, type(unexpected).__name__)
                return

    def _finish(self, job: ClaimedJob, error: Exception | None) -> None:
        if error is None:
            if not self.queue.complete(job):
                log.info("job %d was queued again while it ran; it runs again", job.id)
            return
        if isinstance(error, JobMustWait):
            self.queue.wait(job, str(error))
            log.warning("job %d (%s) waits: %s", job.id, job.kind, error)
            return
        permanent = isinstance(error, PermanentJobError)
        reason = str(error) if permanent else f"{type(error).__name__}: {error}"
        state = self.queue.fail(job, reason, permanent)
        log.warning(
            "job %d (%s) attempt %d failed, now %s: %s", job.id, job.kind, job.attempt, state, type(error).__name__
        )

    def _work(self) -> None:
        give_way = GiveWay(MAX_GIVE_WAY_S)
        while not self._stopping.is_set():
            serving = self.foreground is not None and self.foreground.busy()
            if give_way.defers(serving):
                self._stopping.wait(_GIVE_WAY_POLL_S)
                continue
            try:
                if not self.run_once(1 if serving else None):
                    self._wakeup.wait(self.poll_interval)
                    self._wakeup.clear()
            except Exception:
                log.exception("worker error; retrying after %.1f s", self.poll_interval)
                self._stopping.wait(self.poll_interval)
