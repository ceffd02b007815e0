"""Every knob of a generation, its default and range, validated in one place; and the model sources."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

MODEL_VARIANTS = ("framepack", "f1")
SAMPLER_VARIANTS = ("bh1", "bh2")
# --attention: the transformer's attention kernel (see attention.py)
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "sage", "xformers")

# Official sources. Each may be replaced by a local folder with the same layout.
DEFAULT_HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
DEFAULT_SIGLIP = "lllyasviel/flux_redux_bfl"
DEFAULT_TRANSFORMERS = {
    "framepack": "lllyasviel/FramePackI2V_HY",
    "f1": "lllyasviel/FramePack_F1_I2V_HY_20250503",
}

VIDEO_FPS = 30


class SettingsError(ValueError):
    """A setting the user gave is invalid; the message says which and what is allowed."""


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric setting, and whether it must be a whole number."""

    low: float
    high: float
    integer: bool = False
    step: float | None = None


# The reference UI's ranges. The UI builds its sliders from this table, the CLI its checks.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1, integer=True),
    "seconds": Range(1, 120, step=0.1),
    "window": Range(1, 33, integer=True),
    "steps": Range(1, 100, integer=True),
    "distilled_cfg": Range(1.0, 32.0, step=0.01),
    "cfg": Range(1.0, 32.0, step=0.01),
    "cfg_rescale": Range(0.0, 1.0, step=0.01),
    "crf": Range(0, 100, integer=True),
    "resolution": Range(64, 1280, integer=True, step=16),
    "gpu_memory_preservation": Range(0.0, 128.0, step=0.1),
}


@dataclass(frozen=True)
class GenerationSettings:
    """One validated description of a generation job; the UI, the CLI and the API all build it."""

    prompt: str = ""
    negative_prompt: str = ""
    model: str = "framepack"
    seed: int = 31337
    seconds: float = 5.0
    window: int = 9
    steps: int = 25
    distilled_cfg: float = 10.0
    cfg: float = 1.0
    cfg_rescale: float = 0.0
    teacache: bool = True
    crf: int = 16
    resolution: int = 640
    sampler: str = "bh1"
    gpu_memory_preservation: float = 6.0

    def __post_init__(self) -> None:
        for name, rng in RANGES.items():
            object.__setattr__(self, name, _check_number(name, getattr(self, name), rng))
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise SettingsError(f"{name} must be text, not {type(value).__name__}.")
            object.__setattr__(self, name, value)
        if self.model not in MODEL_VARIANTS:
            raise SettingsError(f"model must be one of {', '.join(MODEL_VARIANTS)}, not {self.model!r}.")
        if self.sampler not in SAMPLER_VARIANTS:
            raise SettingsError(f"sampler must be one of {', '.join(SAMPLER_VARIANTS)}, not {self.sampler!r}.")
        if not isinstance(self.teacache, bool):
            raise SettingsError("teacache must be true or false.")

    @property
    def sections(self) -> int:
        """Number of sections: n = max(round(seconds * 30 / (window * 4)), 1), Python's round."""
        return int(max(round((self.seconds * VIDEO_FPS) / (self.window * 4)), 1))

    @property
    def total_latent_frames(self) -> int:
        """Latent frames of the finished video: every section's window plus the start latent."""
        return self.sections * self.window + 1

    @property
    def total_frames(self) -> int:
        """Pixel frames of the finished video (the VAE turns T latents into 4(T-1)+1 frames)."""
        return (self.total_latent_frames - 1) * 4 + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dictionary of every setting."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationSettings":
        """Build from a mapping, rejecting unknown keys with a clear message."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SettingsError(f"Unknown setting(s): {', '.join(unknown)}.")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with some settings changed, validated again."""
        return dataclasses.replace(self, **changes)


def _check_number(name: str, value: Any, rng: Range) -> int | float:
    if isinstance(value, bool) or value is None:
        raise SettingsError(f"{name} must be a number, not {value!r}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number, not {value!r}.") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, not {value!r}.") from None
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, not {value!r}.")
    if rng.integer:
        if number != int(number):
            raise SettingsError(f"{name} must be a whole number, not {value!r}.")
        number = int(number)
    if not (rng.low <= number <= rng.high):
        low = int(rng.low) if rng.integer else rng.low
        high = int(rng.high) if rng.integer else rng.high
        raise SettingsError(f"{name} must be between {low} and {high}, not {value!r}.")
    return number


@dataclass(frozen=True)
class ModelSources:
    """Where each component comes from: a model-hub repo id or a local folder with the same layout."""

    hunyuan: str = DEFAULT_HUNYUAN
    siglip: str = DEFAULT_SIGLIP
    transformers: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TRANSFORMERS))

    def transformer(self, model: str) -> str:
        """The transformer source for a model variant."""
        if model not in MODEL_VARIANTS:
            raise SettingsError(f"model must be one of {', '.join(MODEL_VARIANTS)}, not {model!r}.")
        return self.transformers.get(model, DEFAULT_TRANSFORMERS[model])

    def with_transformer(self, model: str, source: str) -> "ModelSources":
        """A copy whose transformer for `model` is `source`."""
        merged = dict(self.transformers)
        merged[model] = source
        return dataclasses.replace(self, transformers=merged)
