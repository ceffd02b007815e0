"""Creative control on the tiny models: end frame, keyframes, prompts over time, text-to-video, their refusals and resume.

The fast settings have 3 sections of window 3: L = 3·4/30 = 0.4 s per section, so a marker at 0.4 s
applies from section 1 and one at 0.8 s from section 2 (time order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_helper.conditioning import find_nearest_bucket, image_to_tensor, resize_and_center_crop, vae_encode
from diffusers_helper.events import CancelToken, Finished, SectionDone, SectionStarted
from diffusers_helper.outputs import OutputPaths
from diffusers_helper.pipeline import generate, load_resume_state, resume
from diffusers_helper.settings import GenerationSettings, SettingsError
from diffusers_helper.video import read_frames


def _job(components, settings, image, output, **kw):
    """Run a job to its end; (events, its latents in time order)."""
    latents = output.with_suffix(".st")
    events = list(generate(components, settings, image, output, save_latents=latents, **kw))
    assert isinstance(events[-1], Finished), events[-1]
    return events, load_file(latents)["history_latents"]


def _sections(latents, settings, time_sections):
    """The latent frames of the given time-order sections (after the start frame)."""
    w = settings.window
    return torch.cat([latents[:, :, 1 + j * w: 1 + (j + 1) * w] for j in time_sections], dim=2)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, image):
    """The start image and two other pictures as files (an end frame, a keyframe)."""
    folder = tmp_path_factory.mktemp("pictures")
    start = folder / "start.png"
    Image.fromarray(image).save(start)
    other = folder / "other.png"
    Image.fromarray(np.ascontiguousarray(image[::-1, ::-1])).save(other)  # turned round: different, same size
    third = folder / "third.png"
    Image.fromarray(np.ascontiguousarray(255 - image)).save(third)
    return start, other, third


def _clean_kwargs(components):
    """Record the transformer's clean latents per call."""
    seen = []
    hook = components.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["latents_clean"].clone()), with_kwargs=True)
    return seen, hook


# ---------------------------------------------------------------------------------------------
# End frame


def test_end_strength_0_is_exactly_no_end_frame(tiny_components, fast, pictures, tmp_path):
    start, other, _ = pictures
    c = tiny_components("framepack")
    s = fast.replace(teacache=False)
    _, plain = _job(c, s, start, tmp_path / "plain.mp4")
    _, zero = _job(c, s.replace(end_image=str(other), end_strength=0), start, tmp_path / "zero.mp4")
    assert torch.equal(plain, zero)


def test_the_end_frame_is_the_first_sections_post_latent_and_changes_the_video(tiny_components, fast, pictures,
                                                                               tmp_path):
    start, other, _ = pictures
    c = tiny_components("framepack")
    s = fast.replace(teacache=False, steps=1, end_image=str(other), end_strength=0.5)
    seen, hook = _clean_kwargs(c)
    try:
        _, with_end = _job(c, s, start, tmp_path / "end.mp4")
    finally:
        hook.remove()
    # computed here independently: the end image cropped to the start's bucket, VAE mean × strength
    h, w = find_nearest_bucket(90, 120, s.resolution)
    end_latent = vae_encode(image_to_tensor(resize_and_center_crop(np.array(Image.open(other)), w, h)), c.vae).float()
    torch.testing.assert_close(seen[0][:, :, 1:], end_latent * 0.5, rtol=0, atol=1e-6)
    _, plain = _job(c, s.replace(end_image=None), start, tmp_path / "plain.mp4")
    assert not torch.equal(with_end, plain)
    # the end frame is not part of the video, and its copy (as the model saw it) is beside it
    assert with_end.shape == plain.shape
    paths = OutputPaths(tmp_path / "end.mp4")
    assert np.array(Image.open(paths.end_image)).shape == (h, w, 3)
    record = json.loads(paths.sidecar.read_text())
    assert record["settings"]["end_image"] == paths.end_image.name


def test_an_end_image_with_f1_is_refused():
    with pytest.raises(SettingsError, match="FramePack"):
        GenerationSettings(model="f1", end_image="end.png")


