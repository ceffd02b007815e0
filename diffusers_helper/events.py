"""Typed events that a generation yields; only the UI and the CLI turn them into text or HTML."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np


class JobCancelled(Exception):
    """Raised inside a job when its cancel token is set; the pipeline turns it into a Cancelled event."""


class CancelToken:
    """A thread-safe flag that a job checks at every sampling step and between stages."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the job to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise JobCancelled when cancel() was called."""
        if self._event.is_set():
            raise JobCancelled()


@dataclass(frozen=True)
class Stage:
    """The job entered a stage (loading, encoding the prompt, encoding the image, decoding ...)."""

    name: str
    message: str


@dataclass(frozen=True)
class StepProgress:
    """One sampling step finished; `preview` is a small uint8 RGB image (H, W, 3) of the denoised estimate."""

    step: int  # 1-based
    steps: int
    section: int  # 1-based
    sections: int
    frames_so_far: int
    preview: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @property
    def fraction(self) -> float:
        """Fraction of the whole job's sampling steps done."""
        return ((self.section - 1) * self.steps + self.step) / max(self.sections * self.steps, 1)


@dataclass(frozen=True)
class SectionDone:
    """A section was sampled, decoded and written; `video_path` plays the whole video so far."""

    section: int  # 1-based
    sections: int
    video_path: Path
    frames: int
    latent_frames: int

    @property
    def video_seconds(self) -> float:
        """Length of the video so far, in seconds at 30 fps."""
        return self.frames / 30.0


@dataclass(frozen=True)
class Finished:
    """The job finished; the video and (when asked for) the latents are on disk."""

    video_path: Path
    frames: int
    latents_path: Optional[Path] = None
    input_image_path: Optional[Path] = None


@dataclass(frozen=True)
class Failed:
    """The job stopped on an error; `message` says what went wrong and what to do."""

    message: str
    video_path: Optional[Path] = None


@dataclass(frozen=True)
class Cancelled:
    """The job was stopped by the user; `video_path` is the last complete partial video, if any."""

    video_path: Optional[Path] = None
    frames: int = 0


Event = Union[Stage, StepProgress, SectionDone, Finished, Failed, Cancelled]
