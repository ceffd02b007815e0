"""LoRA files for the FramePack transformer: formats read from the keys, checks before any work, PEFT adapters.

Formats, told apart by their keys (never by the file name):

- musubi-tuner / kohya: `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`
  and `.alpha`;
- diffusers / PEFT: `transformer.<module path>.lora_A.weight` and `.lora_B.weight` (also without the
  `transformer.` prefix), with `.alpha` keys or `lora_alpha` in diffusers' adapter metadata when present;
- HunyuanVideo's own module names (`diffusion_model.double_blocks.N.img_attn_qkv...`,
  `single_blocks.N.linear1`, as diffusion-pipe trains them, or in the kohya style as musubi-tuner writes
  them for HunyuanVideo). Their fused projections (q, k and v in one; single blocks' q, k, v and MLP in
  one) are split onto our separate layers: the shared `down` goes to each, the rows of `up` are divided.

Each LoRA changes a layer as W' = W + weight · scale · up @ down, with scale = alpha / rank (1 without
alpha). Keys for parts FramePack has no use for (text encoders) are counted and skipped; anything
else that fits no module, or whose shape differs from the layer's, is refused with the file's name
and the first bad key, from the file's header alone, before any weights are read.

The mapping of HunyuanVideo's names is written here rather than taken from diffusers'
`_convert_hunyuan_video_lora_to_diffusers`: that function is private, fixes the hidden size at 3072
(so it cannot be tested on small models), and splits the shared `down` of the final layer's
modulation and of the token refiner's qkv as if it were an `up`. tests/test_lora.py checks this
mapping against it at full size where it is right.

The LoRAs are applied with PEFT through diffusers' adapter methods on the model (`load_lora_adapter`,
`set_adapters`, `delete_adapters`, `unload_lora`): PEFT adds the low-rank product beside each layer and
never rewrites the base weights, so they stay the memory-mapped checkpoint, the low-VRAM stream
carries each adapter with its block, switching LoRAs or weights between jobs reloads nothing, and a
job without LoRAs runs the untouched model.

Importing this module does no work.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

# The kinds of key a LoRA file holds, by their ending: the low-rank factors and the scale numerator.
_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
          ".alpha": "alpha"}
# Keys for the text encoders (kohya's lora_te*, diffusers' text_encoder*): FramePack keeps its encoders as they are.
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                          "text_encoders.", "te1.", "te2.")
# Namespaces in front of the transformer's module path (diffusers, ComfyUI, plain PEFT).
_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.")
_KOHYA = "lora_unet_"
# diffusers' safetensors metadata entry holding the adapter's LoraConfig (lora_alpha, alpha_pattern, use_dora)
_ADAPTER_METADATA = "lora_adapter_metadata"
_HASH_CHUNK = 1 << 24


class LoraError(ValueError):
    """A LoRA file that can't be used; the message names the file and what is wrong with it."""


# ---------------------------------------------------------------------------------------------
# The transformer's layers, and HunyuanVideo's names for them


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may change: its weight's shape, dtype and device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def lora_targets(model: torch.nn.Module) -> dict[str, Target]:
    """The model's layers a LoRA can change (Linear and Conv3d), by module path; works on a meta-device model."""
    targets = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)  # a layer PEFT already wraps: its own weight
        layer = base if isinstance(base, (torch.nn.Linear, torch.nn.Conv3d)) else module
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv3d)) and ".lora_" not in name and ".base_layer" not in name:
            w = layer.weight
            targets[name] = Target(tuple(w.shape), w.dtype, w.device)
    return targets


@dataclass(frozen=True)
class _Piece:
    """Rows of a LoRA's `up` that belong to one of our layers, as (start, stop) ranges taken in order."""

    target: str
    rows: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]  # the layer's weight


def _split(targets: Mapping[str, Target], names: Sequence[str], swap_halves: bool = False) -> Optional[tuple]:
    """Pieces of a fused layer whose output rows are `names`' outputs one after another."""
    if not all(name in targets for name in names):
        return None
    pieces, start = [], 0
    for name in names:
        rows = targets[name].shape[0]
        span = ((start, start + rows),)
        if swap_halves:  # HunyuanVideo's final modulation gives (shift, scale); diffusers' layer (scale, shift)
            half = rows // 2
            span = ((start + half, start + rows), (start, start + half))
        pieces.append(_Piece(name, span, targets[name].shape))
        start += rows
    return tuple(pieces)


