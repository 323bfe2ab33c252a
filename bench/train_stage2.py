"""
Speed and memory of one stage-2 training step (paper §3.3): nanoblip2 vs transformers, same weights, same run.

    python bench/train_stage2.py                # CPU, fp32, one thread per core; 2.5 to 10 minutes on 2 shared cores
    python bench/train_stage2.py --threads=1    # about 3 minutes, and steady on a shared machine (see below)

The model is bench/generate.py's small random BLIP-2 (12-layer 384-wide ViT at 224 px, 6-layer Q-Former, 32 queries,
OPT-125m-shaped LM). A step, as train_stage2.py takes it: LM loss on the captions (no prompt), backward through the
frozen LLM into the Q-Former, AdamW on the trainable parts (Q-Former, query tokens, ln_vision, language_projection).
The ViT and the LLM are frozen (requires_grad False, eval); the Q-Former's dropout is on, on both sides.
  step, batch B : best of `repeats` steps after a warm-up, the two sides alternating so that noise hits both alike
  peak RSS      : each side in a process of its own: VmHWM over the RSS after the imports, through loading and two
                  batch-8 steps (the second one has the AdamW state too)
  loss          : batch 8, Q-Former dropout off, before any step; HF reads input_ids = [image token] * 32 + text
With 2 threads on 2 cores, a step slows up to 10x (in CPU time too) whenever another process takes a core: the
threads wait for each other at every op. One thread is slower when the machine is idle but steady when it is not.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.generate import build, rss_mb  # noqa: E402
from nanoblip2.data import opt_batch  # noqa: E402
from nanoblip2.cli import parse_args  # noqa: E402
from nanoblip2.tokenizer import load_opt_tokenizer  # noqa: E402

SIDES = ("nanoblip2", "transformers")
CAPTIONS = ["a dog on the beach", "a boat on a lake", "a bird in a tree", "a man on a horse",  # 9 to 15 tokens
            "children playing soccer", "a cat on a boat", "a horse on a hill", "a cat on a mat"]  # with BOS and "\n"
Q, IMAGE_TOKEN = 32, 50265


@dataclass
class BenchConfig:
    repeats: int = 5  # timed steps per side and batch size, after one warm-up step
    threads: int = 0  # torch threads for the timing; 0: torch's default (one per core)


def setup(side, folder):
    """(model, optimizer, params, loss(pixels, batch)): ViT and LLM frozen, AdamW on the rest, decay on matrices."""
    if side == "nanoblip2":
        from nanoblip2 import Blip2
        from nanoblip2.training import freeze
        model = Blip2.from_pretrained(folder).train()
        freeze(model.vit), freeze(model.lm)
        loss = lambda px, b: model(px, b)["loss"]
    else:
        from transformers import Blip2ForConditionalGeneration
        model = Blip2ForConditionalGeneration.from_pretrained(folder).train()
        model.vision_model.requires_grad_(False).eval()
        model.vision_model.post_layernorm.requires_grad_(True)  # HF's ln_vision lives inside its vision model
        model.language_model.requires_grad_(False).eval()

        def loss(px, b):  # labels over queries + text (-100 on the queries): HF then slices no logits off, and its
            B = px.size(0)  # loss path works (text-only labels fail in 5.24: .view on a non-contiguous slice)
            ids = torch.cat([torch.full((B, Q), IMAGE_TOKEN), b["input_ids"]], 1)
            mask = torch.cat([torch.ones(B, Q, dtype=torch.long), b["attention_mask"]], 1)
            return model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=b["labels"]).loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.98), fused=True)  # train_stage2's and HF Trainer's
    return model, optimizer, params, loss


def inputs(folder, B):  # pixels (B, 3, 224, 224), opt_batch (labels (B, Q + T))
    b = opt_batch(load_opt_tokenizer(folder), CAPTIONS[:B], prompt="", max_length=32, num_queries=Q)
    return torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1)), b


def step(side, px, b):
    _, optimizer, _, loss = side
    loss(px, b).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory(name, folder):
    from nanoblip2 import Blip2  # noqa: F401  (both sides pay for both imports)
    from transformers import Blip2ForConditionalGeneration  # noqa: F401
    base = rss_mb("VmRSS")
    side, batch = setup(name, folder), inputs(folder, 8)
    step(side, *batch), step(side, *batch)
    print(json.dumps({"peak_rss_mb": rss_mb("VmHWM") - base, "trainable_m": sum(p.numel() for p in side[2]) / 1e6}))


def speed(folder, repeats):
    sides, result = {name: setup(name, folder) for name in SIDES}, {"loss": {}}
    for name, (model, _, _, loss) in sides.items():  # dropout off: the two losses must agree
        model.qformer.eval()
        with torch.no_grad():
            result["loss"][name] = loss(*inputs(folder, 8)).item()
        model.qformer.train()
    torch.manual_seed(0)
    for B in (2, 8):
        batch, times = inputs(folder, B), {name: [] for name in SIDES}
        for _ in range(repeats + 1):  # the first round warms up (and allocates the AdamW state)
            for name in SIDES:
                t = time.perf_counter()
                step(sides[name], *batch)
                times[name].append(time.perf_counter() - t)
        result[B] = {name: min(times[name][1:]) for name in SIDES}
    return result


def main(cfg):
    t0 = time.time()
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        mem = {}
        for name in SIDES:  # one after the other, so that each has the machine to itself
            p = subprocess.run([sys.executable, __file__, name, folder], capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(p.stderr)
            mem[name] = json.loads(p.stdout.strip().splitlines()[-1])
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        res = speed(folder, cfg.repeats)
        tokens = inputs(folder, 8)[1]["attention_mask"].sum(1).float().mean()
    ours, hf = mem["nanoblip2"], mem["transformers"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32, trainable "
          f"{ours['trainable_m']:.1f}M / {hf['trainable_m']:.1f}M, captions {tokens:.1f} tokens, best of {cfg.repeats}")
    print(f"| {'row':<22} | {'nanoblip2':>10} | {'transformers':>12} | {'speed-up':>8} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 14}|{'-' * 10}|")
    for B in (2, 8):
        a, b = res[B]["nanoblip2"], res[B]["transformers"]
        print(f"| {f'train step, batch {B}':<22} | {a:>9.3f}s | {b:>11.3f}s | {b / a:>7.2f}x |")
    a, b = ours["peak_rss_mb"], hf["peak_rss_mb"]
    print(f"| {'RSS added, peak':<22} | {a:>7.0f} MB | {b:>9.0f} MB | {b / a:>7.2f}x |")
    a, b = res["loss"]["nanoblip2"], res["loss"]["transformers"]
    print(f"| {'loss b8; |diff| last':<22} | {a:>10.6f} | {b:>12.6f} | {abs(a - b):>8.1e} |")
    print(f"wall time {time.time() - t0:.0f} s")
    if abs(a - b) > 1e-4:
        raise SystemExit("the two losses disagree by more than 1e-4: the two sides do not compute the same thing")


if __name__ == "__main__":
    memory(*sys.argv[1:3]) if sys.argv[1:2] and sys.argv[1] in SIDES else main(parse_args(BenchConfig(), doc=__doc__))
