"""Tests for diffusers_helper.teacache on a tiny random HunyuanVideoFramepackTransformer3DModel."""

import copy

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook

from diffusers_helper.teacache import TeaCache, apply_teacache

COEFFS = (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896)
HUGE = 1e9

# Frames of the noisy window and of the three history scales, as FramePack lays them out.
WINDOW, HIST_1X, HIST_2X, HIST_4X = 3, 1, 2, 16


@pytest.fixture(scope="session")
def base_model():
    torch.manual_seed(0)
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
        image_proj_dim=32,
        has_image_proj=True,
        has_clean_x_embedder=True,
        guidance_embeds=True,
    )
    return _randomised(model)


def _randomised(model):
    # diffusers zero-initialises some projections (e.g. the AdaLN gates); re-randomise all.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _conditioning(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    indices = torch.arange(1 + HIST_4X + HIST_2X + HIST_1X + WINDOW)
    prefix, idx_4x, idx_2x, idx_1x, idx_latents = indices.split([1, HIST_4X, HIST_2X, HIST_1X, WINDOW])

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(
        encoder_hidden_states=r(1, 7, 32),
        encoder_attention_mask=torch.ones(1, 7, dtype=torch.long),
        pooled_projections=r(1, 32),
        image_embeds=r(1, 5, 32),
        indices_latents=idx_latents,
        guidance=torch.tensor([10000.0]).to(dtype),
        latents_clean=r(1, 16, 1 + HIST_1X, 8, 8),
        indices_latents_clean=torch.cat([prefix, idx_1x]),
        latents_history_2x=r(1, 16, HIST_2X, 8, 8),
        indices_latents_history_2x=idx_2x,
        latents_history_4x=r(1, 16, HIST_4X, 8, 8),
        indices_latents_history_4x=idx_4x,
    )


def _run(model, n_steps, *, cfg=False, dtype=torch.float32, seed=0, per_call=None, t_start=1000.0, t_end=0.0):
    """A small Euler flow-matching loop; with cfg, two model calls per step (cond, uncond) as real CFG does."""
    cond = _conditioning(seed, dtype)
    uncond = dict(cond, encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]))
    x = torch.randn(1, 16, WINDOW, 8, 8, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)
    ts = torch.linspace(t_start, t_end, n_steps + 1)
    outs = []
    with torch.no_grad():
        for i in range(n_steps):
            t = ts[i : i + 1].to(dtype)
            v = model(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
            outs.append(v)
            if per_call is not None:
                per_call()
            if cfg:
                v_u = model(hidden_states=x, timestep=t, **uncond, return_dict=False)[0]
                outs.append(v_u)
                if per_call is not None:
                    per_call()
                v = v_u + 2.0 * (v - v_u)
            x = x + (ts[i + 1] - ts[i]).to(dtype) / 1000.0 * v
    return outs


def _pattern_recorder(cache):
    pattern = []
    last = [0]

    def record():
        pattern.append("C" if cache.computed > last[0] else "S")
        last[0] = cache.computed

    return pattern, record


def _reference_pattern(rels, num_steps, threshold):
    """Independent re-implementation of the reference decision rule, per transformer call."""
    out, acc, cnt = [], 0.0, 0
    for rel in rels:
        if cnt == 0 or cnt == num_steps - 1:
            calc, acc = True, 0.0
        else:
            acc += np.poly1d(COEFFS)(rel)
            calc = acc >= threshold
            if calc:
                acc = 0.0
        out.append("C" if calc else "S")
        cnt = (cnt + 1) % num_steps
    return "".join(out)


def _all_hooks(module):
    return {
        name: list(m._diffusers_hook.hooks)
        for name, m in module.named_modules()
        if hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks
    }


def _assert_all_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_threshold_zero_is_exact(model):
    plain = _run(model, 6)
    cache = apply_teacache(model, num_steps=6, threshold=0.0)
    _assert_all_equal(_run(model, 6), plain)
    assert (cache.computed, cache.skipped) == (6, 0)
    cache.remove()


def test_huge_threshold_skips_all_but_first_and_last(model):
    n = 5
    plain = _run(model, n)

    head, tail = model.transformer_blocks[0], model.single_transformer_blocks[-1]
    # Inner modules of the blocks only run when the blocks really run.
    block_runs, norm1_calls = [], []
    handles = [
        tail.proj_out.register_forward_hook(lambda *a: block_runs.append(1)),
        head.norm1.register_forward_hook(lambda *a: norm1_calls.append(1)),
    ]

    cache = apply_teacache(model, num_steps=n, threshold=HUGE)
    pattern, record = _pattern_recorder(cache)
    outs = _run(model, n, per_call=record)
    for h in handles:
        h.remove()
    assert "".join(pattern) == "CSSSC"
    assert (cache.computed, cache.skipped) == (2, 3)
    assert len(block_runs) == 2  # blocks ran on the two computed calls only
    assert len(norm1_calls) == 2 * 2 + 3  # ours on every call, plus the block's own when computing
    assert torch.equal(outs[0], plain[0])  # first call computes normally
    cache.remove()

    # Independent computation of the skipped calls on a plain copy: plain torch hooks make the
    # first block return its input plus the residual captured on call 0 (and the rest return
    # their input), so only the non-block parts of the forward contribute.
    residual = _capture_residual(model)
    replay = copy.deepcopy(model)
    blocks = list(replay.transformer_blocks) + list(replay.single_transformer_blocks)
    blocks[0].register_forward_hook(lambda m, args, out: (args[0] + residual, args[1]))
    for b in blocks[1:]:
        b.register_forward_hook(lambda m, args, out: (args[0], args[1]))

    # Replaying the same inputs as the TeaCache run needs the same latents, which depend on
    # earlier outputs; feed the recorded outputs back through a loop that mirrors _run.
    expected = _replay(replay, outs, n)
    for k in (1, 2, 3):
        assert torch.equal(outs[k], expected[k])
    # The last call computed the blocks: it matches the plain model on the same input.
    assert torch.equal(outs[4], _replay(model, outs, n)[4])


def _capture_residual(model):
    """Residual of the blocks on the first call of _run, from plain torch hooks."""
    seen = {}
    head, tail = model.transformer_blocks[0], model.single_transformer_blocks[-1]
    h1 = head.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))
    h2 = tail.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out[0]))
    _run(model, 1)
    h1.remove()
    h2.remove()
    return seen["out"] - seen["in"]


