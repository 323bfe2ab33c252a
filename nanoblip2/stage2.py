"""
Stage 2 of BLIP-2 (paper §3.3, Figure 3): vision-to-language generative learning from a frozen LLM. The 32 query
outputs, projected by one linear layer, are a soft visual prompt for a frozen OPT or FlanT5.
Matches HF `Blip2ForConditionalGeneration` and LAVIS `blip2_opt.py` / `blip2_t5.py`; with a Q-Former that reads
the instruction, HF `InstructBlipForConditionalGeneration` with OPT or FlanT5 (LAVIS `blip2_t5_instruct.py`).

Notable details
- OPT (decoder-only): the LLM input is [queries; BOS + prompt]; the answer ends at "\\n" (LAVIS). Batched prompts
  are left-padded and the padding goes before the queries, so the model sees the HF layout.
- FlanT5 (encoder-decoder): the encoder reads [queries; prompt + </s>], the decoder starts from <pad> = 0.
  Never in fp16 (the feed-forward activations overflow).
"""
import dataclasses
import os
import warnings
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import opt as op
from . import qformer as qf
from . import t5 as t5m
from . import vit as vt
from .checkpoint import check_frozen
from .data import load_image
from .generate import Replay, generate, replay
from .hub import resolve
from .load import CheckpointError, build_empty, load_weights, prefixed, read_config, safetensors_files, safetensors_keys
from .stage1 import Blip2Stage1, Querying
from .tokenizer import load_bert_tokenizer, load_opt_tokenizer, load_t5_tokenizer


