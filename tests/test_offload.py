"""Block streaming on CPU: the placement policy, the ring, and streamed blocks computing exactly as resident ones.

A device move cannot be seen on a CPU, so a dtype cast stands in for it: the weights of streamed
blocks are stored at rest in float64 and the streamer casts them to float32 on their way into the
ring. A block that ran on weights it did not load would fail (float32 inputs, float64 weights) or
differ; the outputs are compared bit for bit with the plain float32 model.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from diffusers_helper.offload import (
    ALIGN,
    BlockStreamer,
    RingAllocator,
    TransferStats,
    module_tensors,
    offloaded,
    plan_offload,
    streamable_blocks,
    tensors_bytes,
)
from conftest import random_transformer

MB = 1024**2


# ---------------------------------------------------------------------------------------------
# The policy


def test_everything_resident_when_it_fits():
    plan = plan_offload([10, 20, 30], 60)
    assert plan.resident == (0, 1, 2) and plan.streamed == () and plan.ring_bytes == 0 and plan.within_budget


def test_leading_blocks_stay_while_they_fit_beside_the_ring():
    sizes = [4 * MB] * 3 + [2 * MB] * 3
    # 3 big resident (12) + ring of 2 small (4) = 16 fits; 4 resident would need 14 + 4
    plan = plan_offload(sizes, 16 * MB)
    assert plan.resident == (0, 1, 2) and plan.streamed == (3, 4, 5)
    assert plan.ring_bytes == 4 * MB and plan.device_bytes == 16 * MB and plan.within_budget
    # one byte less: keeping 2 big blocks needs a ring for a big one (8 + 8); only 1 + ring 8 = 12 fits
    plan = plan_offload(sizes, 16 * MB - 1)
    assert plan.resident == (0,) and plan.ring_bytes == 8 * MB
    assert plan.streamed_bytes == sum(sizes[1:])


def test_nothing_fits_streams_everything_over_budget():
    plan = plan_offload([4 * MB, 4 * MB], 1 * MB)
    assert plan.resident == () and plan.streamed == (0, 1) and plan.ring_bytes == 8 * MB
    assert not plan.within_budget
    single = plan_offload([4 * MB, 4 * MB], 1 * MB, ring_blocks=1)
    assert single.ring_bytes == 4 * MB


def test_plan_is_the_largest_resident_prefix_that_fits():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randrange(1, 50) * ALIGN for _ in range(rng.randrange(1, 9))]
        budget = rng.randrange(0, sum(sizes) * 2)
        ring_blocks = rng.choice([1, 1.5, 2, 3])
        plan = plan_offload(sizes, budget, ring_blocks=ring_blocks)
        k = len(plan.resident)
        assert plan.resident == tuple(range(k)) and plan.streamed == tuple(range(k, len(sizes)))

        def cost(j):
            if j == len(sizes):
                return sum(sizes)
            ring = -(-int(ring_blocks * max(sizes[j:])) // ALIGN) * ALIGN
            return sum(sizes[:j]) + ring

        fitting = [j for j in range(len(sizes) + 1) if cost(j) <= budget]
        assert k == (max(fitting) if fitting else 0)
        assert plan.within_budget == bool(fitting)
        if plan.streamed:
            assert plan.ring_bytes >= max(sizes[i] for i in plan.streamed)


def test_full_size_transformer_on_gpus_of_several_sizes():
    """The real block sizes (bf16): 20 double blocks of 648 MiB, 40 single blocks of 270 MiB."""
    double, single = 648 * MB, 270 * MB
    sizes = [double] * 20 + [single] * 40
    fixed = 790 * MB
    gib = 1024 * MB

    def plan_for(free, preserve):
        return plan_offload(sizes, free - fixed - preserve)

    # a 6 GB laptop GPU (5.5 GiB free) with the default 6 GB preserved: everything streams
    laptop = plan_for(5.5 * gib, 6 * gib)
    assert laptop.resident == () and laptop.ring_bytes == 2 * double
    # a 24 GB GPU with 6 GB preserved: the leading double blocks stay
    # (budget 23.5 - 0.77 - 6 GiB: all 20 double blocks, then 13 single ones beside a ring of two)
    desktop = plan_for(23.5 * gib, 6 * gib)
    assert len(desktop.resident) == 33 and desktop.ring_bytes == 2 * single and desktop.within_budget
    # 80 GB: all resident
    assert plan_for(79 * gib, 6 * gib).streamed == ()


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_offload([1, -1], 10)
    with pytest.raises(ValueError):
        plan_offload([1], 10, ring_blocks=0.5)


# ---------------------------------------------------------------------------------------------
# The ring


def test_ring_is_first_in_first_out_and_wraps():
    ring = RingAllocator(10)
    assert ring.alloc(4) == 0 and ring.alloc(4) == 4
    assert ring.alloc(4) is None  # 2 left at the end, the start is taken
    assert ring.free() == (0, 4)
    assert ring.alloc(4) == 0  # wraps to the freed start
    assert ring.alloc(1) is None  # wrapped: only [4, 4) between head and the oldest chunk
    assert ring.free() == (4, 4)
    assert ring.alloc(6) == 4  # now [4, 10) is free
    assert ring.free() == (0, 4) and ring.free() == (4, 6)
    assert len(ring) == 0 and ring.alloc(10) == 0 and ring.alloc(1) is None
    assert RingAllocator(5).alloc(6) is None


def test_ring_never_overlaps_live_chunks():
    rng = random.Random(1)
    ring = RingAllocator(100)
    live: list[tuple[int, int]] = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            assert ring.free() == live.pop(0)
            continue
        size = rng.randrange(1, 60)
        start = ring.alloc(size)
        if start is None:
            continue
        assert 0 <= start and start + size <= 100
        assert all(start + size <= s or s + n <= start for s, n in live)
        live.append((start, size))


# ---------------------------------------------------------------------------------------------
# Streaming


def _transformer(double=3, single=4, seed=0):
    return random_transformer(double, single, seed, std=0.1)


def _store_streamed_as_float64(blocks, plan):
    for i in plan.streamed:
        for t in module_tensors(blocks[i]):
            t.data = t.data.double()


def _sizes(blocks, dtype=None):
    return [tensors_bytes(module_tensors(b), dtype) for b in blocks]


def test_streamed_blocks_compute_exactly_as_resident_ones(transformer_inputs):
    model = _transformer()
    calls = [transformer_inputs(model, seed=s) for s in range(3)]
    expected = [model(**kw)[0] for kw in calls]

    blocks = streamable_blocks(model)
    sizes = _sizes(blocks)
    plan = plan_offload(sizes, sizes[0] + 2 * max(sizes[1:]))
    assert plan.resident == (0,) and len(plan.streamed) == 6
    _store_streamed_as_float64(blocks, plan)
    at_rest = {id(t): t.data.data_ptr() for i in plan.streamed for t in module_tensors(blocks[i])}

    seen = []

    def inside(module, args):  # runs inside a streamed block's forward: its weights are loaded
        w = module.weight
        seen.append((w.dtype, w.data_ptr()))

    watched = blocks[4].attn.to_q
    handle = watched.register_forward_pre_hook(inside)
    stats = TransferStats()
    try:
        with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32, stats=stats) as streamer:
            ring = streamer._buffer
            outputs = [model(**kw)[0] for kw in calls]
            # between calls the streamed weights are at rest again
            assert watched.weight.dtype == torch.float64
    finally:
        handle.remove()

    for out, ref in zip(outputs, expected):
        assert torch.equal(out, ref)
    assert len(seen) == 3
    lo, hi = ring.data_ptr(), ring.data_ptr() + ring.numel()
    assert all(dtype == torch.float32 and lo <= ptr < hi for dtype, ptr in seen)
    # every streamed block loaded once per call (plus what was prefetched for a next call)
    assert 3 * 6 <= stats.streamed_loads <= 3 * 6 + 6
    assert stats.streamed_bytes >= 3 * sum(sizes[i] for i in plan.streamed)
    # afterwards: the same CPU tensors as before, no hooks, no instance forward
    assert {id(t): t.data.data_ptr() for i in plan.streamed for t in module_tensors(blocks[i])} == at_rest
    for block in blocks:
        assert not hasattr(block, "_diffusers_hook") and "forward" not in vars(block)


@pytest.mark.parametrize("ring_blocks", [1, 1.5, 3])
def test_any_ring_size_gives_the_same_result(transformer_inputs, ring_blocks):
    model = _transformer(double=2, single=3, seed=1)
    kw = transformer_inputs(model, seed=5)
    expected = model(**kw)[0]
    blocks = streamable_blocks(model)
    plan = plan_offload(_sizes(blocks), 0, ring_blocks=ring_blocks)
    assert plan.resident == ()
    _store_streamed_as_float64(blocks, plan)
    with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32):
        assert torch.equal(model(**kw)[0], expected)
        assert torch.equal(model(**kw)[0], expected)


def test_a_call_that_fails_half_way_leaves_the_next_one_exact(transformer_inputs):
    model = _transformer(double=2, single=3, seed=2)
    kw = transformer_inputs(model, seed=1)
    expected = model(**kw)[0]
    blocks = streamable_blocks(model)
    plan = plan_offload(_sizes(blocks), 0)
    _store_streamed_as_float64(blocks, plan)
    failures = iter([True])

    def boom(module, args):
        if next(failures, False):
            raise RuntimeError("out of memory (simulated)")

    handle = blocks[3].attn.to_q.register_forward_pre_hook(boom)
    try:
        with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32):
            with pytest.raises(RuntimeError, match="simulated"):
                model(**kw)
            assert torch.equal(model(**kw)[0], expected)
        with pytest.raises(RuntimeError, match="simulated"), offloaded(model, blocks, "cpu", plan,
                                                                        compute_dtype=torch.float32):
            failures = iter([True])
            model(**kw)
    finally:
        handle.remove()
    # the stage ended by an error still put every weight back at rest
    assert all(t.dtype == torch.float64 for i in plan.streamed for t in module_tensors(blocks[i]))
    assert all(not hasattr(b, "_diffusers_hook") for b in blocks)


def test_teacache_with_its_decision_block_streamed_is_still_exact(transformer_inputs):
    from diffusers_helper.teacache import apply_teacache

    steps = 5
    model = _transformer(double=2, single=1, seed=4)
    calls = [transformer_inputs(model, seed=20 + i) for i in range(steps)]
    cache = apply_teacache(model, num_steps=steps, threshold=1e9)
    expected = [model(**kw)[0] for kw in calls]
    cache.reset(steps)
    blocks = streamable_blocks(model)
    plan = plan_offload(_sizes(blocks), 0)
    assert plan.resident == ()
    _store_streamed_as_float64(blocks, plan)
    with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32, skip=cache.skips_block):
        assert all(torch.equal(model(**kw)[0], ref) for kw, ref in zip(calls, expected))
    cache.remove()


def test_min_resident_overrides_the_budget():
    plan = plan_offload([4, 4, 4], 0, min_resident=1)
    assert plan.resident == (0,) and plan.streamed == (1, 2) and not plan.within_budget
    assert plan_offload([4, 4, 4], 0, min_resident=5).streamed == ()


def test_ring_smaller_than_a_block_is_refused():
    model = _transformer(double=1, single=1)
    blocks = streamable_blocks(model)
    with pytest.raises(ValueError, match="cannot hold the largest block"):
        BlockStreamer(blocks, "cpu", max(_sizes(blocks)) - 1)


def test_teacache_and_streaming_together(transformer_inputs):
    """TeaCache's hooks and the streaming hooks on the same blocks: same outputs, and skipped calls load nothing."""
    from diffusers_helper.teacache import apply_teacache

    steps = 6
    model = _transformer(double=2, single=2, seed=3)
    calls = [transformer_inputs(model, seed=10 + i) for i in range(steps)]
    # a huge threshold: only the first and the last call of the run compute the blocks
    cache = apply_teacache(model, num_steps=steps, threshold=1e9)
    expected = [model(**kw)[0] for kw in calls]
    assert (cache.computed, cache.skipped) == (2, steps - 2)
    cache.reset(steps)

    blocks = streamable_blocks(model)
    # the decision block resident (as Placement plans it with TeaCache on), the other three streamed
    plan = plan_offload(_sizes(blocks), 0, min_resident=1)
    assert plan.resident == (0,) and plan.streamed == (1, 2, 3)
    _store_streamed_as_float64(blocks, plan)
    stats = TransferStats()
    with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32, stats=stats, skip=cache.skips_block):
        outputs = [model(**kw)[0] for kw in calls]
    for out, ref in zip(outputs, expected):
        assert torch.equal(out, ref)
    # the 2 computed calls load the 3 streamed blocks; skipped calls load nothing (prefetch waits in the ring)
    assert 2 * 3 <= stats.streamed_loads <= 2 * 3 + 3
    # the streaming hooks are gone, TeaCache's stay until it is removed
    assert all(list(b._diffusers_hook.hooks) == ["framepack_teacache"] for b in blocks)
    cache.remove()
    assert all(not hasattr(b, "_diffusers_hook") for b in blocks)


