"""
Text generation shared by OPT and FlanT5: greedy, sampling (temperature, top-p) and beam search.
Produces the same ids as HF `GenerationMixin.generate` (generation/utils.py, transformers 5) for greedy and beam.

Notable details
- Two calls per LLM (nanochat engine.py's pattern): `lm.prefill(embeds, mask)` runs the prompt once -> the last
  position's logits (B, V) and a `Cache`; `lm.step(tokens, cache)` feeds one token per row -> (logits, cache). The
  caller expands both to B * num_beams rows (batch-major) with `cache.expand`; beam search keeps rows with
  `cache.reorder`. use_cache=False, the reference: `Replay` keeps no K/V and each step re-runs prefill.
- Lengths are in new tokens (`max_new_tokens`, `min_new_tokens`). Finished rows are padded with `pad_id`.
- Greedy and sampling modify raw logits, beam search log-probabilities (as HF). The repetition penalty sees
  `history` (the prompt's ids) plus everything generated.
- Beam search is HF's vectorised algorithm, a finished hypothesis scored sum(log p) / new_len ** length_penalty: an
  item stops when its K slots are full and its best running beam cannot beat the worst finished one.
  length_penalty < 0 favours short answers (the paper's VQA setting, -1).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Cache(NamedTuple):
    """The KV cache of OPT and T5. Batch is dim 0 in every tensor, so rows are picked by indexing."""
    layers: list        # per layer, (B, H, S, head_dim) tensors: OPT (k, v); T5 (k, v, cross k, cross v)
    mask: torch.Tensor  # (B, S) OPT: the attention mask of every position so far; T5: the encoder's

    def reorder(self, rows):  # (N,) row indices -> the cache of those rows, in that order
        return Cache([tuple(t[rows] for t in layer) for layer in self.layers], self.mask[rows])

    def expand(self, n):  # each row n times, batch-major: B rows -> B * n
        return self.reorder(torch.arange(self.mask.size(0), device=self.mask.device).repeat_interleave(n))


class Replay(NamedTuple):
    """use_cache=False: no keys or values, only what prefill needs to recompute everything."""
    embeds: torch.Tensor  # (B, S, C) the prompt
    mask: torch.Tensor    # (B, S)
    tokens: torch.Tensor  # (B, t) generated so far

    def reorder(self, rows):
        return Replay(*(x[rows] for x in self))

    def expand(self, n):
        return Replay(*(x.repeat_interleave(n, dim=0) for x in self))


def replay(lm, tokens, state):
    """The step of the cache-free path, `functools.partial(replay, lm)` in place of `lm.step`: the whole sequence."""
    state = state._replace(tokens=torch.cat([state.tokens, tokens[:, None]], dim=1))
    return lm.prefill(state.embeds, state.mask, state.tokens)[0], state


def process(scores, seqs, t, *, eos_id, min_new_tokens, repetition_penalty):
    """Logit processors, in place of HF's RepetitionPenalty and MinNewTokens. seqs: (N, prompt + t) token ids."""
    if repetition_penalty != 1.0 and seqs.size(1) > 0:
        s = scores.gather(1, seqs)
        scores = scores.scatter(1, seqs, torch.where(s < 0, s * repetition_penalty, s / repetition_penalty))
    if t < min_new_tokens:
        scores = scores.clone()
        scores[:, eos_id] = -float("inf")
    return scores


def top_p_filter(logits, top_p):
    """Keep the smallest set of tokens whose probability adds up to top_p (HF TopPLogitsWarper)."""
    sorted_logits, order = logits.sort(dim=-1)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def pick(x, idx):  # x (B, M, ...), idx (B, K) -> (B, K, ...): x[b, idx[b, k]]
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


@torch.no_grad()
def generate(step, logits, cache, history, *, eos_id, pad_id, max_new_tokens=30, min_new_tokens=0, num_beams=1,
             length_penalty=1.0, repetition_penalty=1.0, do_sample=False, temperature=1.0, top_p=1.0, generator=None):
    """step: `lm.step` (or the cache-free `replay`); logits (B * num_beams, V) and cache from prefill, expanded.
    history: (B, P) prompt ids seen by the repetition penalty (P may be 0). Returns new ids (B, T<=max_new_tokens)."""
    if do_sample and num_beams > 1:
        raise ValueError("sampling with beams is not implemented: use do_sample=True or num_beams > 1")
    opts = dict(eos_id=eos_id, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    if num_beams > 1:
        return beam_search(step, logits, cache, history, num_beams, max_new_tokens, length_penalty, pad_id, opts)
    seqs, done = history, torch.zeros(history.size(0), dtype=torch.bool, device=history.device)
    for t in range(max_new_tokens):
        scores = process(logits.float(), seqs, t, **opts)
        if do_sample:
            scores = scores / temperature
            scores = top_p_filter(scores, top_p) if top_p < 1.0 else scores
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(done, pad_id, nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        logits, cache = step(nxt, cache)
    return seqs[:, history.size(1):]


def beam_search(step, logits, cache, history, K, max_new, length_penalty, pad_id, opts):
    B, P, dev = history.size(0), history.size(1), history.device
    running = torch.full((B, K, P + max_new), pad_id, dtype=torch.long, device=dev)
    running[:, :, :P] = history[:, None]
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9                             # all beams start equal: expand only the first
    best, best_scores = running.clone(), torch.full((B, K), -1e9, device=dev)  # the K finished hypotheses per item
    best_done, best_len = torch.zeros_like(run_scores, dtype=torch.bool), torch.zeros_like(run_scores, dtype=torch.long)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # can a running beam still beat a finished one?
    in_top_k = torch.arange(2 * K, device=dev) < K
    for t in range(max_new):                              # logits: (B * K, V)
        logp = process(F.log_softmax(logits.float(), dim=-1), running[:, :, :P + t].flatten(0, 1), t, **opts)
        V = logp.size(-1)
        logp = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_scores, top_idx = logp.topk(2 * K)                                  # (B, 2K)
        beam, tok = top_idx // V, top_idx % V
        cand = pick(running, beam)
        cand[:, :, P + t] = tok
        ended = (tok == opts["eos_id"]) | (t + 1 >= max_new)
        # the best K candidates that did not end keep running
        keep_scores = top_scores + ended.float() * -1e9
        nxt = keep_scores.topk(K)[1]
        running, run_scores, src_beam = pick(cand, nxt), pick(keep_scores, nxt), pick(beam, nxt)
        # candidates among the top K that ended compete for the finished slots
        just = ended & in_top_k[None]
        fin_scores = top_scores / ((t + 1) ** length_penalty) + (~open_).float() * -1e9 + (~just) * -1e9
        merged = torch.cat([best_scores, fin_scores], dim=1).topk(K)[1]
        new_len = torch.full_like(just, t + 1, dtype=torch.long)
        best, best_scores, best_done, best_len = (pick(torch.cat(pair, dim=1), merged) for pair in (
            (best, cand), (best_scores, fin_scores), (best_done, just), (best_len, new_len)))
        worst = torch.where(best_done, best_scores.min(dim=1, keepdim=True)[0], -1e9)
        open_ = open_ & (run_scores[:, :1] / ((t + 1) ** length_penalty) > worst).any(dim=-1, keepdim=True)
        if not open_.any() or ended.all():
            break
        rows = (src_beam + torch.arange(B, device=dev)[:, None] * K).flatten()
        logits, cache = step(running[:, :, P + t].flatten(), cache.reorder(rows))
    return best[:, 0, P:P + int(best_len[:, 0].max())]  # slots past a hypothesis' end still hold pad_id
