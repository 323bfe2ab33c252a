"""
The paper-size models on one CUDA GPU, random weights, in one run of at most ~8 minutes:

    python bench/gpu.py                       # CUDA: prints one markdown table, writes bench/gpu.json (--out)
    python bench/gpu.py --parts=caption       # one part again (stage1, stage2, caption, flant5)
    python bench/gpu.py --tiny --out=x.json   # every code path below with tiny configs on the CPU, in seconds

  stage1  : EVA ViT-g (frozen, stored in bf16) + the BERT-base Q-Former, a step as train_stage1.py takes it
            (training.train_step: loss_itc + loss_itm + loss_itg, backward, clip, AdamW; ITM's negatives from the
            batch and a full NegativePool), bf16 autocast, eager and torch.compile, at the largest batch up to `batch`
            that fits (halved on out-of-memory). MFU: the step's FLOPs (FlopCounterMode, counted once, eager) / step
            time / the GPU's peak dense bf16 FLOP/s (PEAK_BF16; "?" for another GPU).
  stage2  : the stage-2 Q-Former before a frozen OPT-2.7B-shaped LM (bf16), LM loss, eager.
  caption : a BLIP-2 OPT-2.7B built by transformers in bf16 (its random init, the LM's layer matrices x5), saved once
            and loaded by Blip2: greedy and beam 5, `new_tokens` tokens, batch 1, both sides, ids compared (bf16
            rounding may make them drift apart).
  flant5  : a BLIP-2 FlanT5-XL in bf16: one forward and a short generate; its logits must be finite.
Times: the best of `steps` (training) or `repeats` (captions) after `warmup` untimed calls (one for captions); the
first compiled step compiles. Each part runs on its own: one that fails records its error and the others still run.

--tiny runs the same code on the CPU in fp32 (train_step autocasts on CUDA only), one thread; torch.compile uses the
"aot_eager" backend there (inductor's first step took 2.5 minutes on 2 cores), and torch._dynamo.explain counts the
compiled stage-1 step's graph breaks: none. (Dynamo cannot put a torch.Generator in a graph, so a compiled step draws
ITM's negatives from the global random state, as train_stage1.py does with --compile.)
"""
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from bench.train_stage1 import random_batch  # noqa: E402
from nanoblip2 import opt as op, qformer as qf, t5 as t5m, vit as vt  # noqa: E402
from nanoblip2.cli import parse_args  # noqa: E402
from nanoblip2.stage1 import Blip2Stage1, Stage1Config  # noqa: E402
from nanoblip2.stage2 import Blip2, Blip2Config  # noqa: E402
from nanoblip2.training import NegativePool, adamw, freeze, train_step  # noqa: E402

PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L40", 181e12), ("L4", 121e12), ("B200", 2250e12))  # dense bf16 FLOP/s; the first name in the device's


@dataclass
class BenchConfig:
    tiny: bool = False          # tiny configs on the CPU: every code path in seconds
    out: str = "bench/gpu.json"
    batch: int = 128            # stage 1: the largest that fits, from here down by halving
    stage2_batch: int = 64      # the same for stage 2 (config/stage2_coco_opt2.7b.json's per-GPU batch)
    itm_pool: int = 1024        # train_stage1.py's default; 0: the batch's negatives only (LAVIS, the COCO config)
    warmup: int = 2
    steps: int = 5
    repeats: int = 3
    new_tokens: int = 30
    parts: str = "stage1,stage2,caption,flant5"  # which to run, e.g. --parts=caption to run one again


def sizes(tiny):
    """Our configs and transformers' (the caption model) at paper size, or tiny ones of the same structure."""
    if not tiny:
        return dict(vit=vt.PRESETS["eva-vit-g"], qformer=qf.PRESETS["qformer-stage1"], opt=op.PRESETS["opt-2.7b"],
                    t5=t5m.PRESETS["flan-t5-xl"], T=32, hf_vision={}, hf_qformer={}, image_token=50265,
                    hf_opt=dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32))
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    vit = vt.ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp=128, source_image_size=32)
    return dict(vit=vit,
                qformer=qf.QFormerConfig(width=64, depth=2, heads=2, mlp=128, vision_width=64, num_query_tokens=4,
                                         vocab_size=128, max_positions=64),
                opt=op.OPTConfig(vocab_size=128, width=64, depth=2, heads=2, ffn_dim=128, max_positions=128),
                t5=t5m.T5Config(vocab_size=128, d_model=64, d_kv=32, d_ff=128, heads=2, enc_depth=2, dec_depth=2),
                T=8, hf_vision=small | dict(image_size=32, patch_size=8), hf_qformer=small, image_token=306,
                hf_opt=dict(vocab_size=307, hidden_size=64, num_hidden_layers=4, ffn_dim=128, num_attention_heads=2,
                            max_position_embeddings=128))


