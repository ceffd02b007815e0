"""Batches: many jobs at once, from a file (the `batch` command) or from the page's lists.

A batch file is a JSON list of objects or a CSV file with a header; each job's keys are `image`
(its start image; without one the job is text-to-video) and the names of `GenerationSettings`
(`prompt`, `model`, `seed`, `seconds`, ...). Relative image paths are relative to the file.
`read_batch` checks every job (its settings, its images) before anything is queued, and says
which job and which field is wrong on one line.

On the page, several images and/or prompts (one per line) and a number of videos per input make
every combination (`combinations`), each video with a seed from `seeds_for` (fixed, consecutive
or random).

Importing this module does no work.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .settings import GenerationSettings, SettingsError, parse_keyframe

# The keys a batch job may have: its start image and every setting.
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(GenerationSettings))
BATCH_KEYS = ("image", *SETTING_NAMES)
# Batches larger than this are refused (a mistake more often than not; split it into several files).
MAX_JOBS = 1000
SEED_MODES = ("fixed", "consecutive", "random")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class BatchJob:
    """One checked job of a batch: its settings and its start image (RGB uint8; None for text-to-video)."""

    settings: GenerationSettings
    image: Optional[np.ndarray] = None


class BatchError(ValueError):
    """A batch file or a job in it can't be used; the message names the job and the field."""


# ---------------------------------------------------------------------------------------------
# Files


def batch_key(path: Path | str) -> str:
    """What identifies a batch file's jobs in the queue: the SHA-256 of its path and content (running the same
    file again continues its jobs; an edited file is a new batch)."""
    path = Path(path).resolve()
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise BatchError(f"The batch file {path} can't be read ({exc.strerror or exc}).") from None
    return "file:" + hashlib.sha256(str(path).encode() + b"\0" + content).hexdigest()


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """The jobs of a .json or .csv batch file as raw dictionaries; BatchError when the file can't be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise BatchError(f"The batch file {path} can't be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError:
        raise BatchError(f"The batch file {path} is not UTF-8 text.") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BatchError(f"The batch file {path.name} is not valid JSON ({exc}).") from None
        if not isinstance(rows, list):
            raise BatchError(f"The batch file {path.name} must hold a JSON list of jobs (objects).")
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise BatchError(f"job {number}: must be an object of settings, not {type(row).__name__}.")
    elif suffix == ".csv":
        rows = _csv_rows(text, path.name)
    else:
        raise BatchError(f"The batch file must be a .json or .csv file, not {path.name}.")
    if not rows:
        raise BatchError(f"The batch file {path.name} holds no jobs.")
    if len(rows) > MAX_JOBS:
        raise BatchError(f"The batch file {path.name} holds {len(rows)} jobs; at most {MAX_JOBS} at once.")
    return rows


def _csv_rows(text: str, name: str) -> list[dict[str, Any]]:
    """A CSV file's rows by its header; empty cells are left out (the setting keeps its default)."""
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = []
        for number, row in enumerate(reader, 1):
            if None in row:
                raise BatchError(f"job {number}: has more cells than the header of {name} names.")
            rows.append({key.strip(): value for key, value in row.items() if key and value not in (None, "")})
    except csv.Error as exc:
        raise BatchError(f"The batch file {name} is not valid CSV ({exc}).") from None
    return rows


def read_batch(path: Path | str) -> list[BatchJob]:
    """Every job of a batch file, checked; BatchError naming the first wrong job and field."""
    path = Path(path)
    rows = read_rows(path)
    images: dict[Path, np.ndarray] = {}  # each start image is read once, however many jobs use it
    return [check_job(row, number, path.parent, images) for number, row in enumerate(rows, 1)]


# ---------------------------------------------------------------------------------------------
# One job


