"""
Generation at the real sizes of BLIP-2 OPT-2.7B and BLIP-2 FlanT5-XL: nanoblip2 vs transformers on the CPU, same
random weights, one image, 20 new tokens.

    python bench/realsize.py                 # 4 rows: about 11 minutes on 2 busy cores, 20 GB of RAM, 16 GB of disk
    python bench/realsize.py --small         # the same structure with 2 layers a stack: about 1.5 minutes, 3 GB
    python bench/realsize.py --rows=opt-fp32-greedy,t5-fp32-greedy --dir=/data/rs --keep --out=rs.json

Each model is written once per run as an HF Blip2ForConditionalGeneration folder, the shapes of Salesforce's uploads:
EVA ViT-g (39 layers, width 1408, 224 px), Q-Former (12 layers, 32 queries), OPT-2.7B (3.74B params) or FlanT5-XL
(3.94B), stored fp32 in ~2 GB shards with model.safetensors.index.json. It is written fast, without any model init:
our model's key list on the meta device, each tensor drawn from N(0, 0.02) with a seeded generator (norm weights 1)
and mapped to HF's names by our export tables. The tokenizer is a tiny one: generation needs only ids, and the
prompts hold only the image placeholder (image_token_index 50265 / 32100, as HF's) and BOS (OPT) or </s> (T5).
They go under --dir (default: a temp dir), one at a time, each removed after its rows unless --keep (then a rerun
of the same depth reuses them). Peak RSS at full size: 14-15 GiB in fp32; in bf16 7.4-7.9 GiB for nanoblip2 and
18.6-19.8 GiB for transformers, whose RSS counts the pages of the fp32 files it maps while it casts.

Each row runs in a fresh process per side, nanoblip2 first, and reports:
  load s         : wall time of from_pretrained in that dtype (ours: Blip2.from_pretrained as sample.py loads, then
                   nanoblip2.linear.pack(model) where it exists). transformers maps the files and reads the pages on
                   first use, so part of its loading shows in the generation time instead.
  20 new tokens s: generate on one random 224 px image, min_new_tokens = max_new_tokens = 20, cold (--warmup runs a
                   2-token generation first)
  first token s  : measured inside that run: the time to the first decoding step (ours: the first call of lm.step,
                   transformers: the first call of a logits processor), i.e. ViT + Q-Former + LM prefill
  per token s    : (20 tokens - first token) / 19
  peak RSS GiB   : the process's VmHWM (imports, weights, activations)
  same ids       : whether both generated the same 20 ids, else the first position where they differ
"""
import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
ROWS = {  # name: (LM, dtype, beams)
    "opt-fp32-greedy": ("opt", "float32", 1), "opt-fp32-beam5": ("opt", "float32", 5),
    "opt-bf16-greedy": ("opt", "bfloat16", 1), "t5-bf16-greedy": ("t5", "bfloat16", 1),
    "t5-fp32-greedy": ("t5", "float32", 1),
}
DEFAULT_ROWS = "opt-fp32-greedy,opt-fp32-beam5,opt-bf16-greedy,t5-bf16-greedy"
NEW, IMAGE_TOKEN = 20, {"opt": 50265, "t5": 32100}  # the first free ids of HF's uploads (vocab 50272 / 32128)
SIDES = ("nanoblip2", "transformers")
SHARD = 2 * 2**30


def model_config(lm, depth=None):
    """Our Blip2Config at the real shapes; depth: layers per stack instead of the real ones (--small)."""
    import dataclasses
    from nanoblip2 import opt, qformer, t5, vit
    from nanoblip2.stage2 import Blip2Config
    d = (lambda real: real) if depth is None else (lambda real: depth)
    lm_cfg = (dataclasses.replace(t5.PRESETS["flan-t5-xl"], enc_depth=d(24), dec_depth=d(24)) if lm == "t5" else
              dataclasses.replace(opt.PRESETS["opt-2.7b"], depth=d(32)))
    return Blip2Config(vit=dataclasses.replace(vit.PRESETS["eva-vit-g"], depth=d(39)), lm=lm_cfg,
                       qformer=dataclasses.replace(qformer.PRESETS["qformer-stage2"], depth=d(12)),
                       ln_vision_eps=1e-6, image_token_index=IMAGE_TOKEN[lm])


