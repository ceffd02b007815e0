"""The section loop of FramePack and FramePack-F1, as a generator of typed events."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from . import __version__, joblock
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
from .events import (
    CancelToken,
    Cancelled,
    Event,
    Failed,
    Finished,
    JobCancelled,
    SectionDone,
    Stage,
    StepProgress,
)
from .memory import (GIB, Placement, VramMode, empty_cache, is_out_of_memory, ram_notice, release_host_memory,
                     system_memory)
from .packing import add_to_history, initial_history, latents_to_decode, layout_for, plan_sections, real_history
from .sampling import flow_shift_mu, get_sigmas_flow_shift, sample_unipc
from .settings import VIDEO_FPS, GenerationSettings

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
VAE_SPATIAL = 8
# The transformer's timestep and distilled-guidance inputs are scaled by 1000, as in training.
TIME_SCALE = 1000.0


@dataclass(frozen=True)
class OutputPaths:
    """Every file a job writes, derived from the final video's path."""

    video: Path

    @property
    def stem(self) -> Path:
        return self.video.with_suffix("")

    @property
    def input_image(self) -> Path:
        return Path(f"{self.stem}.png")

    @property
    def sidecar(self) -> Path:
        return Path(f"{self.stem}.json")

    @property
    def latents(self) -> Path:
        return Path(f"{self.stem}.latents.safetensors")

    def partial(self, section: int) -> Path:
        """The playable video of everything up to 1-based section `section`."""
        return Path(f"{self.stem}.part{section:03d}.mp4")

    def existing(self) -> list[Path]:
        """The paths of this job that already exist (a job never overwrites them)."""
        return [p for p in (self.video, self.input_image, self.sidecar, self.latents) if p.exists()]


@dataclass(frozen=True)
class ResumeState:
    """What an interrupted job left on disk: enough to continue it after its last finished section."""

    output: Path
    settings: GenerationSettings
    record: dict
    sections_done: int
    history_latents: torch.Tensor  # the generated latents so far, in time order
    start_latent: torch.Tensor


def load_resume_state(output: Path | str) -> ResumeState:
    """Read an unfinished job's sidecar, cropped input and latents; ValueError when it can't be resumed."""
    from safetensors.torch import load_file

    paths = OutputPaths(Path(output))
    if paths.video.exists():
        raise ValueError(f"{paths.video.name} is already finished; there is nothing to resume.")
    if joblock.is_running(paths.video):
        raise joblock.JobBusy(joblock.busy_message(paths.video))
    for needed in (paths.sidecar, paths.input_image, paths.latents):
        if not needed.exists():
            raise ValueError(f"Can't resume {paths.video.name}: {needed.name} is missing (the job stopped before its first section).")
    try:
        record = json.loads(paths.sidecar.read_text(encoding="utf-8"))
        settings = GenerationSettings.from_dict(record["settings"])
        tensors = load_file(str(paths.latents))
        history, start = tensors["history_latents"], tensors["start_latent"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"Can't resume {paths.video.name}: its files are damaged ({exc}).") from None
    # the latents are written before the video and the sidecar, so they say how far the job got
    generated = history.shape[2] - (1 if settings.model == "f1" else 0)
    done, rest = divmod(generated, settings.window)
    if rest or not 1 <= done < settings.sections:
        raise ValueError(f"Can't resume {paths.video.name}: its latents don't match its settings.")
    record = {k: v for k, v in record.items() if k not in _PROGRESS_KEYS}
    return ResumeState(paths.video, settings, record, done, history, start)


_PROGRESS_KEYS = ("status", "sections_done", "frames", "elapsed_seconds", "video", "message")


