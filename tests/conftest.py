"""Tiny random Hugging Face models with odd sizes, saved as safetensors: the oracles for the parity tests."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=3, image_size=28,
              patch_size=7, layer_norm_eps=3e-6, qkv_bias=True)
QFORMER = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=4, num_attention_heads=3, vocab_size=99,
               max_position_embeddings=40, layer_norm_eps=1e-7, cross_attention_frequency=2)
BERT = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=4, num_attention_heads=3, vocab_size=98,
            max_position_embeddings=40, layer_norm_eps=1e-7, type_vocab_size=2)


def randomize(model, seed=0):
    """HF initialises biases to 0 and norms to 1, which would hide transposed or swapped tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and (p == 1).all() else 0.0))
    return model.eval()


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return str(path)


@pytest.fixture(scope="session")
def itm_folder(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, use_qformer_text_input=True),
                      num_query_tokens=5, image_text_hidden_size=24)
    model = randomize(Blip2ForImageTextRetrieval(cfg))
    return save(model, tmp_path_factory.mktemp("itm")), model


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(1)
    model = randomize(BertForMaskedLM(BertConfig(**BERT)), seed=1)
    return save(model, tmp_path_factory.mktemp("bert")), model


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(2)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=3,
                           image_size=28, patch_size=7, layer_norm_eps=2e-5)
    model = randomize(CLIPVisionModel(cfg), seed=2)
    return save(model, tmp_path_factory.mktemp("clip")), model


def two_ranks(worker, tmp_path):
    """worker(rank, world=2, port, result_file) in two gloo processes on a free port -> what it saved there."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    return torch.load(tmp_path / "ddp.pt")


def text_batch(vocab, B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b:] = 0  # different padding per row
    return ids.masked_fill(mask == 0, 0), mask


def pixels(B=2, size=28, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


CAPTIONS = ["a man riding a horse on the beach", "two dogs playing with a red ball", "a cat on a mat\n",
            "question: which city is this? answer: singapore", "a photo of a small boat on a calm lake\n",
            "a pizza with olives and mushrooms", "a bird on a branch of a tree", "three children playing soccer"]


def opt_tokenizer_json(path, vocab_size=300):
    """A tiny OPT-style byte-level BPE: <s> <pad> </s> <unk> at 0..3, BOS </s> prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CAPTIONS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tk.save(str(path / "tokenizer.json"))
    return tk


def t5_tokenizer_json(path, vocab_size=90):
    """A tiny T5-style Unigram: <pad> </s> <unk> at 0..2, "▁word" pieces by frequency, then "▁" and single
    characters; </s> appended. Written down, not trained: the Unigram trainer differs from run to run."""
    import collections
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    words = collections.Counter(w for c in CAPTIONS for w in c.split()).most_common()
    chars = sorted({ch for c in CAPTIONS for ch in c if not ch.isspace()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0 - i / 100) for i, (w, _) in
                                                               enumerate(words)]
    pieces = (pieces + [(ch, -10.0) for ch in ["▁"] + chars])[:vocab_size]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2))
    tk.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tk.save(str(path / "tokenizer.json"))
    return tk


def real_eva_biases(model):
    """Real BLIP-2 checkpoints store the EVA qkv bias as cat(q_bias, 0, v_bias): no k bias. (A k bias cannot change
    the output, test_parity checks that with random ones, but it moves the float rounding by ~1e-6, which the
    sharpened LM heads below would magnify past the 1e-5 tolerance.)"""
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            C = layer.self_attn.qkv.bias.numel() // 3
            layer.self_attn.qkv.bias[C:2 * C] = 0
    return model


def blip2_config(text_config, image_token_index):
    from transformers import Blip2Config
    return Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text_config, num_query_tokens=5,
                       image_token_index=image_token_index)


@pytest.fixture(scope="session")
def blip2_opt(tmp_path_factory):
    """A tiny Blip2ForConditionalGeneration with OPT, in the 2024 layout (image placeholder token), + tokenizer."""
    from transformers import Blip2ForConditionalGeneration, OPTConfig
    path = tmp_path_factory.mktemp("blip2_opt")
    tk = opt_tokenizer_json(path)
    newline = tk.token_to_id("Ċ")
    text = OPTConfig(vocab_size=307, hidden_size=48, num_hidden_layers=3, ffn_dim=37, num_attention_heads=3,
                     max_position_embeddings=100, eos_token_id=newline, pad_token_id=1, bos_token_id=2)
    torch.manual_seed(3)
    model = real_eva_biases(randomize(Blip2ForConditionalGeneration(blip2_config(text, image_token_index=306)), seed=3))
    with torch.no_grad():  # sharpen the LM a little so that beams disagree and end tokens do get chosen
        model.language_model.lm_head.weight.mul_(4)
    return save(model, path), model


@pytest.fixture(scope="session")
def blip2_t5(tmp_path_factory):
    """A tiny Blip2ForConditionalGeneration with a FlanT5-style LM (gated GELU, untied head) + tokenizer."""
    from transformers import Blip2ForConditionalGeneration, T5Config
    path = tmp_path_factory.mktemp("blip2_t5")
    t5_tokenizer_json(path)
    text = T5Config(vocab_size=96, d_model=48, d_kv=16, d_ff=37, num_layers=3, num_decoder_layers=3, num_heads=3,  # HF 5.24 sizes the Blip2 T5 cache by num_layers
                    relative_attention_num_buckets=8, relative_attention_max_distance=20, layer_norm_epsilon=1e-5,
                    feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(4)
    model = real_eva_biases(randomize(Blip2ForConditionalGeneration(blip2_config(text, image_token_index=95)), seed=4))
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(4)
    return save(model, path), model
