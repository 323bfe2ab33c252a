"""
The small frozen unimodal models the quick start's BLIP-2 starts from (real BLIP-2 starts from pretrained ones): each
is trained briefly on the shapes world that data/shapes/prepare.py wrote, and exported in its HF family's folder
layout, so that stage 1 (Blip2Stage1.from_vit_bert(<out>/vit, <out>/bert)) and stage 2 (Blip2.from_stage1(...,
<out>/opt or <out>/t5)) read them as they read real checkpoints. About 12 minutes on 2 CPU cores; prepare.py runs
it last.

    python data/shapes/pretrain.py                             # on the world in data/shapes
    python data/shapes/pretrain.py --models=opt --out=/tmp/s   # only the OPT, on the world in /tmp/s

Writes into --out:
    vit/config.json + model.safetensors      EVA ViT (BLIP-2 vision layout), 4 blocks, trained to name the attributes
                                             of the image and, from each patch, those of the object under it
    bert/config.json + model.safetensors     BertForMaskedLM, masked-LM on the captions, next to vocab.txt
    opt/config.json + model.safetensors      OPTForCausalLM on 128-token windows of the captions and "Question:
                                             ... Answer: ..." lines, one document per image, after learning to copy
                                             (random token runs said twice); next to tokenizer.json
    t5/config.json + model.safetensors       (--models=t5, not yet by default) T5ForConditionalGeneration made as
                                             FlanT5 was, scaled down: gated GELU, untied head; prefix LM on the
                                             captions (half of it after the image's first caption) and
                                             instruction-style "<caption> Question: ... Short answer:" tasks; next
                                             to tokenizer.json

Notable details:
- It reads the world's files back and never changes them: the data are byte-identical with or without it. The
  attribute lists and the seed are the world's, from meta.json.
- The weights depend on the seed and on the thread count (float sums).
- The ViT is trained with one extra block and exported without it (BLIP-2 uses the second-last layer).
- BERT's vocabulary is vocab.txt's, without [DEC], which the Q-Former appends when it loads it.
"""
import collections
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, nanoGPT style, no install
from nanoblip2.cli import parse_args  # noqa: E402
from nanoblip2.data import CLIP_MEAN, CLIP_STD  # noqa: E402
from nanoblip2.data import prefix_split  # noqa: E402
from nanoblip2.export import export_bert, export_lm, export_opt, export_vit  # noqa: E402
from nanoblip2.generate import generate  # noqa: E402
from nanoblip2.opt import OPT, OPTConfig  # noqa: E402
from nanoblip2.t5 import T5, T5Config  # noqa: E402
from nanoblip2.qformer import QFormer, QFormerConfig, text_mask  # noqa: E402
from nanoblip2.tokenizer import load_bert_tokenizer, load_opt_tokenizer, load_t5_tokenizer  # noqa: E402
from nanoblip2.vit import ViT, ViTConfig  # noqa: E402


@dataclass
class PretrainConfig:
    out: str = "data/shapes"  # the world prepare.py wrote; vit/, bert/, opt/ go there too
    models: str = "vit,bert,opt"  # which to train (the others' folders are left as they are); t5: opt-in, below
    vit_steps: int = 1500     # optimizer steps per model: the ViT's shapes need the most
    bert_steps: int = 250
    opt_steps: int = 1500     # the OPT learns to use its context (answer from a caption before it) only late
    opt_copy: float = 0.2     # the first fifth of them on copying alone (random token runs, each said twice),
                              # then an eighth of the windows; 0 = none (tests: too few steps to learn it)
    t5_steps: int = 1500      # --models=t5: half of each batch prefix LM on a caption, half a question after the
                              # first caption
    t5_copy: float = 0.2      # the first fifth of them on copying (a random token run, encoder -> decoder), then
                              # an eighth of each batch, as the OPT's; 0 = none
    t5_context: float = 0.5   # the share of the prefix-LM half that reads the image's first caption before the
                              # prefix, as stage 2's prefix LM reads the soft prompt; 0 = none
    pretrain_batch: int = 64


def check(cfg):
    for name in ("opt_copy", "t5_copy", "t5_context"):
        if not 0 <= getattr(cfg, name) <= 1:
            sys.exit(f"error: want 0 <= --{name} <= 1")


