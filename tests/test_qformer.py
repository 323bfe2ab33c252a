"""The four self-attention masks against hand-written matrices, and the ITG cache equivalence."""
import torch

from nanoblip2 import qformer as qf

PAD = torch.tensor([[1, 1, 1], [1, 1, 0]])  # Q=2 queries, T=3 text tokens, the second row padded once


def test_query_mask():
    assert qf.query_mask(2).tolist() == [[[1, 1], [1, 1]]]


def test_text_mask():
    assert qf.text_mask(PAD).tolist() == [
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
        [[1, 1, 0], [1, 1, 0], [1, 1, 0]],
    ]


def test_bidirectional_mask():
    #        q q t t t
    full = [[1, 1, 1, 1, 1]] * 5
    padded = [[1, 1, 1, 1, 0]] * 5
    assert qf.bidirectional_mask(2, PAD).tolist() == [full, padded]


def test_multimodal_causal_mask():
    assert qf.multimodal_causal_mask(2, PAD).tolist() == [
        [[1, 1, 0, 0, 0],   # queries see queries only
         [1, 1, 0, 0, 0],
         [1, 1, 1, 0, 0],   # text sees all queries and the text up to itself
         [1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1]],
        [[1, 1, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0],
         [1, 1, 1, 1, 0]],  # the padding key stays hidden
    ]


@torch.no_grad()
def test_itg_cache_equals_one_pass_with_unilm_mask():
    torch.manual_seed(0)
    cfg = qf.QFormerConfig(width=48, depth=4, heads=3, mlp=37, vision_width=20, num_query_tokens=5,
                           vocab_size=50, max_positions=16, eps=1e-7)
    m = qf.QFormer(cfg).eval()
    Q, image = torch.randn(2, 5, 48), torch.randn(2, 9, 20)
    ids, pad = torch.randint(0, 50, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    _, past = m(query_embeds=Q, image=image)  # the ITC query pass
    cached, _ = m(input_ids=ids, mask=qf.multimodal_causal_mask(5, pad)[:, 5:], past=past)
    full, _ = m(query_embeds=Q, input_ids=ids, image=image, mask=qf.multimodal_causal_mask(5, pad))
    diff = (cached - full[:, 5:]).abs().max().item()
    print(f"ITG cached vs one UniLM pass: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # and the mask matters: a bidirectional pass gives other text states
    bi, _ = m(query_embeds=Q, input_ids=ids, image=image, mask=qf.bidirectional_mask(5, pad))
    assert (bi[:, 5:] - full[:, 5:]).abs().max() > 1e-2
