"""
The Querying Transformer (paper §3.1, Figure 2): a BERT-base encoder whose 32 learned queries read the image.
Matches HF `Blip2QFormerModel` + `Blip2TextEmbeddings` (modeling_blip_2.py), `InstructBlipQFormerModel` (the
text branch reading an instruction) and LAVIS `Qformer.py`.

Notable details
- One sequence [queries; text] shares the self-attention layers; what sees what is decided only by the
  self-attention mask, one of the four pure functions below (Figure 2, right).
- Cross-attention to the image sits in layers 0, cross_attention_freq, 2*cross_attention_freq, ..., for the query
  positions only: text sees the image only through the queries.
- Queries and text have separate FFNs (`ffn_query`, `ffn_text`) and share the rest. Queries get no position
  embedding; text positions start at 0 after the queries.
- BERT post-LN blocks, LN(x + dropout(dense(sublayer(x)))), exact GELU, eps 1e-12, additive masks of -10000.
- ITG reuses the query pass's self-attention keys/values as a cache (`past`): the same as one pass over
  [queries; text] with the UniLM mask (tested).
- The stage-2 form (`text=False`) has no word/position embeddings, no text FFN and no LM head.
- From BERT: LAVIS has no token-type table; we fold BERT's row 0 into the positions, so the text path is exactly
  BERT at initialisation. The query FFN is a copy of the text FFN, cross-attention starts random, and the
  vocabulary grows by one row for [DEC].
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QFormerConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    vision_width: int = 1408
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    vocab_size: int = 30523      # bert-base-uncased + [DEC]
    max_positions: int = 512
    eps: float = 1e-12
    dropout: float = 0.1
    text: bool = True            # the stage-1 text branch: embeddings, text FFN, ITG head
    lm_head: bool = True         # the ITG head (absent from HF Blip2ForImageTextRetrieval checkpoints)

    @classmethod
    def from_hf_blip2(cls, d):
        """From a BLIP-2 or InstructBLIP config.json (its qformer_config; HF omits keys equal to its defaults, listed
        here). InstructBLIP's Q-Former always has its text branch: it reads the instruction."""
        q = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 cross_attention_frequency=2, vocab_size=30522, max_position_embeddings=512, layer_norm_eps=1e-12,
                 hidden_dropout_prob=0.1, use_qformer_text_input=False) | d.get("qformer_config", {})
        return cls(width=q["hidden_size"], depth=q["num_hidden_layers"], heads=q["num_attention_heads"],
                   mlp=q["intermediate_size"], vision_width=d.get("vision_config", {}).get("hidden_size", 1408),
                   num_query_tokens=d.get("num_query_tokens", 32), cross_attention_freq=q["cross_attention_frequency"],
                   vocab_size=q["vocab_size"], max_positions=q["max_position_embeddings"], eps=q["layer_norm_eps"],
                   dropout=q["hidden_dropout_prob"], lm_head=False,
                   text=bool(q["use_qformer_text_input"]) or d.get("model_type") == "instructblip")

    @classmethod
    def from_hf_bert(cls, d, vision_width, num_query_tokens=32, cross_attention_freq=2):
        """From a BERT config.json: the stage-1 Q-Former initialised from BERT, vocabulary + [DEC]."""
        if d.get("model_type") != "bert":
            raise ValueError(f"model_type {d.get('model_type')!r} is not BERT")
        b = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_dropout_prob=0.1) | d
        return cls(width=b["hidden_size"], depth=b["num_hidden_layers"], heads=b["num_attention_heads"],
                   mlp=b["intermediate_size"], vision_width=vision_width, num_query_tokens=num_query_tokens,
                   cross_attention_freq=cross_attention_freq, vocab_size=b["vocab_size"] + 1,
                   max_positions=b["max_position_embeddings"], eps=b["layer_norm_eps"],
                   dropout=b["hidden_dropout_prob"])

    def to_hf_bert(self, dec=True):
        """The inverse of `from_hf_bert`: a BERT config.json, one word row fewer when the last one is [DEC]."""
        return dict(architectures=["BertForMaskedLM" if self.text and self.lm_head else "BertModel"],
                    model_type="bert", vocab_size=self.vocab_size - dec, hidden_size=self.width,
                    num_hidden_layers=self.depth, num_attention_heads=self.heads, intermediate_size=self.mlp,
                    hidden_act="gelu", hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
                    max_position_embeddings=self.max_positions, type_vocab_size=2, layer_norm_eps=self.eps,
                    pad_token_id=0)

    def to_hf(self, text, instruct=False):
        """The inverse of `from_hf_blip2`: a BLIP-2 qformer_config, with the text branch (retrieval) or without, or
        InstructBLIP's (always with it, no flag)."""
        d = {k: v for k, v in self.to_hf_bert(dec=False).items() if k not in ("architectures", "type_vocab_size")}
        d |= dict(cross_attention_frequency=self.cross_attention_freq, encoder_hidden_size=self.vision_width)
        if instruct:
            return d | dict(model_type="instructblip_qformer")
        return d | dict(model_type="blip_2_qformer", use_qformer_text_input=text)


