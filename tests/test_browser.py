"""The page in a real browser: Debian's Chromium, headless, driven by Playwright.

Uploads a picture, types a prompt, presses Start Generation, watches the latent preview and the
progress bar change, and checks that the finished `<video>` plays (the browser decodes our H.264
MP4: readyState, duration, and time advancing while it plays); then does the same with an end frame,
a keyframe and a timed prompt. A screenshot of the page goes to the test's temporary folder, and the
last one also to $FRAMEPACK_SCREENSHOT when set (that is how docs/screenshot.png is made:
FRAMEPACK_SCREENSHOT=docs/screenshot.png pytest tests/test_browser.py).

Needs the `playwright` Python package (PyPI) and a Chromium binary ($CHROMIUM, else
/usr/bin/chromium from `apt-get install chromium`); Playwright's own browser download is not
used. Without them the test is skipped, unless FRAMEPACK_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from appkit import chromium_page, free_port, open_with_image, wait_for_final_video
from diffusers_helper.app import CSS, AppConfig, build_app, theme
from diffusers_helper.settings import GenerationSettings

# the app, a fresh process or a browser per test: run with the full suite, not the quick one
pytestmark = pytest.mark.slow

PROMPT = "The sun sets slowly over the lake while mist drifts across the water."
SETTINGS = GenerationSettings(seconds=2, window=3, steps=3, resolution=128, seed=42)
TIMEOUT_MS = 180_000


def landscape(path: Path, width: int = 512, height: int = 384) -> Path:
    """A painted evening landscape (sky, sun, mountains, lake, pines): a believable start image."""
    rng = np.random.default_rng(7)
    y = np.linspace(0, 1, height)[:, None, None]
    top, horizon = np.array([38, 64, 132]), np.array([250, 170, 110])
    sky = top + (horizon - top) * y ** 1.6
    img = np.broadcast_to(sky, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    sun_x, sun_y = width * 0.66, height * 0.3
    dist = np.hypot(xx - sun_x, yy - sun_y)
    img += (np.exp(-dist / 60.0) * 90)[..., None] * np.array([1.0, 0.75, 0.4])
    img[dist < 22] = [255, 236, 190]
    picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    water_line = int(height * 0.62)
    for depth, (colour, base, rough) in enumerate([((92, 84, 120), 0.40, 40), ((58, 56, 88), 0.50, 28), ((34, 38, 58), 0.57, 16)]):
        x = np.arange(0, width + 8, 8)
        ridge = np.cumsum(rng.normal(0, rough / 6, x.size))
        ridge = base * height - (ridge - ridge.min()) - 10 * np.sin(x / (70 + 20 * depth))
        draw.polygon([(0, water_line)] + list(zip(x.tolist(), ridge.tolist())) + [(width, water_line)], fill=colour)
    upper = np.asarray(picture).astype(np.float64)
    reflection = upper[water_line - (height - water_line): water_line][::-1] * 0.55 + np.array([10, 20, 40])
    ripples = 1 + 0.06 * np.sin(np.arange(reflection.shape[0])[:, None, None] * 1.7)
    lower = np.clip(reflection * ripples, 0, 255)
    combined = np.concatenate([upper[:water_line], lower[: height - water_line]], axis=0).astype(np.uint8)
    picture = Image.fromarray(combined).filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(picture)
    for base_x in rng.uniform(0, width * 0.35, 9).tolist() + rng.uniform(width * 0.85, width, 4).tolist():
        tall = rng.uniform(50, 110)
        foot = water_line + rng.uniform(-4, 6)
        for level in range(5):
            half = (5 - level) * tall / 22
            y0 = foot - level * tall / 5
            draw.polygon([(base_x - half, y0), (base_x + half, y0), (base_x, y0 - tall / 3)], fill=(14, 22, 24))
    picture.save(path)
    return path


@pytest.fixture(scope="module")
def app_url(browser_ready, tiny_sources, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("browser") / "outputs"
    demo = build_app(AppConfig(outputs=outputs, sources=tiny_sources, device="cpu", defaults=SETTINGS))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(outputs)], theme=theme(), css=CSS)
    yield url
    demo.job_queue.close()
    demo.close()
    demo.snapshots.close()


# Records every change of the progress bar, the preview and the Start button while the job runs.
WATCH = """
() => {
  window.fpLog = [];
  const record = () => {
    const bar = document.querySelector('#fp-progress .fp-progress');
    const img = document.querySelector('#fp-preview img');
    const start = document.querySelector('#fp-start');
    window.fpLog.push({
      state: bar ? bar.dataset.state : null,
      percent: bar && bar.dataset.percent ? parseFloat(bar.dataset.percent) : null,
      step: bar && bar.dataset.step ? bar.dataset.step + '/' + bar.dataset.section : null,
      preview: img ? img.getAttribute('src') : null,
      startDisabled: start ? start.disabled : null,
    });
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                       characterData: true});
  record();
}
"""

PLAY = """
async (selector) => {
  const video = document.querySelector(selector);
  video.muted = true;
  await video.play();
  const before = video.currentTime;
  await new Promise(resolve => setTimeout(resolve, 700));
  return {readyState: video.readyState, duration: video.duration, error: video.error && video.error.code,
          width: video.videoWidth, height: video.videoHeight, before, after: video.currentTime,
          paused: video.paused, src: video.currentSrc};
}
"""


def test_generate_in_a_real_browser(app_url, tmp_path):
    image = landscape(tmp_path / "lake.png")
    with chromium_page(tmp_path / "chromium-profile") as page:
        errors = open_with_image(page, app_url, image)
        page.fill("#fp-prompt textarea", PROMPT)
        page.evaluate(WATCH)
        page.click("#fp-start")

        wait_for_final_video(page, TIMEOUT_MS)
        played = page.evaluate(PLAY, "#fp-final video")
        page.wait_for_function("() => !document.querySelector('#fp-start').disabled", timeout=30_000)
        latest = page.evaluate("() => document.querySelector('#fp-latest video')?.currentSrc || null")
        text = page.inner_text("#fp-progress")
        log = page.evaluate("() => window.fpLog")

        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)

    # The video plays: the browser decoded it, knows its length, and time moved while it played.
    assert played["error"] is None, played
    assert played["readyState"] >= 2 and played["duration"] > 0, played
    assert abs(played["duration"] - SETTINGS.total_frames / 30) < 0.1, played
    assert played["after"] > played["before"] and not played["paused"], played
    assert played["width"] > 0 and played["height"] > 0
    assert latest and latest.endswith(".mp4")
    assert f"{SETTINGS.total_frames} frames" in text
    # The page showed the job moving: the bar filled step by step and the preview changed.
    percents = [entry["percent"] for entry in log if entry["state"] == "running" and entry["percent"] is not None]
    assert len(set(percents)) >= 3, log
    assert percents == sorted(percents)
    assert len({entry["step"] for entry in log if entry["state"] == "running"}) >= 3
    previews = {entry["preview"] for entry in log if entry["preview"]}
    assert len(previews) >= 2, "the latent preview did not change"
    # Start was disabled while the job ran, and enabled again afterwards.
    assert any(entry["startDisabled"] for entry in log if entry["state"] == "running")
    assert not errors, errors


def test_end_and_mistakes_in_a_real_browser(app_url, tmp_path):
    """Start without an image shows a message and leaves Start usable; End keeps a playable partial video."""
    image = landscape(tmp_path / "lake.png")
    with chromium_page(tmp_path / "chromium-profile") as page:
        page.goto(app_url)
        page.wait_for_selector("#fp-start", timeout=60_000)

        page.click("#fp-start")
        page.wait_for_selector("text=Upload a start image first", timeout=30_000)
        page.wait_for_function("() => !document.querySelector('#fp-start').disabled", timeout=30_000)

        # the quick list fills the prompt; Random seed gives a new seed
        page.click("text=The cat stretches")
        page.wait_for_function(  # the page fills the prompt after a round trip
            "() => document.querySelector('#fp-prompt textarea').value.startsWith('The cat stretches')",
            timeout=30_000)
        seed_before = page.input_value("#fp-seed input")
        page.click("text=Random seed")
        page.wait_for_function(f"() => document.querySelector('#fp-seed input').value !== '{seed_before}'")

        page.set_input_files("#fp-image input[type=file]", str(image))
        page.wait_for_selector("#fp-image img", timeout=60_000)
        page.fill("#fp-prompt textarea", "mist drifts")
        # a longer video, so that End comes while sections remain
        seconds = page.locator("#fp-seconds input[type=number]")
        seconds.fill("6")
        seconds.press("Enter")
        page.click("#fp-start")
        page.wait_for_function("() => document.querySelector('#fp-latest video')?.currentSrc", timeout=TIMEOUT_MS)
        page.click("#fp-end")
        page.wait_for_function(
            "() => document.querySelector('#fp-progress .fp-progress')?.dataset.state === 'cancelled'",
            timeout=60_000)
        page.wait_for_function(
            "() => { const v = document.querySelector('#fp-final video'); return v && v.readyState >= 1; }",
            timeout=60_000)
        played = page.evaluate(PLAY, "#fp-final video")
        text = page.inner_text("#fp-progress")
        page.wait_for_function("() => !document.querySelector('#fp-start').disabled", timeout=30_000)
    assert "Stopped" in text and "kept" in text
    total = SETTINGS.replace(seconds=6).total_frames
    assert played["error"] is None and 0 < played["duration"] < total / 30, played


# Records the progress area's line naming each section's prompt and anchor.
WATCH_SECTIONS = """
() => {
  window.fpSections = [];
  const record = () => {
    const line = document.querySelector('#fp-progress .fp-progress-section');
    const text = line ? line.textContent : null;
    if (text && window.fpSections[window.fpSections.length - 1] !== text) window.fpSections.push(text);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


def test_end_frame_keyframe_and_timed_prompt_in_a_real_browser(app_url, tmp_path):
    """The creative controls on the page: an end frame, a keyframe at 0.8 s and a prompt that changes at 1.2 s."""
    start = landscape(tmp_path / "lake.png")
    # the end frame: the same lake at night; the keyframe: the lake mirrored
    picture = np.asarray(Image.open(start)).astype(np.float64)
    end = tmp_path / "night.png"
    Image.fromarray((picture * np.array([0.35, 0.4, 0.7])).astype(np.uint8)).save(end)
    keyframe = tmp_path / "mirrored.png"
    Image.fromarray(np.ascontiguousarray(picture[:, ::-1]).astype(np.uint8)).save(keyframe)
    prompt = "[0s: The sun sets slowly over the lake] [1.2s: Night falls and stars appear over the water]"
    with chromium_page(tmp_path / "chromium-profile", height=1400) as page:
        errors = open_with_image(page, app_url, start)
        page.fill("#fp-prompt textarea", prompt)
        assert "[0s: a cat sits]" in page.inner_text("#fp-prompt-help")  # the marker syntax is shown under the prompt

        page.click("#fp-creative button")  # open the accordion
        page.set_input_files("#fp-end-image input[type=file]", str(end))
        page.wait_for_selector("#fp-end-image img", timeout=60_000)
        page.set_input_files("#fp-keyframe1 input[type=file]", str(keyframe))
        page.wait_for_selector("#fp-keyframe1 img", timeout=60_000)
        at = page.locator("#fp-keyframe1-time input")
        at.fill("0.8")
        at.press("Tab")
        page.evaluate(WATCH_SECTIONS)
        page.click("#fp-start")

        wait_for_final_video(page, TIMEOUT_MS)
        played = page.evaluate(PLAY, "#fp-final video")
        sections = page.evaluate("() => window.fpSections")
        page.evaluate("() => window.scrollTo(0, 0)")
        shot = tmp_path / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        target = os.environ.get("FRAMEPACK_SCREENSHOT")
        if target:
            # a palette PNG: a quarter of the size, and the page's flat colours survive it
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Image.open(shot).convert("RGB").quantize(colors=256).save(target, optimize=True)
    assert played["error"] is None and played["readyState"] >= 2, played
    assert abs(played["duration"] - SETTINGS.total_frames / 30) < 0.1, played
    assert played["after"] > played["before"], played
    # FramePack generates the end first: the later prompt and the keyframe come first, then the start's
    assert any("Night falls" in line and "keyframe 1 (0.8 s)" in line for line in sections), sections
    assert any("The sun sets" in line and "the start image" in line for line in sections), sections
    assert not errors, errors
