"""Conditioning inputs: prompt encoding, resolution buckets, resize and crop, image and VAE encoding."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

# Aspect-ratio buckets of the released models at resolution 640, as (height, width).
BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)

# HunyuanVideo's LLaMA prompt budget: 256 prompt tokens after the template, padded to 512 for the model.
LLAMA_PROMPT_TOKENS = 256
LLAMA_EMBED_LENGTH = 512
# The HunyuanVideo text encoder's conditioning is the third-from-last hidden state.
LLAMA_HIDDEN_STATE_INDEX = -3
CLIP_MAX_TOKENS = 77

MAX_IMAGE_PIXELS = 100_000_000


class ImageError(ValueError):
    """The input image can't be used; the message says why."""


def buckets(resolution: int = 640) -> list[tuple[int, int]]:
    """The bucket list at a resolution: the 640 list scaled by R/640, sides rounded to multiples of 16 (halves up)."""
    if resolution == 640:
        return list(BUCKETS_640)
    out: list[tuple[int, int]] = []
    for h, w in BUCKETS_640:
        scaled = tuple(max(16, _round_half_up(Fraction(side * resolution, 640 * 16)) * 16) for side in (h, w))
        if scaled not in out:
            out.append(scaled)
    return out


def _round_half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)).__floor__())


def find_nearest_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    """The (h, w) bucket minimising |H·w − W·h|; on a tie the later bucket wins."""
    best, best_metric = None, None
    for bh, bw in buckets(resolution):
        metric = abs(height * bw - width * bh)
        if best_metric is None or metric <= best_metric:
            best, best_metric = (bh, bw), metric
    return best


def resize_and_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos-resize an RGB uint8 image to cover (width, height), then crop the centre."""
    pil = Image.fromarray(image)
    src_w, src_h = pil.size
    scale = max(width / src_w, height / src_h)
    new_w, new_h = int(round(src_w * scale)), int(round(src_h * scale))
    resized = pil.resize((new_w, new_h), Image.LANCZOS)
    box = tuple(round(v) for v in ((new_w - width) / 2, (new_h - height) / 2, (new_w + width) / 2, (new_h + height) / 2))
    return np.array(resized.crop(box))


def load_image(source: Union[str, Path, Image.Image, np.ndarray]) -> np.ndarray:
    """Any supported input as an upright RGB uint8 array; transparency is composited on white."""
    if source is None:
        raise ImageError("No image given: upload or choose a start image.")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"Image file not found: {path}")
        try:
            with Image.open(path) as img:
                _check_size(img)  # before decoding: a small file can claim a huge size
                img.load()
                return _pil_to_rgb(img)
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"{path.name} is too large to process safely; use an image under {MAX_IMAGE_PIXELS // 1_000_000} megapixels.") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{path.name} is not a readable image ({exc}).") from None
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    raise ImageError(f"Unsupported image type: {type(source).__name__}.")


def _check_size(img: Image.Image) -> None:
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"The image is too large ({img.width}×{img.height}); use one under {MAX_IMAGE_PIXELS // 1_000_000} megapixels.")


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    _check_size(img)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the full range into 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = np.array(img.convert("RGB"))
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError("The image is empty.")
    return rgb


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"Expected an H×W×3 image array, got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and np.nanmax(arr) <= 1.0:
            arr = np.nan_to_num(arr) * 255.0
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        return _pil_to_rgb(Image.fromarray(arr, mode="RGBA"))
    return np.ascontiguousarray(arr)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (1, 3, 1, H, W) in [-1, 1] as x/127.5 − 1."""
    return frames_to_tensor(image[None])


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) → float32 (1, 3, T, H, W) in [-1, 1] as x/127.5 − 1."""
    pixels = torch.from_numpy(frames).float() / 127.5 - 1
    return pixels.permute(3, 0, 1, 2)[None]


@dataclass(frozen=True)
class PromptEmbeddings:
    """LLaMA token embeddings padded to 512 with their mask, and the CLIP-L pooled embedding."""

    llama: torch.Tensor  # (1, 512, D)
    mask: torch.Tensor  # (1, 512) bool
    pooled: torch.Tensor  # (1, D_clip)
    truncated: bool = False

    def zeros_like(self) -> "PromptEmbeddings":
        """The all-zero negative used when real CFG is 1 (it is never evaluated then)."""
        return PromptEmbeddings(torch.zeros_like(self.llama), self.mask.clone(), torch.zeros_like(self.pooled))

    def mixed(self, other: "PromptEmbeddings", weight: float) -> "PromptEmbeddings":
        """(1 − weight)·self + weight·other, token by token; the mask keeps the real tokens of either.

        Beyond a prompt's own tokens its LLaMA embeddings are zeros (padding), so where only one
        prompt has tokens the blend is that prompt's embedding scaled by its weight.
        """
        return PromptEmbeddings(
            llama=(1 - weight) * self.llama + weight * other.llama.to(self.llama),
            mask=self.mask | other.mask.to(self.mask.device),
            pooled=(1 - weight) * self.pooled + weight * other.pooled.to(self.pooled),
            truncated=self.truncated or other.truncated,
        )


def prompt_template() -> dict:
    """diffusers' HunyuanVideo prompt template and its crop_start."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE


