"""Jobs: a queue with one worker thread, per-job event streams and cancel tokens.

`JobQueue` runs one job at a time (a GPU holds one generation) on its worker thread. Every job
has its own event queue and its own `CancelToken`, so a consumer only ever sees its own job's
events; a job that waits is told its place in the line (`Queued`) whenever that changes.
`FramePackRunner` is what the app's worker runs for a job: it picks a fresh output name and
streams the job through the app's `Runtime` (which loads the models on first use and swaps the
transformer when the model variant changes).

Nothing here keeps module-level mutable state: the queue, the runtime and the output namer are
objects that the app creates and owns.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from .events import AdviceError, CancelToken, Cancelled, Event, Failed, Finished, JobCancelled, Stage, StageName
from .outputs import OutputNamer, remove_stale_files
from .runtime import Runtime
from .settings import GenerationSettings

logger = logging.getLogger(__name__)

TERMINAL = (Finished, Failed, Cancelled)


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


class Job:
    """One submitted generation: its request, cancel token and private event stream."""

    def __init__(self, job_id: str, request: JobRequest, owner: Optional[str]):
        self.id = job_id
        self.request = request
        self.owner = owner
        self.cancel_token = CancelToken()
        self.submitted = time.monotonic()
        self.result: Optional[Event] = None
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
            if isinstance(event, TERMINAL):
                self.result = event
            self._events.append(event)
            self._ready.notify_all()


Runner = Callable[[Job], Iterable[Event]]


class JobQueue:
    """First-in, first-out jobs run one at a time by a worker thread started on the first submit."""

    def __init__(self, runner: Runner, *, name: str = "framepack-worker"):
        self._runner = runner
        self._name = name
        self._lock = threading.Condition()
        self._waiting: "deque[Job]" = deque()
        self._running: Optional[Job] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._ids = itertools.count(1)

    # -- the consumer side ----------------------------------------------------------------------

    def submit(self, request: JobRequest, owner: Optional[str] = None) -> Job:
        """Queue a job; `owner` (a browser session) may have only one job at a time."""
        with self._lock:
            if self._closed:
                raise RuntimeError("The job queue is closed.")
            if owner is not None and any(job.owner == owner for job in self._active()):
                raise BusyError(f"{owner} already has a job queued or running.")
            job = Job(f"job-{next(self._ids)}", request, owner)
            self._waiting.append(job)
            self._tell_positions()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._lock.notify_all()
            return job

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue at once, a running one stops at its next step."""
        job.cancel()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.post(Cancelled(video_path=None, frames=0))
                self._tell_positions()

    def cancel_owner(self, owner: str) -> int:
        """Stop every job of `owner`; returns how many there were."""
        with self._lock:
            jobs = [job for job in self._active() if job.owner == owner]
        for job in jobs:
            self.cancel(job)
        return len(jobs)

    def active(self, owner: Optional[str] = None) -> list[Job]:
        """The running job then the waiting ones, optionally only `owner`'s."""
        with self._lock:
            return [job for job in self._active() if owner is None or job.owner == owner]

    def position(self, job: Job) -> int:
        """0 while running (or done), else 1 + the number of jobs ahead of it."""
        with self._lock:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return 0

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Cancel everything and stop the worker thread."""
        with self._lock:
            self._closed = True
            jobs = self._active()
            self._lock.notify_all()
        for job in jobs:
            self.cancel(job)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker side ------------------------------------------------------------------------

    def _active(self) -> list[Job]:
        return ([self._running] if self._running is not None else []) + list(self._waiting)

    def _tell_positions(self) -> None:
        running = 1 if self._running is not None else 0
        for index, job in enumerate(self._waiting):
            job.post(Queued(position=index + 1, ahead=index + running))

    def _work(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._closed)
                if self._closed and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                self._tell_positions()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancel_token.cancelled:
            job.post(Cancelled(video_path=None, frames=0))
            return
        try:
            for event in self._runner(job):
                job.post(event)
                if job.done:
                    break
        except Exception as exc:  # noqa: BLE001 - one job's error must not stop the worker
            logger.exception("job %s failed", job.id)
            message = str(exc) if isinstance(exc, ValueError) else f"Generation failed: {type(exc).__name__}: {exc}"
            job.post(Failed(message, advice=exc.advice if isinstance(exc, AdviceError) else ()))
        if not job.done:
            job.post(Failed("The generation ended without a result."))


# ---------------------------------------------------------------------------------------------
# What the worker runs for a job


class FramePackRunner:
    """Runs a job: models (loaded on first use by the runtime), a fresh output name, then the pipeline's events."""

    def __init__(self, runtime: Runtime, outputs: Path):
        self.runtime = runtime
        self.namer = OutputNamer(outputs)
        self.running: Optional[Path] = None  # the final video path of the job being generated

    def __call__(self, job: Job) -> Iterator[Event]:
        request = job.request
        # Loading blocks this (worker) thread, so its progress is posted to the job's stream directly.
        notify = lambda message: job.post(Stage(StageName.LOADING, message))  # noqa: E731
        output = request.resume if request.resume is not None else self._new_output()
        self.running = output
        try:
            if request.resume is not None:
                remove_stale_files(output)
                events = self.runtime.resume(output, cancel=job.cancel_token, notify=notify)
            else:
                events = self.runtime.generate(request.settings, request.image, output, cancel=job.cancel_token,
                                               notify=notify)
            job.cancel_token.check()
            last = None
            for last in events:
                yield last
            if request.resume is not None and isinstance(last, Finished):
                remove_stale_files(output, keep_latest_partial=False)
        except JobCancelled:
            yield Cancelled(video_path=None, frames=0)
        finally:
            self.running = None

    def _new_output(self) -> Path:
        try:
            return self.namer.next()
        except OSError as exc:
            raise ValueError(
                f"The outputs folder {self.namer.folder} can't be written ({exc.strerror or exc}); make sure it is a "
                "folder you may write to, or start the app with another --outputs folder."
            ) from None
