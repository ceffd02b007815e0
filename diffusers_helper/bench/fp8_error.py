"""`python -m diffusers_helper.bench.fp8_error`: what fp8 weight storage costs in accuracy and saves in bytes.

Prints one JSON document:

- `layer`: one 3072 x 3072 linear layer (the full-size transformer's width) with realistic weight
  statistics, fed 256 random tokens: the relative output error ||W'x - Wx|| / ||Wx|| and the
  weights' relative RMS error, for a per-tensor scale (what `--fp8` uses), a per-output-channel
  scale, and no scale at all (a plain cast to e4m3, as diffusers' layerwise casting does);
- `tiny_model`: the same output error for the whole tiny transformer (random weights) on one call;
- `bytes`: the full-size transformer's bytes (built on the meta device, so nothing is allocated) in
  bf16 and with `--fp8`, for the blocks and in all, and what including the blocks' modulation
  layers would give (they are kept in bf16).

The realistic weights are synthetic (no checkpoint can be read here): a Student-t with 4 degrees
of freedom (heavy tails, as trained weights have) scaled to a std of 0.02, and output channels of
different size (a log-normal factor with sigma 0.5 per row), which is where a per-channel scale
could help. No timing here; nothing needs a GPU.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import torch

# Student-t degrees of freedom, weight std and per-row log-normal sigma of the synthetic layer
T_DOF = 4.0
WEIGHT_STD = 0.02
ROW_SIGMA = 0.5
WIDTH = 3072
TOKENS = 256


def realistic_weight(rows: int = WIDTH, cols: int = WIDTH, seed: int = 0) -> torch.Tensor:
    """A float32 weight with heavy tails and channels of different scale (see the module's docstring)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # Student-t = normal / sqrt(chi2(dof) / dof), chi2 drawn as a sum of squared normals
    chi2 = (torch.randn(int(T_DOF), rows, cols, generator=g, dtype=torch.float64) ** 2).sum(0)
    t = normal / torch.sqrt(chi2 / T_DOF)
    t = t / t.std() * WEIGHT_STD
    rows_scale = torch.exp(torch.randn(rows, 1, generator=g, dtype=torch.float64) * ROW_SIGMA)
    return (t * rows_scale).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def layer_errors(weight: torch.Tensor, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Output and weight error of `weight` stored per tensor, per channel and by a plain cast, in float32."""
    from ..fp8 import FP8_DTYPE, dequantize, quantize

    exact = x @ weight.T
    stored = {g: dequantize(*quantize(weight, g), torch.float32) for g in ("tensor", "channel")}
    stored["unscaled_cast"] = weight.to(FP8_DTYPE).float()
    return {name: {"output": _relative(x @ w.T, exact), "weight": _relative(w, weight)} for name, w in stored.items()}


def tiny_model_errors(seed: int = 0) -> dict[str, float]:
    """The tiny transformer's output error on one call with its weights in fp8, per scale granularity."""
    import copy

    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from ..fp8 import apply_fp8
    from ..tiny import TRANSFORMER_CONFIG, _randomise_all_parameters

    model = HunyuanVideoFramepackTransformer3DModel(**TRANSFORMER_CONFIG)
    _randomise_all_parameters(model, seed)
    model.eval().requires_grad_(False)
    inputs = tiny_inputs(model, seed)
    with torch.no_grad():
        exact = model(**inputs)[0]
        errors = {}
        for granularity in ("tensor", "channel"):
            quantised = copy.deepcopy(model)
            apply_fp8(quantised, granularity)
            errors[granularity] = _relative(quantised(**inputs)[0], exact)
    return errors


def tiny_inputs(model, seed: int = 0) -> dict[str, Any]:
    """One call's inputs for a tiny transformer: a 3-frame 8 x 8 window and FramePack's history layout."""
    c = model.config
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        hidden_states=r(1, c.in_channels, 3, 8, 8), timestep=torch.tensor([700.0]),
        encoder_hidden_states=r(1, 7, c.text_embed_dim), encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool),
        pooled_projections=r(1, c.pooled_projection_dim), image_embeds=r(1, 16, c.image_proj_dim),
        indices_latents=torch.arange(20, 23), guidance=torch.tensor([10000.0]),
        latents_clean=r(1, c.in_channels, 2, 8, 8), indices_latents_clean=torch.tensor([0, 19]),
        latents_history_2x=r(1, c.in_channels, 2, 8, 8), indices_latents_history_2x=torch.tensor([17, 18]),
        latents_history_4x=r(1, c.in_channels, 16, 8, 8), indices_latents_history_4x=torch.arange(1, 17),
        return_dict=False,
    )


def full_size_bytes() -> dict[str, float]:
    """The full-size transformer's bytes in bf16 and with fp8 (as `--fp8`, and with modulation layers too)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from ..fp8 import FP8_LAYERS, apply_fp8
    from ..offload import module_tensors, streamable_blocks, tensors_bytes
    from .weights import FULL

    def build():
        with torch.device("meta"):
            model = HunyuanVideoFramepackTransformer3DModel(**FULL["transformer"])
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        return model

    def sizes(model) -> tuple[int, int]:
        blocks = sum(tensors_bytes(module_tensors(b)) for b in streamable_blocks(model))
        return blocks, tensors_bytes(module_tensors(model))

    plain, fp8, with_modulation = build(), build(), build()
    apply_fp8(fp8)
    apply_fp8(with_modulation, layers=re.compile(FP8_LAYERS.pattern + r"|norm1(_context)?\.linear|norm\.linear"))
    (b16, t16), (b8, t8), (bm, tm) = sizes(plain), sizes(fp8), sizes(with_modulation)
    return {"bf16_bytes": t16, "fp8_bytes": t8, "fp8_ratio": t8 / t16, "fp8_blocks_ratio": b8 / b16,
            "with_modulation_ratio": tm / t16, "with_modulation_blocks_ratio": bm / b16}


def main() -> int:
    """Measure and print the JSON document."""
    g = torch.Generator().manual_seed(1)
    weight = realistic_weight()
    x = torch.randn(TOKENS, weight.shape[1], generator=g)
    result = {"layer": layer_errors(weight, x), "tiny_model": tiny_model_errors(), "bytes": full_size_bytes()}
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
