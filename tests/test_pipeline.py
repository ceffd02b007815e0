"""Both models end to end on CPU with tiny models: frames, files, determinism, TeaCache, cancel, errors."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_helper.conditioning import image_to_tensor, vae_encode
from diffusers_helper.events import CancelToken, Cancelled, Failed, Finished, Notice, SectionDone, StepProgress
from diffusers_helper.outputs import OutputPaths
from diffusers_helper.pipeline import _conditioning, flow_x0, generate
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames, read_metadata


def run(components, settings, image, output, **kw):
    events = list(generate(components, settings, image, output, **kw))
    return events, events[-1]


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_end_to_end_frames_files_and_latents(tiny_components, image, tmp_path, model, fast):
    settings = fast.replace(model=model, cache="none")
    assert settings.sections == 3
    out = tmp_path / "video.mp4"
    events, last = run(tiny_components(model), settings, image, out, save_latents=tmp_path / "lat.safetensors")
    assert isinstance(last, Finished), last
    assert last.video_path == out and last.frames == settings.total_frames

    frames = read_frames(out)
    assert frames.shape[0] == settings.total_frames == 4 * 3 * 3 + 1
    sections = [e for e in events if isinstance(e, SectionDone)]
    assert [e.section for e in sections] == [1, 2, 3]
    assert [e.frames for e in sections] == sorted(e.frames for e in sections)
    steps = [e for e in events if isinstance(e, StepProgress)]
    assert len(steps) == settings.sections * settings.steps
    assert all(e.preview is not None and e.preview.dtype == np.uint8 and e.preview.ndim == 3 for e in steps)

    # only the final video remains: each partial was replaced by the next
    paths = OutputPaths(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["video.mp4", "video.png", "video.json", "video.latents.safetensors", "lat.safetensors"])
    cropped = np.array(Image.open(paths.input_image))
    assert cropped.shape[:2] == frames.shape[1:3]

    latents = load_file(tmp_path / "lat.safetensors")
    assert list(latents) == ["history_latents"]
    history = latents["history_latents"]
    h, w = cropped.shape[:2]
    assert history.dtype == torch.float32
    assert history.shape == (1, 16, settings.total_latent_frames, h // 8, w // 8)
    # the first latent frame is the start image's VAE mean, computed here independently
    expected_start = vae_encode(image_to_tensor(cropped), tiny_components(model).vae).float()
    torch.testing.assert_close(history[:, :, :1], expected_start, rtol=0, atol=1e-5)

    sidecar = json.loads(paths.sidecar.read_text())
    assert sidecar["status"] == "finished" and sidecar["model"] == model
    assert GenerationSettings.from_dict(sidecar["settings"]) == settings
    assert json.loads(read_metadata(out)["comment"])["settings"] == settings.to_dict()


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_same_seed_same_latents_other_seed_differs(tiny_components, image, tmp_path, model, fast):
    settings = fast.replace(model=model, seconds=1.0)
    results = []
    for i, seed in enumerate([5, 5, 6]):
        path = tmp_path / f"l{i}.safetensors"
        _, last = run(tiny_components(model), settings.replace(seed=seed), image, tmp_path / f"v{i}.mp4", save_latents=path)
        assert isinstance(last, Finished), last
        results.append(load_file(path)["history_latents"])
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_teacache_skips_steps_and_is_removed_after_the_job(tiny_components, image, tmp_path, monkeypatch, fast):
    from diffusers.hooks import HookRegistry

    import diffusers_helper.teacache as teacache

    # Random tiny weights change too much per step for the real threshold to skip anything; with a
    # huge threshold only the always-computed first and last step of each section may run.
    original = teacache.apply_teacache
    monkeypatch.setattr(teacache, "apply_teacache", lambda t, num_steps: original(t, num_steps, threshold=1e9))
    components = tiny_components("f1")
    settings = fast.replace(model="f1", steps=12, seconds=1.0)
    calls = []
    # the feed-forward inside the block only runs when the block really computes
    handle = components.transformer.transformer_blocks[0].ff.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, last_on = run(components, settings, image, tmp_path / "on.mp4", save_latents=tmp_path / "on.st")
        computed_on = len(calls)
        calls.clear()
        _, last_off = run(components, settings.replace(cache="none"), image, tmp_path / "off.mp4",
                          save_latents=tmp_path / "off.st")
        computed_off = len(calls)
    finally:
        handle.remove()
    assert isinstance(last_on, Finished) and isinstance(last_off, Finished)
    assert computed_off == settings.sections * settings.steps
    # the cache is reset per section: its first and last step compute, the rest are skipped
    assert computed_on == 2 * settings.sections
    for module in components.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not isinstance(registry, HookRegistry) or not registry.hooks


def test_transformer_receives_the_packed_context(tiny_components, image, tmp_path, fast):
    """Wiring check: the kwargs of the first call match the framepack layout for 2 sections of window 2."""
    components = tiny_components("framepack")
    settings = fast.replace(model="framepack", seconds=1.0, steps=1, cache="none")
    assert settings.sections == 2
    seen = []
    hook = components.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        _, last = run(components, settings, image, tmp_path / "v.mp4", save_latents=tmp_path / "l.st")
    finally:
        hook.remove()
    assert isinstance(last, Finished)
    first, second = seen
    # section 1 has padding 1: [start 1 | blank 3 | noisy 3 | 1x 1 | 2x 2 | 4x 16]
    assert first["indices_latents"].tolist() == [4, 5, 6]
    assert first["indices_latents_clean"].tolist() == [0, 7]
    assert first["indices_latents_history_2x"].tolist() == [8, 9]
    assert first["indices_latents_history_4x"].tolist() == list(range(10, 26))
    assert second["indices_latents"].tolist() == [1, 2, 3]
    start = load_file(tmp_path / "l.st")["history_latents"][:, :, :1]
    assert torch.equal(first["latents_clean"][:, :, :1], start)
    assert first["latents_clean"][:, :, 1:].abs().sum() == 0  # empty history in the first section
    assert first["latents_history_4x"].shape[2] == 16
    # the second section sees the first one's output as its 1x history
    assert second["latents_clean"][:, :, 1:].abs().sum() > 0
    assert first["guidance"].tolist() == [10000.0] and first["timestep"].tolist() == [1000.0]


def test_cancel_keeps_the_finished_sections(tiny_components, image, tmp_path, fast):
    settings = fast.replace(model="f1")
    cancel = CancelToken()
    events = []
    for event in generate(tiny_components("f1"), settings, image, tmp_path / "c.mp4", cancel=cancel):
        events.append(event)
        if isinstance(event, SectionDone):
            cancel.cancel()
    last = events[-1]
    assert isinstance(last, Cancelled)
    assert last.video_path is not None and last.video_path.exists()
    assert read_frames(last.video_path).shape[0] == last.frames == [e for e in events if isinstance(e, SectionDone)][0].frames
    assert not (tmp_path / "c.mp4").exists()
    sidecar = json.loads((tmp_path / "c.json").read_text())
    assert sidecar["status"] == "cancelled" and sidecar["sections_done"] == 1
    assert sidecar["video"] == last.video_path.name and sidecar["frames"] == last.frames
    # the cancel came within one sampling step of the section's end
    assert sum(isinstance(e, StepProgress) for e in events) <= settings.steps + 1


def test_closing_the_generator_cancels_the_job(tiny_components, image, tmp_path, fast):
    settings = fast.replace(model="f1")
    before = threading.active_count()
    gen = generate(tiny_components("f1"), settings, image, tmp_path / "x.mp4")
    for event in gen:
        if isinstance(event, StepProgress):
            break
    gen.close()
    assert threading.active_count() == before
    assert not (tmp_path / "x.mp4").exists()


def test_errors_end_the_job_with_a_message_and_write_nothing(tiny_components, image, tmp_path, fast):
    existing = tmp_path / "taken.mp4"
    existing.write_bytes(b"precious")
    _, last = run(tiny_components("f1"), fast.replace(model="f1"), image, existing)
    assert isinstance(last, Failed) and "already exists" in last.message
    assert existing.read_bytes() == b"precious"

    _, last = run(tiny_components("f1"), fast.replace(model="framepack"), image, tmp_path / "m.mp4")
    assert isinstance(last, Failed) and "model" in last.message

    _, last = run(tiny_components("f1"), fast.replace(model="f1"), None, tmp_path / "n.mp4")
    assert isinstance(last, Failed) and "image" in last.message.lower()

    _, last = run(tiny_components("f1"), fast.replace(model="f1"), image, tmp_path / "v.avi")
    assert isinstance(last, Failed) and ".mp4" in last.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]


def test_long_prompt_is_truncated_with_a_notice(tiny_components, image, tmp_path, fast):
    settings = fast.replace(model="f1", seconds=1.0, steps=1, cache="none").replace(prompt="walk " * 400)
    events, last = run(tiny_components("f1"), settings, image, tmp_path / "v.mp4")
    assert isinstance(last, Finished)
    assert any(isinstance(e, Notice) and "256" in e.message for e in events)


class _Velocity(torch.nn.Module):
    """A stand-in transformer recording what it was given; returns a fixed velocity in its dtype."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype_ = dtype
        self.seen = []

    def forward(self, hidden_states, timestep, return_dict=False, **kw):
        self.seen.append((hidden_states, timestep, kw))
        return (torch.full_like(hidden_states, 0.5) + 0 * kw.get("bias", 0),)


