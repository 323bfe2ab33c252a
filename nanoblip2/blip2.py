"""
The BLIP-2 models, both built on `Querying` (frozen ViT -> ln_vision -> 32 learned queries through the Q-Former).
- `Blip2Stage1` (paper §3.2, Figure 2): the Q-Former with its text branch and the ITC, ITM and ITG heads and losses.
  Matches HF `Blip2ForImageTextRetrieval` and LAVIS `blip2_qformer.py`.
- `Blip2` (§3.3, Figure 3): the query outputs, projected, are a soft visual prompt for a frozen OPT or FlanT5.
  Matches HF `Blip2ForConditionalGeneration` and LAVIS `blip2_opt.py` / `blip2_t5.py`.

Notable details
- `ln_vision` (HF `vision_model.post_layernorm`) normalises the frozen ViT's output and is trained with the
  Q-Former. Its eps is read from the checkpoint (HF 1e-6); a fresh one uses LAVIS's 1e-5.
- The stage-1 losses follow LAVIS, with two deviations stated where they happen (SPEC §10): `temp` is clamped, and
  the ITC gather across GPUs keeps its gradients. A third is opt-in: `NegativePool`, more candidates for ITM's hard
  negatives than a small batch holds (the quick start uses it; the paper's config does not).
- ITC similarity is the max over the 32 queries of the cosine between each query's projected feature and the
  projected [CLS] of the text (raw cosine at inference, divided by `temp` only when training).
- ITM logits are the 2-way head averaged over the 32 query outputs of a bidirectional [queries; text] pass.
- HF retrieval checkpoints have no ITG head, so a model loaded from one has `qformer.lm_head = None`.
"""
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from . import opt as op
from . import qformer as qf
from . import t5 as t5m
from . import vit as vt
from .data import load_image
from .generate import generate
from .load import CheckpointError, build_empty, check_frozen, load_weights, read_config, resolve, safetensors_files
from .tokenizer import load_opt_tokenizer, load_t5_tokenizer


@dataclass
class Stage1Config:
    vit: vt.ViTConfig = field(default_factory=vt.ViTConfig)
    qformer: qf.QFormerConfig = field(default_factory=qf.QFormerConfig)
    embed_dim: int = 256          # ITC projection width
    ln_vision_eps: float = 1e-5
    dec_id: int = 30522           # [DEC], the ITG start token: BERT's vocabulary size
    pad_id: int = 0               # [PAD]

    @classmethod
    def from_dict(cls, d):
        return cls(**(d | dict(vit=vt.ViTConfig(**d["vit"]), qformer=qf.QFormerConfig(**d["qformer"]))))


