"""pre_caption, the training transform, CaptionDataset + collate (with DataLoader workers), load_retrieval and
data/coco/prepare.py, on hand-made files. Offline, a few seconds (one subprocess imports torch)."""

import functools
import json
import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanoblip2.data import (CLIP_MEAN, CLIP_STD, AnnotationError, CaptionDataset, collate, eval_transform, load_image,
                            load_retrieval, pre_caption, random_resized_crop, read_annotations, train_transform)
from nanoblip2.tokenizer import load_bert_tokenizer

ROOT = Path(__file__).resolve().parents[1]
W, H = 37, 53  # odd and non-square


def picture(w=W, h=H, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -----------------------------------------------------------------------------
# captions

@pytest.mark.parametrize("text,expected", [
    ("A man riding a horse on the beach.", "a man riding a horse on the beach"),
    ("Wow!! A DOG. ", "wow a dog"),
    ('"Quoted" (parens) *star* #hash: semi; tilde~end', "quoted parens star hash semi tilde end"),
    ("it's a dog's-life, isn't it? yes/no & 50% [ok]", "it's a dog's-life, isn't it? yes/no & 50% [ok]"),  # kept
    ("  two   cats \n\n on  a\t\tmat  ", "two cats on a mat"),
    ("a cat on a mat\n", "a cat on a mat"),
    ("a\tcat", "a\tcat"),  # LAVIS only squeezes runs of 2+ whitespace; a lone tab stays (BERT splits on it)
    ("...", ""),
    ("", ""),
])
def test_pre_caption(text, expected):
    assert pre_caption(text) == expected


def test_pre_caption_max_words():
    words = [f"w{i}" for i in range(60)]
    assert pre_caption(" ".join(words)) == " ".join(words[:50])
    assert pre_caption("One, two. Three four five", max_words=3) == "one, two three"
    assert pre_caption(" ".join(words[:50]) + ".") == " ".join(words[:50])  # 50 words: nothing cut


# -----------------------------------------------------------------------------
# images

def test_train_transform_shape_range_and_determinism():
    t = train_transform(64)
    img = picture(200, 150)
    torch.manual_seed(0)
    a = t(img)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    lo = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    hi = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (a >= lo[:, None, None] - 1e-6).all() and (a <= hi[:, None, None] + 1e-6).all() and a.std() > 0.3
    torch.manual_seed(0)
    assert torch.equal(t(img), a)  # same seed, same crop and flip
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(t(img))
    assert all(not torch.equal(outs[i], outs[j]) for i in range(8) for j in range(i))  # crops differ by seed
    assert t(img.convert("L")).shape == (3, 64, 64)  # any mode goes to RGB first


def test_full_crop_is_load_image_or_its_flip():
    """scale 1 and the image's own aspect ratio: the box is the whole image, so the output is exactly load_image's
    arithmetic, flipped on about half the seeds."""
    img = picture()
    t = train_transform(48, scale=(1.0, 1.0), ratio=(W / H, W / H))
    ref = load_image(img, 48)
    flips = []
    for seed in range(20):
        torch.manual_seed(seed)
        x = t(img)
        assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1))
        flips.append(torch.equal(x, ref.flip(-1)))
    assert 3 <= sum(flips) <= 17
    assert torch.equal(eval_transform(48)(img), ref)


def test_crop_then_resize():
    """The box is cut out first and then resized (torchvision on PIL); PIL's resize(box=) would differ at edges."""
    img = picture(40, 40, seed=1)
    t = train_transform(24, scale=(0.25, 0.25), ratio=(1.0, 1.0))  # always a 20 x 20 box
    for seed in range(4):
        torch.manual_seed(seed)
        top, left, h, w = random_resized_crop(40, 40, (0.25, 0.25), (1.0, 1.0))
        flip = bool(torch.rand(1) < 0.5)
        torch.manual_seed(seed)
        x = t(img)
        assert (h, w) == (20, 20)
        ref = load_image(img.crop((left, top, left + w, top + h)), 24)
        assert torch.equal(x, ref.flip(-1) if flip else ref)
        boxed = load_image(img.resize((24, 24), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)), 24)
        assert not torch.equal(ref, boxed)


