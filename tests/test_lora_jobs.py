"""LoRAs through the Runtime, as the app and the command line run them: what a job tells the user; the
record of a job's LoRAs in its sidecar and MP4; resuming with the same files, or a clear message when
they are missing or changed; and the command line's --lora. (Switching LoRAs between the jobs of one
app session: tests/test_lora_page.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper.events import CancelToken, Finished, Notice, SectionDone
from diffusers_helper.loading import load_transformer
from diffusers_helper.lora import LoraError
from diffusers_helper.outputs import OutputPaths
from diffusers_helper.pipeline import load_resume_state
from diffusers_helper.runtime import Runtime
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames, read_metadata
from test_lora import write_lora

# Two sections of two steps at the 64-px buckets.
JOB = GenerationSettings(prompt="a dog runs", seconds=1, window=4, steps=2, resolution=64, seed=3, cache="none")


@pytest.fixture(scope="module")
def loras(tiny_sources, tmp_path_factory):
    """Two LoRA files for the FramePack transformer (kohya with text-encoder keys, HunyuanVideo's layout)
    and the changes they make."""
    folder = tmp_path_factory.mktemp("loras")
    transformer = load_transformer(tiny_sources.transformer("framepack"), "cpu")
    a = write_lora(folder / "style.safetensors", transformer, "kohya", seed=21, text_encoder_keys=4)
    b = write_lora(folder / "motion.safetensors", transformer, "hunyuan", seed=22)
    return {"style": (folder / "style.safetensors", a), "motion": (folder / "motion.safetensors", b)}


def _job(runtime, settings, image, out: Path):
    events = list(runtime.generate(settings, image, out, save_latents=out.with_suffix(".st")))
    assert isinstance(events[-1], Finished), events[-1]
    return events, load_file(str(out.with_suffix(".st")))["history_latents"]


def test_a_job_tells_about_skipped_keys_and_records_its_loras(tiny_sources, tiny_shared, image, tmp_path, loras):
    import hashlib

    runtime = Runtime(tiny_sources, device="cpu", load_shared=lambda *a: tiny_shared)
    style, _ = loras["style"]
    events, _ = _job(runtime, JOB.replace(loras=[f"{style}:0.8"]), image, tmp_path / "job.mp4")
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("style.safetensors: 4 text-encoder keys skipped" in n for n in notices), notices
    digest = hashlib.sha256(style.read_bytes()).hexdigest()
    expected = [{"name": "style.safetensors", "sha256": digest, "weight": 0.8}]
    assert json.loads((tmp_path / "job.json").read_text())["loras"] == expected
    assert json.loads(read_metadata(tmp_path / "job.mp4")["comment"])["loras"] == expected
    # without LoRAs the record has no such entry (and is what it was before LoRAs existed)
    assert "loras" not in runtime.record("framepack", ())


def _interrupted(runtime, settings, image, out: Path) -> None:
    """Stop a job after its first section and leave its files as a killed process would."""
    cancel = CancelToken()
    for event in runtime.generate(settings, image, out, cancel=cancel):
        if isinstance(event, SectionDone):
            cancel.cancel()
    sidecar = OutputPaths(out).sidecar
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "status": "running"}))


@pytest.mark.slow
def test_resume_uses_the_same_lora_files_or_says_what_is_wrong(tiny_sources, tiny_shared, image, tmp_path, loras):
    folder = tmp_path / "mine"
    folder.mkdir()
    style = folder / "style.safetensors"
    shutil.copy(loras["style"][0], style)
    settings = JOB.replace(loras=[(str(style), 0.7)])
    runtime = Runtime(tiny_sources, device="cpu", load_shared=lambda *a: tiny_shared)
    _, whole = _job(runtime, settings, image, tmp_path / "whole.mp4")
    out = tmp_path / "cut.mp4"
    _interrupted(runtime, settings, image, out)
    runtime.apply_loras(())  # another job in between, without LoRAs

    # the file moved to the LoRA folder: found there by name and SHA-256, and the job continues as it was
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    style.rename(lora_dir / "style.safetensors")
    state = load_resume_state(out)
    with pytest.raises(LoraError, match=r"LoRA style.safetensors \(SHA-256 [0-9a-f]{12}…\) is missing"):
        runtime.resume_loras(state)
    runtime.lora_dir = lora_dir
    events = list(runtime.resume(out, save_latents=tmp_path / "cut.st"))
    assert isinstance(events[-1], Finished), events[-1]
    assert torch.equal(load_file(str(tmp_path / "cut.st"))["history_latents"], whole)
    assert len(read_frames(out)) == len(read_frames(tmp_path / "whole.mp4"))

    # a changed file is named, with both sums
    out2 = tmp_path / "cut2.mp4"
    _interrupted(runtime, JOB.replace(loras=[(str(lora_dir / "style.safetensors"), 0.7)]), image, out2)
    shutil.copy(loras["motion"][0], lora_dir / "style.safetensors")
    with pytest.raises(LoraError, match="style.safetensors at .* has changed since it was used"):
        runtime.resume_loras(load_resume_state(out2))


def test_cli_refuses_a_bad_lora_in_one_line_before_loading(tiny_root, tmp_path, cli_error, image):
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "in.png")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    base = ["generate", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--output", str(tmp_path / "o.mp4"),
            "--hunyuan", str(tiny_root / "hunyuan"), "--siglip", str(tiny_root / "siglip"),
            "--transformer", str(tiny_root / "framepack"), "--device", "cpu"]
    assert "bad.safetensors is not a safetensors file" in cli_error(base + ["--lora", f"{bad}:0.5"])
    assert "weight of LoRA" in cli_error(base + ["--lora", f"{bad}:3"])
    assert "not found" in cli_error(base + ["--lora", str(tmp_path / "nowhere.safetensors")])
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.json").exists()
