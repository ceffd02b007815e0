"""Reading a video from anywhere for an extension: probe it, re-time it to 30 fps, fit it to a size.

The frames of a video being extended become the beginning of the new video. They are read with
PyAV one at a time and never held in memory together: `frames` yields all of them, re-timed to
the output rate and fitted to the new video's size, for encoding as they come; `ends` decodes the
first frame and, after a seek, only the last frames an extension needs.

Re-timing (`retime`): output frame i, at i/30 s, shows the input frame that is on screen at that
time, the last one whose presentation time is at or before i/30 s (times counted from the first
frame's). The output lasts as long as the input, rounded to whole output frames (at least one): a
frame shown for less than an output frame can be left out, a longer one is repeated. A 30 fps
video comes out frame for frame.

Fitting (`fit`): the frame as displayed (its pixel aspect ratio and rotation applied) is scaled to
cover the size (libswscale's Lanczos) and its centre cut out, as `conditioning.resize_and_center_crop`
does for images.

Importing this module does no work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence

import av
import numpy as np

from .settings import VIDEO_FPS

# Demuxers that read still images: such a file is an image, not a video.
_IMAGE_FORMATS = ("image2", "image2pipe")


class FootageError(ValueError):
    """A video can't be used; the message names it and says why."""


@dataclass(frozen=True)
class Footage:
    """A readable video and how its frames map onto 30 fps output frames."""

    path: Path
    width: int  # as displayed: pixel aspect ratio and rotation applied
    height: int
    repeats: tuple[int, ...]  # for each input frame, in presentation order: how many output frames show it
    pts: Optional[tuple[int, ...]]  # their time stamps (the stream's time base), None when the stream has none
    rotation: int = 0  # degrees the frames are turned counter-clockwise for display (0, 90, 180, 270)

    @property
    def frames(self) -> int:
        """Output frames at 30 fps."""
        return sum(self.repeats)

    @property
    def seconds(self) -> float:
        """Length in seconds at 30 fps."""
        return self.frames / VIDEO_FPS


def retime(times: Sequence[Fraction], end: Fraction, fps: int = VIDEO_FPS) -> list[int]:
    """How many output frames at `fps` show each input frame (presentation `times`, ascending; the last
    one shown until `end`)."""
    if not times:
        raise ValueError("no frames to re-time")
    start = times[0]
    count = max(1, math.floor((end - start) * fps + Fraction(1, 2)))
    repeats = [0] * len(times)
    j = 0
    for i in range(count):
        at = start + Fraction(i, fps)
        while j + 1 < len(times) and times[j + 1] <= at:
            j += 1
        repeats[j] += 1
    return repeats


