from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from gpt.ngram import NGram, token_contexts


def reference_probability(ids: list[int], order: int, discount: float, context: list[int], token: int,
                          vocab_size: int) -> float:
    """Interpolated Kneser-Ney written out with dictionaries, one context length at a time."""
    counts = [defaultdict(Counter) for _ in range(order)]
    for n in range(order):
        for i in range(n, len(ids)):
            counts[n][tuple(ids[i - n : i])][ids[i]] += 1
    continuation = [defaultdict(Counter) for _ in range(order)]
    for n in range(1, order):
        for before, following in counts[n].items():
            for next_token in following:
                continuation[n - 1][before[1:]][next_token] += 1
    p = 1.0 / vocab_size
    for n in range(order):
        if n > len(context):
            break
        table = counts[n] if n == order - 1 else continuation[n]
        seen = table.get(tuple(context[len(context) - n :]) if n else ())
        if not seen:
            break
        total = sum(seen.values())
        p = max(seen.get(token, 0) - discount, 0) / total + discount * len(seen) / total * p
    return p


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_equal_kneser_ney_written_out(order):
    rng = np.random.default_rng(order)
    ids, queries = rng.integers(0, 9, 600), rng.integers(0, 9, 40)
    model = NGram(ids, order, vocab_size=10, discount=0.6)  # token 9 never occurs
    probs = model.probs(token_contexts(torch.from_numpy(queries)[None], order - 1)[0])
    for i, row in enumerate(probs):
        context = queries[max(0, i - order + 2) : i + 1].tolist() if order > 1 else []
        expected = [reference_probability(ids.tolist(), order, 0.6, context, w, 10) for w in range(10)]
        torch.testing.assert_close(row, torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(queries)))
    assert (probs[:, 9] > 0).all()  # unseen tokens keep some probability


def test_a_known_text_by_hand():
    """Text 0 1 0 1 0 2, order 2, discount 0.5. After 0: 1 twice, 2 once (3 in all, 2 types). Continuation
    counts of the unigrams: 0 follows 1 only (1), 1 follows 0 (1), 2 follows 0 (1): 1/3 each, then mixed
    with uniform over 4 tokens by 0.5 * 3 types / 3."""
    model = NGram(np.array([0, 1, 0, 1, 0, 2]), order=2, vocab_size=4, discount=0.5)
    unigram = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]) - 0.5 / 3 + 0.5 * 3 / 3 * 0.25
    unigram[3] = 0.5 * 3 / 3 * 0.25
    after_zero = torch.tensor([0.0, 1.5 / 3, 0.5 / 3, 0.0]) + 0.5 * 2 / 3 * unigram
    probs = model.probs(torch.tensor([[0], [3], [-1]]))
    torch.testing.assert_close(probs[0], after_zero)
    torch.testing.assert_close(probs[1], unigram)  # a context never seen: the shorter one
    torch.testing.assert_close(probs[2], unigram)  # no context at all


def test_contexts_read_backwards_from_each_position_and_skip_padding():
    tokens = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4]])
    pad = torch.tensor([[False] * 4, [True, True, False, False]])
    contexts = token_contexts(tokens, 2, pad)
    assert contexts[0].tolist() == [[-1, 5], [5, 6], [6, 7], [7, 8]]
    assert contexts[1].tolist() == [[-1, -1], [-1, -1], [-1, 3], [3, 4]]
    assert token_contexts(tokens, 0).shape == (2, 4, 0)
