"""
The shapes world: a synthetic captioned-image dataset for the offline quick start (nanoGPT's shakespeare_char, for
BLIP-2). Real BLIP-2 needs pretrained models and millions of images; this draws small pictures of coloured shapes,
writes their captions and VQA questions, and trains three small tokenizers, in well under a minute on a laptop CPU;
then it runs pretrain.py beside it, which pretrains the small frozen ViT, BERT and OPT that BLIP-2 starts from on
these files (about 12 minutes on 2 cores; its options are this script's too).

    python data/shapes/prepare.py                              # 20,000 / 500 / 1,000 images into data/shapes
    python data/shapes/prepare.py --pretrain=false             # the data and tokenizers only
    python data/shapes/prepare.py --models=opt --out=/tmp/s    # the data, and only the OPT pretrained
    python data/shapes/prepare.py --train=2000 --out=/tmp/shapes --seed=7

Writes into --out:
    images/{train,val,test}/000000.png   RGB, image_size px, one to three shapes on a light background
    train.json, val.json, test.json      one entry per image and per line, the format of nanoblip2/data.py:
        {"image": "train/000000.png", "caption": [3 to 5 captions], "image_id": 0, "background": "beige",
         "objects": [{"shape": "star", "colour": "red", "size": "big", "position": "top left", "x", "y", "r"}]}
        "image" is relative to <out>/images; x, y (centre, y down) and r (bounding radius) are in pixels.
    vqa_train.json, vqa_val.json, vqa_test.json
        {"image", "question", "answers": [answer] * 10, "image_id", "question_id", "type"}
        (VQAv2 format: 10 human answers per question; here all ten are the same)
    bert/vocab.txt + tokenizer_config.json   WordPiece for the Q-Former: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    opt/tokenizer.json                       byte-level BPE for OPT: <s>=0 <pad>=1 </s>=2 <unk>=3, BOS </s> in front
    t5/tokenizer.json                        Unigram for T5: <pad>=0 </s>=1 <unk>=2, </s> appended
    meta.json                                seed, counts, the attribute lists
    and with --pretrain (the default), pretrain.py's vit/, bert/ and opt/ weights, next to the tokenizers

Notable details:
- Each image has its own random generator, random.Random("shapes/{seed}/{split}/{index}") (a str seed is hashed with
  SHA-512, so PYTHONHASHSEED does not matter): a split does not depend on the sizes of the others nor on --workers,
  and the same seed gives byte-identical files (PNGs carry no metadata). Python's random, not numpy: its scalar
  draws are ~10x cheaper, and an image takes ~60 of them.
- In one image the shapes are distinct and so are the colours, so "the circle" or "the red object" always names
  one object. Objects sit in distinct cells of a 3x3 grid (their "position", by centre, kept off the cell borders)
  and never overlap (centres at least r1 + r2 + 1 px apart).
- Shapes are drawn as masks at 4x the size and box-downsampled, so edges are anti-aliased; fill colours (+-15 per
  channel) and backgrounds (plain, a gradient or blotches) are jittered, so a colour name is a range, not a value.
- The first caption is canonical: every object with size, colour, shape and position, in reading order, plus the
  background for one or two objects (at most 26 words). It is the most specific, which makes retrieval over the
  test set meaningful; the others come from shorter templates, and some are generic ("two shapes on a pink
  background"), as in COCO.
- The tokenizers come from the training captions and VQA texts ("Question: ... Answer: ..."), and each keeps every
  word whole. OPT's BPE is trained (on each text also after a space, so that "what" and "Ġwhat" are both one
  token); the BERT and T5 vocabularies are the words by frequency, written down (the trainers are no good here,
  see there). Other words still encode without [UNK]/<unk>: BERT has every character and "##" letter and digit,
  T5 every printable ASCII character, OPT every byte, so prompts such as "Question: ... Answer:" work, in pieces.
- Pretraining reads the files back and never changes them: the data are byte-identical with or without it
  (--pretrain=false skips it, for tests).
"""
import collections
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # run from anywhere, no install: nanoblip2, and pretrain.py beside
from nanoblip2.cli import parse_args  # noqa: E402
from nanoblip2.tokenizer import load_bert_tokenizer, load_opt_tokenizer, load_t5_tokenizer  # noqa: E402
from pretrain import PretrainConfig, check, pretrain, qa_text  # noqa: E402