@torch.no_grad()
def encode_prompt(prompt: str, text_encoder, text_encoder_2, tokenizer, tokenizer_2) -> PromptEmbeddings:
    """Encode a prompt with the LLaMA (template, third-from-last hidden state) and CLIP-L (pooled) encoders."""
    template = prompt_template()
    crop_start = template["crop_start"]
    llama_inputs = tokenizer(
        [template["template"].format(prompt)],
        padding="max_length",
        max_length=LLAMA_PROMPT_TOKENS + crop_start,
        truncation=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    # Truncation is detected without building overflow tensors: count the tokens unbounded.
    full_length = len(tokenizer(template["template"].format(prompt), truncation=False)["input_ids"])
    truncated = full_length > LLAMA_PROMPT_TOKENS + crop_start
    device = text_encoder.device
    input_ids = llama_inputs["input_ids"].to(device)
    attention_mask = llama_inputs["attention_mask"].to(device)
    real_tokens = int(attention_mask.sum())
    outputs = text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    llama = outputs.hidden_states[LLAMA_HIDDEN_STATE_INDEX][:, crop_start:real_tokens]

    clip_ids = tokenizer_2([prompt], padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt")["input_ids"]
    pooled = text_encoder_2(clip_ids.to(text_encoder_2.device), output_hidden_states=False).pooler_output

    llama, mask = crop_or_pad_with_mask(llama, LLAMA_EMBED_LENGTH)
    return PromptEmbeddings(llama=llama, mask=mask, pooled=pooled, truncated=truncated)


def crop_or_pad_with_mask(x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or zero-pad (B, F, C) to `length` tokens along F, with a bool mask of the real ones."""
    b, f, c = x.shape
    if f >= length:
        return x[:, :length], torch.ones((b, length), dtype=torch.bool, device=x.device)
    padded = torch.zeros((b, length, c), dtype=x.dtype, device=x.device)
    padded[:, :f] = x
    mask = torch.zeros((b, length), dtype=torch.bool, device=x.device)
    mask[:, :f] = True
    return padded, mask


@torch.no_grad()
def vae_encode(pixels: torch.Tensor, vae) -> torch.Tensor:
    """VAE posterior mean times the scaling factor (the mean, not a sample, so a seed fixes the video)."""
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(latents: torch.Tensor, vae) -> torch.Tensor:
    """Decode (1, 16, T, h, w) latents to pixels (1, 3, 4(T−1)+1, 8h, 8w) in about [-1, 1]."""
    latents = latents / vae.config.scaling_factor
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample


@torch.no_grad()
def encode_image(image: np.ndarray, feature_extractor, image_encoder) -> torch.Tensor:
    """SigLIP's last hidden state for an RGB uint8 image."""
    inputs = feature_extractor(images=image, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).last_hidden_state