def qa_prompt(question):
    """The paper's zero-shot VQA prompt for OPT."""
    return f"Question: {question} Answer:"


def qa_text(q):
    """A question and its answer as the LM reads them: the prompt, then the answer."""
    return f"{qa_prompt(q['question'])} {q['answers'][0]}"


class World:
    """The files prepare.py wrote into a folder, read back, and the targets the ViT learns from them."""

    def __init__(self, out):
        self.out = Path(out)
        read = lambda name: json.loads((self.out / name).read_text(encoding="utf-8"))  # noqa: E731
        self.meta = read("meta.json")
        self.shapes, self.positions = self.meta["shapes"], self.meta["positions"]
        self.colours = list(self.meta["colours"])  # {name: RGB}, in prepare.py's order
        self.ann = {s: read(f"{s}.json") for s in ("train", "val", "test")}
        self.vqa = {s: read(f"vqa_{s}.json") for s in ("train", "val", "test")}

    def attributes(self, objects):
        """Multi-hot targets: shape present, colour present, (shape, colour) pair, shape is big; and the count - 1."""
        S, C = len(self.shapes), len(self.colours)
        y = torch.zeros(S * (C + 2) + C)
        for o in objects:
            s, c = self.shapes.index(o["shape"]), self.colours.index(o["colour"])
            y[[s, S + c, S + C + s * C + c]] = 1
            y[-S + s] = o["size"] == "big"
        return y, len(objects) - 1

    def patch_targets(self, objects, grid):
        """(grid * grid, 4) per patch, in the ViT's order: the shape, colour, size (0 small, 1 big) and position (the
        3 x 3 cell) of the object whose inner 80% covers the patch's centre, or -100 (no loss) for the background."""
        P = self.meta["image_size"] / grid
        centre = (torch.arange(grid) + 0.5) * P
        y, x = centre[:, None].expand(grid, grid).flatten(), centre[None, :].expand(grid, grid).flatten()
        t = torch.full((grid * grid, 4), -100)
        for o in objects:
            inside = (x - o["x"]) ** 2 + (y - o["y"]) ** 2 < (0.8 * o["r"]) ** 2
            t[inside] = torch.tensor([self.shapes.index(o["shape"]), self.colours.index(o["colour"]),
                                      o["size"] == "big", self.positions.index(o["position"])])
        return t

    def load_split(self, split, n, grid):
        """The first n images of a split as uint8 (n, 3, S, S), and their targets: attributes, count, per patch."""
        entries = self.ann[split][:n]
        images = [np.asarray(Image.open(self.out / "images" / e["image"]).convert("RGB")) for e in entries]
        targets = [self.attributes(e["objects"]) for e in entries]
        return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.stack([t[0] for t in targets]),
                torch.tensor([t[1] for t in targets]),
                torch.stack([self.patch_targets(e["objects"], grid) for e in entries]))