@dataclass
class PrepareConfig(PretrainConfig):  # pretrain.py's options (--out, --models, --vit_steps, ...), then the world's
    out: str = "data/shapes"  # where images/, the annotation files, the tokenizers and the models go
    seed: int = 1337          # the world's, and the pretraining's
    train: int = 20_000       # images per split
    val: int = 500
    test: int = 1_000
    image_size: int = 64
    questions: int = 3        # VQA questions per image, each of a different type (at most 8)
    opt_vocab: int = 512      # OPT's BPE, incl. the 256 bytes; an upper bound: merges stop once every word is whole
    workers: int = 0          # processes drawing images, 0 = one per core; the files do not depend on it
    pretrain: bool = True     # then pretrain.py: the frozen unimodal models (ViT, BERT, OPT) into vit/, bert/, opt/


SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 205, 25), "green": (40, 160, 60),
           "blue": (40, 80, 220), "purple": (140, 60, 190), "brown": (125, 75, 35), "black": (30, 30, 30)}
SIZES = {"small": (0.10, 0.13), "big": (0.19, 0.23)}  # bounding radius, as a fraction of image_size
POSITIONS = ["top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right"]
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
         "middle": "in the middle", "right": "on the right", "bottom left": "in the bottom left",
         "bottom": "at the bottom", "bottom right": "in the bottom right"}
BACKGROUNDS = {"white": (248, 248, 248), "light grey": (212, 212, 212), "beige": (238, 226, 196),
               "light blue": (200, 222, 245), "pink": (246, 212, 222)}
NUMBERS = ["zero", "one", "two", "three"]
P_OBJECTS = (0.2, 0.4, 0.4)  # P(one, two, three objects)
QUESTION_TYPES = ["count", "colour", "shape", "size", "position", "exists_shape", "exists_colour", "background"]
SPLITS = ["train", "val", "test"]
SUPERSAMPLE = 4

# -----------------------------------------------------------------------------
# one image: scene, pixels, captions, questions


def sample_scene(rng, S):
    """1-3 objects with distinct shapes and colours, in distinct grid cells, not overlapping; reading order."""
    n = rng.choices([1, 2, 3], weights=P_OBJECTS)[0]
    shapes, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    sizes = [rng.choice(list(SIZES)) for _ in range(n)]
    margin = 0.03 * S  # keep centres off the cell borders, so a position is visible, not a coin toss
    for _ in range(10_000):  # rejection sampling of the layout
        objects = []
        for shape, colour, size, cell in zip(shapes, colours, sizes, rng.sample(range(9), n)):
            r = rng.uniform(*SIZES[size]) * S
            row, col = divmod(cell, 3)
            x = rng.uniform(max(col * S / 3 + margin, r + 1), min((col + 1) * S / 3 - margin, S - r - 1))
            y = rng.uniform(max(row * S / 3 + margin, r + 1), min((row + 1) * S / 3 - margin, S - r - 1))
            objects.append({"shape": shape, "colour": colour, "size": size, "position": POSITIONS[cell],
                            "x": round(x, 1), "y": round(y, 1), "r": round(r, 1)})
        if all(math.dist((a["x"], a["y"]), (b["x"], b["y"])) >= a["r"] + b["r"] + 1
               for i, a in enumerate(objects) for b in objects[i + 1:]):
            return sorted(objects, key=lambda o: POSITIONS.index(o["position"]))
    raise RuntimeError("no layout found")  # never happens at the default sizes


