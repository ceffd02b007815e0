"""torch.compile of the transformer's blocks (regional compilation), and whether this platform can do it.

Only the blocks are compiled, one compiled function per block class (the 20 double-stream blocks
share one, the 40 single-stream blocks another), so compiling takes two block graphs' time
instead of the whole model's. Each block's own forward is compiled and put in place as the
block's `forward` *before* any of our hooks go on: weight streaming, TeaCache and MagCache wrap
the compiled forward from the outside and stay plain Python (they swap parameters, read
tensors' values and count calls, which a compiled graph would break on), while the fp8 layers'
upcast inside a block is traced into the compiled graph.

diffusers' `compile_repeated_blocks` does regional compilation too, but through
`nn.Module.compile`, which compiles the whole module call including the hooks we add and remove
around it; hence this small version.

Importing this module does no work; `check_compile` runs a trial compile (seconds).
"""

from __future__ import annotations

import functools
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CompileUnavailable", "check_compile", "compile_blocks", "CompiledBlocks"]


class CompileUnavailable(ValueError):
    """torch.compile cannot run on this platform or device; the message says why and what would fix it."""


def check_compile(device: torch.device | str) -> None:
    """Raise CompileUnavailable when torch.compile can't compile for `device` here (tries a tiny function)."""
    from torch import _dynamo

    device = torch.device(device)
    if not _dynamo.is_dynamo_supported():
        raise CompileUnavailable(
            f"torch.compile does not support this Python ({platform.python_version()}) with PyTorch "
            f"{torch.__version__}; run without compiling, or use a Python that PyTorch supports for compiling.")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            hint = " (on Windows: pip install triton-windows)" if sys.platform == "win32" else " (pip install triton)"
            raise CompileUnavailable(f"Compiling for the GPU needs Triton, which is not installed{hint}; "
                                     "or run without compiling.")
    _trial(device)


@functools.cache
def _trial(device: torch.device) -> None:
    """Compile and run a tiny function on `device` once per process; CompileUnavailable with the reason."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x) * 2 + 1

    try:
        x = torch.linspace(-1, 1, 16, device=device)
        got = torch.compile(probe)(x)
        ok = torch.allclose(got, probe(x), atol=1e-5)
    except Exception as exc:  # noqa: BLE001 - a missing compiler, backend or driver shows up as any error
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        needs = " It needs a C++ compiler on the PATH (gcc, clang or MSVC)." if device.type == "cpu" else ""
        raise CompileUnavailable(f"torch.compile does not work on {device} here: {reason}.{needs} "
                                 "Run without compiling.") from None
    if not ok:
        raise CompileUnavailable(f"torch.compile gives wrong results on {device} here; run without compiling.")


@dataclass
class CompiledBlocks:
    """The blocks whose forward was replaced by a compiled one; `remove` puts the original forward back."""

    blocks: list = field(default_factory=list)
    functions: dict = field(default_factory=dict)  # block class -> compiled function
    removed: bool = False

    def remove(self) -> None:
        """Go back to the blocks' own forward; refused while another hook still wraps the compiled one."""
        if self.removed:
            return
        for block in self.blocks:
            if hasattr(block, "_diffusers_hook") and block._diffusers_hook.hooks:
                raise ValueError(f"{type(block).__name__} still has hooks; remove them before the compiled forward.")
        for block in self.blocks:
            vars(block).pop("forward", None)
        self.blocks, self.removed = [], True


def _bound(compiled, block: torch.nn.Module):
    def forward(*args: Any, **kwargs: Any):
        return compiled(block, *args, **kwargs)

    return forward


def compile_blocks(transformer: torch.nn.Module, **options: Any) -> CompiledBlocks:
    """Compile the transformer's blocks, one function per block class; `options` go to torch.compile.

    Must come before any hook goes on a block (it replaces the block's forward, which hooks wrap).
    """
    blocks = [*getattr(transformer, "transformer_blocks", ()), *getattr(transformer, "single_transformer_blocks", ())]
    if not blocks:
        raise ValueError("Compiling needs a HunyuanVideo-style transformer with transformer blocks.")
    for block in blocks:
        if "forward" in vars(block) or getattr(block, "_diffusers_hook", None) is not None:
            raise ValueError(f"A {type(block).__name__} already has its forward replaced (hooks or compiled); "
                             "compile the blocks first.")
    handle = CompiledBlocks()
    for block in blocks:
        cls = type(block)
        if cls not in handle.functions:
            # the class's function, compiled once: every block of the class is an argument to it
            handle.functions[cls] = torch.compile(cls.forward, **options)
        block.forward = _bound(handle.functions[cls], block)
        handle.blocks.append(block)
    return handle
