"""fp8 weight storage (fp8.py): the quantiser's error bounds, which layers change and which keep their dtype,
the error on the tiny model and on a layer with realistic statistics, streaming the fp8 bytes, the runtime
and the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper.events import Failed, Finished
from diffusers_helper.fp8 import FP8_DTYPE, FP8_MAX, apply_fp8, dequantize, fp8_applied, fp8_layers, quantize
from diffusers_helper.offload import (
    TransferStats,
    module_tensors,
    offloaded,
    plan_offload,
    streamable_blocks,
    tensors_bytes,
)
from diffusers_helper.pipeline import generate
from conftest import random_transformer


def _transformer(double=2, single=2, seed=0):
    return random_transformer(double, single, seed, std=0.05)


# ---------------------------------------------------------------------------------------------
# The quantiser


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantise_keeps_e4m3_precision_with_a_power_of_two_scale(granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 0, 64).unsqueeze(1)  # rows of very different size
    q, scale = quantize(w, granularity)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == ((1, 1) if granularity == "tensor" else (64, 1))
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    assert q.float().abs().max() <= FP8_MAX
    # the largest value lands in e4m3's top binade: no range is wasted
    amax = w.abs().amax() if granularity == "tensor" else w.abs().amax(1, keepdim=True)
    assert bool((amax / scale > FP8_MAX / 2).all())
    back = dequantize(q, scale, torch.float32)
    scaled = w / scale
    normal = scaled.abs() >= 2**-6
    # normal numbers: at most half a unit of e4m3's 3-bit mantissa; subnormals: half of their 2^-9 spacing
    assert bool(((back - w).abs() <= 2**-4 * w.abs() + 1e-12)[normal].all())
    assert bool(((back - w).abs() <= 2**-10 * scale.expand_as(w))[~normal].all())


def test_dequantise_is_exact_in_every_float_dtype():
    q, scale = quantize(torch.randn(32, 32) * 0.02)
    reference = q.double() * scale.double()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(q, scale, dtype).double(), reference), dtype


def test_zero_weights_stay_zero():
    q, scale = quantize(torch.zeros(4, 4), "channel")
    assert torch.equal(scale, torch.ones(4, 1)) and not q.float().any()


# ---------------------------------------------------------------------------------------------
# On a transformer


def test_only_attention_and_mlp_weights_become_fp8():
    model = _transformer()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    handle = apply_fp8(model)
    names = {f"{name}.weight" for name, _ in fp8_layers(model)}
    # a double block: q, k, v and out of both streams and their two MLPs (12); a single block: q, k, v, the
    # MLP's input and the fused output projection (5)
    assert len(names) == 2 * 12 + 2 * 5
    assert all(".norm" not in n and "proj_out.weight" != n for n in names)
    after = model.state_dict()
    assert set(after) == set(before)  # the scales are not part of the state dict
    for name, tensor in after.items():
        if name in names:
            assert tensor.dtype == FP8_DTYPE, name
        else:  # norms, modulation, embedders, refiner, proj_out, every bias: untouched, bit for bit
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert fp8_applied(model) is handle
    with pytest.raises(ValueError, match="already"):
        apply_fp8(model)


def test_tiny_model_output_stays_close_and_remove_upcasts(transformer_inputs):
    model = _transformer(seed=1)
    inputs = transformer_inputs(model)
    with torch.no_grad():
        exact = model(**inputs)[0]
    quantised = copy.deepcopy(model)
    handle = apply_fp8(quantised)
    with torch.no_grad():
        out = quantised(**inputs)[0]
    error = float((out - exact).norm() / exact.norm())
    # measured 0.2-0.5% on the tiny model; e4m3 rounds each weight by at most 6.25%
    assert 1e-4 < error < 0.01, error
    handle.remove()
    assert fp8_applied(quantised) is None
    layer = quantised.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.float32 and not hasattr(layer, "fp8_scale") and "forward" not in vars(layer)
    with torch.no_grad():
        assert torch.equal(quantised(**inputs)[0], out)  # the fp8 values, now stored in float32


def test_layer_with_realistic_statistics():
    """Per tensor and per channel give the same error (e4m3 is floating point); no scale is worse."""
    from diffusers_helper.bench.fp8_error import layer_errors, realistic_weight

    w = realistic_weight(512, 768, seed=3)
    x = torch.randn(64, 768, generator=torch.Generator().manual_seed(4))
    errors = layer_errors(w, x)
    assert 0.02 < errors["tensor"]["output"] < 0.03  # e4m3's 3-bit mantissa: about 2.7% RMS
    assert errors["channel"]["output"] == pytest.approx(errors["tensor"]["output"], rel=0.02)
    assert errors["unscaled_cast"]["output"] > 1.1 * errors["tensor"]["output"]


def test_full_size_transformer_bytes_with_fp8():
    """On the full-size architecture (meta tensors): the attention and MLP weights are 73% of the blocks'
    parameters, the modulation layers kept in bf16 the rest, so fp8 takes the blocks to 64% of their bytes."""
    from diffusers_helper.bench.fp8_error import full_size_bytes

    sizes = full_size_bytes()
    assert sizes["bf16_bytes"] == pytest.approx(25.75e9, rel=0.01)
    assert sizes["fp8_blocks_ratio"] == pytest.approx(0.6365, abs=0.001)
    assert sizes["with_modulation_blocks_ratio"] == pytest.approx(0.50, abs=0.001)


def test_streaming_moves_the_fp8_bytes(transformer_inputs):
    model = _transformer(seed=2)
    apply_fp8(model)
    inputs = [transformer_inputs(model, seed=s) for s in range(2)]
    with torch.no_grad():
        expected = [model(**kw)[0] for kw in inputs]
    blocks = streamable_blocks(model)
    sizes = [tensors_bytes(module_tensors(b)) for b in blocks]
    plan = plan_offload(sizes, 0)
    stats = TransferStats()
    # even with a compute dtype for the ring, fp8 weights stay fp8 there: their layer upcasts them with the scale
    with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32, stats=stats), torch.no_grad():
        outputs = [model(**kw)[0] for kw in inputs]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    fp8_bytes = sum(layer.weight.numel() for _, layer in fp8_layers(model))
    assert fp8_bytes and stats.streamed_bytes >= 2 * sum(sizes)
    assert all(t.dtype in (FP8_DTYPE, torch.float32) for b in blocks for t in module_tensors(b))


# ---------------------------------------------------------------------------------------------
# Runtime and pipeline


@pytest.mark.slow
def test_runtime_stores_fp8_when_the_settings_ask_and_reloads_to_go_back(tiny_sources, fast, image, tmp_path):
    from diffusers_helper.runtime import Runtime

    runtime = Runtime(tiny_sources, device="cpu", vram="high", attention="sdpa")
    plain = runtime.components("framepack").transformer
    assert fp8_applied(plain) is None
    one = fast.replace(cache="none", steps=2, seconds=1.0, window=6)  # one section
    events = list(runtime.generate(one.replace(fp8=True), image, tmp_path / "a.mp4",
                                   save_latents=tmp_path / "a.st"))
    assert isinstance(events[-1], Finished), events[-1]
    quantised = runtime.components("framepack", fp8=True).transformer
    assert quantised is not plain and fp8_applied(quantised) is not None
    back = runtime.components("framepack").transformer
    assert fp8_applied(back) is None
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), plain.state_dict().values()))
    list(runtime.generate(one, image, tmp_path / "b.mp4", save_latents=tmp_path / "b.st"))
    a, b = (load_file(tmp_path / f"{n}.st")["history_latents"] for n in "ab")
    assert not torch.equal(a, b) and float((a - b).norm() / b.norm()) < 0.05
    record = (tmp_path / "a.json").read_text()
    assert '"fp8": true' in record


def test_job_refuses_settings_that_do_not_match_the_weights(tiny_components, fast, image, tmp_path):
    c = tiny_components("framepack")
    events = list(generate(c, fast.replace(fp8=True), image, tmp_path / "v.mp4"))
    assert isinstance(events[-1], Failed) and "fp8" in events[-1].message
    assert not (tmp_path / "v.json").exists()

