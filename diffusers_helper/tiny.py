"""Tiny random-weight components in the official folder layouts, for tests and offline demos.

`write_tiny_models(root)` writes every component FramePack loads (LLaMA and CLIP text encoders
with their tokenizers, the HunyuanVideo VAE, the SigLIP image encoder and processor, and both
transformer variants) with the same files, class names and subfolders as the official
repositories, so the real loading code reads them through exactly the same `from_pretrained`
calls. Everything is tiny enough to build in seconds and to run on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .outputs import atomic_write
from .settings import ModelSources

# Bump when the tiny models change shape, so stale caches are not reused.
TINY_VERSION = "v1"

# Hidden sizes are all different on purpose: a wiring mistake between components
# (say, CLIP features fed where LLaMA features belong) fails with a shape error.
LLAMA_HIDDEN = 40
CLIP_HIDDEN = 24
SIGLIP_HIDDEN = 48
SIGLIP_IMAGE_SIZE = 32
SIGLIP_PATCH = 8

TRANSFORMER_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=LLAMA_HIDDEN,
    pooled_projection_dim=CLIP_HIDDEN,
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),
    has_image_proj=True,
    image_proj_dim=SIGLIP_HIDDEN,
    has_clean_x_embedder=True,
)

# What the official FramePack checkpoints declare; diffusers' Framepack class loads them as they are.
OFFICIAL_TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModelPacked"
OFFICIAL_DIFFUSERS_VERSION = "0.33.0.dev0"

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
    up_block_types=("HunyuanVideoUpBlock3D",) * 4,
    # Four levels as the real VAE (8x spatial, 4x temporal), but only a few channels:
    # its 3D convolutions at full resolution dominate the cost on a CPU.
    block_out_channels=(4, 4, 8, 8),
    layers_per_block=1,
    act_fn="silu",
    norm_num_groups=2,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)

HUNYUAN_SUBFOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
SIGLIP_SUBFOLDERS = ("feature_extractor", "image_encoder")

# Llama 3's pre-tokenizer split (the HunyuanVideo text encoder is a Llama 3 model): contractions,
# letter runs with one leading non-letter, numbers in groups of up to three, punctuation runs, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_EOS = "<|end_of_text|>"
LLAMA_PAD = "<pad>"
LLAMA_SPECIALS = (LLAMA_BOS, LLAMA_EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", LLAMA_PAD)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77

# Words that become single tokens, so everyday prompts tokenize into a few pieces instead of bytes.
COMMON_WORDS = (
    "a an the and of in on with to is are at by from under over into his her their this that "
    "cat dog girl boy man woman person people child bird horse car tree flower sky sea water city street "
    "walks runs dances jumps smiles laughs sits stands looks turns moves flies swims plays talks waves "
    "slowly quickly gently happily beautiful cute small big red blue green white black golden bright dark "
    "light camera video scene background sunset night day rain snow wind fire smoke hair face hand hands "
    "dancing walking running smiling looking moving playing flying motion powerful graceful energetic"
).split()


# ---------------------------------------------------------------------------------------------
# Public API


class TinyModelsExistError(FileExistsError, ValueError):
    """The folder already holds (some of) the tiny models; nothing was overwritten."""


def write_tiny_models(root: Path, seed: int = 0) -> ModelSources:
    """Write tiny random-weight components in the official layouts under `root`; return their sources."""
    root = Path(root)
    targets = [root / "hunyuan" / name for name in HUNYUAN_SUBFOLDERS]
    targets += [root / "siglip" / name for name in SIGLIP_SUBFOLDERS]
    targets += [root / "framepack", root / "f1"]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise TinyModelsExistError(
            f"Refusing to overwrite existing tiny-model folder(s): {', '.join(existing)}; choose an empty folder."
        )

    tokens = _build_llama_tokenizer()
    clip_tokens = _build_clip_vocab()
    writers: list[tuple[Path, Callable[[Path], None]]] = [
        (root / "hunyuan" / "tokenizer", lambda d: _write_llama_tokenizer(d, tokens)),
        (root / "hunyuan" / "tokenizer_2", lambda d: _write_clip_tokenizer(d, clip_tokens)),
        (root / "hunyuan" / "text_encoder", lambda d: _write_llama(d, tokens, seed)),
        (root / "hunyuan" / "text_encoder_2", lambda d: _write_clip_text(d, clip_tokens, seed)),
        (root / "hunyuan" / "vae", lambda d: _write_vae(d, seed)),
        (root / "siglip" / "feature_extractor", _write_siglip_processor),
        (root / "siglip" / "image_encoder", lambda d: _write_siglip(d, seed)),
        (root / "framepack", lambda d: _write_transformer(d, _derive_seed(seed, "framepack"))),
        (root / "f1", lambda d: _write_transformer(d, _derive_seed(seed, "f1"))),
    ]
    with _quiet_progress_bars():
        for target, write in writers:
            target.parent.mkdir(parents=True, exist_ok=True)
            # each folder appears whole or not at all
            with atomic_write(target, directory=True) as staging:
                write(staging)
    return sources_at(root)


def sources_at(root: Path) -> ModelSources:
    """The ModelSources of a folder written by `write_tiny_models`."""
    root = Path(root)
    return ModelSources(
        hunyuan=str(root / "hunyuan"),
        siglip=str(root / "siglip"),
        transformers={"framepack": str(root / "framepack"), "f1": str(root / "f1")},
    )


def default_cache_dir() -> Path:
    """Where `tiny_sources` keeps its build: $FRAMEPACK_TINY_CACHE, else ~/.cache/framepack-tiny/<version>."""
    configured = os.environ.get("FRAMEPACK_TINY_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "framepack-tiny" / TINY_VERSION


def tiny_sources(cache_dir: Path | None = None) -> ModelSources:
    """Tiny models built once into a cache folder and reused; safe when several processes race."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # The folder only ever appears by rename of a complete build, so existence means complete.
    if not cache_dir.is_dir():
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
        try:
            write_tiny_models(staging / "build")
            try:
                os.rename(staging / "build", cache_dir)
            except OSError:
                # Another process finished first; its build is as good as ours.
                if not cache_dir.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sources_at(cache_dir)


