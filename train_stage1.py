"""
Stage 1 of BLIP-2 (paper §3.2): train the Q-Former against a frozen image encoder with ITC, ITM and ITG.

    python train_stage1.py                                    # the quick start: the shapes world (data/shapes)
    python train_stage1.py config/stage1_coco_vitg.json       # the paper's: EVA ViT-g + BERT-base on COCO
    torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_coco_vitg.json
    python train_stage1.py --init_from=resume                 # continue a run (same out_dir)

The defaults are the quick start's, ~10 minutes on 2 CPU cores; the config file holds the paper's settings (AdamW
0.9/0.98, weight decay 0.05, peak lr 1e-4 after a linear warm-up, cosine to 1e-5, 224 px, 32 queries, augmentation).
One log line per log_interval steps; retrieval R@K on val_ann and a checkpoint every eval_interval steps, and on
test_ann at the end. -h lists every option.
"""
import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.training import NegativePool
from nanoblip2.cli import parse_args, run
from nanoblip2.data import (AnnotationError, CaptionDataset, eval_transform, load_image, load_retrieval,
                            train_transform)
from nanoblip2.checkpoint import checkpoint_folder, fingerprint, save_checkpoint
from nanoblip2.hub import HubError, resolve
from nanoblip2.load import CheckpointError, read_config
from nanoblip2.metrics import retrieval_recall
from nanoblip2.tokenizer import load_bert_tokenizer
from nanoblip2.training import (Stream, adamw, autocast, freeze, get_lr, random_states, resume,
                                setup)


@dataclass
class TrainConfig:
    # data: annotation files of {"image": relative path, "caption": str | [str]}; the defaults are the quick start
    # (data/shapes/prepare.py), config/stage1_coco_vitg.json the paper's run (data/coco/prepare.py)
    train_ann: str = "data/shapes/train.json"
    val_ann: str = "data/shapes/val.json"      # retrieval every eval_interval steps; "" for none
    test_ann: str = "data/shapes/test.json"    # retrieval once, at the end; "" for none
    image_root: str = "data/shapes/images"
    image_size: int = 0                        # 0 = the ViT's own (224 for EVA ViT-g, 64 for the shapes ViT)
    max_txt_len: int = 32
    train_captions: int = 1                    # captions per training image, the first ones; 0 = all (COCO).
                                               # 1: the shapes world's specific first caption (measured better)
    augment: bool = False                      # LAVIS's random resized crop + flip (the coco configs turn it on);
                                               # off for the shapes world, whose captions name positions
    num_workers: int = 2
    # model
    vit: str = "data/shapes/vit"               # the frozen ViT: a BLIP-2 folder (EVA ViT-g) or a CLIP folder / Hub id
    bert: str = "data/shapes/bert"             # the Q-Former's initialisation and tokenizer
    num_query_tokens: int = 32
    cross_attention_freq: int = 2              # cross-attention in every k-th layer, as LAVIS
    init_from: str = "scratch"                 # scratch | resume | a nanoblip2 stage-1 folder
    # optimisation: the quick start's, ~10 minutes on 2 CPU cores; the paper's are in config/stage1_coco_vitg.json
    batch_size: int = 8                        # per process; the paper's total is 1680 (ViT-g). Here more, smaller
    grad_accum: int = 1                        # steps learn more in the same time (measured: 8 > 16 > 32 > 64)
    max_steps: int = 3200
    lr_decay_steps: int = 0                    # where the cosine reaches min_lr; 0 = max_steps
    lr: float = 1e-3                           # the paper: 1e-4 for a BERT-base Q-Former
    min_lr: float = 1e-4
    warmup_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0                     # 0 = off
    itm_pool: int = 1024                       # ITM's hard negatives come from the batch and this rank's last N
                                               # samples (blip2.NegativePool); 0 = the batch only, as LAVIS
    # evaluation, logging, checkpoints
    out_dir: str = "out/stage1"
    log_interval: int = 200
    eval_interval: int = 1600
    eval_k_test: int = 16                      # ITM re-ranks the ITC top k (LAVIS: 128 on COCO)
    eval_max_images: int = 1000                # 0 = every image of val_ann / test_ann
    eval_captions: int = 1                     # captions per image; 1 = the shapes world's specific first one, 0 = all
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA
    compile: bool = torch.cuda.is_available()
    seed: int = 1337


@torch.no_grad()
def evaluate(model, tok, cfg, ann_file):
    """Retrieval (SPEC §5): ITC top-k re-ranked by ITM; i2t and t2i R@1/5/10."""
    images, texts, img2txt, txt2img = load_retrieval(ann_file, cfg.image_root, max_images=cfg.eval_max_images,
                                                     captions_per_image=cfg.eval_captions)
    pixels = [load_image(p, model.cfg.vit.image_size) for p in images]
    ids, mask = tok(texts, max_length=35, padding="max_length")  # LAVIS pads retrieval texts to 35
    i2t, t2i = model.retrieval_scores(pixels, ids, mask, k_test=cfg.eval_k_test)
    return retrieval_recall(i2t.cpu(), t2i.cpu(), img2txt, txt2img)


