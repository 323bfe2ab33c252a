"""VQA fine-tuning (paper §4.3, Figure 7): the labels on the answer only, the answer drawn by its frequency, and
train_stage2.py --task=vqa from a stage-2 checkpoint, the question given to the Q-Former."""
import json
import re
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from test_train_stage1 import data, losses  # noqa: F401  (data is a fixture)
from test_train_stage2 import lms, train2  # noqa: F401  (lms is a fixture)

from nanoblip2 import Blip2
from nanoblip2.data import VQADataset, eval_transform, opt_batch, t5_batch
from nanoblip2.evaluation import vqa

Q = 5


def test_opt_vqa_labels_position_by_position(blip2_opt):
    """OPT: BOS "Question: what is it? Answer:" " a cat" "\n"; only " a cat" and "\n" are targets."""
    tok = Blip2.from_pretrained(blip2_opt[0]).tokenizer
    prompts = ["Question: what is it? Answer:", "Question: and this? Answer:"]
    b = opt_batch(tok, ["a cat", "two dogs"], prompts, num_queries=Q)
    ids, labels = b["input_ids"], b["labels"]
    for row, (prompt, answer) in enumerate(zip(prompts, ["a cat", "two dogs"])):
        head = tok([prompt])[0][0].tolist()                     # BOS + the prompt's tokens
        whole = tok([f"{prompt} {answer}\n"])[0][0].tolist()   # the row's text, unpadded
        assert ids[row, :len(whole)].tolist() == whole and whole[:len(head)] == head
        expected = [-100] * (Q + len(head)) + whole[len(head):]  # queries, BOS, prompt: -100; answer + "\n"
        expected += [-100] * (labels.size(1) - len(expected))    # padding
        assert labels[row].tolist() == expected, row
        assert whole[-1] == tok.newline_id


def test_t5_vqa_batch_token_by_token(blip2_t5):
    """FlanT5: the encoder reads "Question: ... Short answer:" </s>; the target is the answer </s>."""
    tok = Blip2.from_pretrained(blip2_t5[0]).tokenizer
    prompts = ["Question: what is it? Short answer:", "Question: and? Short answer:"]
    b = t5_batch(tok, ["a cat", "no"], prompts)
    for row, (prompt, answer) in enumerate(zip(prompts, ["a cat", "no"])):
        enc, dec = tok([prompt])[0][0].tolist(), tok([answer])[0][0].tolist()
        assert enc[-1] == tok.eos_id and dec[-1] == tok.eos_id
        n = int(b["attention_mask"][row].sum())
        assert b["input_ids"][row, :n].tolist() == enc and n == len(enc)
        assert b["labels"][row].tolist() == dec + [-100] * (b["labels"].size(1) - len(dec))


def vqa_files(data):
    """The tiny dataset as VQA: what colour / what shape, ten human answers each (9 agree, 1 does not)."""
    entries = json.loads((data / "train.json").read_text())
    qa = []
    for e in entries:
        if e["image"] == "broken.png":
            continue
        _, colour, shape = e["caption"][0].split()
        qa += [{"image": e["image"], "question": "what colour is it?", "answers": [colour] * 9 + ["grey"],
                "type": "colour"},
               {"image": e["image"], "question": "what shape is it?", "answers": [shape] * 9 + ["blob"],
                "type": "shape"}]
    (data / "vqa.json").write_text(json.dumps(qa))
    return data / "vqa.json"


def test_the_answer_is_drawn_by_its_frequency(data, tmp_path):
    ann = tmp_path / "q.json"
    ann.write_text(json.dumps([{"image": "0.png", "question": "is it red?", "answers": ["yes"] * 7 + ["no"] * 3},
                               {"image": "1.png", "question": "is it?", "answers": ["maybe", " "]}]))
    ds = VQADataset(ann, data / "images", eval_transform(28), seed=3)
    draws = []
    for epoch in range(2000):
        ds.epoch = epoch
        draws.append(ds[0][1])
    assert {q for q, _ in draws} == {"is it red?"}
    counts = Counter(a for _, a in draws)
    assert set(counts) == {"yes", "no"} and abs(counts["yes"] / 2000 - 0.7) < 0.04, counts  # 4 sigma: 0.041
    ds.epoch = 5
    assert ds[0][1] == ds[0][1] == draws[5]  # seeded: the same (seed, epoch, index), the same answer
    assert ds[1][1] == ("is it?", "maybe")   # blank answers are never drawn
    assert len(VQADataset(ann, data / "images", eval_transform(28), seed=None)) == 2


