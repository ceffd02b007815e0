"""The `batch` command: run a file of jobs through the outputs folder's queue, with a bar over jobs and one over steps.

    python -m diffusers_helper batch JOBS --outputs DIR [model and device options] [--ray ADDRESS|local ...]

Every job is checked before any runs (batch.read_batch). The jobs go into DIR's queue file as one
batch, keyed by the file, so running the same command again after a kill continues where it
stopped: finished jobs are not run again, the one that was running continues from its last
finished section. The models are opened once (Runtime) and kept while consecutive jobs use them.
With --ray, the same queue's jobs run on Ray workers (scaleout), several at once, with a progress
bar per worker.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from .options import (EXIT_CANCELLED, EXIT_FAILED, add_lora_dir_argument, add_ray_arguments, add_runtime_arguments,
                      add_source_arguments, cluster_options, describe_failure, sources_from_args, user_error)

OWNER = "command line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `batch` subcommand's flags."""
    parser.add_argument("jobs", metavar="JOBS",
                        help="a .json list of jobs (objects) or a .csv file with a header; each job's keys are image "
                             "and the settings' names (prompt, model, seed, seconds, ...)")
    parser.add_argument("--outputs", required=True, metavar="DIR",
                        help="folder the videos are written to, named like the app's (its queue file keeps the batch)")
    add_lora_dir_argument(parser, "a LoRA given as a bare file name is looked for here first")
    add_runtime_arguments(parser)
    add_source_arguments(parser, per_variant=True)
    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the file, the models and every job, then run the batch; returns the exit status."""
    from .batch import batch_key, read_batch
    from .runtime import Runtime

    try:
        cluster = cluster_options(args)
        jobs = read_batch(args.jobs)
        key = batch_key(args.jobs)
        # with Ray the workers pick their own device; this process only checks the files
        runtime = Runtime(sources_from_args(args, "framepack"), device="cpu" if cluster else args.device,
                          vram=args.vram, attention="auto" if cluster else args.attention,
                          compile=args.compile and not cluster, lora_dir=args.lora_dir)
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
    ray = None
    if cluster is not None:
        from .scaleout import WorkerConfig

        ray = (cluster, WorkerConfig.of(runtime, device=args.device, vram=args.vram, attention=args.attention,
                                        compile=args.compile))
    return run_batch(runtime, jobs, key, Path(args.outputs).expanduser(), ray=ray)


def run_batch(runtime, jobs, key: str, outputs: Path, *, out: TextIO = sys.stdout, ray=None) -> int:
    """Queue `jobs` (batch.BatchJob) as batch `key` in `outputs` (once) and run them; prints each video's path.

    `ray`: (scaleout.ClusterOptions, scaleout.WorkerConfig) to run them on Ray workers instead of here.
    """
    from .jobs import FramePackRunner, JobQueue, JobRequest
    from .jobstore import JobStore

    cluster = queue = None
    try:
        if ray is not None:
            from .scaleout import RayCluster

            print(f"Starting {'a local Ray cluster' if ray[0].address == 'local' else 'Ray at ' + ray[0].address} ...",
                  file=sys.stderr)
            cluster = RayCluster(ray[0], ray[1], outputs)
            runners = cluster.runners()
            print(f"{len(runners)} Ray worker{'s' if len(runners) != 1 else ''} ({_resources(cluster)}); each loads "
                  "the models once", file=sys.stderr)
        else:
            runners = FramePackRunner(runtime, outputs)
            print(f"Loading models on {runtime.device} ...", file=sys.stderr)
        queue = JobQueue(runners, store=JobStore(outputs), pool=f"batch:{key}", name="framepack-batch")
        queue.enqueue([JobRequest(job.settings, job.image) for job in jobs], owner=OWNER, batch=key, follow=True)
        for row in queue.store.batch_jobs(key):  # run again: what failed or was cancelled is tried again
            if row.state in ("failed", "cancelled"):
                queue.retry(row.id)
        return follow_batch(queue.batch_jobs(key), slots=queue.slots, out=out)
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue the batch", file=sys.stderr)
        return EXIT_CANCELLED
    except ValueError as exc:
        return user_error(str(exc))
    finally:
        if queue is not None:
            queue.close()
        if cluster is not None:
            cluster.close()


def _resources(cluster) -> str:
    per = cluster.resources
    if "num_gpus" in per:
        return f"{per['num_gpus']:g} GPU each"
    return f"{per['num_cpus']} CPU core{'s' if per['num_cpus'] != 1 else ''} each, no GPU"


def follow_batch(jobs, *, slots: int = 1, out: TextIO = sys.stdout) -> int:
    """Show the jobs' progress (a bar over jobs, and one per worker over its job's steps) until each has ended;
    each finished video's path is printed as it finishes."""
    from tqdm import tqdm

    ended_before = [job.done for job in jobs]  # finished in an earlier run of the same batch
    bar = tqdm(total=len(jobs), initial=sum(ended_before), unit="job", desc="jobs", position=0, file=sys.stderr,
               dynamic_ncols=True)
    steps: dict[int, tuple[int, tqdm]] = {}  # slot -> (job number, its bar)
    pending = dict(enumerate(jobs, 1))
    code = 0
    try:
        while pending:
            for number, job in list(pending.items()):
                for event in job.take(timeout=0):
                    _show_step(event, number, job, slots, steps)
                if job.done:
                    del pending[number]
                    code = _report(job, number, bar, out) or code
                    if not ended_before[number - 1]:
                        bar.update(1)
            if pending:
                time.sleep(0.05)
    finally:
        for _, step_bar in steps.values():
            step_bar.close()
        bar.close()
    return code


