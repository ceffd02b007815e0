"""Section schedules and context layouts of both variants."""

import pytest
import torch

from diffusers_helper.packing import f1_layout, framepack_layout, overlap_frames, section_paddings
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


def test_overlap_is_one_window_less_the_causal_frames():
    # a window of w latent frames is 4w video frames; the VAE's first latent frame gives 1, not 4
    assert [overlap_frames(w) for w in (1, 3, 9, 33)] == [1, 9, 33, 129]