def test_bf16_rounding_of_latents_timestep_and_guidance():
    cond = _conditioning(
        type("P", (), {"llama": torch.zeros(1, 4, 8), "mask": torch.ones(1, 4, dtype=torch.bool),
                       "pooled": torch.zeros(1, 8)})(),
        torch.zeros(1, 3, 8), 10.0, torch.bfloat16, torch.device("cpu"))
    assert cond["guidance"].dtype == torch.bfloat16 and cond["guidance"].item() == 9984.0

    model = _Velocity(torch.bfloat16)
    x = torch.full((1, 2, 1, 2, 2), 1.001, dtype=torch.float32)  # not representable in bf16
    sigma = torch.tensor([0.123456])
    x0 = flow_x0(model, x, sigma, {}, {}, cfg=1.0, rescale=0.0, dtype=torch.bfloat16)
    hidden, timestep, _ = model.seen[0]
    assert hidden.dtype == torch.bfloat16 and timestep.dtype == torch.bfloat16
    assert timestep.item() == torch.tensor(123.456).to(torch.bfloat16).item()
    rounded = x.to(torch.bfloat16).float()
    assert x0.dtype == torch.float32
    assert torch.equal(x0, rounded - 0.5 * sigma.view(-1, 1, 1, 1, 1))


def test_real_cfg_and_rescale():
    class Linear(torch.nn.Module):
        def forward(self, hidden_states, timestep, return_dict=False, scale=1.0):
            return (hidden_states * scale,)

    x = torch.randn(1, 2, 1, 3, 3)
    sigma = torch.tensor([0.5])
    pos, neg = {"scale": 2.0}, {"scale": -1.0}
    x0 = flow_x0(Linear(), x, sigma, pos, neg, cfg=3.0, rescale=0.0, dtype=torch.float32)
    v = -x + 3.0 * (2 * x - (-x))
    torch.testing.assert_close(x0, x - 0.5 * v)
    x0r = flow_x0(Linear(), x, sigma, pos, neg, cfg=3.0, rescale=1.0, dtype=torch.float32)
    # full rescale gives the CFG direction with the conditional prediction's std
    vr = (x - x0r) / 0.5
    torch.testing.assert_close(vr.std(), (2 * x).std(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_resume_after_an_interruption_gives_the_uninterrupted_result(tiny_components, image, tmp_path, model, fast):
    from diffusers_helper.pipeline import load_resume_state, resume

    components = tiny_components(model)
    settings = fast.replace(model=model)
    _, last = run(components, settings, image, tmp_path / "whole.mp4", save_latents=tmp_path / "whole.st")
    assert isinstance(last, Finished)

    # stop after the first section, then make the files look like a killed process left them
    cancel = CancelToken()
    out = tmp_path / "cut.mp4"
    for event in generate(components, settings, image, out, cancel=cancel):
        if isinstance(event, SectionDone):
            cancel.cancel()
    sidecar = OutputPaths(out).sidecar
    data = json.loads(sidecar.read_text())
    data["status"] = "running"
    sidecar.write_text(json.dumps(data))
    state = load_resume_state(out)
    assert state.sections_done == 1 and state.settings == settings

    events = list(resume(components, out, save_latents=tmp_path / "cut.st"))
    assert isinstance(events[-1], Finished), events[-1]
    assert [e.section for e in events if isinstance(e, SectionDone)] == [2, 3]
    assert torch.equal(load_file(tmp_path / "cut.st")["history_latents"], load_file(tmp_path / "whole.st")["history_latents"])
    assert np.array_equal(read_frames(out), read_frames(tmp_path / "whole.mp4"))
    assert json.loads(sidecar.read_text())["status"] == "finished"
    assert not list(tmp_path.glob("cut.part*.mp4")) and not list(tmp_path.glob(".cut.*"))


def test_resume_refuses_what_it_cannot_continue(tiny_components, image, tmp_path, fast):
    from diffusers_helper.pipeline import load_resume_state

    with pytest.raises(ValueError, match="missing"):
        load_resume_state(tmp_path / "never.mp4")
    _, last = run(tiny_components("f1"), fast.replace(model="f1"), image, tmp_path / "done.mp4")
    assert isinstance(last, Finished)
    with pytest.raises(ValueError, match="already finished"):
        load_resume_state(tmp_path / "done.mp4")


def test_guidance_rescale_from_diffusers_is_bit_identical_to_the_formula():
    """rescale_guidance uses diffusers' rescale_noise_cfg: r·(v·σ_pos/σ_cfg) + (1−r)·v, the same bits as written out."""
    from diffusers_helper.pipeline import rescale_guidance

    g = torch.Generator().manual_seed(3)
    v_cfg, v_pos = torch.randn(2, 16, 3, 5, 7, generator=g), torch.randn(2, 16, 3, 5, 7, generator=g)
    dims = list(range(1, v_pos.ndim))
    for r in (0.0, 0.3, 0.7, 1.0):
        ratio = v_pos.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
        assert torch.equal(rescale_guidance(v_cfg, v_pos, r), r * (v_cfg * ratio) + (1 - r) * v_cfg)