@dataclasses.dataclass
class Blip2Config:
    vit: vt.ViTConfig
    qformer: qf.QFormerConfig     # the stage-2 form: no text branch, unless it reads the instruction (InstructBLIP)
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
    def __init__(self, cfg):
        super().__init__(cfg)
        self.is_t5 = isinstance(cfg.lm, t5m.T5Config)
        self.lm = t5m.T5(cfg.lm) if self.is_t5 else op.OPT(cfg.lm)
        width = cfg.lm.d_model if self.is_t5 else cfg.lm.word_embed_proj_dim  # OPT: = width in every BLIP-2 OPT
        self.language_projection = nn.Linear(cfg.qformer.width, width)  # into the LLM's input embedding space
        self.tokenizer = None  # set by from_pretrained
        self.qformer_tokenizer = None  # with a Q-Former text branch: the instruction's tokenizer (BERT's)
        self.end_id = cfg.lm.eos_id  # OPT: "\n" (LAVIS), from the tokenizer when there is one

    def visual_prompt(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """(B, 3, S, S) -> the soft visual prompt (B, Q, C_lm). With the instruction's tokens (B, T) for a Q-Former
        that kept its text branch (Figure 7, InstructBLIP), the queries read the image knowing the question."""
        if qformer_input_ids is not None and qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        image = self.image_embeds(pixel_values)
        return self.language_projection(self.queries(image, qformer_input_ids, qformer_attention_mask)[0])

    def lm_inputs(self, pixel_values, input_ids, attention_mask, **question):  # -> [prompt; text], its mask
        prompt = self.visual_prompt(pixel_values, **question)                          # (B, Q, C)
        embeds = torch.cat([prompt, self.lm.embed(input_ids).to(prompt.dtype)], dim=1)
        return embeds, torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)

    # --- training: generative learning (§3.3, LAVIS blip2_opt.py / blip2_t5.py forward) -----------------------

    def forward(self, pixel_values, batch):
        """pixel_values (B, 3, S, S); batch from `opt_batch` or `t5_batch`. Returns dict(loss=...), the language
        modelling loss of the caption given the soft visual prompt. The frozen LLM passes gradients through."""
        question = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
        embeds, mask = self.lm_inputs(pixel_values, batch["input_ids"], batch["attention_mask"], **question)
        if self.is_t5:  # prefix LM: [queries; prefix </s>] -> suffix </s>
            labels = batch["labels"]
            dec_in = F.pad(labels[:, :-1], (1, 0), value=self.cfg.lm.decoder_start_id)  # shifted right
            targets = labels != -100  # the vocabulary projection only where there is a target
            enc = self.lm.encode(inputs_embeds=embeds, attention_mask=mask)
            logits, _ = self.lm.decode(dec_in.masked_fill(dec_in == -100, self.cfg.lm.pad_id), enc, mask, keep=targets)
        else:
            Q = self.query_tokens.size(1)
            labels = batch["labels"][:, Q:]                                            # (B, T); the queries are -100
            targets = labels != -100  # position Q - 1 + t predicts token t: project those with a target only
            logits, _ = self.lm(inputs_embeds=embeds, attention_mask=mask, keep=F.pad(targets, (Q - 1, 1)))  # (N, V)
        return dict(loss=F.cross_entropy(logits.float(), labels[targets]))

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, qformer_input_ids=None,
                 qformer_attention_mask=None, *, num_beams=1, use_cache=True, **search):
        """pixel_values (B, 3, S, S); input_ids (B, T): BOS + prompt for OPT (left-padded), prompt + </s> for T5;
        qformer_input_ids / _attention_mask (B, T'): the instruction for the Q-Former (its text branch), or None.
        search: `generate.generate`'s max_new_tokens (30), min_new_tokens, length_penalty, repetition_penalty,
        do_sample, temperature, top_p, generator. Returns only the new token ids (B, T_new), padded with the pad id.
        use_cache=False recomputes every step from scratch: slow, but the definition the cache is tested against."""
        lm, cfg, B = self.lm, self.cfg.lm, pixel_values.size(0)
        if input_ids is None:
            input_ids = torch.full((B, 1), cfg.eos_id if self.is_t5 else cfg.bos_id, device=pixel_values.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # 1) the soft visual prompt before the text
        embeds, mask = self.lm_inputs(pixel_values, input_ids, attention_mask, qformer_input_ids=qformer_input_ids,
                                      qformer_attention_mask=qformer_attention_mask)   # (B, Q + T, C), (B, Q + T)
        if not self.is_t5:  # left padding goes before the queries, which is where HF puts it
            order = torch.argsort(mask, dim=1, stable=True)
            embeds, mask = embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)
        # 2) prefill the prompt once (T5: the encoder, then the decoder's start token)
        logits, cache = lm.prefill(embeds, mask)                                        # (B, V)
        if not use_cache:  # the reference: every step runs prefill again, over the prompt and all new tokens
            cache = Replay(embeds, mask, input_ids.new_zeros(B, 0))
        # 3) expand the cache for the beams: rows batch-major, then beams
        logits, cache = logits.repeat_interleave(num_beams, dim=0), cache.expand(num_beams)
        # 4) search; the repetition penalty sees the prompt's ids (T5: the decoder's start token)
        history = torch.full((B, 1), cfg.decoder_start_id, device=mask.device) if self.is_t5 else input_ids
        return generate(lm.step if use_cache else partial(replay, lm), logits, cache, history, eos_id=self.end_id,
                        pad_id=cfg.pad_id, num_beams=num_beams, **search)

    # --- the paper's two zero-shot uses ---------------------------------------------------------------------

    def caption(self, images, prompt="", **kw):
        """Images (paths, PIL images or a (B, 3, S, S) tensor) -> captions. LAVIS defaults: beam 5, 1..30 new tokens."""
        pixels = self._pixels(images)
        kw = dict(num_beams=5, max_new_tokens=30, min_new_tokens=1) | kw
        return self._complete(pixels, [prompt] * pixels.size(0), kw)

    def answer(self, images, questions, **kw):
        """Zero-shot VQA with the paper's prompt, beam 5, length penalty -1, at most 10 new tokens (§4.2)."""
        kw = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0) | kw
        return self._complete(self._pixels(images), [self.vqa_prompt(q) for q in questions], kw)

    def vqa_prompt(self, question):  # the paper's, in VQA fine-tuning too; FlanT5's asks for a short answer
        return ("Question: {} Short answer:" if self.is_t5 else "Question: {} Answer:").format(question)

    def qformer_text(self, prompts):
        """The instruction's tokens for a Q-Former that reads text, as `generate` and `forward` take them; else {}."""
        if self.qformer_tokenizer is None:
            return {}
        ids, mask = self.qformer_tokenizer(prompts, max_length=min(128, self.cfg.qformer.max_positions))
        return dict(qformer_input_ids=ids, qformer_attention_mask=mask)

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
        room = 512 if self.is_t5 else self.cfg.lm.max_positions - self.query_tokens.size(1) - kw["max_new_tokens"]
        full, _ = self.tokenizer(prompts, truncation=False, padding_side=side)
        if full.size(1) > room:
            warnings.warn(f"prompt of {full.size(1)} tokens truncated to {room} to fit the model's context")
        ids, mask = self.tokenizer(prompts, max_length=room, padding_side=side)
        # a Q-Former that reads text reads the same instruction (LAVIS InstructBLIP)
        kw = kw | {k: v.to(pixels.device) for k, v in self.qformer_text(prompts).items()}
        out = self.generate(pixels, ids.to(pixels.device), mask.to(pixels.device), **kw)
        return [t.strip() for t in self.tokenizer.batch_decode(out)]

    # --- loading --------------------------------------------------------------------------------------------

    @classmethod
    def _from_checkpoint(cls, folder, d, device="cpu", dtype=None, image_size=None):
        """Our folder: the trained tensors from model.safetensors, the frozen ViT and LLM from config.json's sources.
        image_size: another than trained at (fine-tuning at 364 or 490 px)."""
        check_frozen(folder, d)
        cfg = Blip2Config.from_dict(d["model"])
        cfg.vit.image_size = image_size or cfg.vit.image_size
        if isinstance(cfg.lm, t5m.T5Config) and dtype == torch.float16:
            raise CheckpointError(f"{folder}: FlanT5 overflows in float16; use bfloat16 or float32")
        model = build_empty(cls, cfg, device, dtype)
        vit_src, lm_src = d["frozen"].get("vit"), resolve(d["frozen"]["lm"])
        if vit_src:
            load_weights(model.vit, resolve(vit_src), **vt.hf_keys(cfg.vit))
        model.lm = (t5m.T5 if model.is_t5 else op.OPT).from_pretrained(lm_src, device=device, dtype=dtype)
        skip = ("lm.", "vit.") if vit_src else ("lm.",)
        load_weights(model, folder, model.own_tensors(skip), fresh=[p + "*" for p in skip])
        model._set_tokenizer(lm_src, resolve(d["qformer_tokenizer"]) if cfg.qformer.text else None)  # in config.json
        return model.eval()

    def _set_tokenizer(self, folder, qformer=None):  # qformer: the Q-Former tokenizer's folder, if it reads text
        try:
            self.tokenizer = (load_t5_tokenizer if self.is_t5 else load_opt_tokenizer)(folder)
            self.qformer_tokenizer = None if qformer is None else load_bert_tokenizer(qformer)
        except FileNotFoundError as e:
            raise CheckpointError(f"{folder}: tokenizer files missing ({e})") from None
        self.end_id = self.cfg.lm.eos_id if self.is_t5 else self.tokenizer.newline_id

    @classmethod
    def from_stage1(cls, stage1, lm_src, device="cpu", dtype=None, qformer_tokenizer=None):
        """Stage 2's start (LAVIS pretrain_stage2.yaml): the ViT, ln_vision, queries and Q-Former (no text branch)
        of a stage-1 model (our folder or a Blip2Stage1), a new language_projection, a frozen OPT or T5 (HF folder or
        Hub id). With qformer_tokenizer (the stage-1 BERT's), the Q-Former keeps its text branch, less the ITG head,
        and reads the instruction too (Figure 7)."""
        s1 = stage1 if isinstance(stage1, Blip2Stage1) else Blip2Stage1.from_pretrained(stage1, device=device)
        lm_src = resolve(lm_src)
        d = read_config(lm_src)
        kind = d.get("model_type")
        if kind not in ("opt", "t5"):
            raise CheckpointError(f"{lm_src}: model_type {kind!r}; the language model must be OPT or T5")
        lm_cfg = t5m.T5Config.from_hf(d) if kind == "t5" else op.OPTConfig.from_hf(d)
        qcfg = dataclasses.replace(s1.cfg.qformer, text=qformer_tokenizer is not None, lm_head=False)
        cfg = Blip2Config(vit=s1.cfg.vit, qformer=qcfg, lm=lm_cfg, ln_vision_eps=s1.cfg.ln_vision_eps)
        with torch.device("meta"):
            model = cls(cfg)
        model.lm = (t5m.T5 if kind == "t5" else op.OPT).from_pretrained(lm_src, device=device, dtype=dtype)
        model.language_projection = nn.Linear(qcfg.width, model.language_projection.out_features, device=device)
        model.vit, model.ln_vision, model.query_tokens = s1.vit, s1.ln_vision, s1.query_tokens
        model.qformer = qf.QFormer(qcfg).to(device)
        missing, unexpected = model.qformer.load_state_dict(s1.qformer.state_dict(), strict=False)
        text_branch = ("lm_head.",) + (() if qcfg.text else ("word_embeddings.", "position_embeddings.", ".ffn_text."))
        if missing or not all(any(part in k for part in text_branch) for k in unexpected):
            raise CheckpointError(f"stage-1 Q-Former does not fit: missing {missing}, unexpected {unexpected}")
        model._set_tokenizer(lm_src)
        model.qformer_tokenizer = qformer_tokenizer
        return model.to(dtype) if dtype is not None else model

    def add_text_branch(self, stage1, qformer_tokenizer):
        """Figure 7 from a stage-2 model: the text branch (embeddings, text FFNs) of a stage-1 Q-Former, the one this
        model started from, whose ITM pass trained exactly this reading of [queries; text]."""
        cfg = dataclasses.replace(self.cfg.qformer, text=True, lm_head=False)
        qformer = qf.QFormer(cfg).to(self.query_tokens.device, self.query_tokens.dtype).train(self.training)
        text = {k: v for k, v in stage1.qformer.state_dict().items() if not k.startswith("lm_head.")}
        qformer.load_state_dict(text | self.qformer.state_dict())  # strict: the trained stage-2 tensors win
        self.qformer, self.cfg.qformer, self.qformer_tokenizer = qformer, cfg, qformer_tokenizer
        return self

    @staticmethod
    def hf_keys(cfg, keys=None):
        """`load_weights` arguments for an HF Blip2ForConditionalGeneration folder (InstructBlipForConditionalGeneration
        when the Q-Former reads text): Querying's, the projection's and the LLM's under language_model. keys: the
        file's key names (is a T5 head saved apart from `shared`?)."""
        table, ignore = Querying.hf_keys(cfg)["table"], []
        if cfg.qformer.text:  # InstructBLIP: the Q-Former's embeddings and their LayerNorm under qformer.embeddings.
            instruct = prefixed(qf.hf_keys(cfg.qformer, instruct=True), "qformer.")
            table, ignore = table | instruct["table"], instruct["ignore"]
        table |= {f"language_projection.{p}": f"language_projection.{p}" for p in ("weight", "bias")}
        head_saved = keys is None or "language_model.lm_head.weight" in keys
        lm = t5m.hf_keys(cfg.lm, head_saved) if isinstance(cfg.lm, t5m.T5Config) else op.hf_keys(cfg.lm)
        lm = prefixed(lm, "lm.", "language_model.")
        return lm | dict(table=table | lm["table"], ignore=lm["ignore"] + ignore)

    @classmethod
    def from_pretrained(cls, src, device="cpu", dtype=None, image_size=None):
        """From an HF Blip2ForConditionalGeneration folder (original or 2024 layout), an HF
        InstructBlipForConditionalGeneration folder with OPT or FlanT5 (the Q-Former's tokenizer in qformer_tokenizer/),
        a Hub id or our stage-2 folder."""
        folder = resolve(src)
        d = read_config(folder)
        if d.get("nanoblip2") == "stage2":
            return cls._from_checkpoint(folder, d, device, dtype, image_size)
        kind, instruct = (d.get("text_config") or {}).get("model_type", "opt"), d.get("model_type") == "instructblip"
        if d.get("model_type") != "blip-2" and not instruct:
            raise CheckpointError(f"{folder}: model_type {d.get('model_type')!r}, not a BLIP-2 or InstructBLIP folder")
        if kind not in ("opt", "t5"):
            raise CheckpointError(f"{folder}: language model {kind!r} is not supported (OPT or T5 only)" + (
                "; Vicuna-based InstructBLIP needs a LLaMA decoder, which nanoblip2 does not have" if instruct else ""))
        if kind == "t5" and dtype == torch.float16:
            raise CheckpointError(f"{folder}: FlanT5 overflows in float16; use bfloat16 or float32")
        b = d | dict(model_type="blip-2")  # InstructBLIP's vision and text configs read as BLIP-2's
        lm_cfg = t5m.T5Config.from_hf(b) if kind == "t5" else op.OPTConfig.from_hf(b)
        cfg = Blip2Config(vit=vt.ViTConfig.from_hf(b, image_size), qformer=qf.QFormerConfig.from_hf_blip2(d), lm=lm_cfg,
                          ln_vision_eps=d.get("vision_config", {}).get("layer_norm_eps", 1e-6),
                          image_token_index=d.get("image_token_index"))
        model = build_empty(cls, cfg, device, dtype)
        # before the weights: a missing tokenizer fails fast
        model._set_tokenizer(folder, os.path.join(folder, "qformer_tokenizer") if cfg.qformer.text else None)
        keys = safetensors_keys(safetensors_files(folder))
        load_weights(model, folder, **cls.hf_keys(cfg, keys))
        return model.eval()
