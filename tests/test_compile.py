"""Compiled transformer blocks (compiled.py): the platform check's messages, and, where torch.compile works
(a C++ compiler on the CPU), compiled blocks computing as eager ones, with our hooks and streaming around them."""

from __future__ import annotations

import pytest
import torch

from diffusers_helper import compiled
from diffusers_helper.compiled import CompileUnavailable, check_compile, compile_blocks
from diffusers_helper.offload import module_tensors, offloaded, plan_offload, streamable_blocks, tensors_bytes
from conftest import random_transformer


def _transformer(double=3, single=4, seed=0):
    return random_transformer(double, single, seed, std=0.05)


@pytest.fixture
def fresh_trial():
    """The trial compile is remembered per device for the process; forget it around a test that fakes it."""
    compiled._trial.cache_clear()
    yield
    compiled._trial.cache_clear()


def test_python_without_dynamo_is_refused_with_the_reason(monkeypatch, fresh_trial):
    from torch import _dynamo

    monkeypatch.setattr(_dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(CompileUnavailable, match="does not support this Python"):
        check_compile("cpu")


def test_gpu_without_triton_is_refused_with_what_to_install(monkeypatch, fresh_trial):
    import torch.utils._triton as triton

    monkeypatch.setattr(triton, "has_triton", lambda: False)
    with pytest.raises(CompileUnavailable, match="needs Triton"):
        check_compile("cuda")


def test_a_failing_trial_compile_is_refused_with_its_error(monkeypatch, fresh_trial):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(CompileUnavailable, match="No working C\\+\\+ compiler.*C\\+\\+ compiler on the PATH"):
        check_compile("cpu")


def test_cli_refuses_compile_on_one_line_before_loading(monkeypatch, cli_error, tmp_path, image, fresh_trial):
    from PIL import Image
    from torch import _dynamo

    Image.fromarray(image).save(tmp_path / "in.png")
    monkeypatch.setattr(_dynamo, "is_dynamo_supported", lambda: False)
    err = cli_error(["generate", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--output",
                     str(tmp_path / "o.mp4"), "--device", "cpu", "--compile"])
    assert "torch.compile" in err
    assert not (tmp_path / "o.json").exists()


def test_blocks_with_hooks_are_refused_and_removal_waits_for_hooks():
    from diffusers_helper.teacache import apply_teacache

    model = _transformer(double=1, single=1)
    cache = apply_teacache(model, num_steps=3)
    with pytest.raises(ValueError, match="compile the blocks first"):
        compile_blocks(model)
    cache.remove()
    handle = compile_blocks(model)  # nothing is compiled until the first call
    assert len(handle.functions) == 2
    cache = apply_teacache(model, num_steps=3)
    with pytest.raises(ValueError, match="still has hooks"):
        handle.remove()
    cache.remove()
    handle.remove()
    assert all("forward" not in vars(b) for b in streamable_blocks(model))


@pytest.mark.slow
def test_compiled_blocks_compute_as_eager_with_caches_fp8_and_streaming(transformer_inputs):
    """A real compile on this machine (tens of seconds): one graph per block class is reused by every block."""
    from torch._dynamo.utils import counters

    from diffusers_helper.fp8 import apply_fp8
    from diffusers_helper.magcache import MagCacheSettings, apply_magcache

    try:
        check_compile("cpu")
    except CompileUnavailable as exc:
        pytest.skip(f"torch.compile can't run on this machine: {exc}")
    eager = _transformer()
    model = _transformer()
    apply_fp8(eager)
    apply_fp8(model)
    steps = 4
    calls = [transformer_inputs(model, seed=s) for s in range(steps)]
    config = MagCacheSettings((1.0,) * steps, threshold=1.0, retention=0.0)
    counters.clear()
    handle = compile_blocks(model)
    caches = [apply_magcache(m, config, steps) for m in (eager, model)]
    blocks = streamable_blocks(model)
    plan = plan_offload([tensors_bytes(module_tensors(b)) for b in blocks], 0)
    with torch.no_grad():
        expected = [eager(**kw)[0] for kw in calls]
        with offloaded(model, blocks, "cpu", plan, skip=caches[1].skips_block):
            outputs = [model(**kw)[0] for kw in calls]
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert caches[1].skipped == caches[0].skipped == 2
    # 7 blocks of 2 classes: the blocks of a class share their compiled graph
    assert 2 <= counters["stats"]["unique_graphs"] <= 4 < len(blocks)
    for cache in caches:
        cache.remove()
    handle.remove()
