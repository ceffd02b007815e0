"""Jobs: a queue with one worker thread, per-job event streams and cancel tokens.

`JobQueue` runs one job at a time (a GPU holds one generation) on its worker thread. Every job
has its own event queue and its own `CancelToken`, so a consumer only ever sees its own job's
events; a job that waits is told its place in the line (`Queued`) whenever that changes.

There are two kinds of jobs. A page's job (`submit`: Start Generation, Resume) is followed by
that page: it lives in memory, and it ends when its page goes away. A queued job (`enqueue`: Add
to queue, batches, the `batch` command) lives in the outputs folder's queue file (`jobstore`):
it survives closed pages, crashes and restarts, and any process sharing the folder may run it
(the file decides which). Pages' jobs run first, in the order they came; queued jobs run in the
queue's order when no page is waiting. A queued job whose process died is taken again first and
continues from its last finished section.

`FramePackRunner` is what the app's worker runs for a job: it picks a fresh output name (or
continues a queued job's earlier attempt) and streams the job through the app's `Runtime` (which
loads the models on first use and swaps the transformer when the model variant changes).

Nothing here keeps module-level mutable state: the queue, the runtime and the output namer are
objects that the app creates and owns.
"""

from __future__ import annotations

import glob
import itertools
import logging
import secrets
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .events import (AdviceError, CancelToken, Cancelled, Event, Failed, Finished, JobCancelled, SectionDone, Stage,
                     StageName, StepProgress)
from .jobstore import ENDED, JobStore, NewJob, QueueFileError, StoredJob, process_identity
from .outputs import OutputNamer, OutputPaths, busy_message, is_running, read_record, remove_stale_files
from .runtime import Runtime
from .settings import GenerationSettings

logger = logging.getLogger(__name__)

TERMINAL = (Finished, Failed, Cancelled)
# A job whose worker died this many times (a process killed, a node gone) fails instead of going on.
MAX_LOST = 3
# The worker looks at the queue file this often while idle (jobs queued by other processes, a died process's job).
POLL_S = 1.0


class WorkerLost(Exception):
    """The worker running a job went away mid-job (a Ray actor killed, its node gone): the job is not at
    fault; it continues from its last finished section on another worker."""


class BusyError(ValueError):
    """The same owner (a browser session) already has a job queued or running."""


@dataclass(frozen=True)
class Queued:
    """The job waits: `position` is its place in the line (1 = next); `ahead` counts the jobs that run first."""

    position: int
    ahead: int


JobEvent = Union[Event, Queued]


@dataclass(frozen=True)
class JobRequest:
    """What a job needs: validated settings and the start image (RGB uint8, H×W×3).

    With `resume` (the final video path of an interrupted job) the job continues that one from its
    last finished section instead; its settings and start image come from its files.
    """

    settings: GenerationSettings
    image: Optional[np.ndarray]
    resume: Optional[Path] = None
    extend: Optional[Any] = None  # an extend.Extension: the job extends a video instead (its settings are the above)