# ---------------------------------------------------------------------------------------------
# Keyframes


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_a_keyframe_identical_to_the_start_image_is_no_keyframe(tiny_components, fast, pictures, tmp_path, model):
    start, _, _ = pictures
    c = tiny_components(model)
    s = fast.replace(model=model, teacache=False)
    _, plain = _job(c, s, start, tmp_path / "plain.mp4")
    _, same = _job(c, s.replace(keyframes=((0.4, str(start)),)), start, tmp_path / "same.mp4")
    assert torch.equal(plain, same)


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_a_keyframe_anchors_the_sections_from_its_time_on(tiny_components, fast, pictures, tmp_path, model):
    start, other, _ = pictures
    c = tiny_components(model)
    s = fast.replace(model=model, teacache=False, steps=1, keyframes=((0.8, str(other)),))  # from section 2 on
    seen, hook = _clean_kwargs(c)
    try:
        events, _ = _job(c, s, start, tmp_path / "k.mp4")
    finally:
        hook.remove()
    started = [e for e in events if isinstance(e, SectionStarted)]
    h, w = find_nearest_bucket(90, 120, s.resolution)
    key_latent = vae_encode(image_to_tensor(resize_and_center_crop(np.array(Image.open(other)), w, h)), c.vae).float()
    start_latent = vae_encode(image_to_tensor(resize_and_center_crop(np.array(Image.open(start)), w, h)), c.vae).float()
    for event, clean in zip(started, seen):
        expected = key_latent if event.time_index >= 2 else start_latent
        torch.testing.assert_close(clean[:, :, :1], expected, rtol=0, atol=1e-6)
        assert (event.anchor == "keyframe1") == (event.time_index >= 2)
        assert event.anchor_seconds == (0.8 if event.time_index >= 2 else None)
    # the start image stays the video's first frame
    latents = load_file(tmp_path / "k.st")["history_latents"]
    torch.testing.assert_close(latents[:, :, :1], start_latent, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Prompts over time


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_a_marker_at_0_is_the_plain_prompt(tiny_components, fast, image, tmp_path, model):
    c = tiny_components(model)
    s = fast.replace(model=model, teacache=False, prompt="a cat walks on the grass")
    _, plain = _job(c, s, image, tmp_path / "plain.mp4")
    _, marked = _job(c, s.replace(prompt="[0s: a cat walks on the grass]"), image, tmp_path / "marked.mp4")
    assert torch.equal(plain, marked)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_a_prompt_change_leaves_the_sections_generated_before_it_alone(tiny_components, fast, image, tmp_path, model):
    """F1 generates forward: sections before the change equal a run with the first prompt alone. FramePack
    generates backwards: the sections from the change on come first and equal a run with the later prompt alone."""
    c = tiny_components(model)
    s = fast.replace(model=model, teacache=False)
    _, changed = _job(c, s.replace(prompt="a cat sits [0.4s: the cat jumps]"), image, tmp_path / "changed.mp4")
    _, first = _job(c, s.replace(prompt="a cat sits"), image, tmp_path / "first.mp4")
    _, later = _job(c, s.replace(prompt="the cat jumps"), image, tmp_path / "later.mp4")
    if model == "f1":
        assert torch.equal(_sections(changed, s, [0]), _sections(first, s, [0]))
        assert not torch.equal(_sections(changed, s, [1, 2]), _sections(first, s, [1, 2]))
    else:
        assert torch.equal(_sections(changed, s, [1, 2]), _sections(later, s, [1, 2]))
        assert not torch.equal(_sections(changed, s, [0]), _sections(later, s, [0]))


def test_the_progress_names_each_sections_prompt_and_a_blend(tiny_components, fast, image, tmp_path):
    c = tiny_components("f1")
    s = fast.replace(model="f1", teacache=False, steps=1, prompt="[0s: a cat sits] [0.4s: the cat jumps]",
                     prompt_blend=1)
    events, _ = _job(c, s, image, tmp_path / "v.mp4")
    started = [(e.time_index, e.prompt, e.blend_from, e.blend) for e in events if isinstance(e, SectionStarted)]
    assert started == [(0, "a cat sits", None, 1.0), (1, "the cat jumps", "a cat sits", 0.5),
                       (2, "the cat jumps", None, 1.0)]


def test_blended_prompt_embeddings_mix_linearly_over_the_real_tokens_of_either():
    from diffusers_helper.conditioning import PromptEmbeddings

    def prompt(tokens, value):
        llama = torch.zeros(1, 8, 4)
        llama[:, :tokens] = value
        mask = torch.zeros(1, 8, dtype=torch.bool)
        mask[:, :tokens] = True
        return PromptEmbeddings(llama, mask, torch.full((1, 3), value))

    old, new = prompt(3, 1.0), prompt(5, 3.0)
    mix = old.mixed(new, 0.25)
    assert mix.mask[0].tolist() == [True] * 5 + [False] * 3
    assert mix.llama[0, :3, 0].tolist() == [1.5] * 3 and mix.llama[0, 3:5, 0].tolist() == [0.75] * 2
    assert mix.llama[0, 5:].abs().sum() == 0 and mix.pooled[0].tolist() == [1.5] * 3


# ---------------------------------------------------------------------------------------------
# Text-to-video


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_text_to_video_runs_and_saves_no_synthetic_frame(tiny_components, fast, tmp_path, model):
    s = fast.replace(model=model, teacache=False, steps=1, text_to_video=True, aspect="4:3", start_color="white")
    events, latents = _job(tiny_components(model), s, None, tmp_path / "t2v.mp4")
    frames = read_frames(tmp_path / "t2v.mp4")
    assert len(frames) == events[-1].frames == s.total_frames - 1
    h, w = find_nearest_bucket(3, 4, s.resolution)
    assert frames.shape[1:3] == (h, w)
    assert not OutputPaths(tmp_path / "t2v.mp4").input_image.exists()
    # the video's first frame is generated, not the white start frame
    assert frames[0].mean() < 250
    assert latents.shape[2] == s.total_latent_frames


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("changes, fragment", [
    (dict(prompt="a cat [1.2s: jumps]"), "1.2 s"),  # round(1.2/0.4) = 3: no such section
    (dict(prompt="[0.8s-0.4s: backwards]"), "ends before it starts"),
    (dict(prompt="[0s: a] stray words [0.4s: b]"), "outside the prompt markers"),
    (dict(keyframes=((1.2, "k.png"),)), "keyframe at 1.2 s"),
    (dict(keyframes=((0, "k.png"),)), "inside the video"),
    (dict(keyframes=((0.4, "a.png"), (0.5, "b.png"))), "same section"),
    (dict(end_strength=1.5), "end_strength"),
    (dict(model="f1", end_image="e.png"), "FramePack"),
    (dict(start_color="mauve"), "start_color"),
    (dict(aspect="16x9"), "aspect"),
])
def test_inputs_that_cannot_apply_are_refused_naming_them(fast, changes, fragment):
    with pytest.raises(SettingsError, match=fragment):
        fast.replace(**changes)


def test_the_cli_refuses_a_missing_keyframe_on_one_line_and_writes_nothing(tiny_sources, pictures, tmp_path,
                                                                           cli_error):
    start, _, _ = pictures
    base = ["generate", "--image", str(start), "--prompt", "x", "--output", str(tmp_path / "o.mp4"),
            "--seconds", "1.2", "--window", "3", "--resolution", "64", "--device", "cpu",
            "--hunyuan", str(tiny_sources.hunyuan), "--siglip", str(tiny_sources.siglip),
            "--transformer", str(tiny_sources.transformer("framepack"))]
    assert "keyframe at 0.4 s" in cli_error(base + ["--keyframe", f"0.4={tmp_path / 'gone.png'}"])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert "end image" in cli_error(base + ["--end-image", str(not_image)]).lower()
    assert "T=PATH" in cli_error(base + ["--keyframe", "soon=x.png"])
    assert "1.2 s" in cli_error(base + ["--prompt", "a [1.2s: b]"])
    assert not (tmp_path / "o.mp4").exists() and not list(tmp_path.glob("o.*"))


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.slow
@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_resume_with_every_feature_equals_the_uninterrupted_run(tiny_components, fast, pictures, tmp_path, model):
    start, other, third = pictures
    c = tiny_components(model)
    s = fast.replace(model=model, teacache=False, prompt="a cat sits [0.4s: the cat jumps]", prompt_blend=1,
                     keyframes=((0.8, str(third)),),
                     **(dict(end_image=str(other), end_strength=0.7) if model == "framepack" else
                        dict(text_to_video=True, start_color="gray")))
    image = None if s.text_to_video else start
    _, whole = _job(c, s, image, tmp_path / "whole.mp4")
    cancel = CancelToken()
    out = tmp_path / "cut.mp4"
    for event in generate(c, s, image, out, cancel=cancel):
        if isinstance(event, SectionDone):
            cancel.cancel()
    sidecar = OutputPaths(out).sidecar
    record = json.loads(sidecar.read_text())
    record["status"] = "running"
    sidecar.write_text(json.dumps(record))
    assert load_resume_state(out).sections_done == 1
    events = list(resume(c, out, save_latents=tmp_path / "cut.st"))
    assert isinstance(events[-1], Finished), events[-1]
    assert torch.equal(load_file(tmp_path / "cut.st")["history_latents"], whole)
    assert np.array_equal(read_frames(out), read_frames(tmp_path / "whole.mp4"))
