"""MagCache (Ma et al., 2025): the rule as a pure schedule, its hooks on a tiny transformer, calibration
files, streaming, and MagCache in a job (caches.py, pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper.events import Finished, Notice
from diffusers_helper.magcache import (
    MAX_STEP_DEVIATION,
    PUBLISHED_RATIOS,
    PUBLISHED_STEPS,
    MagCacheSettings,
    apply_magcache,
    interpolate_ratios,
    load_ratios,
    published_ratios,
    save_calibration,
    skip_schedule,
)
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
    return random_transformer(double, single, seed, std=0.1)


def _steps(transformer_inputs, model, n):
    """n model calls like a sampler's: the same conditioning, changing latents and timestep."""
    calls = []
    for i in range(n):
        kw = transformer_inputs(model, seed=0)
        other = transformer_inputs(model, seed=100 + i)["hidden_states"]
        kw["hidden_states"] = kw["hidden_states"] * (1 - i / n) + other * (i / n)
        kw["timestep"] = torch.tensor([1000.0 * (1 - i / n)])
        calls.append(kw)
    return calls


class _Probe:
    """Records, per call, the head block's input and the last block's output (their difference: the residual)."""

    def __init__(self, model):
        blocks = streamable_blocks(model)
        self.head_in, self.tail_out, self.ff_calls = [], [], 0
        self.handles = [
            blocks[0].register_forward_pre_hook(
                lambda m, a, kw: self.head_in.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True),
            blocks[-1].register_forward_hook(lambda m, a, out: self.tail_out.append(out[0])),
            blocks[0].ff.register_forward_hook(lambda *_: self._count()),
        ]

    def _count(self):
        self.ff_calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# The rule


def test_published_tables_have_25_steps_starting_at_1():
    for model, ratios in PUBLISHED_RATIOS.items():
        assert len(ratios) == PUBLISHED_STEPS == 25, model
        assert ratios[0] == 1.0 and all(0.5 < r < 1.5 for r in ratios)
        assert published_ratios(model, 25) == ratios


def test_interpolation_keeps_the_table_and_blends_linearly_between():
    table = PUBLISHED_RATIOS["framepack"]
    stretched = interpolate_ratios(table, 2 * len(table) - 1)  # every original step lands on an even index
    assert stretched[0::2] == pytest.approx(table, abs=0)
    for i in range(1, len(stretched), 2):
        assert stretched[i] == pytest.approx((stretched[i - 1] + stretched[i + 1]) / 2, rel=1e-12)
    shrunk = interpolate_ratios(table, 13)  # steps 0, 2, 4, ... of the 25
    assert shrunk[1:] == pytest.approx(table[2::2][: 12], abs=1e-12) and shrunk[0] == 1.0
    assert interpolate_ratios(table, 1) == (1.0,)


def test_schedule_follows_the_rule_by_hand():
    # steps 0-1 retained (20% of 10); then accumulate gamma until the summed error reaches 0.05
    ratios = [1.0, 1.0, 1.02, 1.01, 0.97, 1.0, 1.0, 1.3, 1.0, 1.0]
    # t2: err 0.02 skip | t3: ratio 1.0302, err 0.0502 >= 0.05 compute | t4: err 0.03 skip | t5: err 0.06 compute |
    # t6: err 0 skip | t7: gamma 1.3 compute | t8: skip | t9: the last step always computes
    expected = (False, False, True, False, True, False, True, False, True, False)
    assert skip_schedule(ratios, threshold=0.05, max_skips=3, retention=0.2) == expected


def test_at_most_k_skips_in_a_row():
    ratios = [1.0] * 12
    assert skip_schedule(ratios, threshold=1.0, max_skips=2, retention=0.0) == (
        False, True, True, False, True, True, False, True, True, False, True, False)
    assert skip_schedule(ratios, threshold=1.0, max_skips=1, retention=0.5) == (False,) * 6 + (True, False) * 3


def test_a_step_far_from_1_is_computed_whatever_the_threshold():
    just_inside, outside = 1 - MAX_STEP_DEVIATION + 0.01, 1 - MAX_STEP_DEVIATION - 0.01
    assert skip_schedule([1.0, just_inside, 1.0], threshold=10, max_skips=5, retention=0) == (False, True, False)
    assert skip_schedule([1.0, outside, 1.0], threshold=10, max_skips=5, retention=0) == (False, False, False)


