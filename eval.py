"""
Evaluate a BLIP-2 model on an annotation file with the paper's generation settings and metrics: captioning (§4.2)
or zero-shot VQA (§4.1). The model loads as in sample.py (--init_from, --device, --dtype).

    python eval.py --caption_ann=data/coco/test.json --image_root=data/coco/images --out_file=captions.json
    python eval.py --vqa_ann=vqav2_val.jsonl --image_root=data/vqav2/images --max_samples=1000

- --caption_ann: {"image", "caption": str | [str]} per entry. Each image is captioned (beam 5, at most 30 new tokens,
  after --prompt), scored with BLEU-1..4 and CIDEr-D x100 as the paper reports them, and in the shapes world by
  how much of what the captions say is true (attribute accuracy).
- --vqa_ann: {"image", "question", "answers": [str, ...]} per entry. Answered with the paper's prompt (beam 5, length
  penalty -1, at most 10 new tokens), scored with the VQAv2 accuracy, also per question "type" where there is one.
Image paths are relative to --image_root; --max_samples evaluates the first ones only; unreadable images are
skipped and counted; --out_file writes the captions or answers as a JSON list. The details: nanoblip2/evaluation.py.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoblip2.cli import parse_args, run
from nanoblip2.data import read_annotations
from nanoblip2.evaluation import captioning, skipped_note, vqa
from sample import load_model


@dataclass
class EvalConfig:
    caption_ann: str = ""                    # evaluate captioning on this annotation file
    vqa_ann: str = ""                        # or zero-shot VQA on this one
    image_root: str = ""                     # the annotations' image paths are relative to this folder
    max_samples: int = 0                     # evaluate the first images (captions) or questions (VQA); 0 = all
    batch_size: int = 16                     # images per generate call
    out_file: str = ""                       # write the captions or answers here (JSON list)
    prompt: str = ""                         # caption prompt, e.g. "a photo of"
    init_from: str = ""                      # as sample.py's: "" = out/stage2/ckpt, else Salesforce/blip2-opt-2.7b
    num_beams: int = 5
    max_new_tokens: int = 30                 # captions; answers use at most 10 (the paper's setting)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"                      # auto: bfloat16 on CUDA; on CPU float32 if it fits in free memory
    seed: int = 1337


def main(cfg):
    if bool(cfg.caption_ann) == bool(cfg.vqa_ann):
        raise SystemExit("error: give one of --caption_ann=<file>, --vqa_ann=<file>; see -h")
    ann = cfg.caption_ann or cfg.vqa_ann
    # bad input fails here, before the (slow) model load
    if not read_annotations(ann, "caption" if cfg.caption_ann else "vqa"):
        raise SystemExit(f"error: {ann}: no entries")
    if cfg.image_root and not os.path.isdir(cfg.image_root):
        raise SystemExit(f"error: {cfg.image_root}: image folder not found")
    if cfg.out_file and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.out_file))):
        raise SystemExit(f"error: {cfg.out_file}: its folder does not exist")
    model = load_model(cfg)
    if cfg.caption_ann:
        metrics, results, skipped = captioning(model, ann, cfg.image_root, cfg.prompt, cfg.num_beams,
                                               cfg.max_new_tokens, cfg.max_samples, cfg.batch_size)
        scores = " ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if not k.startswith("scene_"))
        print(f"caption {ann}: {len(results)} images, {scores}, {skipped_note(skipped)}")
        if "scene_accuracy" in metrics:
            print(f"caption {ann}: attribute accuracy {metrics['scene_accuracy']:.3f}, "
                  f"objects named {metrics['scene_objects']:.3f}")
    else:
        metrics, results, skipped = vqa(model, ann, cfg.image_root, cfg.num_beams, cfg.max_samples, cfg.batch_size)
        print(f"vqa {ann}: {len(results)} questions, accuracy {metrics['accuracy']:.2f}, {skipped_note(skipped)}")
        if metrics["by_type"]:
            print(f"vqa {ann}: by type: " + ", ".join(f"{t} {v:.1f}" for t, v in metrics["by_type"].items()))
    if cfg.out_file:
        Path(cfg.out_file).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run(main, parse_args(EvalConfig(), doc=__doc__))
