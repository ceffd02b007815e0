"""The step cache of a job as one choice (`GenerationSettings.cache`): none, TeaCache or MagCache.

The pipeline asks this module for the cache a job's settings choose, resets it before every
section, hands its `skips_block` to weight streaming, and removes it when the job ends. A MagCache
calibration run's measured ratios are saved beside the video (`NAME.magcache.json`), where
`--magcache-ratios` reads them back.

Importing this module does no work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

__all__ = ["apply_step_cache", "calibration_path", "save_calibration_for"]

CALIBRATION_SUFFIX = ".magcache.json"


def apply_step_cache(transformer, settings) -> Optional[Any]:
    """The step cache `settings.cache` asks for, applied to `transformer` as removable hooks (None for 'none').

    The handle has `reset(steps)` (before each section), `skips_block(block)`, `computed`,
    `skipped` and `remove()`.
    """
    if settings.cache == "teacache":
        from .teacache import apply_teacache

        return apply_teacache(transformer, num_steps=settings.steps)
    if settings.cache == "magcache":
        from .magcache import MagCacheSettings, apply_magcache

        return apply_magcache(transformer, MagCacheSettings.from_generation(settings), settings.steps,
                              calls_per_step=calls_per_step(settings))
    return None


def calls_per_step(settings) -> int:
    """Transformer calls per sampling step: with real CFG (cfg > 1) the sampler calls it twice (positive, negative)."""
    return 1 if settings.cfg == 1 else 2


def calibration_path(video: Path | str) -> Path:
    """Where a calibration run beside `video` (NAME.mp4) saves its ratios: NAME.magcache.json."""
    return Path(video).with_suffix(CALIBRATION_SUFFIX)


def save_calibration_for(cache, video: Path | str, settings) -> Optional[Path]:
    """Save a MagCache calibration run's measured ratios beside its video; None when the job did not calibrate."""
    from .magcache import MagCache, save_calibration

    if not isinstance(cache, MagCache) or not cache.config.calibrate:
        return None
    ratios = cache.calibrated_ratios()
    sections = cache.full_sections()
    values = settings.to_dict()
    recorded = {k: values[k] for k in ("model", "steps", "window", "resolution", "cfg", "distilled_cfg", "sampler", "fp8")}
    return save_calibration(calibration_path(video), ratios, model=settings.model, sections=sections,
                            settings=recorded)
