"""`python -m diffusers_helper bench`: time one section with the full-size architectures on random weights.

The official architectures (the FramePack transformer: 24 heads of 128, 20 double- and 40
single-stream blocks; the LLaMA-3-8B text encoder; CLIP-L; SigLIP so400m; the HunyuanVideo VAE) are
written once as random-weight safetensors in the official folder layouts (`weights.py`), so loading
takes exactly the user's path. A fresh process then opens them through a `Runtime`, runs one
section of a real job through the pipeline in the chosen mode, and the parent prints one JSON
document:

- seconds per sampling step and per video frame (a section adds window × 4 frames to a long video);
- peak GPU memory (PyTorch's allocator), peak private system memory (anonymous pages, sampled, plus
  the pinned staging buffers) and peak RSS;
- bytes copied from CPU to GPU (weights made resident or streamed);
- the transformer's achieved FLOP rate as a fraction of the GPU's dense bf16 peak, its FLOPs counted
  analytically from the architecture and the token counts the blocks really saw;
- with the speed options (`--cache none|teacache|magcache`, `--fp8`, `--compile`): the sampling steps
  computed and skipped, and the transformer's bytes streamed per step in low-VRAM mode.

`--tiny` uses the tiny architectures instead (seconds on a CPU), through the same code.
`--vram-limit-gb` caps PyTorch's allocator (`torch.cuda.set_per_process_memory_fraction`), so a big
GPU behaves like a small one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..caches import calls_per_step
from ..options import add_runtime_arguments, add_settings_arguments, settings_from_args, user_error
from .fresh import run_fresh

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), by a substring of the device name; checked in order.
BF16_PEAK_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 6000 Ada", 364e12), ("RTX 5090", 209e12), ("RTX 4090", 165e12), ("RTX 4080", 97e12),
    ("RTX 3090", 71e12), ("RTX 3080", 59e12), ("RTX 3060", 25e12),
)

# The figures: the 640 bucket, window 9, 25 steps. The tiny models get a job sized like them.
FULL_JOB = dict(resolution=640, window=9, steps=25)
TINY_JOB = dict(resolution=64, window=3, steps=3)

PROMPT = "A calm sea under a slowly moving sky, gentle camera pan."
SAMPLE_SECONDS = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench flags."""
    parser.add_argument("--tiny", action="store_true",
                        help="tiny architectures instead of the full-size ones (runs on a CPU in seconds)")
    add_runtime_arguments(parser, attention_default="sdpa", vram_flags=("--mode", "--vram"), vram_dest="mode")
    parser.add_argument("--vram-limit-gb", type=float, metavar="GB", help="act as a GPU with this much memory (CUDA)")
    sized = {name: f"(default {FULL_JOB[name]}; {TINY_JOB[name]} with --tiny)" for name in FULL_JOB}
    add_settings_arguments(
        parser, ("model", "resolution", "window", "steps", "cache", "magcache_threshold", "magcache_k",
                 "magcache_retention", "magcache_ratios", "fp8", "gpu_memory_preservation"),
        defaults={"cache": "none"}, aliases={"gpu_memory_preservation": ("--preserve-gb",)},
        help={"resolution": f"bucket resolution {sized['resolution']}",
              "window": f"latent window size {sized['window']}",
              "steps": f"sampling steps {sized['steps']}",
              "cache": "step cache: none (the default here: every step computes), teacache or magcache"})
    parser.add_argument("--weights-dir", metavar="DIR",
                        help="where the random-weight models are written and reused (default: a cache folder; "
                             "a temporary one with --tiny)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not in the built-in table")


@dataclass(frozen=True)
class Request:
    """What the measuring child is asked to do (checked by the parent)."""

    settings: Any  # GenerationSettings
    weights_dir: str
    tiny: bool
    device: str
    mode: str
    attention: str
    vram_limit_gb: Optional[float] = None
    peak_tflops: Optional[float] = None
    compile: bool = False


