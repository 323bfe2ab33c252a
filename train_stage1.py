"""
Stage 1 of BLIP-2 (paper §3.2): train the Q-Former against a frozen image encoder with ITC, ITM and ITG.

    python train_stage1.py --vit=Salesforce/blip2-opt-2.7b --bert=bert-base-uncased \
        --train_ann=data/coco/train.json --val_ann=data/coco/val.json --image_root=data/coco/images
    torchrun --standalone --nproc_per_node=8 train_stage1.py ...
    python train_stage1.py --init_from=resume --out_dir=out/stage1      # continue a run

The paper's settings are the defaults (AdamW 0.9/0.98, weight decay 0.05, peak lr 1e-4 after a linear warm-up, cosine
to 1e-5, 224 px, 32 queries). One log line per log_interval steps; retrieval R@K on val_ann and a checkpoint every
eval_interval steps. -h lists every option.
"""
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoblip2.blip2 import Blip2Stage1
from nanoblip2.cli import parse_args
from nanoblip2.data import CaptionDataset, collate, load_image, load_retrieval, train_transform
from nanoblip2.load import checkpoint_folder, read_config, resolve, save_checkpoint
from nanoblip2.metrics import retrieval_recall
from nanoblip2.tokenizer import load_bert_tokenizer


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
    vit: str = "Salesforce/blip2-opt-2.7b"     # the frozen ViT: a BLIP-2 folder (EVA ViT-g) or a CLIP folder / Hub id
    bert: str = "bert-base-uncased"            # the Q-Former's initialisation and tokenizer
    num_query_tokens: int = 32
    init_from: str = "scratch"                 # scratch | resume | a nanoblip2 stage-1 folder
    # optimisation
    batch_size: int = 100                      # per process; the paper's total is 1680 (ViT-g)
    grad_accum: int = 1
    max_steps: int = 250_000
    lr_decay_steps: int = 0                    # where the cosine reaches min_lr; 0 = max_steps
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0                     # 0 = off
    # evaluation, logging, checkpoints
    out_dir: str = "out/stage1"
    log_interval: int = 10
    eval_interval: int = 2000
    eval_k_test: int = 128
    eval_max_images: int = 1000                # 0 = the whole val_ann
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA
    compile: bool = torch.cuda.is_available()
    seed: int = 1337


def get_lr(step, cfg):
    """Linear warm-up from warmup_lr to lr, then cosine down to min_lr at lr_decay_steps (default max_steps)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    end = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batches(n, batch_size, seed, epoch, rank, world, start=0):
    """This rank's batches of sample indices for an epoch: a seeded permutation, dealt out round-robin."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_rank = order[rank::world]
    return [per_rank[i:i + batch_size] for i in range(0, len(per_rank) - batch_size + 1, batch_size)][start:]


@torch.no_grad()
def evaluate(model, tok, cfg, device):
    """Retrieval on val_ann (SPEC §5): ITC top-k re-ranked by ITM; i2t and t2i R@1/5/10."""
    images, texts, img2txt, txt2img = load_retrieval(cfg.val_ann, cfg.image_root)
    if cfg.eval_max_images and len(images) > cfg.eval_max_images:
        images, img2txt = images[:cfg.eval_max_images], img2txt[:cfg.eval_max_images]
        keep = sorted(t for ts in img2txt for t in ts)
        remap = {t: i for i, t in enumerate(keep)}
        texts, txt2img = [texts[t] for t in keep], [txt2img[t] for t in keep]
        img2txt = [[remap[t] for t in ts] for ts in img2txt]
    pixels = [load_image(p, cfg.image_size) for p in images]
    ids, mask = tok(texts, max_length=35, padding="max_length")  # LAVIS pads retrieval texts to 35
    i2t, t2i = model.retrieval_scores(pixels, ids, mask, k_test=cfg.eval_k_test)
    return retrieval_recall(i2t.cpu(), t2i.cpu(), img2txt, txt2img)