@pytest.mark.parametrize("model", sorted(PUBLISHED_RATIOS))
def test_threshold_zero_skips_nothing(model):
    for steps in (2, 5, 25, 50):
        assert not any(skip_schedule(published_ratios(model, steps), threshold=0, max_skips=10, retention=0))
    assert not any(skip_schedule([1.0] * 30, threshold=0, max_skips=10, retention=0))


def test_published_defaults_skip_a_third_to_half_of_25_steps():
    """The authors' setting (E010K3R02) on their own tables: the retained 5 and the last step computed."""
    for model in PUBLISHED_RATIOS:
        schedule = MagCacheSettings(PUBLISHED_RATIOS[model]).schedule(25)
        assert not any(schedule[:5]) and not schedule[-1]
        assert 8 <= sum(schedule) <= 13, (model, sum(schedule))


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="threshold"):
        MagCacheSettings((1.0, 1.0), threshold=-1)
    with pytest.raises(ValueError, match="K"):
        MagCacheSettings((1.0, 1.0), max_skips=1.5)
    with pytest.raises(ValueError, match="retention"):
        MagCacheSettings((1.0, 1.0), retention=2)
    with pytest.raises(ValueError, match="above 0"):
        MagCacheSettings((1.0, float("nan")))


# ---------------------------------------------------------------------------------------------
# The hooks


def test_hooks_skip_by_the_schedule_and_add_the_last_residual(transformer_inputs):
    steps = 8
    model = _transformer()
    calls = _steps(transformer_inputs, model, steps)
    with torch.no_grad():
        plain = [model(**kw)[0] for kw in calls]
    ratios = [1.0, 1.0, 1.01, 1.01, 1.2, 1.0, 1.0, 1.0]
    config = MagCacheSettings(tuple(ratios), threshold=0.05, max_skips=2, retention=0.25)
    schedule = config.schedule(steps)
    assert schedule == (False, False, True, True, False, True, True, False)

    cache = apply_magcache(model, config, steps)
    probe = _Probe(model)
    try:
        with torch.no_grad():
            outputs = [model(**kw)[0] for kw in calls]
    finally:
        probe.remove()
    assert (cache.computed, cache.skipped) == (steps - sum(schedule), sum(schedule))
    assert probe.ff_calls == steps - sum(schedule)  # a skipped call runs no block
    last = None
    for t, skipped in enumerate(schedule):
        if skipped:
            # the blocks' output is the call's input plus the residual of the last computed call
            assert torch.equal(probe.tail_out[t], probe.head_in[t] + last)
        else:
            last = probe.tail_out[t] - probe.head_in[t]
            assert torch.equal(outputs[t], plain[t])  # a computed call is the plain model's, bit for bit
    cache.remove()


def test_threshold_zero_is_the_plain_model_bit_for_bit(transformer_inputs):
    steps = 6
    model = _transformer(seed=1)
    calls = _steps(transformer_inputs, model, steps)
    with torch.no_grad():
        plain = [model(**kw)[0] for kw in calls]
    cache = apply_magcache(model, MagCacheSettings((1.0,) * steps, threshold=0.0, retention=0.0), steps)
    with torch.no_grad():
        assert all(torch.equal(model(**kw)[0], ref) for kw, ref in zip(calls, plain))
    assert cache.skipped == 0
    cache.remove()


def test_real_cfg_decides_per_step_with_a_residual_per_branch(transformer_inputs):
    """Two calls per step (positive, negative): both follow the step's decision, each adds its own residual."""
    steps = 5
    model = _transformer(seed=2)
    positive = _steps(transformer_inputs, model, steps)
    negative = [{**kw, "encoder_hidden_states": -kw["encoder_hidden_states"]} for kw in positive]
    config = MagCacheSettings((1.0,) * steps, threshold=1.0, max_skips=1, retention=0.0)
    assert config.schedule(steps) == (False, True, False, True, False)
    cache = apply_magcache(model, config, steps, calls_per_step=2)
    probe = _Probe(model)
    try:
        with torch.no_grad():
            for pos, neg in zip(positive, negative):
                model(**pos)
                model(**neg)
    finally:
        probe.remove()
    assert (cache.computed, cache.skipped) == (6, 4)
    residual = {}
    for call, (head_in, tail_out) in enumerate(zip(probe.head_in, probe.tail_out)):
        step, branch = divmod(call, 2)
        if config.schedule(steps)[step]:
            assert torch.equal(tail_out, head_in + residual[branch])
        else:
            residual[branch] = tail_out - head_in
    assert not torch.equal(residual[0], residual[1])
    cache.remove()


