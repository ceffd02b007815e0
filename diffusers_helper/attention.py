"""Choosing the transformer's attention kernel through diffusers' attention backends.

PyTorch's scaled-dot-product attention (SDPA) is the default and works everywhere. flash-attn,
SageAttention and xFormers are used when installed and asked for (CUDA only); `auto` takes the
first installed exact kernel (flash-attn, then xFormers) and otherwise SDPA. SageAttention
quantizes q and k to 8 bits, so it is never chosen by `auto`, only by name.

Importing this module does no work; nothing here touches CUDA until a backend is applied.
"""

from __future__ import annotations

import importlib.util

import torch

from .settings import ATTENTION_CHOICES

# our names -> diffusers' AttentionBackendName values
_BACKENDS = {"sdpa": "native", "flash": "flash", "sage": "sage", "xformers": "xformers"}
# the package each needs, as imported and as installed
_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention"),
             "xformers": ("xformers", "xformers")}
_AUTO_ORDER = ("flash", "xformers")


class AttentionUnavailable(ValueError):
    """The chosen attention kernel cannot be used here; the message says why and what to do."""


def installed(name: str) -> bool:
    """Whether the package behind attention kernel `name` can be imported (SDPA always can)."""
    if name == "sdpa":
        return True
    module, _ = _PACKAGES[name]
    return importlib.util.find_spec(module) is not None


def resolve_attention(choice: str, device: torch.device | str) -> str:
    """The kernel to use for --attention `choice` on `device` (one of sdpa, flash, sage, xformers)."""
    choice = (choice or "auto").strip().lower()
    if choice not in ATTENTION_CHOICES:
        raise AttentionUnavailable(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, not {choice!r}.")
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cuda":
            for name in _AUTO_ORDER:
                if installed(name):
                    return name
        return "sdpa"
    if choice == "sdpa":
        return choice
    module, package = _PACKAGES[choice]
    if not installed(choice):
        raise AttentionUnavailable(
            f"--attention {choice} needs the '{package}' package, which is not installed: install it into this "
            f"environment (pip install {package}) or use --attention sdpa (always available) or auto."
        )
    if device.type != "cuda":
        raise AttentionUnavailable(f"--attention {choice} runs on NVIDIA GPUs only; on {device.type} use sdpa or auto.")
    return choice


def set_attention(transformer, choice: str, device: torch.device | str) -> str:
    """Make the transformer's attention use the kernel for `choice`; returns the kernel's name."""
    name = resolve_attention(choice, device)
    try:
        transformer.set_attention_backend(_BACKENDS[name])
    except (RuntimeError, ImportError) as exc:  # an installed package that diffusers finds too old or broken
        raise AttentionUnavailable(f"--attention {name} cannot be used: {exc} Use --attention sdpa instead.") from exc
    return name
