"""Tests for the desktop app (diffusers_helper.app, demo_gradio.py), driven through gradio_client.

The app runs in this process on 127.0.0.1 with the tiny models and a temporary outputs folder;
each test talks to it over HTTP exactly as the page and API users do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import appkit
from appkit import final_video, free_port, is_video, progress_state, stem_of
from diffusers_helper.app import FORM_FIELDS, AppConfig, build_app, build_parser, config_from_args, launch_options
from diffusers_helper.app.ui import settings_from_form
from diffusers_helper.conditioning import find_nearest_bucket
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames, read_metadata

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is needed to drive the app")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = GenerationSettings(prompt="", seconds=1, window=2, steps=2, resolution=64, seed=5)
JOB_TIMEOUT = 180


@pytest.fixture(scope="module")
def app(tiny_sources, tmp_path_factory):
    """The app, launched in this process; yields (url, outputs folder)."""
    outputs = tmp_path_factory.mktemp("app") / "outputs"
    demo = build_app(AppConfig(outputs=outputs, sources=tiny_sources, device="cpu", defaults=SMALL))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, allowed_paths=[str(outputs)])
    yield url, outputs
    demo.job_queue.close()
    demo.close()
    demo.snapshots.close()


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "start.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(path)
    return path


def form(**changes) -> list:
    """The generation endpoint's inputs after the image, from SMALL with `changes`."""
    return appkit.form(SMALL, **changes)


def client(url: str) -> Client:
    return Client(url, verbose=False)


def sidecar_for(outputs: Path, video: Path) -> dict:
    """The JSON sidecar of a job from a video the page received (its name is kept)."""
    return json.loads((outputs / f"{stem_of(video)}.json").read_text())


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_returns_a_playable_mp4_with_the_expected_frame_count(app, start_image):
    url, outputs = app
    settings = SMALL.replace(prompt="a small boat drifts on the lake", seed=11)
    job = client(url).submit(handle_file(str(start_image)), *form(prompt=settings.prompt, seed=11), api_name="/generate")
    result = job.result(timeout=JOB_TIMEOUT)
    video = final_video(result)
    frames = read_frames(video)
    assert len(frames) == settings.total_frames
    assert frames.shape[1:] == (*find_nearest_bucket(72, 96, settings.resolution), 3)
    assert progress_state(result[2]) == "finished"
    record = sidecar_for(outputs, video)
    assert record["settings"] == settings.to_dict() and record["status"] == "finished"
    assert json.loads(read_metadata(video)["comment"])["settings"] == settings.to_dict()
    stem = video.name[: -len(".mp4")]
    assert sorted(p.name for p in outputs.glob(f"{stem}*") if p.name.startswith(stem + ".")) == [
        f"{stem}.json", f"{stem}.latents.safetensors", f"{stem}.mp4", f"{stem}.png"]
    # The stream showed progress: previews, a partial video after a section, and the step counter.
    outputs_seen = job.outputs()
    htmls = [o[2] for o in outputs_seen]
    assert any('data-state="running"' in h and "step 2 of 2" in h for h in htmls)
    assert any(isinstance(o[1], str) and o[1].endswith(".png") for o in outputs_seen), "no latent preview was shown"
    assert sum(1 for o in outputs_seen[:-1] if is_video(o[0])) >= 1, "no partial video"


