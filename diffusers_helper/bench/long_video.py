"""`python -m diffusers_helper bench-long`: cost per section and peak RAM against the video's length.

Each length runs in a fresh Python process (`fresh.run_fresh`), so that its peak RSS is not
polluted by the lengths run before it. A child opens the models through a `Runtime`, generates one
video from a synthetic 800×600 picture, times every section (wall and CPU time, and the pipeline's
stages) from the events, reads the kernel's peak-RSS mark per section (`memory.MemorySampler`) and
returns its figures. The parent only checks the arguments, starts the children and adds a summary
(last/second section time, peak-RSS growth from the shortest to the longest video) before printing
one JSON document on stdout.

The phases of a section come from the pipeline's Stage events; what no event marks (the latents
file, the remux, the writer's frame counts) is timed by wrapping the pipeline's writer and latents
writer for the child's run only (`_probed`); the pipeline and the video writer are not changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..options import add_runtime_arguments, add_settings_arguments, add_source_arguments, settings_from_args, user_error
from .fresh import run_fresh

# What the issue asks of the figures.
TARGET_LAST_OVER_SECOND = 1.2
TARGET_RSS_GROWTH_MB = 300.0

IMAGE_SIZE = (800, 600)  # width, height: a 4:3 photo-like input, so the 640 bucket is 704×544
PROMPT = "A calm sea under a slowly moving sky, gentle camera pan."
RSS_SAMPLE_SECONDS = 0.05
MIB = 1024 * 1024
EXIT_USER_ERROR = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench-long flags."""
    parser.add_argument("--seconds", default="10,30,60", help="comma-separated video lengths in seconds (each 1-120)")
    add_settings_arguments(parser, ("model", "resolution", "window", "steps", "crf"), defaults={"steps": "2"},
                           help={"steps": "sampling steps per section (default 2)"})
    add_runtime_arguments(parser, device_default="cpu", compile_flag=False)
    parser.add_argument("--output-dir", metavar="DIR", help="where the videos are written (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated videos (deleted by default)")
    add_source_arguments(parser)


@dataclass(frozen=True)
class Length:
    """One child's job: a video of one length, generated and measured."""

    settings: Any  # GenerationSettings
    sources: Any  # ModelSources
    device: str
    vram: str
    attention: str
    output: str  # the video's path
    keep: bool


def run(args) -> int:
    """Entry point of the subcommand: check, run one fresh process per length, report; returns the exit status."""
    # 1. Check everything cheap before any child starts.
    try:
        all_settings, sources, device, out_dir = _check(args)
    except ValueError as exc:
        return user_error(str(exc))

    # 2. One fresh process per length.
    made_dir = out_dir is None
    out_dir = Path(tempfile.mkdtemp(prefix="bench-long-")) if made_dir else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for settings in all_settings:
            seconds = settings.seconds
            print(f"bench-long: {seconds:g} s, {settings.sections} sections, {settings.total_frames} frames ...",
                  file=sys.stderr, flush=True)
            output = out_dir / video_name(settings.model, seconds)
            code, result = run_fresh(measure_length, Length(settings, sources, device, args.vram, args.attention,
                                                            str(output), bool(args.keep)))
            if result is None:
                if code == EXIT_USER_ERROR:
                    return user_error(f"the {seconds:g} s run stopped on an input error (see above).")
                print(f"error: the {seconds:g} s run failed with exit status {code} (see above).", file=sys.stderr)
                return 1
            results.append(result)
    finally:
        if made_dir and not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)

    # 3. Report.
    report = _report(args, all_settings[0], sources, out_dir, results)
    _print_table(report, file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def _check(args):
    """(settings per length, sources, device, output folder or None); ValueError says what is wrong."""
    from ..outputs import OutputPaths
    from ..runtime import Runtime

    lengths = parse_lengths(args.seconds)
    all_settings = [settings_for(args, s) for s in lengths]
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--output-dir {out_dir} is a file, not a folder.")
        clash = [p for s in all_settings for p in OutputPaths(out_dir / video_name(s.model, s.seconds)).existing()]
        if clash:
            raise ValueError(f"{clash[0]} already exists; choose another --output-dir (outputs are never overwritten).")
    sources = _sources(args, all_settings[0].model)
    runtime = Runtime(sources, device=args.device, vram=args.vram, attention=args.attention)
    runtime.check(all_settings[0].model)
    return all_settings, sources, str(runtime.device), out_dir


def parse_lengths(text: str) -> list[float]:
    """'10,30,60' -> [10.0, 30.0, 60.0], each a valid video length, sorted, no repeats."""
    from ..settings import GenerationSettings

    items = [item.strip() for item in str(text).split(",")]
    if not text or any(not item for item in items):
        raise ValueError(f"--seconds must be a comma-separated list of lengths such as 10,30,60, not {text!r}.")
    lengths = [float(GenerationSettings(seconds=item).seconds) for item in items]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"--seconds lists a length twice: {text!r}.")
    return sorted(lengths)