PRESETS = {
    "qformer-stage1": QFormerConfig(),
    "qformer-stage2": QFormerConfig(text=False, lm_head=False),
}

# ---------------------------------------------------------------------------------------------------------
# The self-attention masks (1 = may attend). Shapes (B, rows, keys); pad is the (B, T) text padding mask.


def query_mask(Q):
    """ITC image side and stage 2: the queries alone, bidirectional."""
    return torch.ones(1, Q, Q, dtype=torch.long)


def text_mask(pad):
    """ITC text side: the text alone, bidirectional, padding keys hidden."""
    return pad[:, None, :].expand(-1, pad.size(1), -1)


def bidirectional_mask(Q, pad):
    """ITM: queries and text all see each other (padding keys hidden)."""
    keys = torch.cat([pad.new_ones(pad.size(0), Q), pad], dim=1)
    return keys[:, None, :].expand(-1, Q + pad.size(1), -1)


def multimodal_causal_mask(Q, pad):
    """ITG (UniLM): queries see only queries; text sees all queries and the text before it, itself included."""
    T = pad.size(1)
    m = bidirectional_mask(Q, pad).clone()
    m[:, :Q, Q:] = 0
    m[:, Q:, Q:] &= torch.tril(torch.ones(T, T, dtype=m.dtype, device=m.device))
    return m


