"""The queue that survives (diffusers_helper.jobstore, the queue file side of jobs.JobQueue) and batches.

The store's transactions, its order and its claims are tested on real SQLite files; the worker with
small fake runners (so that order and states are exact); one batch runs the tiny models and gives
the latents of each job run alone. The tests that kill processes or drive the app are in
test_queue_recovery.py (slow).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appkit import wait_until
from diffusers_helper.events import Cancelled, Finished, Stage
from diffusers_helper.jobs import FramePackRunner, JobQueue, JobRequest
from diffusers_helper.jobstore import FILENAME, JobStore, NewJob, decode_png, process_alive, process_identity
from diffusers_helper.settings import GenerationSettings

TIMEOUT = 30.0
IMAGE = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)


def settings(**changes) -> GenerationSettings:
    return GenerationSettings(**{"seconds": 1, "window": 2, "steps": 1, "resolution": 64, **changes})


class Recorder:
    """A runner that records which jobs it ran (by prompt), each waiting for its gate when `gated`."""

    def __init__(self, gated: bool = False):
        self.started: list[str] = []
        self.outputs: dict[str, object] = {}
        self.gates: dict[str, threading.Event] = {}
        self.gated = gated

    def gate(self, prompt: str) -> threading.Event:
        return self.gates.setdefault(prompt, threading.Event())

    def __call__(self, job):
        prompt = job.request.settings.prompt
        self.started.append(prompt)
        self.outputs[prompt] = job.output  # a queued job's earlier output, if it ran before
        job.bind_output(Path(f"/videos/{prompt}.mp4"))
        yield Stage("sampling", prompt)
        while self.gated and not self.gate(prompt).wait(0.01):
            if job.cancel_token.cancelled:
                yield Cancelled(video_path=None, frames=0)
                return
        yield Finished(video_path=Path(f"/videos/{prompt}.mp4"), frames=1)


def dead_worker() -> str:
    """The identity of a process on this computer that does not exist (a killed one)."""
    host, _pid, started = process_identity().split("|")
    return f"{host}|999999999|{started}"


def queued(store: JobStore) -> list[tuple[str, str]]:
    return [(job.prompt, job.state) for job in store.jobs(ended=100)]


# ---------------------------------------------------------------------------------------------
# The file


def test_nothing_is_written_until_a_job_is_queued(tmp_path):
    store = JobStore(tmp_path / "outputs")
    assert not store.exists() and store.jobs() == [] and store.claim("app", "me") is None
    assert not store.move(1, -1) and not store.remove(1) and not store.retry(1)
    assert not (tmp_path / "outputs").exists()
    queue = JobQueue(Recorder(), store=store)
    queue.close()
    assert not (tmp_path / "outputs").exists()  # a queue with nothing queued starts no worker, writes nothing


def test_jobs_keep_their_order_settings_and_images_in_the_file(tmp_path):
    end, key = tmp_path / "end.png", tmp_path / "key.webp"
    Image.fromarray(IMAGE[::-1]).save(end)
    Image.fromarray(IMAGE[:, ::-1]).save(key)
    wanted = settings(prompt="a", seconds=2, end_image=str(end), keyframes=((1.0, str(key)),))
    store = JobStore(tmp_path)
    ids = store.add([NewJob(wanted, IMAGE), NewJob(settings(prompt="b"), IMAGE), NewJob(settings(prompt="c"))],
                    pool="app", owner="ann")
    assert (tmp_path / FILENAME).is_file()
    end_bytes, key_bytes = end.read_bytes(), key.read_bytes()
    end.unlink()
    key.unlink()  # the upload folder was cleaned: the queue has its own copies
    store.close()

    again = JobStore(tmp_path)  # as after a restart
    assert queued(again) == [("a", "waiting"), ("b", "waiting"), ("c", "waiting")]
    first = again.get(ids[0])
    assert first.owner == "ann" and first.generation_settings() == wanted
    with again.inputs(first) as (copy, image):
        assert np.array_equal(image, IMAGE)  # the start image exactly (lossless)
        assert Path(copy.end_image).read_bytes() == end_bytes and Path(copy.end_image).suffix == ".png"
        (seconds, path), = copy.keyframes
        assert seconds == 1.0 and Path(path).read_bytes() == key_bytes and Path(path).suffix == ".webp"
        assert copy.replace(end_image=str(end), keyframes=((1.0, str(key)),)) == wanted
    assert not Path(copy.end_image).exists()  # the copies live only while the job runs
    with again.inputs(again.get(ids[2])) as (_, image):
        assert image is None  # text-to-video
    assert decode_png(again.thumbnail(ids[0])).shape[1] <= 96 and again.thumbnail(ids[2]) is None
    # the same picture queued twice is stored once
    blobs = again._read("SELECT COUNT(*) AS n FROM blobs")[0]["n"]
    assert blobs == 4  # start, thumbnail, end, keyframe


def test_a_failed_add_queues_none_of_the_jobs(tmp_path):
    store = JobStore(tmp_path)
    store.add([NewJob(settings(prompt="kept"), IMAGE)], pool="app")
    batch = [NewJob(settings(prompt=f"job {n}"), IMAGE) for n in range(1, 3)]
    batch.append(NewJob(settings(prompt="job 3", end_image=str(tmp_path / "gone.png")), IMAGE))
    with pytest.raises(ValueError, match="gone.png"):
        store.add(batch, pool="app")
    assert queued(store) == [("kept", "waiting")]
    store._conn.execute("BEGIN IMMEDIATE")  # a transaction cut off half-way (as by a kill) leaves nothing
    store._conn.execute("INSERT INTO jobs (position, state, pool, settings, created) "
                        "VALUES (9, 'waiting', 'app', '{}', 0)")
    store._conn.close()
    store._conn = None
    assert queued(JobStore(tmp_path)) == [("kept", "waiting")]


def test_an_outputs_folder_that_cant_be_written_is_a_message(tmp_path):
    (tmp_path / "a file").write_text("not a folder")
    store = JobStore(tmp_path / "a file" / "outputs")
    with pytest.raises(ValueError, match="can't be opened or written"):
        store.add([NewJob(settings(prompt="x"), IMAGE)], pool="app")
    assert store.jobs() == [] and not store.exists()


def test_moving_removing_retrying_and_the_claim_order(tmp_path):
    store = JobStore(tmp_path)
    a, b, c, d = store.add([NewJob(settings(prompt=p), IMAGE) for p in "abcd"], pool="app", owner="me")
    other = store.add([NewJob(settings(prompt="batch"))], pool="batch:x")
    assert store.move(c, -1) and not store.move(a, -1)
    assert store.move(a, +1)
    assert [j.prompt for j in store.jobs() if j.pool == "app"] == ["c", "a", "b", "d"]
    assert store.remove(b) and store.get(b) is None
    first = store.claim("app", "worker-1")
    assert first.prompt == "c" and first.state == "running" and first.worker == "worker-1"
    assert not store.remove(c) and not store.move(c, 1)  # a running job stays
    store.end(c, "failed", "out of memory")
    assert store.retry(c) and store.get(c).state == "waiting" and store.get(c).message is None
    assert [store.claim("app", "w").prompt for _ in range(3)] == ["a", "d", "c"]  # a retried job goes to the end
    assert store.claim("app", "w") is None
    assert store.claim("batch:x", "w").id == other[0]  # each pool has its own line


def test_a_job_whose_process_died_is_interrupted_and_taken_first(tmp_path):
    store = JobStore(tmp_path)
    a, b = store.add([NewJob(settings(prompt=p), IMAGE) for p in "ab"], pool="app")
    store.claim("app", f"{process_identity()}")
    store.set_output(a, tmp_path / "a.mp4")
    assert store.recover() == []  # this process is alive
    store._conn.execute("UPDATE jobs SET worker = ? WHERE id = ?", (dead_worker(), a))
    assert not process_alive(dead_worker()) and not process_alive("garbage")
    assert process_alive("another-computer|1|0")  # its processes can't be seen: assumed alive
    assert store.recover() == [a] and store.get(a).state == "interrupted"
    assert store.move(b, -1) is False  # nothing waits before b
    again = store.claim("app", "new worker")
    assert again.id == a and again.output == tmp_path / "a.mp4"


def test_two_workers_on_one_file_never_take_the_same_job(tmp_path):
    JobStore(tmp_path).add([NewJob(settings(prompt=str(n))) for n in range(60)], pool="app")
    taken: dict[str, list[int]] = {"one": [], "two": []}

    def work(name: str) -> None:
        store = JobStore(tmp_path)  # its own connection, as another process has
        while (job := store.claim("app", name)) is not None:
            taken[name].append(job.id)
            store.end(job.id, "finished")
        store.close()

    threads = [threading.Thread(target=work, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    together = taken["one"] + taken["two"]
    assert sorted(together) == list(range(1, 61)) and len(set(together)) == 60


# ---------------------------------------------------------------------------------------------
# The worker


def test_queued_jobs_run_in_order_after_the_pages_jobs(tmp_path):
    runner = Recorder(gated=True)
    queue = JobQueue(runner, store=JobStore(tmp_path))
    try:
        page_job = queue.submit(JobRequest(settings(prompt="page 1"), IMAGE), owner="tab")
        wait_until(lambda: runner.started == ["page 1"])
        followed = queue.enqueue([JobRequest(settings(prompt=p), IMAGE) for p in ("q1", "q2")], owner="me",
                                 follow=True)
        second_page = queue.submit(JobRequest(settings(prompt="page 2"), IMAGE), owner="tab 2")
        assert queue.stored_outputs() == set()
        for prompt in ("page 1", "page 2", "q1", "q2"):
            runner.gate(prompt).set()
        events = [event for job in followed for event in job.events()]
        assert [type(e).__name__ for e in events] == ["Stage", "Finished"] * 2
        assert isinstance(page_job.result, Finished) and isinstance(second_page.result, Finished)
        assert runner.started == ["page 1", "page 2", "q1", "q2"]
        assert queued(queue.store) == [("q2", "finished"), ("q1", "finished")]
        assert queue.store.get(followed[0].stored_id).output == Path("/videos/q1.mp4")
        assert queue.active() == []  # the pages' jobs only
    finally:
        queue.close()


def test_closing_interrupts_the_running_job_and_the_next_queue_continues_it_first(tmp_path):
    runner = Recorder(gated=True)
    queue = JobQueue(runner, store=JobStore(tmp_path))
    queue.enqueue([JobRequest(settings(prompt=p), IMAGE) for p in ("first", "second", "third")], owner="me")
    wait_until(lambda: runner.started == ["first"])
    assert queue.stored_outputs() == {tmp_path / "first.mp4"}  # rebased on the store's folder
    queue.close()
    assert queued(JobStore(tmp_path)) == [("first", "interrupted"), ("second", "waiting"), ("third", "waiting")]

    again = Recorder()
    restarted = JobQueue(again, store=JobStore(tmp_path))  # starts its worker at once: there are jobs to run
    try:
        wait_until(lambda: [s for _, s in queued(restarted.store)] == ["finished"] * 3, what="the jobs to finish")
        assert again.started == ["first", "second", "third"]
        assert again.outputs["first"] == Path("/videos/first.mp4") and again.outputs["second"] is None
    finally:
        restarted.close()


def test_waiting_queued_jobs_can_be_removed_moved_retried_and_stopped(tmp_path):
    runner = Recorder(gated=True)
    queue = JobQueue(runner, store=JobStore(tmp_path))
    try:
        jobs = queue.enqueue([JobRequest(settings(prompt=p), IMAGE) for p in "abc"], owner="me", follow=True)
        a, b, c = (job.stored_id for job in jobs)
        wait_until(lambda: runner.started == ["a"])
        assert queue.move(c, -1) and queue.remove(b)
        assert isinstance(jobs[1].result, Cancelled)
        assert queue.stop(a) and not queue.stop(c)
        assert isinstance(jobs[0].result, Cancelled) or wait_until(lambda: jobs[0].done)
        wait_until(lambda: runner.started == ["a", "c"])
        runner.gate("c").set()
        wait_until(lambda: queue.store.get(c).state == "finished")
        assert queue.store.get(a).state == "cancelled" and queue.retry(a)
        runner.gate("a").set()
        wait_until(lambda: queue.store.get(a).state == "finished")
        assert runner.started == ["a", "c", "a"]
    finally:
        queue.close()


def test_a_queued_job_whose_video_is_in_place_is_not_run_again(tmp_path):
    from diffusers_helper.runtime import Runtime

    video = tmp_path / "2025-01-01_00-00-00-000.mp4"
    video.write_bytes(b"mp4")
    video.with_suffix(".json").write_text(json.dumps({"frames": 33, "status": "running"}))
    store = JobStore(tmp_path)
    (job_id,) = store.add([NewJob(settings(prompt="done"), IMAGE)], pool="app")
    store.claim("app", "a process killed right after the rename")
    store.set_output(job_id, video)
    store._conn.execute("UPDATE jobs SET worker = ? WHERE id = ?", (dead_worker(), job_id))
    runner = FramePackRunner(Runtime(lambda: pytest.fail("no model is needed"), device="cpu"), tmp_path)
    queue = JobQueue(runner, store=store)
    try:
        wait_until(lambda: store.get(job_id).state == "finished")
    finally:
        queue.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FILENAME, video.name, video.with_suffix(".json").name])


def test_an_earlier_attempt_without_a_finished_section_is_cleared_and_started_afresh(tmp_path):
    stem = "2025-01-01_00-00-00-000"
    for suffix in (".json", ".png", ".end.png", ".keyframe1.png"):
        (tmp_path / f"{stem}{suffix}").write_bytes(b"x")
    (tmp_path / f".{stem}.json.ab12.tmp").write_bytes(b"x")
    (tmp_path / f"{stem}_2.json").write_text("{}")  # another job's
    assert FramePackRunner._earlier_attempt(tmp_path / f"{stem}.mp4") is None
    assert [p.name for p in tmp_path.iterdir()] == [f"{stem}_2.json"]
    # an attempt with latents that can't be resumed (damaged) is left as it is, and the job starts afresh
    damaged = [f"{stem}_2.latents.safetensors", f"{stem}_2.png"]
    for name in damaged:
        (tmp_path / name).write_bytes(b"not safetensors")
    assert FramePackRunner._earlier_attempt(tmp_path / f"{stem}_2.mp4") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}_2.json", *damaged])


# ---------------------------------------------------------------------------------------------
# Batch files


def write_batch(folder: Path, jobs, kind: str = "json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        path = folder / "jobs.json"
        path.write_text(json.dumps(jobs))
    else:
        path = folder / "jobs.csv"
        path.write_text(jobs)
    return path


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "batch"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png", "end.png", "key.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize("jobs, message", [
    ([{"image": "a.png"}, {"image": "a.png", "sed": 3}], "job 2: unknown key 'sed'"),
    ([{"image": "a.png"}, {"image": "b.png"}, {"image": "a.png", "seed": "1.5"}], "job 3 (seed): seed must be a whole"),
    ([{"image": "a.png"}, {"image": "a.png", "seconds": 500}], "job 2 (seconds): seconds must be between"),
    ([{"image": "a.png"}, {"image": "missing.png"}], "job 2 (image): Image file not found"),
    ([{"image": "a.png", "model": "f1", "end_image": "end.png"}], "job 1 (end_image): An end image needs"),
    ([{"image": "a.png", "keyframes": ["0.5=nope.png"]}], "job 1 (keyframes): The keyframe at 0.5 s"),
    ([], "holds no jobs"),
    ({"image": "a.png"}, "must hold a JSON list"),
])
def test_a_bad_batch_file_is_refused_before_anything_runs(pictures, tmp_path, cli_error, jobs, message):
    path = write_batch(pictures, jobs)
    outputs = tmp_path / "outputs"
    error = cli_error(["batch", str(path), "--outputs", str(outputs), "--device", "cpu"])
    assert message in error, error
    assert not outputs.exists()


def test_csv_batch_files_are_read_by_their_header(pictures, tmp_path, cli_error):
    from diffusers_helper.batch import read_batch

    path = write_batch(pictures, "image,prompt,seed,fp8,keyframes\n"
                                 "a.png,a cat,3,no,0.5=key.png\n"
                                 ",waves at sunset,4,,\n", kind="csv")
    first, second = read_batch(path)
    assert first.settings.seed == 3 and first.settings.fp8 is False and not first.settings.text_to_video
    assert first.settings.keyframes == ((0.5, str(pictures / "key.png")),)
    assert first.image.shape == (48, 64, 3) and second.image is None and second.settings.text_to_video
    bad = write_batch(pictures, "image,prompt,fp8\na.png,x,maybe\n", kind="csv")
    assert "job 1 (fp8): must be true or false" in cli_error(["batch", str(bad), "--outputs", str(tmp_path / "o")])


def test_page_batches_make_every_combination_with_their_seeds():
    from diffusers_helper.batch import combinations

    base = settings(prompt="unused", seed=10)
    other = IMAGE[::-1]
    jobs = combinations(base, [IMAGE, other], ["left", "right"], 3, "consecutive")
    assert [(j.image is IMAGE, j.settings.prompt, j.settings.seed) for j in jobs] == [
        (image, prompt, seed) for image in (True, False) for prompt in ("left", "right") for seed in (10, 11, 12)]
    assert {j.settings.seed for j in combinations(base, [IMAGE], [], 4, "fixed")} == {10}
    assert [j.settings.prompt for j in combinations(base, [IMAGE], [], 1, "fixed")] == ["unused"]
    assert len({j.settings.seed for j in combinations(base, [None], ["x"], 5, "random")}) == 5
    with pytest.raises(ValueError, match="at most"):
        combinations(base, [IMAGE] * 20, ["p"] * 10, 10, "fixed")


@pytest.mark.slow  # several whole jobs: in the full run
def test_a_batch_files_jobs_each_give_the_latents_of_the_job_run_alone(pictures, tmp_path, tiny_sources,
                                                                       tiny_shared, tiny_components):
    import torch
    from safetensors.torch import load_file

    from diffusers_helper.batch import batch_key, read_batch
    from diffusers_helper.cli_batch import run_batch
    from diffusers_helper.pipeline import generate
    from diffusers_helper.runtime import Runtime

    base = {"seconds": 1, "window": 3, "steps": 2, "resolution": 64, "cache": "none"}
    path = write_batch(pictures, [
        {"image": "a.png", "prompt": "a cat", "seed": 1, **base},
        {"image": str(pictures / "b.png"), "prompt": "a dog", "seed": 2, "model": "f1", **base},
        {"image": "b.png", "prompt": "[0s: sun] [0.5s: rain]", "seed": 3, "end_image": "end.png",
         "keyframes": [[0.5, "key.png"]], **base},
    ])
    jobs = read_batch(path)
    runtime = Runtime(tiny_sources, device="cpu", load_shared=lambda sources, device: tiny_shared,
                      load_transformer=lambda source, device: tiny_components(
                          "f1" if source == tiny_sources.transformer("f1") else "framepack").transformer)
    outputs = tmp_path / "outputs"
    printed = tmp_path / "printed.txt"
    with printed.open("w") as out:
        assert run_batch(runtime, jobs, batch_key(path), outputs, out=out) == 0
    videos = [Path(line) for line in printed.read_text().split()]
    assert len(videos) == 3 and all(v.parent == outputs and v.is_file() for v in videos)
    for number, (job, video) in enumerate(zip(jobs, videos)):
        alone = tmp_path / f"alone{number}" / "alone.mp4"
        events = list(generate(tiny_components(job.settings.model), job.settings, job.image, alone))
        assert isinstance(events[-1], Finished), events[-1]
        mine = load_file(str(video.with_suffix(".latents.safetensors")))["history_latents"]
        reference = load_file(str(alone.with_suffix(".latents.safetensors")))["history_latents"]
        assert torch.equal(mine, reference), f"job {number + 1}"
    # run again: nothing runs twice, the same videos are named
    again = tmp_path / "again.txt"
    with again.open("w") as out:
        assert run_batch(runtime, jobs, batch_key(path), outputs, out=out) == 0
    assert again.read_text() == printed.read_text()
    assert len(list(outputs.glob("*.mp4"))) == 3
