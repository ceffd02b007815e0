"""The section loop of FramePack and FramePack-F1, as a generator of typed events.

A job is a numbered recipe (`_Job.run`): 1. check the inputs and claim the outputs, 2. encode the
prompts (each distinct one once), 3. bucket, resize and crop the start image, 4. encode it (VAE
latent and SigLIP embedding), 5. plan the sections, 6. sample, join, decode and write each section,
7. put the finished files in place. What differs between the models is asked of the variant
(`variants.py`); what conditions each section is read from its plan (`sections.py`). Resuming an
interrupted job is a lead-in: it reads back what the job had finished, replays its random draws
and video, and the same loop goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from . import __version__, outputs, video
from .conditioning import (
    encode_image,
    encode_prompt,
    find_nearest_bucket,
    image_to_tensor,
    load_image,
    resize_and_center_crop,
    vae_decode,
    vae_encode,
)
from .caches import calibration_path, save_calibration_for
from .events import (
    Advice,
    AdviceError,
    CancelToken,
    Cancelled,
    Event,
    Failed,
    Finished,
    JobCancelled,
    Notice,
    SectionDone,
    SectionStarted,
    Stage,
    StageName,
    StepProgress,
)
from .memory import GIB, Placement, VramMode, empty_cache, is_out_of_memory, ram_notice, release_host_memory, system_memory
from .outputs import OutputPaths, atomic_write, extends_anchored, write_json
from .packing import overlap_frames
from .sampling import flow_shift_mu, get_sigmas_flow_shift, sample_unipc
from .sections import START, SectionPlan, distinct_prompts, keyframe_name, plan_sections
from .settings import VIDEO_FPS, GenerationSettings, aspect_ratio, color_rgb
from .variants import Variant, variant

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
VAE_SPATIAL = 8
# The transformer's timestep and distilled-guidance inputs are scaled by 1000, as in training.
TIME_SCALE = 1000.0
# Keys of a job's record that describe how far it got; a resumed job starts from the rest.
_PROGRESS_KEYS = ("status", "sections_done", "frames", "elapsed_seconds", "video", "message")


# ---------------------------------------------------------------------------------------------
# Resuming


@dataclass(frozen=True)
class ResumeState:
    """What an interrupted job left on disk: enough to continue it after its last finished section."""

    output: Path
    settings: GenerationSettings
    record: dict
    sections_done: int
    history_latents: torch.Tensor  # the generated latents so far, in time order
    start_latent: torch.Tensor
    latents: dict = field(default_factory=dict)  # the end frame's and keyframes' latents, by name


def load_resume_state(output: Path | str) -> ResumeState:
    """Read an unfinished job's sidecar, cropped input and latents; ValueError when it can't be resumed."""
    from safetensors.torch import load_file

    paths = OutputPaths(Path(output))
    if paths.video.exists():
        raise ValueError(f"{paths.video.name} is already finished; there is nothing to resume.")
    if outputs.is_running(paths.video):
        raise outputs.JobBusy(outputs.busy_message(paths.video))
    for needed in (paths.sidecar, paths.latents):
        if not needed.exists():
            raise ValueError(f"Can't resume {paths.video.name}: {needed.name} is missing (the job stopped before its first section).")
    try:
        record = json.loads(paths.sidecar.read_text(encoding="utf-8"))
        settings = GenerationSettings.from_dict(record["settings"])
        tensors = load_file(str(paths.latents))
        history, start = tensors["history_latents"], tensors["start_latent"]
        latents = {name: tensors[f"{name}_latent"] for name in _anchor_names(settings)}
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"Can't resume {paths.video.name}: its files are damaged ({exc}).") from None
    if not settings.text_to_video and not paths.input_image.exists():
        raise ValueError(f"Can't resume {paths.video.name}: {paths.input_image.name} is missing.")
    # the latents are written before the video and the sidecar, so they say how far the job got
    done, rest = variant(settings.model).sections_in(history.shape[2], settings.window)
    if extends_anchored(record):
        raise ValueError(f"Can't resume {paths.video.name}: it extends another video from that video's frames; "
                         "extend that video again instead.")
    if rest or not 1 <= done < settings.sections:
        raise ValueError(f"Can't resume {paths.video.name}: its latents don't match its settings.")
    record = {k: v for k, v in record.items() if k not in _PROGRESS_KEYS}
    return ResumeState(paths.video, settings, record, done, history, start, latents)


def fresh_seed_at(record: dict) -> int:
    """The section (in the order of generation) whose noise is the seed's first draw: 0, or where an
    extension drew its new sections from a fresh seed (its record's `extends`)."""
    return int((record.get("extends") or {}).get("fresh_seed_at", 0))


def _anchor_names(settings: GenerationSettings) -> list[str]:
    """The latents besides the start's that a job keeps in its latents file: the end frame's, the keyframes'."""
    names = ["end"] if _uses_end_frame(settings) else []
    return names + [keyframe_name(n) for n in range(1, len(settings.keyframes) + 1)]


def _keyframe_seconds(settings: GenerationSettings, anchor: str) -> Optional[float]:
    """The time of the keyframe called `anchor` (None for the start image)."""
    for number, (seconds, _) in enumerate(settings.keyframes, 1):
        if keyframe_name(number) == anchor:
            return seconds
    return None


def _uses_end_frame(settings: GenerationSettings) -> bool:
    # strength 0 is exactly no end frame (not a zero latent in its place)
    return bool(settings.end_image) and settings.end_strength > 0


def resume(components, output: Path | str, *, state: Optional[ResumeState] = None, **kwargs) -> Iterator[Event]:
    """Continue an interrupted job from its last finished section; the result equals an uninterrupted run.

    `state` is what `load_resume_state(output)` returned, when the caller has read it already.
    """
    state = state or load_resume_state(output)
    image = None if state.settings.text_to_video else OutputPaths(state.output).input_image
    return generate(components, state.settings, image, state.output, resume_state=state, metadata=state.record,
                    **kwargs)


# ---------------------------------------------------------------------------------------------
# Running a job


def generate(
    components,
    settings: GenerationSettings,
    image,
    output: Path | str,
    *,
    cancel: Optional[CancelToken] = None,
    placement: Optional[Placement] = None,
    save_latents: Optional[Path | str] = None,
    metadata: Optional[dict[str, Any]] = None,
    resume_state: Optional[ResumeState] = None,
    job_factory: Optional[Callable[..., "_Job"]] = None,
) -> Iterator[Event]:
    """Run one job and yield its events; the last event is Finished, Failed or Cancelled.

    The job runs on a worker thread so that step progress streams while the sampler runs. Closing
    the generator early cancels the job and waits for it to stop. `job_factory` makes the job
    object (a `_Job` with another recipe, such as extend.ExtensionJob); default `_Job`.
    """
    cancel = cancel or CancelToken()
    events: "queue.Queue[Any]" = queue.Queue()
    done = object()

    def work() -> None:
        try:
            run_job(components, settings, image, output, emit=events.put, cancel=cancel,
                    placement=placement, save_latents=save_latents, metadata=metadata, resume_state=resume_state,
                    job_factory=job_factory)
        finally:
            events.put(done)

    thread = threading.Thread(target=work, name="framepack-job", daemon=True)
    thread.start()
    try:
        while True:
            event = events.get()
            if event is done:
                return
            yield event
    finally:
        if thread.is_alive():
            cancel.cancel()
        thread.join()


def run_job(
    components,
    settings: GenerationSettings,
    image,
    output: Path | str,
    *,
    emit: Callable[[Event], None],
    cancel: Optional[CancelToken] = None,
    placement: Optional[Placement] = None,
    save_latents: Optional[Path | str] = None,
    metadata: Optional[dict[str, Any]] = None,
    resume_state: Optional[ResumeState] = None,
    job_factory: Optional[Callable[..., "_Job"]] = None,
) -> None:
    """Run one job, calling `emit` with each event; ends with exactly one Finished, Failed or Cancelled."""
    cancel = cancel or CancelToken()
    placement = placement or Placement(components.device)
    job = (job_factory or _Job)(components, settings, placement, cancel, emit)
    try:
        emit(job.run(image, Path(output), save_latents, metadata or {}, resume_state))
    except JobCancelled:
        job.write_record("cancelled", quiet=True)
        emit(Cancelled(video_path=job.latest_video, frames=job.frames))
    except ValueError as exc:
        job.fail(str(exc), exc.advice if isinstance(exc, AdviceError) else ())
    except OSError as exc:
        # a full disk or an unwritable folder: the files written so far are complete (temp + rename)
        message = _write_failure(exc, Path(output))
        logger.warning("job stopped: %s (%s)", message, exc)
        job.fail(message)
    except Exception as exc:  # noqa: BLE001 - a job must end with an event, never kill the worker
        if is_out_of_memory(exc):
            job.fail("Out of memory; finished sections were kept.", _out_of_memory_advice(placement))
        else:
            logger.exception("generation failed")
            job.fail(f"Generation failed: {type(exc).__name__}: {exc}")
    finally:
        job.cleanup()


def _out_of_memory_advice(placement: Placement) -> tuple[Advice, ...]:
    """What helps after running out of GPU memory: streaming the models if they were all resident, else keeping more free."""
    streaming = placement.mode is VramMode.HIGH and placement.device.type != "cpu"
    return (Advice.CLOSE_GPU_PROGRAMS, Advice.LOW_VRAM_MODE if streaming else Advice.PRESERVE_MORE_MEMORY,
            Advice.SMALLER_JOB)


def _write_failure(exc: OSError, output: Path) -> str:
    """What to tell the user when writing a job's files failed."""
    folder = output.parent
    target = Path(exc.filename) if isinstance(exc.filename, (str, os.PathLike)) else None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"The disk holding {folder} is full. Free some space or choose another outputs folder; "
                "finished sections were kept.")
    if isinstance(exc, FileExistsError) and target is not None and target != folder and target not in folder.parents:
        return f"{target} already exists; outputs are never overwritten."
    reason = exc.strerror or str(exc) or type(exc).__name__
    return (f"Could not write to {folder}: {reason}. Check that the outputs folder exists and is writable, or "
            "choose another one; finished sections were kept.")


