"""Fine-tuning (paper §4.2, §4.4): ITC with image ids (LAVIS's soft targets), ITG off, the ViT trained with
layer-wise lr decay and activation checkpointing, in the model and through train_stage1.py / train_stage2.py."""
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from conftest import two_ranks
from test_losses import batch, features, tiny_model
from test_train_stage1 import data, losses, train  # noqa: F401, F811  (data is a fixture)
from test_train_stage2 import lms, train2  # noqa: F401, F811  (lms is a fixture)

from nanoblip2 import qformer as qf
from nanoblip2 import vit as vt
from nanoblip2.stage1 import Blip2Stage1, Stage1Config, itc_loss
from nanoblip2.training import adamw, layer_decay, train_step


def lavis_itc(sim_i2t, sim_t2i, ids, ids_all):
    """LAVIS blip2_qformer.py's image_id branch, written out."""
    pos = (ids[:, None] == ids_all[None, :]).float()
    targets = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / pos.size(1)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def test_itc_with_distinct_image_ids_is_the_smoothed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 5, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    ce, _, _ = itc_loss(img, txt, torch.tensor(0.07))
    soft, _, _ = itc_loss(img, txt, torch.tensor(0.07), torch.arange(8) * 3 + 5)
    print(f"ITC, distinct ids vs none: {abs(soft.item() - ce.item()):.1e}")
    assert abs(soft.item() - ce.item()) < 1e-6
    model = tiny_model().train()
    px, ids, mask = batch()
    outs = [model(px, ids, mask, torch.Generator().manual_seed(7), image_ids=i) for i in (None, torch.arange(4) + 9)]
    assert abs(outs[0]["loss_itc"].item() - outs[1]["loss_itc"].item()) < 1e-6
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in ("loss_itm", "loss_itg"))


def test_itc_with_shared_image_ids_follows_lavis():
    model = tiny_model().train()
    px, ids, mask = batch()
    image_ids = torch.tensor([3, 8, 3, 1])  # samples 0 and 2: two captions of one image
    out = model(px, ids, mask, torch.Generator().manual_seed(7), image_ids=image_ids)
    with torch.no_grad():
        _, img, txt = features(model, px, ids, mask)
        sim = torch.einsum("iqd,td->iqt", img, txt).amax(1) / 0.07
        want = lavis_itc(sim, sim.T, image_ids, image_ids)
    assert abs(out["loss_itc"].item() - want.item()) < 1e-6
    # features far apart: the shared positive changes the loss a lot
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 5, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    sim = torch.einsum("iqd,td->iqt", img, txt).amax(1) / 0.07
    ce, soft = itc_loss(img, txt, torch.tensor(0.07))[0], itc_loss(img, txt, torch.tensor(0.07), image_ids)[0]
    assert abs(soft - lavis_itc(sim, sim.T, image_ids, image_ids)) < 1e-6 and abs(soft - ce) > 0.1


def _ddp_worker(rank, world, port, result_file):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, (px, ids, mask) = tiny_model(), batch(B=8, seed=1, pad=False)
    rows = slice(rank * 4, (rank + 1) * 4)
    out = model(px[rows], ids[rows], mask[rows], image_ids=IDS[rows])
    out["loss_itc"].backward()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    loss = out["loss_itc"].detach()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": {n: p.grad for n, p in model.named_parameters()
                                                    if p.grad is not None}}, result_file)
    dist.destroy_process_group()


IDS = torch.tensor([0, 1, 2, 5, 5, 0, 6, 7])  # one image on both ranks, one twice on rank 1


def test_itc_image_ids_are_gathered_over_ranks(tmp_path):
    ddp = two_ranks(_ddp_worker, tmp_path)
    model, (px, ids, mask) = tiny_model(), batch(B=8, seed=1, pad=False)
    out = model(px, ids, mask, image_ids=IDS)
    out["loss_itc"].backward()
    grad_diff = max((p.grad - ddp["grads"][n]).abs().max().item() for n, p in model.named_parameters()
                    if p.grad is not None)
    assert abs(out["loss_itc"].item() - ddp["loss"].item()) < 1e-5 and grad_diff < 1e-5