class Job:
    """One submitted generation: its request, cancel token and private event stream.

    A queued job also has its row in the queue file (`stored_id`) and, once named, its output;
    `keep_events=False` keeps only its last event (nobody follows it: the page's queue panel
    reads `last_step` and the file instead).
    """

    def __init__(self, job_id: str, request: JobRequest, owner: Optional[str], *, stored_id: Optional[int] = None,
                 output: Optional[Path] = None, keep_events: bool = True):
        self.id = job_id
        self.request = request
        self.owner = owner
        self.stored_id = stored_id
        self.output = output  # the final video path, once the job has one
        self.cancel_token = CancelToken()
        self.submitted = time.monotonic()
        self.result: Optional[Event] = None
        self.last_step: Optional[StepProgress] = None
        self.slot: Optional[int] = None  # which of the queue's workers runs it (0-based), once one does
        self.lost = 0  # how many times its worker died under it
        self._keep = keep_events
        self._on_output: Optional[Callable[[Path], None]] = None
        self._events: "deque[JobEvent]" = deque()
        self._ready = threading.Condition()

    def __repr__(self) -> str:
        return f"Job({self.id!r}, owner={self.owner!r}, done={self.done})"

    @property
    def done(self) -> bool:
        """Whether the job's last event (Finished, Failed or Cancelled) was sent."""
        return self.result is not None

    def cancel(self) -> None:
        """Ask the job to stop; a running job stops at its next sampling step."""
        self.cancel_token.cancel()

    def bind_output(self, output: Path) -> None:
        """The job writes `output` (its final video path): a queued job records it before writing anything."""
        self.output = Path(output)
        if self._on_output is not None:
            self._on_output(self.output)

    def take(self, timeout: Optional[float] = None) -> list[JobEvent]:
        """Every event not taken yet, waiting up to `timeout` seconds (None: forever) for at least one."""
        with self._ready:
            if not self._events:
                self._ready.wait_for(lambda: bool(self._events), timeout)
            taken = list(self._events)
            self._events.clear()
            return taken

    def events(self) -> Iterator[JobEvent]:
        """Each event in order, ending after the job's last one."""
        while True:
            for event in self.take():
                yield event
                if isinstance(event, TERMINAL):
                    return

    def post(self, event: JobEvent) -> None:
        """Add an event to the job's stream (ignored after its last event)."""
        with self._ready:
            if self.result is not None:
                return  # nothing follows the last event
            if isinstance(event, StepProgress):
                self.last_step = event
            if isinstance(event, TERMINAL):
                self.result = event
            elif not self._keep:
                return
            self._events.append(event)
            self._ready.notify_all()


Runner = Callable[[Job], Iterable[Event]]


