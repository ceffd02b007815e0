"""Tests for MP4 writing and section blending (diffusers_helper.video).

Content is smooth synthetic video at 64x64. A grey band at the top of every frame carries the
frame's global index as brightness (the same in every section, so blending leaves it alone) and
lets the tests check frame order after compression (4 levels per frame: indices 0..63); the rest is a colourful pattern that differs
between sections, so the cross-fades really mix different pixels.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from diffusers_helper import video
from diffusers_helper.video import (
    SectionVideoWriter,
    blend,
    effective_crf,
    read_frames,
    read_metadata,
    to_uint8_frames,
    write_mp4,
)

H, W = 64, 64
BAND = 16  # rows of the grey index band


# ---------------------------------------------------------------------------------------------
# Synthetic content and an independent reference
# ---------------------------------------------------------------------------------------------


def make_section(first_index: int, length: int, section_id: int, dtype=torch.float32) -> torch.Tensor:
    """Frames ``first_index .. first_index+length-1`` of a smooth video; colours depend on the section."""
    t = torch.arange(first_index, first_index + length, dtype=torch.float64).view(1, 1, length, 1, 1)
    y = torch.linspace(-1, 1, H, dtype=torch.float64).view(1, 1, 1, H, 1)
    x = torch.linspace(-1, 1, W, dtype=torch.float64).view(1, 1, 1, 1, W)
    phase = 0.9 * section_id
    r = 0.45 * torch.sin(1.5 * x + 0.08 * t + phase) + 0.2 * y
    g = 0.40 * torch.cos(1.2 * y - 0.05 * t + phase) + 0.1 * x
    b = 0.35 * torch.sin(0.9 * (x + y) + 0.06 * t - phase)
    px = torch.cat(torch.broadcast_tensors(r, g, b), dim=1).clone()
    level = 4 * t + 2  # uint8 brightness of the band; +0.5 so truncation lands exactly on it
    px[:, :, :, :BAND, :] = ((level + 0.5) / 127.5 - 1).expand(1, 3, length, BAND, W)
    return px.to(dtype)


def reference_join(video_so_far, section, overlap, direction):
    """The blended video over the whole sequence, with plain torch ops (independent of video.blend)."""
    if video_so_far is None:
        return section
    first, second = (video_so_far, section) if direction == "append" else (section, video_so_far)
    if overlap == 0:
        return torch.cat([first, second], dim=2)
    w = torch.linspace(1, 0, overlap, dtype=first.dtype, device=first.device).view(1, 1, -1, 1, 1)
    mid = w * first[:, :, -overlap:] + (1 - w) * second[:, :, :overlap]
    return torch.cat([first[:, :, :-overlap], mid, second[:, :, overlap:]], dim=2)


def section_starts(lengths, overlaps, direction):
    """Global index of each section's first frame, so the index band is continuous over the video."""
    total = lengths[0]
    starts = [0]
    for length, overlap in zip(lengths[1:], overlaps[1:]):
        if direction == "append":
            starts.append(total - overlap)
        else:
            # Prepended sections get lower indices; shift everything afterwards.
            starts.append(-(length - overlap) + min(starts))
        total += length - overlap
    base = -min(starts)
    return [s + base for s in starts]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def band_indices(frames: np.ndarray) -> np.ndarray:
    """Decode the grey band back to frame indices (robust to compression: 4 levels per frame)."""
    level = frames[:, 2 : BAND - 2, 2:-2, :].astype(np.float64).mean(axis=(1, 2, 3))
    return np.rint((level - 2) / 4).astype(int)


def run_job(tmp_path, direction, lengths, overlaps, *, hints=False, dtype=torch.float32, device="cpu", **writer_kwargs):
    """Feed sections to a writer; return (final path, partial paths, reference videos, writer stats)."""
    starts = section_starts(lengths, overlaps, direction)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    partials, references, held, edges_ok = [], [], [], []
    full = None
    with SectionVideoWriter(direction=direction, **writer_kwargs) as writer:
        for k, (length, overlap) in enumerate(zip(lengths, overlaps)):
            section = make_section(starts[k], length, k, dtype).to(device)
            full = reference_join(full, section, overlap, direction)
            next_overlap = (overlaps[k + 1] if k + 1 < len(overlaps) else 0) if hints else None
            path = writer.add_section(section, overlap, out / f"part{k:02d}.mp4", next_overlap=next_overlap)
            assert writer.frames == full.shape[2]
            partials.append(path)
            references.append(full)
            held.append(writer.frames_in_memory)
            # The frames kept for blending are bit-identical to the reference's edge.
            n = writer.frames_in_memory
            if n:
                edge = full[:, :, -n:] if direction == "append" else full[:, :, :n]
                edges_ok.append(torch.equal(writer._edge, edge.cpu()))
        stats = {"frames": writer.frames, "encoded": writer.frames_encoded, "held": held, "edges_ok": edges_ok}
        work = writer.work_dir
    assert work is None or not work.exists(), "segments must be removed on exit"
    return partials[-1], partials, references, stats


