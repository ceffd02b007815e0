"""`bench --tiny --mode low` with the speed options: fp8 cuts the bytes streamed per step to what its layout
predicts (about half on the tiny model), MagCache computes fewer steps, and every figure is reported."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_helper.fp8 import apply_fp8
from diffusers_helper.offload import module_tensors, streamable_blocks, tensors_bytes

pytestmark = pytest.mark.slow  # a fresh process per run

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("seconds_per_step", "bytes_streamed_per_step", "peak_gpu_bytes", "peak_private_bytes", "steps_computed",
          "steps_skipped", "cache", "fp8", "compile")


def _bench(weights: Path, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "diffusers_helper", "bench", "--tiny", "--mode", "low",
                           "--weights-dir", str(weights), "--steps", "8", *flags],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert not [f for f in FIELDS if f not in result]
    return result


def test_fp8_and_magcache_in_the_bench(tmp_path, tiny_components):
    plain = _bench(tmp_path / "w")
    fp8 = _bench(tmp_path / "w", "--fp8")
    magcache = _bench(tmp_path / "w", "--cache", "magcache")
    assert plain["fp8"] is False and fp8["fp8"] is True and magcache["cache"] == "magcache"
    assert plain["steps_computed"] == fp8["steps_computed"] == 8 and plain["steps_skipped"] == 0

    # what the fp8 layout predicts: the tiny transformer's blocks (float32 on the CPU) with fp8 weights
    transformer = copy.deepcopy(tiny_components("framepack").transformer)
    before = sum(tensors_bytes(module_tensors(b)) for b in streamable_blocks(transformer))
    apply_fp8(transformer)
    after = sum(tensors_bytes(module_tensors(b)) for b in streamable_blocks(transformer))
    ratio = fp8["bytes_streamed_per_step"] / plain["bytes_streamed_per_step"]
    assert ratio == pytest.approx(after / before, rel=0.03)
    assert ratio < 0.56  # 0.54 here: the biases, norms and modulation stay float32

    # MagCache's published FramePack ratios, stretched to 8 steps: the retained first and the last step computed
    assert magcache["steps_skipped"] > 0 and magcache["steps_computed"] + magcache["steps_skipped"] == 8
    assert magcache["bytes_streamed_sampling"] < plain["bytes_streamed_sampling"]