class Querying(nn.Module):
    """What both stages share (Figure 2, left): the frozen ViT, ln_vision, and the learned queries that read the
    image through the Q-Former's cross-attention."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vit = vt.ViT(cfg.vit)
        self.ln_vision = nn.LayerNorm(cfg.vit.width, eps=cfg.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.qformer.num_query_tokens, cfg.qformer.width))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.qformer = qf.QFormer(cfg.qformer)

    def image_embeds(self, pixel_values):  # (B, 3, S, S) -> (B, N, Cv); no graph when the ViT is frozen
        return self.ln_vision(self.vit(pixel_values))

    def queries(self, image):  # (B, N, Cv) -> query outputs (B, Q, C) and their self-attention K/V per layer
        return self.qformer(query_embeds=self.query_tokens.expand(image.size(0), -1, -1), image=image)

    @staticmethod
    def hf_table(cfg):
        """Our keys -> HF BLIP-2 keys for this part; the subclasses add theirs. Used to load and to export."""
        table = {"vit." + k: v for k, v in vt.hf_keys(cfg.vit)["table"].items()}
        table |= {"qformer." + k: v for k, v in qf.hf_table(cfg.qformer).items()}
        return table | {"query_tokens": "query_tokens", "ln_vision.weight": "vision_model.post_layernorm.weight",
                        "ln_vision.bias": "vision_model.post_layernorm.bias"}


class Blip2Stage1(Querying):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.vision_proj = nn.Linear(cfg.qformer.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.qformer.width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.qformer.width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

    # --- building blocks --------------------------------------------------------------------------------

    def image_feats(self, image):  # (B, N, Cv) -> normalised per-query features (B, Q, D)
        return F.normalize(self.vision_proj(self.queries(image)[0]), dim=-1)

    def text_feat(self, input_ids, attention_mask):  # (B, T) -> normalised [CLS] feature (B, D)
        h, _ = self.qformer(input_ids=input_ids, mask=qf.text_mask(attention_mask))
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def itm_from_embeds(self, image, input_ids, attention_mask):  # -> (B, 2)
        Q = self.query_tokens.expand(image.size(0), -1, -1)
        h, _ = self.qformer(query_embeds=Q, input_ids=input_ids, image=image,
                            mask=qf.bidirectional_mask(Q.size(1), attention_mask))
        return self.itm_head(h[:, :Q.size(1)]).mean(dim=1)

    # --- training: the three stage-1 losses (§3.2, LAVIS blip2_qformer.py:90-275) ---------------------------

    def forward(self, pixel_values, input_ids, attention_mask, generator=None, image_ids=None, pool=None):
        """pixel_values (B, 3, S, S); input_ids (B, T) = [CLS] caption [SEP], padded; generator: for the ITM negatives;
        image_ids (B,): samples of one image share an id and are never each other's negatives (LAVIS's image_id
        branch; None: every sample is its own image); pool: a NegativePool, more candidates for the ITM negatives.
        Returns a dict with loss = loss_itc + loss_itm + loss_itg (equal weights, as LAVIS)."""
        B = pixel_values.size(0)
        vit = self.vit(pixel_values)                                        # frozen: no graph
        image = self.ln_vision(vit)                                         # (B, N, Cv)
        q_out, past = self.queries(image)                                   # the queries' K/V are reused by ITG
        Q = q_out.size(1)
        img_feats = F.normalize(self.vision_proj(q_out), dim=-1)            # (B, Q, D)
        txt_feat = self.text_feat(input_ids, attention_mask)                # (B, D)

        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)  # Deviation from LAVIS: clamped as in BLIP-1 (and kept out of weight decay)
        loss_itc, sim_i2t, sim_t2i = itc_loss(img_feats, txt_feat, self.temp)

        # ITM: every pair once positive, then a hard negative image for each text and a hard negative text for
        # each image, drawn from the softmax of the ITC similarities with the pairs of the same image masked out.
        # Candidates: the batch of every rank, then this rank's pool (when given)
        if pool is not None and image_ids is None:
            raise ValueError("a NegativePool needs the image_ids of the samples")
        own = image_ids if image_ids is not None else torch.arange(B, device=input_ids.device) + _rows()[0]
        cand_ids = _gather(own, grad=False)                                 # the candidates' image ids
        image_all = _gather(image)                                          # ViT features of all ranks
        ids_all, mask_all = _gather(input_ids, grad=False), _gather(attention_mask, grad=False)
        n, p = len(image_all), pool.items if pool is not None else None
        if p is not None:
            with torch.no_grad():
                pool_t2i = torch.einsum("bd,mqd->bmq", txt_feat, p["img_feats"]).amax(dim=2) / self.temp
                pool_i2t = torch.einsum("bqd,md->bqm", img_feats, p["txt_feat"]).amax(dim=1) / self.temp
            sim_t2i, sim_i2t = torch.cat([sim_t2i, pool_t2i], 1), torch.cat([sim_i2t, pool_i2t], 1)
            cand_ids = torch.cat([cand_ids, p["image_ids"]])
            ids_all, mask_all = _pad_cat(ids_all, p["input_ids"]), _pad_cat(mask_all, p["attention_mask"])
        same = own[:, None] == cand_ids[None, :]
        neg_img = hard_negatives(sim_t2i, same, generator)                  # (B,) indices into the candidates
        neg_txt = hard_negatives(sim_i2t, same, generator)
        image_neg = image_all[neg_img.clamp(max=n - 1)]
        if p is not None:  # a pool image is its ViT output through today's ln_vision
            image_neg = torch.where((neg_img >= n)[:, None, None],
                                    self.ln_vision(p["vit"][(neg_img - n).clamp(min=0)]), image_neg)
        if pool is not None:
            pool.push(vit=vit, input_ids=input_ids, attention_mask=attention_mask, image_ids=own,
                      img_feats=img_feats, txt_feat=txt_feat)
        images = torch.cat([image, image_neg, image])
        ids = _pad_cat(input_ids, input_ids, ids_all[neg_txt])
        masks = _pad_cat(attention_mask, attention_mask, mask_all[neg_txt])
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        loss_itm = F.cross_entropy(self.itm_from_embeds(images, ids, masks), labels)

        # ITG: caption the image, [CLS] -> [DEC], text sees the queries (through their cached K/V) and its past
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.cfg.dec_id
        h, _ = self.qformer(input_ids=dec_ids, mask=qf.multimodal_causal_mask(Q, attention_mask)[:, Q:], past=past)
        logits = self.qformer.logits(h[:, :-1])
        target = dec_ids[:, 1:].masked_fill(dec_ids[:, 1:] == self.cfg.pad_id, -100)
        loss_itg = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, label_smoothing=0.1)
        return dict(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm, loss_itg=loss_itg)

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

    @torch.no_grad()
    def retrieval_scores(self, pixels, input_ids, attention_mask, k_test=128, batch_size=32, progress=True):
        """Image-text retrieval as LAVIS evaluates it (SPEC §5). pixels (N_img, 3, S, S) or a list of them; texts
        tokenised to a fixed length (LAVIS: 35). Every pair gets its ITC cosine; the k_test best texts of each image
        (and images of each text) are re-ranked by ITM: score = ITM positive logit + ITC cosine, the rest -100.
        Returns scores_i2t (N_img, N_txt) and scores_t2i (N_txt, N_img)."""
        dev = self.query_tokens.device
        dtype = self.query_tokens.dtype
        batches = lambda n: tqdm(range(0, n, batch_size), disable=not progress, leave=False)
        txt = torch.cat([self.text_feat(input_ids[i:i + batch_size].to(dev), attention_mask[i:i + batch_size].to(dev))
                         for i in batches(len(input_ids))])
        vit, img = [], []
        for i in batches(len(pixels)):
            px = torch.stack(list(pixels[i:i + batch_size])).to(dev, dtype)
            vit.append(self.image_embeds(px).cpu())  # kept on the CPU, as LAVIS
            img.append(self.image_feats(vit[-1].to(dev)))
        vit, img = torch.cat(vit), torch.cat(img)
        sims = torch.einsum("iqd,td->iqt", img, txt).amax(dim=1).float()  # (N_img, N_txt) raw cosine
        ids, mask = input_ids.to(dev), attention_mask.to(dev)

        def rerank(sims, by_image):  # rows: images (i2t) or texts (t2i); each row's k_test best columns: ITM + cosine
            out, n = sims.new_full(sims.shape, -100.0), max(1, 4 * batch_size // k_test)  # n rows per ITM pass
            for r in tqdm(range(0, len(sims), n), desc="ITM i2t" if by_image else "ITM t2i", disable=not progress,
                          leave=False):
                top, col = sims[r:r + n].topk(min(k_test, sims.size(1)), dim=1)     # (rows, k)
                row = torch.arange(r, r + len(col), device=col.device).repeat_interleave(col.size(1))
                i, t = (row, col.flatten()) if by_image else (col.flatten(), row)
                itm = self.itm_from_embeds(vit[i.cpu()].to(dev), ids[t], mask[t])[:, 1].float()
                out[r:r + n].scatter_(1, col, itm.view_as(top) + top)
            return out
        return rerank(sims, by_image=True), rerank(sims.T, by_image=False)

    # --- loading ----------------------------------------------------------------------------------------

    @staticmethod
    def hf_table(cfg):
        """Our keys -> HF Blip2ForImageTextRetrieval keys (no temp, no ITG head there)."""
        heads = {"vision_proj": "vision_projection", "text_proj": "text_projection", "itm_head": "itm_head"}
        return Querying.hf_table(cfg) | {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in heads.items()
                                         for p in ("weight", "bias")}

    @classmethod
    def from_pretrained(cls, src, image_size=None, device="cpu", dtype=None):
        """From an HF `Blip2ForImageTextRetrieval` folder (e.g. Salesforce/blip2-itm-vit-g) or one of our own
        stage-1 checkpoints."""
        src = resolve(src)
        d = read_config(src)
        if d.get("nanoblip2") == "stage1":
            return cls._from_checkpoint(src, d, device, dtype)
        if d.get("model_type") != "blip-2" or not d["qformer_config"].get("use_qformer_text_input"):
            raise CheckpointError(f"{src}: not a BLIP-2 image-text retrieval checkpoint "
                                  f"(model_type={d.get('model_type')!r}); stage-2 folders load with Blip2")
        cfg = Stage1Config(vit=vt.ViTConfig.from_hf(d, image_size), qformer=qf.QFormerConfig.from_hf_blip2(d),
                           embed_dim=d.get("image_text_hidden_size", 256),
                           ln_vision_eps=d["vision_config"]["layer_norm_eps"])
        model = build_empty(cls, cfg, device, dtype)
        table = cls.hf_table(cfg)
        load_weights(model, src, table, fresh=["temp"])
        with torch.no_grad():
            model.temp.fill_(0.07)  # not stored in HF checkpoints
        return model.eval()

    @classmethod
    def _from_checkpoint(cls, folder, d, device="cpu", dtype=None):
        """Our folder: the trainable tensors from model.safetensors, a frozen ViT from the source config.json names."""
        check_frozen(folder, d)
        cfg = Stage1Config.from_dict(d["model"])
        model = build_empty(cls, cfg, device, dtype)
        vit_src = d.get("frozen", {}).get("vit")
        if vit_src:
            load_weights(model.vit, resolve(vit_src), **vt.hf_keys(cfg.vit))
        table = {k: k for k in model.state_dict() if not (vit_src and k.startswith("vit."))}
        load_weights(model, folder, table, fresh=["vit.*"] if vit_src else [])
        return model.eval()

    @classmethod
    def from_vit_bert(cls, vit_src, bert_src, num_query_tokens=32, cross_attention_freq=2, image_size=None,
                      device="cpu"):
        """For training from scratch: the ViT of a BLIP-2 or CLIP folder, and a Q-Former initialised from BERT."""
        vit_src, bert_src = resolve(vit_src), resolve(bert_src)
        vcfg = vt.ViTConfig.from_hf(read_config(vit_src), image_size)
        qcfg = qf.QFormerConfig.from_hf_bert(read_config(bert_src), vcfg.width, num_query_tokens, cross_attention_freq)
        model = build_empty(cls, Stage1Config(vit=vcfg, qformer=qcfg, dec_id=qcfg.vocab_size - 1), device)
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


def opt_batch(tokenizer, captions, prompt="", max_length=32, num_queries=32):
    """OPT training text (LAVIS blip2_opt.py): BOS + prompt + " " + caption + "\n", right-padded. labels (B, Q + T) are
    -100 on the queries, on BOS + prompt when a prompt is set (with no prompt LAVIS trains the last query to predict
    BOS), and on padding: the loss is on the caption and its "\n"."""
    ids, mask = tokenizer([f"{prompt} {c}\n" if prompt else c + "\n" for c in captions], max_length=max_length)
    labels = ids.masked_fill(mask == 0, -100)
    if prompt:
        labels[:, :len(tokenizer([prompt], truncation=False)[0][0])] = -100  # BOS + prompt tokens
    labels = torch.cat([torch.full((len(captions), num_queries), -100), labels], dim=1)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def prefix_split(caption, generator=None):
    """FlanT5 pre-training's prefix LM (LAVIS #139): split at a word boundary k drawn from [1, n // 2]; the prefix goes
    to the encoder, the rest is the target. A caption of one word is all target."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    k = int(torch.randint(1, len(words) // 2 + 1, (1,), generator=generator))
    return " ".join(words[:k]), " ".join(words[k:])


