"""The desktop app: one Gradio page over the job queue. Layout and event wiring only.

The page turns the form into `GenerationSettings`, submits a job to the app's `JobQueue` and
renders that job's typed events (queue position, loading, step progress with a latent preview,
a playable MP4 after every section, the result). Everything a session owns lives in its handler
or is keyed by its session; the queue, the model cache and the output namer belong to the app
object that `build_app` creates, never to this module.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Optional, Sequence, Union

import gradio as gr
import numpy as np

from .events import Cancelled, Failed, Finished, SectionDone, Stage, StepProgress
from .jobs import (
    BusyError,
    Job,
    FramePackRunner,
    JobQueue,
    JobRequest,
    ModelCache,
    Queued,
    display_name,
    list_outputs,
    read_output,
)
from .settings import ATTENTION_CHOICES, MODEL_VARIANTS, RANGES, SAMPLER_VARIANTS, VIDEO_FPS, GenerationSettings, ModelSources

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

# The form's fields, in the order of the generation endpoint's inputs (after the image).
FORM_FIELDS = (
    "prompt", "model", "seed", "seconds", "steps", "distilled_cfg", "gpu_memory_preservation", "crf",
    "teacache", "negative_prompt", "cfg", "cfg_rescale", "window", "resolution", "sampler",
)

# Largest preview height on the page; the latent preview is enlarged to about this many pixels.
PREVIEW_HEIGHT = 160
# How often the progress text refreshes while no event arrives (time remaining, queue wait).
IDLE_REFRESH_S = 1.0


@dataclass(frozen=True)
class AppConfig:
    """What the app needs to know: where outputs go, where models come from, and the form's defaults."""

    outputs: Path = Path("outputs")
    sources: Union[ModelSources, Callable[[], ModelSources]] = field(default_factory=ModelSources)
    device: str = "auto"
    vram: str = "auto"
    attention: str = "auto"
    defaults: GenerationSettings = field(default_factory=GenerationSettings)


# ---------------------------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python demo_gradio.py`."""
    from .__main__ import ATTENTION_HELP, add_source_arguments

    parser = argparse.ArgumentParser(
        prog="python demo_gradio.py",
        description="FramePack image-to-video in the browser. Models load when the first job starts.",
    )
    parser.add_argument("--server", default="127.0.0.1", metavar="ADDR",
                        help="address to listen on (default 127.0.0.1, this computer only; 0.0.0.0 for your network)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also publish the page through a temporary public gradio.live link")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="require this login to use the page and API (may be repeated); others on the command "
                             "line of this computer can see it, so prefer --auth-file")
    parser.add_argument("--auth-file", metavar="PATH",
                        help="require a login from this file: one USER:PASSWORD per line (# starts a comment)")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the default web browser")
    parser.add_argument("--outputs", default="outputs", metavar="DIR", help="folder for the videos and their settings (default: outputs)")
    parser.add_argument("--model", default="framepack", choices=list(MODEL_VARIANTS),
                        help="model selected when the page opens; --transformer applies to it")
    add_source_arguments(parser)
    parser.add_argument("--framepack-transformer", metavar="SRC", help="FramePack transformer: hub repo id or local folder")
    parser.add_argument("--f1-transformer", metavar="SRC", help="FramePack-F1 transformer: hub repo id or local folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--vram", default="auto", choices=["auto", "high", "low"],
                        help="high: keep every model on the GPU; low: move each to the GPU only for its stage; "
                             "auto (default): high on GPUs with 60 GiB or more")
    parser.add_argument("--attention", default="auto", choices=list(ATTENTION_CHOICES), help=ATTENTION_HELP)
    return parser


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """The AppConfig for parsed flags; model sources are worked out (and tiny models built) on first use."""

    def sources() -> ModelSources:
        from .__main__ import sources_from_args

        resolved = sources_from_args(args, args.model)
        for model, source in (("framepack", args.framepack_transformer), ("f1", args.f1_transformer)):
            if source:
                resolved = resolved.with_transformer(model, source)
        return resolved

    return AppConfig(
        outputs=Path(args.outputs).expanduser(),
        sources=sources,
        device=args.device,
        vram=args.vram,
        attention=args.attention,
        defaults=GenerationSettings(model=args.model),
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags; a bad --device stops here, before the page opens."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    from .attention import resolve_attention
    from .loading import resolve_device

    try:
        resolve_attention(args.attention, resolve_device(args.device))
        args.credentials = read_credentials(args.auth, args.auth_file)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def read_credentials(pairs: Sequence[str] = (), path: Optional[str] = None) -> list[tuple[str, str]]:
    """(user, password) pairs from --auth values and an --auth-file; ValueError names a malformed one."""

    def split(text: str, where: str) -> tuple[str, str]:
        user, sep, password = text.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where} must look like USER:PASSWORD (both parts non-empty).")
        return user.strip(), password

    credentials = [split(pair, "--auth") for pair in pairs]
    if path:
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--auth-file {path} can't be read ({getattr(exc, 'strerror', None) or exc}).") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                credentials.append(split(line, f"line {number} of --auth-file {path}"))
        if not credentials:
            raise ValueError(f"--auth-file {path} holds no USER:PASSWORD line.")
    return credentials


LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def exposure_warning(args: argparse.Namespace) -> Optional[str]:
    """A warning when the page is reachable from other computers (--server other than this one, --share)."""
    where = []
    if args.server not in LOCAL_ADDRESSES:
        where.append(f"every computer that can reach this one (listening on {args.server})")
    if args.share:
        where.append("anyone on the internet who has the gradio.live link (--share)")
    if not where:
        return None
    guard = ("Only the logins from --auth/--auth-file are let in" if getattr(args, "credentials", None)
             else "No login is required: add --auth USER:PASSWORD or --auth-file PATH")
    return (f"WARNING: the page and its API are open to {' and '.join(where)}. They can start jobs and "
            f"see every video in the outputs folder. {guard}; traffic to --server is not encrypted.")


# Gradio's file route (/file=URL, /gradio_api/file=URL) fetches public http(s) URLs for any visitor;
# nothing on this page needs that, and on an exposed page it would be an open proxy.
_REMOTE_FILE = re.compile(r"/file=\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


class RefuseRemoteFiles:
    """ASGI middleware: answer 403 to requests that ask the file route for a URL instead of a file."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _REMOTE_FILE.search(scope.get("path", "")):
            from starlette.responses import PlainTextResponse

            response = PlainTextResponse("This app does not fetch URLs for visitors.", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def server_kwargs() -> dict[str, Any]:
    """Keyword arguments for the FastAPI app Gradio creates (`launch(app_kwargs=...)`)."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(RefuseRemoteFiles)]}


def launch_options(args: argparse.Namespace, config: AppConfig) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` from the flags."""
    credentials = getattr(args, "credentials", None)
    return dict(
        server_name=args.server,
        server_port=args.port,
        share=args.share,
        inbrowser=args.inbrowser,
        auth=list(credentials) if credentials else None,
        # Only the outputs folder; Gradio adds its own upload and cache folders, and nothing else is served.
        allowed_paths=[str(Path(config.outputs).resolve())],
        app_kwargs=server_kwargs(),
        show_error=True,
        theme=theme(),
        css=CSS,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python demo_gradio.py`: check the flags, warn when the page is exposed, open the page."""
    import sys

    args = parse_args(argv)
    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    config = config_from_args(args)
    build_app(config).launch(**launch_options(args, config))


def theme() -> gr.themes.Base:
    """The page's theme (built when launching, not at import)."""
    return gr.themes.Soft(primary_hue="orange")


CSS = """
#fp-preview img { image-rendering: pixelated; }
.fp-progress { font-variant-numeric: tabular-nums; }
"""


# ---------------------------------------------------------------------------------------------
# Rendering a job's events


class ProgressView:
    """What one job has done so far, and its progress bar as HTML."""

    def __init__(self, settings: GenerationSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.state = "queued"
        self.message = "Waiting to start"
        self.position: Optional[int] = None
        self.step: Optional[StepProgress] = None
        self.frames = 0
        self.sampling_started: Optional[float] = None
        self.notices: list[str] = []  # things the user should know about the result (a cut prompt)

    def update(self, event) -> None:
        """Take one event of the job into account."""
        if isinstance(event, Queued):
            self.state, self.position = "queued", event.position
            if event.ahead == 0:
                self.message = "Starting"
            else:
                jobs = f"{event.ahead} job{'s' if event.ahead != 1 else ''}"
                self.message = f"Waiting in the queue: position {event.position}, {jobs} ahead of this one"
        elif isinstance(event, Stage):
            if event.name == "notice":
                if event.message not in self.notices:
                    self.notices.append(event.message)
                return
            self.state = "loading" if event.name == "loading" else "running"
            self.message = event.message
            if event.name == "sampling" and self.sampling_started is None:
                self.sampling_started = self.clock()
        elif isinstance(event, StepProgress):
            self.state = "running"
            self.step = event
            self.frames = event.frames_so_far
        elif isinstance(event, SectionDone):
            self.frames = event.frames
        elif isinstance(event, Finished):
            self.state, self.frames = "finished", event.frames
            self.message = f"Finished: {event.frames} frames ({event.frames / VIDEO_FPS:.2f} s) saved as {Path(event.video_path).name}"
        elif isinstance(event, Cancelled):
            self.state, self.frames = "cancelled", event.frames
            kept = f"; the {event.frames} finished frames were kept as {Path(event.video_path).name}" if event.video_path else ""
            self.message = f"Stopped{kept}."
        elif isinstance(event, Failed):
            self.state, self.message = "failed", event.message

    @property
    def fraction(self) -> float:
        """Share of the job's sampling done (1 when finished)."""
        if self.state == "finished":
            return 1.0
        return self.step.fraction if self.step is not None else 0.0

    def seconds_left(self) -> Optional[float]:
        """Estimated seconds to go, from the pace since sampling began (decoding included)."""
        if self.step is None or self.sampling_started is None or self.state != "running":
            return None
        done = self.fraction
        if done <= 0:
            return None
        elapsed = self.clock() - self.sampling_started
        return elapsed * (1 - done) / done

    def html(self) -> str:
        """The progress bar with its text."""
        s = self.settings
        percent = 100.0 * self.fraction
        parts = []
        if self.step is not None and self.state in ("running", "cancelled", "failed"):
            parts.append(f"Section {self.step.section} of {self.step.sections}")
            parts.append(f"step {self.step.step} of {self.step.steps}")
        elif self.state == "finished":
            parts.append(f"{s.sections} of {s.sections} sections")
        parts.append(f"{self.frames} frames ({self.frames / VIDEO_FPS:.2f} s of video) so far"
                     if self.state != "finished" else f"{self.frames} frames ({self.frames / VIDEO_FPS:.2f} s of video)")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"about {format_duration(left)} left")
        elif self.state == "running":
            parts.append("estimating time left")
        detail = " · ".join(parts)
        step = self.step
        data = (
            f'data-state="{self.state}" data-percent="{percent:.1f}" data-frames="{self.frames}" '
            f'data-step="{step.step if step else 0}" data-section="{step.section if step else 0}" '
            f'data-position="{self.position or 0}"'
        )
        colour = {"failed": "#dc2626", "cancelled": "#a3a3a3", "finished": "#16a34a"}.get(self.state, "#f97316")
        return (
            f'<div class="fp-progress" {data}>'
            f'<div class="fp-progress-message" style="font-weight:600;margin-bottom:4px">{html.escape(self.message)}</div>'
            f'<div role="progressbar" aria-label="Generation progress" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{percent:.0f}" style="height:12px;border-radius:6px;background:rgba(127,127,127,.25);overflow:hidden">'
            f'<div class="fp-progress-fill" style="width:{percent:.1f}%;height:100%;background:{colour};transition:width .3s"></div>'
            f"</div>"
            f'<div class="fp-progress-detail" style="margin-top:4px;font-size:.9em;opacity:.85">{html.escape(detail)}</div>'
            + "".join(f'<div class="fp-progress-notice" style="margin-top:4px;font-size:.9em">Note: {html.escape(n)}</div>'
                      for n in self.notices)
            + "</div>"
        )


def idle_html(message: str = "Upload an image, write a prompt and press Start Generation.") -> str:
    """The progress area before any job."""
    return f'<div class="fp-progress" data-state="idle"><div class="fp-progress-message">{html.escape(message)}</div></div>'


def format_duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def enlarge_preview(preview: np.ndarray, height: int = PREVIEW_HEIGHT) -> np.ndarray:
    """Blow a small latent preview up by a whole factor (nearest neighbour), to about `height` rows."""
    factor = max(1, height // max(preview.shape[0], 1))
    return np.repeat(np.repeat(preview, factor, axis=0), factor, axis=1)


class VideoSnapshots:
    """Links of the partial videos a page shows, in a temporary folder of the app.

    The pipeline deletes a section's partial MP4 once the next one is written; the page copies a
    video only after the handler yields it, so it gets a link made the moment the event arrives.
    """

    def __init__(self) -> None:
        self._folder: Optional[Path] = None
        self._lock = threading.Lock()
        self._count = 0

    def take(self, video: Path) -> Optional[Path]:
        """A private link (or copy) of `video`, or None when it is already gone."""
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="framepack-app-"))
                # removed at the latest when the app exits
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
            self._count += 1
            target = self._folder / f"{self._count:06d}-{Path(video).name}"
        try:
            os.link(video, target)
        except FileNotFoundError:
            return None
        except OSError:
            try:
                shutil.copyfile(video, target)
            except FileNotFoundError:
                return None
        return target

    @staticmethod
    def drop(path: Optional[Path]) -> None:
        """Remove a link once the page has its copy."""
        if path is not None:
            Path(path).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder."""
        if self._folder is not None:
            self._cleanup()
            self._folder = None


class JobView:
    """One page's view of its job: turns batches of events into updates of the page's outputs."""

    def __init__(self, settings: GenerationSettings, snapshots: VideoSnapshots):
        self.progress = ProgressView(settings)
        self.snapshots = snapshots
        self.ended = False
        self.failure: Optional[str] = None
        self._showing: Optional[Path] = None  # link of the partial video on the page
        self._stale: list[Path] = []

    def take(self, events) -> tuple[Any, Any, Any]:
        """(latest video, preview, final video) updates for a batch of events; gr.skip() where unchanged."""
        latest: Any = gr.skip()
        picture: Any = gr.skip()
        final: Any = gr.skip()
        self.failure = None
        for event in events:
            self.progress.update(event)
            if isinstance(event, StepProgress) and event.preview is not None:
                picture = enlarge_preview(event.preview)
            elif isinstance(event, Stage) and event.name == "notice":
                gr.Info(event.message)
            elif isinstance(event, SectionDone):
                link = self.snapshots.take(event.video_path)
                if link is not None:
                    if self._showing is not None:
                        self._stale.append(self._showing)
                    self._showing = link
                    latest = str(link)
            elif isinstance(event, (Finished, Cancelled, Failed)):
                self.ended = True
                if isinstance(event, Failed):
                    self.failure = event.message
                if event.video_path is not None:
                    latest = final = str(event.video_path)
        return latest, picture, final

    def shown(self) -> None:
        """The page has copied what was yielded: links it no longer shows can go."""
        for path in self._stale:
            self.snapshots.drop(path)
        self._stale.clear()

    def close(self) -> None:
        """Remove every link of this job."""
        self.shown()
        self.snapshots.drop(self._showing)
        self._showing = None


# ---------------------------------------------------------------------------------------------
# The page


def settings_from_form(values: dict[str, Any]) -> GenerationSettings:
    """Validated settings from the form's values; SettingsError says what is wrong."""
    return GenerationSettings(**values)


