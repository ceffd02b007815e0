"""Command-line flags built from the settings, model sources from flags, and the one-line user error.

The flags of `generate`, `resume`, the app (`demo_gradio.py`) and the benchmarks come from here:
every `GenerationSettings` field becomes `--name-with-dashes` with its help and range, so a new
setting is one field in `settings.py`. Flags are read as text and validated by the settings, which
say which setting is wrong and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from .events import Advice, with_advice
from .settings import ATTENTION_CHOICES, MODEL_VARIANTS, VRAM_CHOICES, GenerationSettings, ModelSources

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_CANCELLED = 130

ATTENTION_HELP = ("attention kernel: auto (flash-attn or xFormers when installed on an NVIDIA GPU, else PyTorch "
                  "SDPA), sdpa, flash, sage or xformers (default: %(default)s)")
DEVICE_HELP = "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: %(default)s)"
COMPILE_HELP = ("compile the transformer's blocks with torch.compile: faster steps after a first slow one "
                "(needs Triton on NVIDIA GPUs, a C++ compiler on the CPU); refused where it can't work")
VRAM_HELP = ("keep every model on the GPU (high) or give each stage only its models and stream the "
             "transformer's blocks (low); auto: high when the free GPU memory holds everything (default: %(default)s)")

# What the command line and the app's flags tell a user to do after a failure.
ADVICE_WORDING: Mapping[Advice, str] = MappingProxyType({
    Advice.CLOSE_GPU_PROGRAMS: "close other programs that use the GPU",
    Advice.LOW_VRAM_MODE: "use low-VRAM mode (--vram low, or --vram auto)",
    Advice.PRESERVE_MORE_MEMORY: "raise --gpu-memory-preservation (GB kept free on the GPU)",
    Advice.SMALLER_JOB: "lower the resolution or the latent window",
    Advice.USE_CPU: "run on the CPU (--device cpu; very slow)",
})


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake on one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def one_line(message: str) -> str:
    """A message written for the page (it may span lines) as one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def user_error(message: str, advice: Iterable[Advice] = ()) -> int:
    """Print a user's mistake as one line on stderr (with what to do); returns the exit status 2."""
    print(f"error: {one_line(with_advice(str(message), tuple(advice), ADVICE_WORDING))}", file=sys.stderr)
    return EXIT_USER_ERROR


def describe_failure(message: str, advice: Iterable[Advice] = ()) -> str:
    """A failed job's message with what to do, in the command line's words."""
    return with_advice(message, tuple(advice), ADVICE_WORDING)


# ---------------------------------------------------------------------------------------------
# Settings


def setting_flag(name: str) -> str:
    """The flag of a setting: `gpu_memory_preservation` -> `--gpu-memory-preservation` (or the name its field gives)."""
    named = GenerationSettings.__dataclass_fields__[name].metadata.get("flag")
    return named if isinstance(named, str) else "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, names: Optional[Iterable[str]] = None, *,
                           defaults: Optional[Mapping[str, Any]] = None, required: Iterable[str] = (),
                           aliases: Optional[Mapping[str, Iterable[str]]] = None,
                           help: Optional[Mapping[str, str]] = None) -> None:
    """Add a flag for each GenerationSettings field (or those in `names`), with its help and range.

    A flag left out keeps the settings' default (or the one in `defaults`). Numbers stay text
    until `settings_from_args` hands them to the settings, which check them.
    """
    wanted = None if names is None else set(names)
    defaults, aliases, help = dict(defaults or {}), dict(aliases or {}), dict(help or {})
    for f in dataclasses.fields(GenerationSettings):
        if (wanted is not None and f.name not in wanted) or not f.metadata.get("flag", True):
            continue
        meta = f.metadata
        text = help.get(f.name, meta["help"])
        rng = meta.get("range")
        if rng is not None:
            text = f"{text} ({_allowed(rng)})"
        default = defaults.get(f.name)
        flags = [setting_flag(f.name), *aliases.get(f.name, ())]
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action="store_true", default=default, help=text)
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                help=meta.get("negative_help") or f"do not {text}")
            continue
        if meta.get("item") is not None:  # a tuple of items, one per repeated flag
            parser.add_argument(*flags, dest=f.name, action="append", default=default, help=f"{text} (repeatable)",
                                metavar=meta.get("metavar"))
            continue
        parser.add_argument(*flags, dest=f.name, default=default, help=text, required=f.name in required,
                            choices=list(meta["choices"]) if meta.get("choices") else None,
                            metavar=meta.get("metavar"))
        for flag, (value, const_help) in (meta.get("consts") or {}).items():  # e.g. --teacache for --cache teacache
            parser.add_argument(flag, dest=f.name, action="store_const", const=value, help=const_help)


