"""T5 / FlanT5 vs transformers on tiny random models, loaded through our own loader. Tolerance: max abs diff <= 1e-5."""
import json
import os

import pytest
import torch
from conftest import QFORMER, VISION, randomize, save, text_batch
from safetensors.torch import save_file

from nanoblip2 import t5
from nanoblip2.load import CheckpointError, load_weights

TOL = 1e-5
V = 99
T5 = dict(vocab_size=V, d_model=48, d_kv=16, d_ff=37, num_heads=3, num_layers=2, num_decoder_layers=3,
          relative_attention_num_buckets=8, relative_attention_max_distance=20, layer_norm_epsilon=1e-5)
ORIGINAL = dict(T5, feed_forward_proj="relu")  # tied head, scaled decoder output
FLAN = dict(T5, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False)  # as in BLIP-2


def close(a, b, what, tol=TOL):
    diff = (a - b).abs().max().item()
    print(f"{what}: max abs diff {diff:.2e}")
    assert a.shape == b.shape and diff <= tol, f"{what}: {diff}"


def untie(lm):
    """transformers 5 builds every T5 with lm_head tied to shared; FlanT5 checkpoints have their own head."""
    lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.lm_head.weight))
    return lm


def t5_model(kw, seed):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    hf = T5ForConditionalGeneration(T5Config(**kw))
    return randomize(untie(hf) if kw.get("tie_word_embeddings") is False else hf, seed=seed)


@pytest.fixture(scope="module", params=["original", "flan"])
def t5_folder(request, tmp_path_factory):
    hf = t5_model(ORIGINAL if request.param == "original" else FLAN, seed=3)
    return save(hf, tmp_path_factory.mktemp(request.param)), hf


@pytest.fixture(scope="module")
def flan_folder(tmp_path_factory):
    hf = t5_model(FLAN, seed=4)
    return save(hf, tmp_path_factory.mktemp("flan")), hf


def batch(B=3, S=9, T=6):
    ids, mask = text_batch(V, B, S, seed=1)
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), text_batch(V, B, T - 1, seed=2)[0]], dim=1)  # start id 0
    return ids, mask, dec


def test_config_from_hf(t5_folder):
    folder, _ = t5_folder
    cfg = t5.T5Config.from_hf(json.load(open(os.path.join(folder, "config.json"))))
    flan = "flan" in os.path.basename(folder)
    assert (cfg.act, cfg.gated, cfg.tie_word_embeddings) == (("gelu", True, False) if flan else ("relu", False, True))
    assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.heads, cfg.enc_depth, cfg.dec_depth) == (48, 16, 37, 3, 2, 3)
    assert (cfg.num_buckets, cfg.max_distance, cfg.eps, cfg.vocab_size) == (8, 20, 1e-5, V)
    # google/flan-t5-xl's config.json (transformers 4.23 era): gated-gelu means gelu_new, untied head
    hub = dict(d_ff=5120, d_kv=64, d_model=2048, decoder_start_token_id=0, dense_act_fn="gelu_new",
               feed_forward_proj="gated-gelu", model_type="t5", num_decoder_layers=24, num_heads=32, num_layers=24,
               tie_word_embeddings=False, vocab_size=32128)
    assert t5.T5Config.from_hf(hub) == t5.T5Config(act="gelu_new")
    hub.pop("dense_act_fn")
    assert t5.T5Config.from_hf(hub).act == "gelu_new"
    assert t5.T5Config.from_hf({"model_type": "blip-2", "text_config": dict(hub, dense_act_fn="gelu")}) == t5.PRESETS["flan-t5-xl"]
    # HF defaults when config.json is minimal: original T5-small
    assert t5.T5Config.from_hf({"model_type": "t5"}) == t5.T5Config(
        d_model=512, d_ff=2048, heads=8, enc_depth=6, dec_depth=6, act="relu", gated=False, tie_word_embeddings=True)
    with pytest.raises(ValueError):
        t5.T5Config.from_hf({"model_type": "blip-2", "text_config": {"model_type": "opt"}})