@dataclass
class _Encoded:
    """What a job's sections are conditioned on, by name (see sections.SectionPlan)."""

    latents: dict[str, torch.Tensor]  # image name -> VAE latent (float32, CPU)
    conditions: dict[tuple[str, str], tuple[dict, dict]]  # (prompt, image) -> (cond, uncond) transformer kwargs
    preview: "LatentPreview"


@dataclass
class _Images:
    """A job's images (RGB uint8, H×W×3): the start frame, the end frame, the keyframes in time order."""

    start: np.ndarray
    end: Optional[np.ndarray] = None
    keyframes: list = field(default_factory=list)
    synthetic: bool = False  # text-to-video: the start is a plain frame, never saved or shown
    use_end: bool = False  # the end frame conditions the job (an end image with strength above 0)
    cropped: bool = False  # already at the bucket's size (a resumed job's saved copies)

    @classmethod
    def read(cls, s: GenerationSettings, paths: OutputPaths, image, resumed: bool) -> "_Images":
        """The images a job starts from; a resumed one reads the copies it saved (already cropped)."""
        end, keyframes = None, []
        if s.end_image:
            end = _load_named("The end image", paths.end_image if resumed else s.end_image)
        for number, (seconds, path) in enumerate(s.keyframes, 1):
            keyframes.append(_load_named(f"The keyframe at {seconds:g} s", paths.keyframe(number) if resumed else path))
        if s.text_to_video:
            aspect_w, aspect_h = aspect_ratio(s.aspect)
            height, width = find_nearest_bucket(aspect_h, aspect_w, s.resolution)
            start = np.empty((height, width, 3), dtype=np.uint8)
            start[:] = color_rgb(s.start_color)
        else:
            start = load_image(paths.input_image if resumed else image)
        return cls(start, end, keyframes, synthetic=s.text_to_video, use_end=_uses_end_frame(s),
                   cropped=resumed or s.text_to_video)

    def bucket(self, s: GenerationSettings) -> tuple[int, int]:
        """The (height, width) every image is fitted to: the start image's nearest bucket."""
        return self.start.shape[:2] if self.cropped else find_nearest_bucket(*self.start.shape[:2], s.resolution)

    def map(self, fit: Callable[[np.ndarray], np.ndarray]) -> "_Images":
        """Every image passed through `fit` (a synthetic start is made at the bucket's size already)."""
        return _Images(self.start if self.synthetic else fit(self.start), None if self.end is None else fit(self.end),
                       [fit(k) for k in self.keyframes], self.synthetic, self.use_end, cropped=True)

    def others(self) -> list[tuple[str, np.ndarray]]:
        """(name, image) of the images besides the start whose latents condition the job."""
        named = [("end", self.end)] if self.use_end else []
        return named + [(keyframe_name(n), k) for n, k in enumerate(self.keyframes, 1)]

    def named_copies(self, paths: OutputPaths, s: GenerationSettings) -> list[tuple[Path, np.ndarray]]:
        """Where each image's copy goes beside the video (none for a synthetic start)."""
        copies = [] if self.synthetic else [(paths.input_image, self.start)]
        copies += [(paths.end_image, self.end)] if self.end is not None else []
        return copies + [(paths.keyframe(n), k) for n, k in enumerate(self.keyframes, 1)]


