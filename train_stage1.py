"""
Stage 1 of BLIP-2 (paper §3.2): train the Q-Former against a frozen image encoder with ITC, ITM and ITG.

    python train_stage1.py                                    # the quick start: the shapes world (data/shapes)
    python train_stage1.py config/stage1_coco_vitg.json       # the paper's: EVA ViT-g + BERT-base on COCO
    torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_coco_vitg.json
    python train_stage1.py --init_from=resume                 # continue a run (same out_dir)
    python train_stage1.py config/stage1_retrieval_coco_vitg.json   # §4.4: retrieval fine-tuning, ViT trained

The defaults are the quick start's, ~18 minutes on 2 CPU cores; the config file holds the paper's settings. One log
line per log_interval steps; retrieval R@K on val_ann and a checkpoint every eval_interval steps, on test_ann at the
end. -h lists every option.
"""
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.cli import parse_args, run
from nanoblip2.checkpoint import checkpoint_folder, fingerprint
from nanoblip2.evaluation import retrieval
from nanoblip2.hub import resolve
from nanoblip2.load import read_config
from nanoblip2.tokenizer import load_bert_tokenizer
from nanoblip2.training import (NegativePool, Stream, adamw, evaluations, freeze, get_lr, layer_decay,
                                random_states, resume, save_run, setup, train_step, wrap)


@dataclass
class TrainConfig:
    # data: annotation files of {"image": relative path, "caption": str | [str]} (data/<name>/prepare.py)
    train_ann: str = "data/shapes/train.json"
    val_ann: str = "data/shapes/val.json"      # retrieval every eval_interval steps; "" for none
    test_ann: str = "data/shapes/test.json"    # retrieval once, at the end; "" for none
    image_root: str = "data/shapes/images"
    image_size: int = 0                        # 0 = the ViT's own (224 for EVA ViT-g, 64 for the shapes ViT) or
                                               # init_from's; not with resume
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
    freeze_vit: bool = True                    # false: the ViT is trained too (retrieval fine-tuning, §4.4)
    vit_lr_decay: float = 1.0                  # a trained ViT's layer-wise lr decay (the paper: 0.95); 1 = off
    vit_grad_checkpoint: bool = False          # a trained ViT's blocks recompute their activations in the backward
    itg: bool = True                           # false: no ITG loss (Table 6's ablation)
    # optimisation: the quick start's; the paper's are in config/stage1_coco_vitg.json
    batch_size: int = 8                        # per process; the paper's total is 1680 (ViT-g). Here more, smaller
    grad_accum: int = 1                        # steps learn more in the same time (measured: 8 > 16 > 32 > 64)
    max_steps: int = 4800                      # 3,200 left seed 1 at test R@1 30.5% (this: 67.6%)
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
                                               # samples (training.NegativePool); 0 = the batch only, as LAVIS
    temp_max: float = 0.07                     # ITC's temperature is clamped to [0.001, temp_max]: at most its
                                               # start here (steadier over seeds), BLIP-1's 0.5 in the coco configs
    itc_pool: bool = True                      # ITC also against ITM's negatives from the pool, their features
                                               # recomputed (no pool: no effect) ...
    itc_pool_after: int = 800                  # ... from this step on; before, ITC on the batch only (from step 0
                                               # ITC sat near chance for hundreds of steps)
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