def test_itg_off_leaves_it_out():
    model = tiny_model().train()
    px, ids, mask = batch()
    on = model(px, ids, mask, torch.Generator().manual_seed(7))
    assert torch.equal(on["loss"], on["loss_itc"] + on["loss_itm"] + on["loss_itg"])  # the default, as before
    off = model(px, ids, mask, torch.Generator().manual_seed(7), itg=False)
    assert "loss_itg" not in off and torch.equal(off["loss"], on["loss_itc"] + on["loss_itm"])
    off["loss"].backward()
    assert all(p.grad is None for p in model.qformer.lm_head.parameters()) and model.query_tokens.grad is not None


def tiny_vit_model(depth=3):
    torch.manual_seed(0)
    cfg = Stage1Config(vit=vt.ViTConfig(image_size=28, patch_size=7, width=24, depth=depth, heads=2, mlp=37),
                       qformer=qf.QFormerConfig(width=48, depth=2, heads=3, mlp=37, vision_width=24, num_query_tokens=5,
                                                vocab_size=50, max_positions=20, dropout=0.0), embed_dim=16, dec_id=49)
    return Blip2Stage1(cfg)


def test_layer_decay_lr_and_weight_decay_of_every_parameter():
    model = tiny_vit_model(depth=3)
    params = list(model.parameters())
    cfg = types.SimpleNamespace(weight_decay=0.05, lr=1.0, beta1=0.9, beta2=0.98, device="cpu", grad_accum=1,
                                grad_clip=0.0)
    opt = adamw(params, cfg, layer_decay(model.vit, 0.9))
    stream = types.SimpleNamespace(next=lambda: {"index": torch.arange(1)})
    train_step(model, opt, params, stream, cfg, 1e-3, lambda m, b: {"loss": sum(p.sum() for p in params) * 0})
    got = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
           for n, q in model.named_parameters() if q is p}
    # the ViT, by hand: embeddings 0.9^4, block 0 0.9^3, block 1 0.9^2, block 2 0.9; weight decay on matrices only
    block = {"norm1.weight": 0, "norm1.bias": 0, "attn.qkv.weight": 1, "attn.q_bias": 0, "attn.v_bias": 0,
             "attn.proj.weight": 1, "attn.proj.bias": 0, "norm2.weight": 0, "norm2.bias": 0, "mlp.fc1.weight": 1,
             "mlp.fc1.bias": 0, "mlp.fc2.weight": 1, "mlp.fc2.bias": 0}
    want = {"vit.patch_embed.weight": (1e-3 * 0.9 ** 4, 0.05), "vit.patch_embed.bias": (1e-3 * 0.9 ** 4, 0.0),
            "vit.cls_token": (1e-3 * 0.9 ** 4, 0.05), "vit.pos_embed": (1e-3 * 0.9 ** 4, 0.05)}
    for i, scale in ((0, 0.9 ** 3), (1, 0.9 ** 2), (2, 0.9)):
        want |= {f"vit.blocks.{i}.{k}": (1e-3 * scale, 0.05 * d) for k, d in block.items()}
    # the rest at the full lr: ln_vision (the ViT's output norm), the Q-Former, the heads, temp
    want |= {"ln_vision.weight": (1e-3, 0.0), "ln_vision.bias": (1e-3, 0.0), "temp": (1e-3, 0.0),
             "query_tokens": (1e-3, 0.05), "itm_head.weight": (1e-3, 0.05), "itm_head.bias": (1e-3, 0.0)}
    assert len(got) == len(params) and len(opt.param_groups) == 10
    for name, (lr, wd) in want.items():
        assert got[name] == (pytest.approx(lr, rel=1e-12), wd), name
    for name, (lr, wd) in got.items():
        if not name.startswith("vit."):
            assert (lr, wd) == (1e-3, 0.05 if dict(model.named_parameters())[name].ndim >= 2 else 0.0), name
    # off (1.0): the two groups of before, in their order
    frozen = [p for n, p in model.named_parameters() if not n.startswith("vit.")]
    opt = adamw(frozen, cfg, layer_decay(model.vit, 1.0))
    ids = lambda ps: [id(p) for p in ps]
    assert [ids(g["params"]) for g in opt.param_groups] == [ids(p for p in frozen if p.ndim >= 2),
                                                            ids(p for p in frozen if p.ndim < 2)]
    # CLIP's ln_pre goes with the embeddings
    clip = vt.ViT(vt.ViTConfig(image_size=28, patch_size=7, width=24, depth=2, heads=2, mlp=37, clip=True))
    assert layer_decay(clip, 0.5)[clip.ln_pre.weight] == 0.5 ** 3


