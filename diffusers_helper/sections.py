"""The per-section plan of a job: what conditions each section, as data computed from the settings.

`plan_sections` is a pure function of the settings and the model variant. Each `SectionPlan` says
where the section stands (its order of generation and its place in time), FramePack's blank
padding, and by name which prompt (or blend of two), which image embedding and which anchor latent
(the clean start frame of its context) it uses. The section loop looks these names up among what
the job encoded (each distinct prompt once), so conditioning that changes over the video is a
change of plan, not of the loop.

The rules (time in seconds; L = window·4/30 is the video one section adds; section j in time order
starts at j·L; a marker at T applies from section round(T/L)):
- timed prompts: `[Ts: text]` holds from T until the next such marker; text before the first marker
  holds from 0 s; `[T1s-T2s: text]` holds from T1 until T2, then the prompt in force before it
  returns. A section uses the prompt in force at its start. With `prompt_blend` N, the N sections
  from a change on move linearly from the old prompt to the new one: weight (k+1)/(N+1) in the
  k-th of them.
- keyframes: from its section on, up to the next keyframe, a keyframe's latent is the anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .settings import GenerationSettings, parse_timed_prompt

if TYPE_CHECKING:
    from .variants import Variant

# The name of the start image's embedding and latent.
START = "start"


@dataclass(frozen=True)
class SectionPlan:
    """One section of a job, in the order sections are generated."""

    index: int  # 0-based, in the order of generation
    time_index: int  # 0-based place in the video's time order
    padding: int  # FramePack's blank padding, in windows (0 for F1)
    is_last: bool  # the last section generated
    prompt: str  # the text whose embedding conditions the section
    image: str = START  # the image whose SigLIP embedding conditions the section
    anchor: str = START  # the image whose latent is the first clean frame of the section's context
    blend_from: Optional[str] = None  # while a prompt change is blended in: the prompt before it
    blend: float = 1.0  # the weight of `prompt` (1 - blend: of `blend_from`)

    @property
    def conditioning_key(self) -> tuple:
        """What the section's conditioning depends on: sections with the same key share it."""
        return (self.prompt, self.blend_from, self.blend, self.image)


def keyframe_name(number: int) -> str:
    """The name of the `number`-th keyframe (1-based, in time order)."""
    return f"keyframe{number}"


def plan_sections(settings: GenerationSettings, variant: "Variant", done: int = 0) -> list[SectionPlan]:
    """The sections of a job, in the order they are generated.

    `done`: the first sections in time are there already (the video an extension continues); the rest
    are planned as a job of their own in the variant's order, numbered after them.
    """
    count = settings.sections - done
    prompts = prompts_in_time(settings)
    anchors = anchors_in_time(settings)
    plans = []
    for i, padding in enumerate(variant.paddings(count)):
        t = done + variant.time_index(i, count)
        blend_from, blend = _blend_at(prompts, t, settings.prompt_blend)
        plans.append(SectionPlan(index=done + i, time_index=t, padding=padding, is_last=i == count - 1,
                                 prompt=prompts[t], anchor=anchors[t], blend_from=blend_from, blend=blend))
    return plans


def prompts_in_time(settings: GenerationSettings) -> list[str]:
    """The prompt in force at the start of each section, in time order."""
    count = settings.sections
    base, markers = parse_timed_prompt(settings.prompt)
    timeline = [base] * count
    for marker in sorted((m for m in markers if m.end is None), key=lambda m: m.start):
        for j in range(settings.section_at(marker.start), count):
            timeline[j] = marker.text
    prompts = list(timeline)
    for marker in (m for m in markers if m.end is not None):
        for j in range(settings.section_at(marker.start), min(settings.section_at(marker.end), count)):
            prompts[j] = marker.text
    return prompts


def anchors_in_time(settings: GenerationSettings) -> list[str]:
    """The anchor image of each section, in time order: the start image, then each keyframe from its section on."""
    anchors = [START] * settings.sections
    for number, (seconds, _) in enumerate(settings.keyframes, 1):
        for j in range(settings.section_at(seconds), settings.sections):
            anchors[j] = keyframe_name(number)
    return anchors


def _blend_at(prompts: list[str], t: int, blend_sections: int) -> tuple[Optional[str], float]:
    """(the prompt blended from, the new prompt's weight) at time section t; (None, 1.0) when not blending."""
    for k in range(min(blend_sections, t)):
        change = t - k
        if prompts[change] != prompts[change - 1]:
            return prompts[change - 1], (k + 1) / (blend_sections + 1)
    return None, 1.0


def distinct_prompts(plans: list[SectionPlan]) -> list[str]:
    """Every prompt the plans use (blended-from ones included), once each, in order of first use."""
    used = []
    for plan in plans:
        used += [plan.prompt] + ([plan.blend_from] if plan.blend_from is not None else [])
    return list(dict.fromkeys(used))
