"""Shared fixtures: tiny random-weight models in the official layouts (built once per session), a small
job's settings and a start image, the CLI's one-line errors, and the browser check.

The helpers for tests that drive the running app over HTTP or in a browser are in appkit.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from diffusers_helper.settings import GenerationSettings, ModelSources

# Small but complete: 3 sections of window 3 at the 64-px buckets, 3 steps each.
FAST = dict(prompt="a cat walks on the grass", seconds=1.2, window=3, steps=3, resolution=64, seed=7)


def random_transformer(double: int = 2, single: int = 2, seed: int = 0, std: float = 0.05):
    """A FramePack transformer of the tiny width with `double` and `single` blocks and every weight N(0, std²).

    diffusers zero-initialises the gates; random values everywhere make every block matter. Import it
    where a test needs a model of its own: `from conftest import random_transformer`.
    """
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from diffusers_helper.tiny import TRANSFORMER_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunyuanVideoFramepackTransformer3DModel(
            **{**TRANSFORMER_CONFIG, "num_layers": double, "num_single_layers": single})
        for p in model.parameters():
            p.data.normal_(0.0, std)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def fast() -> GenerationSettings:
    """Settings of a small but complete job (FAST): vary them with `fast.replace(model="f1", ...)`."""
    return GenerationSettings(**FAST)


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    """A 120×90 RGB start image of smooth gradients (fits the 64-px buckets with a crop)."""
    y, x = np.mgrid[0:90, 0:120]
    return np.stack([x * 2, y * 2, (x + y)], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Folder holding the session's tiny models (hunyuan/, siglip/, framepack/, f1/)."""
    from diffusers_helper.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models") / "models"
    write_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_sources(tiny_root) -> ModelSources:
    """ModelSources pointing at the session's tiny models (local folders, official layouts)."""
    from diffusers_helper.tiny import sources_at

    return sources_at(tiny_root)


@pytest.fixture(scope="session")
def tiny_shared(tiny_sources):
    """SharedComponents loaded once on the CPU in fp32. Shared by tests: do not modify them."""
    from diffusers_helper.loading import load_shared

    return load_shared(tiny_sources, "cpu")


@pytest.fixture(scope="session")
def run_alone(tiny_components, tmp_path_factory) -> Callable[..., dict]:
    """Factory: `run_alone(settings, prompts, image)` runs the job once per prompt, each alone in this
    process, and gives prompt -> its final video (the reference a queued or remote run must equal)."""
    from diffusers_helper.events import Finished
    from diffusers_helper.pipeline import generate

    def run(settings: GenerationSettings, prompts, image) -> dict:
        folder = tmp_path_factory.mktemp("alone")
        videos = {}
        for number, prompt in enumerate(prompts):
            out = folder / f"alone{number}.mp4"
            events = list(generate(tiny_components(settings.model), settings.replace(prompt=prompt), image, out))
            assert isinstance(events[-1], Finished), events[-1]
            videos[prompt] = out
        return videos

    return run


@pytest.fixture(scope="session")
def tiny_components(tiny_sources, tiny_shared) -> Callable[[str], object]:
    """Factory: `tiny_components("framepack" | "f1")` gives CPU fp32 Components, each variant loaded once.

    The shared components are the session's; the transformers are cached per variant. Do not modify them;
    load a private copy with `diffusers_helper.loading.load_transformer` when a test must.
    """
    from diffusers_helper.loading import Components, component_dtypes, load_transformer

    cache: dict[str, Components] = {}

    def get(model: str = "framepack") -> Components:
        if model not in cache:
            cache[model] = Components(
                shared=tiny_shared,
                transformer=load_transformer(tiny_sources.transformer(model), "cpu"),
                model=model,
                device=torch.device("cpu"),
                dtypes=component_dtypes("cpu"),
            )
        return cache[model]

    return get


@pytest.fixture(scope="session")
def transformer_inputs() -> Callable[..., dict]:
    """Factory: keyword arguments for one forward pass of a (tiny) FramePack transformer.

    `transformer_inputs(transformer, frames=2, height=8, width=8, dtype=torch.float32, seed=0)` gives
    noisy latents plus every conditioning input (text, pooled text, image embeddings, guidance and the
    clean/2x/4x history latents with their frame indices), shaped from the transformer's config.
    """

    def make(transformer, frames: int = 2, height: int = 8, width: int = 8, dtype: torch.dtype = torch.float32,
             seed: int = 0) -> dict:
        config = transformer.config
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(dtype)

        channels = config.in_channels
        text_tokens = 7
        return dict(
            hidden_states=randn(1, channels, frames, height, width),
            timestep=torch.tensor([700.0]),
            encoder_hidden_states=randn(1, text_tokens, config.text_embed_dim),
            encoder_attention_mask=torch.ones(1, text_tokens, dtype=torch.bool),
            pooled_projections=randn(1, config.pooled_projection_dim),
            image_embeds=randn(1, 16, config.image_proj_dim),
            # Frame indices are 1-D (diffusers' FramePack RoPE builds one grid for the batch).
            # FramePack-like layout: start frame 0, 4x history 1-16, 2x history 17-18, 1x 19, then the new frames.
            indices_latents=torch.arange(20, 20 + frames),
            guidance=torch.tensor([10.0 * 1000.0]),
            latents_clean=randn(1, channels, 2, height, width),
            indices_latents_clean=torch.tensor([0, 19]),
            latents_history_2x=randn(1, channels, 2, height, width),
            indices_latents_history_2x=torch.tensor([17, 18]),
            latents_history_4x=randn(1, channels, 16, height, width),
            indices_latents_history_4x=torch.arange(1, 17),
            return_dict=False,
        )

    return make


@pytest.fixture(scope="session")
def browser_ready():
    """Skip a browser test when Playwright or Chromium is missing; fail instead under FRAMEPACK_REQUIRE_BROWSER=1 (CI)."""
    from appkit import browser_missing

    reason = browser_missing()
    if reason:
        if os.environ.get("FRAMEPACK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FRAMEPACK_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture
def cli_error(capsys) -> Callable[[list], str]:
    """Run the CLI on argv expecting a user error: exit status 2 and one line on stderr, which is returned."""
    from diffusers_helper.__main__ import main

    def run(argv: list) -> str:
        with pytest.raises(SystemExit) as exc:
            raise SystemExit(main(argv))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        return err

    return run
