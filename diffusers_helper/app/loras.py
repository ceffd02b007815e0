"""The page's LoRAs: a picker over the .safetensors files of the LoRA folder, with a weight slider each.

The form's fields (`LORA_FIELDS`, at the end of the generation endpoint's inputs) are the picked file
names and one weight per slot, the i-th weight for the i-th picked file. The page takes only names of
files in the LoRA folder (`loras/`, or `--lora-dir`), never paths. Settings name them the same way, so
a job's sidecar is the same on any computer; a recorded job's LoRAs are found again by name and
SHA-256 (`lora.recorded_loras`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence

import gradio as gr

from ..lora import LoraError, find_recorded, list_loras, recorded_hashes
from ..settings import LORA_WEIGHT, GenerationSettings, SettingsError

LORA_SLOTS = 4
LORA_FIELDS = ("loras", *(f"lora_weight{n}" for n in range(1, LORA_SLOTS + 1)))


def loras_from_form(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The picked LoRAs as (name, weight) pairs; takes the weight slots out of `values`."""
    names = values.pop("loras", None) or []
    weights = [values.pop(f"lora_weight{n}", None) for n in range(1, LORA_SLOTS + 1)]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        raise SettingsError(f"loras must be a list of file names from the LoRA folder, not {names!r}.")
    if len(names) > LORA_SLOTS:
        raise SettingsError(f"The page takes up to {LORA_SLOTS} LoRAs at once (the command line takes any number).")
    pairs = []
    for name, weight in zip(names, weights):
        if not isinstance(name, str) or not name or Path(name).name != name or "\\" in name or name.startswith("."):
            raise SettingsError(f"A LoRA on the page is the name of a file in the LoRA folder, not {name!r}.")
        pairs.append((name, 1.0 if weight in (None, "") else weight))
    return tuple(pairs)


def lora_form_values(loras: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """The form's LoRA fields for settings' LoRAs: their file names and weights (1 in unused slots)."""
    loras = list(loras)[:LORA_SLOTS]
    values: dict[str, Any] = {"loras": [Path(path).name for path, _ in loras]}
    for n in range(1, LORA_SLOTS + 1):
        values[f"lora_weight{n}"] = loras[n - 1][1] if n <= len(loras) else 1.0
    return values


def check_page_loras(runtime, settings: GenerationSettings, folder: Path) -> None:
    """Each LoRA is a file of the LoRA folder that fits the model; gr.Error says what is wrong."""
    if not settings.loras:
        return
    for name, _ in settings.loras:
        if not (Path(folder) / name).is_file():
            raise gr.Error(f"{name} is not in the LoRA folder ({folder}); press Refresh beside the LoRA list.",
                           title="LoRA not found", print_exception=False)
    try:
        runtime.check_loras(settings.model, settings.loras)
    except ValueError as exc:
        raise gr.Error(str(exc), title="LoRA can't be used", print_exception=False) from None


def past_lora_values(runtime, record: Mapping[str, Any], loras: Sequence[tuple[str, float]],
                     folder: Path) -> dict[str, Any]:
    """The form's LoRA fields for a past job: the LoRAs found in the folder by name and SHA-256; a warning
    names each one missing or changed since (it is left out)."""
    hashes = recorded_hashes(record.get("loras"))
    found = []
    for path, weight in loras:
        name = Path(path).name
        try:
            if name not in hashes:
                if not (Path(folder) / name).is_file():
                    raise LoraError(f"LoRA {name} is not in the LoRA folder ({folder}).")
            else:
                find_recorded(name, hashes[name], [folder], runtime.lora_manager)
        except LoraError as exc:
            gr.Warning(f"{exc} It was left out of the form.", title="LoRA missing or changed")
            continue
        found.append((name, weight))
    return lora_form_values(found)


def lora_choices(folder: Path, picked: Optional[Sequence[str]] = None):
    """The picker's choices: the folder's .safetensors files (keeping what is picked)."""
    names = list_loras(folder)
    return gr.update(choices=names, value=[name for name in (picked or []) if name in names])


def lora_controls(c: SimpleNamespace, d: GenerationSettings) -> None:
    """The LoRA picker and a weight slider per slot, in a folded section of the form."""
    f = c.form
    values = lora_form_values(d.loras)
    with gr.Accordion("LoRAs", open=bool(d.loras), elem_id="fp-loras"):
        gr.Markdown("LoRAs change what the model draws. Put `.safetensors` LoRAs (musubi-tuner/kohya, diffusers/PEFT "
                    "or HunyuanVideo's own layout) in the LoRA folder (`loras`, or the one given with `--lora-dir`) "
                    "and press Refresh. Weights go from −2 to 2; 0 leaves a LoRA out.")
        with gr.Row(equal_height=True):
            f["loras"] = gr.Dropdown(label="LoRAs", choices=values["loras"], value=values["loras"], multiselect=True,
                                     max_choices=LORA_SLOTS, scale=5, elem_id="fp-lora-picker")
            c.lora_refresh = gr.Button("Refresh", scale=1, size="sm", elem_id="fp-lora-refresh")
        for n in range(1, LORA_SLOTS + 1):
            picked = n <= len(values["loras"])
            f[f"lora_weight{n}"] = gr.Slider(
                minimum=LORA_WEIGHT.low, maximum=LORA_WEIGHT.high, step=LORA_WEIGHT.step,
                value=values[f"lora_weight{n}"], visible=picked, elem_id=f"fp-lora-weight{n}",
                label=f"Weight of {values['loras'][n - 1]}" if picked else f"LoRA {n} weight")
        c.lora_names = gr.State(values["loras"])  # the names the sliders hold weights for, in slot order


def _slot_updates(picked: Optional[Sequence[str]]) -> list:
    picked = list(picked or [])
    return [gr.update(visible=True, label=f"Weight of {picked[n]}") if n < len(picked) else gr.update(visible=False)
            for n in range(LORA_SLOTS)]


def _follow_picks(picked, previous, *weights) -> list:
    """A user's new picks: each keeps the weight it had, a new one starts at 1."""
    picked, previous = list(picked or []), list(previous or [])
    had = dict(zip(previous, weights))
    values = [had.get(picked[n], 1.0) if n < len(picked) else 1.0 for n in range(LORA_SLOTS)]
    return [*[gr.update(value=v) for v in values], picked]


def wire_loras(page, c: SimpleNamespace, demo: gr.Blocks) -> None:
    """The picker's list (on load and Refresh), the sliders following the picks, and Load these settings."""
    folder = Path(page.config.lora_dir)
    picker = c.form["loras"]
    sliders = [c.form[f"lora_weight{n}"] for n in range(1, LORA_SLOTS + 1)]
    refresh = dict(fn=lambda picked: lora_choices(folder, picked), inputs=picker, outputs=picker,
                   api_visibility="private", queue=False)
    c.lora_refresh.click(**refresh)
    demo.load(**refresh)
    picker.input(_follow_picks, inputs=[picker, c.lora_names, *sliders], outputs=[*sliders, c.lora_names],
                 api_visibility="private", queue=False)
    picker.change(_slot_updates, inputs=picker, outputs=sliders, api_visibility="private", queue=False)
    # Load these settings sets the picks and their weights together: the sliders hold them from then on
    c.load_settings.click(lambda stem: page.past_lora_names(stem), inputs=c.past, outputs=c.lora_names,
                          api_visibility="private", queue=False)