def prompt_template_prefix() -> str:
    """The part of diffusers' HunyuanVideo prompt template before the user's prompt."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]


# ---------------------------------------------------------------------------------------------
# Helpers


def _derive_seed(seed: int, name: str) -> int:
    # A stable per-component seed (Python's hash() is salted per process, so not that).
    return (int(seed) * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))) % (2**63)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No "Writing model shards" bars for files that take milliseconds to write."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a model's own initialisation, restoring the caller's RNG after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _grow_merges(words: Iterable[list[str]], vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Append merges so each word (a list of initial symbols) becomes a single token.

    A word is first run through the merges made so far, exactly as a BPE tokenizer would (lowest
    rank first, leftmost on ties), and the leftover pieces are joined left to right by new merges
    of lower priority. New merges can only act on pairs inside words not yet whole, so every
    earlier word still ends as one token.
    """
    rank = {pair: i for i, pair in enumerate(merges)}
    for symbols in words:
        pieces = _apply_merges(list(symbols), rank)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            rank[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]


def _apply_merges(pieces: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    while len(pieces) > 1:
        best = min((rank.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if best[0] == math.inf:
            break
        i = best[1]
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


# ---------------------------------------------------------------------------------------------
# LLaMA tokenizer (byte-level BPE in Llama 3's style)


def _llama_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def _build_llama_tokenizer():
    """A byte-level BPE tokenizer whose vocabulary holds every word of the prompt template.

    Every pre-token of the template prefix is a whole word in the vocabulary, which is how the
    real Llama 3 tokenizer sees that English text too, and gives exactly the 95 tokens (with BOS)
    that diffusers' `crop_start` expects. The 256 byte symbols keep any other text encodable.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = _llama_pre_tokenizer()
    split_specials = "|".join(re.escape(s) for s in LLAMA_SPECIALS)
    texts = [p for p in re.split(split_specials, prompt_template_prefix()) if p]
    texts += [" " + w for w in COMMON_WORDS] + [w.capitalize() for w in COMMON_WORDS]
    words: list[str] = []
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in words:
                words.append(piece)

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    _grow_merges((list(w) for w in words), vocab, merges)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA_SPECIALS])
    bos_id = tokenizer.token_to_id(LLAMA_BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{LLAMA_BOS} $A",
                pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
                special_tokens=[(LLAMA_BOS, bos_id)],
            ),
        ]
    )
    return tokenizer


def _write_llama_tokenizer(folder: Path, tokenizer) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in LLAMA_SPECIALS
    }
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": added,
            "bos_token": LLAMA_BOS,
            "eos_token": LLAMA_EOS,
            "pad_token": LLAMA_PAD,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "LlamaTokenizerFast",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": LLAMA_BOS, "eos_token": LLAMA_EOS, "pad_token": LLAMA_PAD},
    )


# ---------------------------------------------------------------------------------------------
# CLIP tokenizer (vocab.json + merges.txt, as the original CLIP files)


def _build_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    # Word-final symbols carry CLIP's end-of-word suffix; both forms of every byte keep any text encodable.
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in COMMON_WORDS if len(w) > 1]
    _grow_merges(words, vocab, merges)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def _write_clip_tokenizer(folder: Path, clip_tokens) -> None:
    vocab, merges = clip_tokens
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(vocab[CLIP_BOS]): {**special, "content": CLIP_BOS},
                str(vocab[CLIP_EOS]): {**special, "content": CLIP_EOS},
            },
            "bos_token": CLIP_BOS,
            "eos_token": CLIP_EOS,
            "pad_token": CLIP_EOS,
            "unk_token": CLIP_EOS,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "tokenizer_class": "CLIPTokenizer",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS},
    )


# ---------------------------------------------------------------------------------------------
# Models


def _write_llama(folder: Path, tokenizer, seed: int) -> None:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=2 * LLAMA_HIDDEN,
        # The pipeline reads hidden_states[-3], so there must be at least three layers.
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.token_to_id(LLAMA_BOS),
        eos_token_id=tokenizer.token_to_id(LLAMA_EOS),
        pad_token_id=tokenizer.token_to_id(LLAMA_PAD),
        initializer_range=0.2,
    )
    with _seeded(_derive_seed(seed, "text_encoder")):
        model = LlamaModel(config)
    model.save_pretrained(folder, safe_serialization=True)


def _write_clip_text(folder: Path, clip_tokens, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = clip_tokens
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        # pooler_output is taken at the first EOS; this must be the tokenizer's EOS id.
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
    )
    with _seeded(_derive_seed(seed, "text_encoder_2")):
        model = CLIPTextModel(config)
    model.save_pretrained(folder, safe_serialization=True)


def _write_vae(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKLHunyuanVideo

    with _seeded(_derive_seed(seed, "vae")):
        vae = AutoencoderKLHunyuanVideo(**VAE_CONFIG)
    vae.save_pretrained(folder, safe_serialization=True)


def _write_siglip_processor(folder: Path) -> None:
    _write_json(
        folder / "preprocessor_config.json",
        {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
        },
    )


def _write_siglip(folder: Path, seed: int) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=SIGLIP_HIDDEN,
        intermediate_size=2 * SIGLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIGLIP_IMAGE_SIZE,
        patch_size=SIGLIP_PATCH,
    )
    with _seeded(_derive_seed(seed, "image_encoder")):
        model = SiglipVisionModel(config)
    model.save_pretrained(folder, safe_serialization=True)


def _randomise_all_parameters(model, seed: int) -> None:
    """Give every parameter fresh, non-constant random values (diffusers zero-inits some layers).

    Weights get N(0, 1/fan_in) clipped to std 0.02..0.1, keeping activations near unit scale;
    norm scales get 1 + N(0, 0.1) so they stay near one; other vectors get N(0, 0.02).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim >= 2:
                fan_in = param[0].numel()
                std = min(max(fan_in**-0.5, 0.02), 0.1)
                values = torch.randn(param.shape, generator=generator) * std
            elif "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))


def _write_transformer(folder: Path, seed: int) -> None:
    import torch
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with _seeded(seed):
        model = HunyuanVideoFramepackTransformer3DModel(**TRANSFORMER_CONFIG)
    _randomise_all_parameters(model, seed)
    # The official checkpoints are stored in bf16 and sharded; a small shard size gives several shards.
    # (Casting parameter by parameter avoids ModelMixin.to()'s warning about fp32-kept modules; there are none.)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="200KB")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["_class_name"] = OFFICIAL_TRANSFORMER_CLASS
    config["_diffusers_version"] = OFFICIAL_DIFFUSERS_VERSION
    # The official configs predate this diffusers-only key; its default (None) is what they mean.
    config.pop("image_condition_type", None)
    _write_json(config_path, config)
