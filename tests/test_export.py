"""Export: our models -> HF folders, read back by transformers and by our own loaders. Bar: max abs diff <= 1e-5."""
import dataclasses
import os

import pytest
import torch
from conftest import pixels, text_batch

from nanoblip2 import Blip2, Blip2Stage1, load_bert_tokenizer
from nanoblip2 import opt as op
from nanoblip2 import qformer as qf
from nanoblip2 import t5 as t5m
from nanoblip2 import vit as vt
from nanoblip2.export import (export_bert, export_blip2, export_opt, export_stage1, export_t5, export_vit,
                              save_weights)
from nanoblip2.load import load_weights, read_config

transformers = pytest.importorskip("transformers")
TOL = 1e-5
Q = 5  # queries in the tiny models


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: threads only cost time, and a lot of it on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close(a, b, what, tol=TOL):
    diff = (a - b).abs().max().item()
    print(f"{what}: max abs diff {diff:.2e}")
    assert a.shape == b.shape and diff <= tol, f"{what}: {diff}"


def same_state(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k not in skip]
    assert sorted(keys) == sorted(k for k in sb if k not in skip)
    bad = [k for k in keys if not torch.equal(sa[k], sb[k])]
    assert not bad, f"differ after the round trip: {bad[:5]}"


def hf_ids(index, ids, mask, left):
    """transformers 5 wants Q image placeholder tokens before the text; left padding goes in front of them."""
    B = ids.size(0)
    full = torch.cat([torch.full((B, Q), index), ids], 1)
    full_mask = torch.cat([torch.ones(B, Q, dtype=torch.long), mask], 1)
    if not left:  # T5: [queries; prompt; right padding], as ours
        return full, full_mask
    order = torch.argsort(full_mask, dim=1, stable=True)
    return full.gather(1, order), full_mask.gather(1, order)


# ---------------------------------------------------------------------------------------------------------
# (a) stage 2: Blip2 -> Blip2ForConditionalGeneration


@pytest.fixture(params=["opt", "t5"])
def stage2(request, blip2_opt, blip2_t5):
    folder, _ = blip2_opt if request.param == "opt" else blip2_t5
    return Blip2.from_pretrained(folder)


@torch.no_grad()
def check_stage2(ours, hf, index, end, beams=True):
    """Logits to 1e-5, then greedy and beam ids exactly, with the end token the exported config names."""
    side = "right" if ours.is_t5 else "left"
    px = pixels(B=3, seed=5)
    ids, mask = ours.tokenizer(["", "a photo of", "question: which city is this? answer:"], padding_side=side)
    hids, hmask = hf_ids(index, ids, mask, left=not ours.is_t5)
    embeds = torch.cat([ours.visual_prompt(px), ours.lm.embed(ids)], dim=1)
    full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
    V = ours.cfg.lm.vocab_size
    if ours.is_t5:
        dec = torch.tensor([[0, 7, 9, 11], [0, 5, 3, 1], [0, 4, 4, 4]])
        ref = hf(pixel_values=px, input_ids=hids, attention_mask=hmask, decoder_input_ids=dec).logits
        got, _ = ours.lm.decode(dec, ours.lm.encode(inputs_embeds=embeds, attention_mask=full_mask), full_mask)
    else:
        ref = hf(pixel_values=px, input_ids=hids, attention_mask=hmask).logits
        order = torch.argsort(full_mask, dim=1, stable=True)
        got, _ = ours.lm(inputs_embeds=embeds.gather(1, order[..., None].expand_as(embeds)),
                         attention_mask=full_mask.gather(1, order))
        ref, got = ref[hmask.bool()], got[hmask.bool()]  # real tokens only
    close(got, ref[..., :V], f"{'T5' if ours.is_t5 else 'OPT'} logits, exported Blip2ForConditionalGeneration")
    if ref.size(-1) > V:  # a grown <image> row is zeros: its logit is exactly 0
        assert ref.size(-1) == V + 1 and (ref[..., V] == 0).all()
    for kw in (dict(num_beams=1), dict(num_beams=3))[:1 + beams]:
        got = ours.generate(px, ids, mask, max_new_tokens=12, **kw)
        ref = hf.generate(pixel_values=px, input_ids=hids, attention_mask=hmask, max_new_tokens=12, do_sample=False,
                          **kw)  # end and pad tokens from the exported config
        ref = ref[:, 1:] if ours.is_t5 else ref[:, hids.size(1):]
        ended = torch.cumsum((ref == end).long(), 1) - (ref == end).long() > 0  # HF pads with `pad or eos`
        ref = ref.masked_fill(ended, ours.cfg.lm.pad_id)
        assert got.tolist() == ref.tolist(), kw
        if kw["num_beams"] == 1:
            assert (got == end).any() and (got != end).all(dim=1).any(), "want rows that end and rows that run on"


