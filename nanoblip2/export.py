"""
Export: our models -> Hugging Face folders (config.json + model.safetensors + tokenizer) that transformers loads
with `from_pretrained`. The inverse of load.py, driven by the same per-family tables.

Notable details
- `save_weights` walks our state_dict, finds each key's entry in the loader's table and writes the tensor under the
  HF name. A table entry that combines tensors, `(fn, [HF templates])`, needs an inverse: a function from our
  tensor to {HF template: tensor}, `{i}` filled in from our key. Two inverses may write one HF tensor, each its
  own slice with zeros elsewhere: they are added (EVA's q and v biases become cat(q, 0, v)).
- What HF cannot hold is dropped, and each exporter prints what: stage 1's `temp` and ITG head (`qformer.lm_head`,
  absent from HF Blip2ForImageTextRetrieval). What HF needs but we do not keep is written as a no-op: BERT's
  token-type table as zeros, CLIP's k bias as zeros, CLIP's last layer (BLIP-2 never runs it) as an identity block
  (zero output projections), the post_layernorm of a bare ViT as an identity LayerNorm (weight 1, bias 0).
- Position embeddings are written at the model's own image size (interpolated at load time, if they were), and the
  config says that size.
- The <image> placeholder. transformers 5 has no legacy path: Blip2ForConditionalGeneration (forward and generate)
  scatters the projected queries into the positions of `image_token_index`, so the config must name one. The model's
  own id is kept (HF 2024 folders: OPT 50265, ...). Otherwise the first id past the tokenizer is used when the LM's
  embedding has spare rows there (OPT: 50265 of 50272 rows, FlanT5: 32100 of 32128, which is where HF's 2024
  uploads put it): no weight changes, and <image> is added to the written tokenizer at that id. Only when there is
  no spare row (or no tokenizer) does the vocabulary grow by one zero row: that token's logit is then exactly 0 in
  the exported model, and `generate` could pick it where every real token's logit is below 0 (never in practice).
- HF uses one LayerNorm eps for the whole vision tower, post_layernorm (= our ln_vision) included. A model whose
  ln_vision eps differs from its ViT's (a fresh stage 1: LAVIS 1e-5, EVA 1e-6) is written with the ViT's, with a
  warning: outputs move by ~1e-7 relative.
- Blip2 reads the end token from text_config, never from generation_config.json: for OPT, eos_token_id is written
  as the model's end token ("\\n", LAVIS). HF BLIP-2 has no CLIP vision tower (no ln_pre): such models are refused.
- T5: transformers 5 always ties lm_head to shared but keeps both when a file holds two different tensors. An untied
  head is written as `lm_head.weight`; `scale_decoder_outputs` (and the old `tie_word_embeddings`) say whether the
  decoder output is scaled.
- Files are written through a temporary name and renamed. The weights go to one model.safetensors (no sharding).
"""
import fnmatch
import json
import os
import warnings

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from . import opt as op
from . import qformer as qf
from . import t5 as t5m
from . import vit as vt
from .stage1 import Blip2Stage1
from .stage2 import Blip2
from .load import _template_regex

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# ---------------------------------------------------------------------------------------------------------
# The generic inverse of `load_weights`


def _match(table, key):
    """Our key -> (its template in `table`, the layer index or None); None if no template matches."""
    for ours in table:
        m = _template_regex(ours).match(key)
        if m:
            return ours, m.groupdict().get("i")
    return None


def state_to_hf(module, table, inverse=None, drop=(), extra=None):
    """Our state_dict -> {HF key: tensor}, strictly: every key must be written or dropped (fnmatch patterns)."""
    inverse, out, via_inverse, unmapped, no_inverse = inverse or {}, {}, set(), [], []
    for key, t in module.state_dict().items():
        if any(fnmatch.fnmatchcase(key, p) for p in drop):
            continue
        hit = _match(table, key)
        if hit is None:
            unmapped.append(key)
            continue
        template, i = hit
        fill = lambda s: s.format(i=i) if "{i}" in s else s
        if template in inverse:
            for name, v in inverse[template](t.detach()).items():
                name, v = fill(name), v.detach().cpu().contiguous().clone()
                if name in out and name not in via_inverse:
                    raise ValueError(f"{key}: HF tensor {name} is written twice")
                out[name] = out[name] + v if name in out else v  # each inverse fills its own slice
                via_inverse.add(name)
        elif isinstance(table[template], str):
            name = fill(table[template])
            if name in out:
                raise ValueError(f"{key}: HF tensor {name} is written twice")
            out[name] = t.detach().cpu().contiguous()
        else:
            no_inverse.append(key)
    if unmapped or no_inverse:
        raise ValueError(f"cannot export {type(module).__name__}: "
                         + (f"{len(unmapped)} keys not in the table: {', '.join(unmapped[:20])}. " if unmapped else "")
                         + (f"{len(no_inverse)} combined keys without an inverse: {', '.join(no_inverse[:20])}"
                            if no_inverse else ""))
    for name, v in (extra or {}).items():
        if name in out:
            raise ValueError(f"extra tensor {name} is also written from the model")
        out[name] = v.detach().cpu().contiguous()
    return out