def outline(shape, x, y, r, angle):
    """Polygon vertices of a shape with bounding radius r around (x, y), turned by angle (radians)."""
    if shape == "square":
        pts = [(0.7, 0.7), (-0.7, 0.7), (-0.7, -0.7), (0.7, -0.7)]
    elif shape == "triangle":  # equilateral, point up, centroid at (x, y)
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":  # five points, inner radius 0.45
        pts = [((1 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "cross":  # a plus sign, arms 0.68 wide
        a, b = 0.95, 0.34
        pts = [(b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a),
               (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b), (-b, -a)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(x + r * (px * c - py * s), y + r * (px * s + py * c)) for px, py in pts]


def draw(rng, objects, background, S):
    """A light background (plain, a gradient or blotches, jittered) with the objects painted on, anti-aliased."""
    base = [c + rng.uniform(-6, 6) for c in BACKGROUNDS[background]]
    style = rng.choice(["plain", "gradient", "blotches"])
    if style == "plain":
        img = Image.new("RGB", (S, S), tuple(round(c) for c in base))
    else:  # a small grid of colours, bilinearly upsampled so that its corner pixels land on the image corners
        if style == "gradient":  # linear in a random direction: the bilinear interpolation of 2 x 2 corners is exact
            theta, amp = rng.uniform(0, 2 * math.pi), rng.uniform(10, 24)
            k, grid = 2, [c + amp * (math.cos(theta) * (j - 0.5) + math.sin(theta) * (i - 0.5))
                          for i in (0, 1) for j in (0, 1) for c in base]
        else:  # low-frequency blotches from a random 4 x 4 grid
            k, grid = 4, [c + rng.gauss(0, 7) for _ in range(16) for c in base]
        low = Image.frombytes("RGB", (k, k), bytes(min(255, max(0, round(v))) for v in grid))
        img = low.resize((S, S), Image.Resampling.BILINEAR, box=(0.5, 0.5, k - 0.5, k - 0.5))
    for o in objects:
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[o["colour"]])
        # the object's coverage: drawn at SUPERSAMPLE x in a box around it, box-filtered down to alpha
        left, top = math.floor(o["x"] - o["r"]) - 1, math.floor(o["y"] - o["r"]) - 1
        w, h = math.ceil(o["x"] + o["r"]) + 1 - left, math.ceil(o["y"] + o["r"]) + 1 - top
        mask = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
        x, y, r = SUPERSAMPLE * (o["x"] - left), SUPERSAMPLE * (o["y"] - top), SUPERSAMPLE * o["r"]
        if o["shape"] == "circle":
            ImageDraw.Draw(mask).ellipse([x - 0.9 * r, y - 0.9 * r, x + 0.9 * r, y + 0.9 * r], fill=255)
        else:
            angle = math.radians(rng.uniform(-15, 15))
            ImageDraw.Draw(mask).polygon(outline(o["shape"], x, y, r, angle), fill=255)
        img.paste(colour, (left, top, left + w, top + h), mask=mask.reduce(SUPERSAMPLE))
    return img


def article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join(phrases):
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def relation(a, b, S):
    """"to the left of" etc. for a pair whose offset is clearly along one axis, else None."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= max(1.5 * abs(dy), S / 8):
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) >= max(1.5 * abs(dx), S / 8):
        return "above" if dy > 0 else "below"
    return None


def captions(rng, objects, background, S):
    """The canonical caption, then 2-4 others from distinct templates, in random order."""
    n = len(objects)
    full = {id(o): article(f"{o['size']} {o['colour']} {o['shape']}") for o in objects}  # "a big orange circle"
    canonical = join([f"{full[id(o)]} {WHERE[o['position']]}" for o in objects])
    if n <= 2:
        canonical += f" on a {background} background"
    objs = rng.sample(objects, n)  # the other templates name the objects in random order
    colour_shape = [article(f"{o['colour']} {o['shape']}") for o in objs]
    others = [
        join([full[id(o)] for o in objs]),
        f"a single {objs[0]['colour']} {objs[0]['shape']}" if n == 1 else f"{NUMBERS[n]} shapes: {join(colour_shape)}",
        f"a {objs[0]['size']} {objs[0]['shape']} on a {background} background" if n == 1
        else f"{NUMBERS[n]} shapes on a {background} background",
        "an image with " + join([f"{c} {WHERE[o['position']]}" for c, o in zip(colour_shape, objs)]),
        "there is " + join([f"a {o['size']} {o['shape']}" for o in objs]),
    ]
    pairs = [(p, q) for p in objs for q in objs if p is not q and relation(p, q, S)]
    if pairs:
        p, q = rng.choice(pairs)
        others.append(f"{full[id(p)]} {relation(p, q, S)} {full[id(q)]}")
    return [canonical] + rng.sample(others, rng.randint(2, 4))  # 3 to 5 captions


def questions(rng, objects, background, k):
    """k questions of distinct types, with their answers, about one image."""
    o = rng.choice(objects)
    shapes, colours = [p["shape"] for p in objects], [p["colour"] for p in objects]
    # the yes/no questions: half about something present, half about something absent
    shape = rng.choice(shapes if rng.random() < 0.5 else [s for s in SHAPES if s not in shapes])
    colour = rng.choice(colours if rng.random() < 0.5 else [c for c in COLOURS if c not in colours])
    qa = {"count": ("how many shapes are there?", str(len(objects))),  # answers as VQAv2 stores them: digits
          "colour": (f"what colour is the {o['shape']}?", o["colour"]),
          "shape": (f"what shape is the {o['colour']} object?", o["shape"]),
          "size": (f"is the {o['colour']} {o['shape']} big or small?", o["size"]),
          "position": (f"where is the {o['colour']} {o['shape']}?", o["position"]),
          "exists_shape": (f"is there a {shape}?", "yes" if shape in shapes else "no"),
          "exists_colour": (f"is there {article(colour)} shape?", "yes" if colour in colours else "no"),
          "background": ("what colour is the background?", background)}
    return [(t, *qa[t]) for t in sorted(rng.sample(QUESTION_TYPES, k), key=QUESTION_TYPES.index)]


def make_image(job):
    """Everything about image i of a split, from its own generator; writes the PNG, returns the annotations."""
    split, i = job
    S = cfg.image_size
    rng = random.Random(f"shapes/{cfg.seed}/{split}/{i}")  # a str seed is hashed with SHA-512: stable everywhere
    objects = sample_scene(rng, S)
    background = rng.choice(list(BACKGROUNDS))
    img = draw(rng, objects, background, S)
    caps = captions(rng, objects, background, S)
    qas = questions(rng, objects, background, cfg.questions)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # no text chunks nor timestamp; level 1: 2x faster than 6, +20%
    (out / "images" / split / f"{i:06d}.png").write_bytes(buf.getvalue())
    path = f"{split}/{i:06d}.png"
    entry = {"image": path, "caption": caps, "image_id": i, "background": background, "objects": objects}
    vqa = [{"image": path, "question": q, "answers": [ans] * 10, "image_id": i, "question_id": i * 10 + j, "type": t}
           for j, (t, q, ans) in enumerate(qas)]
    return entry, vqa, buf.tell()


def write_json_list(entries, path):
    """One entry per line, written to a temporary file and renamed. Returns the size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries) + "\n]\n", encoding="utf-8")
    os.replace(tmp, path)
    return path.stat().st_size


