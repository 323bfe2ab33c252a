"""
OPT, the frozen decoder-only LLM of BLIP-2 (paper §3.3, Figure 3 top), which reads the soft visual prompt first.
Matches HF `OPTForCausalLM` (models/opt/modeling_opt.py), which is what LAVIS `blip2_opt.py` runs.

Notable details
- Learned positions offset by 2 (a fairseq leftover): the table has max_positions + 2 rows. pos = cumsum(mask) - 1,
  so the first real token of a left-padded row is position 0 and reads row 2; padding reads row 1.
- Pre-LN blocks and a final LayerNorm, eps 1e-5 (not in the config). opt-350m is the odd one: post-LN blocks, no
  final LayerNorm, and 512-wide word embeddings that `project_in` maps up to 1024 and `project_out` back down.
- q is scaled by 1/sqrt(head_dim) right after its projection (as HF and fairseq).
- Causal + padding mask with the diagonal always allowed: no softmax row is empty (no NaN in any SDPA backend).
- The LM head is the token embedding matrix unless tie_word_embeddings is False. No dropout (the LLM is frozen).
- Generation: `prefill` runs the prompt once, `step` one token per row; their `Cache` (generate.py) holds each
  layer's (k, v), (B, H, S, head_dim), and the attention mask.
- Checkpoints: the facebook/opt-* layout (model.decoder.*, or decoder.* in old files), under language_model. in a
  BLIP-2 folder. A tied lm_head.weight is ignored (older transformers wrote it).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .generate import Cache
from .linear import Linear, linear
from .load import build_empty, load_weights, prefixed, read_config


# HF's OPTConfig names for our fields. Its defaults are ours, so a key that config.json leaves out keeps our default.
HF_NAMES = dict(vocab_size="vocab_size", width="hidden_size", depth="num_hidden_layers", heads="num_attention_heads",
                ffn_dim="ffn_dim", max_positions="max_position_embeddings", word_embed_proj_dim="word_embed_proj_dim",
                pre_norm="do_layer_norm_before", bias="enable_bias", ln_affine="layer_norm_elementwise_affine",
                pad_id="pad_token_id", bos_id="bos_token_id", eos_id="eos_token_id",
                tie_word_embeddings="tie_word_embeddings")


@dataclass
class OPTConfig:
    vocab_size: int = 50272
    width: int = 768
    depth: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    max_positions: int = 2048
    word_embed_proj_dim: int = 0    # embedding width; 0 = width (they differ only in opt-350m)
    pre_norm: bool = True           # do_layer_norm_before
    final_norm: bool = True         # False for pre_norm=False, and for old fine-tunes with _remove_final_layer_norm
    bias: bool = True               # enable_bias
    ln_affine: bool = True          # layer_norm_elementwise_affine
    pad_id: int = 1
    bos_id: int = 2
    eos_id: int = 2                 # BLIP-2 configs say 50118 ("\n")
    tie_word_embeddings: bool = True

    def __post_init__(self):
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.width

    @classmethod
    def from_hf(cls, d):
        """From an OPT config.json or a BLIP-2 config.json (its text_config)."""
        if d.get("model_type") == "blip-2":
            d = {"model_type": "opt"} | (d.get("text_config") or {})  # Blip2Config's text model defaults to OPT
        if d.get("model_type") != "opt":
            raise ValueError(f"model_type {d.get('model_type')!r} is not OPT")
        if d.get("activation_function", "relu") != "relu":
            raise ValueError(f"activation_function {d['activation_function']!r}: only OPT's relu is implemented")
        kw = {ours: d[hf] for ours, hf in HF_NAMES.items() if hf in d}
        if isinstance(kw.get("eos_id"), list):
            kw["eos_id"] = kw["eos_id"][0]
        pre_norm = kw.get("pre_norm", True)
        return cls(**kw, final_norm=pre_norm and not d.get("_remove_final_layer_norm", False))

    def to_hf(self):
        """The inverse of `from_hf`: an OPTForCausalLM config.json."""
        return dict(architectures=["OPTForCausalLM"], model_type="opt", activation_function="relu",
                    _remove_final_layer_norm=self.pre_norm and not self.final_norm,
                    **{hf: getattr(self, ours) for ours, hf in HF_NAMES.items()})


PRESETS = {
    "opt-125m": OPTConfig(),
    "opt-2.7b": OPTConfig(width=2560, depth=32, heads=32, ffn_dim=10240),
    "opt-6.7b": OPTConfig(width=4096, depth=32, heads=32, ffn_dim=16384),
}


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.scale = cfg.heads, (cfg.width // cfg.heads) ** -0.5
        self.q = Linear(cfg.width, cfg.width, bias=cfg.bias)
        self.k = Linear(cfg.width, cfg.width, bias=cfg.bias)
        self.v = Linear(cfg.width, cfg.width, bias=cfg.bias)
        self.out = Linear(cfg.width, cfg.width, bias=cfg.bias)

    def forward(self, x, mask, past=None):  # x (B, T, C), mask (B, 1, T, S); past (k, v) each (B, H, S - T, C/H)
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        q, k, v = split(self.q(x) * self.scale), split(self.k(x)), split(self.v(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S, C/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # q is already scaled
        return self.out(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.ln1 = nn.LayerNorm(cfg.width, elementwise_affine=cfg.ln_affine)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, elementwise_affine=cfg.ln_affine)
        self.fc1 = Linear(cfg.width, cfg.ffn_dim, bias=cfg.bias)
        self.fc2 = Linear(cfg.ffn_dim, cfg.width, bias=cfg.bias)

    def forward(self, x, mask, past=None):
        if self.pre_norm:
            a, kv = self.attn(self.ln1(x), mask, past)
            x = x + a
            return x + self.fc2(F.relu(self.fc1(self.ln2(x)))), kv
        a, kv = self.attn(x, mask, past)  # opt-350m: post-LN
        x = self.ln1(x + a)
        return self.ln2(x + self.fc2(F.relu(self.fc1(x)))), kv


class OPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, C = cfg.word_embed_proj_dim, cfg.width
        self.embed_tokens = nn.Embedding(cfg.vocab_size, E)
        self.embed_positions = nn.Embedding(cfg.max_positions + 2, C)  # + 2: the offset, see the docstring
        self.project_in = Linear(E, C, bias=False) if E != C else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(C, elementwise_affine=cfg.ln_affine) if cfg.final_norm else None
        self.project_out = Linear(C, E, bias=False) if E != C else None
        self.lm_head = None if cfg.tie_word_embeddings else Linear(E, cfg.vocab_size, bias=False)

    def embed(self, input_ids):  # (B, T) -> (B, T, E), token embeddings only (before project_in)
        return self.embed_tokens(input_ids)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, keep=0):
        """-> logits (B, T, V), each layer's (k, v). attention_mask (B, S) covers the cached and new positions. keep:
        the head (a third of a small OPT's work) on the last `keep` -> (B, keep, V), or a bool (B, T) mask -> (N, V)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, E)
        B, T = x.shape[:2]
        past = 0 if cache is None else cache[0][0].size(2)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        attention_mask = attention_mask.long()

        pos = (attention_mask.cumsum(1) * attention_mask - 1)[:, past:]  # (B, T), 0 at the first real token
        i = torch.arange(past, past + T, device=x.device)[:, None]     # query positions in the sequence
        j = torch.arange(past + T, device=x.device)                    # key positions
        mask = ((j <= i) & attention_mask.bool()[:, None, None, :]) | (j == i)  # (B, 1, T, S)

        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(pos + 2)
        new_cache = []
        for n, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if cache is None else cache[n])
            new_cache.append(kv)
        if isinstance(keep, torch.Tensor):
            x = x[keep]  # (N, C)
        elif keep:
            x = x[:, -keep:]
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.project_out is not None:
            x = self.project_out(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, head), new_cache

    def prefill(self, inputs_embeds, attention_mask, tokens=None):
        """The prompt (B, S, E), left-padded, then `tokens` (B, t) if given -> last position's logits (B, V), Cache."""
        if tokens is not None:
            inputs_embeds = torch.cat([inputs_embeds, self.embed(tokens).to(inputs_embeds.dtype)], dim=1)
            attention_mask = F.pad(attention_mask, (0, tokens.size(1)), value=1)
        logits, layers = self(inputs_embeds=inputs_embeds, attention_mask=attention_mask, keep=1)
        return logits[:, -1], Cache(layers, attention_mask)

    def step(self, tokens, cache):  # (B,) one new token per row -> logits (B, V), the cache one position longer
        mask = F.pad(cache.mask, (0, 1), value=1)
        logits, layers = self(tokens[:, None], attention_mask=mask, cache=cache.layers)
        return logits[:, -1], Cache(layers, mask)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=None):
        """From a facebook/opt-* folder or the language model of a BLIP-2 (OPT) folder."""
        d = read_config(folder)
        cfg = OPTConfig.from_hf(d)
        keys = hf_keys(cfg)
        if d.get("model_type") == "blip-2":  # its language model: under language_model., beside the other parts
            keys = prefixed(keys, hf="language_model.")
            keys["ignore"] += ["vision_model.*", "qformer.*", "query_tokens", "language_projection.*"]
        model = build_empty(cls, cfg, device, dtype)
        load_weights(model, folder, **keys)
        return model.eval()