def run(args) -> int:
    """Entry point: check the flags, write the models if needed, measure in a fresh process, print its JSON."""
    from .weights import ensure_models

    try:
        request, device = _check(args)
    except ValueError as exc:
        return user_error(str(exc))
    # the tiny models are written for each run (seconds); the full-size ones once, into a cache folder
    temporary = None
    if args.weights_dir:
        root = Path(args.weights_dir).expanduser()
    elif args.tiny:
        temporary = root = Path(tempfile.mkdtemp(prefix="framepack-bench-"))
    else:
        root = Path.home() / ".cache" / "framepack-bench" / f"full-{device.type}"
    try:
        started = time.perf_counter()
        try:
            wrote = ensure_models(root, tiny=args.tiny, device=device, model=request.settings.model)
        except ValueError as exc:
            return user_error(str(exc))
        write_seconds = time.perf_counter() - started if wrote else 0.0
        code, result = run_fresh(measure, dataclasses.replace(request, weights_dir=str(root)))
        if result is None:
            print(f"error: the measurement failed (exit status {code})", file=sys.stderr)
            return code
        result["weights_dir"] = str(root) if temporary is None else None
        result["write_seconds"] = round(write_seconds, 3)
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _check(args):
    """The child's request from the flags, and the device; ValueError (SettingsError) says what is wrong."""
    from ..runtime import Runtime
    from ..settings import VIDEO_FPS, ModelSources

    job = TINY_JOB if args.tiny else FULL_JOB
    settings = settings_from_args(args, prompt=PROMPT, seed=0,
                                  **{name: value for name, value in job.items() if getattr(args, name) is None})
    # the shortest video the settings allow; only its first section is run (the job is ended after it)
    settings = settings.replace(seconds=max(1.0, settings.window * 4 / VIDEO_FPS))
    # the tiny models are for the CPU unless a device is asked for
    device = "cpu" if args.tiny and args.device == "auto" else args.device
    # resolves the device, the attention kernel and whether it can compile now, before any model is
    # written; the sources (the weights folder, which depends on the device) are the child's to open
    runtime = Runtime(ModelSources(), device=device, vram=args.mode, attention=args.attention,
                      compile=bool(args.compile))
    if args.vram_limit_gb is not None:
        if runtime.device.type not in ("cuda", "cpu"):
            raise ValueError("--vram-limit-gb needs a CUDA device (or the CPU, where it is a stand-in budget).")
        if args.vram_limit_gb <= 0:
            raise ValueError(f"--vram-limit-gb must be more than 0, not {args.vram_limit_gb:g}.")
    request = Request(settings=settings, weights_dir="", tiny=bool(args.tiny), device=str(runtime.device),
                      mode=args.mode, attention=args.attention, vram_limit_gb=args.vram_limit_gb,
                      peak_tflops=args.peak_tflops, compile=bool(args.compile))
    return request, runtime.device


# ---------------------------------------------------------------------------------------------
# The measurement (in the fresh process)


@dataclass
class _Section:
    """What one run of the first section left: its events (with their times), the end, the probe."""

    events: list = field(default_factory=list)  # (perf_counter time, event)
    end: float = 0.0  # when the first section was done
    tokens: dict = field(default_factory=dict)  # image and text tokens as the blocks see them
    forwards: int = 0  # transformer calls that really computed (a step cache may skip)
    sampling_streamed: list = field(default_factory=list)  # streamed bytes when sampling starts and ends


def measure(request: Request) -> dict | int:
    """Open the models, run the first section of a job, and return every figure (1 when the job failed)."""
    import torch

    from .memory import MemorySampler

    sampler = MemorySampler(SAMPLE_SECONDS).start()
    runtime, limit = _open(request)
    started = time.perf_counter()
    components = runtime.components(request.settings.model, fp8=request.settings.fp8)
    load_seconds = time.perf_counter() - started
    needs, bucket = _place(runtime, components, request, limit)
    run = _first_section(runtime, components, request.settings)
    sampler.stop()
    last = run.events[-1][1]
    if not _ended_after_the_section(last, run.end):
        message = getattr(last, "message", type(last).__name__)
        print(f"error: the benchmark job did not finish: {message}", file=sys.stderr)
        return 1
    device = runtime.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "tiny": request.tiny, "device": str(device), "gpu": gpu, "mode": runtime.placement.mode.value,
        "attention": runtime.attention, "model": request.settings.model, "resolution": request.settings.resolution,
        "bucket": list(bucket), "window": request.settings.window, "steps": request.settings.steps,
        "cache": request.settings.cache, "fp8": request.settings.fp8, "compile": request.compile,
        "vram_limit_gb": request.vram_limit_gb,
        "preserve_gb": request.settings.gpu_memory_preservation,
        "dtypes": {k: str(v).replace("torch.", "") for k, v in components.dtypes.items()},
        "load_seconds": round(load_seconds, 3),
        **_timings(run, request.settings),
        **_memory(runtime.placement, sampler),
        **_flops(run, components.transformer.config, request, gpu),
        **_steps(run, request.settings),
        "estimated_needs": {"low_device_bytes": needs.low_device_bytes, "high_device_bytes": needs.high_device_bytes,
                            "ram_bytes": needs.ram_bytes, "stages": needs.stages},
    }


