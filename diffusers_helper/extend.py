"""Extending a video: S more seconds after its end, of one of our videos or of any video.

`plan_extension` checks everything cheap (the file, the seconds, the settings, the output) and
decides how; `extend` runs the job (`ExtensionJob`, the section loop's recipe with a lead-in).

**Time.** An extension is the longer video's job: its settings are the whole video's, with
`seconds` = T + S, where T is the old video's length (ours: its `seconds` setting; any other video:
its frames at 30 fps / 30). Prompt markers and keyframe times count from the old video's start, as
they would in a job made that long in the first place. The old video fills the first
n0 = round(T·30/(4·window)) sections of that timeline; the new sections are the rest, up to the
longer video's round((T + S)·30/(4·window)). An S that adds no section is refused.

**Two ways.**

- *continue* (FramePack-F1 extending its own video, same window and size): exactly the longer job.
  The old sections' latents, random draws and video are rebuilt by the lead-in a resumed job uses
  (`_Job.replay`: the seed's first n0 draws are skipped, the saved latents are the history, their
  frames are decoded again), and the new sections follow. The result equals having generated the
  video S seconds longer in the first place. A new seed draws the new sections from its start.
- *anchored* (FramePack, any other video, or a change of window or size): a new generation after the
  old video. Its frames (re-timed to 30 fps, fitted to the size) are the new video's beginning,
  encoded as they are read. FramePack generates backwards towards its start latent, so the old
  video's last frame is that start latent (VAE-encoded alone, like a start image) and its SigLIP
  embedding; FramePack-F1 takes the old video's first frame as its start, like any F1 video, and the
  old video's last latents as its history. Where the new sections meet the old video, the old
  video's last window of latents is decoded together with the first new latents and the overlap
  cross-faded with the old frames, like any section boundary. The old latents come from its latents
  file (ours, at its own size) or from VAE-encoding only as many of its last frames as needed.

Importing this module does no work.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from . import footage
from .conditioning import find_nearest_bucket, frames_to_tensor, vae_decode, vae_encode
from .events import Event, Finished, StageName
from .footage import Footage
from .outputs import OutputPaths, read_output
from .packing import HISTORY_FRAMES, overlap_frames
from .pipeline import ResumeState, _Job, check_images, fresh_seed_at, generate, save_latents_file
from .sections import START, distinct_prompts, plan_sections
from .settings import RANGES, VIDEO_FPS, GenerationSettings, SettingsError

CONTINUE, ANCHORED = "continue", "anchored"
# The shortest and longest video a job makes (the `seconds` setting's range): the old video and S together.
MIN_SECONDS, MAX_SECONDS = RANGES["seconds"].low, RANGES["seconds"].high


@dataclass(frozen=True)
class Extension:
    """One checked extension: the video extended, the whole longer video's settings, and how it goes on."""

    video: Path  # never written
    seconds: float  # S, the seconds added
    settings: GenerationSettings  # the whole longer video's (seconds = old + S)
    mode: str  # CONTINUE or ANCHORED
    old_sections: int  # sections of the timeline the old video fills
    frames: int  # the old video's frames at 30 fps, the new video's first
    size: tuple[int, int]  # (height, width) of the new video
    fresh_seed: bool  # the new sections draw from the seed's start, not after the old sections' draws
    seed_start: int  # the section (in the order of generation) whose noise is the seed's first draw
    footage: Footage = field(repr=False)
    latents: Optional[Path] = None  # the old video's latents file (ours), else its frames are encoded
    start_image: Optional[Path] = None  # continue: the start image the old job saw (None: text-to-video)
    record: dict = field(default_factory=dict, repr=False)  # the old job's record (ours)
    loras_recorded: bool = False  # the LoRAs are the old job's (find them as a resumed job does)
    request: dict = field(default_factory=dict, repr=False)  # plan_extension(**request) plans it again

    @property
    def sections(self) -> int:
        """New sections."""
        return self.settings.sections - self.old_sections

    def to_record(self) -> dict[str, Any]:
        """What the new video's record says about the extension (`extends`)."""
        return {"video": self.video.name, "seconds": self.seconds, "mode": self.mode, "frames": self.frames,
                "sections": self.old_sections, "fresh_seed_at": self.seed_start}


