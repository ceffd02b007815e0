"""Device placement: which model is on the accelerator, and when.

High-VRAM mode keeps every model resident on the device. Low-VRAM mode gives each stage only the
models it needs and returns them to CPU afterwards; residency is a context manager so an error
in a stage never leaves a model stranded on the GPU.
"""

from __future__ import annotations

import contextlib
import enum
import gc
from dataclasses import dataclass
from typing import Iterator

import torch


class VramMode(str, enum.Enum):
    """How models are kept on the accelerator."""

    HIGH = "high"
    LOW = "low"


@dataclass
class Placement:
    """Where models live for a job: the compute device and the residency mode."""

    device: torch.device
    mode: VramMode = VramMode.HIGH

    @property
    def offloads(self) -> bool:
        """Whether models go back to CPU between stages."""
        return self.mode is VramMode.LOW and self.device.type != "cpu"

    @contextlib.contextmanager
    def use(self, *modules: torch.nn.Module) -> Iterator[None]:
        """Put `modules` on the device for the duration of a stage."""
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            if self.offloads:
                for module in modules:
                    module.to("cpu")
                empty_cache(self.device)


# Below this much GPU memory the models do not all fit next to the activations (the reference's threshold).
HIGH_VRAM_MIN_BYTES = 60 * 1024**3


def choose_vram_mode(requested: str, device) -> VramMode:
    """VramMode for --vram: 'high'/'low' as asked; 'auto' keeps everything resident on GPUs of 60 GiB or more."""
    if requested in ("high", "low"):
        return VramMode(requested)
    if requested != "auto":
        raise ValueError(f"--vram must be auto, high or low, not {requested!r}.")
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return VramMode.HIGH if total >= HIGH_VRAM_MIN_BYTES else VramMode.LOW
    return VramMode.HIGH


def empty_cache(device: torch.device) -> None:
    """Give cached accelerator memory back after a model leaves the device."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an accelerator (or host) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
