"""The Resume control in a real browser: an interrupted job is offered on the next start and finishes.

A job is cut after its first section and its sidecar left saying "running", exactly as a killed
process leaves it; the app then starts on that outputs folder. In headless Chromium the page
says a job was interrupted, the past-outputs list marks it, Resume continues it, and the final
video plays; its latents equal those of the same job run without interruption.
Needs Playwright and Chromium like tests/test_browser.py, and skips (or fails under
FRAMEPACK_REQUIRE_BROWSER=1) for the same reasons.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from appkit import chromium_page, running_app, save_noise_image, wait_for_final_video
from diffusers_helper.events import CancelToken, Finished, SectionDone
from diffusers_helper.pipeline import generate
from diffusers_helper.settings import GenerationSettings

# the app, a fresh process or a browser per test: run with the full suite, not the quick one
pytestmark = pytest.mark.slow

SETTINGS = GenerationSettings(prompt="the tide comes in", seconds=1.2, window=3, steps=1, resolution=64, seed=8,
                              cache="none")
STEM = "2025-01-02_03-04-05-678"
TIMEOUT_MS = 180_000


def test_an_interrupted_job_is_resumed_from_the_page(browser_ready, tiny_sources, tiny_components, tmp_path):
    image = tmp_path / "start.png"
    save_noise_image(image, seed=4, size=(64, 64))
    components = tiny_components("framepack")
    whole = tmp_path / "whole" / "whole.mp4"
    assert isinstance(list(generate(components, SETTINGS, image, whole))[-1], Finished)

    outputs = tmp_path / "outputs"
    cancel = CancelToken()
    for event in generate(components, SETTINGS, image, outputs / f"{STEM}.mp4", cancel=cancel):
        if isinstance(event, SectionDone):
            cancel.cancel()
    sidecar = outputs / f"{STEM}.json"
    record = json.loads(sidecar.read_text())
    record.update(status="running")  # what a killed process leaves: nobody recorded the end
    sidecar.write_text(json.dumps(record))

    with running_app(outputs, tiny_sources) as (url, _demo), chromium_page(tmp_path / "chromium-profile", height=1400) as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector("text=1 job was interrupted", timeout=60_000)
        assert page.locator("#fp-resume").is_disabled()
        page.click("#fp-past input")
        option = page.locator("li", has_text="interrupted").first
        option.wait_for(timeout=30_000)
        label = option.inner_text()
        option.click()
        page.wait_for_function("() => !document.querySelector('#fp-resume').disabled", timeout=30_000)
        page.click("#fp-resume")
        wait_for_final_video(page, TIMEOUT_MS)
        text = page.inner_text("#fp-progress")
        duration = page.evaluate("() => document.querySelector('#fp-final video').duration")

    assert "can resume" in label and SETTINGS.prompt in label
    assert f"{SETTINGS.total_frames} frames" in text
    assert abs(duration - SETTINGS.total_frames / 30) < 0.1
    assert not errors, errors
    resumed = load_file(str(outputs / f"{STEM}.latents.safetensors"))["history_latents"]
    reference = load_file(str(whole.with_name("whole.latents.safetensors")))["history_latents"]
    assert torch.equal(resumed, reference)
    assert json.loads(sidecar.read_text())["status"] == "finished"