@torch.no_grad()
def test_encoder_with_padding(t5_folder):
    folder, hf = t5_folder
    ours = t5.T5.from_pretrained(folder)
    ids, mask, _ = batch()
    ref = hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    close(ours.encode(ids, attention_mask=mask), ref, f"encoder with padding ({os.path.basename(folder)})")


@torch.no_grad()
def test_decoder_logits(t5_folder):
    folder, hf = t5_folder
    ours = t5.T5.from_pretrained(folder)
    assert (ours.lm_head is None) == ("original" in os.path.basename(folder))
    ids, mask, dec = batch()
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    logits, cache = ours.decode(dec, ours.encode(ids, attention_mask=mask), mask)
    close(logits, ref, f"decoder logits ({os.path.basename(folder)})")
    assert len(cache) == 3 and all(t.shape == (3, 3, s, 16) for layer in cache for t, s in zip(layer, (6, 6, 9, 9)))


@torch.no_grad()
def test_inputs_embeds_path(flan_folder):
    folder, hf = flan_folder
    ours = t5.T5.from_pretrained(folder)
    ids, mask, dec = batch()
    emb = ours.embed(ids)
    close(ours.encode(inputs_embeds=emb, attention_mask=mask), ours.encode(ids, attention_mask=mask), "inputs_embeds == ids")
    # the BLIP-2 way: projected queries, then text embeddings, with the mask extended by ones
    q = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(5))
    x, m = torch.cat([q, emb], 1), torch.cat([torch.ones(3, 5, dtype=mask.dtype), mask], 1)
    ref = hf(inputs_embeds=x, attention_mask=m, decoder_input_ids=dec)
    enc = ours.encode(inputs_embeds=x, attention_mask=m)
    close(enc, ref.encoder_last_hidden_state, "encoder on [queries; text]")
    close(ours.decode(dec, enc, m)[0], ref.logits, "decoder logits on [queries; text]")


def one_token_at_a_time(step, dec):
    logits, cache = [], None
    for t in range(dec.size(1)):
        out, cache = step(dec[:, t:t + 1], cache)
        logits.append(out)
    return torch.cat(logits, 1), cache


@torch.no_grad()
def test_cached_decoding(t5_folder):
    folder, hf = t5_folder
    name = os.path.basename(folder)
    ours = t5.T5.from_pretrained(folder)
    ids, mask, dec = batch(T=7)
    enc = ours.encode(ids, attention_mask=mask)
    # fp32 against HF's own KV-cached decoding. The FlanT5 logits reach ~6 and this model amplifies rounding: cached
    # vs full differs by ~2e-5 in fp32 in both, and our one-row products go through oneDNN (linear.py), which sums in
    # another order than HF's MKL (measured 2.0e-5). So 1e-5 relative to the logits here; fp64 below is exact.
    cached, cache = one_token_at_a_time(lambda x, c: ours.decode(x, enc, mask, c), dec)
    ref, _ = one_token_at_a_time(lambda x, c: (lambda o: (o.logits, o.cache))(
        hf(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=x, cache=c, use_cache=True)), dec)
    close(cached, ref, f"cached one-token decoding vs HF cached ({name})", TOL * max(1.0, ref.abs().max().item()))
    assert [tuple(t.shape[2] for t in layer) for layer in cache] == [(7, 7, 9, 9)] * 3
    # in fp64 the cache must reproduce the full decode exactly: a wrong bias row or mask shows up as O(1)
    ours, enc = ours.double(), enc.double()
    full, _ = ours.decode(dec, enc, mask)
    cached, _ = one_token_at_a_time(lambda x, c: ours.decode(x, enc, mask, c), dec)
    close(cached, full, f"cached one-token decoding vs full, fp64 ({name})")
    # a prefix of 4 at once, then reorder the batch as beam search does and continue
    _, cache = ours.decode(dec[:, :4], enc, mask)
    idx = torch.tensor([2, 0, 0])
    cache = [tuple(t[idx] for t in layer) for layer in cache]
    rest, _ = ours.decode(dec[idx, 4:], enc[idx], mask[idx], cache)
    close(rest, ours.decode(dec[idx], enc[idx], mask[idx])[0][:, 4:], f"reordered cache, fp64 ({name})")


