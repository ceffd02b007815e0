"""Streaming a model's blocks through a small device buffer, and stage residency of whole modules.

A model too big for the accelerator is split into *fixed* tensors (embedders, norms: always on the
device while the model is in use), *resident* blocks (copied once per stage) and *streamed* blocks
(copied in just before they run). `plan_offload` decides which blocks are which from a byte budget;
it is a pure function so the policy can be tested without a GPU.

Streamed blocks share one device buffer used as a ring: blocks run in a fixed order, so their
weights are loaded into the ring in that order and released in that order (first in, first out).
While one block computes, the next ones are already being copied in:

- on CUDA each block's tensors are first gathered from the (memory-mapped) CPU weights into one of
  a few pinned staging buffers, then copied to the ring by a single asynchronous copy on a side
  stream. Events order everything on the GPU: the compute stream waits for a block's copy, and a
  copy into ring space waits for the compute that last read that space. The CPU never waits for
  the GPU except to reuse a staging buffer whose copy is still in flight;
- on other devices (CPU, Apple MPS) the same steps run synchronously, straight into the ring.

A block's parameters point into the ring only while it runs (``param.data`` is swapped, the module
itself is untouched); before and after, they are the original CPU tensors. Nothing is ever copied
back from the device: weights are frozen, so restoring the CPU tensor is enough. That is also what
keeps system RAM low: the CPU tensors stay the memory-mapped checkpoint pages, never private copies.

The hooks are diffusers `ModelHook`s on the blocks, removed when the stage ends; they coexist with
the step caches' hooks (`teacache.py`, `magcache.py`) and skip the copy of blocks a skipped step
bypasses. fp8 weights (`fp8.py`) stream as the fp8 bytes they are.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from diffusers.hooks import ModelHook

from .hooks import add_hook, remove_hook

__all__ = [
    "ALIGN",
    "OffloadPlan",
    "plan_offload",
    "RingAllocator",
    "StagingPool",
    "TransferStats",
    "BlockStreamer",
    "streamable_blocks",
    "module_tensors",
    "tensors_bytes",
    "resident",
    "offloaded",
]

# Every tensor in the ring (and in staging) starts on this many bytes: enough for any dtype's
# alignment, for CUDA's coalesced copies, and for CPU kernels to take their aligned paths.
ALIGN = 512

_HOOK_NAME = "framepack_stream"


def _aligned(n: int) -> int:
    return (int(n) + ALIGN - 1) // ALIGN * ALIGN


# ---------------------------------------------------------------------------------------------
# Sizes


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of `module` and its children, each tensor once."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            found.append(t)
    return found


def _compute_dtype(t: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    # fp8 weights (fp8.py) stay fp8: they are upcast with their scale by their layer, never by a plain cast
    cast = compute_dtype is not None and t.is_floating_point() and t.element_size() > 1
    return compute_dtype if cast else t.dtype


def tensors_bytes(tensors: Iterable[torch.Tensor], compute_dtype: Optional[torch.dtype] = None) -> int:
    """Device bytes the tensors take in the ring layout (each aligned), in their compute dtype."""
    return sum(_aligned(t.numel() * _itemsize(_compute_dtype(t, compute_dtype))) for t in tensors)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def streamable_blocks(module: torch.nn.Module) -> Optional[list[torch.nn.Module]]:
    """The blocks of a model that can be streamed, in execution order; None for models that are not split.

    FramePack's transformer: its 20 double-stream then 40 single-stream blocks. A LLaMA text encoder:
    its decoder layers. Everything else (CLIP, SigLIP, the VAE) is small enough to move whole.
    """
    double = getattr(module, "transformer_blocks", None)
    single = getattr(module, "single_transformer_blocks", None)
    if isinstance(double, torch.nn.ModuleList) and isinstance(single, torch.nn.ModuleList):
        return [*double, *single]
    layers = getattr(module, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and hasattr(module, "embed_tokens"):
        return list(layers)
    return None


# ---------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class OffloadPlan:
    """Which blocks stay on the device for a stage, which are streamed, and the ring they stream through."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    block_bytes: tuple[int, ...]
    ring_bytes: int
    budget_bytes: int

    @property
    def resident_bytes(self) -> int:
        """Device bytes of the resident blocks."""
        return sum(self.block_bytes[i] for i in self.resident)

    @property
    def device_bytes(self) -> int:
        """Device bytes the blocks take: resident blocks plus the ring."""
        return self.resident_bytes + self.ring_bytes

    @property
    def within_budget(self) -> bool:
        """Whether the plan keeps to its budget (a stream-everything plan may not)."""
        return self.device_bytes <= self.budget_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per pass over the blocks."""
        return sum(self.block_bytes[i] for i in self.streamed)


def plan_offload(block_bytes: Sequence[int], budget_bytes: int, *, ring_blocks: float = 2.0,
                 min_resident: int = 0) -> OffloadPlan:
    """Keep the first blocks resident as long as they fit beside a ring for the rest; stream the rest.

    `budget_bytes` is what the blocks may use on the device (the caller has already subtracted the
    memory to keep free and the model's other tensors). The ring holds `ring_blocks` times the
    largest streamed block, so that at least one block loads while another computes (2 = double
    buffering). Leading blocks are the ones kept: they run first, which gives the copy of the first
    streamed block time to finish, and TeaCache's decision block is then resident. When not even the
    ring fits, every block is streamed and the plan is over budget (`within_budget` is False); the
    caller decides whether that is acceptable. `min_resident` leading blocks stay whatever the budget
    (TeaCache's decision block: with it resident, a skipped step touches no streamed block at all).
    """
    sizes = tuple(int(b) for b in block_bytes)
    if any(b < 0 for b in sizes):
        raise ValueError("block sizes must be >= 0")
    if not ring_blocks >= 1:
        raise ValueError(f"ring_blocks must be at least 1, not {ring_blocks!r}")
    n = len(sizes)
    min_resident = min(max(int(min_resident), 0), n)
    if sum(sizes) <= budget_bytes or min_resident == n:
        return OffloadPlan(tuple(range(n)), (), sizes, 0, int(budget_bytes))

    # largest streamed block for each split point k (blocks k.. are streamed)
    suffix_max = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_max[i] = max(sizes[i], suffix_max[i + 1])

    def ring_for(k: int) -> int:
        return _aligned(math.ceil(ring_blocks * suffix_max[k]))

    keep, prefix = min_resident, 0
    for k in range(n):  # k blocks resident, n - k streamed
        if k >= min_resident and prefix + ring_for(k) <= budget_bytes:
            keep = k
        prefix += sizes[k]
    return OffloadPlan(tuple(range(keep)), tuple(range(keep, n)), sizes, ring_for(keep), int(budget_bytes))


# ---------------------------------------------------------------------------------------------
# The ring


class RingAllocator:
    """First-in-first-out allocation of byte ranges in a buffer of `capacity` bytes.

    Chunks are released in the order they were taken, which is how streamed blocks run. A chunk
    is contiguous; when it does not fit at the end it wraps to the start (the end is left unused).
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._live: collections.deque[tuple[int, int]] = collections.deque()  # (start, size), oldest first
        self._head = 0

    def __len__(self) -> int:
        return len(self._live)

    def alloc(self, size: int) -> Optional[int]:
        """Start offset of a new chunk of `size` bytes, or None when it does not fit now."""
        size = int(size)
        if size > self.capacity:
            return None
        if not self._live:
            start = 0
        else:
            first = self._live[0][0]
            wrapped = self._live[-1][0] < first
            if wrapped:
                start = self._head if self._head + size <= first else None
            elif self._head + size <= self.capacity:
                start = self._head
            elif size <= first:
                start = 0
            else:
                start = None
        if start is None:
            return None
        self._live.append((start, size))
        self._head = start + size
        return start

    def free(self) -> tuple[int, int]:
        """Release the oldest chunk; returns its (start, size)."""
        chunk = self._live.popleft()
        if not self._live:
            self._head = 0
        return chunk


# ---------------------------------------------------------------------------------------------
# Staging and statistics


@dataclass
class TransferStats:
    """Bytes and copies moved between host and device by a Placement, for the benchmark."""

    host_to_device_bytes: int = 0
    streamed_bytes: int = 0
    streamed_loads: int = 0
    resident_loads: int = 0
    pinned_bytes: int = 0
    # CPU time spent gathering streamed blocks (memory-mapped weights -> staging or ring), and
    # waiting for a staging buffer's previous copy: when their sum nears the sampling time, the
    # host side is the bottleneck
    gather_seconds: float = 0.0
    staging_wait_seconds: float = 0.0
    plans: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain numbers (and the plans as dicts) for JSON."""
        return {
            "host_to_device_bytes": self.host_to_device_bytes,
            "streamed_bytes": self.streamed_bytes,
            "streamed_loads": self.streamed_loads,
            "resident_loads": self.resident_loads,
            "pinned_bytes": self.pinned_bytes,
            "gather_seconds": round(self.gather_seconds, 4),
            "staging_wait_seconds": round(self.staging_wait_seconds, 4),
            "plans": list(self.plans),
        }


class StagingPool:
    """A few host buffers that streamed blocks pass through; pinned when the device is CUDA.

    Only `count` buffers of the largest block's size exist, however big the model: pinning the
    whole model would take its size in unswappable RAM. A buffer is reused once the copy that read
    it has finished (its event), so with two buffers one block is gathered while another is copied.
    """

    def __init__(self, count: int = 2):
        if count < 1:
            raise ValueError("a staging pool needs at least one buffer")
        self.count = count
        self._buffers: list[torch.Tensor] = []
        self._events: list[Optional[torch.cuda.Event]] = []
        self._next = 0
        self._pinned = False

    @property
    def nbytes(self) -> int:
        """Host bytes held by the pool."""
        return sum(b.numel() for b in self._buffers)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes of pinned (page-locked) memory held by the pool."""
        return self.nbytes if self._pinned else 0

    def ensure(self, nbytes: int, pin: bool) -> None:
        """Make every buffer at least `nbytes` long (reallocating only when they are too small)."""
        nbytes = _aligned(nbytes)
        if self._buffers and self._buffers[0].numel() >= nbytes and self._pinned == pin:
            return
        self.synchronize()
        self._buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(self.count)]
        self._events = [None] * self.count
        self._pinned = pin
        self._next = 0

    def acquire(self) -> tuple[int, torch.Tensor]:
        """The next buffer (index, bytes), once the copy that last read it has finished."""
        index = self._next
        self._next = (self._next + 1) % self.count
        event = self._events[index]
        if event is not None:
            event.synchronize()
            self._events[index] = None
        return index, self._buffers[index]

    def release(self, index: int, event: Optional[torch.cuda.Event]) -> None:
        """Mark buffer `index` as read by the copy that records `event`."""
        self._events[index] = event

    def synchronize(self) -> None:
        """Wait for every copy that reads a buffer."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._events = [None] * len(self._events)

    def clear(self) -> None:
        """Give the buffers back."""
        self.synchronize()
        self._buffers, self._events, self._next, self._pinned = [], [], 0, False


# ---------------------------------------------------------------------------------------------
# Streaming


@dataclass
class _Entry:
    tensor: torch.Tensor
    at_rest: torch.Tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _Layout:
    block: torch.nn.Module
    entries: list[_Entry]
    nbytes: int


@dataclass
class _Loaded:
    index: int
    start: int
    ready: Optional[torch.cuda.Event]


class _StreamHook(ModelHook):
    """Loads a streamed block before its forward and releases it after."""

    def __init__(self, streamer: "BlockStreamer", index: int):
        super().__init__()
        self.streamer = streamer
        self.index = index

    def pre_forward(self, module, *args, **kwargs):
        self.streamer._before(self.index)
        return args, kwargs

    def post_forward(self, module, output):
        self.streamer._after(self.index)
        return output


class BlockStreamer:
    """Streams `blocks` (in execution order) through one device ring, as removable hooks on the blocks.

    `compute_dtype`, when given, is the dtype floating tensors are cast to on their way in (the
    weights at rest may be stored in another one). `skip(block)` tells, at a block's call, that the
    block will not use its weights on this call (TeaCache bypassing it); it is then not loaded.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], device: torch.device | str, ring_bytes: int, *,
                 compute_dtype: Optional[torch.dtype] = None, staging: Optional[StagingPool] = None,
                 stats: Optional[TransferStats] = None,
                 skip: Optional[Callable[[torch.nn.Module], bool]] = None):
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.stats = stats if stats is not None else TransferStats()
        self.skip = skip
        self._layouts = [self._layout(block) for block in blocks]
        largest = max((layout.nbytes for layout in self._layouts), default=0)
        if self._layouts and ring_bytes < largest:
            raise ValueError(f"the ring ({ring_bytes} bytes) cannot hold the largest block ({largest} bytes)")
        self.ring_bytes = _aligned(ring_bytes)
        self._cuda = self.device.type == "cuda"
        self._staging = staging if staging is not None else StagingPool()
        self._installed = False
        self._ring: Optional[RingAllocator] = None
        self._buffer: Optional[torch.Tensor] = None
        self._loaded: collections.deque[_Loaded] = collections.deque()
        self._current: Optional[_Loaded] = None
        self._next = 0
        self._copy_stream = None
        self._ring_free_after: Optional[torch.cuda.Event] = None
        self._hooked: list[tuple[torch.nn.Module, bool, bool]] = []

    def _layout(self, block: torch.nn.Module) -> _Layout:
        entries, offset = [], 0
        for t in module_tensors(block):
            dtype = _compute_dtype(t, self.compute_dtype)
            nbytes = t.numel() * _itemsize(dtype)
            entries.append(_Entry(t, t.data, offset, nbytes, dtype, t.shape))
            offset += _aligned(nbytes)
        return _Layout(block, entries, offset)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """The streamed blocks, in order."""
        return [layout.block for layout in self._layouts]

    # -- installation --------------------------------------------------------------------------

    def install(self) -> "BlockStreamer":
        """Allocate the ring (and staging), put every block's weights at rest and add the hooks."""
        if self._installed or not self._layouts:
            self._installed = True
            return self
        self._buffer = torch.empty(self.ring_bytes, dtype=torch.uint8, device=self.device)
        self._ring = RingAllocator(self.ring_bytes)
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            largest = max(layout.nbytes for layout in self._layouts)
            self._staging.ensure(largest, pin=True)
            self.stats.pinned_bytes = max(self.stats.pinned_bytes, self._staging.pinned_bytes)
        for index, layout in enumerate(self._layouts):
            self._restore(layout)
            self._hooked.append(add_hook(layout.block, _StreamHook(self, index), _HOOK_NAME))
        self._installed = True
        return self

    def remove(self) -> None:
        """Wait for the device, put every block's weights back at rest, remove the hooks, free the ring."""
        if not self._installed:
            return
        self._installed = False
        if self._cuda and self._buffer is not None:
            torch.cuda.synchronize(self.device)
        self._staging.synchronize()
        for layout in self._layouts:
            self._restore(layout)
        for hooked in self._hooked:
            remove_hook(hooked, _HOOK_NAME)
        self._hooked = []
        self._loaded.clear()
        self._current = None
        self._next = 0
        self._ring = None
        self._buffer = None
        self._copy_stream = None
        self._ring_free_after = None

    # -- the per-call protocol -------------------------------------------------------------------

    def _before(self, index: int) -> None:
        layout = self._layouts[index]
        if self.skip is not None and self.skip(layout.block):
            return
        if self._current is not None:
            # the previous block raised inside its forward; its chunk is the oldest, release it
            self._release_current()
        if not self._loaded or self._loaded[0].index != index:
            # not the block we prefetched (first call, or an earlier call stopped half-way)
            self._restart(index)
        entry = self._loaded.popleft()
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
        self._point(layout, entry.start)
        self._current = entry

    def _after(self, index: int) -> None:
        if self._current is None or self._current.index != index:
            return  # a skipped call: nothing was loaded
        self._release_current()
        self._fill()

    def _release_current(self) -> None:
        entry, self._current = self._current, None
        self._restore(self._layouts[entry.index])
        if self._cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            # compute runs in order on one stream, so the latest event covers every released chunk
            self._ring_free_after = done
        self._ring.free()

    def _restart(self, index: int) -> None:
        while self._loaded:
            self._loaded.popleft()
            self._ring.free()
        self._next = index
        self._fill()
        if not self._loaded:  # cannot happen: an empty ring always holds the largest block
            raise RuntimeError("the streaming ring could not take a block")

    def _fill(self) -> None:
        """Load upcoming blocks (wrapping around to the next call's first) while the ring has room."""
        n = len(self._layouts)
        while len(self._loaded) + (self._current is not None) < n:
            index = self._next
            start = self._ring.alloc(self._layouts[index].nbytes)
            if start is None:
                return
            self._loaded.append(_Loaded(index, start, self._load(self._layouts[index], start)))
            self._next = (index + 1) % n

    def _load(self, layout: _Layout, start: int) -> Optional[torch.cuda.Event]:
        target = self._buffer[start:start + layout.nbytes]
        self.stats.host_to_device_bytes += layout.nbytes
        self.stats.streamed_bytes += layout.nbytes
        self.stats.streamed_loads += 1
        if not self._cuda:
            started = time.perf_counter()
            _gather(layout, target)
            self.stats.gather_seconds += time.perf_counter() - started
            return None
        started = time.perf_counter()
        slot, staging = self._staging.acquire()
        gathering = time.perf_counter()
        _gather(layout, staging)
        self.stats.staging_wait_seconds += gathering - started
        self.stats.gather_seconds += time.perf_counter() - gathering
        with torch.cuda.stream(self._copy_stream):
            if self._ring_free_after is not None:
                self._copy_stream.wait_event(self._ring_free_after)
            target.copy_(staging[:layout.nbytes], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        self._staging.release(slot, ready)
        return ready

    def _point(self, layout: _Layout, start: int) -> None:
        base = self._buffer
        for e in layout.entries:
            lo = start + e.offset
            e.tensor.data = base[lo:lo + e.nbytes].view(e.dtype).view(e.shape)

    @staticmethod
    def _restore(layout: _Layout) -> None:
        for e in layout.entries:
            e.tensor.data = e.at_rest


def _gather(layout: _Layout, target: torch.Tensor) -> None:
    """Copy (and cast) a block's tensors into a byte buffer at their layout offsets."""
    for e in layout.entries:
        target[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape).copy_(e.at_rest)


# ---------------------------------------------------------------------------------------------
# Residency as context managers


@contextlib.contextmanager
def resident(tensors: Sequence[torch.Tensor], device: torch.device | str,
             stats: Optional[TransferStats] = None) -> Iterator[None]:
    """Put `tensors` on `device` for the duration of the block; afterwards they are their CPU selves again.

    The original tensors are kept, not copied back: weights are frozen, and the CPU originals are
    the memory-mapped checkpoint, so leaving the device costs neither time nor private RAM.
    """
    device = torch.device(device)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for t in tensors:
            data = t.data
            saved.append((t, data))
            moved = data.to(device)
            if stats is not None and moved.data_ptr() != data.data_ptr():
                stats.host_to_device_bytes += t.numel() * t.element_size()
            t.data = moved
        if stats is not None:
            stats.resident_loads += 1
        yield
    finally:
        for t, data in reversed(saved):
            t.data = data


@contextlib.contextmanager
def offloaded(module: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device | str,
              plan: OffloadPlan, *, compute_dtype: Optional[torch.dtype] = None,
              staging: Optional[StagingPool] = None, stats: Optional[TransferStats] = None,
              skip: Optional[Callable[[torch.nn.Module], bool]] = None) -> Iterator[BlockStreamer]:
    """`module` ready to run on `device` by `plan`: its other tensors and resident blocks on the device, the rest streamed."""
    if len(plan.block_bytes) != len(blocks):
        raise ValueError(f"the plan is for {len(plan.block_bytes)} blocks, the model has {len(blocks)}")
    in_blocks = {id(t) for block in blocks for t in module_tensors(block)}
    fixed = [t for t in module_tensors(module) if id(t) not in in_blocks]
    kept = [t for i in plan.resident for t in module_tensors(blocks[i])]
    streamer = BlockStreamer([blocks[i] for i in plan.streamed], device, plan.ring_bytes,
                             compute_dtype=compute_dtype, staging=staging, stats=stats, skip=skip)
    with resident(fixed + kept, device, stats=stats):
        streamer.install()
        try:
            yield streamer
        finally:
            streamer.remove()