def check_images(settings: GenerationSettings, image) -> None:
    """Read every image a job would use (start, end, keyframes); ValueError naming the one that can't be used."""
    _Images.read(settings, OutputPaths(Path("check.mp4")), image, resumed=False)


def _recorded_settings(s: GenerationSettings, paths: OutputPaths) -> dict[str, Any]:
    """The settings as the job's record keeps them: its end image and keyframes are the copies beside the video
    (named relative to the outputs folder), so the record does not depend on files that may go away."""
    data = s.to_dict()
    if s.end_image:
        data["end_image"] = paths.end_image.name
    data["keyframes"] = [[t, paths.keyframe(n).name] for n, (t, _) in enumerate(s.keyframes, 1)]
    return data


def _load_named(what: str, source) -> np.ndarray:
    """load_image, with the input named in the message."""
    try:
        return load_image(source)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _blended(prompts: dict, plan: SectionPlan) -> tuple[Any, Any]:
    """A plan's (positive, negative) prompt embeddings; while a change is blended in, the mix of the two."""
    positive, negative = prompts[plan.prompt]
    if plan.blend_from is None:
        return positive, negative
    return prompts[plan.blend_from][0].mixed(positive, plan.blend), negative


class _Job:
    """State of one running generation; `run` is the recipe, each step a method."""

    def __init__(self, components, settings: GenerationSettings, placement: Placement, cancel: CancelToken, emit):
        self.c = components
        self.s = settings
        self.variant: Variant = variant(settings.model)
        self.placement = placement
        self.cancel = cancel
        self.emit = emit
        self.paths: Optional[OutputPaths] = None
        self.latest_video: Optional[Path] = None
        self.frames = 0
        self.sections_done = 0
        self.history: Optional[torch.Tensor] = None
        self.generated_frames = 0
        self._writer = None
        self._cache = None  # the step cache (TeaCache or MagCache), see caches.py
        self._record: Optional[dict[str, Any]] = None  # set once the job has a sidecar
        self._started: Optional[float] = None
        self._generator: Optional[torch.Generator] = None
        self._held = contextlib.ExitStack()  # the job's running lock, released after cleanup

    def run(self, image, output: Path, save_latents, metadata: dict[str, Any],
            resume_state: Optional[ResumeState] = None) -> Finished:
        """The recipe; a resumed job reads its start image and latent back instead of computing them."""
        s = self.s
        # 1. Check inputs and claim the outputs
        images = self.check_inputs(image, output, save_latents, resumed=resume_state is not None)
        bucket = images.bucket(s)
        self.check_machine(bucket, metadata, resume_state.sections_done if resume_state else 0)
        plans = plan_sections(s, self.variant)
        # 2. Encode the prompts
        prompts = self.encode_prompts(distinct_prompts(plans))
        # 3. Bucket, resize and crop (a resumed job reads back the crops it saved)
        images = images if resume_state else self.crop(images, bucket)
        # 4. Encode the images: VAE latents (start, end frame, keyframes), the start's SigLIP embedding
        encoded = self.encode_images(images, prompts, plans, resume_state)
        # 5. Start the sections: history, random numbers, video writer, step cache
        self.start_sections(encoded)
        if resume_state is not None:
            self.replay(resume_state, plans, bucket)
        # 6. Sample, join, decode and write each section
        for plan in plans[self.sections_done:]:
            self.run_section(plan, encoded, bucket)
        # 7. Put the finished files in place
        return self.finish(save_latents)

    # -- 1. inputs, outputs and the machine ---------------------------------------------------

    def check_inputs(self, image, output: Path, save_latents, *, resumed: bool) -> "_Images":
        """Refuse what cannot run before anything is written; take the job's running lock; read the images."""
        s = self.s
        if s.model != self.c.model:
            raise ValueError(f"The settings ask for model '{s.model}' but '{self.c.model}' is loaded.")
        _check_weight_storage(s, self.c.transformer)
        paths = OutputPaths(output)
        if paths.video.suffix.lower() != ".mp4":
            raise ValueError(f"The output must be an .mp4 file, not '{paths.video.name}'.")
        # a resumed job continues its own files; only its final video must not exist yet
        clash = [paths.video] if resumed else paths.finished_files() + paths.image_copies(s)
        clash += [Path(save_latents)] if save_latents else []
        clash += [calibration_path(paths.video)] if s.magcache_calibrate else []
        clash = [p for p in clash if p.exists()]
        if clash:
            raise ValueError(f"{clash[0]} already exists; choose another output name (outputs are never overwritten).")
        images = _Images.read(s, paths, image, resumed)
        paths.folder.mkdir(parents=True, exist_ok=True)
        # other windows and commands see the job as running, not interrupted, until it ends
        self._held.enter_context(outputs.hold(paths.video))
        self.paths = paths
        return images

    def check_machine(self, bucket: tuple[int, int], metadata: dict[str, Any], sections_done: int) -> None:
        """Can this machine run the job at all (GPU memory, RAM)? Then open the job's record."""
        needs = self.placement.check(self.c, self.s, *bucket)
        self._record = {**metadata, "software": f"framepack-independent {__version__}", "model": self.s.model,
                        "settings": _recorded_settings(self.s, self.paths)}
        self.sections_done = sections_done
        self.write_record("running")
        slow_ram = ram_notice(needs, system_memory()[0], self.placement.mode)
        if slow_ram:
            self.emit(Notice(slow_ram))

    # -- 2.-4. conditioning ---------------------------------------------------------------------

    def encode_prompts(self, texts: list[str]) -> dict[str, tuple[Any, Any]]:
        """Each prompt's (positive, negative) embeddings; the negative is encoded once, and only for real CFG."""
        c, s = self.c, self.s
        self.stage(StageName.TEXT, "Encoding the prompt")
        encoded = {}
        with self.placement.use(c.text_encoder, c.text_encoder_2):
            negative = None
            if s.cfg != 1:
                negative = encode_prompt(s.negative_prompt, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
            for text in texts:
                positive = encode_prompt(text, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
                encoded[text] = (positive, negative if negative is not None else positive.zeros_like())
        if any(positive.truncated for positive, _ in encoded.values()):
            self.emit(Notice("The prompt is longer than 256 tokens; the rest was cut off."))
        self.cancel.check()
        return encoded

    def crop(self, images: "_Images", bucket: tuple[int, int]) -> "_Images":
        """Every image resized and centre-cropped to the bucket, and saved beside the video as the model saw it."""
        height, width = bucket
        cropped = images.map(lambda pixels: resize_and_center_crop(pixels, width, height))
        for path, pixels in cropped.named_copies(self.paths, self.s):
            with atomic_write(path) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
        return cropped

    def encode_images(self, images: "_Images", prompts: dict, plans: list[SectionPlan],
                      resume_state: Optional[ResumeState]) -> _Encoded:
        """The images' latents, the start image's embedding, and the transformer's conditioning of every plan."""
        c, s = self.c, self.s
        if resume_state is None:
            self.stage(StageName.VAE_ENCODE, "Encoding the start image" + (" and the other images" if images.others() else ""))
            with self.placement.use(c.vae):
                latents = {name: vae_encode(image_to_tensor(pixels), c.vae).float().cpu()
                           for name, pixels in [(START, images.start), *images.others()]}
            if "end" in latents:
                latents["end"] = latents["end"] * s.end_strength
        else:
            latents = {START: resume_state.start_latent, **resume_state.latents}
        preview = LatentPreview.fit(latents[START], images.start)
        self.cancel.check()
        self.stage(StageName.IMAGE_ENCODER, "Encoding the image with SigLIP")
        with self.placement.use(c.image_encoder):
            embeddings = {START: encode_image(images.start, c.feature_extractor, c.image_encoder)}
        self.cancel.check()
        dtype, device = _compute_dtype(c.transformer), self.placement.device
        conditions = {}
        for plan in plans:
            if plan.conditioning_key not in conditions:
                positive, negative = _blended(prompts, plan)
                image_embeds = embeddings[plan.image]
                conditions[plan.conditioning_key] = (
                    _conditioning(positive, image_embeds, s.distilled_cfg, dtype, device),
                    _conditioning(negative, image_embeds, s.distilled_cfg, dtype, device))
        return _Encoded(latents=latents, conditions=conditions, preview=preview)

    # -- 5.-6. sections -------------------------------------------------------------------------

    def start_sections(self, encoded: _Encoded) -> None:
        """The history, the random numbers, the video writer and the step cache, as before the first section."""
        from .caches import apply_step_cache

        s = self.s
        self._generator = torch.Generator("cpu").manual_seed(s.seed)
        self.history = self.variant.initial_history(encoded.latents[START], encoded.latents.get("end"))
        self.generated_frames = self.variant.start_frames
        self._writer = video.SectionVideoWriter(
            direction=self.variant.direction, fps=VIDEO_FPS, crf=s.crf, work_prefix=self.paths.work_prefix,
            metadata={"comment": json.dumps(self._record, sort_keys=True)},
        )
        self._cache = apply_step_cache(self.c.transformer, s)
        self._started = time.monotonic()

    def draw_noise(self, size: tuple[int, int]) -> torch.Tensor:
        """The next section's starting noise (float32, CPU), from the job's seeded generator."""
        height, width = size
        shape = (1, LATENT_CHANNELS, self.s.window, height // VAE_SPATIAL, width // VAE_SPATIAL)
        return torch.randn(shape, generator=self._generator, dtype=torch.float32)

    def replay(self, state: ResumeState, plans: list[SectionPlan], size: tuple[int, int],
               message: Optional[str] = None) -> None:
        """Bring a resumed job to where it stopped: the same random draws, history and video pixels.

        The finished sections' video is rebuilt by decoding their saved latents again (decoding is
        deterministic and cheap next to sampling), so the video equals that of an uninterrupted run.
        """
        s, done = self.s, state.sections_done
        self.stage(StageName.RESUMING, message or f"Resuming after section {done} of {s.sections}")
        partial = self.paths.partial(done)
        self.latest_video = partial if partial.exists() else None
        for _ in range(done - fresh_seed_at(state.record)):
            self.draw_noise(size)
        saved = state.history_latents
        self.history = self.variant.resume_history(saved, self.history)
        for plan in plans[:done]:
            pixels, overlap = self.decode(self.variant.saved_after(saved, plan.index + 1, s.window), plan, is_last=False)
            self.cancel.check()
            # the writer always produces a playable file; these rebuilt ones are not needed
            scratch = self.paths.replay_scratch(plan.index + 1)
            try:
                self._writer.add_section(pixels, overlap, scratch, next_overlap=overlap_frames(s.window))
            finally:
                scratch.unlink(missing_ok=True)
        self.generated_frames = saved.shape[2]
        self.frames = self._writer.frames
        self.sections_done = done

    def run_section(self, plan: SectionPlan, encoded: _Encoded, size: tuple[int, int]) -> None:
        """Sample one section, join it to the history, save the latents, decode and write the video so far."""
        s = self.s
        self.cancel.check()
        section = plan.index + 1
        layout = self.variant.layout(self.history, s.window, plan.padding)
        noise = self.draw_noise(size)
        self.stage(StageName.SAMPLING, f"Sampling section {section} of {s.sections}")
        self.emit(SectionStarted(
            section=section, sections=s.sections, time_index=plan.time_index, prompt=plan.prompt, anchor=plan.anchor,
            anchor_seconds=_keyframe_seconds(s, plan.anchor), blend_from=plan.blend_from, blend=plan.blend))
        generated = self.sample(plan, layout, noise, encoded)
        # the layout's tensors are views into this history: drop them so that the old history is
        # freed as soon as the new, longer one exists (else two copies live through every decode)
        del layout
        self.history, added = self.variant.join(self.history, generated, start_latent=encoded.latents[START],
                                                is_last=plan.is_last)
        self.generated_frames += added
        real = self.variant.real_history(self.history, self.generated_frames)
        save_latents_file(self.paths.latents, {"history_latents": real,
                                               **{f"{name}_latent": v for name, v in encoded.latents.items()}},
                          replace=True)
        self.stage(StageName.VAE_DECODE, f"Decoding section {section} of {s.sections}")
        pixels, overlap = self.decode(real, plan, is_last=plan.is_last)
        del real
        self.cancel.check()
        self.write_section(plan, pixels, overlap)

    def sample(self, plan: SectionPlan, layout, noise: torch.Tensor, encoded: _Encoded) -> torch.Tensor:
        """Denoise one section's window with the transformer on the device; returns float32 latents on the CPU."""
        s, transformer = self.s, self.c.transformer
        cond, uncond = encoded.conditions[plan.conditioning_key]
        section = plan.index + 1

        def on_step(info: dict) -> None:
            self.emit(StepProgress(
                step=info["i"] + 1, steps=s.steps, section=section, sections=s.sections,
                frames_so_far=self.frames, preview=encoded.preview(info["denoised"]),
            ))
            self.cancel.check()

        skip = self._cache.skips_block if self._cache is not None else None
        with self.placement.use(transformer, preserve_bytes=s.gpu_memory_preservation * GIB, skip_block=skip):
            if self._cache is not None:
                self._cache.reset(s.steps)
            return sample_section(
                transformer, noise.to(self.placement.device), layout, encoded.latents[plan.anchor], cond, uncond, s,
                dtype=_compute_dtype(transformer), callback=on_step,
            ).float().cpu()

    def decode(self, real: torch.Tensor, plan: SectionPlan, *, is_last: bool) -> tuple[torch.Tensor, int]:
        """Pixels of the newest latents (with the VAE's context at the seam) and how many frames overlap the video."""
        first = plan.index == 0
        to_decode, overlap = self.variant.decode_window(real, self.s.window, first=first, is_last=is_last)
        with self.placement.use(self.c.vae, tiling=True):
            pixels = vae_decode(to_decode, self.c.vae).cpu()
        if self.s.text_to_video and self.variant.decodes_start_frame(first=first, is_last=is_last):
            pixels = pixels[:, :, 1:]  # the plain start frame is not part of the video
        return pixels, overlap

    def write_section(self, plan: SectionPlan, pixels: torch.Tensor, overlap: int) -> None:
        """Blend the section into the video and write a playable MP4 of everything so far; the previous one goes."""
        s, section = self.s, plan.index + 1
        self.stage(StageName.WRITING, f"Writing the video after section {section}")
        previous = self.latest_video
        next_overlap = self.next_overlap(plan)
        self.latest_video = self._writer.add_section(pixels, overlap, self.paths.partial(section),
                                                     next_overlap=next_overlap)
        self.frames = self._writer.frames
        self.sections_done = section
        if previous is not None and previous != self.latest_video:
            previous.unlink(missing_ok=True)
        self.write_record("running")
        del pixels
        release_host_memory()  # the section's buffers, so that memory stays flat over a long video
        self.emit(SectionDone(section=section, sections=s.sections, video_path=self.latest_video,
                              frames=self.frames, latent_frames=self.generated_frames))

    def next_overlap(self, plan: SectionPlan) -> int:
        """Video frames the section after `plan` will cross-fade with the video (none after the last)."""
        return 0 if plan.is_last else overlap_frames(self.s.window)

    # -- 7. finishing ---------------------------------------------------------------------------

    def finish(self, save_latents) -> Finished:
        """Move the last partial video to the final name, write the latents asked for, mark the job finished."""
        paths = self.paths
        try:
            outputs.publish(self.latest_video, paths.video)
        except FileExistsError:
            raise ValueError(f"{paths.video} appeared while the job ran; the video was kept as {self.latest_video}.") from None
        self.latest_video = paths.video
        latents_path = None
        if save_latents:
            latents_path = Path(save_latents)
            final = self.variant.real_history(self.history, self.generated_frames)
            save_latents_file(latents_path, {"history_latents": final}, replace=False)
        calibration = save_calibration_for(self._cache, paths.video, self.s)
        if calibration is not None:
            self.emit(Notice(f"MagCache's measured ratios were saved to {calibration}."))
        self.write_record("finished")
        return Finished(video_path=paths.video, frames=self.frames, latents_path=latents_path,
                        input_image_path=paths.input_image)

    # -- bookkeeping ------------------------------------------------------------------------------

    def stage(self, name: StageName, message: str) -> None:
        self.emit(Stage(name, message))

    def write_record(self, status: str, message: Optional[str] = None, *, quiet: bool = False) -> None:
        """Write the job's record (settings, sources, how far it got) into its sidecar, once it has one."""
        if self._record is None:
            return
        data = {**self._record, "status": status, "sections_done": self.sections_done, "frames": self.frames,
                "video": self.latest_video.name if self.latest_video else None}
        if self._started is not None:
            data["elapsed_seconds"] = round(time.monotonic() - self._started, 3)
        if message:
            data["message"] = message
        try:
            write_json(self.paths.sidecar, data)
        except OSError:
            if not quiet:
                raise
            logger.exception("could not update %s", self.paths.sidecar)

    def fail(self, message: str, advice: tuple[Advice, ...] = ()) -> None:
        """End the job with a Failed event; its record says why."""
        self.write_record("failed", message, quiet=True)
        self.emit(Failed(message, video_path=self.latest_video, advice=tuple(advice)))

    def cleanup(self) -> None:
        if self._cache is not None:
            self._cache.remove()
            self._cache = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        empty_cache(self.placement.device)
        self._held.close()


def sample_section(transformer, noise, layout, start_latent, cond, uncond, settings: GenerationSettings, *,
                   dtype, callback=None) -> torch.Tensor:
    """Denoise one section's window with UniPC; returns the final x̂₀ (float32)."""
    _, _, frames, latent_h, latent_w = noise.shape
    tokens = frames * latent_h * latent_w // 4  # after the transformer's 2×2 patchify
    device = noise.device
    sigmas = get_sigmas_flow_shift(settings.steps, flow_shift_mu(tokens)).to(device)
    context = section_context(layout, start_latent, dtype, device)
    positive, negative = {**cond, **context}, {**uncond, **context}

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return flow_x0(transformer, x, sigma, positive, negative, cfg=settings.cfg, rescale=settings.cfg_rescale, dtype=dtype)

    return sample_unipc(denoise, noise, sigmas, callback=callback, variant=settings.sampler)


def section_context(layout, start_latent: torch.Tensor, dtype, device) -> dict:
    """The packed history as the diffusers FramePack transformer's keyword arguments."""
    clean = torch.cat([start_latent.to(layout.clean_1x), layout.clean_1x], dim=2)
    return dict(
        indices_latents=layout.latent_indices.to(device),
        latents_clean=clean.to(device=device, dtype=dtype),
        indices_latents_clean=layout.clean_indices.to(device),
        latents_history_2x=layout.history_2x.to(device=device, dtype=dtype),
        indices_latents_history_2x=layout.indices_2x.to(device),
        latents_history_4x=layout.history_4x.to(device=device, dtype=dtype),
        indices_latents_history_4x=layout.indices_4x.to(device),
    )


def flow_x0(transformer, x, sigma, cond: dict, uncond: dict, *, cfg: float, rescale: float, dtype) -> torch.Tensor:
    """x̂₀ = x − σ·v from the transformer's velocity, with real CFG and guidance rescale.

    Like the reference, the latents and timestep are rounded to the transformer's dtype before the
    call, and x̂₀ is computed in float32 from the rounded latents.
    """
    sigma = sigma.float()
    x_in = x.to(dtype)
    timestep = (sigma * TIME_SCALE).to(dtype)
    v_pos = transformer(hidden_states=x_in, timestep=timestep, return_dict=False, **cond)[0].float()
    if cfg == 1:
        v = v_pos
    else:
        v_neg = transformer(hidden_states=x_in, timestep=timestep, return_dict=False, **uncond)[0].float()
        v = v_neg + cfg * (v_pos - v_neg)
    if rescale > 0:
        v = rescale_guidance(v, v_pos, rescale)
    return x_in.float() - v * sigma.view(-1, *([1] * (x.dim() - 1)))


def rescale_guidance(v_cfg: torch.Tensor, v_pos: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al., 2023): pull the CFG output's std back toward the conditional one's."""
    # diffusers' helper computes exactly this (same operations, same bits; tests/test_pipeline.py checks)
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    return rescale_noise_cfg(v_cfg, v_pos, guidance_rescale=rescale)


def _check_weight_storage(settings: GenerationSettings, transformer) -> None:
    """The loaded transformer's weights are stored as the settings say (fp8 or not); Runtime arranges that."""
    from .fp8 import fp8_applied

    if settings.fp8 != (fp8_applied(transformer) is not None):
        wanted, held = ("fp8", "full-precision") if settings.fp8 else ("full-precision", "fp8")
        raise ValueError(f"The settings ask for {wanted} transformer weights but the loaded transformer holds {held} ones.")


def _compute_dtype(transformer) -> torch.dtype:
    # proj_out may be kept in fp32; the blocks carry the compute dtype
    return next(transformer.transformer_blocks.parameters()).dtype


def _conditioning(prompt, image_embeds, distilled_cfg, dtype, device) -> dict:
    # the guidance value is rounded to the compute dtype like the latents (10·1000 becomes 9984 in bf16)
    guidance = torch.tensor([distilled_cfg * TIME_SCALE]).to(device=device, dtype=dtype)
    return dict(
        encoder_hidden_states=prompt.llama.to(device=device, dtype=dtype),
        encoder_attention_mask=prompt.mask.to(device),
        pooled_projections=prompt.pooled.to(device=device, dtype=dtype),
        image_embeds=image_embeds.to(device=device, dtype=dtype),
        guidance=guidance,
    )


class LatentPreview:
    """A cheap latent-to-RGB preview: a linear map fitted on the start image and its own latent."""

    def __init__(self, weights: np.ndarray):
        self.weights = weights  # (17, 3): 16 channels plus a bias

    @classmethod
    def fit(cls, latent: torch.Tensor, image: np.ndarray, ridge: float = 1e-2) -> "LatentPreview":
        """Least-squares fit of pixel colours (8×8 block means) from latent channels."""
        lat = latent[0, :, 0].double().numpy()  # (16, h, w)
        c, h, w = lat.shape
        blocks = image[: h * VAE_SPATIAL, : w * VAE_SPATIAL].astype(np.float64).reshape(h, VAE_SPATIAL, w, VAE_SPATIAL, 3).mean(axis=(1, 3))
        features = np.concatenate([lat.reshape(c, -1).T, np.ones((h * w, 1))], axis=1)
        target = blocks.reshape(-1, 3)
        gram = features.T @ features + ridge * np.eye(c + 1)
        return cls(np.linalg.solve(gram, features.T @ target))

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """(1, 16, T, h, w) latents → (h, T·w, 3) uint8 strip of frames."""
        lat = latents[0].detach().float().cpu().numpy()  # (16, T, h, w)
        c, t, h, w = lat.shape
        rgb = np.tensordot(lat.transpose(1, 2, 3, 0), self.weights[:c], axes=1) + self.weights[c]
        strip = rgb.transpose(1, 0, 2, 3).reshape(h, t * w, 3)
        return np.clip(strip, 0, 255).astype(np.uint8)


def save_latents_file(path: Path, tensors: dict[str, torch.Tensor], *, replace: bool) -> None:
    """Write latents as float32 safetensors in one step (`replace`: the job's own file, rewritten per section)."""
    with atomic_write(path, replace=replace) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
