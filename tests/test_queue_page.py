"""The page's Queue panel and batches, its handlers called alone (app.queue_panel.QueuePanel)."""

from __future__ import annotations

import inspect
import re
import threading
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from diffusers_helper.app.queue_panel import BATCH_FIELDS, Form, QueuePanel, Viewer, add_handler, viewer_of
from diffusers_helper.app.ui import FORM_FIELDS, AppConfig, Page, form_values, load_start_image, settings_from_form
from diffusers_helper.events import Finished, Stage
from diffusers_helper.jobs import JobQueue, JobRequest
from diffusers_helper.jobstore import FILENAME, JobStore
from diffusers_helper.settings import GenerationSettings

ANN, BOB = Viewer("tab-ann", "ann"), Viewer("tab-bob", "bob")
SMALL = GenerationSettings(prompt="the form's prompt", seconds=1, window=2, steps=1, resolution=64, seed=100)


@pytest.fixture
def gate():
    gate = threading.Event()
    yield gate
    gate.set()


@pytest.fixture
def page(tmp_path, tiny_sources, gate):
    """A page whose jobs wait for `gate` (so that they stay in line), with its queue file in its outputs folder."""
    page = Page(AppConfig(outputs=tmp_path / "outputs", sources=tiny_sources, device="cpu"))
    page.jobs.close()

    def runner(job):
        yield Stage("sampling", job.request.settings.prompt)
        gate.wait(30)
        yield Finished(video_path=page.outputs / "x.mp4", frames=1)

    page.jobs = JobQueue(runner, store=JobStore(page.outputs))
    yield page
    gate.set()
    page.jobs.close()
    page.snapshots.close()


@pytest.fixture
def panel(page) -> QueuePanel:
    return QueuePanel(page, Form(FORM_FIELDS, settings_from_form, load_start_image))


