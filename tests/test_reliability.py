"""Nothing lost, nothing crashes: bad input, faults while a job runs, and resuming after a kill.

Everything here goes through the app's HTTP API (what the page itself calls, driven with
gradio_client or raw requests) or through the command line, with the tiny models. The engine's
own checks have their unit tests (test_settings, test_conditioning, test_loading, test_pipeline);
these prove the user sees a clear message and that nothing is written half-way.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from appkit import (
    JOB_TIMEOUT,
    SMALL,
    assert_no_debris,
    call_raw,
    final_video,
    form,
    history_latents,
    is_video,
    kill_when,
    png_claiming,
    progress_message,
    progress_state,
    running_app,
    save_noise_image,
    stem_of,
    upload,
    wait_until,
)
from diffusers_helper import pipeline as pipeline_module
from diffusers_helper import video as video_module
from diffusers_helper.app import FORM_FIELDS
from diffusers_helper.conditioning import find_nearest_bucket
from diffusers_helper.settings import RANGES, GenerationSettings
from diffusers_helper.video import read_frames

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is needed to drive the app")
from gradio_client import Client, handle_file  # noqa: E402

# the app, a fresh process or a browser per test: run with the full suite, not the quick one
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
THREE = SMALL.replace(seconds=1.2)  # three sections: one finished on either side of the one in progress
assert THREE.sections == 3 and SMALL.sections == 2


@pytest.fixture(scope="module")
def app(tiny_sources, tmp_path_factory):
    """The app on 127.0.0.1 with the tiny models; yields (url, outputs folder)."""
    outputs = tmp_path_factory.mktemp("reliability") / "outputs"
    with running_app(outputs, tiny_sources) as (url, _demo):
        yield url, outputs


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "start.png"
    save_noise_image(path, seed=1, size=(72, 96))
    return path


def client(url: str) -> Client:
    return Client(url, verbose=False)


def outputs_listing(outputs: Path) -> set[str]:
    return {p.name for p in outputs.iterdir()} if outputs.exists() else set()


def run_ok(url: str, image: Path, **changes) -> Path:
    """Run a job through the API and return its final video (the app is ready and works)."""
    result = client(url).predict(handle_file(str(image)), *form(**changes), api_name="/generate")
    assert progress_state(result[2]) == "finished", result[2]
    return final_video(result)


# ---------------------------------------------------------------------------------------------
# Bad input through the API


def test_unusable_images_are_refused_with_a_clear_message_and_nothing_written(app, start_image, tmp_path, monkeypatch):
    from PIL import ImageFile

    url, outputs = app
    load = ImageFile.ImageFile.load

    def load_checked(self):
        # a claimed size over the limit must be refused from the header, before any decoding
        assert self.width * self.height <= 100_000_000, f"decoded a {self.width}×{self.height} image"
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_checked)
    good = start_image.read_bytes()
    cases = {
        "truncated.png": (good[: len(good) // 2], "not a readable image"),
        "empty.png": (b"", "not an image"),
        "huge-20000x20000.png": (png_claiming(20000, 20000), "too large"),  # PIL's own bomb limit
        "bomb-11000x10000.png": (png_claiming(11000, 10000), "too large"),  # under PIL's limit, over ours
    }
    before = outputs_listing(outputs)
    c = client(url)
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            c.predict(handle_file(str(path)), *form(), api_name="/generate")
        text = str(caught.value)
        assert message in text, (name, text)
        assert "Traceback" not in text and "File \"" not in text
        assert time.monotonic() - started < 30, f"{name}: the check should not decode the whole image"
    assert outputs_listing(outputs) == before, "a refused input wrote something"
    run_ok(url, start_image)


def _image_cases(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Input files in awkward formats, each with the RGB image the job must start from (64×64, no resize)."""
    cases: dict[str, tuple[Path, np.ndarray]] = {}
    half = np.zeros((64, 64), dtype=bool)
    half[:, 32:] = True  # right half

    # RGBA: transparent red on the left, opaque blue on the right → white | blue
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[half] = (0, 0, 255, 255)
    expected = np.full((64, 64, 3), 255, dtype=np.uint8)
    expected[half] = (0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    cases["RGBA"] = (folder / "rgba.png", expected)

    # LA: transparent black on the left, opaque grey 90 on the right → white | grey
    la = Image.new("LA", (64, 64), (0, 0))
    la.paste((90, 255), (32, 0, 64, 64))
    la.save(folder / "la.png")
    expected = np.full((64, 64, 3), 255, dtype=np.uint8)
    expected[half] = 90
    cases["LA"] = (folder / "la.png", expected)

    # P with a transparent palette entry: index 0 transparent, index 1 green
    p = Image.new("P", (64, 64), 0)
    p.putpalette([10, 20, 30, 0, 200, 0] + [0, 0, 0] * 254)
    p.paste(1, (32, 0, 64, 64))
    p.save(folder / "palette.png", transparency=0)
    expected = np.full((64, 64, 3), 255, dtype=np.uint8)
    expected[half] = (0, 200, 0)
    cases["P"] = (folder / "palette.png", expected)

    # CMYK (TIFF, lossless): no ink is white, magenta+yellow is red
    cmyk = Image.new("CMYK", (64, 64), (0, 0, 0, 0))
    cmyk.paste((0, 255, 255, 0), (32, 0, 64, 64))
    cmyk.save(folder / "cmyk.tiff")
    expected = np.full((64, 64, 3), 255, dtype=np.uint8)
    expected[half] = (255, 0, 0)
    cases["CMYK"] = (folder / "cmyk.tiff", expected)

    # 16-bit greyscale: full scale is white, half scale is mid grey (not clipped to white)
    grey16 = np.full((64, 64), 65535, dtype=np.uint16)
    grey16[half] = 32896  # 128 × 257
    Image.fromarray(grey16).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    expected = np.full((64, 64, 3), 255, dtype=np.uint8)
    expected[half] = 128
    cases["16-bit"] = (folder / "grey16.png", expected)

    # 8-bit greyscale
    grey = np.full((64, 64), 40, dtype=np.uint8)
    grey[half] = 220
    Image.fromarray(grey, "L").save(folder / "grey.png")
    cases["greyscale"] = (folder / "grey.png", np.repeat(grey[..., None], 3, axis=2))
    return cases


def test_image_formats_are_converted_correctly_through_the_api(app, tmp_path):
    url, outputs = app
    c = client(url)
    for mode, (path, expected) in _image_cases(tmp_path).items():
        result = c.predict(handle_file(str(path)), *form(), api_name="/generate")
        assert progress_state(result[2]) == "finished", (mode, result[2])
        start = np.array(Image.open(outputs / f"{stem_of(final_video(result))}.png").convert("RGB"))
        assert start.shape == expected.shape, mode
        # the saved start image is the converted input itself (a 64×64 input fits its bucket exactly)
        assert np.abs(start.astype(int) - expected).max() <= 1, mode


def test_an_exif_rotated_photo_is_used_upright(app, tmp_path):
    url, outputs = app
    # What the camera stored: 96 wide × 48 high, red on the left, blue on the right; orientation 6
    # means "rotate 90° clockwise to view", so the user sees a 48×96 portrait, red on top.
    stored = np.zeros((48, 96, 3), dtype=np.uint8)
    stored[:, :48] = (255, 0, 0)
    stored[:, 48:] = (0, 0, 255)
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    picture.save(path, quality=100, exif=exif)
    result = client(url).predict(handle_file(str(path)), *form(), api_name="/generate")
    video = final_video(result)
    height, width = find_nearest_bucket(96, 48, SMALL.resolution)
    assert height > width  # a portrait bucket
    start = np.array(Image.open(outputs / f"{stem_of(video)}.png").convert("RGB")).astype(int)
    assert start.shape[:2] == (height, width)
    assert read_frames(video).shape[1:3] == (height, width)
    top, bottom = start[: height // 4].mean(axis=(0, 1)), start[-height // 4:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top  # red at the top: upright as viewed
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_a_one_pixel_image_makes_a_video(app, tmp_path):
    url, outputs = app
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 100, 50)).save(path)
    video = run_ok(url, path)
    assert len(read_frames(video)) == SMALL.total_frames
    start = np.array(Image.open(outputs / f"{stem_of(video)}.png"))
    assert start.shape == (*find_nearest_bucket(1, 1, SMALL.resolution), 3)
    assert (start == (200, 100, 50)).all()