def pick_end(ours):
    """Random tiny LMs rarely say "\\n": end at the third token the first row generates, as test_blip2 does."""
    px = pixels(B=3, seed=5)
    ids, mask = ours.tokenizer(["", "a photo of", "question: which city is this? answer:"],
                               padding_side="right" if ours.is_t5 else "left")
    ours.end_id = -1
    ours.end_id = ours.generate(px, ids, mask, max_new_tokens=3)[0, 2].item()
    return ours.end_id


def test_blip2_round_trip(stage2, tmp_path):
    from transformers import Blip2ForConditionalGeneration
    ours = stage2
    index, end = ours.cfg.image_token_index, pick_end(ours)
    export_blip2(ours, str(tmp_path))
    d = read_config(str(tmp_path))
    assert d["image_token_index"] == index and d["text_config"]["vocab_size"] == ours.cfg.lm.vocab_size
    assert d["text_config"]["eos_token_id"] == end
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    check_stage2(ours, hf, index, end)
    back = Blip2.from_pretrained(str(tmp_path))  # and our own loader reads it back bit for bit
    same_state(ours, back)
    assert back.cfg == dataclasses.replace(ours.cfg, lm=dataclasses.replace(ours.cfg.lm, eos_id=end))
    text = ["a cat on a mat", "two dogs"]
    assert back.tokenizer(text)[0].tolist() == ours.tokenizer(text)[0].tolist()


@pytest.mark.parametrize("route", ["spare_row", "grow"])
def test_blip2_without_image_token(stage2, route, tmp_path):
    """An old-layout model has no image_token_index: the first id past the tokenizer when the embedding has a spare
    row there (no weight changes, <image> added to the tokenizer), else one new zero row."""
    from transformers import Blip2ForConditionalGeneration
    ours = stage2
    ours.cfg.image_token_index = None
    end = pick_end(ours)
    V, n = ours.cfg.lm.vocab_size, len(ours.tokenizer)
    if route == "grow":
        ours.tokenizer, tok = None, ours.tokenizer  # nothing says which rows are free
    export_blip2(ours, str(tmp_path))
    d = read_config(str(tmp_path))
    want = n if route == "spare_row" else V
    assert n < V and d["image_token_index"] == want and d["text_config"]["vocab_size"] == V + (route == "grow")
    if route == "spare_row":
        from tokenizers import Tokenizer
        assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("<image>") == n
    else:
        ours.tokenizer = tok
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    check_stage2(ours, hf, want, end, beams=False)


def test_processor_reads_the_exported_tokenizer(blip2_opt, tmp_path):
    """Blip2Processor (AutoTokenizer + BlipImageProcessor) on the exported folder: Q <image> tokens, then our ids."""
    from transformers import Blip2Processor
    ours = Blip2.from_pretrained(blip2_opt[0])
    ours.cfg.image_token_index = None  # -> <image> = len(tokenizer), written into tokenizer.json
    export_blip2(ours, str(tmp_path))
    proc = Blip2Processor.from_pretrained(str(tmp_path))
    image = (torch.rand(28, 28, 3) * 255).byte().numpy()
    out = proc(images=image, text="a photo of a cat", return_tensors="pt")
    ids, _ = ours.tokenizer("a photo of a cat")
    assert out["input_ids"].tolist() == [[len(ours.tokenizer)] * Q + ids[0].tolist()]
    assert out["pixel_values"].shape == (1, 3, 28, 28)


# ---------------------------------------------------------------------------------------------------------
# (b) stage 1: Blip2Stage1 -> Blip2ForImageTextRetrieval


