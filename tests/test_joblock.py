"""A job being generated is seen as running by every process sharing its outputs folder.

Two app windows (run.bat started twice) or the app and the CLI can share one outputs folder. The
job one of them is generating must not be offered for resume, resumed, or have its files cleaned
up by the other; once its process is gone (even killed), the job is free to resume at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from diffusers_helper import outputs
from diffusers_helper.events import Finished, SectionDone
from diffusers_helper.outputs import OutputPaths, list_outputs, remove_stale_files
from diffusers_helper.pipeline import generate, load_resume_state
from diffusers_helper.settings import GenerationSettings

from appkit import save_noise_image

SETTINGS = GenerationSettings(prompt="rain", seconds=1.2, window=3, steps=1, resolution=64, seed=3, cache="none")


def test_a_held_job_is_running_until_released_and_leaves_no_lock_file(tmp_path):
    video = tmp_path / "job.mp4"
    assert not outputs.is_running(video)
    with outputs.hold(video):
        assert outputs.is_running(video)  # a probe from the same process sees it too
        with pytest.raises(outputs.JobBusy, match="being generated right now"):
            with outputs.hold(video):
                pass
        assert outputs.is_running(video)  # the refused second holder did not release the first
    assert not outputs.is_running(video)
    assert not OutputPaths(video).lock.exists()


def _holder(video) -> subprocess.Popen:
    """Another process that holds the job's lock until killed; returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        from diffusers_helper import outputs
        with outputs.hold({str(video)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _interrupted_job(folder, stem="2025-03-04_05-06-07-890") -> tuple:
    """The files a job leaves after one section: sidecar saying running, start image, latents, a partial."""
    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps({"settings": SETTINGS.to_dict(), "status": "running",
                                                     "model": "framepack"}))
    Image.new("RGB", (64, 64)).save(folder / f"{stem}.png")
    save_file({"history_latents": torch.zeros(1, 16, 3, 8, 8), "start_latent": torch.zeros(1, 16, 1, 8, 8)},
              str(folder / f"{stem}.latents.safetensors"))
    (folder / f"{stem}.part001.mp4").write_bytes(b"partial")
    temporary = folder / f".{stem}.part002.mp4.tmp"
    temporary.write_bytes(b"being written")
    return folder / f"{stem}.mp4", temporary


@pytest.mark.slow
def test_a_job_running_in_another_process_is_left_alone_until_that_process_dies(tmp_path, cli_error):
    video, temporary = _interrupted_job(tmp_path / "outputs")
    child = _holder(video)
    try:
        [item] = list_outputs(video.parent)
        assert item.running and not item.resumable and "[running]" in item.label
        with pytest.raises(outputs.JobBusy):
            remove_stale_files(video)
        assert temporary.exists()  # the other process's file being written is untouched
        with pytest.raises(outputs.JobBusy):
            load_resume_state(video)
        assert "being generated right now" in cli_error(["resume", str(video), "--tiny", "--device", "cpu"])
    finally:
        child.send_signal(signal.SIGKILL if os.name != "nt" else signal.SIGTERM)
        child.wait(timeout=30)
    # killed: the operating system dropped the lock, and the job can be resumed and cleaned up now
    assert not outputs.is_running(video)
    [item] = list_outputs(video.parent)
    assert item.resumable and not item.running and "interrupted" in item.label
    assert temporary in remove_stale_files(video)
    assert load_resume_state(video).sections_done == 1


def test_a_generating_job_holds_its_lock_until_it_has_ended(tiny_components, tmp_path):
    image = tmp_path / "start.png"
    save_noise_image(image, seed=1, size=(64, 64))
    video = tmp_path / "out" / "job.mp4"
    seen = []
    events = generate(tiny_components("framepack"), SETTINGS, image, video)
    for event in events:
        if isinstance(event, SectionDone):
            seen.append(outputs.is_running(video))
            [item] = list_outputs(video.parent)
            seen.append(item.resumable)
    assert isinstance(event, Finished)
    assert seen == [True, False] * SETTINGS.sections
    assert not outputs.is_running(video)
    assert not OutputPaths(video).lock.exists()
