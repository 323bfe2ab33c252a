"""Our modules vs transformers on tiny random models, loaded through our own loader. Tolerance: max abs diff <= 1e-5."""
import json
import os

import torch
from conftest import pixels, text_batch

from nanoblip2 import qformer as qf
from nanoblip2 import vit as vt
from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.load import load_weights

TOL = 1e-5


def close(a, b, what):
    diff = (a - b).abs().max().item()
    print(f"{what}: max abs diff {diff:.2e}")
    assert a.shape == b.shape and diff <= TOL, f"{what}: {diff}"


@torch.no_grad()
def test_eva_vit_and_ln_vision(itm_folder):
    folder, hf = itm_folder
    ours = Blip2Stage1.from_pretrained(folder)
    px = pixels()
    close(ours.image_embeds(px), hf.vision_model(px).last_hidden_state, "EVA ViT + ln_vision")


@torch.no_grad()
def test_eva_vit_interpolated_position_embedding(itm_folder):
    folder, hf = itm_folder
    ours = Blip2Stage1.from_pretrained(folder, image_size=42)  # 4x4 grid -> 6x6
    assert ours.vit.pos_embed.shape[1] == 37
    px = pixels(size=42)
    ref = hf.vision_model(px, interpolate_pos_encoding=True).last_hidden_state
    close(ours.image_embeds(px), ref, "EVA ViT at 42 px (interpolated)")


@torch.no_grad()
def test_clip_vit_second_last_layer(clip_folder):
    folder, hf = clip_folder
    cfg = vt.ViTConfig.from_hf(json.load(open(os.path.join(folder, "config.json"))))
    assert cfg.depth == 2 and cfg.clip and cfg.act == "quick_gelu"
    ours = vt.ViT(cfg).eval()
    load_weights(ours, folder, **vt.hf_keys(cfg))
    px = pixels()
    close(ours(px), hf(px, output_hidden_states=True).hidden_states[-2], "CLIP ViT (second-last layer)")


@torch.no_grad()
def test_qformer_query_path(itm_folder):
    folder, hf = itm_folder
    ours = Blip2Stage1.from_pretrained(folder)
    image = hf.vision_model(pixels()).last_hidden_state
    Q = hf.query_tokens.expand(2, -1, -1)
    ref = hf.qformer(query_embeds=Q, encoder_hidden_states=image).last_hidden_state
    close(ours.qformer(query_embeds=Q, image=image)[0], ref, "Q-Former query path")


@torch.no_grad()
def test_qformer_text_path_is_bert(bert_folder, itm_folder):
    bert, hf = bert_folder
    ours = Blip2Stage1.from_vit_bert(itm_folder[0], bert).eval()
    ids, mask = text_batch(98)
    h, _ = ours.qformer(input_ids=ids, mask=qf.text_mask(mask))
    close(h, hf.bert(ids, attention_mask=mask).last_hidden_state, "Q-Former text path vs BertModel")
    # the ITG head starts as BERT's MLM head over the original vocabulary, plus one [DEC] column
    logits = ours.qformer.logits(h)
    assert logits.shape[-1] == 99
    close(logits[..., :98], hf(ids, attention_mask=mask).logits, "ITG head vs BertForMaskedLM")
    # the query FFN is a copy of the text FFN; the cross-attention is new
    layer = ours.qformer.layers[0]
    assert torch.equal(layer.ffn_query.fc1.weight, layer.ffn_text.fc1.weight)
    assert torch.equal(layer.ffn_query.ln.bias, hf.bert.encoder.layer[0].output.LayerNorm.bias)
    assert layer.cross.key.weight.shape == (48, 48) and ours.qformer.layers[1].cross is None


@torch.no_grad()
def test_itm_and_itc_vs_retrieval_model(itm_folder):
    folder, hf = itm_folder
    ours = Blip2Stage1.from_pretrained(folder)
    px, (ids, mask) = pixels(B=3), text_batch(99)
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    close(ours.itm_logits(px, ids, mask), ref.logits_per_image, "ITM logits")
    px2 = pixels(B=2, seed=1)
    ref = hf(pixel_values=px2, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    sim = ours.itc_similarity(px2, ids, mask)
    assert sim.shape == (2, 3)
    close(sim, ref.logits_per_image, "ITC similarity")


@torch.no_grad()
def test_sharded_checkpoint(itm_folder, tmp_path):
    _, hf = itm_folder
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ours = Blip2Stage1.from_pretrained(str(tmp_path))
    px, (ids, mask) = pixels(B=3), text_batch(99)
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    close(ours.itm_logits(px, ids, mask), ref.logits_per_image, "ITM logits (sharded)")


@torch.no_grad()
def test_retrieval_scores_rerank_the_top_k(itm_folder):
    folder, hf = itm_folder
    ours = Blip2Stage1.from_pretrained(folder)
    px, (ids, mask) = pixels(B=3, seed=3), text_batch(99, B=4, T=6, seed=3)
    i2t, t2i = ours.retrieval_scores(px, ids, mask, k_test=2, progress=False)
    itc = ours.itc_similarity(px, ids, mask)
    itm = torch.tensor([[hf(pixel_values=px[i:i + 1], input_ids=ids[t:t + 1], attention_mask=mask[t:t + 1],
                            use_image_text_matching_head=True).logits_per_image[0, 1] for t in range(4)] for i in range(3)])
    want = itm + itc  # a pair's score: its ITM positive logit + its cosine, if it is in the top 2 of its row
    top_i2t, top_t2i = itc.topk(2, dim=1).indices, itc.T.topk(2, dim=1).indices
    for i in range(3):
        for t in range(4):
            assert abs(i2t[i, t] - (want[i, t] if t in top_i2t[i] else -100)) < 1e-5
            assert abs(t2i[t, i] - (want[i, t] if i in top_t2i[t] else -100)) < 1e-5
    small = ours.retrieval_scores(px, ids, mask, k_test=2, batch_size=1, progress=False)  # 2 rows per ITM pass
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(small, (i2t, t2i)))