def _replay(model, outs, n_steps, seed=0):
    """Call ``model`` on the inputs _run produced when its calls returned ``outs``."""
    cond = _conditioning(seed)
    x = torch.randn(1, 16, WINDOW, 8, 8, generator=torch.Generator().manual_seed(seed + 100))
    ts = torch.linspace(1000.0, 0.0, n_steps + 1)
    results = []
    with torch.no_grad():
        for i in range(n_steps):
            results.append(model(hidden_states=x, timestep=ts[i : i + 1], **cond, return_dict=False)[0])
            x = x + (ts[i + 1] - ts[i]) / 1000.0 * outs[i]
    return results


def test_decision_rule_on_mock_rel_sequences():
    cache = TeaCache.__new__(TeaCache)  # decision logic only, no model
    cache.threshold = 0.15
    cache.reset(6)
    # rel = 0 adds P(0) = 0.0961 per call: compute every second call, plus the forced ends.
    assert "".join("C" if cache._decide(0.0) else "S" for _ in range(6)) == "CSCSCC"

    rng = np.random.default_rng(0)
    for num_steps, threshold in [(10, 0.15), (25, 0.15), (7, 0.3), (12, 0.25)]:
        rels = rng.uniform(0.0, 0.12, size=3 * num_steps).tolist()
        cache.threshold = threshold
        cache.reset(num_steps)
        got = "".join("C" if cache._decide(r) else "S" for r in rels)
        assert got == _reference_pattern(rels, num_steps, threshold)
        assert "S" in got and got.count("C") > 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decisions_follow_rel_of_first_block_modulated_input(model, dtype):
    n = 12
    model = model.to(dtype)
    # The first norm1 call of each forward is TeaCache's own; record its output.
    firsts, calls = [], [0]

    def on_norm1(m, args, out):
        if calls[0] == len(firsts):
            firsts.append(out[0].detach().clone())

    model.transformer_blocks[0].norm1.register_forward_hook(on_norm1)
    cache = apply_teacache(model, num_steps=n)

    def record():
        calls[0] += 1
        rec()

    pattern, rec = _pattern_recorder(cache)
    _run(model, n, dtype=dtype, per_call=record, t_start=1000.0, t_end=900.0)
    assert len(firsts) == n
    # rel in the tensors' own dtype, exactly as the reference computes it.
    rels = [None] + [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(firsts, firsts[1:])]
    expected = _reference_pattern([0.0 if r is None else r for r in rels], n, 0.15)
    assert "".join(pattern) == expected
    assert "S" in expected and expected.count("C") > 2  # a mixed sequence, not a trivial one
    assert cache.computed + cache.skipped == n
    cache.remove()


def test_counts_per_forward_call_with_real_cfg(model):
    # Two calls per step: the count wraps half-way, as in the reference.
    n = 4
    cache = apply_teacache(model, num_steps=n, threshold=HUGE)
    pattern, record = _pattern_recorder(cache)
    _run(model, n, cfg=True, per_call=record)
    assert "".join(pattern) == "CSSC" * 2


def test_reset_restarts_the_count(model):
    cache = apply_teacache(model, num_steps=5, threshold=HUGE)
    pattern, record = _pattern_recorder(cache)
    _run(model, 3, per_call=record)  # a section cut short after 3 of 5 calls
    assert "".join(pattern) == "CSS"
    cache.reset(4)
    assert (cache.computed, cache.skipped, cache.cnt, cache.accumulated) == (0, 0, 0, 0.0)
    assert cache.previous_residual is None and cache.previous_modulated_input is None
    pattern, record = _pattern_recorder(cache)
    _run(model, 4, seed=1, per_call=record)
    assert "".join(pattern) == "CSSC"
    cache.remove()


