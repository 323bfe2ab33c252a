"""eval.py end to end on a tiny BLIP-2 folder built in the test: the caption and VQA evaluations, the skipped images,
and its one-line errors; nanoblip2.evaluation's retrieval with unreadable images."""
import json
import re

import pytest
import torch
from PIL import Image

from nanoblip2 import Blip2Stage1, ImageError
from nanoblip2.evaluation import retrieval
from nanoblip2.metrics import caption_scores, vqa_normalize, vqa_score
from test_sample import run


def run_eval(*args):
    return run(*args, script="eval.py")


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
    code, out, err = run_eval(f"--init_from={blip2_opt[0]}", f"--caption_ann={ann}", f"--image_root={eval_images}",
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
    code, out, err = run_eval(f"--vqa_ann={ann}", *args)
    assert code == 0, err
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert [(p["image"], p["question"]) for p in preds] == [(q["image"], q["question"]) for q in questions[0:3:2]]
    # now answers that the (random) model gets right: all ten humans for one question, two of ten for the other.
    # An empty answer cannot be a human's (the file would be refused): such a question gets only wrong ones
    said = [vqa_normalize(p["answer"]) for p in preds]
    assert any(said), preds  # the tiny model says something to one of them at least
    first = 0 if said[0] else 1
    right = [[s] * 10 if k == first else [s] * 2 + ["zz"] * 8 if s else ["zz"] * 10 for k, s in enumerate(said)]
    answers = [right[0], ["x"] * 10, right[1], ["x"] * 10]
    types = ["colour", "why", "colour", "count"]
    ann = write_jsonl(tmp_path / "vqa2.jsonl", [dict(q, answers=a, type=t)
                                                for q, a, t in zip(questions, answers, types)])
    code, out, err = run_eval(f"--vqa_ann={ann}", *args)
    assert code == 0, err
    line, by_type = out.strip().splitlines()[-2:]
    assert json.loads((tmp_path / "preds.json").read_text()) == preds  # the same answers again
    m = re.fullmatch(rf"vqa {re.escape(str(ann))}: 2 questions, accuracy ([\d.]+), 1 skipped "
                     rf"\(unreadable image, e\.g\. .*broken\.jpg: cannot read image.*\)", line)
    assert m, line
    expected = vqa_score([p["answer"] for p in preds], [answers[0], answers[2]])
    assert float(m.group(1)) == pytest.approx(expected, abs=0.006) and expected >= 50, (line, expected)
    assert by_type == f"vqa {ann}: by type: colour {expected:.1f}", by_type  # the kept questions' types only


def test_errors_are_one_line(blip2_opt, eval_images, tmp_path):
    write_jsonl(tmp_path / "empty_caption.jsonl", [{"image": "red.png", "caption": "red"},
                                                   {"image": "blue.jpg", "caption": ["", " "]}])
    write_jsonl(tmp_path / "no_answers.jsonl", [{"image": "red.png", "question": "why?", "answers": []}])
    write_jsonl(tmp_path / "broken.jsonl", [{"image": "broken.jpg", "caption": "x"},
                                            {"image": "nope.png", "caption": "y"}])
    (tmp_path / "none.json").write_text("[]")
    cases = [([], "give one of --caption_ann"),
             ([f"--caption_ann={tmp_path / 'none.json'}", f"--vqa_ann={tmp_path / 'none.json'}"], "give one of"),
             ([f"--caption_ann={tmp_path / 'nope.json'}"], "nope.json: annotation file not found"),
             ([f"--caption_ann={tmp_path / 'none.json'}"], "none.json: no entries"),
             ([f"--caption_ann={tmp_path / 'empty_caption.jsonl'}"],
              f"{tmp_path / 'empty_caption.jsonl'}:2: no usable caption"),
             ([f"--vqa_ann={tmp_path / 'no_answers.jsonl'}"], f"{tmp_path / 'no_answers.jsonl'}:1: no usable answer"),
             ([f"--vqa_ann={tmp_path / 'empty_caption.jsonl'}"], ':1: want {"image": str, "question": str'),
             ([f"--caption_ann={tmp_path / 'broken.jsonl'}", f"--image_root={tmp_path / 'nowhere'}"],
              "nowhere: image folder not found"),
             ([f"--caption_ann={tmp_path / 'broken.jsonl'}", f"--out_file={tmp_path / 'nowhere' / 'x.json'}"],
              "x.json: its folder does not exist"),
             ([f"--caption_ann={tmp_path / 'broken.jsonl'}", f"--image_root={eval_images}"],
              f"{tmp_path / 'broken.jsonl'}: none of its 2 images could be read, e.g. ")]
    for args, msg in cases:
        code, out, err = run_eval(f"--init_from={blip2_opt[0]}", *args)
        error = err.strip().splitlines()[-1]  # after the progress bar, where there was one
        assert code != 0 and msg in error, (args, err)
        assert "Traceback" not in err and error.startswith("error: "), err


def test_retrieval_skips_unreadable_images(itm_folder, tmp_path):
    model = Blip2Stage1.from_pretrained(itm_folder[0])
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (28, 28), (30, 30, 200)).save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    entries = [{"image": "red.png", "caption": ["a", "b"]}, {"image": "broken.png", "caption": ["c"]},
               {"image": "blue.png", "caption": ["d"]}]
    tok = lambda texts, max_length, padding: (torch.tensor([[2, 5 + "abcd".index(t)] + [0] * (max_length - 2)
                                                            for t in texts]), torch.ones(len(texts), max_length))
    metrics, skipped = retrieval(model, tok, write_jsonl(tmp_path / "ann.jsonl", entries), tmp_path, k_test=2)
    assert len(skipped) == 1 and "broken.png: cannot read image" in skipped[0]
    # the same as a file without the broken image and its caption
    clean, none = retrieval(model, tok, write_jsonl(tmp_path / "clean.jsonl", entries[::2]), tmp_path, k_test=2)
    assert metrics == clean and not none and len(metrics) == 10
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": "broken.png", "caption": "c"}])
    with pytest.raises(ImageError, match=f"{bad}: none of its 1 images could be read, e.g. .*broken.png"):
        retrieval(model, None, bad, tmp_path)
