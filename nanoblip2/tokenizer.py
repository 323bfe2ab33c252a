"""
Tokenizers, as thin wrappers over the `tokenizers` library (no transformers at runtime).

Q-Former: BERT WordPiece (`bert-base-uncased`) plus a `[DEC]` BOS token, as LAVIS builds it in
`Blip2Base.init_tokenizer` (lavis/models/blip2_models/blip2.py:31-34):
`BertTokenizer.from_pretrained("bert-base-uncased", truncation_side="right")` then
`add_special_tokens({"bos_token": "[DEC]"})`. SPEC §2.1 and §7.4.

Notable details:
- `[DEC]` takes the next free id (30522 for bert-base-uncased, hence the Q-Former's 30523 embedding rows).
  If the folder's vocabulary already has `[DEC]` (a saved BLIP-2 tokenizer may), its id is reused.
  The tokenizer never inserts `[DEC]` itself: LAVIS's ITG swaps the `[CLS]` at position 0 for `bos_id` by hand.
- `tokenizer.json` wins over `vocab.txt`. From `vocab.txt` we rebuild HF's pipeline: BertNormalizer (clean text, split
  Chinese characters, lowercase per `tokenizer_config.json` `do_lower_case`, default True; accents are stripped
  whenever lowercasing unless `strip_accents` says otherwise, so "Café" -> "cafe"), BertPreTokenizer
  (whitespace + punctuation), WordPiece (`##` continuation, words over 100 characters become `[UNK]`), `[CLS] $A [SEP]`.
- Special tokens are "added tokens": a literal "[SEP]" or "[DEC]" in a caption becomes that one token, as in HF.
- Truncation is on the right and keeps the final `[SEP]`: the text is cut to `max_length - 2` tokens before
  `[CLS]`/`[SEP]` are added. Padding is on the right with `[PAD]` = 0 unless `padding_side="left"`.
- `decode` follows LAVIS's (slow, transformers 4) BertTokenizer: skips special tokens by default and then applies
  HF's `clean_up_tokenization` to the joined string ("man ' s" -> "man's"). The `tokenizers` WordPiece decoder alone
  cleans up per token and leaves "man ' s"; so does transformers 5's BertTokenizer unless
  `clean_up_tokenization_spaces` is set (its default changed from True in transformers 4 to False).
- Padding/truncation settings stored inside a `tokenizer.json` are cleared on load; `__call__` sets its own.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the models need. Shared by the BERT, OPT and T5 loaders."""

    def __init__(self, tk: HFTokenizer, pad: str, bos: str, eos: str, cls: str | None = None,
                 clean_up_spaces: bool = False):
        tk.no_padding()
        tk.no_truncation()
        self.tk, self.clean_up_spaces = tk, clean_up_spaces
        self.pad_id, self.bos_id, self.eos_id = self.token_id(pad), self.token_id(bos), self.token_id(eos)
        self.cls_id = self.token_id(cls) if cls is not None else None
        self.sep_id = self.eos_id  # BERT's name for the end token

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
        tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file():
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
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
