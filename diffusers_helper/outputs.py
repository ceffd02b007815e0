"""A job's files on disk: their names, the one way they are written, the running lock, cleanup, listing.

Every job is named by its final video, `<folder>/<NAME>.mp4`; everything else it writes is named
from that (`OutputPaths`). Every file is written under a hidden temporary name beside its target
and moved into place only when complete (`atomic_write`), so no file is ever half-written, and a
new file never replaces an existing one. A job being generated holds an operating-system lock
beside its video (`hold`), so other windows and commands sharing the folder see it as running.
`remove_stale_files` removes what a killed job left; `list_outputs` reads the folder back for the
page.

Importing this module does no work.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import json
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# Suffixes of a job's hidden temporaries (see atomic_write and the video writer's segment files).
_TEMP_SUFFIXES = (".tmp", ".part", ".mp4")
_PARTIAL = re.compile(r"\.part(\d{3})\.mp4$")
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{3}(_\d+)?$")


# ---------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class OutputPaths:
    """Every file a job writes, derived from the final video's path."""

    video: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "video", Path(self.video))

    @property
    def folder(self) -> Path:
        """The folder the job writes into."""
        return self.video.parent

    @property
    def name(self) -> str:
        """The job's name: the video's file name without `.mp4`."""
        return self.video.name[: -len(self.video.suffix)] if self.video.suffix else self.video.name

    @property
    def stem(self) -> Path:
        """The video's path without its suffix."""
        return self.video.with_suffix("")

    @property
    def input_image(self) -> Path:
        """The start image as the model saw it (resized and cropped)."""
        return Path(f"{self.stem}.png")

    @property
    def sidecar(self) -> Path:
        """The JSON record of the job's settings, sources and status."""
        return Path(f"{self.stem}.json")

    @property
    def latents(self) -> Path:
        """The latents of the video so far."""
        return Path(f"{self.stem}.latents.safetensors")

    @property
    def end_image(self) -> Path:
        """The end image as the model saw it (resized and cropped to the start image's bucket)."""
        return Path(f"{self.stem}.end.png")

    def keyframe(self, number: int) -> Path:
        """The `number`-th keyframe (1-based, in time order) as the model saw it."""
        return Path(f"{self.stem}.keyframe{number}.png")

    def image_copies(self, settings) -> list[Path]:
        """The copies of the end image and keyframes a job with these settings writes beside its video."""
        return ([self.end_image] if settings.end_image else []) + [
            self.keyframe(n) for n in range(1, len(settings.keyframes) + 1)]

    @property
    def lock(self) -> Path:
        """The lock file a process holds while it generates the job."""
        return self.folder / f".{self.name}.lock"

    @property
    def work_prefix(self) -> str:
        """The name prefix of the video writer's hidden folder of encoded segments."""
        return f".{self.name}.segments-"

    def partial(self, section: int) -> Path:
        """The playable video of everything up to 1-based section `section`."""
        return Path(f"{self.stem}.part{section:03d}.mp4")

    def partials(self) -> list[Path]:
        """The job's partial videos on disk, oldest section first."""
        return sorted(self.folder.glob(f"{glob.escape(self.name)}.part[0-9][0-9][0-9].mp4"))

    def replay_scratch(self, section: int) -> Path:
        """A hidden throwaway video written while a resumed job rebuilds section `section`."""
        return self.folder / f".{self.name}.replay{section:03d}.mp4"

    def finished_files(self) -> list[Path]:
        """The files a finished job keeps."""
        return [self.video, self.input_image, self.sidecar, self.latents]

    def existing(self) -> list[Path]:
        """The paths of this job that already exist (a job never overwrites them)."""
        return [p for p in self.finished_files() if p.exists()]


class OutputNamer:
    """Fresh output paths named by local time (to the millisecond), with a counter if that is taken."""

    def __init__(self, folder: Path, clock: Callable[[], datetime] = datetime.now):
        self.folder = Path(folder)
        self._clock = clock
        self._lock = threading.Lock()
        self._given: set[str] = set()

    def next(self) -> Path:
        """A new `<folder>/<YYYY-MM-DD_HH-MM-SS-mmm>[_N].mp4` that no file of a job uses yet."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = self._clock().strftime("%Y-%m-%d_%H-%M-%S-%f")[:-3]
            for n in itertools.count(1):
                stem = stamp if n == 1 else f"{stamp}_{n}"
                if stem not in self._given and not any(self.folder.glob(f"{glob.escape(stem)}.*")):
                    self._given.add(stem)
                    return self.folder / f"{stem}.mp4"
            raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Writing


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))


def _temporary_beside(path: Path, directory: bool) -> Path:
    """Create (exclusively) an empty hidden file or folder beside `path` and return its name."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            if directory:
                tmp.mkdir()
            else:
                # plain open (not mkstemp) so the final file gets the usual umask-derived permissions
                with open(tmp, "xb"):
                    pass
            return tmp
        except FileExistsError:
            continue
    raise _exists_error(path)


