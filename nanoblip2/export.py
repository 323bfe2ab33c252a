"""
Export: our models -> Hugging Face folders (config.json, model.safetensors, tokenizer) that transformers loads with
`from_pretrained`: the loaders read backwards, weights through the same `hf_keys` tables, configs through `to_hf`.
`python -m nanoblip2.export out/stage1 hf/stage1` turns one of our stage-1 or stage-2 checkpoints (or an HF BLIP-2
folder) into a Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration folder; a stage-2 model whose Q-Former reads
the instruction into an InstructBlipForConditionalGeneration folder (its BERT tokenizer in qformer_tokenizer/).

Notable details
- A table entry `(fn, [HF templates], inverse)` writes what its inverse returns, one tensor per template. Two
  inverses may write one HF tensor, each its own slice with zeros elsewhere: they add up (EVA's cat(q, 0, v) bias).
- Dropped, and printed: stage 1's `temp` and ITG head. Written as no-ops that HF needs: BERT's token-type table
  and CLIP's k bias (zeros), CLIP's last layer (an identity block), a bare ViT's post_layernorm (identity).
- <image>: transformers 5 puts the queries at the positions of `image_token_index`: the model's own (HF 2024
  folders), else the first id past the tokenizer where the LM's embedding has a spare row (OPT 50265 of 50272,
  FlanT5 32100 of 32128, as HF's uploads), added to the tokenizer. With no spare row (or no tokenizer) the
  vocabulary grows by one zero row, whose logit is then exactly 0.
- HF has one eps for the vision tower and post_layernorm (our ln_vision): another ln_vision eps (a fresh stage 1:
  LAVIS 1e-5) is written as the ViT's, with a warning. HF BLIP-2 has no CLIP vision tower: such models are refused.
- For OPT, text_config's eos_token_id is the model's end token ("\\n", LAVIS), which Blip2 and HF's generate read.
- Files go through a temporary name; the weights to one model.safetensors in the model's dtype.
"""
import fnmatch
import json
import os
import sys
import warnings

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from . import opt as op
from . import qformer as qf
from . import t5 as t5m
from . import vit as vt
from .data import CLIP_MEAN, CLIP_STD
from .hub import resolve
from .load import match, prefixed, read_config
from .stage1 import Blip2Stage1
from .stage2 import Blip2
from .tokenizer import load_bert_tokenizer


def state_to_hf(module, table, drop=()):
    """Our state_dict -> {HF key: tensor}, strictly: every key must be written or dropped (fnmatch patterns)."""
    out, summed, unmapped, no_inverse = {}, set(), [], []
    for key, t in module.state_dict().items():
        if any(fnmatch.fnmatchcase(key, p) for p in drop):
            continue
        hit = match(table, key)
        if hit is None or not isinstance(hit[0], str) and len(hit[0]) < 3:
            (unmapped if hit is None else no_inverse).append(key)
            continue
        (entry, names), combined = hit, not isinstance(hit[0], str)
        for name, v in zip(names, entry[2](t.detach()) if combined else [t.detach()], strict=True):
            v = v.cpu().contiguous().clone() if combined else v.cpu().contiguous()  # an inverse may return views
            if name in out and not (combined and name in summed):
                raise ValueError(f"{key}: HF tensor {name} is written twice")
            out[name] = out[name] + v if name in out else v  # each inverse fills its own slice
            if combined:
                summed.add(name)
    if unmapped or no_inverse:
        raise ValueError(f"cannot export {type(module).__name__}: " + " ".join(
            f"{len(keys)} {what}: {', '.join(keys[:20])}." for what, keys in (
                ("keys not in the table", unmapped), ("combined keys without an inverse", no_inverse)) if keys))
    return out


def save_weights(module, path, table, drop=()):
    """Write `module` as an HF safetensors file at `path`: the inverse of load_weights. Returns the tensor count."""
    return _write(*os.path.split(path), state_to_hf(module, table, drop))


def _write(folder, name, obj):
    """folder/name through a temporary name: {HF key: tensor} as safetensors, anything else as JSON."""
    path = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    if not name.endswith(".safetensors"):
        with open(path + ".tmp", "w") as fh:
            fh.write(json.dumps(obj, indent=2) + "\n")
    elif os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        raise FileExistsError(f"{folder} holds a sharded checkpoint (model.safetensors.index.json), which would be "
                              "read instead of ours: export into an empty folder")
    else:
        save_file(obj, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return len(obj)


def _dtype(module):
    return str(next(p.dtype for p in module.parameters() if p.is_floating_point())).removeprefix("torch.")


def _report(kind, folder, n, dropped=()):  # prints what was written; -> the folder
    print(f"exported {kind} to {folder}: {n} tensors" + (f"; dropped {', '.join(dropped)}" if dropped else "")
          + f"\n  {folder} now holds {', '.join(sorted(f for f in os.listdir(folder) if not f.endswith('.tmp')))}")
    return folder


def _generation(config):  # generation_config.json: the special ids of an LM's config
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            if k in config}


