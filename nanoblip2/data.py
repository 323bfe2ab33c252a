"""
Data: image transforms, annotation files, caption datasets, collate (LAVIS lavis/processors/blip_processors.py,
lavis/datasets/datasets/coco_caption_datasets.py, retrieval_datasets.py).

load_image is the BLIP-2 eval transform and matches transformers' BlipImageProcessor (PIL backend,
image_processing_pil_blip.py + image_transforms.py) bit for bit:
    convert to RGB -> bicubic resize to size x size -> x * (1/255) -> (x - CLIP_MEAN) / CLIP_STD

Notable details:
- A plain square resize (no centre crop) in PIL on uint8 RGB: pixels are rounded back to integers, and PIL's
  bicubic antialiases when shrinking (F.interpolate differs). Rescale in float64, cast to float32, normalize in
  float32: HF's ops in HF's dtypes, so the result is identical.
- Transparency (RGBA, LA, PA, P with a transparent palette entry) is composited onto white, as HF's convert_to_rgb;
  a plain convert("RGB") would show what hides under it, often black.
- Deviations from HF (docs/reference.md): EXIF orientation is applied; 16-bit greyscale (I;16*, and I, as Pillow
  opens 16-bit PGM) is scaled to 8 bits as round(x / 257), where convert("RGB") clips at 255 (Pillow reduces
  16-bit RGB itself). F (float) images follow PIL: 0..255, clipped.
- A file that cannot be read is one ImageError naming it, no PIL traceback; .load() runs inside the try (Pillow
  decodes lazily). Images over Pillow's decompression bomb limit (2 * Image.MAX_IMAGE_PIXELS) are refused.

train_transform is LAVIS's `blip2_image_train`, the paper's stage-1/2 augmentation:
    RandomResizedCrop(size, scale=(0.5, 1), ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize
- No torchvision: the crop box is drawn as torchvision's RandomResizedCrop.get_params (10 tries with a log-uniform
  aspect ratio, then the largest centred crop), with the same torch random calls in the same order, flip last.
  torch is seeded per DataLoader worker; numpy or random would repeat across them.
- Crop, then resize, in PIL, as torchvision; `img.resize(..., box=...)` reads pixels outside the box at the edges.
- ToTensor's float32 x / 255 equals HF's float64 x * (1/255) cast to float32 for every uint8 x: one to_tensor.

Captions: pre_caption is LAVIS's, quirks included: only runs of 2+ whitespace become one space (a lone tab or
newline stays; BERT's tokenizer reads it as a space), and max_words counts space-separated words.
- Annotations: a JSON list or JSONL of {"image": path under image_root, "caption": str or [str, ...]}, for VQA
  {"image", "question", "answers": [str, ...]} (data/coco/prepare.py writes them); all-empty captions or answers
  are an error. Training has one sample per (image, caption) pair (LAVIS coco_caption); retrieval one per image.
- A bad image: __getitem__ warns, naming the file, and returns None; collate drops and counts it (`skipped`). One
  unreadable JPEG in 100M must not stop a run; a bad annotation file stops it at once.
- collate pads to the longest caption, not to max_length as LAVIS: padding is masked out of every loss.
"""

import functools
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# images

class ImageError(ValueError):
    """An image that cannot be read. The message starts with the file name."""


class AnnotationError(ValueError):
    """An annotation file that cannot be used. The message names the file (and line)."""


OS_REASONS = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory",
              PermissionError: "permission denied"}


def _reason(e, name):
    if type(e) in OS_REASONS:
        return OS_REASONS[type(e)]
    if isinstance(e, Image.DecompressionBombError):
        return f"too large, over {2 * Image.MAX_IMAGE_PIXELS} pixels (decompression bomb limit)"
    if isinstance(e, UnidentifiedImageError):
        empty = os.path.isfile(name) and os.path.getsize(name) == 0
        return "empty file" if empty else "not an image, or an unknown format"
    return "truncated file" if "truncated" in str(e) else f"{type(e).__name__}: {e}"


def open_image(path_or_pil):
    """Open and fully decode an image, EXIF orientation applied. Raises ImageError naming the file."""
    pil = isinstance(path_or_pil, Image.Image)
    name = (getattr(path_or_pil, "filename", "") or "<PIL image>") if pil else os.fspath(path_or_pil)
    try:
        if pil:
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


def to_tensor(img):
    """8-bit RGB PIL image -> float32 (3, H, W): rescale to [0, 1] and normalise with CLIP mean/std, as HF does."""
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # H, W, 3
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # 3, H, W


def load_image(path_or_pil, size=224):
    """A path or PIL image -> float32 tensor (3, size, size), normalised exactly like BlipImageProcessor."""
    img = to_rgb(open_image(path_or_pil))
    return to_tensor(img.resize((size, size), Image.Resampling.BICUBIC))  # in PIL on uint8, like HF