def test_random_resized_crop_bounds():
    Hh, Ww = 480, 640
    boxes = set()
    for seed in range(300):
        torch.manual_seed(seed)
        top, left, h, w = random_resized_crop(Hh, Ww)
        assert 0 <= top and top + h <= Hh and 0 <= left and left + w <= Ww
        assert 0.5 * Hh * Ww * 0.99 <= h * w <= Hh * Ww  # scale (0.5, 1), up to rounding
        assert 3 / 4 * 0.99 <= w / h <= 4 / 3 * 1.01  # ratio (3/4, 4/3), up to rounding
        boxes.add((top, left, h, w))
    assert len(boxes) > 290
    # the fallback when 10 tries fail: the largest centred crop whose ratio is in range, hand-checked
    assert random_resized_crop(10, 100) == (0, 43, 10, 13)  # too wide: h = 10, w = round(10 * 4/3)
    assert random_resized_crop(100, 10) == (43, 0, 13, 10)  # too tall: w = 10, h = round(10 / (3/4))
    assert random_resized_crop(30, 40, scale=(2.0, 2.0)) == (0, 0, 30, 40)  # never fits, ratio 4/3 in range


# -----------------------------------------------------------------------------
# datasets and collate

ANN = [
    {"image": "a.png", "caption": "A dog on the grass.", "image_id": 1},
    {"image": "sub/b.png", "caption": ["Two  cats!", "A cat; and another cat"], "image_id": 2},
    {"image": "bad.jpg", "caption": "never read"},
]
WORDS = "a dog on the grass two cats cat and another photo of".split()


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    picture(seed=1).save(root / "a.png")
    picture(60, 40, seed=2).save(root / "sub" / "b.png")
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "ann.json").write_text(json.dumps(ANN))
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ANN) + "\n")  # a blank line is fine
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    return tmp_path, root, load_bert_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("name", ["ann.json", "ann.jsonl"])
def test_caption_dataset(coco, name):
    tmp, root, _ = coco
    ds = CaptionDataset(tmp / name, root, eval_transform(32), prompt="a photo of ")
    assert len(ds) == 4  # a list of captions is one sample each
    assert ds.samples == [("a.png", "A dog on the grass."), ("sub/b.png", "Two  cats!"),
                          ("sub/b.png", "A cat; and another cat"), ("bad.jpg", "never read")]
    pixels, text, index = ds[2]
    assert torch.equal(pixels, load_image(root / "sub" / "b.png", 32))
    assert text == "a photo of a cat and another cat" and index == 2
    assert CaptionDataset(tmp / name, root, eval_transform(32), max_words=2)[1][1] == "two cats"
    with pytest.warns(UserWarning, match="bad.jpg: cannot read image"):
        assert ds[3] is None  # never raises for a bad image


def test_collate(coco):
    tmp, root, tok = coco
    ds = CaptionDataset(tmp / "ann.json", root, eval_transform(32))
    with pytest.warns(UserWarning):
        batch = collate([ds[3], ds[0], ds[3], ds[2]], tok)
    assert batch["skipped"] == 2
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and torch.equal(batch["pixel_values"][1], ds[2][0])
    assert batch["index"].tolist() == [0, 2]
    ids, mask = tok(["a dog on the grass", "a cat and another cat"], padding="longest")
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert batch["input_ids"].shape == (2, 7) and batch["attention_mask"][0].tolist() == [1] * 7  # longest, no more
    short = collate([ds[0], ds[2]], tok, max_length=4)
    assert short["input_ids"].shape == (2, 4) and short["input_ids"][:, -1].tolist() == [tok.sep_id] * 2
    with pytest.warns(UserWarning):
        empty = collate([ds[3]], tok)
    assert empty["skipped"] == 1 and empty["pixel_values"].shape[0] == empty["input_ids"].shape[0] == 0


