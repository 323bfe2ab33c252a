"""
The BLIP-2 models. Stage 1 (paper §3.2): frozen ViT + Q-Former with the ITC, ITM and ITG heads.
Matches HF `Blip2ForImageTextRetrieval` (modeling_blip_2.py) and LAVIS `blip2_qformer.py`.

Notable details
- `ln_vision` (HF `vision_model.post_layernorm`) normalises the frozen ViT's output and is trained with the
  Q-Former. Its eps is read from the checkpoint (HF 1e-6); a fresh one uses LAVIS's 1e-5.
- ITC similarity is the max over the 32 queries of the cosine between each query's projected feature and the
  projected [CLS] of the text (raw cosine at inference, divided by `temp` only when training).
- ITM logits are the 2-way head averaged over the 32 query outputs of a bidirectional [queries; text] pass.
- HF retrieval checkpoints have no ITG head, so a model loaded from one has `qformer.lm_head = None`.
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import qformer as qf
from . import vit as vt
from .load import CheckpointError, build_empty, load_weights, read_config


@dataclass
class Stage1Config:
    vit: vt.ViTConfig = field(default_factory=vt.ViTConfig)
    qformer: qf.QFormerConfig = field(default_factory=qf.QFormerConfig)
    embed_dim: int = 256          # ITC projection width
    ln_vision_eps: float = 1e-5


class Blip2Stage1(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vit = vt.ViT(cfg.vit)
        self.ln_vision = nn.LayerNorm(cfg.vit.width, eps=cfg.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.qformer.num_query_tokens, cfg.qformer.width).normal_(std=0.02))
        self.qformer = qf.QFormer(cfg.qformer)
        self.vision_proj = nn.Linear(cfg.qformer.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.qformer.width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.qformer.width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

    # --- building blocks --------------------------------------------------------------------------------

    def image_embeds(self, pixel_values):  # (B, 3, S, S) -> (B, N, Cv)
        return self.ln_vision(self.vit(pixel_values))

    def image_feats(self, image):  # (B, N, Cv) -> normalised per-query features (B, Q, D)
        Q = self.query_tokens.expand(image.size(0), -1, -1)
        h, _ = self.qformer(query_embeds=Q, image=image)
        return F.normalize(self.vision_proj(h), dim=-1)

    def text_feat(self, input_ids, attention_mask):  # (B, T) -> normalised [CLS] feature (B, D)
        h, _ = self.qformer(input_ids=input_ids, mask=qf.text_mask(attention_mask))
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def itm_from_embeds(self, image, input_ids, attention_mask):  # -> (B, 2)
        Q = self.query_tokens.expand(image.size(0), -1, -1)
        h, _ = self.qformer(query_embeds=Q, input_ids=input_ids, image=image,
                            mask=qf.bidirectional_mask(Q.size(1), attention_mask))
        return self.itm_head(h[:, :Q.size(1)]).mean(dim=1)

    # --- public scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def itm_logits(self, pixel_values, input_ids, attention_mask):
        """Image-text matching logits (B, 2), one image per text; softmax(...)[:, 1] is P(match)."""
        return self.itm_from_embeds(self.image_embeds(pixel_values), input_ids, attention_mask)

    @torch.no_grad()
    def itc_similarity(self, pixel_values, input_ids, attention_mask):
        """Raw cosine similarity (B_img, B_txt), max over queries."""
        img = self.image_feats(self.image_embeds(pixel_values))  # (Bi, Q, D)
        txt = self.text_feat(input_ids, attention_mask)          # (Bt, D)
        return torch.einsum("iqd,td->iqt", img, txt).amax(dim=1)

    # --- loading ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, src, image_size=None, device="cpu", dtype=None):
        """From an HF `Blip2ForImageTextRetrieval` folder (e.g. Salesforce/blip2-itm-vit-g)."""
        d = read_config(src)
        if d.get("model_type") != "blip-2" or not d["qformer_config"].get("use_qformer_text_input"):
            raise CheckpointError(f"{src}: not a BLIP-2 image-text retrieval checkpoint "
                                  f"(model_type={d.get('model_type')!r}); stage-2 folders load with Blip2")
        cfg = Stage1Config(vit=vt.ViTConfig.from_hf(d, image_size), qformer=qf.QFormerConfig.from_hf_blip2(d),
                           embed_dim=d.get("image_text_hidden_size", 256),
                           ln_vision_eps=d["vision_config"]["layer_norm_eps"])
        model = build_empty(cls, cfg, device, dtype)
        table = {"vit." + k: v for k, v in vt.hf_keys(cfg.vit)["table"].items()} | {"qformer." + k: v for k, v in qf.hf_table(cfg.qformer).items()}
        for name in ("vision_proj", "text_proj", "itm_head"):
            hf = {"vision_proj": "vision_projection", "text_proj": "text_projection"}.get(name, name)
            table |= {f"{name}.weight": f"{hf}.weight", f"{name}.bias": f"{hf}.bias"}
        table |= {"query_tokens": "query_tokens", "ln_vision.weight": "vision_model.post_layernorm.weight",
                  "ln_vision.bias": "vision_model.post_layernorm.bias"}
        load_weights(model, src, table, fresh=["temp"])
        with torch.no_grad():
            model.temp.fill_(0.07)  # not stored in HF checkpoints
        return model.eval()

    @classmethod
    def from_vit_bert(cls, vit_src, bert_src, num_query_tokens=32, cross_attention_freq=2, image_size=None,
                      device="cpu"):
        """For training from scratch: the ViT of a BLIP-2 or CLIP folder, and a Q-Former initialised from BERT."""
        vcfg = vt.ViTConfig.from_hf(read_config(vit_src), image_size)
        qcfg = qf.QFormerConfig.from_hf_bert(read_config(bert_src), vcfg.width, num_query_tokens, cross_attention_freq)
        model = build_empty(cls, Stage1Config(vit=vcfg, qformer=qcfg), device)
        load_weights(model.vit, vit_src, **vt.hf_keys(vcfg))
        # everything but the ViT starts fresh; then BERT overwrites what it provides
        model.qformer.apply(qf.QFormer._init_weights)
        for m in (model.vision_proj, model.text_proj, model.itm_head):
            qf.QFormer._init_weights(m)
        model.ln_vision.reset_parameters()
        with torch.no_grad():
            model.query_tokens.normal_(std=0.02)
            model.temp.fill_(0.07)
        load_weights(model.qformer, bert_src, qf.bert_table(qcfg), ignore=qf.BERT_IGNORE, fresh=qf.BERT_FRESH,
                     canon=qf.bert_canon)
        return model


def num_params(module):
    return sum(p.numel() for p in module.parameters())