@torch.no_grad()
def test_prefill_and_step(t5_folder):
    """Generation's interface, in fp64: prefill (the encoder, then the start token) and one step per token equal the
    full decode; the cache-free path (prefill with the tokens so far) too; expand and reorder pick batch rows."""
    folder, _ = t5_folder
    ours = t5.T5.from_pretrained(folder).double()
    ids, mask, dec = batch(T=7)  # dec[:, 0] is the start id
    emb = ours.embed(ids)
    full, _ = ours.decode(dec, ours.encode(inputs_embeds=emb, attention_mask=mask), mask)  # (B, 7, V)
    logits, cache = ours.prefill(emb, mask)
    steps = [logits]
    for t in range(1, dec.size(1) - 1):
        logits, cache = ours.step(dec[:, t], cache)
        steps.append(logits)
    close(torch.stack(steps, 1), full[:, :-1], "prefill + steps vs full decode")
    assert cache.mask is mask and [tuple(t.shape[2] for t in layer) for layer in cache.layers] == [(6, 6, 9, 9)] * 3
    close(ours.prefill(emb, mask, dec[:, 1:])[0], full[:, -1], "prefill with tokens")
    rows = torch.tensor([5, 0, 2, 2, 1, 4])  # of 3 items x 2 beams
    stepped, _ = ours.step(dec[:, -1].repeat_interleave(2)[rows], cache.expand(2).reorder(rows))
    close(stepped, full[:, -1].repeat_interleave(2, dim=0)[rows], "expanded and reordered cache, one step")

@pytest.fixture(scope="module", params=["saved-tied", "untied"])
def blip2_folder(request, tmp_path_factory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    torch.manual_seed(6)
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=dict(FLAN, model_type="t5"),
                      num_query_tokens=5)
    hf = Blip2ForConditionalGeneration(cfg)
    if request.param == "untied":  # the layout of the Salesforce/blip2-flan-t5-* checkpoints
        untie(hf.language_model)
    randomize(hf, seed=6)
    return save(hf, tmp_path_factory.mktemp("blip2-" + request.param)), hf


@torch.no_grad()
def test_lm_from_blip2_folder(blip2_folder):
    folder, hf = blip2_folder
    lm = hf.language_model
    tied = lm.lm_head.weight is lm.shared.weight
    keys = set(json.load(open(os.path.join(folder, "config.json")))["text_config"]) & {"tie_word_embeddings", "scale_decoder_outputs"}
    print(f"tied in memory: {tied}; config keys written: {sorted(keys)}")
    ours = t5.T5.from_pretrained(folder)
    assert ours.cfg.act == "gelu" and ours.cfg.gated and ours.lm_head is not None
    ids, mask, dec = batch()
    ref = lm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    close(ours.decode(dec, ours.encode(ids, attention_mask=mask), mask)[0], ref,
          f"BLIP-2 language_model logits ({os.path.basename(folder)})")


@torch.no_grad()
def test_strict_and_duplicated_keys(flan_folder, tmp_path):
    folder, hf = flan_folder
    cfg = t5.T5Config.from_hf(json.load(open(os.path.join(folder, "config.json"))))
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    assert {"shared.weight", "lm_head.weight", "encoder.embed_tokens.weight"} <= set(sd)

    def load(state):
        save_file(state, str(tmp_path / "model.safetensors"))
        ours = t5.T5(cfg).eval()
        load_weights(ours, str(tmp_path), **t5.hf_keys(cfg, head_saved="lm_head.weight" in state))
        return ours

    ids, mask, dec = batch()
    ours = load(sd)  # the hub layout: embed_tokens and old cross-attention bias copies next to shared
    close(ours.decode(dec, ours.encode(ids, attention_mask=mask), mask)[0],
          hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, "hub layout with embed_tokens copies")
    with pytest.raises(CheckpointError, match="unexpected"):
        load(sd | {"encoder.block.0.layer.0.SelfAttention.q.bias": torch.zeros(48)})
    with pytest.raises(CheckpointError, match="missing"):
        load({k: v for k, v in sd.items() if k != "decoder.block.2.layer.1.EncDecAttention.k.weight"})
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load(sd | {"decoder.final_layer_norm.weight": torch.ones(47)})


