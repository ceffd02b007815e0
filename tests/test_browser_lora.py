"""The LoRA picker in a real browser (Debian's Chromium through Playwright, as tests/test_browser.py):
pick a LoRA from the folder's list, set its weight, start, and get a playable video whose record names
the LoRA with that weight."""

from __future__ import annotations

import json

import pytest

from appkit import chromium_page, free_port, open_with_image, wait_for_final_video
from diffusers_helper.app import CSS, AppConfig, build_app, theme
from diffusers_helper.loading import load_transformer
from diffusers_helper.settings import GenerationSettings
from test_browser import PLAY, landscape
from test_lora import write_lora

pytestmark = pytest.mark.slow

SETTINGS = GenerationSettings(seconds=1, window=4, steps=2, resolution=64, seed=4, cache="none")


@pytest.fixture(scope="module")
def app(browser_ready, tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-lora")
    loras = root / "loras"
    loras.mkdir()
    transformer = load_transformer(tiny_sources.transformer("framepack"), "cpu")
    write_lora(loras / "watercolour.safetensors", transformer, "kohya", seed=41)
    write_lora(loras / "slow-motion.safetensors", transformer, "peft", seed=42)
    outputs = root / "outputs"
    demo = build_app(AppConfig(outputs=outputs, sources=tiny_sources, device="cpu", defaults=SETTINGS, lora_dir=loras))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(outputs)], theme=theme(), css=CSS)
    yield url, outputs
    demo.job_queue.close()
    demo.close()
    demo.snapshots.close()


def test_pick_a_lora_and_its_weight_and_get_a_video(app, tmp_path):
    url, outputs = app
    image = landscape(tmp_path / "lake.png", 256, 192)
    with chromium_page(tmp_path / "chromium-profile") as page:
        errors = open_with_image(page, url, image)
        page.fill("#fp-prompt textarea", "Paint drips slowly down the canvas.")

        page.click("#fp-loras button")  # open the folded LoRA section
        page.click("#fp-lora-picker input")
        page.click("ul[role=listbox] >> text=watercolour.safetensors")
        page.keyboard.press("Escape")
        page.wait_for_selector("#fp-lora-weight1", state="visible", timeout=30_000)
        assert "Weight of watercolour.safetensors" in page.inner_text("#fp-lora-weight1")
        assert not page.is_visible("#fp-lora-weight2")
        weight = page.locator("#fp-lora-weight1 input[type=number]")
        weight.fill("-0.65")
        weight.press("Enter")

        page.click("#fp-start")
        wait_for_final_video(page, 180_000)
        played = page.evaluate(PLAY, "#fp-final video")
    assert played["error"] is None and played["duration"] > 0, played
    (sidecar,) = [p for p in outputs.glob("*.json")]
    record = json.loads(sidecar.read_text())
    assert record["status"] == "finished"
    assert [(e["name"], e["weight"]) for e in record["loras"]] == [("watercolour.safetensors", -0.65)]
    assert not errors, errors
