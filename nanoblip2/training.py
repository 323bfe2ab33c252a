"""
What train_stage1.py and train_stage2.py share: processes, the learning-rate schedule, parameter groups, one
optimisation step, the evaluations every eval_interval steps, checkpoints, the data stream with exact resume, and
random states. What each stage computes stays in its script, top to bottom.

Notable details
- Exact resume: the order of samples is a seeded permutation per epoch, each sample's augmentation is seeded by
  (seed, epoch, index) (CaptionDataset), the DataLoader draws from its own generator, and the random states of
  dropout and of the ITM negatives are saved per rank. The next step after a resume equals the uninterrupted one.
- Frozen parts are put in eval mode for good: `freeze` also makes their .train() a no-op (LAVIS disabled_train).
- Gradient accumulation under DDP: the gradients are all-reduced on the last micro-batch of a step only (no_sync).
"""
import contextlib
import functools
import json
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import save_checkpoint
from .data import CaptionDataset, ImageError, VQADataset, collate, eval_transform, pad_cat, train_transform
from .evaluation import skipped_note
from .load import reading


def setup(cfg):
    """Single process, or one of torchrun's. Returns (ddp, rank, world); sets cfg.device to this rank's GPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    return True, dist.get_rank(), dist.get_world_size()


def freeze(module, cfg=None):
    """No gradients, eval mode for good (.train() no longer undoes it); with cfg, on CUDA, stored in cfg.dtype."""
    module.requires_grad_(False)
    module.eval()
    module.train = lambda mode=True: module
    if cfg is not None and cfg.device.startswith("cuda"):
        module.to(getattr(torch, cfg.dtype))
    return module


def get_lr(step, cfg):
    """Linear warm-up from warmup_lr to lr, then cosine down to min_lr at lr_decay_steps (default max_steps)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    end = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def adamw(params, cfg, lr_scale=None):
    """AdamW; no weight decay on biases, norms and 0-dim parameters such as temp (LAVIS decays temp, we do not).
    lr_scale {parameter: factor} (`layer_decay`; 1 for the others): a pair of groups per factor, largest first,
    whose lr train_step multiplies by it. Fused (one kernel per step instead of one per operation) on CUDA and the
    CPU, as HF's Trainer defaults to."""
    scale, groups = lr_scale or {}, []
    for s in sorted({scale.get(p, 1.0) for p in params}, reverse=True):
        mine = [p for p in params if scale.get(p, 1.0) == s]
        groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": s},
                   {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "lr_scale": s}]
    fused = cfg.device.split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def layer_decay(vit, decay):
    """Layer-wise lr decay for a trained ViT (BEiT's; BLIP-2 fine-tuning, 0.95): block i of L gets decay ** (L - i),
    the embeddings (patch, cls, position; CLIP's ln_pre) decay ** (L + 1), so the lower a layer, the less it moves.
    -> {parameter: factor} for `adamw`; what it lacks (ln_vision, the Q-Former) keeps the full lr."""
    L = len(vit.blocks)
    scale = {p: decay ** (L + 1) for p in vit.parameters()}
    for i, block in enumerate(vit.blocks):
        scale |= {p: decay ** (L - i) for p in block.parameters()}
    return scale


def wrap(model, cfg, ddp):
    """The model the loop calls: compiled (cfg.compile), then DDP. The raw model is evaluated and saved."""
    if cfg.compile:
        model = torch.compile(model)
    return DDP(model) if ddp else model


def train_step(model, optimizer, params, stream, cfg, lr, forward, pool=None):
    """One step at lr (times each group's lr_scale): cfg.grad_accum micro-batches of forward(model, batch) ->
    {"loss", ...} and backward, then clip and step. The pool (stage 1) takes each micro-batch's samples after its
    backward, which needs the rows they overwrite. -> (the last output, samples trained on)"""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # optimiser states saved by older code have no lr_scale
    cuda = cfg.device.startswith("cuda")  # bf16 (cfg.dtype) autocast on CUDA; on the CPU, training runs in fp32
    cast = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if cuda else contextlib.nullcontext()
    n = 0
    for micro in range(cfg.grad_accum):
        b = stream.next()
        sync = not isinstance(model, DDP) or micro == cfg.grad_accum - 1
        with cast, (contextlib.nullcontext() if sync else model.no_sync()):
            out = forward(model, b)
            (out["loss"] / cfg.grad_accum).backward()
        if pool is not None:  # this batch: candidates for the next steps
            pool.push(**out["samples"])
        n += len(b["index"])
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out, n


