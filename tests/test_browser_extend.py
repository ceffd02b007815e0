"""Extend this video in a real browser: a past FramePack-F1 output is made 0.8 s longer from the page.

The past output is made directly into the outputs folder; the app then starts on that folder. In
headless Chromium the Past outputs list offers it, Extend this video runs, the progress area and
the final `<video>` show the longer video, and its latents equal those of the same job made that
long in the first place. Needs Playwright and Chromium like tests/test_browser.py, and skips (or
fails under FRAMEPACK_REQUIRE_BROWSER=1) for the same reasons. The /extend endpoint is also called
over HTTP with a video from elsewhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from appkit import chromium_page, final_video, running_app, save_noise_image, wait_for_final_video
from diffusers_helper.events import Finished
from diffusers_helper.pipeline import generate
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames

# the app, a fresh process or a browser per test: run with the full suite, not the quick one
pytestmark = pytest.mark.slow

SETTINGS = GenerationSettings(prompt="waves roll in", model="f1", seconds=1.2, window=3, steps=1, resolution=64,
                              seed=9, cache="none")
STEM = "2025-02-03_04-05-06-789"
TIMEOUT_MS = 180_000


def test_a_past_output_is_extended_from_the_page(browser_ready, tiny_sources, tiny_components, tmp_path):
    image = tmp_path / "start.png"
    save_noise_image(image, seed=5, size=(64, 64))
    components = tiny_components("f1")
    outputs = tmp_path / "outputs"
    assert isinstance(list(generate(components, SETTINGS, image, outputs / f"{STEM}.mp4"))[-1], Finished)
    longer = SETTINGS.replace(seconds=2.0)
    assert isinstance(list(generate(components, longer, image, tmp_path / "longer" / "longer.mp4"))[-1], Finished)

    with running_app(outputs, tiny_sources) as (url, _demo), chromium_page(tmp_path / "chromium-profile",
                                                                           height=1600) as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.click("#fp-past-outputs button")  # open the accordion
        page.click("#fp-past input")
        page.locator("li", has_text=SETTINGS.prompt).first.click()
        page.wait_for_function("() => document.querySelector('#fp-past input').value.includes('waves')",
                               timeout=30_000)
        seconds = page.locator("#fp-extend-seconds input")
        seconds.fill("0.8")
        seconds.press("Tab")
        page.click("#fp-extend-button")
        wait_for_final_video(page, TIMEOUT_MS)
        text = page.inner_text("#fp-progress")
        duration = page.evaluate("() => document.querySelector('#fp-final video').duration")
        page.click("#fp-past input")  # the list now offers the new video too
        page.wait_for_function(f"() => [...document.querySelectorAll('li')].filter(li => "
                               f"li.innerText.includes('{SETTINGS.prompt}')).length === 2", timeout=30_000)
    
    assert f"{longer.total_frames} frames" in text, text
    assert abs(duration - longer.total_frames / 30) < 0.1
    assert not errors, errors
    made = [p for p in outputs.glob("*.mp4") if p.name != f"{STEM}.mp4"]
    assert len(made) == 1
    record = json.loads(made[0].with_suffix(".json").read_text())
    assert record["extends"]["video"] == f"{STEM}.mp4" and record["extends"]["mode"] == "continue"
    latents = load_file(str(made[0].with_suffix(".latents.safetensors")))["history_latents"]
    assert torch.equal(latents, load_file(str(tmp_path / "longer" / "longer.latents.safetensors"))["history_latents"])
    assert np.array_equal(read_frames(made[0]), read_frames(tmp_path / "longer" / "longer.mp4"))


def test_the_extend_endpoint_takes_a_video_from_elsewhere(tiny_sources, tmp_path):
    from gradio_client import Client, handle_file

    from appkit import form
    from test_extend import write_video

    clip = tmp_path / "clip.webm"
    write_video(clip, 15, 25, 90, 70, codec="libvpx-vp9")
    outputs = tmp_path / "outputs"
    with running_app(outputs, tiny_sources, show_error=True) as (url, _demo):
        client = Client(url, verbose=False)
        result = client.predict(None, handle_file(str(clip)), 1.0, "the tide turns", None,
                                *form(SETTINGS.replace(model="framepack")), api_name="/extend")
        video = final_video(result[:4])
        with pytest.raises(Exception, match="not a video"):
            client.predict(None, handle_file(str(text_named_like_a_video(tmp_path))), 1.0, "", None,
                           *form(SETTINGS), api_name="/extend")
    frames = read_frames(video)
    # 15 frames at 25 fps are 18 at 30 fps; 0.6 s + 1 s is round(1.6 / 0.4) = 4 sections, 2 of them new
    assert len(frames) == 18 + 2 * 12 and frames.shape[1:3] == (48, 64)
    made = list(outputs.glob("*.json"))
    assert len(made) == 1 and json.loads(made[0].read_text())["settings"]["prompt"] == "the tide turns"


def text_named_like_a_video(folder):
    """A text file named like a video."""
    path = folder / "fake.mp4"
    path.write_text("this is not a video")
    return path


def test_the_extend_endpoint_reads_only_past_outputs_and_uploads(tiny_sources, tmp_path):
    from gradio_client import Client

    from appkit import call_raw, form
    from test_extend import write_video

    secret = tmp_path / "secret.mp4"
    write_video(secret, 5, 30, 64, 48, codec="libx264")
    outputs = tmp_path / "outputs"
    with running_app(outputs, tiny_sources, show_error=True) as (url, _demo):
        client = Client(url, verbose=False)
        for stem in ("../secret", str(secret.with_suffix("")), "..", ".hidden", "escape/secret"):
            with pytest.raises(Exception, match="Unknown output|no longer in the outputs folder"):
                client.predict(stem, None, 1, "", "", *form(SETTINGS), api_name="/extend")
        # a video input that is a path on the server, not an upload (sent by hand: the client would upload it)
        body = json.dumps({"data": [None, {"path": str(secret), "meta": {"_type": "gradio.FileData"}}, 1, "", "",
                                    *form(SETTINGS)]})
        event, data = call_raw(url, "extend", body)
        assert event == "error" and "refused" in json.dumps(data), data
    assert not list(outputs.glob("*.mp4")) and not list(outputs.glob("*.json"))
