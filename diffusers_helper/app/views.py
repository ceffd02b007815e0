"""What the page shows of a job: its progress bar, its videos as they appear, and its messages.

`ProgressView` turns a job's typed events into the progress area's HTML; `JobView` turns a batch
of events into updates of the page's outputs (latest video, preview, final video). The engine's
events say what happened; the words for what to do about a failure, in the page's terms (its
sliders, the app's flags), are chosen here.
"""

from __future__ import annotations

import html
import inspect
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional

import gradio as gr
import numpy as np

from ..events import (Advice, Cancelled, Failed, Finished, Notice, SectionDone, SectionStarted, Stage, StageName,
                      StepProgress, with_advice)
from ..jobs import Queued
from ..settings import VIDEO_FPS, GenerationSettings

# Largest preview height on the page; the latent preview is enlarged to about this many pixels.
PREVIEW_HEIGHT = 160

# What the page tells a user to do after a failure: its own controls, or the flags the app starts with.
ADVICE_WORDING: Mapping[Advice, str] = MappingProxyType({
    Advice.CLOSE_GPU_PROGRAMS: "close other programs that use the GPU",
    Advice.LOW_VRAM_MODE: "start the app in low-VRAM mode (--vram low, or --vram auto)",
    Advice.PRESERVE_MORE_MEMORY: "raise 'GPU Inference Preserved Memory'",
    Advice.SMALLER_JOB: "lower the resolution or the latent window",
    Advice.USE_CPU: "start the app on the CPU (--device cpu; very slow)",
})


def describe_failure(event: Failed) -> str:
    """A failed job's message with what to do, in the page's words."""
    return with_advice(event.message, event.advice, ADVICE_WORDING)


def describe_section(event: SectionStarted) -> str:
    """'Prompt: “…” · anchor: the start image' for the section being sampled (a blend names both prompts)."""
    prompt = f"“{_short(event.prompt)}”"
    if event.blend_from is not None:
        prompt = f"“{_short(event.blend_from)}” → {prompt} ({event.blend:.0%})"
    anchor = "the start image"
    if event.anchor != "start":
        number = event.anchor.removeprefix("keyframe")
        anchor = f"keyframe {number}" + (f" ({event.anchor_seconds:g} s)" if event.anchor_seconds is not None else "")
    return f"Prompt: {prompt} · anchor: {anchor}"


def _short(text: str, length: int = 60) -> str:
    text = " ".join(text.split()) or "(no prompt)"
    return text if len(text) <= length else text[: length - 1] + "…"


class ProgressView:
    """What one job has done so far, and its progress bar as HTML."""

    def __init__(self, settings: GenerationSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.state = "queued"
        self.message = "Waiting to start"
        self.position: Optional[int] = None
        self.step: Optional[StepProgress] = None
        self.frames = 0
        self.sampling_started: Optional[float] = None
        self.notices: list[str] = []  # things the user should know about the result (a cut prompt)
        self.section: Optional[str] = None  # what conditions the section being sampled

    def update(self, event) -> None:
        """Take one event of the job into account."""
        if isinstance(event, Queued):
            self.state, self.position = "queued", event.position
            if event.ahead == 0:
                self.message = "Starting"
            else:
                jobs = f"{event.ahead} job{'s' if event.ahead != 1 else ''}"
                self.message = f"Waiting in the queue: position {event.position}, {jobs} ahead of this one"
        elif isinstance(event, Notice):
            if event.message not in self.notices:
                self.notices.append(event.message)
        elif isinstance(event, Stage):
            self.state = "loading" if event.name is StageName.LOADING else "running"
            self.message = event.message
            if event.name is StageName.SAMPLING and self.sampling_started is None:
                self.sampling_started = self.clock()
        elif isinstance(event, SectionStarted):
            self.section = describe_section(event)
        elif isinstance(event, StepProgress):
            self.state = "running"
            self.step = event
            self.frames = event.frames_so_far
        elif isinstance(event, SectionDone):
            self.frames = event.frames
        elif isinstance(event, Finished):
            self.state, self.frames = "finished", event.frames
            self.message = f"Finished: {event.frames} frames ({event.frames / VIDEO_FPS:.2f} s) saved as {Path(event.video_path).name}"
        elif isinstance(event, Cancelled):
            self.state, self.frames = "cancelled", event.frames
            kept = f"; the {event.frames} finished frames were kept as {Path(event.video_path).name}" if event.video_path else ""
            self.message = f"Stopped{kept}."
        elif isinstance(event, Failed):
            self.state, self.message = "failed", describe_failure(event)

    @property
    def fraction(self) -> float:
        """Share of the job's sampling done (1 when finished)."""
        if self.state == "finished":
            return 1.0
        return self.step.fraction if self.step is not None else 0.0

    def seconds_left(self) -> Optional[float]:
        """Estimated seconds to go, from the pace since sampling began (decoding included)."""
        if self.step is None or self.sampling_started is None or self.state != "running":
            return None
        done = self.fraction
        if done <= 0:
            return None
        elapsed = self.clock() - self.sampling_started
        return elapsed * (1 - done) / done

    def html(self) -> str:
        """The progress bar with its text."""
        s = self.settings
        percent = 100.0 * self.fraction
        parts = []
        if self.step is not None and self.state in ("running", "cancelled", "failed"):
            parts.append(f"Section {self.step.section} of {self.step.sections}")
            parts.append(f"step {self.step.step} of {self.step.steps}")
        elif self.state == "finished":
            parts.append(f"{s.sections} of {s.sections} sections")
        parts.append(f"{self.frames} frames ({self.frames / VIDEO_FPS:.2f} s of video) so far"
                     if self.state != "finished" else f"{self.frames} frames ({self.frames / VIDEO_FPS:.2f} s of video)")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"about {format_duration(left)} left")
        elif self.state == "running":
            parts.append("estimating time left")
        detail = " · ".join(parts)
        step = self.step
        data = (
            f'data-state="{self.state}" data-percent="{percent:.1f}" data-frames="{self.frames}" '
            f'data-step="{step.step if step else 0}" data-section="{step.section if step else 0}" '
            f'data-position="{self.position or 0}"'
        )
        colour = {"failed": "#dc2626", "cancelled": "#a3a3a3", "finished": "#16a34a"}.get(self.state, "#f97316")
        return (
            f'<div class="fp-progress" {data}>'
            f'<div class="fp-progress-message" style="font-weight:600;margin-bottom:4px">{html.escape(self.message)}</div>'
            f'<div role="progressbar" aria-label="Generation progress" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{percent:.0f}" style="height:12px;border-radius:6px;background:rgba(127,127,127,.25);overflow:hidden">'
            f'<div class="fp-progress-fill" style="width:{percent:.1f}%;height:100%;background:{colour};transition:width .3s"></div>'
            f"</div>"
            f'<div class="fp-progress-detail" style="margin-top:4px;font-size:.9em;opacity:.85">{html.escape(detail)}</div>'
            + (f'<div class="fp-progress-section" style="margin-top:4px;font-size:.9em">{html.escape(self.section)}</div>'
               if self.section and self.state == "running" else "")
            + "".join(f'<div class="fp-progress-notice" style="margin-top:4px;font-size:.9em">Note: {html.escape(n)}</div>'
                      for n in self.notices)
            + "</div>"
        )


