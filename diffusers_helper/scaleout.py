"""Scale-out on Ray: the queue's jobs run on long-lived Ray actors, one per GPU (or per N CPU cores).

    cluster = RayCluster(ClusterOptions("local", workers=2), WorkerConfig.of(runtime), outputs)
    queue = JobQueue(cluster.runners(), store=JobStore(outputs), ...)   # one slot per actor

The submitting process keeps the queue (the outputs folder's SQLite file, `jobstore`): each
`RayRunner` is one slot of the `JobQueue`, bound to one actor. The slot takes a job from the file
(the file records the actor in the job's `worker`), names its output with the app's naming, and
asks its actor to run it; the actor's events stream back (a Ray streaming generator) into the
job's event stream, as a local job's do, so the page and the CLI follow it the same way.

Each actor (`Worker`) opens its own `Runtime` once and keeps its models while consecutive jobs use
the same model, with the memory modes of a single process. It writes the job's files straight
into the outputs folder when it can see that folder (a local cluster, a network drive mounted at
the same path: `Worker.shares` checks a marker the submitter writes), or else into a scratch
folder of its own, sending each file back to the submitter as it is finished (after each section
and at the end), so that either way the outputs are the same files with the same names as a
single process writes. A job continued on another worker gets the files written so far sent
along when the folder is not shared.

A worker that dies (its process killed, its node gone) ends its job's stream with a Ray actor
error: the slot raises `WorkerLost`, the queue marks the job interrupted and some slot takes it
first, continuing from the last finished section (the latents and partial video already
written). The slot starts a new actor before it takes another job.

Ray is an optional dependency: without it, `import_ray` says what to install. Importing this
module does no work and does not import Ray.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .events import Event
from .jobs import TERMINAL, FramePackRunner, Job, JobRequest, WorkerLost, feed, finished_event
from .jobstore import named_images, with_copies
from .outputs import OutputNamer, OutputPaths, atomic_write

RAY_MISSING = ("Ray is not installed: install it with `pip install .[ray]` (or `pip install -r requirements-ray.txt`) "
               "to run jobs with --ray.")
# How long a slot waits for a new actor to be placed and to start before trying again (seconds).
READY_TIMEOUT_S = 600.0
# How often the slot checks the job's cancel token while its actor runs it (seconds).
CANCEL_POLL_S = 0.2


def import_ray():
    """The `ray` module, or a ValueError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class ClusterOptions:
    """Where the workers run: `address` "local" (a Ray cluster started on this machine) or a cluster's
    address; `workers` actors (None: one per `gpus_per_worker` GPUs of the cluster, or one with every
    CPU when it has no GPU); `cpus_per_worker` CPU cores of each actor when the cluster has no GPU."""

    address: str = "local"
    workers: Optional[int] = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: Optional[int] = None

    def __post_init__(self) -> None:
        if not str(self.address).strip():
            raise ValueError("--ray needs an address: local, or the address of a Ray cluster (host:port or ray://...).")
        if self.workers is not None and not 1 <= self.workers <= 1024:
            raise ValueError(f"--workers must be between 1 and 1024, not {self.workers}.")
        if not 0 < self.gpus_per_worker <= 64:
            raise ValueError(f"--gpus-per-worker must be above 0 (at most 64), not {self.gpus_per_worker:g}.")
        if self.cpus_per_worker is not None and not 1 <= self.cpus_per_worker <= 1024:
            raise ValueError(f"--cpus-per-worker must be between 1 and 1024, not {self.cpus_per_worker}.")


