"""Video extension: S more seconds after one of our videos or after any video, with both models.

FramePack-F1 extending its own video gives the same latents and frames as the longer job; the
other ways give playable 30 fps videos that start with the old video's frames; every mistake is
refused with one line (exit 2 on the command line, gr.Error on the page) before anything is written.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import gradio as gr
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper import footage
from diffusers_helper.conditioning import resize_and_center_crop
from diffusers_helper.events import CancelToken, Finished, SectionDone
from diffusers_helper.extend import ANCHORED, CONTINUE, check_output, extend, plan_extension
from diffusers_helper.outputs import OutputPaths
from diffusers_helper.pipeline import generate, load_resume_state, resume
from diffusers_helper.video import SectionVideoWriter, _pixels_of, blend, read_frames, to_uint8_frames, write_mp4


def run(events) -> list:
    events = list(events)
    assert isinstance(events[-1], Finished), events[-1]
    return events


def made(components, settings, image, output) -> Path:
    run(generate(components, settings, image, output))
    return output


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def smooth_frame(height: int, width: int, i: int) -> np.ndarray:
    """A smooth picture that changes from frame to frame (compresses well, so comparisons are sharp)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, (40 + 9 * i) % 256)], axis=-1).astype(np.uint8)


def write_video(path: Path, count: int, fps: int, width: int, height: int, codec: str = "png",
                gop: int | None = None) -> list[np.ndarray]:
    """A video made with PyAV (the PNG codec takes odd sizes); returns its frames."""
    frames = [smooth_frame(height, width, i) for i in range(count)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if codec == "png" else "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return frames


def frame_rate(path: Path) -> Fraction:
    with av.open(str(path)) as container:
        return container.streams.video[0].average_rate


# ---------------------------------------------------------------------------------------------
# Reading any video


def test_retime_shows_the_frame_on_screen_at_each_output_frame():
    assert footage.retime([Fraction(i, 30) for i in range(7)], Fraction(7, 30)) == [1] * 7  # 30 fps: as it is
    # 25 fps: output frame i shows input frame floor(i·25/30); 10 frames last 0.4 s = 12 output frames
    repeats = footage.retime([Fraction(i, 25) for i in range(10)], Fraction(10, 25))
    shown = [j for j, n in enumerate(repeats) for _ in range(n)]
    assert shown == [i * 25 // 30 for i in range(12)]
    # 60 fps: every other frame; a variable frame rate follows the time stamps; one frame is one frame
    assert footage.retime([Fraction(i, 60) for i in range(6)], Fraction(6, 60)) == [1, 0, 1, 0, 1, 0]
    assert footage.retime([Fraction(0), Fraction(1, 10), Fraction(1, 8)], Fraction(1, 5)) == [3, 1, 2]
    assert footage.retime([Fraction(5)], Fraction(5)) == [1]


def test_any_video_is_read_retimed_and_fitted_frame_by_frame(tmp_path):
    source = tmp_path / "clip.mov"
    frames = write_video(source, 20, 25, 101, 77)  # odd-sized, 25 fps
    probed = footage.probe(source)
    assert (probed.width, probed.height, probed.frames) == (101, 77, 24)
    read = list(footage.frames(probed, (48, 64)))
    assert len(read) == 24 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in read)
    # each output frame is the input frame on screen then, resized to cover and cropped like an image
    for i, frame in enumerate(read):
        assert psnr(frame, resize_and_center_crop(frames[i * 25 // 30], 64, 48)) > 35
    first, tail = footage.first_frame(probed, (48, 64)), footage.last_frames(probed, (48, 64), 5)
    assert np.array_equal(first, read[0]) and all(np.array_equal(a, b) for a, b in zip(tail, read[-5:]))


def test_a_rotated_video_is_read_as_it_is_shown(tmp_path):
    source = tmp_path / "phone.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # as phones record upright video: turn 90° counter-clockwise to show
        coded = np.zeros((32, 64, 3), np.uint8)
        coded[:, :32] = 255  # the left half white
        frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    probed = footage.probe(source)
    assert (probed.width, probed.height, probed.rotation) == (32, 64, 90)
    [shown] = footage.frames(probed, (64, 32))
    assert shown[-8:].mean() > 200 and shown[:8].mean() < 50  # turned counter-clockwise, the left is at the bottom


def test_the_end_of_a_long_video_is_found_by_seeking(tmp_path, monkeypatch):
    source = tmp_path / "long.mp4"
    write_video(source, 60, 30, 64, 48, codec="libx264", gop=10)
    probed = footage.probe(source)
    decoded = []
    real_fit = footage.fit
    monkeypatch.setattr(footage, "fit", lambda frame, *a: decoded.append(frame.pts) or real_fit(frame, *a))
    first, tail = footage.first_frame(probed, (48, 64)), footage.last_frames(probed, (48, 64), 9)
    assert len(tail) == 9 and np.array_equal(tail[-1], read_frames(source)[-1])
    assert len(decoded) == 1 + 9  # the first frame and the last nine: nothing in between is converted
    assert np.array_equal(first, read_frames(source)[0])


# ---------------------------------------------------------------------------------------------
# The video writer: frames before the sections


@pytest.mark.parametrize("direction", ["append", "prepend"])
def test_a_prefix_is_encoded_as_it_comes_and_cross_faded_like_a_section(tmp_path, direction):
    old = [smooth_frame(32, 48, i) for i in range(20)]
    section = torch.linspace(-1, 1, 12).view(1, 1, 12, 1, 1).expand(1, 3, 12, 32, 48).contiguous()
    with SectionVideoWriter(direction=direction, crf=0) as writer:
        assert writer.add_prefix(iter(old), keep=5, beside=tmp_path / "v.mp4") == 20
        if direction == "append":
            assert writer.frames == 20 and writer.frames_in_memory == 5
            writer.add_section(section, 5, tmp_path / "v.mp4", next_overlap=0)
        else:
            writer.add_section(section, 0, tmp_path / "new.mp4", next_overlap=5)
            assert len(read_frames(tmp_path / "new.mp4")) == 12  # the prefix waits for the join
            writer.join_prefix(tmp_path / "v.mp4")
        assert writer.frames == 27
    # the same frames as one encoding of the blended video
    write_mp4(to_uint8_frames(blend(_pixels_of(old), section, 5)), tmp_path / "one-pass.mp4", crf=0)
    assert psnr(read_frames(tmp_path / "v.mp4"), read_frames(tmp_path / "one-pass.mp4")) > 45
    (tmp_path / "one-pass.mp4").unlink()
    # the segments' work folder is gone with the writer
    assert sorted(p.name for p in tmp_path.iterdir()) == (["new.mp4", "v.mp4"] if direction == "prepend" else ["v.mp4"])


# ---------------------------------------------------------------------------------------------
# Our videos


def test_f1_extension_equals_the_longer_run(tiny_components, image, tmp_path, fast):
    components = tiny_components("f1")
    settings = fast.replace(model="f1", cache="none")  # 1.2 s, window 3: 3 sections of 0.4 s
    short = made(components, settings, image, tmp_path / "short.mp4")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    extension = plan_extension(short, 0.9)
    # the longer video has round((1.2 + 0.9)·30 / (4·3)) = 5 sections: 2 new ones after the old 3
    assert extension.mode == CONTINUE and extension.settings.seconds == 2.1 and extension.settings.sections == 5
    assert extension.old_sections == 3 and extension.sections == 2
    assert plan_extension(**extension.request) == extension  # what a queue keeps to plan it again
    run(extend(components, extension, tmp_path / "ext.mp4", save_latents=tmp_path / "ext.st"))
    longer = made(components, settings.replace(seconds=2.1), image, tmp_path / "long.mp4")

    ext_latents = load_file(tmp_path / "ext.latents.safetensors")["history_latents"]
    assert torch.equal(ext_latents, load_file(OutputPaths(longer).latents)["history_latents"])
    assert torch.equal(load_file(tmp_path / "ext.st")["history_latents"], ext_latents)
    assert np.array_equal(read_frames(tmp_path / "ext.mp4"), read_frames(longer))
    record = json.loads((tmp_path / "ext.json").read_text())
    assert record["status"] == "finished" and record["settings"]["seconds"] == 2.1
    assert record["extends"] == {"video": "short.mp4", "seconds": 0.9, "mode": "continue", "frames": 37,
                                 "sections": 3, "fresh_seed_at": 0}
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())  # the old files as they were


@pytest.mark.slow  # several whole jobs: in the full run
def test_f1_extension_with_a_new_seed_draws_fresh_and_resumes_exactly(tiny_components, image, tmp_path, fast):
    components = tiny_components("f1")
    settings = fast.replace(model="f1", cache="none")
    short = made(components, settings, image, tmp_path / "short.mp4")
    old = load_file(OutputPaths(short).latents)["history_latents"]
    extension = plan_extension(short, 0.9, {"seed": 99})
    assert extension.fresh_seed and extension.settings.seed == 99
    run(extend(components, extension, tmp_path / "whole.mp4"))
    whole = load_file(tmp_path / "whole.latents.safetensors")["history_latents"]
    longer = made(components, settings.replace(seconds=2.1), image, tmp_path / "long.mp4")
    assert torch.equal(whole[:, :, :old.shape[2]], old)
    assert not torch.equal(whole, load_file(OutputPaths(longer).latents)["history_latents"])

    # stopped after its first new section and resumed: the same as the extension that ran through
    cancel = CancelToken()
    for event in extend(components, extension, tmp_path / "cut.mp4", cancel=cancel):
        if isinstance(event, SectionDone):
            cancel.cancel()
    assert load_resume_state(tmp_path / "cut.mp4").sections_done == 4
    run(resume(components, tmp_path / "cut.mp4"))
    assert torch.equal(load_file(tmp_path / "cut.latents.safetensors")["history_latents"], whole)
    assert np.array_equal(read_frames(tmp_path / "cut.mp4"), read_frames(tmp_path / "whole.mp4"))

    # extended once more, it goes on with seed 99's sequence: as if the first extension had been longer
    again = plan_extension(tmp_path / "whole.mp4", 0.4)
    assert again.mode == CONTINUE and again.seed_start == 3 and again.settings.seed == 99
    run(extend(components, again, tmp_path / "again.mp4"))
    run(extend(components, plan_extension(short, 1.3, {"seed": 99}), tmp_path / "at-once.mp4"))
    assert torch.equal(load_file(tmp_path / "again.latents.safetensors")["history_latents"],
                       load_file(tmp_path / "at-once.latents.safetensors")["history_latents"])


def test_framepack_extension_starts_with_the_old_frames(tiny_components, image, tmp_path, fast):
    components = tiny_components("framepack")
    settings = fast.replace(cache="none")
    short = made(components, settings, image, tmp_path / "short.mp4")
    extension = plan_extension(short, 0.8)
    assert extension.mode == ANCHORED and extension.sections == 2 and not extension.fresh_seed
    run(extend(components, extension, tmp_path / "ext.mp4"))

    old, new = read_frames(short), read_frames(tmp_path / "ext.mp4")
    joint = 4 * settings.window - 3  # cross-faded like a section boundary
    assert frame_rate(tmp_path / "ext.mp4") == 30
    assert len(new) == len(old) + 4 * settings.window * extension.sections
    assert psnr(new[:len(old) - joint], old[:-joint]) > 30
    latents = load_file(tmp_path / "ext.latents.safetensors")["history_latents"]
    old_latents = load_file(OutputPaths(short).latents)["history_latents"]
    assert latents.shape[2] == old_latents.shape[2] + settings.window * extension.sections
    assert torch.equal(latents[:, :, :old_latents.shape[2]], old_latents)
    # an extension made from another video's frames is not resumed (it is extended again)
    record = json.loads((tmp_path / "ext.json").read_text())
    record["status"] = "running"
    (tmp_path / "cut.json").write_text(json.dumps(record))
    (tmp_path / "cut.latents.safetensors").write_bytes((tmp_path / "ext.latents.safetensors").read_bytes())
    (tmp_path / "cut.png").write_bytes((tmp_path / "ext.png").read_bytes())
    with pytest.raises(ValueError, match="extend that video again"):
        load_resume_state(tmp_path / "cut.mp4")


# ---------------------------------------------------------------------------------------------
# Any video


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_a_25_fps_odd_sized_video_from_elsewhere(tiny_components, tmp_path, fast, model):
    source = tmp_path / "clip.mov"
    frames = write_video(source, 20, 25, 101, 77)
    extension = plan_extension(source, 1.0, {"model": model}, defaults=fast)
    assert extension.mode == ANCHORED and extension.frames == 24 and extension.size == (48, 64)
    # 24 frames are 0.8 s: two sections of the timeline; 1.8 s in all are four
    assert (extension.old_sections, extension.sections, extension.settings.seconds) == (2, 2, 1.8)
    run(extend(tiny_components(model), extension, tmp_path / "ext.mp4"))

    new = read_frames(tmp_path / "ext.mp4")
    assert frame_rate(tmp_path / "ext.mp4") == 30 and new.shape[1:] == (48, 64, 3)
    assert len(new) == 24 + 4 * fast.window * extension.sections
    joint = 4 * fast.window - 3
    for i in range(24 - joint):
        assert psnr(new[i], resize_and_center_crop(frames[i * 25 // 30], 64, 48)) > 30, i
    record = json.loads((tmp_path / "ext.json").read_text())
    assert record["extends"]["video"] == "clip.mov" and record["extends"]["mode"] == "anchored"


def test_a_video_of_one_frame_is_extended(tiny_components, tmp_path, fast):
    source = tmp_path / "still.mov"
    [frame] = write_video(source, 1, 25, 90, 70)
    extension = plan_extension(source, 1.2, defaults=fast.replace(cache="none"))
    assert extension.frames == 1 and extension.sections == 3
    run(extend(tiny_components("framepack"), extension, tmp_path / "ext.mp4"))
    new = read_frames(tmp_path / "ext.mp4")
    assert len(new) == 1 + 3 * 4 * fast.window and psnr(new[0], resize_and_center_crop(frame, 64, 48)) > 30


# ---------------------------------------------------------------------------------------------
# Refusals: one line, nothing written


@pytest.fixture(scope="module")
def videos(tiny_components, image, tmp_path_factory, fast):
    """One of our F1 videos and files that are not videos, in a folder of their own (tests only read them)."""
    folder = tmp_path_factory.mktemp("in")
    ours = made(tiny_components("f1"), fast.replace(model="f1", cache="none"), image, folder / "ours.mp4")
    (folder / "notes.txt").write_text("not a video")
    with av.open(str(folder / "empty.mkv"), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    write_video(folder / "still.mov", 1, 25, 90, 70)
    return {"ours": ours, "text": folder / "notes.txt", "image": OutputPaths(ours).input_image,
            "empty": folder / "empty.mkv", "missing": folder / "gone.mp4", "one frame": folder / "still.mov"}


REFUSED = [
    ("missing", 1, "not found"), ("text", 1, "not a video"), ("image", 1, "is an image"),
    ("empty", 1, "shorter than one frame"), ("ours", 0, "above 0"), ("ours", -2, "above 0"), ("ours", "nan", "above 0"),
    ("ours", 119.5, "at most 120 s"), ("ours", 0.1, "no new section"), ("one frame", 0.5, "at least 1 s"),
]


@pytest.mark.parametrize("which, seconds, message", REFUSED)
def test_what_cannot_be_extended_is_refused(videos, which, seconds, message):
    with pytest.raises(ValueError, match=message):
        plan_extension(videos[which], seconds)


def test_outputs_that_exist_or_are_the_input_are_refused(videos, tmp_path):
    extension = plan_extension(videos["ours"], 1)
    for output, message in [(videos["ours"], "is the video being extended"), (tmp_path / "x.mov", r"\.mp4")]:
        with pytest.raises(ValueError, match=message):
            check_output(extension, output)
    (tmp_path / "taken.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="taken.png already exists"):
        check_output(extension, tmp_path / "taken.mp4")


@pytest.mark.parametrize("which, seconds, message", REFUSED[:6] + [("ours", 500, "at most 120 s")])
def test_the_command_line_refuses_with_one_line_and_writes_nothing(videos, cli_error, tmp_path, which, seconds,
                                                                   message):
    inputs = sorted(p.name for p in videos["ours"].parent.iterdir())
    err = cli_error(["extend", str(videos[which]), "--seconds", str(seconds), "--output", str(tmp_path / "new.mp4")])
    assert message in err
    assert not any(tmp_path.iterdir()) and sorted(p.name for p in videos["ours"].parent.iterdir()) == inputs


def test_the_command_line_refuses_an_output_that_exists_or_is_the_input(videos, cli_error, tmp_path):
    for output, message in [(videos["ours"], "is the video being extended"), (videos["text"], ".mp4")]:
        assert message in cli_error(["extend", str(videos["ours"]), "--seconds", "1", "--output", str(output)])
    (tmp_path / "new.json").write_text("{}")
    assert "new.json already exists" in cli_error(["extend", str(videos["ours"]), "--seconds", "1", "--output",
                                                   str(tmp_path / "new.mp4")])
    assert "--seconds" in cli_error(["extend", str(videos["ours"]), "--output", str(tmp_path / "other.mp4")])


def test_the_page_refuses_with_a_message_and_queues_nothing(videos, tmp_path, tiny_sources):
    from diffusers_helper.app.extend_panel import extend_video
    from diffusers_helper.app.ui import AppConfig, Page, form_values, settings_from_form

    page = Page(AppConfig(outputs=tmp_path / "outputs", sources=tiny_sources, device="cpu"))
    try:
        values = form_values(page.config.defaults)
        cases = [(None, None, 1, "Choose a past output"), (None, str(videos["text"]), 1, "not a video"),
                 (None, str(videos["empty"]), 1, "shorter than one frame"),
                 (None, str(videos["ours"]), -1, "above 0"), (None, str(videos["ours"]), 0.1, "no new section")]
        for stem, upload, seconds, message in cases:
            with pytest.raises(gr.Error, match=message):
                next(extend_video(page, stem, upload, seconds, "", None, values, "tab", settings_from_form))
        assert not page.jobs.active()
        assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").glob("*.mp4"))
    finally:
        page.jobs.close()
        page.snapshots.close()
