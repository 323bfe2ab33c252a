"""
Speed and memory of BLIP-2 generation: nanoblip2 vs transformers, same weights, same machine, same run.

    python bench/generate.py            # CPU, fp32; about 5 minutes on 2 cores

A "small" BLIP-2 with random weights: a 12-layer 384-wide ViT at 224 px, a 6-layer Q-Former and an OPT-125m-shaped LM.
It is saved once as an HF folder. Memory: each side loads it in a process of its own and runs every row once.
Speed: both sides in one process, runs alternated, best of 5 after a warm-up, so that a busy machine slows both alike.
  greedy, batch 1 : image -> 30 new tokens
  beam 5, batch 1 : the same with 5 beams
  greedy, batch 8 : 8 images
  load            : peak RSS added by loading, over the RSS after the imports (transformers maps the file instead)
Every row generates exactly 30 tokens on both sides (min_new_tokens = max_new_tokens = 30).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
ROWS = [("greedy, batch 1", 1, 1), ("beam 5, batch 1", 1, 5), ("greedy, batch 8", 8, 1)]
NEW = 30
SIDES = ("nanoblip2", "transformers")


def build(folder):
    from conftest import opt_tokenizer_json
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                  patch_size=14)
    qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=OPTConfig(), num_query_tokens=32,
                      image_token_index=50265)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).save_pretrained(folder)
    opt_tokenizer_json(__import__("pathlib").Path(folder))  # generation needs only ids; any OPT tokenizer will do


def rss_mb(field):  # VmRSS: resident now; VmHWM: the peak so far
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def load(side, folder):
    if side == "nanoblip2":
        from nanoblip2 import Blip2
        model = Blip2.from_pretrained(folder)
        run = lambda px, B, beams: model.generate(px, torch.full((B, 1), 2), max_new_tokens=NEW, min_new_tokens=NEW,
                                                  num_beams=beams)  # prompt: BOS
    else:
        from transformers import Blip2ForConditionalGeneration
        model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
        ids = lambda B: torch.tensor([[50265] * 32 + [2]] * B)  # image placeholders + BOS
        run = lambda px, B, beams: model.generate(pixel_values=px, input_ids=ids(B), max_new_tokens=NEW,
                                                  min_new_tokens=NEW, num_beams=beams, do_sample=False)[:, -NEW:]
    return model, run


def memory(side, folder):
    """In a process of its own: RSS added by loading, and the peak over one run of every row."""
    import nanoblip2, transformers  # noqa: F401  (both sides pay for both imports)
    base, t0 = rss_mb("VmRSS"), time.time()
    model, run = load(side, folder)
    result = {"load_s": time.time() - t0, "load_rss_mb": rss_mb("VmHWM") - base,
              "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    with torch.no_grad():
        for name, B, beams in ROWS:
            run(torch.randn(B, 3, 224, 224), B, beams)
    result["peak_rss_mb"] = rss_mb("VmHWM") - base
    print(json.dumps(result))


def speed(folder, repeats=5):
    """Both models in one process, runs alternated, best of `repeats`: a busy machine slows both alike."""
    runs = {side: load(side, folder)[1] for side in SIDES}
    result = {}
    for name, B, beams in ROWS:
        px = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        times, ids = {side: [] for side in SIDES}, {}
        with torch.no_grad():
            for i in range(repeats + 1):  # the first round warms up
                for side in SIDES:
                    t = time.perf_counter()
                    ids[side] = runs[side](px, B, beams).tolist()
                    times[side].append(time.perf_counter() - t)
        result[name] = {side: min(times[side][1:]) for side in SIDES} | {"same": ids[SIDES[0]] == ids[SIDES[1]]}
    return result


def main():
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        mem = {}
        for side in SIDES:
            p = subprocess.run([sys.executable, __file__, side, folder], capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(p.stderr)
            mem[side] = json.loads(p.stdout.strip().splitlines()[-1])
        res = speed(folder)
    ours, hf = mem["nanoblip2"], mem["transformers"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32, "
          f"weights {ours['weights_mb']:.0f} MB")
    print(f"| {'row':<22} | {'nanoblip2':>10} | {'transformers':>12} | {'speed-up':>8} | same ids |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 14}|{'-' * 10}|----------|")
    for name, _, _ in ROWS:
        a, b = res[name]["nanoblip2"], res[name]["transformers"]
        print(f"| {name:<22} | {a:>9.3f}s | {b:>11.3f}s | {b / a:>7.2f}x | {res[name]['same']!s:>8} |")
    print(f"| {'load time':<22} | {ours['load_s']:>9.2f}s | {hf['load_s']:>11.2f}s | "
          f"{hf['load_s'] / ours['load_s']:>7.2f}x |          |")
    for key, label in (("load_rss_mb", "RSS added by loading"), ("peak_rss_mb", "RSS added, peak")):
        print(f"| {label:<22} | {ours[key]:>7.0f} MB | {hf[key]:>9.0f} MB | {hf[key] / ours[key]:>7.2f}x |          |")
    print(f"peak RSS added by loading / weights: nanoblip2 {ours['load_rss_mb'] / ours['weights_mb']:.2f}, "
          f"transformers {hf['load_rss_mb'] / hf['weights_mb']:.2f} (it maps the file and reads pages on first use)")


if __name__ == "__main__":
    memory(*sys.argv[1:3]) if len(sys.argv) > 2 else main()
