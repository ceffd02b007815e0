"""The page: its layout, and the handlers its buttons call.

`Page` owns one app's state (the runtime, the job queue, the outputs folder) and has a plain
method for every action on the page (start, resume, end, list, show and load past outputs), so a
test can call each alone. `build_app` lays the page out (`layout`) and connects its events to
those methods (`wire`). The handlers turn the form into `GenerationSettings`, submit a job to the
queue and stream that job's events as updates of the page; user mistakes are `gr.Error`s.
"""

from __future__ import annotations

import filecmp
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Union

import gradio as gr
import numpy as np

from ..jobs import BusyError, FramePackRunner, Job, JobQueue, JobRequest
from ..jobstore import JobStore
from ..outputs import OutputPaths, list_outputs, read_output
from ..runtime import Runtime
from ..settings import (MODEL_VARIANTS, RANGES, SAMPLER_VARIANTS, START_COLORS, GenerationSettings, ModelSources,
                        SettingsError, checked_loras)
from ..variants import display_name
from .loras import (LORA_FIELDS, check_page_loras, lora_controls, lora_form_values, loras_from_form, past_lora_values,
                    wire_loras)
from .extend_panel import extend_controls, wire_extend
from .queue_panel import Form, queue_controls, wire_queue
from .views import PREVIEW_HEIGHT, JobView, VideoSnapshots, idle_html, with_endpoint_signature

logger = logging.getLogger(__name__)

# Prompts for the quick list: motion described plainly works best.
EXAMPLE_PROMPTS = (
    "The person smiles, waves at the camera, then turns slowly to one side.",
    "The woman dances with energetic, graceful moves, her hair swinging.",
    "The cat stretches, yawns and settles down in the warm sunlight.",
    "Wind moves through the trees and grass while clouds drift across the sky.",
    "The man walks toward the camera with a calm, steady stride.",
    "Waves roll onto the beach at sunset; the camera holds still.",
)

MODEL_HELP = MappingProxyType({
    "framepack": (
        "**FramePack** generates the *end* of the video first and works back toward your image, so "
        "every section stays anchored to the start image (least drift). While it runs, the video grows "
        "at its beginning."
    ),
    "f1": (
        "**FramePack-F1** generates *forward*: each section continues from the one before, starting at "
        "your image. It tends to move more; while it runs, the video grows at its end."
    ),
})
MODEL_SWITCH_NOTE = (
    "Switching loads the other transformer when you next press Start; the text encoders, VAE and "
    "image encoder stay loaded."
)

# Keyframe slots on the page (the command line and the API's settings take any number).
MAX_KEYFRAMES = 4
# The form's image inputs besides the start image: the end frame, then each keyframe slot's image and time.
IMAGE_FIELDS = ("end_image",) + tuple(f"keyframe{n}_{part}" for n in range(1, MAX_KEYFRAMES + 1)
                                      for part in ("image", "time"))
# The form's speed settings under Advanced: MagCache's rule and fp8 weights (`_speed_controls`).
SPEED_FIELDS = ("magcache_threshold", "magcache_k", "magcache_retention", "fp8")
# What each step cache choice does, for the page.
CACHE_LABELS = (("None: compute every step", "none"), ("TeaCache", "teacache"), ("MagCache", "magcache"))
# The form's fields, in the order of the generation endpoint's inputs (after the image); new ones go at the end.
FORM_FIELDS = (
    "prompt", "model", "seed", "seconds", "steps", "distilled_cfg", "gpu_memory_preservation", "crf",
    "cache", "negative_prompt", "cfg", "cfg_rescale", "window", "resolution", "sampler",
    "end_strength", "prompt_blend", "text_to_video", "start_color", "aspect", *IMAGE_FIELDS,
    *SPEED_FIELDS, *LORA_FIELDS,
)
# Aspect ratios offered for text-to-video (the command line takes any W:H).
ASPECTS = ("16:9", "4:3", "1:1", "3:4", "9:16")
TIMED_PROMPT_HELP = ("Prompts over time: `[0s: a cat sits] [2.5s: the cat jumps]` changes the prompt at 2.5 s; "
                     "`[1s-2s: ...]` holds from 1 s to 2 s, then the prompt before returns. Each section uses the "
                     "prompt in force at its start (a section is Latent Window Size × 4 / 30 s long).")