@dataclass(frozen=True)
class WorkerConfig:
    """What an actor needs to open its own Runtime: the model sources and the runtime's choices (as given:
    each worker resolves `auto` on its own machine)."""

    sources: Any
    device: str = "auto"
    vram: str = "auto"
    attention: str = "auto"
    compile: bool = False
    lora_dir: Optional[str] = None

    @classmethod
    def of(cls, runtime, *, device: str = "auto", vram: Optional[str] = None, attention: str = "auto",
           compile: Optional[bool] = None) -> "WorkerConfig":
        """The config of workers that run jobs like `runtime` does: its sources (resolved here, once, local
        folders made absolute: a worker may start in another folder) and LoRA folder, with the runtime flags."""
        return cls(_absolute(runtime.sources()), device=device, vram=vram or runtime.vram, attention=attention,
                   compile=runtime.compile if compile is None else bool(compile),
                   lora_dir=str(Path(runtime.lora_dir).resolve()) if runtime.lora_dir else None)


def _absolute(sources):
    """Model sources with the local paths among them made absolute (hub repo ids stay as they are)."""
    def absolute(source):
        return str(Path(source).resolve()) if source and Path(source).exists() else source

    return dataclasses.replace(sources, hunyuan=absolute(sources.hunyuan), siglip=absolute(sources.siglip),
                               vae=absolute(sources.vae),
                               transformers={k: absolute(v) for k, v in sources.transformers.items()})


@dataclass
class JobSpec:
    """One job for an actor: what `FramePackRunner` needs, with the files it reads carried along."""

    key: str
    settings: Any  # GenerationSettings
    image: Any  # the start image (RGB uint8) or None
    output_name: str  # NAME.mp4: the final video's file name
    folder: Optional[str]  # the shared outputs folder; None: write into the worker's scratch folder
    resume: bool = False  # continue the output's unfinished job (its files are in `folder` or in `files`)
    extend: Any = None  # an extend.Extension (its video must be reachable from the worker)
    files: dict = field(default_factory=dict)  # not shared: the output's files so far, by name
    images: dict = field(default_factory=dict)  # the end image and keyframes: role -> (suffix, bytes)


@dataclass(frozen=True)
class Renamed:
    """From a worker: the job writes NAME.mp4 under another name than the one it was given (what an earlier
    attempt left there could not be continued, so it started afresh beside it)."""

    name: str


@dataclass(frozen=True)
class FilesBack:
    """From a worker that does not share the outputs folder: the job's name (NAME of NAME.mp4), its files
    that changed (name -> bytes) and the names of all of them now (the others were removed there:
    superseded partial videos)."""

    name: str
    changed: dict
    present: tuple


# ---------------------------------------------------------------------------------------------
# The actor