@pytest.fixture
def images(tmp_path) -> list[str]:
    paths = []
    for n in range(2):
        path = tmp_path / f"upload{n}.png"
        Image.fromarray(np.full((48, 64, 3), 60 * (n + 1), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def batch(**changes) -> dict:
    return {"batch_images": None, "batch_prompts": "", "batch_count": 1, "batch_seeds": "consecutive", **changes}


def test_add_to_queue_queues_every_combination_and_only_the_owner_sees_prompts_and_pictures(page, panel, images):
    table, picker, choices = panel.add(None, form_values(SMALL),
                                       batch(batch_images=images, batch_prompts="a fox\n\n  a hare  \n",
                                             batch_count=2), ANN)
    jobs = page.jobs.store.jobs()
    assert [(j.prompt, j.settings["seed"], j.owner) for j in jobs] == [
        (prompt, seed, "ann") for _image in images for prompt in ("a fox", "a hare") for seed in (100, 101)]
    assert jobs[0].state == "running" or jobs[0].state == "waiting"
    assert table.count('class="fp-queue-job"') == 8 and "a hare" in table and table.count("<img") == 8
    choices = choices["choices"]
    assert len(choices) == 8 and all(value.startswith("q") for _, value in choices)
    # the first job starts (and then waits for the gate), so that nothing changes under the checks below
    deadline = time.monotonic() + 30
    while page.jobs.store.jobs()[0].state != "running" or "sections done" not in panel.view(ANN)[0]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    theirs, _, their_choices = panel.view(BOB)
    assert "a fox" not in theirs and "<img" not in theirs and "another user&#x27;s job" not in theirs
    assert theirs.count("another user's job") == 8 and their_choices["choices"] == []
    # the running job's progress is its owner's to see
    assert "sections done" not in theirs and "seed 100" not in theirs and ">running<" in theirs
    # a refresh sends only what changed
    again = panel.view(BOB, their_choices)
    assert again[0] == gr.skip() and again[1] == gr.skip() and again[2] == their_choices
    # the same user in another tab (a login) sees them as theirs
    assert "a fox" in panel.view(Viewer("tab-2", "ann"))[0]


def test_the_start_image_and_the_forms_prompt_are_used_without_batch_inputs(page, panel, images):
    panel.add(images[0], form_values(SMALL), batch(batch_count=3, batch_seeds="fixed"), ANN)
    jobs = page.jobs.store.jobs()
    assert [(j.prompt, j.settings["seed"]) for j in jobs] == [("the form's prompt", 100)] * 3
    with page.jobs.store.inputs(jobs[0]) as (_, pixels):
        assert np.array_equal(pixels, load_start_image(images[0]))


@pytest.mark.parametrize("image, changes, extra, message", [
    (None, {}, {}, "start image"),
    ("img", {"seconds": 500}, {}, "seconds"),
    ("img", {}, {"batch_count": 0}, "Videos per input"),
    ("img", {}, {"batch_count": 2.5}, "whole number"),
    ("img", {}, {"batch_seeds": "lucky"}, "batch_seeds"),
    ("img", {}, {"batch_images": ["not-an-image.txt"]}, "not-an-image.txt"),
    ("img", {}, {"batch_prompts": "fine\n[9s: past the end]"}, "past the video's last"),
])
def test_mistakes_are_messages_and_queue_nothing(page, panel, images, tmp_path, image, changes, extra, message):
    (tmp_path / "not-an-image.txt").write_text("hello")
    extra = {k: [str(tmp_path / f) for f in v] if k == "batch_images" else v for k, v in extra.items()}
    with pytest.raises(gr.Error, match=re.escape(message)):
        panel.add(images[0] if image else None, {**form_values(SMALL), **changes}, batch(**extra), ANN)
    assert not (page.outputs / FILENAME).exists()


def test_owners_move_remove_retry_and_stop_their_jobs_and_nobody_elses(page, panel, images, gate):
    page.jobs.submit(JobRequest(SMALL, np.zeros((64, 64, 3), dtype=np.uint8)), owner="tab-carl")  # holds the worker
    panel.add(images[0], form_values(SMALL), batch(batch_prompts="one\ntwo\nthree"), ANN)
    panel.add(images[0], form_values(SMALL), batch(batch_prompts="bob's"), BOB)
    one, two, three, bobs = page.jobs.store.jobs()
    for action in ("up", "remove", "retry", "stop"):
        with pytest.raises(gr.Error, match="not yours"):
            panel.act(action, f"q{one.id}", BOB)
    with pytest.raises(gr.Error, match="Unknown job"):
        panel.act("up", "q../../etc", ANN)
    table, _, shown = panel.act("up", f"q{three.id}", ANN)
    assert [label.split(" · ")[-1] for label, _ in shown["choices"]] == ["one", "three", "two"]
    assert re.findall(r'data-position="(\d)"', table) == ["0", "1", "2", "3", "4"]  # the page's job runs
    panel.act("remove", f"q{two.id}", ANN)
    with pytest.raises(gr.Error, match="Only a failed"):
        panel.act("retry", f"q{one.id}", ANN)
    with pytest.raises(gr.Error, match="not running"):
        panel.act("stop", f"q{one.id}", ANN)
    assert [j.prompt for j in page.jobs.store.jobs()] == ["one", "three", "bob's"]
    # the page's own job is listed first, its prompt hidden from others
    assert panel.view(ANN)[0].index("another user") < panel.view(ANN)[0].index("one")
    gate.set()


def test_the_add_to_queue_endpoint_names_its_inputs(panel):
    call = add_handler(panel)
    assert list(inspect.signature(call).parameters) == ["image", *FORM_FIELDS, *BATCH_FIELDS, "request"]
    assert viewer_of(SimpleNamespace(session_hash="s", username=None)) == Viewer("s", "s")
    assert viewer_of(SimpleNamespace(session_hash="s", username="ann")) == Viewer("s", "ann")


def test_the_server_never_serves_the_queue_file(tmp_path):
    from diffusers_helper.app import build_parser, config_from_args, launch_options

    args = build_parser().parse_args(["--outputs", str(tmp_path / "out")])
    options = launch_options(args, config_from_args(args))
    assert str((tmp_path / "out" / FILENAME).resolve()) in options["blocked_paths"]
    assert str((tmp_path / "out").resolve()) in options["allowed_paths"]


def test_the_list_shows_its_first_lines_and_counts_the_rest():
    from diffusers_helper.app.queue_panel import MAX_LINES, Entry, render

    entries = [Entry(f"q{n}", n, "waiting", False, "", "FramePack · 5 s", None, "waiting") for n in range(1, 61)]
    table = render(entries)
    assert table.count('class="fp-queue-job"') == MAX_LINES and f"and {60 - MAX_LINES} more" in table
    assert "<script" not in render([Entry("q1", 1, "waiting", True, "<script>x</script>", "", None, "waiting")])


def test_a_damaged_queue_file_is_a_message_and_the_page_still_works(tmp_path, tiny_sources, images):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / FILENAME).write_bytes(b"this is not a database, it was overwritten by mistake" * 100)
    page = Page(AppConfig(outputs=outputs, sources=tiny_sources, device="cpu"))  # starts anyway
    try:
        panel = QueuePanel(page, Form(FORM_FIELDS, settings_from_form, load_start_image))
        assert "move it away" in panel.view(ANN)[0] and page.interrupted_at_start == []
        with pytest.raises(gr.Error, match="move it away"):
            panel.add(images[0], form_values(SMALL), batch(), ANN)
    finally:
        page.jobs.close()
        page.snapshots.close()