cfg = parse_args(PrepareConfig(), doc=__doc__)
if cfg.seed < 0 or cfg.train < 1 or min(cfg.val, cfg.test) < 0 or cfg.image_size < 16 or \
        not 1 <= cfg.questions <= len(QUESTION_TYPES):
    sys.exit(f"error: want --seed >= 0, --train >= 1 (the tokenizers learn from it), --val/--test >= 0, "
             f"--image_size >= 16 and 1 <= --questions <= {len(QUESTION_TYPES)}")
check(cfg)
out = Path(cfg.out)
t0 = time.time()

# -----------------------------------------------------------------------------
# images, captions, questions

counts = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
for split in SPLITS:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
bar = dict(total=len(jobs), desc="draw", unit="image", mininterval=1)
if workers > 1 and "fork" in mp.get_all_start_methods():  # fork: the workers see cfg and out without re-running this
    with mp.get_context("fork").Pool(workers) as pool:
        results = list(tqdm(pool.imap(make_image, jobs, chunksize=64), **bar))
else:
    results = [make_image(job) for job in tqdm(jobs, **bar)]
ann = {split: [] for split in SPLITS}
vqa = {split: [] for split in SPLITS}
disk = 0  # bytes written
for (split, _), (entry, qas, size) in zip(jobs, results):
    ann[split].append(entry)
    vqa[split] += qas
    disk += size
