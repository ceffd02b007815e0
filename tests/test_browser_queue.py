"""The Queue panel in a real browser: a batch of two is queued, reordered, one removed, the other finishes.

While a long job started with Start Generation holds the worker, the page queues two prompts with
Add to queue; the panel lists both as waiting, Move up puts the second first, Remove takes the
other out; End Generation stops the long job, the remaining queued job runs and the panel shows it
finished, with its video. Needs Playwright and Chromium like tests/test_browser.py, and skips (or
fails under FRAMEPACK_REQUIRE_BROWSER=1) for the same reasons.
"""

from __future__ import annotations

import json

import pytest

from appkit import chromium_page, open_with_image, running_app, save_noise_image
from diffusers_helper.jobstore import JobStore
from diffusers_helper.settings import GenerationSettings

pytestmark = pytest.mark.slow

SETTINGS = GenerationSettings(prompt="", seconds=1, window=2, steps=1, resolution=64, seed=12, cache="none")
TIMEOUT_MS = 180_000

WAITING_PROMPTS = """
() => [...document.querySelectorAll('#fp-queue-table tr.fp-queue-job[data-state="waiting"] .fp-queue-prompt')]
        .map(cell => cell.innerText)
"""


def pick(page, text: str) -> None:
    """Choose the queued job whose label holds `text` in the panel's list."""
    page.click("#fp-queue-pick input")
    page.locator("ul[role=listbox] li", has_text=text).first.click()


def test_a_queued_batch_is_reordered_trimmed_and_finishes_in_a_real_browser(browser_ready, tiny_sources, tmp_path):
    image = tmp_path / "start.png"
    save_noise_image(image, seed=2, size=(64, 80))
    outputs = tmp_path / "outputs"
    with running_app(outputs, tiny_sources, defaults=SETTINGS) as (url, _demo), \
            chromium_page(tmp_path / "chromium-profile", height=1800) as page:
        errors = open_with_image(page, url, image)
        # a long job started on the page holds the worker while the batch is arranged
        seconds = page.locator("#fp-seconds input[type=number]")
        seconds.fill("20")
        seconds.press("Enter")
        page.fill("#fp-prompt textarea", "the long one")
        page.click("#fp-start")
        page.wait_for_function(
            "() => document.querySelector('#fp-progress .fp-progress')?.dataset.state === 'running'",
            timeout=TIMEOUT_MS)
        seconds.fill("1")
        seconds.press("Enter")

        page.click("text=Queue and batches")
        page.fill("#fp-batch-prompts textarea", "first of two\nsecond of two")
        page.click("#fp-add-to-queue")
        page.wait_for_function(f"() => ({WAITING_PROMPTS})().length === 2", timeout=60_000)
        assert page.evaluate(WAITING_PROMPTS) == ["first of two", "second of two"]
        assert page.locator("#fp-queue-table tr.fp-queue-job[data-state=running] img").count() == 1  # its thumbnail

        pick(page, "second of two")
        page.click("#fp-queue-up")
        page.wait_for_function(f"() => ({WAITING_PROMPTS})()[0] === 'second of two'", timeout=60_000)
        pick(page, "first of two")
        page.click("#fp-queue-remove")
        page.wait_for_function(f"() => ({WAITING_PROMPTS})().join() === 'second of two'", timeout=60_000)

        page.click("#fp-end")  # the long job stops; the queued one runs
        page.wait_for_function(
            "() => document.querySelector('#fp-queue-table tr.fp-queue-job[data-state=finished]')", timeout=TIMEOUT_MS)
        finished = page.inner_text("#fp-queue-table tr.fp-queue-job[data-state=finished]")
        pick(page, "second of two")
        page.wait_for_function(
            "() => { const v = document.querySelector('#fp-queue-video video'); return v && v.readyState >= 1; }",
            timeout=60_000)
        page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)

    assert "second of two" in finished and "finished" in finished
    assert not errors, errors
    (job,) = [job for job in JobStore(outputs).jobs(ended=10)]
    assert job.prompt == "second of two" and job.state == "finished" and job.output.is_file()
    record = json.loads(job.output.with_suffix(".json").read_text())
    assert record["status"] == "finished" and record["settings"]["seconds"] == 1
    assert [p.name for p in outputs.glob("*.mp4") if ".part" not in p.name] == [job.output.name]
