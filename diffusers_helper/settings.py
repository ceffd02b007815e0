"""Every knob of a generation, its default and range, validated in one place; and the model sources."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

MODEL_VARIANTS = ("framepack", "f1")
SAMPLER_VARIANTS = ("bh1", "bh2")
# --attention: the transformer's attention kernel (see attention.py)
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "sage", "xformers")
# --vram: how models are kept on the accelerator (see memory.py)
VRAM_CHOICES = ("auto", "high", "low")
# --cache: how sampling steps are skipped (none, teacache.py, magcache.py)
CACHE_CHOICES = ("none", "teacache", "magcache")

# Official sources. Each may be replaced by a local folder with the same layout.
DEFAULT_HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
DEFAULT_SIGLIP = "lllyasviel/flux_redux_bfl"
DEFAULT_TRANSFORMERS = {
    "framepack": "lllyasviel/FramePackI2V_HY",
    "f1": "lllyasviel/FramePack_F1_I2V_HY_20250503",
}

VIDEO_FPS = 30

# The plain start frame's colours for text-to-video (the page offers these; the CLI also takes #RRGGBB).
# MagCache's defaults: the authors' for FramePack ("E010K3R02" in their README and web UI): threshold 0.10, at
# most 3 skips in a row, the first 20% of the steps always computed. Their README measures a 5 s FramePack video
# on an L20 at 9 min plain, 4 min 40 s with TeaCache, 4 min 20 s with these.
MAGCACHE_DEFAULT_THRESHOLD = 0.10
MAGCACHE_DEFAULT_MAX_SKIPS = 3
MAGCACHE_DEFAULT_RETENTION = 0.2
START_COLORS = MappingProxyType({"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)})


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
            flag: bool | str = True, consts: Mapping[str, tuple[Any, str]] | None = None,
            parse: Any = None) -> Any:
    """A GenerationSettings field with what the front ends need to offer it: help, range, choices.

    The command line's flags and the page's sliders are built from these, so a new setting is one
    field here. `negative_help` is the help of a yes/no setting's `--no-...` flag. A setting that
    holds a tuple of items (given by a repeatable flag) names `item`: a function turning one flag
    value (text) into one item, raising ValueError with a message. `flag=False`: no command-line flag;
    a text: the flag's name (else `--name-with-dashes`). `consts`: more flags, each setting a fixed
    value, {flag: (value, help)}. `parse`: a function turning the flag's text into the value (ValueError
    with a message), e.g. reading a file.
    """
    return field(default=default, metadata={"help": help, "range": range, "choices": choices,
                                            "negative_help": negative_help, "item": item, "metavar": metavar,
                                            "flag": flag, "consts": consts, "parse": parse})


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
    cache: str = setting("teacache", "skip transformer work on steps that change little: none (compute every step), "
                                     "teacache (default) or magcache", choices=CACHE_CHOICES,
                         consts={"--teacache": ("teacache", "the same as --cache teacache"),
                                 "--no-teacache": ("none", "the same as --cache none")})
    crf: int = setting(16, "MP4 compression, lower is better quality", range=Range(0, 100, integer=True))
    resolution: int = setting(640, "bucket resolution", range=Range(64, 1280, integer=True, step=16))
    sampler: str = setting("bh1", "UniPC variant", choices=SAMPLER_VARIANTS)
    gpu_memory_preservation: float = setting(
        6.0, "GPU memory in GB kept free for the computation when models are streamed (low VRAM mode); "
             "raise it after an out-of-memory error", range=Range(0.0, 128.0, step=0.1))
    # -- creative control: end frame, keyframes, prompts over time, text-to-video ------------------
    end_image: Optional[str] = setting(None, "an image the video should end on (FramePack only)", metavar="PATH")
    end_strength: float = setting(1.0, "how strongly the video is pulled to the end image", range=Range(0.0, 1.0, step=0.01))
    keyframes: tuple = setting((), "an image the video passes through from T seconds on (0 < T < the length)",
                               item=lambda text: parse_keyframe(text), metavar="T=PATH", flag="--keyframe")
    prompt_blend: int = setting(0, "sections over which a timed prompt change is blended in", range=Range(0, 32, integer=True))
    text_to_video: bool = setting(False, "start from a plain frame instead of an image", flag=False)
    start_color: str = setting("black", "the plain start frame's colour for text-to-video: "
                                        f"{', '.join(START_COLORS)} or #RRGGBB", metavar="NAME|#RRGGBB")
    aspect: str = setting("16:9", "the video's aspect ratio for text-to-video, snapped to the nearest bucket",
                          metavar="W:H")
    # -- speed: MagCache's rule (Ma et al., 2025; defaults are the authors' for FramePack), fp8 weights --
    magcache_threshold: float = setting(MAGCACHE_DEFAULT_THRESHOLD, "MagCache: skip steps while the accumulated error stays under this; "
                                              "higher is faster, lower is closer", range=Range(0.0, 1.0, step=0.005))
    magcache_k: int = setting(MAGCACHE_DEFAULT_MAX_SKIPS, "MagCache: at most this many steps skipped in a row", range=Range(1, 10, integer=True))
    magcache_retention: float = setting(MAGCACHE_DEFAULT_RETENTION, "MagCache: the first fraction of the steps is always computed",
                                        range=Range(0.0, 1.0, step=0.01))
    magcache_ratios: tuple = setting((), "MagCache: the magnitude ratios measured by a calibration run (its "
                                         ".magcache.json file) instead of the published ones", metavar="FILE",
                                     parse=lambda text: load_magcache_ratios(text))
    magcache_calibrate: bool = setting(False, "measure MagCache's magnitude ratios for this model and these settings "
                                              "(every step computed) and save them beside the video",
                                  negative_help="do not measure MagCache's ratios (default)")
    fp8: bool = setting(False, "store the transformer's attention and MLP weights in 8 bits (fp8 e4m3): about a "
                               "third less memory and streaming, slightly different video", negative_help="keep the "
                               "transformer's weights in 16 bits")
    # -- LoRAs for the transformer (lora.py) --------------------------------------------------------
    loras: tuple = setting((), "a LoRA file for the transformer, with its weight (-2 to 2, default 1) after the last "
                               "colon", item=lambda text: parse_lora(text), metavar="PATH[:WEIGHT]", flag="--lora")

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
        self._check_speed()
        self._check_creative_control()
        object.__setattr__(self, "loras", checked_loras(self.loras))

    def _check_creative_control(self) -> None:
        """End frame, keyframes, timed prompts and the text-to-video frame: each input named when wrong."""
        if self.end_image in ("", None):
            object.__setattr__(self, "end_image", None)
        elif not isinstance(self.end_image, str):
            raise SettingsError(f"end_image must be a path, not {self.end_image!r}.")
        elif self.model != "framepack":
            raise SettingsError("An end image needs the FramePack model: FramePack-F1 generates forward from the "
                                "start image and has no end to anchor.")
        if not isinstance(self.text_to_video, bool):
            raise SettingsError("text_to_video must be true or false.")
        object.__setattr__(self, "start_color", color_rgb(self.start_color) and str(self.start_color).strip().lower())
        object.__setattr__(self, "aspect", aspect_ratio(self.aspect) and str(self.aspect).strip())
        object.__setattr__(self, "keyframes", self._checked_keyframes())
        for marker in parse_timed_prompt(self.prompt)[1]:
            if self.section_at(marker.start) >= self.sections:
                raise SettingsError(f"The prompt marker at {marker.start:g} s starts in section "
                                    f"{self.section_at(marker.start) + 1}, past the video's last "
                                    f"({self.sections}: {self.seconds:g} s, {self.section_seconds:.2f} s per section).")

    def _checked_keyframes(self) -> tuple:
        items = [parse_keyframe(k) if isinstance(k, str) else k for k in (self.keyframes or ())]
        keyframes = []
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[1], str) or not item[1]:
                raise SettingsError(f"A keyframe is a time and an image path, not {item!r}.")
            seconds = _check_number("keyframe time", item[0], Range(0, self.seconds))
            if not 0 < seconds < self.seconds:
                raise SettingsError(f"The keyframe at {seconds:g} s must be inside the video (0 < T < {self.seconds:g} s).")
            keyframes.append((float(seconds), item[1]))
        keyframes.sort(key=lambda k: k[0])
        sections = [self.section_at(t) for t, _ in keyframes]
        for (t, path), section in zip(keyframes, sections):
            if section >= self.sections:
                raise SettingsError(f"The keyframe at {t:g} s ({path}) starts in section {section + 1}, past the "
                                    f"video's last ({self.sections}: {self.section_seconds:.2f} s per section).")
        for (a, _), (b, _), sa, sb in zip(keyframes, keyframes[1:], sections, sections[1:]):
            if sa == sb:
                raise SettingsError(f"The keyframes at {a:g} s and {b:g} s fall in the same section ({sa + 1}); "
                                    f"each section is {self.section_seconds:.2f} s long.")
        return tuple(keyframes)

    def _check_speed(self) -> None:
        """The step cache and its MagCache parameters, fp8."""
        if isinstance(self.cache, bool):  # the setting's yes/no form before MagCache (API clients)
            object.__setattr__(self, "cache", "teacache" if self.cache else "none")
        if self.cache not in CACHE_CHOICES:
            raise SettingsError(f"cache must be one of {', '.join(CACHE_CHOICES)}, not {self.cache!r}.")
        for name in ("magcache_calibrate", "fp8"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be true or false.")
        ratios = self.magcache_ratios if self.magcache_ratios is not None else ()
        if isinstance(ratios, str) or not isinstance(ratios, (tuple, list)):
            raise SettingsError(f"magcache_ratios must be a list of numbers, not {ratios!r}.")
        object.__setattr__(self, "magcache_ratios", check_magcache_ratios(ratios) if ratios else ())
        if self.magcache_calibrate and self.cache != "magcache":
            raise SettingsError("magcache_calibrate measures MagCache's ratios: it needs cache magcache.")
        if self.magcache_calibrate and self.steps < 2:
            raise SettingsError("magcache_calibrate measures how each step's change compares with the step before: "
                                "it needs at least 2 steps.")

    @property
    def teacache(self) -> bool:
        """Whether TeaCache skips steps (cache == 'teacache'); the setting's name before MagCache."""
        return self.cache == "teacache"

    @property
    def section_seconds(self) -> float:
        """L = window·4/30: the length of video one section adds, in seconds."""
        return self.window * 4 / VIDEO_FPS

    def section_at(self, seconds: float) -> int:
        """The 0-based section (in time order) a marker at `seconds` applies from: round(T / L), Python's round."""
        return int(round(seconds / self.section_seconds))

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
        """Plain JSON-able dictionary of every setting (tuples as lists, as JSON gives them back)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore_unknown: bool = False) -> "GenerationSettings":
        """Build from a mapping, rejecting unknown keys with a clear message (or leaving them out); a record's
        old keys are understood."""
        data = _renamed(data)
        names = {f.name for f in dataclasses.fields(cls)}
        if ignore_unknown:
            data = {k: v for k, v in data.items() if k in names}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SettingsError(f"Unknown setting(s): {', '.join(unknown)}.")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with some settings changed, validated again (old names understood: teacache=False is cache='none')."""
        return dataclasses.replace(self, **_renamed(changes))