def hf_keys(cfg):
    """`load_weights` arguments for a facebook/opt-* folder; `prefixed(..., hf="language_model.")`: a BLIP-2 one."""
    D, L = "model.decoder.", "model.decoder.layers.{i}."
    table = {"embed_tokens.weight": D + "embed_tokens.weight", "embed_positions.weight": D + "embed_positions.weight",
             "project_in.weight": D + "project_in.weight", "project_out.weight": D + "project_out.weight",
             "ln_f.weight": D + "final_layer_norm.weight", "ln_f.bias": D + "final_layer_norm.bias",
             "lm_head.weight": "lm_head.weight"}
    both = {"layers.{i}.ln1": L + "self_attn_layer_norm", "layers.{i}.ln2": L + "final_layer_norm",
            "layers.{i}.fc1": L + "fc1", "layers.{i}.fc2": L + "fc2",
            "layers.{i}.attn.q": L + "self_attn.q_proj", "layers.{i}.attn.k": L + "self_attn.k_proj",
            "layers.{i}.attn.v": L + "self_attn.v_proj", "layers.{i}.attn.out": L + "self_attn.out_proj"}
    table |= {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in both.items() for p in ("weight", "bias")}
    ignore = ["lm_head.weight"] if cfg.tie_word_embeddings else []  # = embed_tokens; older transformers wrote it
    # old facebook/opt-* files say decoder.*, newer ones model.decoder.*
    return dict(table=table, ignore=ignore, fresh=[], canon=lambda k: "model." + k if k.startswith("decoder.") else k)
