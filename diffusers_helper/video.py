"""MP4 writing and frame blending: sections are encoded once and joined by copying packets.

The generator produces a video section by section. Consecutive sections overlap by a few frames
that are cross-faded (:func:`blend`). :class:`SectionVideoWriter` keeps the pixels of a growing
video on disk as already-encoded H.264 segments; only the frames a later section can still change
stay in RAM. After every section it writes a complete, playable MP4 of the whole video so far by
encoding just the new and changed frames and remuxing the finished segments (packets copied, time
stamps rewritten), so the cost of a section does not depend on how long the video already is.

Every MP4 written here is H.264 (libx264), yuv420p, BT.709 limited range (tagged, so browsers
convert back to RGB with the matrix that was used), with the ``moov`` atom at the front so that a
browser can start playing it before it has fully loaded. Files are written under a temporary name
in the target folder and linked into place (`outputs.atomic_write`); an existing file is never
overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import shutil
import tempfile
import weakref
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator, Mapping

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace

from .outputs import atomic_write

__all__ = [
    "SectionVideoWriter",
    "blend",
    "effective_crf",
    "read_frames",
    "read_metadata",
    "to_uint8_frames",
    "write_mp4",
]

DEFAULT_FPS = 30
DEFAULT_CRF = 16

# x264 clips its CRF to 51 for 8-bit video; values above it are accepted and mean 51.
MAX_CRF = 51
# libx264 at CRF 0 (or QP 0) encodes losslessly, which forces the "High 4:4:4 Predictive" profile
# even for yuv420p input. Browsers (Chromium, Firefox, Safari) only decode up to the High profile,
# so such a file does not play there. CRF 1 is the lowest setting that is not lossless and stays in
# the High profile; visually it is indistinguishable from CRF 0, at a fraction of the size.
LOWEST_BROWSER_CRF = 1

_ENCODER = "libx264"
_PIX_FMT = "yuv420p"
_PRESET = "medium"
# x264's macroblock tree reads memory it never wrote when a clip is shorter than its lookahead (our
# sections are), so the same frames gave different bytes from run to run. Without it, encoding is
# repeatable (a resumed job equals an uninterrupted one) at a small cost in size for the quality.
_X264_PARAMS = "no-mbtree=1"
# The mp4 muxer only keeps a handful of standard tags (title, comment, ...) unless told to write
# every key as an "mdta" item; faststart moves the moov atom before the media data.
_FINAL_MOVFLAGS = "+faststart+use_metadata_tags"
# Tags the mp4 demuxer reports from the ftyp box; they are not metadata anyone wrote.
_CONTAINER_TAGS = frozenset({"major_brand", "minor_version", "compatible_brands"})

_CONVERT_CHUNK = 8  # frames converted to uint8 at a time

_DIRECTIONS = {"append": "append", "f1": "append", "prepend": "prepend", "framepack": "prepend"}


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _check_pixels(pixels: torch.Tensor, what: str = "pixels") -> None:
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"{what} must be a torch tensor of shape (1, 3, T, H, W), got {type(pixels).__name__}")
    if pixels.ndim != 5 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
        raise ValueError(f"{what} must have shape (1, 3, T, H, W), got {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [-1, 1], got dtype {pixels.dtype}")


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2 or height <= 0 or width <= 0:
        raise ValueError(
            f"frame size {width}x{height} cannot be encoded as yuv420p: width and height must be "
            "positive and even (the generator uses multiples of 16)"
        )


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """Convert pixels (1, 3, T, H, W) in [-1, 1] to RGB frames (T, H, W, 3) uint8, truncating like the reference."""
    _check_pixels(pixels)
    length, height, width = pixels.shape[2:]
    out = np.empty((length, height, width, 3), dtype=np.uint8)
    out_t = torch.from_numpy(out)
    # A few frames at a time, on the pixels' device: a float32 copy of a whole section would
    # need 4 bytes per subpixel. The arithmetic is the reference's, so the bytes are the same.
    for i in range(0, length, _CONVERT_CHUNK):
        x = torch.clamp(pixels[:, :, i : i + _CONVERT_CHUNK].detach().float(), -1.0, 1.0)  # a new tensor
        x.mul_(127.5).add_(127.5)
        out_t[i : i + _CONVERT_CHUNK].copy_(x[0].permute(1, 2, 3, 0))  # float -> uint8 truncates
    return out


def blend(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two clips along time (dim 2), cross-fading ``overlap`` frames: earlier's tail weighted 1 -> 0."""
    if earlier.ndim < 3 or later.ndim < 3:
        raise ValueError("blend expects tensors with time as dim 2, e.g. (B, C, T, H, W)")
    if earlier.dtype != later.dtype or earlier.device != later.device:
        raise ValueError(
            f"blend needs both clips in one dtype on one device, got {earlier.dtype} on {earlier.device} "
            f"and {later.dtype} on {later.device}"
        )
    overlap = int(overlap)
    if overlap < 0 or overlap > earlier.shape[2] or overlap > later.shape[2]:
        raise ValueError(
            f"overlap {overlap} must be between 0 and the length of both clips "
            f"({earlier.shape[2]} and {later.shape[2]} frames)"
        )
    if overlap == 0:
        return torch.cat([earlier, later], dim=2)
    shape = [1, 1, overlap] + [1] * (earlier.ndim - 3)
    w = torch.linspace(1, 0, overlap, dtype=earlier.dtype, device=earlier.device).view(shape)
    mixed = w * earlier[:, :, -overlap:] + (1 - w) * later[:, :, :overlap]
    return torch.cat([earlier[:, :, :-overlap], mixed, later[:, :, overlap:]], dim=2)