def idle_html(message: str = "Upload an image, write a prompt and press Start Generation.") -> str:
    """The progress area before any job."""
    return f'<div class="fp-progress" data-state="idle"><div class="fp-progress-message">{html.escape(message)}</div></div>'


def format_duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def enlarge_preview(preview: np.ndarray, height: int = PREVIEW_HEIGHT) -> np.ndarray:
    """Blow a small latent preview up by a whole factor (nearest neighbour), to about `height` rows."""
    factor = max(1, height // max(preview.shape[0], 1))
    return np.repeat(np.repeat(preview, factor, axis=0), factor, axis=1)


class VideoSnapshots:
    """Links of the partial videos a page shows, in a temporary folder of the app.

    The pipeline deletes a section's partial MP4 once the next one is written; the page copies a
    video only after the handler yields it, so it gets a link made the moment the event arrives.
    """

    def __init__(self) -> None:
        self._folder: Optional[Path] = None
        self._lock = threading.Lock()
        self._count = 0

    def take(self, video: Path) -> Optional[Path]:
        """A private link (or copy) of `video`, or None when it is already gone."""
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="framepack-app-"))
                # removed at the latest when the app exits
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
            self._count += 1
            target = self._folder / f"{self._count:06d}-{Path(video).name}"
        try:
            os.link(video, target)
        except FileNotFoundError:
            return None
        except OSError:
            try:
                shutil.copyfile(video, target)
            except FileNotFoundError:
                return None
        return target

    @staticmethod
    def drop(path: Optional[Path]) -> None:
        """Remove a link once the page has its copy."""
        if path is not None:
            Path(path).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder."""
        if self._folder is not None:
            self._cleanup()
            self._folder = None


class JobView:
    """One page's view of its job: turns batches of events into updates of the page's outputs."""

    def __init__(self, settings: GenerationSettings, snapshots: VideoSnapshots):
        self.progress = ProgressView(settings)
        self.snapshots = snapshots
        self.ended = False
        self.failure: Optional[str] = None
        self._showing: Optional[Path] = None  # link of the partial video on the page
        self._stale: list[Path] = []

    def take(self, events) -> tuple[Any, Any, Any]:
        """(latest video, preview, final video) updates for a batch of events; gr.skip() where unchanged."""
        latest: Any = gr.skip()
        picture: Any = gr.skip()
        final: Any = gr.skip()
        self.failure = None
        for event in events:
            self.progress.update(event)
            if isinstance(event, StepProgress) and event.preview is not None:
                picture = enlarge_preview(event.preview)
            elif isinstance(event, Notice):
                gr.Info(event.message)
            elif isinstance(event, SectionDone):
                link = self.snapshots.take(event.video_path)
                if link is not None:
                    if self._showing is not None:
                        self._stale.append(self._showing)
                    self._showing = link
                    latest = str(link)
            elif isinstance(event, (Finished, Cancelled, Failed)):
                self.ended = True
                if isinstance(event, Failed):
                    self.failure = describe_failure(event)
                if event.video_path is not None:
                    latest = final = str(event.video_path)
        return latest, picture, final

    def shown(self) -> None:
        """The page has copied what was yielded: links it no longer shows can go."""
        for path in self._stale:
            self.snapshots.drop(path)
        self._stale.clear()

    def close(self) -> None:
        """Remove every link of this job."""
        self.shown()
        self.snapshots.drop(self._showing)
        self._showing = None


def with_endpoint_signature(call: Callable, names: Iterable[str]) -> Callable:
    """`call(*inputs, request)` as Gradio and API clients see it: one parameter per input name, each defaulting to
    None (a client may leave any input out, one the page shows empty such as an image too), then the request,
    which Gradio finds by its type hint."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    call.__signature__ = inspect.Signature(
        [inspect.Parameter(name, kind, default=None) for name in names]
        + [inspect.Parameter("request", kind, default=None, annotation=gr.Request)])
    call.__annotations__ = {"request": gr.Request}
    return call