def publish(src: Path, dst: Path) -> None:
    """Move the finished file `src` to `dst` atomically, never replacing an existing file."""
    try:
        os.link(src, dst)  # fails with FileExistsError instead of replacing
    except FileExistsError:
        raise _exists_error(dst) from None
    except OSError:
        # Filesystems without hard links: a rename, guarded by an existence check. On Windows the
        # rename itself refuses to replace; on POSIX the window between check and rename is tiny.
        if dst.exists():
            raise _exists_error(dst) from None
        os.rename(src, dst)
        return
    Path(src).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path | str, *, replace: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` to write to; on success move it to `path`.

    A new file never replaces an existing one (FileExistsError), unless `replace` is set: that is
    for a job's own files that it rewrites as it goes (its sidecar, its latents), which then change
    in one step. With `directory`, the temporary is a folder (published by rename). On any error,
    or when nothing was written, the temporary is removed and `path` is as it was.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise _exists_error(path)
    tmp = _temporary_beside(path, directory)
    try:
        yield tmp
        if directory:
            if path.exists():
                raise _exists_error(path)
            os.rename(tmp, path)
        elif tmp.stat().st_size == 0:
            raise RuntimeError(f"nothing was written for {path}")
        elif replace:
            os.replace(tmp, path)
        else:
            publish(tmp, path)
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    """Write (or rewrite) a job's JSON record in one step."""
    with atomic_write(path, replace=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Which jobs are running: an operating-system file lock per job


class JobBusy(ValueError):
    """The job is being generated by a process right now; the message says so."""


def busy_message(video: Path | str) -> str:
    """What to tell a user who asks to resume or clean up a job that is running."""
    return (f"{Path(video).name} is being generated right now (by this or another FramePack window or "
            "command); wait for it to finish or press End there first.")


@contextlib.contextmanager
def hold(video: Path | str) -> Iterator[None]:
    """Mark the job of `video` as running for the duration of the block; JobBusy when it already is.

    Two app windows, or the app and the command line, can share one outputs folder. The lock (a
    `filelock` on `.NAME.lock`: flock on POSIX, msvcrt locking on Windows) belongs to the open
    file, so another process and a probe from this one both see the job as busy, and the operating
    system drops it when the process ends however it ends, so a killed job can be resumed at once.
    """
    from filelock import FileLock, Timeout

    path = OutputPaths(video).lock
    lock = FileLock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise JobBusy(busy_message(video)) from None
    try:
        yield
    finally:
        lock.release()
        # filelock leaves the file in place; a finished job leaves nothing behind
        with contextlib.suppress(OSError):
            path.unlink()


def is_running(video: Path | str) -> bool:
    """Whether some process (this one included) is generating the job of `video` now."""
    from filelock import FileLock, Timeout

    path = OutputPaths(video).lock
    if not path.exists():  # no lock file: nobody is running it (and the probe must not create one)
        return False
    lock = FileLock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return True
    except OSError:  # the file vanished between the check and the probe: the job just ended
        return False
    lock.release()
    return False


# ---------------------------------------------------------------------------------------------
# Cleaning up after a killed job


def remove_stale_files(output: Path, *, keep_latest_partial: bool = True) -> list[Path]:
    """Remove what a killed job left beside its files: hidden temporaries, the video writer's work
    folder and superseded partial videos.

    A job writes every file under a hidden temporary name and renames it into place, so a process
    killed mid-write leaves such a temporary (possibly short or empty) and, between two sections,
    two partial videos. Finished files (the sidecar, start image, latents, the newest partial) are
    kept unless `keep_latest_partial` is False (after the resumed job finished). A job that a
    process is generating right now is left alone: JobBusy.
    """
    paths = OutputPaths(output)
    if is_running(paths.video):  # its temporaries are live files of a job being generated
        raise JobBusy(busy_message(paths.video))
    hidden = f".{glob.escape(paths.name)}."
    removed: list[Path] = []
    temporaries = [p for p in paths.folder.glob(f"{hidden}*") if p.name.endswith(_TEMP_SUFFIXES)]
    partials = paths.partials()
    if keep_latest_partial:
        partials = partials[:-1]
    for path in temporaries + partials:
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    # the video writer's folders of encoded sections (older versions named them after the first partial)
    for work in paths.folder.glob(f"{hidden}*segments-*"):
        if work.is_dir() and not work.is_symlink():
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


# ---------------------------------------------------------------------------------------------
# Past outputs, read back from the outputs folder


def extends_anchored(record: dict[str, Any]) -> bool:
    """Whether a job's record says it extends another video from that video's frames (extend.py's anchored way):
    its latents file starts from encoded frames, so it is extended again rather than resumed."""
    return (record.get("extends") or {}).get("mode") == "anchored"


@dataclass(frozen=True)
class PastOutput:
    """One job's files in the outputs folder, described by its JSON sidecar."""

    stem: str
    sidecar: Path
    video: Optional[Path]
    input_image: Optional[Path]
    status: str
    model: str
    settings: dict = field(default_factory=dict, compare=False)
    record: dict = field(default_factory=dict, compare=False, repr=False)
    latents: Optional[Path] = None
    running: bool = False  # a process (this one or another) is generating it now

    @property
    def resumable(self) -> bool:
        """Whether the job stopped early (ended, failed or killed) with finished sections to continue from."""
        finished = self.video is not None and self.video.name == f"{self.stem}.mp4"
        # an extension made from another video's frames is extended again instead (pipeline.load_resume_state)
        return (self.status != "finished" and not finished and self.latents is not None and not self.running
                and not extends_anchored(self.record))

    @property
    def interrupted(self) -> bool:
        """Whether the job's process was killed mid-job (its record still says running) and it can resume."""
        return self.resumable and self.status == "running"

    @property
    def label(self) -> str:
        """One line for a list: time, model, state, the start of the prompt."""
        return self.describe()

    def describe(self, running: bool = False) -> str:
        """The label; `running` says the job is being generated now (else a 'running' sidecar means it was interrupted)."""
        from .variants import display_name

        when = self.stem
        if _STAMP.match(self.stem):
            date, clock = self.stem.split("_", 1)
            when = f"{date} {clock[:8].replace('-', ':')}{clock[12:].replace('_', ' #')}"
        prompt = " ".join(str(self.settings.get("prompt", "")).split())
        if len(prompt) > 48:
            prompt = prompt[:47] + "…"
        if self.status == "finished":
            state = ""
        elif running or self.running:
            state = " [running]"
        else:
            kind = "interrupted" if self.status == "running" else self.status
            parts = ["partial"] if self.video else []
            parts += [kind] + (["can resume"] if self.resumable else [])
            state = f" [{', '.join(dict.fromkeys(parts))}]"
        return f"{when} · {display_name(self.model)}{state} · {prompt or '(no prompt)'}"


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every link followed, lies in `folder` (a link pointing outside does not)."""
    try:
        return path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        return False


def read_output(sidecar: Path) -> Optional[PastOutput]:
    """The PastOutput of a sidecar, or None when it is not one of ours or unreadable."""
    sidecar = Path(sidecar)
    folder = sidecar.parent

    def ours(path: Path) -> bool:
        # only plain files of this folder: a link pointing elsewhere is never read or shown
        return path.is_file() and _inside(path, folder)

    if not ours(sidecar):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return None
    paths = OutputPaths(folder / f"{sidecar.name[: -len('.json')]}.mp4")
    video: Optional[Path] = paths.video
    if not ours(paths.video):
        # An ended or interrupted job keeps its last partial video.
        parts = [p for p in paths.partials() if ours(p)]
        video = parts[-1] if parts else None
    return PastOutput(
        stem=paths.name, sidecar=sidecar, video=video,
        input_image=paths.input_image if ours(paths.input_image) else None,
        status=str(record.get("status", "unknown")), model=str(record.get("model", record["settings"].get("model", ""))),
        settings=dict(record["settings"]), record=record, latents=paths.latents if ours(paths.latents) else None,
        running=record.get("status") == "running" and is_running(paths.video),
    )


def list_outputs(folder: Path, limit: int = 200) -> list[PastOutput]:
    """The jobs in `folder`, newest first (timestamp names in reverse order, then others by age)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    sidecars = [p for p in folder.glob("*.json") if not p.name.startswith(".")]

    def key(path: Path) -> tuple:
        stem = path.name[: -len(".json")]
        if _STAMP.match(stem):
            date = stem[:23]
            suffix = int(stem[24:]) if len(stem) > 23 else 1
            return (1, date, suffix)
        try:
            return (0, path.stat().st_mtime, 0)
        except OSError:
            return (0, 0.0, 0)

    found = []
    for sidecar in sorted(sidecars, key=key, reverse=True):
        item = read_output(sidecar)
        if item is not None:
            found.append(item)
            if len(found) >= limit:
                break
    return found


def read_record(sidecar: Path) -> dict[str, Any]:
    """A job's JSON record; ValueError when it is unreadable."""
    try:
        record = json.loads(Path(sidecar).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{Path(sidecar).name} can't be read ({exc}).") from None
    if not isinstance(record, dict):
        raise ValueError(f"{Path(sidecar).name} is not a job record.")
    return record