def t5_batch(tokenizer, captions, prompt=None, max_length=32, generator=None):
    """FlanT5 training text: with a fixed prompt (captioning) the encoder reads the prompt and the target is the whole
    caption; without, each caption is split into prefix and suffix. Both sides end with </s>; padding -> -100."""
    pairs = [(prompt, c) if prompt is not None else prefix_split(c, generator) for c in captions]
    ids, mask = tokenizer([p for p, _ in pairs], max_length=max_length)
    out, out_mask = tokenizer([s for _, s in pairs], max_length=max_length)
    return dict(input_ids=ids, attention_mask=mask, labels=out.masked_fill(out_mask == 0, -100))


def itc_loss(img_feats, txt_feat, temp):
    """Image-text contrastive loss. img_feats (B, Q, D) and txt_feat (B, D) normalised, this rank's rows.
    Each image is scored against every text of every rank and back; a pair's score is its best query.
    Deviation from LAVIS (SPEC §10): the gather keeps gradients, so G ranks of B equal one process of G*B.
    Returns the loss and the temp-scaled similarities (B, G*B) both ways, for the ITM negatives."""
    img_all, txt_all = _gather(img_feats), _gather(txt_feat)                          # (G*B, Q, D), (G*B, D)
    sim_i2t = torch.einsum("bqd,td->bqt", img_feats, txt_all).amax(dim=1) / temp    # (B, G*B)
    sim_t2i = torch.einsum("bd,iqd->biq", txt_feat, img_all).amax(dim=2) / temp     # (B, G*B)
    targets = torch.arange(img_feats.size(0), device=sim_i2t.device) + _rows()[0]
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) +
            F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    return loss, sim_i2t, sim_t2i