for split in SPLITS:
    disk += write_json_list(ann[split], out / f"{split}.json") + write_json_list(vqa[split], out / f"vqa_{split}.json")
t_images = time.time() - t0

# -----------------------------------------------------------------------------
# tokenizers, from the training captions and VQA texts

# each distinct text once: only the words count, and every word ends up whole either way
texts = sorted({c for e in ann["train"] for c in e["caption"]} |
               {qa_text(q) for q in vqa["train"]})  # sorted: sets vary between runs

# BERT WordPiece and T5 Unigram: every training word whole, most frequent first, then single characters as the
# fallback. A trainer run to convergence on this closed vocabulary of ~80 words would keep every word whole too; the
# tokenizers trainers do not do it here: WordPieceTrainer numbers its "##" pieces in hash order, so its vocabulary
# changes from run to run, and UnigramTrainer splits even frequent words on a corpus this small ("▁ye" "ll" "ow").
counts = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t))  # words and punctuation
words = sorted(counts, key=lambda w: (-counts[w], w))

# BERT: [PAD] [UNK] [CLS] [SEP] [MASK], the words, then every character and "##" letter or digit, so that any
# ASCII word encodes without [UNK]; read back with the pipeline load_bert_tokenizer builds around vocab.txt
tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(w.lower() for w in words))  # uncased
tokens += [c for c in string.ascii_lowercase + string.digits + string.punctuation if c not in counts]
tokens += [f"##{c}" for c in string.ascii_lowercase + string.digits]
(out / "bert").mkdir(exist_ok=True)
(out / "bert" / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")  # line number = id
(out / "bert" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}) + "\n", encoding="utf-8")

# T5: <pad> </s> <unk>, "▁" + each word scored by its log frequency (punctuation without "▁", as SentencePiece
# splits it off), then "▁" and every printable ASCII character, scored below any word: words stay whole
total = sum(counts.values())
pieces = {("▁" + w if w[0].isalnum() else w): math.log(counts[w] / total) for w in words}
floor = min(pieces.values()) - 1
pieces |= {c: floor for c in ["▁", *string.ascii_letters, *string.digits, *string.punctuation] if c not in pieces}
tk = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(pieces.items()), unk_id=2,
                              byte_fallback=False))
tk.add_special_tokens(["<pad>", "</s>", "<unk>"])  # ids unchanged; now never split and skipped by decode
tk.pre_tokenizer = pre_tokenizers.Metaspace()
tk.decoder = decoders.Metaspace()
tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B:1 </s>:1",
                                                  special_tokens=[("</s>", 1)])
(out / "t5").mkdir(exist_ok=True)
tk.save(str(out / "t5" / "tokenizer.json"))