def test_reset_starts_a_section_afresh_and_remove_restores_the_blocks(transformer_inputs):
    steps = 4
    model = _transformer(seed=3)
    calls = _steps(transformer_inputs, model, steps)
    with torch.no_grad():
        plain = [model(**kw)[0] for kw in calls]
    cache = apply_magcache(model, MagCacheSettings((1.0,) * steps, threshold=1.0, max_skips=3, retention=0.0), steps)
    with torch.no_grad():
        first = [model(**kw)[0] for kw in calls]
        cache.reset(steps)
        # a new section: its first call computes (no residual carried over), the same decisions follow
        second = [model(**kw)[0] for kw in calls]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(second[0], plain[0]) and (cache.computed, cache.skipped) == (2, 2)
    cache.remove()
    blocks = streamable_blocks(model)
    assert all(not hasattr(b, "_diffusers_hook") and "forward" not in vars(b) for b in blocks)
    with torch.no_grad():
        assert all(torch.equal(model(**kw)[0], ref) for kw, ref in zip(calls, plain))


def test_streaming_skipped_steps_move_no_weights(transformer_inputs):
    """MagCache and block streaming on the same blocks: the same outputs, and skipped steps load no block."""
    steps = 6
    model = _transformer(seed=4)
    calls = _steps(transformer_inputs, model, steps)
    config = MagCacheSettings((1.0,) * steps, threshold=1.0, max_skips=5, retention=0.0)
    assert sum(config.schedule(steps)) == 4
    cache = apply_magcache(model, config, steps)
    with torch.no_grad():
        expected = [model(**kw)[0] for kw in calls]
    blocks = streamable_blocks(model)
    for resident in (0, 1):  # the head streamed too: its skip is known before it runs
        cache.reset(steps)
        plan = plan_offload([tensors_bytes(module_tensors(b)) for b in blocks], 0, min_resident=resident)
        stats = TransferStats()
        with offloaded(model, blocks, "cpu", plan, stats=stats, skip=cache.skips_block), torch.no_grad():
            outputs = [model(**kw)[0] for kw in calls]
        assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
        streamed = len(plan.streamed)
        # the 2 computed calls load every streamed block; the 4 skipped ones load nothing
        assert 2 * streamed <= stats.streamed_loads <= 2 * streamed + streamed
    cache.remove()


# ---------------------------------------------------------------------------------------------
# Calibration


def test_calibration_computes_every_step_and_measures_the_ratios(transformer_inputs, tmp_path):
    steps = 5
    model = _transformer(seed=5)
    calls = _steps(transformer_inputs, model, steps)
    with torch.no_grad():
        plain = [model(**kw)[0] for kw in calls]
    cache = apply_magcache(model, MagCacheSettings((1.0, 1.0), calibrate=True), steps)
    probe = _Probe(model)
    try:
        with torch.no_grad():
            assert all(torch.equal(model(**kw)[0], ref) for kw, ref in zip(calls, plain))
    finally:
        probe.remove()
    assert cache.skipped == 0
    # independently: gamma_t = mean over tokens of |r_t| / |r_(t-1)|, in float64
    residuals = [(o - i).double() for i, o in zip(probe.head_in, probe.tail_out)]
    expected = [1.0] + [float((a.norm(dim=-1) / b.norm(dim=-1)).mean()) for a, b in zip(residuals[1:], residuals)]
    measured = cache.calibrated_ratios()
    assert measured == pytest.approx(expected, rel=1e-5)
    assert any(abs(r - 1) > 1e-3 for r in measured[1:])

    path = save_calibration(tmp_path / "ratios.json", measured, model="framepack", sections=[measured])
    assert load_ratios(path) == measured  # the file gives back exactly what was measured
    with pytest.raises(FileExistsError):
        save_calibration(path, measured, model="framepack", sections=[measured])
    cache.remove()


def test_ratio_files_that_are_not_ours_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("not json")
    (tmp_path / "b.json").write_text(json.dumps({"ratios": [1.0, 1.1]}))
    (tmp_path / "c.json").write_text(json.dumps({"kind": "framepack-magcache-ratios", "ratios": [1.0, -1]}))
    cases = (("a", "not JSON"), ("b", "not a MagCache ratios file"), ("c", "above 0"), ("missing", "Can't read"))
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            load_ratios(tmp_path / f"{name}.json")