@torch.no_grad()
def check_retrieval(ours, hf, what, tol=TOL):
    px, (ids, mask) = pixels(B=3), text_batch(ours.cfg.qformer.vocab_size)
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    close(ours.itm_logits(px, ids, mask), ref.logits_per_image, f"{what}: ITM logits", tol)
    px2 = pixels(B=2, seed=1)
    ref = hf(pixel_values=px2, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    close(ours.itc_similarity(px2, ids, mask), ref.logits_per_image, f"{what}: ITC similarity", tol)


def test_stage1_round_trip(itm_folder, tmp_path):
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, Blip2Processor
    ours = Blip2Stage1.from_pretrained(itm_folder[0])
    with torch.no_grad():
        ours.temp.fill_(0.05)
    (tmp_path / "bert").mkdir()
    words = "a man riding horse on the beach two dogs playing with red ball cat mat photo of".split()
    (tmp_path / "bert" / "vocab.txt").write_text("".join(t + "\n" for t in
                                                         ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tok = load_bert_tokenizer(tmp_path / "bert")
    export_stage1(ours, str(tmp_path), tokenizer=tok)
    text = "A man riding a Horse on the beach [DEC] zebra"
    want = tok(text)[0][0].tolist()
    assert AutoTokenizer.from_pretrained(str(tmp_path))(text).input_ids == want
    assert load_bert_tokenizer(tmp_path)(text)[0][0].tolist() == want and load_bert_tokenizer(tmp_path).bos_id == 22
    image = (torch.rand(28, 28, 3) * 255).byte().numpy()
    assert Blip2Processor.from_pretrained(str(tmp_path))(images=image, text=text).input_ids == [want]  # no <image>s
    check_retrieval(ours, Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path)).eval(), "stage 1")
    back = Blip2Stage1.from_pretrained(str(tmp_path))
    same_state(ours, back, skip=["temp"])
    assert back.temp.item() == pytest.approx(0.07)  # HF has no temp


def test_stage1_from_vit_bert(itm_folder, bert_folder, tmp_path):
    """A fresh stage 1 (BERT text branch, new cross-attention, ITG head, [DEC] row): the ITG head and temp are
    dropped, all 99 word rows kept. Its ln_vision eps (LAVIS 1e-5) is not the ViT's: HF has one, so it warns."""
    from transformers import Blip2ForImageTextRetrieval
    ours = Blip2Stage1.from_vit_bert(itm_folder[0], bert_folder[0]).eval()
    assert ours.qformer.lm_head is not None and ours.cfg.qformer.vocab_size == 99
    with pytest.warns(UserWarning, match="eps"):
        export_stage1(ours, str(tmp_path))
    d = read_config(str(tmp_path))
    assert d["qformer_config"]["vocab_size"] == 99 and d["qformer_config"]["use_qformer_text_input"]
    hf = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path)).eval()
    back = Blip2Stage1.from_pretrained(str(tmp_path))
    assert back.qformer.lm_head is None and back.cfg.ln_vision_eps == ours.cfg.vit.eps
    check_retrieval(back, hf, "fresh stage 1, reloaded by us vs HF")
    check_retrieval(ours, hf, "fresh stage 1 (ln_vision eps 1e-5) vs HF (3e-6)")
    same_state(ours, back, skip=["temp"] + [k for k in ours.state_dict() if k.startswith("qformer.lm_head.")])


# ---------------------------------------------------------------------------------------------------------
# (c) single components, through our loaders and through transformers


def load_vit(folder):
    cfg = vt.ViTConfig.from_hf(read_config(folder))
    vit = vt.ViT(cfg).eval()
    load_weights(vit, folder, **vt.hf_keys(cfg))
    return vit


@torch.no_grad()
def test_export_eva_vit(itm_folder, tmp_path):
    """At an interpolated size: written at 42 px, read back at 42 px without interpolation."""
    from transformers import Blip2VisionModel
    vit = Blip2Stage1.from_pretrained(itm_folder[0], image_size=42).vit
    export_vit(vit, str(tmp_path))
    assert read_config(str(tmp_path))["vision_config"]["image_size"] == 42
    back = load_vit(str(tmp_path))
    same_state(vit, back)
    px = pixels(size=42)
    # Blip2VisionModel has no vision_model. prefix: our BLIP-2 layout needs transformers' key_mapping
    hf = Blip2VisionModel.from_pretrained(str(tmp_path), key_mapping={r"^vision_model\.": ""}).eval()
    out = hf(px, output_hidden_states=True)
    close(vit(px), out.hidden_states[-1], "EVA ViT vs Blip2VisionModel")
    close(torch.nn.functional.layer_norm(vit(px), (48,), eps=3e-6), out.last_hidden_state, "identity post_layernorm")


