"""Stage 2: the OPT labels, the T5 prefix split, the losses against HF, and the start from a stage-1 model."""
import runpy
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import CAPTIONS, pixels

from nanoblip2 import Blip2, Blip2Stage1
from nanoblip2.data import opt_batch, prefix_split, t5_batch

Q = 5


def test_opt_labels_position_by_position(blip2_opt):
    tok = Blip2.from_pretrained(blip2_opt[0]).tokenizer
    b = opt_batch(tok, ["a cat on a mat", "two dogs"], prompt="a photo of", num_queries=Q)
    ids, labels = b["input_ids"], b["labels"]
    n_prompt = len(tok(["a photo of"])[0][0])           # BOS + the prompt's tokens
    cap = tok(["a photo of a cat on a mat\n"])[0][0]    # the whole first text, unpadded
    assert labels.shape == (2, Q + ids.size(1))
    assert (labels[:, :Q] == -100).all()                           # the queries
    assert ids[0, 0] == tok.bos_id and labels[0, Q] == -100        # BOS
    assert (labels[0, Q:Q + n_prompt] == -100).all()               # the prompt
    assert labels[0, Q + n_prompt:Q + len(cap)].tolist() == cap[n_prompt:].tolist()  # caption, then "\n"
    assert labels[0, Q + len(cap) - 1] == tok.newline_id
    assert (labels[0, Q + len(cap):] == -100).all() and (ids[0, len(cap):] == tok.pad_id).all()  # padding
    short = int(b["attention_mask"][1].sum())
    assert labels[1, Q + short - 1] == tok.newline_id and (labels[1, Q + short:] == -100).all()
    # no prompt: BOS is a target too (the last query predicts it), as in LAVIS
    b = opt_batch(tok, ["two dogs"], num_queries=Q)
    assert b["labels"][0, Q] == tok.bos_id


def test_t5_prefix_split_is_in_range_and_reconstructs():
    g = torch.Generator().manual_seed(0)
    for caption in CAPTIONS * 5:
        caption = caption.strip()
        prefix, suffix = prefix_split(caption, g)
        n, k = len(caption.split()), len(prefix.split())
        assert 1 <= k <= n // 2 and (prefix + " " + suffix) == " ".join(caption.split())
    assert prefix_split("dog", g) == ("", "dog")
    seen = {len(prefix_split("a b c d e f g h", g)[0].split()) for _ in range(100)}
    assert seen == {1, 2, 3, 4}


@torch.no_grad()
def test_losses_equal_hf(blip2_opt, blip2_t5):
    for folder, hf in (blip2_opt, blip2_t5):
        ours = Blip2.from_pretrained(folder)
        px = pixels(B=2, seed=9)
        if ours.is_t5:
            b = t5_batch(ours.tokenizer, ["a cat on a mat", "two dogs playing"], prompt="a photo of")
        else:
            b = opt_batch(ours.tokenizer, ["a cat on a mat", "two dogs playing"], prompt="a photo of", num_queries=Q)
        loss = ours(px, b)["loss"]
        img = torch.full((2, Q), hf.config.image_token_index)
        inputs = dict(pixel_values=px, input_ids=torch.cat([img, b["input_ids"]], 1),
                      attention_mask=torch.cat([torch.ones(2, Q, dtype=torch.long), b["attention_mask"]], 1))
        if ours.is_t5:
            ref = hf(**inputs, labels=b["labels"]).loss
        else:  # HF scores the text positions only; its own OPT loss path fails on a non-contiguous view (5.24),
            labels = b["labels"][:, Q:]  # so its logits are scored here the way its forward does
            logits = hf(**inputs).logits[:, -labels.size(1):]
            ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        print(f"{'T5' if ours.is_t5 else 'OPT'} stage-2 loss: ours {loss.item():.6f}, HF {ref.item():.6f}")
        assert abs(loss.item() - ref.item()) < 1e-5


