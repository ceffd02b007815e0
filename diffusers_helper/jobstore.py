"""The persistent queue: one SQLite file in the outputs folder that survives crashes and restarts.

Each queued job is one row of `jobs` (its settings as JSON, its state, its place in the line, who
it belongs to, the output it writes) and its input images are rows of `images` (the start image as
PNG, byte-for-byte copies of the end image and keyframes, a thumbnail), each distinct image stored
once in `blobs` however many jobs of a batch use it. Every change is one SQLite
transaction, so a process killed at any moment leaves the queue as it was before or after the
change, never half-way. Several processes may share the file: a job is taken with one
`BEGIN IMMEDIATE` transaction that finds the first waiting row and marks it running, so two
workers never take the same job (`claim`). A row marked running by a process that no longer
exists is found by `recover` and becomes *interrupted*; the next worker takes it first.

The file is created by the first job queued, not before: a folder that never used the queue
holds no database. Importing this module does no work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .settings import GenerationSettings

FILENAME = "queue.sqlite3"
SCHEMA_VERSION = 1
STATES = ("waiting", "running", "finished", "failed", "cancelled", "interrupted")
ENDED = ("finished", "failed", "cancelled")
# Ended jobs kept in the list (with their thumbnails); older ones are forgotten (their videos stay).
KEEP_ENDED = 100
THUMBNAIL_SIZE = 96
# How long a write waits for another process's transaction before giving up (seconds).
BUSY_TIMEOUT_S = 30.0

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    position INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    pool TEXT NOT NULL,
    owner TEXT,
    settings TEXT NOT NULL,
    resume TEXT,
    output TEXT,
    worker TEXT,
    message TEXT,
    sections_done INTEGER NOT NULL DEFAULT 0,
    batch TEXT,
    batch_index INTEGER,
    created REAL NOT NULL,
    started REAL,
    ended REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_batch ON jobs (batch, batch_index) WHERE batch IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_line ON jobs (state, pool, position);
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    job INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    suffix TEXT NOT NULL,
    hash TEXT NOT NULL REFERENCES blobs (hash),
    PRIMARY KEY (job, role)
);
"""


@dataclass(frozen=True)
class NewJob:
    """A job to queue: its settings, its start image (RGB uint8, H×W×3; None for text-to-video), or the
    final video path of an unfinished job to continue (`resume`; its images are its own files)."""

    settings: GenerationSettings
    image: Optional[np.ndarray] = None
    resume: Optional[Path] = None


@dataclass(frozen=True)
class StoredJob:
    """One row of the queue."""

    id: int
    position: int
    state: str
    pool: str
    owner: Optional[str]
    settings: dict
    resume: Optional[Path]
    output: Optional[Path]
    worker: Optional[str]
    message: Optional[str]
    sections_done: int
    batch: Optional[str]
    batch_index: Optional[int]
    created: float
    started: Optional[float]
    ended: Optional[float]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "StoredJob":
        data = dict(row)
        data["settings"] = json.loads(data["settings"])
        for name in ("resume", "output"):
            data[name] = Path(data[name]) if data[name] else None
        return cls(**data)

    @property
    def prompt(self) -> str:
        """The job's prompt (empty when none)."""
        return str(self.settings.get("prompt") or "")

    def generation_settings(self) -> GenerationSettings:
        """The job's settings, validated again."""
        return GenerationSettings.from_dict(self.settings, ignore_unknown=True)


class QueueFileError(ValueError):
    """The queue file can't be used (another program's file, a newer version, damaged); the message says which."""


# ---------------------------------------------------------------------------------------------
# Which process is running a job


def process_identity() -> str:
    """`host|pid|start time` of this process: a running row names the process that runs it."""
    import psutil

    return f"{socket.gethostname()}|{os.getpid()}|{psutil.Process().create_time():.3f}"


