"""InstructBLIP with OPT and FlanT5: ours, loaded through Blip2.from_pretrained, vs transformers'
InstructBlipForConditionalGeneration (logits to 1e-5, greedy and beam ids exactly), the export round trip, and what the
Q-Former's instruction changes. The tiny InstructBLIPs are conftest's BLIP-2s with a random text branch added."""
import os
import re
import shutil

import pytest
import torch
from conftest import CAPTIONS, QFORMER, VISION, pixels, randomize, save, text_batch
from test_export import close, hf_ids, one_thread, same_state  # noqa: F401  (one_thread: an autouse fixture)

from nanoblip2 import Blip2
from nanoblip2.export import export_blip2, main
from nanoblip2.load import CheckpointError, read_config

transformers = pytest.importorskip("transformers")
Q = 5  # queries in the tiny models
PROMPTS = ["", "a photo of", "question: which city is this? answer:"]  # three lengths: padded LM prompts


def save_qformer_tokenizer(folder):
    """A BERT WordPiece over the captions' and prompts' words, written by transformers into qformer_tokenizer/, as
    InstructBlipProcessor.save_pretrained writes it."""
    from transformers import BertTokenizer
    text = " ".join(CAPTIONS + PROMPTS + ["Short answer what is on the beach"]).lower()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ":"] + sorted(set(re.findall(r"\w+", text)))
    assert len(vocab) < QFORMER["vocab_size"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(os.path.join(folder, "qformer_tokenizer"))


def instructblip(blip2, path, seed):
    """The BLIP-2 fixture's model as an InstructBlipForConditionalGeneration: the same tensors (the Q-Former's
    embedding LayerNorm moves under qformer.embeddings.), plus a random text branch (word and position embeddings,
    the text FFNs); its LM tokenizer, and a BERT one in qformer_tokenizer/."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    folder, blip2_hf = blip2
    c = blip2_hf.config
    cfg = InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER, text_config=c.text_config.to_dict(),
                             num_query_tokens=Q, image_token_index=c.image_token_index)
    torch.manual_seed(seed)
    hf = randomize(InstructBlipForConditionalGeneration(cfg), seed)
    rename = lambda k: k.replace("qformer.layernorm.", "qformer.embeddings.layernorm.")
    state = {rename(k): v for k, v in blip2_hf.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    text_branch = r"qformer\.(embeddings\.(word|position)_embeddings|encoder\.layer\.\d+\.(intermediate|output))\."
    assert not unexpected and missing and all(re.match(text_branch, k) for k in missing), (missing, unexpected)
    shutil.copy(os.path.join(folder, "tokenizer.json"), path / "tokenizer.json")
    save_qformer_tokenizer(path)
    return save(hf.eval(), path), hf


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, blip2_opt, blip2_t5, tmp_path_factory):
    """Ours loaded from the InstructBLIP folder, transformers' model, the folder, the BLIP-2 fixture it came from."""
    blip2 = blip2_opt if request.param == "opt" else blip2_t5
    folder, hf = instructblip(blip2, tmp_path_factory.mktemp(f"instructblip_{request.param}"), seed=11)
    return Blip2.from_pretrained(folder), hf, folder, blip2


def question(B=3, seed=1):
    """Random Q-Former ids with a different padding per row (0 = [PAD])."""
    return text_batch(QFORMER["vocab_size"], B=B, T=7, seed=seed)


def lm_prompts(ours, texts):
    return ours.tokenizer(texts, padding_side="right" if ours.is_t5 else "left")


@torch.no_grad()
def logits(ours, hf, px, qids, qmask, texts=PROMPTS):
    """Our logits and HF's on the same inputs: OPT's at the real tokens, T5's for a few decoder steps. qids None:
    ours without a question, against a BLIP-2 `hf`."""
    ids, mask = lm_prompts(ours, texts)
    hids, hmask = hf_ids(hf.config.image_token_index, ids, mask, left=not ours.is_t5)
    q = {} if qids is None else dict(qformer_input_ids=qids, qformer_attention_mask=qmask)
    embeds, full = ours.lm_inputs(px, ids, mask, **q)
    if ours.is_t5:
        dec = torch.tensor([[0, 7, 9, 11], [0, 5, 3, 1], [0, 4, 4, 4]])[:len(texts)]
        got, _ = ours.lm.decode(dec, ours.lm.encode(inputs_embeds=embeds, attention_mask=full), full)
        return got, hf(pixel_values=px, input_ids=hids, attention_mask=hmask, decoder_input_ids=dec, **q).logits
    order = torch.argsort(full, dim=1, stable=True)  # left padding before the queries, as HF
    embeds, full = embeds.gather(1, order[..., None].expand_as(embeds)), full.gather(1, order)
    got, _ = ours.lm(inputs_embeds=embeds, attention_mask=full)
    keep = hmask.bool()  # real tokens only
    return got[keep], hf(pixel_values=px, input_ids=hids, attention_mask=hmask, **q).logits[keep]


def hf_generate(ours, hf, px, ids, mask, qids, qmask, end, **kw):
    """HF's new token ids, padded after the end token with our pad id (HF pads with `pad or eos`)."""
    hids, hmask = hf_ids(hf.config.image_token_index, ids, mask, left=not ours.is_t5)
    ref = hf.generate(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=hids,
                      attention_mask=hmask, do_sample=False, eos_token_id=end, pad_token_id=ours.cfg.lm.pad_id, **kw)
    ref = ref[:, 1:] if ours.is_t5 else ref[:, hids.size(1):]
    ended = torch.cumsum((ref == end).long(), 1) - (ref == end).long() > 0
    return ref.masked_fill(ended, ours.cfg.lm.pad_id)


def test_logits_with_a_padded_instruction(pair):
    ours, hf, _, _ = pair
    assert ours.cfg.qformer.text and not ours.cfg.qformer.lm_head and ours.qformer_tokenizer is not None
    px, (qids, qmask) = pixels(B=3, seed=5), question()
    assert (qmask == 0).any()
    got, ref = logits(ours, hf, px, qids, qmask)
    close(got, ref, f"{'T5' if ours.is_t5 else 'OPT'} logits vs InstructBlipForConditionalGeneration")
    # the instruction matters: another one moves the logits far past the tolerance, so the parity above needs it read
    got2, ref2 = logits(ours, hf, px, question(seed=2)[0], qmask)
    assert (ref2 - ref).abs().max() > 1e-2 and (got2 - got).abs().max() > 1e-2
    close(got2, ref2, "another instruction")


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=5, length_penalty=-1.0)],
                         ids=["greedy", "beam3", "beam5"])
