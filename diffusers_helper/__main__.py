"""Command line: `python -m diffusers_helper generate|resume|tiny-models|bench|bench-long ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_CANCELLED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake on one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Model source flags shared by the CLI and the app."""
    parser.add_argument("--hunyuan", metavar="SRC", help="HunyuanVideo text encoders, tokenizers and VAE: hub repo id or local folder")
    parser.add_argument("--siglip", metavar="SRC", help="SigLIP image encoder: hub repo id or local folder")
    parser.add_argument("--transformer", metavar="SRC", help="FramePack transformer for the chosen model: hub repo id or local folder")
    parser.add_argument("--tiny", action="store_true", help="use tiny random-weight models (built once into a cache folder) to try the whole path in seconds")


def sources_from_args(args, model: str):
    """ModelSources from the source flags (tiny models first, explicit flags override)."""
    from .settings import ModelSources

    if args.tiny:
        from .tiny import tiny_sources

        sources = tiny_sources()
    else:
        sources = ModelSources()
    if args.hunyuan:
        sources = ModelSources(hunyuan=args.hunyuan, siglip=sources.siglip, transformers=sources.transformers)
    if args.siglip:
        sources = ModelSources(hunyuan=sources.hunyuan, siglip=args.siglip, transformers=sources.transformers)
    if args.transformer:
        sources = sources.with_transformer(model, args.transformer)
    return sources