def save_weights(module, path, table, inverse=None, drop=(), extra=None):
    """Write `module` as an HF safetensors file at `path`: the inverse of load_weights. Returns the tensor count."""
    tensors = state_to_hf(module, table, inverse, drop, extra)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return len(tensors)


def _prefixed(d, p):
    return {p + k: v for k, v in d.items()}


def _map_hf(table, f):
    """Apply f to every HF template of a table."""
    return {k: f(v) if isinstance(v, str) else (v[0], [f(s) for s in v[1]]) for k, v in table.items()}


def _write_json(folder, name, obj):
    path = os.path.join(folder, name)
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(path + ".tmp", path)


def _start(folder):
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        raise FileExistsError(f"{folder} holds a sharded checkpoint (model.safetensors.index.json), which would be "
                              "read instead of ours: export into an empty folder")


def _dtype(module):
    return str(next(p.dtype for p in module.parameters() if p.is_floating_point())).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------
# Per-family inverses and config writers (the inverses of the `from_hf` functions)


def vit_inverse(cfg, table):
    """Inverses of the combined entries of `vt.hf_keys(cfg)["table"]`."""
    C = cfg.width
    if not cfg.clip:
        (qkv,) = table["blocks.{i}.attn.q_bias"][1]
        z = lambda b: b.new_zeros(C)
        return {"pos_embed": lambda t: {table["pos_embed"][1][0]: t},  # already at the model's image size
                "blocks.{i}.attn.q_bias": lambda b: {qkv: torch.cat([b, z(b), z(b)])},
                "blocks.{i}.attn.v_bias": lambda b: {qkv: torch.cat([z(b), z(b), b])}}
    q, k, v = table["blocks.{i}.attn.qkv.weight"][1]
    return {"cls_token": lambda t: {table["cls_token"][1][0]: t.reshape(C)},
            "pos_embed": lambda t: {table["pos_embed"][1][0]: t.reshape(-1, C)},
            "blocks.{i}.attn.qkv.weight": lambda w: dict(zip((q, k, v), w.chunk(3))) | {  # k bias: see vit.py
                k.replace(".weight", ".bias"): w.new_zeros(C)}}


def _identity_clip_layer(cfg, like):
    """CLIP's last layer, which BLIP-2 never runs (vit.py), as an exact identity: both residual branches add zeros."""
    C, L, z, o = cfg.width, f"encoder.layers.{cfg.depth}.", like.new_zeros, like.new_ones
    t = {L + f"layer_norm{n}.{p}": (o if p == "weight" else z)(C) for n in (1, 2) for p in ("weight", "bias")}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t |= {L + f"self_attn.{name}.weight": z(C, C), L + f"self_attn.{name}.bias": z(C)}
    return t | {L + "mlp.fc1.weight": z(cfg.mlp, C), L + "mlp.fc1.bias": z(cfg.mlp),
                L + "mlp.fc2.weight": z(C, cfg.mlp), L + "mlp.fc2.bias": z(C)}


def vision_config(cfg):
    """Blip2VisionConfig (EVA layout) of a ViTConfig."""
    if cfg.clip:
        raise ValueError("HF BLIP-2 has no CLIP vision tower (it has no ln_pre): export the ViT alone with export_vit")
    return dict(model_type="blip_2_vision_model", hidden_size=cfg.width, intermediate_size=cfg.mlp,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, image_size=cfg.image_size,
                patch_size=cfg.patch_size, layer_norm_eps=cfg.eps, hidden_act=cfg.act,
                qkv_bias=True)


def clip_vision_config(cfg):
    return dict(architectures=["CLIPVisionModel"], model_type="clip_vision_model", hidden_size=cfg.width,
                intermediate_size=cfg.mlp, num_hidden_layers=cfg.depth + 1, num_attention_heads=cfg.heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.eps, hidden_act=cfg.act,
                num_channels=3)


