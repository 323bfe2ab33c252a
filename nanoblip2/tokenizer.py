r"""
Tokenizers, as thin wrappers over the `tokenizers` library (no transformers at runtime).

Q-Former: BERT WordPiece (`bert-base-uncased`) plus a `[DEC]` BOS token, as LAVIS `Blip2Base.init_tokenizer`
(lavis/models/blip2_models/blip2.py:31-34): `BertTokenizer.from_pretrained("bert-base-uncased",
truncation_side="right")`, then `add_special_tokens({"bos_token": "[DEC]"})`. HF: models/bert/tokenization_bert.py.

Notable details:
- `[DEC]` takes the next free id (30522, hence the Q-Former's 30523 embedding rows), or keeps the one a saved
  vocabulary gives it. It is never inserted: LAVIS's ITG swaps the `[CLS]` at position 0 for `bos_id` by hand.
- `tokenizer.json` wins over `vocab.txt`, from which HF's pipeline is rebuilt. Lowercasing (`tokenizer_config.json`
  `do_lower_case`, default True) also strips accents unless `strip_accents` says otherwise: "Café" -> "cafe". A word
  over 100 characters becomes `[UNK]`.
- Special tokens are "added tokens": a literal "[SEP]" or "[DEC]" in a caption is that one token, as in HF.
- Truncation is on the right and keeps the final `[SEP]` (the text is cut to `max_length - 2` tokens). Padding is on
  the right with `[PAD]` = 0 unless `padding_side="left"`. A `tokenizer.json`'s own padding/truncation is cleared.
- `decode` follows LAVIS's (slow, transformers 4) BertTokenizer: skips special tokens, then HF's `clean_up_tokenization`
  on the joined string ("man ' s" -> "man's"), which the `tokenizers` decoder and transformers 5 (by default) skip.

OPT: GPT-2 byte-level BPE, as `AutoTokenizer.from_pretrained("facebook/opt-2.7b", use_fast=False)` in LAVIS
`Blip2OPT.__init__` (lavis/models/blip2_models/blip2_opt.py:91-93). HF: models/gpt2/tokenization_gpt2.py.
- Every text gets the BOS `</s>` (id 2) in front (`add_bos_token`, True unless `tokenizer_config.json` says otherwise:
  transformers 5 no longer writes it) and no EOS at the end. Pad is `<pad>` = 1, unk is also `</s>`.
- Generation ends on "\n", whose vocabulary string is "Ċ" (byte-level BPE maps each byte to a printable character):
  `token_id("\n")` fails; `tok.newline_id` = `token_id("Ċ")` (50118 in OPT) is the token a final "\n" becomes.
- Vocabulary, merges and added tokens come from the files; the pipeline is GPT2Tokenizer's, whatever a
  `tokenizer.json` says. `add_prefix_space` defaults to False: a leading space is part of the first word ("Ġa" != "a").
- Added tokens keep their files' ids (`added_tokens.json`, `tokenizer_config.json`'s `added_tokens_decoder`, or
  `tokenizer.json`'s `added_tokens`): `<image>` = 50265 in the 2024 Salesforce/blip2-opt-* uploads. Special are
  bos/eos/unk/pad and what the files mark special: with OPT's files a literal "<s>" is three BPE pieces, "</s>" one.
- `decode` does no space clean-up (transformers refuses to for BPE); a cut multi-byte character reads as U+FFFD.

T5: SentencePiece Unigram, as `T5TokenizerFast.from_pretrained("google/flan-t5-xl")` in LAVIS `Blip2T5.__init__`
(lavis/models/blip2_models/blip2_t5.py). HF: models/t5/tokenization_t5.py.
- Needs `tokenizer.json` (flan-t5 repos ship one): `spiece.model` needs protobuf or sentencepiece, `from_spm` too.
- The file's pipeline is used as it is (flan-t5: Precompiled normalizer, WhitespaceSplit + Metaspace "▁"), as
  transformers 4's T5TokenizerFast did (5 rebuilds the same); `</s>` (id 1) is appended even without a post-processor.
- `<pad>` = 0 is also the decoder start id; unk is `<unk>` = 2; no BOS (`bos_id` is None). `<extra_id_*>` sentinels
  are special (skipped by `decode`). No space clean-up, like transformers 5 (4, which LAVIS ran, glued " ." to ".").
"""

import json
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from .load import CheckpointError, reading


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the models need. Shared by the BERT, OPT and T5 loaders."""

    def __init__(self, tk: HFTokenizer, pad: str, bos: str | None, eos: str, cls: str | None = None,
                 clean_up_spaces: bool = False):
        tk.no_padding()
        tk.no_truncation()
        self.tk, self.clean_up_spaces = tk, clean_up_spaces
        self.pad_id, self.eos_id = self.token_id(pad), self.token_id(eos)
        self.bos_id = self.token_id(bos) if bos is not None else None  # T5 has none
        self.cls_id = self.token_id(cls) if cls is not None else None
        self.sep_id = self.eos_id  # BERT's name for the end token
        self.newline_id = None  # OPT's generation end token, set by load_opt_tokenizer

    def token_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str] | str, max_length: int = 32, padding: str = "longest",
                 truncation: bool = True, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids, attention_mask), both LongTensor (B, T)."""
        if padding not in ("longest", "max_length") or padding_side not in ("left", "right"):
            raise ValueError(f"padding={padding!r}, padding_side={padding_side!r}: want longest|max_length, left|right")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if truncation:  # counts the special tokens the post-processor adds, so [SEP] survives
            self.tk.enable_truncation(max_length, direction="right")
        else:
            self.tk.no_truncation()
        seqs = [enc.ids for enc in self.tk.encode_batch(texts)]
        T = max([len(s) for s in seqs] + [max_length if padding == "max_length" else 0])
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(0, len(s)) if padding_side == "right" else slice(T - len(s), T)
            input_ids[i, span] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = self.tk.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_spaces(text) if self.clean_up_spaces else text

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in ids]


