"""Batches on Ray: a local Ray cluster on CPU with two workers and the tiny models.

- A batch of four jobs on two workers gives each job the latents of the same job run alone, both
  workers take jobs, each sidecar names its worker, and the outputs folder holds the same files as
  a single-process run of the batch.
- A worker killed with SIGKILL mid-job: every job still finishes once, the killed one continued
  on the other worker from its last finished section, equal to an uninterrupted run.
- A job with bad input fails alone; the others finish.
- Workers that don't see the outputs folder send the files back: the same files again.
- Ctrl+C on the CLI stops the workers, keeps every finished output and leaves the queue resumable.

Each test starts a Ray cluster, so the whole module is slow.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from appkit import history_latents, save_noise_image, wait_until
from diffusers_helper.events import Failed, Finished
from diffusers_helper.jobstore import JobStore
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames

pytest.importorskip("ray", reason="ray is installed by requirements-dev.txt")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Eight sections of two steps each: long enough to kill a worker in the middle of a job.
JOB = GenerationSettings(prompt="", seconds=2, window=2, steps=2, resolution=64, seed=40, cache="none")
PROMPTS = ("a boat drifts", "a bird lands", "the rain starts", "the lights go on")
SMALL = {k: v for k, v in JOB.to_dict().items() if k in ("seconds", "window", "steps", "resolution", "cache", "seed")}
assert JOB.sections == 8


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "start.png"
    save_noise_image(path, seed=5, size=(72, 96))
    return path


@pytest.fixture(scope="module")
def alone(run_alone, start_image) -> dict[str, Path]:
    """Each of the four jobs run alone in this process: prompt -> its final video."""
    return run_alone(JOB, PROMPTS, start_image)


@pytest.fixture
def batch_file(start_image, tmp_path) -> Path:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"image": str(start_image), "prompt": prompt, **SMALL} for prompt in PROMPTS]))
    return path


latents = history_latents


def batch_argv(batch_file: Path, outputs: Path, sources, *ray: str) -> list[str]:
    return [sys.executable, "-m", "diffusers_helper", "batch", str(batch_file), "--outputs", str(outputs),
            "--device", "cpu", "--hunyuan", str(sources.hunyuan), "--siglip", str(sources.siglip),
            "--framepack-transformer", str(sources.transformer("framepack")), *ray]


RAY = ("--ray", "local", "--workers", "2", "--cpus-per-worker", "1")


def workers_alive() -> list:
    """Ray actor processes of our workers still running on this machine."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "ray::Worker" in " ".join(p.info["cmdline"] or [])]


def finals(outputs: Path) -> list[Path]:
    return sorted(p for p in outputs.glob("*.mp4") if ".part" not in p.name)


def record(video: Path) -> dict:
    return json.loads(video.with_suffix(".json").read_text())