def _show_step(event, number: int, job, slots: int, steps: dict) -> None:
    """Move the step bar of the worker that runs the job."""
    from tqdm import tqdm

    from .events import StepProgress

    if not isinstance(event, StepProgress):
        return
    slot = job.slot or 0
    total = event.sections * event.steps
    held = steps.get(slot)
    if held is None or held[0] != number:
        if held is None:
            held = (number, tqdm(total=total, unit="step", position=slot + 1, leave=False, file=sys.stderr,
                                 dynamic_ncols=True))
        else:
            held[1].reset(total=total)
        steps[slot] = held = (number, held[1])
    who = f"worker {slot + 1}: " if slots > 1 else ""
    held[1].set_description(f"{who}job {number}, section {event.section}/{event.sections}")
    held[1].update((event.section - 1) * event.steps + event.step - held[1].n)


def _report(job, number: int, bar, out: TextIO) -> int:
    """Say how a job ended: its video's path on stdout, or its error; the exit status it calls for."""
    from .events import Cancelled, Failed, Finished

    result = job.result
    if isinstance(result, Finished):
        print(result.video_path, file=out, flush=True)
        took = _timing(result.video_path)
        if took:
            bar.write(f"job {number}: {took}", file=sys.stderr)
    elif isinstance(result, Failed):
        bar.write(f"error: job {number}: {describe_failure(result.message, result.advice)}", file=sys.stderr)
        return EXIT_FAILED
    elif isinstance(result, Cancelled):
        bar.write(f"job {number} ({job.request.settings.prompt[:40]!r}) was cancelled", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _timing(video) -> str:
    """How long a finished job took and where, from its sidecar ('' when it does not say)."""
    from .outputs import OutputPaths, read_record

    try:
        record = read_record(OutputPaths(video).sidecar)
    except ValueError:
        return ""
    seconds = record.get("elapsed_seconds")
    if not isinstance(seconds, (int, float)):
        return ""
    worker = record.get("worker") or {}
    where = f" on {worker.get('host')} (Ray actor {str(worker.get('actor'))[:8]})" if worker else ""
    return f"{seconds:.1f} s{where}"
