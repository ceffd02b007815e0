"""Command line: `python -m diffusers_helper generate|resume|extend|batch|tiny-models|bench|bench-long ...` (also `framepack ...`).

Each subcommand is a few lines over `options` (flags, the one-line user error) and `runtime`
(opening the models). Nothing imports this module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from .options import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    OneLineParser,
    add_lora_dir_argument,
    add_runtime_arguments,
    add_settings_arguments,
    add_source_arguments,
    describe_failure,
    settings_from_args,
    sources_from_args,
    user_error,
)


def build_parser() -> OneLineParser:
    """The command-line parser with its subcommands."""
    from .bench import long_video, section

    # `framepack ...` when installed, `python -m diffusers_helper ...` otherwise
    called = Path(sys.argv[0]).name
    prog = "python -m diffusers_helper" if called in ("__main__.py", "") else called
    parser = OneLineParser(prog=prog, description="FramePack image-to-video, section by section.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="turn an image and a prompt into a video")
    gen.add_argument("--image", help="start image; without one the video starts from a plain frame "
                                     "(text-to-video: see --start-color and --aspect)")
    gen.add_argument("--output", required=True, help="the MP4 to write (never overwritten)")
    add_settings_arguments(gen, required=("prompt",))
    gen.add_argument("--save-latents", metavar="PATH", help="also write the latents (safetensors, tensor 'history_latents')")
    add_lora_dir_argument(gen, "a --lora given as a bare file name is looked for here first")
    add_runtime_arguments(gen)
    add_source_arguments(gen)

    res = sub.add_parser("resume", help="continue an interrupted or ended job from its last finished section")
    res.add_argument("output", help="the job's final video path, e.g. outputs/2025-05-01_12-30-05-123.mp4")
    add_runtime_arguments(res)
    add_source_arguments(res)
    add_lora_dir_argument(res, "where to look for the job's LoRAs by file name when they are no longer where it "
                               "found them")

    _add_extend_parser(sub)

    from . import cli_batch

    batch = sub.add_parser("batch", help="run a JSON or CSV file of jobs through the outputs folder's queue "
                                         "(run it again to continue after a stop)")
    cli_batch.add_arguments(batch)

    tiny = sub.add_parser("tiny-models", help="write tiny random-weight models in the official folder layouts")
    tiny.add_argument("dir", help="folder to write into")
    tiny.add_argument("--seed", type=int, default=0)

    bench_long = sub.add_parser("bench-long", help="time sections and peak RAM for videos of several lengths (tiny models)")
    long_video.add_arguments(bench_long)
    bench = sub.add_parser("bench", help="time one section with the full-size architectures on random weights "
                                         "(--tiny: the tiny ones, on a CPU); prints JSON")
    section.add_arguments(bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "bench-long":
        from .bench import long_video

        return long_video.run(args)
    if args.command == "bench":
        from .bench import section

        return section.run(args)
    if args.command == "batch":
        from . import cli_batch

        return cli_batch.run(args)
    return {"generate": generate, "resume": resume, "extend": extend, "tiny-models": tiny_models}[args.command](args)


def generate(args) -> int:
    """`generate`: check everything cheap, open the models, run the job."""
    from .conditioning import load_image
    from .outputs import OutputPaths
    from .pipeline import check_images

    # 1. Everything that can be checked cheaply is checked before any model loads.
    try:
        settings = settings_from_args(args, text_to_video=not args.image)
        image = load_image(args.image) if args.image else None
        check_images(settings, image)  # the end image and keyframes too
        output = Path(args.output)
        if output.suffix.lower() != ".mp4":
            raise ValueError(f"--output must end in .mp4, not '{output.name}'.")
        paths = OutputPaths(output)
        clash = [p for p in paths.existing() + paths.image_copies(settings) if p.exists()]
        clash += [Path(p) for p in [args.save_latents] if p and Path(p).exists()]
        if clash:
            raise ValueError(f"{clash[0]} already exists; choose another name (outputs are never overwritten).")
        runtime = _runtime(args, settings.model)
        runtime.check(settings.model, settings.loras)
    except ValueError as exc:
        return user_error(str(exc))
    # 2. Load and run.
    return _run(runtime, settings, lambda cancel: runtime.generate(settings, image, output, cancel=cancel,
                                                                   save_latents=args.save_latents))


def resume(args) -> int:
    """`resume`: check the job's files and the sources, open the models, continue the job."""
    from .outputs import remove_stale_files
    from .pipeline import load_resume_state

    output = Path(args.output)
    try:
        state = load_resume_state(output)
        runtime = _runtime(args, state.settings.model)
        state = runtime.resume_loras(state)  # the same LoRA files as the job used, or a message
        runtime.check(state.settings.model, state.settings.loras)
    except ValueError as exc:
        return user_error(str(exc))
    remove_stale_files(output)  # what the killed process left half-written
    code = _run(runtime, state.settings, lambda cancel: runtime.resume(output, state=state, cancel=cancel))
    if code == 0:
        remove_stale_files(output, keep_latest_partial=False)
    return code