@torch.no_grad()
def test_export_clip_vit(clip_folder, tmp_path):
    from transformers import CLIPVisionModel
    folder, orig = clip_folder
    vit = load_vit(folder)
    export_vit(vit, str(tmp_path))
    back = load_vit(str(tmp_path))
    same_state(vit, back)
    px = pixels()
    hf = CLIPVisionModel.from_pretrained(str(tmp_path)).eval()
    out = hf(px, output_hidden_states=True)
    close(vit(px), out.hidden_states[-2], "CLIP ViT vs exported CLIPVisionModel (second-last layer)")
    assert torch.equal(out.hidden_states[-1], out.hidden_states[-2])  # the written last layer is an identity
    close(out.hidden_states[-2], orig(px, output_hidden_states=True).hidden_states[-2], "exported vs original CLIP")


@torch.no_grad()
def test_export_bert(itm_folder, bert_folder, tmp_path):
    from transformers import BertForMaskedLM
    bert, orig = bert_folder
    ours = Blip2Stage1.from_vit_bert(itm_folder[0], bert).eval()
    export_bert(ours.qformer, str(tmp_path))
    assert read_config(str(tmp_path))["vocab_size"] == 98  # without [DEC]
    hf = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    back = Blip2Stage1.from_vit_bert(itm_folder[0], str(tmp_path)).eval()
    ids, mask = text_batch(98)
    h, _ = ours.qformer(input_ids=ids, mask=qf.text_mask(mask))
    h2, _ = back.qformer(input_ids=ids, mask=qf.text_mask(mask))
    assert torch.equal(h, h2)
    assert torch.equal(ours.qformer.logits(h)[..., :98], back.qformer.logits(h2)[..., :98])
    close(h, hf.bert(ids, attention_mask=mask).last_hidden_state, "Q-Former text path vs exported BertModel")
    close(ours.qformer.logits(h)[..., :98], hf(ids, attention_mask=mask).logits, "ITG head vs exported MLM head")
    close(hf(ids, attention_mask=mask).logits, orig(ids, attention_mask=mask).logits, "exported vs original BERT")


@torch.no_grad()
def test_export_opt(blip2_opt, tmp_path):
    from transformers import OPTForCausalLM
    ours = op.OPT.from_pretrained(blip2_opt[0])
    export_opt(ours, str(tmp_path))
    back = op.OPT.from_pretrained(str(tmp_path))
    same_state(ours, back)
    ids, mask = text_batch(307)
    hf = OPTForCausalLM.from_pretrained(str(tmp_path)).eval()
    keep = mask.bool()
    close(ours(ids, attention_mask=mask)[0][keep], hf(ids, attention_mask=mask).logits[keep], "OPT vs OPTForCausalLM")


@pytest.mark.parametrize("head", ["untied", "tied"])
@torch.no_grad()
def test_export_t5(blip2_t5, head, tmp_path):
    """FlanT5 style (own lm_head, no scaling) and original T5 style (head = shared, decoder output scaled)."""
    from transformers import T5ForConditionalGeneration
    if head == "untied":
        ours = t5m.T5.from_pretrained(blip2_t5[0])
        ours.lm_head.weight.mul_(0.5)  # transformers saved it tied: make it differ from shared
    else:
        torch.manual_seed(0)
        ours = t5m.T5(t5m.T5Config(vocab_size=96, d_model=48, d_kv=16, d_ff=37, heads=3, enc_depth=2, dec_depth=3,
                                   num_buckets=8, max_distance=20, act="relu", gated=False,
                                   tie_word_embeddings=True)).eval()
    export_t5(ours, str(tmp_path))
    back = t5m.T5.from_pretrained(str(tmp_path))
    same_state(ours, back)
    hf = T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask = text_batch(96)
    dec = torch.tensor([[0, 7, 9, 11], [0, 5, 3, 1], [0, 4, 4, 4]])
    got, _ = ours.decode(dec, ours.encode(ids, attention_mask=mask), mask)
    close(got, hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, f"T5 ({head}) vs HF")


