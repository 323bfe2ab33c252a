"""
Stage 2 of BLIP-2 (paper §3.3): connect the stage-1 Q-Former to a frozen LLM through one linear layer and train
it with the LLM's language-modelling loss (OPT) or prefix language-modelling loss (FlanT5).

    python train_stage2.py                                    # the quick start: out/stage1/ckpt + the shapes OPT
    python train_stage2.py --init_from=bert --out_dir=out/stage2_no_stage1    # Figure 5: no stage 1
    python train_stage2.py config/stage2_coco_opt2.7b.json    # the paper's (or stage2_coco_flant5xl.json)
    python train_stage2.py config/stage2_caption_coco_opt2.7b.json    # §4.2: caption fine-tuning, the ViT trained
    torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_coco_opt2.7b.json
    python train_stage2.py --init_from=resume                 # continue a run (same out_dir)
    python train_stage2.py --task=vqa --init_from=out/stage2/ckpt --qformer_text=true --freeze_vit=false \
        --train_ann=data/shapes/vqa_train.json --val_ann=data/shapes/vqa_val.json --test_ann=data/shapes/vqa_test.json
                                                              # §4.3: VQA fine-tuning, the question to the Q-Former

The defaults are the quick start's, ~10 minutes on 2 CPU cores; the config files hold the paper's settings.
Periodic evaluation captions val_ann (beam 5) and reports CIDEr and BLEU (and, in the shapes world, how much of
what the captions say is true), or with --task=vqa answers its questions (VQA accuracy, per type); test_ann is
evaluated at the end. -h lists every option.
"""
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.stage2 import Blip2
from nanoblip2.cli import parse_args, run
from nanoblip2.data import opt_batch, t5_batch
from nanoblip2.checkpoint import checkpoint_folder, fingerprint
from nanoblip2.evaluation import captioning, vqa
from nanoblip2.tokenizer import load_bert_tokenizer
from nanoblip2.hub import resolve
from nanoblip2.load import read_config
from nanoblip2.training import (Stream, adamw, evaluations, freeze, get_lr, layer_decay, random_states, resume,
                                save_run, setup, train_step, wrap)


@dataclass
class TrainConfig:
    # data: annotation files of {"image": relative path, "caption": str | [str]} (data/<name>/prepare.py)
    task: str = "caption"                      # or vqa: files of {"image", "question", "answers": [str]}; the loss
                                               # on one answer per question (drawn by frequency) after the prompt
    train_ann: str = "data/shapes/train.json"
    val_ann: str = "data/shapes/val.json"      # captioned every eval_interval steps; "" for none
    val_vqa_ann: str = ""                      # with task=caption: also zero-shot VQA on it then (Figure 5)
    test_ann: str = "data/shapes/test.json"    # captioned once, at the end; "" for none
    image_root: str = "data/shapes/images"
    image_size: int = 0                        # 0 = the ViT's own or init_from's (fine-tuning: 364); not with resume
    max_txt_len: int = 32
    train_captions: int = 1                    # captions per training image, the first ones; 0 = all (COCO).
                                               # 1: the shapes world's specific first caption (measured better)
    augment: bool = False                      # LAVIS's random resized crop + flip (the coco configs turn it on);
                                               # off for the shapes world, whose captions name positions
    num_workers: int = 2
    # model
    init_from: str = "out/stage1/ckpt"         # a stage-1 folder | a stage-2 folder (fine-tuning) | resume |
                                               # bert (skip stage 1: Figure 5)
    lm: str = "data/shapes/opt"                # the frozen LLM: an OPT or (Flan)T5 folder or Hub id
    vit: str = "data/shapes/vit"               # with init_from=bert: the frozen ViT (BLIP-2 or CLIP folder)
    bert: str = "data/shapes/bert"             # with init_from=bert: the Q-Former's initialisation
    num_query_tokens: int = 32                 # with init_from=bert (else the stage-1 model's)
    cross_attention_freq: int = 2              # with init_from=bert
    prompt: str = ""                           # "" for pre-training; "a photo of" for caption fine-tuning
    qformer_text: bool = False                 # the Q-Former reads the prompt too, as the LLM does (Figure 7): it
                                               # keeps the text branch of its stage 1 (VQA fine-tuning)
    freeze_vit: bool = True                    # false: the ViT is trained too (caption fine-tuning, §4.2)
    vit_lr_decay: float = 1.0                  # a trained ViT's layer-wise lr decay (the paper: 0.95); 1 = off
    vit_grad_checkpoint: bool = False          # a trained ViT's blocks recompute their activations in the backward
    # optimisation: the quick start's; the paper's (§3.4, LAVIS pretrain_stage2.yaml) are in config/stage2_coco_*.json
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


