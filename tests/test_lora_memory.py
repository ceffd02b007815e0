"""What a LoRA costs in system RAM, measured (not timed): applying one adds about its own size of private
memory, the base weights stay the memory-mapped checkpoint, and a streamed (low-VRAM) call adds no more
than the LoRA's factors. Run with -s to see the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(),
                                 reason="needs Linux's /proc/self/smaps_rollup")]

MIB = 1024**2

CODE = r"""
import gc, json, re, sys, threading, time, torch
from pathlib import Path
from safetensors.torch import save_file
from diffusers import HunyuanVideoFramepackTransformer3DModel as T
from diffusers_helper.loading import load_transformer
from diffusers_helper.lora import LoraManager, lora_targets
from diffusers_helper.memory import Placement, VramMode, release_host_memory
from diffusers_helper.offload import module_tensors, streamable_blocks, tensors_bytes

def anon():
    gc.collect()
    release_host_memory()  # freed memory back to the system, so that what is counted is what is held
    t = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Anonymous:\s+(\d+) kB", t, re.M).group(1)) * 1024

def sampled():
    t = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Anonymous:\s+(\d+) kB", t, re.M).group(1)) * 1024

class Peak:
    # the highest private memory seen by a thread sampling every millisecond while the block runs
    def __enter__(self):
        self.peak, self.running = anon(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self
    def sample(self):
        while self.running:
            self.peak = max(self.peak, sampled())
            time.sleep(0.001)
    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, sampled())

folder, rank = Path(sys.argv[1]), int(sys.argv[2])
cfg = dict(num_attention_heads=8, attention_head_dim=64, num_layers=2, num_single_layers=6, num_refiner_layers=1,
           text_embed_dim=256, pooled_projection_dim=64, has_image_proj=True, image_proj_dim=64,
           has_clean_x_embedder=True, rope_axes_dim=(8, 28, 28))
with torch.device("meta"):
    meta = T(**cfg)
model = T.from_config(meta.config).to(torch.bfloat16)
model.save_pretrained(folder / "model")
model_bytes = sum(t.numel() * 2 for t in model.parameters())
# a rank-`rank` LoRA on every linear layer of the blocks, kohya style, in bf16
g = torch.Generator().manual_seed(0)
sd = {}
for name, target in lora_targets(model).items():
    if "transformer_blocks" in name and len(target.shape) == 2:
        key = "lora_unet_" + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = (torch.randn(rank, target.shape[1], generator=g) * 0.01).to(torch.bfloat16)
        sd[key + ".lora_up.weight"] = (torch.randn(target.shape[0], rank, generator=g) * 0.01).to(torch.bfloat16)
        sd[key + ".alpha"] = torch.tensor(float(rank))
lora_path = folder / "lora.safetensors"
save_file(sd, str(lora_path))
lora_bytes = sum(t.numel() * t.element_size() for t in sd.values())
largest_block_bytes = max(tensors_bytes(module_tensors(b)) for b in streamable_blocks(model))
del model, sd
gc.collect()

t = load_transformer(str(folder / "model"), "cpu", dtype=torch.bfloat16)
sum(float(p.float().sum()) for p in t.parameters())  # every page of the weights read once
blocks = streamable_blocks(t)
inputs = dict(hidden_states=torch.randn(1, 16, 2, 16, 16, dtype=torch.bfloat16), timestep=torch.tensor([700.0]),
              encoder_hidden_states=torch.randn(1, 7, 256, dtype=torch.bfloat16),
              encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool),
              pooled_projections=torch.randn(1, 64, dtype=torch.bfloat16),
              image_embeds=torch.randn(1, 16, 64, dtype=torch.bfloat16), indices_latents=torch.arange(20, 22),
              guidance=torch.tensor([10000.0]), latents_clean=torch.randn(1, 16, 2, 16, 16, dtype=torch.bfloat16),
              indices_latents_clean=torch.tensor([0, 19]),
              latents_history_2x=torch.randn(1, 16, 2, 16, 16, dtype=torch.bfloat16),
              indices_latents_history_2x=torch.tensor([17, 18]),
              latents_history_4x=torch.randn(1, 16, 16, 16, 16, dtype=torch.bfloat16),
              indices_latents_history_4x=torch.arange(1, 17), return_dict=False)

def streamed_call():
    sizes = [tensors_bytes(module_tensors(b)) for b in blocks]
    fixed = tensors_bytes(module_tensors(t)) - sum(sizes)
    placement = Placement(torch.device("cpu"), VramMode.LOW, available=lambda: fixed + 2 * max(sizes))
    gc.collect()
    before = anon()
    with Peak() as peak, placement.use(t):  # as the pipeline calls it: no torch.no_grad()
        t(**inputs)
    gc.collect()
    return peak.peak - before, placement.stats.streamed_loads

base_call, _ = streamed_call()
gc.collect()
before = anon()
manager = LoraManager()
with Peak() as peak:
    manager.apply(t, [(str(lora_path), 1.0)], torch.bfloat16)
gc.collect()
applied, apply_peak = anon() - before, peak.peak - before
lora_call, streamed = streamed_call()
pointers_mapped = all(p.data_ptr() for p in t.parameters())
manager.apply(t, [], torch.bfloat16)
after_removal = anon() - before
for _ in range(3):  # switching on and off again, as jobs do
    manager.apply(t, [(str(lora_path), 0.5)], torch.bfloat16)
    manager.apply(t, [], torch.bfloat16)
after_cycles = anon() - before
print(json.dumps(dict(model_bytes=model_bytes, lora_bytes=lora_bytes, largest_block_bytes=largest_block_bytes,
                      applied=applied, apply_peak=apply_peak, base_call_peak=base_call, lora_call_peak=lora_call,
                      streamed_loads=streamed, after_removal=after_removal, after_cycles=after_cycles)))
"""


def test_a_lora_costs_about_its_own_size_in_ram(tmp_path):
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path), "128"], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = {k: round(v / MIB, 1) for k, v in r.items() if k != "streamed_loads"}
    print("\nLoRA memory (MiB):", json.dumps(mib))
    assert r["lora_bytes"] > 20 * MIB and r["streamed_loads"] > 0
    # applied: the factors stay, in the model's dtype (bf16 like the file): the LoRA's own size
    assert r["applied"] < 1.1 * r["lora_bytes"] + 8 * MIB, mib
    # while applying: the LoRA plus the tensors of one layer being converted, never a copy of the base weights
    assert r["apply_peak"] < 1.1 * r["lora_bytes"] + r["largest_block_bytes"] + 8 * MIB, mib
    # a streamed call carries the factors with their blocks: no more than the LoRA beyond the call without it
    assert r["lora_call_peak"] < r["base_call_peak"] + r["lora_bytes"] + 8 * MIB, mib
    # without LoRAs again, its memory goes back (but for the allocator's scraps), and switching leaks nothing
    assert r["after_removal"] < 0.5 * r["lora_bytes"] + 8 * MIB, mib
    assert r["after_cycles"] < r["after_removal"] + 4 * MIB, mib
