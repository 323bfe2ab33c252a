"""
The frozen encoder-decoder LLM of BLIP-2's FlanT5 models (paper §3.3, Fig. 3 bottom): T5 / T5 v1.1 / FlanT5.
Matches HF `T5ForConditionalGeneration` (transformers/models/t5/modeling_t5.py); LAVIS ships its own copy of that
file (lavis/models/blip2_models/modeling_t5.py) and builds it in blip2_t5.py.

Notable details
- No 1/sqrt(d) scaling of the attention scores: T5 folds it into the initialisation of q.
- No position embeddings. A learned bias per head and per bucket of (key - query) distance is added to the
  self-attention scores. Only the first block of each stack owns the table (`rel_bias` here), and every block
  reuses the same bias. Encoder buckets are bidirectional; decoder buckets see only the past. Buckets are exact
  for short distances and logarithmic up to `max_distance`. Cross-attention has no position bias. With a KV
  cache, the new queries sit at absolute positions past..past+T-1 and their bias rows are computed there.
- RMS LayerNorm: no mean subtraction and no bias, with the variance computed in fp32 as HF does. The blocks are
  pre-norm and no Linear has a bias. There is no dropout: in BLIP-2 the LLM is frozen and always in eval mode.
- FFN: original T5 uses relu(wi x); T5 v1.1/FlanT5 use the gated form act(wi_0 x) * wi_1 x. In HF,
  feed_forward_proj "gated-gelu" means gelu_new (tanh) unless `dense_act_fn` overrides it. The google/flan-t5-*
  configs say gelu_new. BLIP-2 sets dense_act_fn="gelu" (exact erf) for FlanT5, in LAVIS blip2_t5.py and in the
  HF conversion, and its presets below follow that. `from_hf` reads whatever the folder says.
- Head: original T5 ties the LM head to the shared embedding and scales the decoder output by d_model**-0.5
  first. T5 v1.1/FlanT5 have their own `lm_head` and no scaling. transformers 5 writes tie_word_embeddings=true
  into every T5 config.json and keeps the old meaning in `scale_decoder_outputs`, which `from_hf` prefers.
  transformers 5 also builds every T5 with a tied head. A freshly built "untied" model is therefore saved
  without `lm_head.weight`, and the head is then read from `shared.weight` (see `hf_keys`).
- Never run FlanT5 in fp16: activations overflow in the FFN output projection `wo`. LAVIS runs T5 in bf16,
  and HF keeps `wo` in fp32. The caller picks the dtype. As in HF, the input to `wo` is cast to wo's dtype,
  so `wo` may be kept in fp32 while the rest runs in bf16.
- Decoding starts from decoder_start_id = pad = 0. eos is 1. The encoder input of BLIP-2 is
  cat(projected queries, embed(text ids)), which is why `encode` takes `inputs_embeds`.
- Generation: `prefill` runs the encoder and the decoder's start token, `step` one token per row. The `Cache`
  (generate.py) holds per decoder layer (self k, self v, cross k, cross v), and the encoder's mask.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .generate import Cache
from .linear import Linear, linear
from .load import build_empty, load_weights, prefixed, read_config, safetensors_files, safetensors_keys

ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_new": lambda: nn.GELU("tanh"), "silu": nn.SiLU}

# HF T5Config defaults: config.json omits keys equal to these
HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
                   num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   layer_norm_epsilon=1e-6, feed_forward_proj="relu", tie_word_embeddings=True,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=None)


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    heads: int = 32
    enc_depth: int = 24
    dec_depth: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    act: str = "gelu"                  # "gelu" (exact), "gelu_new" (tanh), "relu"
    gated: bool = True                 # feed_forward_proj "gated-*": act(wi_0 x) * wi_1 x
    tie_word_embeddings: bool = False  # head = shared embedding, decoder output scaled by d_model**-0.5
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0

    @classmethod
    def from_hf(cls, d):
        """From a T5 `config.json` or a BLIP-2 one (its text_config)."""
        if d.get("model_type") == "blip-2":
            d = d.get("text_config") or {}  # HF's default text_config is OPT
        if d.get("model_type") != "t5":
            raise ValueError(f"model_type {d.get('model_type')!r} is not T5")
        hf = HF_DEFAULTS | d
        ffp = hf["feed_forward_proj"]
        act = hf.get("dense_act_fn") or ("gelu_new" if ffp == "gated-gelu" else ffp.split("-")[-1])
        eos = hf["eos_token_id"]
        start = hf["decoder_start_token_id"]
        return cls(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
                   heads=hf["num_heads"], enc_depth=hf["num_layers"],
                   dec_depth=hf["num_decoder_layers"] or hf["num_layers"],
                   num_buckets=hf["relative_attention_num_buckets"], max_distance=hf["relative_attention_max_distance"],
                   eps=hf["layer_norm_epsilon"], act=act, gated=ffp.startswith("gated-"),
                   tie_word_embeddings=hf.get("scale_decoder_outputs", hf["tie_word_embeddings"]),
                   pad_id=hf["pad_token_id"], eos_id=eos if isinstance(eos, int) else eos[0],
                   decoder_start_id=hf["pad_token_id"] if start is None else start)

    def to_hf(self):
        """The inverse of `from_hf`: a T5ForConditionalGeneration config.json. transformers 5 reads the scaling of
        the decoder output from `scale_decoder_outputs`, older versions from `tie_word_embeddings`."""
        return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=self.vocab_size,
                    d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff, num_layers=self.enc_depth,
                    num_decoder_layers=self.dec_depth, num_heads=self.heads,
                    relative_attention_num_buckets=self.num_buckets, relative_attention_max_distance=self.max_distance,
                    layer_norm_epsilon=self.eps, feed_forward_proj=("gated-" if self.gated else "") + self.act,
                    dense_act_fn=self.act, is_gated_act=self.gated, tie_word_embeddings=self.tie_word_embeddings,
                    scale_decoder_outputs=self.tie_word_embeddings, is_encoder_decoder=True, pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id, decoder_start_token_id=self.decoder_start_id)


PRESETS = {  # the FlanT5 LLMs of BLIP-2, with BLIP-2's exact GELU
    "flan-t5-xl": T5Config(),
    "flan-t5-xxl": T5Config(d_model=4096, d_ff=10240, heads=64),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)  # no mean subtraction, fp32 statistics
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, inner = cfg.heads, cfg.heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)

    def split(self, x):  # (B, T, H*D) -> (B, H, T, D)
        return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)

    def kv(self, x):
        return self.split(self.k(x)), self.split(self.v(x))

    def forward(self, x, k, v, bias):  # bias: additive, broadcastable to (B, H, T, S)
        y = F.scaled_dot_product_attention(self.split(self.q(x)), k, v, attn_mask=bias, scale=1.0)
        return self.o(y.transpose(1, 2).flatten(2))  # (B, H, T, D) -> (B, T, H*D) -> (B, T, C)


class FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.act = ACT[cfg.act]()
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))  # `wo` may be kept in fp32, see the docstring


class Block(nn.Module):
    def __init__(self, cfg, cross):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ln_cross = RMSNorm(cfg.d_model, cfg.eps) if cross else None
        self.cross = Attention(cfg) if cross else None
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FFN(cfg)

    def forward(self, x, bias, enc=None, enc_bias=None, cache=None):
        h = self.ln1(x)
        k, v = self.attn.kv(h)
        if cache is not None:  # append this step's keys/values to the cached ones
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        x = x + self.attn(h, k, v, bias)
        if self.cross is None:  # encoder block
            return x + self.ffn(self.ln2(x)), None
        ck, cv = self.cross.kv(enc) if cache is None else cache[2:]  # encoder K/V: computed once, then reused
        x = x + self.cross(self.ln_cross(x), ck, cv, enc_bias)
        return x + self.ffn(self.ln2(x)), (k, v, ck, cv)


def relative_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's buckets of key - query distances: exact for short ones, logarithmic up to max_distance."""
    bucket = 0
    if bidirectional:  # half the buckets for keys after the query
        num_buckets //= 2
        bucket = (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:              # keys after the query (masked anyway) share bucket 0
        rel = -rel.clamp(max=0)
    exact = num_buckets // 2
    log = torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(rel < exact, rel, large)


class Stack(nn.Module):
    def __init__(self, cfg, depth, decoder):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.rel_bias = nn.Embedding(cfg.num_buckets, cfg.heads)  # HF: block.0.layer.0.SelfAttention
        self.blocks = nn.ModuleList(Block(cfg, cross=decoder) for _ in range(depth))
        self.norm = RMSNorm(cfg.d_model, cfg.eps)

    def position_bias(self, q_pos, k_len):  # absolute query positions (T,) -> (1, H, T, S)
        rel = torch.arange(k_len, device=q_pos.device)[None, :] - q_pos[:, None]
        b = relative_bucket(rel, not self.decoder, self.cfg.num_buckets, self.cfg.max_distance)
        return self.rel_bias(b).permute(2, 0, 1).unsqueeze(0)


def pad_bias(mask, dtype):  # (B, S) of 1 = token, 0 = padding -> additive (B, 1, 1, S)
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, cfg.enc_depth, decoder=False)
        self.decoder = Stack(cfg, cfg.dec_depth, decoder=True)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, input_ids):  # (B, T) -> (B, T, C)
        return self.shared(input_ids)

    def encode(self, input_ids=None, inputs_embeds=None, attention_mask=None):  # -> (B, S, C)
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        S = x.size(1)
        bias = self.encoder.position_bias(torch.arange(S, device=x.device), S)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias + pad_bias(attention_mask, bias.dtype)  # (B, H, S, S)
        for block in self.encoder.blocks:
            x, _ = block(x, bias)
        return self.encoder.norm(x)

    def decode(self, input_ids, encoder_hidden, encoder_mask, cache=None, keep=None):
        """(B, T) ids after those in `cache` -> (logits (B, T, V), cache). The cache holds one
        (self_k, self_v, cross_k, cross_v) per decoder layer, each (B, H, S, d_kv). keep: a bool (B, T) mask of the
        positions to project onto the vocabulary (training: those with a target), -> logits (N, V)."""
        x = self.shared(input_ids)
        T = x.size(1)
        past = 0 if cache is None else cache[0][0].size(2)
        pos = torch.arange(past, past + T, device=x.device)  # absolute positions of the new queries
        bias = self.decoder.position_bias(pos, past + T)  # (1, H, T, past+T)
        future = torch.arange(past + T, device=x.device)[None, :] > pos[:, None]  # (T, past+T)
        bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)
        enc_bias = None if encoder_mask is None else pad_bias(encoder_mask, bias.dtype)
        new_cache = []
        for i, block in enumerate(self.decoder.blocks):
            x, layer_cache = block(x, bias, encoder_hidden, enc_bias, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        x = self.decoder.norm(x if keep is None else x[keep])
        if self.lm_head is None:  # tied head: scale first
            return linear(x * self.cfg.d_model ** -0.5, self.shared.weight), new_cache
        return self.lm_head(x), new_cache

    def prefill(self, inputs_embeds, attention_mask, tokens=None):
        """The encoder over the prompt (B, S, C), the decoder over the start token and `tokens` (B, t) if given
        -> the last position's logits (B, V), Cache."""
        enc = self.encode(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        dec = torch.full((enc.size(0), 1), self.cfg.decoder_start_id, device=enc.device)
        logits, layers = self.decode(dec if tokens is None else torch.cat([dec, tokens], dim=1), enc, attention_mask)
        return logits[:, -1], Cache(layers, attention_mask)

    def step(self, tokens, cache):  # (B,) one new token per row -> logits (B, V), the cache one position longer
        logits, layers = self.decode(tokens[:, None], None, cache.mask, cache.layers)
        return logits[:, -1], Cache(layers, cache.mask)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=None):
        """From a T5ForConditionalGeneration folder (google/flan-t5-*) or the LLM of a BLIP-2 folder."""
        d = read_config(folder)
        cfg = T5Config.from_hf(d)
        prefix = "language_model." if d.get("model_type") == "blip-2" else ""
        keys = safetensors_keys(safetensors_files(folder))
        model = build_empty(cls, cfg, device, dtype)
        mapping = prefixed(hf_keys(cfg, head_saved=prefix + "lm_head.weight" in keys), hf=prefix)
        if prefix:  # the language model of a BLIP-2 folder, beside the other parts
            mapping["ignore"] += ["vision_model.*", "qformer.*", "query_tokens", "language_projection.*"]
        load_weights(model, folder, **mapping)
        return model.eval()


def hf_keys(cfg, head_saved=True):
    """`load_weights` arguments for a T5ForConditionalGeneration folder; `prefixed(..., hf="language_model.")`: a
    BLIP-2 one. head_saved=False: the file has no lm_head.weight, and an untied head is read from shared.weight
    (transformers 5 saves its always-tied head once, see the docstring)."""
    E, D = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."  # the decoder's layer 1 is the cross-attention
    R = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    table = {
        "shared.weight": "shared.weight", "lm_head.weight": "lm_head.weight" if head_saved else "shared.weight",
        "encoder.rel_bias.weight": "encoder." + R, "decoder.rel_bias.weight": "decoder." + R,
        "encoder.norm.weight": "encoder.final_layer_norm.weight",
        "decoder.norm.weight": "decoder.final_layer_norm.weight",
        "encoder.blocks.{i}.ln1.weight": E + "0.layer_norm.weight",
        "encoder.blocks.{i}.ln2.weight": E + "1.layer_norm.weight",
        "decoder.blocks.{i}.ln1.weight": D + "0.layer_norm.weight",
        "decoder.blocks.{i}.ln_cross.weight": D + "1.layer_norm.weight",
        "decoder.blocks.{i}.ln2.weight": D + "2.layer_norm.weight",
    }
    for n in "qkvo":
        table |= {f"encoder.blocks.{{i}}.attn.{n}.weight": E + f"0.SelfAttention.{n}.weight",
                  f"decoder.blocks.{{i}}.attn.{n}.weight": D + f"0.SelfAttention.{n}.weight",
                  f"decoder.blocks.{{i}}.cross.{n}.weight": D + f"1.EncDecAttention.{n}.weight"}
    for n in ("wi", "wi_0", "wi_1", "wo"):  # relu: wi; gated: wi_0, wi_1
        table |= {f"encoder.blocks.{{i}}.ffn.{n}.weight": E + f"1.DenseReluDense.{n}.weight",
                  f"decoder.blocks.{{i}}.ffn.{n}.weight": D + f"2.DenseReluDense.{n}.weight"}
    # older files repeat `shared` as embed_tokens (and as lm_head when tied); some carry an unused cross-attention bias
    ignore = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    return dict(table=table, ignore=ignore + ["lm_head.weight"] * cfg.tie_word_embeddings, fresh=[], canon=None)
