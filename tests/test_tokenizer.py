"""Q-Former tokenizer vs transformers' BertTokenizer (tokenizers-backed) and BertTokenizerLegacy (the pure-Python one
LAVIS ran with), on a tiny WordPiece vocab trained here. Offline, ~1 s plus the transformers import."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from nanoblip2.tokenizer import load_bert_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import BertTokenizer  # noqa: E402  (BertTokenizerFast is the same class in transformers 5)

try:
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
except ImportError:  # transformers 4 calls the slow one BertTokenizer
    from transformers import BertTokenizer as BertTokenizerLegacy

CORPUS = [
    "A man riding a horse on the beach.", "Two dogs are playing with a red ball in the park!",
    "The cat sat on the mat, looking at the birds.", "A group of people standing around a table with food.",
    "A woman is holding an umbrella in the rain.", "Three children playing soccer on a green field.",
    "A plate of pasta with tomatoes and cheese.", "An old red bus parked next to the street.",
    "Someone's bicycle leaning against a wall.", "The sun sets behind the mountains; the sky is orange.",
    "A small boat floating on a calm lake?", "Two people walking their dog along the river.",
    "A kitchen with white cabinets and a large window.", "A train is passing through the station.",
    "A young girl eating an ice cream cone.", "The computer monitor sits on a wooden desk.",
    "A bird perched on a branch of a tree.", "Many cars are stuck in traffic on the highway.",
    "A pizza with pepperoni, olives and mushrooms.", "A dog catching a frisbee in the air.",
    "Men playing baseball in a stadium.", "A bowl of fruit: apples, bananas and oranges.",
    "Snow covers the roofs of the houses.", "A cat sleeping on a laptop keyboard.",
]
TEXTS = [
    "A man riding a horse on the beach.",
    "Héllo, WORLD!! Naïve café -- Ångström's déjà vu?",  # case, punctuation, accents
    "zyxq quokka ßø € 中文字 🙂 don't",  # unknown words and characters, Chinese, emoji
    "x" * 101 + " a dog",  # a word over 100 characters is one [UNK]
    "a [SEP] cat [DEC] with [CLS] literal [MASK] special tokens",
    "  tabs\tand\nnewlines \u00a0 and\u200b zero-width ",
    "",
    "A bowl of fruit: apples, bananas and oranges. Two dogs are playing with a red ball in the park!",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders in the layouts we load: vocab.txt alone, HF's tokenizer.json without and with [DEC],
    a cased vocab.txt + tokenizer_config.json, and a vocab.txt that already has [DEC] (id 5)."""
    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=False)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(CORPUS + [s.lower() for s in CORPUS],
                           trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS))
    tokens = [t for t, _ in sorted(tk.get_vocab().items(), key=lambda kv: kv[1])]
    assert tokens[:5] == SPECIALS and any(t.startswith("##") for t in tokens)

    root = tmp_path_factory.mktemp("tok")
    f = {name: root / name for name in ("vocab", "json", "json_dec", "cased", "dec_in_vocab")}
    for path in f.values():
        path.mkdir()
    for name in ("vocab", "cased"):
        (f[name] / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    (f["cased"] / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    (f["dec_in_vocab"] / "vocab.txt").write_text("".join(t + "\n" for t in SPECIALS + ["[DEC]"] + tokens[5:]))
    hf = BertTokenizer.from_pretrained(f["vocab"])
    hf.save_pretrained(f["json"])
    hf.add_special_tokens({"bos_token": "[DEC]"})
    hf.save_pretrained(f["json_dec"])
    for name in ("json", "json_dec"):  # keep only tokenizer.json, so the file itself carries everything
        for p in f[name].iterdir():
            if p.name != "tokenizer.json":
                p.unlink()
    return f, len(tokens)


def reference(folder, kind):
    """The LAVIS recipe: BertTokenizer(truncation_side="right") + add_special_tokens({"bos_token": "[DEC]"})."""
    lower = folder.name != "cased"
    if kind == "fast":
        hf = BertTokenizer.from_pretrained(folder, truncation_side="right", do_lower_case=lower)
    else:
        hf = BertTokenizerLegacy(str(folder / "vocab.txt"), truncation_side="right", do_lower_case=lower)
    hf.add_special_tokens({"bos_token": "[DEC]"})
    return hf


CASES = [("vocab", "fast"), ("vocab", "legacy"), ("cased", "fast"), ("cased", "legacy"), ("json", "fast"),
         ("json_dec", "fast"), ("dec_in_vocab", "fast"), ("dec_in_vocab", "legacy")]


@pytest.mark.parametrize("name,kind", CASES)
@pytest.mark.parametrize("padding,max_length,truncation", [
    ("longest", 32, True), ("longest", 12, True), ("max_length", 40, True), ("max_length", 9, True),
    ("longest", 8, False)])
def test_ids_and_mask_match_hf(folders, name, kind, padding, max_length, truncation):
    f, _ = folders
    hf = reference(f[name], kind)
    tok = load_bert_tokenizer(f[name])
    ids, mask = tok(TEXTS, max_length=max_length, padding=padding, truncation=truncation)
    ref = hf(TEXTS, max_length=max_length, padding=padding, truncation=truncation, return_tensors="pt")
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == ref["input_ids"].tolist()
    assert mask.tolist() == ref["attention_mask"].tolist()
    # and per text, without padding (catches a padding bug that also hides in the reference call)
    for text, row, m in zip(TEXTS, ids, mask):
        assert row[m.bool()].tolist() == hf(text, max_length=max_length, truncation=truncation)["input_ids"]


def test_unknowns_lowercase_and_accents(folders):
    f, _ = folders
    tok = load_bert_tokenizer(f["vocab"])
    unk = tok.token_id("[UNK]")
    ids, _ = tok(["A MAN", "á man", "x" * 101, "x" * 100 + " €"], max_length=128)
    assert ids[0].tolist() == ids[1].tolist()  # lowercased and accent-stripped: "A" == "á" == "a"
    assert ids[2].tolist()[:3] == [tok.cls_id, unk, tok.sep_id]  # > 100 characters: one [UNK]
    assert ids[3].tolist()[-2:] == [unk, tok.sep_id] and unk not in ids[3].tolist()[1:-2]  # 100 is still split
    cased = load_bert_tokenizer(f["cased"])
    a, _ = cased(["A man", "a man"])
    assert a[0].tolist() != a[1].tolist()


def test_truncation_keeps_sep_and_padding_sides(folders):
    f, _ = folders
    tok = load_bert_tokenizer(f["vocab"])
    long = " ".join(CORPUS)
    ids, mask = tok([long, "a cat"], max_length=10, padding="longest")
    assert ids.shape == (2, 10) and mask[0].all()
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id and tok.sep_id not in ids[0, :-1].tolist()
    full, _ = tok([long], max_length=10, truncation=False)
    assert full.shape[1] > 10 and full[0, 1:9].tolist() == ids[0, 1:9].tolist()  # right truncation: keeps the start
    # left padding (for the decoder-only LMs later): same tokens, pads moved to the front
    left, lmask = tok([long, "a cat"], max_length=10, padding_side="left")
    hf = reference(f["vocab"], "fast")
    hf.padding_side = "left"
    ref = hf([long, "a cat"], max_length=10, padding="longest", truncation=True)
    assert left.tolist() == ref["input_ids"] and lmask.tolist() == ref["attention_mask"]
    with pytest.raises(ValueError):
        tok(["a"], padding="do_not_pad")


def test_special_ids(folders):
    f, n_vocab = folders
    for name in ("vocab", "json", "json_dec", "cased"):
        tok, hf = load_bert_tokenizer(f[name]), reference(f[name], "fast")
        assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.eos_id) == (0, 2, 3, 3)
        assert (tok.pad_id, tok.cls_id, tok.sep_id) == (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id)
        assert tok.bos_id == hf.bos_token_id == n_vocab  # [DEC] = the next id after the vocabulary, like 30522
        assert len(tok) == len(hf) == n_vocab + 1
    tok = load_bert_tokenizer(f["dec_in_vocab"])  # the folder already knows [DEC]: reuse its id
    assert tok.bos_id == reference(f["dec_in_vocab"], "legacy").bos_token_id == 5
    assert len(tok) == n_vocab + 1


@pytest.mark.parametrize("name", ["vocab", "json_dec"])
def test_decode(folders, name):
    f, _ = folders
    tok, hf = load_bert_tokenizer(f[name]), reference(f[name], "fast")
    legacy = reference(f["vocab"], "legacy")
    ids, _ = tok(TEXTS + ["a man's dog isn't here , it 's x ' y ."], padding="longest")
    # HF defaults to skip_special_tokens=False, we to True. Clean-up as the slow BertTokenizer (LAVIS) does it;
    # transformers 5's BertTokenizer only cleans up with clean_up_tokenization_spaces=True (default False there).
    hf.clean_up_tokenization_spaces = True
    for skip in (True, False):
        assert tok.batch_decode(ids, skip) == legacy.batch_decode(ids, skip_special_tokens=skip)
        assert tok.batch_decode(ids, skip) == hf.batch_decode(ids, skip_special_tokens=skip)
    assert tok.batch_decode(ids)[-1] == "a man's dog isn't here, it's x'y."
    assert [tok.decode(row) for row in ids] == tok.batch_decode(ids)
    assert tok.decode(ids[0].tolist()) == "a man riding a horse on the beach."  # round trip, lowercased
    text = "two dogs are playing with a red ball, someone's cat sat on the mat!"
    assert tok.decode(tok([text])[0][0]) == text


def test_missing_files_name_the_folder(tmp_path):
    for folder in (tmp_path, tmp_path / "does_not_exist"):
        with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt") as err:
            load_bert_tokenizer(folder)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
