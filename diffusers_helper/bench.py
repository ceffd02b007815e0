"""`python -m diffusers_helper bench`: time one section with the full-size architectures on random weights.

The official architectures (the FramePack transformer: 24 heads of 128, 20 double- and 40
single-stream blocks; the LLaMA-3-8B text encoder; CLIP-L; SigLIP so400m; the HunyuanVideo VAE) are
written once as random-weight safetensors in the official folder layouts, so loading takes exactly
the user's path (`load_components`). A fresh child process then loads them, runs one section of a
real job through the pipeline in the chosen mode, and prints one JSON document:

- seconds per sampling step and per video frame (a section adds window × 4 frames to a long video);
- peak GPU memory (PyTorch's allocator), peak private system memory (anonymous pages, sampled, plus
  the pinned staging buffers) and peak RSS;
- bytes copied from CPU to GPU (weights made resident or streamed);
- the transformer's achieved FLOP rate as a fraction of the GPU's dense bf16 peak, its FLOPs counted
  analytically from the architecture and the token counts the blocks really saw.

`--tiny` uses the tiny architectures instead (seconds on a CPU), through the same code.
`--vram-limit-gb` caps PyTorch's allocator (`torch.cuda.set_per_process_memory_fraction`), so a big
GPU behaves like a small one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .settings import ATTENTION_CHOICES

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


def _tiny_spec() -> dict[str, dict[str, Any]]:
    from .tiny import CLIP_HIDDEN, LLAMA_HIDDEN, SIGLIP_HIDDEN, SIGLIP_IMAGE_SIZE, SIGLIP_PATCH, TRANSFORMER_CONFIG, VAE_CONFIG

    # the sizes of tiny.py's models
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


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), by a substring of the device name; checked in order.
BF16_PEAK_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 6000 Ada", 364e12), ("RTX 5090", 209e12), ("RTX 4090", 165e12), ("RTX 4080", 97e12),
    ("RTX 3090", 71e12), ("RTX 3080", 59e12), ("RTX 3060", 25e12),
)

# The figures: the 640 bucket, window 9, 25 steps. The tiny models get a job sized like them.
FULL_JOB = dict(resolution=640, window=9, steps=25)
TINY_JOB = dict(resolution=64, window=3, steps=3)

PROMPT = "A calm sea under a slowly moving sky, gentle camera pan."
SHARD_BYTES = 4 * 1024**3
TINY_SHARD_BYTES = 64 * 1024
SAMPLE_SECONDS = 0.02


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench flags."""
    parser.add_argument("--tiny", action="store_true", help="tiny architectures instead of the full-size ones (runs on a CPU in seconds)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--mode", "--vram", dest="mode", default="auto", choices=["auto", "high", "low"],
                        help="keep every model on the GPU (high) or stream them (low); auto decides from free memory")
    parser.add_argument("--vram-limit-gb", type=float, metavar="GB", help="act as a GPU with this much memory (CUDA)")
    parser.add_argument("--preserve-gb", type=float, default=6.0, help="GPU Inference Preserved Memory in GB (low mode)")
    parser.add_argument("--resolution", type=int, help=f"bucket resolution (default {FULL_JOB['resolution']}; "
                                                        f"{TINY_JOB['resolution']} with --tiny)")
    parser.add_argument("--window", type=int, help=f"latent window size (default {FULL_JOB['window']}; "
                                                    f"{TINY_JOB['window']} with --tiny)")
    parser.add_argument("--steps", type=int, help=f"sampling steps (default {FULL_JOB['steps']}; "
                                                   f"{TINY_JOB['steps']} with --tiny)")
    parser.add_argument("--model", default="framepack", choices=["framepack", "f1"])
    parser.add_argument("--attention", default="sdpa", choices=list(ATTENTION_CHOICES))
    parser.add_argument("--teacache", action="store_true", help="skip steps with TeaCache (off: every step computes)")
    parser.add_argument("--weights-dir", metavar="DIR",
                        help="where the random-weight models are written and reused (default: a cache folder; "
                             "a temporary one with --tiny)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not in the built-in table")
    parser.add_argument("--_child", metavar="RESULT", help=argparse.SUPPRESS)