def _open(request: Request):
    """The runtime on the random-weight models, with the device memory capped as asked; and the cap in bytes."""
    import torch

    from ..memory import GIB, apply_memory_limit
    from ..runtime import Runtime
    from ..tiny import sources_at

    runtime = Runtime(sources_at(Path(request.weights_dir)), device=request.device, vram=request.mode,
                      attention=request.attention, compile=request.compile)
    limit = int(request.vram_limit_gb * GIB) if request.vram_limit_gb is not None else None
    if runtime.device.type == "cuda":
        apply_memory_limit(runtime.device, limit)
        torch.cuda.reset_peak_memory_stats(runtime.device)
    return runtime, limit


def _place(runtime, components, request: Request, limit: Optional[int]):
    """Choose the VRAM mode from the job's estimated needs and set the runtime's placement; (needs, bucket)."""
    from ..conditioning import find_nearest_bucket
    from ..memory import Placement, VramMode, choose_vram_mode, device_free_bytes, estimate_needs

    settings, device = request.settings, runtime.device
    bucket = find_nearest_bucket(settings.resolution, settings.resolution, settings.resolution)
    needs = estimate_needs(components, settings, *bucket)
    mode = choose_vram_mode(request.mode, device, free_bytes=device_free_bytes(device, limit),
                            need_bytes=needs.high_device_bytes)
    available = None
    if device.type == "cpu" and mode is VramMode.LOW:
        # no device memory to measure: stand in a budget (the limit, or just the transformer's fixed
        # tensors and a ring) so that low mode really streams, through the same code as on a GPU
        available = limit if limit is not None else _streaming_budget(components.transformer)
    runtime.placement = Placement(device, mode, memory_limit_bytes=limit,
                                  available=(lambda: available) if available is not None else None)
    return needs, bucket


def _streaming_budget(transformer) -> int:
    from ..offload import module_tensors, streamable_blocks, tensors_bytes

    sizes = [tensors_bytes(module_tensors(b)) for b in streamable_blocks(transformer)]
    return tensors_bytes(module_tensors(transformer)) - sum(sizes) + 2 * max(sizes)


def _first_section(runtime, components, settings) -> _Section:
    """Run the job until its first section is done, then cancel it; the events, timed, and the transformer's probe."""
    import torch

    from ..events import CancelToken, SectionDone, Stage, StageName
    from ..pipeline import run_job

    run = _Section()
    first_block = components.transformer.transformer_blocks[0]

    def saw(module, block_args) -> None:
        run.tokens.setdefault("image", int(block_args[0].shape[1]))
        run.tokens.setdefault("text", int(block_args[1].shape[1]))

    # not traced into a compiled block (--compile): counting there would recompile the block at every call
    @torch.compiler.disable
    def computed(*_) -> None:
        run.forwards += 1

    cancel = CancelToken()

    def emit(event) -> None:
        now = time.perf_counter()
        run.events.append((now, event))
        if isinstance(event, Stage):
            # the transformer streams between the first section's sampling stage and the next stage (decoding)
            sampling = event.name is StageName.SAMPLING
            if (sampling and not run.sampling_streamed) or (not sampling and len(run.sampling_streamed) == 1):
                run.sampling_streamed.append(runtime.placement.stats.streamed_bytes)
        if isinstance(event, SectionDone) and not run.end:
            run.end = now
            cancel.cancel()  # the job stops at its next check, before the second section samples

    hooks = [first_block.register_forward_pre_hook(saw), first_block.ff.register_forward_hook(computed)]
    try:
        with tempfile.TemporaryDirectory(prefix="framepack-bench-job-") as out:
            # the pipeline's own loop, run here so that the cancel lands exactly after the section
            run_job(components, settings, _image(settings.resolution), Path(out) / "bench.mp4", emit=emit,
                    cancel=cancel, placement=runtime.placement, metadata=runtime.record(settings.model))
    finally:
        for hook in hooks:
            hook.remove()
    run.end = run.end or time.perf_counter()
    return run


def _image(size: int):
    """A size × size RGB gradient."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)


def _ended_after_the_section(last, end: float) -> bool:
    from ..events import Cancelled, Finished

    return isinstance(last, Finished) or (isinstance(last, Cancelled) and bool(end) and bool(last.frames))


def _stages(run: _Section) -> list[tuple[float, Any]]:
    """The first section's Stage events with their times."""
    from ..events import Stage

    return [(t, e) for t, e in run.events if isinstance(e, Stage) and t <= run.end]


def _step_times(run: _Section) -> list[float]:
    """When each sampling step of the first section finished."""
    from ..events import StepProgress

    return [t for t, e in run.events if isinstance(e, StepProgress) and e.section == 1]


