"""
Data: the image transform (caption datasets and collate to come).

load_image is the BLIP-2 eval transform and matches transformers' BlipImageProcessor (PIL backend,
image_processing_pil_blip.py + image_transforms.py) bit for bit:
    convert to RGB -> bicubic resize to size x size -> x * (1/255) -> (x - CLIP_MEAN) / CLIP_STD

Notable details:
- The resize is a plain square resize: no centre crop, aspect ratio not kept.
- The resize runs in PIL on uint8 RGB, so resized pixels are rounded back to integers, and PIL's bicubic
  antialiases when shrinking. A float resize (F.interpolate) gives different numbers.
- The rescale is done in float64 and then cast to float32, and the normalize in float32, the same ops in the
  same dtypes as HF. That is why the result is identical, not just close.
- Transparency (RGBA, LA, PA, P with a transparent palette entry) is composited onto white, as HF's
  convert_to_rgb does. A plain convert("RGB") would drop alpha and show what hides under it, often black.
- EXIF orientation is applied. HF's processor does not do this (transformers.image_utils.load_image does).
- 16-bit greyscale (I;16*, and I, which is how Pillow opens 16-bit PGM) is scaled to 8 bits as round(x / 257).
  Here we differ from HF on purpose: PIL's convert("RGB") clips at 255, so most of the image turns white.
  Pillow already reduces 16-bit RGB PNGs to 8 bits itself. F (float) images follow PIL: 0..255, clipped.
- Any failure to read a file raises one ImageError that names the file, with no PIL traceback chained.
  Pillow decodes lazily, so .load() runs inside the try, or a truncated JPEG would only fail later.
  Images over Pillow's decompression bomb limit (2 * Image.MAX_IMAGE_PIXELS) are refused.
"""

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# images

class ImageError(ValueError):
    """An image that cannot be read. The message starts with the file name."""


def _reason(e, name):
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large, over {2 * Image.MAX_IMAGE_PIXELS} pixels (decompression bomb limit)"
    if isinstance(e, UnidentifiedImageError):
        empty = os.path.isfile(name) and os.path.getsize(name) == 0
        return "empty file" if empty else "not an image, or an unknown format"
    if "truncated" in str(e):
        return "truncated file"
    return f"{type(e).__name__}: {e}"


def open_image(path_or_pil):
    """Open and fully decode an image, EXIF orientation applied. Raises ImageError naming the file."""
    if isinstance(path_or_pil, Image.Image):
        name = getattr(path_or_pil, "filename", "") or "<PIL image>"
    else:
        name = os.fspath(path_or_pil)
    try:
        if isinstance(path_or_pil, Image.Image):
            path_or_pil.load()
            return ImageOps.exif_transpose(path_or_pil)  # a rotated copy, the input is left alone
        with Image.open(name) as img:
            img.load()  # decode now: a truncated file fails here, not later
            return ImageOps.exif_transpose(img)  # a new image, so the file can close
    except Exception as e:
        raise ImageError(f"{name}: cannot read image ({_reason(e, name)})") from None


def to_rgb(img):
    """Convert to 8-bit RGB the way HF's convert_to_rgb does, except for 16-bit greyscale (see top)."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        x = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((x + 128) // 257).astype(np.uint8))  # 16 -> 8 bit, rounded: 257 * v -> v
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def load_image(path_or_pil, size=224):
    """A path or PIL image -> float32 tensor (3, size, size), normalised exactly like BlipImageProcessor."""
    img = to_rgb(open_image(path_or_pil))
    img = img.resize((size, size), Image.Resampling.BICUBIC)  # in PIL on uint8, like HF
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # H, W, 3
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # 3, H, W