def evaluations(raw, step, cfg, evaluate, digits):
    """evaluate(ann_file) -> (metrics, skipped images' messages, *notes) on val_ann, and at the last step on test_ann,
    in eval mode; one line `eval {split} step {step} | name value | ...` each, then its notes. -> {split: metrics}"""
    metrics = {}
    raw.eval()
    for split, ann in (("val", cfg.val_ann), ("test", cfg.test_ann if step == cfg.max_steps else "")):
        if ann:
            metrics[split], skipped, *notes = evaluate(ann)
            notes += [skipped_note(skipped)] if skipped else []
            for line in [" | ".join(f"{k} {v:.{digits}f}" for k, v in metrics[split].items())] + notes:
                print(f"eval {split} step {step} | {line}")
    raw.train()
    return metrics


def save_run(ckpt_dir, tensors, config, step, stream, optimizer, rng, metrics):
    """A checkpoint (rank 0): the trained tensors, the config, where the run is, the optimiser and random states."""
    meta = {"step": step, "epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch, "metrics": metrics}
    save_checkpoint(ckpt_dir, tensors, config, meta, {"optimizer": optimizer.state_dict(), "rng": rng})
    print(f"saved {ckpt_dir} at step {step}")


class Stream:
    """Batches of cfg.train_ann forever, from (epoch, batch_in_epoch) on; rank 0 reports unreadable images. Text is
    padded to max_txt_len, so that every rank gathers the same shapes for ITC/ITM (no tokenizer: it stays text)."""

    def __init__(self, cfg, image_size, tokenizer, rank, world, epoch=0, batch_in_epoch=0):
        transform = (train_transform if cfg.augment else eval_transform)(image_size)
        kind = VQADataset if getattr(cfg, "task", "caption") == "vqa" else CaptionDataset
        self.dataset = kind(cfg.train_ann, cfg.image_root, transform, seed=cfg.seed,
                            captions_per_image=cfg.train_captions)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.collate = functools.partial(collate, tokenizer=tokenizer, max_length=cfg.max_txt_len, padding="max_length")
        self.epoch, self.batch_in_epoch, self.skipped = epoch, batch_in_epoch, 0
        self.read = batch_in_epoch  # images read this epoch; a resumed one is not a whole pass, so it counts some
        self.it = self._loader()

    def _loader(self):
        n, cfg = len(self.dataset), self.cfg
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + self.epoch)).tolist()
        mine = order[self.rank::self.world]  # dealt out round-robin
        batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine) - cfg.batch_size + 1, cfg.batch_size)]
        if not batches:
            raise SystemExit(f"error: {cfg.train_ann}: fewer than batch_size={cfg.batch_size} samples per process")
        self.dataset.epoch = self.epoch
        # its own generator: making a loader must not draw from the global random state (dropout)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches[self.batch_in_epoch:], collate_fn=self.collate,
            num_workers=cfg.num_workers, pin_memory=cfg.device.startswith("cuda"),
            generator=torch.Generator().manual_seed(cfg.seed + self.epoch)))

    def next(self):
        while True:
            for b in self.it:
                self.batch_in_epoch += 1
                self.skipped += b["skipped"]
                self.read += len(b["index"])
                if len(b["index"]):  # a batch of nothing but unreadable images is passed over
                    return {k: v.to(self.cfg.device, non_blocking=True) if torch.is_tensor(v) else v
                            for k, v in b.items()}
            if self.read == 0:  # a whole pass without one readable image: the next would be no different
                raise ImageError(f"{self.cfg.image_root}: not one image of {self.cfg.train_ann} could be read "
                                 f"({self.skipped} tried)")
            if self.rank == 0 and self.skipped:
                print(f"epoch {self.epoch}: skipped {self.skipped} unreadable image(s)")
            self.epoch, self.batch_in_epoch, self.skipped, self.read = self.epoch + 1, 0, 0, 0
            self.it = self._loader()


