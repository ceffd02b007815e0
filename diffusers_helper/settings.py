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
# --vram: how models are kept on the accelerator (see memory.py)
VRAM_CHOICES = ("auto", "high", "low")

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


def setting(default: Any, help: str, *, range: Range | None = None, choices: tuple[str, ...] | None = None,
            negative_help: str | None = None, item: Any = None, metavar: str | None = None,
            flag: bool = True) -> Any:
    """A GenerationSettings field with what the front ends need to offer it: help, range, choices.

    The command line's flags and the page's sliders are built from these, so a new setting is one
    field here. `negative_help` is the help of a yes/no setting's `--no-...` flag. A setting that
    holds a tuple of items (given by a repeatable flag) names `item`: a function turning one flag
    value (text) into one item, raising ValueError with a message. `flag=False`: no command-line flag.
    """
    return field(default=default, metadata={"help": help, "range": range, "choices": choices,
                                            "negative_help": negative_help, "item": item, "metavar": metavar,
                                            "flag": flag})


@dataclass(frozen=True)
class GenerationSettings:
    """One validated description of a generation job; the UI, the CLI and the API all build it.

    The defaults and ranges are the reference UI's.
    """

    prompt: str = setting("", "what should happen in the video")
    negative_prompt: str = setting("", "what the video should avoid; used only when --cfg is above 1")
    model: str = setting("framepack", "framepack: generates the end of the video first (anti-drifting); "
                                      "f1: generates forward", choices=MODEL_VARIANTS)
    seed: int = setting(31337, "random seed: the same seed and settings give the same video",
                        range=Range(0, 2**63 - 1, integer=True))
    seconds: float = setting(5.0, "video length in seconds", range=Range(1, 120, step=0.1))
    window: int = setting(9, "latent window size", range=Range(1, 33, integer=True))
    steps: int = setting(25, "sampling steps per section", range=Range(1, 100, integer=True))
    distilled_cfg: float = setting(10.0, "distilled CFG scale", range=Range(1.0, 32.0, step=0.01))
    cfg: float = setting(1.0, "real CFG scale; above 1 doubles the cost", range=Range(1.0, 32.0, step=0.01))
    cfg_rescale: float = setting(0.0, "guidance rescale", range=Range(0.0, 1.0, step=0.01))
    teacache: bool = setting(True, "skip steps with TeaCache (default)", negative_help="compute every step")
    crf: int = setting(16, "MP4 compression, lower is better quality", range=Range(0, 100, integer=True))
    resolution: int = setting(640, "bucket resolution", range=Range(64, 1280, integer=True, step=16))
    sampler: str = setting("bh1", "UniPC variant", choices=SAMPLER_VARIANTS)
    gpu_memory_preservation: float = setting(
        6.0, "GPU memory in GB kept free for the computation when models are streamed (low VRAM mode); "
             "raise it after an out-of-memory error", range=Range(0.0, 128.0, step=0.1))

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


# The numeric settings' ranges, from the fields above. The page builds its sliders from this table,
# the command line its help.
RANGES: dict[str, Range] = {f.name: f.metadata["range"] for f in dataclasses.fields(GenerationSettings)
                            if f.metadata.get("range") is not None}


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
