"""Random-weight models of the official architectures, written in the official folder layouts.

The benchmarks load them through the user's own path (`loading.py`), so what they measure is what
a user's job does. The full-size set is about 42 GB and is written once into a cache folder; the
transformer variants (24 GiB each at full size) only when they are benchmarked. Large models are
built on the meta device and their weights generated and written shard by shard, so writing needs
about one shard of memory, not one model.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..settings import MODEL_VARIANTS

# The official architectures (configs of the released checkpoints).
FULL: dict[str, dict[str, Any]] = {
    "transformer": dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56), has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True,
    ),
    # LLaMA-3-8B as HunyuanVideo's text encoder (LlamaModel, no LM head)
    "text_encoder": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
    ),
    # CLIP ViT-L/14's text tower
    "text_encoder_2": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    ),
    # SigLIP so400m/14 at 384 px
    "image_encoder": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14,
    ),
    # diffusers' defaults are the HunyuanVideo VAE's configuration
    "vae": dict(scaling_factor=0.476986),
}

SHARD_BYTES = 4 * 1024**3
TINY_SHARD_BYTES = 64 * 1024
MARKER = "bench-models.json"  # what a weights folder holds: the spec's key, tiny or not, the variants written
_SHARED_FOLDERS = ("hunyuan", "siglip")
_VARIANT_FOLDERS = ("framepack", "f1")


def tiny_spec() -> dict[str, dict[str, Any]]:
    """The sizes of tiny.py's models, as a spec like FULL."""
    from ..tiny import CLIP_HIDDEN, LLAMA_HIDDEN, SIGLIP_HIDDEN, SIGLIP_IMAGE_SIZE, SIGLIP_PATCH, TRANSFORMER_CONFIG, VAE_CONFIG

    return {
        "transformer": dict(TRANSFORMER_CONFIG),
        "text_encoder": dict(hidden_size=LLAMA_HIDDEN, intermediate_size=2 * LLAMA_HIDDEN, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        "text_encoder_2": dict(hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN, projection_dim=CLIP_HIDDEN,
                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77),
        "image_encoder": dict(hidden_size=SIGLIP_HIDDEN, intermediate_size=2 * SIGLIP_HIDDEN, num_hidden_layers=2,
                              num_attention_heads=2, image_size=SIGLIP_IMAGE_SIZE, patch_size=SIGLIP_PATCH),
        "vae": dict(VAE_CONFIG),
    }


def ensure_models(root: Path, *, tiny: bool, device, model: str = "framepack") -> bool:
    """Write the bench models under `root` unless they are there for this spec; returns whether it wrote.

    The shared components are written once; a transformer variant only when it is benchmarked.
    ValueError when `root` holds something else or its disk is too small.
    """
    from ..loading import component_dtypes

    spec = tiny_spec() if tiny else FULL
    dtypes = component_dtypes(device)
    names = {k: str(v).replace("torch.", "") for k, v in dtypes.items()}
    key = hashlib.sha256(json.dumps({"spec": spec, "dtypes": names}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    record = _read_marker(root)
    if record.get("key") == key and model in record.get("variants", []):
        return False
    shared = record.get("key") == key  # the shared components are there already
    sizes = model_bytes(spec, dtypes)
    _check_disk(root, sizes["transformer"] + (0 if shared else sizes["shared"]))
    marker = root / MARKER
    marker.unlink(missing_ok=True)  # until the new set is complete
    if not shared:
        for sub in _SHARED_FOLDERS + _VARIANT_FOLDERS:
            shutil.rmtree(root / sub, ignore_errors=True)
        record = {"key": key, "tiny": tiny, "dtypes": names, "variants": []}
    shutil.rmtree(root / model, ignore_errors=True)
    write_models(root, spec, dtypes, shard_bytes=TINY_SHARD_BYTES if tiny else SHARD_BYTES,
                 variants=(model,), shared=not shared)
    record["variants"] = sorted(set(record.get("variants", [])) | {model})
    marker.write_text(json.dumps(record), encoding="utf-8")
    return True


def _read_marker(root: Path) -> dict[str, Any]:
    """The record of what `root` holds ({} when nothing); ValueError when it holds something else."""
    marker = root / MARKER
    if marker.exists():
        try:
            return json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            return {}
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no bench models; choose another --weights-dir.")
    return {}


def _check_disk(root: Path, need: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need * 1.02:
        raise ValueError(f"Writing the bench models needs {need / 1e9:.1f} GB of disk at {root}, and "
                         f"{free / 1e9:.1f} GB is free; free some space or choose another --weights-dir.")


def model_bytes(spec: dict, dtypes: dict) -> dict[str, int]:
    """Bytes the bench writes: one transformer variant, and the shared components together."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    def size(model, dtype) -> int:
        return sum(t.numel() for t in model.state_dict().values()) * torch.empty((), dtype=dtype).element_size()

    # (the tiny specs take their vocabulary size from the tokenizer; any small one sizes them well enough)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    llama = {"vocab_size": 1024, **spec["text_encoder"], **ids}
    clip = {"vocab_size": 1024, **spec["text_encoder_2"], **ids}
    with torch.device("meta"):
        transformer = size(HunyuanVideoFramepackTransformer3DModel(**spec["transformer"]), dtypes["transformer"])
        shared = (size(LlamaModel(LlamaConfig(**llama)), dtypes["text_encoder"])
                  + size(CLIPTextModel(CLIPTextConfig(**clip)), dtypes["text_encoder_2"])
                  + size(SiglipVisionModel(SiglipVisionConfig(**spec["image_encoder"])), dtypes["image_encoder"])
                  + size(AutoencoderKLHunyuanVideo(**spec["vae"]), dtypes["vae"]))
    return {"transformer": transformer, "shared": shared}


def write_models(root: Path, spec: dict, dtypes: dict, *, shard_bytes: int, seed: int = 0,
                 variants: tuple = ("framepack",), shared: bool = True) -> None:
    """Random-weight models of `spec` in the official layouts under `root`: the shared components
    (hunyuan/, siglip/) when `shared`, and a transformer folder for each of `variants`."""
    pool = RandomPool(seed)
    for variant in variants:
        _write_transformer(root / variant, spec["transformer"], dtypes["transformer"], pool, shard_bytes,
                           offset=MODEL_VARIANTS.index(variant))  # each variant its own random values
    if shared:
        _write_shared(root, spec, dtypes, pool, shard_bytes)


def _write_transformer(folder: Path, config: dict, dtype, pool: "RandomPool", shard_bytes: int, offset: int) -> None:
    """The transformer in the official layout: built on the meta device, written shard by shard."""
    import torch
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from .. import tiny

    with torch.device("meta"):
        transformer = HunyuanVideoFramepackTransformer3DModel(**config)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_config(folder)
    written = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    written["_class_name"] = tiny.OFFICIAL_TRANSFORMER_CLASS
    written.pop("image_condition_type", None)
    tiny._write_json(folder / "config.json", written)
    write_sharded(transformer, folder, "diffusion_pytorch_model", dtype, pool, shard_bytes, offset=offset)


def _write_shared(root: Path, spec: dict, dtypes: dict, pool: "RandomPool", shard_bytes: int) -> None:
    """Tokenizers, feature extractor, text encoders, image encoder and VAE under hunyuan/ and siglip/."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    from .. import tiny

    hunyuan, siglip = root / "hunyuan", root / "siglip"
    llama_tokens = tiny._build_llama_tokenizer()
    clip_vocab = tiny._build_clip_vocab()
    for folder in (hunyuan / "tokenizer", hunyuan / "tokenizer_2", siglip / "feature_extractor"):
        folder.mkdir(parents=True, exist_ok=True)
    tiny._write_llama_tokenizer(hunyuan / "tokenizer", llama_tokens)
    tiny._write_clip_tokenizer(hunyuan / "tokenizer_2", clip_vocab)
    size = spec["image_encoder"]["image_size"]
    tiny._write_json(siglip / "feature_extractor" / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
    })

    # the LLaMA encoder, like the transformer: meta device, shard by shard
    llama_ids = dict(bos_token_id=llama_tokens.token_to_id(tiny.LLAMA_BOS),
                     eos_token_id=llama_tokens.token_to_id(tiny.LLAMA_EOS),
                     pad_token_id=llama_tokens.token_to_id(tiny.LLAMA_PAD))
    llama_spec = {"vocab_size": llama_tokens.get_vocab_size(with_added_tokens=True), **spec["text_encoder"], **llama_ids}
    llama_config = LlamaConfig(**llama_spec)
    with torch.device("meta"):
        llama = LlamaModel(llama_config)
    folder = hunyuan / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    llama_config.save_pretrained(folder)
    write_sharded(llama, folder, "model", dtypes["text_encoder"], pool, shard_bytes)
    del llama

    # the small ones: real modules (their integer buffers come out right), random floats, save_pretrained
    vocab, _ = clip_vocab
    clip_spec = {**spec["text_encoder_2"], "bos_token_id": vocab[tiny.CLIP_BOS], "eos_token_id": vocab[tiny.CLIP_EOS],
                 "pad_token_id": vocab[tiny.CLIP_EOS]}
    clip_spec.setdefault("vocab_size", len(vocab))
    small = [
        (hunyuan / "text_encoder_2", lambda: CLIPTextModel(CLIPTextConfig(**clip_spec)), dtypes["text_encoder_2"]),
        (siglip / "image_encoder", lambda: SiglipVisionModel(SiglipVisionConfig(**spec["image_encoder"])),
         dtypes["image_encoder"]),
        (hunyuan / "vae", lambda: AutoencoderKLHunyuanVideo(**spec["vae"]), dtypes["vae"]),
    ]
    with tiny._quiet_progress_bars():
        for folder, build, dtype in small:
            _write_small(folder, build, dtype, pool)


def _write_small(folder: Path, build, dtype, pool: "RandomPool") -> None:
    """A small model built for real, filled with pool values, saved with save_pretrained."""
    import torch

    with torch.device("meta"):
        meta = build()
    model = type(meta)(meta.config) if hasattr(meta.config, "to_dict") else type(meta).from_config(meta.config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_values(name, param.shape, torch.float32, pool))
    model.to(dtype).save_pretrained(folder, safe_serialization=True)


class RandomPool:
    """A block of standard-normal numbers reused (at shifting offsets) for every tensor: fast to fill gigabytes."""

    def __init__(self, seed: int, size: int = 1 << 22):
        import torch

        self.values = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        self.offset = 0

    def fill(self, out) -> None:
        """Fill a flat tensor with pool values, continuing where the last fill stopped."""
        n, pool = out.numel(), self.values
        done = 0
        while done < n:
            start = self.offset % pool.numel()
            take = min(n - done, pool.numel() - start)
            out[done:done + take].copy_(pool[start:start + take])
            done += take
            self.offset += take + 7919  # shift so that equal-shaped tensors differ


def random_values(name: str, shape, dtype, pool: RandomPool):
    """Values like a trained model's scale: weights N(0, ~1/fan_in), norm scales 1, other vectors small."""
    import torch

    numel = math.prod(shape) if len(shape) else 1
    flat = torch.empty(numel, dtype=dtype)
    if len(shape) >= 2:
        fan_in = numel // shape[0]
        pool.fill(flat)
        flat.mul_(min(max(fan_in ** -0.5, 0.02), 0.1))
    elif "norm" in name and name.endswith("weight"):
        flat.fill_(1.0)
    else:
        pool.fill(flat)
        flat.mul_(0.02)
    return flat.view(shape)


def write_sharded(meta_model, folder: Path, stem: str, dtype, pool: RandomPool, shard_bytes: int, offset: int = 0) -> None:
    """Write a meta-device model's state dict as sharded safetensors plus index, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    pool.offset += offset * 104729  # another variant of the same architecture gets other values
    items = [(name, tuple(t.shape), t.dtype) for name, t in meta_model.state_dict().items()]
    if any(not d.is_floating_point for _, _, d in items):
        raise ValueError(f"{type(meta_model).__name__} has non-float tensors in its state dict")
    item_bytes = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple]]] = [[]]
    used = 0
    for name, shape, _ in items:
        nbytes = math.prod(shape) * item_bytes
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    weight_map, total_size = {}, 0
    for i, shard in enumerate(shards, 1):
        filename = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_values(name, shape, dtype, pool) for name, shape in shard}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = filename
            total_size += t.numel() * t.element_size()
        del tensors
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2), encoding="utf-8")
