"""Loading the components from the model hub or from local folders; their dtypes and devices.

Every component is read with `from_pretrained(source, subfolder=...)` from the official layouts, so
a hub repo id, a Hugging Face cache and a local copy of the repository all take the same path.
Only safetensors are read. Before any heavy work `check_sources` confirms every needed file is
there and names all that are missing at once.

Importing this module does no work: torch is imported, but CUDA is not touched.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .settings import MODEL_VARIANTS, ModelSources, SettingsError

# Seconds to wait for the hub when a file is not in the local cache: long enough for a slow
# link to answer, short enough that an unreachable hub fails fast instead of hanging.
HUB_TIMEOUT_S = 10.0

COMPONENT_NAMES = ("transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae")

# Files each component needs. A tuple lists alternatives: one single-file checkpoint or a sharded
# one (whose index names the shards, which are then required too); "a+b" is an alternative of
# several files. The alternatives are the layouts the libraries load: a tokenizer saved by
# transformers 5 is only tokenizer.json, an older one vocab.json and merges.txt.
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_HUNYUAN_FILES: dict[str, list[Any]] = {
    "text_encoder": ["config.json", _TRANSFORMERS_WEIGHTS],
    "text_encoder_2": ["config.json", _TRANSFORMERS_WEIGHTS],
    "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
    "tokenizer_2": [("tokenizer.json", "vocab.json+merges.txt")],
    "vae": ["config.json", _DIFFUSERS_WEIGHTS],
}
_SIGLIP_FILES: dict[str, list[Any]] = {
    "feature_extractor": ["preprocessor_config.json"],
    "image_encoder": ["config.json", _TRANSFORMERS_WEIGHTS],
}
_TRANSFORMER_FILES: list[Any] = ["config.json", _DIFFUSERS_WEIGHTS]

_FLAGS = {"hunyuan": "--hunyuan", "siglip": "--siglip", "transformer": "--transformer", "vae": "--vae"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(ValueError):
    """A model source is missing files or holds unusable ones; the message says which and how to fix it."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