def random_states(generator, ddp, world, pool=None):
    """For a checkpoint: the random states of dropout and `generator` (None: the global one serves both), and the
    pool's samples, {name: [per rank]}."""
    mine = {"torch": torch.get_rng_state()} | ({} if generator is None else {"generator": generator.get_state()})
    if pool is not None:
        mine["pool"] = pool.state_dict()
    ranks = [mine]
    if ddp:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {k: [r[k] for r in ranks] for k in mine}


def resume(folder, optimizer, generator, rank, pool=None):
    """Restore the optimiser, this rank's random states and pool from a checkpoint. -> (step, epoch, batch_in_epoch)"""
    path = os.path.join(folder, "optim.pt")
    with reading(path):  # weights_only: tensors and plain data, never a pickle that runs code
        state = torch.load(path, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"][rank])
        if generator is not None:
            generator.set_state(state["rng"]["generator"][rank])
        if pool is not None and "pool" in state["rng"]:
            pool.load_state_dict(state["rng"]["pool"][rank], device=optimizer.param_groups[0]["params"][0].device)
    path = os.path.join(folder, "meta.json")
    with reading(path), open(path, encoding="utf-8") as f:
        meta = json.load(f)
        return meta["step"], meta["epoch"], meta["batch_in_epoch"]


class NegativePool:
    """Deviation from LAVIS, opt-in: more candidates for ITM's hard negatives than the batch holds. The paper's
    batch of 1680 holds near-misses of most captions; a batch of 8 rarely does, and ITM then learns to tell only
    easy pairs apart. Keeps this rank's last `size` samples: the frozen ViT's output, the tokens, the image ids and
    their ITC features (detached, up to size / B steps old: they only choose the negatives, whose ITM pass is
    computed afresh). In the quick start (batch 8) it lifts val R@1 from ~51% to ~78% (docs/notes.md)."""

    def __init__(self, size):
        self.size, self.buffers, self.filled, self.next = size, None, 0, 0

    @property
    def items(self):  # the filled rows (views), or None while empty
        return None if self.filled == 0 else {k: v[:self.filled] for k, v in self.buffers.items()}

    @torch.no_grad()
    def push(self, **batch):
        """Write the batch over the oldest rows: a ring buffer, so that the rest is not copied every step."""
        batch = {k: v.detach()[-self.size:] for k, v in batch.items()}
        if self.buffers is None:
            self.buffers = {k: v.new_zeros(self.size, *v.shape[1:]) for k, v in batch.items()}
        for k in ("input_ids", "attention_mask"):  # texts of another length: pad the shorter side
            if batch[k].size(1) != self.buffers[k].size(1):
                self.buffers[k], batch[k] = pad_cat(self.buffers[k], batch[k]).split([self.size, len(batch[k])])
        ids = batch["image_ids"]
        rows = (self.next + torch.arange(len(ids), device=ids.device)) % self.size
        for k, v in batch.items():
            self.buffers[k][rows] = v
        self.next, self.filled = (self.next + len(rows)) % self.size, min(self.size, self.filled + len(rows))

    def state_dict(self):
        return {"next": self.next, "items": {k: v.cpu() for k, v in (self.items or {}).items()}}

    def load_state_dict(self, state, device=None):
        self.buffers, self.filled, self.next = None, 0, 0
        if state["items"]:  # the saved rows back into rows 0.., then the write position as it was
            self.push(**{k: v.to(device) for k, v in state["items"].items()})
            self.next = state["next"]


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def row_counts(n, device):
    """Every rank's number of rows, given this rank's n; they differ when unreadable images were dropped."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


def rank_rows(n, device):
    """The indices of this rank's n rows in a batch gathered over ranks (`gather`): after the rows of lower ranks."""
    start = sum(row_counts(n, device)[:dist.get_rank()]) if _distributed() else 0
    return torch.arange(start, start + n, device=device)


class GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and keeps this rank's rows (LAVIS GatherLayer). torch's
    distributed.nn all_gather gives wrong gradients on gloo for one that arrives non-contiguous (einsum's; 2.13)."""

    @staticmethod
    def forward(ctx, t):
        sizes, rank = row_counts(t.size(0), t.device), dist.get_rank()
        padded = torch.cat([t, t.new_zeros(max(sizes) - t.size(0), *t.shape[1:])])  # all_gather needs equal sizes
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))  # this rank's, kept for the backward
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather(t):
    """Concatenate `t` over all ranks along dim 0; its gradient (if it has one) flows back to the rank of each row."""
    return GatherLayer.apply(t) if _distributed() else t