# OPT byte-level BPE, as GPT-2's (tests/conftest.py opt_tokenizer_json)
tk = Tokenizer(models.BPE())
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
# every text also after a space: a word's first-in-text form ("what") and its mid-sentence form ("Ġwhat") differ
tk.train_from_iterator(texts + [" " + t for t in texts], trainers.BpeTrainer(
    vocab_size=cfg.opt_vocab, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tk.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s>:1 $B:1",
                                                  special_tokens=[("</s>", tk.token_to_id("</s>"))])
(out / "opt").mkdir(exist_ok=True)
tk.save(str(out / "opt" / "tokenizer.json"))

# check them through our own loaders: the ids the models assume, no unknown token in any word we wrote, and the
# longest val/test text in tokens (specials included), for max_txt_len
bert, opt, t5 = load_bert_tokenizer(out / "bert"), load_opt_tokenizer(out / "opt"), load_t5_tokenizer(out / "t5")
assert (bert.pad_id, bert.cls_id, bert.sep_id, bert.bos_id) == (0, 2, 3, len(tokens)), "BERT special ids"
assert (opt.pad_id, opt.bos_id, opt.eos_id, opt.tk.token_to_id("<unk>")) == (1, 2, 2, 3), "OPT special ids"
assert opt.tk.encode("\n").ids == [2, opt.newline_id], "'\\n' is not one OPT token"
assert (t5.pad_id, t5.eos_id, t5.tk.token_to_id("<unk>")) == (0, 1, 2), "T5 special ids"
eval_texts = sorted({c for s in ("val", "test") for e in ann[s] for c in e["caption"]} |
                    {qa_text(q) for s in ("val", "test") for q in vqa[s]})
every_word = " ".join(sorted({w for s in SPLITS for e in ann[s] for c in e["caption"] for w in c.split()} |
                             {w for s in SPLITS for q in vqa[s] for w in qa_text(q).split()}))
longest = {}
for name, tok, unk in (("bert", bert, "[UNK]"), ("opt", opt, "<unk>"), ("t5", t5, "<unk>")):
    encoded = [e.ids for e in tok.tk.encode_batch([every_word] + eval_texts)]
    bad = [t for t, ids in zip([every_word] + eval_texts, encoded) if tok.token_id(unk) in ids]
    assert not bad, f"{name}: unknown token in {bad[0]!r}"
    longest[name] = max(map(len, encoded[1:]), default=0)
t_total = time.time() - t0

# -----------------------------------------------------------------------------
# meta.json and the summary

meta = {"seed": cfg.seed, "image_size": cfg.image_size,
        "counts": {s: {"images": len(ann[s]), "captions": sum(len(e["caption"]) for e in ann[s]),
                       "distinct_captions": len({c for e in ann[s] for c in e["caption"]}),
                       "distinct_first_captions": len({e["caption"][0] for e in ann[s]}),
                       "questions": len(vqa[s])} for s in SPLITS},
        "shapes": SHAPES, "colours": COLOURS, "sizes": SIZES, "positions": POSITIONS, "backgrounds": BACKGROUNDS,
        "question_types": QUESTION_TYPES, "vocab_size": {"bert": len(bert), "opt": len(opt), "t5": len(t5)},
        "max_tokens": longest}
(out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
disk += sum((out / f).stat().st_size for f in ("meta.json", "bert/vocab.txt", "bert/tokenizer_config.json",
                                                "opt/tokenizer.json", "t5/tokenizer.json"))

for s in SPLITS:
    c = meta["counts"][s]
    print(f"{s}: {c['images']:,} images, {c['captions']:,} captions ({c['distinct_captions']:,} distinct; "
          f"{c['distinct_first_captions']:,} distinct first captions), {c['questions']:,} questions")
print(f"tokenizers: bert {len(bert)} (with [DEC]), opt {len(opt)}, t5 {len(t5)} tokens; the longest val/test text "
      f"is {longest['bert']} / {longest['opt']} / {longest['t5']} tokens, specials included")
print(f"wrote {out} ({disk / 2**20:.1f} MiB) in {t_total:.1f} s ({t_images:.1f} s drawing on {workers} process(es))")

if cfg.pretrain:  # the small frozen ViT, BERT and OPT BLIP-2 starts from, trained on the files above
    pretrain(cfg)