def hard_negatives(sim, same, generator=None):
    """sim (B, N): temp-scaled ITC similarities of this rank's rows against the candidates; same (B, N) bool: the
    pairs of one image (the row's own positive among them). One index per row, drawn with probability softmax(sim)
    over the other candidates."""
    with torch.no_grad():
        w = sim.float().masked_fill(same, -10000.0)  # exp(-10000) is exactly 0 in fp32
        return torch.multinomial(w.softmax(dim=1), 1, generator=generator).squeeze(1)


def _pad_cat(*ts):
    """Concatenate (n, T_i) token tensors along dim 0, right-padded with 0 (the mask hides it) to the longest T."""
    T = max(t.size(1) for t in ts)
    return torch.cat([F.pad(t, (0, T - t.size(1))) for t in ts])


class NegativePool:
    """Deviation from LAVIS, opt-in: more candidates for ITM's hard negatives than the batch holds. The paper's
    batch of 1680 holds near-misses of most captions; a batch of 8 rarely does, and ITM, which re-ranks retrieval,
    then learns to tell only easy pairs apart. This keeps this rank's last `size` samples: the frozen ViT's output,
    the tokens, the image ids, and their ITC features (detached, up to size / B steps old: they only choose the
    negatives, whose ITM pass is computed afresh). In the quick start (batch 8) it lifts val R@1 from ~51% to ~78%
    (README)."""

    def __init__(self, size):
        self.size, self.buffers, self.filled, self.next = size, None, 0, 0

    @property
    def items(self):  # the filled rows (views), or None while empty
        return None if self.filled == 0 else {k: v[:self.filled] for k, v in self.buffers.items()}

    @torch.no_grad()
    def push(self, **batch):
        """Write the batch over the oldest rows: a ring buffer, so that the rest is not copied every step."""
        batch = {k: v.detach()[-self.size:] for k, v in batch.items()}
        if self.buffers is None:
            self.buffers = {k: v.new_zeros(self.size, *v.shape[1:]) for k, v in batch.items()}
        for k in ("input_ids", "attention_mask"):  # texts of another length: pad the shorter side
            if batch[k].size(1) != self.buffers[k].size(1):
                self.buffers[k], batch[k] = _pad_cat(self.buffers[k], batch[k]).split([self.size, len(batch[k])])
        ids = batch["image_ids"]
        rows = (self.next + torch.arange(len(ids), device=ids.device)) % self.size
        for k, v in batch.items():
            self.buffers[k][rows] = v
        self.next, self.filled = (self.next + len(rows)) % self.size, min(self.size, self.filled + len(rows))

    def state_dict(self):
        return {"next": self.next, "items": {k: v.cpu() for k, v in (self.items or {}).items()}}

    def load_state_dict(self, state, device=None):
        self.buffers, self.filled, self.next = None, 0, 0
        if state["items"]:  # the saved rows back into rows 0.., then the write position as it was
            self.push(**{k: v.to(device) for k, v in state["items"].items()})
            self.next = state["next"]


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rows():
    """(this rank's first row, all rows) in the batch gathered over ranks; ranks may differ in size when
    unreadable images were dropped from a batch."""
    return (_GatherWithGrad.offset, _GatherWithGrad.total) if _distributed() else (0, None)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the gathered tensor and keeps this rank's rows
    (LAVIS GatherLayer). torch.distributed.nn's all_gather gives wrong gradients on gloo for a gradient that
    arrives non-contiguous, as einsum's do (torch 2.13)."""
    offset, total = 0, None

    @staticmethod
    def forward(ctx, t):
        sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([t.size(0)], device=t.device))
        sizes = [int(n) for n in sizes]
        padded = t.new_zeros(max(sizes), *t.shape[1:])
        padded[:t.size(0)] = t
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        ctx.start = _GatherWithGrad.offset = sum(sizes[:dist.get_rank()])
        ctx.size, _GatherWithGrad.total = t.size(0), sum(sizes)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.size]