def settings_for(args, seconds: float):
    """The GenerationSettings of one bench video (TeaCache off: every step is computed)."""
    return settings_from_args(args, prompt=PROMPT, seconds=seconds, cache="none")


def video_name(model: str, seconds: float) -> str:
    """File name of one bench video."""
    return f"bench-{model}-{seconds:g}s.mp4"


def _sources(args, model: str):
    """The tiny models unless every source is given explicitly."""
    from ..options import sources_from_args

    explicit = args.hunyuan and args.siglip and args.transformer
    return sources_from_args(argparse.Namespace(**{**vars(args), "tiny": not explicit}), model)


def _report(args, settings, sources, out_dir: Path, results: list[dict]) -> dict:
    return {
        "benchmark": "bench-long",
        "settings": {
            "model": settings.model, "resolution": settings.resolution, "window": settings.window,
            "steps": settings.steps, "crf": settings.crf, "teacache": False, "device": args.device,
            "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} synthetic gradient",
            "models": {"hunyuan": str(sources.hunyuan), "siglip": str(sources.siglip),
                       "transformer": str(sources.transformer(settings.model))},
            "output_dir": str(out_dir) if args.keep else None,
        },
        "lengths": results,
        "summary": summarize(results),
    }


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> dict:
    """Per-section cost ratios and the peak-RSS growth from the shortest to the longest video."""
    ratios = {f"{r['seconds']:g}": r["last_over_second"] for r in results}
    known = [v for v in ratios.values() if v is not None]
    shortest = min(results, key=lambda r: r["seconds"])
    longest = max(results, key=lambda r: r["seconds"])
    growth_kib = longest["peak_rss_kib"] - shortest["peak_rss_kib"]
    worst = max(known) if known else None
    growth_mb = growth_kib * 1024 / 1e6
    return {
        "last_over_second": ratios,
        "worst_last_over_second": worst,
        # One section against one other is at the mercy of a busy machine; medians of three are steadier.
        "late_over_early_median": {f"{r['seconds']:g}": _late_over_early(r.get("section_s") or []) for r in results},
        "last_over_second_cpu": {f"{r['seconds']:g}": r.get("last_over_second_cpu") for r in results},
        "late_over_early_median_cpu": {f"{r['seconds']:g}": _late_over_early(r.get("section_cpu_s") or [])
                                       for r in results},
        # Which part of a section grows, if any: (second section, last section) per phase.
        "phases_second_last_s": {f"{r['seconds']:g}": _second_last_phases(r.get("phases_s") or {}) for r in results},
        "rss_growth": {
            "from_seconds": shortest["seconds"], "to_seconds": longest["seconds"],
            "mib": round(growth_kib / 1024, 1), "mb": round(growth_mb, 1),
            # What the growth is made of: the latents of the whole history, kept by design ...
            "history_latents_mib": _difference(longest, shortest, lambda r: r.get("history_latents_mib")),
            # ... the RSS between sections once the video is done (what stays allocated) ...
            "after_last_section_mib": _difference(longest, shortest, lambda r: _last(r.get("rss_after_section_mib"))),
            # ... and the typical peak of the final sections (the VAE decode's transient, plus the above).
            "late_section_peaks_median_mib": _difference(
                longest, shortest, lambda r: _median_last(r.get("section_peak_rss_mib"))),
        },
        "targets": {
            "last_over_second_max": TARGET_LAST_OVER_SECOND,
            "rss_growth_max_mb": TARGET_RSS_GROWTH_MB,
            "last_over_second_met": None if worst is None else worst <= TARGET_LAST_OVER_SECOND,
            "rss_growth_met": growth_mb < TARGET_RSS_GROWTH_MB,
        },
    }


