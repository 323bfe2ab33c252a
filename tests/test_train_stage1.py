"""train_stage1.py on a tiny dataset made here: the loss falls, checkpoints are written, resume is exact."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.load import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ["square", "circle"]
WORDS = ["a", "small", "big", "red", "green", "blue", "yellow", "square", "circle", "on", "white", "background"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, bert_folder):
    d = tmp_path_factory.mktemp("stage1")
    (d / "images").mkdir()
    entries = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        img = Image.new("RGB", (28, 28), "white")
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)([6, 6, 22, 22], fill=COLOURS[colour])
        img.save(d / "images" / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [f"a {colour} {shape}", f"a {colour} {shape} on white background"]})
    (d / "images" / "broken.png").write_bytes(b"not a png")
    (d / "train.json").write_text(json.dumps(entries + [{"image": "broken.png", "caption": "a broken image"}]))
    (d / "val.json").write_text(json.dumps(entries + [{"image": "broken.png", "caption": "a broken image"}]))
    bert = d / "bert"  # the tiny BERT of conftest (vocabulary 98) with a vocabulary file of 98 entries
    shutil.copytree(bert_folder[0], bert)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["broken", "image"]
    vocab += [f"[unused{i}]" for i in range(98 - len(vocab))]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return d


def train(data, itm_folder, out, *extra):
    args = [sys.executable, os.path.join(ROOT, "train_stage1.py"), f"--vit={itm_folder[0]}", f"--bert={data / 'bert'}",
            f"--train_ann={data / 'train.json'}", f"--val_ann={data / 'val.json'}", f"--image_root={data / 'images'}",
            f"--out_dir={out}", "--image_size=28", "--batch_size=4", "--num_workers=0", "--warmup_steps=2",
            "--lr=1e-3", "--log_interval=1", "--eval_k_test=4", "--eval_max_images=0", "--eval_captions=0",
            "--test_ann=", "--augment=true", *extra]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def losses(log):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+) \| loss ([\d.]+)", log, re.M)}


def test_loss_falls_and_checkpoint_is_written(data, itm_folder, tmp_path):
    log = train(data, itm_folder, tmp_path / "run", "--max_steps=40", "--eval_interval=20",
                f"--test_ann={data / 'val.json'}")
    ls = losses(log)
    first, last = sum(ls[s] for s in range(1, 6)) / 5, sum(ls[s] for s in range(36, 41)) / 5
    assert len(ls) == 40 and last < 0.8 * first, ls
    assert "skipped 1 unreadable image(s)" in log  # the broken image is counted, the run goes on
    assert re.search(r"eval val step 20 \| txt_r1 [\d.]+ \| txt_r5", log) and "eval test step 20" not in log
    assert "eval val step 20 | 1 skipped (unreadable image, e.g. " in log  # evaluation skips it too, and says so
    assert re.search(r"eval val step 40 \| txt_r1 .*\neval val step 40 \| 1 skipped .*\n"
                     r"eval test step 40 \| txt_r1 [\d.]+ \| txt_r5", log)
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["config.json", "meta.json", "model.safetensors", "optim.pt"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["nanoblip2"] == "stage1" and cfg["frozen"]["vit"] == itm_folder[0]
    # the ViT is named by path: a checkpoint whose ViT files changed since is refused, naming both
    vit = tmp_path / "vit"
    shutil.copytree(itm_folder[0], vit)
    w = load_file(vit / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in w.items()}, vit / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps(cfg | {"frozen": {"vit": str(vit)}}))
    with pytest.raises(CheckpointError, match=f"{ckpt}: its frozen vit {vit} has changed since"):
        Blip2Stage1.from_pretrained(str(ckpt))
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 40


def test_resume_reproduces_the_next_steps(data, itm_folder, tmp_path):
    common = ["--lr_decay_steps=8", "--eval_interval=4"]
    full = losses(train(data, itm_folder, tmp_path / "full", "--max_steps=8", *common))
    train(data, itm_folder, tmp_path / "cut", "--max_steps=4", *common)
    resumed = losses(train(data, itm_folder, tmp_path / "cut", "--max_steps=8", "--init_from=resume", *common))
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert abs(resumed[step] - full[step]) < 1e-5, (step, resumed[step], full[step])


def test_itc_pool_joins_after_its_warm_up(data, itm_folder, tmp_path):
    common = ["--max_steps=6", "--eval_interval=6", "--itm_pool=64"]
    off = losses(train(data, itm_folder, tmp_path / "off", "--itc_pool=false", *common))
    late = losses(train(data, itm_folder, tmp_path / "late", "--itc_pool_after=3", *common))
    assert [late[s] for s in (1, 2, 3)] == [off[s] for s in (1, 2, 3)], (late, off)  # the batch only, bit for bit
    assert all(late[s] != off[s] for s in (4, 5, 6)), (late, off)  # then the pool's negatives join ITC


def test_unknown_flag_is_an_error():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_stage1.py"), "--batchsize=3"], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode != 0 and "unknown option --batchsize" in p.stderr and "Traceback" not in p.stderr


def test_torchrun_two_processes(data, itm_folder, tmp_path):
    """The real script under torchrun on the CPU (gloo): two ranks train, rank 0 logs, evaluates and saves."""
    import socket
    args = [os.path.join(ROOT, "train_stage1.py"), f"--vit={itm_folder[0]}", f"--bert={data / 'bert'}",
            f"--train_ann={data / 'train.json'}", f"--val_ann={data / 'val.json'}", f"--image_root={data / 'images'}",
            f"--out_dir={tmp_path}", "--image_size=28", "--batch_size=2", "--num_workers=0", "--max_steps=3",
            "--eval_interval=3", "--log_interval=1", "--eval_k_test=4", "--eval_max_images=0", "--test_ann="]
    errors = []
    for attempt in range(2):  # once more on a fresh port: this machine is shared, and ports can be taken
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", *args],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        if p.returncode == 0:
            break
        errors.append(p.stderr[-2000:])
    assert p.returncode == 0, "\n----\n".join(errors)
    assert "2 process(es)" in p.stdout and len(losses(p.stdout)) == 3 and p.stdout.count("saved") == 1
    state = __import__("torch").load(tmp_path / "ckpt" / "optim.pt", weights_only=True)
    assert len(state["rng"]["torch"]) == 2  # each rank's random state, for an exact resume