def resume(components, output: Path | str, **kwargs) -> Iterator[Event]:
    """Continue an interrupted job from its last finished section; the result equals an uninterrupted run."""
    state = load_resume_state(output)
    return generate(components, state.settings, OutputPaths(state.output).input_image, state.output,
                    resume_state=state, metadata=state.record, **kwargs)


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
) -> Iterator[Event]:
    """Run one job and yield its events; the last event is Finished, Failed or Cancelled.

    The job runs on a worker thread so that step progress streams while the sampler runs. Closing
    the generator early cancels the job and waits for it to stop.
    """
    cancel = cancel or CancelToken()
    events: "queue.Queue[Any]" = queue.Queue()
    done = object()

    def work() -> None:
        try:
            run_job(components, settings, image, output, emit=events.put, cancel=cancel,
                    placement=placement, save_latents=save_latents, metadata=metadata, resume_state=resume_state)
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
) -> None:
    """Run one job, calling `emit` with each event; ends with exactly one Finished, Failed or Cancelled."""
    cancel = cancel or CancelToken()
    placement = placement or Placement(components.device)
    job = _Job(components, settings, placement, cancel, emit)
    try:
        emit(job.run(image, Path(output), save_latents, metadata or {}, resume_state))
    except JobCancelled:
        job.record_status("cancelled")
        emit(Cancelled(video_path=job.latest_video, frames=job.frames))
    except ValueError as exc:
        job.record_status("failed", str(exc))
        emit(Failed(str(exc), video_path=job.latest_video))
    except OSError as exc:
        # a full disk or an unwritable folder: the files written so far are complete (temp + rename)
        message = _write_failure(exc, Path(output))
        logger.warning("job stopped: %s (%s)", message, exc)
        job.record_status("failed", message)
        emit(Failed(message, video_path=job.latest_video))
    except Exception as exc:  # noqa: BLE001 - a job must end with an event, never kill the worker
        if is_out_of_memory(exc):
            if placement.mode is VramMode.HIGH and placement.device.type != "cpu":
                advice = "use low-VRAM mode (--vram low), lower the resolution or the latent window"
            else:
                advice = "raise 'GPU Inference Preserved Memory', lower the resolution or the latent window"
            message = (f"Out of memory. Close other programs using the GPU, {advice}; "
                       "finished sections were kept.")
        else:
            logger.exception("generation failed")
            message = f"Generation failed: {type(exc).__name__}: {exc}"
        job.record_status("failed", message)
        emit(Failed(message, video_path=job.latest_video))
    finally:
        job.cleanup()


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