def _late_over_early(section_s: list[float]) -> Optional[float]:
    """Median of the last three sections over the median of sections 2-4 (the first also encodes the inputs)."""
    if len(section_s) < 4:
        return None
    early = statistics.median(section_s[1:4])
    late = statistics.median(section_s[-3:])
    return round(late / early, 3)


def _difference(longest: dict, shortest: dict, figure) -> Optional[float]:
    high, low = figure(longest), figure(shortest)
    return None if high is None or low is None else round(high - low, 1)


def _last(values: Optional[list]) -> Optional[float]:
    return values[-1] if values else None


def _median_last(values: Optional[list], count: int = 3) -> Optional[float]:
    known = [v for v in (values or [])[-count:] if v is not None]
    return statistics.median(known) if known else None


def _second_last_phases(phases: dict) -> dict:
    return {name: [times[1], times[-1]] for name, times in phases.items() if len(times) > 1}


def _print_table(report: dict, file) -> None:
    print(f"{'length':>7} {'sections':>8} {'total s':>8} {'2nd s':>7} {'last s':>7} {'last/2nd':>8} "
          f"{'frames':>7} {'encoded':>7} {'peak RSS MiB':>12}", file=file)
    for r in report["lengths"]:
        ratio = "-" if r["last_over_second"] is None else f"{r['last_over_second']:.2f}"
        second = "-" if r["second_section_s"] is None else f"{r['second_section_s']:.2f}"
        print(f"{r['seconds']:>6g}s {r['sections']:>8} {r['total_s']:>8.1f} {second:>7} {r['last_section_s']:>7.2f} "
              f"{ratio:>8} {r['frames']:>7} {r['frames_encoded']:>7} {r['peak_rss_mib']:>12.1f}", file=file)
    growth = report["summary"]["rss_growth"]
    print(f"peak RSS growth {growth['from_seconds']:g} s -> {growth['to_seconds']:g} s: "
          f"{growth['mib']} MiB ({growth['mb']} MB)", file=file)


# --------------------------------------------------------------------------------------------
# Child: one length, measured (in a fresh process)
# --------------------------------------------------------------------------------------------