def _gather(t, grad=True):
    """Concatenate `t` over all ranks along dim 0; with grad, gradients flow back to the rank that owns each row."""
    if not _distributed():
        return t
    if grad:
        return _GatherWithGrad.apply(t)
    with torch.no_grad():
        return _GatherWithGrad.apply(t)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# Stage 2 (paper §3.3, Figure 3): the 32 query outputs, projected, are a soft visual prompt for a frozen LLM.


@dataclass
class Blip2Config:
    vit: vt.ViTConfig
    qformer: qf.QFormerConfig     # the stage-2 form: no text branch
    lm: object                    # OPTConfig or T5Config
    ln_vision_eps: float = 1e-5
    image_token_index: int | None = None  # HF >= 2024 folders mark the query slots with this token; we need no slots

    @classmethod
    def from_dict(cls, d):
        lm = (t5m.T5Config if d["lm_kind"] == "t5" else op.OPTConfig)(**d["lm"])
        return cls(vit=vt.ViTConfig(**d["vit"]), qformer=qf.QFormerConfig(**d["qformer"]), lm=lm,
                   ln_vision_eps=d["ln_vision_eps"], image_token_index=d.get("image_token_index"))

    def to_dict(self):
        return dataclasses.asdict(self) | {"lm_kind": "t5" if isinstance(self.lm, t5m.T5Config) else "opt"}