class Attention(nn.Module):  # self-attention, or cross-attention to a kv_width-wide image
    def __init__(self, cfg, kv_width=None):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(kv_width or cfg.width, cfg.width)
        self.value = nn.Linear(kv_width or cfg.width, cfg.width)
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x, context=None, mask=None, past=None):
        B, T, C = x.shape
        split = lambda t: t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        src = x if context is None else context
        q, k, v = split(self.query(x)), split(self.key(src)), split(self.value(src))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        bias = None if mask is None else (1.0 - mask[:, None].to(q.dtype)) * -10000.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        y = F.dropout(self.dense(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)
        return self.ln(x + y), (k, v)


class FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.dropout = cfg.dropout

    def forward(self, x):
        return self.ln(x + F.dropout(self.fc2(F.gelu(self.fc1(x))), self.dropout, self.training))


class Layer(nn.Module):
    def __init__(self, cfg, cross):
        super().__init__()
        self.attn = Attention(cfg)
        self.cross = Attention(cfg, kv_width=cfg.vision_width) if cross else None
        self.ffn_query = FFN(cfg)
        self.ffn_text = FFN(cfg) if cfg.text else None

    def forward(self, x, Q, image, mask, past):
        x, kv = self.attn(x, mask=mask, past=past)
        if Q == 0:
            return self.ffn_text(x), kv
        q = x[:, :Q] if self.cross is None else self.cross(x[:, :Q], context=image)[0]
        q = self.ffn_query(q)
        return (torch.cat([q, self.ffn_text(x[:, Q:])], dim=1) if x.size(1) > Q else q), kv


class LMHead(nn.Module):
    """BERT's MLM head, reused for ITG: dense + GELU + LN, then the decoder tied to the word embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, word_embeddings):
        return F.linear(self.ln(F.gelu(self.dense(x))), word_embeddings, self.bias)


class QFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.ln_embed = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.layers = nn.ModuleList(Layer(cfg, cross=i % cfg.cross_attention_freq == 0) for i in range(cfg.depth))
        self.lm_head = LMHead(cfg) if cfg.text and cfg.lm_head else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # BERT's initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, LMHead) or isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            m.reset_parameters()

    def forward(self, query_embeds=None, input_ids=None, image=None, mask=None, past=None):
        """query_embeds (B, Q, C) and/or input_ids (B, T); image (B, N, Cv) for the cross-attention; mask (B, rows,
        keys) from the builders above; past: per-layer (K, V) of earlier positions (the queries, for ITG).
        -> the hidden states (B, Q + T, C) and the per-layer (K, V) of everything seen so far."""
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            pos = torch.arange(input_ids.size(1), device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos))
        x = F.dropout(self.ln_embed(torch.cat(parts, dim=1)), self.cfg.dropout, self.training)
        Q = 0 if query_embeds is None else query_embeds.size(1)
        presents = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, Q, image, mask, None if past is None else past[i])
            presents.append(kv)
        return x, presents

    def logits(self, hidden):  # ITG vocabulary logits
        return self.lm_head(hidden, self.word_embeddings.weight)


def hf_keys(cfg, instruct=False):
    """`load_weights` arguments for the Q-Former of a BLIP-2 folder: HF Blip2QFormerModel under qformer., and the
    text embeddings of a Blip2ForImageTextRetrieval at the top level; instruct: InstructBlipQFormerModel, which holds
    the text embeddings and their LayerNorm (ours: ln_embed) under qformer.embeddings. Each entry of `both` is a
    .weight and a .bias."""
    L, X = "qformer.encoder.layer.{i}.", "qformer.encoder.layer.{i}.crossattention."
    E = "qformer.embeddings." if instruct else "embeddings."
    both = {
        "ln_embed": E + "layernorm" if instruct else "qformer.layernorm",
        "layers.{i}.attn.query": L + "attention.attention.query", "layers.{i}.attn.key": L + "attention.attention.key",
        "layers.{i}.attn.value": L + "attention.attention.value", "layers.{i}.attn.dense": L + "attention.output.dense",
        "layers.{i}.attn.ln": L + "attention.output.LayerNorm",
        "layers.{i}.cross.query": X + "attention.query", "layers.{i}.cross.key": X + "attention.key",
        "layers.{i}.cross.value": X + "attention.value", "layers.{i}.cross.dense": X + "output.dense",
        "layers.{i}.cross.ln": X + "output.LayerNorm",
        "layers.{i}.ffn_query.fc1": L + "intermediate_query.dense",
        "layers.{i}.ffn_query.fc2": L + "output_query.dense", "layers.{i}.ffn_query.ln": L + "output_query.LayerNorm",
        "layers.{i}.ffn_text.fc1": L + "intermediate.dense", "layers.{i}.ffn_text.fc2": L + "output.dense",
        "layers.{i}.ffn_text.ln": L + "output.LayerNorm",
    }
    table = {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in both.items() for p in ("weight", "bias")}
    if cfg.text:
        table |= {"word_embeddings.weight": E + "word_embeddings.weight",
                  "position_embeddings.weight": E + "position_embeddings.weight"}
    # transformers never saves InstructBLIP's position_ids (a non-persistent buffer); a file converted elsewhere may
    return dict(table=table, ignore=[E + "position_ids"] if instruct else [], fresh=[], canon=None)


def bert_keys(cfg):
    """`load_weights` arguments for a BERT folder (after `bert_canon`), the stage-1 Q-Former's initialisation. What
    BERT lacks stays fresh: the cross-attention, and the MLM head when the folder is a plain BertModel."""
    L, P, V = "encoder.layer.{i}.", "cls.predictions.", cfg.vocab_size
    both = {
        "ln_embed": "embeddings.LayerNorm",
        "layers.{i}.attn.query": L + "attention.self.query", "layers.{i}.attn.key": L + "attention.self.key",
        "layers.{i}.attn.value": L + "attention.self.value", "layers.{i}.attn.dense": L + "attention.output.dense",
        "layers.{i}.attn.ln": L + "attention.output.LayerNorm",
        # the query FFN starts as a copy of the text FFN (LAVIS blip2_qformer.py)
        "layers.{i}.ffn_query.fc1": L + "intermediate.dense", "layers.{i}.ffn_query.fc2": L + "output.dense",
        "layers.{i}.ffn_query.ln": L + "output.LayerNorm",
        "layers.{i}.ffn_text.fc1": L + "intermediate.dense", "layers.{i}.ffn_text.fc2": L + "output.dense",
        "layers.{i}.ffn_text.ln": L + "output.LayerNorm",
        "lm_head.dense": P + "transform.dense", "lm_head.ln": P + "transform.LayerNorm",
    }
    table = {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in both.items() for p in ("weight", "bias")}
    grow = lambda t: torch.cat([t, t.new_zeros(V - t.size(0), *t.shape[1:]).normal_(std=0.02)])
    table |= {  # the vocabulary grows by [DEC], and the inverses drop that last row
        "word_embeddings.weight": (grow, ["embeddings.word_embeddings.weight"], lambda w: [w[:-1]]),
        "lm_head.bias": (lambda b: torch.cat([b, b.new_zeros(V - b.size(0))]), [P + "bias"], lambda b: [b[:-1]]),
        # no token-type table (LAVIS): its row 0 is folded into the positions, and written back as zeros
        "position_embeddings.weight": (lambda p, tt: p + tt[0], ["embeddings.position_embeddings.weight",
                                                                  "embeddings.token_type_embeddings.weight"],
                                       lambda p: [p, p.new_zeros(2, p.size(1))]),
    }
    ignore = ["pooler.*", "cls.seq_relationship.*", "cls.predictions.decoder.*", "embeddings.position_ids"]
    return dict(table=table, ignore=ignore, fresh=["layers.*.cross.*", "lm_head.*"], canon=bert_canon)


def bert_canon(key):
    """bert-base-uncased names: optional `bert.` prefix, LayerNorm gamma/beta."""
    key = key.removeprefix("bert.")
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
