"""generation.py: nucleus (top-p) filtering on a hand-computed example, and one-token prompts (a prefill with
T == 1) against a full recompute without cache."""

import pytest
import torch

from generation import sample_next
from model import ModelConfig, Transformer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (on a busy machine, a lot of it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    # four equally likely tokens, each exactly 0.25 (exp(0) / 4 has no rounding): the smallest set whose mass
    # reaches 0.5 has two tokens, 0.75 needs three, 0.76 all four; ties keep the lower ids (a stable sort)
    logits = torch.zeros(4000, 4)
    g = torch.Generator().manual_seed(0)
    for top_p, kept in [(0.5, {0, 1}), (0.75, {0, 1, 2}), (0.76, {0, 1, 2, 3}), (0.2, {0})]:
        tok, _ = sample_next(logits, 1.0, top_p=top_p, generator=g)
        assert set(tok.tolist()) == kept, (top_p, set(tok.tolist()))
    # unequal probabilities 0.5, 0.25, 0.125, 0.125 (logits log2 of them, powers of two: exact):
    # p = 0.5 is reached by the first token alone, 0.75 by two, 0.8 needs three
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]])).repeat(4000, 1)
    for top_p, kept in [(0.5, {1}), (0.75, {1, 3}), (0.8, {1, 3, 0})]:
        tok, _ = sample_next(logits, 1.0, top_p=top_p, generator=g)
        assert set(tok.tolist()) == kept, (top_p, set(tok.tolist()))


def test_generate_batch_of_one_token_prompts_equals_full_recompute():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, kernels="torch")
    m = Transformer(cfg).eval()
    prompts = [[5], [11], [42]]
    out = m.generate(prompts, max_new_tokens=6, temperature=0)["tokens"]
    for row, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):
            logits, _ = m(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        assert out[row].tolist() == seq[1:], row