def build(lm, folder, depth=None, seed=0):
    """Write a random HF BLIP-2 folder, shard by shard: at most ~2 shards in memory. Returns the parameter count."""
    from pathlib import Path
    from conftest import opt_tokenizer_json, t5_tokenizer_json
    from nanoblip2 import t5
    from nanoblip2.export import blip2_config, state_to_hf
    from nanoblip2.load import build_empty
    from nanoblip2.stage2 import Blip2
    from nanoblip2.tokenizer import load_opt_tokenizer
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    (t5_tokenizer_json if lm == "t5" else opt_tokenizer_json)(Path(folder))
    model = build_empty(Blip2, model_config(lm, depth), device="meta")  # shapes and names only
    if lm == "opt":  # the end token: "\n", as in Salesforce's configs
        model.end_id = load_opt_tokenizer(folder).newline_id
    config = blip2_config(model)
    table = Blip2.hf_keys(model.cfg)["table"]
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, t5.RMSNorm))}
    g = torch.Generator().manual_seed(seed)
    fill = lambda k, t: torch.ones(t.shape) if k in norms else torch.empty(t.shape).normal_(0, 0.02, generator=g)
    block = lambda item: re.match(r"(.*?\.\d+)\.|", item[0]).group(1) or item[0]  # EVA's q and v bias: one tensor
    shards, shard, weight_map, total = [], {}, {}, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for _, items in itertools.groupby(model.state_dict().items(), key=block):
        ours = {k: fill(k, t) for k, t in items}
        for name, t in state_to_hf(types.SimpleNamespace(state_dict=lambda d=ours: d), table).items():
            shard[name], total = t, total + t.nbytes
        if sum(t.nbytes for t in shard.values()) >= SHARD:
            flush()
    if shard:
        flush()
    final = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    for s in shards:
        os.replace(os.path.join(folder, s), os.path.join(folder, final[s]))
    index = dict(metadata=dict(total_size=total), weight_map={k: final[s] for k, s in sorted(weight_map.items())})
    text = config["text_config"]
    generation = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
                  if k in text}
    params = sum(t.numel() for t in model.parameters())
    for name, obj in (("model.safetensors.index.json", index), ("generation_config.json", generation),
                      ("config.json", config), ("realsize.json", dict(lm=lm, depth=depth, params=params))):
        with open(os.path.join(folder, name), "w") as f:  # realsize.json last: the folder is complete
            json.dump(obj, f, indent=2)
    return params


def rss_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def child(side, row, folder):
    """One side of one row, in a process of its own: prints its measurements as one JSON line."""
    import nanoblip2, transformers  # noqa: F401  (both sides pay for both imports)
    lm, dtype, beams = ROWS[row]
    dtype, first = getattr(torch, dtype), []
    px = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(dtype)
    search = lambda n: dict(max_new_tokens=n, min_new_tokens=n, num_beams=beams)  # exactly n new tokens
    t0 = time.perf_counter()
    if side == "nanoblip2":
        from nanoblip2 import Blip2, linear
        model = Blip2.from_pretrained(folder, dtype=dtype)
        if hasattr(linear, "pack"):  # bf16 Linear weights packed for CPU inference, where the code has it
            linear.pack(model)
        load_s, step = time.perf_counter() - t0, model.lm.step

        def timed_step(*a, **kw):  # the first step comes right after the prefill and the first token
            first.append(time.perf_counter())
            return step(*a, **kw)

        model.lm.step = timed_step
        run = lambda n: model.generate(px, **search(n))
    else:
        from transformers import Blip2ForConditionalGeneration, LogitsProcessor, LogitsProcessorList
        model, info = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        model.eval()
        load_s = time.perf_counter() - t0
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
            raise SystemExit(f"transformers did not load {folder} cleanly: {info}")

        class First(LogitsProcessor):  # called first with the logits of the prefill
            def __call__(self, input_ids, scores):
                first.append(time.perf_counter())
                return scores

        ids = torch.tensor([[IMAGE_TOKEN[lm]] * model.config.num_query_tokens + [1 if lm == "t5" else 2]])
        hooks = LogitsProcessorList([First()])
        run = lambda n: model.generate(pixel_values=px, input_ids=ids, do_sample=False, logits_processor=hooks,
                                       **search(n))[:, -n:]
    if "--warmup" in sys.argv:
        run(2)
    first.clear()
    t = time.perf_counter()
    out = run(NEW)
    total = time.perf_counter() - t
    first_s = first[0] - t
    print(json.dumps(dict(load_s=load_s, gen_s=total, first_s=first_s, token_s=(total - first_s) / (NEW - 1),
                          rss_gib=rss_gib(), ids=out[0].tolist(), threads=torch.get_num_threads())))


