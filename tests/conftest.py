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


def text_batch(vocab, B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b:] = 0  # different padding per row
    return ids.masked_fill(mask == 0, 0), mask


def pixels(B=2, size=28, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))