def test_llama_text_encoder_streams_the_same_way(tiny_sources):
    from transformers import LlamaModel

    model = LlamaModel.from_pretrained(tiny_sources.hunyuan, subfolder="text_encoder").eval().requires_grad_(False)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7, 7, 4]])
    mask = torch.ones_like(ids)
    expected = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states

    blocks = streamable_blocks(model)
    assert blocks == list(model.layers) and len(blocks) == 3
    # room for one resident layer and a ring of one layer: the other two stream one at a time
    plan = plan_offload(_sizes(blocks), 2 * max(_sizes(blocks)), ring_blocks=1)
    assert plan.resident == (0,) and plan.streamed == (1, 2)
    _store_streamed_as_float64(blocks, plan)
    stats = TransferStats()
    with offloaded(model, blocks, "cpu", plan, compute_dtype=torch.float32, stats=stats):
        got = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert stats.streamed_loads >= 2
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(t.dtype == torch.float64 for i in plan.streamed for t in module_tensors(blocks[i]))


def test_streamable_blocks_of_each_component(tiny_components):
    c = tiny_components("framepack")
    t = c.transformer
    assert streamable_blocks(t) == [*t.transformer_blocks, *t.single_transformer_blocks]
    assert streamable_blocks(c.text_encoder) == list(c.text_encoder.layers)
    for small in (c.text_encoder_2, c.image_encoder, c.vae):
        assert streamable_blocks(small) is None


