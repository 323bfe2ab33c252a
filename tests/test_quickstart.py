"""The quick start end to end, scaled down: data/shapes/prepare.py -> train_stage1.py -> train_stage2.py -> sample.py,
the real scripts with their default paths, run in a fresh folder as the README runs them; flags only make it small."""
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data/shapes/prepare.py": ["--train=1000", "--val=40", "--test=100", "--vit_steps=150", "--bert_steps=40",
                               "--opt_steps=80", "--opt_copy=0", "--pretrain_batch=32", "--models=vit,bert,opt,t5",
                               "--t5_steps=40", "--t5_copy=0"],
    "train_stage1.py": ["--max_steps=60", "--batch_size=32", "--lr=1e-3", "--warmup_steps=5", "--eval_interval=60",
                        "--log_interval=10", "--num_workers=0"],  # (ITC meets the pool's negatives from step 800)
    "train_stage2.py": ["--max_steps=60", "--batch_size=32", "--lr=1e-3", "--warmup_steps=5", "--eval_interval=60",
                        "--log_interval=10", "--num_workers=0", "--eval_num_beams=1", "--eval_max_images=50"],
}


def run(cwd, script, *args):
    p = subprocess.run([sys.executable, str(ROOT / script), *SMALL.get(script, []), *args], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def metrics(log, split):
    line = [m for m in re.findall(rf"^eval {split} step \d+ \| (.*)$", log, re.M) if "caption:" not in m][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", line)}


def test_quick_start(tmp_path):
    run(tmp_path, "data/shapes/prepare.py")
    log = run(tmp_path, "train_stage1.py")
    r = metrics(log, "test")  # 100 test images, each with its first caption: chance R@1, 5, 10 = 1, 5, 10%
    assert min(r["txt_r1"], r["img_r1"]) >= 3 and min(r["txt_r_mean"], r["img_r_mean"]) >= 2.5 * 16 / 3, r
    log = run(tmp_path, "train_stage2.py")
    c = metrics(log, "test")  # measured: CIDEr 0.09, BLEU-1 0.44, 16% of the objects named; a caption
    assert c["CIDEr"] >= 0.03 and c["Bleu_1"] >= 0.15 and c["scene_objects"] >= 0.1, c  # naming no object: 0.0
    # FlanT5's prefix LM on the same stage-1 checkpoint learns (measured: 3.17 at step 1, 2.93 at 50 and 60)
    log = run(tmp_path, "train_stage2.py", "--lm=data/shapes/t5", "--out_dir=out/stage2_t5", "--eval_max_images=20")
    loss = [float(x) for x in re.findall(r"^step \d+ \| loss ([\d.]+)", log, re.M)]
    assert len(loss) == 7 and sum(loss[-2:]) / 2 < 0.95 * loss[0], loss
    out = run(tmp_path, "data/shapes/probe_vqa.py", "--init_from=out/stage2_t5/ckpt", "--max_questions=12")
    rows = re.findall(r"^after (.+): generated ([\d.]+) \(.*\); ranked ([\d.]+) \(", out, re.M)
    assert [r[0] for r in rows] == ["nothing (the prior)", "the first caption (ceiling)", "its own caption",
                                    "the soft prompt (zero-shot)"], out
    assert all(0 <= float(x) <= 100 for r in rows for x in r[1:]), rows
    image = "data/shapes/images/test/000001.png"
    out = run(tmp_path, "sample.py", f"--image={image}", "--attention=att.png")
    assert "loaded out/stage2/ckpt: OPT" in out and re.search(rf"^{image}: \w+", out, re.M), out
    assert Image.open(tmp_path / "att.png").size[0] > 0
