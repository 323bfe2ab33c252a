"""
The frozen image encoder of BLIP-2 (paper §3.1): EVA-CLIP ViT-g/14 or OpenAI CLIP ViT-L/14.
Matches HF `Blip2VisionModel` (modeling_blip_2.py) and LAVIS `eva_vit.py` / `clip_vit.py`.

Notable details (the sizes: docs/reference.md, "Image encoder")
- BLIP-2 uses the *second-last* layer's output: EVA-g keeps 39 of its 40 blocks (so do HF checkpoints), CLIP-L 23
  of 24 (we ignore the file's last one). It is not normalised here: `ln_vision` is trained with the Q-Former.
- EVA: pre-LN blocks, patch conv *with* bias, qkv without bias plus q and v biases (no k bias), exact GELU, eps 1e-6.
  CLIP: no patch bias, `ln_pre`, QuickGELU, eps 1e-5; its k bias adds q.b_k to a whole row of scores, which
  softmax ignores, so it is dropped.
- Position embeddings are interpolated at load time for another image size (bicubic; align_corners=False for EVA
  as LAVIS and HF, True for CLIP as LAVIS).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .load import prefixed

ACT = {"gelu": nn.GELU, "quick_gelu": lambda: QuickGELU(), "gelu_new": lambda: nn.GELU("tanh"), "relu": nn.ReLU}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39        # blocks actually built (second-last layer of the original)
    heads: int = 16
    mlp: int = 6144
    eps: float = 1e-6
    act: str = "gelu"
    clip: bool = False     # CLIP layout: ln_pre, no patch bias, separate q/k/v projections in the file
    source_image_size: int = 224  # image size of the checkpoint's position embedding

    @classmethod
    def from_hf(cls, d, image_size=None):
        """From a BLIP-2 `config.json` (its vision_config), a CLIPVisionModel or a CLIPModel config.json.
        HF omits keys that equal the class defaults, so those defaults are spelled out here."""
        clip = d.get("model_type") in ("clip", "clip_vision_model")
        v = d.get("vision_config", d) if d.get("model_type") in ("blip-2", "clip") else d
        if d.get("model_type") not in ("blip-2", "clip", "clip_vision_model"):
            raise ValueError(f"model_type {d.get('model_type')!r} is not a BLIP-2 or CLIP vision model")
        hf = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu") if clip else
              dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                   patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu")) | dict(image_size=224) | v
        return cls(image_size=image_size or hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
                   depth=hf["num_hidden_layers"] - clip, heads=hf["num_attention_heads"], mlp=hf["intermediate_size"],
                   eps=hf["layer_norm_eps"], act=hf["hidden_act"], clip=clip, source_image_size=hf["image_size"])

    def to_hf(self):
        """The inverse of `from_hf`: a BLIP-2 vision_config, or a CLIPVisionModel config.json (with the last layer)."""
        d = dict(hidden_size=self.width, intermediate_size=self.mlp, num_hidden_layers=self.depth + self.clip,
                 num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch_size,
                 layer_norm_eps=self.eps, hidden_act=self.act)
        if self.clip:
            return dict(architectures=["CLIPVisionModel"], model_type="clip_vision_model", num_channels=3) | d
        return dict(model_type="blip_2_vision_model", qkv_bias=True) | d


PRESETS = {
    "eva-vit-g": ViTConfig(),
    "clip-vit-l": ViTConfig(width=1024, depth=23, heads=16, mlp=4096, eps=1e-5, act="quick_gelu", clip=True),
}


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, C/H)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.act = ACT[cfg.act]()
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=not cfg.clip)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.clip else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.grad_checkpoint = False  # a trained ViT (fine-tuning): keep each block's input, recompute the rest

    def forward(self, pixel_values):  # (B, 3, S, S) -> (B, N, C), N = (S/patch)^2 + 1
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.ln_pre(torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embed)
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():  # activations recomputed in the backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def interpolate_pos_embed(pos, num_patches, align_corners):
    """(1, 1 + g*g, C) -> (1, 1 + num_patches, C), bicubic over the square grid; the CLS position is kept."""
    pos = pos.reshape(1, -1, pos.size(-1))
    g_old, g_new = math.isqrt(pos.size(1) - 1), math.isqrt(num_patches)
    if g_old == g_new:
        return pos
    grid = pos[:, 1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(g_new, g_new), mode="bicubic", align_corners=align_corners)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1)
    return torch.cat([pos[:, :1], grid], dim=1)


def hf_keys(cfg):
    """`load_weights` arguments for a BLIP-2 folder (EVA) or a CLIPVisionModel / CLIPModel folder (CLIP): our key ->
    its HF key (`{i}` the block), or (fn, [HF keys], inverse) where tensors are combined; export.py writes inverses."""
    n, C, zero = (cfg.image_size // cfg.patch_size) ** 2, cfg.width, torch.zeros_like
    pos = lambda t: interpolate_pos_embed(t, n, align_corners=cfg.clip)
    L, A = "encoder.layers.{i}.", "encoder.layers.{i}.self_attn."
    table = {
        "patch_embed.weight": "embeddings.patch_embedding.weight",
        "blocks.{i}.norm1.weight": L + "layer_norm1.weight", "blocks.{i}.norm1.bias": L + "layer_norm1.bias",
        "blocks.{i}.norm2.weight": L + "layer_norm2.weight", "blocks.{i}.norm2.bias": L + "layer_norm2.bias",
        "blocks.{i}.mlp.fc1.weight": L + "mlp.fc1.weight", "blocks.{i}.mlp.fc1.bias": L + "mlp.fc1.bias",
        "blocks.{i}.mlp.fc2.weight": L + "mlp.fc2.weight", "blocks.{i}.mlp.fc2.bias": L + "mlp.fc2.bias",
    }
    if cfg.clip:
        return _clip_keys(table, pos, cfg.depth)
    table |= {
        "patch_embed.bias": "embeddings.patch_embedding.bias",
        "cls_token": "embeddings.class_embedding",
        "pos_embed": (pos, ["embeddings.position_embedding"], lambda t: [t]),  # written at the model's image size
        "blocks.{i}.attn.qkv.weight": A + "qkv.weight",
        # HF stores one bias cat(q, 0, v): each of ours is written with zeros elsewhere, and the two add up
        "blocks.{i}.attn.q_bias": (lambda b: b[:C], [A + "qkv.bias"], lambda q: [torch.cat([q, zero(q), zero(q)])]),
        "blocks.{i}.attn.v_bias": (lambda b: b[2 * C:], [A + "qkv.bias"], lambda v: [torch.cat([zero(v), zero(v), v])]),
        "blocks.{i}.attn.proj.weight": A + "projection.weight", "blocks.{i}.attn.proj.bias": A + "projection.bias",
    }
    # ln_vision (post_layernorm) is loaded by stage1.py when wanted; the rest of a BLIP-2 folder is not the ViT
    keys = prefixed(dict(table=table, ignore=["post_layernorm.*"], fresh=[], canon=None), hf="vision_model.")
    keys["ignore"] += ["query_tokens", "qformer.*", "embeddings.*", "language_*", "vision_projection.*",
                       "text_projection.*", "itm_head.*"]
    return keys


def _clip_keys(table, pos, depth):
    A = "encoder.layers.{i}.self_attn."
    table |= {
        "cls_token": (lambda t: t.reshape(1, 1, -1), ["embeddings.class_embedding"], lambda t: [t.flatten()]),
        "pos_embed": (pos, ["embeddings.position_embedding.weight"], lambda t: [t[0]]),
        "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
        "blocks.{i}.attn.qkv.weight": (lambda q, k, v: torch.cat([q, k, v]),
                                       [A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"],
                                       lambda w: w.chunk(3)),
        # the k bias has no effect on softmax (see the docstring): read but not kept, written back as zeros
        "blocks.{i}.attn.q_bias": (lambda q, k: q, [A + "q_proj.bias", A + "k_proj.bias"],
                                   lambda q: [q, torch.zeros_like(q)]),
        "blocks.{i}.attn.v_bias": A + "v_proj.bias",
        "blocks.{i}.attn.proj.weight": A + "out_proj.weight", "blocks.{i}.attn.proj.bias": A + "out_proj.bias",
    }
    # the last layer is not built: BLIP-2 takes the second-last one's output
    ignore = [f"encoder.layers.{depth}.*", "post_layernorm.*", "text_model.*", "visual_projection.*",
              "text_projection.*", "logit_scale"]
    # CLIPModel and older CLIPVisionModel files prefix the vision keys with `vision_model.`, newer ones do not
    return dict(table=table, ignore=ignore, fresh=[], canon=lambda k: k.removeprefix("vision_model."))
