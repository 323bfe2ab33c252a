"""
Speed and memory of stage-1 training steps, as train_stage1.py takes them: forward with loss_itc + loss_itm + loss_itg,
backward, gradient clipping, AdamW step; the ViT frozen (eval, requires_grad False). Random weights, images, captions.

    python bench/train_stage1.py               # CPU, fp32; a few minutes on 2 cores
    python bench/train_stage1.py --threads=1   # on a shared machine, where 2 OpenMP threads stall each other
    python bench/train_stage1.py --gpu         # adds ViT-g + Q-Former-base on CUDA: bf16, eager vs compiled

  tiny  : 4-layer 192-wide ViT at 64 px (patch 8), 4-layer 192-wide Q-Former, 16 queries, vocab 1000, batch 32
  small : 12-layer 384-wide ViT at 224 px (patch 14), 6-layer 768-wide Q-Former, 32 queries, vocab 30523, batch 8
  s/step    : the best of `steps` timed steps after `warmup` untimed ones (the machine may be shared)
  ViT share : the frozen ViT's forward alone (no_grad, same batch, timed the same way) over s/step
  peak RSS  : the process's peak resident memory (VmHWM, reset before each config), imports included
--gpu (only with CUDA): the paper's stage-1 model (ViT stored in bf16), batch gpu_batch, with and without torch.compile;
peak memory is torch.cuda.max_memory_allocated. Compilation happens in the warm-up steps and is not timed.
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanoblip2 import qformer as qf  # noqa: E402
from nanoblip2 import vit as vt  # noqa: E402
from nanoblip2.stage1 import Blip2Stage1, Stage1Config  # noqa: E402
from nanoblip2.cli import parse_args  # noqa: E402

ROWS = {  # name: (ViT, Q-Former, batch)
    "tiny": (vt.ViTConfig(image_size=64, patch_size=8, width=192, depth=4, heads=3, mlp=768, source_image_size=64),
             qf.QFormerConfig(width=192, depth=4, heads=3, mlp=768, vision_width=192, num_query_tokens=16,
                              vocab_size=1000), 32),
    "small": (vt.ViTConfig(image_size=224, patch_size=14, width=384, depth=12, heads=6, mlp=1536),
              qf.QFormerConfig(width=768, depth=6, heads=12, mlp=3072, vision_width=384, num_query_tokens=32), 8),
}


@dataclass
class BenchConfig:
    warmup: int = 1
    steps: int = 2
    max_txt_len: int = 32
    threads: int = 0         # torch.set_num_threads; 0 = torch's default. On a busy machine 1 avoids OpenMP stalls
    gpu: bool = False        # also run the ViT-g section (needs CUDA)
    gpu_batch: int = 32
    gpu_warmup: int = 2      # the first compiled step compiles
    gpu_steps: int = 5


def build(vit, qformer, device="cpu"):
    """A random stage-1 model set up as train_stage1.py does: ViT frozen for good, AdamW on the rest."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2Stage1(Stage1Config(vit=vit, qformer=qformer, dec_id=qformer.vocab_size - 1)).train()
    model.vit.requires_grad_(False).eval()
    model.vit.train = lambda mode=True: model.vit
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), fused=device == "cuda")
    return model, optimizer, params


def random_batch(vit, qformer, B, T, device="cpu"):  # pixels (B, 3, S, S); ids, mask (B, T): [CLS] + random ids
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1), generator=g)).long()
    ids = torch.randint(1, qformer.vocab_size - 1, (B, T), generator=g)
    ids[:, 0] = 101
    px = torch.randn(B, 3, vit.image_size, vit.image_size, generator=g)
    return [t.to(device) for t in (px, ids * mask, mask)]


def timed(fn, warmup, steps):  # seconds: the best of `steps` calls after `warmup` untimed ones
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[warmup:])


def train_step(model, optimizer, params, batch, autocast, generator):
    with autocast:
        out = model(*batch, generator=generator)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rss_mb(field):  # VmRSS: resident now; VmHWM: the peak since the last reset
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def cpu(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32, "
          f"{cfg.warmup} warm-up + best of {cfg.steps} steps, RSS after the imports {rss_mb('VmRSS'):.0f} MB")
    print("| config | params (trainable / frozen) | batch | s/step | img/s | ViT share | peak RSS |")
    print("|--------|-----------------------------|-------|--------|-------|-----------|----------|")
    off = torch.autocast("cpu", enabled=False)
    for name, (vit, qformer, B) in ROWS.items():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        model, optimizer, params = build(vit, qformer)
        batch = random_batch(vit, qformer, B, cfg.max_txt_len)
        negatives = torch.Generator().manual_seed(0)
        step = timed(lambda: train_step(model, optimizer, params, batch, off, negatives), cfg.warmup, cfg.steps)
        with torch.no_grad():
            vit_s = timed(lambda: model.vit(batch[0]), cfg.warmup, cfg.steps)
        n = f"{sum(p.numel() for p in params) / 1e6:.1f}M / {sum(p.numel() for p in model.vit.parameters()) / 1e6:.1f}M"
        print(f"| {name:<6} | {n:>27} | {B:>5} | {step:>6.2f} | "
              f"{B / step:>5.1f} | {vit_s / step:>9.0%} | {rss_mb('VmHWM'):>5.0f} MB |")
        del model, optimizer, params


def gpu(cfg):
    if not torch.cuda.is_available():
        print("--gpu: needs CUDA; skipped")
        return
    vit, qformer, B = vt.PRESETS["eva-vit-g"], qf.PRESETS["qformer-stage1"], cfg.gpu_batch
    print(f"\n{torch.cuda.get_device_name()}: EVA ViT-g (bf16) + Q-Former-base, bf16 autocast, batch {B}, "
          f"{cfg.gpu_warmup} warm-up + best of {cfg.gpu_steps} steps")
    print("| mode     | s/step | img/s | peak memory |")
    print("|----------|--------|-------|-------------|")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for compile in (False, True):
        model, optimizer, params = build(vit, qformer, "cuda")
        model.vit.to(torch.bfloat16)
        fwd = torch.compile(model) if compile else model
        batch = random_batch(vit, qformer, B, cfg.max_txt_len, "cuda")
        negatives = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        step = timed(lambda: train_step(fwd, optimizer, params, batch, autocast, negatives), cfg.gpu_warmup,
                     cfg.gpu_steps)
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(f"| {'compiled' if compile else 'eager':<8} | {step:>6.3f} | {B / step:>5.0f} | {mem:>8.1f} GiB |")
        del model, fwd, optimizer, params
        torch.cuda.empty_cache()


if __name__ == "__main__":
    cfg = parse_args(BenchConfig(), doc=__doc__)
    cpu(cfg)
    if cfg.gpu:
        gpu(cfg)
