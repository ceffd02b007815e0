"""Device placement: which model is on the accelerator, and when; and whether a job fits at all.

High-VRAM mode keeps every model resident on the device. Low-VRAM mode gives each stage only the
models it needs: small models move whole, while the transformer and the LLaMA text encoder keep
as many leading blocks resident as the free memory allows (leaving the user's "GPU Inference
Preserved Memory" free) and stream the rest through a small ring buffer (`offload.py`). Residency
is a context manager, so an error in a stage never leaves a model stranded on the GPU; leaving
the device restores the models' original CPU tensors (the memory-mapped checkpoints) instead of
copying anything back.

Before a job starts, `Placement.check` compares what the job needs with the free GPU memory and
system RAM and raises `InsufficientMemory` with what to change when no mode can run it.

Importing this module does no work and does not touch CUDA.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .events import Advice, AdviceError
from .offload import (
    OffloadPlan,
    StagingPool,
    TransferStats,
    module_tensors,
    offloaded,
    plan_offload,
    resident,
    streamable_blocks,
    tensors_bytes,
)

GIB = 1024**3


class VramMode(str, enum.Enum):
    """How models are kept on the accelerator."""

    HIGH = "high"
    LOW = "low"


class InsufficientMemory(AdviceError):
    """The machine cannot run this job (in this mode); the message says why, `advice` what to change."""


# Free GPU memory from which 'auto' keeps every model resident when the models' sizes are not known:
# the full models take about 42 GB in 16-bit, plus the working memory of a 720p section.
HIGH_VRAM_MIN_BYTES = 60 * GIB


# ---------------------------------------------------------------------------------------------
# What the machine has


def device_free_bytes(device: torch.device | str, limit_bytes: Optional[int] = None) -> Optional[int]:
    """Accelerator memory this process could still allocate (None for the CPU).

    CUDA: the driver's free memory after returning PyTorch's cached blocks, and at most
    `limit_bytes` minus what this process holds (the cap set by `apply_memory_limit`). MPS: the
    recommended working-set size minus what the Metal driver has allocated.
    """
    device = torch.device(device)
    if device.type == "cuda":
        empty_cache(device)
        free, _ = torch.cuda.mem_get_info(device)
        if limit_bytes is not None:
            free = min(free, int(limit_bytes) - torch.cuda.memory_reserved(device))
        return max(int(free), 0)
    if device.type == "mps":
        empty_cache(device)
        return max(int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), 0)
    return None


def system_memory() -> tuple[int, int]:
    """(total, available) system RAM in bytes."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def apply_memory_limit(device: torch.device | str, limit_bytes: Optional[int]) -> None:
    """Cap what PyTorch's allocator may take on a CUDA device (e.g. to act as a 6 GB GPU)."""
    if limit_bytes is None:
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("--vram-limit-gb needs a CUDA device.")
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_bytes > total:
        raise ValueError(f"--vram-limit-gb {limit_bytes / GIB:.1f} is more than the GPU has ({total / GIB:.1f} GiB).")
    torch.cuda.set_per_process_memory_fraction(limit_bytes / total, device)


def choose_vram_mode(requested: str, device, *, free_bytes: Optional[int] = None,
                     need_bytes: Optional[int] = None) -> VramMode:
    """VramMode for --vram: 'high'/'low' as asked; 'auto' keeps everything resident when the free GPU memory holds it.

    The free memory is measured now (`torch.cuda.mem_get_info`) unless `free_bytes` is given;
    `need_bytes` is what high-VRAM mode needs (default: 60 GiB). A CPU is always 'high'.
    """
    if requested in ("high", "low"):
        return VramMode(requested)
    if requested != "auto":
        raise ValueError(f"--vram must be auto, high or low, not {requested!r}.")
    device = torch.device(device)
    if device.type == "cpu":
        return VramMode.HIGH
    if free_bytes is None:
        free_bytes = device_free_bytes(device)
    need = HIGH_VRAM_MIN_BYTES if need_bytes is None else need_bytes
    return VramMode.HIGH if free_bytes is not None and free_bytes >= need else VramMode.LOW