def test_from_stage1_trains_the_bridge_only(itm_folder, blip2_opt, tmp_path):
    s1 = Blip2Stage1.from_pretrained(itm_folder[0])
    lm = tmp_path / "opt"
    blip2_opt[1].language_model.save_pretrained(lm)     # a standalone OPTForCausalLM folder
    (lm / "tokenizer.json").write_bytes((__import__("pathlib").Path(blip2_opt[0]) / "tokenizer.json").read_bytes())
    model = Blip2.from_stage1(s1, str(lm))
    assert model.qformer.lm_head is None and not hasattr(model.qformer, "word_embeddings")
    assert torch.equal(model.qformer.layers[0].cross.key.weight, s1.qformer.layers[0].cross.key.weight)
    model.vit.requires_grad_(False)
    model.lm.requires_grad_(False)
    b = opt_batch(model.tokenizer, ["a cat on a mat"], num_queries=Q)
    model(pixels(B=1), b)["loss"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "language_projection.weight" in grads and "query_tokens" in grads and "ln_vision.weight" in grads
    assert "qformer.layers.0.cross.query.weight" in grads
    assert not any(n.startswith(("vit.", "lm.")) for n in grads)


def test_t5_prefix_lm_batch_token_by_token(blip2_t5):
    """The prefix LM for one hand-written caption: the prefix (+ </s>) goes to the encoder after the queries, the
    suffix (+ </s>) is the decoder's target, fed shifted right after the start token; padding is -100."""
    model = Blip2.from_pretrained(blip2_t5[0])
    tok, start = model.tokenizer, model.cfg.lm.decoder_start_id
    t = {w: tok.token_id("▁" + w) for w in "a cat on mat two dogs".split()}
    eos, pad = tok.eos_id, tok.pad_id
    seed = next(s for s in range(100) if prefix_split("a cat on a mat", torch.Generator().manual_seed(s))[0] == "a cat")
    b = t5_batch(tok, ["a cat on a mat", "two dogs"], generator=torch.Generator().manual_seed(seed))
    assert b["input_ids"][0].tolist() == [t["a"], t["cat"], eos] and b["attention_mask"][0].tolist() == [1, 1, 1]
    assert b["labels"][0].tolist() == [t["on"], t["a"], t["mat"], eos]
    assert b["input_ids"][1].tolist() == [t["two"], eos, pad] and b["attention_mask"][1].tolist() == [1, 1, 0]
    assert b["labels"][1].tolist() == [t["dogs"], eos, -100, -100]

    seen = {}
    encode, decode = model.lm.encode, model.lm.decode
    model.lm.encode = lambda inputs_embeds, attention_mask: seen.update(enc=inputs_embeds, mask=attention_mask) or \
        encode(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    model.lm.decode = lambda dec, *a, **k: seen.update(dec=dec) or decode(dec, *a, **k)
    px = pixels(B=2, seed=3)
    model(px, b)
    assert torch.equal(seen["enc"][:, :Q], model.visual_prompt(px))                # the queries first
    assert torch.equal(seen["enc"][:, Q:], model.lm.embed(b["input_ids"]))         # then the prefix and </s>
    assert seen["mask"].tolist() == [[1] * Q + [1, 1, 1], [1] * Q + [1, 1, 0]]
    assert seen["dec"].tolist() == [[start, t["on"], t["a"], t["mat"]], [start, t["dogs"], eos, pad]]


@torch.no_grad()
def test_vqa_probe_scores_answers_as_the_loss_does(blip2_opt, blip2_t5):
    """data/shapes/probe_vqa.py ranks answers by their log-likelihood after [soft prompt; the paper's prompt]: the
    stage-2 loss of that prompt and answer times the answer's length. Its generated reply is model.answer's."""
    Probe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "data/shapes/probe_vqa.py"))["Probe"]
    for folder, _ in (blip2_opt, blip2_t5):
        model = Blip2.from_pretrained(folder)
        probe, px, q = Probe(model), pixels(B=1, seed=5), "what is on the mat?"
        answers = ["a cat", "two dogs playing", "mat"]
        scores = probe.scores(model.visual_prompt(px), q, answers)
        for a, s in zip(answers, scores):
            prompt = model.vqa_prompt(q)
            b = (t5_batch(model.tokenizer, [a], prompt=prompt, max_length=128) if model.is_t5 else
                 opt_batch(model.tokenizer, [a], prompt=prompt, max_length=128, num_queries=Q))
            n = int((b["labels"] != -100).sum())
            assert abs(s.item() + n * model(px, b)["loss"].item()) < 1e-4, (a, s, n)
        assert len(set(scores.tolist())) == 3
        px, qs = pixels(B=3, seed=6), [q, "is it a dog?", "how many cats are there on the mat?"]  # padded
        soft = model.visual_prompt(px)
        assert probe.generated([soft[i:i + 1] for i in range(3)], qs) == model.answer(px, qs)