def _sampling_seconds(run: _Section) -> float:
    """From the start of the first section's sampling to its last step."""
    from ..events import StageName

    start = next(t for t, e in _stages(run) if e.name is StageName.SAMPLING)
    return _step_times(run)[-1] - start


def _timings(run: _Section, settings) -> dict[str, Any]:
    """Seconds per stage (from the Stage events), per step and per frame of the first section."""
    from ..events import StageName

    stages = _stages(run)
    stage_seconds: dict[str, float] = {}
    for (t0, e), (t1, _) in zip(stages, stages[1:] + [(run.end, None)]):
        stage_seconds[e.name.value] = round(stage_seconds.get(e.name.value, 0.0) + t1 - t0, 4)
    sampling = _sampling_seconds(run)
    steps = _step_times(run)
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    frames = settings.window * 4
    decode = stage_seconds.get(StageName.VAE_DECODE.value, 0.0)
    return {
        "stage_seconds": stage_seconds,
        "sampling_seconds": round(sampling, 4),
        "seconds_per_step": round(sampling / settings.steps, 4),
        "seconds_per_step_steady": round(statistics.median(intervals), 4) if intervals else None,
        "frames_per_section": frames,
        "seconds_per_frame": round((sampling + decode) / frames, 4),
    }


def _memory(placement, sampler) -> dict[str, Any]:
    """Peak GPU and system memory, and what the placement copied and streamed."""
    import torch

    device, stats = placement.device, placement.stats
    cuda = device.type == "cuda"
    return {
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "peak_private_bytes": sampler.peak_private + stats.pinned_bytes,
        "peak_anonymous_bytes": sampler.peak_private,
        "pinned_bytes": stats.pinned_bytes,
        "peak_rss_bytes": sampler.peak_rss_kib() * 1024,
        "bytes_cpu_to_gpu": stats.host_to_device_bytes,
        "bytes_streamed": stats.streamed_bytes,
        "streamed_loads": stats.streamed_loads,
        "gather_seconds": round(stats.gather_seconds, 4),
        "staging_wait_seconds": round(stats.staging_wait_seconds, 4),
        "gather_gb_per_s": round(stats.streamed_bytes / stats.gather_seconds / 1e9, 2) if stats.gather_seconds else None,
        "plans": stats.plans,
    }


def _flops(run: _Section, config, request: Request, gpu: Optional[str]) -> dict[str, Any]:
    """The transformer's FLOPs per forward, its achieved rate, and that rate over the GPU's bf16 peak."""
    flops_forward = transformer_flops(config, run.tokens.get("image", 0), run.tokens.get("text", 0))
    sampling = _sampling_seconds(run)
    achieved = flops_forward * run.forwards / sampling if sampling > 0 else None
    peak = request.peak_tflops * 1e12 if request.peak_tflops else bf16_peak(gpu)
    return {
        "transformer_tokens": run.tokens,
        "transformer_forwards": run.forwards,
        "transformer_flops_per_forward": flops_forward,
        "transformer_tflops_achieved": round(achieved / 1e12, 4) if achieved else None,
        "bf16_peak_tflops": round(peak / 1e12, 1) if peak else None,
        "bf16_peak_fraction": round(achieved / peak, 4) if (achieved and peak) else None,
    }


def _steps(run: _Section, settings) -> dict[str, Any]:
    """Sampling steps computed and skipped in the first section, and the transformer's bytes streamed per step."""
    computed = run.forwards // calls_per_step(settings)
    start, end = (run.sampling_streamed + [None, None])[:2]
    streamed = end - start if start is not None and end is not None else None
    return {
        "steps_computed": computed,
        "steps_skipped": settings.steps - computed,
        "bytes_streamed_sampling": streamed,
        "bytes_streamed_per_step": round(streamed / settings.steps) if streamed is not None else None,
    }


def transformer_flops(config, image_tokens: int, text_tokens: int) -> int:
    """FLOPs of one transformer forward: the blocks' matmuls and attention (2 per multiply-add).

    Per token, a double-stream block (image and text streams alike) and a single-stream block
    both do q, k, v and output projections (4·H²) and an MLP (2·H·F) multiply-adds; attention over
    all N tokens adds 2·N·H (QKᵀ and AV). Embedders, modulation and the output layer (under 1%)
    are not counted.
    """
    hidden = config.num_attention_heads * config.attention_head_dim
    ff = int(hidden * config.mlp_ratio)
    n = image_tokens + text_tokens
    per_block = 2 * n * (4 * hidden * hidden + 2 * hidden * ff) + 4 * n * n * hidden
    return int((config.num_layers + config.num_single_layers) * per_block)


def bf16_peak(name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by name, when known."""
    if not name:
        return None
    for key, flops in BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None