@pytest.mark.parametrize("qformer_text", [True, False])
def test_vqa_finetuning_from_stage2(qformer_text, data, lms, itm_folder, tmp_path):
    """--task=vqa from a stage-2 checkpoint (the ViT trained too): the loss falls, the checkpoint loads with the
    Q-Former's text branch (the stage 1's, or BERT's) and answers, and resume reproduces the next steps."""
    ann = vqa_files(data)
    s2 = tmp_path / "s2"
    train2(data, lms / "opt", s2, "--max_steps=2", "--eval_interval=2", "--val_ann=", vit=itm_folder[0],
           bert=data / "bert")
    flags = [f"--init_from={s2 / 'ckpt'}", "--task=vqa", f"--qformer_text={str(qformer_text).lower()}",
             f"--train_ann={ann}", f"--val_ann={ann}", "--eval_max_images=6", "--freeze_vit=false", "--lr=3e-3"]
    log = train2(data, None, tmp_path / "full", "--max_steps=30", "--lr_decay_steps=30", "--eval_interval=15", *flags)
    full = losses(log)
    assert sum(full[s] for s in range(26, 31)) < 0.65 * sum(full[s] for s in range(1, 6)), full
    assert "eval val step 30 | accuracy" in log and "acc_colour" in log and "acc_shape" in log
    ckpt = tmp_path / "full" / "ckpt"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model"]["qformer"]["text"] is qformer_text and cfg["frozen"]["vit"] is None
    assert (cfg["qformer_tokenizer"] is not None) is qformer_text
    saved = load_file(ckpt / "model.safetensors")
    assert ("qformer.word_embeddings.weight" in saved) is qformer_text and "vit.patch_embed.weight" in saved
    model = Blip2.from_pretrained(str(ckpt))
    assert (model.qformer_tokenizer is not None) is qformer_text
    assert len(model.answer(torch.zeros(1, 3, 28, 28), ["what colour is it?"], max_new_tokens=3)) == 1
    bigger = Blip2.from_pretrained(str(ckpt), image_size=35)  # fine-tuning at another size: positions interpolated
    assert bigger.vit.pos_embed.shape == (1, 26, 48) and bigger.cfg.vit.image_size == 35
    # resume at step 15 gives steps 16-18 as the uninterrupted run had them
    cut = ["--lr_decay_steps=30", "--eval_interval=15", *flags]
    train2(data, None, tmp_path / "cut", "--max_steps=15", *cut)
    resumed = losses(train2(data, None, tmp_path / "cut", "--max_steps=18", "--init_from=resume", *cut[:2],
                            "--val_ann=", "--task=vqa", f"--train_ann={ann}", "--freeze_vit=false", "--lr=3e-3"))
    assert sorted(resumed) == [16, 17, 18]
    assert all(abs(resumed[s] - full[s]) < 1e-5 for s in resumed), (resumed, full)


def test_caption_training_reports_zero_shot_vqa(data, lms, itm_folder, tmp_path):
    """--val_vqa_ann (Figure 5): each val evaluation of caption training also answers the questions zero-shot, as
    the checkpoint saved at that step answers them."""
    ann = vqa_files(data)
    log = train2(data, lms / "opt", tmp_path / "s2", "--max_steps=3", "--eval_interval=3", f"--val_vqa_ann={ann}",
                 "--eval_max_images=6", vit=itm_folder[0], bert=data / "bert")
    line = next(x for x in log.splitlines() if x.startswith("eval val step 3 |"))
    assert "CIDEr" in line and "vqa_acc_colour" in line and "vqa_acc_shape" in line, line
    model = Blip2.from_pretrained(str(tmp_path / "s2" / "ckpt"))
    metrics, _, _ = vqa(model, ann, data / "images", num_beams=2, max_questions=6)
    assert abs(metrics["accuracy"] - float(re.search(r"vqa_accuracy ([0-9.]+)", line).group(1))) < 1e-4
