"""`python -m diffusers_helper bench-long`: cost per section and peak RAM against the video's length.

Each length runs in a fresh Python process, so that its peak RSS is not polluted by the lengths
run before it. A child loads the models, generates one video from a synthetic 800×600 picture,
times every section (wall and CPU time, and the pipeline's stages) from the events, reads the
kernel's peak-RSS mark per section and writes its figures to a JSON file. The parent only checks
the arguments, starts the children and adds a summary (last/second section time, peak-RSS growth
from the shortest to the longest video) before printing one JSON document on stdout.

The writer and the latents file are timed by wrapping them for the child's run only; the
pipeline and the video writer are not changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

# What the issue asks of the figures.
TARGET_LAST_OVER_SECOND = 1.2
TARGET_RSS_GROWTH_MB = 300.0

IMAGE_SIZE = (800, 600)  # width, height: a 4:3 photo-like input, so the 640 bucket is 704×544
PROMPT = "A calm sea under a slowly moving sky, gentle camera pan."
RSS_SAMPLE_SECONDS = 0.05
MIB = 1024 * 1024


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench-long flags (the model-source flags are added by the CLI)."""
    parser.add_argument("--seconds", default="10,30,60", help="comma-separated video lengths in seconds (each 1-120)")
    parser.add_argument("--model", default="framepack", choices=["framepack", "f1"])
    parser.add_argument("--resolution", default="640", help="bucket resolution (64-1280)")
    parser.add_argument("--window", default="9", help="latent window size (1-33)")
    parser.add_argument("--steps", default="2", help="sampling steps per section (1-100)")
    parser.add_argument("--crf", default="16", help="MP4 compression (0-100)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where the videos are written (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated videos (deleted by default)")
    # Internal: run one length and write its figures to this JSON file.
    parser.add_argument("--_child", metavar="RESULT", help=argparse.SUPPRESS)


def run_bench(args) -> int:
    """Entry point of the subcommand; returns the exit status."""
    if args._child:
        return _child(args)
    return _parent(args)


# --------------------------------------------------------------------------------------------
# Parent: validate, run one child per length, summarise
# --------------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[float]:
    """'10,30,60' -> [10.0, 30.0, 60.0], each a valid video length, sorted, no repeats."""
    from .settings import GenerationSettings

    items = [item.strip() for item in str(text).split(",")]
    if not text or any(not item for item in items):
        raise ValueError(f"--seconds must be a comma-separated list of lengths such as 10,30,60, not {text!r}.")
    lengths = [float(GenerationSettings(seconds=item).seconds) for item in items]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"--seconds lists a length twice: {text!r}.")
    return sorted(lengths)


def settings_for(args, seconds: float):
    """The GenerationSettings of one bench video (TeaCache off: every step is computed)."""
    from .settings import GenerationSettings

    return GenerationSettings(prompt=PROMPT, model=args.model, seconds=seconds, window=args.window, steps=args.steps,
                              crf=args.crf, resolution=args.resolution, teacache=False)


def video_name(model: str, seconds: float) -> str:
    """File name of one bench video."""
    return f"bench-{model}-{seconds:g}s.mp4"