END_FRAME_NOTE = MappingProxyType({
    "framepack": "The video is generated back from this frame towards the start image.",
    "f1": "FramePack-F1 generates forward from the start image, so it has no end frame."})

# How often the progress text refreshes while no event arrives (time remaining, queue wait).
IDLE_REFRESH_S = 1.0

CSS = """
#fp-preview img { image-rendering: pixelated; }
.fp-progress { font-variant-numeric: tabular-nums; }
"""


def theme() -> gr.themes.Base:
    """The page's theme (built when launching, not at import)."""
    return gr.themes.Soft(primary_hue="orange")


@dataclass(frozen=True)
class AppConfig:
    """What the app needs to know: where outputs go, where models come from, and the form's defaults."""

    outputs: Path = Path("outputs")
    sources: Union[ModelSources, Callable[[], ModelSources]] = field(default_factory=ModelSources)
    device: str = "auto"
    vram: str = "auto"
    attention: str = "auto"
    compile: bool = False  # torch.compile the transformer's blocks
    lora_dir: Path = Path("loras")  # the LoRA picker lists this folder's .safetensors files
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    ray: Optional[Any] = None  # a scaleout.ClusterOptions: run the jobs on Ray workers instead of in this process


# ---------------------------------------------------------------------------------------------
# Inputs


def settings_from_form(values: dict[str, Any]) -> GenerationSettings:
    """Validated settings from the form's values (the end image and keyframe slots included); SettingsError if wrong."""
    values = dict(values)
    keyframes = []
    for n in range(1, MAX_KEYFRAMES + 1):
        image, seconds = values.pop(f"keyframe{n}_image", None), values.pop(f"keyframe{n}_time", None)
        if image in (None, ""):
            continue
        if seconds in (None, ""):
            raise SettingsError(f"Keyframe {n} has an image but no time: give the second it should appear at.")
        keyframes.append((seconds, str(image)))
    values["loras"] = loras_from_form(values)  # the picked names and their weight slots
    return GenerationSettings(**values, keyframes=tuple(keyframes))


def form_values(settings: GenerationSettings, folder: Optional[Path] = None) -> dict[str, Any]:
    """The form's values for settings (image names in a record are resolved against its `folder`)."""
    values = settings.to_dict()

    def image(name: Optional[str]):
        if not name:
            return None
        path = Path(name) if folder is None or Path(name).is_absolute() else Path(folder) / name
        return str(path) if path.is_file() else None

    values["end_image"] = image(settings.end_image)
    slots = list(settings.keyframes)[:MAX_KEYFRAMES]
    for n in range(1, MAX_KEYFRAMES + 1):
        seconds, name = slots[n - 1] if n <= len(slots) else (None, None)
        values[f"keyframe{n}_image"], values[f"keyframe{n}_time"] = image(name), seconds
    values.update(lora_form_values(settings.loras))
    return {name: values[name] for name in FORM_FIELDS}


def load_start_image(image: Any) -> np.ndarray:
    """The uploaded start image as RGB, or a user-facing error."""
    from ..conditioning import load_image

    if image is None or (isinstance(image, str) and not image.strip()):
        raise gr.Error("Upload a start image first.", title="No image", print_exception=False)
    try:
        return load_image(image)
    except ValueError as exc:
        raise gr.Error(str(exc), title="Not a usable image", print_exception=False) from None


def report_unreadable_images(component: gr.Image) -> gr.Image:
    """Make an Image upload report a file that is not an image as a user mistake instead of a crash.

    Wraps this one component's preprocess (a subclass of gr.Image would make Gradio write a .pyi
    stub beside this module on import).
    """
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a non-image upload
            name = getattr(payload, "orig_name", None) or "The uploaded file"
            from PIL import Image

            if isinstance(exc, Image.DecompressionBombError):
                from ..conditioning import MAX_IMAGE_PIXELS

                raise gr.Error(f"{name} is too large to process safely; use an image under "
                               f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels.", title="Image too large",
                               print_exception=False) from None
            raise gr.Error(f"{name} is not an image PIL can read ({type(exc).__name__}); upload a PNG, JPEG or WebP.",
                           title="Not an image", print_exception=False) from None

    component.preprocess = checked
    return component


