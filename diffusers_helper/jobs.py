"""Jobs: a queue with one worker thread, per-job event streams and cancel tokens; models and outputs.

`JobQueue` runs one job at a time (a GPU holds one generation) on its worker thread. Every job
has its own event queue and its own `CancelToken`, so a consumer only ever sees its own job's
events; a job that waits is told its place in the line (`Queued`) whenever that changes.
`FramePackRunner` is what the app's worker runs for a job: it loads the models on first use
(and swaps the transformer when the model variant changes), picks a fresh output name, and
streams `pipeline.generate`. `list_outputs` reads the outputs folder back for the page.

Nothing here keeps module-level mutable state: the queue, the model cache and the output
namer are objects that the app creates and owns.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from . import joblock
from .events import CancelToken, Cancelled, Event, Failed, Finished, Stage
from .settings import GenerationSettings, ModelSources

logger = logging.getLogger(__name__)

TERMINAL = (Finished, Failed, Cancelled)


class BusyError(ValueError):
    """The same page already has a job queued or running."""


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
                raise BusyError("This page already has a generation queued or running; wait for it or press End Generation.")
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
            job.post(Failed(message))
        if not job.done:
            job.post(Failed("The generation ended without a result."))


# ---------------------------------------------------------------------------------------------
# What the worker runs for a job


class ModelCache:
    """The loaded components: shared ones once, one transformer at a time (the other variant's is released)."""

    def __init__(self, sources: Union[ModelSources, Callable[[], ModelSources]], device,
                 *, load_shared: Optional[Callable] = None, load_transformer: Optional[Callable] = None,
                 attention: str = "auto"):
        self._sources = sources
        self._device = device
        self._attention = attention  # --attention: the kernel is set on each transformer as it loads
        self._load_shared = load_shared
        self._load_transformer = load_transformer
        self._lock = threading.Lock()
        self._shared = None
        self._transformer = None
        self._model: Optional[str] = None

    @property
    def loaded_model(self) -> Optional[str]:
        """The variant whose transformer is loaded, if any."""
        return self._model

    def sources(self) -> ModelSources:
        """The sources, resolved once (building tiny models, for instance, happens on first use)."""
        if callable(self._sources):
            self._sources = self._sources()
        return self._sources

    def components(self, model: str, notify: Callable[[str], None] = lambda message: None,
                   cancel: Optional[CancelToken] = None):
        """Components for `model`, loading what is missing; `notify` hears what is being loaded."""
        from .loading import Components, component_dtypes, load_shared, load_transformer, resolve_device

        load_shared = self._load_shared or load_shared
        load_transformer = self._load_transformer or load_transformer
        with self._lock:
            if not hasattr(self._device, "type"):
                self._device = resolve_device(self._device)
            device = self._device
            if self._shared is None:
                notify("Getting the model files ready (first use)")
                sources = self.sources()
                notify("Loading the text encoders, VAE and image encoder (first use)")
                self._shared = load_shared(sources, device)
            if cancel is not None:
                cancel.check()
            if self._model != model:
                if self._transformer is not None:
                    # Release the other variant first: two transformers rarely fit in memory.
                    notify(f"Unloading the {display_name(self._model)} transformer")
                    self._transformer, self._model = None, None
                    from .memory import empty_cache

                    empty_cache(device)
                notify(f"Loading the {display_name(model)} transformer")
                from .attention import set_attention

                transformer = load_transformer(self.sources().transformer(model), device)
                set_attention(transformer, self._attention, device)
                self._transformer, self._model = transformer, model
            return Components(shared=self._shared, transformer=self._transformer, model=model,
                              device=device, dtypes=component_dtypes(device))


def display_name(model: Optional[str]) -> str:
    """The product name of a model variant."""
    return {"framepack": "FramePack", "f1": "FramePack-F1"}.get(model or "", str(model))


class OutputNamer:
    """Fresh output paths named by local time (to the millisecond), with a counter if that is taken."""

    def __init__(self, folder: Path, clock: Callable[[], datetime] = datetime.now):
        self.folder = Path(folder)
        self._clock = clock
        self._lock = threading.Lock()
        self._given: set[str] = set()

    def next(self) -> Path:
        """A new `<folder>/<YYYY-MM-DD_HH-MM-SS-mmm>[_N].mp4` that no file of a job uses yet."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = self._clock().strftime("%Y-%m-%d_%H-%M-%S-%f")[:-3]
            for n in itertools.count(1):
                stem = stamp if n == 1 else f"{stamp}_{n}"
                if stem not in self._given and not any(self.folder.glob(f"{glob_escape(stem)}.*")):
                    self._given.add(stem)
                    return self.folder / f"{stem}.mp4"
            raise AssertionError("unreachable")


def glob_escape(text: str) -> str:
    """`text` with glob wildcards escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


class FramePackRunner:
    """Runs a job: models (loaded on first use), a fresh output name, then the pipeline's events."""

    def __init__(self, models: ModelCache, outputs: Path, *, vram: str = "auto"):
        self.models = models
        self.namer = OutputNamer(outputs)
        self.vram = vram
        self._placement = None
        self.running: Optional[Path] = None  # the final video path of the job being generated

    def __call__(self, job: Job) -> Iterator[Event]:
        from .events import JobCancelled
        from .memory import Placement, choose_vram_mode
        from .pipeline import generate, resume

        settings = job.request.settings
        # Loading blocks this (worker) thread, so its progress is posted to the job's stream directly.
        try:
            components = self.models.components(
                settings.model, notify=lambda message: job.post(Stage("loading", message)), cancel=job.cancel_token
            )
            job.cancel_token.check()
        except JobCancelled:
            yield Cancelled(video_path=None, frames=0)
            return
        if self._placement is None:
            self._placement = Placement(components.device, choose_vram_mode(self.vram, components.device))
        if job.request.resume is not None:
            output = Path(job.request.resume)
            remove_stale_files(output)
            self.running = output
            try:
                last = None
                for last in resume(components, output, cancel=job.cancel_token, placement=self._placement):
                    yield last
                if isinstance(last, Finished):
                    remove_stale_files(output, keep_latest_partial=False)
            finally:
                self.running = None
            return
        try:
            output = self.namer.next()
        except OSError as exc:
            raise ValueError(
                f"The outputs folder {self.namer.folder} can't be written ({exc.strerror or exc}); make sure it is a "
                "folder you may write to, or start the app with another --outputs folder."
            ) from None
        sources = self.models.sources()
        metadata = {
            "sources": {"hunyuan": str(sources.hunyuan), "siglip": str(sources.siglip),
                        "transformer": str(sources.transformer(settings.model))},
            "device": str(components.device),
            "vram_mode": self._placement.mode.value,
        }
        self.running = output
        try:
            yield from generate(components, settings, job.request.image, output, cancel=job.cancel_token,
                                placement=self._placement, metadata=metadata)
        finally:
            self.running = None


def remove_stale_files(output: Path, *, keep_latest_partial: bool = True) -> list[Path]:
    """Remove what a killed job left beside its files: hidden temporaries, the video writer's work
    folder and superseded partial videos.

    A job writes every file under a hidden temporary name and renames it into place, so a process
    killed mid-write leaves such a temporary (possibly short or empty) and, between two sections,
    two partial videos. Finished files (the sidecar, start image, latents, the newest partial) are
    kept unless `keep_latest_partial` is False (after the resumed job finished). A job that a
    process is generating right now is left alone: JobBusy.
    """
    output = Path(output)
    if joblock.is_running(output):  # its temporaries are live files of a job being generated
        raise joblock.JobBusy(joblock.busy_message(output))
    folder, stem = output.parent, output.name[: -len(output.suffix)] if output.suffix else output.name
    removed: list[Path] = []
    temporaries = [p for p in folder.glob(f".{glob_escape(stem)}.*") if p.name.endswith((".tmp", ".part", ".mp4"))]
    partials = sorted(folder.glob(f"{glob_escape(stem)}.part[0-9][0-9][0-9].mp4"))
    if keep_latest_partial:
        partials = partials[:-1]
    for path in temporaries + partials:
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    # the video writer's folder of encoded sections, named after the job's first partial video
    for work in folder.glob(f".{glob_escape(stem)}.part[0-9][0-9][0-9].mp4.segments-*"):
        if work.is_dir() and not work.is_symlink():
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


# ---------------------------------------------------------------------------------------------
# Past outputs, read back from the outputs folder

_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{3}(_\d+)?$")


@dataclass(frozen=True)
class PastOutput:
    """One job's files in the outputs folder, described by its JSON sidecar."""

    stem: str
    sidecar: Path
    video: Optional[Path]
    input_image: Optional[Path]
    status: str
    model: str
    settings: dict = field(default_factory=dict, compare=False)
    record: dict = field(default_factory=dict, compare=False, repr=False)
    latents: Optional[Path] = None
    running: bool = False  # a process (this one or another) is generating it now

    @property
    def resumable(self) -> bool:
        """Whether the job stopped early (ended, failed or killed) with finished sections to continue from."""
        finished = self.video is not None and self.video.name == f"{self.stem}.mp4"
        return self.status != "finished" and not finished and self.latents is not None and not self.running

    @property
    def label(self) -> str:
        """One line for a list: time, model, state, the start of the prompt."""
        return self.describe()

    def describe(self, running: bool = False) -> str:
        """The label; `running` says the job is being generated now (else a 'running' sidecar means it was interrupted)."""
        when = self.stem
        if _STAMP.match(self.stem):
            date, clock = self.stem.split("_", 1)
            when = f"{date} {clock[:8].replace('-', ':')}{clock[12:].replace('_', ' #')}"
        prompt = " ".join(str(self.settings.get("prompt", "")).split())
        if len(prompt) > 48:
            prompt = prompt[:47] + "…"
        if self.status == "finished":
            state = ""
        elif running or self.running:
            state = " [running]"
        else:
            kind = "interrupted" if self.status == "running" else self.status
            parts = ["partial"] if self.video else []
            parts += [kind] + (["can resume"] if self.resumable else [])
            state = f" [{', '.join(dict.fromkeys(parts))}]"
        return f"{when} · {display_name(self.model)}{state} · {prompt or '(no prompt)'}"


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every link followed, lies in `folder` (a link pointing outside does not)."""
    try:
        return path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        return False


def read_output(sidecar: Path) -> Optional[PastOutput]:
    """The PastOutput of a sidecar, or None when it is not one of ours or unreadable."""
    sidecar = Path(sidecar)
    folder = sidecar.parent

    def ours(path: Path) -> bool:
        # only plain files of this folder: a link pointing elsewhere is never read or shown
        return path.is_file() and _inside(path, folder)

    if not ours(sidecar):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return None
    stem = sidecar.name[: -len(".json")]
    video = folder / f"{stem}.mp4"
    if not ours(video):
        # An ended or interrupted job keeps its last partial video.
        parts = [p for p in sorted(folder.glob(f"{glob_escape(stem)}.part[0-9][0-9][0-9].mp4")) if ours(p)]
        video = parts[-1] if parts else None
    image = folder / f"{stem}.png"
    latents = folder / f"{stem}.latents.safetensors"
    return PastOutput(
        stem=stem, sidecar=sidecar, video=video, input_image=image if ours(image) else None,
        status=str(record.get("status", "unknown")), model=str(record.get("model", record["settings"].get("model", ""))),
        settings=dict(record["settings"]), record=record, latents=latents if ours(latents) else None,
        running=record.get("status") == "running" and joblock.is_running(folder / f"{stem}.mp4"),
    )


def list_outputs(folder: Path, limit: int = 200) -> list[PastOutput]:
    """The jobs in `folder`, newest first (timestamp names in reverse order, then others by age)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    sidecars = [p for p in folder.glob("*.json") if not p.name.startswith(".")]

    def key(path: Path) -> tuple:
        stem = path.name[: -len(".json")]
        if _STAMP.match(stem):
            date = stem[:23]
            suffix = int(stem[24:]) if len(stem) > 23 else 1
            return (1, date, suffix)
        try:
            return (0, path.stat().st_mtime, 0)
        except OSError:
            return (0, 0.0, 0)

    found = []
    for sidecar in sorted(sidecars, key=key, reverse=True):
        item = read_output(sidecar)
        if item is not None:
            found.append(item)
            if len(found) >= limit:
                break
    return found
