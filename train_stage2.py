"""
Stage 2 of BLIP-2 (paper §3.3): connect the stage-1 Q-Former to a frozen LLM through one linear layer and train
it with the LLM's language-modelling loss (OPT) or prefix language-modelling loss (FlanT5).

    python train_stage2.py                                    # the quick start: out/stage1/ckpt + the shapes OPT
    python train_stage2.py --init_from=bert --out_dir=out/stage2_no_stage1    # Figure 5: no stage 1
    python train_stage2.py config/stage2_coco_opt2.7b.json    # the paper's (or stage2_coco_flant5xl.json)
    python train_stage2.py config/stage2_coco_opt2.7b.json --prompt="a photo of" --freeze_vit=false  # §4.2
    torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_coco_opt2.7b.json
    python train_stage2.py --init_from=resume                 # continue a run (same out_dir)

The defaults are the quick start's, ~10 minutes on 2 CPU cores; the config files hold the paper's settings.
Periodic evaluation captions val_ann (beam 5) and reports CIDEr and BLEU (and, in the shapes world, how much of
what the captions say is true); test_ann is captioned at the end. -h lists every option.
"""
import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoblip2.data import opt_batch, t5_batch
from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.stage2 import Blip2
from nanoblip2.cli import parse_args, run
from nanoblip2.data import (AnnotationError, CaptionDataset, entry_captions, eval_transform, load_image,
                            read_annotations, train_transform)
from nanoblip2.checkpoint import checkpoint_folder, fingerprint, save_checkpoint
from nanoblip2.hub import HubError, resolve
from nanoblip2.load import CheckpointError, read_config
from nanoblip2.metrics import caption_scores, scene_accuracy
from nanoblip2.training import (Stream, adamw, autocast, freeze, get_lr, random_states, resume,
                                setup)


@dataclass
class TrainConfig:
    # data: annotation files of {"image": relative path, "caption": str | [str]}; the defaults are the quick start
    # (data/shapes/prepare.py), config/stage2_coco_*.json the paper's runs (data/coco/prepare.py)
    train_ann: str = "data/shapes/train.json"
    val_ann: str = "data/shapes/val.json"      # captioned every eval_interval steps; "" for none
    test_ann: str = "data/shapes/test.json"    # captioned once, at the end; "" for none
    image_root: str = "data/shapes/images"
    image_size: int = 0                        # with init_from=bert: 0 = the ViT's own
    max_txt_len: int = 32
    train_captions: int = 1                    # captions per training image, the first ones; 0 = all (COCO).
                                               # 1: the shapes world's specific first caption (measured better)
    augment: bool = False                      # LAVIS's random resized crop + flip (the coco configs turn it on);
                                               # off for the shapes world, whose captions name positions
    num_workers: int = 2
    # model
    init_from: str = "out/stage1/ckpt"         # a stage-1 folder | resume | bert (skip stage 1: Figure 5)
    lm: str = "data/shapes/opt"                # the frozen LLM: an OPT or (Flan)T5 folder or Hub id
    vit: str = "data/shapes/vit"               # with init_from=bert: the frozen ViT (BLIP-2 or CLIP folder)
    bert: str = "data/shapes/bert"             # with init_from=bert: the Q-Former's initialisation
    num_query_tokens: int = 32                 # with init_from=bert (else the stage-1 model's)
    cross_attention_freq: int = 2              # with init_from=bert
    prompt: str = ""                           # "" for pre-training; "a photo of" for caption fine-tuning
    freeze_vit: bool = True
    # optimisation: the quick start's, ~10 minutes on 2 CPU cores; the paper's (§3.4, LAVIS pretrain_stage2.yaml)
    # are in config/stage2_coco_*.json
    batch_size: int = 32                       # per process; the paper's total is 1920 (OPT) / 1520 (FlanT5)
    grad_accum: int = 1
    max_steps: int = 2000
    lr_decay_steps: int = 0                    # where the cosine reaches min_lr; 0 = max_steps
    lr: float = 1e-3                           # the paper: 1e-4
    min_lr: float = 1e-4
    warmup_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0                     # 0 = off
    # evaluation, logging, checkpoints
    out_dir: str = "out/stage2"
    log_interval: int = 50
    eval_interval: int = 500
    eval_max_images: int = 1000                # 0 = every image of val_ann / test_ann
    eval_num_beams: int = 5
    eval_max_new_tokens: int = 30
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # never float16 for FlanT5
    compile: bool = torch.cuda.is_available()
    seed: int = 1337


@torch.no_grad()
def evaluate(model, cfg, ann_file, batch_size=16):
    """Caption the images of ann_file and score them against its references: CIDEr-D and BLEU
    (metrics.caption_scores), and, in the shapes world, how much of what they say is true (scene_accuracy)."""
    entries = read_annotations(ann_file)[:cfg.eval_max_images or None]
    res = []
    for i in range(0, len(entries), batch_size):
        pixels = torch.stack([load_image(os.path.join(cfg.image_root, e["image"]), model.cfg.vit.image_size)
                              for e in entries[i:i + batch_size]])
        res += model.caption(pixels, cfg.prompt, num_beams=cfg.eval_num_beams, max_new_tokens=cfg.eval_max_new_tokens)
    refs = [entry_captions(e) for e in entries]
    metrics = caption_scores(dict(enumerate(refs)), {k: [c] for k, c in enumerate(res)})
    if all("objects" in e for e in entries):
        metrics |= {f"scene_{k}": v for k, v in scene_accuracy(res, entries).items()}
    return metrics, res