@torch.no_grad()
def test_exact_gelu_matters(flan_folder):
    """BLIP-2 runs FlanT5 with exact GELU; the tanh approximation is measurably different, so this test can fail."""
    folder, hf = flan_folder
    cfg = t5.T5Config.from_hf(json.load(open(os.path.join(folder, "config.json"))))
    cfg.act = "gelu_new"
    ours = t5.T5(cfg).eval()
    load_weights(ours, folder, **t5.hf_keys(cfg))
    ids, mask, dec = batch()
    diff = (ours.decode(dec, ours.encode(ids, attention_mask=mask), mask)[0]
            - hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits).abs().max().item()
    print(f"gelu_new instead of gelu: max abs diff {diff:.2e}")
    assert diff > 100 * TOL


def n_params(cfg):
    """Untied head; per layer q, k, v, o (+ cross q, k, v, o), gated FFN, 2 (3) RMSNorms; two bias tables, two final norms."""
    C, inner, ffn = cfg.d_model, cfg.heads * cfg.d_kv, (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
    enc = 4 * C * inner + ffn + 2 * C
    dec = 8 * C * inner + ffn + 3 * C
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * C
    return cfg.vocab_size * C + head + cfg.enc_depth * enc + cfg.dec_depth * dec + 2 * cfg.num_buckets * cfg.heads + 2 * C


@pytest.mark.parametrize("name,expected", [("flan-t5-xl", 2_849_757_184), ("flan-t5-xxl", 11_135_332_352)])
def test_preset_parameter_count(name, expected):
    with torch.device("meta"):
        m = t5.T5(t5.PRESETS[name])
    n = sum(p.numel() for p in m.parameters())
    print(f"{name}: {n:,} parameters")
    assert n == n_params(t5.PRESETS[name]) == expected


def test_shapes_t5_starts_as_transformers_initialises_t5():
    """data/shapes/pretrain.py's init_t5 against transformers' own T5 init, per kind of weight (its std)."""
    import runpy
    from pathlib import Path

    from transformers import T5Config, T5ForConditionalGeneration
    init_t5 = runpy.run_path(str(Path(__file__).resolve().parents[1] / "data" / "shapes" / "pretrain.py"))["init_t5"]
    kw = dict(vocab_size=301, d_model=72, d_kv=20, d_ff=136, num_heads=3, num_layers=2, num_decoder_layers=3)
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(**kw, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    ours = init_t5(t5.T5(t5.T5Config(vocab_size=301, d_model=72, d_kv=20, d_ff=136, heads=3, enc_depth=2, dec_depth=3,
                                     act="gelu_new", gated=True)))
    kinds = {"q": ".q.", "k": ".k.", "v": ".v.", "o": ".o.", "wi_0": "wi_0", "wi_1": "wi_1", "wo": ".wo.",
             "bias": "relative_attention_bias", "shared": "shared"}
    ours_kinds = kinds | {"bias": "rel_bias"}
    def std(model, key):
        return torch.cat([p.flatten() for n, p in model.named_parameters() if key in n and "norm" not in n]).std()
    for kind, key in kinds.items():
        assert abs(std(ours, ours_kinds[kind]) / std(hf, key) - 1) < 0.15, kind
    assert abs(std(ours, "lm_head") * 72 ** 0.5 - 1) < 0.05  # transformers: 1 (and it ties the head it builds)
    assert all(p.eq(1).all() for n, p in ours.named_parameters() if n.endswith("ln1.weight"))
