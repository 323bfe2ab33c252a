"""data/shapes/prepare.py, the quick start's synthetic world: byte-identical for a seed whatever the number of
processes, captions, questions and pixels that agree with each image's "objects", files our datasets and tokenizer
loaders read. Three small runs without pretraining, one in a subprocess: a few seconds. And one tiny run with a few
steps of pretraining, whose ViT, BERT and OPT folders stage 1 and stage 2 load as they load real checkpoints, and
which data/shapes/pretrain.py, run alone on the same world, writes again byte for byte."""
import hashlib
import json
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanoblip2 import Blip2, Blip2Stage1
from nanoblip2.data import CaptionDataset, eval_transform, load_image, load_retrieval, pre_caption
from nanoblip2.tokenizer import load_bert_tokenizer, load_opt_tokenizer, load_t5_tokenizer
from nanoblip2.metrics import vqa_normalize

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"train": 60, "val": 10, "test": 20}
RUNS = {"a": ["--seed=3", "--workers=1"], "b": ["--seed=3", "--workers=2"], "c": ["--seed=4", "--workers=2"]}
# run "a"'s annotations as the code wrote them before the pretraining moved to pretrain.py: a change to the world's
# draws or texts must be deliberate (the PNGs and tokenizers are left out: their bytes depend on zlib and tokenizers)
GOLDEN = {"train.json": "e7a2f983e7c76d20ecaf511e96bf70db6ad418cbc19c71aac974073d958e29b9",
          "val.json": "17645f15bb1274ccfbc0248958c26dbc9d4e143bb6c1c3941c8150d44b094fda",
          "test.json": "057eada5eaee4f65bb30449e52d8377c05b1ab1db46e1f7605bd14e8b6e64a35",
          "vqa_train.json": "4bff43927b92fb54660fb6c206497fe91d277de5e4c459a1551d36cf01a55a8c",
          "vqa_val.json": "5c9ec29e48b766f4cc7924c55f230251b93ee116d352fd5bcf34da0123f3e88e",
          "vqa_test.json": "8efdb410a3110e98c31bc39f976dd999bdbd811fb83cc48d94f13cb37a25014e"}
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
         "middle": "in the middle", "right": "on the right", "bottom left": "in the bottom left",
         "bottom": "at the bottom", "bottom right": "in the bottom right"}


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run "a" in a subprocess (its own PYTHONHASHSEED, one process); "b" (same seed, two processes) and "c" (another
    seed) meanwhile in this one, which skips two torch imports."""
    base = tmp_path_factory.mktemp("shapes")
    script = str(ROOT / "data" / "shapes" / "prepare.py")
    argv = lambda name: [f"--out={base / name}", *RUNS[name], "--pretrain=false",  # noqa: E731
                         *(f"--{s}={n}" for s, n in COUNTS.items())]
    proc = subprocess.Popen([sys.executable, script, *argv("a")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    saved = sys.argv
    try:
        for name in ("b", "c"):
            sys.argv = [script] + argv(name)
            runpy.run_path(script, run_name="__main__")  # as __main__, so that the pool's workers find make_image
    finally:
        sys.argv = saved
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"test: {COUNTS['test']} images" in stdout
    return {name: base / name for name in RUNS}


@pytest.fixture(scope="module")
def data(runs):
    out = runs["a"]
    read = lambda name: json.loads((out / name).read_text(encoding="utf-8"))  # noqa: E731
    return out, read("meta.json"), {s: read(f"{s}.json") for s in COUNTS}, {s: read(f"vqa_{s}.json") for s in COUNTS}


def hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(runs):
    a, b = hashes(runs["a"]), hashes(runs["b"])
    pngs = {f"images/{s}/{i:06d}.png" for s, n in COUNTS.items() for i in range(n)}
    rest = {"train.json", "val.json", "test.json", "vqa_train.json", "vqa_val.json", "vqa_test.json", "meta.json",
            "bert/vocab.txt", "bert/tokenizer_config.json", "opt/tokenizer.json", "t5/tokenizer.json"}
    assert set(a) == pngs | rest  # and no stray .tmp files
    assert a == b
    assert {f: a[f] for f in GOLDEN} == GOLDEN


def test_another_seed_changes_everything(runs):
    a, c = hashes(runs["a"]), hashes(runs["c"])
    assert set(a) == set(c)
    pngs = [f for f in a if f.endswith(".png")]
    assert sum(a[f] == c[f] for f in pngs) == 0
    for f in ("train.json", "vqa_train.json", "test.json"):
        assert a[f] != c[f]


def test_datasets_read_the_annotations(data):
    out, meta, ann, _ = data
    ds = CaptionDataset(out / "train.json", out / "images", eval_transform(32))
    captions = [c for e in ann["train"] for c in e["caption"]]
    assert len(ds) == len(captions) == meta["counts"]["train"]["captions"]
    pixels, text, index = ds[7]
    assert pixels.shape == (3, 32, 32) and text == pre_caption(captions[7]) and index == 7
    images, texts, img2txt, txt2img = load_retrieval(out / "test.json", out / "images")
    assert len(images) == COUNTS["test"] and images[0] == str(out / "images" / "test" / "000000.png")
    assert [len(t) for t in img2txt] == [len(e["caption"]) for e in ann["test"]]
    assert len(texts) == len(txt2img) == sum(len(e["caption"]) for e in ann["test"])
    for split, n in COUNTS.items():
        assert [e["image_id"] for e in ann[split]] == list(range(n))
        assert meta["counts"][split]["images"] == n


def test_captions_describe_the_objects(data):
    _, meta, ann, _ = data
    shapes, colours = set(meta["shapes"]), set(meta["colours"])
    relation = re.compile(r"an? (small|big) (\w+) (\w+) (to the left of|to the right of|above|below) "
                          r"an? (small|big) (\w+) (\w+)")
    for split in COUNTS:
        for e in ann[split]:
            objects, caps = e["objects"], e["caption"]
            assert 1 <= len(objects) <= 3 and 3 <= len(caps) <= 5 and len(set(caps)) == len(caps)
            assert len({o["shape"] for o in objects}) == len({o["colour"] for o in objects}) == len(objects)
            # the first caption: every object, in reading order, with size, colour, shape and position
            described = [f"{article(o['size'])} {o['colour']} {o['shape']} {WHERE[o['position']]}" for o in objects]
            canonical = described[0] if len(objects) == 1 else ", ".join(described[:-1]) + " and " + described[-1]
            canonical += f" on a {e['background']} background" if len(objects) <= 2 else ""
            assert caps[0] == canonical and len(canonical.split()) <= 26
            assert [meta["positions"].index(o["position"]) for o in objects] == \
                sorted(meta["positions"].index(o["position"]) for o in objects)
            for c in caps:  # every colour, shape and size named is in the image (the background's name aside)
                words = c.replace(f"{e['background']} background", "").replace(",", "").replace(":", "").split()
                assert {w for w in words if w in colours} <= {o["colour"] for o in objects}, c
                assert {w for w in words if w in shapes} <= {o["shape"] for o in objects}, c
                assert {w for w in words if w in ("small", "big")} <= {o["size"] for o in objects}, c
                assert "shape" in c or {w for w in words if w in shapes}, c
                if m := relation.fullmatch(c):  # "a big red circle to the left of a small blue star": true
                    a, b = ({"size": m[i], "colour": m[i + 1], "shape": m[i + 2]} for i in (1, 5))
                    a, b = ([o for o in objects if {k: o[k] for k in p} == p][0] for p in (a, b))
                    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
                    assert {"to the left of": dx > 0, "to the right of": dx < 0, "above": dy > 0,
                            "below": dy < 0}[m[4]] and max(abs(dx), abs(dy)) > 1.5 * min(abs(dx), abs(dy)), c
            for i, p in enumerate(objects):  # no overlap, positions by the centre's grid cell
                S = meta["image_size"]
                assert meta["positions"][3 * int(p["y"] * 3 // S) + int(p["x"] * 3 // S)] == p["position"]
                for q in objects[i + 1:]:
                    assert math.dist((p["x"], p["y"]), (q["x"], q["y"])) >= p["r"] + q["r"]


def test_vqa_answers_follow_from_the_objects(data):
    _, meta, ann, vqa = data
    for split in COUNTS:
        entries = {e["image"]: e for e in ann[split]}
        assert len(vqa[split]) == 3 * COUNTS[split]
        assert len({q["question_id"] for q in vqa[split]}) == len(vqa[split])
        for q in vqa[split]:
            e = entries[q["image"]]
            objects, question = e["objects"], q["question"]
            assert q["image_id"] == e["image_id"] and len(q["answers"]) == 10 and len(set(q["answers"])) == 1

            def one(**kw):
                found = [o for o in objects if all(o[k] == v for k, v in kw.items())]
                assert len(found) == 1, question
                return found[0]
            if question == "how many shapes are there?":
                answer = str(len(objects))  # digits, as VQAv2 stores answers
            elif question == "what colour is the background?":
                answer = e["background"]
            elif m := re.fullmatch(r"what colour is the (\w+)\?", question):
                answer = one(shape=m[1])["colour"]
            elif m := re.fullmatch(r"what shape is the (\w+) object\?", question):
                answer = one(colour=m[1])["shape"]
            elif m := re.fullmatch(r"is the (\w+) (\w+) big or small\?", question):
                answer = one(colour=m[1], shape=m[2])["size"]
            elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
                answer = one(colour=m[1], shape=m[2])["position"]
            elif m := re.fullmatch(r"is there an? (\w+) shape\?", question):
                assert m[1] in meta["colours"]
                answer = "yes" if m[1] in [o["colour"] for o in objects] else "no"
            elif m := re.fullmatch(r"is there an? (\w+)\?", question):
                assert m[1] in meta["shapes"]
                answer = "yes" if m[1] in [o["shape"] for o in objects] else "no"
            else:
                raise AssertionError(f"unexpected question {question!r}")
            assert q["answers"][0] == answer == vqa_normalize(answer), (question, q["answers"][0], objects)
    types = [q["type"] for s in COUNTS for q in vqa[s]]
    assert set(types) == set(meta["question_types"])


def test_pixels_show_the_objects(data):
    out, meta, ann, _ = data
    for e in ann["test"] + ann["val"]:
        img = Image.open(out / "images" / e["image"])
        assert img.mode == "RGB" and img.size == (meta["image_size"],) * 2
        for o in e["objects"]:  # the centre pixel is the object's colour, within the +-15 jitter
            pixel = img.getpixel((int(o["x"]), int(o["y"])))
            assert max(abs(p - c) for p, c in zip(pixel, meta["colours"][o["colour"]])) <= 16, (e["image"], o)
        corner = img.getpixel((0, 0))  # never covered: centres are r + 1 from the edges
        assert max(abs(p - c) for p, c in zip(corner, meta["backgrounds"][e["background"]])) <= 45, e["image"]


def test_tokenizers_load_and_cover_the_texts(data):
    out, meta, ann, vqa = data
    bert, opt, t5 = load_bert_tokenizer(out / "bert"), load_opt_tokenizer(out / "opt"), load_t5_tokenizer(out / "t5")
    assert (bert.pad_id, bert.tk.token_to_id("[UNK]"), bert.cls_id, bert.sep_id, bert.tk.token_to_id("[MASK]")) == \
        (0, 1, 2, 3, 4)
    assert bert.bos_id == len(bert) - 1 == len((out / "bert" / "vocab.txt").read_text().splitlines())  # [DEC] next
    assert (opt.tk.token_to_id("<s>"), opt.pad_id, opt.bos_id, opt.eos_id) == (0, 1, 2, 2)
    assert opt.tk.token_to_id("<unk>") == 3
    assert (t5.pad_id, t5.eos_id, t5.tk.token_to_id("<unk>"), t5.bos_id) == (0, 1, 2, None)
    assert len(opt) <= 512 and opt.tk.token_to_id("Ċ") == opt.newline_id
    assert opt.tk.encode("\n").ids == [2, opt.newline_id]
    assert meta["vocab_size"] == {"bert": len(bert), "opt": len(opt), "t5": len(t5)}
    texts = [c for e in ann["train"] for c in e["caption"]]
    texts += [f"Question: {q['question']} Answer: {q['answers'][0]}" for q in vqa["train"]]  # as the LM reads them
    for text in texts:
        ids = bert.tk.encode(text).ids
        assert 1 not in ids and ids[0] == 2 and ids[-1] == 3, text
        assert len(ids) - 2 == len(re.findall(r"\w+|[^\w\s]", text)), text  # every word one token
        ids = opt.tk.encode(text + "\n").ids
        assert 3 not in ids and ids[0] == 2 and ids[-1] == opt.newline_id and opt.decode(ids) == text + "\n", text
        assert len(ids) - 2 == len(re.findall(r"\w+|[^\w\s]", text)), text
        ids = t5.tk.encode(text).ids
        assert 2 not in ids and ids[-1] == 1 and t5.decode(ids) == text, text
        assert len(ids) - 1 == len(re.findall(r"\w+|[^\w\s]", text)), text
    # and any ASCII text encodes without an unknown token, prompts included
    text = "Question: What's the 2nd shape (zebra-striped)? Short answer:"
    assert 1 not in bert.tk.encode(text).ids and 2 not in t5.tk.encode(text).ids
    ids, mask = opt(["a red circle\n", "two shapes"], max_length=10)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]] and ids[1, -1] == opt.pad_id  # </s> a red circle \n
    assert torch.equal(ids[0], torch.tensor(opt.tk.encode("a red circle\n").ids))


WORLD = ["--train=60", "--val=10", "--test=10", "--workers=1"]
PRETRAIN = ["--vit_steps=3", "--bert_steps=3", "--opt_steps=3", "--pretrain_batch=8"]


def script(name, out, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "shapes" / name), f"--out={out}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """prepare.py's world and, after it, pretrain.py's models, in one run: (folder, stdout)."""
    out = tmp_path_factory.mktemp("pretrained") / "shapes"
    return out, script("prepare.py", out, *WORLD, *PRETRAIN)


def test_pretrain_alone_writes_what_prepare_writes(pretrained, tmp_path):
    out, stdout = pretrained
    alone = tmp_path / "shapes"
    world = script("prepare.py", alone, *WORLD, "--pretrain=false")
    data = hashes(alone)
    log = script("pretrain.py", alone, *PRETRAIN)
    assert hashes(alone) == hashes(out)  # the same weights, and the world's files as they were
    assert {f: h for f, h in hashes(out).items() if f in data} == data
    def same(text):  # without the times and the folder's name
        return re.sub(r"[\d.]+ s\b", "_ s", text.replace(str(out), "OUT").replace(str(alone), "OUT"))
    assert same(stdout) == same(world + log)  # the same losses and accuracies printed, in the same order
    assert "pretrained vit in" in log and "pretrained opt in" in log


def test_pretrained_models_load_into_stage1_and_stage2(pretrained):
    out, stdout = pretrained
    assert "vit val: images with every label" in stdout and "opt greedy: " in stdout
    assert re.search(r"patches on an object with its shape right [\d.]+, colour right [\d.]+, size right [\d.]+, "
                     r"position right [\d.]+", stdout)
    for folder, files in (("vit", ["config.json", "model.safetensors"]),
                          ("bert", ["vocab.txt", "tokenizer_config.json", "config.json", "model.safetensors"]),
                          ("opt", ["tokenizer.json", "config.json", "model.safetensors"])):
        assert all((out / folder / f).is_file() for f in files), folder  # weights next to the tokenizer
    torch.manual_seed(0)
    stage1 = Blip2Stage1.from_vit_bert(str(out / "vit"), str(out / "bert"), num_query_tokens=4)
    assert stage1.cfg.vit.depth == 4 and stage1.cfg.qformer.vocab_size == len(load_bert_tokenizer(out / "bert"))
    entries = json.loads((out / "train.json").read_text())[:4]
    pixels = torch.stack([load_image(out / "images" / e["image"], 64) for e in entries])
    ids, mask = load_bert_tokenizer(out / "bert")([e["caption"][0] for e in entries], max_length=32)
    losses = stage1(pixels, ids, mask)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in ("loss_itc", "loss_itm", "loss_itg"))
    stage2 = Blip2.from_stage1(stage1, str(out / "opt"))
    assert stage2.cfg.lm.vocab_size % 8 == 0 and stage2.cfg.lm.vocab_size >= len(load_opt_tokenizer(out / "opt"))
    assert stage2.cfg.lm.word_embed_proj_dim == stage2.cfg.lm.width  # a plain OPT, no project_in/out
    from nanoblip2.data import opt_batch
    loss = stage2(pixels, opt_batch(stage2.tokenizer, [e["caption"][0] for e in entries], num_queries=4))["loss"]
    assert torch.isfinite(loss) and loss > 0
