"""LoRAs: each format gives the latents of the merged-weights model, in both memory modes and for both
variants; several at once; weight 0 and no LoRA leave the model untouched; switching between jobs; the
record of a job's LoRAs; and every refusal, from the header, before any work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_helper.events import Finished
from diffusers_helper.loading import Components, component_dtypes, load_transformer
from diffusers_helper.lora import LoraError, LoraManager, inspect_lora, lora_targets, read_weights
from diffusers_helper.memory import Placement, VramMode
from diffusers_helper.offload import module_tensors, streamable_blocks, tensors_bytes
from diffusers_helper.pipeline import generate
from diffusers_helper.settings import GenerationSettings, SettingsError, parse_lora

RANK = 3
# One section of two steps: a job takes about half a second on a CPU.
SMALL = dict(prompt="a cat walks on the grass", seconds=1, window=8, steps=2, resolution=64, seed=11, cache="none")

# HunyuanVideo's layers (as diffusion-pipe and musubi-tuner name them) and ours, in the order of the
# fused layer's output rows: what the tests below write, independently of lora.py's table.
HUNYUAN = {
    "double_blocks.0.img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.txt_attn_qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks.0.img_mod.linear": ["transformer_blocks.0.norm1.linear"],
    "double_blocks.0.txt_mlp.fc1": ["transformer_blocks.0.ff_context.net.0.proj"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "single_blocks.0.modulation.linear": ["single_transformer_blocks.0.norm.linear"],
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": [
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_k",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_v"],
    "txt_in.input_embedder": ["context_embedder.proj_in"],
    "img_in.proj": ["x_embedder.proj"],
    "final_layer.linear": ["proj_out"],
}
# HunyuanVideo's final modulation gives (shift, scale); diffusers' norm_out.linear (scale, shift)
SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}

FORMATS = ("kohya", "peft", "peft-bare", "hunyuan", "musubi-hunyuan")


def _factors(shape, g, rank=RANK):
    down = torch.randn(rank, *shape[1:], generator=g) * 0.2
    up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.2
    return down, up


def _delta(down, up, shape):
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def write_lora(path: Path, transformer, fmt: str, seed: int = 0, text_encoder_keys: int = 0) -> dict:
    """Write a LoRA in `fmt` for `transformer`; returns the change of each of our layers' weight (scale included)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in lora_targets(transformer).items()}
    sd, deltas = {}, {}
    if fmt in ("kohya", "peft", "peft-bare"):
        alpha = {"kohya": RANK / 2, "peft": None, "peft-bare": RANK * 1.5}[fmt]
        scale = alpha / RANK if alpha else 1.0
        for name, shape in shapes.items():
            down, up = _factors(shape, g)
            key = {"kohya": f"lora_unet_{name.replace('.', '_')}", "peft": f"transformer.{name}", "peft-bare": name}[fmt]
            parts = ("lora_down", "lora_up") if fmt == "kohya" else ("lora_A", "lora_B")
            sd[f"{key}.{parts[0]}.weight"], sd[f"{key}.{parts[1]}.weight"] = down, up
            if alpha:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
            deltas[name] = scale * _delta(down, up, shape)
    else:
        kohya = fmt == "musubi-hunyuan"
        scale = 0.5 if kohya else 1.0
        for theirs, ours in {**HUNYUAN, **{k: [v] for k, v in SWAPPED.items()}}.items():
            down, _ = _factors(shapes[ours[0]], g)
            ups = [_factors(shapes[name], g)[1] for name in ours]
            for name, up in zip(ours, ups):
                deltas[name] = scale * _delta(down, up, shapes[name])
            up = torch.cat(ups)
            if theirs in SWAPPED:
                half = up.shape[0] // 2
                up = torch.cat([up[half:], up[:half]])
            if kohya:
                key = f"lora_unet_{theirs.replace('.', '_')}"
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                sd[f"{key}.alpha"] = torch.tensor(RANK * scale)
            else:
                sd[f"diffusion_model.{theirs}.lora_A.weight"], sd[f"diffusion_model.{theirs}.lora_B.weight"] = down, up
    for i in range(text_encoder_keys):
        sd[f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight"] = torch.randn(RANK, 8, generator=g)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return deltas


def merged(source, *weighted: tuple[dict, float]):
    """The transformer of `source` (a folder, or a loaded one to copy) with each LoRA's change merged into its
    weights: W + Σ weight·Δ."""
    transformer = load_transformer(source, "cpu") if isinstance(source, str) else copy.deepcopy(source)
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for deltas, weight in weighted:
            for name, delta in deltas.items():
                modules[name].weight += weight * delta
    return transformer


def tight(transformer) -> int:
    """Free 'device' memory that makes the low mode stream blocks: the fixed part and a ring of two blocks."""
    blocks = streamable_blocks(transformer)
    sizes = [tensors_bytes(module_tensors(b)) for b in blocks]
    return tensors_bytes(module_tensors(transformer)) - sum(sizes) + 2 * max(sizes)


def run(shared, transformer, model, image, out: Path, mode: str = "high", **changes) -> torch.Tensor:
    """Run a small job with `transformer` and return its latents."""
    settings = GenerationSettings(**{**SMALL, "model": model, **changes})
    components = Components(shared=shared, transformer=transformer, model=model, device=torch.device("cpu"),
                            dtypes=component_dtypes("cpu"))
    placement = Placement(torch.device("cpu"), VramMode.HIGH)
    if mode == "low":
        placement = Placement(torch.device("cpu"), VramMode.LOW, available=lambda: tight(transformer))
    events = list(generate(components, settings, image, out, placement=placement, save_latents=out.with_suffix(".st")))
    assert isinstance(events[-1], Finished), events[-1]
    if mode == "low":
        assert placement.stats.streamed_loads > 0  # the blocks (and their LoRA layers) went through the ring
    return load_file(str(out.with_suffix(".st")))["history_latents"]


class Reference:
    """Per variant, built when first asked for: a private transformer, the latents without LoRA, and per
    format a LoRA file with the latents of the model with its changes merged into the weights."""

    def __init__(self, sources, shared, image, folder: Path):
        self.sources, self.shared, self.image, self.folder = sources, shared, image, folder
        self._models: dict = {}
        self._formats: dict = {}
        self._outputs: dict = {}

    def model(self, model: str) -> dict:
        if model not in self._models:
            source = self.sources.transformer(model)
            transformer = load_transformer(source, "cpu")
            base = run(self.shared, transformer, model, self.image, self.folder / f"{model}-base.mp4")
            self._models[model] = {"transformer": transformer, "source": source, "base": base}
        return self._models[model]

    def lora(self, model: str, fmt: str, with_latents: bool = True) -> tuple[Path, dict, torch.Tensor | None]:
        entry = self.model(model)
        if (model, fmt) not in self._formats:
            path = self.folder / f"{model}-{fmt}.safetensors"
            deltas = write_lora(path, entry["transformer"], fmt, seed=FORMATS.index(fmt))
            self._formats[model, fmt] = [path, deltas, None]
        found = self._formats[model, fmt]
        if with_latents and found[2] is None:
            found[2] = run(self.shared, merged(entry["source"], (found[1], 0.8)), model, self.image,
                           self.folder / f"{model}-{fmt}-merged.mp4")
        return tuple(found)

    def merged_output(self, model: str, fmt: str, inputs: dict) -> torch.Tensor:
        """One call of the merged-weights transformer on `inputs` (the same inputs every time)."""
        if (model, fmt) not in self._outputs:
            entry, (_, deltas, _) = self.model(model), self.lora(model, fmt, with_latents=False)
            assert not any(hasattr(m, "base_layer") for m in entry["transformer"].modules())  # copied without LoRA
            self._outputs[model, fmt] = merged(entry["transformer"], (deltas, 0.8))(**inputs)[0]
        return self._outputs[model, fmt]


@pytest.fixture(scope="module")
def reference(tiny_sources, tiny_shared, image, tmp_path_factory):
    return Reference(tiny_sources, tiny_shared, image, tmp_path_factory.mktemp("lora-reference"))


# ---------------------------------------------------------------------------------------------
# The result: the merged-weights model's


@pytest.mark.parametrize("mode", ["high", "low"])
@pytest.mark.parametrize("model", ["framepack", "f1"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_changes_the_transformer_as_merging_would(reference, transformer_inputs, fmt, model, mode):
    """One transformer call with the LoRA equals the merged-weights model's, resident or streamed."""
    entry = reference.model(model)
    path, deltas, _ = reference.lora(model, fmt, with_latents=False)
    transformer, manager = entry["transformer"], LoraManager()
    inputs = transformer_inputs(transformer)
    expected = reference.merged_output(model, fmt, inputs)
    placement = Placement(torch.device("cpu"), VramMode.HIGH)
    if mode == "low":
        placement = Placement(torch.device("cpu"), VramMode.LOW, available=lambda: tight(transformer))
    try:
        manager.apply(transformer, [(str(path), 0.8)], torch.float32)
        assert not any(p.requires_grad for p in transformer.parameters())  # inference only: no autograd graph
        with placement.use(transformer):
            out = transformer(**inputs)[0]
        assert not out.requires_grad
    finally:
        manager.apply(transformer, [], torch.float32)
    assert mode == "high" or placement.stats.streamed_loads > 0
    assert (out - transformer(**inputs)[0]).abs().max() > 1e-2  # the LoRA changes the result
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _latents_with(reference, tiny_shared, image, out, model, fmt, mode):
    entry = reference.model(model)
    path, _, expected = reference.lora(model, fmt)
    manager = LoraManager()
    try:
        manager.apply(entry["transformer"], [(str(path), 0.8)], torch.float32)
        latents = run(tiny_shared, entry["transformer"], model, image, out, mode)
    finally:
        manager.apply(entry["transformer"], [], torch.float32)
    assert (latents - entry["base"]).abs().max() > 1e-2  # the LoRA changes the video
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


# (the quick run checks one call of each above, and whole jobs with two LoRAs and in an app session below)
@pytest.mark.slow  # every format, variant and memory mode: 20 jobs and their references (about 40 s)
@pytest.mark.parametrize("mode", ["high", "low"])
@pytest.mark.parametrize("model", ["framepack", "f1"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_merged_weights_latents(reference, tiny_shared, image, tmp_path, fmt, model, mode):
    _latents_with(reference, tiny_shared, image, tmp_path / "lora.mp4", model, fmt, mode)


def test_two_loras_at_once_add_their_weighted_changes(reference, tiny_shared, image, tmp_path):
    entry = reference.model("framepack")
    (a, da, _), (b, db, _) = (reference.lora("framepack", fmt, with_latents=False) for fmt in ("kohya", "hunyuan"))
    expected = run(tiny_shared, merged(entry["source"], (da, 0.6), (db, -1.3)), "framepack", image, tmp_path / "m.mp4")
    manager = LoraManager()
    try:
        manager.apply(entry["transformer"], [(str(a), 0.6), (str(b), -1.3)], torch.float32)
        latents = run(tiny_shared, entry["transformer"], "framepack", image, tmp_path / "l.mp4")
    finally:
        manager.apply(entry["transformer"], [], torch.float32)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


def test_weight_zero_and_no_lora_leave_the_model_as_loaded(reference, tiny_shared, image, tmp_path):
    entry = reference.model("framepack")
    transformer = entry["transformer"]
    before = {name: (type(m), ) for name, m in transformer.named_modules()}
    tensors = {name: t.data_ptr() for name, t in transformer.state_dict().items()}
    manager = LoraManager()
    path = reference.lora("framepack", "peft", with_latents=False)[0]
    manager.apply(transformer, [(str(path), 0.0)], torch.float32)
    assert {name: (type(m), ) for name, m in transformer.named_modules()} == before  # nothing added
    assert torch.equal(run(tiny_shared, transformer, "framepack", image, tmp_path / "zero.mp4"), entry["base"])
    manager.apply(transformer, [(str(path), 1.0)], torch.float32)
    manager.apply(transformer, [], torch.float32)
    assert {name: (type(m), ) for name, m in transformer.named_modules()} == before  # the PEFT layers are gone
    assert {name: t.data_ptr() for name, t in transformer.state_dict().items()} == tensors  # base weights untouched
    assert torch.equal(run(tiny_shared, transformer, "framepack", image, tmp_path / "none.mp4"), entry["base"])


def test_the_factors_are_shared_not_copied_for_fused_layers(reference):
    """A fused layer's down factor is read once for the layers it covers."""
    entry = reference.model("framepack")
    path = reference.lora("framepack", "hunyuan", with_latents=False)[0]
    targets = lora_targets(entry["transformer"])
    state = read_weights(inspect_lora(path, targets), targets, torch.float32)
    q, k = (state[f"transformer_blocks.0.attn.{x}.lora_A.weight"] for x in ("to_q", "to_k"))
    assert q.data_ptr() == k.data_ptr()


# ---------------------------------------------------------------------------------------------
# Formats and refusals, from the header


@pytest.mark.parametrize("fmt, name", [("kohya", "musubi-tuner/kohya"), ("peft", "diffusers/PEFT"),
                                       ("peft-bare", "diffusers/PEFT"),
                                       ("hunyuan", "diffusers/PEFT with HunyuanVideo's layer names"),
                                       ("musubi-hunyuan", "musubi-tuner/kohya with HunyuanVideo's layer names")])
def test_formats_are_told_apart_by_their_keys(reference, tmp_path, fmt, name):
    entry = reference.model("f1")
    path, deltas, _ = reference.lora("f1", fmt, with_latents=False)
    renamed = tmp_path / "no-hint-in-the-name.bin"
    renamed.write_bytes(path.read_bytes())
    plan = inspect_lora(renamed, lora_targets(entry["transformer"]))
    assert plan.format == name
    assert plan.layers == len(deltas)


def test_text_encoder_keys_are_skipped_with_a_notice(reference, tmp_path):
    transformer = reference.model("framepack")["transformer"]
    path = tmp_path / "with-te.safetensors"
    write_lora(path, transformer, "kohya", text_encoder_keys=5)
    plan = inspect_lora(path, lora_targets(transformer))
    assert plan.skipped == 5
    assert "5 text-encoder keys skipped" in plan.notice() and "with-te.safetensors" in plan.notice()
    only_te = tmp_path / "te-only.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}, str(only_te))
    with pytest.raises(LoraError, match="te-only.safetensors holds no weights for the FramePack transformer"):
        inspect_lora(only_te, lora_targets(transformer))


def _refused(path, transformer) -> str:
    with pytest.raises(LoraError) as caught:
        LoraManager().check([(str(path), 1.0)], lora_targets(transformer))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and Path(path).name in message, message
    return message


def test_refusals_name_the_file_and_the_first_bad_key(reference, tmp_path):
    transformer = reference.model("framepack")["transformer"]
    q = "transformer.transformer_blocks.0.attn.to_q"
    a, b = torch.zeros(RANK, 32), torch.zeros(32, RANK)

    def lora(name, tensors):
        path = tmp_path / name
        save_file(tensors, str(path))
        return path

    missing = tmp_path / "gone.safetensors"
    assert "not found" in _refused(missing, transformer)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    assert "is not a safetensors file" in _refused(garbage, transformer)
    message = _refused(lora("wan.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
                                                "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b}), transformer)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight maps to no layer" in message
    message = _refused(lora("shape.safetensors", {f"{q}.lora_A.weight": torch.zeros(RANK, 48),
                                                  f"{q}.lora_B.weight": b}), transformer)
    assert f"{q}.lora_A.weight has shape (3, 48)" in message and "(3, 32)" in message
    message = _refused(lora("up.safetensors", {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": torch.zeros(16, RANK)}),
                       transformer)
    assert f"{q}.lora_B.weight has shape (16, 3)" in message and "(32, 3)" in message
    message = _refused(lora("rank.safetensors", {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": torch.zeros(32, 2)}),
                       transformer)
    assert "lora_B.weight has shape (32, 2)" in message
    assert f"{q}.lora_A.weight has no matching up" in _refused(lora("half.safetensors", {f"{q}.lora_A.weight": a}),
                                                               transformer)
    assert "has shape (0, 32)" in _refused(lora("rank0.safetensors", {f"{q}.lora_A.weight": torch.zeros(0, 32),
                                                                      f"{q}.lora_B.weight": torch.zeros(32, 0)}),
                                           transformer)
    message = _refused(lora("dora.safetensors", {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b,
                                                 f"{q}.dora_scale": torch.zeros(32)}), transformer)
    assert f"{q}.dora_scale is not a LoRA weight FramePack can apply" in message
    message = _refused(lora("twice.safetensors", {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b,
                                                  "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": a.clone(),
                                                  "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": b.clone()}),
                       transformer)
    assert "a second time" in message or "changes already" in message


def test_every_file_is_checked_before_the_model_changes(reference, tmp_path):
    entry = reference.model("framepack")
    transformer = entry["transformer"]
    types = [type(m) for m in transformer.modules()]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraError, match="bad.safetensors"):
        LoraManager().apply(transformer, [(str(reference.lora("framepack", "kohya", False)[0]), 1.0), (str(bad), 1.0)],
                            torch.float32)
    assert [type(m) for m in transformer.modules()] == types


def test_hunyuan_names_match_diffusers_conversion_at_full_size(tmp_path):
    """Our mapping of HunyuanVideo's layer names, checked against diffusers' own conversion (full-size shapes)
    for every layer where diffusers' conversion is right (it splits the final modulation's down factor)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    from diffusers_helper.lora import Target, hunyuan_names
    from diffusers_helper.single_file import OFFICIAL_TRANSFORMER_CONFIG

    with torch.device("meta"):
        meta = HunyuanVideoFramepackTransformer3DModel(**OFFICIAL_TRANSFORMER_CONFIG)
    targets = {n: Target(t.shape, torch.float32, torch.device("cpu")) for n, t in lora_targets(meta).items()}
    names = hunyuan_names(targets)
    g = torch.Generator().manual_seed(0)
    layers = ["double_blocks.19.img_attn_qkv", "double_blocks.3.txt_attn_qkv", "double_blocks.0.img_mod.linear",
              "double_blocks.7.txt_mod.linear", "double_blocks.1.img_attn_proj", "double_blocks.2.txt_mlp.fc2",
              "single_blocks.39.linear1", "single_blocks.5.linear2", "single_blocks.0.modulation.linear",
              "final_layer.linear", "img_in.proj", "txt_in.input_embedder", "guidance_in.mlp.0", "vector_in.in_layer",
              "time_in.mlp.2", "txt_in.individual_token_refiner.blocks.1.mlp.fc1", "final_layer.adaLN_modulation.1"]
    sd = {}
    for layer in layers:
        pieces = names[layer]
        rows = sum(stop - start for p in pieces for start, stop in p.rows)
        sd[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(2, *pieces[0].shape[1:], generator=g)
        sd[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(rows, 2, *([1] * (len(pieces[0].shape) - 2)),
                                                                   generator=g)
    path = tmp_path / "full.safetensors"
    save_file(sd, str(path))
    ours = read_weights(inspect_lora(path, targets), targets, torch.float32)
    theirs = {k.removeprefix("transformer."): v for k, v in _convert_hunyuan_video_lora_to_diffusers(dict(sd)).items()}
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if key == "norm_out.linear.lora_A.weight":
            continue  # diffusers swaps the rank halves of the shared down factor too; that changes the product
        assert torch.equal(value, theirs[key]), key
    # the product, which is what counts: ours equals (shift, scale) -> (scale, shift) of the full change
    full = sd["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"] @ \
        sd["diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight"]
    half = full.shape[0] // 2
    product = ours["norm_out.linear.lora_B.weight"] @ ours["norm_out.linear.lora_A.weight"]
    assert torch.allclose(product, torch.cat([full[half:], full[:half]]))


def test_alpha_from_diffusers_adapter_metadata(reference, tmp_path):
    transformer = reference.model("framepack")["transformer"]
    targets = lora_targets(transformer)
    name = "transformer_blocks.0.attn.to_q"
    a, b = torch.ones(2, 32), torch.ones(32, 2)
    path = tmp_path / "meta.safetensors"
    save_file({f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b}, str(path),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 1})})
    state = read_weights(inspect_lora(path, targets), targets, torch.float32)
    assert torch.equal(state[f"{name}.lora_B.weight"], b * 0.5)  # alpha 1 / rank 2


# ---------------------------------------------------------------------------------------------
# The flag and the setting


def test_lora_flag_reads_a_weight_after_the_last_colon_only_when_it_is_a_number():
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert parse_lora("style.safetensors:-1.5") == ("style.safetensors", -1.5)
    assert parse_lora(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert parse_lora(r"C:\loras\style.safetensors:2") == (r"C:\loras\style.safetensors", 2.0)
    assert parse_lora("/data/a:b/style.safetensors") == ("/data/a:b/style.safetensors", 1.0)


def test_lora_settings_are_checked():
    s = GenerationSettings(loras=["a.safetensors:0.5", ("b.safetensors", 1)])
    assert s.loras == (("a.safetensors", 0.5), ("b.safetensors", 1.0))
    assert GenerationSettings.from_dict(json.loads(json.dumps(s.to_dict()))).loras == s.loras
    with pytest.raises(SettingsError, match="weight of LoRA a.safetensors must be between -2.0 and 2.0"):
        GenerationSettings(loras=["a.safetensors:2.5"])
    with pytest.raises(SettingsError, match="finite"):
        GenerationSettings(loras=["a.safetensors:nan"])
    with pytest.raises(SettingsError, match="listed twice"):
        GenerationSettings(loras=["a.safetensors:1", "./a.safetensors:0.5"])


def test_a_lora_on_fp8_weights_keeps_its_factors_in_the_compute_dtype(reference, transformer_inputs):
    """With the transformer's weights stored in fp8 (fp8.py), the LoRA is added in full precision beside them."""
    from diffusers_helper.fp8 import apply_fp8

    entry = reference.model("framepack")
    path, deltas, _ = reference.lora("framepack", "kohya", with_latents=False)
    stored = copy.deepcopy(entry["transformer"])
    apply_fp8(stored)
    expected_model = copy.deepcopy(stored)
    apply_fp8_handle = getattr(expected_model, "_framepack_fp8")
    apply_fp8_handle.remove()  # the fp8 values, back in fp32: what the stored model computes with
    inputs = transformer_inputs(stored)
    expected = merged(expected_model, (deltas, 0.8))(**inputs)[0]
    LoraManager().apply(stored, [(str(path), 0.8)], torch.float32)
    factors = [p for n, p in stored.named_parameters() if ".lora_" in n]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    torch.testing.assert_close(stored(**inputs)[0], expected, rtol=1e-5, atol=1e-5)
