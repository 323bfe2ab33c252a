"""
Stage 2 of BLIP-2 (paper §3.3): connect the stage-1 Q-Former to a frozen LLM through one linear layer and train
it with the LLM's language-modelling loss (OPT) or prefix language-modelling loss (FlanT5).

    python train_stage2.py --init_from=out/stage1/ckpt --lm=facebook/opt-2.7b \
        --train_ann=data/coco/train.json --val_ann=data/coco/val.json --image_root=data/coco/images
    python train_stage2.py ... --prompt="a photo of" --freeze_vit=false      # §4.2 caption fine-tuning
    python train_stage2.py --init_from=bert --vit=... --bert=...            # Figure 5: no stage 1
    torchrun --standalone --nproc_per_node=8 train_stage2.py ...
    python train_stage2.py --init_from=resume --out_dir=out/stage2

Periodic evaluation captions val_ann (beam 5) and reports CIDEr and BLEU-4. -h lists every option.
"""
import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoblip2.blip2 import Blip2, Blip2Stage1, opt_batch, t5_batch
from nanoblip2.cli import parse_args
from nanoblip2.data import AnnotationError, CaptionDataset, load_image, load_retrieval, train_transform
from nanoblip2.load import CheckpointError, HubError, checkpoint_folder, read_config, resolve, save_checkpoint
from nanoblip2.metrics import caption_scores
from nanoblip2.training import (Stream, adamw, autocast, freeze, get_lr, random_states, resume,
                                setup)


@dataclass
class TrainConfig:
    # data: annotation files of {"image": relative path, "caption": str | [str]} (data/coco/prepare.py makes them)
    train_ann: str = "data/coco/train.json"
    val_ann: str = "data/coco/val.json"        # "" for no evaluation
    image_root: str = "data/coco/images"
    image_size: int = 224
    max_txt_len: int = 32
    num_workers: int = 4
    # model
    init_from: str = "out/stage1/ckpt"         # a stage-1 folder | resume | bert (skip stage 1: Figure 5)
    lm: str = "facebook/opt-2.7b"              # the frozen LLM: an OPT or (Flan)T5 folder or Hub id
    vit: str = ""                              # with init_from=bert: the frozen ViT (BLIP-2 or CLIP folder)
    bert: str = ""                             # with init_from=bert: the Q-Former's initialisation
    num_query_tokens: int = 32
    prompt: str = ""                           # "" for pre-training; "a photo of" for caption fine-tuning
    freeze_vit: bool = True
    # optimisation (paper §3.4, LAVIS pretrain_stage2.yaml)
    batch_size: int = 64                       # per process; the paper's total is 1920 (OPT) / 1520 (FlanT5)
    grad_accum: int = 1
    max_steps: int = 80_000
    lr_decay_steps: int = 0                    # where the cosine reaches min_lr; 0 = max_steps
    lr: float = 1e-4
    min_lr: float = 5e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0                     # 0 = off
    # evaluation, logging, checkpoints
    out_dir: str = "out/stage2"
    log_interval: int = 10
    eval_interval: int = 2000
    eval_max_images: int = 500                 # 0 = the whole val_ann
    eval_num_beams: int = 5
    eval_max_new_tokens: int = 30
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # never float16 for FlanT5
    compile: bool = torch.cuda.is_available()
    seed: int = 1337


@torch.no_grad()
def evaluate(model, cfg, batch_size=16):
    """Caption val_ann and score the captions against its references: CIDEr-D and BLEU (metrics.caption_scores)."""
    images, texts, img2txt, _ = load_retrieval(cfg.val_ann, cfg.image_root)
    n = min(len(images), cfg.eval_max_images or len(images))
    gts, res = {}, {}
    for i in range(0, n, batch_size):
        pixels = torch.stack([load_image(p, cfg.image_size) for p in images[i:i + batch_size]])
        caps = model.caption(pixels, cfg.prompt, num_beams=cfg.eval_num_beams, max_new_tokens=cfg.eval_max_new_tokens)
        for j, cap in enumerate(caps):
            res[i + j] = [cap]
            gts[i + j] = [texts[t] for t in img2txt[i + j]]
    return caption_scores(gts, res), res


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
            stage1 = Blip2Stage1.from_vit_bert(cfg.vit, cfg.bert, cfg.num_query_tokens, image_size=cfg.image_size,
                                               device=cfg.device)
            vit_source = resolve(cfg.vit)
        else:
            stage1 = Blip2Stage1.from_pretrained(cfg.init_from, device=cfg.device)
            vit_source = read_config(resolve(cfg.init_from))["frozen"]["vit"]
        model = Blip2.from_stage1(stage1, cfg.lm, device=cfg.device).train()
        frozen = {"vit": vit_source if cfg.freeze_vit else None, "lm": resolve(cfg.lm)}
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
    dataset = CaptionDataset(cfg.train_ann, cfg.image_root, train_transform(cfg.image_size), seed=cfg.seed)
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
            config = {"nanoblip2": "stage2", "model": raw.cfg.to_dict(), "frozen": frozen, "train": asdict(cfg)}
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
            if cfg.val_ann and master:
                raw.eval()
                metrics, res = evaluate(raw, cfg)
                raw.train()
                print(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                print(f"eval step {step} | example: {res[0][0]!r}")
            save(metrics)
            t0, seen = time.time(), 0
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    cfg = parse_args(TrainConfig(), doc=__doc__)
    try:
        main(cfg)
    except (AnnotationError, CheckpointError, FileNotFoundError, HubError) as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
