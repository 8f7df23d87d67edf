"""Procrastinate's worker running the node's job handlers on PostgreSQL, in any number of processes.

The handlers are those the one-process node runs on SQLite (:mod:`dicom_node.workers`): each task here only
turns a Procrastinate job into a :class:`~dicom_node.jobs.ClaimedJob` and hands it over. What the worker adds:

- batches: the jobs of one kind that the worker runs at the same moment (``concurrency`` of them) go to their
  handler together, up to ``inference.batch_size``, so that a model runs once on several images (:class:`Batch`);
- retries: a failed attempt is retried after ``workers.retry_backoff`` seconds, doubling, up to
  ``workers.max_attempts``; a permanent error (an image no decoder reads) fails at once (:class:`NodeRetry`);
- a dead worker's jobs: every worker sends heartbeats, and looks every ``stalled_check`` seconds for jobs held by
  workers whose heartbeat stopped; those go back to their queue, their attempt counted, or fail after the last.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from procrastinate import App, BaseRetryStrategy, JobContext, PsycopgConnector, RetryDecision
from procrastinate.jobs import Job as EngineJob
from procrastinate.worker import Worker
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import task_engine
from dicom_node.jobs import ClaimedJob, JobMustWait, PermanentJobError
from dicom_node.workers import JobHandler

log = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.05  # how long the first job of a batch waits for others the worker fetched at once


class AttemptFailed(Exception):
    """What the worker hands Procrastinate for a failed attempt: the error's type only, for Procrastinate logs it
    and messages of storage and database errors can carry patient data (the whole message is in
    ``job_outcomes``)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.permanent = isinstance(error, PermanentJobError)


def _reporting_only_the_type(function: Callable[..., None]) -> Callable[..., None]:
    def run(**arguments: object) -> None:
        try:
            function(**arguments)
        except Exception as error:
            raise AttemptFailed(error) from None

    run.__name__ = getattr(function, "__name__", "task")
    return run


class NodeRetry(BaseRetryStrategy):
    """The node's retries: exponential backoff and a bounded number of attempts; permanent errors fail at once."""

    def __init__(self, max_attempts: int, backoff: float) -> None:
        self.max_attempts = max_attempts
        self.backoff = backoff

    def get_retry_decision(self, *, exception: BaseException, job: EngineJob) -> RetryDecision | None:
        attempt = job.attempts + 1  # Procrastinate counts the attempts that ended before this one
        if getattr(exception, "permanent", False) or attempt >= self.max_attempts:
            return None
        return RetryDecision(retry_in={"seconds": self.backoff * 2 ** (attempt - 1)})


@dataclass
class _Waiting:
    job: ClaimedJob
    woken: threading.Event = field(default_factory=threading.Event)  # its batch ran, or it leads the next
    leads: bool = False
    done: bool = False
    error: Exception | None = None


class Batch:
    """Gathers the jobs of one handler that arrive together into one call. The first job to arrive leads: it waits
    up to ``window`` seconds for ``size`` jobs, runs the handler on the first ``size`` that came, and hands each
    its outcome; the first of those left over, or of those arriving meanwhile, leads the next call."""

    def __init__(self, handler: JobHandler, size: int, window: float = BATCH_WINDOW_S) -> None:
        self.handler = handler
        self.size = size
        self.window = window
        self._lock = threading.Lock()
        self._gathering: list[_Waiting] = []
        self._full = threading.Event()

    def run(self, job: ClaimedJob) -> Exception | None:
        """Run ``job`` with the others gathered with it; its error, or None."""
        waiting = _Waiting(job)
        with self._lock:
            self._gathering.append(waiting)
            waiting.leads = len(self._gathering) == 1
            if len(self._gathering) >= self.size:
                self._full.set()
        while not waiting.leads:
            waiting.woken.wait()
            waiting.woken.clear()
            if waiting.done:
                return waiting.error
        self._full.wait(self.window)
        with self._lock:
            batch, self._gathering = self._gathering[: self.size], self._gathering[self.size :]
            self._full.clear()
            if self._gathering:
                self._gathering[0].leads = True
                self._gathering[0].woken.set()
                if len(self._gathering) >= self.size:
                    self._full.set()
        self._run(batch)
        return waiting.error

    def _run(self, batch: list[_Waiting]) -> None:
        try:
            try:
                failures = self.handler([waiting.job for waiting in batch])
            except Exception as error:
                failures = {waiting.job.id: error for waiting in batch}
            for waiting in batch:
                waiting.error = failures.get(waiting.job.id)
        finally:
            for waiting in batch:
                waiting.done = True
                waiting.woken.set()


