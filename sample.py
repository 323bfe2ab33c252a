"""
Caption an image, or answer a question about it, with a BLIP-2 model (paper §4.1, §4.2). Evaluating captioning or
VQA over an annotation file is eval.py.

    python sample.py --image=cat.jpg
    python sample.py --image=photos/ --question="what is the cat doing?"
    python sample.py --image=cat.jpg --init_from=path/to/blip2-flan-t5-xl --num_beams=5
    python sample.py --image=cat.jpg --attention=cat_attention.png

--image is one image file or a folder of them; each is captioned (after --prompt), or asked --question.
With one image file, --attention also draws where each query looks: its Q-Former cross-attention to the image patches,
averaged over heads and cross-attention layers ([CLS] key dropped), one heat-map panel per query after the image.
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open

from nanoblip2.cli import parse_args, run
from nanoblip2.data import ImageError, load_image, open_image, to_rgb
from nanoblip2.hub import resolve
from nanoblip2.linear import pack
from nanoblip2.load import num_params, read_config, reading, safetensors_files
from nanoblip2.stage2 import Blip2

QUICK_START = "out/stage2/ckpt"  # where train_stage2.py's defaults write
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class SampleConfig:
    image: str = ""                          # an image file, or a folder of images
    prompt: str = ""                         # caption prompt, e.g. "a photo of"
    question: str = ""                       # answer it instead of captioning
    attention: str = ""                      # with one --image file: draw each query's cross-attention to this PNG
    init_from: str = ""                      # HF BLIP-2 folder, Hub id or our stage-2 folder; "" = the quick
                                             # start's out/stage2/ckpt if it exists, else Salesforce/blip2-opt-2.7b
    num_beams: int = 5
    max_new_tokens: int = 30                 # captions; answers use at most 10 (the paper's setting)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"                      # auto: bfloat16 on CUDA; on CPU float32 if it fits in free memory
    seed: int = 1337
    caption_ann: str = ""                    # moved: python eval.py --caption_ann=...
    vqa_ann: str = ""                        # moved: python eval.py --vqa_ann=...


def stored_params(folder):
    """Parameters in a folder's weights and in the frozen parts our checkpoints name, read from the file headers."""
    folders = [folder] + [resolve(src) for src in read_config(folder).get("frozen", {}).values() if src]
    n = 0
    for path in [f for d in folders for f in safetensors_files(d)]:
        with reading(path), safe_open(path, framework="pt") as h:
            n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return n