def accept_uploads_by_any_name(demo: gr.Blocks) -> gr.Blocks:
    """Let uploads named with a leading dot through, and report any upload Gradio refuses as a gr.Error.

    Before any handler runs, Gradio refuses to pass on a file whose name starts with a dot when it
    lies in the working directory (`_check_allowed` in gradio/processing_utils.py: it may be the
    app's own `.env`). The launcher keeps Gradio's upload folder (GRADIO_TEMP_DIR) inside the app
    folder, which is also the working directory, so that rule refused uploads such as `.photo.png`
    too, and the page showed Gradio's generic error. So an upload (a file inside the upload folder)
    reaches Gradio through a link beside it without the leading dots, and Gradio's other checks
    still apply; a file Gradio still refuses is reported with our message. (Adding the upload
    folder to `allowed_paths` would exempt it too, but Gradio serves allowed files inline, an
    uploaded HTML page included.)
    """
    from gradio.exceptions import InvalidPathError
    from gradio.utils import get_upload_folder
    from gradio_client.utils import is_file_obj_with_meta, traverse

    preprocess_data = demo.preprocess_data

    def plain_name(payload: dict) -> dict:
        path = Path(payload["path"])
        if not path.name.startswith("."):
            return payload
        try:
            real = path.resolve(strict=True)
            if not (real.is_file() and real.is_relative_to(Path(get_upload_folder()).resolve())):
                return payload
            plain = real.with_name(real.name.lstrip(".") or "upload")
            try:
                os.link(real, plain)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this drive (FAT, exFAT): a copy, moved into place whole
                staging = plain.with_name(f"{plain.name}.{secrets.token_hex(4)}.part")
                shutil.copyfile(real, staging)
                os.replace(staging, plain)
            if plain.is_symlink() or not (os.path.samefile(real, plain) or filecmp.cmp(real, plain, shallow=False)):
                return payload
        except OSError:
            return payload
        return {**payload, "path": str(plain)}

    async def checked(block_fn, inputs, *args, **kwargs):
        files: list[dict] = []
        traverse(inputs, files.append, is_file_obj_with_meta)
        if any(Path(f["path"]).name.startswith(".") for f in files):
            inputs = [traverse(value, plain_name, is_file_obj_with_meta) for value in inputs]
        try:
            return await preprocess_data(block_fn, inputs, *args, **kwargs)
        except InvalidPathError as exc:
            logger.warning("Gradio refused an uploaded file: %s", exc)
            names = [f.get("orig_name") or Path(f["path"]).name for f in files]
            raise gr.Error(f"{', '.join(names) or 'The file'} was refused: the server takes only files uploaded to this "
                           f"page. Upload it again; if it is refused again, rename it so that its name does not start "
                           f"with a dot.", title="Upload refused", print_exception=False) from None

    demo.preprocess_data = checked
    return demo


def checked_by_settings(component: gr.components.Component) -> gr.components.Component:
    """Hand this input to GenerationSettings unchanged: Gradio's own check names no setting, and rounds
    a fractional whole number silently; the settings say which setting is wrong and what is allowed."""
    component.preprocess = lambda payload: payload
    return component


def slider(name: str, label: str, value: float, info: Optional[str] = None, **kwargs) -> gr.Slider:
    """A slider with the range of settings.RANGES[name]."""
    rng = RANGES[name]
    step = rng.step if rng.step is not None else (1 if rng.integer else 0.01)
    return gr.Slider(minimum=rng.low, maximum=rng.high, value=value, step=step, label=label, info=info, **kwargs)


def _owner(request: Optional[gr.Request]) -> Optional[str]:
    """The browser session a request comes from: a page's jobs belong to it."""
    return getattr(request, "session_hash", None)


