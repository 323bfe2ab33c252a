"""
Evaluation on annotation files, shared by eval.py and the training scripts: captioning (paper §4.2, BLEU and
CIDEr), zero-shot VQA (§4.1, VQAv2 accuracy) and image-text retrieval (§4.3, R@1/5/10). LAVIS lavis/tasks/
captioning.py, vqa.py and retrieval.py.

Notable details
- Unreadable images are skipped and counted, as in training (retrieval leaves their captions out too); each
  evaluation returns their ImageError messages, and one ImageError names the file if none can be read.
- Captions are scored per image against all of its captions (an image may have several entries), without the
  prompt: COCO's BLEU-1..4 and CIDEr-D on the raw captions, PTB-tokenised as coco-caption does.
- Where every entry describes its scene (the shapes world's "objects" and "background"), captioning also scores
  how much of what the captions say is true (metrics.scene_accuracy): scene_accuracy, scene_objects.
- VQA: the paper's prompt (Blip2.answer), the VQAv2 accuracy, also per question "type".
- Retrieval: ITC scores every pair, ITM re-ranks each row's k_test best (Blip2Stage1.retrieval_scores).
"""
import os

import torch
from tqdm import tqdm

from .data import (AnnotationError, ImageError, entry_captions, load_image, load_retrieval, read_annotations,
                   retrieval_index)
from .metrics import caption_scores, retrieval_recall, scene_accuracy, vqa_score


def read_images(paths, size):
    """-> (the images that can be read, as (3, S, S) each, their indices in paths, the others' ImageError messages)"""
    pixels, kept, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            pixels.append(load_image(path, size))
            kept.append(i)
        except ImageError as e:
            errors.append(str(e))
    return pixels, kept, errors


def _some_read(ann_file, kept, errors):
    if not kept and errors:
        raise ImageError(f"{ann_file}: none of its {len(errors)} images could be read, e.g. {errors[0]}")
    if not kept:
        raise AnnotationError(f"{ann_file}: no entries")


def _generate(model, samples, ann_file, image_root, batch_size, generate):
    """generate(pixels (B, 3, S, S), batch) -> texts, over batches of the samples whose image can be read.
    -> (the samples kept, their texts, the ImageError messages of the others)."""
    kept, texts, errors = [], [], []
    for i in tqdm(range(0, len(samples), batch_size), desc=os.path.basename(ann_file), unit="batch", leave=False):
        batch = samples[i:i + batch_size]
        pixels, ok, errs = read_images([os.path.join(image_root, s["image"]) for s in batch], model.cfg.vit.image_size)
        errors += errs
        if ok:
            kept += [batch[k] for k in ok]
            texts += generate(torch.stack(pixels), [batch[k] for k in ok])
    _some_read(ann_file, kept, errors)
    return kept, texts, errors


@torch.no_grad()
def captioning(model, ann_file, image_root="", prompt="", num_beams=5, max_new_tokens=30, max_images=0,
               batch_size=16):
    """Caption the images of ann_file (the first max_images; 0 = all) and score them. -> (metrics {"Bleu_1" ..
    "Bleu_4", "CIDEr"[, "scene_accuracy", "scene_objects"]}, [{"image", "caption"}], skipped images' messages)."""
    refs, scenes = {}, {}  # image -> all of its captions, in file order; image -> its scene (the shapes world)
    for e in read_annotations(ann_file):
        refs.setdefault(e["image"], []).extend(entry_captions(e))
        if "objects" in e:
            scenes[e["image"]] = e
    images = [{"image": im} for im in list(refs)[:max_images or None]]
    caption = lambda pixels, batch: model.caption(pixels, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens)
    kept, captions, skipped = _generate(model, images, ann_file, image_root, batch_size, caption)
    kept = [s["image"] for s in kept]
    metrics = caption_scores({im: refs[im] for im in kept}, {im: [c] for im, c in zip(kept, captions)})
    if all(im in scenes for im in kept):
        metrics |= {f"scene_{k}": v for k, v in scene_accuracy(captions, [scenes[im] for im in kept]).items()}
    return metrics, [{"image": im, "caption": c} for im, c in zip(kept, captions)], skipped


@torch.no_grad()
def vqa(model, ann_file, image_root="", num_beams=5, max_questions=0, batch_size=16):
    """Answer the questions of ann_file (the first max_questions; 0 = all) and score them. -> (metrics {"accuracy",
    "by_type": {type: accuracy}}, [{"image", "question", "answer"}], skipped images' messages)."""
    questions = read_annotations(ann_file, "vqa")[:max_questions or None]
    answer = lambda pixels, batch: model.answer(pixels, [s["question"] for s in batch], num_beams=num_beams)
    kept, answers, skipped = _generate(model, questions, ann_file, image_root, batch_size, answer)
    metrics = {"accuracy": vqa_score(answers, [s["answers"] for s in kept]), "by_type": {}}
    for t in sorted({s["type"] for s in kept if "type" in s}):  # e.g. the shapes world's question types
        of_type = [(a, s["answers"]) for s, a in zip(kept, answers) if s.get("type") == t]
        metrics["by_type"][t] = vqa_score([a for a, _ in of_type], [gt for _, gt in of_type])
    results = [{"image": s["image"], "question": s["question"], "answer": a} for s, a in zip(kept, answers)]
    return metrics, results, skipped


@torch.no_grad()
def retrieval(model, tokenizer, ann_file, image_root, k_test=128, max_images=0, captions_per_image=0):
    """Image-text retrieval over the images of ann_file and their captions (the first ones; 0 = all).
    -> (metrics txt_r1 .. agg_metrics (metrics.retrieval_recall), skipped images' messages)."""
    images, texts, img2txt, _ = load_retrieval(ann_file, image_root, max_images=max_images,
                                               captions_per_image=captions_per_image)
    pixels, kept, skipped = read_images(images, model.cfg.vit.image_size)
    _some_read(ann_file, kept, skipped)
    texts, img2txt, txt2img = retrieval_index([[texts[t] for t in img2txt[i]] for i in kept])
    ids, mask = tokenizer(texts, max_length=35, padding="max_length")  # LAVIS pads retrieval texts to 35
    i2t, t2i = model.retrieval_scores(pixels, ids, mask, k_test=k_test)
    return retrieval_recall(i2t.cpu(), t2i.cpu(), img2txt, txt2img), skipped


def skipped_note(skipped):
    """'N skipped (unreadable image, e.g. <the first one's message>)', for a report line."""
    return f"{len(skipped)} skipped (unreadable image, e.g. {skipped[0]})" if skipped else "0 skipped"