# ---------------------------------------------------------------------------------------------
# Devices and dtypes


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for a name: 'auto' picks cuda, then mps, then cpu; an absent one is an error."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SettingsError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"Device {name!r} was asked for but CUDA is not available (no NVIDIA GPU, driver or CUDA build "
                "of PyTorch); use --device cpu or --device auto."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SettingsError(f"Device {name!r} does not exist: this machine has {count} CUDA device(s).")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise SettingsError(
                f"Device {name!r} was asked for but Apple's MPS backend is not available; use --device cpu or --device auto."
            )
        return device
    raise SettingsError(f"Unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps.")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def component_dtypes(device: str | torch.device) -> dict[str, torch.dtype]:
    """The dtype each component runs in on a device (keys: transformer, text_encoder(_2), image_encoder, vae)."""
    # CUDA: the transformer in bf16 (fp16 on GPUs without bf16), everything else in fp16, as the
    # official FramePack does. MPS: fp16 everywhere to halve memory, but the transformer in bf16
    # when the backend supports it, because fp16's narrow range overflows in its long attention
    # sums. CPU: fp32 everywhere, since CPU half-precision kernels are slow and partly missing.
    device = torch.device(device)
    if device.type == "cuda":
        transformer = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _dtypes(transformer, torch.float16)
    if device.type == "mps":
        transformer = torch.bfloat16 if _mps_supports_bf16() else torch.float16
        return _dtypes(transformer, torch.float16)
    return _dtypes(torch.float32, torch.float32)


def _dtypes(transformer: torch.dtype, others: torch.dtype) -> dict[str, torch.dtype]:
    return {name: (transformer if name == "transformer" else others) for name in COMPONENT_NAMES}


def _mps_supports_bf16() -> bool:
    # bf16 on MPS needs macOS 14+; there is no query for it, so try a tiny allocation.
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# Checking sources


@dataclass
class _Need:
    role: str  # hunyuan | siglip | transformer
    source: str
    subfolder: str
    files: list[Any]


def _needs(sources: ModelSources, model: str | None) -> list[_Need]:
    vae = sources.vae
    needs = [_Need("hunyuan", sources.hunyuan, sub, files) for sub, files in _HUNYUAN_FILES.items()
             if not (vae and sub == "vae")]
    if vae:
        needs.append(_Need("vae", vae, "", _HUNYUAN_FILES["vae"]))
    needs += [_Need("siglip", sources.siglip, sub, files) for sub, files in _SIGLIP_FILES.items()]
    if model is not None:
        needs.append(_Need("transformer", sources.transformer(model), "", _TRANSFORMER_FILES))
    return needs


def check_sources(sources: ModelSources, model: str | None = None) -> None:
    """Confirm the files of the shared components (and of `model`'s transformer) are present; else raise SourceError."""
    if model is not None and model not in MODEL_VARIANTS:
        raise SettingsError(f"model must be one of {', '.join(MODEL_VARIANTS)}, not {model!r}.")
    _check(_needs(sources, model))


def _check(needs: list[_Need]) -> dict[str, bool]:
    """Raise SourceError listing everything missing; return, per hub source, whether it is fully cached."""
    problems: list[str] = []
    roles: dict[str, str] = {}
    by_source: dict[str, list[_Need]] = {}
    for need in needs:
        by_source.setdefault(need.source, []).append(need)
        roles.setdefault(need.source, need.role)
    cached: dict[str, bool] = {}
    for source, source_needs in by_source.items():
        role = roles[source]
        label = f"{role} source {source!r}"
        if not source or not str(source).strip():
            problems.append(f"{label}: no source given")
            continue
        local = Path(source).expanduser()
        if local.is_file():
            problems += [f"{label}: {problem}" for problem in _single_file_problems(local, source_needs)]
        elif local.is_dir():
            for need in source_needs:
                problems += [f"{label}: {item}" for item in _missing_local(local, need)]
        elif _looks_like_path(source) or not _REPO_ID.match(source):
            problems.append(f"{label}: no such {'file' if source.lower().endswith('.safetensors') else 'folder'}")
        else:
            missing, reason, fully_cached = _missing_hub(source, source_needs)
            cached[source] = fully_cached
            suffix = f" ({reason})" if reason else ""
            problems += [f"{label}: {item}{suffix}" for item in missing]
    if problems:
        raise SourceError(_missing_message(problems, needs), missing=problems)
    return cached


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~", "\\")) or os.sep in source.replace("/", "", 1) or ":" in source


def _join(subfolder: str, name: str) -> str:
    return f"{subfolder}/{name}" if subfolder else name


def _parts(name: str) -> list[str]:
    """The files of one alternative ("a+b": both)."""
    return name.split("+")


def _show(subfolder: str, name: str) -> str:
    return " and ".join(_join(subfolder, part) for part in _parts(name))


def _single_file_problems(path: Path, needs: list[_Need]) -> list[str]:
    """What is wrong with one file given as a source: only the transformer and the VAE may be one file."""
    from .single_file import SingleFileError, read_header

    if any(need.role not in ("transformer", "vae") for need in needs):
        return ["is a file; this source must be a folder laid out like the official repository"]
    try:
        read_header(path)
    except SingleFileError as exc:
        return [str(exc)]
    return []


def _missing_local(root: Path, need: _Need) -> list[str]:
    folder = root / need.subfolder if need.subfolder else root
    if need.subfolder and not folder.is_dir():
        return [f"{need.subfolder}/ (folder missing)"]
    missing: list[str] = []
    for item in need.files:
        options = item if isinstance(item, tuple) else (item,)
        present = [name for name in options if all((folder / part).is_file() for part in _parts(name))]
        if not present:
            missing.append(" or ".join(_show(need.subfolder, name) for name in options))
        elif present[0].endswith(".index.json"):
            shards = _shards_of(folder / present[0])
            if shards is None:
                missing.append(f"{_join(need.subfolder, present[0])} (unreadable index)")
            else:
                missing += [_join(need.subfolder, s) for s in shards if not (folder / s).is_file()]
    return missing


def _shards_of(index_path: Path) -> list[str] | None:
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # The library reads HF_HUB_OFFLINE once at import; read it again so a later change counts.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE or env)


def _missing_hub(repo: str, needs: list[_Need]) -> tuple[list[str], str, bool]:
    """Files of a hub repo neither in the local cache nor (when online) in the repo; and why."""
    from huggingface_hub import try_to_load_from_cache

    def cached_path(name: str) -> str | None:
        # an alternative of several files ("a+b") is cached when all are; its first file stands for it
        paths = [try_to_load_from_cache(repo, part) for part in name.split("+")]
        return paths[0] if all(isinstance(path, str) for path in paths) else None

    wanted: list[list[str]] = []  # each entry: alternatives, any one will do
    for need in needs:
        for item in need.files:
            options = ["+".join(_join(need.subfolder, part) for part in _parts(n))
                       for n in (item if isinstance(item, tuple) else (item,))]
            hit = next((o for o in options if cached_path(o)), None)
            if hit is not None and hit.endswith(".index.json"):
                shards = _shards_of(Path(cached_path(hit)))
                wanted += [[_join(need.subfolder, s)] for s in (shards or [])]
            wanted.append(options)
    not_cached = [options for options in wanted if not any(cached_path(o) for o in options)]
    if not not_cached:
        return [], "", True

    if _hub_offline():
        reason = "no local folder of that name, not in the local hub cache, and HF_HUB_OFFLINE is set"
        return [_alternatives(o) for o in not_cached], reason, False
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the hub means the same to the user
        reason = f"no local folder of that name, not in the local hub cache, and the hub could not be asked: {_short(exc)}"
        return [_alternatives(o) for o in not_cached], reason, False
    on_hub = {s.rfilename for s in (info.siblings or [])}
    missing = [_alternatives(o) for o in not_cached if not any(all(p in on_hub for p in _parts(x)) for x in o)]
    return missing, ("not in the repository" if missing else ""), False


def _alternatives(options: list[str]) -> str:
    return " or ".join(" and ".join(_parts(option)) for option in options)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _missing_message(problems: list[str], needs: list[_Need]) -> str:
    flags = ", ".join(f"{_FLAGS[r]} DIR" for r in dict.fromkeys(n.role for n in needs))
    lines = "\n".join(f"  - {p}" for p in problems)
    return (
        f"Model files are missing:\n{lines}\n"
        f"Provide them in one of these ways: pass a local folder laid out like the official repository "
        f"({flags}); point HF_HOME at a Hugging Face cache that holds them; or run once with network "
        f"access (without HF_HUB_OFFLINE) so they are downloaded."
    )


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class SharedComponents:
    """The components both model variants share: text encoders and tokenizers, VAE, image encoder."""

    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    vae: Any
    feature_extractor: Any
    image_encoder: Any


@dataclass
class Components:
    """Everything a generation needs: the shared components, one transformer, its variant name and device."""

    shared: SharedComponents
    transformer: Any
    model: str
    device: torch.device
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def text_encoder(self) -> Any:
        """The LLaMA text encoder."""
        return self.shared.text_encoder

    @property
    def text_encoder_2(self) -> Any:
        """The CLIP-L text encoder."""
        return self.shared.text_encoder_2

    @property
    def tokenizer(self) -> Any:
        """The LLaMA tokenizer."""
        return self.shared.tokenizer

    @property
    def tokenizer_2(self) -> Any:
        """The CLIP tokenizer."""
        return self.shared.tokenizer_2

    @property
    def vae(self) -> Any:
        """The HunyuanVideo VAE."""
        return self.shared.vae

    @property
    def feature_extractor(self) -> Any:
        """The SigLIP image processor."""
        return self.shared.feature_extractor

    @property
    def image_encoder(self) -> Any:
        """The SigLIP vision model."""
        return self.shared.image_encoder


def _local_or_hub(source: str) -> str:
    # from_pretrained does not expand "~"; a local folder is passed as an expanded path.
    local = Path(source).expanduser()
    return str(local) if local.is_dir() else source


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _hub_kwargs(source: str, cached: dict[str, bool]) -> dict[str, Any]:
    # A fully cached hub source is read without any network request (no etag checks, no waiting).
    return {"local_files_only": True} if cached.get(source) else {}


def _wrap(label: str, source: str, subfolder: str, problem: BaseException | str) -> SourceError:
    where = f"{source!r}" + (f", subfolder {subfolder!r}" if subfolder else "")
    reason = problem if isinstance(problem, str) else _short(problem)
    return SourceError(
        f"Could not load the {label} from {where}: {reason}. The files may be incomplete, corrupted or "
        "from a different model; re-download them or point the source flag at a folder laid out like the "
        "official repository."
    )


# Errors that mean "these files are not a loadable checkpoint"; out-of-memory is not one of them.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError)


def _check_loading_info(model: Any, label: str, source: str, subfolder: str, info: dict,
                        ignore_missing: tuple[str, ...] = ()) -> None:
    # A weight missing from the checkpoint would otherwise stay randomly initialised (or, when an
    # index promises a tensor its shard lacks, stay an empty "meta" tensor), silently.
    missing = list(info.get("missing_keys", []))
    missing += [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    missing = sorted({k for k in missing if not k.startswith(ignore_missing)})
    mismatched = [str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", [])]
    bad = missing + mismatched
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        kind = "missing" if missing else "of the wrong shape"
        raise _wrap(label, source, subfolder, f"weights {kind} in the checkpoint: {shown}")


def _finish(module: Any) -> Any:
    module.eval()
    module.requires_grad_(False)
    return module.to("cpu")


def _load_model(cls, label: str, source: str, subfolder: str, dtype: torch.dtype, hub: dict, diffusers: bool,
                ignore_missing: tuple[str, ...] = ()) -> Any:
    dtype_kwarg = {"torch_dtype": dtype} if diffusers else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(
            source, subfolder=subfolder or None, use_safetensors=True, output_loading_info=True, **dtype_kwarg, **hub
        )
    except _LOAD_ERRORS as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise _wrap(label, source, subfolder, exc) from exc
    _check_loading_info(model, label, source, subfolder, info, ignore_missing)
    return _finish(model)


def _image_processor_class():
    import transformers

    # The PIL processor gives the same pixels whether or not torchvision is installed.
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


def load_shared(sources: ModelSources, device: str | torch.device = "cpu",
                dtypes: dict[str, torch.dtype] | None = None) -> SharedComponents:
    """Load the shared components for `device`'s dtypes, in eval mode, without gradients, on the CPU."""
    device = _as_device(device)
    dtypes = {**component_dtypes(device), **(dtypes or {})}
    cached = _check(_needs(sources, None))
    return _load_shared(sources, dtypes, cached)


def _load_shared(sources: ModelSources, dtypes: dict[str, torch.dtype], cached: dict[str, bool]) -> SharedComponents:
    from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel, PreTrainedTokenizerFast, SiglipVisionModel

    hub_h, hub_s = _hub_kwargs(sources.hunyuan, cached), _hub_kwargs(sources.siglip, cached)
    hunyuan, siglip = _local_or_hub(sources.hunyuan), _local_or_hub(sources.siglip)

    def processor(cls, subfolder: str, label: str, source: str, hub: dict):
        try:
            return cls.from_pretrained(source, subfolder=subfolder, **hub)
        except _LOAD_ERRORS as exc:
            raise _wrap(label, source, subfolder, exc) from exc

    # transformers 5's LlamaTokenizerFast rebuilds a SentencePiece-style (Metaspace) tokenizer from
    # the vocabulary and merges, ignoring the byte-level pre-tokenizer the official (Llama 3)
    # tokenizer.json declares, and so encodes differently. The generic class reads the file as it is.
    llama_tokenizer = processor(PreTrainedTokenizerFast, "tokenizer", "LLaMA tokenizer", hunyuan, hub_h)
    # The prompt encoder crops the template off the front and keeps the real tokens that follow,
    # which needs padding at the end whatever the class or tokenizer_config.json would default to.
    llama_tokenizer.padding_side = "right"
    clip_tokenizer = processor(CLIPTokenizer, "tokenizer_2", "CLIP tokenizer", hunyuan, hub_h)
    feature_extractor = processor(_image_processor_class(), "feature_extractor", "SigLIP image processor", siglip, hub_s)

    text_encoder = _load_model(LlamaModel, "LLaMA text encoder", hunyuan, "text_encoder",
                               dtypes["text_encoder"], hub_h, diffusers=False)
    text_encoder_2 = _load_model(CLIPTextModel, "CLIP text encoder", hunyuan, "text_encoder_2",
                                 dtypes["text_encoder_2"], hub_h, diffusers=False)
    vae = _load_vae(sources, dtypes["vae"], hub_h, hunyuan)
    # FramePack reads SigLIP's last hidden state; the pooling head is unused, so it may be absent.
    image_encoder = _load_model(SiglipVisionModel, "SigLIP image encoder", siglip, "image_encoder",
                                dtypes["image_encoder"], hub_s, diffusers=False,
                                ignore_missing=("head.", "vision_model.head."))
    return SharedComponents(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=llama_tokenizer,
        tokenizer_2=clip_tokenizer,
        vae=vae,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
    )


def _load_vae(sources: ModelSources, dtype: torch.dtype, hub: dict, hunyuan: str) -> Any:
    """The HunyuanVideo VAE: from hunyuan's vae/, or from --vae (one .safetensors file or a folder like vae/)."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = sources.vae
    if not vae:
        return _load_model(AutoencoderKLHunyuanVideo, "VAE", hunyuan, "vae", dtype, hub, diffusers=True)
    from .single_file import OFFICIAL_VAE_CONFIG, is_single_file

    if is_single_file(vae):
        return _load_single_file(AutoencoderKLHunyuanVideo, "HunyuanVideo VAE", vae, OFFICIAL_VAE_CONFIG, dtype)
    return _load_model(AutoencoderKLHunyuanVideo, "VAE", _local_or_hub(vae), "", dtype, {}, diffusers=True)


def _load_single_file(cls, label: str, source: str, official: dict, dtype: torch.dtype) -> Any:
    """A model from one .safetensors file (single_file.py); its problems as SourceError."""
    from .single_file import SingleFileError, load_single_file

    try:
        model = load_single_file(cls, source, official, dtype, describe=label)
    except SingleFileError as exc:
        raise SourceError(f"{exc} Point the flag at a {label} checkpoint (.safetensors), or at a folder laid out "
                          "like the official repository.") from None
    except _LOAD_ERRORS as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise _wrap(label, source, "", exc) from exc
    return _finish(model)


def transformer_config(source: str) -> dict:
    """The configuration of a transformer source (folder, hub repo or single file), without loading weights."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from .single_file import OFFICIAL_TRANSFORMER_CONFIG, SingleFileError, file_config, is_single_file

    try:
        if is_single_file(source):
            return file_config(source, OFFICIAL_TRANSFORMER_CONFIG)
        if not Path(source).expanduser().is_dir():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            if isinstance(cached, str):  # read from the cache without asking the hub
                return json.loads(Path(cached).read_text(encoding="utf-8"))
        return dict(HunyuanVideoFramepackTransformer3DModel.load_config(_local_or_hub(source)))
    except (SingleFileError, *_LOAD_ERRORS) as exc:
        raise _wrap("FramePack transformer's configuration", source, "", exc) from exc


def keep_proj_out_fp32(transformer: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Run the transformer's final projection in fp32 (weights and input); returns the removable hook handle."""
    proj_out = transformer.proj_out
    proj_out.to(torch.float32)

    def to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
        # A later whole-model .to(dtype) would cast proj_out down again; undo that here (a small layer).
        if module.weight.dtype != torch.float32:
            module.to(torch.float32)
        return tuple(a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    return proj_out.register_forward_pre_hook(to_fp32)


def load_transformer(source: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """Load a FramePack transformer (official layout) in `device`'s dtype, in eval mode, on the CPU."""
    device = _as_device(device)
    dtype = dtype or component_dtypes(device)["transformer"]
    cached = _check([_Need("transformer", source, "", _TRANSFORMER_FILES)])
    return _load_transformer(source, dtype, cached)


def _load_transformer(source: str, dtype: torch.dtype, cached: dict[str, bool]) -> Any:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from .single_file import OFFICIAL_TRANSFORMER_CONFIG, is_single_file

    if is_single_file(source):  # one .safetensors file, as ComfyUI keeps it (bf16, fp16 or fp8)
        transformer = _load_single_file(HunyuanVideoFramepackTransformer3DModel, "FramePack transformer", source,
                                        OFFICIAL_TRANSFORMER_CONFIG, dtype)
    else:
        transformer = _load_model(HunyuanVideoFramepackTransformer3DModel, "FramePack transformer",
                                  _local_or_hub(source), "", dtype, _hub_kwargs(source, cached), diffusers=True)
    config = transformer.config
    if not (config.get("has_image_proj") and config.get("has_clean_x_embedder")):
        raise SourceError(
            f"The transformer at {source!r} is not a FramePack transformer: its config.json lacks "
            "has_image_proj/has_clean_x_embedder. Point --transformer at a FramePack checkpoint "
            "(e.g. lllyasviel/FramePackI2V_HY)."
        )
    if dtype != torch.float32:
        # The last projection decides the velocity the sampler integrates; bf16 rounding there
        # shows up as noise in the video, and the layer is tiny, so it stays in fp32.
        transformer.proj_out_fp32_hook = keep_proj_out_fp32(transformer)
    return transformer


def load_components(sources: ModelSources, model: str, device: str | torch.device = "auto") -> Components:
    """Check all sources, then load the shared components and `model`'s transformer, all on the CPU."""
    device = _as_device(device)
    if model not in MODEL_VARIANTS:
        raise SettingsError(f"model must be one of {', '.join(MODEL_VARIANTS)}, not {model!r}.")
    dtypes = component_dtypes(device)
    # One check up front, so a missing transformer is reported before gigabytes of encoders load.
    cached = _check(_needs(sources, model))
    shared = _load_shared(sources, dtypes, cached)
    transformer = _load_transformer(sources.transformer(model), dtypes["transformer"], cached)
    return Components(shared=shared, transformer=transformer, model=model, device=device, dtypes=dtypes)