# ---------------------------------------------------------------------------------------------
# MP4 structure helpers
# ---------------------------------------------------------------------------------------------

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def mp4_boxes(data: bytes, start=0, end=None, depth=0):
    """(depth, type, payload) for every box, descending into the sample-table containers."""
    end = len(data) if end is None else end
    out = []
    while start < end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[start + 8 : start + 16])[0], 16
        elif size == 0:
            size = end - start
        out.append((depth, kind.decode("latin-1"), data[start + header : start + size]))
        if kind in _CONTAINER_BOXES:
            out += mp4_boxes(data, start + header, start + size, depth + 1)
        start += size
    return out


def check_mp4(path: Path, frames: int, fps: int = 30) -> None:
    """Faststart, one track, uniform frame durations, and a decodable stream of ``frames`` frames."""
    boxes = mp4_boxes(path.read_bytes())
    top = [kind for depth, kind, _ in boxes if depth == 0]
    assert "moov" in top and "mdat" in top and top.index("moov") < top.index("mdat"), top
    (stts,) = [payload for _, kind, payload in boxes if kind == "stts"]
    (entries,) = struct.unpack(">I", stts[4:8])
    count, _ = struct.unpack(">II", stts[8:16])
    assert entries == 1 and count == frames, "every frame must last exactly one frame time"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.profile == "High"
        assert stream.average_rate == fps
        packets = [p for p in container.demux(stream) if p.size]
        tb = stream.time_base
        pts = sorted(round(p.pts * tb * fps) for p in packets)
        dts = [round(p.dts * tb * fps) for p in packets]
        assert pts == list(range(frames))
        assert all(b - a == 1 for a, b in zip(dts, dts[1:]))
        assert all(p.dts <= p.pts for p in packets)
        assert packets[0].is_keyframe
    decoded = read_frames(path)
    assert decoded.shape == (frames, H, W, 3)