def _renamed(data: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as older versions recorded them, in today's names: `teacache: true/false` is `cache`."""
    data = dict(data)
    if "teacache" in data:
        old = data.pop("teacache")
        if not isinstance(old, bool):
            raise SettingsError("teacache must be true or false.")
        data.setdefault("cache", "teacache" if old else "none")
    return data


def check_magcache_ratios(ratios: Any) -> tuple[float, ...]:
    """A MagCache ratio table as a tuple of floats, each finite and above 0, at least two; SettingsError otherwise."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (tuple, list)):
        raise SettingsError(f"MagCache ratios must be a list of numbers, not {type(ratios).__name__}.")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise SettingsError(f"MagCache ratios must be finite numbers above 0; {r!r} is not.")
    if len(ratios) < 2:
        raise SettingsError(f"MagCache ratios need at least 2 steps, not {len(ratios)}.")
    return tuple(float(r) for r in ratios)


# What a MagCache calibration file says it is (magcache.save_calibration writes it).
MAGCACHE_CALIBRATION_KIND = "framepack-magcache-ratios"


def load_magcache_ratios(path: Any) -> tuple[float, ...]:
    """The ratio table of a MagCache calibration file (magcache.save_calibration); SettingsError says what is wrong."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"Can't read the MagCache ratios file {path}: {exc.strerror or exc}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SettingsError(f"{path} is not a MagCache ratios file (not JSON).") from None
    if not isinstance(data, dict) or data.get("kind") != MAGCACHE_CALIBRATION_KIND or "ratios" not in data:
        raise SettingsError(f"{path} is not a MagCache ratios file (write one with a calibration run).")
    try:
        return check_magcache_ratios(data["ratios"])
    except ValueError as exc:
        raise SettingsError(f"{path}: {exc}") from None


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
    # the VAE from elsewhere than hunyuan's vae/: one .safetensors file or a folder laid out like vae/
    vae: Optional[str] = None

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


# ---------------------------------------------------------------------------------------------
# Creative control: the values' own syntax


_HEX_COLOR = re.compile(r"^#([0-9a-fA-F]{6})$")
# [Ts: text] or [T1s-T2s: text]: a prompt from T (until T2) seconds
_MARKER = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*s\s*(?:-\s*(\d+(?:\.\d+)?)\s*s\s*)?:(.*?)\]", re.S)


