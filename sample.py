"""
Caption an image, or answer a question about it, with a BLIP-2 model (paper §4.1, §4.2); or evaluate captioning or
zero-shot VQA on an annotation file, with the paper's generation settings and metrics.

    python sample.py --image=cat.jpg
    python sample.py --image=photos/ --question="what is the cat doing?"
    python sample.py --image=cat.jpg --init_from=path/to/blip2-flan-t5-xl --num_beams=5
    python sample.py --image=cat.jpg --attention=cat_attention.png
    python sample.py --caption_ann=data/coco/test.json --image_root=data/coco/images --out_file=captions.json
    python sample.py --vqa_ann=vqav2_val.jsonl --image_root=data/vqav2/images --max_samples=1000

Give exactly one of --image, --caption_ann, --vqa_ann. The two evaluation modes:
- --caption_ann: {"image", "caption": str | [str]} per entry (our format, data/coco/prepare.py). Every image is
  captioned (beam 5, at most 30 new tokens, --prompt) and scored with COCO's BLEU-1..4 and CIDEr-D against all of its
  captions (metrics.caption_scores; the references are the raw captions, PTB-tokenised, as coco-caption does). The
  prompt is not part of the scored caption: the LM's continuation is, as in LAVIS.
- --vqa_ann: {"image", "question", "answers": [str, ...]} per entry. Blip2.answer with the paper's prompt ("Question:
  {} Answer:" for OPT, "Question: {} Short answer:" for FlanT5), beam 5, length penalty -1, at most 10 new tokens,
  scored with the VQAv2 accuracy (metrics.vqa_score), also per question "type" where entries have one.
The shapes world's caption entries also describe their scene ("objects", "background"): then the captions' attribute
accuracy is reported too (metrics.scene_accuracy: how much of what they say is true).
Image paths are relative to --image_root (default: the current folder); --max_samples evaluates the first ones only.
Unreadable images are skipped and counted, not scored. --out_file writes the captions or answers as a JSON list.
With one image file, --attention also draws where each query looks: its Q-Former cross-attention to the image patches,
averaged over heads and cross-attention layers ([CLS] key dropped), one heat-map panel per query after the image.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from nanoblip2.load import num_params
from nanoblip2.stage2 import Blip2
from nanoblip2.cli import parse_args
from nanoblip2.data import (AnnotationError, ImageError, entry_captions, load_image, open_image, read_annotations,
                            to_rgb)
from nanoblip2.hub import HubError
from nanoblip2.load import CheckpointError
from nanoblip2.metrics import caption_scores, scene_accuracy, vqa_score

QUICK_START = "out/stage2/ckpt"  # where train_stage2.py's defaults write
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class SampleConfig:
    image: str = ""                          # an image file, or a folder of images
    prompt: str = ""                         # caption prompt, e.g. "a photo of"
    question: str = ""                       # with --image: answer it instead of captioning
    caption_ann: str = ""                    # evaluate captioning on this annotation file (instead of --image)
    vqa_ann: str = ""                        # evaluate zero-shot VQA on this annotation file (instead of --image)
    image_root: str = ""                     # the annotations' image paths are relative to this folder
    max_samples: int = 0                     # evaluate the first images (captions) or questions (VQA); 0 = all
    batch_size: int = 16                     # images per generate call when evaluating
    out_file: str = ""                       # write the evaluation's captions or answers here (JSON list)
    attention: str = ""                      # with one --image file: draw each query's cross-attention to this PNG
    init_from: str = ""                      # HF BLIP-2 folder, Hub id or our stage-2 folder; "" = the quick
                                             # start's out/stage2/ckpt if it exists, else Salesforce/blip2-opt-2.7b
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


def read_vqa(ann_file):
    """A JSON list or JSONL file of {"image", "question", "answers": [str, ...]} -> list of dicts."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")

    def parse(text, line=None):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}:{line or e.lineno}: bad JSON ({e.msg})") from None

    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):  # one JSON list
        entries = parse(text)
    else:  # JSONL: one object per line
        entries = [parse(line, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    for k, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("question"), str)
                and isinstance(e.get("answers"), list) and all(isinstance(a, str) for a in e["answers"])):
            got = f"keys {sorted(e)}" if isinstance(e, dict) else type(e).__name__
            raise AnnotationError(f'{path}: entry {k + 1}: want {{"image": str, "question": str, '
                                  f'"answers": [str, ...]}}, got {got}')
    return entries