def release_host_memory() -> bool:
    """Hand freed system memory back to the OS (glibc's malloc_trim); True where that exists.

    A section allocates and frees gigabytes of short-lived buffers (decoded frames, the VAE's
    feature maps, the latents file); glibc keeps freed heap memory for reuse, so without a trim the
    process's resident memory creeps up over a long video. Elsewhere (Windows, macOS, musl) the
    allocator returns memory by itself or offers no such call.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def empty_cache(device: torch.device) -> None:
    """Give cached accelerator memory back after a model leaves the device."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an accelerator (or host) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------
# What a job needs


# SigLIP so400m at 384 px gives 27 × 27 image tokens; the prompt is at most 256 LLaMA tokens.
IMAGE_TOKENS = 729
TEXT_TOKENS = 256
# FramePack's packed context per section, in units of one latent frame's tokens: the window, the
# start latent and the 1x frame (2), the 2x history (2 frames pooled 2×2×2: 1/4) and the 4x
# history (16 frames pooled 4×4×4: 1/4).
CONTEXT_FRAMES = 2.5
# The HunyuanVideo VAE decodes 16 frames (4 latent frames and the causal one) at a time when tiled,
# on 256-px tiles.
VAE_TILE_PX = 256
VAE_TILE_FRAMES = 17
# Live full-resolution feature maps at the decoder's widest point (input, norm, conv, residual...).
VAE_LIVE_MAPS = 6
# Headroom on top of the buffers counted here; the process's own memory (Python, libraries, CUDA
# context, the loaded models) is already allocated when a job is checked.
HOST_MARGIN_BYTES = 512 * 1024**2