def train(model, steps, loss_fn, name, max_lr=1e-3):
    """AdamW, linear warmup over the first 10% of the steps then cosine to 10%; loss_fn(step) -> loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=0.01)
    warmup, t, loss = max(1, steps // 10), time.time(), torch.zeros(())
    for step in range(steps):
        lr = max_lr * min((step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"{name} step {step}/{steps}: loss {loss.item():.4f}, lr {lr:.2e}, {time.time() - t:.1f} s")
    return loss.item()


def init_weights(m):  # GPT/ViT style: N(0, 0.02) weights, zero biases (ours build with PyTorch's defaults)
    if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, torch.nn.Linear) and m.bias is not None:
        torch.nn.init.zeros_(m.bias)


def init_t5(model):
    """T5's own initialisation (transformers' T5PreTrainedModel._init_weights), not GPT's N(0, 0.02): T5 has no
    1/sqrt(d) in its attention and an unscaled embedding in its residual stream, and its init makes up for both.
    With N(0, 0.02) this T5 never learned "is there a triangle?" from the caption (at chance after 1,500 steps of
    the mixture below, and after 600 on that question alone); with this, on that question alone, it answers all of
    them right within 250. The untied head gets d_model**-0.5 (transformers' std 1 starts the logits at std ~11)."""
    d, kv, heads, ff = model.cfg.d_model, model.cfg.d_kv, model.cfg.heads, model.cfg.d_ff
    std = {"q": (d * kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": (heads * kv) ** -0.5, "rel_bias": d ** -0.5,
           "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": ff ** -0.5, "lm_head": d ** -0.5, "shared": 1.0}
    for name, m in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in std:
            torch.nn.init.normal_(m.weight, std=std[kind])
    return model


def normalise(x):  # uint8 (B, 3, S, S) -> float32, the arithmetic of data.to_tensor
    x = (x.double() * (1 / 255)).float()
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def pretrain_vit(cfg, world):
    """An EVA-style ViT with one extra block, trained to name the attributes from its final [CLS] and, from every
    patch token, the shape, colour, size and position of the object under it. The patch loss matters: the Q-Former
    reads the patches, and from the [CLS] loss alone the shapes do not emerge in a CPU budget (colours and counts
    do). So does its position term: without it the patches forget where they are (a linear probe found a patch's
    own 3 x 3 cell 47.6% of the time) and stage 2 named positions at chance (14.7% right, README). The first
    `depth` blocks are exported, as BLIP-2 uses the second-last layer's output."""
    torch.manual_seed(world.meta["seed"])
    vcfg = ViTConfig(image_size=world.meta["image_size"], patch_size=8, width=128, depth=4, heads=4, mlp=256, eps=1e-6)
    grid = vcfg.image_size // vcfg.patch_size
    vit = ViT(dataclasses.replace(vcfg, depth=vcfg.depth + 1))
    n_attr, K = len(world.attributes([])[0]), [len(world.shapes), len(world.colours), 2, len(world.positions)]
    head = torch.nn.Sequential(torch.nn.LayerNorm(vcfg.width), torch.nn.Linear(vcfg.width, n_attr + 3))
    patch_head = torch.nn.Sequential(torch.nn.LayerNorm(vcfg.width), torch.nn.Linear(vcfg.width, sum(K)))
    model = torch.nn.ModuleDict(dict(vit=vit, head=head, patch_head=patch_head)).apply(init_weights)
    torch.nn.init.normal_(vit.pos_embed, std=0.02)
    images, attrs, count, patches = world.load_split("train", cfg.vit_steps * cfg.pretrain_batch, grid)
    g = torch.Generator().manual_seed(world.meta["seed"])

    def predict(x):  # -> attribute logits (B, n_attr), count logits (B, 3), per patch [(B, N, k) for k in K]
        h = vit(normalise(x))
        out = head(h[:, 0])
        return out[:, :n_attr], out[:, n_attr:], patch_head(h[:, 1:]).split(K, dim=-1)

    def loss_fn(step):
        i = torch.randint(len(images), (cfg.pretrain_batch,), generator=g)
        a, c, per_patch = predict(images[i])
        bce = F.binary_cross_entropy_with_logits(a, attrs[i], reduction="sum") / len(i)  # summed over the labels
        dense = sum(F.cross_entropy(p.flatten(0, 1), patches[i][..., j].flatten()) for j, p in enumerate(per_patch))
        return bce + F.cross_entropy(c, count[i]) + dense

    train(model, cfg.vit_steps, loss_fn, "vit", max_lr=2e-3)
    if world.ann["val"]:
        images, attrs, count, patches = world.load_split("val", len(world.ann["val"]), grid)
        with torch.no_grad():
            a, c, per_patch = predict(images)
        right = (a > 0) == attrs.bool()
        S, C = len(world.shapes), len(world.colours)
        groups = {"shapes": right[:, :S], "colours": right[:, S:S + C], "pairs": right[:, S + C:-S],
                  "big": right[:, -S:], "count": (c.argmax(1) == count)[:, None]}
        on = patches[..., 0] >= 0
        print("vit val: images with every label of a group right: "
              + ", ".join(f"{k} {v.all(1).float().mean():.3f}" for k, v in groups.items())
              + "; patches on an object with its " + ", ".join(
                  f"{k} right {(p.argmax(-1) == patches[..., j])[on].float().mean():.3f}"
                  for j, (k, p) in enumerate(zip(("shape", "colour", "size", "position"), per_patch))))
    vit4 = ViT(vcfg)
    vit4.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith(f"blocks.{vcfg.depth}.")})
    export_vit(vit4, str(world.out / "vit"))