# --------------------------------------------------------------------------------------------
# Encoding settings
# --------------------------------------------------------------------------------------------


def effective_crf(crf: int) -> int:
    """The CRF really used for ``crf``: 0 becomes 1 (CRF 0 is lossless High 4:4:4, which browsers can't play), above 51 becomes 51."""
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)):
        raise ValueError(f"crf must be a whole number, got {crf!r}")
    crf = int(crf)
    if crf < 0:
        raise ValueError(f"crf must be 0 or more (lower is better quality), got {crf}")
    return min(max(crf, LOWEST_BROWSER_CRF), MAX_CRF)


def _check_fps(fps: int) -> int:
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise ValueError(f"fps must be a positive whole number, got {fps!r}")
    return int(fps)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    out = {}
    for key, value in dict(metadata).items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(f"metadata must map non-empty str keys to str values, got {key!r}: {value!r}")
        if key in _CONTAINER_TAGS:
            raise ValueError(f"metadata key {key!r} is reserved by the mp4 container; choose another name")
        out[key] = value
    return out


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------------------------
# Encoding and remuxing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One H.264 stream on disk: ``frames`` frames, each segment starting with an IDR frame."""

    path: Path
    frames: int
    delay: int  # how many frames decoding runs ahead of presentation (B-frame reordering)


@dataclasses.dataclass(frozen=True)
class _Encoded:
    frames: int
    delay: int
    extradata: bytes  # SPS/PPS: must be the same for every segment joined into one stream


@dataclasses.dataclass(frozen=True)
class _Prefix:
    """Frames waiting to go in front of a prepend-mode video: encoded ones, then the kept (changeable) ones."""

    segment: _Segment | None
    tail: torch.Tensor | None  # (1, 3, keep, H, W) float32
    count: int  # all of its frames


