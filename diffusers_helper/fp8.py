"""fp8 storage of the transformer's large linear weights, upcast layer by layer as removable hooks.

The attention and MLP projections of both block types (`FP8_LAYERS`) are stored as float8 e4m3
(1 byte per weight) with a scale, and each is turned back into the compute dtype only while its
layer runs. Everything else keeps its dtype: norms, the blocks' modulation (AdaLN) layers, the
embedders, the token refiner, the model's `norm_out` and `proj_out`, and every bias. The stored
tensors are the modules' own parameters (their `.data` is the fp8 tensor, the scale a buffer
beside it), so moving the model, making blocks resident and streaming them all move the fp8
bytes: nothing else needs to know.

The scale is a power of two, per tensor: w ~ q * 2^e with e = ceil(log2(max|w| / 448)), 448 being
e4m3's largest value. A power of two makes scaling and unscaling exact in every floating dtype,
so the only error is e4m3's own rounding (3 mantissa bits: at most 2^-4 relative for values in
its normal range). Because e4m3 is a floating-point format, that relative error hardly depends
on the scale, so a scale per output channel (`granularity="channel"`) measured no better (2.65%
output error on a 3072-wide layer with heavy-tailed weights and unequal channels, either way;
`python -m diffusers_helper.bench.fp8_error`). A scale is still needed: a plain cast (as
diffusers' layerwise casting does) puts small weights among e4m3's subnormals (below 2^-6), and
the same layer's error grows from 3.2% at a weight std of 0.02 to 8.9% at 0.005.

Why our own hook and not diffusers' `apply_layerwise_casting`: it has no scale (see above), and it
casts a layer's parameters in place before and after each call, which would replace the views
into the streaming ring that `offload.py` points a streamed block's parameters at. The hook is
not a diffusers ModelHook either, but the one function `_fp8_forward` bound as each fp8 layer's
`forward` (removed again by `remove`): diffusers' HookRegistry wraps every layer in a closure of
its own, and torch.compile, meeting a different function in every block, compiled each of the
blocks separately (7 graphs for 7 blocks, against 3 with the shared function; see compiled.py).

Importing this module does no work.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .hooks import BLOCK_LISTS, check_block_lists

__all__ = ["FP8_DTYPE", "FP8_LAYERS", "Fp8Weights", "apply_fp8", "fp8_applied", "fp8_layers", "quantize",
           "dequantize", "GRANULARITIES"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
GRANULARITIES = ("tensor", "channel")

# The linear layers stored in fp8, by their name inside a block: a double-stream block's attention
# (image and text streams: q, k, v and output projections) and both MLPs; a single-stream block's
# q, k, v, its MLP input projection and its fused output projection (attention and MLP outputs).
# Not the modulation layers (`norm1.linear`, `norm1_context.linear`, `norm.linear`), whose outputs
# scale and shift every token.
FP8_LAYERS = re.compile(
    r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)"
    r"|proj_mlp|proj_out"
)

_SCALE = "fp8_scale"
_HANDLE = "_framepack_fp8"  # the transformer's attribute holding its Fp8Weights


# ---------------------------------------------------------------------------------------------
# Quantising


def quantize(weight: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): `weight` as e4m3 values and a power-of-two float32 scale, weight ~ q * scale.

    `granularity` "tensor": one scale; "channel": one per output channel (row), shape (out, 1).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}.")
    w = weight.detach().float()
    if granularity == "tensor":
        amax = w.abs().amax().reshape(1, 1)
    else:
        amax = w.abs().amax(dim=1, keepdim=True)
    # an all-zero row or tensor gets scale 1 (log2 of 0 is -inf)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.exp2(torch.ceil(torch.log2(amax.clamp_min(tiny) / FP8_MAX)))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    q = (w / scale).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in `dtype` (exact: e4m3 values and powers of two are representable in every float dtype)."""
    return q.to(dtype) * scale.to(dtype)


# ---------------------------------------------------------------------------------------------
# The hooks


