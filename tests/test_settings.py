"""One validated settings object: defaults, ranges, clear messages."""

import math

import pytest

from diffusers_helper.settings import RANGES, GenerationSettings, ModelSources, SettingsError


def test_defaults_are_the_reference_ui_defaults():
    s = GenerationSettings()
    assert (s.seed, s.seconds, s.window, s.steps, s.distilled_cfg, s.cfg, s.cfg_rescale, s.crf, s.resolution) == (
        31337, 5.0, 9, 25, 10.0, 1.0, 0.0, 16, 640)
    assert s.teacache is True and s.model == "framepack" and s.sampler == "bh1"
    assert s.sections == 4 and s.total_latent_frames == 37 and s.total_frames == 145


@pytest.mark.parametrize("name", sorted(RANGES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "abc", None, True, -1e30, 1e30])
def test_every_number_rejects_non_finite_and_out_of_range(name, bad):
    with pytest.raises(SettingsError, match=name):
        GenerationSettings(**{name: bad})


@pytest.mark.parametrize("name", [n for n, r in RANGES.items() if r.integer])
def test_integer_settings_reject_fractions(name):
    with pytest.raises(SettingsError, match="whole number"):
        GenerationSettings(**{name: RANGES[name].low + 0.5})


def test_numeric_strings_and_whole_floats_are_accepted():
    s = GenerationSettings(seed="42", steps=10.0, seconds="2.5")
    assert s.seed == 42 and isinstance(s.steps, int) and s.seconds == 2.5


def test_choices_and_text_are_checked():
    with pytest.raises(SettingsError, match="model"):
        GenerationSettings(model="sd15")
    with pytest.raises(SettingsError, match="sampler"):
        GenerationSettings(sampler="euler")
    with pytest.raises(SettingsError, match="prompt"):
        GenerationSettings(prompt=3)
    assert GenerationSettings(prompt=None).prompt == ""


def test_round_trip_and_unknown_keys():
    s = GenerationSettings(prompt="a cat", seed=7, model="f1")
    assert GenerationSettings.from_dict(s.to_dict()) == s
    with pytest.raises(SettingsError, match="Unknown setting"):
        GenerationSettings.from_dict({"prompt": "x", "cfg_scale": 3})


def test_model_sources():
    src = ModelSources()
    assert src.transformer("framepack") == "lllyasviel/FramePackI2V_HY"
    assert src.transformer("f1") == "lllyasviel/FramePack_F1_I2V_HY_20250503"
    local = src.with_transformer("f1", "/models/f1")
    assert local.transformer("f1") == "/models/f1" and local.transformer("framepack") == src.transformer("framepack")
    with pytest.raises(SettingsError):
        src.transformer("nope")