class _Job:
    """State of one running generation."""

    def __init__(self, components, settings: GenerationSettings, placement: Placement, cancel: CancelToken, emit):
        self.c = components
        self.s = settings
        self.placement = placement
        self.cancel = cancel
        self.emit = emit
        self.latest_video: Optional[Path] = None
        self.frames = 0
        self.sections_done = 0
        self._writer = None
        self._teacache = None
        self._sidecar: Optional[Path] = None
        self._record: dict[str, Any] = {}
        self._held = contextlib.ExitStack()  # the job's running lock, released after cleanup

    def record_status(self, status: str, message: Optional[str] = None) -> None:
        """Write how the job ended into its sidecar, once the job has one."""
        if self._sidecar is None:
            return
        data = {**self._record, "status": status, "sections_done": self.sections_done, "frames": self.frames,
                "video": self.latest_video.name if self.latest_video else None}
        if message:
            data["message"] = message
        try:
            _write_json(self._sidecar, data)
        except OSError:
            logger.exception("could not update %s", self._sidecar)

    def cleanup(self) -> None:
        if self._teacache is not None:
            self._teacache.remove()
            self._teacache = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        empty_cache(self.placement.device)
        self._held.close()

    def run(self, image, output: Path, save_latents, metadata: dict[str, Any],
            resume_state: Optional[ResumeState] = None) -> Finished:
        from .teacache import apply_teacache
        from .video import SectionVideoWriter

        s, c = self.s, self.c
        model = c.model
        if s.model != model:
            raise ValueError(f"The settings ask for model '{s.model}' but '{model}' is loaded.")

        # 1. Check inputs
        paths = OutputPaths(output)
        if paths.video.suffix.lower() != ".mp4":
            raise ValueError(f"The output must be an .mp4 file, not '{paths.video.name}'.")
        clash = [paths.video] if resume_state else paths.existing()
        clash = [p for p in clash if p.exists()]
        clash += [Path(save_latents)] if save_latents and Path(save_latents).exists() else []
        if clash:
            raise ValueError(f"{clash[0]} already exists; choose another output name (outputs are never overwritten).")
        pixels_in = load_image(image)
        paths.video.parent.mkdir(parents=True, exist_ok=True)
        # other windows and commands see the job as running, not interrupted, until it ends
        self._held.enter_context(joblock.hold(paths.video))
        device = self.placement.device
        transformer = c.transformer
        dtype = _compute_dtype(transformer)
        # before any work: can this machine run the job at all (free GPU memory, RAM)?
        bucket = pixels_in.shape[:2] if resume_state else find_nearest_bucket(*pixels_in.shape[:2], s.resolution)
        needs = self.placement.check(c, s, *bucket)
        record = {
            **metadata,
            "software": f"framepack-independent {__version__}",
            "model": model,
            "settings": s.to_dict(),
        }
        self.sections_done = resume_state.sections_done if resume_state else 0
        _write_json(paths.sidecar, {**record, "status": "running", "sections_done": self.sections_done})
        self._sidecar, self._record = paths.sidecar, record
        slow_ram = ram_notice(needs, system_memory()[0], self.placement.mode)
        if slow_ram:
            self.stage("notice", slow_ram)

        # 2. Encode the prompt (LLaMA + CLIP-L)
        self.stage("text", "Encoding the prompt")
        with self.placement.use(c.text_encoder, c.text_encoder_2):
            positive = encode_prompt(s.prompt, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
            if s.cfg == 1:
                negative = positive.zeros_like()
            else:
                negative = encode_prompt(s.negative_prompt, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
        if positive.truncated:
            self.stage("notice", "The prompt is longer than 256 tokens; the rest was cut off.")
        self.cancel.check()

        # 3. Choose the bucket, resize and crop (a resumed job reads back the crop it saved)
        if resume_state is None:
            height, width = find_nearest_bucket(pixels_in.shape[0], pixels_in.shape[1], s.resolution)
            cropped = resize_and_center_crop(pixels_in, width, height)
            _save_png(cropped, paths.input_image)
        else:
            cropped = pixels_in
            height, width = cropped.shape[:2]

        # 4. Encode the start image: VAE latent and SigLIP embedding
        if resume_state is None:
            self.stage("vae_encode", "Encoding the start image")
            with self.placement.use(c.vae):
                start_latent = vae_encode(image_to_tensor(cropped), c.vae).float().cpu()
        else:
            start_latent = resume_state.start_latent
        preview = LatentPreview.fit(start_latent, cropped)
        self.cancel.check()
        self.stage("image_encoder", "Encoding the image with SigLIP")
        with self.placement.use(c.image_encoder):
            image_embeds = encode_image(cropped, c.feature_extractor, c.image_encoder)
        self.cancel.check()

        cond = _conditioning(positive, image_embeds, s.distilled_cfg, dtype, device)
        uncond = _conditioning(negative, image_embeds, s.distilled_cfg, dtype, device)

        # 5. Sample section by section, decode, and write the video so far
        generator = torch.Generator("cpu").manual_seed(s.seed)
        history = initial_history(model, start_latent)
        generated_frames = 1 if model == "f1" else 0
        plans = plan_sections(model, s.sections)
        self._writer = writer = SectionVideoWriter(
            direction="prepend" if model == "framepack" else "append",
            fps=VIDEO_FPS, crf=s.crf, metadata={"comment": json.dumps(record, sort_keys=True)},
        )
        if s.teacache:
            self._teacache = apply_teacache(transformer, num_steps=s.steps)
        latent_h, latent_w = height // VAE_SPATIAL, width // VAE_SPATIAL
        started = time.monotonic()
        if resume_state is not None:
            history, generated_frames = self._replay(resume_state, plans, generator, history, writer, paths,
                                                     (latent_h, latent_w))
            plans = plans[resume_state.sections_done:]

        for plan in plans:
            self.cancel.check()
            section = plan.index + 1
            layout = layout_for(model, history, s.window, plan)
            noise = torch.randn((1, LATENT_CHANNELS, s.window, latent_h, latent_w), generator=generator, dtype=torch.float32)
            self.stage("sampling", f"Sampling section {section} of {s.sections}")

            def on_step(info: dict, section: int = section) -> None:
                self.emit(StepProgress(
                    step=info["i"] + 1, steps=s.steps, section=section, sections=s.sections,
                    frames_so_far=self.frames, preview=preview(info["denoised"]),
                ))
                self.cancel.check()

            skip = self._teacache.skips_block if self._teacache is not None else None
            with self.placement.use(transformer, preserve_bytes=s.gpu_memory_preservation * GIB, skip_block=skip):
                if self._teacache is not None:
                    self._teacache.reset(s.steps)
                generated = sample_section(
                    transformer, noise.to(device), layout, start_latent, cond, uncond, s, dtype=dtype, callback=on_step
                ).float().cpu()
            # the layout's tensors are views into this history: drop them so that the old history is
            # freed as soon as the new, longer one exists (else two copies live through every decode)
            del layout

            if model == "framepack" and plan.is_last:
                generated = torch.cat([start_latent.to(generated), generated], dim=2)
            generated_frames += generated.shape[2]
            history = add_to_history(model, history, generated)
            real = real_history(model, history, generated_frames)
            _save_latents(paths.latents, {"history_latents": real, "start_latent": start_latent})

            self.stage("vae_decode", f"Decoding section {section} of {s.sections}")
            to_decode, overlap = latents_to_decode(model, real, s.window, first=plan.index == 0, is_last=plan.is_last)
            with self.placement.use(c.vae, tiling=True):
                pixels = vae_decode(to_decode, c.vae).cpu()
            self.cancel.check()

            self.stage("writing", f"Writing the video after section {section}")
            previous = self.latest_video
            next_overlap = 0 if plan.is_last else s.window * 4 - 3
            self.latest_video = writer.add_section(pixels, overlap, paths.partial(section), next_overlap=next_overlap)
            self.frames = writer.frames
            self.sections_done = section
            if previous is not None and previous != self.latest_video:
                previous.unlink(missing_ok=True)
            _write_json(paths.sidecar, {**record, "status": "running", "sections_done": section,
                                        "elapsed_seconds": round(time.monotonic() - started, 3)})
            del pixels, to_decode
            release_host_memory()  # the section's buffers, so that memory stays flat over a long video
            self.emit(SectionDone(section=section, sections=s.sections, video_path=self.latest_video,
                                  frames=self.frames, latent_frames=generated_frames))

        # 6. Put the finished files in place
        _rename_new(self.latest_video, paths.video)
        self.latest_video = paths.video
        final_latents = real_history(model, history, generated_frames)
        latents_path = None
        if save_latents:
            latents_path = Path(save_latents)
            _save_latents(latents_path, {"history_latents": final_latents})
        _write_json(paths.sidecar, {**record, "status": "finished", "sections_done": s.sections,
                                    "frames": self.frames, "elapsed_seconds": round(time.monotonic() - started, 3)})
        return Finished(video_path=paths.video, frames=self.frames, latents_path=latents_path,
                        input_image_path=paths.input_image)

    def stage(self, name: str, message: str) -> None:
        self.emit(Stage(name, message))

    def _replay(self, state: ResumeState, plans, generator, history, writer, paths: OutputPaths, latent_hw):
        """Bring a resumed job to where it stopped: the same random draws, history and video pixels.

        The finished sections' video is rebuilt by decoding their saved latents again (decoding is
        deterministic and cheap next to sampling), so the video equals that of an uninterrupted run.
        """
        s, model, done = self.s, self.c.model, state.sections_done
        self.stage("resume", f"Resuming after section {done} of {s.sections}")
        partial = paths.partial(done)
        self.latest_video = partial if partial.exists() else None
        for _ in range(done):
            torch.randn((1, LATENT_CHANNELS, s.window, *latent_hw), generator=generator, dtype=torch.float32)
        saved = state.history_latents
        if model == "framepack":
            history = torch.cat([saved, history], dim=2)
        else:
            history = torch.cat([history[:, :, :-1], saved], dim=2)
        for plan in plans[:done]:
            count = (plan.index + 1) * s.window
            real = saved[:, :, -count:] if model == "framepack" else saved[:, :, : 1 + count]
            to_decode, overlap = latents_to_decode(model, real, s.window, first=plan.index == 0, is_last=False)
            with self.placement.use(self.c.vae, tiling=True):
                pixels = vae_decode(to_decode, self.c.vae).cpu()
            self.cancel.check()
            # the writer always produces a playable file; these rebuilt ones are not needed
            scratch = paths.video.with_name(f".{paths.stem.name}.replay{plan.index + 1:03d}.mp4")
            try:
                writer.add_section(pixels, overlap, scratch, next_overlap=s.window * 4 - 3)
            finally:
                scratch.unlink(missing_ok=True)
        self.frames = writer.frames
        return history, saved.shape[2]


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
    dims = list(range(1, v_pos.ndim))
    ratio = v_pos.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
    return rescale * (v_cfg * ratio) + (1.0 - rescale) * v_cfg


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


def _save_png(image: np.ndarray, path: Path) -> None:
    with _replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _save_latents(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _replacing(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def _write_json(path: Path, data: dict) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside `path`, renamed over it on success and removed on any error."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        # a full disk leaves a short temporary file; never leave it behind
        tmp.unlink(missing_ok=True)
        raise


def _rename_new(src: Path, dst: Path) -> None:
    """Move src to dst, refusing to replace an existing file."""
    if dst.exists():
        raise ValueError(f"{dst} appeared while the job ran; the video was kept as {src}.")
    os.replace(src, dst)