def plan_extension(video: Path | str, seconds: Any, changes: Optional[Mapping[str, Any]] = None, *,
                   defaults: Optional[GenerationSettings | Mapping[str, Any]] = None,
                   fresh_seed: Optional[bool] = None) -> Extension:
    """Check an extension of `video` by `seconds` and decide how it goes; ValueError says what is wrong.

    `changes`: settings that differ from the video's own (ours) or from `defaults` (any other video;
    GenerationSettings' defaults when None). `fresh_seed`: the new sections draw from the seed's
    start (default: when `changes` names a seed, or the video is not ours). Nothing is written.
    """
    request = {"video": str(video), "seconds": seconds, "changes": dict(changes or {}),
               "defaults": defaults.to_dict() if isinstance(defaults, GenerationSettings) else defaults,
               "fresh_seed": fresh_seed}
    added = _added_seconds(seconds)
    source = footage.probe(video)
    ours = _our_job(source)
    changes = {k: v for k, v in (changes or {}).items() if k not in ("seconds", "text_to_video")}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(GenerationSettings)})
    if unknown:
        raise SettingsError(f"Unknown setting(s): {', '.join(unknown)}.")
    old_seconds = ours["settings"].seconds if ours else source.seconds
    total = round(old_seconds + added, 4)
    if total > MAX_SECONDS:
        raise SettingsError(f"The extended video would be {total:g} s long; at most {MAX_SECONDS:g} s (the video is "
                            f"{old_seconds:g} s, so at most {MAX_SECONDS - old_seconds:g} s more).")
    if total < MIN_SECONDS:
        raise SettingsError(f"The extended video would be {total:g} s long; a video is at least {MIN_SECONDS:g} s (the "
                            f"video is {old_seconds:g} s, so add at least {MIN_SECONDS - old_seconds:g} s).")
    settings = _whole_settings(ours, defaults, changes, total)
    mode, size, latents = _how(ours, source, settings)
    if mode == ANCHORED and settings.text_to_video:
        settings = settings.replace(text_to_video=False)
    old = ours["settings"] if mode == CONTINUE else None
    old_sections = old.sections if old else int(round(old_seconds * VIDEO_FPS / (4 * settings.window)))
    if settings.sections - old_sections < 1:
        least = (old_sections + 0.5) * settings.section_seconds - old_seconds
        raise SettingsError(f"Adding {added:g} s makes no new section: a section adds {settings.section_seconds:.2f} s "
                            f"(latent window {settings.window}); add more than {max(least, 0):.2f} s.")
    check_images(settings, None if settings.text_to_video else np.zeros((1, 1, 3), np.uint8))
    fresh = ("seed" in changes or ours is None) if fresh_seed is None else bool(fresh_seed)
    # going on with the old video's random sequence: where that sequence began (a fresh seed in an earlier extension)
    seed_start = old_sections if fresh else fresh_seed_at(ours["record"]) if ours else 0
    return Extension(
        video=source.path, seconds=added, settings=settings, mode=mode,
        old_sections=old_sections, frames=source.frames, size=size, fresh_seed=fresh, seed_start=seed_start,
        footage=source, latents=latents, start_image=ours["start_image"] if mode == CONTINUE else None,
        record=ours["record"] if ours else {}, loras_recorded=bool(ours) and "loras" not in changes,
        request=request)


def _added_seconds(seconds: Any) -> float:
    """S as a number above 0; SettingsError otherwise."""
    try:
        value = float(seconds.strip() if isinstance(seconds, str) else seconds)
    except (TypeError, ValueError, AttributeError):
        value = math.nan
    if isinstance(seconds, bool) or not math.isfinite(value) or value <= 0:
        raise SettingsError(f"The seconds to add must be a number above 0 (at most {MAX_SECONDS:g} in all), "
                            f"not {seconds!r}.")
    return value