def _parent(args) -> int:
    from .pipeline import OutputPaths

    # 1. Check everything cheap before any child starts.
    try:
        lengths = parse_lengths(args.seconds)
        all_settings = [settings_for(args, s) for s in lengths]
        out_dir = Path(args.output_dir) if args.output_dir else None
        if out_dir is not None:
            if out_dir.exists() and not out_dir.is_dir():
                raise ValueError(f"--output-dir {out_dir} is a file, not a folder.")
            clash = [p for s in lengths for p in OutputPaths(out_dir / video_name(args.model, s)).existing()]
            if clash:
                raise ValueError(f"{clash[0]} already exists; choose another --output-dir (outputs are never overwritten).")
        sources = _sources(args)
        from .loading import check_sources

        check_sources(sources, args.model)
    except ValueError as exc:
        return _user_error(str(exc))

    # 2. One fresh process per length.
    made_dir = out_dir is None
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="bench-long-"))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-long-results-") as result_dir:
            for seconds, settings in zip(lengths, all_settings):
                print(f"bench-long: {seconds:g} s, {settings.sections} sections, {settings.total_frames} frames ...",
                      file=sys.stderr, flush=True)
                result_path = Path(result_dir) / f"{seconds:g}.json"
                code = _run_child(args, seconds, sources, out_dir, result_path)
                if code != 0 or not result_path.is_file():
                    if code == 2:
                        return _user_error(f"the {seconds:g} s run stopped on an input error (see above).")
                    print(f"error: the {seconds:g} s run failed with exit status {code} (see above).", file=sys.stderr)
                    return 1
                results.append(json.loads(result_path.read_text(encoding="utf-8")))
    finally:
        if made_dir and not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)

    # 3. Report.
    report = {
        "benchmark": "bench-long",
        "settings": {
            "model": args.model, "resolution": all_settings[0].resolution, "window": all_settings[0].window,
            "steps": all_settings[0].steps, "crf": all_settings[0].crf, "teacache": False, "device": args.device,
            "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} synthetic gradient",
            "models": {"hunyuan": str(sources.hunyuan), "siglip": str(sources.siglip),
                       "transformer": str(sources.transformer(args.model))},
            "output_dir": str(out_dir) if args.keep else None,
        },
        "lengths": results,
        "summary": summarize(results),
    }
    _print_table(report, file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def _sources(args):
    from .__main__ import sources_from_args

    # Tiny models unless every source is given explicitly.
    explicit = args.hunyuan and args.siglip and args.transformer
    args = argparse.Namespace(**{**vars(args), "tiny": not explicit})
    return sources_from_args(args, args.model)


def _run_child(args, seconds: float, sources, out_dir: Path, result_path: Path) -> int:
    command = [
        sys.executable, "-m", "diffusers_helper", "bench-long",
        "--seconds", f"{seconds:g}", "--model", args.model, "--resolution", str(args.resolution),
        "--window", str(args.window), "--steps", str(args.steps), "--crf", str(args.crf), "--device", args.device,
        "--output-dir", str(out_dir),
        "--hunyuan", str(sources.hunyuan), "--siglip", str(sources.siglip),
        "--transformer", str(sources.transformer(args.model)),
        "--_child", str(result_path),
    ] + (["--keep"] if args.keep else [])
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # The child's stdout carries nothing we need; keep the parent's stdout for the JSON alone.
    return subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode


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


def _user_error(message: str) -> int:
    from .__main__ import _user_error as report  # the CLI's one-line error, status 2

    return report(str(message))


# --------------------------------------------------------------------------------------------
# Child: one length, measured
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


class _RssMeter:
    """Peak RSS of this process, overall and per window (one window per section).

    On Linux the kernel's own high-water mark (VmHWM, the figure behind ru_maxrss) is read and
    reset at each window's end (``/proc/self/clear_refs``), so every window's peak is exact. Where
    that is not available a thread samples the RSS every 50 ms instead and the overall peak is
    ru_maxrss. The sampled peak is kept either way as a cross-check.
    """

    def __init__(self, interval: float = RSS_SAMPLE_SECONDS):
        self.interval = interval
        self.sampled_peak = 0
        self._window_sampled = 0
        self._max_hwm_kib = 0  # the largest window peak read from VmHWM
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:  # psutil is in requirements.txt, but the kernel's figures suffice
            self._process = None
        self.exact = self._hwm_kib() is not None and self._reset_hwm()

    # The kernel's high-water mark ------------------------------------------------------------

    @staticmethod
    def _hwm_kib() -> Optional[int]:
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])  # always in kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _reset_hwm(self) -> bool:
        before = self._hwm_kib() or 0
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            return False
        self._max_hwm_kib = max(self._max_hwm_kib, before)
        return True

    # Sampling ----------------------------------------------------------------------------------

    def current(self) -> Optional[int]:
        """The RSS now, in bytes (None without psutil)."""
        return None if self._process is None else self._process.memory_info().rss

    def _sample(self) -> int:
        rss = self.current() or 0
        self.sampled_peak = max(self.sampled_peak, rss)
        self._window_sampled = max(self._window_sampled, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssMeter":
        if self._process is not None:
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._process is not None:
            self._sample()

    # Results -----------------------------------------------------------------------------------

    def take_window(self) -> tuple[Optional[int], Optional[int]]:
        """(RSS now, peak RSS since the previous call) in bytes; starts a new window."""
        rss = self._sample() if self._process is not None else None
        if self.exact:
            peak_kib = self._hwm_kib()
            self.exact = peak_kib is not None and self._reset_hwm()
            if peak_kib is not None:
                self._window_sampled = 0
                return rss, peak_kib * 1024
        peak, self._window_sampled = (self._window_sampled or None), (rss or 0)
        return rss, peak

    def peak_kib(self) -> int:
        """The whole process's peak RSS in KiB, over every window so far."""
        candidates = [self._max_hwm_kib, self.sampled_peak // 1024, self._hwm_kib() or 0]
        try:
            import resource
        except ImportError:  # Windows: the working set's high-water mark
            if self._process is not None:
                candidates.append(getattr(self._process.memory_info(), "peak_wset", 0) // 1024)
        else:
            # KiB on Linux, bytes on macOS; after a VmHWM reset it covers only the current window.
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            candidates.append(maxrss // 1024 if sys.platform == "darwin" else maxrss)
        return int(max(candidates))


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
    """Patch the pipeline's writer class, the remuxer and the latents writer with timed wrappers."""
    from . import pipeline, video

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

    patches = [(video, "SectionVideoWriter", CountingWriter)]
    if hasattr(video, "_remux"):
        patches.append((video, "_remux", timed(video._remux, probes.remux_s)))
    if hasattr(pipeline, "_save_latents"):
        patches.append((pipeline, "_save_latents", timed(pipeline._save_latents, probes.save_latents_s)))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield probes
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _child(args) -> int:
    from .settings import GenerationSettings

    try:
        seconds = parse_lengths(args.seconds)
        if len(seconds) != 1:
            raise ValueError("a bench child runs exactly one length")
        settings = settings_for(args, seconds[0])
        sources = _sources(args)
        output = Path(args.output_dir) / video_name(args.model, settings.seconds)
        from .loading import resolve_device

        device = resolve_device(args.device)
    except ValueError as exc:
        return _user_error(str(exc))
    assert isinstance(settings, GenerationSettings)

    with _RssMeter() as meter:
        rss_start = meter.current()
        result = _measure(settings, sources, device, output, meter)
        if result is None:
            return 1
    peak_kib = meter.peak_kib()
    result["rss_start_mib"] = _mib(rss_start)
    result["peak_rss_kib"] = peak_kib
    result["peak_rss_mib"] = round(peak_kib / 1024, 1)
    result["peak_rss_exact"] = meter.exact
    result["sampled_peak_rss_mib"] = _mib(meter.sampled_peak or None)
    if not args.keep:
        _remove_outputs(output, settings.sections)
    else:
        result["video"] = str(output)
    tmp = Path(args._child).with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, args._child)
    return 0


def _measure(settings, sources, device, output: Path, meter: _RssMeter) -> Optional[dict[str, Any]]:
    """Generate one video and time it section by section; None when the job did not finish."""
    from .events import Cancelled, Failed, Finished, SectionDone, Stage
    from .loading import load_components
    from .pipeline import generate

    image = bench_image()
    started = time.perf_counter()
    components = load_components(sources, settings.model, device=device)
    load_s = time.perf_counter() - started
    rss_loaded, load_peak = meter.take_window()
    rss_after: list[Optional[int]] = []  # current RSS when each section is done
    rss_peaks: list[Optional[int]] = []  # peak RSS during each section
    video_bytes: list[int] = []  # size of the playable MP4 after each section (what the remux writes)

    marks: list[dict[str, float]] = []  # per section: time of each stage and of SectionDone
    current: dict[str, float] = {}
    section_end: list[float] = []
    section_cpu: list[float] = []  # process CPU time (all threads) when each section is done
    final = None
    with _probed() as probes:
        job_start = time.perf_counter()
        cpu_start = time.process_time()
        for event in generate(components, settings, image, output):
            now = time.perf_counter()
            if isinstance(event, Stage):
                if event.name == "sampling":
                    current = {"sampling": now}
                elif event.name in ("vae_decode", "writing"):
                    current[event.name] = now
            elif isinstance(event, SectionDone):
                current["done"] = now
                marks.append(current)
                current = {}
                section_end.append(now)
                section_cpu.append(time.process_time())
                rss, peak = meter.take_window()
                # the last partial may already be renamed to the final name
                video_bytes.append(_size(event.video_path) or _size(output))
                rss_after.append(rss)
                rss_peaks.append(peak)
                previous = job_start if len(section_end) == 1 else section_end[-2]
                print(f"  {settings.seconds:g} s: section {event.section}/{event.sections} "
                      f"{now - previous:6.2f} s, {event.frames} frames", file=sys.stderr, flush=True)
            elif isinstance(event, (Finished, Failed, Cancelled)):
                final = event
        total_s = time.perf_counter() - job_start
    if not isinstance(final, Finished):
        message = getattr(final, "message", "the job ended without finishing")
        print(f"error: {message}", file=sys.stderr)
        return None

    writer = probes.writers[-1]
    starts = [job_start] + section_end[:-1]
    section_s = [end - start for start, end in zip(starts, section_end)]
    cpu_s = [end - start for start, end in zip([cpu_start] + section_cpu[:-1], section_cpu)]
    overlap = settings.window * 4 - 3
    sections = len(section_s)
    second = section_s[1] if sections > 1 else None
    return {
        "seconds": settings.seconds,
        "sections": sections,
        "frames": final.frames,
        "expected_frames": settings.total_frames,
        "frames_encoded": writer.frames_encoded,
        "overlap": overlap,
        "frames_encoded_bound": settings.total_frames + overlap * sections,
        "max_frames_in_memory": probes.max_frames_in_memory,
        "load_s": round(load_s, 3),
        "total_s": round(total_s, 3),
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
            "sample": [_span(m, "sampling", "vae_decode") for m in marks],
            "decode": [_span(m, "vae_decode", "writing") for m in marks],
            "write": [_span(m, "writing", "done") for m in marks],
            "save_latents": [round(t, 3) for t in probes.save_latents_s],
            "remux": [round(t, 3) for t in probes.remux_s],
        },
        "rss_after_load_mib": _mib(rss_loaded),
        "history_latents_mib": round(_history_bytes(settings) / MIB, 3),
        "load_peak_rss_mib": _mib(load_peak),
        "rss_after_section_mib": [_mib(v) for v in rss_after],
        "section_peak_rss_mib": [_mib(v) for v in rss_peaks],
        "video_mib_after_section": [round(v / MIB, 2) for v in video_bytes],
    }


def _history_bytes(settings) -> int:
    """Bytes of the pipeline's float32 history latents at the end (with its zero context frames)."""
    from .conditioning import find_nearest_bucket
    from .packing import HISTORY_FRAMES
    from .pipeline import LATENT_CHANNELS, VAE_SPATIAL

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


def _remove_outputs(output: Path, sections: int) -> None:
    from .pipeline import OutputPaths

    paths = OutputPaths(output)
    for path in [paths.video, paths.input_image, paths.sidecar, paths.latents] + [
            paths.partial(i) for i in range(1, sections + 1)]:
        path.unlink(missing_ok=True)