class Worker:
    """A Ray actor's object: one Runtime (models loaded once, kept while jobs use them) and its jobs.

    Threaded (two calls at once), so `cancel` reaches a job while `run` streams it.
    """

    def __init__(self, config: WorkerConfig, threads: Optional[int] = None):
        import torch

        from .runtime import Runtime

        if threads:
            torch.set_num_threads(int(threads))
        self.config = config
        self.runtime = Runtime(config.sources, device=config.device, vram=config.vram, attention=config.attention,
                               compile=config.compile, lora_dir=config.lora_dir)
        self.label = _label()
        self.runtime.worker = dict(self.label)  # each sidecar says where its job ran
        self.scratch = Path(tempfile.mkdtemp(prefix="framepack-ray-"))
        self._jobs: dict[str, Any] = {}

    def describe(self) -> dict:
        """Where this actor runs: Ray node id, actor id, host name, process id, device."""
        return {**self.label, "device": str(self.runtime.device)}

    def shares(self, folder: str, marker: str, token: str) -> bool:
        """Whether `folder` here is the submitter's outputs folder (its marker file holds `token`)."""
        try:
            return (Path(folder) / marker).read_text(encoding="utf-8") == token
        except OSError:
            return False

    def cancel(self, key: str) -> None:
        """Stop job `key` at its next sampling step."""
        job = self._jobs.get(key)
        if job is not None:
            job.cancel()

    def run(self, spec: JobSpec) -> Iterator[Any]:
        """Run one job; yields its events (and, when the folder is not shared, FilesBack before each section's
        and the last event)."""
        from .events import SectionDone

        work = Path(tempfile.mkdtemp(prefix="job-", dir=self.scratch))  # never in the outputs folder
        folder = Path(spec.folder) if spec.folder else self._scratch_for(spec, work)
        settings = self._local_images(spec, work)
        output = folder / spec.output_name
        request = JobRequest(settings, spec.image, output if spec.resume else None, extend=spec.extend)
        # with its output named, the runner continues what an earlier attempt left there (or starts it)
        job = Job(spec.key, request, None, output=output)
        self._jobs[spec.key] = job
        sent: dict[str, tuple] = {}
        thread = threading.Thread(target=feed, args=(job, FramePackRunner(self.runtime, folder)),
                                  name="framepack-ray-job", daemon=True)
        thread.start()
        named = output.name
        try:
            for event in job.events():
                if job.output is not None and job.output.name != named:
                    named = job.output.name
                    yield Renamed(named)
                if isinstance(event, TERMINAL):
                    thread.join()  # the job's files and its lock are settled before its end is told
                if spec.folder is None and isinstance(event, (SectionDone, *TERMINAL)):
                    yield _files_back(job.output or output, sent)  # the output the runner settled on
                yield event
        finally:
            job.cancel()
            thread.join()
            self._jobs.pop(spec.key, None)
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _scratch_for(spec: JobSpec, work: Path) -> Path:
        """The job's folder when the outputs folder is not shared, holding the files it continues."""
        folder = work / "outputs"
        folder.mkdir()
        for name, data in spec.files.items():
            (folder / Path(name).name).write_bytes(data)
        return folder

    @staticmethod
    def _local_images(spec: JobSpec, work: Path):
        """The job's settings with its end image and keyframes read from copies written here."""
        if not spec.images:
            return spec.settings
        inputs = work / "inputs"
        inputs.mkdir()

        def copy(role: str) -> str:
            suffix, data = spec.images[role]
            path = inputs / f"{role}{suffix}"
            path.write_bytes(data)
            return str(path)

        return with_copies(spec.settings, copy)


def _label() -> dict:
    """This actor's Ray node id and actor id (and host and process, to find it)."""
    import ray

    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "actor": context.get_actor_id(), "host": socket.gethostname(),
            "pid": os.getpid()}


def _output_files(output: Path) -> dict[str, Path]:
    """A job's visible files (NAME.*), by name; hidden temporaries and the lock are not among them."""
    paths = OutputPaths(output)
    prefix = f"{paths.name}."
    if not paths.folder.is_dir():
        return {}
    return {p.name: p for p in paths.folder.iterdir() if p.name.startswith(prefix) and p.is_file()}


def _files_back(output: Path, sent: dict[str, tuple]) -> FilesBack:
    """The files of `output` that changed since the last call (`sent`: name -> (size, mtime))."""
    changed, present = {}, []
    for name, path in _output_files(output).items():
        try:  # the job goes on meanwhile: a superseded partial video may be removed under us
            stat = path.stat()
            mark = (stat.st_size, stat.st_mtime_ns)
            if sent.get(name) != mark:
                changed[name] = path.read_bytes()
                sent[name] = mark
        except FileNotFoundError:
            continue
        present.append(name)
    return FilesBack(OutputPaths(output).name, changed, tuple(sorted(present)))


# ---------------------------------------------------------------------------------------------
# The submitter's side


