"""Model files people already have: a FramePack transformer as one .safetensors file (bf16, fp8), the
HunyuanVideo VAE as one file, a tokenizer saved by transformers 5 (tokenizer.json only), a Hugging Face
cache; each loads and gives the same latents as the official folder layout, or is refused with a message
that says what is wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_helper import loading
from diffusers_helper.events import Finished
from diffusers_helper.loading import Components, SourceError, check_sources, component_dtypes, load_shared, load_transformer
from diffusers_helper.pipeline import generate
from diffusers_helper.settings import GenerationSettings, ModelSources
from diffusers_helper.single_file import CONFIG_KEY, OFFICIAL_TRANSFORMER_CONFIG

JOB = GenerationSettings(prompt="a bird flies over the sea", seconds=1, window=8, steps=2, resolution=64, seed=5,
                         cache="none")
# Kept in 16 bits in ComfyUI's fp8 files: norms, biases and the embedders.
KEEP_16 = ("norm", "bias", "x_embedder", "context_embedder", "time_text_embed", "image_projection")


def _config(model) -> str:
    return json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")})


def write_single_file(path: Path, model, dtype, prefix: str = "", keep_16: tuple = (), config: bool = True) -> dict:
    """`model`'s tensors as one file in `dtype` (some kept in bf16), as ComfyUI users have them; returns the
    tensors the file holds (without the prefix)."""
    values = {}
    for name, t in model.state_dict().items():
        values[name] = t.to(torch.bfloat16 if any(k in name for k in keep_16) else dtype).contiguous()
    save_file({prefix + k: v for k, v in values.items()}, str(path),
              metadata={CONFIG_KEY: _config(model)} if config else None)
    return values


def _latents(shared, transformer, image, out: Path) -> torch.Tensor:
    components = Components(shared=shared, transformer=transformer, model="framepack", device=torch.device("cpu"),
                            dtypes=component_dtypes("cpu"))
    events = list(generate(components, JOB, image, out, save_latents=out.with_suffix(".st")))
    assert isinstance(events[-1], Finished), events[-1]
    return load_file(str(out.with_suffix(".st")))["history_latents"]


def _folder_with(values: dict, like: str, folder: Path) -> str:
    """The official folder layout (config.json and the diffusers weights file) holding `values` as they are."""
    folder.mkdir()
    shutil.copy(Path(like) / "config.json", folder / "config.json")
    save_file(values, str(folder / "diffusion_pytorch_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("dtype, prefix, keep", [(torch.bfloat16, "", ()),
                                                 (torch.float8_e4m3fn, "model.diffusion_model.", KEEP_16)])
def test_single_file_transformer_gives_the_folder_layouts_latents(tiny_sources, tiny_shared, image, tmp_path,
                                                                  dtype, prefix, keep):
    source = tiny_sources.transformer("framepack")
    path = tmp_path / "FramePackI2V_HY.safetensors"
    values = write_single_file(path, load_transformer(source, "cpu"), dtype, prefix, keep)
    check_sources(tiny_sources.with_transformer("framepack", str(path)), "framepack")
    from_file = load_transformer(str(path), "cpu")
    assert all(p.dtype == torch.float32 for p in from_file.parameters())  # upcast to the compute dtype at load
    folder = _folder_with(values, source, tmp_path / "folder")
    expected = _latents(tiny_shared, load_transformer(folder, "cpu"), image, tmp_path / "folder.mp4")
    assert torch.equal(_latents(tiny_shared, from_file, image, tmp_path / "file.mp4"), expected)


def test_fp8_e5m2_and_fp16_files_hold_the_same_weights_as_their_folders(tiny_sources, tmp_path):
    source = tiny_sources.transformer("f1")
    model = load_transformer(source, "cpu")
    for dtype in (torch.float8_e5m2, torch.float16):
        path = tmp_path / f"f1-{dtype}.safetensors"
        values = write_single_file(path, model, dtype, keep_16=KEEP_16)
        loaded = load_transformer(str(path), "cpu").state_dict()
        assert all(torch.equal(loaded[k], v.float()) for k, v in values.items())


def test_a_16_bit_file_in_the_compute_dtype_stays_memory_mapped(tiny_sources, tmp_path):
    path = tmp_path / "bf16.safetensors"
    write_single_file(path, load_transformer(tiny_sources.transformer("framepack"), "cpu"), torch.bfloat16)
    model = load_transformer(str(path), "cpu", dtype=torch.bfloat16)
    mapped = load_file(str(path))
    # the file's own storage: assigning the file's tensors made no copy (proj_out alone is made fp32)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert torch.equal(model.transformer_blocks[0].attn.to_q.weight, mapped["transformer_blocks.0.attn.to_q.weight"])


def test_single_file_vae_and_a_tokenizer_saved_by_transformers_5(tiny_sources, tiny_shared, tiny_components, image,
                                                                 tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTokenizer

    hunyuan = tmp_path / "hunyuan"
    shutil.copytree(tiny_sources.hunyuan, hunyuan, ignore=shutil.ignore_patterns("vae"))
    shutil.rmtree(hunyuan / "tokenizer_2")
    CLIPTokenizer.from_pretrained(Path(tiny_sources.hunyuan) / "tokenizer_2").save_pretrained(hunyuan / "tokenizer_2")
    for old in ("vocab.json", "merges.txt"):
        (hunyuan / "tokenizer_2" / old).unlink(missing_ok=True)
    assert (hunyuan / "tokenizer_2" / "tokenizer.json").is_file()
    vae = AutoencoderKLHunyuanVideo.from_pretrained(Path(tiny_sources.hunyuan) / "vae")
    vae_file = tmp_path / "hunyuan_video_vae_bf16.safetensors"
    write_single_file(vae_file, vae, torch.float32, prefix="vae.")

    sources = dataclasses.replace(tiny_sources, hunyuan=str(hunyuan), vae=str(vae_file))
    check_sources(sources, "framepack")
    shared = load_shared(sources, "cpu")
    assert shared.tokenizer_2("a cat walks").input_ids == tiny_shared.tokenizer_2("a cat walks").input_ids
    transformer = tiny_components("framepack").transformer
    expected = _latents(tiny_shared, transformer, image, tmp_path / "folder.mp4")
    assert torch.equal(_latents(shared, transformer, image, tmp_path / "files.mp4"), expected)

    # without the VAE file, the folder's missing vae/ is named
    with pytest.raises(SourceError, match="vae/"):
        check_sources(dataclasses.replace(sources, vae=None), "framepack")


def test_tokenizer_check_names_both_layouts_when_neither_is_there(tiny_sources, tmp_path):
    hunyuan = tmp_path / "hunyuan"
    shutil.copytree(tiny_sources.hunyuan, hunyuan)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (hunyuan / "tokenizer_2" / name).unlink(missing_ok=True)
    with pytest.raises(SourceError) as caught:
        check_sources(dataclasses.replace(tiny_sources, hunyuan=str(hunyuan)), None)
    assert "tokenizer_2/tokenizer.json or tokenizer_2/vocab.json and tokenizer_2/merges.txt" in str(caught.value)


def test_refusals_of_single_files_say_what_is_wrong(tiny_sources, tmp_path):
    model = load_transformer(tiny_sources.transformer("framepack"), "cpu")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x89PNG not a model")
    with pytest.raises(SourceError, match="model.safetensors is not a safetensors file"):
        check_sources(tiny_sources.with_transformer("framepack", str(garbage)), "framepack")
    with pytest.raises(SourceError, match="no such file"):
        check_sources(tiny_sources.with_transformer("framepack", str(tmp_path / "gone.safetensors")), "framepack")
    with pytest.raises(SourceError, match="must be a folder"):
        check_sources(dataclasses.replace(tiny_sources, hunyuan=str(garbage)), None)

    # the official configuration is assumed without metadata: a file of another size says so
    other_size = tmp_path / "tiny-without-config.safetensors"
    write_single_file(other_size, model, torch.bfloat16, config=False)
    with pytest.raises(SourceError, match="another size|lacks"):
        load_transformer(str(other_size), "cpu")

    scaled = tmp_path / "scaled.safetensors"
    values = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}
    values["transformer_blocks.0.attn.to_q.scale_weight"] = torch.ones(1)
    save_file(values, str(scaled), metadata={CONFIG_KEY: _config(model)})
    with pytest.raises(SourceError, match="scaled-fp8"):
        load_transformer(str(scaled), "cpu")

    hunyuan_names = tmp_path / "hunyuan-video.safetensors"
    save_file({"double_blocks.0.img_attn_qkv.weight": torch.zeros(96, 32)}, str(hunyuan_names),
              metadata={CONFIG_KEY: _config(model)})
    with pytest.raises(SourceError, match="named as in HunyuanVideo's original code"):
        load_transformer(str(hunyuan_names), "cpu")


def test_the_official_configuration_is_the_released_checkpoints():
    from diffusers_helper.bench.weights import FULL

    assert dict(OFFICIAL_TRANSFORMER_CONFIG) == FULL["transformer"]


def test_a_hub_cache_with_a_tokenizer_saved_by_transformers_5_is_found_offline(tiny_sources, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import CLIPTokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--hunyuan"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_sources.hunyuan, snapshot)
    shutil.rmtree(snapshot / "tokenizer_2")
    CLIPTokenizer.from_pretrained(Path(tiny_sources.hunyuan) / "tokenizer_2").save_pretrained(snapshot / "tokenizer_2")
    for old in ("vocab.json", "merges.txt"):
        (snapshot / "tokenizer_2" / old).unlink(missing_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sources = dataclasses.replace(tiny_sources, hunyuan="someone/hunyuan")
    check_sources(sources, None)  # found in the cache, nothing asked of the hub
    framepack = tmp_path / "hub" / "models--someone--framepack"
    (framepack / "refs").mkdir(parents=True)
    (framepack / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_sources.transformer("framepack"), framepack / "snapshots" / commit)
    assert loading.transformer_config("someone/framepack")["num_layers"] == 1  # what LoRA checks read
    (snapshot / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match="tokenizer_2/tokenizer.json or tokenizer_2/vocab.json and"):
        check_sources(sources, None)


def test_transformer_config_of_each_kind_of_source(tiny_sources, tmp_path):
    folder = tiny_sources.transformer("framepack")
    path = tmp_path / "t.safetensors"
    write_single_file(path, load_transformer(folder, "cpu"), torch.bfloat16)
    assert loading.transformer_config(str(path))["num_layers"] == loading.transformer_config(folder)["num_layers"] == 1
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    assert loading.transformer_config(str(bare)) == dict(OFFICIAL_TRANSFORMER_CONFIG)
    assert ModelSources(vae=str(path)).vae == str(path)