def test_an_empty_prompt_is_allowed_and_a_long_one_is_cut_with_a_notice(app, start_image):
    url, outputs = app
    c = client(url)
    result = c.predict(handle_file(str(start_image)), *form(prompt=""), api_name="/generate")
    assert progress_state(result[2]) == "finished" and "Note:" not in result[2]
    long_prompt = "The dancer spins slowly under the lights. " * 80  # far beyond 256 tokens
    result = c.predict(handle_file(str(start_image)), *form(prompt=long_prompt), api_name="/generate")
    assert progress_state(result[2]) == "finished"
    assert "Note: The prompt is longer than 256 tokens; the rest was cut off." in result[2]
    record = json.loads((outputs / f"{stem_of(final_video(result))}.json").read_text())
    assert record["settings"]["prompt"] == long_prompt  # the sidecar keeps what the user wrote


def _bad_values() -> list[tuple[str, object, str]]:
    """(setting, value, expected message) for every numeric setting: negative, out of range, fractional."""
    cases = []
    for name, rng in RANGES.items():
        cases.append((name, -1, "between" if rng.low >= 0 else "finite"))
        cases.append((name, rng.high * 2 + 1, "between"))
        if rng.low > 0:
            cases.append((name, rng.low / 2 if not rng.integer else 0, "between"))
        if rng.integer:
            cases.append((name, rng.low + 0.5, "whole number"))
        cases.append((name, "twelve", "must be a number"))
    return cases


