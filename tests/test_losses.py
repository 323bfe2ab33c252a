"""The stage-1 losses (ITC, ITM, ITG) against direct re-computations written here, and DDP equivalence."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import two_ranks

from nanoblip2 import qformer as qf
from nanoblip2 import vit as vt
from nanoblip2.stage1 import Blip2Stage1, Stage1Config, hard_negatives, itc_loss
from nanoblip2.training import NegativePool

V = 50  # vocabulary incl. [DEC] = 49


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Stage1Config(vit=vt.ViTConfig(image_size=28, patch_size=7, width=24, depth=2, heads=2, mlp=37),
                       qformer=qf.QFormerConfig(width=48, depth=4, heads=3, mlp=37, vision_width=24, num_query_tokens=5,
                                                vocab_size=V, max_positions=20, eps=1e-7, dropout=0.0),
                       embed_dim=16, dec_id=V - 1)
    model = Blip2Stage1(cfg)
    model.vit.requires_grad_(False)  # frozen, as in training
    return model


def batch(B=4, T=7, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(B, 3, 28, 28, generator=g)
    ids = torch.randint(3, V - 1, (B, T), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[1, 5:] = 0
        mask[3, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ids[1, 4], ids[3, 3] = 2, 2  # [SEP]
    return px, ids, mask


def smoothed_ce(logits, target, eps=0.1):
    """Cross-entropy with label smoothing, written out: (1 - eps) * NLL + eps * mean over classes of -log p."""
    logp = logits.log_softmax(-1)
    return ((1 - eps) * -logp[torch.arange(len(target)), target] - eps * logp.mean(-1)).mean()


def test_itc_with_random_features_is_log_b():
    g = torch.Generator().manual_seed(0)
    for B in (8, 64):
        img = F.normalize(torch.randn(B, 5, 4096, generator=g), dim=-1)
        txt = F.normalize(torch.randn(B, 4096, generator=g), dim=-1)
        loss, _, _ = itc_loss(img, txt, torch.tensor(1.0))
        assert abs(loss.item() - math.log(B)) < 0.05 * math.log(B)


def test_temp_is_clamped_to_temp_max():
    model = tiny_model().train()
    px, ids, mask = batch()
    for value, cap, want in ((0.3, 0.5, 0.3), (0.3, 0.07, 0.07), (1e-5, 0.07, 0.001)):
        with torch.no_grad():
            model.temp.fill_(value)
        model.temp_max = cap
        model(px, ids, mask, torch.Generator().manual_seed(0))
        assert abs(model.temp.item() - want) < 1e-7, (value, cap, model.temp.item())


def test_hard_negatives_never_pick_a_pair_of_the_same_image():
    g = torch.Generator().manual_seed(0)
    B, G = 6, 3
    for rank in range(G):
        sim = torch.randn(B, G * B, generator=g)
        same = torch.zeros(B, G * B, dtype=torch.bool)
        same[torch.arange(B), torch.arange(B) + rank * B] = True  # the positives
        same[0, 0] = same[1, G * B - 1] = True                    # other captions of the same image
        sim[same] = 50.0                                          # by far the most similar
        for _ in range(200):
            assert not same[torch.arange(B), hard_negatives(sim, same, g)].any()
    # and they follow the similarities: a much more similar negative is picked far more often
    sim, same = torch.zeros(1, 4), torch.tensor([[True, False, False, False]])
    sim[0, 2] = 5.0
    counts = torch.bincount(torch.cat([hard_negatives(sim, same, g) for _ in range(500)]), minlength=4)
    assert counts[0] == 0 and counts[2] > 400


def itm_by_loops(model, image, ids, mask, neg_img, neg_txt):
    """The ITM loss of [positives; (neg image, text); (image, neg text)], one pair at a time."""
    B, Q = len(neg_img), model.query_tokens.size(1)
    logits = []
    pairs = [(i, i) for i in range(B)] + [(neg_img[t], t) for t in range(B)] + [(i, neg_txt[i]) for i in range(B)]
    for im, tx in pairs:
        h, _ = model.qformer(query_embeds=model.query_tokens, input_ids=ids[tx][None], image=image[im][None],
                             mask=qf.bidirectional_mask(Q, mask[tx][None]))
        logits.append(model.itm_head(h[0, :Q]).mean(0))
    return F.cross_entropy(torch.stack(logits), torch.tensor([1] * B + [0] * 2 * B))


def features(model, px, ids, mask):
    """ViT features after ln_vision, per-query ITC features, text ITC feature."""
    image = model.ln_vision(model.vit(px))
    q_out, _ = model.qformer(query_embeds=model.query_tokens.expand(len(px), -1, -1), image=image)
    t_out, _ = model.qformer(input_ids=ids, mask=qf.text_mask(mask))
    return image, F.normalize(model.vision_proj(q_out), dim=-1), F.normalize(model.text_proj(t_out[:, 0]), dim=-1)


def test_losses_equal_direct_recomputation():
    model = tiny_model().train()
    px, ids, mask = batch()
    B, Q = 4, 5
    out = model(px, ids, mask, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        image, img, txt = features(model, px, ids, mask)
        # ITC, by loops: the best query of each image for each text
        sim = torch.tensor([[max(img[i, q] @ txt[t] for q in range(Q)) for t in range(B)] for i in range(B)]) / 0.07
        itc = (smoothed_ce(sim, torch.arange(B)) + smoothed_ce(sim.T, torch.arange(B))) / 2
        assert abs(out["loss_itc"].item() - itc.item()) < 1e-5
        # ITM, with the negatives the same generator draws
        g = torch.Generator().manual_seed(7)
        eye = torch.eye(B, dtype=torch.bool)
        neg_img, neg_txt = hard_negatives(sim.T, eye, g), hard_negatives(sim, eye, g)
        assert abs(out["loss_itm"].item() - itm_by_loops(model, image, ids, mask, neg_img, neg_txt).item()) < 1e-5
        # ITG, as one pass over [queries; [DEC] caption] with the UniLM mask, shifted by one, padding ignored
        dec = ids.clone()
        dec[:, 0] = V - 1
        h, _ = model.qformer(query_embeds=model.query_tokens.expand(B, -1, -1), input_ids=dec, image=image,
                             mask=qf.multimodal_causal_mask(Q, mask))
        logits = model.qformer.logits(h[:, Q:-1])
        keep = mask[:, 1:].bool()
        itg = smoothed_ce(logits[keep], dec[:, 1:][keep])
        assert abs(out["loss_itg"].item() - itg.item()) < 1e-5
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"])


def test_negative_pool_adds_the_last_samples_as_itm_candidates():
    model = tiny_model().train()
    pool = NegativePool(size=6)
    (px1, ids1, mask1), (px2, ids2, mask2) = batch(seed=1), batch(seed=2, T=9)
    ids_img1, ids_img2 = torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 11, 22])  # image 11 in both
    # an empty pool changes nothing; after the step it holds the batch, as the forward returns it
    assert pool.items is None
    out1 = model(px1, ids1, mask1, generator=torch.Generator().manual_seed(7), image_ids=ids_img1,
                 candidates=pool.items)
    pool.push(**out1["samples"])
    ref = model(px1, ids1, mask1, generator=torch.Generator().manual_seed(7), image_ids=ids_img1)
    assert torch.equal(out1["loss"], ref["loss"]) and pool.items["image_ids"].tolist() == [10, 11, 12, 13]
    assert torch.equal(pool.items["txt_feat"], features(model, px1, ids1, mask1)[2])
    full = pool.state_dict()
    with torch.no_grad():  # the candidates: batch 2, then batch 1 (padded to 9 tokens); image 11 never with image 11
        image, img, txt = features(model, torch.cat([px2, px1]), torch.cat([ids2, F.pad(ids1, (0, 2))]),
                                   torch.cat([mask2, F.pad(mask1, (0, 2))]))
        sim = torch.einsum("iqd,td->iqt", img, txt).amax(1) / 0.07   # (8 images, 8 texts)
        same = ids_img2[:, None] == torch.cat([ids_img2, ids_img1])[None, :]
        assert same.sum() == 5
        ids, mask = torch.cat([ids2, F.pad(ids1, (0, 2))]), torch.cat([mask2, F.pad(mask1, (0, 2))])
        from_pool = 0
        for seed in range(4):
            pool.load_state_dict(full)  # batch 1, as after step 1
            out2 = model(px2, ids2, mask2, generator=torch.Generator().manual_seed(seed), image_ids=ids_img2,
                         candidates=pool.items)
            pool.push(**out2["samples"])
            g = torch.Generator().manual_seed(seed)
            neg_img, neg_txt = hard_negatives(sim[:, :4].T, same, g), hard_negatives(sim[:4], same, g)
            from_pool += (neg_img >= 4).sum() + (neg_txt >= 4).sum()
            assert abs(out2["loss_itm"].item() - itm_by_loops(model, image, ids, mask, neg_img, neg_txt).item()) < 1e-5
        assert from_pool > 0
    # a ring buffer: batch 2 went into rows 4, 5, 0, 1
    assert pool.items["image_ids"].tolist() == [11, 22, 12, 13, 20, 21] and pool.items["input_ids"].shape == (6, 9)
    with pytest.raises(ValueError, match="image_ids"):
        model(px1, ids1, mask1, candidates=pool.items)


def soft_ce(logits, pos, eps=0.1):
    """Cross-entropy against targets spread evenly over each row's positives, label-smoothed, written out."""
    target = (1 - eps) * pos / pos.sum(1, keepdim=True) + eps / pos.size(1)
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def test_itc_pool_adds_itms_pool_negatives_as_fresh_columns():
    model = tiny_model().train()
    model.itc_pool = True
    (px1, ids1, mask1), (px2, ids2, mask2) = batch(seed=1), batch(seed=2)
    ids_img1, ids_img2 = torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 11, 22])  # image 11 in both
    pool = NegativePool(size=4)
    pool.push(**model(px1, ids1, mask1, image_ids=ids_img1)["samples"])
    pool.buffers["img_feats"] = pool.buffers["img_feats"].flip(0)  # stale: they choose, the columns are fresh
    with torch.no_grad():
        image, img, txt = features(model, torch.cat([px2, px1]), torch.cat([ids2, ids1]), torch.cat([mask2, mask1]))
        stale = torch.cat([img[:4], pool.buffers["img_feats"]])
        same = ids_img2[:, None] == torch.cat([ids_img2, ids_img1])[None, :]
        all_ids = torch.cat([ids_img2, ids_img1])
    extra = 0
    for seed in range(6):
        out = model(px2, ids2, mask2, generator=torch.Generator().manual_seed(seed), image_ids=ids_img2,
                    candidates=pool.items)
        g = torch.Generator().manual_seed(seed)
        neg_img = hard_negatives(torch.einsum("iqd,td->iqt", stale, txt[:4]).amax(1).T / 0.07, same, g)
        neg_txt = hard_negatives(torch.einsum("iqd,td->iqt", img[:4], txt).amax(1) / 0.07, same, g)
        cols_img = list(range(4)) + sorted({i for i in neg_img.tolist() if i >= 4})   # fresh features of the pool's
        cols_txt = list(range(4)) + sorted({i for i in neg_txt.tolist() if i >= 4})
        extra += len(cols_img) + len(cols_txt) - 8
        with torch.no_grad():
            i2t = torch.einsum("iqd,td->iqt", img[:4], txt[cols_txt]).amax(1) / 0.07
            t2i = torch.einsum("iqd,td->iqt", img[cols_img], txt[:4]).amax(1).T / 0.07
            pos = lambda cols: (ids_img2[:, None] == all_ids[cols][None, :]).float()
            want = (soft_ce(i2t, pos(cols_txt)) + soft_ce(t2i, pos(cols_img))) / 2
        assert abs(out["loss_itc"].item() - want.item()) < 1e-5, seed
    assert extra > 4
    model.itc_pool = False  # off: ITC over the batch only
    out = model(px2, ids2, mask2, generator=torch.Generator().manual_seed(0), image_ids=ids_img2, candidates=pool.items)
    with torch.no_grad():
        sim = torch.einsum("iqd,td->iqt", img[:4], txt[:4]).amax(1) / 0.07
        want = (soft_ce(sim, pos(list(range(4)))) + soft_ce(sim.T, pos(list(range(4))))) / 2
    assert abs(out["loss_itc"].item() - want.item()) < 1e-5