class JobQueue:
    """Pages' jobs (first in, first out) and the queue file's jobs, run by one worker thread per runner.

    `runner` is one runner (one job at a time: one GPU) or a list of them, one per slot (each a
    Ray actor, see `scaleout`): each slot's thread takes the next job, so as many jobs run at once
    as there are slots. `store` is the outputs folder's queue file (None: pages' jobs only); this
    queue runs that file's jobs of `pool` (the app's, or one `batch` command's). The workers start
    on the first job, or at once with a queue file: they look at the file every `poll_s` seconds
    while idle (the jobs a closed or killed app left, jobs another process queued).

    A runner whose worker dies under a job raises `WorkerLost`: the job is taken again first (by
    any slot) and continues from its last finished section; after MAX_LOST such deaths it fails.
    A runner may have `wait_ready()` (called before its slot takes a job: a new actor after one
    died) and `label` (recorded as the job's worker in the queue file).
    """

    def __init__(self, runner: Runner | Sequence[Runner], *, store: Optional[JobStore] = None, pool: str = "app",
                 name: str = "framepack-worker", poll_s: float = POLL_S):
        self._runners: list[Runner] = list(runner) if isinstance(runner, (list, tuple)) else [runner]
        if not self._runners:
            raise ValueError("A job queue needs at least one runner.")
        self._name = name
        self._store = store
        self._pool = pool
        self._poll_s = poll_s
        self._lock = threading.Condition()
        self._waiting: "deque[Job]" = deque()
        self._running: list[Job] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._closing = False  # a queued job stopped by close() is interrupted (resumed next time), not cancelled
        self._ids = itertools.count(1)
        self._known: dict[int, Job] = {}  # queued jobs this process holds objects of, by row id
        self._worker_id: Optional[str] = None
        self._store_failed = False
        self.problem: Optional[str] = None  # why the queue file can't be read, when it can't
        if store is not None:  # the file may hold jobs already, or get some from another process
            self._start_worker()

    @property
    def store(self) -> Optional[JobStore]:
        """The queue file this queue runs jobs from (None: pages' jobs only)."""
        return self._store

    # -- the consumer side ----------------------------------------------------------------------

    def submit(self, request: JobRequest, owner: Optional[str] = None) -> Job:
        """Queue a page's job; `owner` (a browser session) may have only one job at a time."""
        with self._lock:
            if self._closed:
                raise RuntimeError("The job queue is closed.")
            if owner is not None and any(job.owner == owner for job in self._active()):
                raise BusyError(f"{owner} already has a job queued or running.")
            job = Job(f"job-{next(self._ids)}", request, owner)
            self._waiting.append(job)
            self._tell_positions()
            self._start_worker()
            self._lock.notify_all()
            return job

    def enqueue(self, requests: Sequence[JobRequest], owner: Optional[str] = None, *, batch: Optional[str] = None,
                follow: bool = False) -> list[Job]:
        """Add jobs to the queue file, all or none; they survive restarts and run after pages' jobs.

        `owner` (a user name or browser session) sees their prompts in the queue's list. With
        `batch` (a key), a batch already in the file is not added again: its jobs are returned.
        `follow`: the caller reads the jobs' events (else only their last event is kept).
        """
        if self._store is None:
            raise RuntimeError("This job queue has no queue file.")
        if any(getattr(request, "extend", None) is not None for request in requests):
            raise ValueError("An extension can't be queued; start it from its video.")
        with self._lock:
            if self._closed:
                raise RuntimeError("The job queue is closed.")
        ids = self._store.add([NewJob(r.settings, r.image, r.resume) for r in requests], pool=self._pool,
                              owner=owner, batch=batch)
        rows = self._store.get_many(ids)
        jobs = [self._track(rows[job_id], follow=follow) for job_id in ids]
        with self._lock:
            self._start_worker()
            self._lock.notify_all()
        return jobs

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue at once, a running one stops at its next step."""
        job.cancel()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.post(Cancelled(video_path=None, frames=0))
                self._tell_positions()
                return
        if job.stored_id is not None and self._store.cancel_waiting(job.stored_id):
            job.post(Cancelled(video_path=None, frames=0))

    def cancel_owner(self, owner: str) -> int:
        """Stop every page's job of `owner`; returns how many there were."""
        with self._lock:
            jobs = [job for job in self._active() if job.owner == owner]
        for job in jobs:
            self.cancel(job)
        return len(jobs)

    def active(self, owner: Optional[str] = None) -> list[Job]:
        """The pages' jobs: the running one then the waiting ones, optionally only `owner`'s."""
        with self._lock:
            return [job for job in self._active() if owner is None or job.owner == owner]

    def position(self, job: Job) -> int:
        """0 while running (or done), else 1 + the number of jobs ahead of it."""
        with self._lock:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return 0

    def running_jobs(self) -> list[Job]:
        """Every job a slot runs now."""
        with self._lock:
            return list(self._running)

    @property
    def slots(self) -> int:
        """How many jobs this queue runs at once."""
        return len(self._runners)

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Cancel the pages' jobs and stop the worker thread; a queued job running now is interrupted (it
        continues the next time a worker starts) and the waiting ones stay in the queue file."""
        with self._lock:
            self._closed = True
            jobs = self._active()
            running = list(self._running)
            self._lock.notify_all()
        for job in running:
            if job.stored_id is not None:
                self._closing = True
                job.cancel()
        for job in jobs:
            self.cancel(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._store is not None:
            self._store.close()

    # -- the queue file's jobs ------------------------------------------------------------------

    def queued(self, *, ended: int = 20) -> list[StoredJob]:
        """The queue file's jobs: running, then waiting in their order, then the `ended` latest ended (none when
        the file can't be read: that is logged, and the pages' jobs go on)."""
        if self._store is None:
            return []
        try:
            jobs = self._store.jobs(ended=ended)
        except (sqlite3.Error, QueueFileError) as exc:
            logger.error("the queue file can't be read: %s", exc)
            self.problem = str(exc)
            return []
        self.problem = None
        return jobs

    def live(self, stored_id: int) -> Optional[Job]:
        """This process's object of a queued job, if it holds one (its `last_step` is the running job's progress)."""
        return self._known.get(stored_id)

    def move(self, stored_id: int, offset: int) -> bool:
        """Move a waiting queued job one place up (-1) or down (+1)."""
        return self._store is not None and self._store.move(stored_id, offset)

    def remove(self, stored_id: int) -> bool:
        """Take a queued job that is not running out of the queue."""
        if self._store is None or not self._store.remove(stored_id):
            return False
        job = self._known.pop(stored_id, None)
        if job is not None:
            job.cancel()
            job.post(Cancelled(video_path=None, frames=0))
        return True

    def retry(self, stored_id: int) -> bool:
        """Put a failed, cancelled or interrupted queued job back at the end of the line."""
        if self._store is None or not self._store.retry(stored_id):
            return False
        self._known.pop(stored_id, None)  # its next run gets a fresh event stream
        with self._lock:
            self._start_worker()
            self._lock.notify_all()
        return True

    def stop(self, stored_id: int) -> bool:
        """Stop the queued job this process is running now (it keeps its finished sections and can be retried)."""
        for running in self.running_jobs():
            if running.stored_id == stored_id:
                running.cancel()
                return True
        return False

    def stored_outputs(self) -> set[Path]:
        """Final video paths (in the queue file's folder, as this queue names it) that queued jobs are running or
        will continue: not to be resumed by hand."""
        busy = set()
        for job in self.queued(ended=0):
            busy.update(self._store.folder / path.name for path in (job.output, job.resume) if path is not None)
        return busy

    def batch_jobs(self, batch: str, follow: bool = True) -> list[Job]:
        """The jobs of a batch in the queue file, as objects whose events this process can follow."""
        return [self._track(row, follow=follow) for row in self._store.batch_jobs(batch)]

    # -- the worker side ------------------------------------------------------------------------

    def _active(self) -> list[Job]:
        running = [job for job in self._running if job.stored_id is None]
        return running + list(self._waiting)

    def _start_worker(self) -> None:
        with self._lock:
            if not self._threads and not self._closed:
                for slot, runner in enumerate(self._runners):
                    name = self._name if len(self._runners) == 1 else f"{self._name}-{slot + 1}"
                    thread = threading.Thread(target=self._work, args=(slot, runner), name=name, daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _tell_positions(self) -> None:
        running = len(self._running)
        for index, job in enumerate(self._waiting):
            job.post(Queued(position=index + 1, ahead=index + running))

    def _track(self, row: StoredJob, follow: bool) -> Job:
        """The Job object of a row of the queue file: the one this process holds already (the worker may have
        taken the row first), else a new one (its images are read when it runs)."""
        with self._lock:
            job = self._known.get(row.id)
            if job is not None:
                job._keep = job._keep or follow
                return job
            job = Job(f"queued-{row.id}", JobRequest(row.generation_settings(), None, row.resume), row.owner,
                      stored_id=row.id, output=row.output, keep_events=follow)
            if row.state in ENDED:
                job.post(_ended_event(row))
            else:
                self._known[row.id] = job
            return job

    def _identity(self, runner: Runner) -> str:
        """Who takes a job from the file: this process (so others can tell whether it still runs), and the
        runner's worker when it has one."""
        if self._worker_id is None:
            self._worker_id = f"{process_identity()}|{secrets.token_hex(4)}"
        label = getattr(runner, "label", None)
        return f"{self._worker_id}|{label}" if label else self._worker_id

    def _work(self, slot: int, runner: Runner) -> None:
        while True:
            if not self._ready(runner):
                return
            job = self._next(runner)
            if job is None:
                return
            job.slot = slot
            try:
                self._run(job, runner)
            finally:
                with self._lock:
                    self._running.remove(job)
                    self._tell_positions()

    def _ready(self, runner: Runner) -> bool:
        """Wait until the runner can take a job (a Ray slot starts its actor); False once closed."""
        wait_ready = getattr(runner, "wait_ready", None)
        while wait_ready is not None and not self._closed:
            try:
                wait_ready()
                return True
            except Exception:  # noqa: BLE001 - no worker now (a cluster busy or gone): try again later
                logger.exception("a worker could not start; trying again")
                with self._lock:
                    self._lock.wait_for(lambda: self._closed, timeout=max(self._poll_s, 5.0))
        return not self._closed

    def _next(self, runner: Runner) -> Optional[Job]:
        """The next job to run: a page's first, else one taken from the queue file; None once closed."""
        while True:
            with self._lock:
                if self._waiting:
                    job = self._waiting.popleft()
                    self._running.append(job)
                    self._tell_positions()
                    return job
                if self._closed:
                    return None
            job = self._claim(runner)
            if job is not None:
                with self._lock:
                    if not self._closed:
                        self._running.append(job)
                        self._tell_positions()
                        return job
                self._store.end(job.stored_id, "interrupted")  # closed meanwhile: it runs next time
                return None
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._closed, timeout=self._poll_s)

    def _claim(self, runner: Runner) -> Optional[Job]:
        """Take the next job of this queue's pool from the queue file (after marking dead processes' jobs
        interrupted)."""
        store = self._store
        if store is None or not store.exists():
            return None
        try:
            store.recover()
            self._sync_known()
            row = store.claim(self._pool, self._identity(runner))
        except (sqlite3.Error, QueueFileError) as exc:
            if not self._store_failed:  # said once; the worker keeps running the pages' jobs
                logger.error("the queue file can't be read: %s", exc)
                self._store_failed = True
            return None
        self._store_failed = False
        if row is None:
            return None
        job = self._track(row, follow=False)
        job.output = row.output
        return job

    def _sync_known(self) -> None:
        """End the objects of queued jobs that another process ended or that left the queue."""
        waiting = {stored_id: job for stored_id, job in list(self._known.items())
                   if job not in self._running and not job.done}
        rows = self._store.get_many(list(waiting)) if waiting else {}  # one query, not one per job
        for stored_id, job in waiting.items():
            row = rows.get(stored_id)
            if row is None:
                job.post(Cancelled(video_path=None, frames=0))
            elif row.state in ENDED:
                job.post(_ended_event(row))
            else:
                continue
            self._known.pop(stored_id, None)

    def _run(self, job: Job, runner: Runner) -> None:
        if job.stored_id is None:
            try:
                feed(job, runner)
            except WorkerLost as exc:
                if self._lost(job, exc):
                    with self._lock:  # first again: its output continues from its last finished section
                        self._waiting.appendleft(job)
                        self._lock.notify_all()
            return
        store, stored_id = self._store, job.stored_id
        try:
            row = store.get(stored_id)
            with store.inputs(row) as (settings, image):
                job.request = JobRequest(settings, image, row.resume)
                job._on_output = lambda output: store.set_output(stored_id, output)
                feed(job, runner, on_section=lambda event: store.set_progress(stored_id, event.section))
        except WorkerLost as exc:
            if self._lost(job, exc):
                store.end(stored_id, "interrupted", str(exc))  # taken again first, by any worker
                return
        except Exception as exc:  # noqa: BLE001 - the job's copies can't be read: it fails, the worker goes on
            logger.exception("queued job %s could not start", job.id)
            job.post(Failed(str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"))
        self._record_end(job)

    @staticmethod
    def _lost(job: Job, exc: WorkerLost) -> bool:
        """A job's worker died: True to run it again, False when that happened MAX_LOST times (it fails)."""
        job.lost += 1
        logger.warning("%s: %s (%d of %d)", job.id, exc, job.lost, MAX_LOST)
        if job.lost < MAX_LOST and not job.cancel_token.cancelled:
            return True
        if job.cancel_token.cancelled:
            job.post(Cancelled(video_path=None, frames=0))
        else:
            job.post(Failed(f"Its worker stopped {job.lost} times while running it ({exc}); finished sections "
                            "were kept."))
        return False

    def _record_end(self, job: Job) -> None:
        """Write how a queued job ended into the queue file (interrupted when the app closed under it)."""
        result = job.result
        if isinstance(result, Finished):
            state, message = "finished", None
        elif isinstance(result, Cancelled):
            state, message = ("interrupted" if self._closing else "cancelled"), None
        else:
            state, message = "failed", getattr(result, "message", None)
        try:
            self._store.end(job.stored_id, state, message)
        except (sqlite3.Error, QueueFileError):
            logger.exception("could not record the end of %s", job.id)
        if state != "interrupted":
            self._known.pop(job.stored_id, None)


def feed(job: Job, runner: Runner, on_section: Optional[Callable[[SectionDone], None]] = None) -> None:
    """Run `job` with `runner` on this thread, posting each event to the job's stream; it ends with exactly
    one last event (an error is a Failed with its message). WorkerLost passes through: the job runs again."""
    if job.cancel_token.cancelled:
        job.post(Cancelled(video_path=None, frames=0))
        return
    try:
        for event in runner(job):
            job.post(event)
            if on_section is not None and isinstance(event, SectionDone):
                on_section(event)
            if job.done:
                break
    except WorkerLost:
        raise  # not the job's fault: it runs again
    except Exception as exc:  # noqa: BLE001 - one job's error must not stop the worker
        logger.exception("job %s failed", job.id)
        message = str(exc) if isinstance(exc, ValueError) else f"Generation failed: {type(exc).__name__}: {exc}"
        job.post(Failed(message, advice=exc.advice if isinstance(exc, AdviceError) else ()))
    if not job.done:
        job.post(Failed("The generation ended without a result."))


def _ended_event(row: StoredJob) -> Event:
    """The last event of a queued job that ended earlier (or in another process), from its row."""
    if row.state == "finished" and row.output is not None:
        return finished_event(row.output)
    if row.state == "failed":
        return Failed(row.message or "The job failed.")
    return Cancelled(video_path=None, frames=0)


def finished_event(video: Path) -> Finished:
    """Finished for a video already in place, with its frame count from its sidecar."""
    paths = OutputPaths(video)
    try:
        frames = int(read_record(paths.sidecar).get("frames") or 0)
    except ValueError:
        frames = 0
    return Finished(video_path=paths.video, frames=frames,
                    input_image_path=paths.input_image if paths.input_image.exists() else None)


# ---------------------------------------------------------------------------------------------
# What the worker runs for a job


class FramePackRunner:
    """Runs a job: models (loaded on first use by the runtime), a fresh output name, then the pipeline's events.

    A queued job that ran before (its process died, or it failed and is retried) continues its
    earlier output from the last finished section when it can, and is not run again when its
    video is already in place.
    """

    def __init__(self, runtime: Runtime, outputs: Path):
        self.runtime = runtime
        self.namer = OutputNamer(outputs)

    def __call__(self, job: Job) -> Iterator[Event]:
        request = job.request
        # Loading blocks this (worker) thread, so its progress is posted to the job's stream directly.
        notify = lambda message: job.post(Stage(StageName.LOADING, message))  # noqa: E731
        if request.resume is None and job.output is not None and job.output.exists():
            yield finished_event(job.output)  # its process ended right after putting the video in place
            return
        resume = request.resume if request.resume is not None else self._earlier_attempt(job.output)
        if resume is not None:
            output = resume
        elif job.output is not None and not _in_use(job.output):
            output = job.output  # named before it ran (a Ray worker's job), or an attempt that left nothing
        else:
            output = self._new_output()
        job.bind_output(output)
        try:
            if resume is not None:
                remove_stale_files(output)
                events = self.runtime.resume(output, cancel=job.cancel_token, notify=notify)
            elif request.extend is not None:
                events = self.runtime.extend(request.extend, output, cancel=job.cancel_token, notify=notify)
            else:
                events = self.runtime.generate(request.settings, request.image, output, cancel=job.cancel_token,
                                               notify=notify)
            job.cancel_token.check()
            last = None
            for last in events:
                yield last
            if resume is not None and isinstance(last, Finished):
                remove_stale_files(output, keep_latest_partial=False)
        except JobCancelled:
            yield Cancelled(video_path=None, frames=0)

    @staticmethod
    def _earlier_attempt(output: Optional[Path]) -> Optional[Path]:
        """A queued job's earlier output to continue, or None to start afresh (what an attempt that
        finished no section left is removed: it holds nothing to keep)."""
        from .pipeline import load_resume_state

        if output is None:
            return None
        if is_running(output):
            raise ValueError(busy_message(output))
        try:
            load_resume_state(output)
            return output
        except ValueError:
            _discard_unstarted(output)
            return None

    def _new_output(self) -> Path:
        try:
            return self.namer.next()
        except OSError as exc:
            raise ValueError(
                f"The outputs folder {self.namer.folder} can't be written ({exc.strerror or exc}); make sure it is a "
                "folder you may write to, or start the app with another --outputs folder."
            ) from None


def _in_use(output: Path) -> bool:
    """Whether any file of the job named by `output` exists (the name can't be given to a fresh job)."""
    paths = OutputPaths(output)
    return paths.folder.is_dir() and any(paths.folder.glob(f"{glob.escape(paths.name)}.*"))


def _discard_unstarted(output: Path) -> None:
    """Remove the files of an attempt that finished no section (its record and cropped images); an
    attempt with latents or a video is left as it is."""
    paths = OutputPaths(output)
    if paths.latents.exists() or paths.video.exists() or paths.partials():
        return
    remove_stale_files(paths.video, keep_latest_partial=False)
    copies = [paths.sidecar, paths.input_image, paths.end_image, *paths.folder.glob(f"{paths.name}.keyframe*.png")]
    for path in copies:
        path.unlink(missing_ok=True)
