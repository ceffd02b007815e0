"""Helpers for the tests that drive the app over HTTP (reliability, security, load).

Not a test module: the reliability, security and load tests import it (pytest puts tests/ on
sys.path). The app runs in the test process on 127.0.0.1 with the session's tiny models.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
from PIL import Image

from diffusers_helper.app import FORM_FIELDS, AppConfig, build_app, server_kwargs
from diffusers_helper.app.ui import form_values
from diffusers_helper.settings import GenerationSettings
from diffusers_helper.video import read_frames

# Two sections of one step at the 64-px buckets: a whole job takes about a second on a CPU.
SMALL = GenerationSettings(prompt="", seconds=1, window=3, steps=1, resolution=64, seed=5, cache="none")
JOB_TIMEOUT = 180

# The browser tests drive Debian's Chromium ($CHROMIUM) through Playwright, without Playwright's own download.
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def browser_missing() -> str | None:
    """Why the browser tests can't run here (None when Playwright and Chromium are both present)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)"
    return None


@contextlib.contextmanager
def chromium_page(profile: Path, height: int = 1000) -> Iterator[object]:
    """A page of headless Chromium with a fresh profile folder, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": height})
        try:
            yield context.new_page()
        finally:
            context.close()


def open_with_image(page, url: str, image: Path) -> list[str]:
    """Open the app's page, upload `image` as the start image and wait until the page shows it; returns the
    list that collects the page's script errors from now on (tests assert it stays empty)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#fp-start", timeout=60_000)
    page.set_input_files("#fp-image input[type=file]", str(image))
    page.wait_for_selector("#fp-image img", timeout=60_000)
    return errors


def wait_for_final_video(page, timeout_ms: int) -> None:
    """Wait until the page's progress says finished and its final <video> has a frame to show."""
    page.wait_for_function(
        "() => document.querySelector('#fp-progress .fp-progress')?.dataset.state === 'finished'", timeout=timeout_ms)
    page.wait_for_function(
        "() => { const v = document.querySelector('#fp-final video'); return v && v.readyState >= 2; }", timeout=60_000)


def save_noise_image(path: Path, seed: int, size: tuple[int, int]) -> Path:
    """A PNG of random pixels (height, width) at `path`: a start image no two tests share by chance."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(outputs: Path, sources, defaults: GenerationSettings = SMALL, ray=None,
                **launch) -> Iterator[tuple[str, object]]:
    """Build and launch the app on a free local port (its jobs on Ray workers with `ray`, a
    scaleout.ClusterOptions); yields (url, demo) and shuts everything down."""
    demo = build_app(AppConfig(outputs=outputs, sources=sources, device="cpu", defaults=defaults, ray=ray))
    options = dict(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                   allowed_paths=[str(Path(outputs).resolve())], app_kwargs=server_kwargs())
    options.update(launch)
    _, url, _ = demo.launch(**options)
    try:
        yield url, demo
    finally:
        demo.job_queue.close()
        if demo.cluster is not None:
            demo.cluster.close()
        demo.close()
        demo.snapshots.close()


def form(base: GenerationSettings = SMALL, **changes) -> list:
    """The generation endpoint's inputs after the image, from `base` with `changes` (form field names)."""
    values = {**form_values(base), **changes}
    return [values[name] for name in FORM_FIELDS]


def is_video(value) -> bool:
    return isinstance(value, str) and value.endswith(".mp4")


def final_video(result) -> Path:
    _latest, _preview, _progress, final = result
    assert is_video(final), f"no final video in {result}"
    return Path(final)


def progress_state(html: str) -> str:
    match = re.search(r'data-state="(\w+)"', html)
    assert match, html
    return match.group(1)


def progress_message(html: str) -> str:
    match = re.search(r'fp-progress-message"[^>]*>([^<]*)<', html)
    assert match, html
    return match.group(1)


def stem_of(video: Path) -> str:
    """The job's name from a video the page received (links of partial videos carry a counter)."""
    return re.sub(r"^\d{6}-", "", Path(video).name.split(".")[0])


def wait_until(condition: Callable[[], object], timeout: float = JOB_TIMEOUT, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def history_latents(video: Path):
    """The latents a job saved beside its video NAME.mp4 (NAME.latents.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(video.with_name(video.name[: -len(".mp4")] + ".latents.safetensors")))["history_latents"]


def kill_when(proc, condition: Callable[[], object], what: str) -> None:
    """SIGKILL `proc` as soon as `condition()` holds (it must still run then); it is reaped either way."""
    import signal

    try:
        wait_until(lambda: condition() or proc.poll() is not None, what=what)
        assert proc.poll() is None, f"the process ended before {what}: {proc.stdout.read() if proc.stdout else ''}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def assert_no_debris(folder: Path) -> None:
    """Nothing half-written: no hidden temporaries, no empty files; every video plays and every sidecar parses."""
    for path in Path(folder).iterdir():
        if path.is_dir():
            assert not path.name.startswith("."), f"work folder left behind: {path.name}"
            continue
        assert not path.name.startswith("."), f"temporary file left behind: {path.name}"
        assert path.stat().st_size > 0, f"zero-length file left behind: {path.name}"
        if path.suffix == ".mp4":
            assert len(read_frames(path)) > 0, path.name
        elif path.suffix == ".json":
            json.loads(path.read_text())


def call_raw(url: str, api_name: str, body: str, timeout: float = 60) -> tuple[str, dict]:
    """POST a hand-written JSON body to /gradio_api/call/<api_name> and read the result's event.

    Lets a test send what gradio_client can't encode (NaN and Infinity literals). Returns the
    last SSE event's name ('complete' or 'error') and its data.
    """
    response = httpx.post(f"{url}gradio_api/call/{api_name}", content=body,
                          headers={"content-type": "application/json"}, timeout=timeout)
    response.raise_for_status()
    event_id = response.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=timeout) as stream:
        text = stream.read().decode()
    events = re.findall(r"event: (\w+)\ndata: (.*)", text)
    assert events, text
    name, data = events[-1]
    return name, (json.loads(data) if data not in ("", "null") else {})


def upload(url: str, path: Path, name: str | None = None) -> str:
    """Upload a file as the page does; returns the server-side path."""
    response = httpx.post(f"{url}gradio_api/upload",
                          files={"files": (name or Path(path).name, Path(path).read_bytes(), "application/octet-stream")})
    response.raise_for_status()
    return response.json()[0]


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of the given size, all black: a few kilobytes that decode to width×height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
