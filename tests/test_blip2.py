"""Blip2 (stage 2) vs HF Blip2ForConditionalGeneration: logits, and generated ids for greedy and beam search."""
import pytest
import torch
from conftest import pixels

from nanoblip2 import Blip2
from nanoblip2.linear import ONEDNN, Linear, pack
from nanoblip2.load import CheckpointError

Q = 5  # queries in the tiny models


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, blip2_opt, blip2_t5):
    folder, hf = blip2_opt if request.param == "opt" else blip2_t5
    return Blip2.from_pretrained(folder), hf


def hf_ids(hf, ids, mask):
    """transformers 5 wants Q image placeholder tokens before the text; OPT's left padding goes in front of them,
    T5's right padding stays at the end (as ours: the same layout, so the same sums)."""
    B = ids.size(0)
    img = torch.full((B, Q), hf.config.image_token_index)
    full, full_mask = torch.cat([img, ids], 1), torch.cat([torch.ones(B, Q, dtype=torch.long), mask], 1)
    if hf.config.is_encoder_decoder:
        return full, full_mask
    order = torch.argsort(full_mask, dim=1, stable=True)
    return full.gather(1, order), full_mask.gather(1, order)


def prompts(model, texts):
    side = "right" if model.is_t5 else "left"
    return model.tokenizer(texts, padding_side=side)


@torch.no_grad()
def test_logits(pair):
    ours, hf = pair
    px = pixels()
    ids, mask = prompts(ours, ["a cat on a mat", "two dogs"])
    hids, hmask = hf_ids(hf, ids, mask)
    embeds = torch.cat([ours.visual_prompt(px), ours.lm.embed(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, Q, dtype=torch.long), mask], 1)
    if ours.is_t5:
        dec = torch.tensor([[0, 7, 9, 11], [0, 5, 3, 1]])
        ref = hf(pixel_values=px, input_ids=hids, attention_mask=hmask, decoder_input_ids=dec).logits
        got, _ = ours.lm.decode(dec, ours.lm.encode(inputs_embeds=embeds, attention_mask=full_mask), full_mask)
    else:
        ref = hf(pixel_values=px, input_ids=hids, attention_mask=hmask).logits
        order = torch.argsort(full_mask, dim=1, stable=True)
        embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.size(-1)))
        got, _ = ours.lm(inputs_embeds=embeds, attention_mask=full_mask.gather(1, order))
        keep = hmask.bool()  # HF's logits at padding positions are not defined the same way; compare real tokens
        ref, got = ref[keep], got[keep]
    diff = (got - ref).abs().max().item()
    print(f"{'T5' if ours.is_t5 else 'OPT'} logits vs Blip2ForConditionalGeneration: max abs diff {diff:.2e}")
    assert diff <= 1e-5


SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=1, min_new_tokens=4),
    dict(num_beams=3, length_penalty=1.0),
    dict(num_beams=3, length_penalty=-1.0, min_new_tokens=2),
    dict(num_beams=5, length_penalty=1.0),
    dict(num_beams=5, length_penalty=-1.0),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@torch.no_grad()
def test_generate_same_ids_as_hf(pair, kw):
    ours, hf = pair
    px = pixels(B=3, seed=5)
    ids, mask = prompts(ours, ["", "a photo of", "question: which city is this? answer:"])  # different lengths
    # random tiny LMs rarely pick "\n": end instead at the third token that the first row generates with no end
    # token, so that some sequences and beams end early and others run to the limit
    saved = ours.end_id
    try:
        ours.end_id = -1
        end = ours.generate(px, ids, mask, max_new_tokens=3, **kw)[0, 2].item()
        ours.end_id = end
        got = ours.generate(px, ids, mask, max_new_tokens=12, **kw)
    finally:
        ours.end_id = saved
    hids, hmask = hf_ids(hf, ids, mask)
    ref = hf.generate(pixel_values=px, input_ids=hids, attention_mask=hmask, max_new_tokens=12, do_sample=False,
                      eos_token_id=end, pad_token_id=ours.cfg.lm.pad_id, **kw)
    ref = ref[:, 1:] if ours.is_t5 else ref[:, hids.size(1):]  # new tokens only
    # HF fills the slots after a finished beam with EOS when pad id is 0 (`pad or eos`); we use the pad id
    ended = torch.cumsum((ref == end).long(), 1) - (ref == end).long() > 0
    ref = ref.masked_fill(ended, ours.cfg.lm.pad_id)
    assert got.tolist() == ref.tolist()
    print(kw, "ended rows:", (got == end).any(1).tolist())
    if kw["num_beams"] == 1:
        assert (got == end).any(), "no sequence ended: the test would not see the finishing rules"
    assert (got != end).all(dim=1).any() or got.size(1) < 12, "every sequence ended: no row hit the length limit"


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, length_penalty=-1.0, min_new_tokens=2),
                                dict(repetition_penalty=1.5), dict(do_sample=True, top_p=0.9)],
                         ids=["greedy", "beam", "repetition", "sampling"])
