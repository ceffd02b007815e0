"""The page's Queue panel and batches: every job in line, and many jobs added at once.

**Add to queue** takes the form's settings with several images and/or prompts (one per line) and a
number of videos per input, and queues every combination (`batch.combinations`) in the outputs
folder's queue file: those jobs run after the pages' own jobs, keep running when the page is
closed, and continue after a crash or restart. The panel lists every job (its thumbnail, prompt,
state and place in the line); another user's jobs show neither their prompt nor their picture.
A job belongs to the logged-in user with `--auth`, else to the browser session. The owner can
move a waiting job up or down, remove it, retry it when it failed (or was cancelled or
interrupted), and stop it while it runs.

Each handler is a plain method of `QueuePanel`, so a test can call it alone.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import gradio as gr

from ..batch import SEED_MODES, combinations, prompts_from_lines
from ..jobs import JobRequest
from ..jobstore import StoredJob, thumbnail_png
from ..outputs import OutputPaths
from ..variants import display_name
from .views import with_endpoint_signature

# The Add to queue endpoint's inputs after the form's (`/add_to_queue`).
BATCH_FIELDS = ("batch_images", "batch_prompts", "batch_count", "batch_seeds")
SEED_LABELS = (("Fixed: every video uses the seed above", "fixed"),
               ("Consecutive: seed, seed + 1, … for each input", "consecutive"), ("Random", "random"))
MAX_PER_INPUT = 100
# How often an open page refreshes the list (seconds), and how many jobs it shows.
REFRESH_S = 2.0
MAX_LINES = 50
QUEUE_HELP = (
    "**Add to queue** queues one job for every image × prompt × video with the settings above (without "
    "images here, the start image above; without prompts, the prompt above). Queued jobs run after the jobs "
    "started with Start Generation, keep running when you close this page, and continue after a crash or a "
    "restart. Pick one of your jobs below to move, remove, retry or stop it.")


@dataclass(frozen=True)
class Viewer:
    """Who looks at the panel: the browser session, and the user the jobs belong to (the login, else the session)."""

    session: Optional[str]
    user: Optional[str]


def viewer_of(request: Optional[gr.Request]) -> Viewer:
    """The viewer of a request: with --auth the logged-in user owns the jobs, else the browser session."""
    session = getattr(request, "session_hash", None)
    return Viewer(session, getattr(request, "username", None) or session)


@dataclass(frozen=True)
class Form:
    """How the page reads its form: the fields' names in the endpoint's order, the settings from their values,
    and the start image (each raising gr.Error or ValueError for a user's mistake)."""

    fields: tuple[str, ...]
    settings: Callable[[dict], Any]
    start_image: Callable[[Any], Any]


@dataclass(frozen=True)
class Entry:
    """One line of the panel."""

    key: str  # "q<id>" for a queued job, "p<id>" for a page's job
    position: Optional[int]
    state: str
    own: bool
    prompt: str
    detail: str
    thumbnail: Optional[bytes]
    status: str


class QueuePanel:
    """The panel's handlers over one page's job queue."""

    def __init__(self, page, form: Form):
        self.page = page
        self.form = form
        self._users: dict[str, str] = {}  # browser session -> its user, as seen by this panel
        self._thumbnails: dict[str, Optional[bytes]] = {}  # pages' jobs' thumbnails, by job id
        self._stored_thumbnails: dict[int, Optional[bytes]] = {}  # queued jobs' thumbnails (they never change), by row

    # -- adding ---------------------------------------------------------------------------------

    def add(self, image, values: dict[str, Any], batch: dict[str, Any], viewer: Viewer) -> tuple:
        """Queue every combination of the batch inputs with the form's settings; the panel's new view."""
        from ..conditioning import load_image
        from ..pipeline import check_images
        from .loras import check_page_loras

        try:
            settings = self.form.settings(values)
            count = _per_input(batch.get("batch_count"))
            seeds = batch.get("batch_seeds") or "consecutive"
            if seeds not in SEED_MODES:
                raise ValueError(f"batch_seeds must be one of {', '.join(SEED_MODES)}, not {seeds!r}.")
            prompts = prompts_from_lines(batch.get("batch_prompts"))
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid setting", print_exception=False) from None
        files = [f for f in (batch.get("batch_images") or []) if f]
        if settings.text_to_video:
            images = []
        elif files:
            try:
                images = [load_image(str(f)) for f in files]
            except ValueError as exc:
                raise gr.Error(str(exc), title="Not a usable image", print_exception=False) from None
        else:
            images = [self.form.start_image(image)]
        try:
            jobs = combinations(settings, images, prompts, count, seeds)
            check_images(settings, images[0] if images else None)  # the end image and keyframes
        except ValueError as exc:
            raise gr.Error(str(exc), title="Can't queue these jobs", print_exception=False) from None
        check_page_loras(self.page.runtime, settings, self.page.config.lora_dir)
        try:
            self.page.jobs.enqueue([JobRequest(job.settings, job.image) for job in jobs], owner=viewer.user)
        except ValueError as exc:  # the queue file can't be used, or an image copy can't be read
            raise gr.Error(str(exc), title="Can't queue these jobs", print_exception=False) from None
        gr.Info(f"Added {len(jobs)} job{'s' if len(jobs) != 1 else ''} to the queue.")
        return self.view(viewer)

    # -- the list -------------------------------------------------------------------------------

    def entries(self, viewer: Viewer) -> list[Entry]:
        """Every job in line: the running one, the pages' waiting jobs, the queue file's jobs (ended ones last)."""
        if viewer.session is not None and viewer.user is not None:
            self._users[viewer.session] = viewer.user
        jobs = self.page.jobs
        found: list[Entry] = []
        active = jobs.active()
        self._thumbnails = {job.id: self._thumbnails.get(job.id) or _thumbnail(job) for job in active}
        running_jobs = jobs.running_jobs()
        for job in active:
            own = job.owner is not None and self._users.get(job.owner, job.owner) == viewer.user
            running = job in running_jobs
            found.append(_page_entry(job, own, running, None if running else jobs.position(job),
                                     self._thumbnails[job.id]))
        waiting = sum(1 for entry in found if entry.state == "waiting")
        rows = jobs.queued()
        known = self._stored_thumbnails
        self._stored_thumbnails = {row.id: known[row.id] for row in rows if row.id in known}
        for row in rows:
            own = row.owner is not None and row.owner == viewer.user
            position = None
            if row.state in ("waiting", "interrupted") and row.pool == "app":
                waiting += 1
                position = waiting
            found.append(self._stored_entry(row, own, position))
        return found

    def _stored_entry(self, row: StoredJob, own: bool, position: Optional[int]) -> Entry:
        settings = row.settings
        if row.state == "running":
            live = self.page.jobs.live(row.id)
            step = live.last_step if live is not None else None
            status = (f"section {step.section} of {step.sections}, step {step.step} of {step.steps}" if step
                      else f"{row.sections_done} of {_sections(row)} sections done")
            if row.pool != "app":
                status += " (by the batch command)"
            where = _worker_label(row.worker)
            if where:
                status += f" on {where}"
        elif row.state == "finished":
            status = f"finished: {row.output.name}" if row.output else "finished"
        elif row.state == "failed":
            status = f"failed: {row.message or 'see the console'}"
        elif row.state == "interrupted":
            status = "interrupted: continues from its last finished section"
        elif row.state == "waiting" and row.pool != "app":
            status = "waiting for the batch command"
        else:
            status = row.state
        detail = f"{display_name(settings.get('model', ''))} · {float(settings.get('seconds', 0)):g} s"
        if own:
            detail += f" · seed {settings.get('seed')}"
        thumbnail = None
        if own:
            if row.id not in self._stored_thumbnails:
                self._stored_thumbnails[row.id] = self.page.jobs.store.thumbnail(row.id)
            thumbnail = self._stored_thumbnails[row.id]
        if not own:  # another user's job: its state, not its progress, file or message
            status = "waiting for the batch command" if row.state == "waiting" and row.pool != "app" else row.state
        return Entry(f"q{row.id}", position, row.state, own, row.prompt if own else "", detail, thumbnail, status)

    def view(self, viewer: Viewer, shown: Optional[dict] = None) -> tuple:
        """(the list as HTML, the pick list's update, what the page shows now): the pick list lists the viewer's
        queued jobs. With `shown` (what the page showed), what did not change is not sent again."""
        entries = self.entries(viewer)
        problem = self.page.jobs.problem
        now = {"html": (f'<div class="fp-queue-problem">{html.escape(problem)}</div>' if problem else "")
                       + render(entries), "choices": [[_choice_label(e), e.key] for e in entries
                                                    if e.own and e.key.startswith("q")]}
        shown = shown if isinstance(shown, dict) else {}
        table = gr.skip() if shown.get("html") == now["html"] else now["html"]
        picker = (gr.skip() if shown.get("choices") == now["choices"]
                  else gr.update(choices=[tuple(choice) for choice in now["choices"]]))
        return table, picker, now

    def show(self, key: Optional[str], viewer: Viewer):
        """The video of a chosen job of the viewer's (final, else the latest partial), or None."""
        if not key:
            return None
        row = self._own(key, viewer)
        if row.output is None:
            return None
        paths = OutputPaths(row.output)
        if paths.video.is_file():
            return str(paths.video)
        partials = paths.partials()
        return str(partials[-1]) if partials else None

    # -- acting on one job ----------------------------------------------------------------------

    def act(self, action: str, key: Optional[str], viewer: Viewer) -> tuple:
        """Move up, move down, remove, retry or stop the viewer's chosen job; the panel's new view."""
        row = self._own(key, viewer)
        jobs = self.page.jobs
        if action in ("up", "down"):
            if row.state != "waiting" or not jobs.move(row.id, -1 if action == "up" else 1):
                gr.Info("Only a waiting job can move, and not past the end of the line.")
        elif action == "remove":
            if row.state == "running":
                raise gr.Error("That job is running: press Stop first.", print_exception=False)
            jobs.remove(row.id)
        elif action == "retry":
            if row.state not in ("failed", "cancelled", "interrupted"):
                raise gr.Error("Only a failed, cancelled or interrupted job can be retried.", print_exception=False)
            jobs.retry(row.id)
        elif action == "stop":
            if row.state != "running":
                raise gr.Error("That job is not running.", print_exception=False)
            if not jobs.stop(row.id):
                raise gr.Error("That job runs in another FramePack window or command; stop it there.",
                               print_exception=False)
        else:
            raise gr.Error(f"Unknown action {action!r}.", print_exception=False)
        return self.view(viewer)

    def _own(self, key: Optional[str], viewer: Viewer) -> StoredJob:
        """The queued job a pick names, when it is the viewer's; gr.Error otherwise."""
        if not key:
            raise gr.Error("Choose one of your jobs in the list first.", print_exception=False)
        try:
            stored_id = int(str(key).removeprefix("q"))
        except ValueError:
            raise gr.Error("Unknown job.", print_exception=False) from None
        row = self.page.jobs.store.get(stored_id) if self.page.jobs.store is not None else None
        if row is None:
            raise gr.Error("That job is no longer in the queue.", print_exception=False)
        if row.owner is None or row.owner != viewer.user:
            raise gr.Error("That job is not yours.", print_exception=False)
        return row


def _per_input(value: Any) -> int:
    """The number of videos per input (a whole number from 1 to MAX_PER_INPUT); ValueError otherwise."""
    if value in (None, ""):
        return 1
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Videos per input must be a whole number, not {value!r}.") from None
    if number != int(number) or not 1 <= number <= MAX_PER_INPUT:
        raise ValueError(f"Videos per input must be a whole number from 1 to {MAX_PER_INPUT}, not {value!r}.")
    return int(number)


def _sections(row: StoredJob) -> int:
    try:
        return row.generation_settings().sections
    except ValueError:
        return 0


def _thumbnail(job) -> Optional[bytes]:
    return thumbnail_png(job.request.image) if job.request.image is not None else None


def _page_entry(job, own: bool, running: bool, position: Optional[int], thumbnail: Optional[bytes]) -> Entry:
    """A page's job (Start Generation or Resume) as a line of the panel."""
    settings = job.request.settings
    step = job.last_step
    if running:
        status = (f"section {step.section} of {step.sections}, step {step.step} of {step.steps}" if step and own
                  else "running")
    else:
        status = "waiting (started on a page)"
    detail = f"{display_name(settings.model)} · {settings.seconds:g} s" + (f" · seed {settings.seed}" if own else "")
    return Entry(f"p{job.id}", position, "running" if running else "waiting", own,
                 settings.prompt if own else "", detail, thumbnail if own else None, status)


def _choice_label(entry: Entry) -> str:
    place = f"#{entry.position} · " if entry.position else ""
    prompt = " ".join(entry.prompt.split()) or "(no prompt)"
    return f"{place}{entry.state} · {prompt[:60]}"


def render(entries: Sequence[Entry]) -> str:
    """The panel's list as an HTML table (prompts escaped; pictures only of the viewer's own jobs), its first
    MAX_LINES lines."""
    if not entries:
        return '<div class="fp-queue" data-count="0">The queue is empty.</div>'
    rows = []
    for e in entries[:MAX_LINES]:
        picture = (f'<img alt="" src="data:image/png;base64,{base64.b64encode(e.thumbnail).decode()}" '
                   'style="max-height:48px;max-width:64px">' if e.thumbnail else "")
        prompt = html.escape(" ".join(e.prompt.split()) or "(no prompt)") if e.own else "<i>another user's job</i>"
        rows.append(
            f'<tr class="fp-queue-job" data-key="{e.key}" data-state="{e.state}" data-own="{int(e.own)}" '
            f'data-position="{e.position or 0}"><td>{e.position or ("now" if e.state == "running" else "")}</td>'
            f'<td>{picture}</td>'
            f'<td class="fp-queue-prompt">{prompt}</td><td>{html.escape(e.detail)}</td>'
            f'<td class="fp-queue-state">{html.escape(e.status)}</td></tr>')
    if len(entries) > MAX_LINES:
        rows.append(f'<tr><td></td><td></td><td colspan="3">… and {len(entries) - MAX_LINES} more</td></tr>')
    return (f'<table class="fp-queue" data-count="{len(entries)}" style="width:100%">'
            "<tr><th>#</th><th></th><th>Prompt</th><th>Settings</th><th>State</th></tr>" + "".join(rows) + "</table>")


# ---------------------------------------------------------------------------------------------
# Layout and wiring


def queue_controls(c: SimpleNamespace) -> None:
    """The Queue accordion: the batch inputs, Add to queue, the list and the actions on a chosen job."""
    with gr.Accordion("Queue and batches", open=False, elem_id="fp-queue"):
        gr.Markdown(QUEUE_HELP)
        with gr.Row():
            c.batch_images = gr.File(label="Images (one job each; empty: the start image above)", file_count="multiple",
                                     file_types=["image"], type="filepath", height=180, elem_id="fp-batch-images")
            with gr.Column():
                c.batch_prompts = gr.Textbox(label="Prompts, one per line (empty: the prompt above)", lines=4,
                                             elem_id="fp-batch-prompts")
                c.batch_count = gr.Number(label="Videos per input", value=1, precision=0, minimum=1,
                                          maximum=MAX_PER_INPUT, elem_id="fp-batch-count")
                c.batch_seeds = gr.Radio(label="Seeds", choices=list(SEED_LABELS), value="consecutive",
                                         elem_id="fp-batch-seeds")
        c.add_to_queue = gr.Button("Add to queue", elem_id="fp-add-to-queue")
        c.queue_table = gr.HTML(render([]), elem_id="fp-queue-table")
        with gr.Row(equal_height=True):
            c.queue_pick = gr.Dropdown(label="Your queued job", choices=[], value=None, scale=4,
                                       elem_id="fp-queue-pick")
            c.queue_buttons = {action: gr.Button(label, size="sm", scale=1, elem_id=f"fp-queue-{action}")
                               for action, label in (("up", "Move up"), ("down", "Move down"), ("remove", "Remove"),
                                                     ("retry", "Retry"), ("stop", "Stop"))}
        c.queue_video = gr.Video(label="Your chosen job's video", interactive=False, height=240,
                                 elem_id="fp-queue-video")
        c.queue_shown = gr.State(None)  # what the page shows, so that a refresh sends only what changed
        c.queue_timer = gr.Timer(REFRESH_S)


def add_handler(panel: QueuePanel):
    """`panel.add` as Gradio calls it: the image, the form's fields, the batch fields, then the request.

    The signature names the endpoint's parameters for API clients (each may be left out).
    """
    fields = panel.form.fields

    def call(*args):
        image, *values, request = args
        form, batch = values[: len(fields)], values[len(fields):]
        return panel.add(image, dict(zip(fields, form)), dict(zip(BATCH_FIELDS, batch)), viewer_of(request))

    return with_endpoint_signature(call, ("image", *fields, *BATCH_FIELDS))


def wire_queue(page, demo: gr.Blocks, c: SimpleNamespace, form: Form) -> QueuePanel:
    """Connect the panel: Add to queue (API /add_to_queue), the refresh, the actions (API /queue_<action>)."""
    panel = QueuePanel(page, form)
    listed = [c.queue_table, c.queue_pick, c.queue_shown]

    def refresh(shown, request: gr.Request):
        return panel.view(viewer_of(request), shown)

    c.add_to_queue.click(add_handler(panel), inputs=[c.image, *[c.form[n] for n in form.fields], c.batch_images,
                                                     c.batch_prompts, c.batch_count, c.batch_seeds],
                         outputs=listed, api_name="add_to_queue", concurrency_limit=None)
    c.queue_timer.tick(refresh, inputs=c.queue_shown, outputs=listed, api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
    demo.load(refresh, inputs=c.queue_shown, outputs=listed, api_visibility="private")
    for action, button in c.queue_buttons.items():
        def act(key, request: gr.Request, action=action):
            return panel.act(action, key, viewer_of(request))

        button.click(act, inputs=c.queue_pick, outputs=listed, api_name=f"queue_{action}", concurrency_limit=None)

    def show(key, request: gr.Request):
        return panel.show(key, viewer_of(request))

    c.queue_pick.change(show, inputs=c.queue_pick, outputs=c.queue_video, api_visibility="private")
    return panel


def _worker_label(worker: Optional[str]) -> str:
    """The Ray worker a running job is on, from its row's worker (`host|pid|start|token|label`); '' for a process."""
    parts = (worker or "").split("|", 4)
    return parts[4].split(" node=")[0] if len(parts) == 5 else ""