def test_itc_pool_with_no_pool_negatives_changes_nothing():
    """A step whose negatives all came from the batch: no Q-Former pass over 0 rows, the ITC of the batch alone."""
    model = tiny_model().train()
    px, ids, mask = batch(seed=1)
    pool = NegativePool(size=4)
    pool.push(**model(px, ids, mask, image_ids=torch.arange(4))["samples"])
    none = torch.tensor([], dtype=torch.long)
    extra = model.fresh_feats(pool.items, none, none)
    assert extra[0].shape == (0, 5, 16) and extra[2].shape == (0, 16)
    img, txt = pool.items["img_feats"], pool.items["txt_feat"]
    ids4 = torch.tensor([7, 8, 9, 10])
    t = torch.tensor(0.07)
    assert torch.equal(itc_loss(img, txt, t, ids4, extra)[0], itc_loss(img, txt, t, ids4)[0])


def test_gradients_reach_the_trainable_parts_only():
    model = tiny_model()
    px, ids, mask = batch()
    model(px, ids, mask)["loss"].backward()
    assert all(p.grad is None for p in model.vit.parameters())
    for name in ("ln_vision.weight", "query_tokens", "temp", "itm_head.weight", "vision_proj.weight",
                 "qformer.layers.0.cross.key.weight", "qformer.lm_head.dense.weight", "qformer.word_embeddings.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _ddp_worker(rank, world, port, result_file):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_model()
    px, ids, mask = batch(B=4 * world, seed=1, pad=False)  # equal token counts per rank: see below
    rows = slice(rank * 4, (rank + 1) * 4)
    out = model(px[rows], ids[rows], mask[rows])
    (out["loss_itc"] + out["loss_itg"]).backward()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # what DDP does: the mean over ranks
            p.grad /= world
    losses = torch.stack([out["loss_itc"].detach(), out["loss_itg"].detach()])
    dist.all_reduce(losses)
    if rank == 0:
        torch.save({"losses": losses / world, "grads": {n: p.grad for n, p in model.named_parameters()
                                                          if p.grad is not None}}, result_file)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    ddp = two_ranks(_ddp_worker, tmp_path)
    model = tiny_model()
    # ITG is a mean over tokens: the mean of the ranks' means is the global mean only for equal token counts
    px, ids, mask = batch(B=8, seed=1, pad=False)
    out = model(px, ids, mask)
    (out["loss_itc"] + out["loss_itg"]).backward()
    loss_diff = (torch.stack([out["loss_itc"], out["loss_itg"]]).detach() - ddp["losses"]).abs().max().item()
    grad_diff = max((p.grad - ddp["grads"][n]).abs().max().item() for n, p in model.named_parameters()
                    if p.grad is not None)
    print(f"DDP (2 ranks x 4) vs 1 process x 8: loss diff {loss_diff:.2e}, max grad diff {grad_diff:.2e}")
    assert set(ddp["grads"]) == {n for n, p in model.named_parameters() if p.grad is not None}
    assert loss_diff < 1e-5 and grad_diff < 1e-5