def color_rgb(value: Any) -> tuple[int, int, int]:
    """The RGB of a start colour: a name from START_COLORS or #RRGGBB; SettingsError otherwise."""
    text = str(value or "").strip().lower()
    if text in START_COLORS:
        return START_COLORS[text]
    match = _HEX_COLOR.match(text)
    if not match:
        raise SettingsError(f"start_color must be one of {', '.join(START_COLORS)} or #RRGGBB, not {value!r}.")
    number = int(match.group(1), 16)
    return (number >> 16, (number >> 8) & 255, number & 255)


def aspect_ratio(value: Any) -> tuple[int, int]:
    """(W, H) of an aspect ratio written W:H with whole numbers, e.g. 16:9; SettingsError otherwise."""
    width, sep, height = str(value or "").strip().partition(":")
    if sep and width.strip().isdigit() and height.strip().isdigit() and int(width) > 0 and int(height) > 0:
        w, h = int(width), int(height)
        if max(w, h) / min(w, h) <= 8:
            return w, h
    raise SettingsError(f"aspect must look like W:H with whole numbers, e.g. 16:9 or 3:4 (at most 8:1), not {value!r}.")


def parse_keyframe(text: str) -> tuple[float, str]:
    """A keyframe flag `T=PATH` (seconds, path); the path may itself hold '='."""
    seconds, sep, path = str(text).partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = None
    if not sep or not path.strip() or value is None or not math.isfinite(value):
        raise SettingsError(f"A keyframe looks like T=PATH (seconds, then the image), e.g. 2.5=middle.png; not {text!r}.")
    return value, path.strip()