def test_dataloader_workers(coco):
    tmp, root, tok = coco
    ds = CaptionDataset(tmp / "ann.jsonl", root, train_transform(32))
    collate_fn = functools.partial(collate, tokenizer=tok, max_length=16)
    pickle.loads(pickle.dumps((ds, collate_fn)))  # what a spawn/forkserver worker needs

    def run(seed):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_fn,
                                             generator=torch.Generator().manual_seed(seed))
        return list(loader)

    a, b, c = run(0), run(0), run(1)  # the bad image warns inside a worker
    assert [x["index"].tolist() for x in a] == [[0, 1], [2]]
    assert sum(x["skipped"] for x in a) == 1 and a[1]["pixel_values"].shape == (1, 3, 32, 32)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))  # seeded workers: same crops
    assert not torch.equal(a[0]["pixel_values"], c[0]["pixel_values"])


def test_missing_paths_are_named(coco, tmp_path):
    tmp, root, _ = coco
    with pytest.raises(FileNotFoundError, match="nope.json: annotation file not found") as e:
        CaptionDataset(tmp / "nope.json", root, eval_transform(32))
    assert str(tmp / "nope.json") in str(e.value)
    with pytest.raises(FileNotFoundError, match="no_images: image folder not found") as e:
        CaptionDataset(tmp / "ann.json", tmp / "no_images", eval_transform(32))
    assert str(tmp / "no_images") in str(e.value)
    with pytest.raises(FileNotFoundError, match="no_images"):
        load_retrieval(tmp / "ann.json", tmp / "no_images")


@pytest.mark.parametrize("lines,where,what", [
    (['{"image": "a.png", "caption": "x"}', '{"image": "a.png", "caption": "x"', ""], ":2: ", "bad JSON"),
    (['{"image": "a.png", "caption": "x"}', "", '{"image": "a.png"}'], ":3: ", "keys ['image']"),
    (['{"image": "a.png", "caption": ["x", 3]}'], ":1: ", "want"),
    (['["a.png", "x"]'], "[0]: ", "got str"),  # a JSON list whose items are not objects
    (['[{"image": "a.png", "caption": "x"},', '{"caption": "x"}]'], "[1]: ", "keys ['caption']"),
    (['[{"image": "a.png", "caption": "x"},', '{"image": "a.png" "caption": "x"}]'], ":2: ", "bad JSON"),
    (['{"images": [], "dataset": "coco"}'], ":1: ", "Karpathy file? convert it with data/coco/prepare.py"),
    (['{"image": "a.png", "caption": "x"}', '{"image": "a.png", "caption": []}'], ":2: ", 'caption ("caption": [])'),
    (['[{"image": "a.png", "caption": ["", " "]}]'], "[0]: ", 'no usable caption ("caption": ["", " "])'),
    (['{"image": "a.png", "caption": ""}'], ":1: ", "no usable caption"),
])
def test_broken_annotations_name_the_line(tmp_path, lines, where, what):
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError) as e:
        read_annotations(path)
    assert str(e.value).startswith(f"{path}{where}") and what in str(e.value)
    assert e.value.__context__ is None or e.value.__suppress_context__  # one error, no json traceback