def start(cfg):
    """A new run's model: from a stage-1 folder or BERT (Figure 5), or a stage-2 folder to fine-tune. -> the model,
    its frozen parts' sources, the folder of the Q-Former's tokenizer when it reads text, else None."""
    d = {} if cfg.init_from == "bert" else read_config(resolve(cfg.init_from))
    if d.get("nanoblip2") == "stage2":  # with its own LLM (not cfg.lm), and its ViT if it trained one
        model = Blip2.from_pretrained(cfg.init_from, device=cfg.device, image_size=cfg.image_size or None).train()
        vit_source, lm_source, bert = d["frozen"]["vit"], d["frozen"]["lm"], d.get("qformer_tokenizer")
        if cfg.qformer_text and not model.cfg.qformer.text:  # the text branch of the stage 1 it started from
            made = {k: d["train"][k] for k in ("vit", "bert", "num_query_tokens", "cross_attention_freq")}
            stage1, _, bert = stage1_model(replace(cfg, **made), d["train"]["init_from"])
            model.add_text_branch(stage1, load_bert_tokenizer(bert))
    else:
        stage1, vit_source, bert = stage1_model(cfg, cfg.init_from)
        bert, lm_source = bert if cfg.qformer_text else None, resolve(cfg.lm)
        model = Blip2.from_stage1(stage1, lm_source, device=cfg.device,
                                  qformer_tokenizer=load_bert_tokenizer(bert) if bert else None).train()
    return model, {"vit": vit_source if cfg.freeze_vit else None, "lm": lm_source}, bert


def stage1_model(cfg, src):
    """A stage-1 model from its folder, or from the ViT and BERT (no stage 1). -> it, its frozen ViT's source, the
    folder of its BERT tokenizer."""
    if src == "bert":  # Figure 5: the Q-Former has not learned to extract visual features first
        s1 = Blip2Stage1.from_vit_bert(cfg.vit, cfg.bert, cfg.num_query_tokens, cfg.cross_attention_freq,
                                       image_size=cfg.image_size or None, device=cfg.device)
        return s1, resolve(cfg.vit), resolve(cfg.bert)
    d = read_config(resolve(src))
    s1 = Blip2Stage1.from_pretrained(src, image_size=cfg.image_size or None, device=cfg.device)
    return s1, d.get("frozen", {}).get("vit"), resolve(d.get("train", {}).get("bert", src))


