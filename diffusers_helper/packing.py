"""The section schedule and the context layout of both model variants, as pure functions.

FramePack compresses the history into a fixed-size context: one clean latent frame at full
resolution ("1x"), two at half ("2x", patchified 2×4×4 by the model) and sixteen at quarter
("4x", 4×8×8), so the cost of a section does not depend on the video's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Latent frames of each context level, fixed by the released checkpoints.
HISTORY_1X, HISTORY_2X, HISTORY_4X = 1, 2, 16
HISTORY_FRAMES = HISTORY_1X + HISTORY_2X + HISTORY_4X


@dataclass(frozen=True)
class SectionLayout:
    """Frame indices (RoPE positions) and history slices the transformer gets for one section."""

    latent_indices: torch.Tensor  # positions of the `window` noisy frames being generated
    clean_indices: torch.Tensor  # start latent + the 1x history frame
    indices_2x: torch.Tensor
    indices_4x: torch.Tensor
    clean_1x: torch.Tensor  # the 1x history latent (1 frame), appended after the start latent
    history_2x: torch.Tensor
    history_4x: torch.Tensor


def section_paddings(sections: int) -> list[int]:
    """FramePack's inverted schedule: blank-padding sizes (in windows) per section, last section 0.

    Sections are generated from the end of the video back to the start. Normally the padding counts
    down n−1 … 0; past four sections the reference keeps it at 2 for the middle ones (3, 2, …, 2, 1, 0),
    which its authors found to drift less than large paddings.
    """
    if sections < 1:
        raise ValueError("at least one section is needed")
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


def framepack_layout(history: torch.Tensor, window: int, padding: int) -> SectionLayout:
    """Inverted anti-drifting layout: [start 1 | blank p·w | noisy w | 1x 1 | 2x 2 | 4x 16].

    The newest frames sit at the front of `history` (sections are prepended), and the noisy window
    is placed between the start image and the already-generated future.
    """
    blank = padding * window
    sizes = [1, blank, window, HISTORY_1X, HISTORY_2X, HISTORY_4X]
    indices = torch.arange(sum(sizes))
    start_idx, _blank_idx, latent_idx, idx_1x, idx_2x, idx_4x = indices.split(sizes)
    clean_1x, history_2x, history_4x = history[:, :, :HISTORY_FRAMES].split([HISTORY_1X, HISTORY_2X, HISTORY_4X], dim=2)
    return SectionLayout(
        latent_indices=latent_idx,
        clean_indices=torch.cat([start_idx, idx_1x]),
        indices_2x=idx_2x,
        indices_4x=idx_4x,
        clean_1x=clean_1x,
        history_2x=history_2x,
        history_4x=history_4x,
    )


def f1_layout(history: torch.Tensor, window: int) -> SectionLayout:
    """Forward layout: [start 1 | 4x 16 | 2x 2 | 1x 1 | noisy w], context taken from the end of `history`."""
    sizes = [1, HISTORY_4X, HISTORY_2X, HISTORY_1X, window]
    indices = torch.arange(sum(sizes))
    start_idx, idx_4x, idx_2x, idx_1x, latent_idx = indices.split(sizes)
    history_4x, history_2x, clean_1x = history[:, :, -HISTORY_FRAMES:].split([HISTORY_4X, HISTORY_2X, HISTORY_1X], dim=2)
    return SectionLayout(
        latent_indices=latent_idx,
        clean_indices=torch.cat([start_idx, idx_1x]),
        indices_2x=idx_2x,
        indices_4x=idx_4x,
        clean_1x=clean_1x,
        history_2x=history_2x,
        history_4x=history_4x,
    )


def overlap_frames(window: int) -> int:
    """Video frames a section's decode shares with the video so far, cross-faded at the seam: 4·window − 3."""
    return window * 4 - 3