def eval_transform(size=224):
    """PIL image -> (3, size, size): load_image as a picklable callable (LAVIS blip_image_eval)."""
    return functools.partial(load_image, size=size)


def random_resized_crop(height, width, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, same random draws: -> (top, left, h, w) of the crop box."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio)).tolist()  # float32 logs, as torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    # fallback: the largest centred crop whose aspect ratio is in range
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _train(img, size, scale, ratio):
    img = to_rgb(img)
    top, left, h, w = random_resized_crop(img.height, img.width, scale, ratio)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    if torch.rand(1) < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def train_transform(size=224, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """PIL image -> (3, size, size): random resized crop + horizontal flip + normalise (LAVIS blip2_image_train)."""
    return functools.partial(_train, size=size, scale=scale, ratio=ratio)

# -----------------------------------------------------------------------------
# captions

def pre_caption(text, max_words=50):
    """LAVIS pre_caption: lowercase, punctuation .!"()*#:;~ -> space, squeeze spaces, strip, at most max_words words."""
    text = re.sub(r'[.!"()*#:;~]', " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


WANT = {"caption": '{"image": str, "caption": str or [str, ...]}',
        "vqa": '{"image": str, "question": str, "answers": [str, ...]}'}


def entry_captions(entry):
    """An annotation entry's "caption" (str | [str]) as a list."""
    return [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]


def _texts(e, kind):
    """A caption entry's captions or a VQA entry's answers, or None where the entry is not of WANT[kind]'s shape."""
    if not (isinstance(e, dict) and isinstance(e.get("image"), str)):
        return None
    if kind == "vqa":
        texts = e.get("answers") if isinstance(e.get("question"), str) else None
    else:
        texts = entry_captions(e) if "caption" in e else None
    return texts if isinstance(texts, list) and all(isinstance(t, str) for t in texts) else None


def read_annotations(ann_file, kind="caption"):
    """A JSON list or JSONL file of WANT[kind] ("caption" | "vqa") -> list of dicts. Errors name the file and line."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is skipped
    if text.lstrip().startswith("["):  # JSON: one list, errors name the item
        try:
            items = [(f"{path}[{k}]", e) for k, e in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
    else:  # JSONL: one object per line, blank lines skipped; split on \n only, a JSON string may hold U+2028
        items = []
        for n, line in enumerate(text.split("\n"), 1):
            try:
                items += [(f"{path}:{n}", json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{n}: bad JSON ({e.msg})") from None
    key = "answers" if kind == "vqa" else "caption"
    for where, e in items:
        texts = _texts(e, kind)
        if texts is None:
            got = f"keys {sorted(e)}" if isinstance(e, dict) else type(e).__name__
            hint = " (a Karpathy file? convert it with data/coco/prepare.py)" if "'images'" in got else ""
            raise AnnotationError(f"{where}: want {WANT[kind]}, got {got}{hint}")
        if not any(t.strip() for t in texts):
            raise AnnotationError(f'{where}: no usable {key.rstrip("s")} ("{key}": {json.dumps(e[key])})')
    return [e for _, e in items]


def _image_root(image_root):
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return root


class CaptionDataset(torch.utils.data.Dataset):
    """One sample per (image, caption) pair: (pixels (3, S, S), prompt + pre_caption(caption), index), or None if the
    image cannot be read. With `seed`, a sample's augmentation depends only on (seed, epoch, index), not on which
    worker loads it or when: a resumed run sees exactly the images it would have seen."""
    kind = "caption"

    def __init__(self, ann_file, image_root, transform, max_words=50, prompt="", seed=None, captions_per_image=0):
        self.seed, self.epoch = seed, 0
        self.image_root = _image_root(image_root)
        self.transform, self.max_words, self.prompt = transform, max_words, prompt
        self.samples = [(e["image"], c) for e in read_annotations(ann_file, self.kind)  # (image, text) pairs
                        for c in self.texts(e)[:captions_per_image or None]]  # > 0: the first ones only
        ids = {}  # samples of one image share its id (ITM never pairs them as negatives)
        self.image_ids = torch.tensor([ids.setdefault(image, len(ids)) for image, _ in self.samples])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, caption = self.samples[index]
        with torch.random.fork_rng(devices=[], enabled=self.seed is not None):  # the caller's random state stays
            if self.seed is not None:
                torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
            try:
                pixels = self.transform(open_image(self.image_root / image))
            except ImageError as e:
                warnings.warn(f"skipped: {e}", stacklevel=2)
                return None
            return pixels, self.text(caption), index  # in the fork: a VQA answer is drawn by the same seed

    texts = staticmethod(entry_captions)  # an entry's texts

    def text(self, caption):
        return self.prompt + pre_caption(caption, self.max_words)


class VQADataset(CaptionDataset):
    """VQA fine-tuning: one sample per question of a {"image", "question", "answers"} file; its text is (question,
    one of the human answers), drawn afresh each time by its frequency among them."""
    kind = "vqa"

    texts = staticmethod(lambda e: [(e["question"], [a for a in e["answers"] if a.strip()])])

    def text(self, qa):
        question, answers = qa
        return question, answers[int(torch.randint(len(answers), ()))]  # uniform over the list = by frequency


def collate(batch, tokenizer=None, max_length=32, padding="longest"):
    """CaptionDataset samples -> dict of batched tensors, the None (unreadable) samples dropped and counted (all bad:
    B = 0). Without a tokenizer the captions stay text (stage 2 tokenises them for its LLM)."""
    kept = [s for s in batch if s is not None]
    out = dict(pixel_values=torch.stack([s[0] for s in kept]) if kept else torch.empty(0, 3, 0, 0),  # B, 3, S, S
               captions=[s[1] for s in kept], index=torch.tensor([s[2] for s in kept], dtype=torch.long),
               skipped=len(batch) - len(kept))
    if tokenizer is not None:
        out["input_ids"], out["attention_mask"] = tokenizer(out["captions"], max_length=max_length, padding=padding)
    return out


def load_retrieval(ann_file, image_root, max_words=50, max_images=0, captions_per_image=0):
    """The retrieval eval layout (LAVIS RetrievalEvalDataset), one annotation entry per image with its captions (the
    first max_images / captions_per_image; 0 = all): -> images (paths), cleaned texts, img2txt, txt2img."""
    root = _image_root(image_root)
    entries = read_annotations(ann_file)[:max_images or None]
    captions = [[pre_caption(c, max_words) for c in entry_captions(e)[:captions_per_image or None]] for e in entries]
    return [str(root / e["image"]) for e in entries], *retrieval_index(captions)


def retrieval_index(captions):
    """[[caption, ...] per image] -> texts, img2txt (text indices per image), txt2img (image index per text)."""
    texts, img2txt, txt2img = [], [], []
    for i, cs in enumerate(captions):
        img2txt.append(list(range(len(texts), len(texts) + len(cs))))
        txt2img += [i] * len(cs)
        texts += cs
    return texts, img2txt, txt2img


# -----------------------------------------------------------------------------
# text batches for the LLMs (stage 2) and token padding

def opt_batch(tokenizer, captions, prompt="", max_length=32, num_queries=32):
    """OPT training text (LAVIS blip2_opt.py): BOS + prompt + " " + caption + "\n", right-padded. labels (B, Q + T) are
    -100 on the queries, on BOS + prompt when a prompt is set (with no prompt LAVIS trains the last query to predict
    BOS), and on padding: the loss is on the caption and its "\n". prompt: one for all, or one per caption (VQA)."""
    prompts = [prompt] * len(captions) if isinstance(prompt, str) else prompt
    ids, mask = tokenizer([f"{p} {c}\n" if p else c + "\n" for p, c in zip(prompts, captions)], max_length=max_length)
    labels = ids.masked_fill(mask == 0, -100)
    for row, p in zip(labels, prompts):
        if p:
            row[:len(tokenizer([p], truncation=False)[0][0])] = -100  # BOS + prompt tokens
    labels = torch.cat([torch.full((len(captions), num_queries), -100), labels], dim=1)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def prefix_split(caption, generator=None):
    """FlanT5 pre-training's prefix LM (LAVIS #139): split at a word boundary k drawn from [1, n // 2]; the prefix goes
    to the encoder, the rest is the target. A caption of one word is all target."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    k = int(torch.randint(1, len(words) // 2 + 1, (1,), generator=generator))
    return " ".join(words[:k]), " ".join(words[k:])


def t5_batch(tokenizer, captions, prompt=None, max_length=32, generator=None):
    """FlanT5 training text: with a prompt (captioning; one per caption for VQA) the encoder reads the prompt and the
    target is the whole caption; without, each caption is split into prefix and suffix. Both sides end with </s>;
    padding -> -100."""
    prompts = [prompt] * len(captions) if prompt is None or isinstance(prompt, str) else prompt
    pairs = [(p, c) if p is not None else prefix_split(c, generator) for p, c in zip(prompts, captions)]
    ids, mask = tokenizer([p for p, _ in pairs], max_length=max_length)
    out, out_mask = tokenizer([s for _, s in pairs], max_length=max_length)
    return dict(input_ids=ids, attention_mask=mask, labels=out.masked_fill(out_mask == 0, -100))


def pad_cat(*ts):
    """Concatenate (n, T_i) token tensors along dim 0, right-padded with 0 (the mask hides it) to the longest T."""
    T = max(t.size(1) for t in ts)
    return torch.cat([F.pad(t, (0, T - t.size(1))) for t in ts])