ATTENTION_HELP = ("attention kernel: auto (default: flash-attn or xFormers when installed on an NVIDIA GPU, "
                  "else PyTorch SDPA), sdpa, flash, sage or xformers")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser with its subcommands."""
    from .settings import ATTENTION_CHOICES

    parser = _Parser(prog="python -m diffusers_helper", description="FramePack image-to-video, section by section.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="turn an image and a prompt into a video")
    gen.add_argument("--image", required=True, help="start image")
    gen.add_argument("--prompt", required=True, help="what should happen in the video")
    gen.add_argument("--output", required=True, help="the MP4 to write (never overwritten)")
    gen.add_argument("--model", default="framepack", choices=["framepack", "f1"],
                     help="framepack: generates the end of the video first (anti-drifting); f1: generates forward")
    gen.add_argument("--seed", default="31337")
    gen.add_argument("--seconds", default="5", help="video length in seconds (1-120)")
    gen.add_argument("--window", default="9", help="latent window size (1-33)")
    gen.add_argument("--steps", default="25", help="sampling steps per section (1-100)")
    gen.add_argument("--distilled-cfg", default="10", help="distilled CFG scale (1-32)")
    gen.add_argument("--cfg", default="1", help="real CFG scale (1-32); above 1 doubles the cost")
    gen.add_argument("--cfg-rescale", default="0", help="guidance rescale (0-1)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--teacache", dest="teacache", action="store_true", default=True, help="skip steps with TeaCache (default)")
    gen.add_argument("--no-teacache", dest="teacache", action="store_false", help="compute every step")
    gen.add_argument("--crf", default="16", help="MP4 compression, lower is better quality (0-100)")
    gen.add_argument("--resolution", default="640", help="bucket resolution (64-1280)")
    gen.add_argument("--sampler", default="bh1", choices=["bh1", "bh2"], help="UniPC variant")
    gen.add_argument("--save-latents", metavar="PATH", help="also write the latents (safetensors, tensor 'history_latents')")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    gen.add_argument("--vram", default="auto", choices=["auto", "high", "low"], help="keep all models on the GPU (high) or move them per stage (low)")
    gen.add_argument("--attention", default="auto", choices=list(ATTENTION_CHOICES), help=ATTENTION_HELP)
    add_source_arguments(gen)

    res = sub.add_parser("resume", help="continue an interrupted or ended job from its last finished section")
    res.add_argument("output", help="the job's final video path, e.g. outputs/2025-05-01_12-30-05-123.mp4")
    res.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    res.add_argument("--vram", default="auto", choices=["auto", "high", "low"], help="as for generate")
    res.add_argument("--attention", default="auto", choices=list(ATTENTION_CHOICES), help="as for generate")
    add_source_arguments(res)

    tiny = sub.add_parser("tiny-models", help="write tiny random-weight models in the official folder layouts")
    tiny.add_argument("dir", help="folder to write into")
    tiny.add_argument("--seed", type=int, default=0)

    from .bench_long import add_bench_arguments

    bench = sub.add_parser("bench-long", help="time sections and peak RAM for videos of several lengths (tiny models)")
    add_bench_arguments(bench)
    add_source_arguments(bench)

    from .bench import add_bench_arguments as add_section_bench_arguments

    section = sub.add_parser("bench", help="time one section with the full-size architectures on random weights "
                                           "(--tiny: the tiny ones, on a CPU); prints JSON")
    add_section_bench_arguments(section)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "tiny-models":
        return _tiny_models(args)
    if args.command == "resume":
        return _resume(args)
    if args.command == "bench-long":
        from .bench_long import run_bench

        return run_bench(args)
    if args.command == "bench":
        from .bench import run_bench as run_section_bench

        return run_section_bench(args)
    return _generate(args)


def _tiny_models(args) -> int:
    from .tiny import write_tiny_models

    root = Path(args.dir)
    try:
        sources = write_tiny_models(root, seed=args.seed)
    except ValueError as exc:
        return _user_error(str(exc))
    print(f"hunyuan: {sources.hunyuan}\nsiglip: {sources.siglip}\n"
          f"framepack: {sources.transformer('framepack')}\nf1: {sources.transformer('f1')}")
    return 0


def _user_error(message: str) -> int:
    # messages written for the page may span lines; the CLI promises one
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr)
    return EXIT_USER_ERROR


def _generate(args) -> int:
    from .conditioning import load_image
    from .settings import GenerationSettings

    # 1. Everything that can be checked cheaply is checked before any model loads.
    try:
        settings = GenerationSettings(
            prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model, seed=args.seed,
            seconds=args.seconds, window=args.window, steps=args.steps, distilled_cfg=args.distilled_cfg,
            cfg=args.cfg, cfg_rescale=args.cfg_rescale, teacache=args.teacache, crf=args.crf,
            resolution=args.resolution, sampler=args.sampler,
        )
        image = load_image(args.image)
        output = Path(args.output)
        _check_output(output, args.save_latents)
        from .attention import resolve_attention
        from .loading import check_sources, resolve_device

        device = resolve_device(args.device)
        resolve_attention(args.attention, device)
        sources = sources_from_args(args, settings.model)
        check_sources(sources, settings.model)
    except ValueError as exc:
        return _user_error(str(exc))

    # 2. Load and run.
    from .attention import set_attention
    from .events import CancelToken
    from .loading import load_components
    from .memory import Placement, choose_vram_mode
    from .pipeline import generate

    print(f"Loading models on {device} ...", file=sys.stderr)
    try:
        components = load_components(sources, settings.model, device=device)
        set_attention(components.transformer, args.attention, device)
    except ValueError as exc:
        return _user_error(str(exc))
    placement = Placement(device, choose_vram_mode(args.vram, device))
    cancel = CancelToken()
    events = generate(components, settings, image, output, cancel=cancel, placement=placement,
                      save_latents=args.save_latents, metadata={"sources": _source_record(sources, settings.model)})
    return _follow(events, settings, cancel)


def _resume(args) -> int:
    from .attention import resolve_attention, set_attention
    from .jobs import remove_stale_files
    from .loading import check_sources, load_components, resolve_device
    from .memory import Placement, choose_vram_mode
    from .pipeline import load_resume_state, resume

    # 1. Check the job's files and the sources before any model loads.
    output = Path(args.output)
    try:
        state = load_resume_state(output)
        device = resolve_device(args.device)
        resolve_attention(args.attention, device)
        sources = sources_from_args(args, state.settings.model)
        check_sources(sources, state.settings.model)
    except ValueError as exc:
        return _user_error(str(exc))
    remove_stale_files(output)  # what the killed process left half-written

    # 2. Load and continue.
    from .events import CancelToken

    print(f"Loading models on {device} ...", file=sys.stderr)
    try:
        components = load_components(sources, state.settings.model, device=device)
        set_attention(components.transformer, args.attention, device)
    except ValueError as exc:
        return _user_error(str(exc))
    placement = Placement(device, choose_vram_mode(args.vram, device))
    cancel = CancelToken()
    code = _follow(resume(components, output, cancel=cancel, placement=placement), state.settings, cancel)
    if code == 0:
        remove_stale_files(output, keep_latest_partial=False)
    return code


def _follow(events, settings, cancel) -> int:
    """Show a job's events (progress bar, sections, the result) and return the exit status."""
    from .events import Cancelled, Failed, Finished, SectionDone, Stage, StepProgress

    bar = _ProgressBar(settings)
    code = EXIT_FAILED
    try:
        for event in events:
            if isinstance(event, StepProgress):
                bar.step(event)
            elif isinstance(event, Stage) and event.name in ("notice", "resume"):
                bar.write(f"note: {event.message}")
            elif isinstance(event, SectionDone):
                bar.write(f"section {event.section}/{event.sections}: {event.frames} frames -> {event.video_path}")
            elif isinstance(event, Finished):
                bar.close()
                print(event.video_path)
                code = 0
            elif isinstance(event, Failed):
                bar.close()
                print(f"error: {event.message}", file=sys.stderr)
                if event.video_path:
                    print(f"partial video kept: {event.video_path}", file=sys.stderr)
                code = EXIT_FAILED
            elif isinstance(event, Cancelled):
                bar.close()
                print(f"cancelled; partial video: {event.video_path}", file=sys.stderr)
                code = EXIT_CANCELLED
    except KeyboardInterrupt:
        # closing the event generator cancels the job at its next step and waits for it
        cancel.cancel()
        bar.close()
        print("cancelled", file=sys.stderr)
        code = EXIT_CANCELLED
    return code


def _check_output(output: Path, save_latents: Optional[str]) -> None:
    from .pipeline import OutputPaths

    if output.suffix.lower() != ".mp4":
        raise ValueError(f"--output must end in .mp4, not '{output.name}'.")
    clash = OutputPaths(output).existing()
    if save_latents and Path(save_latents).exists():
        clash.append(Path(save_latents))
    if clash:
        raise ValueError(f"{clash[0]} already exists; choose another name (outputs are never overwritten).")


def _source_record(sources, model: str) -> dict:
    return {"hunyuan": str(sources.hunyuan), "siglip": str(sources.siglip), "transformer": str(sources.transformer(model))}


class _ProgressBar:
    """A tqdm bar over all sampling steps of the job, on stderr."""

    def __init__(self, settings):
        from tqdm import tqdm

        self._bar = tqdm(total=settings.sections * settings.steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, event) -> None:
        done = (event.section - 1) * event.steps + event.step
        self._bar.set_description(f"section {event.section}/{event.sections}")
        self._bar.update(done - self._bar.n)

    def write(self, text: str) -> None:
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


if __name__ == "__main__":
    sys.exit(main())