def run_bench(args) -> int:
    """Entry point: write the models if needed, run the measurement in a fresh process, print its JSON."""
    for name, value in (TINY_JOB if args.tiny else FULL_JOB).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args._child:
        return _child(args)
    from .loading import resolve_device
    from .settings import SettingsError

    try:
        device = resolve_device(args.device if not (args.tiny and args.device == "auto") else "cpu")
        _check_args(args, device)
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    temporary = None
    if args.weights_dir:
        root = Path(args.weights_dir).expanduser()
    elif args.tiny:
        temporary = root = Path(tempfile.mkdtemp(prefix="framepack-bench-"))
    else:
        root = Path.home() / ".cache" / "framepack-bench" / f"full-{device.type}"
    try:
        started = time.perf_counter()
        wrote = ensure_models(root, tiny=args.tiny, device=device, model=args.model)
        write_seconds = time.perf_counter() - started if wrote else 0.0
        with tempfile.TemporaryDirectory(prefix="framepack-bench-out-") as out:
            result_path = Path(out) / "result.json"
            argv = [sys.executable, "-m", "diffusers_helper.bench", *_forward(args), "--device", device.type,
                    "--weights-dir", str(root), "--_child", str(result_path)]
            proc = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0 or not result_path.exists():
                print(f"error: the measurement failed (exit status {proc.returncode})", file=sys.stderr)
                return proc.returncode or 1
            result = json.loads(result_path.read_text(encoding="utf-8"))
        result["weights_dir"] = str(root) if temporary is None else None
        result["write_seconds"] = round(write_seconds, 3)
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _check_args(args, device) -> None:
    if args.vram_limit_gb is not None and device.type == "mps":
        raise ValueError("--vram-limit-gb needs a CUDA device (or the CPU, where it is a stand-in budget).")
    if args.steps < 1 or args.window < 1 or args.resolution < 64:
        raise ValueError("--steps and --window must be at least 1, --resolution at least 64.")
    from .attention import resolve_attention

    resolve_attention(args.attention, device)


def _forward(args) -> list[str]:
    flags = ["--mode", args.mode, "--preserve-gb", str(args.preserve_gb), "--resolution", str(args.resolution),
             "--window", str(args.window), "--steps", str(args.steps), "--model", args.model,
             "--attention", args.attention]
    if args.tiny:
        flags.append("--tiny")
    if args.teacache:
        flags.append("--teacache")
    if args.vram_limit_gb is not None:
        flags += ["--vram-limit-gb", str(args.vram_limit_gb)]
    if args.peak_tflops is not None:
        flags += ["--peak-tflops", str(args.peak_tflops)]
    return flags


# ---------------------------------------------------------------------------------------------
# Writing the random-weight models