class Repeat:
    """training.Stream's interface over one batch on the device, each time under new image ids, as new images."""

    def __init__(self, batch):
        self.batch, self.n, self.B = batch, 0, len(batch["pixel_values"])

    def next(self):
        self.n += 1
        return self.batch | {"index": torch.arange(self.B, device=self.batch["pixel_values"].device) + self.B * self.n}


def best(fn, warmup, n):
    """-> (the best of n timed calls after `warmup` untimed ones, the first call's time, the last result)"""
    times = []
    for _ in range(warmup + n):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[warmup:]), times[0], out


def free(reset_peak=False):  # what the last part or try left behind; then the peak memory counts from here
    torch._dynamo.reset()  # compiled graphs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def fit(B, attempt, optimizer):
    """attempt(B) at B, B / 2, ... until one fits in GPU memory (what the failed one held is freed). -> (B, result)"""
    while True:
        try:
            return B, attempt(B)
        except torch.cuda.OutOfMemoryError:
            if B == 1:
                raise
        optimizer.zero_grad(set_to_none=True)
        B //= 2
        free()


def stage1(cfg, S, tc, out, rows):
    vit, qformer = S["vit"], S["qformer"]
    torch.manual_seed(0)
    with torch.device(tc.device):
        model = Blip2Stage1(Stage1Config(vit=vit, qformer=qformer, dec_id=qformer.vocab_size - 1)).train()
    freeze(model.vit, tc)  # stored in bf16 on CUDA, as train_stage1.py does
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, tc)
    pool = NegativePool(cfg.itm_pool) if cfg.itm_pool > 0 else None
    negatives = torch.Generator(device=tc.device).manual_seed(0)

    def forward(m, b):  # train_stage1.py's: compiled, the negatives come from the global random state
        return m(b["pixel_values"], b["input_ids"], b["attention_mask"], image_ids=b["index"],
                 generator=negatives if m is model else None, candidates=None if pool is None else pool.items)

    def attempt(B):  # eager steps until the pool is full: from then on every step has the same shapes
        px, ids, mask = random_batch(vit, qformer, B, S["T"], tc.device)
        stream = Repeat(dict(pixel_values=px, input_ids=ids, attention_mask=mask))
        step = lambda m: train_step(m, optimizer, params, stream, tc, 1e-4, forward, pool)
        while True:
            step(model)
            if pool is None or pool.filled == pool.size:
                return stream, step

    B, (stream, step) = fit(cfg.batch, attempt, optimizer)
    with FlopCounterMode(display=False) as counter:
        step(model)
    flops = counter.get_total_flops()
    out |= dict(batch=B, flops_per_step=flops, trainable_m=sum(p.numel() for p in params) / 1e6)
    for name in ("eager", "compiled"):
        free(reset_peak=True)
        m = model if name == "eager" else torch.compile(model, backend="inductor" if tc.cuda else "aot_eager")
        s, first, _ = best(lambda: step(m), cfg.warmup, cfg.steps)
        out[name] = r = dict(step_s=s, first_s=first, images_per_s=B / s, peak_gib=peak_gib(),
                             mfu=flops / s / tc.peak if tc.peak else None)
        note = f"first step (compiles) {first:.1f} s" if name == "compiled" else ""
        mfu = "?" if r["mfu"] is None else f"{r['mfu']:.0%}"
        rows.append([f"stage-1 step, {name}", B, s, B / s, r["peak_gib"], mfu, note])
    if cfg.tiny:  # explain traces the forward once more, without compiling: cheap at tiny size only
        b = stream.next()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(b["pixel_values"], b["input_ids"], b["attention_mask"],  # as compiled
                                                 image_ids=b["index"],
                                                 candidates=None if pool is None else pool.items)
        out["graph_breaks"] = explained.graph_break_count
        out["break_reasons"] = sorted({r.reason.splitlines()[0] for r in explained.break_reasons})
        rows[-1][-1] += f", graph breaks {explained.graph_break_count}"