def test_layout_sizes_are_aligned():
    t = torch.nn.Linear(3, 5)
    assert tensors_bytes(module_tensors(t)) == 2 * ALIGN
    assert tensors_bytes(module_tensors(t), torch.float64) == 2 * ALIGN
    big = torch.nn.Linear(100, 100, bias=False)
    assert tensors_bytes(module_tensors(big)) == -(-100 * 100 * 4 // ALIGN) * ALIGN
    assert tensors_bytes(module_tensors(big), torch.bfloat16) == -(-100 * 100 * 2 // ALIGN) * ALIGN


def test_streams_in_order_with_prefetch_across_calls():
    """Load order: a pass over the blocks in order, wrapping to the next call's first blocks."""
    blocks = [torch.nn.Linear(8, 8) for _ in range(4)]
    model = torch.nn.Sequential(*blocks).eval().requires_grad_(False)
    x = torch.randn(2, 8)
    expected = model(x)
    size = tensors_bytes(module_tensors(blocks[0]))
    streamer = BlockStreamer(blocks, "cpu", 2 * size)
    order = []
    original = streamer._load

    def spy(layout, start):
        order.append(streamer.blocks.index(layout.block))
        return original(layout, start)

    streamer._load = spy
    streamer.install()
    try:
        assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    finally:
        streamer.remove()
    assert order == list(itertools.islice(itertools.cycle(range(4)), len(order)))
    assert 8 <= len(order) <= 10


# ---------------------------------------------------------------------------------------------
# The CUDA path's ordering, checked on a CPU with recording stand-ins for streams and events


class _Log:
    def __init__(self):
        self.items: list[tuple] = []

    def add(self, *item):
        self.items.append(item)
        return len(self.items) - 1


class _FakeEvent:
    log: _Log

    def __init__(self, *args, **kwargs):
        self.recorded_at = None
        self.stream = None

    def record(self, stream):
        self.stream = stream.name
        self.recorded_at = self.log.add("record", self, stream.name)

    def synchronize(self):
        self.log.add("sync", self)


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        assert event.recorded_at is not None, "waiting on an event never recorded"
        self.log.add("wait", self.name, event)


def _install_fake_cuda(monkeypatch, log):
    import diffusers_helper.offload as offload

    compute = _FakeStream("compute", log)
    current = [compute]
    _FakeEvent.log = log

    class _StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    class _CopyStream(_FakeStream):
        def __init__(self, device=None):
            super().__init__("copy", log)

    monkeypatch.setattr(torch.cuda, "Stream", _CopyStream)
    monkeypatch.setattr(torch.cuda, "stream", _StreamContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.add("device_sync"))
    real_ensure = offload.StagingPool.ensure
    monkeypatch.setattr(offload.StagingPool, "ensure", lambda self, n, pin: real_ensure(self, n, False))
    real_gather = offload._gather

    def gather(layout, target):
        log.add("gather", target.data_ptr())
        real_gather(layout, target)

    monkeypatch.setattr(offload, "_gather", gather)


def _check_ordering(log: _Log):
    items = log.items
    loads = [(i, it) for i, it in enumerate(items) if it[0] == "load"]
    computes = [(i, it) for i, it in enumerate(items) if it[0] == "compute"]

    def overlap(a, b):
        return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]

    for li, (_, block, start, size) in loads:
        end = next(j for j in range(li, len(items)) if items[j][0] == "record" and items[j][2] == "copy")
        waits = [items[j][2] for j in range(li, end) if items[j][0] == "wait" and items[j][1] == "copy"]
        earlier = [ci for ci, c in computes if ci < li and overlap((c[2], c[3]), (start, size))]
        if earlier:
            # the copy into this range waits for an event recorded after the last compute that read it
            assert any(e.stream == "compute" and e.recorded_at > max(earlier) for e in waits), (li, items[li])
    for ci, (_, block, start, size) in computes:
        load = max(li for li, it in loads if li < ci and it[1:] == (block, start, size))
        ready = next(items[j][1] for j in range(load, len(items)) if items[j][0] == "record" and items[j][2] == "copy")
        assert any(items[j][0] == "wait" and items[j][1] == "compute" and items[j][2] is ready
                   for j in range(load, ci)), (ci, items[ci])
    # a staging buffer is refilled only after the copy that last read it is known to be done
    gathers = [(i, it[1]) for i, it in enumerate(items) if it[0] == "gather"]
    for gi, ptr in gathers:
        previous = [i for i, p in gathers if i < gi and p == ptr]
        if not previous:
            continue
        read_by = next(items[j][1] for j in range(previous[-1], len(items)) if items[j][0] == "record")
        assert any(items[j][0] == "sync" and items[j][1] is read_by for j in range(previous[-1], gi)), (gi, ptr)


@pytest.mark.parametrize("ring_blocks", [1, 2, 3.5])
def test_cuda_path_orders_copies_and_compute_with_events(monkeypatch, transformer_inputs, ring_blocks):
    model = _transformer(double=3, single=5, seed=6)
    calls = [transformer_inputs(model, seed=30 + i) for i in range(3)]
    expected = [model(**kw)[0] for kw in calls]
    log = _Log()
    _install_fake_cuda(monkeypatch, log)
    blocks = streamable_blocks(model)
    plan = plan_offload(_sizes(blocks), 0, ring_blocks=ring_blocks, min_resident=1)
    assert plan.resident == (0,) and len(plan.streamed) == 7
    _store_streamed_as_float64(blocks, plan)
    stats = TransferStats()
    streamer = BlockStreamer([blocks[i] for i in plan.streamed], "cpu", plan.ring_bytes,
                             compute_dtype=torch.float32, stats=stats)
    streamer._cuda = True  # take the CUDA code path, with the stand-ins above
    real_load, real_point = streamer._load, streamer._point

    def load(layout, start):
        log.add("load", streamer.blocks.index(layout.block), start, layout.nbytes)
        return real_load(layout, start)

    def point(layout, start):
        log.add("compute", streamer.blocks.index(layout.block), start, layout.nbytes)
        return real_point(layout, start)

    streamer._load, streamer._point = load, point
    streamer.install()
    try:
        outputs = [model(**kw)[0] for kw in calls]
    finally:
        streamer.remove()
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert ("device_sync",) in log.items  # the ring is freed only after the device is idle
    assert stats.gather_seconds > 0 and stats.streamed_loads >= 3 * len(plan.streamed)
    _check_ordering(log)
