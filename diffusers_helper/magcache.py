"""MagCache step skipping for the FramePack transformer, as removable diffusers hooks.

MagCache (Zehong Ma, Longhui Wei, Feng Wang, Shiliang Zhang and Qi Tian, 2025, "MagCache: Fast
Video Generation with Magnitude-Aware Cache", arXiv:2506.09045) observes that the *magnitude
ratio* of the transformer's residual (what its blocks add to their input) between consecutive
sampling steps, gamma_t = mean over tokens of ||r_t|| / ||r_(t-1)||, follows a curve that depends
on the model and the schedule but hardly on the prompt or the image. Reusing the last computed
residual for step t instead of computing it makes an error that grows with |1 - prod gamma|; the
rule sums that estimate over consecutive skipped steps and skips while the sum stays under a
threshold, at most K steps in a row, never during the first `retention` fraction of the steps
(which fix the layout of the video), and never on the last step (ours; it sets the final
latents).

Because the decisions depend only on the ratio table, the whole schedule of a section is known
before it starts (`skip_schedule`, a pure function); the hooks only carry it out:

- ``transformer_blocks[0]`` (the head), on a skipped call, returns its input plus the residual of
  the last computed call of the same guidance branch, and every other block passes its inputs
  through; on a computed call the head remembers its input and the last block stores
  ``residual = output - input``;
- with real CFG (cfg > 1) the sampler calls the model twice per step (positive, then negative):
  both calls follow the step's decision and each branch keeps its own residual;
- in calibration mode nothing is skipped and the ratio of each step is measured instead (on the
  positive branch), to be saved with `save_calibration` and used by later runs.

Why not diffusers' `apply_mag_cache` (diffusers 0.42): it counts every transformer call as a
step, so with real CFG the ratio table is read at twice the pace and one residual is shared by the
positive and negative branch; it never forces the last step; its test is `error <= threshold`, so
a threshold of 0 still skips steps whose ratio is exactly 1; and calibration prints the ratios
instead of returning them. The hook structure below (head decides, the others follow, the tail
stores the residual) is the same as diffusers' and our TeaCache's.

Importing this module does no work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .hooks import StepCacheBlockHook, check_block_lists, check_steps
from .settings import MAGCACHE_CALIBRATION_KIND as CALIBRATION_KIND
from .settings import MAGCACHE_DEFAULT_MAX_SKIPS, MAGCACHE_DEFAULT_RETENTION, MAGCACHE_DEFAULT_THRESHOLD
from .settings import check_magcache_ratios as check_ratios
from .settings import load_magcache_ratios as load_ratios

__all__ = [
    "MagCache", "MagCacheSettings", "apply_magcache", "skip_schedule", "interpolate_ratios", "published_ratios",
    "save_calibration", "load_ratios", "PUBLISHED_RATIOS", "DEFAULT_THRESHOLD", "DEFAULT_MAX_SKIPS",
    "DEFAULT_RETENTION",
]

_HOOK_NAME = "framepack_magcache"

# The magnitude ratios gamma_t of the official FramePack and FramePack-F1 transformers for 25 UniPC
# steps (gamma_0 = 1: the first step has no earlier residual), as published by MagCache's authors
# in github.com/Zehong-Ma/MagCache, MagCache4FramePack/magcache_demo_gradio.py and
# magcache_demo_gradio_f1.py (commit 4ae8813, 22 June 2025). They were measured in bf16 on the
# reference FramePack code, whose transformer computes the same function as diffusers' (the
# golden tests check our latents against the reference), so they apply here unchanged.
PUBLISHED_STEPS = 25
PUBLISHED_RATIOS: dict[str, tuple[float, ...]] = {
    "framepack": (1.0, 1.26562, 1.23438, 1.03125, 1.02344, 1.03906, 1.01562, 1.03906, 1.05469, 1.02344, 1.03906,
                  0.99609, 1.03125, 1.02344, 1.01562, 1.02344, 1.00781, 1.04688, 0.98828, 1.0, 1.00781, 0.98828,
                  0.94141, 0.94141, 0.78906),
    "f1": (1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469, 0.99609, 1.03906, 1.00781,
           1.01562, 1.00781, 1.02344, 1.01562, 0.98047, 1.05469, 0.98047, 0.96875, 1.03125, 0.97266, 0.9375,
           0.96484, 0.78516),
}

# The authors' FramePack defaults (settings.py says where they come from), which GenerationSettings' fields share.
DEFAULT_THRESHOLD = MAGCACHE_DEFAULT_THRESHOLD
DEFAULT_MAX_SKIPS = MAGCACHE_DEFAULT_MAX_SKIPS
DEFAULT_RETENTION = MAGCACHE_DEFAULT_RETENTION

# The authors' FramePack code also refuses to skip a step whose own ratio departs from 1 by more
# than this, however small the accumulated error; with the published 25-step F1 ratios that keeps
# step 22 (gamma = 0.9375). A published constant of their FramePack rule, not a user setting.
MAX_STEP_DEVIATION = 0.06


# ---------------------------------------------------------------------------------------------
# The rule, as pure functions


def interpolate_ratios(ratios: Sequence[float], steps: int) -> tuple[float, ...]:
    """The ratio table for `steps` steps: linear interpolation over the normalised step position t/(n-1).

    MagCache's authors pick the nearest entry; ratios change smoothly from step to step, so a
    linear blend of the two nearest is at least as close. The first entry stays 1 (no earlier residual).
    """
    check_steps(steps, "steps")
    table = np.asarray([float(r) for r in ratios], dtype=np.float64)
    if table.size == steps:
        return tuple(float(r) for r in table)
    if table.size < 2:
        raise ValueError("A MagCache ratio table needs at least 2 entries to be stretched to another step count.")
    if steps == 1:
        return (1.0,)
    source = np.linspace(0.0, 1.0, table.size)
    target = np.linspace(0.0, 1.0, steps)
    out = np.interp(target, source, table)
    out[0] = 1.0
    return tuple(float(r) for r in out)


def published_ratios(model: str, steps: int) -> tuple[float, ...]:
    """The published ratio table of `model` ('framepack' or 'f1'), stretched to `steps` steps."""
    if model not in PUBLISHED_RATIOS:
        raise ValueError(f"No published MagCache ratios for model {model!r}; known: {', '.join(PUBLISHED_RATIOS)}.")
    return interpolate_ratios(PUBLISHED_RATIOS[model], steps)


def retained_steps(steps: int, retention: float) -> int:
    """How many leading steps are always computed: floor(retention * steps), and at least the first."""
    return max(1, int(retention * steps))


def skip_schedule(ratios: Sequence[float], *, threshold: float, max_skips: int, retention: float) -> tuple[bool, ...]:
    """Which steps MagCache (Ma et al., 2025) skips, one entry per step of `ratios`.

    After the retained steps, each step t multiplies the accumulated ratio by gamma_t and adds
    |1 - accumulated ratio| to the accumulated error; the step is skipped while that error is
    below `threshold`, at most `max_skips` steps follow each other skipped, and gamma_t itself is
    within MAX_STEP_DEVIATION of 1. A computed step starts the accumulation again. The last step
    is always computed, so a threshold of 0 computes every step.
    """
    steps = len(ratios)
    keep = retained_steps(steps, retention)
    schedule = []
    ratio, error, run = 1.0, 0.0, 0
    for t, gamma in enumerate(ratios):
        skip = False
        if keep <= t < steps - 1:
            ratio *= float(gamma)
            error += abs(1.0 - ratio)
            run += 1
            skip = error < threshold and run <= max_skips and abs(1.0 - float(gamma)) <= MAX_STEP_DEVIATION
        if not skip:
            ratio, error, run = 1.0, 0.0, 0
        schedule.append(skip)
    return tuple(schedule)


def magnitude_ratio(current: torch.Tensor, previous: torch.Tensor) -> float:
    """gamma = mean over tokens of ||r_t|| / ||r_(t-1)|| (the norm over the channels), in float32."""
    now = torch.linalg.vector_norm(current.float(), dim=-1)
    before = torch.linalg.vector_norm(previous.float(), dim=-1)
    return float((now / before.clamp_min(torch.finfo(torch.float32).tiny)).mean())


# ---------------------------------------------------------------------------------------------
# Settings and calibration files


@dataclass(frozen=True)
class MagCacheSettings:
    """What a MagCache run needs: the rule's parameters and the ratio table (any length; stretched to the steps)."""

    ratios: tuple[float, ...]
    threshold: float = DEFAULT_THRESHOLD
    max_skips: int = DEFAULT_MAX_SKIPS
    retention: float = DEFAULT_RETENTION
    calibrate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise ValueError(f"The MagCache threshold must be a number >= 0, not {self.threshold!r}.")
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ValueError(f"MagCache's K (most skips in a row) must be a whole number >= 0, not {self.max_skips!r}.")
        retention = self.retention
        if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0 <= retention <= 1:
            raise ValueError(f"The MagCache retention must be between 0 and 1, not {self.retention!r}.")

    @classmethod
    def from_generation(cls, settings) -> "MagCacheSettings":
        """From GenerationSettings: its own ratios when it has some, else the published ones of its model."""
        ratios = settings.magcache_ratios or PUBLISHED_RATIOS[settings.model]
        return cls(ratios=tuple(ratios), threshold=settings.magcache_threshold, max_skips=settings.magcache_k,
                   retention=settings.magcache_retention, calibrate=settings.magcache_calibrate)

    def schedule(self, steps: int) -> tuple[bool, ...]:
        """The skip schedule for one section of `steps` steps (nothing skipped when calibrating)."""
        if self.calibrate:
            return (False,) * steps
        return skip_schedule(interpolate_ratios(self.ratios, steps), threshold=self.threshold,
                             max_skips=self.max_skips, retention=self.retention)


