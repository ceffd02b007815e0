"""Tests for the job queue (diffusers_helper.jobs), the runtime's model cache, output names and the past-outputs listing.

Most tests drive the queue with small fake runners so that ordering, positions and cancellation
are exact; one runs a real job with the tiny models through FramePackRunner.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_helper.events import Cancelled, Failed, Finished, SectionDone, Stage, StepProgress
from diffusers_helper.jobs import BusyError, FramePackRunner, JobQueue, JobRequest, Queued
from diffusers_helper.memory import VramMode, choose_vram_mode
from diffusers_helper.outputs import OutputNamer, list_outputs, read_output
from diffusers_helper.runtime import Runtime
from diffusers_helper.settings import GenerationSettings

TIMEOUT = 20.0
IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)


def request(**changes) -> JobRequest:
    return JobRequest(GenerationSettings(**{"seconds": 1, "window": 2, "steps": 2, "resolution": 64, **changes}), IMAGE)


def drain(job, timeout: float = TIMEOUT) -> list:
    """Every event of a job up to its last, failing the test if it does not end in time."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{job} did not finish; events so far: {events}"
        for event in job.take(timeout=left):
            events.append(event)
            if isinstance(event, (Finished, Failed, Cancelled)):
                return events


def wait_for(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class GatedRunner:
    """A runner whose jobs each wait for their own gate, recording the order they ran in."""

    def __init__(self):
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []

    def gate(self, job) -> threading.Event:
        return self.gates.setdefault(job.id, threading.Event())

    def __call__(self, job):
        self.started.append(job.id)
        yield Stage("sampling", f"running {job.id} ({job.request.settings.prompt})")
        gate = self.gate(job)
        while not gate.wait(0.01):
            if job.cancel_token.cancelled:
                yield Cancelled(video_path=Path(f"{job.id}.part001.mp4"), frames=9)
                return
        yield Finished(video_path=Path(f"{job.id}.mp4"), frames=25)


@pytest.fixture
def gated():
    runner = GatedRunner()
    queue = JobQueue(runner)
    yield runner, queue
    for gate in runner.gates.values():
        gate.set()
    queue.close()


# ---------------------------------------------------------------------------------------------
# The queue


def test_jobs_run_one_at_a_time_in_order_and_each_sees_only_its_own_events(gated):
    runner, queue = gated
    jobs = [queue.submit(request(prompt=f"prompt {i}"), owner=f"session-{i}") for i in range(3)]
    wait_for(lambda: runner.started == [jobs[0].id])
    assert queue.position(jobs[0]) == 0 and queue.position(jobs[1]) == 1 and queue.position(jobs[2]) == 2
    for job in jobs:
        runner.gate(job).set()
    results = {job.id: drain(job) for job in jobs}
    assert runner.started == [job.id for job in jobs]
    for job in jobs:
        events = results[job.id]
        assert events[-1] == Finished(video_path=Path(f"{job.id}.mp4"), frames=25)
        assert job.result == events[-1] and job.done
        stages = [e for e in events if isinstance(e, Stage)]
        assert stages and all(job.id in s.message for s in stages)
        other_ids = [j.id for j in jobs if j is not job]
        assert not any(o in str(e) for e in events for o in other_ids)


def test_waiting_jobs_are_told_their_place_whenever_it_changes(gated):
    runner, queue = gated
    first = queue.submit(request())
    wait_for(lambda: runner.started == [first.id])
    second = queue.submit(request())
    third = queue.submit(request())
    assert [e for e in third.take(0) if isinstance(e, Queued)][-1] == Queued(position=2, ahead=2)
    runner.gate(first).set()
    wait_for(lambda: runner.started == [first.id, second.id])
    assert [e for e in third.take(0) if isinstance(e, Queued)][-1] == Queued(position=1, ahead=1)
    runner.gate(second).set()
    runner.gate(third).set()
    assert isinstance(drain(third)[-1], Finished)


def test_cancelling_a_waiting_job_takes_it_out_of_the_line(gated):
    runner, queue = gated
    first = queue.submit(request())
    wait_for(lambda: runner.started == [first.id])
    second = queue.submit(request())
    third = queue.submit(request())
    queue.cancel(second)
    assert drain(second, timeout=1)[-1] == Cancelled(video_path=None, frames=0)
    assert [e for e in third.take(0) if isinstance(e, Queued)][-1] == Queued(position=1, ahead=1)
    runner.gate(first).set()
    runner.gate(third).set()
    assert isinstance(drain(third)[-1], Finished)
    assert second.id not in runner.started


def test_cancelling_a_running_job_ends_it_with_its_partial_video(gated):
    runner, queue = gated
    job = queue.submit(request(), owner="tab")
    wait_for(lambda: runner.started == [job.id])
    assert queue.cancel_owner("tab") == 1
    assert drain(job)[-1] == Cancelled(video_path=Path(f"{job.id}.part001.mp4"), frames=9)
    assert queue.cancel_owner("tab") == 0
    # the worker goes on with the next job
    nxt = queue.submit(request(), owner="tab")
    runner.gate(nxt).set()
    assert isinstance(drain(nxt)[-1], Finished)


def test_one_page_has_one_job_at_a_time(gated):
    runner, queue = gated
    job = queue.submit(request(), owner="tab-a")
    with pytest.raises(BusyError):
        queue.submit(request(), owner="tab-a")
    other = queue.submit(request(), owner="tab-b")  # another page may queue
    assert [j.owner for j in queue.active()] == ["tab-a", "tab-b"]
    assert queue.active("tab-b") == [other]
    runner.gate(job).set()
    drain(job)
    queue.submit(request(), owner="tab-a")  # free again once its job ended


def test_a_failing_runner_gives_failed_and_the_worker_keeps_going():
    def runner(job):
        if job.request.settings.prompt == "boom":
            raise RuntimeError("kaput")
        if job.request.settings.prompt == "user":
            raise ValueError("Model files are missing: say which.")
        if job.request.settings.prompt == "silent":
            yield Stage("text", "nothing more")
            return
        yield Finished(video_path=Path("ok.mp4"), frames=1)
        yield Stage("text", "never seen: nothing follows the last event")

    queue = JobQueue(runner)
    try:
        boom = drain(queue.submit(request(prompt="boom")))
        assert isinstance(boom[-1], Failed) and "RuntimeError: kaput" in boom[-1].message
        user = drain(queue.submit(request(prompt="user")))
        assert user[-1] == Failed("Model files are missing: say which.")
        silent = drain(queue.submit(request(prompt="silent")))
        assert isinstance(silent[-1], Failed)
        ok_job = queue.submit(request(prompt="fine"))
        ok = drain(ok_job)
        assert ok[-1] == Finished(video_path=Path("ok.mp4"), frames=1)
        time.sleep(0.05)
        assert ok_job.take(0) == []
    finally:
        queue.close()


def test_queue_state_lives_in_objects_not_the_module():
    import diffusers_helper.jobs as jobs_module

    a, b = JobQueue(lambda job: iter(())), JobQueue(lambda job: iter(()))
    a.submit(request(), owner="x")
    assert b.active() == []
    a.close()
    mutable = [name for name, value in vars(jobs_module).items()
               if not name.startswith("__") and isinstance(value, (list, dict, set))]
    assert mutable == []


# ---------------------------------------------------------------------------------------------
# Output names and the listing


def test_output_names_are_unique_even_within_one_millisecond(tmp_path):
    moment = datetime(2025, 5, 1, 12, 30, 5, 123456)
    namer = OutputNamer(tmp_path / "outputs", clock=lambda: moment)
    first, second = namer.next(), namer.next()
    assert first.name == "2025-05-01_12-30-05-123.mp4"
    assert second.name == "2025-05-01_12-30-05-123_2.mp4"
    # A second app (another namer) sharing the folder sees the files, not the first namer's memory.
    (tmp_path / "outputs" / "2025-05-01_12-30-05-123_2.json").write_text("{}")
    (tmp_path / "outputs" / "2025-05-01_12-30-05-123.png").write_bytes(b"")
    other = OutputNamer(tmp_path / "outputs", clock=lambda: moment)
    assert other.next().name == "2025-05-01_12-30-05-123_3.mp4"


def write_job(folder: Path, stem: str, *, status: str = "finished", final: bool = True, parts=(), prompt="p",
              model="framepack") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    settings = GenerationSettings(prompt=prompt, model=model, seed=7).to_dict()
    (folder / f"{stem}.json").write_text(json.dumps({"settings": settings, "model": model, "status": status}))
    (folder / f"{stem}.png").write_bytes(b"png")
    if final:
        (folder / f"{stem}.mp4").write_bytes(b"mp4")
    for n in parts:
        (folder / f"{stem}.part{n:03d}.mp4").write_bytes(b"mp4")


def test_past_outputs_are_listed_newest_first_with_their_settings(tmp_path):
    out = tmp_path / "outputs"
    write_job(out, "2025-05-01_12-30-05-123", prompt="old one")
    write_job(out, "2025-05-02_08-00-00-000", prompt="newest", model="f1")
    write_job(out, "2025-05-01_12-30-05-123_2", status="running", final=False, parts=(2, 3), prompt="ended early")
    (out / "2025-05-01_00-00-00-000.json").write_text("not json")
    (out / "notes.json").write_text(json.dumps(["not", "a", "sidecar"]))
    items = list_outputs(out)
    assert [i.stem for i in items] == ["2025-05-02_08-00-00-000", "2025-05-01_12-30-05-123_2", "2025-05-01_12-30-05-123"]
    newest, partial, old = items
    assert newest.model == "f1" and newest.settings["prompt"] == "newest" and newest.video == out / f"{newest.stem}.mp4"
    assert "FramePack-F1" in newest.label and "2025-05-02 08:00:00" in newest.label and "newest" in newest.label
    assert partial.video == out / f"{partial.stem}.part003.mp4" and "partial" in partial.label
    assert old.input_image == out / f"{old.stem}.png" and old.settings["seed"] == 7
    assert read_output(out / "2025-05-01_00-00-00-000.json") is None
    assert list_outputs(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# Models


def test_runtime_loads_shared_parts_once_and_swaps_only_the_transformer(tiny_sources):
    loads = []

    def load_shared(sources, device):
        loads.append("shared")
        return object()

    class Transformer:  # records the attention backend it is given
        backend = None

        def set_attention_backend(self, name):
            self.backend = name

    def load_transformer(source, device):
        loads.append(Path(source).name)
        return Transformer()

    messages = []
    cache = Runtime(lambda: tiny_sources, device="cpu", load_shared=load_shared, load_transformer=load_transformer,
                    attention="sdpa")
    assert loads == [] and cache.loaded_model is None  # nothing loads before the first job
    first = cache.components("framepack", notify=messages.append)
    again = cache.components("framepack")
    f1 = cache.components("f1", notify=messages.append)
    assert loads == ["shared", "framepack", "f1"]
    assert first.transformer is again.transformer and first.shared is f1.shared
    assert f1.model == "f1" and cache.loaded_model == "f1" and f1.device == torch.device("cpu")
    assert any("text encoders" in m for m in messages) and any("FramePack-F1 transformer" in m for m in messages)
    # --attention reaches every transformer as it loads (diffusers' name for SDPA is "native")
    assert first.transformer.backend == f1.transformer.backend == "native"


def test_vram_mode_follows_the_flag():
    assert choose_vram_mode("high", "cpu") is VramMode.HIGH
    assert choose_vram_mode("low", "cpu") is VramMode.LOW
    assert choose_vram_mode("auto", "cpu") is VramMode.HIGH  # nothing to offload from on a CPU
    with pytest.raises(ValueError):
        choose_vram_mode("medium", "cpu")


def test_a_real_tiny_job_streams_loading_progress_and_writes_its_video(tiny_sources, tmp_path):
    from diffusers_helper.video import read_frames

    runner = FramePackRunner(Runtime(tiny_sources, device="cpu"), tmp_path / "out")
    queue = JobQueue(runner)
    try:
        settings = GenerationSettings(prompt="a red ball bounces", seconds=1, window=3, steps=2, resolution=64, seed=3)
        pixels = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
        events = drain(queue.submit(JobRequest(settings, pixels)), timeout=120)
    finally:
        queue.close()
    loading = [e.message for e in events if isinstance(e, Stage) and e.name == "loading"]
    assert any("text encoders" in m for m in loading) and any("FramePack transformer" in m for m in loading)
    steps = [e for e in events if isinstance(e, StepProgress)]
    assert len(steps) == settings.sections * settings.steps
    assert [e.section for e in events if isinstance(e, SectionDone)] == list(range(1, settings.sections + 1))
    done = events[-1]
    assert isinstance(done, Finished) and done.frames == settings.total_frames
    assert len(read_frames(done.video_path)) == settings.total_frames
    record = json.loads(done.video_path.with_suffix(".json").read_text())
    assert record["status"] == "finished" and record["settings"] == settings.to_dict()
    assert record["sources"]["transformer"] == tiny_sources.transformer("framepack")