def _runtime(args, model: str):
    """The runtime a generate/resume/extend command opens: its sources, device, memory mode and LoRA folder."""
    from .runtime import Runtime

    return Runtime(sources_from_args(args, model), device=args.device, vram=args.vram, attention=args.attention,
                   compile=args.compile, lora_dir=args.lora_dir)


def _add_extend_parser(sub) -> None:
    """`extend VIDEO --seconds S --output OUT.mp4 [any generate option]`."""
    import dataclasses

    from .settings import GenerationSettings

    ext = sub.add_parser("extend", help="add seconds after the end of a video: one of ours (it goes on with its own "
                                        "settings) or any MP4/WebM/MOV")
    ext.add_argument("video", help="the video to extend (never changed)")
    ext.add_argument("--output", required=True, help="the new MP4: the video's frames, then the new ones (never "
                                                    "overwritten)")
    ext.add_argument("--seconds", required=True, metavar="S", help="seconds to add after the video's end (above 0; "
                                                                  "the whole video at most 120)")
    add_settings_arguments(ext, [f.name for f in dataclasses.fields(GenerationSettings) if f.name != "seconds"], help={
        "seed": "draw the new sections from this seed (default: one of our videos goes on with its own random "
                "sequence, so FramePack-F1 gives the video it would have made that much longer)",
        "prompt": "what should happen (default: one of our videos keeps its own; times count from the video's start)",
        "model": "framepack or f1 (default: one of our videos keeps its own)"})
    ext.add_argument("--save-latents", metavar="PATH", help="also write the whole video's latents (safetensors)")
    add_lora_dir_argument(ext, "a --lora given as a bare file name, or the video's own LoRAs when they moved, "
                               "are looked for here")
    add_runtime_arguments(ext)
    add_source_arguments(ext)


def extend(args) -> int:
    """`extend`: check the video, the seconds, the settings and the output, open the models, extend it."""
    from .extend import check_output, plan_extension
    from .options import given_settings

    try:
        extension = plan_extension(args.video, args.seconds, given_settings(args))
        output = check_output(extension, args.output, args.save_latents)
        runtime = _runtime(args, extension.settings.model)
        extension = runtime.extension_loras(extension)  # the video's own LoRA files, where they are now
        runtime.check(extension.settings.model, extension.settings.loras)
    except ValueError as exc:
        return user_error(str(exc))
    return _run(runtime, extension.settings, lambda cancel: runtime.extend(extension, output, cancel=cancel,
                                                                           save_latents=args.save_latents))


def tiny_models(args) -> int:
    """`tiny-models`: write the tiny random-weight models and print where each is."""
    from .tiny import write_tiny_models

    try:
        sources = write_tiny_models(Path(args.dir), seed=args.seed)
    except ValueError as exc:
        return user_error(str(exc))
    print(f"hunyuan: {sources.hunyuan}\nsiglip: {sources.siglip}\n"
          f"framepack: {sources.transformer('framepack')}\nf1: {sources.transformer('f1')}")
    return 0


def _run(runtime, settings, start) -> int:
    """Load the models and follow the job `start(cancel)` begins; a loading problem is a user error."""
    from .events import CancelToken

    print(f"Loading models on {runtime.device} ...", file=sys.stderr)
    cancel = CancelToken()
    try:
        events = start(cancel)
    except ValueError as exc:
        return user_error(str(exc), getattr(exc, "advice", ()))
    return follow(events, settings, cancel)


def follow(events, settings, cancel) -> int:
    """Show a job's events (progress bar, notes, sections, the result) and return the exit status."""
    from .events import Cancelled, Failed, Finished, Notice, SectionDone, Stage, StageName, StepProgress

    bar = _ProgressBar(settings)
    code = EXIT_FAILED
    try:
        for event in events:
            if isinstance(event, StepProgress):
                bar.step(event)
            elif isinstance(event, Notice) or (isinstance(event, Stage) and event.name in (StageName.RESUMING,
                                                                                           StageName.EXTENDING)):
                bar.write(f"note: {event.message}")
            elif isinstance(event, SectionDone):
                bar.write(f"section {event.section}/{event.sections}: {event.frames} frames -> {event.video_path}")
            elif isinstance(event, Finished):
                bar.close()
                print(event.video_path)
                code = 0
            elif isinstance(event, Failed):
                bar.close()
                print(f"error: {describe_failure(event.message, event.advice)}", file=sys.stderr)
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