@dataclass(frozen=True)
class EngineTask:
    """A task that is not a job handler of an instance (sending to a destination, logging to MLflow), whose jobs
    wait in ``queue``: ``function`` takes the job's arguments. Such a task is not retried by the engine: it
    records its failures where they belong (a delivery's row, a run's) and defers its own next job;
    ``catch_up``, which the workers of its queue call every ``stalled_check`` seconds, defers one where work
    waits and no job would do it (the one that would have failed with the index away)."""

    name: str
    queue: str
    function: Callable[..., None]
    catch_up: Callable[[], None]


@dataclass(frozen=True)
class WorkerOptions:
    queues: Sequence[str]
    concurrency: int
    batch_size: int
    max_attempts: int
    retry_backoff: float
    poll_interval: float
    heartbeat_interval: float
    stalled_after: float  # seconds without a heartbeat after which a worker counts as dead
    stalled_check: float
    every_model_queue: str  # where a job moves that this worker lacks a model for


class TaskWorker:
    """A Procrastinate worker for ``handlers`` (by job kind) and ``tasks`` on the queues of ``options``, on a
    thread of its own with its own event loop; :meth:`stop` lets the jobs in hand finish."""

    def __init__(
        self,
        database_url: str,
        sessions: sessionmaker[Session],
        handlers: Mapping[str, JobHandler],
        options: WorkerOptions,
        tasks: Sequence[EngineTask] = (),
    ) -> None:
        self.sessions = sessions
        self.options = options
        conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        # a worker that cannot reach the database for as long as a dead one is given is started again (_serve)
        self.app = App(connector=PsycopgConnector(conninfo=conninfo, timeout=options.stalled_after))
        retry = NodeRetry(options.max_attempts, options.retry_backoff)
        for kind, handler in handlers.items():
            batch = Batch(handler, options.batch_size if kind == "inference" else 1)
            self.app.task(name=kind, pass_context=True, retry=retry)(self._task(kind, batch))
        for task in tasks:
            self.app.task(name=task.name)(_reporting_only_the_type(task.function))
        self.tasks = [task for task in tasks if task.queue in options.queues]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: Worker | None = None
        self._started = threading.Event()
        self._stopping = False

    def start(self) -> None:
        assert self._thread is None, "a task worker starts once"
        self._stopping = False
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="task-worker", daemon=True)
        self._thread.start()
        self._started.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """Let the jobs in hand finish (up to ``timeout`` seconds), then stop; a second call does nothing."""
        if self._thread is None:
            return
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_worker)
        self._thread.join(timeout)

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()

    def _task(self, kind: str, batch: Batch):
        def run(context: JobContext, instance_pk: int) -> None:
            assert context.job.id is not None
            job = ClaimedJob(context.job.id, kind, instance_pk, context.job.attempts + 1)
            try:
                with self.sessions() as session:
                    if task_engine.is_finished(session, job):  # its effects committed; its worker died after
                        return
            except Exception as error:
                raise AttemptFailed(error) from None
            error = batch.run(job)
            if error is None:
                return
            if isinstance(error, JobMustWait):
                self._move_to_a_worker_with_every_model(job, error)
                return
            permanent = isinstance(error, PermanentJobError)
            try:
                with self.sessions.begin() as session:
                    reason = str(error) if permanent else f"{type(error).__name__}: {error}"
                    task_engine.record_error(session, job.id, reason)
            except Exception as unrecorded:  # the index away: the attempt still counts, without its reason
                log.error("job %d: the error of its attempt was not recorded (%s)", job.id, type(unrecorded).__name__)
            raise AttemptFailed(error)

        run.__name__ = f"run_{kind}"
        return run

    def _move_to_a_worker_with_every_model(self, job: ClaimedJob, reason: JobMustWait) -> None:
        """An image this worker lacks a model for (the ingest node routed it with other settings): a new job in
        the queue of every model takes its place, uncounted, and this one ends with why."""
        queue = self.options.every_model_queue
        with self.sessions.begin() as session:
            task_engine.record_note(session, job, f"{reason}; moved to {queue}")
            task_engine.defer(session, job.kind, job.instance_pk, queue)
        log.warning("job %d (%s) moved to %s: this worker lacks a model it needs", job.id, job.kind, queue)

    async def _serve(self) -> None:
        """Run the worker until :meth:`stop`; a worker that stops on its own (its database connection lost) is
        started again, as a new worker: the jobs it held go back to their queues as a dead worker's do."""
        options = self.options
        self._loop = asyncio.get_running_loop()
        # the tasks are functions that block: one thread for each job the worker may run at once, and the keeper's
        self._loop.set_default_executor(ThreadPoolExecutor(options.concurrency + 1, "job"))
        self._started.set()
        while not self._stopping:
            try:
                await self._work()
            except Exception as error:  # messages of database errors can name hosts and users: the type only
                log.error("the task worker stopped (%s); starting again", type(error).__name__)
            if not self._stopping:
                await asyncio.sleep(options.heartbeat_interval)

    async def _work(self) -> None:
        options = self.options
        async with self.app.open_async():
            self._worker = Worker(
                self.app,
                queues=list(options.queues),
                concurrency=options.concurrency,
                install_signal_handlers=False,
                fetch_job_polling_interval=options.poll_interval,
                update_heartbeat_interval=options.heartbeat_interval,
                stalled_worker_timeout=options.stalled_after,
            )
            if self._stopping:
                return
            keeper = asyncio.create_task(self._keep())
            try:
                await self._worker.run()
            finally:
                keeper.cancel()
                self._worker = None

    async def _keep(self) -> None:
        """Every ``stalled_check`` seconds: rescue the jobs of dead workers, and let the tasks catch up."""
        while True:
            await asyncio.sleep(self.options.stalled_check)
            try:
                stalled = await self.app.job_manager.get_stalled_jobs(
                    seconds_since_heartbeat=self.options.stalled_after
                )
            except Exception as error:  # the database is away: next time
                log.debug("stalled jobs not looked for now (%s)", type(error).__name__)
                stalled = []
            for job in stalled:
                try:
                    await asyncio.to_thread(self._rescue, job)
                except Exception as error:  # the database is away: next time
                    log.debug("job %s not rescued now (%s)", job.id, type(error).__name__)
            for task in self.tasks:
                try:
                    await asyncio.to_thread(task.catch_up)
                except Exception as error:
                    log.debug("%s did not catch up now (%s)", task.name, type(error).__name__)

    def _rescue(self, job: EngineJob) -> None:
        """Put a job of a worker that stopped sending heartbeats back in its queue, its attempt counted; one that
        has used all its attempts (it may be what killed the worker) fails, and so does one whose work a job
        waiting with the same queueing lock does. Nothing happens to a job another worker rescued first."""
        assert job.id is not None
        give_up = job.attempts + 1 >= self.options.max_attempts
        try:
            with self.sessions.begin() as session:
                rescued = task_engine.rescue(session, job.id, job.worker_id, give_up)
                if rescued and give_up:
                    task_engine.record_error(session, job.id, "its worker died on every attempt")
        except IntegrityError:  # the queueing lock: a job waits that does the same work
            with self.sessions.begin() as session:
                rescued = task_engine.rescue(session, job.id, job.worker_id, give_up=True)
            if rescued:
                log.info("job %s (%s): its worker died; a job waiting does its work", job.id, job.task_name)
            return
        if rescued and give_up:
            log.warning("job %s (%s) failed: its worker died on every attempt", job.id, job.task_name)
        elif rescued:
            log.warning("job %s (%s): its worker died; queued again", job.id, job.task_name)
