"""bench-long: one fresh process per length, figures for each, one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_helper.__main__ import main
from diffusers_helper.bench.long_video import bench_image, parse_lengths, summarize
from diffusers_helper.conditioning import find_nearest_bucket
from diffusers_helper.settings import GenerationSettings

# the app, a fresh process or a browser per test: run with the full suite, not the quick one
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _source_flags(tiny_sources, model="framepack"):
    return ["--hunyuan", str(tiny_sources.hunyuan), "--siglip", str(tiny_sources.siglip),
            "--transformer", str(tiny_sources.transformer(model))]


@pytest.fixture(scope="module")
def small_run(tiny_sources, tmp_path_factory):
    """One real bench-long run with two short lengths at a tiny resolution, as a user would start it."""
    out_dir = tmp_path_factory.mktemp("bench") / "videos"
    command = [sys.executable, "-m", "diffusers_helper", "bench-long", "--seconds", "2,1", "--resolution", "64",
               "--window", "2", "--steps", "1", "--device", "cpu", "--output-dir", str(out_dir),
               *_source_flags(tiny_sources)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    return proc, out_dir


def test_exits_0_and_prints_one_json_document(small_run):
    proc, _ = small_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [r["seconds"] for r in report["lengths"]] == [1.0, 2.0]  # sorted, each once
    assert report["settings"]["resolution"] == 64 and report["settings"]["window"] == 2


def test_each_length_has_its_figures(small_run):
    proc, _ = small_run
    report = json.loads(proc.stdout)
    for r in report["lengths"]:
        expected = GenerationSettings(seconds=r["seconds"], window=2)
        assert r["sections"] == expected.sections
        assert r["frames"] == r["expected_frames"] == expected.total_frames
        overlap = 2 * 4 - 3
        assert r["overlap"] == overlap
        # every frame is encoded once, plus at most one overlap per section
        assert expected.total_frames <= r["frames_encoded"] <= expected.total_frames + overlap * expected.sections
        assert r["max_frames_in_memory"] <= overlap
        assert r["peak_rss_kib"] > 0 and r["peak_rss_mib"] > 0
        assert r["sampled_peak_rss_mib"] is None or r["sampled_peak_rss_mib"] > 0
        assert len(r["section_s"]) == r["sections"] and all(t > 0 for t in r["section_s"])
        assert r["second_section_s"] == r["section_s"][1] and r["last_section_s"] == r["section_s"][-1]
        assert r["last_over_second"] == pytest.approx(r["last_section_s"] / r["second_section_s"], rel=0.01)
        # the sections are the job: the first starts at the job's start, the last ends before Finished
        assert sum(r["section_s"]) <= r["total_s"] + 1e-3
        for phase in ("sample", "decode", "write", "save_latents", "remux"):
            assert len(r["phases_s"][phase]) == r["sections"], phase
        assert len(r["section_cpu_s"]) == r["sections"] and all(t >= 0 for t in r["section_cpu_s"])
        assert len(r["video_mib_after_section"]) == r["sections"] and r["video_mib_after_section"][-1] > 0
        assert r["peak_rss_mib"] >= max(r["section_peak_rss_mib"]) - 0.1
        for name in ("rss_after_section_mib", "section_peak_rss_mib"):
            assert len(r[name]) == r["sections"] and all(v is None or 0 < v <= r["peak_rss_mib"] + 1 for v in r[name])


def test_summary_compares_shortest_and_longest(small_run):
    proc, _ = small_run
    report = json.loads(proc.stdout)
    short, long = report["lengths"]
    growth = report["summary"]["rss_growth"]
    assert (growth["from_seconds"], growth["to_seconds"]) == (1.0, 2.0)
    assert growth["mib"] == pytest.approx((long["peak_rss_kib"] - short["peak_rss_kib"]) / 1024, abs=0.1)
    assert report["summary"]["last_over_second"] == {"1": short["last_over_second"], "2": long["last_over_second"]}
    assert isinstance(report["summary"]["targets"]["rss_growth_met"], bool)
    # the growth is broken down: history latents (by design), RSS kept after the last section, late peaks
    assert growth["history_latents_mib"] == pytest.approx(long["history_latents_mib"] - short["history_latents_mib"], abs=0.06)
    assert long["history_latents_mib"] > short["history_latents_mib"] > 0
    for name in ("after_last_section_mib", "late_section_peaks_median_mib"):
        assert isinstance(growth[name], float), name


def test_videos_are_deleted_without_keep(small_run):
    _, out_dir = small_run
    assert out_dir.is_dir()
    assert not any(out_dir.iterdir()), sorted(p.name for p in out_dir.iterdir())


def test_keep_leaves_the_videos(tiny_sources, tmp_path, capsys, cli_error):
    out_dir = tmp_path / "kept"
    code = main(["bench-long", "--seconds", "1", "--resolution", "64", "--window", "3", "--steps", "1",
                 "--output-dir", str(out_dir), "--keep", *_source_flags(tiny_sources, "f1"), "--model", "f1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    (result,) = report["lengths"]
    video = Path(result["video"])
    assert video.is_file() and video.parent == out_dir
    assert result["frames"] == GenerationSettings(seconds=1, window=3).total_frames
    assert result["last_over_second"] is None or result["sections"] > 1
    # a second run into the same folder refuses to overwrite, before running anything
    err = cli_error(["bench-long", "--seconds", "1", "--resolution", "64", "--window", "3",
                                   "--output-dir", str(out_dir), "--model", "f1", *_source_flags(tiny_sources, "f1")])
    assert "already exists" in err



@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--seconds", "0"], "seconds"),
        (["--seconds", "10,,30"], "seconds"),
        (["--seconds", "ten"], "seconds"),
        (["--seconds", "10,10"], "twice"),
        (["--seconds", "121"], "seconds"),
        (["--window", "0"], "window"),
        (["--steps", "1.5"], "steps"),
        (["--resolution", "abc"], "resolution"),
        (["--model", "sdxl"], "model"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_sources, extra, fragment, cli_error):
    err = cli_error(["bench-long", *_source_flags(tiny_sources), *extra])
    assert fragment in err


def test_bad_arguments_exit_2_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "diffusers_helper", "bench-long", "--seconds", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "seconds" in lines[0]


def test_missing_model_folder_is_a_user_error(tmp_path, tiny_sources, cli_error):
    err = cli_error(["bench-long", "--seconds", "1", "--hunyuan", str(tmp_path / "nowhere"),
                                   "--siglip", str(tiny_sources.siglip),
                                   "--transformer", str(tiny_sources.transformer("framepack"))])
    assert "nowhere" in err


def test_parse_lengths_sorts_and_validates():
    assert parse_lengths("60, 10,30") == [10.0, 30.0, 60.0]
    assert parse_lengths("1.5") == [1.5]
    for bad in ("", ",", "0", "10;30", "nan"):
        with pytest.raises(ValueError):
            parse_lengths(bad)


def test_bench_image_lands_in_the_640_bucket():
    image = bench_image()
    assert image.shape == (600, 800, 3) and image.dtype.name == "uint8"
    assert image.std() > 20  # not a flat picture
    height, width = find_nearest_bucket(*image.shape[:2], 640)
    assert (height, width) == (544, 704)


def test_summary_of_given_figures():
    results = [
        {"seconds": 10.0, "last_over_second": 1.05, "peak_rss_kib": 1000 * 1024, "section_s": [3.0, 2.0, 2.1, 2.0]},
        {"seconds": 60.0, "last_over_second": 1.25, "peak_rss_kib": 1200 * 1024,
         "section_s": [3.0, 2.0, 2.2, 1.9, 2.0, 9.0, 2.2, 2.5],
         "phases_s": {"write": [1.0, 1.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2]}},
    ]
    summary = summarize(results)
    # medians of three: one slow section (9.0) does not move them
    assert summary["late_over_early_median"] == {"10": 1.0, "60": pytest.approx(2.5 / 2.0)}
    assert summary["phases_second_last_s"]["60"] == {"write": [1.1, 1.2]}
    assert summary["worst_last_over_second"] == 1.25
    assert summary["rss_growth"]["mib"] == 200.0
    assert summary["rss_growth"]["mb"] == pytest.approx(209.7, abs=0.1)
    assert summary["targets"]["last_over_second_met"] is False
    assert summary["targets"]["rss_growth_met"] is True
