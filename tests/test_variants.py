"""The model variants as objects, and the per-section plan: history, joining, decoding, resuming, conditioning."""

import pytest
import torch

from diffusers_helper.sections import START, distinct_prompts, plan_sections
from diffusers_helper.settings import GenerationSettings, SettingsError
from diffusers_helper.variants import VARIANTS, display_name, variant


def _history(frames, h=2, w=3):
    # each frame filled with its own index so slices can be identified
    return torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1).expand(1, 16, frames, h, w).clone()


def test_initial_history():
    start = torch.full((1, 16, 1, 2, 3), 7.0)
    fp = variant("framepack").initial_history(start)
    assert fp.shape == (1, 16, 19, 2, 3) and fp.abs().sum() == 0
    f1 = variant("f1").initial_history(start)
    assert f1.shape == (1, 16, 20, 2, 3)
    assert f1[:, :, :19].abs().sum() == 0 and torch.equal(f1[:, :, 19:], start)


def _settings(sections: int) -> GenerationSettings:
    """Settings of a job with `sections` sections (the plan depends on the count, not the window used here)."""
    settings = GenerationSettings(window=33, seconds=round(33 * 4 / 30 * sections, 2))
    assert settings.sections == sections
    return settings


def _simulate(v, sections, window, start):
    """The section loop's bookkeeping with labelled latents (section k generates frames labelled k)."""
    history = v.initial_history(start)
    generated_frames = v.start_frames
    pixel_frames = 0
    plans = plan_sections(_settings(sections), v)
    assert len(plans) == sections
    for plan in plans:
        gen = torch.full((1, 16, window, 1, 1), float(plan.index + 1))
        history, added = v.join(history, gen, start_latent=start, is_last=plan.is_last)
        generated_frames += added
        real = v.real_history(history, generated_frames)
        to_decode, overlap = v.decode_window(real, window, first=plan.index == 0, is_last=plan.is_last)
        decoded = (to_decode.shape[2] - 1) * 4 + 1
        pixel_frames += decoded - overlap
    return real, generated_frames, pixel_frames


@pytest.mark.parametrize("model", ["framepack", "f1"])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_history_bookkeeping_and_frame_counts(model, sections):
    """Simulate the loop with labelled latents: order, real-history size and decoded pixel counts."""
    window = 3
    start = torch.full((1, 16, 1, 1, 1), -1.0)
    real, generated_frames, pixel_frames = _simulate(variant(model), sections, window, start)
    assert generated_frames == sections * window + 1
    # the VAE turns T latents into 4(T-1)+1 frames: the blended video must have exactly that many
    assert pixel_frames == (generated_frames - 1) * 4 + 1 == sections * window * 4 + 1
    labels = real[0, 0, :, 0, 0].tolist()
    assert labels[0] == -1  # the start latent comes first in time for both variants
    if model == "framepack":
        # generated from the end backwards: section 1 is the last in time
        assert labels[1:] == [float(i) for i in range(sections, 0, -1) for _ in range(window)]
    else:
        assert labels[1:] == [float(i) for i in range(1, sections + 1) for _ in range(window)]


def test_decode_windows():
    real = _history(28)
    fp, f1 = variant("framepack"), variant("f1")
    latents, overlap = fp.decode_window(real, 9, first=False, is_last=False)
    assert latents.shape[2] == 18 and overlap == 33
    assert latents[0, 0, :, 0, 0].tolist() == list(range(18))
    latents, _ = fp.decode_window(real, 9, first=False, is_last=True)
    assert latents.shape[2] == 19
    latents, overlap = f1.decode_window(real, 9, first=False, is_last=True)
    assert latents[0, 0, :, 0, 0].tolist() == list(range(10, 28)) and overlap == 33
    latents, overlap = f1.decode_window(real, 9, first=True, is_last=False)
    assert latents.shape[2] == 28 and overlap == 0


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_resume_rebuilds_the_history_and_the_saved_sections(model):
    """What a resumed job rebuilds from its saved latents equals what the loop had after those sections."""
    v, window, sections = variant(model), 3, 5
    start = torch.full((1, 16, 1, 1, 1), -1.0)
    history = v.initial_history(start)
    generated_frames = v.start_frames
    snapshots = []
    for plan in plan_sections(_settings(sections), v):
        gen = torch.full((1, 16, window, 1, 1), float(plan.index + 1))
        history, added = v.join(history, gen, start_latent=start, is_last=plan.is_last)
        generated_frames += added
        snapshots.append((history.clone(), v.real_history(history, generated_frames).clone()))
    for done in range(1, sections):
        history_then, saved = snapshots[done - 1]
        assert v.sections_in(saved.shape[2], window) == (done, 0)
        assert torch.equal(v.resume_history(saved, v.initial_history(start)), history_then)
        for k in range(1, done + 1):
            assert torch.equal(v.saved_after(saved, k, window), snapshots[k - 1][1])
    assert v.sections_in(snapshots[0][1].shape[2] + 1, window)[1] == 1  # a torn write does not fit the window


def test_plans_in_generation_and_time_order():
    s = GenerationSettings(prompt="a cat", seconds=5, window=9)
    fp = plan_sections(s, variant("framepack"))
    f1 = plan_sections(s.replace(model="f1"), variant("f1"))
    assert [p.padding for p in fp] == [3, 2, 1, 0] and [p.padding for p in f1] == [0, 0, 0, 0]
    # FramePack generates the end first: its first section is the last in time
    assert [p.time_index for p in fp] == [3, 2, 1, 0] and [p.time_index for p in f1] == [0, 1, 2, 3]
    assert [p.is_last for p in fp] == [False, False, False, True]
    assert {(p.prompt, p.image, p.anchor) for p in fp + f1} == {("a cat", START, START)}
    assert distinct_prompts(fp) == ["a cat"]


def test_variants_by_name():
    assert sorted(VARIANTS) == ["f1", "framepack"]
    assert variant("framepack").direction == "prepend" and variant("f1").direction == "append"
    assert display_name("f1") == "FramePack-F1" and display_name("other") == "other"
    with pytest.raises(SettingsError, match="model must be one of"):
        variant("sdxl")
