"""
What train_stage1.py and train_stage2.py share: processes, the learning-rate schedule, parameter groups, the data
stream with exact resume, and random states. The loops themselves stay in the scripts, top to bottom.

Notable details
- Exact resume: the order of samples is a seeded permutation per epoch, each sample's augmentation is seeded by
  (seed, epoch, index) (CaptionDataset), the DataLoader draws from its own generator, and the random states of
  dropout and of the ITM negatives are saved per rank. The next step after a resume equals the uninterrupted one.
- Frozen parts are put in eval mode for good: `freeze` also makes their .train() a no-op (LAVIS disabled_train).
"""
import functools
import json
import math
import os

import torch
import torch.distributed as dist

from .data import collate


def setup(cfg):
    """Single process, or one of torchrun's. Returns (ddp, rank, world); sets cfg.device to this rank's GPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    return True, dist.get_rank(), dist.get_world_size()


def autocast(cfg):
    """bf16 (or cfg.dtype) autocast on CUDA; nothing on the CPU, where training runs in fp32."""
    if cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
    return torch.autocast("cpu", enabled=False)


def freeze(module):
    """No gradients, eval mode (no dropout), and .train() can no longer undo it."""
    module.requires_grad_(False)
    module.eval()
    module.train = lambda mode=True: module
    return module


def get_lr(step, cfg):
    """Linear warm-up from warmup_lr to lr, then cosine down to min_lr at lr_decay_steps (default max_steps)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    end = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def adamw(params, cfg):
    """AdamW; no weight decay on biases, norms and 0-dim parameters such as temp (LAVIS decays temp, we do not).
    Fused (one kernel per step instead of one per operation) on CUDA and the CPU, as HF's Trainer defaults to."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = cfg.device.split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


class Stream:
    """Batches forever, epoch after epoch, from (epoch, batch_in_epoch) on; counts and reports unreadable images."""

    def __init__(self, dataset, tokenizer, cfg, rank, world, epoch=0, batch_in_epoch=0, padding="max_length",
                 verbose=True):  # tokenizer None: the captions stay text
        self.dataset, self.cfg, self.rank, self.world, self.verbose = dataset, cfg, rank, world, verbose
        # fixed-length text by default, so that every rank gathers the same shapes for ITC/ITM
        self.collate = functools.partial(collate, tokenizer=tokenizer, max_length=cfg.max_txt_len, padding=padding)
        self.epoch, self.batch_in_epoch, self.skipped = epoch, batch_in_epoch, 0
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
            try:
                b = next(self.it)
                self.batch_in_epoch += 1
            except StopIteration:
                if self.verbose and self.skipped:
                    print(f"epoch {self.epoch}: skipped {self.skipped} unreadable image(s)")
                self.epoch, self.batch_in_epoch, self.skipped = self.epoch + 1, 0, 0
                self.it = self._loader()
                continue
            self.skipped += b["skipped"]
            if len(b["index"]):  # a batch of nothing but unreadable images is passed over
                return {k: v.to(self.cfg.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


def random_states(generator, ddp, world, pool=None):
    """The random state of dropout and of `generator`, and the NegativePool's samples (stage 1), of every rank (a
    list each), for a checkpoint."""
    mine = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if pool is not None:
        mine["pool"] = pool.state_dict()
    states = {k: [v] for k, v in mine.items()}
    if ddp:
        states = {k: [None] * world for k in mine}
        for k, v in mine.items():
            dist.all_gather_object(states[k], v)
    return states


def resume(folder, optimizer, generator, rank, pool=None):
    """Restore the optimiser and this rank's random states (and NegativePool) from a checkpoint folder; returns
    (step, epoch, batch_in_epoch), where the run continues."""
    state = torch.load(os.path.join(folder, "optim.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"][rank])
    generator.set_state(state["rng"]["generator"][rank])
    if pool is not None and "pool" in state["rng"]:
        pool.load_state_dict(state["rng"]["pool"][rank], device=generator.device)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return meta["step"], meta["epoch"], meta["batch_in_epoch"]