def stray_files(folder: Path, keep: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------
# Pixels and blending
# ---------------------------------------------------------------------------------------------


def test_to_uint8_frames_truncates_like_reference():
    px = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 3.0]).view(1, 1, 7, 1, 1).expand(1, 3, 7, 2, 2)
    frames = to_uint8_frames(px.half())
    assert frames.shape == (7, 2, 2, 3) and frames.dtype == np.uint8
    expected = (torch.clamp(px.half().float(), -1, 1) * 127.5 + 127.5).to(torch.uint8)
    assert np.array_equal(frames, expected[0].permute(1, 2, 3, 0).numpy())
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 63, 127, 165, 255, 255]
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(3, 4, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_to_uint8_frames_is_bit_exact(dtype):
    px = (torch.randn(1, 3, 19, 6, 4, generator=torch.Generator().manual_seed(0)) * 0.8).to(dtype)
    reference = (torch.clamp(px.float(), -1, 1) * 127.5 + 127.5).to(torch.uint8)[0].permute(1, 2, 3, 0)
    assert np.array_equal(to_uint8_frames(px), reference.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("overlap", [0, 1, 5])
def test_blend_matches_plain_torch(dtype, overlap):
    a = make_section(0, 9, 0, dtype)
    b = make_section(9 - overlap, 7, 1, dtype)
    got = blend(a, b, overlap)
    assert got.dtype == dtype and got.shape[2] == 9 + 7 - overlap
    assert torch.equal(got, reference_join(a, b, overlap, "append"))
    assert torch.equal(got[:, :, : 9 - overlap], a[:, :, : 9 - overlap])
    assert torch.equal(got[:, :, 9:], b[:, :, overlap:])


def test_blend_rejects_bad_overlap():
    a, b = make_section(0, 4, 0), make_section(0, 6, 1)
    with pytest.raises(ValueError):
        blend(a, b, 5)
    with pytest.raises(ValueError):
        blend(a, b.half(), 2)


def test_effective_crf_rule():
    assert effective_crf(0) == 1  # lossless CRF 0 would be High 4:4:4, unplayable in browsers
    assert effective_crf(1) == 1
    assert effective_crf(16) == 16
    assert effective_crf(100) == 51  # x264's own ceiling
    for bad in (-1, 1.5, "16", True):
        with pytest.raises(ValueError):
            effective_crf(bad)


# ---------------------------------------------------------------------------------------------
# One-pass files
# ---------------------------------------------------------------------------------------------


def test_write_mp4_roundtrip_metadata_and_no_overwrite(tmp_path):
    frames = to_uint8_frames(make_section(0, 12, 0))
    meta = {"prompt": "a cat, dancing\nsecond line — ünïcode", "seed": "31337", "comment": "framepack"}
    path = write_mp4(frames, tmp_path / "a.mp4", crf=16, metadata=meta)
    check_mp4(path, 12)
    assert psnr(read_frames(path), frames) >= 40
    assert band_indices(read_frames(path)).tolist() == list(range(12))
    got = read_metadata(path)
    assert {k: got[k] for k in meta} == meta
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_mp4(frames, path)
    assert path.read_bytes() == before
    assert stray_files(tmp_path) == ["a.mp4"]


def test_odd_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((2, 63, 64, 3), np.uint8), tmp_path / "odd.mp4")
    with SectionVideoWriter(direction="append") as writer:
        with pytest.raises(ValueError, match="even"):
            writer.add_section(torch.zeros(1, 3, 4, 64, 63), 0, tmp_path / "odd2.mp4")
    assert stray_files(tmp_path) == []


def test_crf0_stays_in_high_profile(tmp_path):
    frames = to_uint8_frames(make_section(0, 6, 0))
    one_pass = write_mp4(frames, tmp_path / "one.mp4", crf=0)
    with SectionVideoWriter(direction="append", crf=0) as writer:
        writer.add_section(make_section(0, 6, 0), 0, tmp_path / "s0.mp4")
        joined = writer.add_section(make_section(3, 6, 1), 3, tmp_path / "s1.mp4")
    for path in (one_pass, joined):
        with av.open(str(path)) as container:
            profile = container.streams.video[0].codec_context.profile
        assert profile == "High", profile
        assert "4:4:4" not in profile


# ---------------------------------------------------------------------------------------------
# Section by section
# ---------------------------------------------------------------------------------------------

JOBS = [
    # (lengths, overlaps): a first section of its own length, then sections of 13 sharing 5 frames
    ([9, 13, 13, 13], [0, 5, 5, 5]),
    ([17, 13, 13, 13, 13, 13], [0, 5, 5, 5, 5, 5]),
    ([13], [0]),
    ([6, 10, 7], [0, 6, 3]),  # varying lengths and shrinking overlaps
]


@pytest.mark.parametrize("direction", ["append", "prepend"])
@pytest.mark.parametrize("lengths,overlaps", JOBS)
def test_sections_give_the_blended_video(tmp_path, direction, lengths, overlaps):
    final, partials, references, stats = run_job(tmp_path, direction, lengths, overlaps, metadata={"job": "x"})
    expected = to_uint8_frames(references[-1])
    total = sum(lengths) - sum(overlaps)
    assert stats["frames"] == total == len(expected)
    assert all(stats["edges_ok"])
    check_mp4(final, total)

    decoded = read_frames(final)
    # Order and count, from the index band.
    assert band_indices(decoded).tolist() == list(range(total))
    # Pixels: the blended sequence, within codec tolerance.
    assert psnr(decoded, expected) >= 40
    # Same quality as a one-pass encoding of the same frames.
    one_pass = read_frames(write_mp4(expected, tmp_path / "one_pass.mp4"))
    assert len(one_pass) == total
    assert psnr(decoded, expected) >= psnr(one_pass, expected) - 1.0

    # Encoding cost: the final frames once, plus the edge kept after each section but the last.
    assert stats["encoded"] == total + sum(stats["held"][:-1])
    assert read_metadata(final)["job"] == "x"


@pytest.mark.parametrize("direction", ["append", "prepend"])
def test_partials_are_playable_prefixes_or_suffixes(tmp_path, direction):
    lengths, overlaps = [9, 13, 13, 13, 13], [0, 5, 5, 5, 5]
    final, partials, references, stats = run_job(tmp_path, direction, lengths, overlaps, hints=True)
    final_frames = read_frames(final)
    for k, (path, reference) in enumerate(zip(partials, references)):
        n = reference.shape[2]
        check_mp4(path, n)
        frames = read_frames(path)
        assert psnr(frames, to_uint8_frames(reference)) >= 40
        # Frames outside the edge kept for blending are final: decoded bit-identically later on.
        stable = n - stats["held"][k]
        if direction == "append":
            assert np.array_equal(frames[:stable], final_frames[:stable])
            assert band_indices(frames).tolist() == list(range(n))
        else:
            assert np.array_equal(frames[n - stable :], final_frames[len(final_frames) - stable :])
            offset = len(final_frames) - n
            assert band_indices(frames).tolist() == list(range(offset, offset + n))
        assert read_metadata(path) == read_metadata(final)


@pytest.mark.parametrize("direction", ["append", "prepend"])
def test_frames_encoded_bound_with_known_overlap(tmp_path, direction):
    lengths, overlaps = [13, 13, 13, 13], [0, 5, 5, 5]
    _, _, _, stats = run_job(tmp_path, direction, lengths, overlaps, hints=True)
    assert stats["encoded"] <= stats["frames"] + 5 * len(lengths)
    assert stats["encoded"] == stats["frames"] + sum(overlaps)  # the edge of 5 re-encoded 3 times
    assert stats["held"] == [5, 5, 5, 0]


def test_fp16_sections(tmp_path):
    final, _, references, stats = run_job(tmp_path, "prepend", [9, 13, 13], [0, 5, 5], dtype=torch.float16)
    assert all(stats["edges_ok"]) and stats["edges_ok"]
    assert psnr(read_frames(final), to_uint8_frames(references[-1])) >= 40


def test_other_frame_rate(tmp_path):
    with SectionVideoWriter(direction="append", fps=24) as writer:
        writer.add_section(make_section(0, 9, 0), 0, tmp_path / "a.mp4")
        path = writer.add_section(make_section(4, 13, 1), 5, tmp_path / "b.mp4")
    check_mp4(path, 17, fps=24)
    assert band_indices(read_frames(path)).tolist() == list(range(17))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pixels_on_cuda(tmp_path):
    final, _, references, stats = run_job(
        tmp_path, "append", [9, 13, 13], [0, 5, 5], dtype=torch.float16, device="cuda"
    )
    assert all(stats["edges_ok"]) and stats["edges_ok"]
    assert psnr(read_frames(final), to_uint8_frames(references[-1])) >= 40


def test_memory_does_not_grow_with_sections(tmp_path):
    held = {}
    with SectionVideoWriter(direction="append", work_dir=tmp_path) as writer:
        start = 0
        for k in range(10):
            writer.add_section(make_section(start, 13, k), 0 if k == 0 else 5, tmp_path / f"m{k}.mp4")
            start += 13 - 5
            held[k + 1] = writer.frames_in_memory
            if k + 1 >= 2:
                assert writer.frames_in_memory == 5
        assert writer.segments == 9
    assert held[2] == held[10] == 5
    assert stray_files(tmp_path, {f"m{k}.mp4" for k in range(10)}) == []


def test_never_overwrites_and_keeps_state(tmp_path):
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"precious")
    with SectionVideoWriter(direction="append") as writer:
        writer.add_section(make_section(0, 9, 0), 0, tmp_path / "a.mp4")
        with pytest.raises(FileExistsError):
            writer.add_section(make_section(4, 13, 1), 5, taken)
        with pytest.raises(FileExistsError):
            writer.add_section(make_section(4, 13, 1), 5, tmp_path / "a.mp4")
        assert writer.frames == 9
        writer.add_section(make_section(4, 13, 1), 5, tmp_path / "b.mp4")
        assert writer.frames == 17
    assert taken.read_bytes() == b"precious"
    check_mp4(tmp_path / "b.mp4", 17)
    assert stray_files(tmp_path) == ["a.mp4", "b.mp4", "taken.mp4"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    real_remux = video._remux

    def broken_remux(segments, path, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError("disk full (injected)")

    with SectionVideoWriter(direction="prepend") as writer:
        monkeypatch.setattr(video, "_remux", broken_remux)
        with pytest.raises(OSError, match="injected"):
            writer.add_section(make_section(8, 9, 0), 0, tmp_path / "a.mp4")
        assert stray_files(tmp_path) == []  # not even the work folder
        monkeypatch.setattr(video, "_remux", real_remux)
        writer.add_section(make_section(8, 9, 0), 0, tmp_path / "a.mp4")
        monkeypatch.setattr(video, "_remux", broken_remux)
        with pytest.raises(OSError, match="injected"):
            writer.add_section(make_section(0, 13, 1), 5, tmp_path / "b.mp4")
        assert writer.frames == 9 and writer.segments == 0 and writer.frames_in_memory == 9
        monkeypatch.setattr(video, "_remux", real_remux)
        writer.add_section(make_section(0, 13, 1), 5, tmp_path / "b.mp4")
        assert band_indices(read_frames(tmp_path / "b.mp4")).tolist() == list(range(17))
        assert writer.segments == 1
        work = writer.work_dir
        assert len(list(work.iterdir())) == 1  # only the finished segment; no edges or leftovers
    assert stray_files(tmp_path) == ["a.mp4", "b.mp4"]


def test_target_appearing_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    real_remux = video._remux
    target = tmp_path / "race.mp4"

    def racing_remux(segments, path, **kwargs):
        frames = real_remux(segments, path, **kwargs)
        target.write_bytes(b"someone else")
        return frames

    monkeypatch.setattr(video, "_remux", racing_remux)
    with SectionVideoWriter(direction="append") as writer:
        with pytest.raises(FileExistsError):
            writer.add_section(make_section(0, 5, 0), 0, target)
    assert target.read_bytes() == b"someone else"
    assert stray_files(tmp_path) == ["race.mp4"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_folder_leaves_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            write_mp4(to_uint8_frames(make_section(0, 3, 0)), folder / "a.mp4")
        with SectionVideoWriter(direction="append") as writer:
            with pytest.raises(PermissionError):
                writer.add_section(make_section(0, 3, 0), 0, folder / "a.mp4")
        assert stray_files(folder) == []
    finally:
        folder.chmod(0o700)


def test_missing_folder_leaves_nothing(tmp_path):
    with SectionVideoWriter(direction="append", work_dir=tmp_path) as writer:
        with pytest.raises(FileNotFoundError):
            writer.add_section(make_section(0, 3, 0), 0, tmp_path / "missing" / "a.mp4")
        assert writer.frames == 0
    assert stray_files(tmp_path) == []


def test_close_is_idempotent_and_cleans_work_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    writer = SectionVideoWriter(direction="f1", work_dir=work)
    writer.add_section(make_section(0, 9, 0), 0, tmp_path / "a.mp4")
    writer.add_section(make_section(4, 13, 1), 5, tmp_path / "b.mp4")
    assert writer.work_dir.parent == work and any(writer.work_dir.iterdir())
    writer.close()
    writer.close()
    assert list(work.iterdir()) == []  # our private folder is gone, the given one is kept
    with pytest.raises(RuntimeError):
        writer.add_section(make_section(0, 9, 0), 0, tmp_path / "c.mp4")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        SectionVideoWriter(direction="sideways")
    with pytest.raises(ValueError):
        SectionVideoWriter(direction="append", metadata={"k": 1})
    with SectionVideoWriter(direction="append") as writer:
        with pytest.raises(ValueError, match="first section"):
            writer.add_section(make_section(0, 9, 0), 3, tmp_path / "a.mp4")
        writer.add_section(make_section(0, 9, 0), 0, tmp_path / "a.mp4", next_overlap=4)
        with pytest.raises(ValueError, match="can still change"):
            writer.add_section(make_section(3, 9, 1), 6, tmp_path / "b.mp4")
        with pytest.raises(ValueError, match="section"):
            writer.add_section(make_section(0, 3, 1), 4, tmp_path / "b.mp4")
        with pytest.raises(ValueError):
            writer.add_section(torch.zeros(1, 3, 4, 32, 32), 0, tmp_path / "b.mp4")
        assert writer.frames == 9
    assert stray_files(tmp_path) == ["a.mp4"]