def _our_job(source: Footage) -> Optional[dict]:
    """The finished job whose final video `source` is (record, settings with its images' paths, files), or None."""
    paths = OutputPaths(source.path)
    if paths.video.suffix.lower() != ".mp4" or not paths.sidecar.is_file() or not paths.latents.is_file():
        return None
    item = read_output(paths.sidecar)
    if item is None or item.status != "finished" or item.video is None or item.video.name != paths.video.name:
        return None
    try:
        settings = GenerationSettings.from_dict(item.settings, ignore_unknown=True)
        shape = _latents_shape(paths.latents)
    except (ValueError, OSError, KeyError):
        return None  # its record or latents are damaged: it is extended like any video
    folder = paths.folder

    def beside(name: Optional[str]) -> Optional[str]:
        return name if not name or Path(name).is_absolute() else str(folder / name)

    settings = settings.replace(end_image=beside(settings.end_image),
                                keyframes=tuple((t, beside(name)) for t, name in settings.keyframes))
    start = paths.input_image if paths.input_image.is_file() else None
    return {"record": item.record, "settings": settings, "latents": paths.latents, "shape": shape, "start_image": start}


def _latents_shape(path: Path) -> tuple[int, ...]:
    """The shape of a latents file's `history_latents`, read from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as tensors:
        return tuple(tensors.get_slice("history_latents").get_shape())


def _whole_settings(ours: Optional[dict], defaults, changes: dict, total: float) -> GenerationSettings:
    """The longer video's settings: the old job's (or `defaults`) with `changes`, `total` seconds long."""
    if ours:
        base = ours["settings"]
    elif isinstance(defaults, Mapping):
        base = GenerationSettings.from_dict(defaults)
    else:
        base = defaults or GenerationSettings()
    data = dict(changes, seconds=total)
    if not ours:
        data["text_to_video"] = False
    if data.get("model", base.model) != "framepack" and "end_image" not in changes:
        data["end_image"] = None  # the old job's end frame, which FramePack-F1 can't use
    return base.replace(**data)


def _how(ours: Optional[dict], source: Footage, settings: GenerationSettings):
    """(mode, the new video's (height, width), the old latents file or None) for an extension."""
    if ours is not None:
        old = ours["settings"]
        _, _, frames, latent_h, latent_w = ours["shape"]
        if (latent_h * 8, latent_w * 8) == (source.height, source.width) and settings.resolution == old.resolution:
            made_from_frames = (ours["record"].get("extends") or {}).get("mode") == ANCHORED
            exact = (old.model == settings.model == "f1" and settings.window == old.window and not made_from_frames
                     and frames == old.total_latent_frames
                     and (ours["start_image"] is not None or (old.text_to_video and settings.aspect == old.aspect)))
            return (CONTINUE if exact else ANCHORED), (source.height, source.width), ours["latents"]
    return ANCHORED, find_nearest_bucket(source.height, source.width, settings.resolution), None


def check_output(extension: Extension, output: Path | str, save_latents: Optional[Path | str] = None) -> Path:
    """The new video's path, refused when it is not an .mp4, is the video extended, or any file it names exists."""
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise ValueError(f"The output must be an .mp4 file, not '{output.name}'.")
    if _same_file(output, extension.video):
        raise ValueError(f"{output} is the video being extended; choose another name (the video is never changed).")
    paths = OutputPaths(output)
    clash = [p for p in paths.finished_files() + paths.image_copies(extension.settings) if p.exists()]
    clash += [Path(save_latents)] if save_latents and Path(save_latents).exists() else []
    if clash:
        raise ValueError(f"{clash[0]} already exists; choose another name (outputs are never overwritten).")
    return output


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def extend(components, extension: Extension, output: Path | str, **kwargs) -> Iterator[Event]:
    """Run an extension (plan_extension) into `output` and yield its events; the last is Finished, Failed or
    Cancelled. Keyword arguments as pipeline.generate's (cancel, placement, save_latents, metadata)."""
    return generate(components, extension.settings, None, output,
                    job_factory=lambda *args: ExtensionJob(extension, *args), **kwargs)


class ExtensionJob(_Job):
    """A job that goes on from a video: its frames, latents and random draws first, then the new sections."""

    def __init__(self, extension: Extension, *args):
        super().__init__(*args)
        self.x = extension
        self._old: Optional[torch.Tensor] = None  # anchored: the old video's latents, in time order
        self._joint = 0  # anchored: frames cross-faded where the new sections meet the old video

    def run(self, image, output: Path, save_latents, metadata: dict[str, Any], resume_state=None) -> Finished:
        """The recipe of the extension's way (continue or anchored)."""
        metadata = {**metadata, "extends": self.x.to_record()}
        if self.x.mode == CONTINUE:
            return self.run_continued(output, save_latents, metadata)
        return self.run_anchored(output, save_latents, metadata)

    def run_continued(self, output: Path, save_latents, metadata: dict[str, Any]) -> Finished:
        """FramePack-F1 going on with its own video: the longer job, its first sections rebuilt from their latents."""
        x, s = self.x, self.s
        # 1. Check inputs and claim the outputs (the start image is the one the old job saw)
        images = self.check_inputs(x.start_image, output, save_latents, resumed=False)
        self.check_machine(x.size, metadata, x.old_sections)
        plans = plan_sections(s, self.variant)
        new = plans[x.old_sections:]
        # 2.-4. Encode the new sections' prompts and the images; the start latent is the one the old job used
        prompts = self.encode_prompts(distinct_prompts(new))
        images = self.crop(images, x.size)
        encoded = self.encode_images(images, prompts, new, None)
        saved = _load_latents(x.latents)
        encoded.latents[START] = saved["start_latent"]
        # 5. The old sections: the same random draws, history and video as when they were made
        self.start_sections(encoded)
        state = ResumeState(self.paths.video, s, self._record, x.old_sections, saved["history_latents"],
                            saved["start_latent"])
        del saved
        self.replay(state, plans, x.size,
                    message=f"Rebuilding the {x.old_sections} sections of {x.video.name} from its latents")
        # 6. Sample, join, decode and write each new section
        for plan in new:
            self.run_section(plan, encoded, x.size)
        # 7. Put the finished files in place
        return self.finish(save_latents)

    def run_anchored(self, output: Path, save_latents, metadata: dict[str, Any]) -> Finished:
        """A new generation after the old video, anchored to its frames, with its latents as context."""
        x, s = self.x, self.s
        appends = self.variant.direction == "append"
        # 1. Check inputs and claim the outputs; the frame the new sections are anchored to
        self.stage(StageName.EXTENDING, f"Reading the end of {x.video.name}")
        # F1 starts from the video's first frame; FramePack is anchored to its last. The last frames are also
        # encoded when there is no latents file.
        first = footage.first_frame(x.footage, x.size) if appends else None
        tail = (footage.last_frames(x.footage, x.size, 1 if x.latents else 4 * self._latents_needed() - 3)
                if not (appends and x.latents) else [])
        images = self.check_inputs(first if appends else tail[-1], output, save_latents, resumed=False)
        self.check_machine(x.size, metadata, x.old_sections)
        plans = plan_sections(s, self.variant, done=x.old_sections)
        # 2.-4. Encode the prompts, the images (the anchor frame is the start image) and the old video's latents
        prompts = self.encode_prompts(distinct_prompts(plans))
        images = self.crop(images, x.size)
        encoded = self.encode_images(images, prompts, plans, None)
        old = self.old_latents(tail)
        del first, tail
        # 5. The old video's frames begin the new one; its latents are the context
        self.start_sections(encoded)
        self.begin_with_old_video(old)
        # 6. Sample, join, decode and write each new section (FramePack: back towards the old video, then join it)
        for plan in plans:
            self.run_section(plan, encoded, x.size)
        if not appends:
            self.join_old_video(encoded.latents)
        # 7. Put the finished files in place
        return self.finish(save_latents)

    # -- the old video ------------------------------------------------------------------------------

    def _latents_needed(self) -> int:
        """Latent frames of the old video an anchored extension uses: the F1 context's, and one window for the seam."""
        return max(HISTORY_FRAMES, self.s.window) if self.variant.direction == "append" else self.s.window

    def old_latents(self, tail: list[np.ndarray]) -> torch.Tensor:
        """The old video's latents: all of them from its file (ours), else VAE means of its last frames."""
        if self.x.latents is not None:
            return _load_latents(self.x.latents)["history_latents"]
        count = min(self._latents_needed(), (len(tail) - 1) // 4 + 1)
        frames = tail[len(tail) - (4 * (count - 1) + 1):]
        self.stage(StageName.VAE_ENCODE, f"Encoding the last {len(frames)} frames of {self.x.video.name}")
        pixels = frames_to_tensor(np.stack(frames))
        with self.placement.use(self.c.vae, tiling=True):
            latents = vae_encode(pixels, self.c.vae).float().cpu()
        self.cancel.check()
        return latents

    def begin_with_old_video(self, old: torch.Tensor) -> None:
        """The random draws up to the new sections, the old frames into the video writer, and (F1) the history."""
        x = self.x
        self._old = old
        self._joint = overlap_frames(min(self.s.window, old.shape[2]))
        for _ in range(max(x.old_sections - x.seed_start, 0)):
            self.draw_noise(x.size)
        self.stage(StageName.EXTENDING, f"Copying the {x.frames} frames of {x.video.name} into the new video")
        self._writer.add_prefix(self._checked(footage.frames(x.footage, x.size)), keep=self._joint,
                                beside=self.paths.video)
        if self.variant.direction == "append":
            self.history = self.variant.resume_history(old, self.history)
            self.generated_frames = int(old.shape[2])
            self.frames = self._writer.frames

    def _checked(self, frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """The frames, stopping at End between any two."""
        for frame in frames:
            self.cancel.check()
            yield frame

    def decode(self, real: torch.Tensor, plan, *, is_last: bool) -> tuple[torch.Tensor, int]:
        """As a job's, except where the new sections meet the old video: the old video's last window of latents
        is decoded with them, and its frames are the overlap."""
        if self.x.mode == CONTINUE:
            return super().decode(real, plan, is_last=is_last)
        window = self.s.window
        first = plan.index == self.x.old_sections
        appends = self.variant.direction == "append"
        # F1: the first new section is decoded as a later one is, with the old video's last window of latents (or
        # all of them when fewer), and the old video's frames are the overlap
        to_decode, overlap = self.variant.decode_window(real, window, first=first and not appends, is_last=is_last)
        if appends and first:
            overlap = self._joint
        elif not appends and is_last:
            # the start latent stands for the old video's last frame: its last latents are decoded in its place
            k = min(window, self._old.shape[2])
            to_decode = torch.cat([self._old[:, :, -k:], to_decode[:, :, 1:]], dim=2)
        with self.placement.use(self.c.vae, tiling=True):
            pixels = vae_decode(to_decode, self.c.vae).cpu()
        return pixels, overlap

    def next_overlap(self, plan) -> int:
        """FramePack, anchored: after its last section the old video's frames are cross-faded in."""
        if self.x.mode == ANCHORED and plan.is_last and self.variant.direction == "prepend":
            return self._joint
        return super().next_overlap(plan)

    def join_old_video(self, latents: dict[str, torch.Tensor]) -> None:
        """FramePack, anchored: the old video in front of the new sections, and the whole video's latents."""
        self.stage(StageName.WRITING, f"Joining the new sections to {self.x.video.name}")
        previous = self.latest_video
        self.latest_video = self._writer.join_prefix(self.paths.partial(self.s.sections + 1))
        self.frames = self._writer.frames
        if previous is not None and previous != self.latest_video:
            previous.unlink(missing_ok=True)
        real = self.variant.real_history(self.history, self.generated_frames)
        # the old latents, then the new ones without the start latent (the old video's last frame again)
        self.history = torch.cat([self._old, real[:, :, 1:]], dim=2)
        self.generated_frames = int(self.history.shape[2])
        save_latents_file(self.paths.latents, {"history_latents": self.history,
                                               **{f"{name}_latent": v for name, v in latents.items()}}, replace=True)
        self.write_record("running")


def _load_latents(path: Path) -> dict[str, torch.Tensor]:
    """A latents file's tensors (float32, CPU)."""
    from safetensors.torch import load_file

    return load_file(str(path))