def save_calibration(path: Path | str, ratios: Sequence[float], *, model: str, sections: Sequence[Sequence[float]],
                     settings: Optional[dict] = None) -> Path:
    """Write measured ratios (the mean over `sections`) to a new JSON file that `load_ratios` reads back."""
    from .outputs import atomic_write

    path = Path(path)
    data = {
        "kind": CALIBRATION_KIND,
        "method": "MagCache (Ma et al., 2025, arXiv:2506.09045): mean over tokens of ||r_t|| / ||r_(t-1)||",
        "model": model,
        "steps": len(ratios),
        "ratios": [float(r) for r in ratios],
        "sections": [[float(r) for r in section] for section in sections],
        "settings": dict(settings or {}),
    }
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The hooks


@dataclass
class _Branch:
    """What one guidance branch (positive or negative) keeps between its calls."""

    residual: Optional[torch.Tensor] = None
    hidden_in: Optional[torch.Tensor] = None


@dataclass
class _Calibration:
    """Ratios measured per section (each list starts with 1.0 for the first step)."""

    sections: list = field(default_factory=list)


class MagCache:
    """Handle for MagCache (Ma et al., 2025) hooks on a FramePack transformer: schedule, state, removal."""

    def __init__(self, transformer: torch.nn.Module, config: MagCacheSettings, num_steps: int,
                 calls_per_step: int = 1) -> None:
        if calls_per_step not in (1, 2):
            raise ValueError(f"calls_per_step must be 1 (no real CFG) or 2 (real CFG), not {calls_per_step!r}.")
        self.transformer = transformer
        self.config = config
        self.calls_per_step = calls_per_step
        self.enabled = True
        self._hooked: list = []
        self._head: Optional[torch.nn.Module] = None
        self._removed = False
        self.calibration = _Calibration()
        self.reset(num_steps)

    # -- state -------------------------------------------------------------------------------

    def reset(self, num_steps: Optional[int] = None) -> None:
        """Start a new run of `num_steps` sampling steps (one FramePack section): schedule, counters, residuals."""
        if num_steps is not None:
            self.num_steps = check_steps(num_steps)
            self.schedule = self.config.schedule(num_steps)
        self.calls = 0
        self.computed = 0
        self.skipped = 0
        self._branches = [_Branch() for _ in range(self.calls_per_step)]
        self._skipping = False
        self._branch = 0
        if self.config.calibrate:
            self.calibration.sections.append([])

    def _skips_call(self, call: int) -> bool:
        step, branch = divmod(call, self.calls_per_step)
        return (self.enabled and step < len(self.schedule) and self.schedule[step]
                and self._branches[branch].residual is not None)

    def skips_block(self, block: torch.nn.Module) -> bool:
        """Whether `block` is bypassed on the current call (a skipped step), so its weights are not needed.

        Read by weight streaming at a block's call. The head is asked before it decides, so for it
        the answer is about the call that is starting; the schedule makes that known in advance.
        """
        if not self.enabled or self._removed:
            return False
        if block is self._head:
            return self._skips_call(self.calls)
        return self._skipping

    @property
    def removed(self) -> bool:
        """Whether this MagCache (Ma et al., 2025) handle's hooks have been removed (or replaced)."""
        return self._removed

    def full_sections(self) -> list[list[float]]:
        """The calibration's sections that ran every step (a section ended early measured only some)."""
        return [s for s in self.calibration.sections if len(s) == self.num_steps]

    def calibrated_ratios(self) -> tuple[float, ...]:
        """The ratios measured so far: per step, the mean over the sections that ran every step."""
        full = self.full_sections()
        if not full:
            raise ValueError("No section ran all its steps, so no MagCache ratios were measured.")
        return tuple(float(np.mean(column)) for column in zip(*full))

    # -- per call ------------------------------------------------------------------------------

    def _start_call(self) -> bool:
        """Advance by one transformer call; returns whether its blocks are skipped."""
        skip = self._skips_call(self.calls)
        self._branch = self.calls % self.calls_per_step
        self.calls += 1
        self._skipping = skip
        if skip:
            self.skipped += 1
        else:
            self.computed += 1
        return skip

    def _store(self, hidden_out: torch.Tensor) -> None:
        branch = self._branches[self._branch]
        residual = hidden_out - branch.hidden_in
        branch.hidden_in = None
        if self.config.calibrate and self._branch == 0:
            previous = branch.residual
            ratio = 1.0 if previous is None or previous.shape != residual.shape else magnitude_ratio(residual, previous)
            self.calibration.sections[-1].append(ratio)
        branch.residual = residual

    # -- installation --------------------------------------------------------------------------

    def _install(self) -> None:
        self._head, self._hooked = _MagCacheBlockHook.install(self, self.transformer, _HOOK_NAME)

    def remove(self) -> None:
        """Remove the MagCache hooks, restoring the transformer's original behaviour."""
        if self._removed:
            return
        self._removed = True
        _MagCacheBlockHook.uninstall(self, self.transformer, self._hooked, _HOOK_NAME)
        self._hooked = []
        self._branches = [_Branch() for _ in range(self.calls_per_step)]

    def __repr__(self) -> str:
        return (f"MagCache(threshold={self.config.threshold}, K={self.config.max_skips}, "
                f"retention={self.config.retention}, num_steps={self.num_steps}, computed={self.computed}, "
                f"skipped={self.skipped}, calibrate={self.config.calibrate}, removed={self._removed})")