class RayCluster:
    """A Ray cluster joined (or started, for "local") and its long-lived actors, one per slot."""

    MARKER = ".framepack-ray-share-"  # + a random token: each check has its own marker file

    def __init__(self, options: ClusterOptions, config: WorkerConfig, outputs: Path | str, *,
                 stream: Optional[bool] = None):
        self.ray = import_ray()
        self.options = options
        self.config = config
        self.outputs = Path(outputs).resolve()
        self.namer = OutputNamer(self.outputs)
        self._stream = stream  # None: share the folder when the worker sees it; True: always send files back
        self._started = False
        self._connect()
        try:
            self.workers, self.resources = self._plan()
        except ValueError:
            self.close()  # a cluster started here for nothing is stopped again
            raise
        self._runners = [RayRunner(self, index) for index in range(self.workers)]

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        package = str(Path(__file__).resolve().parent.parent)
        # the workers import this package as the submitter does (a checkout run with -m, or an install)
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH")) if p)}}
        try:
            if self.options.address == "local":
                ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env, configure_logging=False)
            else:
                ray.init(address=self.options.address, log_to_driver=False, runtime_env=env, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"Can't reach the Ray cluster at {self.options.address}: {exc}") from None
        self._started = True

    def _plan(self) -> tuple[int, dict]:
        """How many actors, and what each asks Ray for (GPUs when the cluster has them, else CPU cores)."""
        total = self.ray.cluster_resources()
        gpus, cpus = float(total.get("GPU", 0)), int(total.get("CPU", 1))
        o = self.options
        if gpus >= o.gpus_per_worker:
            workers = o.workers or max(1, int(gpus // o.gpus_per_worker))
            if workers * o.gpus_per_worker > gpus:
                raise ValueError(f"{workers} workers with {o.gpus_per_worker:g} GPU each need "
                                 f"{workers * o.gpus_per_worker:g} GPUs; the Ray cluster has {gpus:g}.")
            return workers, {"num_gpus": o.gpus_per_worker, "num_cpus": 1}
        workers = o.workers or 1
        per = o.cpus_per_worker or max(1, cpus // workers)
        if workers * per > cpus:
            raise ValueError(f"{workers} workers with {per} CPU cores each need {workers * per}; the Ray cluster "
                             f"has {cpus} (and no GPU).")
        return workers, {"num_cpus": per}

    def runners(self) -> list["RayRunner"]:
        """One slot per actor, for JobQueue."""
        return list(self._runners)

    def start_actor(self):
        """A new actor (placed by Ray wherever its resources are free)."""
        remote = self.ray.remote(max_concurrency=2, **self.resources)(Worker)
        threads = None if "num_gpus" in self.resources else self.resources["num_cpus"]
        return remote.remote(self.config, threads)

    def shared(self, actor) -> bool:
        """Whether `actor` writes into the outputs folder itself (it sees it), else files come back."""
        if self._stream:
            return False
        token = secrets.token_hex(8)
        marker = self.outputs / f"{self.MARKER}{token}"
        try:
            self.outputs.mkdir(parents=True, exist_ok=True)
            marker.write_text(token, encoding="utf-8")
            return bool(self.ray.get(actor.shares.remote(str(self.outputs), marker.name, token)))
        finally:
            marker.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop every actor (their jobs stop where they are) and leave the cluster (stopping it if started here)."""
        for runner in getattr(self, "_runners", ()):
            runner.stop()
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False


class RayRunner:
    """One slot of the queue: runs each job it is given on its actor and streams the events back."""

    def __init__(self, cluster: RayCluster, index: int):
        self.cluster = cluster
        self.index = index
        self.actor = None
        self.where: dict = {}
        self.shared = False
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        """Which actor this slot runs jobs on (recorded as the job's worker in the queue file)."""
        if not self.where:
            return f"ray worker {self.index + 1}"
        return f"ray worker {self.index + 1} node={self.where.get('node')} actor={self.where.get('actor')}"

    def wait_ready(self) -> None:
        """Have a live actor before taking a job: start one when there is none (the first, or after one died)."""
        ray = self.cluster.ray
        with self._lock:
            if self.actor is None:
                self.actor = self.cluster.start_actor()
                try:
                    self.where = ray.get(self.actor.describe.remote(), timeout=READY_TIMEOUT_S)
                    self.shared = self.cluster.shared(self.actor)
                except Exception:
                    self.actor, self.where = None, {}
                    raise

    def stop(self) -> None:
        """Kill this slot's actor."""
        with self._lock:
            if self.actor is not None:
                try:
                    self.cluster.ray.kill(self.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                self.actor = None

    def __call__(self, job) -> Iterator[Event]:
        """Run `job` on the actor: name its output here, send it, yield its events (WorkerLost if the actor dies)."""
        ray = self.cluster.ray
        self.wait_ready()
        request = job.request
        if request.resume is None and job.output is None:
            job.bind_output(self.cluster.namer.next())  # named here: the app's naming, one namer for all workers
        output = Path(request.resume if request.resume is not None else job.output)
        if request.resume is None and output.exists():
            yield finished_event(output)  # an earlier attempt put it in place just before its process ended
            return
        spec = JobSpec(key=f"{job.id}-{secrets.token_hex(3)}", settings=request.settings, image=request.image,
                       output_name=output.name, folder=str(output.parent) if self.shared else None,
                       resume=request.resume is not None, extend=request.extend,
                       images=_image_copies(request.settings))
        if not self.shared:
            if request.extend is not None:
                raise ValueError("Extending a video on a Ray worker needs the outputs folder shared with the workers "
                                 "(a network drive at the same path).")
            # what an earlier attempt (on a worker that died, or before a restart) finished goes along
            spec.files = {name: path.read_bytes() for name, path in _output_files(output).items()}
        actor = self.actor
        stop_watching = _watch_cancel(job, lambda: actor.cancel.remote(spec.key))
        try:
            for ref in actor.run.options(num_returns="streaming").remote(spec):
                item = ray.get(ref)
                if isinstance(item, Renamed):
                    output = output.parent / item.name
                    job.bind_output(output)  # the queue file follows: the job's video is this one now
                    continue
                if isinstance(item, FilesBack):
                    _receive(output.parent / f"{item.name}.mp4", item)
                    continue
                yield _here(item, output.parent)
        except ray.exceptions.RayActorError as exc:
            with self._lock:
                self.actor = None  # a new one before the next job
            raise WorkerLost(f"{self.label} stopped while running the job ({type(exc).__name__})") from None
        finally:
            stop_watching()


def _image_copies(settings) -> dict:
    """The end image's and keyframes' bytes, by role, to send with a job."""
    copies = {}
    for role, path in named_images(settings):
        try:
            copies[role] = (Path(path).suffix.lower() or ".png", Path(path).read_bytes())
        except OSError as exc:
            raise ValueError(f"The {role} image {path} can't be read ({exc.strerror or exc}).") from None
    return copies


def _receive(output: Path, files: FilesBack) -> None:
    """Put the files a worker sent back in place (each in one step) and remove the ones it removed."""
    folder = output.parent
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.changed.items():
        with atomic_write(folder / Path(name).name, replace=True) as tmp:
            tmp.write_bytes(data)
    for name, path in _output_files(output).items():
        if name not in files.present:
            path.unlink(missing_ok=True)


def _here(event: Event, folder: Path) -> Event:
    """An event whose file paths name the files in `folder` (a worker's scratch paths become the outputs')."""
    if not dataclasses.is_dataclass(event):
        return event
    changes = {f.name: folder / value.name for f in dataclasses.fields(event)
               if isinstance(value := getattr(event, f.name), Path) and value.parent != folder}
    return dataclasses.replace(event, **changes) if changes else event


def _watch_cancel(job, cancel) -> callable:
    """Call `cancel` once when the job's cancel token is set; returns the function that stops watching."""
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(CANCEL_POLL_S):
            if job.cancel_token.cancelled:
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - the actor is gone: its job stops anyway
                    pass
                return

    threading.Thread(target=watch, name="framepack-ray-cancel", daemon=True).start()
    return finished.set

