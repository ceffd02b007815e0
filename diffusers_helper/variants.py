"""FramePack and FramePack-F1 as objects: everything the section loop does differently for each.

FramePack generates the video from its end back to the start image (inverted, anti-drifting
sampling): each new section goes in front of the history, its context sees the start image and
the already-generated future, and the last section generated joins the start frame itself.
FramePack-F1 generates forward: the history starts with the start frame and each section is
appended. The loop asks the variant (`variant(name)`); it never compares model names.
"""

from __future__ import annotations

import torch

from .packing import HISTORY_FRAMES, SectionLayout, f1_layout, framepack_layout, overlap_frames, section_paddings
from .settings import MODEL_VARIANTS, SettingsError


class Variant:
    """What differs between the model variants: history, context layout, joining, decoding, direction."""

    name: str = ""
    display_name: str = ""
    # where each new section goes in the video: before the video so far, or after it
    direction: str = "append"
    # latent frames in the history before any section is generated that belong to the video
    start_frames: int = 0

    def __repr__(self) -> str:
        return f"<variant {self.name}>"

    def paddings(self, sections: int) -> list[int]:
        """FramePack's blank padding (in windows) of each section, in the order they are generated."""
        raise NotImplementedError

    def time_index(self, index: int, sections: int) -> int:
        """The 0-based place in the video's time order of the section generated `index`-th."""
        raise NotImplementedError

    def initial_history(self, start_latent: torch.Tensor, end_latent: torch.Tensor | None = None) -> torch.Tensor:
        """History latents before the first section: zeros for the context (and, for F1, the start latent).

        `end_latent` (FramePack only): the end frame, in the place of the first history frame.
        """
        raise NotImplementedError

    def decodes_start_frame(self, *, first: bool, is_last: bool) -> bool:
        """Whether a section's decode window begins with the video's first frame (the start latent)."""
        raise NotImplementedError

    def layout(self, history: torch.Tensor, window: int, padding: int) -> SectionLayout:
        """The context layout of one section."""
        raise NotImplementedError

    def join(self, history: torch.Tensor, generated: torch.Tensor, *, start_latent: torch.Tensor,
             is_last: bool) -> tuple[torch.Tensor, int]:
        """The history after a section, and how many of the video's latent frames it added."""
        raise NotImplementedError

    def real_history(self, history: torch.Tensor, generated_frames: int) -> torch.Tensor:
        """The video's part of the history (without the zero context padding), in time order."""
        raise NotImplementedError

    def decode_window(self, real: torch.Tensor, window: int, *, first: bool, is_last: bool) -> tuple[torch.Tensor, int]:
        """Latent frames to VAE-decode after a section, and the pixel overlap to blend with the video so far.

        After the first section everything is decoded. Later, only the newest 2·window latent frames
        are decoded: re-decoding the neighbouring window gives the VAE temporal context at the seam,
        and its window·4 − 3 frames are blended with the earlier decode of the same frames.
        """
        raise NotImplementedError

    def resume_history(self, saved: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The history of a resumed job: its saved latents (time order) in the initial history's place."""
        raise NotImplementedError

    def saved_after(self, saved: torch.Tensor, sections: int, window: int) -> torch.Tensor:
        """The video's latents as they were after the first `sections` sections, from a job's saved latents."""
        raise NotImplementedError

    def sections_in(self, saved_frames: int, window: int) -> tuple[int, int]:
        """(finished sections, leftover frames) of a job whose saved latents have `saved_frames` frames."""
        return divmod(saved_frames - self.start_frames, window)


class FramePack(Variant):
    """Inverted, anti-drifting sampling: from the end of the video back to the start image."""

    name = "framepack"
    display_name = "FramePack"
    direction = "prepend"
    start_frames = 0

    def paddings(self, sections: int) -> list[int]:
        return section_paddings(sections)

    def time_index(self, index: int, sections: int) -> int:
        return sections - 1 - index

    def initial_history(self, start_latent: torch.Tensor, end_latent: torch.Tensor | None = None) -> torch.Tensor:
        b, c, _, h, w = start_latent.shape
        history = torch.zeros((b, c, HISTORY_FRAMES, h, w), dtype=torch.float32)
        if end_latent is not None:
            # the first section's clean "post" frame: the video is generated back from its end towards it
            history[:, :, :1] = end_latent.to(history)
        return history

    def decodes_start_frame(self, *, first: bool, is_last: bool) -> bool:
        return is_last

    def layout(self, history: torch.Tensor, window: int, padding: int) -> SectionLayout:
        return framepack_layout(history, window, padding)

    def join(self, history, generated, *, start_latent, is_last):
        if is_last:
            # the last section generated is the video's first: the start frame goes in front of it
            generated = torch.cat([start_latent.to(generated), generated], dim=2)
        return torch.cat([generated.to(history), history], dim=2), int(generated.shape[2])

    def real_history(self, history, generated_frames):
        return history[:, :, :generated_frames]

    def decode_window(self, real, window, *, first, is_last):
        if first:
            return real, 0
        # the last section also decodes the start frame joined in front of it
        count = 2 * window + (1 if is_last else 0)
        return real[:, :, :count], overlap_frames(window)

    def resume_history(self, saved, initial):
        return torch.cat([saved, initial], dim=2)

    def saved_after(self, saved, sections, window):
        return saved[:, :, -sections * window:]


class F1(Variant):
    """Forward sampling: each section continues the one before, starting at the start image."""

    name = "f1"
    display_name = "FramePack-F1"
    direction = "append"
    start_frames = 1

    def paddings(self, sections: int) -> list[int]:
        return [0] * sections

    def time_index(self, index: int, sections: int) -> int:
        return index

    def initial_history(self, start_latent: torch.Tensor, end_latent: torch.Tensor | None = None) -> torch.Tensor:
        if end_latent is not None:
            raise SettingsError("FramePack-F1 generates forward and has no end frame; use the FramePack model.")
        b, c, _, h, w = start_latent.shape
        zeros = torch.zeros((b, c, HISTORY_FRAMES, h, w), dtype=torch.float32)
        return torch.cat([zeros, start_latent.to(zeros)], dim=2)

    def decodes_start_frame(self, *, first: bool, is_last: bool) -> bool:
        return first

    def layout(self, history: torch.Tensor, window: int, padding: int) -> SectionLayout:
        return f1_layout(history, window)

    def join(self, history, generated, *, start_latent, is_last):
        return torch.cat([history, generated.to(history)], dim=2), int(generated.shape[2])

    def real_history(self, history, generated_frames):
        return history[:, :, -generated_frames:]

    def decode_window(self, real, window, *, first, is_last):
        if first:
            return real, 0
        return real[:, :, -2 * window:], overlap_frames(window)

    def resume_history(self, saved, initial):
        # the saved latents begin with the start frame, which the initial history ends with
        return torch.cat([initial[:, :, :-1], saved], dim=2)

    def saved_after(self, saved, sections, window):
        return saved[:, :, : self.start_frames + sections * window]


VARIANTS: dict[str, Variant] = {v.name: v for v in (FramePack(), F1())}
assert tuple(VARIANTS) == MODEL_VARIANTS, "settings.MODEL_VARIANTS lists the variants defined here"


def variant(name: str) -> Variant:
    """The variant called `name` ('framepack' or 'f1')."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise SettingsError(f"model must be one of {', '.join(VARIANTS)}, not {name!r}.") from None


def display_name(name: str | None) -> str:
    """The product name of a model variant (the name itself when it is not one)."""
    return VARIANTS[name].display_name if name in VARIANTS else str(name)
