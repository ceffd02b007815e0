"""The page's Extend controls, under Past outputs: S more seconds after a past output or an uploaded video.

A past output goes on with its own model and settings (FramePack-F1 exactly as if it had been
made that much longer); the prompt and the seed can be changed here. A video from elsewhere is
extended with the form's settings (model, prompt, seed, steps, ...). The job is streamed like
Start Generation's (`Page.stream`); a user's mistake is a gr.Error and nothing is written. The
handler, `extend_video`, is a plain function a test can call; its endpoint is `/extend`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from ..jobs import BusyError, JobRequest
from .views import with_endpoint_signature

# The /extend endpoint's inputs before the form's.
EXTEND_FIELDS = ("output", "video", "extend_seconds", "extend_prompt", "extend_seed")
DEFAULT_SECONDS = 5.0
EXTEND_HELP = (
    "**Extend a video**: add seconds after its end. Choose one of your past outputs above, or upload a video "
    "from elsewhere (MP4, WebM, MOV; any size and frame rate: it is fitted to the nearest size and re-timed to "
    "30 fps). A past output goes on with its own model and settings; FramePack-F1 continues exactly as if the "
    "video had been made that much longer. An uploaded video is extended with the settings of the form above. "
    "The new video starts with the old one's frames; the old file is never changed.")


def extend_controls(c: SimpleNamespace) -> None:
    """The Extend controls (inside the Past outputs accordion)."""
    with gr.Group(elem_id="fp-extend"):
        gr.Markdown(EXTEND_HELP)
        with gr.Row():
            c.extend_upload = gr.Video(label="Or a video from elsewhere (leave empty to extend the past output above)",
                                       sources=["upload"], format=None, height=220, elem_id="fp-extend-video")
            with gr.Column():
                c.extend_seconds = gr.Number(label="Seconds to add", value=DEFAULT_SECONDS, elem_id="fp-extend-seconds")
                c.extend_prompt = gr.Textbox(label="Prompt (empty: a past output keeps its own; times count from the "
                                                   "video's start)", lines=2, elem_id="fp-extend-prompt")
                # text, so that it can be empty (a number field sends 0)
                c.extend_seed = gr.Textbox(label="Seed (empty: a past output goes on with its own random sequence)",
                                           value="", max_lines=1, elem_id="fp-extend-seed")
                c.extend_button = gr.Button("Extend this video", elem_id="fp-extend-button")
    # handed on unchanged: the settings say what is wrong and what is allowed (Gradio would round or refuse)
    c.extend_seconds.preprocess = lambda payload: payload


def extend_video(page, stem: Optional[str], upload: Any, seconds: Any, prompt: Optional[str], seed: Any,
                 values: dict[str, Any], owner: Optional[str],
                 settings_from_form: Callable[[dict], Any]) -> Iterator[tuple]:
    """Extend the uploaded video, else the past output `stem`, and stream the job like Start Generation."""
    from ..extend import plan_extension

    changes: dict[str, Any] = {}
    if prompt and prompt.strip():
        changes["prompt"] = prompt
    if seed is not None and str(seed).strip():
        changes["seed"] = str(seed).strip()
    if upload:
        video = upload
        try:
            defaults = settings_from_form(values)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid setting", print_exception=False) from None
    else:
        video, defaults = _past_video(page, stem), None
    try:
        extension = plan_extension(video, seconds, changes, defaults=defaults)
        extension = page.runtime.extension_loras(extension)
        page.runtime.check_loras(extension.settings.model, extension.settings.loras)
    except ValueError as exc:
        raise gr.Error(str(exc), title="Can't extend this video", print_exception=False) from None
    try:
        job = page.jobs.submit(JobRequest(extension.settings, None, extend=extension), owner=owner)
    except BusyError:
        raise gr.Error("This page already has a generation queued or running; wait for it or press End Generation.",
                       title="Busy", print_exception=False) from None
    yield from page.stream(job, extension.settings)


def _past_video(page, stem: Optional[str]):
    """The video of the chosen past output (its latest partial when it did not finish)."""
    item = page.find_past(stem)
    if item is None:
        raise gr.Error("Choose a past output above, or upload a video, first.", title="No video", print_exception=False)
    if item.video is None:
        raise gr.Error(f"{item.stem} has no video yet.", title="No video", print_exception=False)
    if item.running or item.video.with_name(f"{item.stem}.mp4") in page.busy_outputs():
        raise gr.Error(f"{item.stem} is being generated right now; extend it once it has finished.", title="Busy",
                       print_exception=False)
    return item.video


def wire_extend(page, c: SimpleNamespace, form_fields: tuple[str, ...],
                settings_from_form: Callable[[dict], Any]) -> None:
    """Connect the Extend button (endpoint `/extend`) to `extend_video`; the job streams into the page's outputs."""

    def call(*args):
        *values, request = args
        stem, upload, seconds, prompt, seed, *form = values
        yield from extend_video(page, stem, upload, seconds, prompt, seed, dict(zip(form_fields, form)),
                                getattr(request, "session_hash", None), settings_from_form)

    with_endpoint_signature(call, (*EXTEND_FIELDS, *form_fields))
    inputs = [c.past, c.extend_upload, c.extend_seconds, c.extend_prompt, c.extend_seed,
              *[c.form[name] for name in form_fields]]
    streamed = [c.latest, c.preview, c.progress, c.final, c.start, c.end]
    c.extend_button.click(call, inputs=inputs, outputs=streamed, api_name="extend", concurrency_limit=None,
                          show_progress="hidden").then(
        page.past_choices, inputs=c.past, outputs=c.past, api_visibility="private")