def main(cfg):
    ddp, rank, world = setup(cfg)
    master = rank == 0
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    # --- model, tokenizer, optimiser ----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the fresh parts of the model start the same on every rank
    if cfg.init_from == "resume":
        src = checkpoint_folder(ckpt_dir)
        model = Blip2Stage1.from_pretrained(src, device=cfg.device).train()
        saved = read_config(src)
        vit_source, bert = saved["frozen"]["vit"], saved["train"]["bert"]
    elif cfg.init_from == "scratch":
        model = Blip2Stage1.from_vit_bert(cfg.vit, cfg.bert, cfg.num_query_tokens, cfg.cross_attention_freq,
                                          image_size=cfg.image_size or None, device=cfg.device)
        vit_source, bert = resolve(cfg.vit), cfg.bert
    else:
        model = Blip2Stage1.from_pretrained(cfg.init_from, image_size=cfg.image_size or None,
                                            device=cfg.device).train()
        vit_source, bert = read_config(resolve(cfg.init_from))["frozen"]["vit"], cfg.bert
    vit_source = vit_source if cfg.freeze_vit else None  # None: the ViT is saved with the rest
    fingerprints = {"vit": fingerprint(resolve(vit_source))} if vit_source else {}  # loading checks: named by path
    tok = load_bert_tokenizer(resolve(bert))
    if tok.bos_id != model.cfg.dec_id:
        raise SystemExit(f"error: the tokenizer's [DEC] is {tok.bos_id}, the model's {model.cfg.dec_id}")
    if cfg.freeze_vit:
        freeze(model.vit, cfg)  # stored in bf16 on CUDA
    model.vit.grad_checkpoint = cfg.vit_grad_checkpoint and not cfg.freeze_vit
    if not cfg.itg:  # the ITG head is unused: out of the optimiser and of DDP's gradient reduction
        model.qformer.lm_head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg, layer_decay(model.vit, cfg.vit_lr_decay))
    # ITM's hard negatives: their own random stream; a compiled step draws them from the global one (dynamo cannot
    # put a Generator in a graph, and would cut the forward around each draw)
    negatives = None if cfg.compile else torch.Generator(device=cfg.device).manual_seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)                                            # dropout
    pool = NegativePool(cfg.itm_pool) if cfg.itm_pool > 0 else None                 # more candidates for them
    step, epoch, batch_in_epoch = (resume(src, optimizer, negatives, rank, pool) if cfg.init_from == "resume"
                                   else (0, 0, 0))
    model.temp_max = cfg.temp_max
    raw, model = model, wrap(model, cfg, ddp)
    if master:
        print(f"stage 1: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters, ViT "
              f"{'frozen' if cfg.freeze_vit else 'trained'} ({cfg.device}, {world} process(es))")
    stream = Stream(cfg, raw.cfg.vit.image_size, tok, rank, world, epoch, batch_in_epoch)
    image_ids = stream.dataset.image_ids.to(cfg.device)
    config = {"nanoblip2": "stage1", "model": asdict(raw.cfg), "frozen": {"vit": vit_source},
              "fingerprints": fingerprints, "train": asdict(cfg) | {"bert": bert}}  # the checkpoints' config.json

    def forward(model, b):  # ITC, ITM and ITG on a batch; ITM's hard negatives from it and from the pool
        return model(b["pixel_values"], b["input_ids"], b["attention_mask"], generator=negatives,
                     image_ids=image_ids[b["index"]], candidates=None if pool is None else pool.items, itg=cfg.itg)

    def evaluate(ann):  # retrieval: ITC's top k_test re-ranked by ITM; i2t and t2i R@1/5/10
        return retrieval(raw, tok, ann, cfg.image_root, cfg.eval_k_test, cfg.eval_max_images, cfg.eval_captions)

    # --- the loop -----------------------------------------------------------------------------------------------
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        raw.itc_pool = cfg.itc_pool and step >= cfg.itc_pool_after
        out, n = train_step(model, optimizer, params, stream, cfg, lr, forward, pool)
        step += 1
        seen += n * world
        if master and (step % cfg.log_interval == 0 or step == 1):
            itg = f" | itg {out['loss_itg'].item():.4f}" if cfg.itg else ""
            print(f"step {step} | loss {out['loss'].item():.4f} | itc {out['loss_itc'].item():.4f} | "
                  f"itm {out['loss_itm'].item():.4f}{itg} | lr {lr:.2e} | "
                  f"temp {raw.temp.item():.4f} | {seen / (time.time() - t0):.1f} img/s")
            t0, seen = time.time(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            metrics = evaluations(raw, step, cfg, evaluate, digits=2) if master else {}
            rng = random_states(negatives, ddp, world, pool)  # every rank takes part
            if master:
                tensors = {k: v for k, v in raw.state_dict().items() if not (vit_source and k.startswith("vit."))}
                save_run(ckpt_dir, tensors, config, step, stream, optimizer, rng, metrics)
            t0, seen = time.time(), 0
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, parse_args(TrainConfig(), doc=__doc__))
