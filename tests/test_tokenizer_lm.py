"""OPT and T5 tokenizers vs transformers' GPT2Tokenizer (with OPT's settings) and T5TokenizerFast, on a tiny byte-level
BPE and a tiny Unigram trained here. Offline, ~1 s plus the transformers import."""

import json

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoblip2.tokenizer import load_opt_tokenizer, load_t5_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import GPT2Tokenizer, T5TokenizerFast  # noqa: E402  (OPT's AutoTokenizer class is GPT2Tokenizer)

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
    "Question: which city is this? Answer: singapore", "Question: what is the man holding? Short answer: a kite",
    "a photo of a café in Paris, déjà vu", "A statue of a mermaid spraying water into the air.",
    "The merlion fountain in singapore.", "Marina Bay Sands at night, with lights on the water.",
]
TEXTS = [
    "A man riding a horse on the beach.\n",
    " a leading space,  two  spaces and a trailing one \n",
    "Héllo, WORLD!! Naïve café -- Ångström's déjà vu?",
    "zyxq quokka ßø € 中文字 🙂 don't\n\n",
    "tabs\tand\r\nwindows newlines",
    "literal </s> and <pad> and <s> and <unk> tokens",
    "a <image> b<image>c",  # one token where <image> is an added token, BPE pieces elsewhere
    "Question: which city is this? Answer:",
    "",
    "\n",
    " ".join(CORPUS[:6]) + "\n",
]
OPT_CONFIG = {"errors": "replace", "unk_token": "</s>", "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
              "add_prefix_space": False, "add_bos_token": True, "tokenizer_class": "GPT2Tokenizer"}  # facebook/opt-*
