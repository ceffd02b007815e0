"""Model files people already have as one .safetensors file: a FramePack transformer, the HunyuanVideo VAE.

ComfyUI users keep the FramePack transformer as one file (`FramePackI2V_HY_bf16.safetensors`,
`..._fp8_e4m3fn.safetensors`): the folder's tensors under the same names, in bf16, fp16 or fp8
(e4m3 or e5m2; norms, biases and embedders usually kept in 16 bits). ComfyUI's HunyuanVideo VAE
(`hunyuan_video_vae_bf16.safetensors`) holds the original VAE's tensors, whose names are diffusers'
(diffusers' own conversion script renames nothing for it). diffusers' single-file loading
(`from_single_file`) does not know either class, so they are read here: the model is built from
its configuration without weights, and the file's tensors are put in place under their own names,
each converted to the compute dtype where it differs (fp8 is upcast). A tensor already in the
compute dtype stays the memory-mapped file, as with folders.

The configuration is the official one (the released checkpoints' config.json), unless the file
carries its own in its safetensors metadata under "config" (a JSON object), as files of other
sizes, like the test suite's tiny models, must.

This module does no work on import and imports nothing of this package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

# lllyasviel/FramePackI2V_HY and FramePack_F1_I2V_HY_20250503 (config.json): both variants share it.
OFFICIAL_TRANSFORMER_CONFIG: Mapping[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True,
)
# hunyuanvideo-community/HunyuanVideo vae/config.json: diffusers' defaults for the class.
OFFICIAL_VAE_CONFIG: Mapping[str, Any] = dict(scaling_factor=0.476986)

CONFIG_KEY = "config"
# Namespaces some tools put in front of every name (ComfyUI checkpoints, diffusers pipelines).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "first_stage_model.", "vae.")
# Tensors of scaled-fp8 checkpoints (per-tensor scales our loader does not apply).
_SCALED_FP8 = (".scale_weight", ".scale_input")


class SingleFileError(ValueError):
    """A single-file checkpoint that can't be loaded; the message says why."""


def is_single_file(source: str) -> bool:
    """Whether a source names one file (rather than a folder or a hub repo)."""
    return bool(source) and Path(source).expanduser().is_file()


class NotSafetensors(ValueError):
    """A file that safetensors can't read; the message is its reason, one short line."""


def safetensors_header(path: Path | str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's tensor shapes and metadata (read from its header only); NotSafetensors when it is not
    one. Shared by single-file models and LoRAs, which word the refusal each their own way."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a file that is not one
        text = str(exc).strip().splitlines()
        raise NotSafetensors(text[0][:200] if text else type(exc).__name__) from None


def read_header(path: Path | str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's tensor shapes and metadata; SingleFileError when it is not one."""
    path = Path(path).expanduser()
    try:
        return safetensors_header(path)
    except NotSafetensors as exc:
        raise SingleFileError(f"{path.name} is not a safetensors file ({exc}); "
                              "models are read only from .safetensors files.") from None


def file_config(path: Path | str, official: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration of a single-file model: its metadata's "config", else the official one."""
    _, metadata = read_header(path)
    return _config(metadata, official, Path(path).name)


def _config(metadata: Mapping[str, str], official: Mapping[str, Any], name: str) -> dict[str, Any]:
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return dict(official)
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise SingleFileError(f"{name}: its metadata's 'config' is not a JSON object.")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _strip_prefix(names: list[str]) -> str:
    for prefix in _PREFIXES:
        if names and all(name.startswith(prefix) for name in names):
            return prefix
    return ""


def load_single_file(cls, path: Path | str, official: Mapping[str, Any], dtype: torch.dtype,
                     describe: Optional[str] = None) -> torch.nn.Module:
    """A diffusers model of class `cls` with the weights of one safetensors file, in `dtype` (CPU, eval mode).

    SingleFileError names what doesn't fit: missing or unexpected tensors, shapes, scaled fp8.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    describe = describe or cls.__name__
    shapes, metadata = read_header(path)
    with init_empty_weights():
        model = cls.from_config(_config(metadata, official, path.name))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefix = _strip_prefix(list(shapes))
    given = {name[len(prefix):]: shape for name, shape in shapes.items()}
    _check_names(path.name, describe, expected, given)
    state = load_file(str(path))  # memory-mapped
    state = {name[len(prefix):]: t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)
             for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.eval()
    model.requires_grad_(False)
    return model


def _check_names(file: str, describe: str, expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> None:
    scaled = [name for name in given if name.endswith(_SCALED_FP8)]
    if scaled:
        raise SingleFileError(f"{file} is a scaled-fp8 checkpoint ({scaled[0]}), which FramePack can't read; use a "
                              "plain bf16, fp16 or fp8 (e4m3fn/e5m2) file.")
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        hint = ""
        if any(name.startswith(("double_blocks.", "single_blocks.")) for name in given):
            hint = " Its tensors are named as in HunyuanVideo's original code, not as a FramePack transformer's."
        shown = ", ".join((missing or unexpected)[:3])
        kind = "lacks" if missing else "has tensors the model doesn't:"
        raise SingleFileError(f"{file} is not a {describe} file: it {kind} {shown}"
                              f"{' and more' if len(missing or unexpected) > 3 else ''}.{hint}")
    wrong = [name for name, shape in expected.items() if tuple(given[name]) != shape]
    if wrong:
        name = wrong[0]
        raise SingleFileError(f"{file}: {name} has shape {tuple(given[name])}, but the {describe} needs "
                              f"{expected[name]}; is it a model of another size?")
