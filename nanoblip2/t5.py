"""
The frozen encoder-decoder LLM of BLIP-2's FlanT5 models (paper §3.3, Fig. 3 bottom): T5 / T5 v1.1 / FlanT5.
Matches HF `T5ForConditionalGeneration` (transformers/models/t5/modeling_t5.py); LAVIS ships its own copy of that
file (lavis/models/blip2_models/modeling_t5.py) and builds it in blip2_t5.py.

Notable details
- No 1/sqrt(d) scaling of the attention scores: T5 folds it into the initialisation of q.
- No position embeddings: a learned per-head bias for each bucket of (key - query) distance, bidirectional in the
  encoder, past-only in the decoder, none in cross-attention. Each stack's first block owns the table (`rel_bias`
  here) and every block adds it. With a KV cache the new queries sit at positions past..past+T-1.
- RMS LayerNorm: no mean subtraction, no bias, variance in fp32 (as HF). Pre-norm blocks, no Linear bias, no dropout.
- FFN: original T5 relu(wi x); T5 v1.1/FlanT5 act(wi_0 x) * wi_1 x. HF's "gated-gelu" is gelu_new (tanh) unless
  `dense_act_fn` says otherwise; BLIP-2 sets "gelu" (exact), as the presets do; `from_hf` reads the folder's.
- Head: original T5 ties it to `shared` and scales the decoder output by d_model**-0.5; v1.1/FlanT5 have their own
  `lm_head`, unscaled. transformers 5 writes tie_word_embeddings=true into every config.json (the old meaning is in
  `scale_decoder_outputs`, which `from_hf` prefers); it ties every head it builds, so an "untied" model it saved has
  no `lm_head.weight` and `hf_keys` reads the head from `shared.weight`.
- Never in fp16: the FFN's output projection `wo` overflows (docs/reference.md); as in HF, its input is cast to its
  dtype, so `wo` may stay in fp32.
- Decoding starts from decoder_start_id = pad = 0; eos is 1. `encode` takes `inputs_embeds`: [queries; text].
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

# our field: (HF T5Config's name, its default, which config.json leaves out)
HF = dict(vocab_size=("vocab_size", 32128), d_model=("d_model", 512), d_kv=("d_kv", 64), d_ff=("d_ff", 2048),
          heads=("num_heads", 8), enc_depth=("num_layers", 6), dec_depth=("num_decoder_layers", None),
          num_buckets=("relative_attention_num_buckets", 32), max_distance=("relative_attention_max_distance", 128),
          eps=("layer_norm_epsilon", 1e-6), tie_word_embeddings=("tie_word_embeddings", True),
          pad_id=("pad_token_id", 0), eos_id=("eos_token_id", 1), decoder_start_id=("decoder_start_token_id", None))


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
        kw = {ours: d.get(name, default) for ours, (name, default) in HF.items()}
        ffp, eos, start = d.get("feed_forward_proj", "relu"), kw["eos_id"], kw["decoder_start_id"]
        act = d.get("dense_act_fn") or ("gelu_new" if ffp == "gated-gelu" else ffp.split("-")[-1])
        return cls(**kw | dict(dec_depth=kw["dec_depth"] or kw["enc_depth"], act=act, gated=ffp.startswith("gated-"),
                               tie_word_embeddings=d.get("scale_decoder_outputs", kw["tie_word_embeddings"]),
                               eos_id=eos if isinstance(eos, int) else eos[0],
                               decoder_start_id=kw["pad_id"] if start is None else start))

    def to_hf(self):
        """The inverse of `from_hf`: a T5ForConditionalGeneration config.json, the head's scaling spelled both ways."""
        return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", is_encoder_decoder=True,
                    feed_forward_proj=("gated-" if self.gated else "") + self.act, dense_act_fn=self.act,
                    is_gated_act=self.gated, scale_decoder_outputs=self.tie_word_embeddings,
                    **{name: getattr(self, ours) for ours, (name, _) in HF.items()})


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
        """(B, T) ids after those in `cache` (per layer: self k, self v, cross k, cross v) -> logits (B, T, V), cache.
        keep: a bool (B, T) mask of the positions to project (training: those with a target) -> logits (N, V)."""
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
        """Encoder over the prompt (B, S, C), decoder over the start token [+ `tokens` (B, t)] -> (B, V), Cache."""
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
    BLIP-2 one. head_saved=False: no lm_head.weight in the file, the head is read from shared.weight (docstring)."""
    E, D = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."  # the decoder's layer 1 is the cross-attention
    R = "block.0.layer.0.SelfAttention.relative_attention_bias"
    names = {"shared": "shared", "lm_head": "lm_head" if head_saved else "shared",
             "encoder.rel_bias": "encoder." + R, "decoder.rel_bias": "decoder." + R,
             "encoder.norm": "encoder.final_layer_norm", "decoder.norm": "decoder.final_layer_norm",
             "encoder.blocks.{i}.ln1": E + "0.layer_norm", "encoder.blocks.{i}.ln2": E + "1.layer_norm",
             "decoder.blocks.{i}.ln1": D + "0.layer_norm", "decoder.blocks.{i}.ln_cross": D + "1.layer_norm",
             "decoder.blocks.{i}.ln2": D + "2.layer_norm"}
    for n in "qkvo":
        names |= {f"encoder.blocks.{{i}}.attn.{n}": E + f"0.SelfAttention.{n}",
                  f"decoder.blocks.{{i}}.attn.{n}": D + f"0.SelfAttention.{n}",
                  f"decoder.blocks.{{i}}.cross.{n}": D + f"1.EncDecAttention.{n}"}
    for n in ("wi", "wi_0", "wi_1", "wo"):  # relu: wi; gated: wi_0, wi_1
        names |= {f"encoder.blocks.{{i}}.ffn.{n}": E + f"1.DenseReluDense.{n}",
                  f"decoder.blocks.{{i}}.ffn.{n}": D + f"2.DenseReluDense.{n}"}
    table = {f"{ours}.weight": f"{hf}.weight" for ours, hf in names.items()}  # T5 has weights only
    # older files repeat `shared` as embed_tokens (and as lm_head when tied); some carry an unused cross-attention bias
    ignore = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    return dict(table=table, ignore=ignore + ["lm_head.weight"] * cfg.tie_word_embeddings, fresh=[], canon=None)