def qformer_config(cfg, text):
    return dict(model_type="blip_2_qformer", hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.heads, intermediate_size=cfg.mlp, hidden_act="gelu",
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.eps,
                cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=cfg.vision_width,
                vocab_size=cfg.vocab_size, pad_token_id=0, use_qformer_text_input=text)


def opt_config(cfg, vocab_size=None):
    return dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=vocab_size or cfg.vocab_size,
                hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, ffn_dim=cfg.ffn_dim,
                max_position_embeddings=cfg.max_positions, word_embed_proj_dim=cfg.word_embed_proj_dim,
                do_layer_norm_before=cfg.pre_norm, _remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm,
                enable_bias=cfg.bias, layer_norm_elementwise_affine=cfg.ln_affine, activation_function="relu",
                pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
                tie_word_embeddings=cfg.tie_word_embeddings)


def t5_config(cfg, vocab_size=None):
    ffp = ("gated-" if cfg.gated else "") + cfg.act
    return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=vocab_size or cfg.vocab_size,
                d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.enc_depth,
                num_decoder_layers=cfg.dec_depth, num_heads=cfg.heads,
                relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
                layer_norm_epsilon=cfg.eps, feed_forward_proj=ffp, dense_act_fn=cfg.act, is_gated_act=cfg.gated,
                tie_word_embeddings=cfg.tie_word_embeddings, scale_decoder_outputs=cfg.tie_word_embeddings,
                is_encoder_decoder=True, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
                decoder_start_token_id=cfg.decoder_start_id)


def bert_config(cfg, vocab_size, architecture):
    return dict(architectures=[architecture], model_type="bert", vocab_size=vocab_size, hidden_size=cfg.width,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp,
                hidden_act="gelu", hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                max_position_embeddings=cfg.max_positions, type_vocab_size=2, layer_norm_eps=cfg.eps, pad_token_id=0)


def image_token(model):
    """(image_token_index, grow) for a stage-2 Blip2: see the module docstring."""
    if model.cfg.image_token_index is not None:
        return model.cfg.image_token_index, False
    V = model.cfg.lm.vocab_size
    n = len(model.tokenizer) if model.tokenizer is not None else V
    return (n, False) if n < V else (V, True)


def blip2_config(model):
    """config.json of a Blip2ForConditionalGeneration (our Blip2) or a Blip2ForImageTextRetrieval (our Blip2Stage1)."""
    cfg, stage1 = model.cfg, not hasattr(model, "lm")
    if cfg.ln_vision_eps != cfg.vit.eps:
        warnings.warn(f"ln_vision eps {cfg.ln_vision_eps} differs from the ViT's {cfg.vit.eps}; HF has one eps for "
                      f"both, so post_layernorm is written with {cfg.vit.eps}")
    d = dict(architectures=["Blip2ForImageTextRetrieval" if stage1 else "Blip2ForConditionalGeneration"],
             model_type="blip-2", num_query_tokens=cfg.qformer.num_query_tokens, vision_config=vision_config(cfg.vit),
             qformer_config=qformer_config(cfg.qformer, text=stage1), dtype=_dtype(model))
    if stage1:
        return d | dict(image_text_hidden_size=cfg.embed_dim)
    index, grow = image_token(model)
    V = cfg.lm.vocab_size + grow
    text = t5_config(cfg.lm, V) if model.is_t5 else opt_config(cfg.lm, V)
    del text["architectures"]
    text["eos_token_id"] = model.end_id  # OPT: "\n" (LAVIS); HF's generate reads it from here
    return d | dict(text_config=text, image_token_index=index, is_encoder_decoder=model.is_t5,
                    use_decoder_only_language_model=not model.is_t5)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and processor files