def stage2(cfg, S, tc, out, rows):
    torch.manual_seed(0)
    lm, Q, T = S["opt"], S["qformer"].num_query_tokens, S["T"]
    with torch.device(tc.device):
        model = Blip2(Blip2Config(vit=S["vit"], qformer=replace(S["qformer"], text=False, lm_head=False), lm=lm))
    torch.nn.init.normal_(model.lm.embed_tokens.weight, std=0.02)  # OPT's; torch's N(0, 1), tied to the head: loss ~1e3
    freeze(model.vit, tc), freeze(model.lm, tc)  # stored in bf16 on CUDA, as train_stage2.py does
    params = [p for p in model.train().parameters() if p.requires_grad]
    optimizer = adamw(params, tc)

    def attempt(B):  # BOS + caption, right-padded; labels -100 on the queries and the padding, as data.opt_batch's
        g = torch.Generator().manual_seed(0)
        mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1), generator=g)).long()
        ids = torch.randint(4, lm.vocab_size, (B, T), generator=g).masked_fill(mask == 0, lm.pad_id)
        ids[:, 0] = lm.bos_id
        labels = torch.cat([torch.full((B, Q), -100), ids.masked_fill(mask == 0, -100)], 1)
        px = torch.randn(B, 3, S["vit"].image_size, S["vit"].image_size, generator=g)
        text = {k: v.to(tc.device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
        stream = Repeat(dict(pixel_values=px.to(tc.device), text=text))
        forward = lambda m, b: m(b["pixel_values"], b["text"])  # train_stage2.py's, on a made batch
        step = lambda: train_step(model, optimizer, params, stream, tc, 1e-4, forward)
        step()
        return step

    B, step = fit(cfg.stage2_batch, attempt, optimizer)
    free(reset_peak=True)
    s, _, (result, _) = best(step, cfg.warmup, cfg.steps)
    out |= dict(batch=B, step_s=s, images_per_s=B / s, peak_gib=peak_gib(), loss=result["loss"].item(),
                trainable_m=sum(p.numel() for p in params) / 1e6,
                lm_m=sum(p.numel() for p in model.lm.parameters()) / 1e6)
    rows.append(["stage-2 step, eager", B, s, B / s, out["peak_gib"], "", f"loss {out['loss']:.2f}"])


def caption(cfg, S, tc, out, rows):
    from conftest import opt_tokenizer_json
    from transformers import Blip2Config as HFBlip2Config, Blip2ForConditionalGeneration, OPTConfig
    N, Q, dtype = cfg.new_tokens, S["qformer"].num_query_tokens, tc.model_dtype
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        newline = opt_tokenizer_json(Path(folder)).token_to_id("Ċ")  # generation needs only ids: a tiny tokenizer
        text = OPTConfig(**S["hf_opt"], eos_token_id=newline)  # the end token both sides hold back (min_new_tokens)
        hf_cfg = HFBlip2Config(vision_config=S["hf_vision"], qformer_config=S["hf_qformer"], text_config=text,
                               num_query_tokens=Q, image_token_index=S["image_token"])
        torch.manual_seed(0)
        with torch.device(tc.device):
            hf = Blip2ForConditionalGeneration._from_config(hf_cfg, dtype=dtype).eval()
        with torch.no_grad():  # at HF's std 0.02 each new token repeats the last one: ids that tell nothing apart
            for key, p in hf.language_model.named_parameters():
                if ".layers." in key and p.ndim == 2:
                    p.mul_(5)
        hf.save_pretrained(folder)
        ours = Blip2.from_pretrained(folder, device=tc.device, dtype=dtype)
    out["build_save_load_s"] = time.perf_counter() - t
    px = torch.randn(1, 3, S["vit"].image_size, S["vit"].image_size, generator=torch.Generator().manual_seed(1))
    px, bos = px.to(tc.device, dtype), ours.cfg.lm.bos_id
    slots = torch.tensor([[S["image_token"]] * Q + [bos]], device=tc.device)  # transformers': the queries' slots, BOS
    search = dict(max_new_tokens=N, min_new_tokens=N)
    sides = {"nanoblip2": lambda beams: ours.generate(px, slots[:, -1:], num_beams=beams, **search),
             "transformers": lambda beams: hf.generate(pixel_values=px, input_ids=slots, num_beams=beams,
                                                       do_sample=False, **search)[:, -N:]}
    for row, beams in (("greedy", 1), ("beam 5", 5)):
        ids = {}
        for side, run in sides.items():
            s, _, result = best(lambda: run(beams), 1, cfg.repeats)
            out[f"{row}, {side}"], ids[side] = dict(s=s, tokens_per_s=N / s), result[0].tolist()
        a, b = ids.values()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)  # both have N tokens
        out[f"{row}, ids"] = dict(same_ids=a == b, first_difference=first, nanoblip2=a, transformers=b)
        note = "same ids: yes" if a == b else f"same ids: no, first difference at token {first}"
        rows += [[f"caption {row}, {side}", 1, out[f"{row}, {side}"]["s"], "", "", "", note] for side in sides]


def flan_t5(cfg, S, tc, out, rows):
    torch.manual_seed(0)
    lm, g, size = S["t5"], torch.Generator().manual_seed(0), S["vit"].image_size
    with torch.device(tc.device):
        model = Blip2(Blip2Config(vit=S["vit"], qformer=replace(S["qformer"], text=False, lm_head=False), lm=lm))
    model = model.to(tc.model_dtype).eval()
    px = torch.randn(2, 3, size, size, generator=g).to(tc.device, tc.model_dtype)
    ids, dec = (torch.randint(3, lm.vocab_size, (2, n), generator=g).to(tc.device) for n in (8, 6))
    ids[:, -1], dec[:, 0] = lm.eos_id, lm.decoder_start_id  # prompt + </s>; the decoder from its start token
    t = time.perf_counter()
    with torch.no_grad():  # the encoder over [queries; prompt], the decoder over 6 tokens: every logit
        embeds, mask = model.lm_inputs(px, ids, torch.ones_like(ids))
        logits, _ = model.lm.decode(dec, model.lm.encode(inputs_embeds=embeds, attention_mask=mask), mask)
    new = model.generate(px, ids, max_new_tokens=5)
    s = time.perf_counter() - t
    out |= dict(s=s, logits_finite=bool(torch.isfinite(logits).all()), logits_absmax=logits.abs().max().item(),
                new_ids=new.tolist())
    rows.append(["FlanT5-XL forward + generate", 2, s, "", "", "", f"logits finite: {out['logits_finite']}"])
    assert out["logits_finite"], "non-finite FlanT5 logits"


def markdown(rows):
    cell = lambda v: "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)
    head = ["row", "batch", "s", "img/s", "peak GiB", "MFU", "notes"]
    return "\n".join("| " + " | ".join(cell(v) for v in r) + " |" for r in [head, ["---"] * len(head)] + rows)


def main(cfg):
    cuda = torch.cuda.is_available() and not cfg.tiny
    if not cuda and not cfg.tiny:
        raise SystemExit("error: bench/gpu.py needs CUDA; --tiny runs its code paths on the CPU")
    if cfg.tiny:  # one thread: tiny ops gain nothing from more, and on a shared machine two stall each other
        torch.set_num_threads(1)
        cfg = replace(cfg, batch=min(cfg.batch, 4), stage2_batch=min(cfg.stage2_batch, 4),
                      itm_pool=min(cfg.itm_pool, 8), warmup=1, steps=1, repeats=1, new_tokens=min(cfg.new_tokens, 5))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((f for key, f in PEAK_BF16 if key in name), None) if cuda else None
    tc = SimpleNamespace(device="cuda" if cuda else "cpu", cuda=cuda, dtype="bfloat16", grad_accum=1, grad_clip=1.0,
                         lr=1e-4, weight_decay=0.05, beta1=0.9, beta2=0.98, peak=peak,  # train_stage*.py's fields
                         model_dtype=torch.bfloat16 if cuda else torch.float32)
    S, t0, results, rows = sizes(cfg.tiny), time.time(), {}, []
    meta = dict(device=name, torch=torch.__version__, peak_bf16_flops=peak, tiny=cfg.tiny)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    parts = dict(stage1=("stage-1 step", stage1), stage2=("stage-2 step", stage2), caption=("caption", caption),
                 flant5=("FlanT5-XL", flan_t5))
    unknown = set(cfg.parts.split(",")) - set(parts)
    if unknown:
        raise SystemExit(f"error: --parts: {', '.join(sorted(unknown))} not among {', '.join(parts)}")
    for part, fn in (parts[key] for key in cfg.parts.split(",")):
        t = time.time()
        results[part] = out = {}
        try:
            fn(cfg, S, tc, out, rows)
        except Exception as e:  # recorded; the other parts still run
            traceback.print_exc()
            out["error"] = f"{type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:300]}"
            rows.append([part, "", "", "", "", "", f"error: {out['error']}"])
        out["wall_s"] = time.time() - t
        free()
        meta["wall_s"] = time.time() - t0
        with open(cfg.out, "w") as f:  # after every part: a run cut short keeps what it measured
            json.dump(meta | results, f, indent=1)
    print(f"\n{name}, torch {torch.__version__}, {'tiny configs, fp32' if cfg.tiny else 'bf16'}, best of {cfg.steps} "
          f"steps / {cfg.repeats} captions; wall time {meta['wall_s']:.0f} s")
    print(markdown(rows))
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main(parse_args(BenchConfig(), doc=__doc__))