def ensure_models(root: Path, *, tiny: bool, device, model: str = "framepack") -> bool:
    """Write the bench models under `root` unless they are there for this spec; returns whether it wrote.

    The shared components are written once; a transformer variant only when it is benchmarked (each
    full-size one is 24 GiB).
    """
    from .loading import component_dtypes

    spec = _tiny_spec() if tiny else FULL
    dtypes = {k: str(v).replace("torch.", "") for k, v in component_dtypes(device).items()}
    key = hashlib.sha256(json.dumps({"spec": spec, "dtypes": dtypes}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    marker = root / "bench-models.json"
    record: dict[str, Any] = {}
    if marker.exists():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            record = {}
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no bench models; choose another --weights-dir.")
    if record.get("key") == key and model in record.get("variants", []):
        return False
    shared = record.get("key") == key
    sizes = model_bytes(spec, component_dtypes(device))
    need = sizes["transformer"] + (0 if shared else sizes["shared"])
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need * 1.02:
        raise ValueError(f"Writing the bench models needs {need / 1e9:.1f} GB of disk at {root}, and "
                         f"{free / 1e9:.1f} GB is free; free some space or choose another --weights-dir.")
    marker.unlink(missing_ok=True)
    if not shared:
        for sub in ("hunyuan", "siglip", "framepack", "f1"):
            shutil.rmtree(root / sub, ignore_errors=True)
        record = {"key": key, "tiny": tiny, "dtypes": dtypes, "variants": []}
    shutil.rmtree(root / model, ignore_errors=True)
    write_models(root, spec, component_dtypes(device), shard_bytes=TINY_SHARD_BYTES if tiny else SHARD_BYTES,
                 variants=(model,), shared=not shared)
    record["variants"] = sorted(set(record.get("variants", [])) | {model})
    marker.write_text(json.dumps(record), encoding="utf-8")
    return True


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
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    from . import tiny

    pool = _RandomPool(seed)
    hunyuan, siglip = root / "hunyuan", root / "siglip"
    llama_tokens = tiny._build_llama_tokenizer()
    clip_vocab = tiny._build_clip_vocab()

    for variant in variants:
        # built on the meta device, its weights generated and written shard by shard
        with torch.device("meta"):
            transformer = HunyuanVideoFramepackTransformer3DModel(**spec["transformer"])
        folder = root / variant
        folder.mkdir(parents=True, exist_ok=True)
        transformer.save_config(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["_class_name"] = tiny.OFFICIAL_TRANSFORMER_CLASS
        config.pop("image_condition_type", None)
        tiny._write_json(folder / "config.json", config)
        _write_sharded(transformer, folder, "diffusion_pytorch_model", dtypes["transformer"], pool, shard_bytes,
                       offset=1 if variant == "f1" else 0)
        del transformer
    if not shared:
        return

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
    _write_sharded(llama, folder, "model", dtypes["text_encoder"], pool, shard_bytes)
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
            with torch.device("meta"):
                meta = build()
            model = type(meta)(meta.config) if hasattr(meta.config, "to_dict") else type(meta).from_config(meta.config)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(_values(name, param.shape, torch.float32, pool))
            model.to(dtype).save_pretrained(folder, safe_serialization=True)
            del model, meta


class _RandomPool:
    """A block of standard-normal numbers reused (at shifting offsets) for every tensor: fast to fill gigabytes."""

    def __init__(self, seed: int, size: int = 1 << 22):
        import torch

        self.values = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        self._offset = 0

    def fill(self, out) -> None:
        """Fill a flat tensor with pool values, continuing where the last fill stopped."""
        n, pool = out.numel(), self.values
        done = 0
        while done < n:
            start = self._offset % pool.numel()
            take = min(n - done, pool.numel() - start)
            out[done:done + take].copy_(pool[start:start + take])
            done += take
            self._offset += take + 7919  # shift so that equal-shaped tensors differ


def _values(name: str, shape, dtype, pool: _RandomPool):
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


def _write_sharded(meta_model, folder: Path, stem: str, dtype, pool: _RandomPool, shard_bytes: int, offset: int = 0) -> None:
    """Write a meta-device model's state dict as sharded safetensors plus index, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    pool._offset += offset * 104729
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
    total = len(shards)
    weight_map, total_size = {}, 0
    for i, shard in enumerate(shards, 1):
        filename = f"{stem}-{i:05d}-of-{total:05d}.safetensors"
        tensors = {name: _values(name, shape, dtype, pool) for name, shape in shard}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = filename
            total_size += t.numel() * t.element_size()
        del tensors
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The measurement (child process)


class MemoryMonitor:
    """Peak private memory of this process, sampled by a thread.

    Linux: the Anonymous pages of /proc/self/smaps_rollup, which exclude the memory-mapped weights
    (file pages the kernel can drop and re-read). Elsewhere: psutil's USS, an upper bound.
    """

    def __init__(self, interval: float = SAMPLE_SECONDS):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._smaps = Path("/proc/self/smaps_rollup")

    def sample(self) -> int:
        """Private bytes now."""
        if self._smaps.exists():
            text = self._smaps.read_text()
            match = re.search(r"^Anonymous:\s+(\d+) kB", text, re.M)
            if match:
                return int(match.group(1)) * 1024
        import psutil

        return int(psutil.Process().memory_full_info().uss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def start(self) -> "MemoryMonitor":
        self.peak = self.sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())
        return self.peak


def transformer_flops(config, image_tokens: int, text_tokens: int) -> int:
    """FLOPs of one transformer forward: the blocks' matmuls and attention (2 per multiply-add).

    Per token, a double-stream block (image and text streams alike) and a single-stream block
    both do q, k, v and output projections (4·H²) and an MLP (2·H·F) multiply-adds; attention over
    all N tokens adds 2·N·H (QKᵀ and AV). Embedders, modulation and the output layer (under 1%)
    are not counted.
    """
    hidden = config.num_attention_heads * config.attention_head_dim
    ff = int(hidden * config.mlp_ratio)
    n = image_tokens + text_tokens
    per_block = 2 * n * (4 * hidden * hidden + 2 * hidden * ff) + 4 * n * n * hidden
    return int((config.num_layers + config.num_single_layers) * per_block)


def bf16_peak(name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by name, when known."""
    if not name:
        return None
    for key, flops in BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def _child(args) -> int:
    import numpy as np
    import torch

    from .attention import set_attention
    from .events import CancelToken, Cancelled, Failed, Finished, SectionDone, Stage, StepProgress
    from .loading import load_components, resolve_device
    from .memory import (GIB, Placement, VramMode, apply_memory_limit, choose_vram_mode, device_free_bytes,
                         estimate_needs)
    from .conditioning import find_nearest_bucket
    from .pipeline import run_job
    from .settings import VIDEO_FPS, GenerationSettings
    from .tiny import sources_at

    monitor = MemoryMonitor().start()
    device = resolve_device(args.device)
    limit = int(args.vram_limit_gb * GIB) if args.vram_limit_gb is not None else None
    if device.type == "cuda":
        apply_memory_limit(device, limit)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the shortest video the settings allow; only its first section is run (the job is ended after it)
    settings = GenerationSettings(prompt=PROMPT, model=args.model, seconds=max(1.0, args.window * 4 / VIDEO_FPS),
                                  window=args.window, steps=args.steps, resolution=args.resolution,
                                  teacache=args.teacache, gpu_memory_preservation=args.preserve_gb, seed=0)

    started = time.perf_counter()
    components = load_components(sources_at(Path(args.weights_dir)), args.model, device=device)
    load_seconds = time.perf_counter() - started
    attention = set_attention(components.transformer, args.attention, device)

    size = args.resolution
    height, width = find_nearest_bucket(size, size, args.resolution)
    free = device_free_bytes(device, limit)
    needs = estimate_needs(components, settings, height, width)
    mode = choose_vram_mode(args.mode, device, free_bytes=free, need_bytes=needs.high_device_bytes)
    available = None
    if device.type == "cpu" and mode is VramMode.LOW:
        # no device memory to measure: stand in a budget (the limit, or just the transformer's fixed
        # tensors and a ring) so that low mode really streams, through the same code as on a GPU
        available = limit if limit is not None else _streaming_budget(components.transformer)
    placement = Placement(device, mode, memory_limit_bytes=limit,
                          available=(lambda: available) if available is not None else None)

    # token counts as the blocks see them, and how many calls really computed (TeaCache may skip)
    transformer = components.transformer
    tokens: dict[str, int] = {}
    computed = [0]

    def first_block(module, block_args):
        tokens.setdefault("image", int(block_args[0].shape[1]))
        tokens.setdefault("text", int(block_args[1].shape[1]))

    hooks = [transformer.transformer_blocks[0].register_forward_pre_hook(first_block),
             transformer.transformer_blocks[0].ff.register_forward_hook(lambda *a: computed.__setitem__(0, computed[0] + 1))]

    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    events: list[tuple[float, Any]] = []
    cancel = CancelToken()
    end = [0.0]

    def emit(event) -> None:
        now = time.perf_counter()
        events.append((now, event))
        if isinstance(event, SectionDone):
            end[0] = now
            cancel.cancel()

    with tempfile.TemporaryDirectory(prefix="framepack-bench-job-") as out:
        run_job(components, settings, image, Path(out) / "bench.mp4", emit=emit, cancel=cancel, placement=placement)
    end = end[0] or time.perf_counter()
    for h in hooks:
        h.remove()
    peak_private = monitor.stop()

    last = events[-1][1]
    if not (isinstance(last, Finished) or (isinstance(last, Cancelled) and end and last.frames)):
        message = last.message if isinstance(last, Failed) else type(last).__name__
        print(f"error: the benchmark job did not finish: {message}", file=sys.stderr)
        return 1

    stage_times: dict[str, float] = {}
    stages = [(t, e) for t, e in events if isinstance(e, Stage) and e.name != "notice" and t <= end]
    for (t0, e), (t1, _) in zip(stages, stages[1:] + [(end, None)]):
        stage_times[e.name] = round(stage_times.get(e.name, 0.0) + t1 - t0, 4)
    sampling_start = next(t for t, e in stages if e.name == "sampling")
    step_times = [t for t, e in events if isinstance(e, StepProgress) and e.section == 1]
    sampling = step_times[-1] - sampling_start
    intervals = [b - a for a, b in zip(step_times, step_times[1:])]
    frames = settings.window * 4
    decode = stage_times.get("vae_decode", 0.0)

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    flops_forward = transformer_flops(transformer.config, tokens.get("image", 0), tokens.get("text", 0))
    flops = flops_forward * computed[0]
    achieved = flops / sampling if sampling > 0 else None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (bf16_peak(gpu_name) if device.type == "cuda" else None)
    stats = placement.stats
    result = {
        "tiny": bool(args.tiny),
        "device": str(device),
        "gpu": gpu_name,
        "mode": mode.value,
        "attention": attention,
        "model": args.model,
        "resolution": args.resolution,
        "bucket": [height, width],
        "window": args.window,
        "steps": args.steps,
        "teacache": bool(args.teacache),
        "vram_limit_gb": args.vram_limit_gb,
        "preserve_gb": args.preserve_gb,
        "dtypes": {k: str(v).replace("torch.", "") for k, v in components.dtypes.items()},
        "load_seconds": round(load_seconds, 3),
        "stage_seconds": stage_times,
        "sampling_seconds": round(sampling, 4),
        "seconds_per_step": round(sampling / settings.steps, 4),
        "seconds_per_step_steady": round(statistics.median(intervals), 4) if intervals else None,
        "frames_per_section": frames,
        "seconds_per_frame": round((sampling + decode) / frames, 4),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "peak_private_bytes": peak_private + stats.pinned_bytes,
        "peak_anonymous_bytes": peak_private,
        "pinned_bytes": stats.pinned_bytes,
        "peak_rss_bytes": _peak_rss(),
        "bytes_cpu_to_gpu": stats.host_to_device_bytes,
        "bytes_streamed": stats.streamed_bytes,
        "streamed_loads": stats.streamed_loads,
        "gather_seconds": round(stats.gather_seconds, 4),
        "staging_wait_seconds": round(stats.staging_wait_seconds, 4),
        "gather_gb_per_s": round(stats.streamed_bytes / stats.gather_seconds / 1e9, 2) if stats.gather_seconds else None,
        "plans": stats.plans,
        "transformer_tokens": tokens,
        "transformer_forwards": computed[0],
        "transformer_flops_per_forward": flops_forward,
        "transformer_tflops_achieved": round(achieved / 1e12, 4) if achieved else None,
        "bf16_peak_tflops": round(peak / 1e12, 1) if peak else None,
        "bf16_peak_fraction": round(achieved / peak, 4) if (achieved and peak) else None,
        "estimated_needs": {"low_device_bytes": needs.low_device_bytes, "high_device_bytes": needs.high_device_bytes,
                            "ram_bytes": needs.ram_bytes, "stages": needs.stages},
    }
    Path(args._child).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _streaming_budget(transformer) -> int:
    from .offload import module_tensors, streamable_blocks, tensors_bytes

    sizes = [tensors_bytes(module_tensors(b)) for b in streamable_blocks(transformer)]
    return tensors_bytes(module_tensors(transformer)) - sum(sizes) + 2 * max(sizes)


def _peak_rss() -> Optional[int]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(argv=None) -> int:
    """Run the bench on its own (`python -m diffusers_helper.bench`)."""
    parser = argparse.ArgumentParser(prog="python -m diffusers_helper bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