@pytest.mark.slow
def test_end_stops_the_job_and_keeps_its_partial_video(app, start_image):
    url, outputs = app
    settings = SMALL.replace(prompt="stop me", seconds=4, steps=3)  # 15 sections: plenty of time to press End
    c = client(url)
    job = c.submit(handle_file(str(start_image)), *form(prompt="stop me", seconds=4, steps=3), api_name="/generate")
    deadline = time.monotonic() + JOB_TIMEOUT
    while not any(is_video(o[0]) for o in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "no section finished"
        time.sleep(0.05)
    ended = time.monotonic()
    c.predict(api_name="/end")
    result = job.result(timeout=JOB_TIMEOUT)
    assert time.monotonic() - ended < 30
    assert progress_state(result[2]) == "cancelled"
    video = final_video(result)
    frames = len(read_frames(video))
    assert 0 < frames < settings.total_frames
    assert sidecar_for(outputs, video)["settings"]["prompt"] == "stop me"
    stem = video.name.split(".")[0]
    kept = sorted(outputs.glob(f"{stem}.part*.mp4"))  # the last finished section's video, on disk
    assert len(kept) == 1 and len(read_frames(kept[0])) == frames
    assert not (outputs / f"{stem}.mp4").exists()
    # the app keeps working after End
    again = c.submit(handle_file(str(start_image)), *form(prompt="after end"), api_name="/generate")
    assert len(read_frames(final_video(again.result(timeout=JOB_TIMEOUT)))) == SMALL.total_frames


@pytest.mark.slow
def test_two_pages_at_once_both_finish_with_their_own_results(app, start_image):
    url, outputs = app
    a, b = client(url), client(url)
    job_a = a.submit(handle_file(str(start_image)), *form(prompt="alpha", seed=1, model="framepack"), api_name="/generate")
    job_b = b.submit(handle_file(str(start_image)), *form(prompt="beta", seed=2, model="f1", window=3),
                     api_name="/generate")
    result_a, result_b = job_a.result(timeout=JOB_TIMEOUT), job_b.result(timeout=JOB_TIMEOUT)
    video_a, video_b = final_video(result_a), final_video(result_b)
    assert video_a.name != video_b.name
    record_a, record_b = sidecar_for(outputs, video_a), sidecar_for(outputs, video_b)
    assert (record_a["settings"]["prompt"], record_a["model"]) == ("alpha", "framepack")
    assert (record_b["settings"]["prompt"], record_b["model"]) == ("beta", "f1")
    assert len(read_frames(video_a)) == SMALL.replace(seed=1).total_frames
    assert len(read_frames(video_b)) == SMALL.replace(window=3, model="f1").total_frames
    # One ran while the other waited, and the waiting page was told where it stood.
    waited = [h for h in [o[2] for o in job_a.outputs()] + [o[2] for o in job_b.outputs()]
              if "Waiting in the queue: position 1, 1 job ahead" in h]
    assert waited
    # Neither page saw the other's progress: each stream counts only its own job's sections.
    for job, sections in ((job_a, SMALL.sections), (job_b, SMALL.replace(window=3).sections)):
        counts = {int(n) for o in job.outputs() for n in re.findall(r"Section \d+ of (\d+)", o[2])}
        assert counts == {sections}
    assert SMALL.sections != SMALL.replace(window=3).sections


@pytest.mark.slow
def test_user_mistakes_are_clear_messages_and_the_app_keeps_working(app, start_image, tmp_path):
    url, _ = app
    c = client(url)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")
    cases = [
        (None, form(), "Upload a start image first"),
        (handle_file(str(not_an_image)), form(), "notes.png is not an image"),
        (handle_file(str(start_image)), form(steps=2.5), "steps must be a whole number"),
        (handle_file(str(start_image)), form(seed=None), "seed must be a number"),
    ]
    for image, values, message in cases:
        with pytest.raises(Exception) as caught:
            c.predict(image, *values, api_name="/generate")
        assert message in str(caught.value)
    result = c.predict(handle_file(str(start_image)), *form(prompt="still fine"), api_name="/generate")
    assert len(read_frames(final_video(result))) == SMALL.total_frames


@pytest.mark.slow
def test_the_api_takes_inputs_by_name_and_the_rest_keep_the_pages_defaults(app, start_image, tmp_path):
    """The README's scripting example: named inputs, everything left out as on the page."""
    url, outputs = app
    result = client(url).predict(image=handle_file(str(start_image)), prompt="named inputs", seed=123,
                                 api_name="/generate")
    record = sidecar_for(outputs, final_video(result))
    assert record["settings"]["prompt"] == "named inputs" and record["settings"]["seed"] == 123
    assert record["settings"]["steps"] == SMALL.steps and record["settings"]["seconds"] == SMALL.seconds


@pytest.mark.slow
def test_past_outputs_play_and_load_their_settings_back(app, start_image):
    url, outputs = app
    c = client(url)
    result = c.predict(handle_file(str(start_image)), *form(prompt="remember me", seed=77, crf=20, sampler="bh2"),
                       api_name="/generate")
    stem = final_video(result).name[: -len(".mp4")]
    video, record = c.predict(stem, api_name="/show_output")
    assert is_video(video) and len(read_frames(video)) == SMALL.total_frames
    assert record["settings"]["prompt"] == "remember me"
    loaded = c.predict(stem, api_name="/load_settings")
    image, values = loaded[0], dict(zip(FORM_FIELDS, loaded[1:]))
    assert values["prompt"] == "remember me" and values["seed"] == 77 and values["crf"] == 20 and values["sampler"] == "bh2"
    assert settings_from_form(values) == SMALL.replace(prompt="remember me", seed=77, crf=20, sampler="bh2")
    height, width = find_nearest_bucket(72, 96, SMALL.resolution)
    assert Image.open(image if isinstance(image, str) else image["path"]).size == (width, height)
    with pytest.raises(Exception, match="Unknown output"):
        c.predict("../secrets", api_name="/show_output")


# ---------------------------------------------------------------------------------------------
# Flags and startup


def test_the_app_module_keeps_no_mutable_state_and_writes_nothing_on_import():
    import diffusers_helper.app as app_package
    import diffusers_helper.settings as settings_module
    from diffusers_helper.app import server, ui, views

    for app_module in (app_package, server, ui, views):
        assert not Path(app_module.__file__).with_suffix(".pyi").exists()  # Gradio writes stubs for subclasses
        own = {name: value for name, value in vars(app_module).items()
               if not name.startswith("__") and value is not getattr(settings_module, name, None)}  # not imported tables
        assert [name for name, value in own.items() if isinstance(value, (list, dict, set))] == [], app_module


def test_flags_and_their_defaults(tmp_path):
    args = build_parser().parse_args([])
    assert (args.server, args.port, args.share, args.inbrowser, args.outputs) == ("127.0.0.1", None, False, False, "outputs")
    assert (args.device, args.vram, args.model, args.tiny, args.attention) == ("auto", "auto", "framepack", False, "auto")
    args = build_parser().parse_args([
        "--server", "0.0.0.0", "--port", "7861", "--share", "--inbrowser", "--outputs", str(tmp_path / "o"),
        "--hunyuan", "/m/h", "--siglip", "/m/s", "--transformer", "/m/t", "--f1-transformer", "/m/f1",
        "--device", "cpu", "--vram", "low", "--model", "framepack", "--attention", "sdpa",
    ])
    config = config_from_args(args)
    sources = config.sources()
    assert (sources.hunyuan, sources.siglip) == ("/m/h", "/m/s")
    assert (sources.transformer("framepack"), sources.transformer("f1")) == ("/m/t", "/m/f1")
    assert (config.device, config.vram, config.outputs, config.attention) == ("cpu", "low", tmp_path / "o", "sdpa")
    options = launch_options(args, config)
    assert options["server_name"] == "0.0.0.0" and options["server_port"] == 7861
    assert options["share"] is True and options["inbrowser"] is True
    assert str((tmp_path / "o").resolve()) in options["allowed_paths"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--vram", "medium"])


@pytest.mark.slow
def test_demo_gradio_opens_the_page_in_seconds_without_loading_models(tmp_path):
    """`python demo_gradio.py --tiny` serves the page before any model exists (they load on first use)."""
    port = free_port()
    env = {**os.environ, "FRAMEPACK_TINY_CACHE": str(tmp_path / "tiny-not-built"), "GRADIO_ANALYTICS_ENABLED": "False"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "demo_gradio.py", "--tiny", "--device", "cpu", "--port", str(port), "--outputs", str(tmp_path / "out")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    page = response.read().decode()
                break
            except OSError:
                assert time.monotonic() - started < 60, "the page did not open within 60 s"
                time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert "FramePack" in page
        assert not (tmp_path / "tiny-not-built").exists(), "models were built or loaded before the first job"
        print(f"demo_gradio.py served the page after {elapsed:.1f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # the same script, imported, does nothing
    imported = subprocess.run([sys.executable, "-c", "import demo_gradio"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0 and "Running on" not in imported.stdout + imported.stderr


def test_a_bad_device_flag_stops_before_the_page_opens(capsys):
    from diffusers_helper.app import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["--device", "tpu"])
    assert exited.value.code == 2 and "tpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"])
    # an attention kernel that can't run here is refused at start, naming what to do instead
    with pytest.raises(SystemExit) as exited:
        parse_args(["--device", "cpu", "--attention", "xformers"])
    assert exited.value.code == 2 and "--attention sdpa" in capsys.readouterr().err
