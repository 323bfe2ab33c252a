"""
Where zero-shot VQA loses its answers, in the shapes world. Each val question is put to a stage-2 model's frozen LM
after, in turn: nothing (the LM's prior), the image's first caption as text (the text-only ceiling), the caption the
model itself writes for the image (beam 5), and the soft visual prompt (zero-shot VQA). Each is scored twice: as
generated (the paper's prompt, beam 5, length penalty -1, at most 10 new tokens) and ranked (the answer of the
question's type that the LM finds likeliest, so a reply that is no answer, such as "there", is not counted).

    python data/shapes/probe_vqa.py                                   # out/stage2/ckpt, the OPT
    python data/shapes/probe_vqa.py --init_from=out/stage2_t5/ckpt --max_questions=300

If its own caption answers far more than the soft prompt, the picture is in the soft prompt but the LM cannot read
it there; if ranked is far above generated, the LM reads it but replies out of format.
"""
import collections
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, nanoGPT style, no install
from nanoblip2.cli import parse_args, run  # noqa: E402
from nanoblip2.data import load_image  # noqa: E402
from nanoblip2.generate import generate  # noqa: E402
from nanoblip2.stage2 import Blip2  # noqa: E402


@dataclass
class ProbeConfig:
    init_from: str = "out/stage2/ckpt"  # a stage-2 checkpoint (ours) on the shapes world
    world: str = "data/shapes"         # the folder prepare.py wrote
    split: str = "val"
    max_questions: int = 600           # the first ones only; 0 = all


class Probe:
    """The frozen LM of `model` asked one question after a given prefix (embeddings before the paper's prompt)."""

    def __init__(self, model):
        self.model, self.lm, self.tok = model, model.lm, model.tokenizer

    def context(self, text):  # a text before the prompt, as pretrain.py asks the LM: T5 "<text> Question: ...",
        ids = self.tok([text], truncation=False)[0]  # OPT "</s><text>\n</s>Question: ..."
        ids = ids[:, :-1] if self.model.is_t5 else torch.cat([ids, torch.tensor([[self.tok.newline_id]])], 1)
        return self.lm.embed(ids)

    def inputs(self, prefix, question):  # -> embeddings (1, P + T, C) of [prefix; prompt]
        embeds = self.lm.embed(self.tok([self.model.vqa_prompt(question)], truncation=False)[0])
        return embeds if prefix is None else torch.cat([prefix, embeds], 1)

    @torch.no_grad()
    def generated(self, prefixes, questions):
        """The replies to the questions, each after its [prefix; prompt], with Blip2.answer's search, in one batch
        (padded as generate pads: OPT on the left, T5 on the right)."""
        embeds = [self.inputs(p, q)[0] for p, q in zip(prefixes, questions)]
        L, left = max(e.size(0) for e in embeds), not self.model.is_t5
        pad = lambda e: F.pad(e, (0, 0, L - e.size(0), 0) if left else (0, 0, 0, L - e.size(0)))  # noqa: E731
        mask = torch.stack([pad(torch.ones(e.size(0), 1, dtype=torch.long))[:, 0] for e in embeds])
        logits, cache = self.lm.prefill(torch.stack([pad(e) for e in embeds]), mask)
        logits, cache = logits.repeat_interleave(5, dim=0), cache.expand(5)  # one row per beam
        new = generate(self.lm.step, logits, cache, mask[:, :0], eos_id=self.model.end_id,
                       pad_id=self.lm.cfg.pad_id, num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
        return [a.strip() for a in self.tok.batch_decode(new)]

    @torch.no_grad()
    def scores(self, prefix, question, answers):
        """Log-likelihood of each answer, and its end (T5 </s>, OPT the newline), after [prefix; prompt]: (K,)."""
        embeds = self.inputs(prefix, question)
        K = len(answers)
        if self.model.is_t5:  # the answer is the decoder's target
            out, mask = self.tok(answers, truncation=False)  # each ends with </s>
            start = torch.full((K, 1), self.lm.cfg.decoder_start_id)
            enc = self.lm.encode(inputs_embeds=embeds).expand(K, -1, -1)
            logits, _ = self.lm.decode(torch.cat([start, out[:, :-1]], 1), enc, None)
        else:  # the answer follows the prompt: " small" then the newline
            ends = [self.tok([" " + a], truncation=False)[0][0, 1:].tolist() + [self.tok.newline_id]  # no BOS
                    for a in answers]
            out = torch.tensor([e + [self.lm.cfg.pad_id] * (max(map(len, ends)) - len(e)) for e in ends])
            mask = torch.tensor([[1] * len(e) + [0] * (out.size(1) - len(e)) for e in ends])
            full = torch.cat([embeds.expand(K, -1, -1), self.lm.embed(out)], 1)
            logits = self.lm(inputs_embeds=full)[0][:, embeds.size(1) - 1:-1]
        logp = logits.float().log_softmax(-1).gather(2, out[..., None])[..., 0]
        return (logp * mask).sum(1)


def accuracy(qs, said):
    """-> 'all (type n, ...)' in percent."""
    right = collections.Counter(q["type"] for q, a in zip(qs, said) if a == q["answers"][0])
    asked = sorted(collections.Counter(q["type"] for q in qs).items())
    return f"{100 * sum(right.values()) / len(qs):.1f} (" + ", ".join(
        f"{t} {100 * right[t] / n:.0f}" for t, n in asked) + ")"


def main(cfg):
    world = Path(cfg.world)
    read = lambda name: json.loads((world / name).read_text(encoding="utf-8"))  # noqa: E731
    ann, qs = read(f"{cfg.split}.json"), read(f"vqa_{cfg.split}.json")
    qs = qs[:cfg.max_questions] if cfg.max_questions else qs
    answers = collections.defaultdict(set)  # each type's answers, from all the world's splits
    for split in ("train", "val", "test"):
        for q in read(f"vqa_{split}.json"):
            answers[q["type"]].add(q["answers"][0])
    answers = {t: sorted(a) for t, a in answers.items()}
    model = Blip2.from_pretrained(cfg.init_from).eval()
    probe, first = Probe(model), {e["image"]: e["caption"][0] for e in ann}
    images = sorted({q["image"] for q in qs})
    pixels = torch.stack([load_image(world / "images" / im, model.cfg.vit.image_size) for im in images])
    with torch.no_grad():  # in batches of 32, as eval.py captions
        own = dict(zip(images, [c for i in range(0, len(images), 32) for c in model.caption(pixels[i:i + 32])]))
        soft = dict(zip(images, model.visual_prompt(pixels).split(1)))
    print(f"{cfg.init_from} ({'FlanT5' if model.is_t5 else 'OPT'}), {len(qs)} {cfg.split} questions, in percent:")
    for name, prefix in (("nothing (the prior)", lambda q: None),
                         ("the first caption (ceiling)", lambda q: probe.context(first[q["image"]])),
                         ("its own caption", lambda q: probe.context(own[q["image"]])),
                         ("the soft prompt (zero-shot)", lambda q: soft[q["image"]])):
        said = [a for i in range(0, len(qs), 32) for a in
                probe.generated([prefix(q) for q in qs[i:i + 32]], [q["question"] for q in qs[i:i + 32]])]
        ranked = [answers[q["type"]][int(probe.scores(prefix(q), q["question"], answers[q["type"]]).argmax())]
                  for q in qs]
        print(f"after {name}: generated {accuracy(qs, said)}; ranked {accuracy(qs, ranked)}", flush=True)


if __name__ == "__main__":
    run(main, parse_args(ProbeConfig(), doc=__doc__))
