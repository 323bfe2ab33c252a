"""sample.py end to end on a tiny BLIP-2 folder built in the test: captions, answers and its one-line errors."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, script="sample.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: more threads only add overhead on a busy machine
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env=env)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    Image.new("RGB", (33, 51), (30, 30, 200)).save(d / "blue.jpg")
    return d


def test_caption_and_answer_a_folder(blip2_opt, images):
    code, out, err = run(f"--init_from={blip2_opt[0]}", f"--image={images}", "--device=cpu", "--max_new_tokens=5")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"loading {blip2_opt[0]}: ") and "GiB in float32 (auto: float32 needs" in lines[0]
    assert lines[1].startswith("loaded Blip2: 186 tensors")  # the loader's summary
    lines = lines[2:]
    assert lines[0].startswith(f"loaded {blip2_opt[0]}: OPT,") and "torch.float32" in lines[0]
    assert len(lines) == 3 and lines[1].startswith(str(images / "blue.jpg") + ": ") and lines[2].startswith(str(images / "red.png") + ": ")
    code, out, err = run(f"--init_from={blip2_opt[0]}", f"--image={images / 'red.png'}", "--question=what colour?",
                         "--num_beams=2")
    assert code == 0, err
    assert ": Q: what colour? A: " in out.strip().splitlines()[3]


def test_t5_folder(blip2_t5, images):
    code, out, err = run(f"--init_from={blip2_t5[0]}", f"--image={images / 'red.png'}", "--prompt=a photo of")
    assert code == 0, err
    assert "FlanT5" in out and out.strip().splitlines()[3].startswith(str(images / "red.png") + ": a photo of")


def test_auto_dtype_follows_the_free_memory():
    sys.path.insert(0, ROOT)
    import sample
    cpu, n = sample.SampleConfig(device="cpu"), 3_744_761_856  # Salesforce/blip2-opt-2.7b
    assert sample.pick_dtype(cpu, n, free=64 * 2**30)[0] == torch.float32
    dtype, why = sample.pick_dtype(cpu, n, free=12 * 2**30)  # a 16 GB laptop
    assert dtype == torch.bfloat16 and "float32 would need 14.0 GiB + 25%, only 12.0 GiB free" in why, why
    assert sample.pick_dtype(cpu, n, free=int(1.2 * 4 * n))[0] == torch.bfloat16  # fits, but not with the margin
    assert sample.pick_dtype(sample.SampleConfig(device="cpu", dtype="float32"), n, free=1)[0] == torch.float32
    assert sample.pick_dtype(sample.SampleConfig(device="cuda"), n, free=1)[0] == torch.bfloat16


def test_errors_are_one_line(blip2_opt, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cases = [([f"--image={tmp_path / 'empty'}"], "no images in this folder"),
             ([f"--image={tmp_path / 'bad.jpg'}"], "bad.jpg: cannot read image"),
             ([f"--image={tmp_path / 'missing.jpg'}"], "missing.jpg: cannot read image (no such file)"),
             ([f"--image={tmp_path / 'bad.jpg'}", "--init_from=" + str(tmp_path)], "no config.json"),
             (["--image=x.jpg", "--num_beam=3"], "unknown option --num_beam"),
             (["--image=x.jpg", "--num_beams=three"], "--num_beams wants int"),
             (["--image=x.jpg", "--dtype=half"], "--dtype wants auto, float32, bfloat16 or float16, got 'half'"),
             ([], "give --image="),
             (["--image=x.jpg", "--vqa_ann=x.json"], "evaluation moved to eval.py: python eval.py --vqa_ann=x.json"),
             ([f"--caption_ann={tmp_path / 'nope.json'}"], "moved to eval.py: python eval.py --caption_ann=")]
    for args, msg in cases:
        args = args if any(a.startswith("--init_from") for a in args) else args + [f"--init_from={blip2_opt[0]}"]
        code, out, err = run(*args)
        assert code != 0 and msg in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