def blip2_config(model):
    """config.json of a Blip2ForConditionalGeneration (our Blip2), an InstructBlipForConditionalGeneration (our Blip2
    whose Q-Former reads the instruction) or a Blip2ForImageTextRetrieval (our Blip2Stage1)."""
    cfg, stage1 = model.cfg, not hasattr(model, "lm")
    instruct = not stage1 and cfg.qformer.text
    if cfg.vit.clip:
        raise ValueError("HF BLIP-2 has no CLIP vision tower (it has no ln_pre): export the ViT alone with export_vit")
    if cfg.ln_vision_eps != cfg.vit.eps:
        warnings.warn(f"ln_vision eps {cfg.ln_vision_eps} differs from the ViT's {cfg.vit.eps}; HF has one eps for "
                      f"both, so post_layernorm is written with {cfg.vit.eps}")
    arch = "Blip2ForImageTextRetrieval" if stage1 else "Blip2ForConditionalGeneration"
    d = dict(architectures=["InstructBlipForConditionalGeneration" if instruct else arch],
             model_type="instructblip" if instruct else "blip-2", num_query_tokens=cfg.qformer.num_query_tokens,
             vision_config=cfg.vit.to_hf() | (dict(model_type="instructblip_vision_model") if instruct else {}),
             qformer_config=cfg.qformer.to_hf(text=stage1, instruct=instruct), dtype=_dtype(model))
    if stage1:
        return d | dict(image_text_hidden_size=cfg.embed_dim)
    index, V = cfg.image_token_index, cfg.lm.vocab_size
    if index is None:  # the first id past the tokenizer, or V (a new row) when the embedding has no spare one
        index = min(V, len(model.tokenizer) if model.tokenizer is not None else V)
    grow = cfg.image_token_index is None and index == V
    text = cfg.lm.to_hf() | dict(vocab_size=V + grow, eos_token_id=model.end_id)
    del text["architectures"]
    return d | dict(text_config=text, image_token_index=index, is_encoder_decoder=model.is_t5,
                    use_decoder_only_language_model=not model.is_t5)


def save_tokenizer(tok, folder, kind, image_token_index=None, image_size=None, num_query_tokens=None,
                   processor="Blip2Processor"):
    """Our Tokenizer ("opt", "t5" or "bert") -> tokenizer.json + tokenizer_config.json (+ the files of `processor`
    when image_size is given). <image> is added when `image_token_index` is the next free id."""
    os.makedirs(folder, exist_ok=True)
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
    _write(folder, "tokenizer_config.json", cfg)
    _write(folder, "special_tokens_map.json", {k: v for k, v in cfg.items() if k.endswith("_token")})
    if image_size is not None:
        _write(folder, "preprocessor_config.json", dict(
            image_processor_type="BlipImageProcessor", processor_class=processor, do_resize=True,
            size=dict(height=image_size, width=image_size), resample=3, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True))
        _write(folder, "processor_config.json", dict(processor_class=processor, num_query_tokens=num_query_tokens))

# ---------------------------------------------------------------------------------------------------------
# Whole models, then single components in their own families' layouts, readable by our loaders and transformers


def export_blip2(model, folder):
    """Our stage-2 Blip2 -> a Blip2ForConditionalGeneration folder (weights, config, tokenizer, processor files), or
    an InstructBlipForConditionalGeneration folder when the Q-Former reads the instruction (+ qformer_tokenizer/)."""
    cfg = model.cfg
    table = Blip2.hf_keys(cfg)["table"]
    config = blip2_config(model)
    index = config["image_token_index"]
    if config["text_config"]["vocab_size"] > cfg.lm.vocab_size:  # a zero row for <image>: embedding, untied head
        for key in ("lm.shared.weight" if model.is_t5 else "lm.embed_tokens.weight", "lm.lm_head.weight"):
            table[key] = (None, [table[key]], lambda w: [torch.cat([w, w.new_zeros(1, w.size(1))])])
    n = save_weights(model, os.path.join(folder, "model.safetensors"), table)
    _write(folder, "config.json", config)
    _write(folder, "generation_config.json", _generation(config["text_config"]))
    processor = "InstructBlipProcessor" if cfg.qformer.text else "Blip2Processor"
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, folder, "t5" if model.is_t5 else "opt", index, cfg.vit.image_size,
                       cfg.qformer.num_query_tokens, processor)
    if cfg.qformer.text and model.qformer_tokenizer is not None:  # where InstructBlipProcessor looks for it
        save_tokenizer(model.qformer_tokenizer, os.path.join(folder, "qformer_tokenizer"), "bert")
    return _report(config["architectures"][0], folder, n)


def export_stage1(model, folder, tokenizer=None):
    """Our Blip2Stage1 -> a Blip2ForImageTextRetrieval folder; reloaded, it starts from temp 0.07 and cannot caption."""
    cfg = model.cfg
    config = blip2_config(model)
    n = save_weights(model, os.path.join(folder, "model.safetensors"), Blip2Stage1.hf_keys(cfg)["table"],
                     drop=["temp", "qformer.lm_head.*"])
    _write(folder, "config.json", config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, "bert", image_size=cfg.vit.image_size)  # no <image> tokens in the text
    return _report("Blip2ForImageTextRetrieval", folder, n,
                   ["temp"] + (["qformer.lm_head (ITG)"] if model.qformer.lm_head is not None else []))