@pytest.mark.parametrize("name", list(RANGES))
def test_every_setting_rejects_bad_numbers_through_the_api(app, start_image, name):
    url, outputs = app
    c = client(url)
    before = outputs_listing(outputs)
    for setting, value, message in [case for case in _bad_values() if case[0] == name]:
        with pytest.raises(Exception) as caught:
            c.predict(handle_file(str(start_image)), *form(**{setting: value}), api_name="/generate")
        text = str(caught.value)
        assert f"{setting} must" in text and message in text, (setting, value, text)
    # NaN and infinities: JSON literals that gradio_client won't send, so a hand-written request
    path = upload(url, start_image)
    for literal, shown in (("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")):
        data = [{"path": path, "meta": {"_type": "gradio.FileData"}}] + form()
        index = 1 + FORM_FIELDS.index(name)
        body = '{"data": [' + ", ".join(literal if i == index else json.dumps(v) for i, v in enumerate(data)) + "]}"
        event, payload = call_raw(url, "generate", body)
        assert event == "error", (name, literal, payload)
        assert payload.get("error") == f"{name} must be a finite number, not {shown}.", payload
    assert outputs_listing(outputs) == before


def _wrong_shapes_copy(tiny_sources, target: Path) -> Path:
    """A copy of the tiny FramePack transformer whose proj_out weight has the wrong shape."""
    from safetensors.torch import save_file

    wrong = Path(shutil.copytree(tiny_sources.transformer("framepack"), target))
    index = json.loads((wrong / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = wrong / index["weight_map"]["proj_out.weight"]
    tensors = load_file(shard)
    tensors["proj_out.weight"] = torch.zeros(8, 8, dtype=tensors["proj_out.weight"].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return wrong


def test_a_model_folder_missing_files_or_with_wrong_shapes_is_a_clear_failure(tiny_sources, tmp_path, start_image):
    missing = Path(shutil.copytree(tiny_sources.transformer("framepack"), tmp_path / "missing"))
    (missing / "config.json").unlink()
    wrong = _wrong_shapes_copy(tiny_sources, tmp_path / "wrong")
    for folder, message in ((missing, "Model files are missing"), (wrong, "proj_out.weight")):
        outputs = tmp_path / f"out-{folder.name}"
        sources = tiny_sources.with_transformer("framepack", str(folder))
        with running_app(outputs, sources) as (url, _demo):
            result = client(url).predict(handle_file(str(start_image)), *form(), api_name="/generate")
        assert progress_state(result[2]) == "failed"
        shown = progress_message(result[2])
        assert message in shown and str(folder) in shown and "Traceback" not in shown, shown
        assert not outputs.exists() or not any(outputs.iterdir()), "a failed load wrote outputs"


# ---------------------------------------------------------------------------------------------
# Bad input through the command line


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from diffusers_helper.__main__ import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_the_cli_refuses_unusable_images_on_one_line_and_writes_nothing(tiny_sources, start_image, tmp_path, capsys):
    good = start_image.read_bytes()
    cases = {
        "notes.png": (b"just some text", "not a readable image"),
        "truncated.png": (good[: len(good) // 2], "not a readable image"),
        "huge.png": (png_claiming(20000, 20000), "too large"),
        "bomb.png": (png_claiming(11000, 10000), "too large"),
    }
    out = tmp_path / "out" / "v.mp4"
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        code, err = _cli(["generate", "--image", str(path), "--prompt", "x", "--output", str(out), "--device", "cpu",
                          *_source_flags(tiny_sources)], capsys)
        assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1, (name, err)
    assert not (tmp_path / "out").exists()


def test_the_cli_names_a_model_folder_with_wrong_shapes_and_an_unwritable_output(tiny_sources, start_image, tmp_path,
                                                                                 capsys):
    wrong = _wrong_shapes_copy(tiny_sources, tmp_path / "wrong")
    small = ["--seconds", "1", "--window", "3", "--steps", "1", "--resolution", "64", "--device", "cpu"]
    code, err = _cli(["generate", "--image", str(start_image), "--prompt", "x", "--output", str(tmp_path / "a.mp4"),
                      *small, "--hunyuan", str(tiny_sources.hunyuan), "--siglip", str(tiny_sources.siglip),
                      "--transformer", str(wrong)], capsys)
    last = err.splitlines()[-1]  # after the loading progress
    assert code == 2 and last.startswith("error:") and "proj_out.weight" in last and str(wrong) in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "a.mp4").exists()

    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    code, err = _cli(["generate", "--image", str(start_image), "--prompt", "x", "--output", str(blocked / "v.mp4"),
                      *small, *_source_flags(tiny_sources)], capsys)
    assert code != 0 and "Traceback" not in err, err
    assert any(line.startswith("error: Could not write to") and str(blocked) in line for line in err.splitlines()), err
    assert blocked.read_text() == "a file, not a folder"


# ---------------------------------------------------------------------------------------------
# Faults while a job runs


class Gate:
    """Holds the job inside one stage until the test lets it go; records that it got there."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def wrap(self, function, when=lambda call: True):
        calls = {"n": 0}

        def gated(*args, **kwargs):
            calls["n"] += 1
            if when(calls["n"]):
                self.entered.set()
                assert self.release.wait(JOB_TIMEOUT), "the test never released the gate"
            return function(*args, **kwargs)

        return gated


# (stage, what to hold, which call, sections finished when End arrives, sections in the kept video)
STAGES = {
    "encoding the prompt": ("encode_prompt", 1, 0),
    "encoding the image": ("vae_encode", 1, 0),
    "sampling": ("sample_section", 2, 1),
    "decoding": ("vae_decode", 2, 1),
    "writing": ("add_section", 2, 2),  # the section being written completes, then the job stops
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_end_during_any_stage_keeps_the_finished_sections_and_the_app_ready(app, start_image, monkeypatch, stage):
    url, outputs = app
    target, call, kept_sections = STAGES[stage]
    gate = Gate()
    when = lambda n: n == call  # noqa: E731
    if target == "add_section":
        monkeypatch.setattr(video_module.SectionVideoWriter, "add_section",
                            gate.wrap(video_module.SectionVideoWriter.add_section, when))
    else:
        monkeypatch.setattr(pipeline_module, target, gate.wrap(getattr(pipeline_module, target), when))
    c = client(url)
    job = c.submit(handle_file(str(start_image)), *form(THREE, prompt=f"end while {stage}"), api_name="/generate")
    try:
        assert gate.entered.wait(JOB_TIMEOUT), f"the job never reached {stage}"
        c.predict(api_name="/end")
    finally:
        gate.release.set()
    result = job.result(timeout=JOB_TIMEOUT)
    monkeypatch.undo()
    assert progress_state(result[2]) == "cancelled", result[2]
    records = [json.loads(p.read_text()) for p in outputs.glob("*.json")]
    record = next(r for r in records if r["settings"]["prompt"] == f"end while {stage}")
    assert record["status"] == "cancelled"
    if kept_sections:
        video = final_video(result)
        frames = len(read_frames(video))
        # FramePack's k-th section (not the last) has decoded k·window latent frames: 4·k·window − 3 frames
        assert frames == 4 * kept_sections * THREE.window - 3 and frames < THREE.total_frames
        kept = sorted(outputs.glob(f"{stem_of(video)}.part*.mp4"))
        assert len(kept) == 1 and len(read_frames(kept[0])) == frames  # on disk, intact
        assert record["sections_done"] == kept_sections
    else:
        assert not is_video(result[3])
    assert_no_debris(outputs)
    run_ok(url, start_image, prompt="after End")


def test_out_of_memory_ends_the_job_with_advice_and_the_next_job_runs(app, start_image, monkeypatch):
    url, outputs = app
    sample_section = pipeline_module.sample_section
    calls = {"n": 0}

    class OutOfMemoryTransformer(torch.nn.Module):
        """The real transformer, except that the second section's call runs out of GPU memory."""

        def __init__(self, real):
            super().__init__()
            self.real = real
            self.transformer_blocks = real.transformer_blocks

        def forward(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def second_section_oom(transformer, *args, **kwargs):
        calls["n"] += 1
        return sample_section(OutOfMemoryTransformer(transformer) if calls["n"] == 2 else transformer, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_section", second_section_oom)
    job = client(url).submit(handle_file(str(start_image)), *form(THREE, prompt="too big"), api_name="/generate")
    result = job.result(timeout=JOB_TIMEOUT)
    monkeypatch.undo()
    assert progress_state(result[2]) == "failed"
    message = progress_message(result[2])
    assert "Out of memory" in message and "Preserved Memory" in message and "resolution" in message, message
    assert "Traceback" not in message
    kept = final_video(result)  # the first section's video is offered
    assert len(read_frames(kept)) == 4 * THREE.window - 3
    record = json.loads((outputs / f"{stem_of(kept)}.json").read_text())
    assert record["status"] == "failed" and "Out of memory" in record["message"]
    assert_no_debris(outputs)
    run_ok(url, start_image, prompt="fits again")


def _disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["video", "latents", "sidecar"])
def test_a_full_disk_is_a_clear_message_and_leaves_no_broken_files(app, start_image, monkeypatch, where):
    url, outputs = app
    calls = {"n": 0}

    def second(path) -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    if where == "video":
        remux = video_module._remux

        def full_remux(segments, path, **kwargs):
            if second(path):
                Path(path).write_bytes(b"\0" * 100)  # a short write, then the disk is full
                raise _disk_full(path)
            return remux(segments, path, **kwargs)

        monkeypatch.setattr(video_module, "_remux", full_remux)
    elif where == "latents":
        save_file = pipeline_module.save_file

        def full_save(tensors, path, *args, **kwargs):
            if second(path):
                Path(path).write_bytes(b"\0" * 10)
                raise _disk_full(path)
            return save_file(tensors, path, *args, **kwargs)

        monkeypatch.setattr(pipeline_module, "save_file", full_save)
    else:
        write_text = Path.write_text

        def full_write_text(self, data, *args, **kwargs):
            # the sidecar written after the first section
            # (a sidecar's hidden temporary: .NAME.json.<random>.tmp)
            if self.parent == outputs and ".json." in self.name and self.name.endswith(".tmp") and second(self):
                write_text(self, data[:10], *args, **kwargs)
                raise _disk_full(self)
            return write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", full_write_text)
    job = client(url).submit(handle_file(str(start_image)), *form(THREE, prompt=f"disk full at {where}"),
                             api_name="/generate")
    result = job.result(timeout=JOB_TIMEOUT)
    monkeypatch.undo()
    assert progress_state(result[2]) == "failed"
    message = progress_message(result[2])
    assert "is full" in message and "Free some space" in message and str(outputs) in message, message
    assert_no_debris(outputs)
    kept = final_video(result)
    assert len(read_frames(kept)) == 4 * THREE.window - 3  # the first section, intact
    run_ok(url, start_image, prompt="space again")


def test_an_unwritable_outputs_folder_is_a_clear_message(app, start_image):
    url, outputs = app
    aside = outputs.with_name("outputs-aside")
    outputs.rename(aside)
    outputs.write_text("a file where the outputs folder should be")
    try:
        result = client(url).predict(handle_file(str(start_image)), *form(prompt="nowhere to write"),
                                     api_name="/generate")
        assert progress_state(result[2]) == "failed"
        message = progress_message(result[2])
        assert "outputs folder" in message and str(outputs) in message and "--outputs" in message, message
        assert outputs.read_text() == "a file where the outputs folder should be"
    finally:
        outputs.unlink()
        aside.rename(outputs)
    run_ok(url, start_image, prompt="writable again")


# ---------------------------------------------------------------------------------------------
# Killed mid-job, resumed on the next start


def _source_flags(tiny_sources, model: str = "framepack") -> list[str]:
    return ["--hunyuan", str(tiny_sources.hunyuan), "--siglip", str(tiny_sources.siglip),
            "--transformer", str(tiny_sources.transformer(model))]


LONG = GenerationSettings(prompt="a slow pan across the hills", seconds=4, window=2, steps=1, resolution=64,
                          seed=21, cache="none")


@pytest.fixture(scope="module")
def uninterrupted(tiny_components, start_image, tmp_path_factory) -> Path:
    """The reference: LONG run in one go in this process; returns its final video path."""
    from diffusers_helper.events import Finished

    out = tmp_path_factory.mktemp("whole") / "whole.mp4"
    events = list(pipeline_module.generate(tiny_components("framepack"), LONG, start_image, out))
    assert isinstance(events[-1], Finished), events[-1]
    return out


def _same_result(resumed: Path, reference: Path) -> None:
    assert torch.equal(history_latents(resumed), history_latents(reference))
    assert np.array_equal(read_frames(resumed), read_frames(reference))


def test_the_cli_killed_mid_job_resumes_to_the_uninterrupted_result(tiny_sources, start_image, uninterrupted, tmp_path):
    out = tmp_path / "cut.mp4"
    argv = [sys.executable, "-m", "diffusers_helper", "generate", "--image", str(start_image), "--prompt", LONG.prompt,
            "--output", str(out), "--seconds", str(LONG.seconds), "--window", str(LONG.window), "--steps", "1",
            "--resolution", "64", "--seed", str(LONG.seed), "--no-teacache", "--device", "cpu",
            *_source_flags(tiny_sources)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when(proc, lambda: list(tmp_path.glob("cut.part*.mp4")), "the first section's video")
    assert not out.exists(), "the job finished before it could be killed"
    record = json.loads((tmp_path / "cut.json").read_text())
    assert record["status"] == "running"  # nobody got to say how it ended

    resumed = subprocess.run([sys.executable, "-m", "diffusers_helper", "resume", str(out), "--device", "cpu",
                              *_source_flags(tiny_sources)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    assert "Resuming after section" in resumed.stderr
    _same_result(out, uninterrupted)
    assert json.loads((tmp_path / "cut.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.json", "cut.latents.safetensors", "cut.mp4", "cut.png"]

    # a finished job is not resumed again, and a wrong name is a one-line error
    again = subprocess.run([sys.executable, "-m", "diffusers_helper", "resume", str(out), "--device", "cpu",
                            *_source_flags(tiny_sources)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already finished" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_the_app_killed_mid_job_lists_it_on_the_next_start_and_resumes_it(tiny_sources, start_image, uninterrupted,
                                                                           tmp_path):
    from appkit import free_port

    outputs = tmp_path / "outputs"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "demo_gradio.py", "--device", "cpu", "--port", str(port), "--outputs", str(outputs),
         "--hunyuan", str(tiny_sources.hunyuan), "--siglip", str(tiny_sources.siglip),
         "--framepack-transformer", str(tiny_sources.transformer("framepack"))],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        c = wait_until(lambda: _try_client(url) or proc.poll() is not None, timeout=120, what="the app to start")
        assert proc.poll() is None, proc.stdout.read()
        c.submit(handle_file(str(start_image)), *form(LONG), api_name="/generate")
    finally:
        kill_when(proc, lambda: [p for p in outputs.glob("*.part*.mp4") if not p.name.startswith(".")],
                   "the first section's video")
    (sidecar,) = outputs.glob("*.json")
    stem = sidecar.name[: -len(".json")]
    assert not (outputs / f"{stem}.mp4").exists(), "the job finished before it could be killed"

    with running_app(outputs, tiny_sources) as (url, demo):
        page = _get(url)
        assert "1 job was interrupted" in page  # said on the page, past outputs opened
        c = Client(url, verbose=False)
        listing = c.predict(None, api_name="/list_outputs")
        labels = {value: label for label, value in _choices(listing)}
        assert "interrupted" in labels[stem] and "can resume" in labels[stem], labels
        video, record = c.predict(stem, api_name="/show_output")
        assert is_video(video) and record["status"] == "running"
        result = c.predict(stem, api_name="/resume")
        assert progress_state(result[2]) == "finished", result[2]
        assert final_video(result).name.startswith(stem)
        labels = {value: label for label, value in _choices(c.predict(None, api_name="/list_outputs"))}
        assert "interrupted" not in labels[stem]
        with pytest.raises(Exception, match="already finished"):
            c.predict(stem, api_name="/resume")
    _same_result(outputs / f"{stem}.mp4", uninterrupted)
    assert_no_debris(outputs)


def _try_client(url: str):
    try:
        return Client(url, verbose=False)
    except Exception:  # noqa: BLE001 - not up yet
        return None


def _get(url: str) -> str:
    import httpx

    return httpx.get(f"{url}config", timeout=30).text


def _choices(update) -> list[tuple[str, str]]:
    """(label, value) pairs of a Dropdown update as the API returns it."""
    choices = update["choices"] if isinstance(update, dict) else update
    return [(label, value) for label, value in choices]


def test_resuming_clears_only_what_the_killed_job_left_half_done(tmp_path):
    from diffusers_helper.outputs import remove_stale_files

    stem = "2025-01-02_03-04-05-678"
    leftovers = [f".{stem}.json.tmp", f".{stem}.latents.safetensors.tmp", f".{stem}.part003.mp4.ab12cd34.part",
                 f".{stem}.replay001.mp4", f"{stem}.part001.mp4"]
    kept = [f"{stem}.json", f"{stem}.png", f"{stem}.latents.safetensors", f"{stem}.part002.mp4",
            f".{stem}_2.json.tmp", f"{stem}_2.part001.mp4", "notes.txt"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    work = tmp_path / f".{stem}.part001.mp4.segments-k3j4h5"
    work.mkdir()
    (work / "000001-seg.mp4").write_bytes(b"x")
    other_work = tmp_path / f".{stem}_2.part001.mp4.segments-abcdef"
    other_work.mkdir()
    kept.append(other_work.name)
    removed = remove_stale_files(tmp_path / f"{stem}.mp4")
    assert sorted(p.name for p in removed) == sorted(leftovers + [work.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    # after the resumed job finished, its last partial goes too (the final video replaced it)
    remove_stale_files(tmp_path / f"{stem}.mp4", keep_latest_partial=False)
    assert not (tmp_path / f"{stem}.part002.mp4").exists() and (tmp_path / f"{stem}_2.part001.mp4").exists()


def test_videos_are_encoded_without_x264s_macroblock_tree(tmp_path):
    """A resumed job equals an uninterrupted one only if encoding the same frames gives the same video.

    With its macroblock tree on, x264 (as bundled with PyAV) read memory it had not written when a
    clip was shorter than its lookahead, as a section's pieces are: the same frames came out
    differently now and then (the resume tests failed about one run in two). The encoder records
    its settings in the stream; this checks the one that matters.
    """
    from diffusers_helper.video import write_mp4

    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    write_mp4(frames, tmp_path / "clip.mp4", fps=30, crf=16)
    settings = re.search(rb"options: ([^\x00]*)", (tmp_path / "clip.mp4").read_bytes())
    assert settings, "x264 wrote no settings into the stream"
    assert b" mbtree=0 " in settings.group(1), settings.group(1)[:300]
