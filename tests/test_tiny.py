"""The tiny models: official layouts, randomness, determinism, tokenizers, and that each runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper import tiny
from diffusers_helper.settings import ModelSources

OFFICIAL_FILES = {
    "hunyuan/text_encoder": ["config.json", "model.safetensors"],
    "hunyuan/text_encoder_2": ["config.json", "model.safetensors"],
    "hunyuan/tokenizer": ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
    "hunyuan/tokenizer_2": ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"],
    "hunyuan/vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "siglip/feature_extractor": ["preprocessor_config.json"],
    "siglip/image_encoder": ["config.json", "model.safetensors"],
    "framepack": ["config.json", "diffusion_pytorch_model.safetensors.index.json"],
    "f1": ["config.json", "diffusion_pytorch_model.safetensors.index.json"],
}

PROMPTS = [
    "A cat walks slowly",
    "The girl dances gracefully, full of charm.",
    "naïve café — 猫が踊る 🐱🎉 \t tabs\nand newlines  ",
    "zzqxj unknownword 1234567 !!??",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "",
]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _llama_raw(tiny_sources: ModelSources):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tiny_sources.hunyuan) / "tokenizer" / "tokenizer.json"))


# --- layout ----------------------------------------------------------------------------------


def test_folders_have_the_official_layout(tiny_root):
    for folder, files in OFFICIAL_FILES.items():
        for name in files:
            assert (tiny_root / folder / name).is_file(), f"{folder}/{name}"
    # Nothing half-written is left behind: every folder arrived by rename.
    assert not [p for p in tiny_root.rglob("*") if ".tmp-" in p.name]


def test_sources_point_at_the_folders(tiny_root, tiny_sources):
    assert Path(tiny_sources.hunyuan) == tiny_root / "hunyuan"
    assert Path(tiny_sources.siglip) == tiny_root / "siglip"
    assert Path(tiny_sources.transformer("framepack")) == tiny_root / "framepack"
    assert Path(tiny_sources.transformer("f1")) == tiny_root / "f1"


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_transformer_config_and_shards_are_official(tiny_root, model):
    folder = tiny_root / model
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "HunyuanVideoTransformer3DModelPacked"
    assert config["has_image_proj"] is True and config["has_clean_x_embedder"] is True
    assert config["image_proj_dim"] == tiny.SIGLIP_HIDDEN
    assert config["text_embed_dim"] == tiny.LLAMA_HIDDEN
    assert config["pooled_projection_dim"] == tiny.CLIP_HIDDEN
    assert sum(config["rope_axes_dim"]) == config["attention_head_dim"]
    assert all(d % 2 == 0 for d in config["rope_axes_dim"])
    assert "image_condition_type" not in config  # the official configs predate that key
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for i, shard in enumerate(shards, start=1):
        assert shard == f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        assert (folder / shard).is_file()
    # Stored in bf16, as the official shards are.
    assert {t.dtype for s in shards for t in load_file(str(folder / s)).values()} == {torch.bfloat16}


def test_refuses_to_overwrite(tiny_root):
    with pytest.raises(tiny.TinyModelsExistError) as info:
        tiny.write_tiny_models(tiny_root)
    # A user mistake: a ValueError for the CLI's one-line error, and still a FileExistsError.
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileExistsError)


# --- weights ---------------------------------------------------------------------------------


def _transformer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_every_transformer_parameter_is_random(tiny_root, model):
    tensors = _transformer_tensors(tiny_root / model)
    assert len(tensors) > 50
    for name, t in tensors.items():
        t = t.float()
        assert t.numel() > 1, name
        assert torch.isfinite(t).all(), name
        assert t.std() > 1e-3, f"{name} is (nearly) constant"
        assert (t == 0).float().mean() < 0.1, f"{name} is mostly zeros"
        assert t.abs().max() < 2.0, f"{name} is not small"


def test_variants_share_architecture_but_not_weights(tiny_root):
    a = _transformer_tensors(tiny_root / "framepack")
    b = _transformer_tensors(tiny_root / "f1")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape
        assert not torch.equal(a[name], b[name]), name


def test_same_seed_same_bytes_other_seed_other_weights(tiny_root, tmp_path):
    again = tiny.write_tiny_models(tmp_path / "again", seed=0)
    assert _digests(tmp_path / "again") == _digests(tiny_root)
    assert again.transformer("f1") == str(tmp_path / "again" / "f1")

    other = tmp_path / "other"
    other.mkdir()
    tiny._write_transformer(other, tiny._derive_seed(1, "framepack"))
    a = _transformer_tensors(tiny_root / "framepack")
    b = _transformer_tensors(other)
    assert not torch.equal(a["proj_out.weight"], b["proj_out.weight"])


# --- tokenizers ------------------------------------------------------------------------------


def test_template_prefix_is_95_tokens(tiny_sources):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    raw = _llama_raw(tiny_sources)
    ids = raw.encode(tiny.prompt_template_prefix()).ids
    assert len(ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    assert ids[0] == raw.token_to_id(tiny.LLAMA_BOS)
    # The prompt starts right after the crop: its tokens are not merged into the template's.
    full = raw.encode(DEFAULT_PROMPT_TEMPLATE["template"].format("A cat walks")).ids
    assert full[:95] == ids


def test_llama_special_tokens_are_single_tokens(tiny_sources):
    raw = _llama_raw(tiny_sources)
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        ids = raw.encode(token, add_special_tokens=False).ids
        assert ids == [raw.token_to_id(token)]


@pytest.mark.parametrize("text", PROMPTS)
def test_llama_tokenizer_encodes_any_text_and_round_trips(tiny_sources, text):
    raw = _llama_raw(tiny_sources)
    encoding = raw.encode(text)
    assert encoding.ids[0] == raw.token_to_id(tiny.LLAMA_BOS)
    assert raw.decode(encoding.ids, skip_special_tokens=False) == tiny.LLAMA_BOS + text


def test_loader_tokenizer_and_autotokenizer_match_tokenizer_json(tiny_sources, tiny_shared):
    from transformers import AutoTokenizer

    raw = _llama_raw(tiny_sources)
    auto = AutoTokenizer.from_pretrained(tiny_sources.hunyuan, subfolder="tokenizer")
    for text in PROMPTS + [tiny.prompt_template_prefix()]:
        expected = raw.encode(text).ids
        assert tiny_shared.tokenizer(text)["input_ids"] == expected, text
        assert auto(text)["input_ids"] == expected, text


def test_llama_tokenizer_pads(tiny_shared):
    tok = tiny_shared.tokenizer
    assert tok.pad_token == tiny.LLAMA_PAD and tok.pad_token_id is not None
    assert tok.padding_side == "right"
    out = tok(["a cat", "a cat walks slowly in the rain"], padding="max_length", max_length=32,
              truncation=True, return_tensors="pt")
    assert out["input_ids"].shape == (2, 32)
    assert out["input_ids"][0, -1] == tok.pad_token_id and out["attention_mask"][0, 0] == 1
    assert out["attention_mask"].sum(1).tolist() == [len(tok("a cat")["input_ids"]),
                                                     len(tok("a cat walks slowly in the rain")["input_ids"])]


def test_clip_tokenizer_pads_to_77_and_survives_unknown_text(tiny_shared):
    tok = tiny_shared.tokenizer_2
    out = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert out["input_ids"].shape == (len(PROMPTS), 77)
    assert (out["input_ids"][:, 0] == tok.bos_token_id).all()
    assert tok.convert_ids_to_tokens(tok("A cat walks")["input_ids"]) == [
        tiny.CLIP_BOS, "a</w>", "cat</w>", "walks</w>", tiny.CLIP_EOS]
    assert tok.decode(tok("Zzqx café 猫")["input_ids"], skip_special_tokens=True) == "zzqx café 猫"
    assert tok("x " * 200, truncation=True, max_length=77)["input_ids"][-1] == tok.eos_token_id


# --- the models run --------------------------------------------------------------------------


def test_llama_text_encoder_runs(tiny_shared):
    encoder, tok = tiny_shared.text_encoder, tiny_shared.tokenizer
    config = encoder.config
    assert config.num_hidden_layers >= 3 and config.max_position_embeddings >= 512
    assert config.hidden_size == tiny.LLAMA_HIDDEN
    assert config.vocab_size >= len(tok)
    inputs = tok(["a cat"], padding="max_length", max_length=351, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**inputs, output_hidden_states=True).hidden_states[-3]
    assert hidden.shape == (1, 351, tiny.LLAMA_HIDDEN)
    assert torch.isfinite(hidden).all() and hidden.std() > 0.01


def test_clip_pooler_reads_the_eos_position(tiny_shared):
    encoder, tok = tiny_shared.text_encoder_2, tiny_shared.tokenizer_2
    assert encoder.config.eos_token_id == tok.eos_token_id
    assert encoder.config.max_position_embeddings == 77
    ids = tok(["a cat walks", "a dog"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = encoder(ids)
    assert out.pooler_output.shape == (2, tiny.CLIP_HIDDEN)
    first_eos = (ids == tok.eos_token_id).int().argmax(-1)
    assert first_eos.tolist() == [4, 3]
    expected = out.last_hidden_state[torch.arange(2), first_eos]
    torch.testing.assert_close(out.pooler_output, expected)


def test_siglip_processor_and_encoder(tiny_shared):
    processor, encoder = tiny_shared.feature_extractor, tiny_shared.image_encoder
    image = np.zeros((50, 70, 3), np.uint8)
    image[:, :35] = 255
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, tiny.SIGLIP_IMAGE_SIZE, tiny.SIGLIP_IMAGE_SIZE)
    # rescale 1/255 then normalise with mean = std = 0.5: white is 1, black is -1.
    assert pixels.max().item() == pytest.approx(1.0) and pixels.min().item() == pytest.approx(-1.0)
    with torch.no_grad():
        hidden = encoder(pixel_values=pixels).last_hidden_state
    patches = (tiny.SIGLIP_IMAGE_SIZE // tiny.SIGLIP_PATCH) ** 2
    assert hidden.shape == (1, patches, tiny.SIGLIP_HIDDEN)
    assert torch.isfinite(hidden).all()


def test_vae_compresses_like_the_real_one(tiny_shared):
    vae = tiny_shared.vae
    assert vae.config.scaling_factor == pytest.approx(0.476986)
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4
    assert vae.config.spatial_compression_ratio == 8 and vae.config.temporal_compression_ratio == 4
    pixels = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
        assert latents.shape == (1, 16, 3, 8, 8)
        decoded = vae.decode(latents).sample
    assert decoded.shape == (1, 3, 9, 64, 64)
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("model", ["framepack", "f1"])
def test_transformer_forward_is_finite_and_not_degenerate(tiny_components, transformer_inputs, model):
    transformer = tiny_components(model).transformer
    with torch.no_grad():
        (out,) = transformer(**transformer_inputs(transformer))
    assert out.shape == (1, 16, 2, 8, 8)
    assert torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 20.0
    # The output depends on the conditioning, not only on the noisy latents.
    inputs = transformer_inputs(transformer)
    inputs["image_embeds"] = inputs["image_embeds"] + 1.0
    with torch.no_grad():
        (other,) = transformer(**inputs)
    assert (other - out).abs().max() > 1e-4


# --- the cache -------------------------------------------------------------------------------


def test_tiny_sources_builds_once_and_reuses(tiny_root, tmp_path, monkeypatch):
    calls = []

    def fake_write(root, seed=0):
        calls.append(root)
        shutil.copytree(tiny_root, root)
        return tiny.sources_at(root)

    monkeypatch.setattr(tiny, "write_tiny_models", fake_write)
    cache = tmp_path / "cache" / "v1"
    first = tiny.tiny_sources(cache)
    second = tiny.tiny_sources(cache)
    assert first == second == tiny.sources_at(cache)
    assert len(calls) == 1
    assert (cache / "framepack" / "config.json").is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["v1"]  # no staging folders left


def test_tiny_sources_tolerates_losing_a_race(tiny_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def racing_write(root, seed=0):
        shutil.copytree(tiny_root, cache)  # another process finishes first
        shutil.copytree(tiny_root, root)
        return tiny.sources_at(root)

    monkeypatch.setattr(tiny, "write_tiny_models", racing_write)
    assert tiny.tiny_sources(cache) == tiny.sources_at(cache)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_tiny_sources_default_cache_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_TINY_CACHE", str(tmp_path / "here"))
    assert tiny.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("FRAMEPACK_TINY_CACHE")
    assert tiny.default_cache_dir().parts[-2:] == ("framepack-tiny", tiny.TINY_VERSION)