def _allowed(rng) -> str:
    """A range as the help shows it: '1-120', or '0 or more' when the top is too large to mean anything."""
    if rng.high >= 2**32:
        return f"{rng.low:g} or more"
    return f"{rng.low:g}-{rng.high:g}"


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> GenerationSettings:
    """GenerationSettings from the parsed setting flags that were given (and `overrides`); SettingsError if invalid."""
    return GenerationSettings(**{**given_settings(args), **overrides})


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings whose flags were given, by name (repeated flags as tuples, files read); not yet checked."""
    values = {}
    for f in dataclasses.fields(GenerationSettings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        item, parse = f.metadata.get("item"), f.metadata.get("parse")
        if parse is not None and isinstance(value, str):  # e.g. a file holding the value
            value = parse(value)
        values[f.name] = tuple(item(text) for text in value) if item is not None and isinstance(value, list) else value
    return values


# ---------------------------------------------------------------------------------------------
# Where and how models run


def add_runtime_arguments(parser: argparse.ArgumentParser, *, device_default: str = "auto",
                          attention_default: str = "auto", vram_flags: Iterable[str] = ("--vram",),
                          vram_dest: str = "vram", compile_flag: bool = True) -> None:
    """--device, --vram, --attention and --compile (checked when the runtime opens, before any model loads)."""
    parser.add_argument("--device", default=device_default, metavar="NAME", help=DEVICE_HELP)
    parser.add_argument(*vram_flags, dest=vram_dest, default="auto", choices=list(VRAM_CHOICES), help=VRAM_HELP)
    parser.add_argument("--attention", default=attention_default, choices=list(ATTENTION_CHOICES), help=ATTENTION_HELP)
    if compile_flag:
        parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--ray ADDRESS|local, --workers, --gpus-per-worker, --cpus-per-worker (scale-out, see scaleout.py)."""
    parser.add_argument("--ray", metavar="ADDRESS", help="run the jobs on Ray workers: local (a Ray cluster on this "
                                                         "machine, all its GPUs) or the address of a running cluster "
                                                         "(needs pip install .[ray])")
    parser.add_argument("--workers", type=int, metavar="N", help="with --ray: how many workers (default: one per "
                                                                 "--gpus-per-worker GPUs; one without GPUs)")
    parser.add_argument("--gpus-per-worker", type=float, default=1.0, metavar="G",
                        help="with --ray: GPUs each worker takes (default: 1)")
    parser.add_argument("--cpus-per-worker", type=int, metavar="N", help="with --ray on a cluster without GPUs: "
                                                                         "CPU cores each worker takes (default: all "
                                                                         "of them shared out among the workers)")


def cluster_options(args: argparse.Namespace):
    """The scale-out options of the flags (a scaleout.ClusterOptions), None without --ray; ValueError for a
    mistake or when Ray is not installed."""
    if getattr(args, "ray", None) is None:
        for flag in ("workers", "cpus_per_worker"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} only goes with --ray.")
        return None
    from .scaleout import ClusterOptions, import_ray

    options = ClusterOptions(args.ray.strip(), args.workers, args.gpus_per_worker, args.cpus_per_worker)
    import_ray()
    return options


def add_lora_dir_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """--lora-dir DIR (default: loras), with `help` saying what the command looks for there."""
    parser.add_argument("--lora-dir", metavar="DIR", default="loras", help=f"{help} (default: loras)")


def add_source_arguments(parser: argparse.ArgumentParser, *, per_variant: bool = False) -> None:
    """Model source flags: --hunyuan, --siglip, --transformer, --tiny (and one flag per variant's transformer)."""
    parser.add_argument("--hunyuan", metavar="SRC", help="HunyuanVideo text encoders, tokenizers and VAE: hub repo id or local folder")
    parser.add_argument("--siglip", metavar="SRC", help="SigLIP image encoder: hub repo id or local folder")
    parser.add_argument("--transformer", metavar="SRC", help="FramePack transformer for the chosen model: hub repo id, "
                                                            "local folder or one .safetensors file (bf16, fp16 or fp8)")
    parser.add_argument("--vae", metavar="SRC", help="HunyuanVideo VAE instead of the one in --hunyuan: one .safetensors "
                                                    "file or a folder laid out like vae/")
    parser.add_argument("--tiny", action="store_true", help="use tiny random-weight models (built once into a cache folder) to try the whole path in seconds")
    if per_variant:
        parser.add_argument("--framepack-transformer", metavar="SRC", help="FramePack transformer: hub repo id, local "
                                                                          "folder or one .safetensors file")
        parser.add_argument("--f1-transformer", metavar="SRC", help="FramePack-F1 transformer: hub repo id, local folder "
                                                                   "or one .safetensors file")


def sources_from_args(args: argparse.Namespace, model: str) -> ModelSources:
    """ModelSources from the source flags: tiny models first, explicit flags override (--transformer for `model`)."""
    if getattr(args, "tiny", False):
        from .tiny import tiny_sources

        sources = tiny_sources()
    else:
        sources = ModelSources()
    if args.hunyuan:
        sources = dataclasses.replace(sources, hunyuan=args.hunyuan)
    if args.siglip:
        sources = dataclasses.replace(sources, siglip=args.siglip)
    if args.vae:
        sources = dataclasses.replace(sources, vae=args.vae)
    if args.transformer:
        sources = sources.with_transformer(model, args.transformer)
    for variant in MODEL_VARIANTS:
        source = getattr(args, f"{variant}_transformer", None)
        if source:
            sources = sources.with_transformer(variant, source)
    return sources