OPT_SPECIAL_MAP = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
OPT_KWARGS = {k: OPT_CONFIG[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token", "add_bos_token")}
GRID = [("longest", 64, True), ("longest", 9, True), ("max_length", 80, True), ("max_length", 6, True),
        ("longest", 5, False)]


def write(folder, name, obj):
    (folder / name).write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """OPT tokenizer folders, each with its transformers reference:
    vocab       vocab.json + merges.txt + OPT's tokenizer_config.json and special_tokens_map.json (facebook/opt-*)
    bare        vocab.json + merges.txt alone (OPT's special tokens are our defaults, and HF is told them)
    image       vocab + added_tokens.json {"<image>": next id} (the 2024 Salesforce/blip2-opt-* uploads)
    hf_saved    what transformers 5 writes for `image`: tokenizer.json + tokenizer_config.json without add_bos_token
    v4_config   image + a transformers-4 style config: AddedToken dicts and added_tokens_decoder, <image> special
    raw         tokenizer.json straight from `tokenizers`: no BOS post-processor, <s> and <unk> special
    prefix      vocab with add_prefix_space: true
    no_bos      vocab with add_bos_token: false"""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    lines = [c + "\n" for c in CORPUS] + [c.lower() + "\n" for c in CORPUS]
    tk.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    n_vocab = tk.get_vocab_size()
    assert [tk.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert n_vocab - 260 > 300 and tk.token_to_id("Ċ") is not None  # a few hundred merges, "\n" is a byte token

    root = tmp_path_factory.mktemp("opt")
    f = {name: root / name for name in ("vocab", "bare", "image", "hf_saved", "raw", "prefix", "no_bos", "v4_config")}
    for path in f.values():
        path.mkdir()
    tk.save(str(f["raw"] / "tokenizer.json"))
    for name in ("vocab", "bare", "image", "prefix", "no_bos", "v4_config"):
        tk.model.save(str(f[name]))  # vocab.json + merges.txt
    for name, extra in (("vocab", {}), ("image", {}), ("prefix", {"add_prefix_space": True}),
                        ("no_bos", {"add_bos_token": False})):
        write(f[name], "tokenizer_config.json", {**OPT_CONFIG, **extra})
        write(f[name], "special_tokens_map.json", OPT_SPECIAL_MAP)
    write(f["image"], "added_tokens.json", {"<image>": n_vocab})
    token = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True, "rstrip": False,
             "single_word": False}
    decoder = {i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                   "special": True} for i, t in ((1, "<pad>"), (2, "</s>"), (n_vocab, "<image>"))}
    write(f["v4_config"], "tokenizer_config.json", {**OPT_CONFIG, "bos_token": token, "eos_token": token,
                                                    "unk_token": token, "added_tokens_decoder": decoder})
    write(f["v4_config"], "special_tokens_map.json", OPT_SPECIAL_MAP)
    write(f["v4_config"], "added_tokens.json", {"<image>": n_vocab})
    hf = GPT2Tokenizer.from_pretrained(f["vocab"])
    hf.add_tokens([AddedToken("<image>", normalized=False, special=True)])
    hf.save_pretrained(f["hf_saved"])
    assert not (f["hf_saved"] / "vocab.json").exists() and (f["hf_saved"] / "tokenizer.json").exists()
    return f, n_vocab


def opt_reference(folder):
    if folder.name in ("bare", "raw"):  # no config in the folder: tell HF what OPT's says
        return GPT2Tokenizer.from_pretrained(folder, **OPT_KWARGS)
    return GPT2Tokenizer.from_pretrained(folder)


OPT_FOLDERS = ["vocab", "bare", "image", "hf_saved", "raw", "prefix", "no_bos", "v4_config"]


@pytest.mark.parametrize("name", OPT_FOLDERS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding,max_length,truncation", GRID)
def test_opt_ids_and_mask_match_hf(opt, name, side, padding, max_length, truncation):
    f, _ = opt
    hf, tok = opt_reference(f[name]), load_opt_tokenizer(f[name])
    hf.padding_side = side
    ids, mask = tok(TEXTS, max_length=max_length, padding=padding, truncation=truncation, padding_side=side)
    ref = hf(TEXTS, max_length=max_length, padding=padding, truncation=truncation, return_tensors="pt")
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == ref["input_ids"].tolist()
    assert mask.tolist() == ref["attention_mask"].tolist()
    for text, row, m in zip(TEXTS, ids, mask):  # per text, unpadded
        assert row[m.bool()].tolist() == hf(text, max_length=max_length, truncation=truncation)["input_ids"]


def test_opt_bos_padding_and_truncation(opt):
    f, _ = opt
    tok = load_opt_tokenizer(f["vocab"])
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (1, 2, 2)
    ids, mask = tok(["a dog\n", TEXTS[-1]], max_length=8, padding="longest")
    assert ids.shape == (2, 8) and ids[:, 0].tolist() == [2, 2]  # BOS </s> first, no EOS appended
    assert ids[0, mask[0].sum() - 1] == tok.newline_id and ids[0, mask[0].sum():].eq(1).all()  # right pads are 1
    full, _ = tok([TEXTS[-1]], truncation=False)
    assert full.shape[1] > 8 and full[0, :8].tolist() == ids[1].tolist()  # right truncation keeps the start and BOS
    left, lmask = tok(["a dog\n", TEXTS[-1]], max_length=8, padding_side="left")
    n = int(mask[0].sum())
    assert left[0, -n:].tolist() == ids[0, :n].tolist() and left[0, :-n].eq(1).all() and lmask[0, :-n].eq(0).all()
    assert load_opt_tokenizer(f["no_bos"])(["a dog"])[0][0, 0] != 2
    assert load_opt_tokenizer(f["raw"])(["a dog"])[0][0, 0] == 2  # BOS even though the file's pipeline has none


@pytest.mark.parametrize("name", OPT_FOLDERS)
def test_opt_special_ids_newline_and_length(opt, name):
    f, n_vocab = opt
    hf, tok = opt_reference(f[name]), load_opt_tokenizer(f[name])
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (1, 2, 2)
    assert len(tok) == len(hf) == n_vocab + (name in ("image", "hf_saved", "v4_config"))
    # "\n" is the byte-level token "Ċ": the generation end token, as 50118 is in OPT
    assert tok.newline_id == tok.token_id("Ċ") == hf.convert_tokens_to_ids("Ċ")
    assert hf("a dog\n", add_special_tokens=False)["input_ids"][-1] == tok.newline_id
    assert tok(["a dog\n"])[0][0, -1] == tok.newline_id != tok(["a dog"])[0][0, -1]
    if name != "prefix":  # with add_prefix_space "\n" alone is "Ġ", "Ċ"
        assert [tok.newline_id] == hf("\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(KeyError):
        tok.token_id("\n")


@pytest.mark.parametrize("name", ["image", "hf_saved", "v4_config"])
def test_opt_added_image_token(opt, name):
    f, n_vocab = opt
    hf, tok = opt_reference(f[name]), load_opt_tokenizer(f[name])
    assert tok.token_id("<image>") == hf.convert_tokens_to_ids("<image>") == n_vocab
    ids, _ = tok(["a <image> b<image>c"])
    assert ids[0].tolist() == hf("a <image> b<image>c")["input_ids"]
    assert ids[0].tolist().count(n_vocab) == 2
    for skip in (True, False):  # special in hf_saved (skipped), a plain added token from added_tokens.json
        assert tok.decode(ids[0], skip) == hf.decode(ids[0], skip_special_tokens=skip)
    assert ("<image>" in tok.decode(ids[0])) == (name == "image")
    plain, _ = load_opt_tokenizer(f["vocab"])(["a <image> b<image>c"])
    assert plain.shape[1] > ids.shape[1]  # without the added token, "<image>" is BPE pieces


def test_opt_added_token_with_wrong_id_raises(opt, tmp_path):
    f, n_vocab = opt
    for p in f["image"].iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    write(tmp_path, "added_tokens.json", {"<image>": n_vocab + 5})
    with pytest.raises(ValueError, match="<image>"):
        load_opt_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["vocab", "hf_saved", "raw"])
def test_opt_decode(opt, name):
    f, _ = opt
    hf, tok = opt_reference(f[name]), load_opt_tokenizer(f[name])
    ids, _ = tok(TEXTS + ["hello . world ! it 's a dog , isn't it ?"], max_length=128)
    for skip in (True, False):
        assert tok.batch_decode(ids, skip) == hf.batch_decode(ids, skip_special_tokens=skip)
    assert tok.batch_decode(ids)[-1] == "hello . world ! it 's a dog , isn't it ?"  # no clean-up of spaces
    for text in TEXTS:  # byte-level BPE is lossless
        if "<image>" not in text and "</s>" not in text:
            assert tok.decode(tok([text], max_length=128)[0][0]) == text
    emoji = tok(["🙂"], max_length=128)[0][0].tolist()
    assert len(emoji) > 2  # BOS + several byte tokens; a cut character becomes U+FFFD, as in HF
    assert tok.decode(emoji[:2]) == hf.decode(emoji[:2], skip_special_tokens=True) == "\ufffd"


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """T5 tokenizer.json files laid out as google/flan-t5-*'s: <pad> <\\s> <unk> at 0 1 2, the sentencepiece pieces,
    then <extra_id_99> ... <extra_id_0> in the vocab and as special added tokens. `nopost` has no post-processor."""
    tk = HFTokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(CORPUS + [c.lower() for c in CORPUS], trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    assert [tk.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    root = tmp_path_factory.mktemp("t5")
    f = {name: root / name for name in ("nopost", "t5")}  # in this order: t5 gets the post-processor
    for name, path in f.items():
        path.mkdir()
        if name == "t5":
            tk.post_processor = processors.TemplateProcessing(
                single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
        tk.save(str(path / "tokenizer.json"))
        j = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        n = len(j["model"]["vocab"])
        for k, i in enumerate(range(99, -1, -1)):
            j["model"]["vocab"].append([f"<extra_id_{i}>", 0.0])
            j["added_tokens"].append({"id": n + k, "content": f"<extra_id_{i}>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
        write(path, "tokenizer.json", j)
    assert n > 150 and [json.loads((f[name] / "tokenizer.json").read_text())["post_processor"] is None
                        for name in ("nopost", "t5")] == [True, False]
    return f, n


T5_TEXTS = TEXTS[:6] + [
    "a <extra_id_0> b</s>c <unk> d",
    "hello . world ! it 's a dog , isn't it ?",
    "Question: which city is this? Answer:",
    "", "   ", "\n",
    " ".join(CORPUS[:6]),
]


def t5_reference(folder, how):
    if how == "file":  # the brief's reference: the file's whole pipeline, T5's post-processor
        return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return T5TokenizerFast.from_pretrained(folder)  # transformers 5 rebuilds the pipeline around the file's vocab


@pytest.mark.parametrize("name", ["t5", "nopost"])
@pytest.mark.parametrize("how", ["file", "pretrained"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding,max_length,truncation", GRID)
def test_t5_ids_and_mask_match_hf(t5, name, how, side, padding, max_length, truncation):
    f, _ = t5
    hf, tok = t5_reference(f[name], how), load_t5_tokenizer(f[name])
    hf.padding_side = side
    ids, mask = tok(T5_TEXTS, max_length=max_length, padding=padding, truncation=truncation, padding_side=side)
    ref = hf(T5_TEXTS, max_length=max_length, padding=padding, truncation=truncation, return_tensors="pt")
    assert ids.tolist() == ref["input_ids"].tolist()
    assert mask.tolist() == ref["attention_mask"].tolist()
    for text, row, m in zip(T5_TEXTS, ids, mask):
        assert row[m.bool()].tolist() == hf(text, max_length=max_length, truncation=truncation)["input_ids"]


@pytest.mark.parametrize("name", ["t5", "nopost"])
def test_t5_special_ids_eos_and_decode(t5, name):
    f, n = t5
    tok = load_t5_tokenizer(f[name])
    for how in ("file", "pretrained"):
        hf = t5_reference(f[name], how)
        assert (tok.pad_id, tok.eos_id, tok.token_id("<unk>")) == (hf.pad_token_id, hf.eos_token_id,
                                                                   hf.unk_token_id) == (0, 1, 2)
        assert len(tok) == len(hf) == n + 100 and tok.token_id("<extra_id_0>") == n + 99
        ids, _ = tok(T5_TEXTS, max_length=128)
        for skip in (True, False):
            assert tok.batch_decode(ids, skip) == hf.batch_decode(ids, skip_special_tokens=skip)
    assert tok.bos_id is None and tok.newline_id is None
    ids, mask = tok(["a dog", "", TEXTS[-1]], max_length=8)
    assert ids[0, mask[0].sum() - 1] == 1 and ids[1, 0] == 1 and ids[2, -1] == 1  # </s> last, also when truncated
    assert ids[0, mask[0].sum():].eq(0).all()
    assert tok.decode(tok(["A man riding a horse on the beach."])[0][0]) == "A man riding a horse on the beach."
    assert tok.decode(tok(["hello . world !"])[0][0]) == "hello . world !"  # no clean-up of spaces


def test_missing_files_name_the_folder(opt, t5, tmp_path):
    for folder in (tmp_path, tmp_path / "does_not_exist"):
        with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json \\+ merges.txt") as err:
            load_opt_tokenizer(folder)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
            load_t5_tokenizer(folder)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_opt_tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x00")  # a sentencepiece model alone is not enough
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*spiece.model") as err:
        load_t5_tokenizer(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="Unigram"):  # the wrong loader for the folder
        load_t5_tokenizer(opt[0]["hf_saved"])
    with pytest.raises(ValueError, match="BPE"):
        load_opt_tokenizer(t5[0]["t5"])