@torch.no_grad()
def test_cache_free_equals_cached(pair, kw):
    ours, _ = pair
    px = pixels(B=2, seed=6)
    ids, mask = prompts(ours, ["a photo of", ""])
    a = ours.generate(px, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(0), **kw)
    b = ours.generate(px, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(0), use_cache=False,
                      **kw)
    assert a.tolist() == b.tolist()


@torch.no_grad()
def test_sampling_is_seeded(pair):
    ours, _ = pair
    px = pixels(B=2, seed=7)
    run = lambda seed: ours.generate(px, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9,
                                     generator=torch.Generator().manual_seed(seed))
    assert run(0).tolist() == run(0).tolist()
    assert any(run(0).tolist() != run(s).tolist() for s in range(1, 5))


@torch.no_grad()
def test_caption_and_answer_return_text(pair):
    ours, _ = pair
    px = pixels(B=2, seed=8)
    caps = ours.caption(px, prompt="a photo of")
    ans = ours.answer(px, ["which city is this?", "what is it?"])
    assert len(caps) == 2 and len(ans) == 2 and all(isinstance(t, str) for t in caps + ans)


@pytest.mark.skipif(not ONEDNN, reason="needs oneDNN")
@torch.no_grad()
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_packed_bf16_is_the_same_model(kind, blip2_opt, blip2_t5):
    """pack() (sample.py: bf16 on the CPU) changes only the weights' layout: the same logits bit for bit, same ids."""
    folder = (blip2_opt if kind == "opt" else blip2_t5)[0]
    plain, packed = (Blip2.from_pretrained(folder, dtype=torch.bfloat16) for _ in range(2))
    pack(packed.lm)
    linears = [m for m in packed.lm.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.is_mkldnn for m in linears)
    px = pixels(B=2, seed=9).bfloat16()
    ids, mask = prompts(plain, ["a photo of", ""])
    embeds = torch.cat([plain.visual_prompt(px), plain.lm.embed(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, Q, dtype=torch.long), mask], 1)
    assert torch.equal(plain.lm.prefill(embeds, full_mask)[0], packed.lm.prefill(embeds, full_mask)[0])
    for kw in (dict(), dict(num_beams=3, length_penalty=-1.0)):
        a, b = (m.generate(px, ids, mask, max_new_tokens=8, **kw) for m in (plain, packed))
        assert a.tolist() == b.tolist()


def test_long_prompt_is_truncated_with_a_warning(blip2_opt):
    ours = Blip2.from_pretrained(blip2_opt[0])
    with pytest.warns(UserWarning, match="truncated"):
        ours.caption(pixels(B=1), prompt="a cat on a mat " * 40, max_new_tokens=3, num_beams=1)


def test_flan_t5_is_never_run_in_float16(blip2_t5, blip2_opt):
    with pytest.raises(CheckpointError, match="FlanT5 overflows in float16"):
        Blip2.from_pretrained(blip2_t5[0], dtype=torch.float16)
    with pytest.raises(ValueError, match="sampling with beams"):
        Blip2.from_pretrained(blip2_opt[0]).generate(pixels(B=1), do_sample=True, num_beams=2)


def test_bad_folders(blip2_opt, itm_folder, tmp_path):
    import json
    import shutil
    with pytest.raises(CheckpointError, match="tokenizer files missing"):
        bare = tmp_path / "bare"
        shutil.copytree(blip2_opt[0], bare)
        (bare / "tokenizer.json").unlink()
        Blip2.from_pretrained(str(bare))
    other = tmp_path / "llama"
    shutil.copytree(blip2_opt[0], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="language model 'llama' is not supported"):
        Blip2.from_pretrained(str(other))