def pretrain_bert(cfg, world):
    """A Q-Former text branch (= BERT) with masked-LM on the captions: 15% of the tokens, 80/10/10."""
    torch.manual_seed(world.meta["seed"])
    tok = load_bert_tokenizer(world.out / "bert")
    V = len((world.out / "bert" / "vocab.txt").read_text(encoding="utf-8").splitlines())  # the Q-Former adds [DEC]
    model = QFormer(QFormerConfig(width=128, depth=4, heads=4, mlp=256, vision_width=128, num_query_tokens=1,
                                  vocab_size=V, max_positions=64, text=True, lm_head=True, dropout=0.1))
    caps = [c for e in world.ann["train"] for c in e["caption"]]
    g = torch.Generator().manual_seed(world.meta["seed"])

    def loss_fn(step):
        ids, mask = tok([caps[i] for i in torch.randint(len(caps), (cfg.pretrain_batch,), generator=g)], 64)
        special = (ids == tok.pad_id) | (ids == tok.cls_id) | (ids == tok.sep_id)
        picked = (torch.rand(ids.shape, generator=g) < 0.15) & ~special
        r = torch.rand(ids.shape, generator=g)
        x = ids.masked_fill(picked & (r < 0.8), tok.token_id("[MASK]"))
        swap = picked & (r >= 0.8) & (r < 0.9)
        x[swap] = torch.randint(5, V, (int(swap.sum()),), generator=g)
        h, _ = model(input_ids=x, mask=text_mask(mask))
        return F.cross_entropy(model.logits(h)[picked], ids[picked])

    loss = train(model, cfg.bert_steps, loss_fn, "bert")
    # exported with dropout 0: the Q-Former takes it from this config, and on the CPU dropout costs a fifth of a stage-1
    # step without helping in the few steps the quick start trains (measured)
    model.cfg.dropout = 0.0
    export_bert(model, str(world.out / "bert"), keep_dec=True)  # no [DEC] row yet; the files next to vocab.txt stay
    return loss