def main(cfg):
    # --- processes and devices ---------------------------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg.device)
    else:
        rank, world = 0, 1
    master = rank == 0
    cuda = cfg.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if cuda else torch.autocast("cpu", enabled=False)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    # --- model, tokenizer, optimiser ----------------------------------------------------------------------------
    state = None
    torch.manual_seed(cfg.seed)  # the fresh parts of the model start the same on every rank
    if cfg.init_from == "resume":
        src = checkpoint_folder(ckpt_dir)
        model = Blip2Stage1.from_pretrained(src, device=cfg.device).train()
        state = torch.load(os.path.join(src, "optim.pt"), weights_only=True)
        meta = json.load(open(os.path.join(src, "meta.json")))
        bert = read_config(src)["train"]["bert"]
    elif cfg.init_from == "scratch":
        model = Blip2Stage1.from_vit_bert(cfg.vit, cfg.bert, cfg.num_query_tokens, image_size=cfg.image_size,
                                          device=cfg.device)
        bert = cfg.bert
    else:
        model = Blip2Stage1.from_pretrained(cfg.init_from, device=cfg.device).train()
        bert = cfg.bert
    tok = load_bert_tokenizer(resolve(bert))
    if tok.bos_id != model.cfg.dec_id:
        raise SystemExit(f"error: the tokenizer's [DEC] is {tok.bos_id}, the model's {model.cfg.dec_id}")
    model.vit.requires_grad_(False)                 # frozen: no gradients, and eval mode for good (LAVIS disabled_train)
    model.vit.eval()
    model.vit.train = lambda mode=True: model.vit
    if cuda:
        model.vit.to(getattr(torch, cfg.dtype))     # stored in bf16 on CUDA
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              # biases, norms and the 0-dim temperature: no decay (LAVIS decays temp; we do not, SPEC §10)
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=cuda)
    step, epoch, batch_in_epoch = 0, 0, 0
    negatives = torch.Generator(device=cfg.device).manual_seed(cfg.seed + rank)  # ITM hard negatives
    torch.manual_seed(cfg.seed + rank)                                            # dropout
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        negatives.set_state(state["rng"]["negatives"][rank])
        torch.set_rng_state(state["rng"]["torch"][rank])
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model)
    if master:
        n = sum(p.numel() for p in params)
        print(f"stage 1: {n / 1e6:.1f}M trainable parameters, ViT frozen ({cfg.device}, {world} process(es))")

    # --- data ---------------------------------------------------------------------------------------------------
    dataset = CaptionDataset(cfg.train_ann, cfg.image_root, train_transform(cfg.image_size), seed=cfg.seed)
    # fixed-length text, so that every rank gathers the same shapes for ITC/ITM
    collate_fn = functools.partial(collate, tokenizer=tok, max_length=cfg.max_txt_len, padding="max_length")

    def loader(epoch, start):
        dataset.epoch = epoch
        order = batches(len(dataset), cfg.batch_size, cfg.seed, epoch, rank, world, start)
        if not order and start == 0:
            raise SystemExit(f"error: {cfg.train_ann}: fewer than batch_size={cfg.batch_size} samples per process")
        # its own generator: creating a loader must not draw from the global random state (dropout), or a
        # resumed run would drift from an uninterrupted one
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate_fn,
                                                num_workers=cfg.num_workers, pin_memory=cuda,
                                                generator=torch.Generator().manual_seed(cfg.seed + epoch)))

    def next_batch():
        nonlocal epoch, batch_in_epoch, data, skipped
        while True:
            try:
                b = next(data)
                batch_in_epoch += 1
            except StopIteration:
                if master and skipped:
                    print(f"epoch {epoch}: skipped {skipped} unreadable image(s)")
                epoch, batch_in_epoch, skipped = epoch + 1, 0, 0
                data = loader(epoch, 0)
                continue
            skipped += b["skipped"]
            if len(b["input_ids"]):
                return {k: v.to(cfg.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}

    def save(metrics):
        rng = {"torch": [torch.get_rng_state()], "negatives": [negatives.get_state()]}
        if ddp:  # every rank's random state, so that each continues where it stopped
            rng = {k: [None] * world for k in rng}
            dist.all_gather_object(rng["torch"], torch.get_rng_state())
            dist.all_gather_object(rng["negatives"], negatives.get_state())
        if not master:
            return
        frozen = {"vit": resolve(cfg.vit) if cfg.init_from != "resume" else read_config(src)["frozen"]["vit"]}
        config = {"nanoblip2": "stage1", "model": asdict(raw.cfg), "frozen": frozen, "train": asdict(cfg)}
        tensors = {k: v for k, v in raw.state_dict().items() if not k.startswith("vit.")}
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "metrics": metrics}
        save_checkpoint(ckpt_dir, tensors, config, meta, {"optimizer": optimizer.state_dict(), "rng": rng})
        print(f"saved {ckpt_dir} at step {step}")

    # --- the loop -----------------------------------------------------------------------------------------------
    data, skipped = loader(epoch, batch_in_epoch), 0
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            b = next_batch()
            sync = not ddp or micro == cfg.grad_accum - 1
            with autocast, (model.no_sync() if not sync else torch.enable_grad()):
                out = model(b["pixel_values"], b["input_ids"], b["attention_mask"], generator=negatives)
                (out["loss"] / cfg.grad_accum).backward()
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
            if cfg.val_ann and master:
                raw.eval()
                metrics = evaluate(raw, tok, cfg, cfg.device)
                raw.train()
                print(f"eval step {step} | " + " | ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            save(metrics)
            t0, seen = time.time(), 0
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args(TrainConfig(), doc=__doc__))