def read_captions(ann_file):
    """-> {image: all of its captions}, in file order (an image may have several entries), and {image: scene} for
    the entries that describe their scene (the shapes world's "objects" and "background")."""
    refs, scenes = {}, {}
    for e in read_annotations(ann_file):
        refs.setdefault(e["image"], []).extend(entry_captions(e))
        if "objects" in e:
            scenes[e["image"]] = e
    return refs, scenes


def run_batches(samples, generate, cfg, size, desc):
    """generate(pixels (B, 3, S, S), samples) -> texts, over batches of the samples whose image can be read.
    -> (the samples kept, their texts, the ImageError messages of the others)."""
    kept, texts, errors = [], [], []
    for i in tqdm(range(0, len(samples), cfg.batch_size), desc=desc, unit="batch"):
        batch, pixels = [], []
        for s in samples[i:i + cfg.batch_size]:
            try:
                pixels.append(load_image(os.path.join(cfg.image_root, s["image"]), size))
                batch.append(s)
            except ImageError as e:
                errors.append(str(e))
        if batch:
            texts += generate(torch.stack(pixels), batch)
            kept += batch
    if not kept:
        raise ImageError(f"none of the {len(errors)} images could be read, e.g. {errors[0]}")
    return kept, texts, errors


def skipped(errors):
    return f", {len(errors)} skipped (unreadable image, e.g. {errors[0]})" if errors else ", 0 skipped"