def _fp8_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """A Linear layer's forward with its fp8 weight upcast to the input's dtype for this call only."""
    return F.linear(input, dequantize(self.weight, getattr(self, _SCALE), input.dtype), self.bias)


@dataclass
class _Layer:
    module: torch.nn.Linear
    dtype: torch.dtype  # the weight's dtype before


def fp8_layers(transformer: torch.nn.Module, layers: re.Pattern = FP8_LAYERS) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(qualified name, layer) of every Linear stored in fp8: `layers` (FP8_LAYERS) inside the transformer's blocks."""
    check_block_lists(transformer, "fp8 weights need")
    for list_name in BLOCK_LISTS:
        for index, block in enumerate(getattr(transformer, list_name)):
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and layers.fullmatch(name):
                    yield f"{list_name}.{index}.{name}", module


class Fp8Weights:
    """Handle for a transformer whose large linear weights are stored in fp8: what was changed, and its removal."""

    def __init__(self, transformer: torch.nn.Module, granularity: str, layers: re.Pattern = FP8_LAYERS) -> None:
        self.transformer = transformer
        self.granularity = granularity
        self.pattern = layers
        self.layers: list[_Layer] = []
        self._removed = False

    def _install(self) -> None:
        found = list(fp8_layers(self.transformer, self.pattern))
        for name, module in found:  # everything is checked before anything changes
            if module.weight.dtype == FP8_DTYPE:
                raise ValueError(f"{name} is already stored in fp8.")
            if "forward" in vars(module) or getattr(module, "_diffusers_hook", None) is not None:
                raise ValueError(f"{name} already has its forward replaced (hooks); store fp8 weights first.")
        for _, module in found:
            weight = module.weight
            q, scale = quantize(weight.data, self.granularity)
            dtype = weight.dtype
            weight.data = q
            # not persistent: a state_dict keeps its keys (the weight is then the fp8 tensor)
            module.register_buffer(_SCALE, scale.to(q.device), persistent=False)
            module.forward = types.MethodType(_fp8_forward, module)
            self.layers.append(_Layer(module, dtype))
        setattr(self.transformer, _HANDLE, self)

    @property
    def removed(self) -> bool:
        """Whether the weights were put back in their dtype (and the hooks removed)."""
        return self._removed

    def remove(self) -> None:
        """Upcast the weights back to their dtype and remove the hooks.

        The weights are then the fp8 values in that dtype, not the originals (which were not kept:
        keeping them would keep the memory fp8 saves); reload the model for those.
        """
        if self._removed:
            return
        self._removed = True
        for layer in self.layers:
            module = layer.module
            module.weight.data = dequantize(module.weight.data, getattr(module, _SCALE), layer.dtype)
            delattr(module, _SCALE)
            del module.forward
        self.layers = []
        if getattr(self.transformer, _HANDLE, None) is self:
            delattr(self.transformer, _HANDLE)

    def __repr__(self) -> str:
        return f"Fp8Weights(layers={len(self.layers)}, granularity={self.granularity!r}, removed={self._removed})"


def fp8_applied(transformer: torch.nn.Module) -> Optional[Fp8Weights]:
    """The Fp8Weights handle of a transformer stored in fp8, or None."""
    handle = getattr(transformer, _HANDLE, None)
    return handle if isinstance(handle, Fp8Weights) and not handle.removed else None


def apply_fp8(transformer: torch.nn.Module, granularity: str = "tensor", *,
              layers: re.Pattern = FP8_LAYERS) -> Fp8Weights:
    """Store the transformer's attention and MLP weights (FP8_LAYERS) as e4m3 with power-of-two scales.

    Each layer is upcast to the compute dtype (its input's) only while it runs. Applying twice is
    refused: a second quantisation would compound the rounding. `layers` names other layers
    (inside the blocks) for measurements.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}.")
    if fp8_applied(transformer) is not None:
        raise ValueError("This transformer's weights are already stored in fp8.")
    handle = Fp8Weights(transformer, granularity, layers)
    handle._install()
    if not handle.layers:
        raise ValueError("This transformer has no attention or MLP layers to store in fp8.")
    return handle