def _block_numbers(targets: Mapping[str, Target], prefix: str) -> list[int]:
    found = {int(m.group(1)) for name in targets for m in [re.match(rf"{re.escape(prefix)}(\d+)\.", name)] if m}
    return sorted(found)


# HunyuanVideo's names for the layers of one block -> ours (several: a fused layer, split by rows).
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp.fc1": ("ff.net.0.proj",), "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",), "txt_mlp.fc2": ("ff_context.net.2",),
    "img_mod.linear": ("norm1.linear",), "txt_mod.linear": ("norm1_context.linear",),
}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation.linear": ("norm.linear",)}
_REFINER = {"self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "self_attn_proj": ("attn.to_out.0",),
            "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",), "adaLN_modulation.1": ("norm_out.linear",)}
_EMBEDDERS = {
    "img_in.proj": "x_embedder.proj",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def hunyuan_names(targets: Mapping[str, Target]) -> dict[str, tuple[_Piece, ...]]:
    """HunyuanVideo's module paths for the model's layers, each with the pieces of ours it covers."""
    groups = [("double_blocks", "transformer_blocks", _DOUBLE), ("single_blocks", "single_transformer_blocks", _SINGLE),
              ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks", _REFINER)]
    names: dict[str, Optional[tuple]] = {}
    for theirs, ours, layers in groups:
        for n in _block_numbers(targets, f"{ours}."):
            for layer, parts in layers.items():
                names[f"{theirs}.{n}.{layer}"] = _split(targets, [f"{ours}.{n}.{p}" for p in parts])
    for theirs, ours in _EMBEDDERS.items():
        names[theirs] = _split(targets, [ours])
    names["final_layer.adaLN_modulation.1"] = _split(targets, ["norm_out.linear"], swap_halves=True)
    return {name: pieces for name, pieces in names.items() if pieces is not None}


class _Names:
    """Every name a LoRA key may give a layer: ours and HunyuanVideo's, dotted and in kohya's underscores."""

    def __init__(self, targets: Mapping[str, Target]):
        ours = {name: (_Piece(name, ((0, t.shape[0]),), t.shape),) for name, t in targets.items()}
        theirs = hunyuan_names(targets)
        self.dotted = {**{n: (p, "ours") for n, p in ours.items()}, **{n: (p, "hunyuan") for n, p in theirs.items()}}
        self.kohya = {n.replace(".", "_"): entry for n, entry in self.dotted.items()}

    def resolve(self, stem: str) -> tuple[Optional[str], Optional[tuple], str]:
        """(canonical name, pieces, naming) of a key's module part; (None, None, style) when it names no layer."""
        if stem.startswith(_KOHYA):
            name = stem[len(_KOHYA):]
            pieces, naming = self.kohya.get(name, (None, ""))
            return (name if pieces else None), pieces, f"kohya/{naming}"
        for prefix in _PREFIXES:
            if stem.startswith(prefix):
                stem = stem[len(prefix):]
                break
        pieces, naming = self.dotted.get(stem, (None, ""))
        return (stem if pieces else None), pieces, f"peft/{naming}"


# ---------------------------------------------------------------------------------------------
# Reading a file's header: format, keys and shapes


@dataclass
class _Module:
    """One module of a LoRA file: its keys by part, and the layers of ours it covers."""

    name: str
    pieces: tuple[_Piece, ...]
    keys: dict[str, str] = field(default_factory=dict)  # part (down, up, alpha) -> key


@dataclass(frozen=True)
class LoraPlan:
    """What a LoRA file holds for a transformer, checked from its header: format, modules, skipped keys."""

    path: Path
    format: str
    modules: tuple[_Module, ...]
    skipped: int  # text-encoder keys, left out
    alphas: Mapping[str, float] = field(default_factory=dict)  # from diffusers' adapter metadata, by module
    default_alpha: Optional[float] = None

    @property
    def name(self) -> str:
        """The file's name."""
        return self.path.name

    @property
    def layers(self) -> int:
        """How many of the transformer's layers it changes."""
        return sum(len(m.pieces) for m in self.modules)

    def notice(self) -> Optional[str]:
        """What to tell the user about keys left out, if any."""
        if not self.skipped:
            return None
        keys = "key" if self.skipped == 1 else "keys"
        return (f"LoRA {self.name}: {self.skipped} text-encoder {keys} skipped (FramePack applies LoRAs to its "
                "transformer only).")


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensors' shapes and the metadata of a safetensors file; LoraError when it is not one."""
    from .single_file import NotSafetensors, safetensors_header

    if not path.is_file():
        raise LoraError(f"LoRA file {path} not found.")
    try:
        return safetensors_header(path)
    except NotSafetensors as exc:
        raise LoraError(f"LoRA file {path.name} is not a safetensors file ({exc}); LoRAs are read only "
                        "from .safetensors files.") from None


def _part(key: str) -> Optional[tuple[str, str]]:
    for suffix, part in _PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def inspect_lora(path: Path | str, targets: Mapping[str, Target]) -> LoraPlan:
    """Read a LoRA file's header and map every key onto the model's layers; LoraError names the first bad key."""
    path = Path(path).expanduser()
    shapes, metadata = _header(path)
    names, modules, skipped, styles = _Names(targets), {}, 0, set()
    for key in shapes:
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            skipped += 1
            continue
        split = _part(key)
        if split is None:
            raise LoraError(f"LoRA {path.name}: {key} is not a LoRA weight FramePack can apply (it reads lora_down/"
                            "lora_up, lora_A/lora_B and alpha; LoHa, LoKr, DoRA and full weight differences are not "
                            "supported).")
        stem, part = split
        name, pieces, style = names.resolve(stem)
        if name is None:
            raise LoraError(f"LoRA {path.name}: {key} maps to no layer of the FramePack transformer (is it a LoRA for "
                            "another model?).")
        styles.add(style)
        module = modules.setdefault(name, _Module(name, pieces))
        if part in module.keys:
            raise LoraError(f"LoRA {path.name}: {key} sets {name}'s {part} a second time (as {module.keys[part]}).")
        module.keys[part] = key
    if not modules:
        raise LoraError(f"LoRA {path.name} holds no weights for the FramePack transformer"
                        + (f" (only {skipped} text-encoder keys)." if skipped else "."))
    _check_modules(path.name, modules.values(), shapes)
    alphas, default_alpha = _metadata_alphas(path.name, metadata, modules)
    return LoraPlan(path, _format_name(styles), tuple(modules.values()), skipped, alphas, default_alpha)


def _format_name(styles: set[str]) -> str:
    kinds = sorted({"musubi-tuner/kohya" if s.startswith("kohya") else "diffusers/PEFT" for s in styles})
    names = " with HunyuanVideo's layer names" if any(s.endswith("hunyuan") for s in styles) else ""
    return " + ".join(kinds) + names


def _check_modules(file: str, modules: Iterable[_Module], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every module has both factors, of ranks that agree and shapes that fit the layers it covers."""
    covered: dict[str, str] = {}
    for m in modules:
        for part, partner in (("down", "up"), ("up", "down")):
            if part in m.keys and partner not in m.keys:
                raise LoraError(f"LoRA {file}: {m.keys[part]} has no matching {partner} weight.")
        if "down" not in m.keys:
            raise LoraError(f"LoRA {file}: {m.keys['alpha']} has no LoRA weights beside it.")
        down, up = shapes[m.keys["down"]], shapes[m.keys["up"]]
        target = m.pieces[0].target
        expected_down, expected_up = _expected(m, down[0] if down else 0)
        if len(down) < 2 or down[0] < 1 or tuple(down[1:]) != expected_down[1:]:
            raise LoraError(f"LoRA {file}: {m.keys['down']} has shape {_shape(down)}, but the transformer's {target} "
                            f"needs {_shape(expected_down)} (rank first); is it a LoRA for another model?")
        if tuple(up) != expected_up:
            raise LoraError(f"LoRA {file}: {m.keys['up']} has shape {_shape(up)}, but the transformer's "
                            f"{' + '.join(p.target for p in m.pieces)} need {_shape(expected_up)}.")
        if "alpha" in m.keys and math.prod(shapes[m.keys["alpha"]]) != 1:
            raise LoraError(f"LoRA {file}: {m.keys['alpha']} must be one number, not of shape "
                            f"{_shape(shapes[m.keys['alpha']])}.")
        for piece in m.pieces:
            if piece.target in covered:
                raise LoraError(f"LoRA {file}: {m.keys['up']} changes {piece.target}, which {covered[piece.target]} "
                                "changes already.")
            covered[piece.target] = m.keys["up"]


def _expected(module: _Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of `down` and `up` that fit a module's layers at a rank (the shape of the first layer's weight)."""
    shape = module.pieces[0].shape
    rows = sum(stop - start for p in module.pieces for start, stop in p.rows)
    down = (rank, *shape[1:])
    up = (rows, rank, *([1] * (len(shape) - 2)))
    return down, up


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _metadata_alphas(file: str, metadata: Mapping[str, str], modules: Mapping[str, _Module]):
    """lora_alpha (and alpha_pattern) from diffusers' adapter metadata, when the file has it."""
    raw = metadata.get(_ADAPTER_METADATA)
    if not raw:
        return {}, None
    try:
        config = json.loads(raw)
    except ValueError:
        return {}, None
    config = {k.removeprefix("transformer."): v for k, v in config.items()} if isinstance(config, dict) else {}
    if config.get("use_dora"):
        raise LoraError(f"LoRA {file} is a DoRA adapter (use_dora in its metadata), which FramePack does not apply.")
    default = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    alphas = {}
    if pattern:
        from peft.utils.other import get_pattern_key

        for name in modules:
            key = get_pattern_key(pattern.keys(), name)
            if key in pattern:
                alphas[name] = float(pattern[key])
    return alphas, (float(default) if isinstance(default, (int, float)) else None)


# ---------------------------------------------------------------------------------------------
# Reading the weights


def _factor_dtype(target: Target, dtype: torch.dtype) -> torch.dtype:
    # the layer's own dtype (PEFT computes the LoRA in it), but never an 8-bit storage format
    return target.dtype if target.dtype.is_floating_point and target.dtype.itemsize >= 2 else dtype


def read_weights(plan: LoraPlan, targets: Mapping[str, Target], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plan's factors as a PEFT state dict: each layer's lora_A (down) and lora_B (scale · its rows of up).

    The scale is folded into lora_B, so every adapter has PEFT's scale 1 and the job's weight alone
    multiplies it. A fused module's `down` is one tensor shared by the layers it covers.
    """
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    with safe_open(str(plan.path), framework="pt", device="cpu") as f:
        for m in plan.modules:
            down, up = f.get_tensor(m.keys["down"]), f.get_tensor(m.keys["up"])
            alpha = float(f.get_tensor(m.keys["alpha"]).float().reshape(())) if "alpha" in m.keys \
                else plan.alphas.get(m.name, plan.default_alpha)
            if alpha is not None and not math.isfinite(alpha):
                raise LoraError(f"LoRA {plan.name}: {m.keys.get('alpha', 'lora_alpha')} is not a finite number.")
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            first = targets[m.pieces[0].target]
            a = down.to(device=first.device, dtype=_factor_dtype(first, dtype))
            for piece in m.pieces:
                rows = torch.cat([up[start:stop] for start, stop in piece.rows])
                target = targets[piece.target]
                state[f"{piece.target}.lora_A.weight"] = a
                state[f"{piece.target}.lora_B.weight"] = (rows.float() * scale).to(
                    device=target.device, dtype=_factor_dtype(target, dtype))
            del down, up
    return state


def _adapter_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """PEFT's LoraConfig for a state dict from read_weights: exactly its layers, their ranks, scale 1."""
    ranks = {key[: -len(".lora_A.weight")]: t.shape[0] for key, t in state.items() if key.endswith(".lora_A.weight")}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as suffixes of module paths; '^' pins them to the whole path
    # (else 'proj_out' would also match 'single_transformer_blocks.0.proj_out')
    pattern = {f"^{re.escape(name)}": r for name, r in ranks.items() if r != rank}
    return dict(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=dict(pattern),
                target_modules="^(?:" + "|".join(re.escape(name) for name in ranks) + ")$")


# ---------------------------------------------------------------------------------------------
# Applying LoRAs to a transformer, job after job


def _adapter_name(sha: str) -> str:
    """The PEFT adapter name of a LoRA file, from its SHA-256."""
    return f"lora_{sha[:16]}"


class LoraManager:
    """The LoRAs in one transformer, as PEFT adapters kept between jobs, and the files' SHA-256 sums.

    A job names its LoRAs and weights; `apply` loads only files not loaded yet, drops the ones no
    longer asked for and sets every weight. Without LoRAs the PEFT layers are removed again, which
    leaves the transformer exactly as it was loaded.
    """

    def __init__(self, lora_dir: Optional[Path | str] = None) -> None:
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        self._hashes: dict[tuple, str] = {}
        self._adapters: set[str] = set()  # SHA-256 sums of the files loaded as adapters into self._model
        self._model: Optional[torch.nn.Module] = None

    def locate(self, path: Path | str) -> Path:
        """Where a LoRA is: a bare file name in the LoRA folder when it is there, else the path as given."""
        path = Path(path).expanduser()
        if self.lora_dir is not None and len(path.parts) == 1 and (self.lora_dir / path).is_file():
            return self.lora_dir / path
        return path

    def found(self, path: Path | str) -> Path:
        """Where a LoRA is (`locate`); LoraError says where it was looked for when it is nowhere."""
        located = self.locate(path)
        if not located.is_file():
            where = (f" (neither in the LoRA folder {self.lora_dir} nor in the current folder)"
                     if self.lora_dir is not None and len(Path(path).parts) == 1 else "")
            raise LoraError(f"LoRA file {path} not found{where}.")
        return located

    def sha256(self, path: Path | str) -> str:
        """The file's SHA-256 (hex), remembered while its size and modification time stay the same."""
        path = self.found(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
            self._hashes[key] = digest.hexdigest()
        return self._hashes[key]

    def check(self, loras: Sequence[tuple[str, float]], targets: Mapping[str, Target]) -> list[LoraPlan]:
        """Read every LoRA's header and map it onto `targets`; LoraError for the first unusable one."""
        return [inspect_lora(self.found(path), targets) for path, _ in loras]

    def record(self, loras: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
        """How a job's sidecar names its LoRAs: file name, SHA-256 and weight."""
        return [{"name": Path(path).name, "sha256": self.sha256(path), "weight": weight} for path, weight in loras]

    def forget(self) -> None:
        """The transformer is gone (unloaded); its adapters with it."""
        self._adapters.clear()
        self._model = None

    def apply(self, transformer: torch.nn.Module, loras: Sequence[tuple[str, float]], dtype: torch.dtype,
              notify: Callable[[str], None] = lambda message: None) -> list[str]:
        """Make `transformer` carry exactly `loras` (path, weight); returns notices for the user.

        Every file is checked before the model changes; `notify` hears which are being read. Weight
        0 leaves a LoRA out.
        """
        if transformer is not self._model:
            self._adapters, self._model = set(), transformer
        if not loras and not self._adapters:
            return []  # nothing of ours in it, and nothing to add: the model is not even looked at
        targets = lora_targets(transformer)
        plans = {path: plan for (path, _), plan in zip(loras, self.check(loras, targets))}
        wanted: dict[str, tuple[str, float]] = {}
        for path, weight in loras:
            if weight != 0:  # the same file twice (under two names) adds its weights, as two copies would
                sha = self.sha256(path)
                wanted[sha] = (path, weight + wanted.get(sha, (path, 0.0))[1])
        for sha in [sha for sha in self._adapters if sha not in wanted]:
            self._adapters.discard(sha)
            transformer.delete_adapters(_adapter_name(sha))
        if not wanted:
            if any(hasattr(module, "base_layer") for module in transformer.modules()):
                transformer.unload_lora()  # the PEFT layers go too: the model is as it was loaded
            return [n for n in (plan.notice() for plan in plans.values()) if n]
        for sha, (path, _) in wanted.items():
            if sha not in self._adapters:
                notify(f"Loading LoRA {plans[path].name} ({plans[path].format})")
                self._load(transformer, sha, plans[path], targets, dtype)
        names = [_adapter_name(sha) for sha in wanted]
        transformer.set_adapters(names, [float(weight) for _, weight in wanted.values()])
        # PEFT makes the adapters it activates trainable; here nothing is trained, and a parameter that
        # wants gradients would make every call keep its activations for a backward pass
        for name, parameter in transformer.named_parameters():
            if ".lora_" in name:
                parameter.requires_grad_(False)
        return [n for n in (plan.notice() for plan in plans.values()) if n]

    def _load(self, transformer, sha: str, plan: LoraPlan, targets: Mapping[str, Target], dtype: torch.dtype) -> None:
        state = read_weights(plan, targets, dtype)
        name = _adapter_name(sha)
        with warnings.catch_warnings():
            # PEFT warns that a second adapter makes several adapters in the model: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=_adapter_config(state),
                                          low_cpu_mem_usage=True)
        _keep_factors(transformer, name, state)
        del state
        self._adapters.add(sha)


def _keep_factors(model: torch.nn.Module, adapter: str, state: Mapping[str, torch.Tensor]) -> None:
    # PEFT moves an adapter to its layer's dtype; a layer stored in 8 bits (fp8.py) would round the
    # factors to 8 bits too, so those get back the tensors read_weights made (in the compute dtype)
    for name, module in model.named_modules():
        for part in ("lora_A", "lora_B"):
            factors = getattr(module, part, None)
            if isinstance(factors, torch.nn.ModuleDict) and adapter in factors:
                weight, wanted = factors[adapter].weight, state.get(f"{name}.{part}.weight")
                if wanted is not None and weight.dtype != wanted.dtype:
                    weight.data = wanted


# ---------------------------------------------------------------------------------------------
# A job's LoRAs again: resume, and the page's "Load these settings"


def find_recorded(name: str, sha256: str, places: Iterable[Path | str], hasher: LoraManager) -> Path:
    """The file among `places` (paths, or folders to look for `name` in) whose SHA-256 is `sha256`.

    LoraError says whether the file is missing or was changed since it was recorded.
    """
    places = list(places)
    changed: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for place in places:
        candidate = Path(place).expanduser()
        if candidate.is_dir():
            candidate = candidate / name
        if not candidate.is_file() or str(candidate.resolve()) in seen:
            continue
        seen.add(str(candidate.resolve()))
        digest = hasher.sha256(candidate)
        if digest == sha256:
            return candidate
        changed.append((candidate, digest))
    if changed:
        where, digest = changed[0]
        raise LoraError(f"LoRA {name} at {where} has changed since it was used (SHA-256 {digest[:12]}…, was "
                        f"{sha256[:12]}…); put the original file back.")
    places_text = ", ".join(str(p) for p in places) or "nowhere"
    raise LoraError(f"LoRA {name} (SHA-256 {sha256[:12]}…) is missing: not found in {places_text}; put it back.")


def recorded_hashes(record: Optional[Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    """A job record's LoRAs (its "loras" entries) by file name: their SHA-256, for those that recorded one."""
    by_name = {entry.get("name"): entry for entry in record or () if isinstance(entry, Mapping)}
    return {name: entry["sha256"] for name, entry in by_name.items() if isinstance(entry.get("sha256"), str)}


def recorded_loras(loras: Sequence[tuple[str, float]], record: Sequence[Mapping[str, Any]],
                   folders: Iterable[Path | str], hasher: LoraManager) -> tuple[tuple[str, float], ...]:
    """A recorded job's LoRAs with paths where the very same files are now (their recorded path, else `folders`)."""
    hashes = recorded_hashes(record)
    found = []
    for path, weight in loras:
        name = Path(path).name
        if name not in hashes:
            found.append((path, weight))  # nothing recorded to compare with
            continue
        found.append((str(find_recorded(name, hashes[name], [hasher.locate(path), *folders], hasher)), weight))
    return tuple(found)


def list_loras(folder: Path | str) -> list[str]:
    """The .safetensors files in a LoRA folder, by name (none when the folder does not exist)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".safetensors"),
                  key=str.lower)