def save_tokenizer(tok, folder, kind, image_token_index=None, image_size=None, num_query_tokens=None):
    """Our Tokenizer ("opt", "t5" or "bert") -> tokenizer.json + tokenizer_config.json (+ the Blip2Processor files
    when image_size is given). <image> is added when `image_token_index` is the next free id."""
    tk = HFTokenizer.from_str(tok.tk.to_str())  # a copy: no padding/truncation state, the model's is untouched
    tk.no_padding()
    tk.no_truncation()
    name = lambda i: None if i is None else tk.id_to_token(i)
    if image_token_index is not None and tk.token_to_id("<image>") is None and image_token_index == len(tok):
        tk.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tk.save(os.path.join(folder, "tokenizer.json"))
    if kind == "opt":
        cfg = dict(tokenizer_class="GPT2Tokenizer", add_bos_token=True, add_prefix_space=False,
                   bos_token=name(tok.bos_id), eos_token=name(tok.eos_id), unk_token=name(tok.eos_id),
                   pad_token=name(tok.pad_id))
    elif kind == "t5":
        extra = sum(t.startswith("<extra_id_") for t in tk.get_vocab())
        cfg = dict(tokenizer_class="T5Tokenizer", model_max_length=512, eos_token=name(tok.eos_id),
                   pad_token=name(tok.pad_id), unk_token="<unk>", extra_ids=extra)
    else:
        cfg = dict(tokenizer_class="BertTokenizer", model_max_length=512, do_lower_case=True, cls_token="[CLS]",
                   sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    _write_json(folder, "tokenizer_config.json", cfg)
    _write_json(folder, "special_tokens_map.json", {k: v for k, v in cfg.items() if k.endswith("_token")})
    if image_size is not None:
        _write_json(folder, "preprocessor_config.json", dict(
            image_processor_type="BlipImageProcessor", processor_class="Blip2Processor", do_resize=True,
            size=dict(height=image_size, width=image_size), resample=3, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True))
        _write_json(folder, "processor_config.json", dict(processor_class="Blip2Processor",
                                                          num_query_tokens=num_query_tokens))


# ---------------------------------------------------------------------------------------------------------
# Whole models


def _vit_inverse(cfg):
    """The inverses for the combined vit.* entries of a BLIP-2 model's table."""
    return _prefixed(vit_inverse(cfg.vit, vt.hf_keys(cfg.vit)["table"]), "vit.")


def _report(kind, folder, n, dropped=()):
    print(f"exported {kind} to {folder}: {n} tensors" + (f"; dropped {', '.join(dropped)}" if dropped else ""))


def export_blip2(model, folder):
    """Our stage-2 Blip2 -> a Blip2ForConditionalGeneration folder (weights, config, tokenizer, processor files)."""
    cfg = model.cfg
    _start(folder)
    table, inverse = Blip2.hf_table(cfg)[0], _vit_inverse(cfg)
    drop = ["qformer.word_embeddings.*", "qformer.position_embeddings.*", "qformer.layers.*.ffn_text.*",
            "qformer.lm_head.*"]  # a stage-1 text branch, if any: Blip2ForConditionalGeneration has none
    index, grow = image_token(model)
    if grow:  # one zero row for <image> in the embedding and an untied head
        for key in ("lm.shared.weight" if model.is_t5 else "lm.embed_tokens.weight", "lm.lm_head.weight"):
            if isinstance(table.get(key), str):
                inverse[key] = lambda w, name=table[key]: {name: torch.cat([w, w.new_zeros(1, w.size(1))])}
    config = blip2_config(model)
    n = save_weights(model, os.path.join(folder, "model.safetensors"), table, inverse, drop)
    _write_json(folder, "config.json", config)
    lm = config["text_config"]
    gen = {k: lm[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id") if k in lm}
    _write_json(folder, "generation_config.json", gen)
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, folder, "t5" if model.is_t5 else "opt", index, cfg.vit.image_size,
                       cfg.qformer.num_query_tokens)
    _report("Blip2ForConditionalGeneration", folder, n, ["the Q-Former's text branch"] if cfg.qformer.text else [])
    return folder


def export_stage1(model, folder, tokenizer=None):
    """Our Blip2Stage1 -> a Blip2ForImageTextRetrieval folder. HF has no `temp` and no ITG head: both are dropped,
    so a reloaded model starts from temp 0.07 and cannot caption."""
    cfg = model.cfg
    _start(folder)
    table, inverse = Blip2Stage1.hf_table(cfg), _vit_inverse(cfg)
    drop = ["temp", "qformer.lm_head.*"]
    config = blip2_config(model)
    n = save_weights(model, os.path.join(folder, "model.safetensors"), table, inverse, drop)
    _write_json(folder, "config.json", config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, "bert", image_size=cfg.vit.image_size)  # no <image> tokens in the text
    _report("Blip2ForImageTextRetrieval", folder, n,
            ["temp"] + (["qformer.lm_head (ITG)"] if model.qformer.lm_head is not None else []))
    return folder


# ---------------------------------------------------------------------------------------------------------
# Single components, in their own families' layouts, readable by our loaders and by transformers


def export_vit(vit, folder):
    """EVA: a BLIP-2 folder holding only vision_model.* (post_layernorm = identity LN), read back by
    `ViTConfig.from_hf` + `vt.hf_keys`; transformers' Blip2VisionModel reads it with
    key_mapping={r"^vision_model\\.": ""}. CLIP: a CLIPVisionModel folder, with an identity last layer."""
    cfg = vit.cfg
    _start(folder)
    table = vt.hf_keys(cfg)["table"]
    like = vit.blocks[0].norm1.weight.detach()
    if cfg.clip:
        extra = _identity_clip_layer(cfg, like) | {"post_layernorm.weight": like.new_ones(cfg.width),
                                                   "post_layernorm.bias": like.new_zeros(cfg.width)}
        config = clip_vision_config(cfg)
    else:
        extra = {"vision_model.post_layernorm.weight": like.new_ones(cfg.width),
                 "vision_model.post_layernorm.bias": like.new_zeros(cfg.width)}
        config = dict(architectures=["Blip2VisionModel"], model_type="blip-2", vision_config=vision_config(cfg))
    n = save_weights(vit, os.path.join(folder, "model.safetensors"), table, vit_inverse(cfg, table), extra=extra)
    _write_json(folder, "config.json", config | dict(dtype=_dtype(vit)))
    _report("CLIPVisionModel" if cfg.clip else "BLIP-2 vision model", folder, n)
    return folder


def export_bert(qformer, folder, keep_dec=False):
    """The text branch of a Q-Former -> a BertForMaskedLM folder (BertModel without an ITG head), read back by
    `Blip2Stage1.from_vit_bert`. Cross-attention and the query FFN are not BERT's and are dropped. The last word
    row ([DEC], appended when the Q-Former was built from BERT) is dropped unless keep_dec."""
    cfg = qformer.cfg
    if not cfg.text:
        raise ValueError("this Q-Former has no text branch (stage-2 form): nothing to export as BERT")
    _start(folder)
    V, C = cfg.vocab_size - (not keep_dec), cfg.width
    mlm = qformer.lm_head is not None
    table = _map_hf(qf.bert_table(cfg), lambda s: s if s.startswith("cls.") or not mlm else "bert." + s)
    (words,), (pos, types) = table["word_embeddings.weight"][1], table["position_embeddings.weight"][1]
    inverse = {"word_embeddings.weight": lambda w: {words: w[:V]},
               "position_embeddings.weight": lambda p: {pos: p, types: p.new_zeros(2, C)}}  # BERT adds types[0] = 0
    if mlm:
        inverse["lm_head.bias"] = lambda b: {table["lm_head.bias"][1][0]: b[:V]}
    drop = ["layers.*.cross.*", "layers.*.ffn_query.*"]
    n = save_weights(qformer, os.path.join(folder, "model.safetensors"), table, inverse, drop)
    config = bert_config(cfg, V, "BertForMaskedLM" if mlm else "BertModel")
    _write_json(folder, "config.json", config | dict(dtype=_dtype(qformer)))
    _report(config["architectures"][0], folder, n, ["cross-attention", "query FFN"] + ["[DEC] row"] * (not keep_dec))
    return folder


def export_opt(opt, folder, tokenizer=None):
    """Our OPT -> an OPTForCausalLM folder (model.decoder.*, lm_head.weight only when untied)."""
    _start(folder)
    table = _map_hf(op.hf_keys(opt.cfg)["table"], lambda s: s.removeprefix("language_model."))
    n = save_weights(opt, os.path.join(folder, "model.safetensors"), table)
    _write_json(folder, "config.json", opt_config(opt.cfg) | dict(dtype=_dtype(opt)))
    c = opt.cfg
    _write_json(folder, "generation_config.json",
                dict(bos_token_id=c.bos_id, eos_token_id=c.eos_id, pad_token_id=c.pad_id))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, "opt")
    _report("OPTForCausalLM", folder, n)
    return folder


def export_t5(t5, folder, tokenizer=None):
    """Our T5 -> a T5ForConditionalGeneration folder (lm_head.weight written when the head is untied)."""
    _start(folder)
    n = save_weights(t5, os.path.join(folder, "model.safetensors"), t5m.hf_keys(t5.cfg)["table"])
    _write_json(folder, "config.json", t5_config(t5.cfg) | dict(dtype=_dtype(t5)))
    c = t5.cfg
    _write_json(folder, "generation_config.json",
                dict(decoder_start_token_id=c.decoder_start_id, eos_token_id=c.eos_id, pad_token_id=c.pad_id))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, "t5")
    _report("T5ForConditionalGeneration", folder, n)
    return folder
