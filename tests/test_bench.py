"""`python -m diffusers_helper bench`: the tiny variant end to end on CPU, the FLOP count, the full-size specs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_helper.bench.section import bf16_peak, transformer_flops
from diffusers_helper.bench.weights import FULL

# the app, a fresh process or a browser per test: run with the full suite, not the quick one
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

FIELDS = (
    "seconds_per_step", "seconds_per_frame", "peak_gpu_bytes", "peak_private_bytes", "bytes_cpu_to_gpu",
    "bf16_peak_fraction", "transformer_flops_per_forward", "transformer_tokens", "mode", "plans",
    "stage_seconds", "sampling_seconds", "pinned_bytes", "peak_rss_bytes",
)


def test_bench_tiny_prints_json_with_every_figure(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_helper", "bench", "--tiny", "--mode", "low", "--weights-dir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    missing = [f for f in FIELDS if f not in result]
    assert not missing, missing
    assert result["tiny"] is True and result["device"] == "cpu" and result["mode"] == "low"
    assert result["seconds_per_step"] > 0 and result["seconds_per_frame"] > 0
    assert result["frames_per_section"] == 4 * result["window"]
    assert result["peak_gpu_bytes"] is None and result["bf16_peak_fraction"] is None  # no GPU here
    assert result["peak_private_bytes"] > 0 and result["peak_rss_bytes"] >= result["peak_anonymous_bytes"] > 0
    # low mode on a CPU stands in a budget that streams the transformer's blocks
    transformer = [p for p in result["plans"] if p["model"].startswith("HunyuanVideoFramepack")]
    assert transformer and transformer[0]["streamed_blocks"] > 0
    assert result["bytes_cpu_to_gpu"] > 0 and result["streamed_loads"] >= result["steps"]
    assert result["transformer_forwards"] == result["steps"]
    assert result["transformer_flops_per_forward"] == transformer_flops(
        _tiny_config(), result["transformer_tokens"]["image"], result["transformer_tokens"]["text"])
    # the models were written in the official layouts and are reused by the next run
    marker = json.loads((tmp_path / "w" / "bench-models.json").read_text())
    assert marker["tiny"] is True
    assert (tmp_path / "w" / "framepack" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert (tmp_path / "w" / "hunyuan" / "text_encoder" / "model.safetensors.index.json").exists()


def _tiny_config():
    from types import SimpleNamespace

    from diffusers_helper.tiny import TRANSFORMER_CONFIG

    return SimpleNamespace(**TRANSFORMER_CONFIG)


def test_bench_refuses_bad_flags_on_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusers_helper", "bench", "--tiny", "--attention", "flash"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    from diffusers_helper.attention import installed

    if installed("flash"):
        pytest.skip("flash-attn is installed here, so --attention flash is not refused on the CPU for a missing package")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "flash-attn" in proc.stderr


def test_transformer_flops_match_a_flop_counter(transformer_inputs):
    """The analytic count against PyTorch's FlopCounterMode on a small model, block by block."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_helper.tiny import TRANSFORMER_CONFIG

    model = HunyuanVideoFramepackTransformer3DModel(**{**TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 3})
    model.eval()
    tokens = {}
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: tokens.update(image=a[0].shape[1], text=a[1].shape[1]))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**transformer_inputs(model))
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    blocks = {k: v for k, v in per_module.items() if re.fullmatch(r".*\.(single_)?transformer_blocks\.\d+", k)}
    assert len(blocks) == 5
    c = model.config
    h = c.num_attention_heads * c.attention_head_dim
    n = tokens["image"] + tokens["text"]
    # the counter also counts the blocks' modulation layers (on the timestep embedding, one token):
    # 6·H outputs for each of the two streams of a double block, 3·H for a single block
    modulation = 2 * 2 * (2 * h * 6 * h) + 3 * (2 * h * 3 * h)
    attention = 5 * 4 * n * n * h
    counted = sum(blocks.values()) - modulation
    expected = transformer_flops(c, tokens["image"], tokens["text"])
    # on a CPU the counter may or may not see inside SDPA; the projections and MLPs must match exactly
    assert counted in (expected, expected - attention)


def test_full_size_specs_are_the_official_sizes():
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    def params(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        transformer = HunyuanVideoFramepackTransformer3DModel(**FULL["transformer"])
        llama = LlamaModel(LlamaConfig(**FULL["text_encoder"]))
        clip = CLIPTextModel(CLIPTextConfig(**FULL["text_encoder_2"]))
        siglip = SiglipVisionModel(SiglipVisionConfig(**FULL["image_encoder"]))
        vae = AutoencoderKLHunyuanVideo(**FULL["vae"])
    assert 12.7e9 < params(transformer) < 13.1e9  # "13B"
    assert len(transformer.transformer_blocks) == 20 and len(transformer.single_transformer_blocks) == 40
    assert 7.4e9 < params(llama) < 7.6e9  # LLaMA-3-8B without its LM head
    assert 120e6 < params(clip) < 126e6  # CLIP-L text
    assert 400e6 < params(siglip) < 430e6  # SigLIP so400m vision tower
    assert 240e6 < params(vae) < 250e6  # HunyuanVideo VAE
    assert vae.config.block_out_channels == (128, 256, 512, 512)


def test_bf16_peaks():
    assert bf16_peak("NVIDIA H200") == 989e12
    assert bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak("NVIDIA GeForce RTX 4090") == 165e12
    assert bf16_peak("Some Future GPU") is None and bf16_peak(None) is None