class Blip2(Querying):
    """
    Notable details
    - OPT (decoder-only): the LLM input is [queries; BOS + prompt]; the answer ends at "\\n" (LAVIS). Batched prompts
      are left-padded and the padding goes before the queries, so the model sees the HF layout.
    - FlanT5 (encoder-decoder): the encoder reads [queries; prompt + </s>], the decoder starts from <pad> = 0.
      Never run in fp16: the feed-forward activations overflow (use bf16 or fp32).
    - `generate` returns new token ids only, padded with the pad id.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.is_t5 = isinstance(cfg.lm, t5m.T5Config)
        self.lm = t5m.T5(cfg.lm) if self.is_t5 else op.OPT(cfg.lm)
        # into the LLM's input embedding space (for OPT that is word_embed_proj_dim, = width in every BLIP-2 OPT)
        self.language_projection = nn.Linear(cfg.qformer.width, cfg.lm.d_model if self.is_t5 else cfg.lm.word_embed_proj_dim)
        self.tokenizer = None  # set by from_pretrained
        self.end_id = cfg.lm.eos_id  # OPT: "\n" (LAVIS), from the tokenizer when there is one

    def visual_prompt(self, pixel_values):  # (B, 3, S, S) -> the soft visual prompt (B, Q, C_lm)
        return self.language_projection(self.queries(self.image_embeds(pixel_values))[0])

    # --- training: generative learning (§3.3, LAVIS blip2_opt.py / blip2_t5.py forward) -----------------------

    def forward(self, pixel_values, batch):
        """pixel_values (B, 3, S, S); batch from `opt_batch` or `t5_batch`. Returns dict(loss=...), the language
        modelling loss of the caption given the soft visual prompt. The frozen LLM passes gradients through."""
        prompt = self.visual_prompt(pixel_values)                                      # (B, Q, C)
        B, Q = prompt.shape[:2]
        if self.is_t5:  # prefix LM: [queries; prefix </s>] -> suffix </s>
            embeds = torch.cat([prompt, self.lm.embed(batch["input_ids"]).to(prompt.dtype)], dim=1)
            mask = torch.cat([batch["attention_mask"].new_ones(B, Q), batch["attention_mask"]], dim=1)
            enc = self.lm.encode(inputs_embeds=embeds, attention_mask=mask)
            labels = batch["labels"]
            dec_in = torch.cat([labels.new_full((B, 1), self.cfg.lm.decoder_start_id), labels[:, :-1]], dim=1)
            targets = labels != -100  # the vocabulary projection only where there is a target
            logits, _ = self.lm.decode(dec_in.masked_fill(dec_in == -100, self.cfg.lm.pad_id), enc, mask, keep=targets)
            return dict(loss=F.cross_entropy(logits.float(), labels[targets]))
        embeds = torch.cat([prompt, self.lm.embed(batch["input_ids"]).to(prompt.dtype)], dim=1)   # (B, Q + T, C)
        mask = torch.cat([batch["attention_mask"].new_ones(B, Q), batch["attention_mask"]], dim=1)
        labels = batch["labels"][:, Q:]                                                # (B, T); the queries are -100
        targets = labels != -100  # position Q - 1 + t predicts token t: project those with a target only
        logits, _ = self.lm(inputs_embeds=embeds, attention_mask=mask, keep=F.pad(targets, (Q - 1, 1)))  # (N, V)
        return dict(loss=F.cross_entropy(logits.float(), labels[targets]))

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, *, max_new_tokens=30, min_new_tokens=0,
                 num_beams=1, length_penalty=1.0, repetition_penalty=1.0, do_sample=False, temperature=1.0,
                 top_p=1.0, generator=None, use_cache=True):
        """pixel_values (B, 3, S, S); input_ids (B, T): BOS + prompt for OPT (left-padded), prompt + </s> for T5.
        Returns the new token ids (B, T_new), padded with the pad id. use_cache=False recomputes every step from
        scratch: slow, but the plain definition that the cached path is tested against."""
        if do_sample and num_beams > 1:
            raise ValueError("sampling with beams is not implemented: use do_sample=True or num_beams > 1")
        lm, cfg = self.lm, self.cfg.lm
        prompt = self.visual_prompt(pixel_values)
        B, Q = prompt.size(0), prompt.size(1)
        if input_ids is None:
            input_ids = torch.full((B, 1), cfg.eos_id if self.is_t5 else cfg.bos_id, device=prompt.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat([prompt, lm.embed(input_ids).to(prompt.dtype)], dim=1)  # (B, Q + T, C)
        mask = torch.cat([attention_mask.new_ones(B, Q), attention_mask], dim=1)
        if not self.is_t5:  # left padding goes before the queries, which is where HF puts it
            order = torch.argsort(mask, dim=1, stable=True)
            embeds, mask = embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)
        # the prompt runs once per image; its outputs are then copied for each beam (rows: batch-major, then beams)
        expand = lambda t: t.repeat_interleave(num_beams, dim=0)
        if self.is_t5:
            enc1 = lm.encode(inputs_embeds=embeds, attention_mask=mask)
            enc, enc_mask = expand(enc1), expand(mask)
            history = torch.full((B, 1), cfg.decoder_start_id, device=embeds.device)

            def prefill():
                return lm.decode(history, enc1, mask)

            def run(seq, cache):  # the whole decoder input without a cache, else its newest token
                return lm.decode(seq if cache is None else seq[:, -1:], enc, enc_mask, cache)
        else:
            history = input_ids

            def prefill():
                return lm(inputs_embeds=embeds, attention_mask=mask, keep=1)

            def run(seq, cache):  # the generated tokens: all of them after the prompt without a cache, else the newest
                full_mask = torch.cat([expand(mask), mask.new_ones(seq.size(0), seq.size(1))], dim=1)
                if cache is None:
                    x = torch.cat([expand(embeds), lm.embed(seq).to(embeds.dtype)], dim=1)
                    return lm(inputs_embeds=x, attention_mask=full_mask, keep=1)
                return lm(input_ids=seq[:, -1:], attention_mask=full_mask, cache=cache)
        state = dict(seq=expand(history) if self.is_t5 else history.new_zeros(B * num_beams, 0), cache=None)

        def start():
            logits, cache = prefill()
            if use_cache:
                state["cache"] = [tuple(expand(t) for t in layer) for layer in cache]
            return expand(logits[:, -1])

        def step(tokens, beams):  # one new token per row, after reordering the rows along `beams`
            if beams is not None:
                state["seq"] = state["seq"][beams]
                if use_cache:
                    state["cache"] = [tuple(t[beams] for t in layer) for layer in state["cache"]]
            state["seq"] = torch.cat([state["seq"], tokens[:, None]], dim=1)
            logits, cache = run(state["seq"], state["cache"])
            state["cache"] = cache if use_cache else None
            return logits[:, -1]

        return generate(start, step, history, eos_id=self.end_id, pad_id=cfg.pad_id,
                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                        length_penalty=length_penalty, repetition_penalty=repetition_penalty, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, generator=generator)

    # --- the paper's two zero-shot uses ---------------------------------------------------------------------

    def caption(self, images, prompt="", **kw):
        """Images (paths, PIL images or a (B, 3, S, S) tensor) -> captions. LAVIS defaults: beam 5, 1..30 new tokens."""
        pixels = self._pixels(images)
        kw = dict(num_beams=5, max_new_tokens=30, min_new_tokens=1) | kw
        return self._complete(pixels, [prompt] * pixels.size(0), kw)

    def answer(self, images, questions, **kw):
        """Zero-shot VQA with the paper's prompt, beam 5, length penalty -1, at most 10 new tokens (§4.2)."""
        template = "Question: {} Short answer:" if self.is_t5 else "Question: {} Answer:"
        kw = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0) | kw
        return self._complete(self._pixels(images), [template.format(q) for q in questions], kw)

    def _pixels(self, images):
        p = next(self.parameters())
        if not torch.is_tensor(images):
            images = torch.stack([load_image(im, self.cfg.vit.image_size) for im in images])
        return images.to(p.device, p.dtype)

    def _complete(self, pixels, prompts, kw):
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with Blip2.from_pretrained or set .tokenizer")
        side = "right" if self.is_t5 else "left"  # decoder-only prompts are left-padded (HF #22014)
        # OPT's learned positions end at max_positions; T5's relative ones do not, LAVIS cuts its prompts at 512
        room = 512 if self.is_t5 else self.cfg.lm.max_positions - self.cfg.qformer.num_query_tokens - kw["max_new_tokens"]
        full, _ = self.tokenizer(prompts, truncation=False, padding_side=side)
        if full.size(1) > room:
            warnings.warn(f"prompt of {full.size(1)} tokens truncated to {room} to fit the model's context")
        ids, mask = self.tokenizer(prompts, max_length=room, padding_side=side)
        out = self.generate(pixels, ids.to(pixels.device), mask.to(pixels.device), **kw)
        return [t.strip() for t in self.tokenizer.batch_decode(out)]

    # --- loading --------------------------------------------------------------------------------------------

    @classmethod
    def _from_checkpoint(cls, folder, d, device="cpu", dtype=None):
        """Our folder: the trained tensors from model.safetensors; the frozen ViT and LLM from the sources named in
        config.json."""
        check_frozen(folder, d)
        cfg = Blip2Config.from_dict(d["model"])
        if isinstance(cfg.lm, t5m.T5Config) and dtype == torch.float16:
            raise CheckpointError(f"{folder}: FlanT5 overflows in float16; use bfloat16 or float32")
        model = build_empty(cls, cfg, device, dtype)
        vit_src, lm_src = d["frozen"].get("vit"), resolve(d["frozen"]["lm"])
        if vit_src:
            load_weights(model.vit, resolve(vit_src), **vt.hf_keys(cfg.vit))
        model.lm = (t5m.T5 if model.is_t5 else op.OPT).from_pretrained(lm_src, device=device, dtype=dtype)
        skip = ("lm.", "vit.") if vit_src else ("lm.",)
        load_weights(model, folder, {k: k for k in model.state_dict() if not k.startswith(skip)},
                     fresh=[p + "*" for p in skip])
        model._set_tokenizer(lm_src)
        return model.eval()

    def _set_tokenizer(self, folder):
        try:
            self.tokenizer = (load_t5_tokenizer if self.is_t5 else load_opt_tokenizer)(folder)
        except FileNotFoundError as e:
            raise CheckpointError(f"{folder}: tokenizer files missing ({e})") from None
        self.end_id = self.cfg.lm.eos_id if self.is_t5 else self.tokenizer.newline_id

    @classmethod
    def from_stage1(cls, stage1, lm_src, device="cpu", dtype=None):
        """Stage 2's starting point (LAVIS pretrain_stage2.yaml): the ViT, ln_vision, query tokens and Q-Former of a
        stage-1 model (our checkpoint folder, or a Blip2Stage1) without the text branch, a new language_projection,
        and a frozen OPT or T5 from an HF folder or Hub id."""
        s1 = stage1 if isinstance(stage1, Blip2Stage1) else Blip2Stage1.from_pretrained(stage1, device=device)
        lm_src = resolve(lm_src)
        d = read_config(lm_src)
        kind = d.get("model_type")
        if kind not in ("opt", "t5"):
            raise CheckpointError(f"{lm_src}: model_type {kind!r}; the language model must be OPT or T5")
        lm_cfg = t5m.T5Config.from_hf(d) if kind == "t5" else op.OPTConfig.from_hf(d)
        qcfg = dataclasses.replace(s1.cfg.qformer, text=False, lm_head=False)
        cfg = Blip2Config(vit=s1.cfg.vit, qformer=qcfg, lm=lm_cfg, ln_vision_eps=s1.cfg.ln_vision_eps)
        with torch.device("meta"):
            model = cls(cfg)
        model.lm = (t5m.T5 if kind == "t5" else op.OPT).from_pretrained(lm_src, device=device, dtype=dtype)
        model.language_projection = nn.Linear(qcfg.width, model.language_projection.out_features, device=device)
        model.vit, model.ln_vision, model.query_tokens = s1.vit, s1.ln_vision, s1.query_tokens
        model.qformer = qf.QFormer(qcfg).to(device)
        missing, unexpected = model.qformer.load_state_dict(s1.qformer.state_dict(), strict=False)
        text_branch = ("word_embeddings.", "position_embeddings.", "lm_head.", ".ffn_text.")
        if missing or not all(any(part in k for part in text_branch) for k in unexpected):
            raise CheckpointError(f"stage-1 Q-Former does not fit: missing {missing}, unexpected {unexpected}")
        model._set_tokenizer(lm_src)
        return model.to(dtype) if dtype is not None else model

    @staticmethod
    def hf_table(cfg, keys=None):
        """Our keys -> HF Blip2ForConditionalGeneration keys, and the LLM's load_weights arguments (its ignore list
        and canon). keys: the file's key names, which tell a T5 head saved untied from one saved once."""
        table = Querying.hf_table(cfg) | {f"language_projection.{p}": f"language_projection.{p}"
                                          for p in ("weight", "bias")}
        if isinstance(cfg.lm, t5m.T5Config):
            lm = t5m.hf_keys(cfg.lm, "language_model.", keys)
            return table | {"lm." + k: v for k, v in lm["table"].items()}, lm
        lm = op.hf_keys(cfg.lm, prefix="lm.")
        return table | lm["table"], lm

    @classmethod
    def from_pretrained(cls, src, device="cpu", dtype=None, image_size=None):
        """From an HF BLIP-2 folder (Blip2ForConditionalGeneration, original or 2024 layout), a Hub id, or one of our
        own stage-2 checkpoints."""
        folder = resolve(src)
        d = read_config(folder)
        if d.get("nanoblip2") == "stage2":
            return cls._from_checkpoint(folder, d, device, dtype)
        if d.get("model_type") != "blip-2":
            raise CheckpointError(f"{folder}: model_type {d.get('model_type')!r}, not a BLIP-2 folder")
        kind = (d.get("text_config") or {}).get("model_type", "opt")
        if kind not in ("opt", "t5"):
            raise CheckpointError(f"{folder}: language model {kind!r} is not supported (OPT or T5 only)")
        if kind == "t5" and dtype == torch.float16:
            raise CheckpointError(f"{folder}: FlanT5 overflows in float16; use bfloat16 or float32")
        lm_cfg = t5m.T5Config.from_hf(d) if kind == "t5" else op.OPTConfig.from_hf(d)
        cfg = Blip2Config(vit=vt.ViTConfig.from_hf(d, image_size), qformer=qf.QFormerConfig.from_hf_blip2(d), lm=lm_cfg,
                          ln_vision_eps=d.get("vision_config", {}).get("layer_norm_eps", 1e-6),
                          image_token_index=d.get("image_token_index"))
        model = build_empty(cls, cfg, device, dtype)
        model._set_tokenizer(folder)  # before the weights: a missing tokenizer fails fast
        keys = {k for f in safetensors_files(folder) for k in safe_open(f, framework="pt").keys()}
        table, lm = cls.hf_table(cfg, keys)
        ignore = [p for p in lm["ignore"] if p.startswith("language_model.")]
        load_weights(model, folder, table, ignore=ignore, canon=lm.get("canon"))
        return model.eval()