def test_vqa_annotations(tmp_path, coco):
    path = tmp_path / "vqa.jsonl"
    good = {"image": "a.png", "question": "why?", "answers": ["no", "yes"], "type": "why"}
    path.write_text(json.dumps(good) + "\n")
    assert read_annotations(path, "vqa") == [good]
    for bad, where, what in [(dict(good, answers=[]), ":2: ", 'no usable answer ("answers": [])'),
                             (dict(good, answers=[""]), ":2: ", "no usable answer"),
                             (dict(good, answers="no"), ":2: ", '"answers": [str, ...]}, got keys'),
                             ({"image": "a.png", "caption": "x"}, ":2: ", "got keys ['caption', 'image']")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(AnnotationError) as e:
            read_annotations(path, "vqa")
        assert str(e.value).startswith(f"{path}{where}") and what in str(e.value), str(e.value)
    with pytest.raises(AnnotationError, match=":1: want"):  # a VQA file is not a caption file
        read_annotations(path)
    empty = tmp_path / "empty.json"  # every reader refuses an entry with no caption
    empty.write_text(json.dumps([{"image": "a.png", "caption": []}]))
    for read in (lambda: CaptionDataset(empty, coco[1], eval_transform(32)), lambda: load_retrieval(empty, coco[1])):
        with pytest.raises(AnnotationError, match=r"empty.json\[0\]: no usable caption"):
            read()


def test_load_retrieval(coco):
    tmp, root, _ = coco
    images, texts, img2txt, txt2img = load_retrieval(tmp / "ann.json", root)
    assert images == [str(root / "a.png"), str(root / "sub" / "b.png"), str(root / "bad.jpg")]
    assert texts == ["a dog on the grass", "two cats", "a cat and another cat", "never read"]
    assert img2txt == [[0], [1, 2], [3]]
    assert txt2img == [0, 1, 1, 2]
    assert all(txt2img[t] == i for i, ts in enumerate(img2txt) for t in ts)


# -----------------------------------------------------------------------------
# data/coco/prepare.py

def karpathy_file(path):
    def image(cocoid, split, n):
        folder = "train2014" if split == "train" else "val2014"
        return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "split": split, "cocoid": cocoid,
                "imgid": cocoid, "sentences": [{"raw": f"Caption {k} of {cocoid}.", "tokens": []} for k in range(n)]}
    images = [image(9, "train", 5), image(25, "restval", 6), image(30, "val", 5), image(42, "test", 5),
              image(49, "restval", 5), image(61, "test", 7)]
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))


def test_prepare_coco(tmp_path):
    karpathy_file(tmp_path / "dataset_coco.json")
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    picture().save(tmp_path / "images" / "val2014" / "COCO_val2014_000000000030.jpg")
    r = subprocess.run([sys.executable, str(ROOT / "data" / "coco" / "prepare.py"), "--download=false",
                        f"--karpathy={tmp_path / 'dataset_coco.json'}", f"--out={tmp_path / 'out'}",
                        f"--images={tmp_path / 'images'}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: 3 images, 16 captions" in r.stdout and "val: 1 images, 5 captions" in r.stdout
    assert "test: 2 images, 12 captions" in r.stdout
    assert "5 of 6 images are missing" in r.stdout
    splits = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert [e["image_id"] for e in splits["train"]] == [9, 25, 49]  # train + restval
    assert [e["image_id"] for e in splits["test"]] == [42, 61]
    assert splits["val"] == [{"image": "val2014/COCO_val2014_000000000030.jpg",
                              "caption": [f"Caption {k} of 30." for k in range(5)], "image_id": 30}]
    ds = CaptionDataset(tmp_path / "out" / "val.json", tmp_path / "images", eval_transform(32))
    assert len(ds) == 5 and ds[4][1] == "caption 4 of 30" and ds[0][0].shape == (3, 32, 32)
    firsts = CaptionDataset(tmp_path / "out" / "val.json", tmp_path / "images", eval_transform(32), captions_per_image=2)
    assert [c for _, c in firsts.samples] == ["Caption 0 of 30.", "Caption 1 of 30."]
    assert len(CaptionDataset(tmp_path / "out" / "train.json", tmp_path / "images", eval_transform(32))) == 16


def test_prepare_coco_errors(tmp_path, monkeypatch, capsys):
    script = str(ROOT / "data" / "coco" / "prepare.py")
    for argv, message in [
        (["--download=false", f"--out={tmp_path}"], "dataset_coco.json: no such file"),
        ([f"--karpathy={tmp_path / 'nope.json'}"], "nope.json: no such file (--karpathy)"),  # before any download
        (["--colour=red"], "unknown option --colour"),
    ]:
        monkeypatch.setattr(sys, "argv", [script] + argv)
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
        assert message in str(e.value)