# ---------------------------------------------------------------------------------------------------------


def test_save_weights_is_strict(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    table = {"0.weight": "a.weight", "0.bias": "a.bias", "1.weight": (lambda w: w * 2, ["b.weight"])}
    with pytest.raises(ValueError, match=r"not in the table: 1\.bias.*without an inverse: 1\.weight"):
        save_weights(m, str(tmp_path / "x.safetensors"), table)
    table["1.bias"], table["1.weight"] = "a.bias", (lambda w: w * 2, ["b.weight"], lambda w: [w / 2])
    with pytest.raises(ValueError, match="written twice"):
        save_weights(m, str(tmp_path / "x.safetensors"), table)
    table["1.bias"] = "b.bias"
    save_weights(m, str(tmp_path / "x.safetensors"), table)
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(t) == ["a.bias", "a.weight", "b.bias", "b.weight"] and torch.equal(t["b.weight"], m[1].weight / 2)
    assert not os.path.exists(str(tmp_path / "x.safetensors.tmp"))


def test_to_hf_inverts_from_hf():
    """Each config's `to_hf` is read back by its `from_hf` into the same config."""
    for cfg in vt.PRESETS.values():
        d = cfg.to_hf() if cfg.clip else dict(model_type="blip-2", vision_config=cfg.to_hf())
        assert vt.ViTConfig.from_hf(d) == cfg
    for cfg in op.PRESETS.values():
        assert op.OPTConfig.from_hf(cfg.to_hf()) == cfg
    for cfg in (*t5m.PRESETS.values(), t5m.T5Config(act="relu", gated=False, tie_word_embeddings=True, d_ff=37)):
        assert t5m.T5Config.from_hf(cfg.to_hf()) == cfg
    q = dataclasses.replace(qf.PRESETS["qformer-stage1"], vocab_size=99, vision_width=48, num_query_tokens=5)
    assert qf.QFormerConfig.from_hf_bert(q.to_hf_bert(), 48, 5, q.cross_attention_freq) == q
    blip2 = dict(model_type="blip-2", qformer_config=q.to_hf(text=True), vision_config=dict(hidden_size=48),
                 num_query_tokens=5)
    assert qf.QFormerConfig.from_hf_blip2(blip2) == dataclasses.replace(q, lm_head=False)


def test_export_command(itm_folder, bert_folder, blip2_opt, tmp_path):
    """`python -m nanoblip2.export` on one of our stage-1 checkpoints: transformers loads the folder it writes, the
    BERT tokenizer comes from the checkpoint's training config, and what was dropped is printed. Then an HF BLIP-2
    folder, in process: it comes back the same."""
    import subprocess
    import sys
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval
    from nanoblip2.checkpoint import save_checkpoint
    from nanoblip2.export import main
    ours = Blip2Stage1.from_vit_bert(itm_folder[0], bert_folder[0]).eval()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("".join(t + "\n" for t in "[PAD] [UNK] [CLS] [SEP] [MASK] a cat on mat".split()))
    config = {"nanoblip2": "stage1", "model": dataclasses.asdict(ours.cfg), "frozen": {"vit": itm_folder[0]},
              "train": {"bert": str(bert)}}
    save_checkpoint(str(tmp_path / "ckpt"), {k: v for k, v in ours.state_dict().items() if not k.startswith("vit.")},
                    config, {})
    run = subprocess.run([sys.executable, "-m", "nanoblip2.export", str(tmp_path / "ckpt"), str(tmp_path / "hf")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    print(run.stdout, run.stderr)
    assert run.returncode == 0 and "dropped temp, qformer.lm_head (ITG)" in run.stdout
    assert "tokenizer.json" in run.stdout.split("now holds")[1]
    check_retrieval(ours, Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf")).eval(), "exported command")
    text = "a cat on a mat"
    want = load_bert_tokenizer(bert)(text)[0][0].tolist()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text).input_ids == want
    main([blip2_opt[0], str(tmp_path / "hf2")])
    same_state(Blip2.from_pretrained(blip2_opt[0]), Blip2.from_pretrained(str(tmp_path / "hf2")))
