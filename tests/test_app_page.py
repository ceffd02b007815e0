"""The page's handlers called alone, without a server: each is a plain method of `app.ui.Page`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from diffusers_helper.app.ui import FORM_FIELDS, AppConfig, Page, form_handler, form_values, settings_from_form
from diffusers_helper.app.views import ProgressView, describe_failure
from diffusers_helper.events import Advice, Failed, Notice, Stage
from diffusers_helper.settings import GenerationSettings


@pytest.fixture
def page(tmp_path, tiny_sources):
    page = Page(AppConfig(outputs=tmp_path / "outputs", sources=tiny_sources, device="cpu"))
    yield page
    page.jobs.close()
    page.snapshots.close()


def _past_job(folder, stem, settings: GenerationSettings, status="finished"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps({"settings": settings.to_dict(), "model": settings.model,
                                                     "status": status}))
    Image.new("RGB", (64, 48)).save(folder / f"{stem}.png")
    (folder / f"{stem}.mp4").write_bytes(b"mp4")


def test_form_handler_passes_each_form_field_by_name_and_the_session(page):
    seen = []

    def handler(image, values, owner):
        seen.append((image, values, owner))
        yield "done"

    call = form_handler(handler)
    values = [f"value of {name}" for name in FORM_FIELDS]
    assert list(call("img.png", *values, SimpleNamespace(session_hash="tab-1"))) == ["done"]
    assert seen == [("img.png", dict(zip(FORM_FIELDS, values)), "tab-1")]
    # what Gradio reads: one parameter per input, named as the API documents them, then the request
    import inspect

    params = inspect.signature(call).parameters
    assert list(params) == ["image", *FORM_FIELDS, "request"]
    assert call.__annotations__["request"] is gr.Request


def test_a_mistake_in_the_form_is_a_message_and_queues_nothing(page):
    values = {**form_values(GenerationSettings()), "steps": 0}
    with pytest.raises(gr.Error, match="steps"):
        next(page.generate(np.zeros((64, 64, 3), dtype=np.uint8), values, "tab-1"))
    with pytest.raises(gr.Error, match="start image"):
        next(page.generate(None, {**values, "steps": 25}, "tab-1"))
    with pytest.raises(gr.Error, match="Keyframe 2 has an image but no time"):
        next(page.generate(None, {**values, "steps": 25, "text_to_video": True, "keyframe2_image": "k.png"}, "tab-1"))
    with pytest.raises(gr.Error, match="keyframe at 0.5 s"):
        next(page.generate(None, {**values, "steps": 25, "text_to_video": True, "keyframe1_image": "gone.png",
                                  "keyframe1_time": 0.5}, "tab-1"))
    assert page.jobs.active() == []


def test_past_outputs_list_show_and_load_back_into_the_form(page):
    settings = GenerationSettings(prompt="a boat", model="f1", seed=9, steps=7, sampler="bh2")
    _past_job(page.outputs, "2025-05-01_12-30-05-123", settings)
    listing = page.past_choices()
    assert [value for _, value in listing["choices"]] == ["2025-05-01_12-30-05-123"]
    assert "FramePack-F1" in listing["choices"][0][0] and "a boat" in listing["choices"][0][0]
    video, record, resume = page.show_past("2025-05-01_12-30-05-123")
    assert video.endswith(".mp4") and record["settings"]["seed"] == 9 and resume["interactive"] is False
    image, *values = page.load_past("2025-05-01_12-30-05-123")
    assert image.endswith("2025-05-01_12-30-05-123.png")
    assert dict(zip(FORM_FIELDS, values)) == form_values(settings)


def test_past_output_names_cannot_leave_the_folder(page):
    for name in ("../secrets", ".hidden", "a\\b", "/etc/passwd"):
        with pytest.raises(gr.Error, match="Unknown output"):
            page.find_past(name)
    with pytest.raises(gr.Error, match="no longer in the outputs folder"):
        page.find_past("2030-01-01_00-00-00-000")
    assert page.find_past(None) is None
    with pytest.raises(gr.Error, match="Choose a past output"):
        page.load_past(None)


def test_the_page_words_failures_and_notices_in_its_own_terms():
    view = ProgressView(GenerationSettings())
    view.update(Stage("loading", "Loading the FramePack transformer"))
    assert view.state == "loading"
    view.update(Notice("The prompt is longer than 256 tokens; the rest was cut off."))
    assert view.notices and view.state == "loading"  # a notice changes nothing else
    failed = Failed("Out of memory; finished sections were kept.",
                    advice=(Advice.CLOSE_GPU_PROGRAMS, Advice.PRESERVE_MORE_MEMORY, Advice.SMALLER_JOB))
    view.update(failed)
    assert view.state == "failed" and view.message == describe_failure(failed)
    assert "GPU Inference Preserved Memory" in view.message and "--gpu-memory-preservation" not in view.message
    assert "Preserved Memory" in view.html()


def test_a_second_job_from_the_same_page_is_refused_in_the_pages_words(page):
    import threading

    from diffusers_helper.jobs import JobQueue, JobRequest

    gate = threading.Event()

    def runner(job):
        gate.wait(30)
        return iter([Failed("stopped by the test")])

    page.jobs.close()
    page.jobs = JobQueue(runner)
    request = JobRequest(GenerationSettings(), np.zeros((64, 64, 3), dtype=np.uint8))
    page._submit(request, "tab-1")
    try:
        with pytest.raises(gr.Error, match="press End Generation"):
            page._submit(request, "tab-1")
        page._submit(request, "tab-2")  # another page may queue its own
    finally:
        gate.set()


def test_a_past_jobs_end_frame_and_keyframes_load_back_as_their_saved_copies(page):
    settings = GenerationSettings(prompt="[0s: a] [2s: b]", seconds=5, end_image="end.png", end_strength=0.5,
                                  keyframes=((2.5, "k.png"),))
    stem = "2025-05-01_12-30-05-123"
    folder = page.outputs
    _past_job(folder, stem, settings)
    record = json.loads((folder / f"{stem}.json").read_text())
    record["settings"]["end_image"], record["settings"]["keyframes"] = f"{stem}.end.png", [[2.5, f"{stem}.keyframe1.png"]]
    (folder / f"{stem}.json").write_text(json.dumps(record))
    for name in (f"{stem}.end.png", f"{stem}.keyframe1.png"):
        Image.new("RGB", (64, 48)).save(folder / name)
    _, *values = page.load_past(stem)
    values = dict(zip(FORM_FIELDS, values))
    assert values["end_image"] == str(folder / f"{stem}.end.png") and values["end_strength"] == 0.5
    assert (values["keyframe1_image"], values["keyframe1_time"]) == (str(folder / f"{stem}.keyframe1.png"), 2.5)
    assert values["keyframe2_image"] is None and values["prompt"] == "[0s: a] [2s: b]"
    # and back: the form's values give the same settings, with the copies as the images
    again = settings_from_form(values)
    assert again.keyframes == ((2.5, str(folder / f"{stem}.keyframe1.png")),) and again.prompt == settings.prompt


def test_the_progress_area_names_each_sections_prompt_and_anchor():
    from diffusers_helper.events import SectionStarted

    view = ProgressView(GenerationSettings())
    view.update(Stage("sampling", "Sampling section 1 of 4"))
    view.update(SectionStarted(section=1, sections=4, time_index=3, prompt="the cat jumps", anchor="keyframe1",
                               anchor_seconds=2.5, blend_from="a cat sits", blend=0.5))
    assert "“a cat sits” → “the cat jumps” (50%)" in view.html() and "keyframe 1 (2.5 s)" in view.html()
    view.update(SectionStarted(section=2, sections=4, time_index=2, prompt="a cat sits", anchor="start"))
    assert "Prompt: “a cat sits” · anchor: the start image" in view.html()