@dataclass(frozen=True)
class PromptMarker:
    """`[Ts: text]` (end None: until the next marker) or `[T1s-T2s: text]` (then the earlier prompt returns)."""

    start: float
    end: Optional[float]
    text: str


def parse_timed_prompt(prompt: str) -> tuple[str, tuple[PromptMarker, ...]]:
    """(the prompt from 0 s, its markers in order); a prompt without markers is returned whole."""
    markers, pieces, last = [], [], 0
    for match in _MARKER.finditer(prompt):
        pieces.append(prompt[last:match.start()])
        last = match.end()
        start = float(match.group(1))
        end = float(match.group(2)) if match.group(2) is not None else None
        text = match.group(3).strip()
        if end is not None and end <= start:
            raise SettingsError(f"The prompt marker [{match.group(1)}s-{match.group(2)}s: ...] ends before it starts.")
        markers.append(PromptMarker(start, end, text))
    if not markers:
        return prompt, ()
    pieces.append(prompt[last:])
    stray = " ".join(p.strip() for p in pieces[1:] if p.strip())
    if stray:
        raise SettingsError(f"Text outside the prompt markers after the first one ({stray[:40]!r}); put it inside a "
                            "[Ts: ...] marker, or before the first marker to apply it from 0 s.")
    return pieces[0].strip(), tuple(markers)


# ---------------------------------------------------------------------------------------------
# LoRAs: PATH[:WEIGHT]


LORA_WEIGHT = Range(-2.0, 2.0, step=0.05)


def parse_lora(text: Any) -> tuple[str, float]:
    """A LoRA flag `PATH[:WEIGHT]` as (path, weight): the weight is what follows the last colon when that is a
    number (so `C:\\loras\\x.safetensors` is a path), else the weight is 1."""
    text = str(text).strip()
    path, sep, tail = text.rpartition(":")
    if sep and path.strip():
        try:
            return path.strip(), float(tail)
        except ValueError:
            pass
    return text, 1.0


def checked_loras(items: Any) -> tuple[tuple[str, float], ...]:
    """LoRAs as ((path, weight), ...) from flags' text, pairs or JSON lists; SettingsError names a bad one."""
    if items is None:
        return ()
    if isinstance(items, (str, bytes)) or not isinstance(items, (tuple, list)):
        raise SettingsError(f"loras must be a list of (file, weight) pairs, not {items!r}.")
    checked, seen = [], set()
    for item in items:
        if isinstance(item, str):
            item = parse_lora(item)
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str) or not item[0].strip():
            raise SettingsError(f"A LoRA is a file and a weight, e.g. style.safetensors:0.8; not {item!r}.")
        path = item[0].strip()
        weight = float(_check_number(f"The weight of LoRA {path}", item[1], LORA_WEIGHT))
        key = os.path.normcase(os.path.normpath(path))
        if key in seen:
            raise SettingsError(f"LoRA {path} is listed twice; give it once, with the sum of the weights.")
        seen.add(key)
        checked.append((path, weight))
    return tuple(checked)