def vit_grads(checkpointing, frozen=False):
    model = tiny_vit_model().eval()  # no dropout anywhere: the recomputed forward is the same
    model.vit.requires_grad_(not frozen)
    model.vit.grad_checkpoint = checkpointing
    px, ids, mask = batch()
    model(px, ids, mask, torch.Generator().manual_seed(7))["loss"].backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients():
    plain, ckpt = vit_grads(False), vit_grads(True)
    assert all(plain[n] is not None and plain[n].abs().sum() > 0 for n in plain if n.startswith("vit."))
    diff = max((plain[n] - ckpt[n]).abs().max().item() for n in plain if plain[n] is not None)
    print(f"ViT activation checkpointing: max gradient difference {diff:.1e}")
    assert all((plain[n] is None) == (ckpt[n] is None) for n in plain) and diff == 0.0
    vit, saved = tiny_vit_model().vit, []  # the blocks keep their inputs only (a few tensors instead of dozens)
    for on in (False, True):
        vit.grad_checkpoint, kept = on, []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            vit(batch()[0])
        saved.append(len(kept))
    assert saved[1] < saved[0] / 4, saved
    frozen = vit_grads(True, frozen=True)
    assert all(g is None for n, g in frozen.items() if n.startswith("vit.")) and frozen["ln_vision.weight"] is not None


def test_stage1_with_the_vit_trained(data, itm_folder, lms, tmp_path):
    """--freeze_vit=false: the loss falls, the ViT is saved and loads, resume is exact; stage 2 starts from it."""
    flags = ["--freeze_vit=false", "--vit_lr_decay=0.9", "--vit_grad_checkpoint=true", "--lr_decay_steps=12",
             "--eval_interval=6", "--val_ann="]
    log = train(data, itm_folder, tmp_path / "full", "--max_steps=12", *flags)
    full = losses(log)
    print("losses, the ViT trained:", " ".join(f"{full[s]:.3f}" for s in sorted(full)))
    assert "ViT trained" in log and sum(full[s] for s in (10, 11, 12)) < 0.85 * sum(full[s] for s in (1, 2, 3))
    ckpt = tmp_path / "full" / "ckpt"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["frozen"]["vit"] is None and cfg["fingerprints"] == {}
    saved = load_file(ckpt / "model.safetensors")
    model = Blip2Stage1.from_pretrained(str(ckpt))
    start = Blip2Stage1.from_pretrained(itm_folder[0], image_size=28)
    assert torch.equal(model.vit.blocks[0].attn.qkv.weight, saved["vit.blocks.0.attn.qkv.weight"])
    assert not torch.equal(model.vit.blocks[0].attn.qkv.weight, start.vit.blocks[0].attn.qkv.weight)
    assert Blip2Stage1.from_pretrained(str(ckpt), image_size=35).vit.pos_embed.shape == (1, 26, 48)
    train(data, itm_folder, tmp_path / "cut", "--max_steps=6", *flags)
    resumed = losses(train(data, itm_folder, tmp_path / "cut", "--max_steps=8", "--init_from=resume", *flags))
    assert sorted(resumed) == [7, 8] and all(abs(resumed[s] - full[s]) < 1e-5 for s in resumed), (resumed, full)
    # stage 2 from it, at another image size, the ViT trained too (caption fine-tuning)
    train2(data, lms / "opt", tmp_path / "s2", f"--init_from={ckpt}", "--image_size=35", "--max_steps=2",
           "--eval_interval=2", "--val_ann=", "--prompt=a photo of", *flags[:3])
    s2 = load_file(tmp_path / "s2" / "ckpt" / "model.safetensors")
    assert s2["vit.pos_embed"].shape == (1, 26, 48)


def test_stage1_without_itg(data, itm_folder, tmp_path):
    log = train(data, itm_folder, tmp_path / "run", "--max_steps=2", "--eval_interval=2", "--val_ann=", "--itg=false")
    lines = [line for line in log.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(" itc " in line and " itg " not in line for line in lines)