def clean_up_spaces(text: str) -> str:
    """HF's `clean_up_tokenization`: glue punctuation and English contractions back onto the previous word."""
    for spaced, glued in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, glued)
    return text


def load_bert_tokenizer(folder: str | Path) -> Tokenizer:
    """The Q-Former tokenizer from a folder with `tokenizer.json` or `vocab.txt` (+ `tokenizer_config.json`)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tk = from_file(folder / "tokenizer.json")
    elif (folder / "vocab.txt").is_file():
        cfg = read_json(folder / "tokenizer_config.json")
        with reading(folder / "vocab.txt"):
            tokens = (folder / "vocab.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")
        vocab = {token: i for i, token in enumerate(tokens)}  # id = line number, as HF's load_vocab
        tk = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(
            lowercase=cfg.get("do_lower_case", True), strip_accents=cfg.get("strip_accents"))
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        tk.decoder = decoders.WordPiece(prefix="##")
        tk.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])  # already in vocab: ids unchanged
    else:
        raise FileNotFoundError(f"no BERT tokenizer in {folder}: looked for tokenizer.json or vocab.txt")
    tk.add_special_tokens(["[DEC]"])  # next free id unless the vocabulary already has it
    return Tokenizer(tk, pad="[PAD]", bos="[DEC]", eos="[SEP]", cls="[CLS]", clean_up_spaces=True)


def read_json(path: Path) -> dict:
    with reading(path):
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def from_file(path: Path) -> HFTokenizer:
    with reading(path):
        return HFTokenizer.from_file(str(path))


def load_opt_tokenizer(folder: str | Path) -> Tokenizer:
    """The OPT tokenizer from `tokenizer.json` or `vocab.json` + `merges.txt`, with the optional configs' tokens."""
    folder = Path(folder)
    cfg = {**read_json(folder / "special_tokens_map.json"), **read_json(folder / "tokenizer_config.json")}
    if (folder / "tokenizer.json").is_file():
        tk = from_file(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        with reading(folder / "vocab.json + merges.txt"):
            tk = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    else:
        raise FileNotFoundError(f"no OPT tokenizer in {folder}: looked for tokenizer.json or vocab.json + merges.txt")
    if not isinstance(tk.model, models.BPE):
        raise CheckpointError(f"{folder}/tokenizer.json is a {type(tk.model).__name__}, not OPT's byte-level BPE")
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=cfg.get("add_prefix_space", False))
    tk.decoder = decoders.ByteLevel()

    # added tokens (<image>), lowest id first, so each lands on the id its file gives it
    added = {int(i): AddedToken(**{k: v for k, v in t.items() if k != "__type"})
             for i, t in cfg.get("added_tokens_decoder", {}).items()}
    for content, i in read_json(folder / "added_tokens.json").items():
        added.setdefault(int(i), AddedToken(content, normalized=False, special=False))
    for i, token in sorted(added.items()):
        tk.add_tokens([token])
        if tk.token_to_id(token.content) != i:
            raise CheckpointError(f"{folder}: added token {token.content!r} should have id {i}, "
                                  f"got {tk.token_to_id(token.content)}")

    def name(key):  # a string or, in older configs, an AddedToken dict; OPT's tokens by default
        value = cfg.get(f"{key}_token", "<pad>" if key == "pad" else "</s>")
        return value["content"] if isinstance(value, dict) else value
    bos, eos, unk, pad = map(name, ("bos", "eos", "unk", "pad"))
    tk.add_special_tokens([bos, eos, unk, pad])  # already in the vocabulary: ids unchanged, now unsplittable
    tk.post_processor = None  # whatever a tokenizer.json has
    if cfg.get("add_bos_token", True):
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tk.token_to_id(bos))])
    tok = Tokenizer(tk, pad=pad, bos=bos, eos=eos)
    tok.newline_id = tok.token_id("Ċ")  # byte 0x0A in GPT-2's byte-to-unicode map, a base token of every vocab
    return tok


def load_t5_tokenizer(folder: str | Path) -> Tokenizer:
    """The (Flan-)T5 tokenizer from a folder with `tokenizer.json`."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tk = from_file(folder / "tokenizer.json")
    elif (folder / "spiece.model").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: reading its spiece.model would need protobuf or "
                                "sentencepiece; put the repo's tokenizer.json there (google/flan-t5-* has one)")
    else:
        raise FileNotFoundError(f"no T5 tokenizer in {folder}: looked for tokenizer.json (or spiece.model)")
    if not isinstance(tk.model, models.Unigram):
        raise CheckpointError(f"{folder}/tokenizer.json is a {type(tk.model).__name__}, not T5's SentencePiece Unigram")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))])
    return Tokenizer(tk, pad="<pad>", bos=None, eos="</s>")