def layout(outputs: Path) -> list[str]:
    """The folder's file names with each job's name replaced by its prompt's number: what a run leaves."""
    names = {p.name[: -len(".mp4")]: f"job{PROMPTS.index(record(p)['settings']['prompt'])}" for p in finals(outputs)}
    pattern = re.compile("|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)))
    return sorted(pattern.sub(lambda m: names[m.group(0)], p.name) for p in outputs.iterdir())


def check_like_alone(outputs: Path, alone: dict[str, Path]) -> None:
    """Four finished jobs, nothing twice, each with the latents of its job run alone."""
    rows = JobStore(outputs).jobs(ended=10)
    assert sorted(row.state for row in rows) == ["finished"] * 4, [(r.prompt, r.state, r.message) for r in rows]
    videos = finals(outputs)
    assert len(videos) == 4 and sorted(r.output.name for r in rows) == [v.name for v in videos]
    assert sorted(record(v)["settings"]["prompt"] for v in videos) == sorted(PROMPTS)
    for video in videos:
        assert torch.equal(latents(video), latents(alone[record(video)["settings"]["prompt"]])), video.name


def test_a_batch_on_two_workers_gives_each_job_its_latents_alone(tiny_sources, batch_file, alone, tmp_path):
    outputs = tmp_path / "ray"
    run = subprocess.run(batch_argv(batch_file, outputs, tiny_sources, *RAY), cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    check_like_alone(outputs, alone)
    workers = [record(v)["worker"] for v in finals(outputs)]
    assert all(w["node"] and w["actor"] for w in workers)
    assert len({w["actor"] for w in workers}) == 2, workers  # both workers took jobs
    assert "worker 1" in run.stderr and "worker 2" in run.stderr  # a progress bar per worker
    assert len(run.stdout.split()) == 4  # each finished video's path

    single = tmp_path / "single"
    run = subprocess.run(batch_argv(batch_file, single, tiny_sources), cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert layout(outputs) == layout(single)
    for ray_video in finals(outputs):
        (same,) = [v for v in finals(single) if record(v)["settings"] == record(ray_video)["settings"]]
        assert np.array_equal(read_frames(ray_video), read_frames(same))
        mine, theirs = record(ray_video), record(same)
        assert "worker" not in theirs and (mine["video"], theirs["video"]) == (ray_video.name, same.name)
        for key in ("worker", "elapsed_seconds", "video"):  # where, how long, and its own name
            mine.pop(key), theirs.pop(key, None)
        assert mine == theirs


def test_a_killed_worker_loses_only_its_section_and_every_job_finishes_once(tiny_sources, batch_file, alone,
                                                                            tmp_path):
    import os

    outputs = tmp_path / "outputs"
    proc = subprocess.Popen(batch_argv(batch_file, outputs, tiny_sources, *RAY), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def running_with_a_section():
            for sidecar in outputs.glob("*.json"):
                try:
                    data = json.loads(sidecar.read_text())
                except (OSError, ValueError):
                    continue
                if data.get("status") == "running" and data.get("sections_done", 0) >= 2:
                    return sidecar, data["worker"]
            return None

        found = wait_until(lambda: running_with_a_section() or proc.poll() is not None, timeout=600,
                           what="a job with two finished sections")
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        cut, killed = found
        os.kill(killed["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    check_like_alone(outputs, alone)
    video = cut.with_suffix(".mp4")
    assert video in finals(outputs)  # continued under its own name, not started again
    assert record(video)["worker"]["actor"] != killed["actor"]  # ... by the other worker
    assert np.array_equal(read_frames(video), read_frames(alone[record(video)["settings"]["prompt"]]))
    assert not list(outputs.glob("*.part*.mp4")) and not list(outputs.glob(".*"))


def test_a_job_with_bad_input_fails_alone_and_files_come_back_from_workers_that_dont_share_the_folder(
        tiny_sources, start_image, alone, tmp_path):
    from diffusers_helper.jobs import JobQueue, JobRequest
    from diffusers_helper.jobstore import JobStore
    from diffusers_helper.runtime import Runtime
    from diffusers_helper.scaleout import ClusterOptions, RayCluster, WorkerConfig
    from diffusers_helper.conditioning import load_image

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture at all")
    outputs = tmp_path / "outputs"
    runtime = Runtime(tiny_sources, device="cpu")
    cluster = RayCluster(ClusterOptions("local", workers=2, cpus_per_worker=1), WorkerConfig.of(runtime, device="cpu"),
                         outputs, stream=True)
    queue = JobQueue(cluster.runners(), store=JobStore(outputs), pool="test", poll_s=0.1)
    try:
        image = load_image(start_image)
        requests = [JobRequest(JOB.replace(prompt=PROMPTS[0]), image),
                    JobRequest(JOB.replace(prompt="broken", end_image=str(broken)), image),
                    JobRequest(JOB.replace(prompt=PROMPTS[1]), image)]
        jobs = queue.enqueue(requests, owner="test", follow=True)
        results = [list(job.events())[-1] for job in jobs]
    finally:
        queue.close()
        cluster.close()
    assert isinstance(results[1], Failed) and "image" in results[1].message.lower(), results[1]
    rows = {row.prompt: row for row in JobStore(outputs).jobs(ended=10)}
    assert rows["broken"].state == "failed" and rows["broken"].message == results[1].message
    for number in (0, 2):
        assert isinstance(results[number], Finished), results[number]
        video = results[number].video_path
        assert video.parent == outputs.resolve() and video.is_file()  # sent back into the outputs folder
        prompt = requests[number].settings.prompt
        assert torch.equal(latents(video), latents(alone[prompt]))
        assert np.array_equal(read_frames(video), read_frames(alone[prompt]))
        assert record(video)["worker"]["actor"]
    assert not list(outputs.glob("*.part*.mp4"))  # superseded partial videos removed here too


def test_ctrl_c_stops_the_workers_and_leaves_a_queue_that_continues(tiny_sources, batch_file, alone, tmp_path):
    outputs = tmp_path / "outputs"
    argv = batch_argv(batch_file, outputs, tiny_sources, *RAY)
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (finals(outputs) and list(outputs.glob("*.part*.mp4"))) or proc.poll() is not None,
                   timeout=600, what="a finished job and one under way")
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-4000:]
    assert "run the same command again" in err
    done = finals(outputs)
    assert done and all(record(v)["status"] == "finished" for v in done)
    states = sorted(row.state for row in JobStore(outputs).jobs(ended=10))
    assert "running" not in states and states.count("finished") == len(done), states
    assert "interrupted" in states or "waiting" in states
    wait_until(lambda: not workers_alive(), timeout=60, what="the workers to stop")

    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    check_like_alone(outputs, alone)
    assert set(done) <= set(finals(outputs))


def test_the_app_with_ray_runs_page_and_queued_jobs_on_the_workers_and_shows_where(tiny_sources, start_image,
                                                                                   alone, tmp_path):
    from diffusers_helper.app.queue_panel import Form, QueuePanel, Viewer
    from diffusers_helper.app.ui import FORM_FIELDS, AppConfig, Page, load_start_image, settings_from_form
    from diffusers_helper.conditioning import load_image
    from diffusers_helper.jobs import JobRequest
    from diffusers_helper.scaleout import ClusterOptions

    outputs = tmp_path / "outputs"
    page = Page(AppConfig(outputs=outputs, sources=tiny_sources, device="cpu",
                          ray=ClusterOptions("local", workers=2, cpus_per_worker=1)))
    panel = QueuePanel(page, Form(FORM_FIELDS, settings_from_form, load_start_image))
    seen = []
    try:
        image = load_image(start_image)
        mine = page.jobs.submit(JobRequest(JOB.replace(prompt=PROMPTS[0]), image), owner="tab")
        (queued,) = page.jobs.enqueue([JobRequest(JOB.replace(prompt=PROMPTS[1]), image)], owner="ann", follow=True)

        def both_done():
            seen.extend(e.status for e in panel.entries(Viewer("tab-ann", "ann")) if e.state == "running")
            return mine.done and queued.done

        wait_until(both_done, timeout=600, what="the page's job and the queued one")
    finally:
        page.jobs.close()
        page.cluster.close()
        page.snapshots.close()
    for job, prompt in ((mine, PROMPTS[0]), (queued, PROMPTS[1])):
        assert isinstance(job.result, Finished), job.result
        video = job.result.video_path
        assert video.parent == outputs.resolve() and torch.equal(latents(video), latents(alone[prompt]))
        assert record(video)["worker"]["actor"]
    assert any("on ray worker" in status for status in seen), seen  # the panel says where it runs


def test_more_workers_than_the_cluster_holds_is_refused_and_the_cluster_stopped(tiny_sources, tmp_path):
    import ray

    from diffusers_helper.runtime import Runtime
    from diffusers_helper.scaleout import ClusterOptions, RayCluster, WorkerConfig

    config = WorkerConfig.of(Runtime(tiny_sources, device="cpu"), device="cpu")
    with pytest.raises(ValueError, match=r"64 workers with 1 CPU cores each need 64; the Ray cluster has \d+"):
        RayCluster(ClusterOptions("local", workers=64, cpus_per_worker=1), config, tmp_path / "outputs")
    assert not ray.is_initialized()
    assert not (tmp_path / "outputs").exists()  # nothing written


def test_a_job_whose_earlier_attempt_cant_be_continued_starts_afresh_and_its_row_follows(tiny_sources, start_image,
                                                                                         alone, tmp_path):
    from diffusers_helper.conditioning import load_image
    from diffusers_helper.jobs import JobQueue
    from diffusers_helper.jobstore import NewJob
    from diffusers_helper.runtime import Runtime
    from diffusers_helper.scaleout import ClusterOptions, RayCluster, WorkerConfig

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    store = JobStore(outputs)
    (row_id,) = store.add([NewJob(JOB.replace(prompt=PROMPTS[2]), load_image(start_image))], pool="test",
                          batch="one")
    # an earlier attempt that got as far as its latents, which can't be continued (here: damaged)
    earlier = outputs / "2025-01-01_00-00-00-000.mp4"
    store.set_output(row_id, earlier)
    for suffix, data in ((".json", b"{}"), (".latents.safetensors", b"damaged"), (".png", b"x")):
        earlier.with_suffix(suffix).write_bytes(data)
    cluster = RayCluster(ClusterOptions("local", workers=1, cpus_per_worker=1),
                         WorkerConfig.of(Runtime(tiny_sources, device="cpu"), device="cpu"), outputs)
    queue = JobQueue(cluster.runners(), store=store, pool="test", poll_s=0.1)
    try:
        (job,) = queue.batch_jobs("one")
        result = list(job.events())[-1]
    finally:
        queue.close()
        cluster.close()
    assert isinstance(result, Finished), result
    row = JobStore(outputs).get(row_id)
    assert row.state == "finished" and row.output.name == result.video_path.name != earlier.name
    assert torch.equal(latents(result.video_path), latents(alone[PROMPTS[2]]))
    assert earlier.with_suffix(".latents.safetensors").read_bytes() == b"damaged"  # left as it was