def free_memory():
    """Bytes the OS can give this process now (MemAvailable), or None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def pick_dtype(cfg, n_params, free=None):
    """--dtype=auto: bfloat16 on CUDA; on the CPU float32, the exact path, when 4 bytes a parameter fit in the free
    memory with a 25% margin, else bfloat16 (2 bytes). -> (dtype, why)"""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), "--dtype"
    if cfg.device.startswith("cuda"):
        return torch.bfloat16, "auto on CUDA"
    free, need = free_memory() if free is None else free, 4 * n_params / 2**30
    if free is None or 1.25 * need <= free / 2**30:
        return torch.float32, f"auto: float32 needs {need:.1f} GiB" + (f", {free / 2**30:.1f} free" if free else "")
    return torch.bfloat16, f"auto: float32 would need {need:.1f} GiB + 25%, only {free / 2**30:.1f} GiB free"


def load_model(cfg):
    """cfg.init_from in cfg.dtype on cfg.device, saying what it loads first (eval.py loads its model here too)."""
    torch.manual_seed(cfg.seed)
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise SystemExit(f"error: --dtype wants auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if not cfg.init_from:
        cfg.init_from = QUICK_START if os.path.isdir(QUICK_START) else "Salesforce/blip2-opt-2.7b"
    folder = resolve(cfg.init_from)
    n = stored_params(folder)
    dtype, why = pick_dtype(cfg, n)
    size = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    print(f"loading {cfg.init_from}: {size(n)} params, {n * dtype.itemsize / 2**30:.2f} GiB in {str(dtype)[6:]} "
          f"({why}), {cfg.device}", flush=True)
    t0 = time.time()
    model = Blip2.from_pretrained(folder, device=cfg.device, dtype=dtype)
    print(f"loaded {cfg.init_from}: {'FlanT5' if model.is_t5 else 'OPT'}, {size(num_params(model))} params, {dtype}, "
          f"{cfg.device}, {time.time() - t0:.1f}s")
    if dtype == torch.bfloat16 and cfg.device == "cpu":
        pack(model.lm)  # the frozen LLM's weights in oneDNN's layout, for faster products (nanoblip2/linear.py)
    return model


def cross_attention(model, pixels):
    """(B, 3, S, S) -> each query's attention over the image tokens (B, Q, N), [CLS] first, averaged over heads and
    cross-attention layers. The model's fused attention does not return its weights: forward hooks recompute them."""
    maps = []

    def hook(m, args, out):  # Layer calls cross(q, context=image), never with a mask; it returns (y, (k, v))
        x, k = args[0], out[1][0].float()                                              # (B, Q, C), (B, H, N, C/H)
        B, Q, C = x.shape
        q = m.query(x).view(B, Q, m.heads, C // m.heads).transpose(1, 2).float()       # (B, H, Q, C/H)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // m.heads), dim=-1).mean(1))  # (B, Q, N)

    hooks = [layer.cross.register_forward_hook(hook) for layer in model.qformer.layers if layer.cross is not None]
    try:
        with torch.no_grad():
            model.queries(model.image_embeds(pixels.to(model.query_tokens.device, model.query_tokens.dtype)))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(maps).mean(0)


def attention_picture(image, weights, grid, size=160, cols=8, margin=4):
    """A path or PIL image and the weights (Q, grid * grid) over its patches -> one picture: the image, then per query
    its weights, normalised to [0, 1], upsampled and coloured black -> red -> yellow over a grey copy of the image."""
    img = to_rgb(open_image(image)).resize((size, size), Image.Resampling.BICUBIC)  # squashed, as the model sees it
    grey = torch.frombuffer(bytearray(img.convert("L").tobytes()), dtype=torch.uint8).view(size, size) / 255
    w = weights.float().view(-1, 1, grid, grid)                                       # (Q, 1, g, g)
    lo, hi = w.amin((2, 3), keepdim=True), w.amax((2, 3), keepdim=True)
    w = F.interpolate((w - lo) / (hi - lo).clamp(min=1e-12), size=(size, size), mode="bilinear")[:, 0]  # (Q, S, S)
    heat = torch.stack([(2 * w).clamp(0, 1), (2 * w - 1).clamp(0, 1), torch.zeros_like(w)], dim=-1)   # (Q, S, S, 3)
    panels = [img] + [Image.fromarray((255 * (0.4 * grey[..., None] + 0.6 * h)).round().byte().numpy())
                      for h in heat.unbind(0)]
    cols, rows = min(cols, len(panels)), math.ceil(len(panels) / min(cols, len(panels)))
    out = Image.new("RGB", (cols * (size + margin) + margin, rows * (size + margin) + margin), "white")
    draw = ImageDraw.Draw(out)
    for i, panel in enumerate(panels):
        x, y = margin + (i % cols) * (size + margin), margin + (i // cols) * (size + margin)
        out.paste(panel, (x, y))
        if i:  # the query index, white on a black box
            draw.rectangle(draw.textbbox((x + 2, y + 2), str(i - 1)), fill="black")
            draw.text((x + 2, y + 2), str(i - 1), fill="white")
    return out


def main(cfg):
    if cfg.caption_ann or cfg.vqa_ann:
        flag = "caption_ann" if cfg.caption_ann else "vqa_ann"
        raise SystemExit(f"error: evaluation moved to eval.py: python eval.py --{flag}={getattr(cfg, flag)} ...")
    # bad input fails here, before the (slow) model load
    if cfg.attention and (not cfg.image or os.path.isdir(cfg.image)):
        raise SystemExit("error: --attention draws one image: give it with --image=<one image file>")
    if cfg.attention and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.attention))):
        raise SystemExit(f"error: {cfg.attention}: its folder does not exist")
    if not cfg.image:
        raise SystemExit("error: give --image=<file or folder>; see -h")
    paths = [cfg.image]
    if os.path.isdir(cfg.image):
        paths = sorted(os.path.join(cfg.image, f) for f in os.listdir(cfg.image) if f.lower().endswith(IMAGE_EXTS))
        if not paths:
            raise ImageError(f"{cfg.image}: no images in this folder ({', '.join(IMAGE_EXTS)})")
    model = load_model(cfg)
    vit = model.cfg.vit
    for path in paths:
        pixels = load_image(path, vit.image_size)[None]
        if cfg.device == "cpu":  # seconds per token at real size: say that it is working
            print(f"{path}: generating ({cfg.num_beams} beam(s)) ...", file=sys.stderr, flush=True)
        if cfg.question:
            text = model.answer(pixels, [cfg.question], num_beams=cfg.num_beams)[0]
            print(f"{path}: Q: {cfg.question} A: {text}")
        else:
            text = model.caption(pixels, cfg.prompt, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)[0]
            print(f"{path}: {(cfg.prompt + ' ' + text).strip()}")
        if cfg.attention:
            weights = cross_attention(model, pixels)[0, :, 1:]  # (Q, N - 1): [CLS] dropped, the patches remain
            attention_picture(path, weights, vit.image_size // vit.patch_size).save(cfg.attention, format="PNG")
            print(f"wrote {cfg.attention} ({weights.size(0)} query panels)")


if __name__ == "__main__":
    run(main, parse_args(SampleConfig(), doc=__doc__))