def form_handler(handler: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """`handler(image, values, owner)` as Gradio calls it: one argument per form input, then the request.

    The signature, built from FORM_FIELDS, names the generation endpoint's parameters for API clients.
    """
    def call(*args):
        image, *values, request = args
        yield from handler(image, dict(zip(FORM_FIELDS, values)), _owner(request))

    return with_endpoint_signature(call, ("image", *FORM_FIELDS))


# ---------------------------------------------------------------------------------------------
# What the page does


class Page:
    """One app's runtime, job queue and outputs folder, and a method for every action on the page."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.outputs = Path(config.outputs)
        # with Ray the workers pick their devices; this process only checks files and reads outputs
        local = config.ray is None
        self.runtime = Runtime(config.sources, device=config.device if local else "cpu", vram=config.vram,
                               attention=config.attention if local else "auto", compile=config.compile and local,
                               lora_dir=config.lora_dir)
        self.runner = FramePackRunner(self.runtime, self.outputs)
        self.cluster = None
        runners = self.runner
        if not local:
            from ..scaleout import RayCluster, WorkerConfig

            self.cluster = RayCluster(config.ray, WorkerConfig.of(
                self.runtime, device=config.device, vram=config.vram, attention=config.attention,
                compile=config.compile), self.outputs)
            runners = self.cluster.runners()
        # the outputs folder's queue file keeps queued jobs (Add to queue, batches) over restarts
        self.jobs = JobQueue(runners, store=JobStore(self.outputs))
        self.snapshots = VideoSnapshots()
        self._resuming = threading.Lock()  # two pages pressing Resume on the same job at once start it once
        # A job killed with the app (power loss, closed window) is offered for resuming when it starts again
        # (a queued job continues by itself).
        queued = self.jobs.stored_outputs()
        self.interrupted_at_start = [item for item in list_outputs(self.outputs)
                                     if item.interrupted and item.sidecar.with_suffix(".mp4") not in queued]

    # -- generation --------------------------------------------------------------------------------

    def generate(self, image, values: dict[str, Any], owner: Optional[str]) -> Iterator[tuple]:
        """Start a job and stream it: (latest video, preview, progress, final video, Start, End) updates."""
        from ..pipeline import check_images

        # 1. Check the user's input; a mistake is a message, and Start was never disabled.
        try:
            settings = settings_from_form(values)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid setting", print_exception=False) from None
        pixels = None if settings.text_to_video else load_start_image(image)
        try:
            check_images(settings, pixels)  # the end image and keyframes
        except ValueError as exc:
            raise gr.Error(str(exc), title="Not a usable image", print_exception=False) from None
        check_page_loras(self.runtime, settings, self.config.lora_dir)
        # 2. Queue the job; this page's End and a closed tab find it by its owner (the session).
        yield from self.stream(self._submit(JobRequest(settings, pixels), owner), settings)

    def resume(self, stem: Optional[str], owner: Optional[str]) -> Iterator[tuple]:
        """Continue an interrupted or ended job from its last finished section, streamed like Start."""
        from ..pipeline import load_resume_state

        item = self.find_past(stem)
        if item is None:
            raise gr.Error("Choose an interrupted job in the list first.", print_exception=False)
        output = OutputPaths(self.outputs / f"{item.stem}.mp4").video
        with self._resuming:
            if output in self.busy_outputs():
                raise gr.Error(f"{item.stem} is being generated right now.", title="Busy", print_exception=False)
            try:
                state = self.runtime.resume_loras(load_resume_state(output))  # the same LoRA files, or why not
            except ValueError as exc:
                raise gr.Error(str(exc), title="Can't resume", print_exception=False) from None
            job = self._submit(JobRequest(state.settings, None, resume=output), owner)
        yield from self.stream(job, state.settings)

    def _submit(self, request: JobRequest, owner: Optional[str]) -> Job:
        try:
            return self.jobs.submit(request, owner=owner)
        except BusyError:
            raise gr.Error("This page already has a generation queued or running; wait for it or press End Generation.",
                           title="Busy", print_exception=False) from None

    def stream(self, job: Job, settings: GenerationSettings) -> Iterator[tuple]:
        """Stream a queued job's events until its last one, as updates of the page's outputs."""
        locked = (gr.update(interactive=False), gr.update(interactive=True))
        unlocked = (gr.update(interactive=True), gr.update(interactive=False))
        view = JobView(settings, self.snapshots)
        yield None, None, view.progress.html(), None, *locked
        try:
            while not view.ended:
                latest_video, picture, final_video = view.take(job.take(timeout=IDLE_REFRESH_S))
                buttons = unlocked if view.ended else (gr.skip(), gr.skip())
                if view.failure:
                    gr.Warning(view.failure, duration=None, title="Generation failed")
                yield latest_video, picture, view.progress.html(), final_video, *buttons
                view.shown()  # the page has its copies now
        except Exception:
            logger.exception("the page's generation handler failed")
            yield gr.skip(), gr.skip(), idle_html("Something went wrong; see the console."), gr.skip(), *unlocked
            raise
        finally:
            if not job.done:
                # The page went away mid-job (closed tab, lost connection): the job ends as with End.
                self.jobs.cancel(job)
            view.close()

    def end(self, owner: Optional[str]) -> None:
        """Stop this page's job (queued or running); finished sections are kept."""
        if owner is None or self.jobs.cancel_owner(owner) == 0:
            gr.Info("Nothing is running on this page.")

    def page_closed(self, owner: Optional[str]) -> None:
        """A closed or reloaded tab ends its job like End would; finished sections stay on disk."""
        if owner is not None:
            self.jobs.cancel_owner(owner)

    def busy_outputs(self) -> set[Path]:
        """Final video paths of the jobs queued or running in this app."""
        busy = {job.request.resume for job in self.jobs.active() if job.request.resume is not None}
        # a running job's output is bound before its runner writes anything, so this holds the one being generated
        busy.update(job.output for job in self.jobs.running_jobs() if job.output is not None)
        return busy | self.jobs.stored_outputs()  # queued jobs continue theirs by themselves

    # -- past outputs ------------------------------------------------------------------------------

    def past_choices(self, stem: Optional[str] = None):
        """The past-outputs list, newest first, keeping the chosen `stem` if it is still there."""
        items = list_outputs(self.outputs)
        names = [item.stem for item in items]
        busy = {OutputPaths(path).name for path in self.busy_outputs()}
        return gr.update(choices=[(item.describe(running=item.stem in busy), item.stem) for item in items],
                         value=stem if stem in names else None)

    def find_past(self, stem: Optional[str]):
        """The past output called `stem`, or None when none is chosen; a name not in the folder is an error."""
        if not stem:
            return None
        # Only names from the folder's listing: a request cannot point outside the outputs folder.
        if not isinstance(stem, str) or Path(stem).name != stem or stem.startswith(".") or "\\" in stem:
            raise gr.Error("Unknown output.", print_exception=False)
        item = read_output(self.outputs / f"{stem}.json")
        if item is None:
            raise gr.Error(f"{stem} is no longer in the outputs folder; press Refresh list.", print_exception=False)
        return item

    def show_past(self, stem: Optional[str]):
        """(its video, its record, whether Resume applies) for a chosen past output."""
        item = self.find_past(stem)
        if item is None:
            return None, None, gr.update(interactive=False)
        return (str(item.video) if item.video else None), item.record, gr.update(interactive=item.resumable)

    def load_past(self, stem: Optional[str]) -> tuple:
        """A past output's start image and settings, in the order of the form's inputs."""
        item = self.find_past(stem)
        if item is None:
            raise gr.Error("Choose a past output first.", print_exception=False)
        try:
            settings = GenerationSettings.from_dict(item.settings, ignore_unknown=True)
        except ValueError as exc:
            raise gr.Error(f"Its settings cannot be used: {exc}", print_exception=False) from None
        values = form_values(settings, item.sidecar.parent)
        values.update(past_lora_values(self.runtime, item.record, settings.loras, self.config.lora_dir))
        image_value = str(item.input_image) if item.input_image else gr.skip()
        return (image_value, *[values[name] for name in FORM_FIELDS])

    def past_lora_names(self, stem: Optional[str]) -> list[str]:
        """The names of a past job's LoRAs that are in the LoRA folder (the picks Load these settings makes)."""
        item = self.find_past(stem) if stem else None
        if item is None:
            return []
        try:
            names = lora_form_values(checked_loras(item.settings.get("loras") or ()))["loras"]
        except ValueError:
            return []
        return [name for name in names if (Path(self.config.lora_dir) / name).is_file()]


# ---------------------------------------------------------------------------------------------
# Layout and wiring


def layout(d: GenerationSettings, interrupted: list) -> SimpleNamespace:
    """Lay the page out (inside a gr.Blocks); returns its components by name, the form's under `form`."""
    c = SimpleNamespace(form={})
    gr.Markdown("# FramePack\nTurn one image into a video, section by section. "
                "The video grows while you watch; End Generation keeps what is finished.")
    with gr.Row():
        with gr.Column(scale=1):
            _form_column(c, d)
        with gr.Column(scale=1):
            c.latest = gr.Video(label="Latest video (updated after every section)", autoplay=True, loop=True,
                                interactive=False, height=360, elem_id="fp-latest")
            c.preview = gr.Image(label="Latent preview of the step in progress", interactive=False, format="png",
                                 height=PREVIEW_HEIGHT + 40, elem_id="fp-preview")
            c.progress = gr.HTML(idle_html(), elem_id="fp-progress")
            c.final = gr.Video(label="Final video", autoplay=False, loop=True, interactive=False,
                               height=360, elem_id="fp-final")
    queue_controls(c)
    with gr.Accordion("Past outputs", open=bool(interrupted), elem_id="fp-past-outputs"):
        if interrupted:
            count = len(interrupted)
            gr.Markdown(f"**{count} job{'s were' if count != 1 else ' was'} interrupted** (marked *interrupted* "
                        "below). Choose one and press Resume to continue it from its last finished section.")
        with gr.Row(equal_height=True):
            c.past = gr.Dropdown(label="Past outputs, newest first", choices=[], value=None, scale=5,
                                 allow_custom_value=True,  # the handlers check the name against the folder
                                 elem_id="fp-past")
            c.refresh = gr.Button("Refresh list", scale=1)
        with gr.Row():
            c.past_video = gr.Video(label="Past output", loop=True, interactive=False, height=320)
            c.past_settings = gr.JSON(label="Its settings")
        with gr.Row():
            c.load_settings = gr.Button("Load these settings and start image into the form")
            c.resume = gr.Button("Resume this job", interactive=False, elem_id="fp-resume")
        extend_controls(c)
    for name, component in c.form.items():
        # uploads keep Gradio's own handling (it moves them into its upload folder); text needs no check
        if name not in ("prompt", "negative_prompt", "end_image") and not name.endswith("_image"):
            checked_by_settings(component)
    return c


def _form_column(c: SimpleNamespace, d: GenerationSettings) -> None:
    """The left column: image, prompt, model, buttons and the settings."""
    f = c.form
    c.image = report_unreadable_images(gr.Image(
        label="Image", type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
        height=320, elem_id="fp-image"))
    f["prompt"] = gr.Textbox(label="Prompt", value=d.prompt, lines=2, elem_id="fp-prompt",
                             placeholder="Describe the motion, e.g. “The man dances energetically.”")
    gr.Markdown(TIMED_PROMPT_HELP, elem_id="fp-prompt-help")
    c.examples = gr.Dataset(label="Example prompts (click one to use it)", components=[f["prompt"]],
                            samples=[[p] for p in EXAMPLE_PROMPTS], samples_per_page=len(EXAMPLE_PROMPTS))
    f["model"] = gr.Radio(label="Model", choices=[(display_name(m), m) for m in MODEL_VARIANTS],
                          value=d.model, elem_id="fp-model")
    c.model_help = gr.Markdown(f"{MODEL_HELP[d.model]}\n\n{MODEL_SWITCH_NOTE}")
    with gr.Row():
        c.start = gr.Button("Start Generation", variant="primary", elem_id="fp-start")
        c.end = gr.Button("End Generation", variant="stop", interactive=False, elem_id="fp-end")
    with gr.Group():
        f["cache"] = gr.Dropdown(label="Step cache", choices=list(CACHE_LABELS), value=d.cache, elem_id="fp-cache",
                                 info="Skips transformer work on steps that change little: about twice as fast, "
                                      "small details can suffer. MagCache's settings are under Advanced.")
        with gr.Row(equal_height=True):
            f["seed"] = gr.Number(label="Seed", value=d.seed, precision=0, minimum=0, scale=4, elem_id="fp-seed")
            c.randomize = gr.Button("Random seed", scale=1, size="sm")
        f["seconds"] = slider("seconds", "Total Video Length (Seconds)", d.seconds, elem_id="fp-seconds")
        f["steps"] = slider("steps", "Steps", d.steps, info="The released models were tuned for 25.")
        f["distilled_cfg"] = slider("distilled_cfg", "Distilled CFG Scale", d.distilled_cfg,
                                    info="The released models were distilled for 10.")
        f["gpu_memory_preservation"] = slider(
            "gpu_memory_preservation", "GPU Inference Preserved Memory (GB)", d.gpu_memory_preservation,
            info="Memory kept free for the computation when models are streamed; raise it after an out-of-memory error (slower).")
        f["crf"] = slider("crf", "MP4 Compression", d.crf,
                          info="H.264 quality: lower is better and larger; 0 and 1 give the same result (the browser-safe best).")
    _creative_controls(c, d)
    lora_controls(c, d)
    with gr.Accordion("Advanced", open=False):
        f["negative_prompt"] = gr.Textbox(label="Negative Prompt", value=d.negative_prompt,
                                          info="Only used when CFG Scale is above 1.")
        f["cfg"] = slider("cfg", "CFG Scale", d.cfg, info="Real guidance; above 1 doubles the time per step.")
        f["cfg_rescale"] = slider("cfg_rescale", "CFG Re-Scale", d.cfg_rescale)
        f["window"] = slider("window", "Latent Window Size", d.window,
                             info="Latent frames per section (4 video frames each).")
        f["resolution"] = slider("resolution", "Resolution", d.resolution,
                                 info="The image is fitted to the nearest bucket of about this size.")
        f["sampler"] = gr.Radio(label="Sampler variant (UniPC)", choices=list(SAMPLER_VARIANTS), value=d.sampler)
        _speed_controls(f, d)


def _speed_controls(f: dict, d: GenerationSettings) -> None:
    """MagCache's rule (used when the step cache is MagCache) and fp8 weights."""
    with gr.Group():
        f["magcache_threshold"] = slider("magcache_threshold", "MagCache Threshold", d.magcache_threshold,
                                         info="Higher skips more steps (faster); lower stays closer to every step computed.")
        f["magcache_k"] = slider("magcache_k", "MagCache K", d.magcache_k, info="At most this many steps skipped in a row.")
        f["magcache_retention"] = slider("magcache_retention", "MagCache Retention", d.magcache_retention,
                                         info="This first fraction of the steps is always computed.")
    f["fp8"] = gr.Checkbox(label="fp8 transformer weights", value=d.fp8, elem_id="fp-fp8",
                           info="Stores the attention and MLP weights in 8 bits: about a third less GPU memory and "
                                "streaming, slightly different video. Switching reloads the transformer.")


def _creative_controls(c: SimpleNamespace, d: GenerationSettings) -> None:
    """End frame, keyframes, prompt blending and text-to-video."""
    f = c.form
    with gr.Accordion("End frame, keyframes, text-to-video", open=False, elem_id="fp-creative"):
        with gr.Row():
            f["end_image"] = report_unreadable_images(gr.Image(
                label="End frame (FramePack only)", type="filepath", image_mode=None, format="png", height=160,
                sources=["upload", "clipboard"], interactive=d.model == "framepack", elem_id="fp-end-image"))
            with gr.Column():
                f["end_strength"] = slider("end_strength", "End Frame Strength", d.end_strength,
                                           info="0 ignores the end frame; 1 uses it fully.")
                c.end_note = gr.Markdown(END_FRAME_NOTE[d.model])
        gr.Markdown("**Keyframes**: images the video passes through, each from its time on (in seconds). "
                    "Clear an image to remove its keyframe.")
        with gr.Row():
            for n in range(1, MAX_KEYFRAMES + 1):
                with gr.Column(min_width=120):
                    f[f"keyframe{n}_image"] = report_unreadable_images(gr.Image(
                        label=f"Keyframe {n}", type="filepath", image_mode=None, format="png", height=120,
                        sources=["upload", "clipboard"], elem_id=f"fp-keyframe{n}"))
                    f[f"keyframe{n}_time"] = gr.Number(label="at second", value=None, minimum=0,
                                                       elem_id=f"fp-keyframe{n}-time")
        f["prompt_blend"] = slider("prompt_blend", "Prompt Blend (sections)", d.prompt_blend,
                                   info="Over how many sections a timed prompt change is blended in (0: at once).")
        with gr.Row():
            f["text_to_video"] = gr.Checkbox(label="Text-to-video: start from a plain frame instead of an image",
                                             value=d.text_to_video, elem_id="fp-text-to-video")
            f["start_color"] = gr.Dropdown(label="Start frame colour", choices=list(START_COLORS), value=d.start_color,
                                           allow_custom_value=True)  # #RRGGBB too; the settings check it
            f["aspect"] = gr.Dropdown(label="Aspect ratio", choices=list(ASPECTS), value=d.aspect,
                                      allow_custom_value=True)


def wire(page: Page, demo: gr.Blocks, c: SimpleNamespace) -> None:
    """Connect the page's events to the Page's methods; the API names are the public endpoints."""
    form_inputs = [c.form[name] for name in FORM_FIELDS]
    streamed = [c.latest, c.preview, c.progress, c.final, c.start, c.end]
    refresh_list = dict(fn=page.past_choices, inputs=c.past, outputs=c.past, api_visibility="private")

    c.start.click(form_handler(page.generate), inputs=[c.image, *form_inputs], outputs=streamed,
                  api_name="generate", concurrency_limit=None, show_progress="hidden").then(**refresh_list)

    def resume(stem: Optional[str], request: gr.Request):
        yield from page.resume(stem, _owner(request))

    def end(request: gr.Request) -> None:
        page.end(_owner(request))

    def page_closed(request: gr.Request) -> None:
        page.page_closed(_owner(request))

    c.resume.click(resume, inputs=c.past, outputs=streamed, api_name="resume", concurrency_limit=None,
                   show_progress="hidden").then(**refresh_list)
    c.end.click(end, outputs=None, api_name="end", concurrency_limit=None, show_progress="hidden")
    demo.unload(page_closed)

    c.examples.click(lambda sample: sample[0], inputs=c.examples, outputs=c.form["prompt"],
                     api_visibility="private", queue=False)
    c.randomize.click(lambda: secrets.randbelow(2**32), outputs=c.form["seed"], api_visibility="private", queue=False)
    c.form["model"].change(lambda m: (f"{MODEL_HELP.get(m, '')}\n\n{MODEL_SWITCH_NOTE}",
                                      gr.update(interactive=m == "framepack") if m == "framepack"
                                      else gr.update(interactive=False, value=None), END_FRAME_NOTE.get(m, "")),
                           inputs=c.form["model"], outputs=[c.model_help, c.form["end_image"], c.end_note],
                           api_visibility="private", queue=False)

    c.refresh.click(page.past_choices, inputs=c.past, outputs=c.past, api_name="list_outputs")
    c.past.change(page.show_past, inputs=c.past, outputs=[c.past_video, c.past_settings, c.resume],
                  api_name="show_output")
    c.load_settings.click(page.load_past, inputs=c.past, outputs=[c.image, *form_inputs], api_name="load_settings")
    demo.load(page.past_choices, outputs=c.past, api_visibility="private")
    wire_loras(page, c, demo)
    wire_queue(page, demo, c, Form(FORM_FIELDS, settings_from_form, load_start_image))
    wire_extend(page, c, FORM_FIELDS, settings_from_form)


def build_app(config: Optional[AppConfig] = None) -> gr.Blocks:
    """The page, wired to a new job queue; nothing is loaded until the first job starts."""
    page = Page(config or AppConfig())
    with gr.Blocks(title="FramePack", delete_cache=(3600, 24 * 3600)) as demo:
        wire(page, demo, layout(page.config.defaults, page.interrupted_at_start))
    accept_uploads_by_any_name(demo)
    demo.page = page
    demo.job_queue = page.jobs  # for the caller's shutdown and for tests
    demo.cluster = page.cluster  # the Ray workers, with --ray (closed after the job queue)
    demo.snapshots = page.snapshots
    return demo