def export_vit(vit, folder):
    """EVA: a BLIP-2 folder of vision_model.* only, read back by `ViTConfig.from_hf` + `vt.hf_keys` (transformers'
    Blip2VisionModel: key_mapping={r"^vision_model\\.": ""}). CLIP: a CLIPVisionModel folder."""
    cfg = vit.cfg
    tensors = state_to_hf(vit, vt.hf_keys(cfg)["table"])
    like = vit.blocks[0].norm1.weight.detach().cpu()
    post = "post_layernorm." if cfg.clip else "vision_model.post_layernorm."
    tensors |= {post + "weight": torch.ones_like(like), post + "bias": torch.zeros_like(like)}
    if cfg.clip:  # the last layer: layer 0's tensors as zeros, LayerNorm weights 1, so both branches add zeros
        first, last = "encoder.layers.0.", f"encoder.layers.{cfg.depth}."
        tensors |= {k.replace(first, last): (torch.ones_like if ".layer_norm" in k and k.endswith(".weight")
                                             else torch.zeros_like)(v) for k, v in tensors.items() if first in k}
        config = cfg.to_hf()
    else:
        config = dict(architectures=["Blip2VisionModel"], model_type="blip-2", vision_config=cfg.to_hf())
    n = _write(folder, "model.safetensors", tensors)
    _write(folder, "config.json", config | dict(dtype=_dtype(vit)))
    return _report("CLIPVisionModel" if cfg.clip else "BLIP-2 vision model", folder, n)


def export_bert(qformer, folder, keep_dec=False):
    """The text branch of a Q-Former -> a BertForMaskedLM (BertModel without an ITG head) folder for `from_vit_bert`;
    dropped: cross-attention and the query FFN (not BERT's), and the last word row ([DEC]) unless keep_dec."""
    cfg = qformer.cfg
    if not cfg.text:
        raise ValueError("this Q-Former has no text branch (stage-2 form): nothing to export as BERT")
    keys = qf.bert_keys(cfg)
    if keep_dec:  # no [DEC] row to drop: the word rows and the MLM bias are written whole
        keys["table"] |= {k: keys["table"][k][1][0] for k in ("word_embeddings.weight", "lm_head.bias")}
    if qformer.lm_head is not None:  # BertForMaskedLM: the encoder under bert., beside the head (cls.)
        body = {k: v for k, v in keys["table"].items() if not k.startswith("lm_head.")}
        keys["table"] |= prefixed(keys | dict(table=body), hf="bert.")["table"]
    n = save_weights(qformer, os.path.join(folder, "model.safetensors"), keys["table"],
                     drop=["layers.*.cross.*", "layers.*.ffn_query.*"])
    config = cfg.to_hf_bert(dec=not keep_dec)
    _write(folder, "config.json", config | dict(dtype=_dtype(qformer)))
    dropped = ["cross-attention", "query FFN"] + ["[DEC] row"] * (not keep_dec)
    return _report(config["architectures"][0], folder, n, dropped)


def export_lm(lm, folder):
    """Our OPT or T5 -> an OPTForCausalLM (model.decoder.*) or T5ForConditionalGeneration folder; lm_head.weight is
    written when the head is untied (T5: `scale_decoder_outputs` says whether the decoder output is scaled)."""
    family = t5m if isinstance(lm, t5m.T5) else op
    n = save_weights(lm, os.path.join(folder, "model.safetensors"), family.hf_keys(lm.cfg)["table"])
    config = lm.cfg.to_hf() | dict(dtype=_dtype(lm))
    _write(folder, "config.json", config)
    _write(folder, "generation_config.json", _generation(config))
    return _report(config["architectures"][0], folder, n)


export_opt = export_t5 = export_lm  # the names the callers know


def main(argv):
    """python -m nanoblip2.export <checkpoint> <out>: see the usage line."""
    if len(argv) != 2 or argv[0].startswith("-"):
        raise SystemExit("usage: python -m nanoblip2.export <checkpoint> <out>\n  <checkpoint>: our stage-1 or stage-2 "
                         "checkpoint folder, or an HF BLIP-2 or InstructBLIP folder or Hub id; <out>: the HF folder "
                         "to write")
    src, out = resolve(argv[0]), argv[1]
    d = read_config(src)
    if d.get("nanoblip2") == "stage1" or d.get("qformer_config", {}).get("use_qformer_text_input"):
        tok = None
        try:  # that of the BERT the Q-Former started from
            tok = load_bert_tokenizer(resolve(d.get("train", {}).get("bert", src)))
        except OSError as e:  # not there any more: the weights and config are written without it
            print(f"no tokenizer written: {e}")
        export_stage1(Blip2Stage1.from_pretrained(src), out, tok)
    else:
        export_blip2(Blip2.from_pretrained(src), out)


if __name__ == "__main__":
    main(sys.argv[1:])
