"""
Caption an image, or answer a question about it, with a BLIP-2 model (paper §4.1, §4.2).

    python sample.py --image=cat.jpg
    python sample.py --image=photos/ --question="what is the cat doing?"
    python sample.py --image=cat.jpg --init_from=path/to/blip2-flan-t5-xl --num_beams=5
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

from nanoblip2.blip2 import Blip2, num_params
from nanoblip2.cli import parse_args
from nanoblip2.data import ImageError, load_image
from nanoblip2.load import CheckpointError, HubError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class SampleConfig:
    image: str = ""                          # an image file, or a folder of images
    prompt: str = ""                         # caption prompt, e.g. "a photo of"
    question: str = ""                       # if set, answer it instead of captioning
    init_from: str = "Salesforce/blip2-opt-2.7b"  # HF BLIP-2 folder or Hub id
    num_beams: int = 5
    max_new_tokens: int = 30                 # captions; answers use at most 10 (the paper's setting)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"                      # auto: bfloat16 on CUDA, float32 on CPU
    seed: int = 1337


def image_paths(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise ImageError(f"{path}: no images in this folder ({', '.join(IMAGE_EXTS)})")
        return files
    return [path]


def main(cfg):
    if not cfg.image:
        raise SystemExit("error: --image=<file or folder> is required; see -h")
    torch.manual_seed(cfg.seed)
    dtype = {"auto": torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    paths = image_paths(cfg.image)
    t0 = time.time()
    model = Blip2.from_pretrained(cfg.init_from, device=cfg.device, dtype=dtype)
    lm = "FlanT5" if model.is_t5 else "OPT"
    print(f"loaded {cfg.init_from}: {lm}, {num_params(model) / 1e9:.2f}B params, {dtype}, {cfg.device}, "
          f"{time.time() - t0:.1f}s")
    size = model.cfg.vit.image_size
    for path in paths:
        pixels = load_image(path, size)[None].to(cfg.device, dtype)
        if cfg.question:
            text = model.answer(pixels, [cfg.question], num_beams=cfg.num_beams)[0]
            print(f"{path}: Q: {cfg.question} A: {text}")
        else:
            text = model.caption(pixels, cfg.prompt, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)[0]
            print(f"{path}: {(cfg.prompt + ' ' + text).strip()}")


if __name__ == "__main__":
    cfg = parse_args(SampleConfig(), doc=__doc__)
    try:
        main(cfg)
    except (ImageError, CheckpointError, HubError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
