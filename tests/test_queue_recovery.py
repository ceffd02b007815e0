"""The queue survives kills: the app and the batch command killed with SIGKILL mid-job, and two processes on one
outputs folder. Each starts processes, so the whole module is slow.

- The app, killed with a queued job running and three waiting, is started again: the running job
  continues from its last finished section, then the others run; all four give the latents of the
  same job run alone, and nothing runs twice.
- The batch command, killed mid-batch, is run again and finishes the batch the same way.
- Two processes sharing one queue file each take jobs from it; every job runs exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from appkit import (assert_no_debris, form, free_port, history_latents, kill_when, running_app, save_noise_image,
                    wait_until)
from diffusers_helper.jobstore import FILENAME, JobStore
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is needed to drive the app")
from gradio_client import Client, handle_file  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Eight sections of one step each: long enough to be killed in the middle of.
JOB = GenerationSettings(prompt="", seconds=2, window=2, steps=1, resolution=64, seed=40, cache="none")
PROMPTS = ("a boat drifts", "a bird lands", "the rain starts", "the lights go on")
assert JOB.sections == 8


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "start.png"
    save_noise_image(path, seed=9, size=(72, 96))
    return path


@pytest.fixture(scope="module")
def alone(run_alone, start_image) -> dict[str, Path]:
    """Each of the four jobs run alone in this process: prompt -> its final video."""
    return run_alone(JOB, PROMPTS, start_image)


latents = history_latents


def source_flags(sources) -> list[str]:
    return ["--hunyuan", str(sources.hunyuan), "--siglip", str(sources.siglip),
            "--framepack-transformer", str(sources.transformer("framepack"))]


def partials(outputs: Path) -> list[Path]:
    return [p for p in outputs.glob("*.part*.mp4") if not p.name.startswith(".")]


def check_results(outputs: Path, alone: dict[str, Path], cut_stem: str) -> None:
    """Four finished jobs, each with the latents of its job run alone; the cut one kept its name; nothing twice."""
    jobs = JobStore(outputs).jobs(ended=10)
    assert sorted(job.state for job in jobs) == ["finished"] * 4, [(j.prompt, j.state, j.message) for j in jobs]
    finals = sorted(p for p in outputs.glob("*.mp4") if ".part" not in p.name)
    assert len(finals) == 4 and len(list(outputs.glob("*.json"))) == 4, sorted(p.name for p in outputs.iterdir())
    assert sorted(job.output.name for job in jobs) == [p.name for p in finals]
    by_prompt = {json.loads(p.with_suffix(".json").read_text())["settings"]["prompt"]: p for p in finals}
    assert sorted(by_prompt) == sorted(PROMPTS)
    for prompt, video in by_prompt.items():
        assert torch.equal(latents(video), latents(alone[prompt])), prompt
    cut = outputs / f"{cut_stem}.mp4"
    assert cut in finals  # continued under its own name, not started again
    assert np.array_equal(read_frames(cut), read_frames(alone[json.loads(cut.with_suffix(".json").read_text())
                                                              ["settings"]["prompt"]]))


def test_the_app_killed_with_queued_jobs_continues_them_all_on_the_next_start(tiny_sources, start_image, alone,
                                                                               tmp_path):
    outputs = tmp_path / "outputs"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "demo_gradio.py", "--device", "cpu", "--port", str(port), "--outputs", str(outputs),
         *source_flags(tiny_sources)],
        cwd=REPO, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        client = wait_until(lambda: _client(url) or proc.poll() is not None, timeout=120, what="the app to start")
        assert proc.poll() is None, proc.stdout.read()
        # one video per prompt: "consecutive" seeds count per input, so each gets JOB.seed
        client.predict(handle_file(str(start_image)), *form(JOB), None, "\n".join(PROMPTS), 1, "consecutive",
                       api_name="/add_to_queue")
        # the queue file holds every user's prompts and pictures: the page never serves it
        response = httpx.get(f"{url}gradio_api/file={(outputs / FILENAME).resolve()}", timeout=30)
        assert response.status_code == 403 and b"SQLite" not in response.content, response.status_code
    finally:
        kill_when(proc, lambda: partials(outputs), "the first job's first section")
    (cut,) = partials(outputs)
    cut_stem = cut.name.split(".")[0]
    states = [job.state for job in JobStore(outputs).jobs()]
    assert states == ["running", "waiting", "waiting", "waiting"], states  # as the kill left them
    assert not (outputs / f"{cut_stem}.mp4").exists()

    with running_app(outputs, tiny_sources) as (_url, demo):
        store = JobStore(outputs)
        wait_until(lambda: all(job.state == "finished" for job in store.jobs()), timeout=600,
                   what="the four jobs to finish")
        assert demo.page.interrupted_at_start == []  # continued by the queue, not offered for Resume
    check_results(outputs, alone, cut_stem)
    assert_no_debris(outputs)


def _client(url: str):
    try:
        return Client(url, verbose=False)
    except Exception:  # noqa: BLE001 - not up yet
        return None


def test_the_batch_command_killed_mid_batch_finishes_it_when_run_again(tiny_sources, start_image, alone, tmp_path):
    jobs = tmp_path / "jobs.json"
    small = {k: v for k, v in JOB.to_dict().items() if k in ("seconds", "window", "steps", "resolution", "cache")}
    jobs.write_text(json.dumps([{"image": str(start_image), "prompt": prompt, "seed": JOB.seed, **small}
                                for prompt in PROMPTS]))
    outputs = tmp_path / "outputs"
    argv = [sys.executable, "-m", "diffusers_helper", "batch", str(jobs), "--outputs", str(outputs), "--device", "cpu",
            *source_flags(tiny_sources)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when(proc, lambda: len(list(outputs.glob("*.json"))) == 2 and partials(outputs), "the second job's section")
    (cut,) = partials(outputs)
    states = [job.state for job in JobStore(outputs).batch_jobs(JobStore(outputs).jobs()[0].batch)]
    assert states == ["finished", "running", "waiting", "waiting"], states

    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    printed = [Path(line) for line in again.stdout.split()]
    assert [json.loads(p.with_suffix(".json").read_text())["settings"]["prompt"] for p in printed] == list(PROMPTS)
    assert "jobs" in again.stderr and "step" in again.stderr  # the two progress bars
    check_results(outputs, alone, cut.name.split(".")[0])


WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from diffusers_helper.events import Finished
    from diffusers_helper.jobs import JobQueue
    from diffusers_helper.jobstore import FILENAME, JobStore

    folder, log = Path(sys.argv[1]), Path(sys.argv[2])

    def runner(job):
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {job.stored_id}\\n")
        time.sleep(0.05)
        yield Finished(video_path=folder / f"{job.stored_id}.mp4", frames=1)

    queue = JobQueue(runner, store=JobStore(folder), poll_s=0.05)
    (folder.parent / f"ready-{os.getpid()}").write_text("")
    store = JobStore(folder)
    deadline = time.monotonic() + 120
    while not store.exists() or any(j.state != "finished" for j in store.jobs(ended=0)) or not store.jobs():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queue.close()
""")


def test_two_processes_on_one_folder_never_run_one_job_twice(tmp_path):
    folder, log = tmp_path / "outputs", tmp_path / "ran.log"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), str(log)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 2 or any(p.poll() is not None for p in procs),
                   timeout=120, what="both processes")
        from diffusers_helper.jobstore import NewJob

        JobStore(folder).add([NewJob(JOB.replace(prompt=str(n))) for n in range(60)], pool="app")
        for proc in procs:
            assert proc.wait(timeout=180) == 0, proc.stdout.read()
    finally:
        for proc in procs:
            proc.kill()
    runs = [line.split() for line in log.read_text().splitlines()]
    ids = sorted(int(job) for _, job in runs)
    assert ids == list(range(1, 61)), "a job ran twice or not at all"
    assert len({pid for pid, _ in runs}) == 2  # both took jobs
    assert [job.state for job in JobStore(folder).jobs(ended=100)] == ["finished"] * 60