def transformer_tokens(height: int, width: int, window: int) -> int:
    """Image tokens of one section's packed input (2×2 patches of the 8× latent) plus the text and image tokens."""
    per_frame = (height // 16) * (width // 16)
    return int(per_frame * (window + CONTEXT_FRAMES)) + TEXT_TOKENS + IMAGE_TOKENS


def transformer_activation_bytes(tokens: int, hidden: int, ff: int, itemsize: int) -> int:
    """Peak working memory of one transformer block's forward (estimate).

    The single-stream block holds at once the input and normed states, q, k, v and the attention
    output (about 6 × hidden per token), the MLP's pre- and post-activation (2 × ff), the
    concatenation fed to its output projection (hidden + ff) and the residual: 8·hidden + 3·ff.
    """
    return int(tokens * (8 * hidden + 3 * ff) * itemsize)


def vae_decode_bytes(height: int, width: int, frames: int, channels: int, itemsize: int, tiled: bool) -> int:
    """Working memory of decoding one section with the HunyuanVideo VAE (estimate)."""
    if tiled:
        height, width, frames = min(height, VAE_TILE_PX), min(width, VAE_TILE_PX), min(frames, VAE_TILE_FRAMES)
    return int(channels * frames * height * width * itemsize * VAE_LIVE_MAPS)


@dataclass(frozen=True)
class JobNeeds:
    """Memory a job needs, from the models' sizes and its settings (estimates, in bytes)."""

    stages: dict  # stage name -> device bytes it needs at least in low-VRAM mode
    high_device_bytes: int  # every model resident plus the largest working memory
    ram_bytes: int  # private system memory beyond the loaded models
    transformer_bytes: int  # the transformer's weights (read from RAM at every step when streamed)

    @property
    def low_device_bytes(self) -> int:
        """What low-VRAM mode needs: its most demanding stage."""
        return max(self.stages.values())

    @property
    def largest_stage(self) -> str:
        """The name of the most demanding stage in low-VRAM mode."""
        return max(self.stages, key=self.stages.get)


def _blocks_split(module) -> tuple[int, int, int]:
    """(fixed bytes, largest block, all blocks) of a streamable model; (all, 0, 0) otherwise."""
    total = tensors_bytes(module_tensors(module))
    blocks = streamable_blocks(module)
    if not blocks:
        return total, 0, 0
    sizes = [tensors_bytes(module_tensors(b)) for b in blocks]
    return total - sum(sizes), max(sizes), sum(sizes)


def estimate_needs(components, settings, height: int, width: int, *, staging_buffers: int = 2,
                   pinned: bool = True) -> JobNeeds:
    """JobNeeds of a job at a bucket size, from the loaded components and the settings."""
    transformer = components.transformer
    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    ff = int(hidden * config.mlp_ratio)
    itemsize = next(transformer.transformer_blocks.parameters()).element_size()
    activations = transformer_activation_bytes(transformer_tokens(height, width, settings.window), hidden, ff, itemsize)

    t_fixed, t_block, t_blocks = _blocks_split(transformer)
    l_fixed, l_block, _ = _blocks_split(components.text_encoder)
    clip = tensors_bytes(module_tensors(components.text_encoder_2))
    siglip = tensors_bytes(module_tensors(components.image_encoder))
    vae = components.vae
    vae_bytes = tensors_bytes(module_tensors(vae))
    vae_channels = vae.config.block_out_channels[0]
    vae_item = next(vae.parameters()).element_size()
    frames = settings.window * 4 + 1
    # small working sets (prompt of 256 tokens, one 384-px image) get a flat allowance
    small = 256 * 1024**2
    stages = {
        "text encoding": clip + l_fixed + l_block + small,
        "image encoding": siglip + small,
        "VAE decoding": vae_bytes + vae_decode_bytes(height, width, frames, vae_channels, vae_item, tiled=True),
        "sampling": t_fixed + t_block + activations,
    }
    everything = sum(tensors_bytes(module_tensors(m)) for m in
                     (transformer, components.text_encoder, components.text_encoder_2, components.image_encoder, vae))
    untiled = vae_decode_bytes(height, width, frames, vae_channels, vae_item, tiled=False)
    high = everything + max(activations, untiled)
    staging = staging_buffers * max(t_block, l_block) if pinned else 0
    # decoded frames of a section (float32, then uint8 for the writer) and the latents around them
    frames_bytes = frames * height * width * 3 * (4 + 1) * 2
    ram = staging + frames_bytes + HOST_MARGIN_BYTES
    return JobNeeds(stages=stages, high_device_bytes=high, ram_bytes=ram, transformer_bytes=t_fixed + t_blocks)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(needs: JobNeeds, *, mode: VramMode, device_type: str, free_device_bytes: Optional[int],
               available_ram_bytes: int) -> None:
    """Raise InsufficientMemory, saying what to change, when the job cannot run with these free resources.

    `free_device_bytes` is the accelerator memory free for the job's models (None on the CPU, where
    only RAM is checked); in high-VRAM mode it should count models already resident as free.
    """
    if available_ram_bytes < needs.ram_bytes:
        raise InsufficientMemory(
            f"Not enough system memory: this job needs about {_gb(needs.ram_bytes)} of free RAM besides the "
            f"models, and {_gb(available_ram_bytes)} is available. Close other programs, lower the resolution "
            "or the latent window, or add swap space."
        )
    if device_type == "cpu" or free_device_bytes is None:
        return
    low = needs.low_device_bytes
    if free_device_bytes < low:
        raise InsufficientMemory(
            f"Not enough GPU memory: even with the models streamed, this job needs about {_gb(low)} free on the "
            f"GPU (for {needs.largest_stage}), and {_gb(free_device_bytes)} is free.",
            (Advice.SMALLER_JOB, Advice.CLOSE_GPU_PROGRAMS, Advice.USE_CPU),
        )
    if mode is VramMode.HIGH and free_device_bytes < needs.high_device_bytes:
        raise InsufficientMemory(
            f"Not enough GPU memory to keep every model on the GPU: that needs about {_gb(needs.high_device_bytes)} "
            f"and {_gb(free_device_bytes)} is free; with the models streamed the job needs about {_gb(low)}.",
            (Advice.LOW_VRAM_MODE,),
        )


def ram_notice(needs: JobNeeds, total_ram_bytes: int, mode: VramMode) -> Optional[str]:
    """A warning when streaming will re-read the transformer from disk at every step (RAM smaller than it)."""
    if mode is VramMode.LOW and total_ram_bytes < needs.transformer_bytes + needs.ram_bytes:
        return (f"This machine has {_gb(total_ram_bytes)} of RAM, less than the transformer's "
                f"{_gb(needs.transformer_bytes)} plus the job's own memory: its weights will be read from disk "
                "again at every step, which is slow. Close other programs to leave the system more file cache.")
    return None


# ---------------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class PlacementEvent:
    """A stage taking models onto the device ('load') or releasing them ('unload')."""

    kind: str
    modules: tuple
    plans: tuple = ()


@dataclass(eq=False)
class Placement:
    """Where models live for a job: the compute device, the residency mode and how low mode streams.

    `memory_limit_bytes` caps the device memory it plans with (see `apply_memory_limit`);
    `available`, when given, replaces the measurement of free device memory (tests, fixed budgets);
    `ring_blocks` is the streaming ring's size in largest blocks; `headroom_bytes` stay free beside
    resident blocks even when a stage asks to preserve less (working memory of the text encoder);
    `observer` hears every load and unload.
    """

    device: torch.device
    mode: VramMode = VramMode.HIGH
    memory_limit_bytes: Optional[int] = None
    available: Optional[Callable[[], int]] = None
    ring_blocks: float = 2.0
    staging_buffers: int = 2
    headroom_bytes: int = 256 * 1024**2
    observer: Optional[Callable[[PlacementEvent], None]] = None
    stats: TransferStats = field(default_factory=TransferStats)
    _active: list = field(default_factory=list, init=False, repr=False)
    _staging: Optional[StagingPool] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.mode = VramMode(self.mode)

    @property
    def offloads(self) -> bool:
        """Whether models leave the device between stages."""
        return self.mode is VramMode.LOW

    @property
    def on_device(self) -> tuple:
        """The modules in use by the current stage (resident or streaming)."""
        return tuple(self._active)

    def available_bytes(self) -> Optional[int]:
        """Device memory free for the next model (None on a CPU without a budget)."""
        if self.available is not None:
            return int(self.available())
        return device_free_bytes(self.device, self.memory_limit_bytes)

    def plan_for(self, module, blocks: Sequence[torch.nn.Module], preserve_bytes: int = 0,
                 min_resident: int = 0) -> OffloadPlan:
        """The OffloadPlan for a streamable model given the free memory now and the memory to keep free."""
        sizes = [tensors_bytes(module_tensors(b)) for b in blocks]
        fixed = tensors_bytes(module_tensors(module)) - sum(sizes)
        free = self.available_bytes()
        if free is None:  # a CPU: nothing to save by streaming
            return plan_offload(sizes, sum(sizes))
        budget = free - fixed - max(int(preserve_bytes), self.headroom_bytes)
        plan = plan_offload(sizes, budget, ring_blocks=self.ring_blocks, min_resident=min_resident)
        room = free - fixed
        if plan.device_bytes > room:
            # too tight for double buffering: one block at a time, without overlap
            plan = plan_offload(sizes, budget, ring_blocks=1, min_resident=min_resident)
        if plan.device_bytes > room and min_resident:
            plan = plan_offload(sizes, budget, ring_blocks=1)
        if plan.device_bytes > room:
            raise InsufficientMemory(
                f"Not enough GPU memory for {type(module).__name__}: it needs {_gb(fixed + plan.ring_bytes)} "
                f"even with its blocks streamed one at a time, and {_gb(free)} is free.",
                (Advice.CLOSE_GPU_PROGRAMS, Advice.USE_CPU),
            )
        self.stats.plans.append({
            "model": type(module).__name__, "resident_blocks": len(plan.resident), "streamed_blocks": len(plan.streamed),
            "ring_bytes": plan.ring_bytes, "resident_bytes": plan.resident_bytes, "fixed_bytes": fixed,
            "free_bytes": free, "preserve_bytes": int(preserve_bytes),
        })
        return plan

    @contextlib.contextmanager
    def use(self, *modules: torch.nn.Module, preserve_bytes: float = 0, skip_block=None,
            tiling: bool = False) -> Iterator[None]:
        """Put `modules` on the device for the duration of a stage.

        Low-VRAM mode: `preserve_bytes` stay free beside resident blocks of streamed models;
        `skip_block(block)` says a block is bypassed on the current call (a step cache), so it is not
        loaded; `tiling` turns on VAE tiling for the stage. High-VRAM mode moves the modules once
        and leaves them.
        """
        if self.mode is VramMode.HIGH:
            for module in modules:
                moving = [t for t in module_tensors(module) if t.device.type != self.device.type]
                self.stats.host_to_device_bytes += sum(t.numel() * t.element_size() for t in moving)
                module.to(self.device)
            self._enter(modules, ())
            try:
                yield
            finally:
                self._exit(modules)
            return
        plans: list[OffloadPlan] = []
        try:
            with contextlib.ExitStack() as stack:
                split = [(m, streamable_blocks(m)) for m in modules]
                whole = [m for m, blocks in split if blocks is None]
                stack.enter_context(resident([t for m in whole for t in module_tensors(m)], self.device, self.stats))
                if tiling:
                    for m in whole:
                        stack.enter_context(_tiled(m))
                for module, blocks in split:
                    if blocks is None:
                        continue
                    # with step skipping, the block that decides stays resident (see plan_offload)
                    plan = self.plan_for(module, blocks, int(preserve_bytes), min_resident=1 if skip_block else 0)
                    plans.append(plan)
                    stack.enter_context(offloaded(module, blocks, self.device, plan, staging=self._staging_pool(),
                                                  stats=self.stats, skip=skip_block))
                self._enter(modules, tuple(plans))
                yield
        finally:
            self._exit(modules)
            empty_cache(self.device)

    def _staging_pool(self) -> StagingPool:
        if self._staging is None:
            self._staging = StagingPool(self.staging_buffers)
        return self._staging

    def release(self) -> None:
        """Give back the pinned staging buffers (they are otherwise kept for the next stage)."""
        if self._staging is not None:
            self._staging.clear()
            self._staging = None

    def _enter(self, modules, plans) -> None:
        self._active.extend(modules)
        if self.observer is not None:
            self.observer(PlacementEvent("load", tuple(modules), plans))

    def _exit(self, modules) -> None:
        for module in modules:
            if any(m is module for m in self._active):
                self._active.remove(module)
        if self.observer is not None:
            self.observer(PlacementEvent("unload", tuple(modules)))

    # -- before a job ----------------------------------------------------------------------------

    def check(self, components, settings, height: int, width: int) -> JobNeeds:
        """Raise InsufficientMemory when the job cannot run here; returns the estimated needs."""
        needs = estimate_needs(components, settings, height, width, staging_buffers=self.staging_buffers,
                               pinned=self.mode is VramMode.LOW and self.device.type == "cuda")
        free = self.available_bytes()
        if free is not None and self.mode is VramMode.HIGH:
            # models already resident from an earlier job count as free for this one
            free += sum(tensors_bytes(module_tensors(m)) for m in _models(components) if _on(m, self.device))
        _, available_ram = system_memory()
        if self.device.type == "cpu":
            free = None
        check_fits(needs, mode=self.mode, device_type=self.device.type, free_device_bytes=free,
                   available_ram_bytes=available_ram)
        return needs


def _models(components) -> list[Any]:
    return [components.transformer, components.text_encoder, components.text_encoder_2,
            components.image_encoder, components.vae]


def _on(module, device: torch.device) -> bool:
    first = next(iter(module.parameters()), None)
    return first is not None and first.device.type == device.type


@contextlib.contextmanager
def _tiled(module) -> Iterator[None]:
    """VAE tiling (diffusers' enable_tiling) for the duration of a stage, then as it was."""
    if not hasattr(module, "enable_tiling"):
        yield
        return
    was = bool(getattr(module, "use_tiling", False))
    module.enable_tiling()
    try:
        yield
    finally:
        if not was:
            module.disable_tiling()