def check_job(row: dict[str, Any], number: int, folder: Path, images: Optional[dict] = None) -> BatchJob:
    """A batch job from its keys: settings and images checked, paths made relative to `folder`."""
    from .conditioning import load_image
    from .pipeline import check_images

    unknown = sorted(str(key) for key in row if key not in BATCH_KEYS)
    if unknown:
        raise BatchError(f"job {number}: unknown key {unknown[0]!r}; a job takes image and the settings: "
                         f"{', '.join(SETTING_NAMES)}.")
    values = {}
    for name, raw in row.items():
        if name == "image" or raw is None:
            continue
        try:
            values[name] = _value(name, raw, folder)
        except ValueError as exc:
            raise BatchError(f"job {number} ({name}): {exc}") from None
    image_path = row.get("image")
    if image_path is not None and not isinstance(image_path, str):
        raise BatchError(f"job {number} (image): must be a path, not {image_path!r}.")
    text_to_video = not image_path
    if values.get("text_to_video", text_to_video) != text_to_video:
        raise BatchError(f"job {number} (text_to_video): a job is text-to-video exactly when it has no image.")
    values["text_to_video"] = text_to_video
    settings = _settings(values, number)
    pixels = None
    if image_path:
        path = _resolve(image_path, folder)
        try:
            pixels = (images if images is not None else {}).get(path)
            if pixels is None:
                pixels = load_image(path)
                if images is not None:
                    images[path] = pixels
        except ValueError as exc:
            raise BatchError(f"job {number} (image): {exc}") from None
    try:
        check_images(settings, pixels)  # the end image and keyframes can be read
    except ValueError as exc:
        field = "end_image" if settings.end_image and "end image" in str(exc).lower() else "keyframes"
        raise BatchError(f"job {number} ({field}): {exc}") from None
    return BatchJob(settings, pixels)


def _settings(values: dict[str, Any], number: int) -> GenerationSettings:
    """GenerationSettings from a job's values; the error names the field that is wrong on its own, when one is."""
    try:
        return GenerationSettings(**values)
    except SettingsError as exc:
        for name, value in values.items():
            try:
                GenerationSettings(**{name: value, **({"model": values["model"]} if "model" in values else {})})
            except SettingsError:
                raise BatchError(f"job {number} ({name}): {exc}") from None
        raise BatchError(f"job {number}: {exc}") from None


def _value(name: str, raw: Any, folder: Path) -> Any:
    """A setting's value from a batch file: text from CSV (yes/no, lists separated by ';') or JSON values;
    the paths of the end image, keyframes and a MagCache ratios file made relative to `folder`."""
    meta = GenerationSettings.__dataclass_fields__[name]
    if meta.type in ("bool", bool) and isinstance(raw, str):
        text = raw.strip().lower()
        if text not in _TRUE + _FALSE:
            raise SettingsError(f"must be true or false, not {raw!r}.")
        raw = text in _TRUE
    item, parse = meta.metadata.get("item"), meta.metadata.get("parse")
    if parse is not None and isinstance(raw, str):
        return parse(str(_resolve(raw, folder)))
    if item is not None and isinstance(raw, str):
        raw = [part.strip() for part in raw.split(";") if part.strip()]
    if name == "end_image" and isinstance(raw, str) and raw.strip():
        return str(_resolve(raw, folder))
    if name == "keyframes" and isinstance(raw, (list, tuple)):
        keyframes = []
        for entry in raw:
            seconds, path = parse_keyframe(entry) if isinstance(entry, str) else _pair(entry)
            keyframes.append((seconds, str(_resolve(path, folder))))
        return tuple(keyframes)
    return raw


def _pair(entry: Any) -> tuple[Any, str]:
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[0], entry[1]
    raise SettingsError(f"A keyframe is [seconds, image] or \"T=PATH\", not {entry!r}.")


def _resolve(path: str, folder: Path) -> Path:
    """A path from a batch file: relative ones are relative to the file's folder."""
    path = Path(str(path).strip()).expanduser()
    return path if path.is_absolute() else folder / path


# ---------------------------------------------------------------------------------------------
# The page's batches


def seeds_for(mode: str, seed: int, count: int) -> list[int]:
    """`count` seeds: all `seed` (fixed), seed, seed+1, ... (consecutive) or drawn at random."""
    if mode not in SEED_MODES:
        raise SettingsError(f"seeds must be one of {', '.join(SEED_MODES)}, not {mode!r}.")
    if mode == "fixed":
        return [seed] * count
    if mode == "consecutive":
        return [seed + k for k in range(count)]
    return [secrets.randbelow(2**32) for _ in range(count)]


def prompts_from_lines(text: Optional[str]) -> list[str]:
    """The non-empty lines of a text, each a prompt."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def combinations(settings: GenerationSettings, images: Sequence[Optional[np.ndarray]], prompts: Sequence[str],
                 per_input: int, seeds: str) -> list[BatchJob]:
    """Every image × prompt, `per_input` videos each, with seeds by `seeds` (counted per image and prompt)."""
    prompts = list(prompts) or [settings.prompt]
    images = list(images) or [None]
    count = len(images) * len(prompts) * per_input
    if count > MAX_JOBS:
        raise SettingsError(f"That makes {count} videos; at most {MAX_JOBS} at once.")
    jobs = []
    for image in images:
        for prompt in prompts:
            for seed in seeds_for(seeds, settings.seed, per_input):
                jobs.append(BatchJob(settings.replace(prompt=prompt, seed=seed), image))
    return jobs