def measure(row, folder, warmup):
    res = {}
    for side in SIDES:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side, row, folder] + ["--warmup"] * warmup
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{side} {row} failed:\n{p.stderr[-4000:]}")
        res[side] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  {row} {side}: {res[side]['gen_s']:.1f} s", flush=True)
    a, b = (res[s]["ids"] for s in SIDES)
    res["first_diff"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if a == b else len(a))
    return res


def table(results, env):
    cell = lambda r, k, f: " / ".join(format(r[s][k], f) for s in SIDES)
    lines = [(f"{env['cpu']}, {env['threads']} threads; torch {env['torch']}, transformers {env['transformers']}; "
              f"{env['size']}"), "cells: nanoblip2 / transformers",
             "| run | load s | 20 new tokens s | first token s | per token s | peak RSS GiB | same ids |",
             "|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        same = "yes" if r["first_diff"] is None else f"no, from new token {r['first_diff'] + 1}"
        lines.append(f"| {row} | {cell(r, 'load_s', '.1f')} | {cell(r, 'gen_s', '.1f')} | "
                     f"{cell(r, 'first_s', '.2f')} | {cell(r, 'token_s', '.3f')} | {cell(r, 'rss_gib', '.1f')} | "
                     f"{same} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--depth", type=int, default=None, help="layers per stack instead of the real ones")
    ap.add_argument("--small", action="store_true", help="--depth=2")
    ap.add_argument("--dir", default=None, help="where the HF folders go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the folders (and reuse them on a rerun)")
    ap.add_argument("--warmup", action="store_true", help="a 2-token generation before the measured one")
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    depth = 2 if args.small and args.depth is None else args.depth
    root = args.dir or tempfile.mkdtemp(prefix="realsize-")
    results, params = {}, {}
    try:
        for lm in dict.fromkeys(ROWS[r][0] for r in rows):
            folder = os.path.join(root, lm)
            marker = os.path.join(folder, "realsize.json")
            built = json.loads(open(marker).read()) if args.keep and os.path.isfile(marker) else {}
            if built.get("depth", -1) == depth:
                print(f"reusing {folder}", flush=True)
                params[lm] = built["params"]
            else:
                shutil.rmtree(folder, ignore_errors=True)
                t = time.time()
                params[lm] = build(lm, folder, depth)
                print(f"built {folder}: {params[lm] / 1e9:.2f}B params in {time.time() - t:.0f} s", flush=True)
            for row in (r for r in rows if ROWS[r][0] == lm):
                results[row] = measure(row, folder, args.warmup)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    import transformers
    any_row = next(iter(results.values()))["nanoblip2"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "CPU")
    size = ("real sizes" if depth is None else f"{depth} layers a stack") + ", " + ", ".join(
        f"{'OPT' if lm == 'opt' else 'T5'} {n / 1e9:.2f}B params" for lm, n in params.items())
    env = dict(cpu=cpu, threads=any_row["threads"], cpus=os.cpu_count(), torch=torch.__version__,
               transformers=transformers.__version__, size=size, warmup=args.warmup)
    print(table(results, env))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, rows=results), f, indent=1)


if __name__ == "__main__":
    child(*sys.argv[2:5]) if sys.argv[1:2] == ["--child"] else main()
