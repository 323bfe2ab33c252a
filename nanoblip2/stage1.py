"""
Stage 1 of BLIP-2 (paper §3.2, Figure 2): vision-language representation learning from a frozen image encoder.
`Querying` (frozen ViT -> ln_vision -> 32 learned queries through the Q-Former) is what both stages share;
`Blip2Stage1` adds the Q-Former's text branch and the ITC, ITM and ITG heads and losses.
Matches HF `Blip2ForImageTextRetrieval` and LAVIS `blip2_qformer.py`.

Notable details
- `ln_vision` (HF `vision_model.post_layernorm`) normalises the frozen ViT's output and is trained with the
  Q-Former. Its eps is read from the checkpoint (HF 1e-6); a fresh one uses LAVIS's 1e-5.
- The losses follow LAVIS, with two deviations stated where they happen (docs/reference.md): `temp` is clamped,
  and the ITC gather across GPUs keeps its gradients. Opt-in, for batches far smaller than the paper's: extra
  `candidates` for ITM's hard negatives, kept by the loop (`training.NegativePool`), not the model; with
  `itc_pool`, the ones ITM drew from there are ITC negatives too, their features recomputed (`fresh_feats`).
- ITC similarity: the max over the 32 queries of the cosine of the query's and the text [CLS]'s projected
  features (divided by `temp` only when training). ITM logits: the 2-way head averaged over the 32 query outputs.
- HF retrieval checkpoints have no ITG head, so a model loaded from one has `qformer.lm_head = None`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from dataclasses import dataclass, field
from tqdm import tqdm

from . import qformer as qf
from . import vit as vt
from .checkpoint import check_frozen
from .data import pad_cat
from .hub import resolve
from .load import CheckpointError, build_empty, load_weights, prefixed, read_config, reading
from .training import gather, rank_rows


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
    """What both stages share (Figure 2, left): the frozen ViT, ln_vision, and the queries reading the image."""

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

    def queries(self, image, input_ids=None, attention_mask=None):
        """image (B, N, Cv) -> the query outputs (B, Q, C) and the self-attention K/V per layer. With text (B, T) (ITM,
        or Figure 7's instruction), queries and text see each other (ITM's mask); only the query outputs are kept."""
        Q = self.query_tokens.expand(image.size(0), -1, -1)
        if input_ids is None:
            return self.qformer(query_embeds=Q, image=image)
        mask = qf.bidirectional_mask(Q.size(1), attention_mask)
        h, kv = self.qformer(query_embeds=Q, input_ids=input_ids, image=image, mask=mask)
        return h[:, :Q.size(1)], kv

    def own_tensors(self, frozen):
        """`load_weights`' table for our checkpoint folders: every tensor but the frozen prefixes' (read from their
        sources); a ViT trained with the rest, saved in the folder, is read at this model's image size."""
        table = {k: k for k in self.state_dict() if not k.startswith(frozen)}
        if "vit." not in frozen:  # the position embedding interpolated, as at load time
            n = (self.cfg.vit.image_size // self.cfg.vit.patch_size) ** 2
            table["vit.pos_embed"] = (lambda t: vt.interpolate_pos_embed(t, n, self.cfg.vit.clip), ["vit.pos_embed"])
        return table

    @staticmethod
    def hf_keys(cfg):
        """`load_weights` arguments for this part of an HF BLIP-2 folder (the subclasses add theirs): the ViT's and
        the Q-Former's tables under our prefixes, without their ignore lists (the file is read whole, strictly)."""
        table = prefixed(vt.hf_keys(cfg.vit), "vit.")["table"] | prefixed(qf.hf_keys(cfg.qformer), "qformer.")["table"]
        table |= {"query_tokens": "query_tokens", "ln_vision.weight": "vision_model.post_layernorm.weight",
                  "ln_vision.bias": "vision_model.post_layernorm.bias"}
        return dict(table=table, ignore=[], fresh=[], canon=None)


class Blip2Stage1(Querying):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.vision_proj = nn.Linear(cfg.qformer.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.qformer.width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.qformer.width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.temp_max = 0.5  # BLIP-1's clamp (train_stage1.py --temp_max)
        self.itc_pool = False  # ITC also against ITM's negatives from the candidates (train_stage1.py --itc_pool)

    def image_feats(self, image):  # (B, N, Cv) -> normalised per-query features (B, Q, D)
        return F.normalize(self.vision_proj(self.queries(image)[0]), dim=-1)

    def text_feat(self, input_ids, attention_mask):  # (B, T) -> normalised [CLS] feature (B, D)
        h, _ = self.qformer(input_ids=input_ids, mask=qf.text_mask(attention_mask))
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def itm_from_embeds(self, image, input_ids, attention_mask):  # -> (B, 2)
        return self.itm_head(self.queries(image, input_ids, attention_mask)[0]).mean(dim=1)

    # --- training: the three stage-1 losses (§3.2, LAVIS blip2_qformer.py:90-275) ---------------------------

    def forward(self, pixel_values, input_ids, attention_mask, generator=None, image_ids=None, candidates=None,
                itg=True):
        """pixel_values (B, 3, S, S); input_ids (B, T) = [CLS] caption [SEP], padded; generator: for the ITM negatives;
        image_ids (B,): samples of one image share an id, are ITC positives of each other and never ITM negatives
        (LAVIS's image_id branch; None: each sample its own image); candidates: earlier samples to draw them from
        (NegativePool.items); itg: False leaves ITG out. -> loss = loss_itc + loss_itm + loss_itg (equal weights, as
        LAVIS), the three, and `samples` for the pool."""
        if candidates is not None and image_ids is None:
            raise ValueError("candidates need the image_ids of the samples")
        with torch.no_grad():
            self.temp.clamp_(0.001, self.temp_max)  # Deviation from LAVIS: clamped as BLIP-1 (no weight decay)
        itc_ids = image_ids  # None: ITC's positives are the diagonal, as LAVIS without image ids
        if image_ids is None:  # each sample its own image, numbered over all ranks
            image_ids = rank_rows(len(input_ids), input_ids.device)
        vit = self.vit(pixel_values)                                        # frozen (pre-training): no graph
        image = self.ln_vision(vit)                                         # (B, N, Cv)
        q_out, past = self.queries(image)                                   # the queries' K/V are reused by ITG
        img_feats = F.normalize(self.vision_proj(q_out), dim=-1)            # (B, Q, D)
        txt_feat = self.text_feat(input_ids, attention_mask)                # (B, D)
        samples = dict(vit=vit, input_ids=input_ids, attention_mask=attention_mask, image_ids=image_ids,
                       img_feats=img_feats, txt_feat=txt_feat)

        ###============== Image-text Contrastive ===================###
        sims = itc_similarities(img_feats, txt_feat, self.temp)            # (B, G*B) both ways, for ITM too

        ###============== Image-text Matching ===================###
        loss_itm, picked = self.itm(image, samples, *sims, generator, candidates)
        extra = self.fresh_feats(candidates, *picked) if picked is not None else None  # itc_pool: ITM's pool rows
        loss_itc = itc_loss(img_feats, txt_feat, self.temp, itc_ids, extra, sims)[0]

        ###============== Image Captioning ===================###
        out = dict(loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm, samples=samples)
        if itg:  # off: Table 6's ablation, without its forward
            out["loss_itg"] = self.itg(input_ids, attention_mask, past)
            out["loss"] = out["loss"] + out["loss_itg"]
        return out

    def itm(self, image, samples, sim_i2t, sim_t2i, generator=None, candidates=None):
        """Every pair once positive, then a hard negative image for each text and a hard negative text for each image,
        drawn by softmax(ITC similarity), pairs of one image masked out, from every rank's batch, then `candidates`."""
        input_ids, attention_mask, own = samples["input_ids"], samples["attention_mask"], samples["image_ids"]
        cand_ids, image_all = gather(own), gather(image)                    # image ids, ln_vision(ViT) of all ranks
        ids_all, mask_all = gather(input_ids), gather(attention_mask)
        n, p = len(image_all), candidates
        if p is not None:
            with torch.no_grad():
                pool_t2i = torch.einsum("bd,mqd->bmq", samples["txt_feat"], p["img_feats"]).amax(dim=2) / self.temp
                pool_i2t = torch.einsum("bqd,md->bqm", samples["img_feats"], p["txt_feat"]).amax(dim=1) / self.temp
            sim_t2i, sim_i2t = torch.cat([sim_t2i, pool_t2i], 1), torch.cat([sim_i2t, pool_i2t], 1)
            cand_ids = torch.cat([cand_ids, p["image_ids"]])
            ids_all, mask_all = pad_cat(ids_all, p["input_ids"]), pad_cat(mask_all, p["attention_mask"])
        same = own[:, None] == cand_ids[None, :]
        neg_img = hard_negatives(sim_t2i, same, generator)                  # (B,) indices into the candidates
        neg_txt = hard_negatives(sim_i2t, same, generator)
        # index_select, not image_all[...]: its backward (index_add_) sums repeated rows in a fixed order on the CPU
        image_neg = image_all.index_select(0, neg_img.clamp(max=n - 1))
        if p is not None:  # a pool image is its ViT output through today's ln_vision
            image_neg = torch.where((neg_img >= n)[:, None, None],
                                    self.ln_vision(p["vit"][(neg_img - n).clamp(min=0)]), image_neg)
        images = torch.cat([image, image_neg, image])
        ids = pad_cat(input_ids, input_ids, ids_all[neg_txt])
        masks = pad_cat(attention_mask, attention_mask, mask_all[neg_txt])
        labels = torch.tensor([1] * len(own) + [0] * 2 * len(own), device=ids.device)
        use = self.itc_pool and p is not None  # the pool's rows among the negatives, for ITC (forward)
        picked = [torch.unique(i[i >= n] - n) for i in (neg_img, neg_txt)] if use else None
        return F.cross_entropy(self.itm_from_embeds(images, ids, masks), labels), picked

    def fresh_feats(self, p, img_rows, txt_rows):
        """ITC features of candidates' images and texts, computed with today's weights (a stored feature is up to
        pool / batch steps old) -> itc_loss's `extra`."""
        img = (F.normalize(self.vision_proj(self.queries(self.ln_vision(p["vit"][img_rows]))[0]), dim=-1)
               if len(img_rows) else p["img_feats"][:0])  # none drawn from the pool: no pass over 0 rows
        txt = (self.text_feat(p["input_ids"][txt_rows], p["attention_mask"][txt_rows]) if len(txt_rows)
               else p["txt_feat"][:0])
        return img, p["image_ids"][img_rows], txt, p["image_ids"][txt_rows]

    def itg(self, input_ids, attention_mask, past):
        """Caption the image, [CLS] -> [DEC]: the text sees the queries (through their cached K/V) and its past."""
        Q = self.query_tokens.size(1)
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.cfg.dec_id
        h, _ = self.qformer(input_ids=dec_ids, mask=qf.multimodal_causal_mask(Q, attention_mask)[:, Q:], past=past)
        logits = self.qformer.logits(h[:, :-1])
        target = dec_ids[:, 1:].masked_fill(dec_ids[:, 1:] == self.cfg.pad_id, -100)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, label_smoothing=0.1)

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
        """Image-text retrieval as LAVIS evaluates it (blip2.py compute_sim_matrix). pixels (N_img, 3, S, S) or a list,
        texts tokenised to a fixed length (LAVIS: 35). Every pair gets its ITC cosine; the k_test best of each row are
        re-ranked as ITM positive logit + cosine, the rest -100. -> i2t (N_img, N_txt) and t2i (N_txt, N_img) scores."""
        dev, dtype = self.query_tokens.device, self.query_tokens.dtype
        ids, mask = input_ids.to(dev), attention_mask.to(dev)
        batches = lambda n: tqdm(range(0, n, batch_size), disable=not progress, leave=False)
        txt = torch.cat([self.text_feat(ids[i:i + batch_size], mask[i:i + batch_size]) for i in batches(len(ids))])
        vit = torch.cat([self.image_embeds(torch.stack(list(pixels[i:i + batch_size])).to(dev, dtype)).cpu()
                         for i in batches(len(pixels))])                    # (N_img, N, Cv), kept on the CPU as LAVIS
        img = torch.cat([self.image_feats(vit[i:i + batch_size].to(dev)) for i in range(0, len(vit), batch_size)])
        sims = torch.einsum("iqd,td->iqt", img, txt).amax(dim=1).float()  # (N_img, N_txt) raw cosine

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

    @staticmethod
    def hf_keys(cfg):
        """`load_weights` arguments for an HF Blip2ForImageTextRetrieval folder (no temp, no ITG head there)."""
        keys = Querying.hf_keys(cfg)
        heads = {"vision_proj": "vision_projection", "text_proj": "text_projection", "itm_head": "itm_head"}
        keys["table"] |= {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in heads.items() for p in ("weight", "bias")}
        return keys | dict(fresh=["temp"])

    @classmethod
    def from_pretrained(cls, src, image_size=None, device="cpu", dtype=None):
        """From an HF `Blip2ForImageTextRetrieval` folder (Salesforce/blip2-itm-vit-g) or our stage-1 checkpoint."""
        src = resolve(src)
        d = read_config(src)
        if d.get("nanoblip2") == "stage1":
            return cls._from_checkpoint(src, d, device, dtype, image_size)
        if d.get("model_type") != "blip-2" or not d["qformer_config"].get("use_qformer_text_input"):
            raise CheckpointError(f"{src}: not a BLIP-2 image-text retrieval checkpoint "
                                  f"(model_type={d.get('model_type')!r}); stage-2 folders load with Blip2")
        cfg = Stage1Config(vit=vt.ViTConfig.from_hf(d, image_size), qformer=qf.QFormerConfig.from_hf_blip2(d),
                           embed_dim=d.get("image_text_hidden_size", 256),
                           ln_vision_eps=d["vision_config"]["layer_norm_eps"])
        model = build_empty(cls, cfg, device, dtype)
        load_weights(model, src, **cls.hf_keys(cfg))
        with torch.no_grad():
            model.temp.fill_(0.07)  # not stored in HF checkpoints
        return model.eval()

    @classmethod
    def _from_checkpoint(cls, folder, d, device="cpu", dtype=None, image_size=None):
        """Our folder: the trained tensors from model.safetensors, a frozen ViT from the source config.json names
        (none: a ViT trained with the rest, in the folder). image_size: another than trained at (fine-tuning)."""
        check_frozen(folder, d)
        cfg = Stage1Config.from_dict(d["model"])
        cfg.vit.image_size = image_size or cfg.vit.image_size
        model = build_empty(cls, cfg, device, dtype)
        vit_src = d.get("frozen", {}).get("vit")
        if vit_src:
            load_weights(model.vit, resolve(vit_src), **vt.hf_keys(model.cfg.vit))
        load_weights(model, folder, model.own_tensors(("vit.",) if vit_src else ()), fresh=["vit.*"] if vit_src else [])
        return model.eval()

    @classmethod
    def from_vit_bert(cls, vit_src, bert_src, num_query_tokens=32, cross_attention_freq=2, image_size=None,
                      device="cpu"):
        """For training from scratch: the ViT of a BLIP-2 or CLIP folder, and a Q-Former initialised from BERT."""
        vit_src, bert_src = resolve(vit_src), resolve(bert_src)
        with reading(vit_src):  # a folder of another kind (a BERT as the ViT) is an error that names it
            vcfg = vt.ViTConfig.from_hf(read_config(vit_src), image_size)
        with reading(bert_src):
            qcfg = qf.QFormerConfig.from_hf_bert(read_config(bert_src), vcfg.width, num_query_tokens,
                                                 cross_attention_freq)
        model = build_empty(cls, Stage1Config(vit=vcfg, qformer=qcfg, dec_id=qcfg.vocab_size - 1), device)
        load_weights(model.vit, vit_src, **vt.hf_keys(vcfg))
        # everything but the ViT starts fresh; then BERT overwrites what it provides
        for m in (model.qformer, model.vision_proj, model.text_proj, model.itm_head, model.ln_vision):
            m.apply(qf.QFormer._init_weights)  # BERT's, and ones/zeros for LayerNorms
        with torch.no_grad():
            model.query_tokens.normal_(std=0.02)
            model.temp.fill_(0.07)
        load_weights(model.qformer, bert_src, **qf.bert_keys(qcfg))
        return model


def itc_similarities(img_feats, txt_feat, temp):
    """This rank's normalised img_feats (B, Q, D) and txt_feat (B, D) against every rank's, a pair's score its best
    query, over temp. Deviation from LAVIS: the gather keeps gradients, so G ranks of B equal one process of G*B.
    -> sim_i2t, sim_t2i, (B, G*B) each."""
    img_all, txt_all = gather(img_feats), gather(txt_feat)                            # (G*B, Q, D), (G*B, D)
    return (torch.einsum("bqd,td->bqt", img_feats, txt_all).amax(dim=1) / temp,
            torch.einsum("bd,iqd->biq", txt_feat, img_all).amax(dim=2) / temp)


def itc_loss(img_feats, txt_feat, temp, image_ids=None, extra=None, sims=None):
    """Image-text contrastive loss on itc_similarities (or `sims`, already computed), both ways. image_ids (B,):
    LAVIS's image_id branch, every pair of the row's image is a positive, sharing the 0.9 (with distinct ids, the
    cross-entropy below). extra: (images (M, Q, D), their ids, texts (M', D), their ids), more columns for this
    rank's rows (Blip2Stage1.fresh_feats). -> the loss and the similarities (B, G*B) both ways, for ITM."""
    sim_i2t, sim_t2i = sims if sims is not None else itc_similarities(img_feats, txt_feat, temp)
    ce = lambda i2t, t2i, t, t_t2i: (F.cross_entropy(i2t, t, label_smoothing=0.1) +
                                     F.cross_entropy(t2i, t_t2i, label_smoothing=0.1)) / 2
    if image_ids is None:  # the positives: the diagonal
        targets = rank_rows(len(img_feats), sim_i2t.device)
        return ce(sim_i2t, sim_t2i, targets, targets), sim_i2t, sim_t2i
    i2t, t2i, txt_ids = sim_i2t, sim_t2i, gather(image_ids)
    img_ids = txt_ids
    if extra is not None:
        img_x, x_img_ids, txt_x, x_txt_ids = extra
        i2t = torch.cat([i2t, torch.einsum("bqd,td->bqt", img_feats, txt_x).amax(dim=1) / temp], 1)
        t2i = torch.cat([t2i, torch.einsum("bd,iqd->biq", txt_feat, img_x).amax(dim=2) / temp], 1)
        txt_ids, img_ids = torch.cat([txt_ids, x_txt_ids]), torch.cat([img_ids, x_img_ids])
    # soft targets: 0.9 * pos / pos.sum(1) + 0.1 / columns, label smoothing as LAVIS
    soft = lambda cols: (pos := (image_ids[:, None] == cols[None, :]).float()) / pos.sum(dim=1, keepdim=True)
    return ce(i2t, t2i, soft(txt_ids), soft(img_ids)), sim_i2t, sim_t2i


def hard_negatives(sim, same, generator=None):
    """sim (B, N): temp-scaled ITC similarities of this rank's rows against the candidates; same (B, N) bool: the pairs
    of one image (the row's positive among them). -> one index per row, drawn by softmax(sim) over the others."""
    with torch.no_grad():
        w = sim.float().masked_fill(same, -10000.0)  # exp(-10000) is exactly 0 in fp32
        return torch.multinomial(w.softmax(dim=1), 1, generator=generator).squeeze(1)

