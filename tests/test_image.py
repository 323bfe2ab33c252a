"""load_image against transformers' BlipImageProcessor (PIL backend), plus EXIF, 16-bit and bad files."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessorPil  # BlipImageProcessor falls back to this without torchvision
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from nanoblip2.data import CLIP_MEAN, CLIP_STD, ImageError, load_image

W, H = 37, 53  # odd and non-square, so a transpose or an off-by-one can't hide


def hf_pixels(img, size):
    proc = BlipImageProcessorPil(
        size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )
    return torch.from_numpy(proc(images=img, return_tensors="np")["pixel_values"][0])


def make_image(mode, seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
        alpha[:5] = 0  # fully transparent rows: the colour hidden under them must not show
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]))
    if mode == "P+transparency":
        img = rgb.quantize(16)
        img.info["transparency"] = 3
        return img
    return rgb.convert(mode)


def test_constants():
    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)


@pytest.mark.parametrize("size", [224, 364])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "CMYK", "1"])
def test_parity_with_hf(tmp_path, mode, size):
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")  # PNG has no CMYK
    make_image(mode).save(path)
    with Image.open(path) as img:
        assert img.mode == mode.split("+")[0]
        if mode == "P+transparency":
            assert img.info["transparency"] == 3
        ref = hf_pixels(img, size)
    ours = load_image(path, size)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert ref.shape == ours.shape
    assert (ours - ref).abs().max().item() == 0.0  # bit-identical, not just close
    assert ours.std() > 0.1  # a real picture, not a constant


def test_parity_from_pil():
    img = make_image("RGB", seed=1)
    assert torch.equal(load_image(img, 224), hf_pixels(img, 224))


def test_transparent_is_white():
    rgba = np.zeros((H, W, 4), dtype=np.uint8)  # transparent black
    white = np.full((H, W, 3), 255, dtype=np.uint8)
    ours = load_image(Image.fromarray(rgba), 224)
    assert torch.equal(ours, load_image(Image.fromarray(white), 224))
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(ours[:, 100, 100], expected)


def test_exif_rotation(tmp_path):
    x = np.zeros((20, 40, 3), dtype=np.uint8)
    x[:, :20, 0] = 255  # left half red
    x[:, 20:, 2] = 255  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display, so the left half ends up on top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(x).save(path, exif=exif, quality=95)
    ours = load_image(path, 64)
    with Image.open(path) as img:
        assert img.size == (40, 20)
        upright = Image.fromarray(np.asarray(img.transpose(Image.Transpose.ROTATE_270)))  # drops the EXIF
        raw = img.copy()
    assert torch.equal(ours, load_image(upright, 64))
    assert not torch.equal(ours, hf_pixels(raw, 64))  # HF ignores EXIF, we don't
    red = ours[0] - ours[2]
    assert red[:24].mean() > 2 and red[40:].mean() < -2  # red on top, blue at the bottom


def test_16bit_greyscale(tmp_path):
    x8 = np.random.default_rng(2).integers(0, 256, (H, W), dtype=np.uint8)
    x8[0, :2] = (0, 255)
    Image.fromarray(x8).save(tmp_path / "g8.png")
    Image.fromarray(x8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(x8.astype(np.int32) * 257).save(tmp_path / "g16.pgm")  # Pillow opens this in mode I
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode == "I;16"
    with Image.open(tmp_path / "g16.pgm") as img:
        assert img.mode == "I"
    ref = load_image(tmp_path / "g8.png", 224)
    assert torch.equal(load_image(tmp_path / "g16.png", 224), ref)
    assert torch.equal(load_image(tmp_path / "g16.pgm", 224), ref)
    # 65535 -> 255 and 257 * v -> v, with rounding in between
    img = Image.fromarray(np.array([[0, 128, 129, 385, 65535]], dtype=np.uint16))
    assert torch.equal(load_image(img, 5)[0, 0], load_image(Image.fromarray(np.uint8([[0, 0, 1, 1, 255]])), 5)[0, 0])


def test_float_image_follows_pil():
    x = np.random.default_rng(3).uniform(0, 255, (H, W)).astype(np.float32)
    img = Image.fromarray(x)
    assert img.mode == "F"
    assert torch.equal(load_image(img, 224), hf_pixels(img, 224))


def tiny_png(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "missing":
        return path, "no such file"
    if kind == "text":
        path.write_text("this is not an image\n" * 10)
        return path, "not an image"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "empty file"
    if kind == "truncated":
        noise = np.random.default_rng(4).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path, quality=95)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated file"
    if kind == "bomb":
        path = tmp_path / "bomb.png"
        path.write_bytes(tiny_png(30000, 30000))  # 900M pixels declared in 60 bytes
        return path, "decompression bomb"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "truncated", "bomb"])
def test_bad_input(tmp_path, kind):
    path, reason = bad_file(tmp_path, kind)
    for arg in (path, str(path)):
        with pytest.raises(ImageError) as e:
            load_image(arg)
        assert isinstance(e.value, ValueError)
        assert str(e.value).startswith(f"{path}: cannot read image (")
        assert path.name in str(e.value) and reason in str(e.value)
        assert e.value.__cause__ is None and e.value.__suppress_context__


def test_truncated_pil_input(tmp_path):
    path, _ = bad_file(tmp_path, "truncated")
    with Image.open(path) as img:  # opening is lazy and succeeds, decoding must not
        with pytest.raises(ImageError, match="truncated.jpg: cannot read image \\(truncated file\\)") as e:
            load_image(img)
    assert e.value.__cause__ is None and e.value.__suppress_context__