@torch.no_grad()
def test_generate_same_ids_as_hf(pair, kw):
    ours, hf, _, _ = pair
    px, (qids, qmask) = pixels(B=3, seed=5), question()
    ids, mask = lm_prompts(ours, PROMPTS)
    saved = ours.end_id
    try:  # random tiny LMs rarely say "\n": end at the third token the first row generates, as test_blip2 does
        ours.end_id = -1
        end = ours.end_id = ours.generate(px, ids, mask, qids, qmask, max_new_tokens=3, **kw)[0, 2].item()
        got = ours.generate(px, ids, mask, qids, qmask, max_new_tokens=12, **kw)
    finally:
        ours.end_id = saved
    ref = hf_generate(ours, hf, px, ids, mask, qids, qmask, end, max_new_tokens=12, **kw)
    assert got.tolist() == ref.tolist()
    if kw["num_beams"] == 1:
        assert (got == end).any() and (got != end).all(dim=1).any(), "want rows that end and rows that run on"


def test_answer_gives_the_question_to_the_qformer(pair, monkeypatch):
    """answer() tokenises its prompt for the Q-Former too: the ids transformers' own BERT tokenizer gives for it,
    and the answer HF's generate gives with them (beam 5, length penalty -1, at most 10 new tokens)."""
    from transformers import AutoTokenizer
    ours, hf, folder, _ = pair
    seen, generate = {}, ours.generate
    monkeypatch.setattr(ours, "generate", lambda *a, **k: seen.update(k, ids=generate(*a, **k)) or seen["ids"])
    px, questions = pixels(B=2, seed=8), ["what is on the beach?", "which city is this?"]
    answers = ours.answer(px, questions)
    texts = [("Question: {} Short answer:" if ours.is_t5 else "Question: {} Answer:").format(q) for q in questions]
    bert = AutoTokenizer.from_pretrained(os.path.join(folder, "qformer_tokenizer"))
    q = bert(texts, padding=True, return_tensors="pt")
    assert seen["qformer_input_ids"].tolist() == q.input_ids.tolist() and (q.attention_mask == 0).any()
    assert seen["qformer_attention_mask"].tolist() == q.attention_mask.tolist()
    ids, mask = lm_prompts(ours, texts)
    ref = hf_generate(ours, hf, px, ids, mask, q.input_ids, q.attention_mask, ours.end_id, num_beams=5,
                      max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
    assert seen["ids"].tolist() == ref.tolist()
    assert answers == [ours.tokenizer.decode(r).strip() for r in ref]


@torch.no_grad()
def test_without_a_question_it_is_the_plain_stage2_model(pair):
    """The text branch is used only for a question: without one, the model is the BLIP-2 it was made from (HF's
    logits to 1e-5). add_text_branch turns that BLIP-2 into this model, tensor for tensor."""
    from types import SimpleNamespace
    ours, _, _, (blip2_folder, blip2_hf) = pair
    plain = Blip2.from_pretrained(blip2_folder)
    assert not plain.cfg.qformer.text and plain.qformer_tokenizer is None
    px, (qids, qmask) = pixels(B=3, seed=5), question()
    assert torch.equal(ours.visual_prompt(px), plain.visual_prompt(px))
    close(*logits(ours, blip2_hf, px, None, None), "text branch, no question vs Blip2ForConditionalGeneration")
    assert (ours.visual_prompt(px, qids, qmask) - plain.visual_prompt(px)).abs().max() > 1e-2
    plain.add_text_branch(SimpleNamespace(qformer=ours.qformer), ours.qformer_tokenizer)
    same_state(plain, ours)
    assert plain.cfg == ours.cfg
    assert torch.equal(plain.visual_prompt(px, qids, qmask), ours.visual_prompt(px, qids, qmask))


def test_export_round_trip(pair, tmp_path):
    """Ours -> an InstructBlipForConditionalGeneration folder: transformers loads it with no missing or unexpected
    keys and gives the same logits; our loader reads it back tensor for tensor, both tokenizers included."""
    from transformers import InstructBlipForConditionalGeneration
    ours = pair[0]
    export_blip2(ours, str(tmp_path))
    d = read_config(str(tmp_path))
    kinds = d["model_type"], d["architectures"], d["qformer_config"]["model_type"], d["vision_config"]["model_type"]
    assert kinds == ("instructblip", ["InstructBlipForConditionalGeneration"], "instructblip_qformer",
                     "instructblip_vision_model")
    assert d["image_token_index"] == ours.cfg.image_token_index and "use_qformer_text_input" not in d["qformer_config"]
    assert sorted(os.listdir(tmp_path / "qformer_tokenizer")) == ["special_tokens_map.json", "tokenizer.json",
                                                                   "tokenizer_config.json"]
    hf, info = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    px, (qids, qmask) = pixels(B=3, seed=5), question()
    close(*logits(ours, hf.eval(), px, qids, qmask), "exported InstructBLIP vs ours")
    back = Blip2.from_pretrained(str(tmp_path))
    same_state(ours, back)
    assert back.cfg.qformer == ours.cfg.qformer
    text = ["Question: what is on the beach? Short answer:", "a cat"]
    assert back.qformer_tokenizer(text)[0].tolist() == ours.qformer_tokenizer(text)[0].tolist()
    assert back.tokenizer(text)[0].tolist() == ours.tokenizer(text)[0].tolist()


def test_processor_reads_the_exported_folder(pair, tmp_path):
    """AutoProcessor on an exported folder: an InstructBlipProcessor, Q <image> tokens then our LM ids, and our Q-Former
    ids."""
    from transformers import AutoProcessor, InstructBlipProcessor
    ours = Blip2.from_pretrained(pair[2])
    ours.cfg.image_token_index = None  # -> <image> = len(tokenizer), written into tokenizer.json
    export_blip2(ours, str(tmp_path))
    proc = AutoProcessor.from_pretrained(str(tmp_path))
    assert isinstance(proc, InstructBlipProcessor)
    text = "Question: what is on the beach? Short answer:"
    out = proc(images=(torch.rand(28, 28, 3) * 255).byte().numpy(), text=text, return_tensors="pt")
    assert out["input_ids"].tolist() == [[len(ours.tokenizer)] * Q + ours.tokenizer(text)[0][0].tolist()]
    assert out["qformer_input_ids"].tolist() == ours.qformer_tokenizer(text)[0].tolist()
    assert out["pixel_values"].shape == (1, 3, 28, 28)


def test_export_command_on_our_checkpoint(pair, tmp_path):
    """`python -m nanoblip2.export` (its main) on one of our stage-2 checkpoints whose Q-Former reads the instruction
    (the frozen ViT and LM in the BLIP-2 folder, the Q-Former's tokenizer named in config.json): an InstructBLIP
    folder, the same logits in transformers."""
    from transformers import InstructBlipForConditionalGeneration
    from nanoblip2.checkpoint import save_checkpoint
    ours, _, folder, (blip2_folder, _) = pair
    config = {"nanoblip2": "stage2", "model": ours.cfg.to_dict(), "frozen": {"vit": blip2_folder, "lm": blip2_folder},
              "qformer_tokenizer": os.path.join(folder, "qformer_tokenizer")}
    trained = {k: v for k, v in ours.state_dict().items() if not k.startswith(("vit.", "lm."))}
    save_checkpoint(str(tmp_path / "ckpt"), trained, config, {})
    ckpt = Blip2.from_pretrained(str(tmp_path / "ckpt"))
    same_state(ours, ckpt)
    main([str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert read_config(str(tmp_path / "hf"))["model_type"] == "instructblip"
    assert os.path.isfile(tmp_path / "hf" / "qformer_tokenizer" / "tokenizer.json")
    hf = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    close(*logits(ours, hf, pixels(B=3, seed=5), *question()), "our checkpoint, exported by the command")


def test_vicuna_instructblip_is_refused(tmp_path):
    from transformers import InstructBlipConfig
    llama = dict(model_type="llama", vocab_size=99, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=3)
    InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER, text_config=llama, num_query_tokens=Q
                       ).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as e:
        Blip2.from_pretrained(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: language model 'llama' is not supported (OPT or T5 only); Vicuna-based "
                            "InstructBLIP needs a LLaMA decoder, which nanoblip2 does not have")
