"""The runtime: one way to open the models for a job, used by the CLI, the app's queue and the benchmarks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper.events import CancelToken, Finished, SectionDone
from diffusers_helper.loading import SourceError
from diffusers_helper.pipeline import generate
from diffusers_helper.runtime import Runtime
from diffusers_helper.settings import SettingsError


def test_bad_device_attention_or_sources_are_refused_before_anything_loads(tiny_sources, tmp_path):
    from diffusers_helper.attention import AttentionUnavailable

    with pytest.raises(SettingsError, match="tpu"):
        Runtime(tiny_sources, device="tpu")
    with pytest.raises(AttentionUnavailable):
        Runtime(tiny_sources, device="cpu", attention="flash")
    runtime = Runtime(tiny_sources.with_transformer("f1", str(tmp_path / "missing")), device="cpu")
    runtime.check("framepack")
    with pytest.raises(SourceError, match="missing"):
        runtime.check("f1")
    assert runtime.loaded_model is None


def test_a_job_through_the_runtime_equals_the_pipeline_on_the_same_components(tiny_sources, tiny_components,
                                                                               fast, image, tmp_path):
    settings = fast.replace(model="f1", cache="none")
    runtime = Runtime(tiny_sources, device="cpu", attention="sdpa")
    events = list(runtime.generate(settings, image, tmp_path / "a.mp4", save_latents=tmp_path / "a.st"))
    assert isinstance(events[-1], Finished), events[-1]
    direct = list(generate(tiny_components("f1"), settings, image, tmp_path / "b.mp4", save_latents=tmp_path / "b.st"))
    assert isinstance(direct[-1], Finished)
    assert torch.equal(load_file(tmp_path / "a.st")["history_latents"], load_file(tmp_path / "b.st")["history_latents"])
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["sources"]["transformer"] == tiny_sources.transformer("f1")
    assert record["device"] == "cpu" and record["vram_mode"] == "high"


def test_resume_through_the_runtime(tiny_sources, fast, image, tmp_path):
    runtime = Runtime(tiny_sources, device="cpu")
    settings = fast.replace(model="framepack")
    cancel = CancelToken()
    out = tmp_path / "cut.mp4"
    for event in runtime.generate(settings, image, out, cancel=cancel):
        if isinstance(event, SectionDone):
            cancel.cancel()
    events = list(runtime.resume(out))
    assert isinstance(events[-1], Finished) and out.exists()
    assert [e.section for e in events if isinstance(e, SectionDone)] == list(range(2, settings.sections + 1))
    assert events[-1].frames == settings.total_frames
