"""OPT vs transformers' OPTForCausalLM on tiny random models loaded through our loader, max abs diff <= 1e-5."""
import json
import os
import shutil

import pytest
import torch
from conftest import QFORMER, VISION, randomize, save
from safetensors.torch import load_file, save_file

from nanoblip2.load import CheckpointError, load_weights, prefixed
from nanoblip2.opt import OPT, PRESETS, OPTConfig, hf_keys

TOL = 1e-5
V = 99
TINY = dict(vocab_size=V, hidden_size=48, num_attention_heads=3, ffn_dim=37, num_hidden_layers=3,
            max_position_embeddings=64)


def close(a, b, what):
    diff = (a - b).abs().max().item()
    print(f"{what}: max abs diff {diff:.2e}")
    assert a.shape == b.shape and diff <= TOL, f"{what}: {diff}"


def tiny_opt(path, seed=0, **kw):
    from transformers import OPTConfig as HFConfig, OPTForCausalLM
    torch.manual_seed(seed)
    hf = randomize(OPTForCausalLM(HFConfig(**(TINY | kw))), seed=seed)
    return save(hf, path), hf


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    return tiny_opt(tmp_path_factory.mktemp("opt"))


def batch(B=3, T=9, left=False, seed=0):
    """Token ids and a mask with a different amount of padding per row (none in row 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, :2 * b] = 0 if left else 1
        mask[b, T - 2 * b:] = 1 if left else 0
    return ids.masked_fill(mask == 0, 1), mask


def real(x, mask):  # only the positions of real tokens: what padding positions produce is not specified
    return x[mask.bool()]


@torch.no_grad()
def test_config_from_hf(opt_folder):
    cfg = OPTConfig.from_hf(json.load(open(os.path.join(opt_folder[0], "config.json"))))
    assert (cfg.vocab_size, cfg.width, cfg.depth, cfg.heads, cfg.ffn_dim, cfg.max_positions) == (V, 48, 3, 3, 37, 64)
    assert cfg.word_embed_proj_dim == 48 and cfg.pre_norm and cfg.final_norm and cfg.tie_word_embeddings
    # what the Hub's Salesforce/blip2-opt-2.7b says after the 2024 update; HF left out every default
    blip2 = {"model_type": "blip-2", "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240,
             "num_attention_heads": 32, "num_hidden_layers": 32, "word_embed_proj_dim": 2560, "vocab_size": 50304,
             "eos_token_id": 50118, "pad_token_id": 1}}
    cfg = OPTConfig.from_hf(blip2)
    assert cfg == OPTConfig(**(vars(PRESETS["opt-2.7b"]) | dict(vocab_size=50304, eos_id=50118)))
    cfg = OPTConfig.from_hf({"model_type": "opt", "word_embed_proj_dim": 512, "hidden_size": 1024,
                             "do_layer_norm_before": False})
    assert cfg.word_embed_proj_dim == 512 and not cfg.pre_norm and not cfg.final_norm
    with pytest.raises(ValueError, match="not OPT"):
        OPTConfig.from_hf({"model_type": "blip-2", "text_config": {"model_type": "t5"}})


@torch.no_grad()
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_logits(opt_folder, left):
    folder, hf = opt_folder
    ours = OPT.from_pretrained(folder)
    ids, mask = batch(left=left)
    logits, cache = ours(ids, attention_mask=mask)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    close(real(logits, mask), real(ref, mask), f"OPT logits, {'left' if left else 'right'} padding")
    assert not logits.isnan().any()
    assert len(cache) == 3 and cache[0][0].shape == (3, 3, 9, 16)
    # padding must matter: a left-padded row is the unpadded sequence shifted, with the same positions
    if left:
        alone, _ = ours(ids[2:, 4:])
        close(logits[2, 4:], alone[0], "left-padded row vs the same tokens unpadded")


@torch.no_grad()
def test_inputs_embeds_path(opt_folder):
    ours = OPT.from_pretrained(opt_folder[0])
    ids, mask = batch(left=True)
    close(ours(inputs_embeds=ours.embed(ids), attention_mask=mask)[0], ours(ids, attention_mask=mask)[0],
          "inputs_embeds path vs input_ids path")
    assert ours.embed(ids).shape == (3, 9, 48)


@torch.no_grad()
def test_cached_decoding_equals_full_forward(opt_folder):
    folder, hf = opt_folder
    ours = OPT.from_pretrained(folder)
    ids, mask = batch(T=10, left=True, seed=3)
    full, _ = ours(ids, attention_mask=mask)
    P = 5  # the prompt part; row 2 is all padding there
    logits, cache = ours(ids[:, :P], attention_mask=mask[:, :P])
    steps = [logits]
    for t in range(P, ids.size(1)):
        logits, cache = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)
        steps.append(logits)
    assert cache[-1][1].shape == (3, 3, 10, 16)
    close(real(torch.cat(steps, dim=1), mask), real(full, mask), "cached incremental decoding vs full forward")
    close(real(full, mask), real(hf(input_ids=ids, attention_mask=mask).logits, mask), "full forward vs HF")
    # reordering the cache along the batch (beam search) is indexing dim 0
    idx = torch.tensor([2, 0, 0])
    nxt = torch.randint(3, V, (3, 1), generator=torch.Generator().manual_seed(1))
    m = torch.cat([mask[idx], torch.ones(3, 1, dtype=torch.long)], dim=1)
    stepped, _ = ours(nxt, attention_mask=m, cache=[(k[idx], v[idx]) for k, v in cache])
    close(stepped[:, -1], ours(torch.cat([ids[idx], nxt], 1), attention_mask=m)[0][:, -1], "reordered cache step")


@torch.no_grad()
def test_prefill_and_step(opt_folder):
    """Generation's interface: prefill once, then one step per token, equals the full forward; the cache-free path
    (prefill over the prompt and the tokens so far) too; expanding and reordering the Cache picks batch rows."""
    ours = OPT.from_pretrained(opt_folder[0])
    ids, mask = batch(T=10, left=True, seed=3)
    full, _ = ours(ids, attention_mask=mask)  # (B, T, V); every row is real from position 4 on
    P = 5
    logits, cache = ours.prefill(ours.embed(ids[:, :P]), mask[:, :P])
    steps = [logits]
    for t in range(P, ids.size(1) - 1):
        logits, cache = ours.step(ids[:, t], cache)
        steps.append(logits)
    close(torch.stack(steps, 1), full[:, P - 1:-1], "prefill + steps vs full forward")
    assert cache.mask.tolist() == mask[:, :-1].tolist() and cache.layers[2][1].shape == (3, 3, 9, 16)
    close(ours.prefill(ours.embed(ids[:, :P]), mask[:, :P], ids[:, P:])[0], full[:, -1], "prefill with tokens")
    rows = torch.tensor([5, 0, 2, 2, 1, 4])  # of 3 items x 2 beams
    stepped, _ = ours.step(ids[:, -1].repeat_interleave(2)[rows], cache.expand(2).reorder(rows))
    close(stepped, full[:, -1].repeat_interleave(2, dim=0)[rows], "expanded and reordered cache, one step")

@torch.no_grad()
def test_opt350m_layout(tmp_path):
    """project_in/out around a narrower embedding, post-LN blocks, no final LayerNorm, and an untied head."""
    folder, hf = tiny_opt(tmp_path, seed=4, word_embed_proj_dim=20, do_layer_norm_before=False,
                          tie_word_embeddings=False)
    ours = OPT.from_pretrained(folder)
    assert ours.project_in.weight.shape == (48, 20) and ours.ln_f is None and ours.lm_head is not None
    assert not torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
    ids, mask = batch(left=True, seed=4)
    close(real(ours(ids, attention_mask=mask)[0], mask), real(hf(input_ids=ids, attention_mask=mask).logits, mask),
          "opt-350m layout logits")
    assert ours.embed(ids).shape == (3, 9, 20)


@torch.no_grad()
def test_no_bias_no_affine(tmp_path):
    folder, hf = tiny_opt(tmp_path, seed=5, enable_bias=False, layer_norm_elementwise_affine=False)
    ours = OPT.from_pretrained(folder)
    assert ours.layers[0].fc1.bias is None and ours.ln_f.weight is None
    ids, mask = batch(seed=5)
    close(real(ours(ids, attention_mask=mask)[0], mask), real(hf(input_ids=ids, attention_mask=mask).logits, mask),
          "enable_bias=False, elementwise_affine=False logits")


@torch.no_grad()
def test_old_key_names_and_stored_tied_head(opt_folder, tmp_path):
    """Old facebook/opt-* files say decoder.* without model., and older transformers also wrote the tied lm_head."""
    folder, hf = opt_folder
    out = tmp_path / "old"
    shutil.copytree(folder, out)
    sd = load_file(out / "model.safetensors")
    sd = {k.removeprefix("model."): v for k, v in sd.items()} | {"lm_head.weight": sd["model.decoder.embed_tokens.weight"].clone()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    ours = OPT.from_pretrained(str(out))
    ids, mask = batch()
    close(real(ours(ids, attention_mask=mask)[0], mask), real(hf(input_ids=ids, attention_mask=mask).logits, mask),
          "old decoder.* keys")
    # strict: a missing layer tensor and a stray tensor are both named
    del sd["decoder.layers.1.fc2.bias"]
    sd["decoder.extra"] = torch.zeros(2)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: layers\.1\.fc2\.bias.*\n.*unexpected: "
                                              r"model\.decoder\.extra"):  # the facebook/opt-* layout
        OPT.from_pretrained(str(out))


@pytest.fixture(scope="module")
def blip2_opt_folder(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    torch.manual_seed(6)
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=dict(TINY, model_type="opt"),
                      num_query_tokens=5)
    model = randomize(Blip2ForConditionalGeneration(cfg), seed=6)
    return save(model, tmp_path_factory.mktemp("blip2opt")), model


@torch.no_grad()
def test_language_model_of_blip2_folder(blip2_opt_folder):
    folder, hf = blip2_opt_folder
    ours = OPT.from_pretrained(folder)
    ids, mask = batch(left=True, seed=6)
    ref = hf.language_model(input_ids=ids, attention_mask=mask).logits
    close(real(ours(ids, attention_mask=mask)[0], mask), real(ref, mask), "OPT out of a BLIP-2 folder")
    # BLIP-2's input: projected queries, then the text embeddings, as one inputs_embeds
    q = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(7))
    m = torch.cat([torch.ones(3, 5, dtype=torch.long), mask], dim=1)
    emb = torch.cat([q, ours.embed(ids)], dim=1)
    ref = hf.language_model(inputs_embeds=emb, attention_mask=m).logits
    close(real(ours(inputs_embeds=emb, attention_mask=m)[0], m), real(ref, m), "queries + text inputs_embeds")
    # inside a bigger module, under a prefix
    holder = torch.nn.Module()
    holder.opt = OPT(ours.cfg)
    keys = prefixed(hf_keys(ours.cfg), ours="opt.", hf="language_model.")
    load_weights(holder, folder, **keys | dict(ignore=keys["ignore"] + ["vision_model.*", "qformer.*", "query_tokens",
                                                                       "language_projection.*"]))
    assert torch.equal(holder.opt.layers[2].attn.v.bias, ours.layers[2].attn.v.bias)


def test_preset_parameter_counts():
    def count(c):  # embeddings (the head is tied) + per block: 4 projections, the FFN, 2 LayerNorms; + final LN
        block = 4 * (c.width ** 2 + c.width) + 2 * c.width * c.ffn_dim + c.ffn_dim + c.width + 4 * c.width
        return c.vocab_size * c.width + (c.max_positions + 2) * c.width + c.depth * block + 2 * c.width

    for name, expected in (("opt-125m", 125_239_296), ("opt-2.7b", 2_651_596_800), ("opt-6.7b", 6_658_473_984)):
        with torch.device("meta"):
            n = sum(p.numel() for p in OPT(PRESETS[name]).parameters())
        print(f"{name}: {n:,} parameters")
        assert n == count(PRESETS[name]) == expected, (name, n)


def test_linear_fast_path(monkeypatch):
    """linear.py: a few rows without autograd in fp32 go to oneDNN, anything else to F.linear; the results agree."""
    import nanoblip2.linear as lin
    if not lin.ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    calls = []
    f_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[0].shape) or f_linear(*a))
    layer = lin.Linear(37, 301)
    torch.manual_seed(0)
    few, many = torch.randn(2, 3, 37), torch.randn(lin.ROWS + 1, 37)
    with torch.no_grad():
        fast, slow = layer(few), layer(many)
        assert calls == [(lin.ROWS + 1, 37)]  # only the big one went to F.linear
        ref = f_linear(few, layer.weight, layer.bias)
    assert fast.shape == ref.shape and (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(slow, f_linear(many, layer.weight, layer.bias))
    y = layer(few)  # autograd on: F.linear, and gradients flow
    y.sum().backward()
    assert calls[-1] == (2, 3, 37) and layer.weight.grad is not None
    with torch.no_grad():  # other dtypes: F.linear
        layer.double()(few.double())
    assert calls[-1] == (2, 3, 37) and len(calls) == 3
