"""The page's LoRAs, its handlers called alone: the picker lists the LoRA folder, its fields go to and
from settings, mistakes are messages before anything is queued, two jobs in one app session each get
their LoRA, and Load these settings brings a job's LoRAs back or says which is missing or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper.app.loras import LORA_FIELDS, LORA_SLOTS, lora_choices
from diffusers_helper.app.ui import FORM_FIELDS, AppConfig, Page, form_values, settings_from_form
from diffusers_helper.loading import load_transformer
from diffusers_helper.settings import GenerationSettings
from test_lora import merged, run, write_lora

JOB = dict(prompt="waves roll in", seconds=1, window=8, steps=2, resolution=64, seed=13, cache="none")


@pytest.fixture(scope="module")
def lora_dir(tiny_sources, tmp_path_factory):
    folder = tmp_path_factory.mktemp("page-loras") / "loras"
    folder.mkdir()
    transformer = load_transformer(tiny_sources.transformer("framepack"), "cpu")
    deltas = {"calm.safetensors": write_lora(folder / "calm.safetensors", transformer, "peft", seed=31),
              "storm.safetensors": write_lora(folder / "storm.safetensors", transformer, "musubi-hunyuan", seed=32)}
    (folder / "notes.txt").write_text("not a LoRA")
    return folder, deltas


@pytest.fixture
def page(tmp_path, tiny_sources, lora_dir):
    page = Page(AppConfig(outputs=tmp_path / "outputs", sources=tiny_sources, device="cpu", lora_dir=lora_dir[0]))
    yield page
    page.jobs.close()
    page.snapshots.close()


def test_the_lora_fields_are_the_last_api_inputs_and_go_both_ways():
    assert FORM_FIELDS[-len(LORA_FIELDS):] == LORA_FIELDS
    settings = GenerationSettings(loras=[("calm.safetensors", 0.4), ("storm.safetensors", -1.2)])
    values = form_values(settings)
    assert values["loras"] == ["calm.safetensors", "storm.safetensors"]
    assert [values[f"lora_weight{n}"] for n in range(1, LORA_SLOTS + 1)] == [0.4, -1.2, 1.0, 1.0]
    assert settings_from_form(values) == settings
    # a job from the command line names its LoRAs by path: the form shows the file names
    assert form_values(GenerationSettings(loras=[("/data/my loras/calm.safetensors", 1)]))["loras"] == ["calm.safetensors"]


def test_the_picker_lists_the_folders_safetensors_files(lora_dir, tmp_path):
    folder, _ = lora_dir
    update = lora_choices(folder, ["storm.safetensors", "gone.safetensors"])
    assert update["choices"] == ["calm.safetensors", "storm.safetensors"]
    assert update["value"] == ["storm.safetensors"]
    assert lora_choices(tmp_path / "no-such-folder")["choices"] == []


def test_mistakes_are_messages_and_queue_nothing(page, lora_dir, tmp_path):
    values = {**form_values(GenerationSettings(**JOB)), "loras": ["calm.safetensors"]}
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    for name in ("../calm.safetensors", "/etc/calm.safetensors", "sub\\calm.safetensors", ".hidden.safetensors"):
        with pytest.raises(gr.Error, match="name of a file in the LoRA folder"):
            next(page.generate(image, {**values, "loras": [name]}, "tab-1"))
    with pytest.raises(gr.Error, match="gone.safetensors is not in the LoRA folder"):
        next(page.generate(image, {**values, "loras": ["gone.safetensors"]}, "tab-1"))
    with pytest.raises(gr.Error, match="weight of LoRA calm.safetensors must be between -2.0 and 2.0"):
        next(page.generate(image, {**values, "lora_weight1": 5}, "tab-1"))
    with pytest.raises(gr.Error, match="up to 4 LoRAs"):
        next(page.generate(image, {**values, "loras": [f"l{n}.safetensors" for n in range(5)]}, "tab-1"))
    broken = lora_dir[0] / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    try:
        with pytest.raises(gr.Error, match="broken.safetensors is not a safetensors file"):
            next(page.generate(image, {**values, "loras": ["broken.safetensors"]}, "tab-1"))
    finally:
        broken.unlink()
    assert page.jobs.active() == []


def _page_job(page, image, values, owner) -> Path:
    updates = list(page.generate(image, values, owner))
    final = updates[-1][3]
    assert isinstance(final, str) and final.endswith(".mp4"), updates[-1]
    return page.outputs / Path(final).name.split(".")[0]


@pytest.mark.slow
def test_two_jobs_in_one_app_session_each_get_their_lora_and_load_back(page, lora_dir, tiny_sources, tiny_shared,
                                                                       image, tmp_path):
    folder, deltas = lora_dir
    loaded = []

    def counting(source, device):
        loaded.append(source)
        return load_transformer(source, device)

    page.runtime._load_transformer = counting  # the runtime's loading hook: to see that switching reloads nothing
    base = form_values(GenerationSettings(**JOB))
    first = _page_job(page, image, {**base, "loras": ["calm.safetensors"], "lora_weight1": 0.9}, "tab-1")
    second = _page_job(page, image, {**base, "loras": ["storm.safetensors", "calm.safetensors"],
                                     "lora_weight1": -0.7, "lora_weight2": 0.3}, "tab-2")
    source = tiny_sources.transformer("framepack")
    assert loaded == [source]  # the second job changed only the LoRAs
    for stem, weighted in ((first, [("calm.safetensors", 0.9)]), (second, [("storm.safetensors", -0.7),
                                                                          ("calm.safetensors", 0.3)])):
        expected = run(tiny_shared, merged(source, *[(deltas[name], w) for name, w in weighted]), "framepack",
                       image, tmp_path / f"{Path(stem).name}.mp4", **{k: v for k, v in JOB.items()})
        latents = load_file(str(Path(f"{stem}.latents.safetensors")))["history_latents"]
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
        record = json.loads(Path(f"{stem}.json").read_text())
        assert [(e["name"], e["weight"]) for e in record["loras"]] == weighted
        assert record["settings"]["loras"] == [list(pair) for pair in weighted]  # names, not this computer's paths

    # Load these settings: the picks and weights come back...
    _, *values = page.load_past(Path(second).name)
    values = dict(zip(FORM_FIELDS, values))
    assert values["loras"] == ["storm.safetensors", "calm.safetensors"]
    assert (values["lora_weight1"], values["lora_weight2"]) == (-0.7, 0.3)
    assert page.past_lora_names(Path(second).name) == ["storm.safetensors", "calm.safetensors"]
    # ...and one that was changed since, or removed, is named and left out
    saved = tmp_path / "storm-backup.safetensors"
    shutil.copy(folder / "storm.safetensors", saved)
    shutil.copy(folder / "calm.safetensors", folder / "storm.safetensors")
    try:
        with pytest.warns(UserWarning, match="storm.safetensors at .* has changed since it was used"):
            _, *values = page.load_past(Path(second).name)
        assert dict(zip(FORM_FIELDS, values))["loras"] == ["calm.safetensors"]
        (folder / "storm.safetensors").unlink()
        with pytest.warns(UserWarning, match="storm.safetensors .* is missing"):
            page.load_past(Path(second).name)
    finally:
        shutil.copy(saved, folder / "storm.safetensors")