def pretrain_opt(cfg, world):
    """A small OPT, causal LM as real LLMs are trained: 128-token windows of one long token stream, one document
    per training image (its captions, then its "Question: ... Answer: ..." lines, the paper's zero-shot VQA prompt;
    each as BOS + text + "\n"). So every position the BLIP-2 input reaches is trained: 32 queries and a caption sit
    at 32 to 64, while texts trained one by one reach 30 at most and leave the later position embeddings random
    (stage 2 measured test CIDEr 0.447 with those, 0.696 with these).
    It must also copy from its context, as real LLMs do (induction heads): stage 2 tells it the picture in 32 soft
    tokens, and it can only say what they say by copying. On these captions alone it never learns to, even when
    every document is said twice: after "<a caption>\n<the same caption, cut before a shape>" it named the shape
    23% of the time (chance 20%). So the first --opt_copy of the steps train on random token runs, each said
    twice, where copying is the only way down (it appears after ~200 steps), and then an eighth of the windows
    stay such runs: the shape is then copied 84% of the time, and stage 2's attribute accuracy went from 0.216
    to 0.595 with the same stage-1 checkpoint and settings (README)."""
    torch.manual_seed(world.meta["seed"])
    tok = load_opt_tokenizer(world.out / "opt")
    L = 128
    model = OPT(OPTConfig(vocab_size=-(-len(tok) // 8) * 8, width=128, depth=4, heads=4, ffn_dim=512,
                          max_positions=L, pad_id=1, bos_id=2, eos_id=2)).apply(init_weights)
    rng = random.Random(world.meta["seed"])
    qas = collections.defaultdict(list)
    for q in world.vqa["train"]:
        qas[q["image"]].append(qa_text(q))
    docs = [rng.sample(e["caption"], len(e["caption"])) + rng.sample(qas[e["image"]], len(qas[e["image"]]))
            for e in world.ann["train"]]  # captions first, then the questions, each in random order
    rng.shuffle(docs)
    stream = torch.tensor([i for enc in tok.tk.encode_batch([t for d in docs for t in d])
                           for i in enc.ids + [tok.newline_id]])  # BOS + text + "\n", one after the other
    stream = stream.repeat(-(-(L + 2) // len(stream)))  # at least one window, for tiny --train
    g = torch.Generator().manual_seed(world.meta["seed"])

    def loss_fn(step):
        i = torch.randint(len(stream) - L - 1, (cfg.pretrain_batch // 2,), generator=g)
        ids = torch.stack([stream[j:j + L + 1] for j in i.tolist()])
        if cfg.opt_copy:  # copying windows: all of them for the first opt_copy of the steps, then an eighth
            n = len(ids) if step < cfg.opt_copy * cfg.opt_steps else len(ids) // 8
            runs = torch.randint(4, len(tok), (n, L // 32 + 1, 16), generator=g)  # 16 random tokens, twice, again
            ids[:n] = runs.repeat(1, 1, 2).flatten(1)[:, :L + 1]
        logits, _ = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    loss = train(model, cfg.opt_steps, loss_fn, "opt")
    model.eval()

    @torch.no_grad()
    def answer(context, question, max_new_tokens=10):  # greedy, to "\n": the line after context + "\n" + question
        ids = torch.cat([tok([context])[0], torch.tensor([[tok.newline_id]]), tok([question])[0]], 1)
        new = []
        for _ in range(max_new_tokens):
            new.append(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1))[0][0, -1].argmax().item())
            if new[-1] == tok.newline_id:
                break
        return tok.decode(new).strip()

    context, question = "a big purple star in the middle on a pink background", qa_prompt("what colour is the star?")
    print(f"opt greedy: {context!r} + {question!r} -> {answer(context, question)!r}")
    if world.ann["val"]:  # can it use its context? (a soft visual prompt is context too): each val question after
        first = {e["image"]: e["caption"][0] for e in world.ann["val"]}  # its image's first caption
        vqa = world.vqa["val"]
        right = sum(answer(first[q["image"]], qa_prompt(q["question"]), 5) == q["answers"][0] for q in vqa)
        print(f"opt val: answers {right / len(vqa):.3f} of the questions right after the image's first caption")
    export_opt(model, str(world.out / "opt"))  # tokenizer.json stays
    return loss


def t5_question(caption, q):  # the instruction: the caption as context, then FlanT5's VQA prompt
    return f"{caption} Question: {q} Short answer:"


def pretrain_t5(cfg, world):
    """A small FlanT5: an encoder-decoder with gated GELU and an untied head, trained on text only, as FlanT5 was:
    a prefix LM on the captions and QA lines (split at a random word, LAVIS's stage-2 objective), and, in the other
    half of every batch, instruction tuning: "<the image's first caption> Question: ... Short answer:" -> the
    answer. Its text-only QA accuracy on val is BLIP-2's ceiling: stage 2 replaces the caption with 32 soft tokens.
    Half the prefix-LM rows (--t5_context) read the image's first caption before the prefix, as stage 2's prefix LM
    reads the soft prompt before it: after the soft prompt and a question, the T5 then replies with an answer more
    often (zero-shot val VQA 34.1%, 40.8% in another run, against 28.3% without), though ranked among the answers
    (probe_vqa.py) no more of them are right; with three quarters in context 19.8% (it goes on with a caption).
    Started as transformers starts T5 (init_t5). It copies no random token runs (--t5_copy): its relative-position
    bias moves ~lr a step, too slowly for a head that attends to a neighbour (at 30x the lr it copies, and the
    yes/no questions fall to chance). Not yet a default."""
    torch.manual_seed(world.meta["seed"])
    tok = load_t5_tokenizer(world.out / "t5")
    model = T5(T5Config(vocab_size=-(-len(tok) // 8) * 8, d_model=128, d_kv=32, d_ff=256, heads=4, enc_depth=3,
                        dec_depth=3, act="gelu_new", gated=True))
    init_t5(model)
    first = {e["image"]: e["caption"][0] for s in ("train", "val") for e in world.ann[s]}
    lines = [(first[e["image"]], c) for e in world.ann["train"] for c in e["caption"]]  # (context, text)
    lines += [(first[q["image"]], qa_text(q)) for q in world.vqa["train"]]
    tasks = [(t5_question(first[q["image"]], q["question"]), q["answers"][0]) for q in world.vqa["train"]]
    g, half = torch.Generator().manual_seed(world.meta["seed"]), cfg.pretrain_batch // 2

    def loss_fn(step):
        pairs = []
        for n, i in enumerate(torch.randint(len(lines), (half,), generator=g).tolist()):
            context, text = lines[i]
            prefix, suffix = prefix_split(text, g)
            in_context = n >= (1 - cfg.t5_context) * half  # the last rows: the copying rows replace the first
            pairs.append((f"{context} {prefix}" if in_context else prefix, suffix))
        pairs += [tasks[i] for i in torch.randint(len(tasks), (half,), generator=g).tolist()]
        ids, mask = tok([p for p, _ in pairs], 96)
        out, out_mask = tok([a for _, a in pairs], 32)
        if cfg.t5_copy:  # copying rows: 16 random tokens + </s> in, the same out (what stage 2 asks of the decoder)
            n = len(pairs) if step < cfg.t5_copy * cfg.t5_steps else len(pairs) // 8
            run = F.pad(torch.randint(3, len(tok), (n, 16), generator=g), (0, 1), value=tok.eos_id)  # (n, 17)
            ids, mask, out, out_mask = (F.pad(t, (0, max(0, 17 - t.size(1)))) for t in (ids, mask, out, out_mask))
            for t, m in ((ids, mask), (out, out_mask)):  # the same run in and out; the rest padding (<pad> = 0)
                t[:n], m[:n] = 0, 0
                t[:n, :17], m[:n, :17] = run, 1
        dec = F.pad(out[:, :-1], (1, 0), value=model.cfg.decoder_start_id)  # shifted right; pad stays pad (0)
        logits, _ = model.decode(dec, model.encode(ids, attention_mask=mask), mask)
        return F.cross_entropy(logits.flatten(0, 1), out.masked_fill(out_mask == 0, -100).flatten())

    loss = train(model, cfg.t5_steps, loss_fn, "t5")
    model.eval()
    if world.vqa["val"]:  # the ceiling: each val question after its image's first caption, greedy
        qs = world.vqa["val"]
        ids, mask = tok([t5_question(first[q["image"]], q["question"]) for q in qs], 64)
        with torch.no_grad():
            logits, cache = model.prefill(model.embed(ids), mask)
            new = generate(model.step, logits, cache, ids[:, :0], max_new_tokens=5, eos_id=tok.eos_id,
                           pad_id=tok.pad_id)
        said = [a.strip() for a in tok.batch_decode(new)]
        right = collections.Counter(q["type"] for q, a in zip(qs, said) if a == q["answers"][0])
        asked = sorted(collections.Counter(q["type"] for q in qs).items())
        print(f"t5 val: answers {sum(right.values()) / len(qs):.3f} of the questions right after the image's first "
              f"caption (" + ", ".join(f"{t} {right[t] / n:.3f}" for t, n in asked) + ")")
    run = F.pad(torch.randint(3, len(tok), (200, 16), generator=g), (0, 1), value=tok.eos_id)  # can it copy?
    with torch.no_grad():
        logits, cache = model.prefill(model.embed(run), torch.ones_like(run))
        new = generate(model.step, logits, cache, run[:, :0], max_new_tokens=17, eos_id=tok.eos_id, pad_id=tok.pad_id)
    print(f"t5 copies {(F.pad(new, (0, 17 - new.size(1)))[:, :17] == run).all(1).float().mean():.3f} of 200 random "
          "16-token runs whole")
    export_lm(model, str(world.out / "t5"))  # tokenizer.json stays
    return loss


def pretrain(cfg):
    """Train and export the models in cfg.models, in the order ViT, BERT, OPT, T5, on the world in cfg.out."""
    world = World(cfg.out)
    for name, fn in (("vit", pretrain_vit), ("bert", pretrain_bert), ("opt", pretrain_opt), ("t5", pretrain_t5)):
        if name not in cfg.models.split(","):
            continue
        t = time.time()
        fn(cfg, world)
        print(f"pretrained {name} in {time.time() - t:.1f} s")


if __name__ == "__main__":
    cfg = parse_args(PretrainConfig(), doc=__doc__)
    check(cfg)
    if not (Path(cfg.out) / "meta.json").is_file():
        sys.exit(f"error: no shapes world in {cfg.out}: run data/shapes/prepare.py --out={cfg.out} first")
    pretrain(cfg)