def load_start_image(image: Any) -> np.ndarray:
    """The uploaded start image as RGB, or a user-facing error."""
    from .conditioning import load_image

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
                from .conditioning import MAX_IMAGE_PIXELS

                raise gr.Error(f"{name} is too large to process safely; use an image under "
                               f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels.", title="Image too large",
                               print_exception=False) from None
            raise gr.Error(f"{name} is not an image PIL can read ({type(exc).__name__}); upload a PNG, JPEG or WebP.",
                           title="Not an image", print_exception=False) from None

    component.preprocess = checked
    return component


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


def build_app(config: Optional[AppConfig] = None) -> gr.Blocks:
    """The page, wired to a new job queue; nothing is loaded until the first job starts."""
    config = config or AppConfig()
    d = config.defaults
    models = ModelCache(config.sources, config.device, attention=config.attention)
    runner = FramePackRunner(models, Path(config.outputs), vram=config.vram)
    jobs = JobQueue(runner)
    snapshots = VideoSnapshots()
    outputs_dir = Path(config.outputs)
    resuming = threading.Lock()  # two pages pressing Resume on the same job at once start it once
    # A job killed with the app (power loss, closed window) is offered for resuming when it starts again.
    interrupted_at_start = [item for item in list_outputs(outputs_dir) if item.resumable and item.status == "running"]

    with gr.Blocks(title="FramePack", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("# FramePack\nTurn one image into a video, section by section. "
                    "The video grows while you watch; End Generation keeps what is finished.")
        with gr.Row():
            with gr.Column(scale=1):
                image = report_unreadable_images(gr.Image(
                    label="Image", type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
                    height=320, elem_id="fp-image"))
                prompt = gr.Textbox(label="Prompt", value=d.prompt, lines=2, elem_id="fp-prompt",
                                    placeholder="Describe the motion, e.g. “The man dances energetically.”")
                examples = gr.Dataset(label="Example prompts (click one to use it)", components=[prompt],
                                      samples=[[p] for p in EXAMPLE_PROMPTS], samples_per_page=len(EXAMPLE_PROMPTS))
                model = gr.Radio(label="Model", choices=[(display_name(m), m) for m in MODEL_VARIANTS],
                                 value=d.model, elem_id="fp-model")
                model_help = gr.Markdown(f"{MODEL_HELP[d.model]}\n\n{MODEL_SWITCH_NOTE}")
                with gr.Row():
                    start = gr.Button("Start Generation", variant="primary", elem_id="fp-start")
                    end = gr.Button("End Generation", variant="stop", interactive=False, elem_id="fp-end")
                with gr.Group():
                    teacache = gr.Checkbox(label="Use TeaCache", value=d.teacache,
                                           info="Skips transformer work on steps that change little: about twice as fast, small details can suffer.")
                    with gr.Row(equal_height=True):
                        seed = gr.Number(label="Seed", value=d.seed, precision=0, minimum=0, scale=4, elem_id="fp-seed")
                        randomize = gr.Button("Random seed", scale=1, size="sm")
                    seconds = slider("seconds", "Total Video Length (Seconds)", d.seconds, elem_id="fp-seconds")
                    steps = slider("steps", "Steps", d.steps, info="The released models were tuned for 25.")
                    distilled_cfg = slider("distilled_cfg", "Distilled CFG Scale", d.distilled_cfg,
                                           info="The released models were distilled for 10.")
                    gpu_memory = slider("gpu_memory_preservation", "GPU Inference Preserved Memory (GB)",
                                        d.gpu_memory_preservation,
                                        info="Memory kept free for the computation when models are streamed; raise it after an out-of-memory error (slower).")
                    crf = slider("crf", "MP4 Compression", d.crf,
                                 info="H.264 quality: lower is better and larger; 0 and 1 give the same result (the browser-safe best).")
                with gr.Accordion("Advanced", open=False):
                    negative_prompt = gr.Textbox(label="Negative Prompt", value=d.negative_prompt,
                                                 info="Only used when CFG Scale is above 1.")
                    cfg = slider("cfg", "CFG Scale", d.cfg, info="Real guidance; above 1 doubles the time per step.")
                    cfg_rescale = slider("cfg_rescale", "CFG Re-Scale", d.cfg_rescale)
                    window = slider("window", "Latent Window Size", d.window,
                                    info="Latent frames per section (4 video frames each).")
                    resolution = slider("resolution", "Resolution", d.resolution,
                                        info="The image is fitted to the nearest bucket of about this size.")
                    sampler = gr.Radio(label="Sampler variant (UniPC)", choices=list(SAMPLER_VARIANTS), value=d.sampler)
            with gr.Column(scale=1):
                latest = gr.Video(label="Latest video (updated after every section)", autoplay=True, loop=True,
                                  interactive=False, height=360, elem_id="fp-latest")
                preview = gr.Image(label="Latent preview of the step in progress", interactive=False, format="png",
                                   height=PREVIEW_HEIGHT + 40, elem_id="fp-preview")
                progress = gr.HTML(idle_html(), elem_id="fp-progress")
                final = gr.Video(label="Final video", autoplay=False, loop=True, interactive=False,
                                 height=360, elem_id="fp-final")
        with gr.Accordion("Past outputs", open=bool(interrupted_at_start), elem_id="fp-past-outputs"):
            if interrupted_at_start:
                count = len(interrupted_at_start)
                gr.Markdown(f"**{count} job{'s were' if count != 1 else ' was'} interrupted** (marked *interrupted* "
                            "below). Choose one and press Resume to continue it from its last finished section.")
            with gr.Row(equal_height=True):
                past = gr.Dropdown(label="Past outputs, newest first", choices=[], value=None, scale=5,
                                   allow_custom_value=True,  # the handlers check the name against the folder
                                   elem_id="fp-past")
                refresh = gr.Button("Refresh list", scale=1)
            with gr.Row():
                past_video = gr.Video(label="Past output", loop=True, interactive=False, height=320)
                past_settings = gr.JSON(label="Its settings")
            with gr.Row():
                load_settings = gr.Button("Load these settings and start image into the form")
                resume_button = gr.Button("Resume this job", interactive=False, elem_id="fp-resume")

        form = dict(prompt=prompt, model=model, seed=seed, seconds=seconds, steps=steps, distilled_cfg=distilled_cfg,
                    gpu_memory_preservation=gpu_memory, crf=crf, teacache=teacache, negative_prompt=negative_prompt,
                    cfg=cfg, cfg_rescale=cfg_rescale, window=window, resolution=resolution, sampler=sampler)
        form_inputs = [form[name] for name in FORM_FIELDS]
        for name in FORM_FIELDS:
            if name not in ("prompt", "negative_prompt"):
                checked_by_settings(form[name])

        # -- generation ------------------------------------------------------------------------

        locked = (gr.update(interactive=False), gr.update(interactive=True))
        unlocked = (gr.update(interactive=True), gr.update(interactive=False))

        def run_generation(image, prompt, model, seed, seconds, steps, distilled_cfg, gpu_memory_preservation, crf,
                           teacache, negative_prompt, cfg, cfg_rescale, window, resolution, sampler,
                           request: gr.Request):
            """Start a job and stream it: (latest video, preview, progress, final video, Start, End) updates."""
            values = dict(prompt=prompt, model=model, seed=seed, seconds=seconds, steps=steps, distilled_cfg=distilled_cfg,
                          gpu_memory_preservation=gpu_memory_preservation, crf=crf, teacache=teacache,
                          negative_prompt=negative_prompt, cfg=cfg, cfg_rescale=cfg_rescale, window=window,
                          resolution=resolution, sampler=sampler)
            # 1. Check the user's input; a mistake is a message, and Start was never disabled.
            pixels = load_start_image(image)
            try:
                settings = settings_from_form(values)
            except ValueError as exc:
                raise gr.Error(str(exc), title="Invalid setting", print_exception=False) from None

            # 2. Queue the job; this page's End and a closed tab find it by the session.
            try:
                job = jobs.submit(JobRequest(settings, pixels), owner=getattr(request, "session_hash", None))
            except BusyError as exc:
                raise gr.Error(str(exc), title="Busy", print_exception=False) from None
            yield from stream_job(job, settings)

        def stream_job(job: Job, settings: GenerationSettings):
            """Stream a queued job's events until its last one, as updates of the page's outputs."""
            view = JobView(settings, snapshots)
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
                    jobs.cancel(job)
                view.close()

        def resume_generation(stem: Optional[str], request: gr.Request):
            """Continue an interrupted or ended job from its last finished section, streamed like Start."""
            from .pipeline import load_resume_state

            item = find_past(stem)
            if item is None:
                raise gr.Error("Choose an interrupted job in the list first.", print_exception=False)
            output = outputs_dir / f"{item.stem}.mp4"
            with resuming:
                if output in busy_outputs():
                    raise gr.Error(f"{item.stem} is being generated right now.", title="Busy", print_exception=False)
                try:
                    state = load_resume_state(output)
                except ValueError as exc:
                    raise gr.Error(str(exc), title="Can't resume", print_exception=False) from None
                try:
                    job = jobs.submit(JobRequest(state.settings, None, resume=output),
                                      owner=getattr(request, "session_hash", None))
                except BusyError as exc:
                    raise gr.Error(str(exc), title="Busy", print_exception=False) from None
            yield from stream_job(job, state.settings)

        def busy_outputs() -> set[Path]:
            """Final video paths of the jobs queued or running in this app."""
            busy = {job.request.resume for job in jobs.active() if job.request.resume is not None}
            if runner.running is not None:
                busy.add(runner.running)
            return busy

        def end_generation(request: gr.Request) -> None:
            """Stop this page's job (queued or running); finished sections are kept."""
            owner = getattr(request, "session_hash", None)
            if owner is None or jobs.cancel_owner(owner) == 0:
                gr.Info("Nothing is running on this page.")

        start.click(
            run_generation, inputs=[image, *form_inputs], outputs=[latest, preview, progress, final, start, end],
            api_name="generate", concurrency_limit=None, show_progress="hidden",
        ).then(lambda stem: past_choices(stem), inputs=past, outputs=past, api_visibility="private")
        resume_button.click(
            resume_generation, inputs=past, outputs=[latest, preview, progress, final, start, end],
            api_name="resume", concurrency_limit=None, show_progress="hidden",
        ).then(lambda stem: past_choices(stem), inputs=past, outputs=past, api_visibility="private")
        end.click(end_generation, outputs=None, api_name="end", concurrency_limit=None, show_progress="hidden")

        def page_closed(request: gr.Request) -> None:
            # A closed or reloaded tab ends its job like End would; finished sections stay on disk.
            owner = getattr(request, "session_hash", None)
            if owner is not None:
                jobs.cancel_owner(owner)

        demo.unload(page_closed)

        # -- small helpers on the form ---------------------------------------------------------

        examples.click(lambda sample: sample[0], inputs=examples, outputs=prompt, api_visibility="private", queue=False)
        randomize.click(lambda: secrets.randbelow(2**32), outputs=seed, api_visibility="private", queue=False)
        model.change(lambda m: f"{MODEL_HELP.get(m, '')}\n\n{MODEL_SWITCH_NOTE}", inputs=model, outputs=model_help,
                     api_visibility="private", queue=False)

        # -- past outputs ----------------------------------------------------------------------

        def past_choices(selected: Optional[str] = None):
            items = list_outputs(outputs_dir)
            names = [item.stem for item in items]
            busy = {path.name[: -len(".mp4")] for path in busy_outputs()}
            return gr.update(choices=[(item.describe(running=item.stem in busy), item.stem) for item in items],
                             value=selected if selected in names else None)

        def find_past(stem: Optional[str]):
            if not stem:
                return None
            # Only names from the folder's listing: a request cannot point outside the outputs folder.
            if not isinstance(stem, str) or Path(stem).name != stem or stem.startswith(".") or "\\" in stem:
                raise gr.Error("Unknown output.", print_exception=False)
            item = read_output(outputs_dir / f"{stem}.json")
            if item is None:
                raise gr.Error(f"{stem} is no longer in the outputs folder; press Refresh list.", print_exception=False)
            return item

        def show_past(stem: Optional[str]):
            item = find_past(stem)
            if item is None:
                return None, None, gr.update(interactive=False)
            return (str(item.video) if item.video else None), item.record, gr.update(interactive=item.resumable)

        def load_past(stem: Optional[str]):
            item = find_past(stem)
            if item is None:
                raise gr.Error("Choose a past output first.", print_exception=False)
            try:
                settings = GenerationSettings.from_dict(
                    {k: v for k, v in item.settings.items() if k in GenerationSettings.__dataclass_fields__})
            except ValueError as exc:
                raise gr.Error(f"Its settings cannot be used: {exc}", print_exception=False) from None
            values = settings.to_dict()
            image_value = str(item.input_image) if item.input_image else gr.skip()
            return (image_value, *[values[name] for name in FORM_FIELDS])

        refresh.click(lambda stem: past_choices(stem), inputs=past, outputs=past, api_name="list_outputs")
        past.change(show_past, inputs=past, outputs=[past_video, past_settings, resume_button], api_name="show_output")
        load_settings.click(load_past, inputs=past, outputs=[image, *form_inputs], api_name="load_settings")
        demo.load(past_choices, outputs=past, api_visibility="private")

    demo.job_queue = jobs  # for the caller's shutdown and for tests
    demo.snapshots = snapshots
    return demo