def main(cfg):
    if cfg.task not in ("caption", "vqa"):
        raise SystemExit(f"error: --task={cfg.task!r}: want caption or vqa")
    ddp, rank, world = setup(cfg)
    master = rank == 0
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    # --- model: the stage-1 Q-Former + a new projection + the frozen LLM, or a stage-2 model to fine-tune -------
    torch.manual_seed(cfg.seed)  # the new projection starts the same on every rank
    if cfg.init_from == "resume":
        src = checkpoint_folder(ckpt_dir)
        model = Blip2.from_pretrained(src, device=cfg.device).train()
        d = read_config(src)
        frozen, qformer_tokenizer = d["frozen"], d.get("qformer_tokenizer")
    else:
        model, frozen, qformer_tokenizer = start(cfg)
    fingerprints = {k: fingerprint(resolve(v)) for k, v in frozen.items() if v}  # loading checks them
    freeze(model.lm, cfg)  # the frozen parts are stored in bf16 on CUDA
    if cfg.freeze_vit:
        freeze(model.vit, cfg)
    model.vit.grad_checkpoint = cfg.vit_grad_checkpoint and not cfg.freeze_vit
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg, layer_decay(model.vit, cfg.vit_lr_decay))
    splits = torch.Generator().manual_seed(cfg.seed + rank)  # FlanT5's prefix/suffix split points
    torch.manual_seed(cfg.seed + rank)                       # dropout
    step, epoch, batch_in_epoch = resume(src, optimizer, splits, rank) if cfg.init_from == "resume" else (0, 0, 0)
    raw, model = model, wrap(model, cfg, ddp)
    if master:
        lm, vit = "FlanT5" if raw.is_t5 else "OPT", "frozen" if cfg.freeze_vit else "trained"
        print(f"stage 2: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters, frozen {lm} "
              f"({sum(p.numel() for p in raw.lm.parameters()) / 1e6:.1f}M), ViT {vit} "
              f"({cfg.device}, {world} process(es))")
    stream = Stream(cfg, raw.cfg.vit.image_size, None, rank, world, epoch, batch_in_epoch)
    config = {"nanoblip2": "stage2", "model": raw.cfg.to_dict(), "frozen": frozen, "fingerprints": fingerprints,
              "train": asdict(cfg), "qformer_tokenizer": qformer_tokenizer}  # the checkpoints' config.json
    not_saved = ("lm.", "vit.") if frozen["vit"] else ("lm.",)  # the frozen parts stay in their own files

    def forward(model, b):  # the LLM's loss on the captions (VQA: the answers), after the queries
        if cfg.task == "vqa":
            prompts, texts = [raw.vqa_prompt(q) for q, _ in b["captions"]], [a for _, a in b["captions"]]
        else:
            prompts, texts = [cfg.prompt] * len(b["captions"]), b["captions"]
        if raw.is_t5:
            text = t5_batch(raw.tokenizer, texts, prompts if any(prompts) else None, cfg.max_txt_len, splits)
        else:
            text = opt_batch(raw.tokenizer, texts, prompts, cfg.max_txt_len, raw.cfg.qformer.num_query_tokens)
        text |= raw.qformer_text(prompts)  # Figure 7: the Q-Former reads the prompt too
        return model(b["pixel_values"], {k: v.to(cfg.device) for k, v in text.items()})

    def answer(ann):  # the paper's VQA generation settings (Blip2.answer), accuracy per question type
        metrics, answers, skipped = vqa(raw, ann, cfg.image_root, cfg.eval_num_beams, cfg.eval_max_images)
        by_type = {f"acc_{t}": v for t, v in metrics["by_type"].items()}
        return {"accuracy": metrics["accuracy"]} | by_type, skipped, f"first answer: {answers[0]['answer']!r}"

    def evaluate(ann):  # captions (beam search) scored by CIDEr and BLEU, in the shapes world also how true they are
        if cfg.task == "vqa":
            return answer(ann)
        metrics, captions, skipped = captioning(raw, ann, cfg.image_root, cfg.prompt, cfg.eval_num_beams,
                                                cfg.eval_max_new_tokens, cfg.eval_max_images)
        if cfg.val_vqa_ann and ann == cfg.val_ann:  # zero-shot: the model was never trained on questions
            metrics |= {f"vqa_{k}": v for k, v in answer(cfg.val_vqa_ann)[0].items()}
        return metrics, skipped, f"first caption: {captions[0]['caption']!r}"

    # --- the loop -----------------------------------------------------------------------------------------------
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        out, n = train_step(model, optimizer, params, stream, cfg, lr, forward)
        step += 1
        seen += n * world
        if master and (step % cfg.log_interval == 0 or step == 1):
            print(f"step {step} | loss {out['loss'].item():.4f} | lr {lr:.2e} | {seen / (time.time() - t0):.1f} img/s")
            t0, seen = time.time(), 0
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            metrics = evaluations(raw, step, cfg, evaluate, digits=4) if master else {}
            rng = random_states(splits, ddp, world)  # every rank takes part
            if master:
                tensors = {k: v for k, v in raw.state_dict().items() if not k.startswith(not_saved)}
                save_run(ckpt_dir, tensors, config, step, stream, optimizer, rng, metrics)
            t0, seen = time.time(), 0
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, parse_args(TrainConfig(), doc=__doc__))