class _MagCacheBlockHook(StepCacheBlockHook):
    """Per-block hook: the head decides by the schedule, the others follow, the tail stores the residual."""

    def _head(self, module, hidden_states, args, kwargs):
        cache = self.cache
        skip = cache._start_call()
        branch = cache._branches[cache._branch]
        if skip:
            return branch.residual
        branch.hidden_in = hidden_states
        return None

    def _tail(self, hidden_out):
        self.cache._store(hidden_out)


def apply_magcache(transformer: torch.nn.Module, config: MagCacheSettings, num_steps: int, *,
                   calls_per_step: int = 1) -> MagCache:
    """Apply MagCache (Ma et al., 2025) to a FramePack transformer as removable hooks; replaces any earlier one.

    `calls_per_step` is 2 when the sampler calls the model twice per step (real CFG).
    """
    check_block_lists(transformer, "MagCache needs")
    if len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks) == 0:
        raise ValueError("MagCache needs at least one transformer block.")
    if not isinstance(config, MagCacheSettings):
        raise ValueError(f"config must be a MagCacheSettings, not {type(config).__name__}.")
    for old in _MagCacheBlockHook.caches_on(transformer, _HOOK_NAME):
        old.remove()
    cache = MagCache(transformer, config, num_steps, calls_per_step)
    cache._install()
    return cache