def process_alive(identity: Optional[str]) -> bool:
    """Whether the process named by `identity` still runs (a process on another computer is assumed to)."""
    import psutil

    try:
        host, pid, started = (identity or "").split("|")[:3]
        pid, started_at = int(pid), float(started)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # a shared folder on another computer: its processes can't be seen from here
    try:
        process = psutil.Process(pid)
        # the same pid with another start time is a new process that reused the number
        return abs(process.create_time() - started_at) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


# ---------------------------------------------------------------------------------------------
# Images


def png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB image as PNG (lossless: it decodes to the very same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of a PNG written by `png_bytes`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGB")).copy()


def thumbnail_png(pixels: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small PNG of an image for the queue's list."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(pixels))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def named_images(settings: GenerationSettings) -> list[tuple[str, str]]:
    """The images a job's settings name besides its start image, by role: ("end", path), ("keyframe1", path), ..."""
    named = [("end", settings.end_image)] if settings.end_image else []
    return named + [(f"keyframe{n}", path) for n, (_, path) in enumerate(settings.keyframes, 1)]


def with_copies(settings: GenerationSettings, copy: Callable[[str], str]) -> GenerationSettings:
    """The settings with the end image and keyframes at the paths `copy(role)` returns (roles as in named_images)."""
    changes = {"keyframes": tuple((t, copy(f"keyframe{n}")) for n, (t, _) in enumerate(settings.keyframes, 1))}
    if settings.end_image:
        changes["end_image"] = copy("end")
    return settings.replace(**changes)


def _image_rows(job: NewJob, cache: dict) -> list[tuple[str, str, _Blob]]:
    """(role, suffix, blob) of a job's images: the start image, copies of its end image and keyframes, a
    thumbnail. `cache` holds what was encoded or read for the jobs before (a batch repeats its images), so
    each distinct image is encoded, read and hashed once."""
    if job.resume is not None:
        return []  # a resumed job reads its own saved copies
    rows = []
    if job.image is not None:
        key = ("pixels", id(job.image))
        if key not in cache:  # the array is kept in the entry, so its id is not reused meanwhile
            cache[key] = (job.image, _Blob.of(png_bytes(job.image)), _Blob.of(thumbnail_png(job.image)))
        _, start, thumb = cache[key]
        rows += [("start", ".png", start), ("thumb", ".png", thumb)]
    for role, path in named_images(job.settings):
        key = ("file", str(Path(path).resolve()))
        if key not in cache:
            try:
                cache[key] = _Blob.of(Path(path).read_bytes())
            except OSError as exc:
                raise ValueError(f"The {role} image {path} can't be read ({exc.strerror or exc}).") from None
        rows.append((role, Path(path).suffix.lower() or ".png", cache[key]))
    return rows


@dataclass(frozen=True)
class _Blob:
    """An image's bytes and their SHA-256, its key in the queue file."""

    data: bytes
    digest: str

    @classmethod
    def of(cls, data: bytes) -> "_Blob":
        return cls(data, hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------------------------------------
# The store


class JobStore:
    """The queue file of one outputs folder; it is created by the first job queued.

    One connection per store, used under a lock (the app's threads share it); other processes
    open their own. Every method is one transaction.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / FILENAME
        self._lock = threading.RLock()
        self._conn: Optional[sqlite3.Connection] = None

    def __repr__(self) -> str:
        return f"JobStore({str(self.path)!r})"

    # -- opening --------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the queue file is there (some process queued a job in this folder)."""
        return self._conn is not None or self.path.is_file()

    def _open(self, create: bool) -> Optional[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                if not create and not self.path.is_file():
                    return None
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
                except (OSError, sqlite3.Error) as exc:
                    raise self._unwritable(exc) from None
                conn.row_factory = sqlite3.Row
                try:
                    self._prepare(conn)
                except sqlite3.OperationalError as exc:  # no permission, a full disk, a lock held too long
                    conn.close()
                    raise self._unwritable(exc) from None
                except sqlite3.DatabaseError as exc:
                    conn.close()
                    raise QueueFileError(f"The queue file {self.path} can't be used ({exc}); move it away to start "
                                         "with an empty queue.") from None
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            return self._conn

    def _unwritable(self, exc: BaseException) -> QueueFileError:
        reason = getattr(exc, "strerror", None) or exc
        return QueueFileError(f"The queue file {self.path} can't be opened or written ({reason}); check that the "
                              "outputs folder exists, can be written and its disk is not full.")

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueFileError(f"The queue file {self.path} was written by a newer FramePack (version {version}); "
                                 "update FramePack, or move the file away to start with an empty queue.")
        if version < SCHEMA_VERSION:
            with _transaction(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write(self, create: bool = False) -> Iterator[Optional[sqlite3.Connection]]:
        """A write transaction (BEGIN IMMEDIATE: the file's write lock is taken at once); None without a file."""
        with self._lock:
            conn = self._open(create)
            if conn is None:
                yield None
                return
            with _transaction(conn):
                yield conn

    def _read(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._open(False)
            return [] if conn is None else conn.execute(sql, args).fetchall()

    def close(self) -> None:
        """Close the file (it is opened again when needed)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- adding ---------------------------------------------------------------------------------

    def add(self, jobs: Sequence[NewJob], *, pool: str, owner: Optional[str] = None,
            batch: Optional[str] = None) -> list[int]:
        """Queue `jobs` at the end of the line, all or none (one transaction); returns their ids.

        With `batch`, the jobs are numbered within it; a batch that is already queued is not added
        again (its ids are returned).
        """
        cache: dict = {}
        images = [_image_rows(job, cache) for job in jobs]  # read every copy before the transaction
        try:
            return self._add(jobs, images, pool, owner, batch)
        except sqlite3.OperationalError as exc:
            raise self._unwritable(exc) from None

    def _add(self, jobs: Sequence[NewJob], images: list, pool: str, owner: Optional[str],
             batch: Optional[str]) -> list[int]:
        now = time.time()
        with self._write(create=True) as conn:
            if batch is not None:
                known = [row["id"] for row in conn.execute(
                    "SELECT id FROM jobs WHERE batch = ? ORDER BY batch_index", (batch,))]
                if known:
                    return known
            position = conn.execute("SELECT COALESCE(MAX(position), 0) FROM jobs").fetchone()[0]
            ids, stored = [], set()
            for index, (job, rows) in enumerate(zip(jobs, images)):
                position += 1
                cursor = conn.execute(
                    "INSERT INTO jobs (position, state, pool, owner, settings, resume, batch, batch_index, created) "
                    "VALUES (?, 'waiting', ?, ?, ?, ?, ?, ?, ?)",
                    (position, pool, owner, json.dumps(job.settings.to_dict()),
                     os.path.abspath(job.resume) if job.resume else None, batch, index if batch else None, now))
                ids.append(cursor.lastrowid)
                for role, suffix, blob in rows:  # each distinct image once, however many jobs use it
                    if blob.digest not in stored:
                        stored.add(blob.digest)
                        conn.execute("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)", (blob.digest, blob.data))
                    conn.execute("INSERT INTO images (job, role, suffix, hash) VALUES (?, ?, ?, ?)",
                                 (cursor.lastrowid, role, suffix, blob.digest))
            _forget_old(conn)
            return ids

    # -- the worker's side ----------------------------------------------------------------------

    def claim(self, pool: str, worker: str) -> Optional[StoredJob]:
        """Take the next job of `pool` for `worker`: an interrupted one first, then the first waiting one.

        Finding the row and marking it running is one IMMEDIATE transaction, so of several workers
        (threads or processes) exactly one gets each job.
        """
        next_job = ("SELECT id FROM jobs WHERE pool = ? AND state IN ('interrupted', 'waiting') "
                    "ORDER BY state = 'waiting', position LIMIT 1")
        if not self._read(next_job, (pool,)):
            return None  # nothing to take: no write lock for an idle worker's look
        with self._write() as conn:
            row = conn.execute(next_job, (pool,)).fetchone()  # again, under the lock: another may have taken it
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state = 'running', worker = ?, started = ?, message = NULL WHERE id = ?",
                         (worker, time.time(), row["id"]))
            return StoredJob.from_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def recover(self, alive: Callable[[Optional[str]], bool] = process_alive) -> list[int]:
        """Mark the running jobs whose process is gone (killed, crashed, powered off) interrupted; returns their ids."""
        rows = self._read("SELECT id, worker FROM jobs WHERE state = 'running'")
        running = {row["id"]: row["worker"] for row in rows}
        verdicts = {worker: alive(worker) for worker in set(running.values())}
        dead = [job_id for job_id, worker in running.items() if not verdicts[worker]]
        if not dead:
            return []
        with self._write() as conn:
            for job_id in dead:  # unless it ended or was taken again in the meantime
                conn.execute("UPDATE jobs SET state = 'interrupted' WHERE id = ? AND state = 'running' AND worker IS ?",
                             (job_id, running[job_id]))
        return dead

    def set_output(self, job_id: int, output: Path) -> None:
        """Record the final video path a job writes (before it writes anything), so it can be resumed."""
        with self._write() as conn:
            # absolute: another process sharing the folder may run from another working directory
            conn.execute("UPDATE jobs SET output = ? WHERE id = ?", (os.path.abspath(output), job_id))

    def set_progress(self, job_id: int, sections_done: int) -> None:
        """Record how many sections of a running job are finished."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET sections_done = ? WHERE id = ?", (sections_done, job_id))

    def end(self, job_id: int, state: str, message: Optional[str] = None) -> None:
        """Record how a job ended (finished, failed, cancelled, or interrupted: to be resumed)."""
        if state not in ENDED + ("interrupted",):
            raise ValueError(f"not an end state: {state}")
        with self._write() as conn:
            conn.execute("UPDATE jobs SET state = ?, message = ?, ended = ? WHERE id = ?",
                         (state, message, time.time(), job_id))
            if state == "finished":  # nothing runs it again: only its thumbnail is still needed
                conn.execute("DELETE FROM images WHERE job = ? AND role != 'thumb'", (job_id,))
                _drop_unused_images(conn)

    # -- the page's side ------------------------------------------------------------------------

    def move(self, job_id: int, offset: int) -> bool:
        """Swap a waiting job with the waiting job `offset` places before (-1) or after (+1) it in its line."""
        with self._write() as conn:
            if conn is None:
                return False
            row = conn.execute("SELECT position, pool FROM jobs WHERE id = ? AND state = 'waiting'",
                               (job_id,)).fetchone()
            if row is None:
                return False
            order = "DESC" if offset < 0 else "ASC"
            compare = "<" if offset < 0 else ">"
            other = conn.execute(
                f"SELECT id, position FROM jobs WHERE state = 'waiting' AND pool = ? AND position {compare} ? "
                f"ORDER BY position {order} LIMIT 1", (row["pool"], row["position"])).fetchone()
            if other is None:
                return False
            conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (other["position"], job_id))
            conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (row["position"], other["id"]))
            return True

    def remove(self, job_id: int) -> bool:
        """Take a job that is not running out of the queue (its images go with it; its files stay)."""
        with self._write() as conn:
            if conn is None:
                return False
            removed = conn.execute("DELETE FROM jobs WHERE id = ? AND state != 'running'", (job_id,)).rowcount == 1
            _drop_unused_images(conn)
            return removed

    def retry(self, job_id: int) -> bool:
        """Put a failed, cancelled or interrupted job back in the line, at its end."""
        with self._write() as conn:
            if conn is None:
                return False
            position = conn.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            return conn.execute(
                "UPDATE jobs SET state = 'waiting', position = ?, message = NULL, ended = NULL "
                "WHERE id = ? AND state IN ('failed', 'cancelled', 'interrupted')", (position, job_id)).rowcount == 1

    def cancel_waiting(self, job_id: int) -> bool:
        """Mark a waiting job cancelled (it stays in the list and can be retried)."""
        with self._write() as conn:
            if conn is None:
                return False
            return conn.execute("UPDATE jobs SET state = 'cancelled', ended = ? WHERE id = ? AND state = 'waiting'",
                                (time.time(), job_id)).rowcount == 1

    # -- reading --------------------------------------------------------------------------------

    def get(self, job_id: int) -> Optional[StoredJob]:
        """One job, or None when it is not (or no longer) in the queue."""
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return StoredJob.from_row(rows[0]) if rows else None

    def get_many(self, job_ids: Sequence[int]) -> dict[int, StoredJob]:
        """The jobs of `job_ids` still in the queue, by id."""
        rows = []
        for start in range(0, len(job_ids), 500):  # SQLite caps the parameters of one statement
            chunk = job_ids[start:start + 500]
            rows += self._read(f"SELECT * FROM jobs WHERE id IN ({_marks(chunk)})", chunk)
        return {row["id"]: StoredJob.from_row(row) for row in rows}

    def jobs(self, *, ended: int = 20) -> list[StoredJob]:
        """The running jobs, then the waiting ones in their order (interrupted first), then the `ended` latest ended."""
        active = self._read(
            "SELECT * FROM jobs WHERE state IN ('running', 'interrupted', 'waiting') "
            "ORDER BY state != 'running', state = 'waiting', position")
        done = self._read(f"SELECT * FROM jobs WHERE state IN ({_marks(ENDED)}) ORDER BY ended DESC, id DESC LIMIT ?",
                          (*ENDED, ended))
        return [StoredJob.from_row(row) for row in active + done]

    def batch_jobs(self, batch: str) -> list[StoredJob]:
        """The jobs of one batch, in the batch's order."""
        return [StoredJob.from_row(row) for row in self._read(
            "SELECT * FROM jobs WHERE batch = ? ORDER BY batch_index", (batch,))]

    def thumbnail(self, job_id: int) -> Optional[bytes]:
        """A job's thumbnail (PNG), if it has a start image."""
        rows = self._read("SELECT data FROM images JOIN blobs USING (hash) WHERE job = ? AND role = 'thumb'", (job_id,))
        return bytes(rows[0]["data"]) if rows else None

    @contextlib.contextmanager
    def inputs(self, job: StoredJob) -> Iterator[tuple[GenerationSettings, Optional[np.ndarray]]]:
        """(settings, start image) to run a job with: its end image and keyframes are its stored copies,
        written to a temporary folder for the duration of the block."""
        settings = job.generation_settings()
        rows = {row["role"]: row for row in self._read(
            "SELECT role, suffix, data FROM images JOIN blobs USING (hash) WHERE job = ?", (job.id,))}
        image = decode_png(bytes(rows["start"]["data"])) if "start" in rows else None
        if job.resume is not None or not (settings.end_image or settings.keyframes):
            yield settings, image
            return
        with tempfile.TemporaryDirectory(prefix="framepack-queued-") as folder:
            def copy(role: str) -> str:
                if role not in rows:
                    raise ValueError(f"The queue holds no copy of the job's {role} image; queue the job again.")
                path = Path(folder) / f"{role}{rows[role]['suffix']}"
                path.write_bytes(bytes(rows[role]["data"]))
                return str(path)

            yield with_copies(settings, copy), image


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error: the change happens whole or not at all."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _marks(values: Sequence) -> str:
    return ", ".join("?" for _ in values)


def _forget_old(conn: sqlite3.Connection) -> None:
    """Keep the newest KEEP_ENDED ended jobs; older ones leave the list (their images with them)."""
    conn.execute(f"DELETE FROM jobs WHERE state IN ({_marks(ENDED)}) AND id NOT IN ("
                 f"SELECT id FROM jobs WHERE state IN ({_marks(ENDED)}) ORDER BY ended DESC, id DESC LIMIT ?)",
                 (*ENDED, *ENDED, KEEP_ENDED))
    _drop_unused_images(conn)


def _drop_unused_images(conn: sqlite3.Connection) -> None:
    """Delete the stored images that no job uses any more."""
    conn.execute("DELETE FROM blobs WHERE hash NOT IN (SELECT hash FROM images)")
