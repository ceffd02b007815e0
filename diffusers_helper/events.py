"""Typed events that a generation yields; only the UI and the CLI turn them into text or HTML."""

from __future__ import annotations

import enum
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


class StageName(str, enum.Enum):
    """The stages of a job, in the order a job goes through them (sampling to writing once per section)."""

    LOADING = "loading"  # models being loaded (by the runtime, before the pipeline runs)
    TEXT = "text"  # encoding the prompts
    VAE_ENCODE = "vae_encode"  # the start image's latent
    IMAGE_ENCODER = "image_encoder"  # the start image's SigLIP embedding
    RESUMING = "resume"  # rebuilding what an interrupted job had finished
    EXTENDING = "extend"  # reading the video an extension continues into the new one
    SAMPLING = "sampling"
    VAE_DECODE = "vae_decode"
    WRITING = "writing"


@dataclass(frozen=True)
class Stage:
    """The job entered a stage; `message` says what it is doing in words."""

    name: StageName
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", StageName(self.name))


@dataclass(frozen=True)
class Notice:
    """Something the user should know about the result, e.g. that the prompt was cut; the job goes on."""

    message: str


class Advice(enum.Enum):
    """What a user can do about a failure. Each front end says it in its own words (a flag, a slider)."""

    CLOSE_GPU_PROGRAMS = "close other programs that use the GPU"
    LOW_VRAM_MODE = "stream the models (low VRAM mode)"
    PRESERVE_MORE_MEMORY = "keep more GPU memory free for the computation"
    SMALLER_JOB = "lower the resolution or the latent window"
    USE_CPU = "run on the CPU (very slow)"


class AdviceError(ValueError):
    """A user-facing error that comes with things to try; str() is only what happened."""

    def __init__(self, message: str, advice: tuple[Advice, ...] = ()):
        super().__init__(message)
        self.advice = tuple(advice)


def with_advice(message: str, advice: tuple[Advice, ...], wording: dict[Advice, str]) -> str:
    """`message` followed by one sentence of advice in a front end's `wording`."""
    if not advice:
        return message
    parts = [wording[a] for a in advice]
    if len(parts) == 1:
        listed = parts[0]
    elif len(parts) == 2:
        listed = f"{parts[0]} or {parts[1]}"
    else:
        listed = ", ".join(parts[:-1]) + ", or " + parts[-1]
    return f"{message} {listed[0].upper()}{listed[1:]}."


@dataclass(frozen=True)
class SectionStarted:
    """A section's sampling begins: what conditions it (its prompt, or the blend of two, and its anchor image)."""

    section: int  # 1-based, in the order of generation
    sections: int
    time_index: int  # 0-based place in the video's time order
    prompt: str
    anchor: str  # "start" or "keyframeN"
    anchor_seconds: Optional[float] = None  # a keyframe's time
    blend_from: Optional[str] = None  # while a prompt change is blended in: the prompt before it
    blend: float = 1.0  # the weight of `prompt`


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
    """The job stopped on an error; `message` says what went wrong, `advice` what the user can do."""

    message: str
    video_path: Optional[Path] = None
    advice: tuple[Advice, ...] = ()


@dataclass(frozen=True)
class Cancelled:
    """The job was stopped by the user; `video_path` is the last complete partial video, if any."""

    video_path: Optional[Path] = None
    frames: int = 0


Event = Union[Stage, Notice, SectionStarted, StepProgress, SectionDone, Finished, Failed, Cancelled]
