"""The `batch` command: run a file of jobs through the outputs folder's queue, with a bar over jobs and one over steps.

    python -m diffusers_helper batch JOBS --outputs DIR [model and device options]

Every job is checked before any runs (batch.read_batch). The jobs go into DIR's queue file as one
batch, keyed by the file, so running the same command again after a kill continues where it
stopped: finished jobs are not run again, the one that was running continues from its last
finished section. The models are opened once (Runtime) and kept while consecutive jobs use them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from .options import (EXIT_CANCELLED, EXIT_FAILED, add_runtime_arguments, add_source_arguments, describe_failure,
                      sources_from_args, user_error)

OWNER = "command line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `batch` subcommand's flags."""
    parser.add_argument("jobs", metavar="JOBS",
                        help="a .json list of jobs (objects) or a .csv file with a header; each job's keys are image "
                             "and the settings' names (prompt, model, seed, seconds, ...)")
    parser.add_argument("--outputs", required=True, metavar="DIR",
                        help="folder the videos are written to, named like the app's (its queue file keeps the batch)")
    parser.add_argument("--lora-dir", metavar="DIR", default="loras",
                        help="a LoRA given as a bare file name is looked for here first (default: loras)")
    add_runtime_arguments(parser)
    add_source_arguments(parser, per_variant=True)


def run(args: argparse.Namespace) -> int:
    """Check the file, the models and every job, then run the batch; returns the exit status."""
    from .batch import batch_key, read_batch
    from .runtime import Runtime

    try:
        jobs = read_batch(args.jobs)
        key = batch_key(args.jobs)
        runtime = Runtime(sources_from_args(args, "framepack"), device=args.device, vram=args.vram,
                          attention=args.attention, compile=args.compile, lora_dir=args.lora_dir)
        checked = set()
        for number, job in enumerate(jobs, 1):
            needs = (job.settings.model, job.settings.loras)
            if needs not in checked:
                try:
                    runtime.check(*needs)
                except ValueError as exc:
                    raise ValueError(f"job {number} (model): {exc}") from None
                checked.add(needs)
    except ValueError as exc:
        return user_error(str(exc))
    return run_batch(runtime, jobs, key, Path(args.outputs).expanduser())


def run_batch(runtime, jobs, key: str, outputs: Path, *, out: TextIO = sys.stdout) -> int:
    """Queue `jobs` (batch.BatchJob) as batch `key` in `outputs` (once) and run them; prints each video's path."""
    from .jobs import FramePackRunner, JobQueue, JobRequest
    from .jobstore import JobStore

    queue = JobQueue(FramePackRunner(runtime, outputs), store=JobStore(outputs), pool=f"batch:{key}",
                     name="framepack-batch")
    try:
        queue.enqueue([JobRequest(job.settings, job.image) for job in jobs], owner=OWNER, batch=key, follow=True)
        for row in queue.store.batch_jobs(key):  # run again: what failed or was cancelled is tried again
            if row.state in ("failed", "cancelled"):
                queue.retry(row.id)
        followed = queue.batch_jobs(key)
        print(f"Loading models on {runtime.device} ...", file=sys.stderr)
        return follow_batch(followed, out=out)
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue the batch", file=sys.stderr)
        return EXIT_CANCELLED
    except ValueError as exc:
        return user_error(str(exc))
    finally:
        queue.close()


def follow_batch(jobs, *, out: TextIO = sys.stdout) -> int:
    """Show the jobs' progress (a bar over jobs, one over the running job's steps) until each has ended."""
    from tqdm import tqdm

    from .events import Cancelled, Failed, Finished, StepProgress

    ended_before = [job.done for job in jobs]  # finished in an earlier run of the same batch
    bar = tqdm(total=len(jobs), initial=sum(ended_before), unit="job", desc="jobs", position=0, file=sys.stderr,
               dynamic_ncols=True)
    code = 0
    try:
        for number, job in enumerate(jobs, 1):
            settings = job.request.settings
            steps = None
            for event in job.events():
                if isinstance(event, StepProgress):
                    if steps is None:
                        steps = tqdm(total=event.sections * event.steps, unit="step", position=1, leave=False,
                                     file=sys.stderr, dynamic_ncols=True)
                    steps.set_description(f"job {number}, section {event.section}/{event.sections}")
                    steps.update((event.section - 1) * event.steps + event.step - steps.n)
            if steps is not None:
                steps.close()
            result = job.result
            if isinstance(result, Finished):
                print(result.video_path, file=out, flush=True)
            elif isinstance(result, Failed):
                bar.write(f"error: job {number}: {describe_failure(result.message, result.advice)}", file=sys.stderr)
                code = EXIT_FAILED
            elif isinstance(result, Cancelled):
                bar.write(f"job {number} ({settings.prompt[:40]!r}) was cancelled", file=sys.stderr)
                code = code or EXIT_FAILED
            if not ended_before[number - 1]:
                bar.update(1)
    finally:
        bar.close()
    return code