def bench_image():
    """A smooth 800×600 RGB picture with some structure (gradients, a disc, soft stripes)."""
    import numpy as np

    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / (width - 1), y / (height - 1)
    red = 40 + 180 * u
    green = 60 + 150 * v + 20 * np.sin(u * 12.0)
    blue = 200 - 120 * u * v
    disc = ((x - 0.62 * width) ** 2 + (y - 0.4 * height) ** 2) < (0.18 * height) ** 2
    red = np.where(disc, 235, red)
    green = np.where(disc, 200, green)
    blue = np.where(disc, 90, blue)
    image = np.stack([red, green, blue], axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def measure_length(length: Length) -> dict | int:
    """Generate one video and return its figures; 2 on an input error, 1 when the job did not finish."""
    from ..runtime import Runtime
    from .memory import MemorySampler

    settings, output = length.settings, Path(length.output)
    with MemorySampler(RSS_SAMPLE_SECONDS, private=False, windows=True) as sampler:
        rss_start = sampler.rss_now()
        try:
            runtime = Runtime(length.sources, device=length.device, vram=length.vram, attention=length.attention)
            loaded = _load(runtime, settings.model, sampler)
        except ValueError as exc:
            return user_error(str(exc))
        run = _generate(runtime, settings, output, sampler)
        if not run.finished:
            return 1
    peak_kib = sampler.peak_rss_kib()
    result = {**_figures(run, settings, loaded),
              "rss_start_mib": _mib(rss_start), "peak_rss_kib": peak_kib, "peak_rss_mib": round(peak_kib / 1024, 1),
              "peak_rss_exact": sampler.exact, "sampled_peak_rss_mib": _mib(sampler.sampled_peak_rss or None)}
    if length.keep:
        result["video"] = str(output)
    else:
        _remove_outputs(output)
    return result


def _load(runtime, model: str, sampler) -> dict[str, Any]:
    """Load the models (ValueError when they cannot be); the time and RSS it took."""
    started = time.perf_counter()
    runtime.components(model)
    load_s = time.perf_counter() - started
    rss_loaded, load_peak = sampler.take_window()
    return {"load_s": round(load_s, 3), "rss_after_load_mib": _mib(rss_loaded), "load_peak_rss_mib": _mib(load_peak)}


class _Probes:
    """Counts and times the writer and the latents file without touching pipeline.py or video.py."""

    def __init__(self) -> None:
        self.writers: list = []
        self.add_section_s: list[float] = []
        self.remux_s: list[float] = []
        self.save_latents_s: list[float] = []
        self.max_frames_in_memory = 0


@contextlib.contextmanager
def _probed() -> Iterator[_Probes]:
    """Patch the pipeline's writer class, the remuxer and the latents writer with timed wrappers.

    The pipeline looks each up by name when it uses it (`video.SectionVideoWriter`,
    `pipeline.save_latents_file`, `video._remux`), so the wrappers see every call of the job.
    """
    from .. import pipeline, video

    probes = _Probes()
    base = video.SectionVideoWriter

    class CountingWriter(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            probes.writers.append(self)

        def add_section(self, *a, **k):
            start = time.perf_counter()
            try:
                return super().add_section(*a, **k)
            finally:
                probes.add_section_s.append(time.perf_counter() - start)
                probes.max_frames_in_memory = max(probes.max_frames_in_memory, self.frames_in_memory)

    def timed(original, into: list[float]):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                into.append(time.perf_counter() - start)
        return wrapper

    patches = [(video, "SectionVideoWriter", CountingWriter),
               (video, "_remux", timed(video._remux, probes.remux_s)),
               (pipeline, "save_latents_file", timed(pipeline.save_latents_file, probes.save_latents_s))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield probes
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@dataclass
class _Run:
    """What one generated video left: the times and memory of each section, and the probes."""

    probes: _Probes
    job_start: float = 0.0
    cpu_start: float = 0.0
    total_s: float = 0.0
    marks: list = field(default_factory=list)  # per section: time of each stage and of SectionDone
    section_end: list = field(default_factory=list)
    section_cpu: list = field(default_factory=list)  # process CPU time (all threads) when each section is done
    rss_after: list = field(default_factory=list)  # current RSS when each section is done
    rss_peaks: list = field(default_factory=list)  # peak RSS during each section
    video_bytes: list = field(default_factory=list)  # size of the playable MP4 after each section
    final: Any = None  # the Finished event
    finished: bool = False


def _generate(runtime, settings, output: Path, sampler) -> _Run:
    """Generate the video, marking the stages and the end of each section; says why when it did not finish."""
    from ..events import Cancelled, Failed, Finished, SectionDone, Stage, StageName

    current: dict[str, float] = {}
    with _probed() as probes:
        run = _Run(probes, job_start=time.perf_counter(), cpu_start=time.process_time())
        for event in runtime.generate(settings, bench_image(), output):
            now = time.perf_counter()
            if isinstance(event, Stage) and event.name is StageName.SAMPLING:
                current = {"sampling": now}
            elif isinstance(event, Stage) and event.name in (StageName.VAE_DECODE, StageName.WRITING):
                current[event.name.value] = now
            elif isinstance(event, SectionDone):
                current["done"] = now
                run.marks.append(current)
                current = {}
                _section_done(run, event, now, output, sampler, settings)
            elif isinstance(event, (Finished, Failed, Cancelled)):
                run.final = event
        run.total_s = time.perf_counter() - run.job_start
    run.finished = isinstance(run.final, Finished)
    if not run.finished:
        print(f"error: {getattr(run.final, 'message', 'the job ended without finishing')}", file=sys.stderr)
    return run


def _section_done(run: _Run, event, now: float, output: Path, sampler, settings) -> None:
    """Record the end of a section: its time, CPU time, RSS now and peak, the video's size."""
    run.section_end.append(now)
    run.section_cpu.append(time.process_time())
    rss, peak = sampler.take_window()
    # the last partial may already be renamed to the final name
    run.video_bytes.append(_size(event.video_path) or _size(output))
    run.rss_after.append(rss)
    run.rss_peaks.append(peak)
    previous = run.job_start if len(run.section_end) == 1 else run.section_end[-2]
    print(f"  {settings.seconds:g} s: section {event.section}/{event.sections} "
          f"{now - previous:6.2f} s, {event.frames} frames", file=sys.stderr, flush=True)


def _figures(run: _Run, settings, loaded: dict[str, Any]) -> dict[str, Any]:
    """The figures of one video from its run (and from loading its models: `loaded`)."""
    from ..packing import overlap_frames

    writer, probes = run.probes.writers[-1], run.probes
    starts = [run.job_start] + run.section_end[:-1]
    section_s = [end - start for start, end in zip(starts, run.section_end)]
    cpu_s = [end - start for start, end in zip([run.cpu_start] + run.section_cpu[:-1], run.section_cpu)]
    overlap = overlap_frames(settings.window)
    sections = len(section_s)
    second = section_s[1] if sections > 1 else None
    return {
        "seconds": settings.seconds,
        "sections": sections,
        "frames": run.final.frames,
        "expected_frames": settings.total_frames,
        "frames_encoded": writer.frames_encoded,
        "overlap": overlap,
        "frames_encoded_bound": settings.total_frames + overlap * sections,
        "max_frames_in_memory": probes.max_frames_in_memory,
        "load_s": loaded["load_s"],
        "total_s": round(run.total_s, 3),
        "first_section_s": round(section_s[0], 3),
        "second_section_s": None if second is None else round(second, 3),
        "last_section_s": round(section_s[-1], 3),
        "last_over_second": None if second is None else round(section_s[-1] / second, 3),
        "section_s": [round(t, 3) for t in section_s],
        # CPU time of the whole process per section: less at the mercy of other programs than wall time.
        "section_cpu_s": [round(t, 3) for t in cpu_s],
        "last_over_second_cpu": None if second is None else round(cpu_s[-1] / cpu_s[1], 3),
        # Where each section's time goes (from the pipeline's stage events and the probes).
        "phases_s": {
            "sample": [_span(m, "sampling", "vae_decode") for m in run.marks],
            "decode": [_span(m, "vae_decode", "writing") for m in run.marks],
            "write": [_span(m, "writing", "done") for m in run.marks],
            "save_latents": [round(t, 3) for t in probes.save_latents_s],
            "remux": [round(t, 3) for t in probes.remux_s],
        },
        "rss_after_load_mib": loaded["rss_after_load_mib"],
        "history_latents_mib": round(_history_bytes(settings) / MIB, 3),
        "load_peak_rss_mib": loaded["load_peak_rss_mib"],
        "rss_after_section_mib": [_mib(v) for v in run.rss_after],
        "section_peak_rss_mib": [_mib(v) for v in run.rss_peaks],
        "video_mib_after_section": [round(v / MIB, 2) for v in run.video_bytes],
    }


def _history_bytes(settings) -> int:
    """Bytes of the pipeline's float32 history latents at the end (with its zero context frames)."""
    from ..conditioning import find_nearest_bucket
    from ..packing import HISTORY_FRAMES
    from ..pipeline import LATENT_CHANNELS, VAE_SPATIAL

    height, width = find_nearest_bucket(IMAGE_SIZE[1], IMAGE_SIZE[0], settings.resolution)
    frames = settings.total_latent_frames + HISTORY_FRAMES
    return frames * LATENT_CHANNELS * (height // VAE_SPATIAL) * (width // VAE_SPATIAL) * 4


def _size(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / MIB, 1)


def _span(marks: dict[str, float], start: str, end: str) -> Optional[float]:
    if start in marks and end in marks:
        return round(marks[end] - marks[start], 3)
    return None


def _remove_outputs(output: Path) -> None:
    """Remove a bench video's files: the finished ones and any partial video left."""
    from ..outputs import OutputPaths

    paths = OutputPaths(output)
    for path in paths.finished_files() + paths.partials():
        path.unlink(missing_ok=True)