def probe(path: Path | str) -> Footage:
    """Read a video's frame times (without decoding it) and decode its first frame; FootageError when it
    is missing, not a video or has no frame."""
    path = Path(path)
    if not path.is_file():
        raise FootageError(f"Video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if container.format.name in _IMAGE_FORMATS or container.format.name.endswith("_pipe"):
                raise FootageError(f"{path.name} is an image, not a video; use it as the start image of a new video.")
            if not container.streams.video:
                raise FootageError(f"{path.name} holds no video frames (it has no video stream).")
            stream = container.streams.video[0]
            times, pts, end = _frame_times(container, stream)
        if not times:
            raise FootageError(f"{path.name} is shorter than one frame: it holds no video frames.")
        with av.open(str(path)) as container:
            first = next(container.decode(container.streams.video[0]), None)
    except FootageError:
        raise
    except av.error.EOFError:
        raise FootageError(f"{path.name} is shorter than one frame: it ends before its first video frame.") from None
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise FootageError(f"{path.name} is not a video that can be read ({_reason(exc)}).") from None
    if first is None:
        raise FootageError(f"{path.name} is shorter than one frame: none of its frames can be decoded.")
    rotation = int(getattr(first, "rotation", 0) or 0) % 360
    rotation = rotation if rotation in (90, 180, 270) else 0
    width, height = _display_size(first, rotation)
    return Footage(path, width, height, tuple(retime(times, end)), pts, rotation)


def _frame_times(container, stream) -> tuple[list[Fraction], Optional[tuple[int, ...]], Fraction]:
    """(presentation times in seconds, ascending; their time stamps or None; when the last frame ends) from
    the stream's packets, which are read but not decoded."""
    stamps, durations = [], []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the demuxer's end-of-stream marker
        stamps.append(packet.pts)
        durations.append(packet.duration or 0)
    rate = stream.average_rate or stream.guessed_rate or Fraction(VIDEO_FPS)
    step = 1 / Fraction(rate)
    if not stamps or any(s is None for s in stamps) or stream.time_base is None:
        times = [i * step for i in range(len(stamps))]
        return times, None, len(stamps) * step
    base = Fraction(stream.time_base)
    order = sorted(set(stamps))
    last = max(range(len(stamps)), key=lambda i: stamps[i])
    shown = durations[last] * base if durations[last] > 0 else step
    return [s * base for s in order], tuple(order), order[-1] * base + shown


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _display_size(frame, rotation: int) -> tuple[int, int]:
    """(width, height) of a frame as shown: its pixel aspect ratio, then its rotation, applied."""
    width, height = frame.width * _pixel_aspect(frame), Fraction(frame.height)
    if rotation in (90, 270):
        width, height = height, width
    return max(1, round(width)), max(1, round(height))


def _pixel_aspect(frame) -> Fraction:
    aspect = getattr(frame, "sample_aspect_ratio", None)
    return Fraction(aspect) if aspect else Fraction(1)


def fit(frame, size: tuple[int, int], rotation: int = 0) -> np.ndarray:
    """A decoded frame as displayed, scaled to cover `size` (height, width) and cut to its centre (RGB uint8)."""
    height, width = size
    shown_w, shown_h = _display_size(frame, rotation)
    scale = max(width / shown_w, height / shown_h)
    new_w, new_h = int(round(shown_w * scale)), int(round(shown_h * scale))
    coded_w, coded_h = (new_h, new_w) if rotation in (90, 270) else (new_w, new_h)
    if (coded_w, coded_h) == (frame.width, frame.height):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24", interpolation="LANCZOS").to_ndarray()
    if rotation:
        rgb = np.rot90(rgb, k=rotation // 90)
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def frames(footage: Footage, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Every output frame in order (RGB uint8, fitted to `size`), decoded as it is needed.

    A repeated frame is the same array each time; don't change it. Frames the decoder does not give
    (a damaged end) are filled with the last one it gave, so there are always `footage.frames`.
    """
    last, shown, seen = None, None, 0
    for index, frame in _decoded(footage, 0):
        last, seen = frame, index + 1
        if footage.repeats[index]:  # a frame no output time shows (a faster source's) is not scaled at all
            shown = fit(frame, size, footage.rotation)
            for _ in range(footage.repeats[index]):
                yield shown
    if last is None:
        raise FootageError(f"{footage.path.name} could not be decoded.")
    missing = sum(footage.repeats[seen:])
    if missing:
        shown = fit(last, size, footage.rotation) if footage.repeats[seen - 1] == 0 else shown
        for _ in range(missing):
            yield shown


def first_frame(footage: Footage, size: tuple[int, int]) -> np.ndarray:
    """The first output frame, fitted to `size`."""
    for _, frame in _decoded(footage, 0):
        return fit(frame, size, footage.rotation)
    raise FootageError(f"{footage.path.name} could not be decoded.")


def last_frames(footage: Footage, size: tuple[int, int], last: int) -> list[np.ndarray]:
    """The last `last` output frames (fewer when the video is shorter), fitted to `size`; the frames before
    them are not decoded when the video can seek."""
    count = max(1, min(last, footage.frames))
    first_index, skip = _input_frame_of(footage.repeats, footage.frames - count)
    tail: list[np.ndarray] = []
    for index, frame in _decoded(footage, first_index):
        repeat = footage.repeats[index] - (skip if index == first_index else 0)
        if repeat > 0:
            tail += [fit(frame, size, footage.rotation)] * repeat
    if not tail:
        raise FootageError(f"{footage.path.name} could not be decoded.")
    tail += [tail[-1]] * (count - len(tail))  # a damaged end: hold the last frame decoded
    return tail[:count]


def _input_frame_of(repeats: Sequence[int], output_index: int) -> tuple[int, int]:
    """(the input frame shown at output frame `output_index`, how many of its repeats come before it)."""
    seen = 0
    for index, count in enumerate(repeats):
        if seen + count > output_index:
            return index, output_index - seen
        seen += count
    return len(repeats) - 1, 0


def _decoded(footage: Footage, start: int) -> Iterator[tuple[int, object]]:
    """(input frame index, decoded frame) from input frame `start` to the end, seeking when the stream has
    time stamps; a decoding error is a FootageError."""
    name = footage.path.name
    try:
        with av.open(str(footage.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start > 0 and footage.pts is not None:
                found = yield from _after_seek(container, stream, footage, start)
                if found:
                    return
                container.seek(0, stream=stream, backward=True)
            for index, frame in enumerate(container.decode(stream)):
                if index >= len(footage.repeats):
                    return
                if index >= start:
                    yield index, frame
    except (av.error.FFmpegError, OSError) as exc:
        raise FootageError(f"{name} can't be read to its end ({_reason(exc)}).") from None


def _after_seek(container, stream, footage: Footage, start: int) -> Iterator[tuple[int, object]]:
    """Frames from input frame `start` on, found by time stamp after seeking to the key frame before it.
    Returns False, having yielded nothing, when the seek did not land at or before that frame."""
    wanted = {stamp: index for index, stamp in enumerate(footage.pts)}
    container.seek(footage.pts[start], stream=stream, backward=True)
    started = False
    for frame in container.decode(stream):
        index = wanted.get(frame.pts)
        if not started:
            if index is None or index > start:
                return False
            if index < start:
                continue
            started = True
        if index is not None and index >= start:
            yield index, frame
    return started