def write_json(path, items):
    if path:
        Path(path).write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def eval_captions(model, ann, cfg):
    refs, scenes = ann
    samples = [{"image": im} for im in list(refs)[:cfg.max_samples or None]]
    caption = lambda pixels, batch: model.caption(pixels, cfg.prompt, num_beams=cfg.num_beams,
                                                   max_new_tokens=cfg.max_new_tokens)
    kept, captions, errors = run_batches(samples, caption, cfg, model.cfg.vit.image_size, "caption")
    scores = caption_scores({s["image"]: refs[s["image"]] for s in kept},
                            {s["image"]: [c] for s, c in zip(kept, captions)})
    print(f"caption {cfg.caption_ann}: {len(kept)} images, "  # x100, as the paper reports them
          + " ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()) + skipped(errors))
    if scenes:  # the shapes world: how much of what the captions say is true
        acc = scene_accuracy(captions, [scenes[s["image"]] for s in kept])
        print(f"caption {cfg.caption_ann}: attribute accuracy {acc['accuracy']:.3f}, objects named {acc['objects']:.3f}")
    write_json(cfg.out_file, [{"image": s["image"], "caption": c} for s, c in zip(kept, captions)])


def eval_vqa(model, questions, cfg):
    samples = questions[:cfg.max_samples or None]
    answer = lambda pixels, batch: model.answer(pixels, [s["question"] for s in batch], num_beams=cfg.num_beams)
    kept, answers, errors = run_batches(samples, answer, cfg, model.cfg.vit.image_size, "vqa")
    accuracy = vqa_score(answers, [s["answers"] for s in kept])
    print(f"vqa {cfg.vqa_ann}: {len(kept)} questions, accuracy {accuracy:.2f}" + skipped(errors))
    types = sorted({s["type"] for s in kept if "type" in s})
    if types:  # e.g. the shapes world's question types
        by_type = {}
        for t in types:
            of_type = [(a, s["answers"]) for s, a in zip(kept, answers) if s.get("type") == t]
            by_type[t] = vqa_score([a for a, _ in of_type], [gt for _, gt in of_type])
        print(f"vqa {cfg.vqa_ann}: by type: " + ", ".join(f"{t} {v:.1f}" for t, v in by_type.items()))
    write_json(cfg.out_file, [{"image": s["image"], "question": s["question"], "answer": a}
                              for s, a in zip(kept, answers)])


def cross_attention(model, pixels):
    """(B, 3, S, S) -> each query's attention over the image tokens (B, Q, N), [CLS] first, averaged over heads and
    cross-attention layers. The model's fused attention does not return its weights: forward hooks recompute them."""
    maps = []

    def hook(m, args, kwargs, out):  # Layer calls cross(q, context=image), never with a mask
        x, image = args[0], kwargs["context"]                                           # (B, Q, C), (B, N, Cv)
        assert kwargs.get("mask") is None
        B, Q, C = x.shape
        split = lambda t: t.view(B, -1, m.heads, C // m.heads).transpose(1, 2).float()  # (B, H, T, C/H)
        q, k = split(m.query(x)), split(m.key(image))
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // m.heads), dim=-1).mean(1))  # (B, Q, N)

    hooks = [layer.cross.register_forward_hook(hook, with_kwargs=True)
             for layer in model.qformer.layers if layer.cross is not None]
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


def sample(model, paths, cfg):
    size = model.cfg.vit.image_size
    for path in paths:
        pixels = load_image(path, size)[None]
        if cfg.question:
            text = model.answer(pixels, [cfg.question], num_beams=cfg.num_beams)[0]
            print(f"{path}: Q: {cfg.question} A: {text}")
        else:
            text = model.caption(pixels, cfg.prompt, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)[0]
            print(f"{path}: {(cfg.prompt + ' ' + text).strip()}")
        if cfg.attention:
            weights = cross_attention(model, pixels)[0, :, 1:]  # (Q, N - 1): [CLS] dropped, the patches remain
            vit = model.cfg.vit
            attention_picture(path, weights, vit.image_size // vit.patch_size).save(cfg.attention, format="PNG")
            print(f"wrote {cfg.attention} ({weights.size(0)} query panels)")


def main(cfg):
    if sum(bool(x) for x in (cfg.image, cfg.caption_ann, cfg.vqa_ann)) != 1:
        raise SystemExit("error: give exactly one of --image=<file or folder>, --caption_ann=<file>, "
                         "--vqa_ann=<file>; see -h")
    # bad input fails here, before the (slow) model load
    if cfg.attention and (not cfg.image or os.path.isdir(cfg.image)):
        raise SystemExit("error: --attention draws one image: give it with --image=<one image file>")
    if cfg.attention and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.attention))):
        raise SystemExit(f"error: {cfg.attention}: its folder does not exist")
    if cfg.image:
        paths = image_paths(cfg.image)
    else:
        ann = read_captions(cfg.caption_ann) if cfg.caption_ann else read_vqa(cfg.vqa_ann)
        if not (ann[0] if cfg.caption_ann else ann):
            raise SystemExit(f"error: {cfg.caption_ann or cfg.vqa_ann}: no entries")
        if cfg.image_root and not os.path.isdir(cfg.image_root):
            raise SystemExit(f"error: {cfg.image_root}: image folder not found")
        if cfg.out_file and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.out_file))):
            raise SystemExit(f"error: {cfg.out_file}: its folder does not exist")
    torch.manual_seed(cfg.seed)
    dtype = {"auto": torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    t0 = time.time()
    if not cfg.init_from:
        cfg.init_from = QUICK_START if os.path.isdir(QUICK_START) else "Salesforce/blip2-opt-2.7b"
    model = Blip2.from_pretrained(cfg.init_from, device=cfg.device, dtype=dtype)
    lm = "FlanT5" if model.is_t5 else "OPT"
    n = num_params(model)
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    print(f"loaded {cfg.init_from}: {lm}, {size} params, {dtype}, {cfg.device}, "
          f"{time.time() - t0:.1f}s")
    if cfg.caption_ann:
        eval_captions(model, ann, cfg)
    elif cfg.vqa_ann:
        eval_vqa(model, ann, cfg)
    else:
        sample(model, paths, cfg)


if __name__ == "__main__":
    cfg = parse_args(SampleConfig(), doc=__doc__)
    try:
        main(cfg)
    except (AnnotationError, CheckpointError, FileNotFoundError, HubError, ImageError) as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
