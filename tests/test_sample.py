"""sample.py end to end on a tiny BLIP-2 folder built in the test: sampling, the caption and VQA evaluations, and its
one-line errors."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from nanoblip2.metrics import caption_scores, vqa_normalize, vqa_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: more threads only add overhead on a busy machine
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
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
    assert lines[0].startswith("loaded Blip2: 186 tensors")  # the loader's summary
    lines = lines[1:]
    assert lines[0].startswith(f"loaded {blip2_opt[0]}: OPT,") and "torch.float32" in lines[0]
    assert len(lines) == 3 and lines[1].startswith(str(images / "blue.jpg") + ": ") and lines[2].startswith(str(images / "red.png") + ": ")
    code, out, err = run(f"--init_from={blip2_opt[0]}", f"--image={images / 'red.png'}", "--question=what colour?",
                         "--num_beams=2")
    assert code == 0, err
    assert ": Q: what colour? A: " in out.strip().splitlines()[2]


def test_t5_folder(blip2_t5, images):
    code, out, err = run(f"--init_from={blip2_t5[0]}", f"--image={images / 'red.png'}", "--prompt=a photo of")
    assert code == 0, err
    assert "FlanT5" in out and out.strip().splitlines()[2].startswith(str(images / "red.png") + ": a photo of")


def test_errors_are_one_line(blip2_opt, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cases = [([f"--image={tmp_path / 'empty'}"], "no images in this folder"),
             ([f"--image={tmp_path / 'bad.jpg'}"], "bad.jpg: cannot read image"),
             ([f"--image={tmp_path / 'missing.jpg'}"], "missing.jpg: cannot read image (no such file)"),
             ([f"--image={tmp_path / 'bad.jpg'}", "--init_from=" + str(tmp_path)], "no config.json"),
             (["--image=x.jpg", "--num_beam=3"], "unknown option --num_beam"),
             (["--image=x.jpg", "--num_beams=three"], "--num_beams wants int"),
             (["--image=x.jpg", "--vqa_ann=x.json"], "give exactly one of --image"),
             ([f"--caption_ann={tmp_path / 'nope.json'}"], "nope.json: annotation file not found")]
    for args, msg in cases:
        args = args if any(a.startswith("--init_from") for a in args) else args + [f"--init_from={blip2_opt[0]}"]
        code, out, err = run(*args)
        assert code != 0 and msg in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def eval_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_imgs")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    Image.new("RGB", (33, 51), (30, 30, 200)).save(d / "blue.jpg")
    Image.new("RGB", (20, 20), (30, 200, 30)).save(d / "green.png")
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


def write_jsonl(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_caption_eval(blip2_opt, eval_images, tmp_path):
    refs = {"red.png": ["a red square", "a red picture", "red"], "blue.jpg": ["a blue thing"],
            "broken.jpg": ["nothing"], "green.png": ["a green square"]}
    ann = write_jsonl(tmp_path / "cap.jsonl", [{"image": "red.png", "caption": refs["red.png"][:2]},
                                              {"image": "blue.jpg", "caption": "a blue thing"},
                                              {"image": "broken.jpg", "caption": "nothing"},
                                              {"image": "red.png", "caption": "red"},  # same image: one caption
                                              {"image": "green.png", "caption": "a green square"}])
    code, out, err = run(f"--init_from={blip2_opt[0]}", f"--caption_ann={ann}", f"--image_root={eval_images}",
                         f"--out_file={tmp_path / 'caps.json'}", "--batch_size=2", "--num_beams=2",
                         "--max_new_tokens=5")
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"caption {ann}: 3 images, Bleu_1 ") and ", 1 skipped" in line and "broken.jpg" in line
    caps = json.loads((tmp_path / "caps.json").read_text())
    assert [c["image"] for c in caps] == ["red.png", "blue.jpg", "green.png"] and all(c["caption"] for c in caps)
    scores = caption_scores({c["image"]: refs[c["image"]] for c in caps}, {c["image"]: [c["caption"]] for c in caps})
    printed = dict(re.findall(r"(Bleu_\d|CIDEr) ([\d.]+)", line))
    assert printed.keys() == scores.keys() == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert all(float(printed[k]) == pytest.approx(100 * v, abs=0.006) for k, v in scores.items()), (printed, scores)


def test_vqa_eval(blip2_t5, eval_images, tmp_path):
    questions = [{"image": "red.png", "question": "what colour is it?"}, {"image": "broken.jpg", "question": "why?"},
                 {"image": "blue.jpg", "question": "is it blue?"}, {"image": "green.png", "question": "how many?"}]
    args = [f"--init_from={blip2_t5[0]}", f"--image_root={eval_images}", f"--out_file={tmp_path / 'preds.json'}",
            "--batch_size=2", "--num_beams=3", "--max_samples=3"]  # green.png is left out
    ann = write_jsonl(tmp_path / "vqa.jsonl", [dict(q, answers=["no"] * 10) for q in questions])
    code, out, err = run(f"--vqa_ann={ann}", *args)
    assert code == 0, err
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert [(p["image"], p["question"]) for p in preds] == [(q["image"], q["question"]) for q in questions[0:3:2]]
    # now answers that the (random) model gets right: all ten humans for red.png, two of ten for blue.jpg
    red, blue = (vqa_normalize(p["answer"]) for p in preds)
    answers = [[red] * 10, ["x"] * 10, [blue] * 2 + ["zz"] * 8, ["x"] * 10]
    ann = write_jsonl(tmp_path / "vqa2.jsonl", [dict(q, answers=a) for q, a in zip(questions, answers)])
    code, out, err = run(f"--vqa_ann={ann}", *args)
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    assert json.loads((tmp_path / "preds.json").read_text()) == preds  # the same answers again
    m = re.fullmatch(rf"vqa {re.escape(str(ann))}: 2 questions, accuracy ([\d.]+), 1 skipped "
                     rf"\(unreadable image, e\.g\. .*broken\.jpg: cannot read image.*\)", line)
    assert m, line
    expected = vqa_score([p["answer"] for p in preds], [answers[0], answers[2]])
    assert float(m.group(1)) == pytest.approx(expected, abs=0.006) and expected >= 50, (line, expected)
