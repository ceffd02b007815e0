"""The per-section plan of a job: what conditions each section, as data computed from the settings.

`plan_sections` is a pure function of the settings and the model variant. Each `SectionPlan` says
where the section stands (its order of generation and its place in time), FramePack's blank
padding, and by name which prompt, which image embedding and which anchor latent (the clean start
frame of its context) it uses. The section loop looks these names up among what the job encoded
(each distinct prompt once), so conditioning that changes over the video is a change of plan,
not of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import GenerationSettings
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


def plan_sections(settings: GenerationSettings, variant: Variant) -> list[SectionPlan]:
    """The sections of a job, in the order they are generated."""
    count = settings.sections
    return [
        SectionPlan(index=i, time_index=variant.time_index(i, count), padding=padding, is_last=i == count - 1,
                    prompt=settings.prompt)
        for i, padding in enumerate(variant.paddings(count))
    ]


def distinct_prompts(plans: list[SectionPlan]) -> list[str]:
    """Every prompt the plans use, once each, in order of first use."""
    return list(dict.fromkeys(plan.prompt for plan in plans))
