"""The scale-out pieces that need no Ray cluster: flags, the queue's slots and lost workers, files sent back.

The end-to-end tests on a local Ray cluster are in test_ray.py (slow).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from diffusers_helper.events import Cancelled, Failed, Finished, SectionDone
from diffusers_helper.jobs import MAX_LOST, JobQueue, JobRequest, WorkerLost
from diffusers_helper.jobstore import JobStore
from diffusers_helper.settings import GenerationSettings

SETTINGS = GenerationSettings(prompt="x", seconds=1, window=2, steps=1, resolution=64)


# -- flags ---------------------------------------------------------------------------------------


def run_cli(cli_error, *argv):
    return cli_error(["batch", "jobs.json", "--outputs", "out", *argv])


@pytest.mark.parametrize("argv, message", [
    (("--workers", "2"), "--workers only goes with --ray"),
    (("--cpus-per-worker", "2"), "--cpus-per-worker only goes with --ray"),
    (("--ray", "local", "--workers", "0"), "--workers must be between 1 and 1024"),
    (("--ray", "local", "--gpus-per-worker", "0"), "--gpus-per-worker must be above 0"),
    (("--ray", " "), "--ray needs an address"),
])
def test_bad_ray_flags_are_one_line(cli_error, argv, message):
    assert message in run_cli(cli_error, *argv)


def test_without_ray_installed_the_flag_says_what_to_install(cli_error, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    message = run_cli(cli_error, "--ray", "local")
    assert "pip install .[ray]" in message and "requirements-ray.txt" in message


def test_the_app_takes_the_same_flags(monkeypatch):
    from diffusers_helper.app.server import config_from_args, parse_args

    pytest.importorskip("ray")
    args = parse_args(["--ray", "local", "--workers", "2", "--cpus-per-worker", "1", "--tiny"])
    config = config_from_args(args)
    assert (config.ray.address, config.ray.workers, config.ray.cpus_per_worker) == ("local", 2, 1)
    assert config_from_args(parse_args(["--tiny"])).ray is None
    with pytest.raises(SystemExit):
        parse_args(["--workers", "2"])


# -- slots and lost workers ------------------------------------------------------------------------


class Slot:
    """A runner that records which jobs it ran, waits at a gate, and can lose its worker mid-job."""

    def __init__(self, name, gate, lose=()):
        self.name, self.gate, self.lose = name, gate, set(lose)
        self.ran = []
        self.label = f"slot {name}"

    def __call__(self, job):
        self.ran.append(job.request.settings.prompt)
        yield SectionDone(section=1, sections=2, video_path=Path("x.part001.mp4"), frames=1, latent_frames=1)
        self.gate.wait(30)
        if job.request.settings.prompt in self.lose:
            self.lose.discard(job.request.settings.prompt)
            raise WorkerLost(f"{self.label} went away")
        yield Finished(video_path=Path(f"{job.request.settings.prompt}.mp4"), frames=2)


def test_several_slots_run_jobs_at_once_and_each_row_names_its_slot(tmp_path):
    gate = threading.Event()
    slots = [Slot("a", gate), Slot("b", gate)]
    queue = JobQueue(slots, store=JobStore(tmp_path), poll_s=0.02)
    try:
        jobs = queue.enqueue([JobRequest(SETTINGS.replace(prompt=str(n)), None) for n in range(4)], follow=True)
        deadline = time.monotonic() + 30
        while len(queue.running_jobs()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert queue.slots == 2 and len(queue.running_jobs()) == 2  # two at once, each on its own slot
        workers = sorted(row.worker.rsplit("|", 1)[1] for row in queue.store.jobs() if row.state == "running")
        assert workers == ["slot a", "slot b"]
        gate.set()
        results = [list(job.events())[-1] for job in jobs]
    finally:
        queue.close()
    assert all(isinstance(r, Finished) for r in results)
    assert sorted(slots[0].ran + slots[1].ran) == ["0", "1", "2", "3"] and slots[0].ran and slots[1].ran


def test_a_lost_worker_s_job_runs_again_first_and_then_fails_after_max_lost(tmp_path):
    gate = threading.Event()
    gate.set()
    once = Slot("a", gate, lose={"lost once"})
    queue = JobQueue(once, store=JobStore(tmp_path), poll_s=0.02)
    try:
        first, second = queue.enqueue([JobRequest(SETTINGS.replace(prompt="lost once"), None),
                                       JobRequest(SETTINGS.replace(prompt="fine"), None)], follow=True)
        assert isinstance(list(first.events())[-1], Finished) and isinstance(list(second.events())[-1], Finished)
    finally:
        queue.close()
    assert once.ran == ["lost once", "lost once", "fine"]  # taken again before the next job
    assert first.lost == 1

    class Dies(Slot):
        def __call__(self, job):
            self.ran.append(job.request.settings.prompt)
            raise WorkerLost("gone")
            yield  # a generator

    dies = Dies("d", gate)
    queue = JobQueue(dies, store=JobStore(tmp_path / "again"), poll_s=0.02)
    try:
        (job,) = queue.enqueue([JobRequest(SETTINGS.replace(prompt="cursed"), None)], follow=True)
        result = list(job.events())[-1]
    finally:
        queue.close()
    assert isinstance(result, Failed) and f"stopped {MAX_LOST} times" in result.message
    assert dies.ran == ["cursed"] * MAX_LOST
    (row,) = JobStore(tmp_path / "again").jobs()
    assert row.state == "failed"


def test_a_page_job_whose_worker_was_lost_continues_and_its_page_keeps_following_it(tmp_path):
    gate = threading.Event()
    gate.set()
    slot = Slot("a", gate, lose={"page"})
    queue = JobQueue(slot)
    try:
        job = queue.submit(JobRequest(SETTINGS.replace(prompt="page"), None), owner="s1")
        events = list(job.events())
    finally:
        queue.close()
    assert isinstance(events[-1], Finished) and slot.ran == ["page", "page"]
    assert sum(isinstance(e, SectionDone) for e in events) == 2  # one stream, both attempts


def test_a_runner_that_cannot_start_is_tried_again_and_close_still_stops(tmp_path):
    class NoActor:
        tries = 0

        def wait_ready(self):
            NoActor.tries += 1
            raise RuntimeError("no room in the cluster")

        def __call__(self, job):
            raise AssertionError("never runs")

    queue = JobQueue(NoActor(), store=JobStore(tmp_path), poll_s=0.01)
    queue.enqueue([JobRequest(SETTINGS, None)])
    time.sleep(0.2)
    started = time.monotonic()
    queue.close(timeout=10)
    assert NoActor.tries >= 1 and time.monotonic() - started < 10
    assert [row.state for row in JobStore(tmp_path).jobs()] == ["waiting"]  # still there for the next start


# -- files sent back -------------------------------------------------------------------------------


def test_files_come_back_changed_ones_only_and_removed_ones_go(tmp_path):
    from diffusers_helper.scaleout import _files_back, _here, _receive

    worker, mine = tmp_path / "worker", tmp_path / "mine"
    worker.mkdir()
    out_w, out_m = worker / "job.mp4", mine / "job.mp4"
    (worker / "job.json").write_text("{1}")
    (worker / "job.part001.mp4").write_bytes(b"one")
    (worker / ".job.lock").write_text("")
    (worker / "jobless.json").write_text("other job")
    sent = {}
    first = _files_back(out_w, sent)
    assert sorted(first.changed) == ["job.json", "job.part001.mp4"]  # not the lock, not another job's file
    _receive(out_m, first)
    assert (mine / "job.part001.mp4").read_bytes() == b"one"
    (worker / "job.part001.mp4").unlink()
    (worker / "job.part002.mp4").write_bytes(b"two")
    second = _files_back(out_w, sent)
    assert sorted(second.changed) == ["job.part002.mp4"]  # the sidecar did not change
    _receive(out_m, second)
    assert sorted(p.name for p in mine.iterdir()) == ["job.json", "job.part002.mp4"]
    moved = _here(Finished(video_path=worker / "job.mp4", frames=3, input_image_path=worker / "job.png"), mine)
    assert (moved.video_path, moved.input_image_path) == (mine / "job.mp4", mine / "job.png")
    assert _here(Cancelled(video_path=None, frames=0), mine) == Cancelled(video_path=None, frames=0)


def test_workers_get_absolute_model_paths(tmp_path, monkeypatch, tiny_sources):
    from diffusers_helper.runtime import Runtime
    from diffusers_helper.scaleout import WorkerConfig

    monkeypatch.chdir(Path(tiny_sources.hunyuan).parent)
    relative = type(tiny_sources)(hunyuan=Path(tiny_sources.hunyuan).name, siglip=str(tiny_sources.siglip),
                                  transformers=dict(tiny_sources.transformers))
    config = WorkerConfig.of(Runtime(relative, device="cpu", lora_dir="loras"), device="auto")
    assert Path(config.sources.hunyuan).is_absolute() and Path(config.sources.hunyuan).is_dir()
    assert Path(config.lora_dir).is_absolute() and config.device == "auto"
