"""The step cache as one choice (`cache`: none, teacache, magcache) in the settings, on the command line and on
the page; the old yes/no `teacache` still read from records, flags and API clients; the speed settings' checks."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_helper.app.ui import CACHE_LABELS, FORM_FIELDS, SPEED_FIELDS, AppConfig, Page, settings_from_form
from diffusers_helper.events import Finished
from diffusers_helper.options import OneLineParser, add_settings_arguments, settings_from_args
from diffusers_helper.pipeline import generate
from diffusers_helper.settings import CACHE_CHOICES, GenerationSettings, SettingsError


def _parse(*argv):
    parser = OneLineParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(["--prompt", "x", *argv]))


def test_teacache_flags_are_aliases_of_cache():
    assert _parse().cache == "teacache" == GenerationSettings().cache
    assert _parse("--no-teacache") == _parse("--cache", "none")
    assert _parse("--teacache") == _parse("--cache", "teacache") == _parse()
    assert _parse("--cache", "magcache").cache == "magcache"
    assert _parse("--cache", "none").teacache is False and _parse().teacache is True


def test_cache_refuses_other_values_on_one_line(cli_error):
    err = cli_error(["generate", "--image", "x.png", "--prompt", "x", "--output", "o.mp4", "--cache", "fast"])
    assert "--cache" in err and "magcache" in err


@pytest.mark.parametrize("old, new", [(True, "teacache"), (False, "none")])
def test_old_records_and_api_clients_with_yes_no_teacache_still_work(old, new):
    record = GenerationSettings(seed=5).to_dict()
    del record["cache"]
    record["teacache"] = old
    assert GenerationSettings.from_dict(record) == GenerationSettings(seed=5, cache=new)
    assert GenerationSettings().replace(teacache=old).cache == new
    # a client of the page's API that still sends the old checkbox's true/false in the cache slot
    assert settings_from_form({"prompt": "", "cache": old}).cache == new
    with pytest.raises(SettingsError, match="teacache must be true or false"):
        GenerationSettings.from_dict({"teacache": "maybe"})


def test_speed_settings_are_checked():
    with pytest.raises(SettingsError, match="cache must be one of none, teacache, magcache"):
        GenerationSettings(cache="fast")
    with pytest.raises(SettingsError, match="needs cache magcache"):
        GenerationSettings(magcache_calibrate=True)
    with pytest.raises(SettingsError, match="at least 2 steps"):
        GenerationSettings(cache="magcache", magcache_calibrate=True, steps=1)
    with pytest.raises(SettingsError, match="magcache_threshold must be between 0.0 and 1.0"):
        GenerationSettings(magcache_threshold=2)
    with pytest.raises(SettingsError, match="above 0"):
        GenerationSettings(magcache_ratios=(1.0, 0.0))
    with pytest.raises(SettingsError, match="fp8 must be true or false"):
        GenerationSettings(fp8="yes")
    # a record's lists come back as the tuple the settings hold
    s = GenerationSettings(cache="magcache", magcache_ratios=[1, 1.5])
    assert s.magcache_ratios == (1.0, 1.5)
    assert GenerationSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_a_ratios_file_that_is_not_one_is_a_one_line_error(cli_error, tmp_path):
    (tmp_path / "r.json").write_text("{}")
    err = cli_error(["generate", "--image", "x.png", "--prompt", "x", "--output", "o.mp4", "--cache", "magcache",
                     "--magcache-ratios", str(tmp_path / "r.json")])
    assert "not a MagCache ratios file" in err


def test_cache_none_runs_the_plain_transformer(tiny_components, image, tmp_path, fast):
    """--cache none and --no-teacache are one setting, and its jobs run with no hook on any block."""
    c = tiny_components("f1")
    settings = fast.replace(model="f1", steps=2, seconds=1.0, window=6, cache="none")
    assert settings == _parse("--no-teacache").replace(**{k: v for k, v in settings.to_dict().items() if k != "cache"})
    hooked = []
    blocks = [*c.transformer.transformer_blocks, *c.transformer.single_transformer_blocks]
    handles = [b.register_forward_pre_hook(lambda m, a: hooked.append(hasattr(m, "_diffusers_hook"))) for b in blocks]
    try:
        events = list(generate(c, settings, image, tmp_path / "a.mp4", save_latents=tmp_path / "a.st"))
    finally:
        for h in handles:
            h.remove()
    assert isinstance(events[-1], Finished) and hooked and not any(hooked)
    again = list(generate(c, settings, image, tmp_path / "b.mp4", save_latents=tmp_path / "b.st"))
    assert isinstance(again[-1], Finished)
    assert torch.equal(load_file(tmp_path / "a.st")["history_latents"], load_file(tmp_path / "b.st")["history_latents"])


def test_page_offers_the_choice_where_the_checkbox_was(tmp_path, tiny_sources):
    # the API's inputs keep their order: `cache` takes `teacache`'s place, the new settings come last
    assert FORM_FIELDS[8] == "cache" and "teacache" not in FORM_FIELDS
    start = FORM_FIELDS.index(SPEED_FIELDS[0])  # after the older fields (later features append after them)
    assert FORM_FIELDS[start:start + len(SPEED_FIELDS)] == SPEED_FIELDS and start > FORM_FIELDS.index("sampler")
    assert [value for _, value in CACHE_LABELS] == list(CACHE_CHOICES)
    folder = tmp_path / "outputs"
    folder.mkdir()
    old = GenerationSettings(seed=9).to_dict()
    del old["cache"]
    old["teacache"] = False
    (folder / "job.json").write_text(json.dumps({"settings": old, "model": "framepack", "status": "finished"}))
    Image.new("RGB", (64, 48)).save(folder / "job.png")
    (folder / "job.mp4").write_bytes(b"mp4")
    page = Page(AppConfig(outputs=folder, sources=tiny_sources, device="cpu"))
    try:
        _, *values = page.load_past("job")
    finally:
        page.jobs.close()
        page.snapshots.close()
    loaded = dict(zip(FORM_FIELDS, values))
    assert loaded["cache"] == "none" and loaded["seed"] == 9 and loaded["fp8"] is False


@pytest.mark.slow
def test_the_speed_modules_import_alone_without_touching_cuda():
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch
def touched(*args, **kwargs):
    raise AssertionError("CUDA was initialised at import")
torch.cuda._lazy_init = touched
torch.cuda.init = touched
import importlib, sys
importlib.import_module(sys.argv[1])
print("ok")
"""
    for name in ("caches", "magcache", "fp8", "compiled", "bench.fp8_error"):
        out = subprocess.run([sys.executable, "-c", code, f"diffusers_helper.{name}"], capture_output=True, text=True,
                             timeout=300, cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0 and out.stdout.strip() == "ok", (name, out.stderr[-2000:])