def main(cfg):
    ddp, rank, world = setup(cfg)
    master = rank == 0
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    # --- model, tokenizer, optimiser ----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the fresh parts of the model start the same on every rank
    if cfg.init_from == "resume":
        src = checkpoint_folder(ckpt_dir)
        model = Blip2Stage1.from_pretrained(src, device=cfg.device).train()
        vit_source, bert = read_config(src)["frozen"]["vit"], read_config(src)["train"]["bert"]
    elif cfg.init_from == "scratch":
        model = Blip2Stage1.from_vit_bert(cfg.vit, cfg.bert, cfg.num_query_tokens, cfg.cross_attention_freq,
                                          image_size=cfg.image_size or None,
                                          device=cfg.device)
        vit_source, bert = resolve(cfg.vit), cfg.bert
    else:
        model = Blip2Stage1.from_pretrained(cfg.init_from, device=cfg.device).train()
        vit_source, bert = read_config(resolve(cfg.init_from))["frozen"]["vit"], cfg.bert
    fingerprints = {"vit": fingerprint(resolve(vit_source))}  # loading checks them: the ViT is named by path
    tok = load_bert_tokenizer(resolve(bert))
    if tok.bos_id != model.cfg.dec_id:
        raise SystemExit(f"error: the tokenizer's [DEC] is {tok.bos_id}, the model's {model.cfg.dec_id}")
    freeze(model.vit)
    if cfg.device.startswith("cuda"):
        model.vit.to(getattr(torch, cfg.dtype))     # the frozen ViT is stored in bf16 on CUDA
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    negatives = torch.Generator(device=cfg.device).manual_seed(cfg.seed + rank)  # ITM hard negatives
    torch.manual_seed(cfg.seed + rank)                                            # dropout
    pool = NegativePool(cfg.itm_pool) if cfg.itm_pool > 0 else None                 # more candidates for them
    step, epoch, batch_in_epoch = (resume(src, optimizer, negatives, rank, pool) if cfg.init_from == "resume"
                                   else (0, 0, 0))
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model)
    if master:
        print(f"stage 1: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters, ViT frozen "
              f"({cfg.device}, {world} process(es))")
    transform = (train_transform if cfg.augment else eval_transform)(raw.cfg.vit.image_size)
    dataset = CaptionDataset(cfg.train_ann, cfg.image_root, transform, seed=cfg.seed,
                             captions_per_image=cfg.train_captions)
    stream = Stream(dataset, tok, cfg, rank, world, epoch, batch_in_epoch, verbose=master)
    image_ids = dataset.image_ids.to(cfg.device)

    def save(metrics):
        rng = random_states(negatives, ddp, world, pool)  # every rank takes part
        if master:
            config = {"nanoblip2": "stage1", "model": asdict(raw.cfg), "frozen": {"vit": vit_source},
                      "fingerprints": fingerprints, "train": asdict(cfg) | {"bert": bert}}
            tensors = {k: v for k, v in raw.state_dict().items() if not k.startswith("vit.")}
            meta = {"step": step, "epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch, "metrics": metrics}
            save_checkpoint(ckpt_dir, tensors, config, meta, {"optimizer": optimizer.state_dict(), "rng": rng})
            print(f"saved {ckpt_dir} at step {step}")

    # --- the loop -----------------------------------------------------------------------------------------------
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            b = stream.next()
            last = micro == cfg.grad_accum - 1
            with autocast(cfg), (model.no_sync() if ddp and not last else contextlib.nullcontext()):
                out = model(b["pixel_values"], b["input_ids"], b["attention_mask"], generator=negatives,
                            image_ids=image_ids[b["index"]], candidates=None if pool is None else pool.items)
                (out["loss"] / cfg.grad_accum).backward()
            if pool is not None:  # this batch: candidates for the next steps
                pool.push(**out["samples"])
            seen += len(b["input_ids"]) * world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and (step % cfg.log_interval == 0 or step == 1):
            dt = time.time() - t0
            print(f"step {step} | loss {out['loss'].item():.4f} | itc {out['loss_itc'].item():.4f} | "
                  f"itm {out['loss_itm'].item():.4f} | itg {out['loss_itg'].item():.4f} | lr {lr:.2e} | "
                  f"temp {raw.temp.item():.4f} | {seen / dt:.1f} img/s")
            t0, seen = time.time(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            metrics = {}
            if master:
                raw.eval()
                for split, ann in (("val", cfg.val_ann), ("test", cfg.test_ann if step == cfg.max_steps else "")):
                    if ann:
                        metrics[split] = evaluate(raw, tok, cfg, ann)
                        print(f"eval {split} step {step} | "
                              + " | ".join(f"{k} {v:.2f}" for k, v in metrics[split].items()))
                raw.train()
            save(metrics)
            t0, seen = time.time(), 0
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, parse_args(TrainConfig(), doc=__doc__))
