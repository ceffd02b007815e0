"""Buckets, resize and crop, image loading."""

import io

import numpy as np
import pytest
from PIL import Image

from diffusers_helper.conditioning import (
    BUCKETS_640,
    ImageError,
    buckets,
    crop_or_pad_with_mask,
    find_nearest_bucket,
    image_to_tensor,
    load_image,
    resize_and_center_crop,
)


def test_bucket_list_at_640_is_the_released_one():
    assert buckets(640) == list(BUCKETS_640)
    assert len(BUCKETS_640) == 14 and all(h % 16 == 0 and w % 16 == 0 for h, w in BUCKETS_640)


@pytest.mark.parametrize("resolution", [64, 100, 320, 512, 960, 1280])
def test_scaled_buckets_round_each_side_to_16_halves_up_and_drop_duplicates(resolution):
    expected = []
    for h, w in BUCKETS_640:
        # independent computation with decimal-free integer arithmetic: round(x/16) halves up
        pair = tuple(max(16, ((side * resolution * 2 + 640 * 16) // (640 * 16 * 2)) * 16) for side in (h, w))
        if pair not in expected:
            expected.append(pair)
    assert buckets(resolution) == expected


def test_nearest_bucket_minimises_cross_product_and_later_wins_ties():
    assert find_nearest_bucket(500, 1000) == (448, 864)
    # a square image ties (608, 640) and (640, 608); the later one wins
    assert find_nearest_bucket(100, 100) == (640, 608)
    assert find_nearest_bucket(1000, 500) == (864, 448)


def test_resize_covers_then_crops_the_centre():
    src = (np.arange(500 * 1000 * 3) % 251).astype(np.uint8).reshape(500, 1000, 3)
    out = resize_and_center_crop(src, width=864, height=448)
    # scale = max(864/1000, 448/500) = 0.896 → 896×448, then 16 px off each side
    expected = np.array(Image.fromarray(src).resize((896, 448), Image.LANCZOS))[:, 16:880]
    assert out.shape == (448, 864, 3)
    assert np.array_equal(out, expected)


def test_image_to_tensor_maps_to_minus_one_one():
    img = np.array([[[0, 127, 255]]], dtype=np.uint8)
    t = image_to_tensor(img)
    assert t.shape == (1, 3, 1, 1, 1)
    assert t.flatten().tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])


def test_crop_or_pad_with_mask():
    import torch

    x = torch.ones(1, 3, 4)
    y, m = crop_or_pad_with_mask(x, 5)
    assert y.shape == (1, 5, 4) and m.tolist() == [[True] * 3 + [False] * 2] and y[:, 3:].abs().sum() == 0
    y, m = crop_or_pad_with_mask(torch.ones(1, 7, 4), 5)
    assert y.shape == (1, 5, 4) and m.all()


def _save(img: Image.Image, tmp_path, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(_save(rgba, tmp_path, "a.png"))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 255]
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(_save(la, tmp_path, "la.png"))[0, 0].tolist() == [255, 255, 255]


def test_modes_are_converted(tmp_path):
    grey16 = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert load_image(_save(grey16, tmp_path, "g16.png"))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert load_image(_save(cmyk, tmp_path, "c.jpg")).shape == (2, 2, 3)
    pal = Image.new("P", (2, 2), 0)
    assert load_image(_save(pal, tmp_path, "p.png")).shape == (2, 2, 3)
    grey = Image.new("L", (5, 3), 128)
    assert load_image(_save(grey, tmp_path, "l.png")).shape == (3, 5, 3)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif)
    assert load_image(path).shape == (6, 2, 3)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="No image"):
        load_image(None)
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(not_image)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError):
        load_image(truncated)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
