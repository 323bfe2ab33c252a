"""The strict loader's errors, BERT's old key names, and the real presets' parameter counts."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoblip2 import qformer as qf
from nanoblip2 import vit as vt
from nanoblip2.load import num_params
from nanoblip2.stage1 import Blip2Stage1
from nanoblip2.checkpoint import check_frozen, fingerprint
from nanoblip2.load import CheckpointError, build_empty


def tampered(folder, tmp_path, edit):
    out = tmp_path / "ckpt"
    shutil.copytree(folder, out)
    sd = load_file(out / "model.safetensors")
    edit(sd)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_missing_key_is_named(itm_folder, tmp_path):
    src = tampered(itm_folder[0], tmp_path, lambda sd: sd.pop("qformer.encoder.layer.2.crossattention.output.dense.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing: qformer\.layers\.2\.cross\.dense\.bias "
                                              r"\(from qformer\.encoder\.layer\.2\.crossattention\.output\.dense\.bias\)"):
        Blip2Stage1.from_pretrained(src)


def test_unexpected_key_is_named(itm_folder, tmp_path):
    src = tampered(itm_folder[0], tmp_path, lambda sd: sd.update({"qformer.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected: qformer\.extra\.weight"):
        Blip2Stage1.from_pretrained(src)


def test_misshaped_key_is_named(itm_folder, tmp_path):
    src = tampered(itm_folder[0], tmp_path, lambda sd: sd.update({"itm_head.weight": torch.zeros(3, 48)}))
    with pytest.raises(CheckpointError, match=r"1 mis-shaped: itm_head\.weight: checkpoint \(3, 48\) vs model \(2, 48\)"):
        Blip2Stage1.from_pretrained(src)


def test_missing_files_and_wrong_checkpoint(itm_folder, bert_folder, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Blip2Stage1.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a BLIP-2 image-text retrieval checkpoint"):
        Blip2Stage1.from_pretrained(bert_folder[0])
    out = tmp_path / "noweights"
    shutil.copytree(itm_folder[0], out)
    os.remove(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Blip2Stage1.from_pretrained(str(out))


@torch.no_grad()
def test_old_bert_names_gamma_beta(bert_folder, itm_folder, tmp_path):
    """bert-base-uncased's file says bert.*.LayerNorm.gamma/beta; it must load to the same model."""
    def rename(sd):
        for k in list(sd):
            new = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            sd[new] = sd.pop(k)
    old = tampered(bert_folder[0], tmp_path, rename)
    torch.manual_seed(0)
    a = Blip2Stage1.from_vit_bert(itm_folder[0], bert_folder[0]).eval()
    torch.manual_seed(0)
    b = Blip2Stage1.from_vit_bert(itm_folder[0], old).eval()
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_real_preset_parameter_counts():
    eva = build_empty(vt.ViT, vt.PRESETS["eva-vit-g"], "meta")
    assert abs(num_params(eva) - 985.9e6) / 985.9e6 < 1e-3  # LAVIS eva_vit.py depth 39: 39 x 25,248,768 + embeddings
    assert num_params(eva) == 39 * 25_248_768 + 1408 * 3 * 14 * 14 + 1408 + 1408 + 257 * 1408
    stage2 = build_empty(qf.QFormer, qf.PRESETS["qformer-stage2"], "meta")
    queries = 32 * 768
    assert queries == 24_576
    assert abs(num_params(stage2) + queries - 105.2e6) / 105.2e6 < 1e-3  # LAVIS blip2_opt.py: no text branch
    stage1 = build_empty(qf.QFormer, qf.PRESETS["qformer-stage1"], "meta")
    assert abs(num_params(stage1) + queries - 186.3e6) / 186.3e6 < 1e-3
    clip = build_empty(vt.ViT, vt.PRESETS["clip-vit-l"], "meta")
    # CLIP ViT-L/14 has 303.2M in its vision tower with 24 layers; we keep 23 and drop its k biases and ln_post
    per_layer = 4 * 1024 * 1024 + 3 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
    assert num_params(clip) == 23 * per_layer + 3 * 1024 * 14 * 14 + 1024 + 257 * 1024 + 2 * 1024


def test_a_changed_frozen_part_is_refused(tmp_path):
    """Our checkpoints name their frozen parts by path; loading one whose files were replaced since (a retrained
    ViT of the same shapes: every value differs) must stop, not give garbage."""
    vit = tmp_path / "vit"
    vit.mkdir()
    torch.manual_seed(0)
    w = {"a": torch.randn(300, 1000), "b": torch.randn(7)}  # 1.2 MB: spans the 17 samples
    save_file(w, str(vit / "model.safetensors"))
    d = {"frozen": {"vit": str(vit), "lm": "unchecked"}, "fingerprints": {"vit": fingerprint(str(vit))}}
    check_frozen("ckpt", d)  # unchanged: fine
    assert fingerprint(str(vit)) == d["fingerprints"]["vit"]
    save_file({"a": w["a"] + 1e-3 * torch.randn(300, 1000), "b": w["b"]}, str(vit / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"ckpt: its frozen vit {vit} has changed since"):
        check_frozen("ckpt", d)
    check_frozen("ckpt", {"frozen": {"vit": str(vit)}})  # older checkpoints, without fingerprints: not checked


def mapped_from(t, path):
    """Does tensor t's memory lie in a mapping of the file at `path` (/proc/self/maps)?"""
    with open("/proc/self/maps") as f:
        spans = [line.split() for line in f if line.rstrip().endswith(os.fspath(path))]
    return any(int(a, 16) <= t.data_ptr() < int(b, 16) for a, b in (s[0].split("-") for s in spans))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_same_dtype_maps_the_file_other_dtypes_copy(tmp_path):
    from nanoblip2.load import load_weights
    file = tmp_path / "model.safetensors"
    weights = {"w": torch.randn(37, 48, generator=torch.Generator().manual_seed(0)), "b": torch.randn(37)}
    save_file(weights, file)
    (tmp_path / "config.json").write_text("{}")
    table = {"weight": "w", "bias": "b"}
    mapped, copied = torch.nn.Linear(48, 37), torch.nn.Linear(48, 37).double()
    load_weights(mapped, tmp_path, table)
    load_weights(copied, tmp_path, table)
    assert torch.equal(mapped.weight, weights["w"]) and torch.equal(mapped.bias, weights["b"])
    assert torch.equal(copied.weight, weights["w"].double()) and copied.weight.dtype == torch.float64
    assert mapped_from(mapped.weight, file) and mapped_from(mapped.bias, file)  # the file's pages, not a copy
    assert not mapped_from(copied.weight, file)  # a cast is a copy
    assert mapped.weight.requires_grad and isinstance(mapped.weight, torch.nn.Parameter)
    with torch.no_grad():
        mapped.weight.add_(1.0)  # copy-on-write: the file is untouched
    assert torch.equal(load_file(file)["w"], weights["w"])
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path, cut, ignore=shutil.ignore_patterns("cut"))
    (cut / "model.safetensors").write_bytes(file.read_bytes()[:100])  # truncated: still the one-line error
    with pytest.raises(CheckpointError, match=f"^{cut / 'model.safetensors'}: cannot be read") as e:
        load_weights(torch.nn.Linear(48, 37), cut, table)
    assert "\n" not in str(e.value)
