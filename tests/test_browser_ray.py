"""The app with --ray in a real browser: a batch of two queued on the page runs on two Ray workers.

The page queues two prompts with Add to queue; the Queue panel shows each running job's progress
and the worker it runs on, then both finished. Needs Playwright and Chromium like
tests/test_browser.py (skips, or fails under FRAMEPACK_REQUIRE_BROWSER=1, for the same reasons),
and Ray.
"""

from __future__ import annotations

import json
import time

import pytest

from appkit import chromium_page, open_with_image, running_app, save_noise_image
from diffusers_helper.jobstore import JobStore
from diffusers_helper.settings import GenerationSettings

pytest.importorskip("ray", reason="ray is installed by requirements-dev.txt")
pytestmark = pytest.mark.slow

SETTINGS = GenerationSettings(prompt="", seconds=2, window=2, steps=3, resolution=64, seed=3, cache="none")
ROWS = "() => [...document.querySelectorAll('#fp-queue-table tr.fp-queue-job')].map(row => row.innerText)"


def test_a_batch_queued_on_the_page_runs_on_ray_workers_and_the_panel_says_where(browser_ready, tiny_sources,
                                                                                  tmp_path):
    from diffusers_helper.scaleout import ClusterOptions

    image = tmp_path / "start.png"
    save_noise_image(image, seed=4, size=(64, 80))
    outputs = tmp_path / "outputs"
    seen: list[str] = []
    with running_app(outputs, tiny_sources, defaults=SETTINGS,
                     ray=ClusterOptions("local", workers=2, cpus_per_worker=1)) as (url, _demo), \
            chromium_page(tmp_path / "chromium-profile", height=1800) as page:
        errors = open_with_image(page, url, image)
        page.click("text=Queue and batches")
        page.fill("#fp-batch-prompts textarea", "on the left\non the right")
        page.click("#fp-add-to-queue")
        deadline = time.monotonic() + 300
        while True:
            rows = page.evaluate(ROWS)
            seen += [row for row in rows if "on ray worker" in row]
            if len(rows) == 2 and all("finished" in row for row in rows):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
        page.screenshot(path=str(tmp_path / "ray-queue.png"), full_page=True)

    assert not errors, errors
    assert any("section" in row and "step" in row for row in seen), seen  # live progress from a worker
    jobs = JobStore(outputs).jobs(ended=10)
    assert sorted(job.prompt for job in jobs) == ["on the left", "on the right"]
    for job in jobs:
        record = json.loads(job.output.with_suffix(".json").read_text())
        assert job.state == "finished" and record["status"] == "finished" and record["worker"]["actor"]