# ---------------------------------------------------------------------------------------------
# In a job


def _run(components, settings, image, out, **kw):
    events = list(generate(components, settings, image, out, **kw))
    assert isinstance(events[-1], Finished), events[-1]
    return events


@pytest.mark.slow
def test_job_with_magcache_skips_by_the_schedule_and_calibration_round_trips(tiny_components, image, tmp_path, fast):
    from diffusers_helper.options import OneLineParser, add_settings_arguments, settings_from_args

    c = tiny_components("framepack")
    steps = 4
    base = fast.replace(model="framepack", steps=steps, seconds=1.0)  # 2 sections
    counted = []
    handle = c.transformer.transformer_blocks[0].ff.register_forward_hook(lambda *_: counted.append(1))
    try:
        _run(c, base.replace(cache="none"), image, tmp_path / "none.mp4", save_latents=tmp_path / "none.st")
        computed_none = len(counted)
        events = _run(c, base.replace(cache="magcache", magcache_calibrate=True), image, tmp_path / "cal.mp4",
                      save_latents=tmp_path / "cal.st")
        computed_calibrating = len(counted) - computed_none
        ratios = (1.0, 1.0, 1.01, 1.0)
        del counted[:]
        _run(c, base.replace(cache="magcache", magcache_ratios=ratios, magcache_threshold=0.05), image,
             tmp_path / "mag.mp4", save_latents=tmp_path / "mag.st")
    finally:
        handle.remove()
    # calibrating computes every step: the same latents as no cache, bit for bit
    assert computed_calibrating == computed_none == base.sections * steps
    none, calibrated = (load_file(tmp_path / f"{n}.st")["history_latents"] for n in ("none", "cal"))
    assert torch.equal(none, calibrated)
    schedule = MagCacheSettings(ratios, threshold=0.05).schedule(steps)
    assert sum(schedule) > 0 and len(counted) == base.sections * (steps - sum(schedule))
    assert not torch.equal(none, load_file(tmp_path / "mag.st")["history_latents"])
    # the measured ratios were saved beside the video, and the command line reads them back
    saved = tmp_path / "cal.magcache.json"
    assert any(isinstance(e, Notice) and str(saved) in e.message for e in events)
    data = json.loads(saved.read_text())
    assert data["model"] == "framepack" and data["steps"] == steps and len(data["sections"]) == base.sections
    assert data["ratios"] == pytest.approx(np.mean(data["sections"], axis=0).tolist(), rel=1e-12)
    parser = OneLineParser()
    add_settings_arguments(parser)
    args = parser.parse_args(["--prompt", "x", "--cache", "magcache", "--magcache-ratios", str(saved)])
    assert settings_from_args(args).magcache_ratios == tuple(data["ratios"])
    # no hook is left on the transformer after the jobs
    assert all(not hasattr(b, "_diffusers_hook") for b in streamable_blocks(c.transformer))


@pytest.mark.slow  # two whole jobs; the model-level streaming test above is the quick check
def test_streamed_job_with_magcache_gives_the_same_latents(tiny_components, image, tmp_path, fast):
    from diffusers_helper.memory import Placement, VramMode

    c = tiny_components("f1")
    settings = fast.replace(model="f1", steps=4, seconds=1.0, cache="magcache", magcache_ratios=(1.0,) * 4,
                            magcache_threshold=1.0, magcache_retention=0.0)
    _run(c, settings, image, tmp_path / "a.mp4", placement=Placement(c.device, VramMode.HIGH),
         save_latents=tmp_path / "a.st")
    blocks = streamable_blocks(c.transformer)
    sizes = [tensors_bytes(module_tensors(b)) for b in blocks]
    fixed = tensors_bytes(module_tensors(c.transformer)) - sum(sizes)
    streamed = Placement(c.device, VramMode.LOW, available=lambda: fixed + 2 * max(sizes))
    _run(c, settings, image, tmp_path / "b.mp4", placement=streamed, save_latents=tmp_path / "b.st")
    a, b = (load_file(tmp_path / f"{n}.st")["history_latents"] for n in "ab")
    assert torch.equal(a, b)
    plans = [p for p in streamed.stats.plans if p["model"] == type(c.transformer).__name__]
    assert plans and all(p["streamed_blocks"] >= 1 for p in plans)