def test_disabled_is_transparent(model):
    plain = _run(model, 4)
    cache = apply_teacache(model, num_steps=4, threshold=HUGE)
    cache.enabled = False
    _assert_all_equal(_run(model, 4), plain)
    assert (cache.computed, cache.skipped, cache.cnt) == (0, 0, 0)
    cache.enabled = True
    _run(model, 4)
    assert (cache.computed, cache.skipped) == (2, 2)
    cache.remove()


def test_remove_restores_exactly(model):
    plain = _run(model, 4)
    cache = apply_teacache(model, num_steps=4, threshold=HUGE)
    outs = _run(model, 4)
    assert not torch.equal(outs[1], plain[1])
    cache.remove()
    assert cache.removed
    _assert_all_equal(_run(model, 4), plain)
    assert _all_hooks(model) == {}
    for m in model.modules():
        assert not hasattr(m, "_diffusers_hook")
        assert "forward" not in vars(m)
    cache.remove()  # a second remove is harmless


def test_applying_twice_replaces(model):
    first = apply_teacache(model, num_steps=4, threshold=HUGE)
    second = apply_teacache(model, num_steps=4, threshold=HUGE)
    assert first.removed and not second.removed
    hooks = _all_hooks(model)
    assert len(hooks) == 4 and all(names == ["framepack_teacache"] for names in hooks.values())
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        assert block._diffusers_hook.get_hook("framepack_teacache").cache is second
    first.remove()  # the replaced handle must not touch the new hooks
    assert len(_all_hooks(model)) == 4
    _run(model, 4)
    assert (first.computed, second.computed, second.skipped) == (0, 2, 2)
    second.remove()
    assert _all_hooks(model) == {}


class _FakeOnload(ModelHook):
    """Stands in for block-level group offloading: weights are 'present' only inside the block call."""

    def __init__(self):
        super().__init__()
        self.inside = False

    def pre_forward(self, module, *args, **kwargs):
        self.inside = True
        return args, kwargs

    def post_forward(self, module, output):
        self.inside = False
        return output


def test_head_runs_inside_existing_block_hooks(model):
    fake = _FakeOnload()
    head = model.transformer_blocks[0]
    HookRegistry.check_if_exists_or_initialize(head).register_hook(fake, "fake_onload")
    outside = []
    head.norm1.register_forward_pre_hook(lambda m, args: outside.append(not fake.inside))
    plain = _run(model, 4)
    cache = apply_teacache(model, num_steps=4, threshold=HUGE)
    assert list(head._diffusers_hook.hooks) == ["framepack_teacache", "fake_onload"]
    _run(model, 4)
    assert (cache.computed, cache.skipped) == (2, 2)
    assert outside and not any(outside)  # norm1 only ever ran with the block's weights in place
    cache.remove()
    assert list(head._diffusers_hook.hooks) == ["fake_onload"]
    _assert_all_equal(_run(model, 4), plain)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_composes_with_group_offloading(model, offload_type):
    plain = _run(model, 5)
    # CPU to CPU: no GPU here, but the hooks (and their order around ours) are the real ones.
    model.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=1 if offload_type == "block_level" else None,
    )
    offload_hooks = _all_hooks(model)
    cache = apply_teacache(model, num_steps=5, threshold=0.0)
    _assert_all_equal(_run(model, 5), plain)
    cache.reset(5)
    cache.threshold = HUGE
    _run(model, 5)
    assert (cache.computed, cache.skipped) == (2, 3)
    cache.remove()
    assert _all_hooks(model) == offload_hooks
    _assert_all_equal(_run(model, 5), plain)


def test_single_block_model_is_head_and_tail(base_model):
    # One double block and no single blocks: the same hook decides and stores the residual.
    config = {**base_model.config, "num_layers": 1, "num_single_layers": 0}
    model = _randomised(HunyuanVideoFramepackTransformer3DModel(**config))
    plain = _run(model, 4)
    cache = apply_teacache(model, num_steps=4)
    assert cache.threshold == 0.15
    cache.threshold = 0.0
    _assert_all_equal(_run(model, 4), plain)
    cache.reset(4)
    cache.threshold = HUGE
    pattern, record = _pattern_recorder(cache)
    outs = _run(model, 4, per_call=record)
    assert "".join(pattern) == "CSSC"
    assert not torch.equal(outs[1], plain[1])
    cache.remove()


def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError):
        apply_teacache(model, num_steps=0)
    with pytest.raises(ValueError):
        apply_teacache(model, num_steps=4, threshold=-1.0)
    with pytest.raises(ValueError):
        apply_teacache(torch.nn.Linear(2, 2), num_steps=4)
    assert _all_hooks(model) == {}
