"""Section schedules and context layouts of both variants."""

import pytest
import torch

from diffusers_helper.packing import (
    add_to_history,
    f1_layout,
    framepack_layout,
    initial_history,
    latents_to_decode,
    plan_sections,
    real_history,
    section_paddings,
)
from diffusers_helper.settings import GenerationSettings


@pytest.mark.parametrize(
    "n, expected",
    [(1, [0]), (2, [1, 0]), (3, [2, 1, 0]), (4, [3, 2, 1, 0]), (5, [3, 2, 2, 1, 0]), (7, [3, 2, 2, 2, 2, 1, 0])],
)
def test_framepack_paddings(n, expected):
    assert section_paddings(n) == expected


@pytest.mark.parametrize(
    "seconds, window, sections",
    [(5, 9, 4), (1, 9, 1), (1, 33, 1), (120, 9, 100), (1.2, 1, 9), (3.0, 5, 4), (3.0, 9, 2)],
)
def test_section_count(seconds, window, sections):
    # (3.0, 9): 2.5 sections rounds to 2, Python's round going to even
    assert GenerationSettings(seconds=seconds, window=window).sections == sections


def _history(frames, h=2, w=3):
    # each frame filled with its own index so slices can be identified
    return torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1).expand(1, 16, frames, h, w).clone()


def test_framepack_layout_indices_and_slices():
    window, padding = 9, 2
    history = _history(19)
    layout = framepack_layout(history, window, padding)
    blank = padding * window
    # [start 1 | blank p·w | noisy w | post 1 | 2x 2 | 4x 16]
    assert layout.latent_indices.tolist() == list(range(1 + blank, 1 + blank + window))
    post = 1 + blank + window
    assert layout.clean_indices.tolist() == [0, post]
    assert layout.indices_2x.tolist() == [post + 1, post + 2]
    assert layout.indices_4x.tolist() == list(range(post + 3, post + 19))
    assert layout.clean_1x[0, 0, :, 0, 0].tolist() == [0]
    assert layout.history_2x[0, 0, :, 0, 0].tolist() == [1, 2]
    assert layout.history_4x[0, 0, :, 0, 0].tolist() == list(range(3, 19))


def test_f1_layout_indices_and_slices():
    window = 9
    history = _history(30)
    layout = f1_layout(history, window)
    # [start 1 | 4x 16 | 2x 2 | 1x 1 | noisy w]
    assert layout.indices_4x.tolist() == list(range(1, 17))
    assert layout.indices_2x.tolist() == [17, 18]
    assert layout.clean_indices.tolist() == [0, 19]
    assert layout.latent_indices.tolist() == list(range(20, 29))
    # the last 19 history frames: 4x 16, 2x 2, 1x 1
    assert layout.history_4x[0, 0, :, 0, 0].tolist() == list(range(11, 27))
    assert layout.history_2x[0, 0, :, 0, 0].tolist() == [27, 28]
    assert layout.clean_1x[0, 0, :, 0, 0].tolist() == [29]


def test_initial_history():
    start = torch.full((1, 16, 1, 2, 3), 7.0)
    fp = initial_history("framepack", start)
    assert fp.shape == (1, 16, 19, 2, 3) and fp.abs().sum() == 0
    f1 = initial_history("f1", start)
    assert f1.shape == (1, 16, 20, 2, 3)
    assert f1[:, :, :19].abs().sum() == 0 and torch.equal(f1[:, :, 19:], start)


@pytest.mark.parametrize("model", ["framepack", "f1"])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_history_bookkeeping_and_frame_counts(model, sections):
    """Simulate the loop with labelled latents: order, real-history size and decoded pixel counts."""
    window = 3
    start = torch.full((1, 16, 1, 1, 1), -1.0)
    history = initial_history(model, start)
    generated_frames = 1 if model == "f1" else 0
    pixel_frames = 0
    plans = plan_sections(model, sections)
    for plan in plans:
        gen = torch.full((1, 16, window, 1, 1), float(plan.index + 1))
        if model == "framepack" and plan.is_last:
            gen = torch.cat([start, gen], dim=2)
        generated_frames += gen.shape[2]
        history = add_to_history(model, history, gen)
        real = real_history(model, history, generated_frames)
        to_decode, overlap = latents_to_decode(model, real, window, first=plan.index == 0, is_last=plan.is_last)
        decoded = (to_decode.shape[2] - 1) * 4 + 1
        pixel_frames += decoded - overlap
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
    latents, overlap = latents_to_decode("framepack", real, 9, first=False, is_last=False)
    assert latents.shape[2] == 18 and overlap == 33
    assert latents[0, 0, :, 0, 0].tolist() == list(range(18))
    latents, _ = latents_to_decode("framepack", real, 9, first=False, is_last=True)
    assert latents.shape[2] == 19
    latents, overlap = latents_to_decode("f1", real, 9, first=False, is_last=True)
    assert latents[0, 0, :, 0, 0].tolist() == list(range(10, 28)) and overlap == 33
    latents, overlap = latents_to_decode("f1", real, 9, first=True, is_last=False)
    assert latents.shape[2] == 28 and overlap == 0