def _pixels_of(frames: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 frames as pixels (1, 3, T, H, W) in [-1, 1] that `to_uint8_frames` turns back into the same bytes.

    Each value is the centre of its byte's interval, (u + 0.5) / 127.5 − 1, so the truncation there
    gives u back despite float rounding.
    """
    stacked = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].float()
    return stacked.add_(0.5).div_(127.5).sub_(1.0)


def _encode_frames(
    frames: np.ndarray,
    path: Path,
    *,
    fps: int,
    crf: int,
    metadata: Mapping[str, str] | None = None,
    final: bool = False,
) -> _Encoded:
    """Encode RGB frames (T, H, W, 3) uint8 to an MP4 at ``path`` (which is overwritten)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 array (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return _encode_stream(iter(frames), path, fps=fps, crf=crf, metadata=metadata, final=final)


def _encode_stream(
    frames: Iterator[np.ndarray],
    path: Path,
    *,
    fps: int,
    crf: int,
    metadata: Mapping[str, str] | None = None,
    final: bool = False,
) -> _Encoded | None:
    """Encode RGB frames (H, W, 3) uint8, all of one size, as they come to an MP4 at ``path`` (overwritten);
    None when there were none."""
    first = next(frames, None)
    if first is None:
        return None
    frames = itertools.chain([first], frames)
    height, width = first.shape[:2]
    _check_even(height, width)
    count = 0
    options = {"movflags": _FINAL_MOVFLAGS} if final else {}
    timing: list[tuple[int, int]] = []
    with av.open(str(path), "w", format="mp4", options=options) as out:
        out.metadata.update(metadata or {})
        stream = out.add_stream(_ENCODER, rate=fps, options={"crf": str(effective_crf(crf)), "preset": _PRESET,
                                                              "x264-params": _X264_PARAMS})
        stream.width, stream.height, stream.pix_fmt = width, height, _PIX_FMT
        ctx = stream.codec_context
        # Tag BT.709 / limited range and convert with that matrix, so players need not guess.
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # AVCOL_*_BT709
        ctx.color_range = 1  # AVCOL_RANGE_MPEG

        def mux(packets: list[av.Packet]) -> None:
            for packet in packets:
                timing.append((packet.pts, packet.dts))  # in frames (the encoder's time base)
                out.mux(packet)

        for index, rgb in enumerate(frames):
            if rgb.shape != first.shape or rgb.dtype != np.uint8:
                raise ValueError(f"frame {index} is {rgb.dtype} {rgb.shape}; every frame must be uint8 {first.shape}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                format=_PIX_FMT, dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            frame.pts = index
            mux(stream.encode(frame))
            count += 1
        mux(stream.encode(None))
        extradata = bytes(ctx.extradata or b"")
    if len(timing) != count:
        raise RuntimeError(f"encoder returned {len(timing)} packets for {count} frames")
    delay = max(max(0, i - pts, i - dts) for i, (pts, dts) in enumerate(timing))
    return _Encoded(frames=count, delay=delay, extradata=extradata)


def _remux(segments: list[_Segment], path: Path, *, fps: int, metadata: Mapping[str, str]) -> int:
    """Join segments, in order, into one faststart MP4 at ``path`` by copying packets; return the frame count.

    Presentation times are renumbered so that segment k starts right after segment k-1. Decode
    times are rewritten as ``packet index - delay`` with one delay for the whole file (the largest
    reordering any segment needs), so they increase by exactly one frame per packet across the
    joins: the sample table gets uniform durations and every ``dts <= pts``.
    """
    delay = max(segment.delay for segment in segments)
    frame_time = Fraction(1, fps)
    start = 0  # presentation index of the current segment's first frame
    decode_index = 0
    with av.open(str(path), "w", format="mp4", options={"movflags": _FINAL_MOVFLAGS}) as out:
        out.metadata.update(metadata)
        ostream = None
        for segment in segments:
            with av.open(str(segment.path)) as inp:
                istream = inp.streams.video[0]
                if ostream is None:
                    ostream = out.add_stream_from_template(istream)
                # Segment time -> frame index, in integers (Fraction arithmetic per packet is slow).
                scale_num = istream.time_base.numerator * fps
                scale_den = istream.time_base.denominator
                count = 0
                for packet in inp.demux(istream):
                    if packet.size == 0 or packet.pts is None:
                        continue  # the demuxer's end-of-stream marker
                    local = (2 * packet.pts * scale_num + scale_den) // (2 * scale_den)  # rounded
                    if not 0 <= local < segment.frames:
                        raise RuntimeError(f"segment {segment.path.name}: frame time {local} outside 0..{segment.frames - 1}")
                    packet.stream = ostream
                    packet.time_base = frame_time
                    packet.pts = start + local
                    packet.dts = decode_index - delay
                    packet.duration = 1
                    out.mux(packet)
                    count += 1
                    decode_index += 1
            if count != segment.frames:
                raise RuntimeError(f"segment {segment.path.name} holds {count} frames, expected {segment.frames}")
            start += segment.frames
    return start


# --------------------------------------------------------------------------------------------
# Whole files
# --------------------------------------------------------------------------------------------


def write_mp4(
    frames: np.ndarray,
    path: str | os.PathLike[str],
    fps: int = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Encode RGB frames (T, H, W, 3) uint8 in one pass to a new faststart MP4 at ``path``; never overwrites."""
    path = Path(path)
    frames = np.asarray(frames)
    fps = _check_fps(fps)
    effective_crf(crf)
    metadata = _check_metadata(metadata)
    if frames.ndim == 4:
        _check_even(*frames.shape[1:3])
    with atomic_write(path) as tmp:
        _encode_frames(np.ascontiguousarray(frames), tmp, fps=fps, crf=crf, metadata=metadata, final=True)
    return path


def read_frames(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of the first video stream as RGB (T, H, W, 3) uint8."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path} contains no video frames")
    return np.stack(frames)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The container metadata of an MP4 (keys written by :func:`write_mp4` / the writer, plus ``encoder``)."""
    with av.open(str(path)) as container:
        return {k: v for k, v in container.metadata.items() if k not in _CONTAINER_TAGS}


# --------------------------------------------------------------------------------------------
# Section by section
# --------------------------------------------------------------------------------------------


class SectionVideoWriter:
    """Grow a video section by section, writing a complete MP4 after each at constant cost.

    ``direction`` is ``"append"`` (model ``f1``: each section goes at the end) or ``"prepend"``
    (model ``framepack``: each section goes at the start); the model names are accepted too.

    Finished frames are encoded once into segment files in a work folder (``work_dir`` or a
    temporary folder beside the first output; removed by :meth:`close`). In RAM the writer keeps
    only the frames at the growing edge that the next section's overlap can still change
    (:attr:`frames_in_memory`). How many is decided per section: ``next_overlap`` when the caller
    passes it, else the largest overlap seen so far, else (after the first section, whose overlap
    is 0) the whole first section, since any of it may be blended with the next one. Those edge
    frames are encoded on their own for each intermediate MP4 and encoded again once blended, so
    over a job ``frames_encoded <= frames + sum of the edges kept``: one overlap per section when
    overlaps are constant and known (pass ``next_overlap``).

    ``crf`` follows :func:`effective_crf` (CRF 0 is written as CRF 1 so that browsers play it).
    """

    def __init__(
        self,
        *,
        direction: str,
        fps: int = DEFAULT_FPS,
        crf: int = DEFAULT_CRF,
        metadata: Mapping[str, str] | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        work_prefix: str | None = None,
    ) -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'append' (f1) or 'prepend' (framepack), got {direction!r}")
        self.direction = _DIRECTIONS[direction]
        self.fps = _check_fps(fps)
        self.crf = effective_crf(crf)
        self.metadata = _check_metadata(metadata)
        self.frames = 0
        self.frames_encoded = 0
        self._work_parent = Path(work_dir) if work_dir is not None else None
        self._work_prefix = work_prefix
        self._work: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self._closed = False
        self._segments: list[_Segment] = []  # finished frames, in presentation order
        self._edge: torch.Tensor | None = None  # (1, 3, h, H, W) on the CPU, frames not yet final
        self._extradata: bytes | None = None
        self._size: tuple[int, int] | None = None  # (height, width)
        self._largest_overlap = 0
        self._counter = 0
        self._prefix: _Prefix | None = None  # prepend mode: frames to go in front once the sections are done

    # -- state --------------------------------------------------------------------------------

    @property
    def frames_in_memory(self) -> int:
        """How many frames the writer holds in RAM between sections (the changeable edge)."""
        return 0 if self._edge is None else int(self._edge.shape[2])

    @property
    def segments(self) -> int:
        """How many finished segment files the video is kept in."""
        return len(self._segments)

    @property
    def work_dir(self) -> Path | None:
        """The folder holding the segment files (created with the first section)."""
        return self._work

    # -- main operation -------------------------------------------------------------------------

    def add_section(
        self,
        pixels: torch.Tensor,
        overlap: int,
        path: str | os.PathLike[str],
        *,
        next_overlap: int | None = None,
    ) -> Path:
        """Blend in a section (1, 3, T, H, W) and write the whole video so far to a new MP4 at ``path``.

        ``overlap`` is how many frames this section shares with the video (0 for the first).
        ``next_overlap``, if known, is the overlap of the next section (0 if this is the last);
        it decides how many edge frames stay changeable. Returns ``path``. On error nothing is
        left at ``path`` and the video held by the writer is as before the call (only
        ``frames_encoded`` counts the wasted work), so the call can be retried.
        """
        if self._closed:
            raise RuntimeError("this SectionVideoWriter is closed")
        path = Path(path)
        _check_pixels(pixels)
        height, width = int(pixels.shape[3]), int(pixels.shape[4])
        _check_even(height, width)
        if self._size is not None and (height, width) != self._size:
            raise ValueError(
                f"section frames are {width}x{height} but the video is {self._size[1]}x{self._size[0]}"
            )
        length = int(pixels.shape[2])
        if length == 0:
            raise ValueError("a section must have at least one frame")
        overlap = self._check_count("overlap", overlap)
        if overlap > length:
            raise ValueError(f"overlap {overlap} is longer than the section ({length} frames)")
        if overlap > self.frames_in_memory:
            raise ValueError(
                f"overlap {overlap} reaches past the {self.frames_in_memory} frames that can still change "
                + ("(the first section's overlap must be 0)" if self.frames == 0 else
                   "; pass next_overlap= to the previous add_section call when overlaps grow")
            )
        if next_overlap is not None:
            next_overlap = self._check_count("next_overlap", next_overlap)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))

        # 1. Blend, in the incoming pixels' dtype and device, exactly as over the whole video.
        edge = None if self._edge is None else self._edge.to(device=pixels.device, dtype=pixels.dtype)
        if edge is None:
            region = pixels
        elif self.direction == "append":
            region = blend(edge, pixels, overlap)
        else:
            region = blend(pixels, edge, overlap)
        region_length = int(region.shape[2])

        # 2. Split off the frames no later section can change.
        keep = self._edge_length(overlap, next_overlap, region_length)
        if self.direction == "append":
            finished, changeable = region[:, :, : region_length - keep], region[:, :, region_length - keep :]
        else:
            changeable, finished = region[:, :, :keep], region[:, :, keep:]

        # 3. Encode the finished part as a new segment and the edge as a throwaway one, then join.
        created_work = self._work is None
        work = self._ensure_work_dir(path)
        new_segment = edge_segment = None
        try:
            with atomic_write(path) as tmp:
                if finished.shape[2] > 0:
                    new_segment = self._encode_segment(finished, work, "seg")
                if changeable.shape[2] > 0:
                    edge_segment = self._encode_segment(changeable, work, "edge")
                segments = list(self._segments)
                if new_segment is not None:
                    segments = segments + [new_segment] if self.direction == "append" else [new_segment] + segments
                joined = segments + [edge_segment] if self.direction == "append" else [edge_segment] + segments
                total = _remux([s for s in joined if s is not None], tmp, fps=self.fps, metadata=self.metadata)
        except BaseException:
            if new_segment is not None:
                _unlink_quietly(new_segment.path)
            if created_work:
                self._remove_work_dir()
            raise
        finally:
            if edge_segment is not None:
                _unlink_quietly(edge_segment.path)

        # 4. Commit: only now does the writer's state change.
        expected = self.frames + length - overlap
        if total != expected:  # pragma: no cover - guards the bookkeeping above
            raise RuntimeError(f"wrote {total} frames, expected {expected}")
        self._segments = segments
        self._edge = changeable.detach().to("cpu", copy=True) if keep > 0 else None
        self._size = (height, width)
        self._largest_overlap = max(self._largest_overlap, overlap)
        self.frames = expected
        return path

    def _check_count(self, name: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        return int(value)

    def _edge_length(self, overlap: int, next_overlap: int | None, region_length: int) -> int:
        """How many edge frames to keep changeable after this section."""
        if next_overlap is None:
            largest = max(self._largest_overlap, overlap)
            # Nothing known yet (first section): the next overlap may cover all of it.
            next_overlap = largest if largest > 0 else region_length
        if next_overlap > region_length:
            raise ValueError(
                f"next_overlap {next_overlap} is longer than the {region_length} frames that could still be blended"
            )
        return next_overlap

    def _ensure_work_dir(self, path: Path) -> Path:
        if self._work is None:
            parent = self._work_parent if self._work_parent is not None else path.parent
            # A private folder even inside a given work_dir, so close() removes only our files. Named
            # after the job (or the first output), so that what a killed process left can be told
            # apart and removed (outputs.remove_stale_files).
            prefix = self._work_prefix or f".{path.name}.segments-"
            self._work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._work, True)
        return self._work

    def _remove_work_dir(self) -> None:
        if self._cleanup is not None:
            self._cleanup()  # runs shutil.rmtree at most once
        self._cleanup = None
        self._work = None

    def _encode_segment(self, pixels: torch.Tensor, work: Path, kind: str) -> _Segment:
        """A segment of decoded pixels (at least one frame)."""
        frames = to_uint8_frames(pixels)
        if len(frames) == 0:
            raise ValueError("a segment needs at least one frame")
        return self._encode_stream_segment(iter(frames), work, kind)

    # -- frames that come before the sections (a video being extended) ------------------------

    def add_prefix(self, frames: Iterable[np.ndarray], *, keep: int, beside: str | os.PathLike[str]) -> int:
        """Put finished frames (RGB uint8, H×W×3), such as a video being extended, before everything the
        sections add; returns how many there were.

        They are encoded as they come, never held in memory together, except the last ``keep``: those
        stay changeable, to be cross-faded with the frames that meet them, in append mode by the next
        section (whose ``overlap`` is then ``keep``), in prepend mode by :meth:`join_prefix` once the
        sections are done. The work folder is made beside ``beside`` unless ``work_dir`` was given. No
        MP4 is written yet.
        """
        if self._closed:
            raise RuntimeError("this SectionVideoWriter is closed")
        if self._prefix is not None or (self.direction == "append" and self.frames):
            raise ValueError("a prefix goes before every section, once")
        keep = self._check_count("keep", keep)
        held: list[np.ndarray] = []

        def finished() -> Iterator[np.ndarray]:
            for frame in frames:
                held.append(frame)
                if len(held) > keep:
                    yield held.pop(0)

        created_work = self._work is None
        work = self._ensure_work_dir(Path(beside))
        segment = None
        try:
            segment = self._encode_stream_segment(finished(), work, "prefix")
            count = (segment.frames if segment is not None else 0) + len(held)
            if len(held) < keep or count == 0:
                raise ValueError(f"a prefix of {count} frames can't keep {keep} of them changeable")
            size = tuple(held[-1].shape[:2]) if held else self._size
            if self._size is not None and size != self._size:
                raise ValueError(f"prefix frames are {size[1]}x{size[0]} but the video is {self._size[1]}x{self._size[0]}")
            _check_even(*size)
            tail = _pixels_of(held) if held else None
        except BaseException:
            if segment is not None:
                _unlink_quietly(segment.path)
            if created_work:
                self._remove_work_dir()
            raise
        self._size = size
        if self.direction == "append":
            self._segments, self._edge, self.frames = [s for s in [segment] if s is not None], tail, count
        else:
            self._prefix = _Prefix(segment, tail, count)
        return count

    def join_prefix(self, path: str | os.PathLike[str]) -> Path:
        """Prepend mode: put the prefix (:meth:`add_prefix`) in front of the video, its kept frames cross-faded
        with the video's first ones, and write the whole video to a new MP4 at ``path``; returns ``path``."""
        if self._closed or self._prefix is None:
            raise RuntimeError("there is no prefix to join (add_prefix, prepend mode)")
        path = Path(path)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))
        prefix = self._prefix
        keep = 0 if prefix.tail is None else int(prefix.tail.shape[2])
        if keep > self.frames_in_memory:
            raise ValueError(f"the prefix's {keep} kept frames reach past the {self.frames_in_memory} that can change; "
                             "pass next_overlap= to the last add_section call")
        region = self._edge
        if keep:
            region = blend(prefix.tail.to(device=region.device, dtype=region.dtype), region, keep)
        work = self._ensure_work_dir(path)
        joined = None
        try:
            with atomic_write(path) as tmp:
                if region is not None:
                    joined = self._encode_segment(region, work, "seg")
                segments = [s for s in [prefix.segment, joined] if s is not None] + self._segments
                total = _remux(segments, tmp, fps=self.fps, metadata=self.metadata)
        except BaseException:
            if joined is not None:
                _unlink_quietly(joined.path)
            raise
        expected = prefix.count + self.frames - keep
        if total != expected:  # pragma: no cover - guards the bookkeeping above
            raise RuntimeError(f"wrote {total} frames, expected {expected}")
        self._segments, self._edge, self._prefix, self.frames = segments, None, None, expected
        return path

    def _encode_stream_segment(self, frames: Iterator[np.ndarray], work: Path, kind: str) -> _Segment | None:
        """A segment of RGB uint8 frames encoded as they come (None when there are none)."""
        self._counter += 1
        seg_path = work / f"{self._counter:06d}-{kind}.mp4"

        def counted() -> Iterator[np.ndarray]:
            for frame in frames:
                self.frames_encoded += 1
                yield frame

        try:
            info = _encode_stream(counted(), seg_path, fps=self.fps, crf=self.crf)
            if info is None:
                _unlink_quietly(seg_path)
                return None
            if self._extradata is None:
                self._extradata = info.extradata
            elif info.extradata != self._extradata:
                # Joined segments share the first one's SPS/PPS, so they must be identical.
                raise RuntimeError("the encoder produced different stream parameters for a segment; cannot join")
        except BaseException:
            _unlink_quietly(seg_path)
            raise
        return _Segment(path=seg_path, frames=info.frames, delay=info.delay)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the segment files and drop the frames held; safe to call more than once."""
        self._closed = True
        self._edge = None
        self._segments = []
        self._prefix = None
        self._remove_work_dir()

    def __enter__(self) -> "SectionVideoWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