def main(cfg):
    ddp, rank, world = setup(cfg)
    master = rank == 0
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    dtype = getattr(torch, cfg.dtype) if cfg.device.startswith("cuda") else torch.float32

    # --- model: the stage-1 Q-Former + a new projection + the frozen LLM ----------------------------------------
    torch.manual_seed(cfg.seed)  # the new projection starts the same on every rank
    if cfg.init_from == "resume":
        src = checkpoint_folder(ckpt_dir)
        model = Blip2.from_pretrained(src, device=cfg.device).train()
        frozen = read_config(src)["frozen"]
    else:
        if cfg.init_from == "bert":  # Figure 5: the Q-Former has not learned to extract visual features first
            stage1 = Blip2Stage1.from_vit_bert(cfg.vit, cfg.bert, cfg.num_query_tokens, cfg.cross_attention_freq,
                                               image_size=cfg.image_size or None, device=cfg.device)
            vit_source = resolve(cfg.vit)
        else:
            stage1 = Blip2Stage1.from_pretrained(cfg.init_from, device=cfg.device)
            vit_source = read_config(resolve(cfg.init_from))["frozen"]["vit"]
        model = Blip2.from_stage1(stage1, cfg.lm, device=cfg.device).train()
        frozen = {"vit": vit_source if cfg.freeze_vit else None, "lm": resolve(cfg.lm)}
    fingerprints = {k: fingerprint(resolve(v)) for k, v in frozen.items() if v}  # loading checks them
    freeze(model.lm)
    if cfg.freeze_vit:
        freeze(model.vit)
    if cfg.device.startswith("cuda"):  # the frozen parts are stored in bf16 on CUDA
        model.lm.to(dtype)
        if cfg.freeze_vit:
            model.vit.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    splits = torch.Generator().manual_seed(cfg.seed + rank)  # FlanT5's prefix/suffix split points
    torch.manual_seed(cfg.seed + rank)                       # dropout
    step, epoch, batch_in_epoch = resume(src, optimizer, splits, rank) if cfg.init_from == "resume" else (0, 0, 0)
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model)
    if master:
        lm = "FlanT5" if raw.is_t5 else "OPT"
        print(f"stage 2: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters, frozen {lm} "
              f"({sum(p.numel() for p in raw.lm.parameters()) / 1e6:.1f}M), ViT {'frozen' if cfg.freeze_vit else 'trained'}"
              f" ({cfg.device}, {world} process(es))")
    transform = (train_transform if cfg.augment else eval_transform)(raw.cfg.vit.image_size)
    dataset = CaptionDataset(cfg.train_ann, cfg.image_root, transform, seed=cfg.seed,
                             captions_per_image=cfg.train_captions)
    stream = Stream(dataset, None, cfg, rank, world, epoch, batch_in_epoch, verbose=master)

    def lm_batch(captions):
        if raw.is_t5:
            b = t5_batch(raw.tokenizer, captions, cfg.prompt or None, cfg.max_txt_len, generator=splits)
        else:
            b = opt_batch(raw.tokenizer, captions, cfg.prompt, cfg.max_txt_len, raw.cfg.qformer.num_query_tokens)
        return {k: v.to(cfg.device) for k, v in b.items()}

    def save(metrics):
        rng = random_states(splits, ddp, world)
        if master:
            config = {"nanoblip2": "stage2", "model": raw.cfg.to_dict(), "frozen": frozen, "fingerprints": fingerprints,
                      "train": asdict(cfg)}
            trained = ("lm.", "vit.") if cfg.freeze_vit else ("lm.",)
            tensors = {k: v for k, v in raw.state_dict().items() if not k.startswith(trained)}
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
                loss = model(b["pixel_values"], lm_batch(b["captions"]))["loss"]
                (loss / cfg.grad_accum).backward()
            seen += len(b["captions"]) * world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and (step % cfg.log_interval == 0 or step == 1):
            print(f"step {step} | loss {loss.item():.4f} | lr {lr:.2e} | {seen / (time.time() - t0):.1f} img/s")
            t0, seen = time.time(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            metrics = {}
            if master:
                raw.eval()
                for split, ann in (("val", cfg.val_ann), ("test", cfg.test_ann if step == cfg.max_steps else "")):
                    if ann:
                        metrics[split], res = evaluate(raw, cfg, ann)
                        print(f"eval {split} step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics[split].items()))
                        print(f"eval {split} step {step} | first caption: {res[0]!r}")
                raw.train()
            save(metrics)
            t0, seen = time.time(), 0
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, parse_args(TrainConfig(), doc=__doc__))
